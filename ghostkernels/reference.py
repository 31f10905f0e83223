"""The Ghost module in plain PyTorch: the oracle of every test and the fallback kernel.

Folded form of docs/math.md section 2: the primary conv and the cheap depthwise op carry their
(folded BatchNorm) biases, each followed by the activation.
"""

import math
import struct

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"relu": F.relu, "none": lambda t: t}


def check_activation(op, activation, error=ValueError):
    """Raise `error` (the op's own type) naming op unless activation names one of ACTIVATIONS, with
    the C++ kernels' message."""
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise error(f"{op}: activation must be 'relu' or 'none', got {activation!r}")


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The output keeps channels_last only when x is channels_last and not also NCHW-contiguous."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def conv_output_format(x: torch.Tensor) -> torch.memory_format:
    """The layout direct_conv2d and pointwise_conv2d return: NCHW on the CPU, where their C++
    kernels write NCHW, and output_memory_format(x) elsewhere, so that a channels_last model on a
    GPU stays channels_last between the ops accelerate() makes of it."""
    return torch.contiguous_format if x.device.type == "cpu" else output_memory_format(x)


def same_padding(weight):
    """(kh // 2, kw // 2): the padding of the ops' convs (odd kernels keep a stride-1 plane's size).
    A pair, not one int: torch 2.6's tracer (the ONNX TorchScript export) turns one traced int
    into an empty padding list."""
    return weight.shape[-2] // 2, weight.shape[-1] // 2


def ghost_module_reference(
    x, primary_weight, primary_bias, cheap_weight, cheap_bias, *, out_channels, stride=1, activation="relu"
):
    act = ACTIVATIONS[activation]
    x1 = act(F.conv2d(x, primary_weight, primary_bias, stride, same_padding(primary_weight)))
    x2 = act(F.conv2d(x1, cheap_weight, cheap_bias, 1, same_padding(cheap_weight), groups=primary_weight.shape[0]))
    return torch.cat([x1, x2], dim=1)[:, :out_channels]


def conv_backward(grad, x, weight, stride, groups, bias=True):
    """(grad_x, grad_weight, grad_bias or None) of F.conv2d(x, weight, bias, stride, k // 2,
    groups=groups), by aten's convolution_backward rather than autograd: the fallback backward
    kernels run below autograd's dispatch key, where a TorchDispatchMode (opcheck, FlopCounterMode)
    calls them and autograd records nothing."""
    return torch.ops.aten.convolution_backward(grad, x, weight, [weight.shape[0]], [stride] * 2,
                                               same_padding(weight), [1, 1], False, [0, 0], groups,
                                               [True, True, bias])


def batch_norm_backward(grad, x, weight, mean, var, eps):
    """(grad_x, grad_weight, grad_bias) of a training-mode BatchNorm over (N, H, W) with the batch
    mean and biased variance it normalised by."""
    shape, dims = (1, -1, 1, 1), (0, 2, 3)
    rstd = torch.rsqrt(var + eps)
    x_hat = (x - mean.view(shape)) * rstd.view(shape)
    grad_bias = grad.sum(dims)
    grad_weight = (grad * x_hat).sum(dims)
    count = x.numel() // x.shape[1]
    grad_x = (weight * rstd).view(shape) * (grad - (grad_bias / count).view(shape)
                                             - x_hat * (grad_weight / count).view(shape))
    return grad_x, grad_weight, grad_bias


def split_output_grad(grad, init, ghosts):
    """A Ghost output's grad as (the primary half's, the ghost half's with zeros for the ghost
    channels that out_channels cut off)."""
    grad_ghost = grad.new_zeros((grad.shape[0], ghosts, *grad.shape[2:]))
    grad_ghost[:, : grad.shape[1] - init] = grad[:, init:]
    return grad[:, :init], grad_ghost


def ghost_module_gradients(grad, out, x, primary_weight, cheap_weight, stride, activation):
    """(grad_x, grad_W1, grad_b1, grad_W2, grad_b2) of ghost_module_reference from its output `out`,
    as the fused backward kernels compute them: x1 is out's first init channels, and the ReLUs
    pass where out does (torch's ReLU backward: not where out <= 0, so NaN passes)."""
    init, ghosts = primary_weight.shape[0], cheap_weight.shape[0]
    relu = activation == "relu"
    x1 = out[:, :init]
    grad_x1, grad_ghost = split_output_grad(grad, init, ghosts)
    if relu:
        grad_ghost[:, : out.shape[1] - init] = torch.ops.aten.threshold_backward(
            grad_ghost[:, : out.shape[1] - init], out[:, init:], 0)
    grad_cheap_input, grad_cheap_weight, grad_cheap_bias = conv_backward(grad_ghost, x1, cheap_weight, 1, init)
    grad_z1 = grad_x1 + grad_cheap_input
    if relu:
        grad_z1 = torch.ops.aten.threshold_backward(grad_z1, x1, 0)
    grad_x, grad_primary_weight, grad_primary_bias = conv_backward(grad_z1, x, primary_weight, stride, 1)
    return (grad_x.contiguous(memory_format=output_memory_format(x)), grad_primary_weight.contiguous(),
            grad_primary_bias, grad_cheap_weight.contiguous(), grad_cheap_bias)


def ghost_module_masked_reference(
    x, primary_weight, primary_bias, cheap_weight, cheap_bias, *, out_channels, stride=1, relu_masks_of
):
    """ghost_module_reference with activation 'relu' whose ReLUs pass exactly where the output
    `relu_masks_of` does (as torch's ReLU backward: not where it is <= 0, so NaN passes): what a
    backward must differentiate to match the forward that wrote that output. A float16, bfloat16
    or TF32 pre-activation within rounding of zero can land on the other side of the float64 one,
    and each such flip changes a gradient by a whole gradient value."""
    init = primary_weight.shape[0]
    passes = ~(relu_masks_of.to(x.dtype) <= 0)
    x1 = F.conv2d(x, primary_weight, primary_bias, stride, same_padding(primary_weight)) * passes[:, :init]
    x2 = F.conv2d(x1, cheap_weight, cheap_bias, 1, same_padding(cheap_weight), groups=init)[:, : out_channels - init]
    return torch.cat([x1, x2 * passes[:, init:]], dim=1)


def upsampled_gate(gate, size):
    """GhostNetV2's attention as its code computes it: sigmoid of the gate logits, nearest-upsampled
    to `size` by F.interpolate."""
    return F.interpolate(torch.sigmoid(gate), size=size, mode="nearest")


def nearest_sources(source, size, device=None):
    """The source index of each of `size` positions nearest-upsampled from `source` positions:
    min(floor(i * s), source - 1), in float32, s = nearest_scale(source, size). This is F.interpolate's
    nearest mode in PyTorch's CUDA kernels, its channels-last CPU kernel and its CPU kernels for
    16- and 32-bit floats; its float64 CPU kernel for NCHW outputs of more than 128 rows plus columns
    rounds a float64 product instead, one source off at ~1.6% of the (source, size) pairs below
    200 (at none of GhostNetV2's: checked up to 3000 rows, strides 1 and 2). The fused kernels
    (C++ `nearest_sources`, Triton `_gate`) take this one in every dtype and layout."""
    positions = torch.arange(size, dtype=torch.float32, device=device)  # no host tensor: CUDA-graph safe
    return positions.mul_(nearest_scale(source, size)).floor_().long().clamp_(max=source - 1)


def nearest_scale(source, size):
    """source / size rounded once to float32 (as a Python float: a float32 tensor times it
    multiplies in float32), the scale of nearest_sources (the float64 quotient of two integers
    below 2**24 rounds to the same float32)."""
    return struct.unpack("f", struct.pack("f", source / size))[0]


def upsample_nearest(t, size):
    """t (N, C, h, w) nearest-upsampled to `size` by nearest_sources, in t's dtype."""
    rows = nearest_sources(t.shape[-2], size[0], t.device)
    cols = nearest_sources(t.shape[-1], size[1], t.device)
    return t[..., rows[:, None], cols]


def ghost_module_gated_reference(
    x, primary_weight, primary_bias, cheap_weight, cheap_bias, gate, *, out_channels, stride=1, activation="relu"
):
    """The Ghost module's output times sigmoid(gate) nearest-upsampled to it (GhostModuleV2, 'attn'
    mode) by upsample_nearest: the fused op's index rule, F.interpolate's but for its float64
    kernel's on large NCHW outputs."""
    out = ghost_module_reference(x, primary_weight, primary_bias, cheap_weight, cheap_bias,
                                 out_channels=out_channels, stride=stride, activation=activation)
    return out * upsample_nearest(torch.sigmoid(gate), out.shape[-2:])


def dfc_short_conv(inp, oup, kernel_size=1, stride=1):
    """GhostNetV2's DFC attention branch (keys short_conv.0-5): a conv to oup, a depthwise 1x5
    and a depthwise 5x1 conv, each followed by BN, no activation."""
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel_size, stride, kernel_size // 2, bias=False),
        nn.BatchNorm2d(oup),
        nn.Conv2d(oup, oup, (1, 5), 1, (0, 2), groups=oup, bias=False),
        nn.BatchNorm2d(oup),
        nn.Conv2d(oup, oup, (5, 1), 1, (2, 0), groups=oup, bias=False),
        nn.BatchNorm2d(oup),
    )


def dfc_gate(short_conv, x, size):
    """The DFC attention of x at the output's size: upsampled_gate(short_conv(avg_pool2d(x, 2)))."""
    return upsampled_gate(short_conv(F.avg_pool2d(x, kernel_size=2, stride=2)), size)


class ReferenceGhostModule(nn.Module):
    """The Ghost module as the original code writes it (same keys as ghostkernels.GhostModule),
    run by PyTorch op by op: the eager baseline of the benchmarks and of accelerate()."""

    def __init__(self, inp, oup, kernel_size=1, ratio=2, dw_size=3, stride=1, relu=True):
        super().__init__()
        self.oup = oup
        init_channels = math.ceil(oup / ratio)
        new_channels = init_channels * (ratio - 1)
        self.primary_conv = nn.Sequential(
            nn.Conv2d(inp, init_channels, kernel_size, stride, kernel_size // 2, bias=False),
            nn.BatchNorm2d(init_channels),
            nn.ReLU(inplace=True) if relu else nn.Sequential(),
        )
        self.cheap_operation = nn.Sequential(
            nn.Conv2d(init_channels, new_channels, dw_size, 1, dw_size // 2, groups=init_channels, bias=False),
            nn.BatchNorm2d(new_channels),
            nn.ReLU(inplace=True) if relu else nn.Sequential(),
        )

    def forward(self, x):
        x1 = self.primary_conv(x)
        x2 = self.cheap_operation(x1)
        return torch.cat([x1, x2], dim=1)[:, : self.oup]


class ReferenceGhostModuleV2(ReferenceGhostModule):
    """GhostModuleV2 in 'attn' mode as the original code writes it: the Ghost output times its
    DFC attention gate (same keys as ghostkernels.GhostModuleV2)."""

    def __init__(self, inp, oup, kernel_size=1, ratio=2, dw_size=3, stride=1, relu=True):
        super().__init__(inp, oup, kernel_size, ratio, dw_size, stride, relu)
        self.short_conv = dfc_short_conv(inp, oup, kernel_size, stride)

    def forward(self, x):
        out = super().forward(x)
        return out * dfc_gate(self.short_conv, x, out.shape[-2:])
