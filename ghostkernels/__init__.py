"""ghostkernels: GhostNet's Ghost module in one fused pass (C++ on the CPU, Triton on the GPU), with a PyTorch reference."""

from . import (batch_norm, cheap_mix, dfc_attention, direct_conv, ghost_depthwise, ghost_residual, ghost_train,
               models, ops, pointwise_pool, squeeze_excite)
from ._backends import backends, empty_cache, load_cpu_extension
from .acceleration import AccelerationSummary, accelerate
from .cuda_graph import CapturedModel, capture
from .freeze import FrozenModel, freeze
from .ghostify import ParamsFlops, count_params_flops, ghostify
from .modules import GhostModule, GhostModuleV2, fold_conv_bn
from .precompile import precompile
from .ops import ghost_module
from .reference import ghost_module_reference

load_cpu_extension()  # after ops and direct_conv: the library registers kernels for the ops they define
from . import onnx_export  # noqa: E402  (ONNX export of every op: onnx_export.py)

__all__ = [
    "AccelerationSummary", "CapturedModel", "FrozenModel", "GhostModule", "ParamsFlops", "GhostModuleV2", "accelerate",
    "backends", "capture",
    "count_params_flops", "empty_cache", "fold_conv_bn", "freeze",
    "ghost_module", "ghost_module_reference", "ghostify", "models", "precompile",
]
__version__ = "0.1.0"
