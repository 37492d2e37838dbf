"""``lowbit train`` front (run_train): a CPU smoke run writes a log and a PNG; bad input fails before writing."""

import argparse
import json
import math
import struct
import zlib

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.train.cli import add_train_parser, run_train

TINY = ["--steps", "4", "--hidden", "32", "--intermediate", "64", "--heads", "2", "--seqlen", "32",
        "--batch-size", "2", "--eval-batches", "1"]


def _args(*argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("-q", "--quiet", action="store_true")
    add_train_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["-q", "train", *argv])


def _read_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    pos, idat = 8, b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        assert zlib.crc32(kind + body) & 0xFFFFFFFF == struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])[0]
        idat += body if kind == b"IDAT" else b""
        pos += 12 + length
    raw = zlib.decompress(idat)
    assert len(raw) == height * (1 + 3 * width)
    return width, height, raw


@pytest.mark.parametrize("quant", ["hq-lss4", "none"])
def test_train_smoke(tmp_path, quant, capsys):
    out = tmp_path / quant
    assert run_train(_args(*TINY, "--quant", quant, "--output", str(out))) == 0
    log = json.loads((out / "train_log.json").read_text())
    assert [s["step"] for s in log["steps"]] == [1, 2, 3, 4]
    assert all(math.isfinite(s["loss"]) for s in log["steps"])
    assert log["steps"][0]["loss"] == pytest.approx(math.log(256), abs=0.3)  # random init ~ uniform over bytes
    assert math.isfinite(log["eval"]["loss"])
    assert (log["quant_config"] is None) == (quant == "none")
    if quant == "hq-lss4":
        assert log["quant_config"]["sampling_ratio"] == 0.5 and log["quant_config"]["block_size"] == 32
    width, height, raw = _read_png(out / "loss.png")
    assert (width, height) == (640, 400)
    assert b"\x1f\x77\xb4" in raw  # the loss curve's colour is drawn
    assert "held-out loss" in capsys.readouterr().out


def test_bad_input_fails_before_writing(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(LowbitError, match="--steps must be at least 1"):
        run_train(_args(*TINY, "--steps", "0", "--output", str(out)))
    with pytest.raises(LowbitError, match="not divisible by --heads"):
        run_train(_args(*TINY, "--hidden", "30", "--heads", "4", "--output", str(out)))
    with pytest.raises(LowbitError, match="must be even"):
        run_train(_args(*TINY, "--hidden", "30", "--heads", "2", "--output", str(out)))
    with pytest.raises(LowbitError, match="cannot tile the input width 48"):
        run_train(_args(*TINY, "--hidden", "48", "--heads", "2", "--output", str(out)))
    with pytest.raises(LowbitError, match="only apply to a quantized"):
        run_train(_args(*TINY, "--quant", "none", "--sampling-ratio", "0.3", "--output", str(out)))
    with pytest.raises(LowbitError, match="--task lm only"):
        run_train(_args(*TINY, "--task", "sst2", "--cuda-graph", "--output", str(out)))
    if not torch.cuda.is_available():
        with pytest.raises(LowbitError, match="--cuda-graph needs a CUDA device"):
            run_train(_args(*TINY, "--cuda-graph", "--output", str(out)))
    with pytest.raises(LowbitError, match="lambada_text.*test split"):
        run_train(_args(*TINY, "--data", "lambada_text", "--output", str(out)))
    assert not out.exists()
    out.mkdir()
    (out / "x").write_text("keep")
    with pytest.raises(LowbitError, match="already exists"):
        run_train(_args(*TINY, "--output", str(out)))


@pytest.mark.gpu
def test_train_cuda_graph_smoke(tmp_path):
    # 3 eager steps, the capture, then replays: every step trains and logs a finite loss
    out = tmp_path / "graph"
    assert run_train(_args(*TINY, "--steps", "8", "--device", "cuda", "--cuda-graph", "--output", str(out))) == 0
    log = json.loads((out / "train_log.json").read_text())
    losses = [s["loss"] for s in log["steps"]]
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses) and len(set(losses)) == 8
    assert log["args"]["cuda_graph"] is True
