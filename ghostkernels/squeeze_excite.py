"""A Ghost module reading a squeeze-and-excitation output: `ghostkernels::ghost_module_scaled`
and `ghostkernels::squeeze_excite_gate`.

A GhostBottleneck runs `se` then `ghost2`: ghost2(x * gate), gate the SE's (N, C, 1, 1)
output. The product is a full-size tensor written and read back; the 1x1 primary conv can
take the gate into per-image copies of its weights instead (W1 * gate_n), which is what the
C++ kernel does (csrc/ghost_cpu.cpp). On CUDA the Triton forward applies the gate as it loads x
(or gives the library GEMM per-image weights). The gate itself, about fifteen small ATen ops, is
one op too when the SE's activation is ReLU and its gate GhostNet's hard sigmoid
(csrc/squeeze_excite_cpu.cpp), and one Triton launch on CUDA (triton_squeeze_excite.py).
Elsewhere the ops are their ATen compositions, and gradients recompute those. accelerate()
makes se + ghost2 a SqueezeExciteGhost.
"""

import torch
import torch.nn.functional as F
from torch import nn

from . import _backends, ops
from .models.ghostnet import hard_sigmoid
from .modules import GhostModule, PointwiseConv2d, merged_weights, split_off
from .reference import output_memory_format

_lib = torch.library.Library("ghostkernels", "FRAGMENT")
_lib.define(
    "ghost_module_scaled(Tensor x, Tensor scale, Tensor primary_weight, Tensor? primary_bias, Tensor cheap_weight, "
    "Tensor? cheap_bias, int out_channels, int stride, str activation) -> Tensor"
)


def _composed(x, scale, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride, activation):
    return ops.apply(x * scale, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride,
                     activation)


def _check_scaled(x, scale, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride, activation):
    ops.check_args(x, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride, activation)
    if scale.shape != (x.shape[0], x.shape[1], 1, 1):
        raise ValueError(f"ghost_module_scaled: scale must be {(x.shape[0], x.shape[1], 1, 1)}, "
                         f"got {tuple(scale.shape)}")
    if scale.dtype != x.dtype or scale.device != x.device:
        raise TypeError(f"ghost_module_scaled: scale's dtype and device must match x's: scale is {scale.dtype} on "
                        f"{scale.device}, x is {x.dtype} on {x.device}")


@torch.library.register_fake("ghostkernels::ghost_module_scaled")
def _fake(x, scale, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride, activation):
    _check_scaled(x, scale, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride, activation)
    shape = ops.output_shape(x, primary_weight, out_channels, stride)
    return x.new_empty(shape).contiguous(memory_format=output_memory_format(x))


@torch.library.impl(_lib, "ghost_module_scaled", "CompositeExplicitAutograd")
def _scaled_fallback(x, scale, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride,
                     activation):
    _check_scaled(x, scale, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride, activation)
    return _composed(x, scale, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride,
                     activation)


@torch.library.impl(_lib, "ghost_module_scaled", "CUDA")
def _scaled_cuda(x, scale, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride, activation):
    """The Triton forward with the gate applied as x is read (or in per-image weights of the
    library GEMM): the product x * scale is never written."""
    ops.check_once(_check_scaled, x, scale, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels,
                   stride, activation)
    kernels = _backends.triton_kernels()
    if kernels is None:
        return _composed(x, scale, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride,
                         activation)
    return kernels.forward(x, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride, activation,
                           scale=scale)
ops.register_recompute_autograd("ghost_module_scaled", _composed)

_lib.define(
    "squeeze_excite_gate(Tensor x, Tensor reduce_weight, Tensor? reduce_bias, Tensor expand_weight, "
    "Tensor? expand_bias) -> Tensor"
)


def _gate_composed(x, reduce_weight, reduce_bias, expand_weight, expand_bias):
    hidden = F.relu(F.conv2d(x.mean((2, 3), keepdim=True), reduce_weight, reduce_bias))
    return hard_sigmoid(F.conv2d(hidden, expand_weight, expand_bias))


def check_gate_args(x, reduce_weight, reduce_bias, expand_weight, expand_bias):
    """A ValueError/TypeError naming the argument, as the C++ kernel's checks do on the CPU."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"squeeze_excite_gate: x must be 4-D (N, C, H, W), got {getattr(x, 'shape', type(x))}")
    channels = x.shape[1]
    if reduce_weight.dim() != 4 or reduce_weight.shape[1] != channels or reduce_weight.shape[2:] != (1, 1):
        raise ValueError(f"squeeze_excite_gate: reduce_weight must be (reduced, {channels}, 1, 1), "
                         f"got {tuple(reduce_weight.shape)}")
    reduced = reduce_weight.shape[0]
    if tuple(expand_weight.shape) != (channels, reduced, 1, 1):
        raise ValueError(f"squeeze_excite_gate: expand_weight must be ({channels}, {reduced}, 1, 1), "
                         f"got {tuple(expand_weight.shape)}")
    for name, bias, size in (("reduce_bias", reduce_bias, reduced), ("expand_bias", expand_bias, channels)):
        if bias is not None and tuple(bias.shape) != (size,):
            raise ValueError(f"squeeze_excite_gate: {name} must have shape ({size},), got {tuple(bias.shape)}")
    named = {"reduce_weight": reduce_weight, "reduce_bias": reduce_bias, "expand_weight": expand_weight,
             "expand_bias": expand_bias}
    for name, t in named.items():
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise TypeError(f"squeeze_excite_gate: {name}'s dtype and device must match x's: {name} is {t.dtype} "
                            f"on {t.device}, x is {x.dtype} on {x.device}")
    if channels == 0 or reduced == 0:
        raise ValueError("squeeze_excite_gate: x and reduce_weight must have at least one channel")
    if x.shape[2] * x.shape[3] == 0:
        raise ValueError(f"squeeze_excite_gate: x has no pixels to pool ({tuple(x.shape)})")


@torch.library.register_fake("ghostkernels::squeeze_excite_gate")
def _gate_fake(x, reduce_weight, reduce_bias, expand_weight, expand_bias):
    check_gate_args(x, reduce_weight, reduce_bias, expand_weight, expand_bias)
    return x.new_empty((x.shape[0], x.shape[1], 1, 1))


@torch.library.impl(_lib, "squeeze_excite_gate", "CompositeExplicitAutograd")
def _gate_fallback(x, reduce_weight, reduce_bias, expand_weight, expand_bias):
    check_gate_args(x, reduce_weight, reduce_bias, expand_weight, expand_bias)
    return _gate_composed(x, reduce_weight, reduce_bias, expand_weight, expand_bias)


@torch.library.impl(_lib, "squeeze_excite_gate", "CUDA")
def _gate_cuda(x, reduce_weight, reduce_bias, expand_weight, expand_bias):
    """One Triton launch (triton_squeeze_excite.py) instead of the composition's ~15."""
    ops.check_once(check_gate_args, x, reduce_weight, reduce_bias, expand_weight, expand_bias)
    kernels = _backends.triton_kernels("triton_squeeze_excite")
    if kernels is None:
        return _gate_composed(x, reduce_weight, reduce_bias, expand_weight, expand_bias)
    return kernels.squeeze_excite_gate(x, reduce_weight, reduce_bias, expand_weight, expand_bias)
ops.register_recompute_autograd("squeeze_excite_gate", _gate_composed)


def _is_hard_sigmoid(gate):
    """Whether `gate` computes relu6(x + 3) / 6 (timm's hard_sigmoid gate, the original code's
    gate_fn, nn.Hardsigmoid), probed on both sides of its kinks."""
    probe = torch.linspace(-4.0, 4.0, 33, dtype=torch.float64)
    try:
        with torch.no_grad():
            out = gate(probe.clone())
    except (RuntimeError, TypeError):
        return False
    return isinstance(out, torch.Tensor) and torch.allclose(out, hard_sigmoid(probe), rtol=0, atol=1e-12)


_SE_CHILDREN = {"avg_pool", "conv_reduce", "act1", "conv_expand", "gate"}


def _gate(se):
    """The gate of a SqueezeExcite: timm's `gate` module or the original code's `gate_fn`."""
    gate = getattr(se, "gate", None)
    return gate if gate is not None else getattr(se, "gate_fn", None)


class SqueezeExciteGhost(nn.Module):
    """`se` then `ghost` with the SE product folded into the Ghost op: a GhostBottleneck's se
    and ghost2, which accelerate() then replaces by a placeholder (modules.MergedAway). `se` is a
    SqueezeExcite of the original code, timm or the zoo: x * gate(conv_expand(act1(conv_reduce(mean(x))))).
    Training mode, and a Ghost module without running statistics, run the two in turn."""

    __prepare_scriptable__ = ops.refuse_torchscript

    def __init__(self, se, ghost):
        super().__init__()
        self.se, self.ghost = se, ghost
        self.training = ghost.training  # its own flag only: train() would reset the BNs' inside ghost
        self._checked_parts = None
        self._merge_is_exact()

    @property
    def standard_gate(self):
        """Whether the SE's act1 is a ReLU and its gate a hard sigmoid: squeeze_excite_gate's op."""
        self._merge_is_exact()
        return self._standard_gate

    def _merge_is_exact(self):
        """Whether se and ghost still are what the merge computes (eligible), and which gate
        (standard_gate): checked anew when a module of either is replaced after accelerate() (a
        SiLU for act1 kept running as a ReLU), by identity, as the gate's probe costs ~20 us."""
        se, ghost = self._modules["se"], self._modules["ghost"]
        attributes = se.__dict__  # the original code's gate_fn is a plain attribute; not vars(): torch 2.6's dynamo
        parts = (se, ghost, *se._modules.values(), attributes.get("gate_fn"), attributes.get("gate"))
        checked = self._checked_parts
        # By identity, spelled out: torch 2.7's dynamo cannot trace a module's __eq__ (a tuple's != calls it).
        if checked is None or len(parts) != len(checked) or any(a is not b for a, b in zip(parts, checked)):
            self._eligible = SqueezeExciteGhost.eligible(se, ghost)
            self._standard_gate = self._eligible and type(se.act1) is nn.ReLU and _is_hard_sigmoid(_gate(se))
            self._checked_parts = parts
        return self._eligible

    @staticmethod
    def eligible(se, ghost):
        if type(ghost) is not GhostModule or "SqueezeExcite" not in type(se).__name__:
            return False
        convs = [getattr(se, name, None) for name in ("conv_reduce", "conv_expand")]
        pool = getattr(se, "avg_pool", None)
        return (set(se._modules) <= _SE_CHILDREN and callable(_gate(se))
                and all(type(c) in (nn.Conv2d, PointwiseConv2d) and c.kernel_size == (1, 1) and c.groups == 1
                        and c.padding == (0, 0) for c in convs)
                and (pool is None or (type(pool) is nn.AdaptiveAvgPool2d and pool.output_size in (1, (1, 1))))
                and convs[1].out_channels == ghost.primary_conv[0].in_channels)

    def ghost_op_inputs(self, x):
        """(SE scale, folded weights, Ghost module) of the merged op on x, or None where the two
        modules run in turn (GhostModule.ghost_op_inputs)."""
        folded = merged_weights(self, self.ghost, x) if self._merge_is_exact() and not split_off(self) else None
        if folded is None:
            return None
        se = self.se
        if self._standard_gate:
            scale = ops.call(torch.ops.ghostkernels.squeeze_excite_gate, x, se.conv_reduce.weight,
                             se.conv_reduce.bias, se.conv_expand.weight, se.conv_expand.bias)
        else:
            scale = _gate(se)(se.conv_expand(se.act1(se.conv_reduce(x.mean((2, 3), keepdim=True)))))
        return scale, folded, self.ghost

    def forward(self, x):
        if split_off(self):  # the SE runs at se's place, for a hook
            return self.ghost(x)
        inputs = self.ghost_op_inputs(x)
        if inputs is None:
            return self.ghost(self.se(x))
        scale, folded, ghost = inputs
        return ops.call(torch.ops.ghostkernels.ghost_module_scaled, x, scale, *folded[:4], ghost.oup, ghost.stride,
                        ghost.activation)
