"""4-bit fully quantized training (Xi et al., NeurIPS'23): HQ forward, bit-split + LSS backward.

``convert(model, TrainQuantConfig())`` swaps ``nn.Linear`` layers for ``QuantTrainLinear``, whose three matmuls
take integer operands through ``lowbit.train.dispatch.int_matmul``.
"""

from lowbit.train.config import PRESETS, TrainQuantConfig, preset
from lowbit.train.convert import convert, quantized_layers
from lowbit.train.dispatch import int_matmul
from lowbit.train.graphs import GraphedTrainStep, GraphStepConfig, make_capturable
from lowbit.train.linear import QuantTrainLinear
from lowbit.train.optim import lsq_parameters, param_groups

__all__ = ["PRESETS", "GraphStepConfig", "GraphedTrainStep", "QuantTrainLinear", "TrainQuantConfig", "convert",
           "int_matmul", "lsq_parameters", "make_capturable", "param_groups", "preset", "quantized_layers"]
