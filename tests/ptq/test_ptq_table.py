"""benchmarks/ptq_table.py end to end on a tiny model: runs in threads (with TF32 deferred evaluation) give the
same numbers as runs one after another."""

import json
import sys
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _table_main():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from ptq_table import main
    finally:
        sys.path.pop(0)
    return main


def test_threaded_tf32_runs_match_sequential_runs(tmp_path, tiny_model_dir):
    main = _table_main()
    common = ["--model", str(tiny_model_dir("llama")), "--device", "cpu", "--runs",
              "omniquant:W4A16,affinequant:W3A16g32", "--nsamples", "2", "--seqlen", "32", "--epochs", "1",
              "--limit", "2", "--eval-seqlen", "64"]
    before = torch.get_float32_matmul_precision()
    main(common + ["--out", str(tmp_path / "seq.json")])
    main(common + ["--parallel", "2", "--tf32", "--out", str(tmp_path / "par.json")])
    assert torch.get_float32_matmul_precision() == before  # the process-wide switch is restored

    def values(name):
        rows = json.loads((tmp_path / name).read_text())
        return {r["name"]: (r["value"], r["recipe"]["tf32"], r["concurrent_runs"]) for r in rows}

    seq, par = values("seq.json"), values("par.json")
    assert len(seq) == 2 and seq.keys() == par.keys()
    for key in seq:
        assert abs(seq[key][0] - par[key][0]) <= 1e-4 * seq[key][0], key
        assert seq[key][1:] == (True, 1) and par[key][1:] == (True, 2)
