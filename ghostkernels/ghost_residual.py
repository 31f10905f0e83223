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

In eager mode accelerate() gets the same from GhostBottleneckResidual, which takes a bottleneck's
place and runs ghost2 and the add as this op.
"""

import torch
from torch import nn

from . import _backends, ops, squeeze_excite
from .batch_norm import FoldedSequential
from .modules import GhostModule, hooks_inside, intercepted
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


# the ghost2 modules whose op ghost_module_residual extends (their ghost_op_inputs)
_FUSED_GHOST2 = (GhostModule, squeeze_excite.SqueezeExciteGhost)


def _is_no_op(module):
    return type(module) is nn.Identity or (type(module) in (nn.Sequential, nn.ModuleList) and not module._modules)


class GhostBottleneckResidual(nn.Module):
    """A GhostNet bottleneck (the original code's, timm's, the zoo's; V1-V3) whose residual add is
    made as ghost2's op writes its output (ghost_module_residual), not in a pass of its own (the
    16 adds of a GhostNet 1.0x forward at batch 1 move 6.7 MB in float32; ~0.15 ms on 2 Zen 3
    cores, 4-5% of the accelerated model's time). accelerate() puts one
    in such a block's place, holding the block's children under their names (same state-dict
    keys) and its plain attributes, once the self-check has found its forward computing

        out = ghost2(se(bn_dw(conv_dw(ghost1(x)))))   # conv_dw, bn_dw, se where present (not no-ops)
        out += shortcut(x)

    which is this module's forward too. The fused op runs when ghost2 can run its own (eval,
    running statistics, a kernel for x) and no hook is on ghost2 or the shortcut (the shortcut
    runs before ghost2 here); otherwise the layers run in that order."""

    __prepare_scriptable__ = ops.refuse_torchscript
    _CHILDREN = ("ghost1", "conv_dw", "bn_dw", "se", "ghost2", "shortcut")

    @staticmethod
    def eligible(block):
        """A GhostNet bottleneck by its class name and children, after accelerate()'s swaps and merges:
        ghost1, ghost2 (a fused GhostModule or SqueezeExciteGhost) and the shortcut (a Sequential or
        an Identity), conv_dw with bn_dw and se where present, any other child a no-op (GhostNetV3's
        re-parameterised branches: Identity, empty ModuleList); no parameters of its own, no
        forward set on the instance."""
        children = {name: child for name, child in block._modules.items() if child is not None}
        return (type(block).__name__ in ("GhostBottleneck", "GhostBottleneckV2", "GhostBottleneckV3")
                and all(name in children for name in ("ghost1", "ghost2", "shortcut"))
                and ("conv_dw" in children) == ("bn_dw" in children)
                and all(_is_no_op(child) for name, child in children.items()
                        if name not in GhostBottleneckResidual._CHILDREN)
                and type(children["ghost2"]) in _FUSED_GHOST2
                and type(children["shortcut"]) in (nn.Sequential, FoldedSequential, nn.Identity)
                and not block._parameters and not block._buffers and "forward" not in vars(block))

    @classmethod
    def from_block(cls, block):
        new = cls()
        new.training = block.training
        for name, value in vars(block).items():  # stride, has_se, ...: code that reads them still can
            if not name.startswith("_") and name != "training":
                setattr(new, name, value)
        new._modules.update(block._modules)  # in their order (the state-dict keys'), None-valued ones too
        return new

    def forward(self, x):
        modules = self._modules
        ghost2, shortcut = modules["ghost2"], modules["shortcut"]
        out = modules["ghost1"](x)
        conv_dw = modules.get("conv_dw")
        # not a pair of no-ops: timm's V3 keeps Identity ones at stride 1 and never calls them (their hooks)
        if conv_dw is not None and not (_is_no_op(conv_dw) and _is_no_op(modules["bn_dw"])):
            out = modules["bn_dw"](conv_dw(out))
        if modules.get("se") is not None:
            out = modules["se"](out)
        inputs = None  # ghost2's own mode decides, as where the block runs its layers
        if type(ghost2) in _FUSED_GHOST2 and not (
                intercepted(ghost2) or intercepted(shortcut) or hooks_inside(shortcut)):
            inputs = ghost2.ghost_op_inputs(out)
        if inputs is None:
            out = ghost2(out)
            out += shortcut(x)
            return out
        scale, folded, ghost = inputs
        return ops.call(torch.ops.ghostkernels.ghost_module_residual, out, scale, *folded[:4], ghost.oup,
                        ghost.stride, ghost.activation, shortcut(x))
