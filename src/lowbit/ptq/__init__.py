"""Post-training quantization behind one call: ``quantize(loaded, config)``.

``rotate`` first rotates the linears' inputs or the residual stream (``lowbit.transforms.rotation``). ``rtn``
rounds directly; ``smoothquant``, ``omniquant`` and ``affinequant`` calibrate block by block on
``config.nsamples`` windows of ``config.seqlen`` tokens from ``config.calib_data`` (never a test split), and so
does ``gptq`` (no transforms, GPTQ rounding); ``rounding="gptq"`` ends a weight-only method with GPTQ.
``e2e_epochs`` then tunes every weight scale against the full-precision model's logits (``lowbit.ptq.e2e``).
"""

from __future__ import annotations

import copy
import logging

from lowbit.config import QuantConfig
from lowbit.data.texts import calibration_windows
from lowbit.models.loading import LoadedModel
from lowbit.ptq.e2e import E2EOptions, tune_scales
from lowbit.ptq.engine import CalibOptions, calibrate, matmul_precision
from lowbit.ptq.recipes import default_epochs, default_let_lr, default_weight_lr, plan_for_model
from lowbit.ptq.rtn import quantize_rtn
from lowbit.ptq.wrap import wrap_linears
from lowbit.transforms.rotation import rotate

log = logging.getLogger(__name__)


def quantize(loaded: LoadedModel, config: QuantConfig, device: str | None = None, checkpoint_dir: str | None = None,
             progress: bool = True, tf32: bool | None = True) -> LoadedModel:
    """Quantize ``loaded.model`` in place with ``config.method``; returns ``loaded`` (the calibration log, if
    any, is in ``loaded.calibration_log``). ``tf32`` picks TF32 (True) or full float32 (False) calibration matmuls,
    restoring the process-wide precision afterwards; ``None`` leaves that process-wide switch alone, which callers
    running several calibrations in threads need (they set it once, before and after all of them)."""
    if config.weight_spec is not None:  # refuse a bad group size before any work
        for block in loaded.adapter.blocks(loaded.model):
            for name, lin in loaded.adapter.block_linears(block).items():
                config.weight_spec.check_width(lin.in_features, what=name)
    # the full-precision model the end-to-end step distils from, as loaded (the rotation below is exact anyway)
    teacher = copy.deepcopy(loaded.model).to("cpu").eval() if config.e2e_epochs else None
    if config.rotate:  # refuses an unsupported model before changing anything
        loaded.rotation = rotate(loaded.model, loaded.adapter, config.rotate, seed=config.seed)
        log.info("rotated before quantizing: %s", loaded.rotation.to_dict())
    device = device or str(next(loaded.model.parameters()).device)
    windows = None
    if config.method != "rtn" or teacher is not None:
        windows = calibration_windows(loaded.tokenizer, config.calib_data, config.nsamples, config.seqlen, config.seed)
    if config.method == "rtn":
        quantize_rtn(loaded, config)
    else:
        _calibrate(loaded, config, windows, device, checkpoint_dir, progress, tf32)
    if teacher is not None:
        home = next(loaded.model.parameters()).device
        opts = E2EOptions(epochs=config.e2e_epochs, lr=config.e2e_lr, batch_size=config.batch_size, seed=config.seed,
                          device=device, progress=progress)
        with matmul_precision(tf32):
            loaded.e2e_log = tune_scales(loaded.model, teacher, loaded.adapter, config.weight_spec, windows, opts)
        loaded.model.to(home)
    return loaded


def _calibrate(loaded: LoadedModel, config: QuantConfig, windows, device, checkpoint_dir, progress, tf32) -> None:
    options = CalibOptions(epochs=default_epochs(config), batch_size=config.batch_size, let_lr=default_let_lr(config),
                           lwc_lr=config.lwc_lr, weight_lr=default_weight_lr(config), aug_loss=config.aug_loss, device=device,
                           checkpoint_dir=checkpoint_dir, progress=progress, tf32=tf32)
    plan = plan_for_model(config, loaded.adapter, loaded.model.config)
    loaded.calibration_plan = plan
    loaded.calibration_log = calibrate(loaded, config, plan, options, windows)


__all__ = ["CalibOptions", "quantize", "wrap_linears"]
