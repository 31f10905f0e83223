"""A Ghost module followed by a depthwise conv: `ghostkernels::ghost_module_depthwise`.

What accelerate() makes of a GhostBottleneck's ghost1 -> conv_dw -> bn_dw in eval (its
stride-2 blocks, BN folded into the conv). The Ghost output, four times the size of the
stride-2 conv's, is never written: the C++ kernel (csrc/ghost_cpu.cpp, NCHW float32/64)
keeps the Ghost rows each band of the conv needs in cache-sized buffers. On CUDA, GhostNet's
case (triton_ghost.takes_depthwise_rows3: channels_last, 3 x 3 cheap op and conv, stride 2) runs
the library's 1x1 GEMM and one Triton kernel that feeds the Ghost rows straight into the conv.
Elsewhere (other shapes, layouts and dtypes) the op is the Ghost op followed by the library
conv, and gradients recompute that composition.
"""

import torch
import torch.nn.functional as F
from torch import nn

from . import _backends, ops
from .direct_conv import DirectConv2d
from .modules import GhostModule, merged_weights, split_off
from .reference import output_memory_format, same_padding

_lib = torch.library.Library("ghostkernels", "FRAGMENT")
_lib.define(
    "ghost_module_depthwise(Tensor x, Tensor primary_weight, Tensor? primary_bias, Tensor cheap_weight, "
    "Tensor? cheap_bias, int out_channels, int stride, str activation, Tensor depthwise_weight, "
    "Tensor? depthwise_bias, int depthwise_stride) -> Tensor"
)


def _library_conv(ghost, depthwise_weight, depthwise_bias, depthwise_stride):
    return F.conv2d(ghost, depthwise_weight, depthwise_bias, depthwise_stride, same_padding(depthwise_weight),
                    groups=depthwise_weight.shape[0])


def _composed(x, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride, activation,
              depthwise_weight, depthwise_bias, depthwise_stride, conv=_library_conv):
    ghost = ops.apply(x, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride, activation)
    # In x's layout, as the fake kernel says (torch.compile trusts it): the library conv's follows
    # its weight's too (compiled channels_last GhostNets failed on a GPU).
    return conv(ghost, depthwise_weight, depthwise_bias, depthwise_stride).contiguous(
        memory_format=output_memory_format(x))


def _check(x, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride, activation,
           depthwise_weight, depthwise_bias, depthwise_stride):
    """The C++ kernel's checks (csrc/ghost_cpu.cpp), as ValueError/TypeError: without them an even
    depthwise kernel ran and returned a map of the wrong size."""
    ops.check_args(x, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride, activation)
    w = depthwise_weight
    if w.dim() != 4 or w.shape[0] != out_channels or w.shape[1] != 1 or w.shape[2] != w.shape[3] or w.shape[2] % 2 == 0:
        raise ValueError(f"ghost_module_depthwise: depthwise_weight must be ({out_channels}, 1, k, k) with odd k, "
                         f"got {tuple(w.shape)}")
    if depthwise_bias is not None and tuple(depthwise_bias.shape) != (out_channels,):
        raise ValueError(f"ghost_module_depthwise: depthwise_bias must have shape ({out_channels},), "
                         f"got {tuple(depthwise_bias.shape)}")
    for t in (w, depthwise_bias):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise TypeError(f"ghost_module_depthwise: the depthwise weight and bias must match x's dtype and device "
                            f"({x.dtype}, {x.device}), got {t.dtype} on {t.device}")
    if depthwise_stride not in (1, 2):
        raise ValueError(f"ghost_module_depthwise: depthwise_stride must be 1 or 2, got {depthwise_stride}")


@torch.library.register_fake("ghostkernels::ghost_module_depthwise")
def _fake(x, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride, activation,
          depthwise_weight, depthwise_bias, depthwise_stride):
    _check(x, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride, activation,
           depthwise_weight, depthwise_bias, depthwise_stride)
    n, c, height, width = ops.output_shape(x, primary_weight, out_channels, stride)
    shape = (n, c, (height - 1) // depthwise_stride + 1, (width - 1) // depthwise_stride + 1)
    return x.new_empty(shape).contiguous(memory_format=output_memory_format(x))


@torch.library.impl(_lib, "ghost_module_depthwise", "CompositeExplicitAutograd")
def _fallback(*args):
    _check(*args)
    return _composed(*args)


@torch.library.impl(_lib, "ghost_module_depthwise", "CUDA")
def _cuda(x, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride, activation,
          depthwise_weight, depthwise_bias, depthwise_stride):
    args = (x, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride, activation,
            depthwise_weight, depthwise_bias, depthwise_stride)
    ops.check_once(_check, *args)
    kernels = _backends.triton_kernels()
    if kernels is None:
        return _composed(*args)
    if not kernels.takes_depthwise_rows3(x, primary_weight, cheap_weight, depthwise_weight, stride, depthwise_stride):
        # the conv by direct_conv2d's CUDA kernel: Triton for channels_last (GhostNet's 5 x 5 conv_dw)
        return _composed(*args, conv=torch.ops.ghostkernels.direct_conv2d)
    return kernels.forward_depthwise(x, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels,
                                     activation, depthwise_weight, depthwise_bias)


ops.register_recompute_autograd("ghost_module_depthwise", _composed)


class GhostDepthwise(nn.Module):
    """`ghost` (a GhostModule) then `depthwise` (a depthwise DirectConv2d) in one op: a
    GhostBottleneck's ghost1 and its folded conv_dw + bn_dw, which accelerate() then replaces
    by a placeholder (modules.MergedAway). Training mode, and a Ghost module without running
    statistics, run the two in turn."""

    __prepare_scriptable__ = ops.refuse_torchscript

    def __init__(self, ghost, depthwise):
        super().__init__()
        self.ghost, self.depthwise = ghost, depthwise
        self.training = ghost.training  # its own flag only: train() would reset the BNs' inside ghost

    @staticmethod
    def eligible(ghost, depthwise):
        return (type(ghost) is GhostModule and isinstance(depthwise, DirectConv2d)
                and depthwise.weight.shape[0] == ghost.oup and depthwise.weight.shape[1] == 1)

    def forward(self, x):
        # eligible again: a ghost or depthwise replaced after accelerate() runs as it is
        ghost, depthwise = self._modules["ghost"], self._modules["depthwise"]
        if split_off(self):  # the depthwise conv runs at conv_dw's place, for a hook
            return ghost(x)
        folded = merged_weights(self, ghost, x) if GhostDepthwise.eligible(ghost, depthwise) else None
        if folded is None:
            return depthwise(ghost(x))
        args = (x, *folded[:4], ghost.oup, ghost.stride, ghost.activation, depthwise.weight, depthwise.bias,
                depthwise.stride)
        return ops.call(torch.ops.ghostkernels.ghost_module_depthwise, *args)
