"""The CLI end to end on tiny models: quantize → save → eval, and every bad input gives one line and exit 2."""

import json
import subprocess
import sys

import pytest
from conftest import tiny_config

from lowbit.cli import main


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    from lowbit.data import calibration_text

    path = tmp_path_factory.mktemp("text") / "eval.txt"
    path.write_text(calibration_text("wikitext2")[:20000])
    return path


def run_error(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if line.startswith("lowbit: error:")]
    assert rc == 2, err
    assert len(error_lines) == 1 and "Traceback" not in err, err
    return error_lines[0]


def test_quantize_save_eval_round_trip(tmp_path, capsys, tiny_model_dir, text_file):
    out = tmp_path / "q"
    argv = ["-q", "quantize", "--model", str(tiny_model_dir("llama")), "--wbits", "4", "--abits", "8",
            "--group-size", "32", "--output", str(out), "--eval", str(text_file), "--seqlen", "64",
            "--device", "cpu"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| task | metric | FP (float32) | rtn W4A8g32 |" in printed
    meta = json.loads((out / "quantization.json").read_text())
    assert meta["config"]["wbits"] == 4 and meta["activations"]["bits"] == 8
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    rows = json.loads((out / "eval_results.json").read_text())
    fp, quant = [r["value"] for r in rows]
    assert quant > fp  # 4-bit weights and 8-bit activations cost something on a random model
    assert main(["-q", "eval", "--model", str(out), "--tasks", str(text_file), "--seqlen", "64",
                 "--json", str(tmp_path / "e.json")]) == 0
    again = json.loads((tmp_path / "e.json").read_text())[0]
    assert again["name"] == "rtn W4A8g32"
    assert again["value"] == pytest.approx(quant, rel=2e-3)  # weights were saved as float16


def test_affinequant_cli_side_by_side_and_reload(tmp_path, capsys, tiny_model_dir, text_file):
    """The README's main job in miniature: calibrate, print FP / RTN / AffineQuant, save, reload, same number."""
    out = tmp_path / "aq"
    argv = ["-q", "quantize", "--method", "affinequant", "--model", str(tiny_model_dir("llama")), "--wbits", "4",
            "--abits", "4", "--nsamples", "2", "--calib-seqlen", "32", "--epochs", "1", "--output", str(out),
            "--eval", str(text_file), "--seqlen", "64", "--compare-rtn", "--device", "cpu"]
    assert main(argv) == 0
    assert "| FP (float32) | rtn W4A4 | affinequant W4A4 |" in capsys.readouterr().out
    meta = json.loads((out / "quantization.json").read_text())
    assert meta["config"]["method"] == "affinequant" and meta["config"]["seqlen"] == 32
    assert json.loads((out / "calibration_log.json").read_text())[0]["block"] == 0
    assert not (tmp_path / ".aq.calib").exists()  # resume points are removed once the run has finished
    calibrated = json.loads((out / "eval_results.json").read_text())[-1]["value"]
    assert main(["-q", "eval", "--model", str(out), "--tasks", str(text_file), "--seqlen", "64",
                 "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())[0]["value"] == pytest.approx(calibrated, rel=2e-3)


@pytest.mark.parametrize("flags, weight_lr, norm_matrices", [
    (["--rotate", "inputs"], 0.0, True),  # the norm matrices' default after an input rotation
    (["--rotate", "inputs", "--no-norm-matrices"], 0.0, False),
    (["--abits", "16", "--weight-lr", "1e-4"], 1e-4, None),  # Block-AP, weight-only (no norm matrices: as given)
    (["--abits", "16"], 3e-5, None),  # weight-only AffineQuant's default rate, spelled out
    (["--abits", "16", "--weight-lr", "0"], 0.0, None),  # the papers' AffineQuant: weights as loaded
])
def test_rotation_norm_matrices_and_weight_lr_flags_reach_the_saved_config(tmp_path, tiny_model_dir, flags, weight_lr,
                                                                          norm_matrices):
    out = tmp_path / "aq"
    argv = ["-q", "quantize", "--method", "affinequant", "--model", str(tiny_model_dir("llama")), "--wbits", "4",
            "--abits", "4", "--nsamples", "2", "--calib-seqlen", "32", "--epochs", "1", "--output", str(out),
            "--device", "cpu", *flags]
    assert main(argv) == 0
    config = json.loads((out / "quantization.json").read_text())["config"]
    assert (config.get("weight_lr", 0.0), config["norm_matrices"]) == (weight_lr, norm_matrices)


def test_eval_reads_a_packed_output_like_the_fake_quant_one(tmp_path, capsys, tiny_model_dir, text_file):
    """`lowbit eval` on a `--format packed` output runs the packed modules and gets the fake-quant save's number."""
    import torch

    from lowbit import load_model
    from lowbit.export import PackedLinear

    scores = {}
    for fmt in ("fake", "packed"):
        out = tmp_path / fmt
        assert main(["-q", "quantize", "--model", str(tiny_model_dir("llama")), "--wbits", "4", "--abits", "8",
                     "--group-size", "32", "--format", fmt, "--output", str(out), "--device", "cpu"]) == 0
        assert main(["-q", "eval", "--model", str(out), "--tasks", str(text_file), "--seqlen", "64",
                     "--json", str(tmp_path / f"{fmt}.json")]) == 0
        row = json.loads((tmp_path / f"{fmt}.json").read_text())[0]
        assert row["name"] == "rtn W4A8g32"
        scores[fmt] = row["value"]
    assert "| rtn W4A8g32 |" in capsys.readouterr().out
    # the same integer weights; only the fake-quant save rounds them to float16
    assert scores["packed"] == pytest.approx(scores["fake"], rel=2e-3)
    loaded = load_model(tmp_path / "packed", dtype="float16")
    assert isinstance(loaded.model.model.layers[0].self_attn.q_proj, PackedLinear)
    assert loaded.model.model.embed_tokens.weight.dtype == torch.float16 and "packed" in loaded.source
    assert load_model(tmp_path / "packed").model.model.embed_tokens.weight.dtype == torch.float32  # auto on CPU


def test_corrupt_quantization_json_is_one_line(tmp_path, capsys, tiny_model_dir):
    import shutil

    shutil.copytree(tiny_model_dir("llama"), tmp_path / "m")
    (tmp_path / "m" / "quantization.json").write_text("{not json")
    for command in ("eval", "generate", "bench", "export"):
        extra = {"generate": ["--prompt", "x"], "export": ["--format", "gptq", "--output", str(tmp_path / "x")],
                 "eval": [], "bench": []}[command]
        line = run_error(capsys, ["-q", command, "--model", str(tmp_path / "m"), *extra])
        assert "quantization.json is not valid JSON" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


@pytest.mark.parametrize("bits", ["1", "9"])
def test_bad_bits(tmp_path, capsys, bits):
    line = run_error(capsys, ["quantize", "--wbits", bits, "--output", str(tmp_path / "o")])
    assert "--wbits must be an integer from 2 to 8" in line
    assert not (tmp_path / "o").exists()


def test_missing_model_path(tmp_path, capsys):
    line = run_error(capsys, ["eval", "--model", str(tmp_path / "nope")])
    assert "model path does not exist" in line


def test_unknown_architecture(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    line = run_error(capsys, ["eval", "--model", str(tmp_path / "gpt2")])
    assert "unsupported architecture 'gpt2'" in line and "llama" in line and "opt" in line


def test_group_size_not_dividing_writes_nothing(tmp_path, capsys, tiny_model_dir):
    out = tmp_path / "o"
    line = run_error(capsys, ["-q", "quantize", "--model", str(tiny_model_dir("llama")), "--group-size", "48",
                              "--output", str(out)])
    assert "group size 48 does not divide the input width 64" in line
    assert list(tmp_path.iterdir()) == []


def test_empty_and_too_short_text_files(tmp_path, capsys, tiny_model_dir):
    empty, short = tmp_path / "empty.txt", tmp_path / "short.txt"
    empty.write_text("")
    short.write_text("just a few words")
    assert "is empty" in run_error(capsys, ["-q", "eval", "--model", str(tiny_model_dir("llama")), "--tasks", str(empty)])
    line = run_error(capsys, ["-q", "eval", "--model", str(tiny_model_dir("llama")), "--tasks", str(short)])
    assert "tokens but at least 2048 are needed" in line


def test_unknown_task_and_existing_output(tmp_path, capsys):
    assert "unknown task 'hellaswag'" in run_error(capsys, ["eval", "--tasks", "hellaswag"])
    (tmp_path / "o").mkdir()
    assert "already exists" in run_error(capsys, ["quantize", "--output", str(tmp_path / "o")])


def test_real_process_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lowbit.cli", "eval", "--model", str(tmp_path / "missing")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"lowbit: error: model path does not exist: {tmp_path / 'missing'}"]


def test_tiny_configs_cover_gqa():
    assert tiny_config("llama").num_key_value_heads < tiny_config("llama").num_attention_heads
