"""G-GhostNet's cheap part as one op: `ghostkernels::cheap_mix`.

    out = relu(W @ x[:, offset:offset + cin] + b + mix[:, :, None, None])

the cheap 1x1 conv (+ its folded BN), the broadcast add of the stage's mix vector and the
ReLU. x's channel slice is read in place; `cheap_mix_into` writes straight into a channel
slice of the stage's concatenated output, so no concat copy follows. The C++ kernel
(csrc/cheap_mix_cpu.cpp) serves the CPU, Triton (triton_cheap_mix.py) CUDA, the reference
anything else.
"""

import torch
import torch.nn.functional as F

from . import _backends
from .ops import _warn_fallback, check_once, onnx_exporting
from .reference import output_memory_format

_lib = torch.library.Library("ghostkernels", "FRAGMENT")
_lib.define("cheap_mix(Tensor x, Tensor weight, Tensor? bias, Tensor mix, int channel_offset) -> Tensor")
# Writes into `out` (a channel slice of the stage's concatenation); returns nothing, so that
# torch.compile can functionalise it.
_lib.define("cheap_mix_into(Tensor x, Tensor weight, Tensor? bias, Tensor mix, int channel_offset, "
            "Tensor(a!) out) -> ()")


def cheap_mix_reference(x, weight, bias, mix, channel_offset=0):
    xs = x.narrow(1, channel_offset, weight.shape[1])
    return F.relu(F.conv2d(xs, weight, bias) + mix[:, :, None, None])


def check_args(x, weight, bias, mix, channel_offset, out=None):
    """Raise a ValueError/TypeError naming the argument when the call is malformed."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"cheap_mix: x must be a 4-D tensor (N, C, H, W), got {shape}")
    if weight.dim() != 4 or weight.shape[2:] != (1, 1):
        raise ValueError(f"cheap_mix: weight must be (cout, cin, 1, 1), got {tuple(weight.shape)}")
    cout, cin = weight.shape[:2]
    if cin == 0:
        raise ValueError(f"cheap_mix: weight must have at least one input channel (cin >= 1), got {tuple(weight.shape)}")
    if channel_offset < 0 or channel_offset + cin > x.shape[1]:
        raise ValueError(f"cheap_mix: channel_offset {channel_offset} + cin {cin} exceeds x's {x.shape[1]} channels")
    if tuple(mix.shape) != (x.shape[0], cout):
        raise ValueError(f"cheap_mix: mix must be ({x.shape[0]}, {cout}), got {tuple(mix.shape)}")
    if bias is not None and tuple(bias.shape) != (cout,):
        raise ValueError(f"cheap_mix: bias must have shape ({cout},), got {tuple(bias.shape)}")
    expected = (x.shape[0], cout, *x.shape[2:])
    if out is not None and tuple(out.shape) != expected:
        raise ValueError(f"cheap_mix: out must have shape {expected}, got {tuple(out.shape)}")
    for name, t in (("weight", weight), ("bias", bias), ("mix", mix), ("out", out)):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise TypeError(f"cheap_mix: {name} is {t.dtype} on {t.device}, x is {x.dtype} on {x.device}; "
                            "they must match")


@torch.library.register_fake("ghostkernels::cheap_mix")
def _fake(x, weight, bias, mix, channel_offset):
    check_args(x, weight, bias, mix, channel_offset)
    shape = (x.shape[0], weight.shape[0], *x.shape[2:])
    return x.new_empty(shape).contiguous(memory_format=output_memory_format(x))


@torch.library.register_fake("ghostkernels::cheap_mix_into")
def _fake_into(x, weight, bias, mix, channel_offset, out):
    check_args(x, weight, bias, mix, channel_offset, out)


@torch.library.impl(_lib, "cheap_mix", "CompositeExplicitAutograd")
def _fallback(x, weight, bias, mix, channel_offset):
    check_args(x, weight, bias, mix, channel_offset)
    _warn_fallback(x.device.type)
    return cheap_mix_reference(x, weight, bias, mix, channel_offset).contiguous(
        memory_format=output_memory_format(x))


@torch.library.impl(_lib, "cheap_mix_into", "CompositeExplicitAutograd")
def _fallback_into(x, weight, bias, mix, channel_offset, out):
    check_args(x, weight, bias, mix, channel_offset, out)
    _warn_fallback(x.device.type)
    out.copy_(cheap_mix_reference(x, weight, bias, mix, channel_offset))


@torch.library.impl(_lib, "cheap_mix_into", "CUDA")
def _cuda_into(x, weight, bias, mix, channel_offset, out):
    # the Triton kernel reads and writes where the arguments say: checked first
    check_once(check_args, x, weight, bias, mix, channel_offset, out)
    _write_into(x, weight, bias, mix, channel_offset, out)


def _write_into(x, weight, bias, mix, channel_offset, out):
    kernels = _backends.triton_kernels("triton_cheap_mix")
    if kernels is None:
        _fallback_into(x, weight, bias, mix, channel_offset, out)
    else:
        kernels.cheap_mix_into(x, weight, bias, mix, channel_offset, out)


@torch.library.impl(_lib, "cheap_mix", "CUDA")
def _cuda(x, weight, bias, mix, channel_offset):
    check_once(check_args, x, weight, bias, mix, channel_offset)
    out = torch.empty((x.shape[0], weight.shape[0], *x.shape[2:]), dtype=x.dtype, device=x.device,
                      memory_format=output_memory_format(x))
    _write_into(x, weight, bias, mix, channel_offset, out)
    return out


def _setup_context(ctx, inputs, output):
    x, weight, bias, mix, channel_offset = inputs
    ctx.save_for_backward(x, weight, output)
    ctx.channel_offset, ctx.has_bias = channel_offset, bias is not None


def _backward(ctx, grad):
    x, weight, out = ctx.saved_tensors
    cout, cin = weight.shape[:2]
    grad = torch.where(out <= 0, 0, grad)  # the ReLU's mask, read from its output (NaN passes, as in relu)
    grad_slice, grad_weight, _ = torch.ops.aten.convolution_backward(
        grad, x.narrow(1, ctx.channel_offset, cin), weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
        [True, True, False])
    # x's channels outside the slice get zero gradient.
    grad_x = F.pad(grad_slice, (0, 0, 0, 0, ctx.channel_offset, x.shape[1] - ctx.channel_offset - cin))
    grad_mix = grad.sum((2, 3))
    return grad_x, grad_weight, grad_mix.sum(0) if ctx.has_bias else None, grad_mix, None


torch.library.register_autograd("ghostkernels::cheap_mix", _backward, setup_context=_setup_context)


def cheap_mix(x, weight, bias, mix, *, channel_offset=0, out=None):
    """relu(conv1x1(x[:, channel_offset:channel_offset + cin], weight, bias) + mix[:, :, None, None]).

    x: (N, C, H, W); weight: (cout, cin, 1, 1); bias: (cout,) or None; mix: (N, cout).
    out: optional (N, cout, H, W) tensor, typically a channel slice of a larger buffer, written
    in place (no autograd through it). Without out, returns a new tensor, differentiable in
    x, weight, bias and mix.
    """
    check_args(x, weight, bias, mix, channel_offset, out)
    if out is None and onnx_exporting():
        return cheap_mix_reference(x, weight, bias, mix, channel_offset)
    if out is None:
        return torch.ops.ghostkernels.cheap_mix(x, weight, bias, mix, channel_offset)
    torch.ops.ghostkernels.cheap_mix_into(x, weight, bias, mix, channel_offset, out)
    return out
