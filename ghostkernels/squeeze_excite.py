"""A Ghost module reading a squeeze-and-excitation output: `ghostkernels::ghost_module_scaled`.

A GhostBottleneck runs `se` then `ghost2`: ghost2(x * gate), gate the SE's (N, C, 1, 1)
output. The product is a full-size tensor written and read back; the 1x1 primary conv can
take the gate into per-image copies of its weights instead (W1 * gate_n), which is what the
C++ kernel does (csrc/ghost_cpu.cpp). Elsewhere the op is ghost_module(x * scale), and
gradients recompute that composition. accelerate() makes se + ghost2 a SqueezeExciteGhost.
"""

import torch
from torch import nn

from . import ops
from .modules import GhostModule, merged_weights
from .reference import output_memory_format

_lib = torch.library.Library("ghostkernels", "FRAGMENT")
_lib.define(
    "ghost_module_scaled(Tensor x, Tensor scale, Tensor primary_weight, Tensor? primary_bias, Tensor cheap_weight, "
    "Tensor? cheap_bias, int out_channels, int stride, str activation) -> Tensor"
)


def _composed(x, scale, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride, activation):
    return ops.apply(x * scale, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride,
                     activation)


@torch.library.register_fake("ghostkernels::ghost_module_scaled")
def _fake(x, scale, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride, activation):
    ops.check_args(x, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride, activation)
    if scale.shape != (x.shape[0], x.shape[1], 1, 1):
        raise ValueError(f"ghost_module_scaled: scale must be {(x.shape[0], x.shape[1], 1, 1)}, "
                         f"got {tuple(scale.shape)}")
    shape = ops.output_shape(x, primary_weight, out_channels, stride)
    return x.new_empty(shape).contiguous(memory_format=output_memory_format(x))


torch.library.impl(_lib, "ghost_module_scaled", "CompositeExplicitAutograd")(_composed)
ops.register_recompute_autograd("ghost_module_scaled", _composed)

_SE_CHILDREN = {"avg_pool", "conv_reduce", "act1", "conv_expand", "gate"}


def _gate(se):
    """The gate of a SqueezeExcite: timm's `gate` module or the original code's `gate_fn`."""
    gate = getattr(se, "gate", None)
    return gate if gate is not None else getattr(se, "gate_fn", None)


class SqueezeExciteGhost(nn.Module):
    """`se` then `ghost` with the SE product folded into the Ghost op: a GhostBottleneck's se
    and ghost2, which accelerate() then replaces by Identity. `se` is a SqueezeExcite of the
    original code, timm or the zoo: x * gate(conv_expand(act1(conv_reduce(mean(x))))).
    Training mode, and a Ghost module without running statistics, run the two in turn."""

    def __init__(self, se, ghost):
        super().__init__()
        self.se, self.ghost = se, ghost
        self.train(ghost.training)

    @staticmethod
    def eligible(se, ghost):
        if type(ghost) is not GhostModule or "SqueezeExcite" not in type(se).__name__:
            return False
        convs = [getattr(se, name, None) for name in ("conv_reduce", "conv_expand")]
        pool = getattr(se, "avg_pool", None)
        return (set(se._modules) <= _SE_CHILDREN and callable(_gate(se))
                and all(isinstance(c, nn.Conv2d) and c.kernel_size == (1, 1) for c in convs)
                and (pool is None or (isinstance(pool, nn.AdaptiveAvgPool2d) and pool.output_size in (1, (1, 1))))
                and convs[1].out_channels == ghost.primary_conv[0].in_channels)

    def forward(self, x):
        folded = merged_weights(self, self.ghost, x)
        if folded is None:
            return self.ghost(self.se(x))
        se = self.se
        scale = _gate(se)(se.conv_expand(se.act1(se.conv_reduce(x.mean((2, 3), keepdim=True)))))
        return ops.call(torch.ops.ghostkernels.ghost_module_scaled, x, scale, *folded[:4], self.ghost.oup,
                        self.ghost.stride, self.ghost.activation)
