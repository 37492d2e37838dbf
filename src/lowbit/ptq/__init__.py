"""Post-training quantization behind one call: ``quantize(loaded, config)``.

``rotate`` first rotates the linears' inputs or the residual stream (``lowbit.transforms.rotation``). ``rtn``
rounds directly; ``smoothquant``, ``omniquant`` and ``affinequant`` calibrate block by block on
``config.nsamples`` windows of ``config.seqlen`` tokens from ``config.calib_data`` (never a test split), and so
does ``gptq`` (no transforms, GPTQ rounding); ``rounding="gptq"`` ends a weight-only method with GPTQ.
"""

from __future__ import annotations

import logging

from lowbit.config import QuantConfig
from lowbit.data.texts import calibration_windows
from lowbit.models.loading import LoadedModel
from lowbit.ptq.engine import CalibOptions, calibrate
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
    if config.rotate:  # refuses an unsupported model before changing anything
        loaded.rotation = rotate(loaded.model, loaded.adapter, config.rotate, seed=config.seed)
        log.info("rotated before quantizing: %s", loaded.rotation.to_dict())
    if config.method == "rtn":
        quantize_rtn(loaded, config)
        return loaded
    device = device or str(next(loaded.model.parameters()).device)
    windows = calibration_windows(loaded.tokenizer, config.calib_data, config.nsamples, config.seqlen, config.seed)
    options = CalibOptions(epochs=default_epochs(config), batch_size=config.batch_size, let_lr=default_let_lr(config),
                           lwc_lr=config.lwc_lr, weight_lr=default_weight_lr(config), aug_loss=config.aug_loss, device=device,
                           checkpoint_dir=checkpoint_dir, progress=progress, tf32=tf32)
    plan = plan_for_model(config, loaded.adapter, loaded.model.config)
    loaded.calibration_plan = plan
    loaded.calibration_log = calibrate(loaded, config, plan, options, windows)
    return loaded


__all__ = ["CalibOptions", "quantize", "wrap_linears"]
