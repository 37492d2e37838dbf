"""benchmarks/train_lm.py smoke (CPU, tiny model, a few steps): both variants from the same init and data,
one PNG with both curves, JSON with the validation perplexity."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "train_lm.py"


def _bench():
    spec = importlib.util.spec_from_file_location("train_lm_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = ["--steps", "4", "--hidden", "64", "--layers", "1", "--heads", "2", "--intermediate", "128",
        "--seqlen", "32", "--batch-size", "2", "--val-windows", "8", "--quiet"]


def test_train_lm_smoke(tmp_path, capsys):
    out = tmp_path / "train_lm.json"
    assert _bench().main([*TINY, "--device", "cpu", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["quant"] for r in rows] == ["none", "hq-lss4"]
    none, hq = rows
    assert none["quant_config"] is None and hq["quant_config"]["sampling_ratio"] == 0.5
    # same seed and windows: the first step's loss differs only by the quantized forward
    assert abs(none["history"][0]["loss"] - hq["history"][0]["loss"]) < 0.2
    assert none["history"][0]["loss"] == pytest.approx(math.log(256), abs=0.3)
    for r in rows:
        assert len(r["history"]) == 4 and r["val_windows"] == 8
        assert r["value"] == pytest.approx(math.exp(r["val_loss"])) and math.isfinite(r["value"])
    png = out.with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import zlib

    start = png.index(b"IDAT") + 4
    raw = zlib.decompress(png[start : start + int.from_bytes(png[start - 8 : start - 4], "big")])
    assert b"\x1f\x77\xb4" in raw and b"\xd6\x27\x28" in raw  # both curves drawn (blue: none, red: hq-lss4)
    assert "| hq-lss4 |" in capsys.readouterr().out


def test_train_lm_bad_input(tmp_path):
    from lowbit.errors import LowbitError

    bench = _bench()
    with pytest.raises(LowbitError, match="--quants"):
        bench.main([*TINY, "--quants", "fp4", "--out", str(tmp_path / "x.json")])
    with pytest.raises(LowbitError, match="test split"):
        bench.main([*TINY, "--device", "cpu", "--data", "wikitext2,lambada_text", "--out", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()


@pytest.mark.gpu
def test_train_lm_cuda_smoke(tmp_path):
    assert torch.cuda.is_available()
    out = tmp_path / "train_lm.json"
    assert _bench().main([*TINY, "--device", "cuda", "--out", str(out)]) == 0
    assert all(math.isfinite(r["value"]) for r in json.loads(out.read_text()))
