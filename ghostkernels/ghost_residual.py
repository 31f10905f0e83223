"""A Ghost module with the residual add after it: `ghostkernels::ghost_module_residual`.

A GhostBottleneck ends `x = ghost2(x); x += shortcut(residual)`: the Ghost output is written,
then read and written again by the add. freeze() finds that pair in its graph (a
`ghost_module` or `ghost_module_scaled` whose output only the in-place add reads) and makes
it this op, which the C++ kernel (csrc/ghost_cpu.cpp) runs as one pass: each output element
gets its residual as it is written; so do the Triton kernels on CUDA (triton_ghost.forward's
residual, added in their stores). The op means exactly `out.add_(residual, alpha=alpha)`
after the Ghost op: a residual that broadcasts, has another dtype or layout, or an alpha
other than 1 takes that add_ after the kernel. Elsewhere (other dtypes on the CPU, CUDA without
Triton) it is the Ghost op followed by the add_, and gradients recompute that composition.
"""

import torch

from . import _backends, ops, squeeze_excite
from .reference import output_memory_format

_lib = torch.library.Library("ghostkernels", "FRAGMENT")
_lib.define(
    "ghost_module_residual(Tensor x, Tensor? scale, Tensor primary_weight, Tensor? primary_bias, "
    "Tensor cheap_weight, Tensor? cheap_bias, int out_channels, int stride, str activation, Tensor residual, "
    "Scalar alpha=1) -> Tensor"
)

_OP = "ghostkernels::ghost_module_residual"
# the ops whose output freeze() fuses with the add_ after it: does the op take a scale (second argument)?
_TAKES_SCALE = {"ghostkernels::ghost_module": False, "ghostkernels::ghost_module_scaled": True}


def _ghost(x, scale, *rest):
    if scale is None:
        return torch.ops.ghostkernels.ghost_module(x, *rest)
    return torch.ops.ghostkernels.ghost_module_scaled(x, scale, *rest)


@torch.library.impl(_lib, "ghost_module_residual", "CompositeExplicitAutograd")
def _ghost_then_add(x, scale, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride,
                    activation, residual, alpha=1):
    """The Ghost op's own kernel for the device, then the add in place (below autograd)."""
    out = _ghost(x, scale, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride, activation)
    return out.add_(residual, alpha=alpha)


def _check(x, scale, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride, activation):
    """The Ghost op's argument checks, and the SE scale's where there is one."""
    ops.check_args(x, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride, activation)
    if scale is not None:
        squeeze_excite._check_scaled(x, scale, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels,
                                     stride, activation)


@torch.library.impl(_lib, "ghost_module_residual", "CUDA")
def _ghost_residual_cuda(x, scale, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride,
                         activation, residual, alpha=1):
    """The Triton forward, the residual added as each output element is stored."""
    kernels = _backends.triton_kernels()
    if kernels is None or alpha != 1:
        return _ghost_then_add(x, scale, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride,
                               activation, residual, alpha)
    ops.check_once(_check, x, scale, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride,
                   activation)
    return kernels.forward(x, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride, activation,
                           scale=scale, residual=residual)


def _composed(x, scale, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride, activation,
              residual, alpha=1):
    """The differentiable composition: the Ghost op's output is saved for its backward, so the
    add goes into a copy."""
    args = (primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride, activation)
    out = ops.apply(x, *args) if scale is None else squeeze_excite._composed(x, scale, *args)
    return out.clone().add_(residual, alpha=alpha)


@torch.library.register_fake(_OP)
def _fake(x, scale, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride, activation,
          residual, alpha=1):
    _check(x, scale, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride, activation)
    shape = ops.output_shape(x, primary_weight, out_channels, stride)
    out = x.new_empty(shape).contiguous(memory_format=output_memory_format(x))
    return out.add_(residual, alpha=alpha)  # add_'s checks: the residual broadcasts to the output


ops.register_recompute_autograd("ghost_module_residual", _composed)


def fuse_residual_adds(graph):
    """Rewrites a TorchScript graph in place: every `ghost_module` / `ghost_module_scaled` whose
    output's only use is `aten::add_(out, residual, alpha)` becomes one `ghost_module_residual`.
    Returns the number of pairs fused."""
    fused = 0
    for add in list(graph.nodes()):
        if add.kind() != "aten::add_":
            continue
        out, residual, alpha = add.inputs()
        ghost = out.node()
        if ghost.kind() not in _TAKES_SCALE or len(out.uses()) != 1:
            continue
        inputs = list(ghost.inputs())
        if _TAKES_SCALE[ghost.kind()]:
            x, scale, rest = inputs[0], inputs[1], inputs[2:]
        else:
            none = graph.create("prim::Constant")
            none.output().setType(torch._C.NoneType.get())
            none.insertBefore(add)
            x, scale, rest = inputs[0], none.output(), inputs[1:]
        ops.replace_chain(graph, _OP, [x, scale, *rest, residual, alpha], [ghost, add])
        fused += 1
    return fused
