"""lowbit: low-bit transformers — quantize after training, evaluate, run, and train with 4-bit matmuls."""

__version__ = "0.1.0"

from lowbit.config import QuantConfig  # noqa: E402
from lowbit.errors import LowbitError  # noqa: E402
from lowbit.eval import evaluate  # noqa: E402
from lowbit.export import load_quantized, save_packed  # noqa: E402
from lowbit.models.loading import LoadedModel, load_model  # noqa: E402
from lowbit.models.saving import save_quantized  # noqa: E402
from lowbit.ptq import quantize  # noqa: E402

__all__ = ["LoadedModel", "LowbitError", "QuantConfig", "__version__", "evaluate", "load_model", "load_quantized", "quantize", "save_packed", "save_quantized"]
