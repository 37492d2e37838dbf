"""benchmarks/ptq_init_ablation.py on a tiny model: --recipes calibrates as quantize() does and measures held-out error."""

import json
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_recipes_match_quantize_and_report_held_out_error(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import ptq_init_ablation

    from lowbit import QuantConfig, load_model, quantize

    out = tmp_path / "abl.json"
    argv = ["--model", str(tiny_model_dir("llama")), "--recipes", "--only", "0,2", "--wbits", "4", "--abits", "8",
            "--group-size", "0", "--rotate", "inputs", "--blocks", "2", "--nsamples", "2", "--seqlen", "32",
            "--epochs", "1", "--jobs", "1", "--heldout", "2", "--out", str(out)]
    ptq_init_ablation.main(argv)
    rows = {r["variant"]: r for r in json.loads(out.read_text())}
    affine = rows["AffineQuant with norm matrices (recipe)"]
    assert affine["plan"]["norm_matrices"] and affine["matrices"] and affine["rotate"] == "inputs"
    assert all(b["heldout_loss"] > 0 for r in rows.values() for b in r["blocks"])
    # the same calibration through quantize(): the same block losses
    loaded = load_model(tiny_model_dir("llama"))
    config = QuantConfig(method="affinequant", wbits=4, abits=8, nsamples=2, seqlen=32, epochs=1, rotate="inputs",
                         norm_matrices=True)
    quantize(loaded, config, progress=False)
    assert [e.loss_after for e in loaded.calibration_log] == [b["loss_after"] for b in affine["blocks"]]
