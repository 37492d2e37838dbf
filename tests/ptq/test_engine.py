"""The calibration engine on tiny models: a CPU smoke run per method, resume, NaN recovery, dominance repair."""

import json

import pytest
import torch
from conftest import make_tiny_model, tiny_loaded

import lowbit.ptq.engine as engine
from lowbit.errors import LowbitError
from lowbit import QuantConfig, quantize
from lowbit.models.registry import adapter_for
from lowbit.transforms.pair import PairTransform


def config(method="affinequant", **kw):
    base = dict(method=method, wbits=4, abits=4, nsamples=2, seqlen=32, epochs=2, let_lr=1e-2, seed=1)
    return QuantConfig(**{**base, **kw})


def logits(loaded, ids):
    with torch.no_grad():
        return loaded.model(ids).logits


@pytest.mark.parametrize("mlp_scales", [False, True])
@pytest.mark.parametrize("method", ["smoothquant", "omniquant", "affinequant"])
@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_smoke_every_method(method, arch, mlp_scales, tiny_tokenizer):
    loaded = tiny_loaded(arch, tiny_tokenizer)
    quantize(loaded, config(method, epochs=1, mlp_scales=mlp_scales), progress=False)
    log = loaded.calibration_log
    assert len(log) == 2 and all(e.loss_after == e.loss_after for e in log)  # not NaN
    assert all(e.cuda_graph is None for e in log)  # no graphs on the CPU (the GPU tests check they replay)
    ids = torch.randint(0, 384, (1, 16))
    assert torch.isfinite(logits(loaded, ids)).all()


def test_mlp_scales_refused_where_inexact(tiny_tokenizer):
    loaded = tiny_loaded("opt", tiny_tokenizer)
    loaded.model.config.activation_function = "gelu"
    with pytest.raises(LowbitError, match="leave out --mlp-scales"):
        quantize(loaded, config("smoothquant", mlp_scales=True), progress=False)
    with pytest.raises(LowbitError, match="leave out --mlp-scales"):
        quantize(loaded, config("affinequant", mlp_scales=True), progress=False)
    quantize(loaded, config("affinequant", epochs=1), progress=False)  # by default they step aside there
    assert len(loaded.calibration_log) == 2


def test_learning_lowers_block_loss(tiny_tokenizer):
    loaded = tiny_loaded("llama", tiny_tokenizer)
    quantize(loaded, config("omniquant", epochs=6, nsamples=4, lwc_lr=5e-2), progress=False)
    first = loaded.calibration_log[0]
    assert first.epoch_losses[-1] < first.epoch_losses[0]


def test_resume_after_a_kill_gives_the_same_model(tmp_path, tiny_tokenizer, monkeypatch):
    ids = torch.randint(0, 384, (1, 16))
    ref = tiny_loaded("llama", tiny_tokenizer)
    quantize(ref, config(), checkpoint_dir=tmp_path / "uninterrupted", progress=False)

    killed = tiny_loaded("llama", tiny_tokenizer)
    real_optimise = engine._optimise
    calls = {"n": 0}

    def dies_in_block_1(*args, **kwargs):
        if calls["n"] == 1:
            raise KeyboardInterrupt  # as if the process were killed during block 1
        calls["n"] += 1
        return real_optimise(*args, **kwargs)

    monkeypatch.setattr(engine, "_optimise", dies_in_block_1)
    with pytest.raises(KeyboardInterrupt):
        quantize(killed, config(), checkpoint_dir=tmp_path / "ckpt", progress=False)
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("block_*.safetensors")) == ["block_000.safetensors"]
    monkeypatch.setattr(engine, "_optimise", real_optimise)

    resumed = tiny_loaded("llama", tiny_tokenizer)
    quantize(resumed, config(), checkpoint_dir=tmp_path / "ckpt", progress=False)
    assert torch.equal(logits(resumed, ids), logits(ref, ids))
    assert json.loads((tmp_path / "ckpt" / "block_000.json").read_text())["block"] == 0


def test_checkpoint_of_another_configuration_is_refused(tmp_path, tiny_tokenizer):
    from lowbit.errors import LowbitError

    quantize(tiny_loaded("llama", tiny_tokenizer), config(epochs=1), checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(LowbitError, match=r"another configuration \(config\.epochs: 1 -> 2.*--let-lr"):
        quantize(tiny_loaded("llama", tiny_tokenizer), config(epochs=2), checkpoint_dir=tmp_path, progress=False)


def test_recipe_defaults_spelled_out_resume_a_run_that_took_them(tmp_path, tiny_tokenizer):
    """A weight-only AffineQuant run with the default start and rate, and the same run with ``scale_init`` and
    ``let_lr`` given explicitly, write the same manifest (so one resumes the other); the papers' start does not."""
    from lowbit.errors import LowbitError

    weight_only = dict(wbits=3, abits=16, group_size=16, epochs=1)
    quantize(tiny_loaded("llama", tiny_tokenizer), config(**weight_only, let_lr=None), checkpoint_dir=tmp_path,
             progress=False)
    saved = (tmp_path / "manifest.json").read_text()
    quantize(tiny_loaded("llama", tiny_tokenizer), config(**weight_only, scale_init="identity", let_lr=1e-3),
             checkpoint_dir=tmp_path, progress=False)
    assert (tmp_path / "manifest.json").read_text() == saved
    with pytest.raises(LowbitError, match="plan.scale_init: 'identity' -> 'absent'"):
        quantize(tiny_loaded("llama", tiny_tokenizer), config(**weight_only, scale_init="smoothquant", let_lr=1e-3),
                 checkpoint_dir=tmp_path, progress=False)


def test_default_mlp_scales_resume_a_run_that_asked_for_them(tmp_path, tiny_tokenizer):
    """Before the MLP scales were AffineQuant's default, a run asked for them (``mlp_scales=True`` in the config);
    the default and the explicit spelling write that same manifest, and turning them off is refused."""
    loaded = tiny_loaded("llama", tiny_tokenizer)
    quantize(loaded, config(epochs=1, mlp_scales=True), checkpoint_dir=tmp_path, progress=False)
    saved = json.loads((tmp_path / "manifest.json").read_text())
    assert saved["config"]["mlp_scales"] is True and saved["plan"]["mlp_scales"] is True
    quantize(tiny_loaded("llama", tiny_tokenizer), config(epochs=1), checkpoint_dir=tmp_path, progress=False)
    assert json.loads((tmp_path / "manifest.json").read_text()) == saved
    with pytest.raises(LowbitError, match="mlp_scales"):
        quantize(tiny_loaded("llama", tiny_tokenizer), config(epochs=1, mlp_scales=False), checkpoint_dir=tmp_path,
                 progress=False)
    # what a saved model says: the resolved value, not the default's None
    from lowbit.models.saving import resolved_config

    assert loaded.calibration_plan.mlp_scales
    assert resolved_config(config(epochs=1), loaded.calibration_plan)["mlp_scales"] is True
    assert "mlp_scales" not in config(epochs=1).to_dict()


def test_non_finite_loss_rolls_back_and_retries(tiny_tokenizer, monkeypatch, caplog):
    real = engine.block_loss
    state = {"calls": 0}

    def poisoned(out, target):
        state["calls"] += 1
        loss = real(out, target)
        return loss * float("nan") if state["calls"] == 3 else loss  # one poisoned optimisation step

    monkeypatch.setattr(engine, "block_loss", poisoned)
    loaded = tiny_loaded("llama", tiny_tokenizer)
    with caplog.at_level("WARNING"):
        quantize(loaded, config("omniquant", epochs=2), progress=False)
    assert "non-finite loss" in caplog.text
    assert loaded.calibration_log[0].retries == 1
    assert all(torch.isfinite(torch.tensor(e.epoch_losses)).all() for e in loaded.calibration_log)
    assert torch.isfinite(logits(loaded, torch.randint(0, 384, (1, 8)))).all()


def test_dominance_check_and_repair():
    t = PairTransform(torch.ones(8), block=4, use_matrix=True, sf=1.0)
    t.set_epoch(1, 2)
    assert t.dominance_margin() == pytest.approx(1.0)
    with torch.no_grad():
        t.offdiag[0, 1, :] = torch.tensor([0.5, 9.0, 0.6, 0.7])  # row 1 of block 0: off-diagonals sum to 1.8 > 1
    assert t.dominance_margin() < 0
    assert t.restore_dominance(target=0.05) == 1
    assert t.dominance_margin() == pytest.approx(0.05, abs=1e-5)
    torch.linalg.inv(t.effective())  # invertible again


def test_gradual_mask_band_and_single_epoch():
    from lowbit.transforms.mask import band_width, gradual_mask

    assert [band_width(e, 5, 9) for e in range(5)] == [1, 3, 5, 7, 9]
    assert band_width(0, 1, 9) == 9  # the reference divides by zero here
    m = gradual_mask(4, 2, 0.1)
    assert torch.equal(m, torch.tensor([[1, .1, 0, 0], [.1, 1, .1, 0], [0, .1, 1, .1], [0, 0, .1, 1]]))


def test_transform_is_relative_and_positive():
    """Scales are learnt as logarithms (a step is the same relative change for every channel, never below 0),
    and the matrix is diag(s) (I + M ⊙ B), so its rows stay dominant while sum |M B| < 1 whatever s is."""
    t = PairTransform(torch.tensor([1e-3, 1.0, 50.0, 2.0]), block=2, use_matrix=True, sf=0.5)
    t.set_epoch(1, 2)
    with torch.no_grad():
        t.offdiag.fill_(1.5)  # masked: 0.5 * 1.5 = 0.75 < 1
    eff = t.effective()
    torch.testing.assert_close(eff[0], torch.tensor([[1e-3, 0.75e-3], [0.75, 1.0]]))
    assert t.dominance_margin() == pytest.approx(0.25)
    with torch.no_grad():
        t.log_scale.sub_(100.0)  # a huge step down still leaves positive scales
    assert (t.diag() > 0).all()


def test_smoothquant_never_learns(tiny_tokenizer):
    loaded = tiny_loaded("llama", tiny_tokenizer)
    quantize(loaded, config("smoothquant", epochs=3), progress=False)
    assert all(e.epoch_losses == [] for e in loaded.calibration_log)


@pytest.mark.parametrize("method", ["omniquant", "affinequant"])
def test_each_block_frees_its_calibration_objects(method, tiny_tokenizer, monkeypatch):
    """A block's calibration state (transforms, optimiser, CUDA-graph step) is freed when the block ends, without
    Python's cycle collector: nothing of it may pile up over a model's blocks. (On the GPU the run's last graph is
    kept on purpose, to share its memory pool: tests/ptq/test_cuda_graph.py checks that memory stays flat.)"""
    import gc
    import weakref

    from lowbit.ptq.step import CalibStep

    refs = []
    for cls in (engine.BlockCalibration, CalibStep):
        original = cls.__init__

        def init(self, *args, _original=original, **kwargs):
            _original(self, *args, **kwargs)
            refs.append(weakref.ref(self))

        monkeypatch.setattr(cls, "__init__", init)
    loaded = tiny_loaded("llama", tiny_tokenizer)
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        quantize(loaded, config(method, epochs=1), progress=False)
        assert len(refs) == 4  # a calibration and a step per block
        assert [r() for r in refs] == [None] * len(refs)
    finally:
        if was_enabled:
            gc.enable()


def test_identity_scale_init_starts_where_clipping_alone_starts(tiny_tokenizer):
    """AffineQuant from the identity starts at OmniQuant's weight-only (LWC-only) block loss; from SmoothQuant's
    scales it does not (at 2 bits those scales cost it, BENCHMARKS.md)."""
    first = {}
    starts = {"omni": dict(method="omniquant"), "identity": dict(scale_init="identity"),
              "smooth": dict(scale_init="smoothquant")}
    for name, kw in starts.items():
        loaded = tiny_loaded("llama", tiny_tokenizer)
        quantize(loaded, config(**{"wbits": 2, "abits": 16, "group_size": 16, "epochs": 1, **kw}), progress=False)
        first[name] = loaded.calibration_log[0].loss_before
    assert first["identity"] == pytest.approx(first["omni"], rel=1e-5)
    assert first["smooth"] != pytest.approx(first["omni"], rel=1e-3)


def test_scale_init_is_checked_and_recorded_only_when_not_the_default(tmp_path, tiny_tokenizer):
    from lowbit.errors import LowbitError

    with pytest.raises(LowbitError, match="--scale-init must be one of"):
        config(scale_init="ones")
    with pytest.raises(LowbitError, match="methods that learn scales"):
        config("smoothquant", scale_init="identity")
    for init, sub in ((None, "default"), ("identity", "identity")):
        quantize(tiny_loaded("llama", tiny_tokenizer), config(epochs=1, scale_init=init),
                 checkpoint_dir=tmp_path / sub, progress=False)
    assert "scale_init" not in json.loads((tmp_path / "default" / "manifest.json").read_text())["plan"]
    assert json.loads((tmp_path / "identity" / "manifest.json").read_text())["plan"]["scale_init"] == "identity"


def test_weight_only_affine_recipe_starts_at_the_identity_with_a_smaller_step(tiny_tokenizer, monkeypatch):
    from lowbit.ptq.recipes import default_let_lr, default_scale_init, plan_for

    w2, w3, w4, w2a4, w4a4 = (QuantConfig(method="affinequant", wbits=w, abits=a, group_size=64)
                              for w, a in ((2, 16), (3, 16), (4, 16), (2, 4), (4, 4)))
    for weight_only in (w2, w3, w4):
        got = default_scale_init(weight_only), default_let_lr(weight_only), plan_for(weight_only).scale_init
        assert got == ("identity", 1e-3, "identity")
    omni = QuantConfig(method="omniquant", wbits=2, group_size=64)  # no scales: its recipe (and manifest) unchanged
    for other in (w2a4, w4a4, omni):
        got = default_scale_init(other), default_let_lr(other), plan_for(other).scale_init
        assert got == ("smoothquant", 5e-3, "smoothquant")
    mine = QuantConfig(method="affinequant", wbits=2, group_size=64, scale_init="smoothquant", let_lr=5e-3)
    assert (default_scale_init(mine), default_let_lr(mine)) == ("smoothquant", 5e-3)


def test_quantize_calibrates_with_the_recipes_rate_and_records_it_in_the_manifest(tmp_path, tiny_tokenizer, monkeypatch):
    seen = []
    real = engine._optimise

    def spy(calib, q_in, targets, aug, kwargs, opts, **kw):
        seen.append(opts.let_lr)
        return real(calib, q_in, targets, aug, kwargs, opts, **kw)

    monkeypatch.setattr(engine, "_optimise", spy)
    for abits in (16, 8):
        quantize(tiny_loaded("llama", tiny_tokenizer),
                 config(wbits=3, abits=abits, group_size=16, epochs=1, let_lr=None),
                 checkpoint_dir=tmp_path / str(abits), progress=False)
        manifest = json.loads((tmp_path / str(abits) / "manifest.json").read_text())
        assert manifest["config"]["let_lr"] == manifest["options"]["let_lr"] == {16: 1e-3, 8: 5e-3}[abits]
    assert seen == [1e-3, 1e-3, 5e-3, 5e-3]  # two blocks each


def test_learnt_weights_lower_the_block_loss_and_are_merged(tiny_tokenizer):
    """Block-AP: with ``weight_lr`` the weights learn beside the clipping; the block fits better than with clipping
    alone, and the merged (rounded) weights carry the learnt offsets."""
    base = dict(wbits=3, abits=16, group_size=16, epochs=4, nsamples=4)
    plain, trained = tiny_loaded("llama", tiny_tokenizer), tiny_loaded("llama", tiny_tokenizer)
    quantize(plain, config("omniquant", **base), progress=False)
    quantize(trained, config("omniquant", **base, weight_lr=1e-4), progress=False)
    assert not plain.calibration_plan.weights and trained.calibration_plan.weights
    for p, t in zip(plain.calibration_log, trained.calibration_log):
        assert t.epoch_losses[-1] < p.epoch_losses[-1]
    ids = torch.randint(0, 384, (1, 16), generator=torch.Generator().manual_seed(0))
    assert not torch.equal(logits(plain, ids), logits(trained, ids))


def test_weight_offsets_merge_exactly(tiny_tokenizer):
    """The calibrating forward (offsets added before the transforms) equals the block after merging."""
    from conftest import randomise_transforms

    from lowbit.ptq.block import BlockCalibration, TransformPlan
    from lowbit.ptq.capture import capture_block_inputs

    model = make_tiny_model("llama").float()
    adapter = adapter_for(model.config.model_type)
    gen = torch.Generator().manual_seed(0)
    x, kwargs = capture_block_inputs(model, adapter, torch.randint(0, 384, (2, 24), generator=gen), "cpu")
    block = adapter.blocks(model)[0]
    calib = BlockCalibration(block, adapter, adapter.heads(model.config),
                             TransformPlan(scales=True, matrices=True, sf=0.3, weights=True), None, None)
    calib.init_transforms(x, kwargs, batch=2)
    randomise_transforms(calib, gen)
    assert set(calib.learnable()["weights"]) and all(not o.any() for o in calib.learnable()["weights"])
    with torch.no_grad():
        for offset in calib.learnable()["weights"]:
            offset.add_(torch.randn(offset.shape, generator=gen) * 0.05)
        during = calib(x, kwargs)
    calib.merge()
    with torch.no_grad():
        after = block(x, **kwargs)
    torch.testing.assert_close(after[0] if isinstance(after, tuple) else after, during, atol=1e-4, rtol=1e-4)


def test_weight_lr_is_checked_and_left_out_of_old_manifests(tmp_path, tiny_tokenizer):
    with pytest.raises(LowbitError, match="--weight-lr must be 0"):
        config(weight_lr=-1e-5)
    with pytest.raises(LowbitError, match="not rtn"):
        config("rtn", weight_lr=1e-5)
    assert "weight_lr" not in config().to_dict() and config(weight_lr=1e-5).to_dict()["weight_lr"] == 1e-5
    quantize(tiny_loaded("llama", tiny_tokenizer), config(epochs=1), checkpoint_dir=tmp_path, progress=False)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert "weight_lr" not in manifest["options"] and "weights" not in manifest["plan"]
    with pytest.raises(LowbitError, match="weight"):  # a run that trains the weights is another run
        quantize(tiny_loaded("llama", tiny_tokenizer), config(epochs=1, weight_lr=1e-5), checkpoint_dir=tmp_path,
                 progress=False)


def test_weight_only_affinequant_learns_its_weights_by_default(tmp_path, tiny_tokenizer):
    """The recipe's rate (3e-5) for AffineQuant weight-only; 0 turns it off; an explicit 3e-5 is the same run (its
    checkpoints resume the default's), and OmniQuant or activation bits keep the weights as loaded."""
    from lowbit.ptq.recipes import default_weight_lr, plan_for

    weight_only = config(abits=16, epochs=1)
    assert default_weight_lr(weight_only) == 3e-5 and plan_for(weight_only).weights
    assert weight_only.label == "affinequant+weights"
    assert not plan_for(config(abits=16, weight_lr=0.0)).weights and config(abits=16, weight_lr=0.0).label == "affinequant"
    assert default_weight_lr(config()) == default_weight_lr(config("omniquant", abits=16)) == 0.0
    default = quantize(tiny_loaded("llama", tiny_tokenizer), weight_only, checkpoint_dir=tmp_path, progress=False)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["options"]["weight_lr"] == manifest["config"]["weight_lr"] == 3e-5
    explicit = quantize(tiny_loaded("llama", tiny_tokenizer), config(abits=16, epochs=1, weight_lr=3e-5),
                        checkpoint_dir=tmp_path, progress=False)
    ids = torch.randint(0, 384, (1, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits(explicit, ids), logits(default, ids))
    with pytest.raises(LowbitError, match="another configuration"):
        quantize(tiny_loaded("llama", tiny_tokenizer), config(abits=16, epochs=1, weight_lr=0.0),
                 checkpoint_dir=tmp_path, progress=False)


def test_norm_matrices_default_on_only_after_an_input_rotation():
    from lowbit.ptq.recipes import plan_for

    assert plan_for(config(abits=6, wbits=6, rotate="inputs")).norm_matrices
    assert not plan_for(config(abits=6, wbits=6)).norm_matrices
    assert not plan_for(config(abits=6, wbits=6, rotate="inputs", norm_matrices=False)).norm_matrices
    assert not plan_for(config(abits=16, rotate="inputs")).norm_matrices  # weight-only: no rotation's op to join
    assert plan_for(config(abits=6, wbits=6, norm_matrices=True)).norm_matrices
    assert not plan_for(config("omniquant", abits=6, wbits=6, rotate="inputs")).norm_matrices
