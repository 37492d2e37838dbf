"""benchmarks/ptq_table.py end to end on a tiny model: runs in threads (with TF32 deferred evaluation) give the
same numbers as runs one after another, calibrate and evaluate at the precision they should, and one failing run
does not lose the others."""

import json
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def table(monkeypatch):
    """The benchmark module, with ``quantize`` and the evaluation recording the process-wide matmul precision (and
    the ``tf32`` argument) each call sees: TF32 does nothing on a CPU, so the numbers alone cannot show it."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import ptq_table

    seen = {"calibrate": [], "evaluate": []}
    quantize, evaluate = ptq_table.quantize, ptq_table.eval_and_record

    def recording_quantize(loaded, config, **kwargs):
        seen["calibrate"].append((config.label, torch.get_float32_matmul_precision(), kwargs.get("tf32")))
        if config.label == "smoothquant" and getattr(ptq_table, "_fail_smoothquant", False):
            raise RuntimeError("injected failure")
        return quantize(loaded, config, **kwargs)

    def recording_evaluate(*args, **kwargs):
        seen["evaluate"].append(torch.get_float32_matmul_precision())
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(ptq_table, "quantize", recording_quantize)
    monkeypatch.setattr(ptq_table, "eval_and_record", recording_evaluate)
    ptq_table.seen = seen
    yield ptq_table
    sys.modules.pop("ptq_table", None)


def _common(tiny_model_dir, runs="omniquant:W4A16,affinequant:W3A16g32"):
    return ["--model", str(tiny_model_dir("llama")), "--device", "cpu", "--runs", runs, "--nsamples", "2",
            "--seqlen", "32", "--epochs", "1", "--limit", "2", "--eval-seqlen", "64"]


def _values(path):
    return {r["name"]: (r["value"], r["recipe"]["tf32"], r["concurrent_runs"]) for r in json.loads(path.read_text())}


def test_threaded_tf32_runs_match_sequential_runs(tmp_path, tiny_model_dir, table):
    before = torch.get_float32_matmul_precision()
    table.main(_common(tiny_model_dir) + ["--out", str(tmp_path / "seq.json")])
    assert [s[1:] for s in table.seen["calibrate"]] == [(before, True)] * 2  # alone: the engine switches TF32 itself
    table.seen["calibrate"].clear()
    table.seen["evaluate"].clear()
    table.main(_common(tiny_model_dir) + ["--parallel", "2", "--tf32", "--out", str(tmp_path / "par.json")])
    assert [s[1:] for s in table.seen["calibrate"]] == [("high", None)] * 2  # threads: TF32 set once, for all
    assert table.seen["evaluate"] == [before] * 2  # evaluated after the switch is back
    assert torch.get_float32_matmul_precision() == before

    seq, par = _values(tmp_path / "seq.json"), _values(tmp_path / "par.json")
    assert len(seq) == 2 and seq.keys() == par.keys()
    for key in seq:
        assert abs(seq[key][0] - par[key][0]) <= 1e-4 * seq[key][0], key
        assert seq[key][1:] == (True, 1) and par[key][1:] == (True, 2)


@pytest.mark.parametrize("tf32", [False, True])
def test_a_failing_run_keeps_the_others(tmp_path, tiny_model_dir, table, tf32):
    table._fail_smoothquant = True
    before = torch.get_float32_matmul_precision()
    out = tmp_path / "out.json"
    argv = _common(tiny_model_dir, "smoothquant:W4A16,omniquant:W4A16") + ["--parallel", "2", "--out", str(out)]
    with pytest.raises(RuntimeError, match="injected failure"):
        table.main(argv + (["--tf32"] if tf32 else []))
    assert list(_values(out)) == ["omniquant W4A16"]
    assert torch.get_float32_matmul_precision() == before
    if not tf32:  # threads without --tf32 calibrate in full float32, set once for all of them
        assert {s[1:] for s in table.seen["calibrate"]} == {("highest", None)}


def test_rtn_runs_beside_a_scale_init_for_the_learning_ones(tmp_path, tiny_model_dir, table):
    out = tmp_path / "mixed.json"
    runs = _common(tiny_model_dir, "rtn:W4A16,affinequant:W2A16g32")
    table.main(runs + ["--scale-init", "smoothquant", "--out", str(out)])
    rows = {r["name"]: r["recipe"] for r in json.loads(out.read_text())}
    assert "scale_init" not in rows["rtn W4A16"]  # rtn learns nothing
    affine = rows["affinequant+weights W2A16g32"]  # weight-only AffineQuant learns its weights by default
    assert (affine["scale_init"], affine["let_lr"], affine["weight_lr"]) == ("smoothquant", 1e-3, 3e-5)


def test_run_options_apply_to_their_run_only(table):
    import argparse

    args = argparse.Namespace(nsamples=2, seqlen=32, epochs=1, batch_size=1, seed=0, rotate=None, weight_lr=None)
    plain, tuned = (table.parse_run(t, args) for t in ("affinequant:W4A4", "affinequant:W4A4@rotate=inputs@weight_lr=1e-4"))
    assert (plain.rotate, plain.weight_lr) == (None, None)
    assert (tuned.rotate, tuned.weight_lr, tuned.label) == ("inputs", 1e-4, "inputs-rotated affinequant+weights")
    assert table.parse_run("affinequant:W6A6@norm_matrices=false", args).norm_matrices is False
    for bad in ("rtn:W4A4@colour=red", "rtn:W4A4@rotate=", "affinequant:W4A4@norm_matrices=yes"):
        with pytest.raises(SystemExit):
            table.parse_run(bad, args)
    assert table.option_suffix("affinequant:W4A4@weight_lr=1e-4@rotate=inputs") == "@rotate=inputs@weight_lr=1e-4"
    assert table.option_suffix("rtn:W4A4") == ""


def test_runs_that_differ_only_in_options_keep_their_own_names(tmp_path, tiny_model_dir, table):
    out = tmp_path / "options.json"
    runs = _common(tiny_model_dir, "omniquant:W4A16@let_lr=1e-3,omniquant:W4A16@let_lr=5e-3")
    table.main(runs + ["--checkpoint-dir", str(tmp_path / "ckpt"), "--out", str(out)])
    names = [r["name"] for r in json.loads(out.read_text())]
    assert sorted(names) == ["omniquant W4A16@let_lr=1e-3", "omniquant W4A16@let_lr=5e-3"]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["omniquant-W4A16@let_lr=1e-3",
                                                                   "omniquant-W4A16@let_lr=5e-3"]
    with pytest.raises(SystemExit, match="names one run twice"):
        table.main(_common(tiny_model_dir, "rtn:W4A16,rtn:W4A16") + ["--out", str(out)])


def test_a_run_with_end_to_end_tuning_resumes_the_blocks_of_the_same_run_without(tmp_path, tiny_model_dir, table):
    """Same blocks, one folder: the later run reuses them and only adds the end-to-end step."""
    import argparse

    args = argparse.Namespace(nsamples=2, seqlen=32, epochs=1, batch_size=1, seed=0, rotate=None, weight_lr=None)
    texts = ("omniquant:W4A16", "omniquant:W4A16@e2e_epochs=1@e2e_lr=1e-2", "omniquant:W4A16@e2e_epochs=1@let_lr=1e-3")
    folders = [table.checkpoint_folder(table.parse_run(t, args), table.option_suffix(t)) for t in texts]
    assert folders == ["omniquant-W4A16", "omniquant-W4A16", "omniquant-W4A16@let_lr=1e-3"]
    out, ckpt = tmp_path / "e2e.json", tmp_path / "ckpt"
    extra = ["--checkpoint-dir", str(ckpt), "--out", str(out)]
    with pytest.raises(SystemExit, match="share their block checkpoints"):
        table.main(_common(tiny_model_dir, ",".join(texts[:2])) + extra + ["--parallel", "2"])
    table.main(_common(tiny_model_dir, texts[0]) + extra)
    blocks = lambda: {f.name: f.stat().st_mtime_ns for f in (ckpt / "omniquant-W4A16").glob("block_*")}  # noqa: E731
    manifest, written = (ckpt / "omniquant-W4A16" / "manifest.json").read_text(), blocks()
    table.main(_common(tiny_model_dir, texts[1]) + extra)
    assert sorted(p.name for p in ckpt.iterdir()) == ["omniquant-W4A16"]
    assert written and blocks() == written  # resumed, not calibrated again
    assert (ckpt / "omniquant-W4A16" / "manifest.json").read_text() == manifest
    tuned = json.loads(out.read_text())[0]
    assert tuned["name"] == "omniquant+e2e W4A16@e2e_epochs=1@e2e_lr=1e-2" and len(tuned["e2e"]["epoch_losses"]) == 1
