"""``benchmarks/ncu_profile.py``'s CSV summary, on a raw page ncu wrote on the H100 (kept in benchmarks/results)."""

from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
GEMV_CSV = BENCHMARKS / "results" / "ncu_profile_csv" / "gemv_4096x4096.csv"


@pytest.fixture
def ncu(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import ncu_profile

    return ncu_profile


def test_summary_of_a_real_raw_page(ncu):
    text = GEMV_CSV.read_text()
    kernels = ncu.summarise(text, ncu.names_for("gemv_4096x4096"))
    assert [k["range"] for k in kernels] == ["lowbit_w4a16", "tinygemm", "bf16", "bf16"]  # cuBLAS: GEMV + reduce
    ours = kernels[0]
    assert ours["kernel"].startswith("_gemv_kernel") and ours["duration_unit"] == "us" and 1 < ours["duration"] < 100
    assert 0 < ours["dram_pct"] < 100 and 0 < ours["achieved_occupancy_pct"] <= 100 and ours["registers"] > 0
    assert ours["top_stalls"] and all(v >= 0 for v in ours["top_stalls"].values())
    assert ncu.device_of(text).startswith("NVIDIA")


def test_backward_kernels_inherit_the_range_launched_before_them(ncu):
    """The autograd thread has no NVTX range: its kernels belong to the call before them, not to None."""
    text = (BENCHMARKS / "results" / "ncu_train_tiles_csv" / "train_layer.csv").read_text()
    ranges = [k["range"] for k in ncu.summarise(text, ncu.names_for("train_layer"))]
    assert None not in ranges and ranges[0] == "hq_lss4" and ranges[-1] == "bf16"
    assert ranges == sorted(ranges, key=["hq_lss4", "bf16"].index)  # one block per call, in launch order


def test_bad_input_says_what_is_wrong(ncu):
    with pytest.raises(ValueError, match="not an ncu raw-page CSV"):
        ncu.summarise("a,b\n1,2\n", ["bf16"])
    with pytest.raises(ValueError, match="unknown case"):
        ncu.names_for("matmul_8x8")
