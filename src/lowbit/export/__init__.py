"""Real quantized checkpoints: packed integer weights on disk and in memory (``save_packed``, ``load_quantized``).

``codes`` recovers the integer grid behind a quantized model's weights, the one layout every exporter reads;
``packed`` writes lowbit's own format, ``load`` reads it back into modules that keep the weights packed and run
the ``lowbit.kernels`` matmuls (``linear``).
"""

from lowbit.export.codes import LinearCodes, extract_codes, iter_quantized_linears
from lowbit.export.linear import PackedLinear, WeightBytes, packed_weight_bytes
from lowbit.export.load import load_quantized
from lowbit.export.packed import save_packed

__all__ = [
    "LinearCodes", "PackedLinear", "WeightBytes", "extract_codes", "iter_quantized_linears", "load_quantized",
    "packed_weight_bytes", "save_packed",
]
