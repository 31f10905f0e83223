"""ghostkernels: GhostNet's Ghost module in one fused pass (C++ on the CPU), with a PyTorch reference."""

from . import models, ops
from ._backends import backends, load_cpu_extension
from .accelerate import AccelerationSummary, accelerate
from .modules import GhostModule, fold_conv_bn
from .ops import ghost_module
from .reference import ghost_module_reference

load_cpu_extension()  # after ops: the library registers kernels for the ops defined there

__all__ = [
    "AccelerationSummary", "GhostModule", "accelerate", "backends", "fold_conv_bn", "ghost_module",
    "ghost_module_reference", "models",
]
__version__ = "0.1.0"
