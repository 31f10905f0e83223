"""The Ghost module in plain PyTorch: the oracle of every test and the fallback kernel.

Folded form of docs/math.md section 2: the primary conv and the cheap depthwise op carry their
(folded BatchNorm) biases, each followed by the activation.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"relu": F.relu, "none": lambda t: t}


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


def ghost_module_reference(
    x, primary_weight, primary_bias, cheap_weight, cheap_bias, *, out_channels, stride=1, activation="relu"
):
    act = ACTIVATIONS[activation]
    kernel, dw = primary_weight.shape[-1], cheap_weight.shape[-1]
    x1 = act(F.conv2d(x, primary_weight, primary_bias, stride, kernel // 2))
    x2 = act(F.conv2d(x1, cheap_weight, cheap_bias, 1, dw // 2, groups=primary_weight.shape[0]))
    return torch.cat([x1, x2], dim=1)[:, :out_channels]


def ghost_module_masked_reference(
    x, primary_weight, primary_bias, cheap_weight, cheap_bias, *, out_channels, stride=1, relu_masks_of
):
    """ghost_module_reference with activation 'relu' whose ReLUs pass exactly where the output
    `relu_masks_of` does (as torch's ReLU backward: not where it is <= 0, so NaN passes): what a
    backward must differentiate to match the forward that wrote that output. A float16, bfloat16
    or TF32 pre-activation within rounding of zero can land on the other side of the float64 one,
    and each such flip changes a gradient by a whole gradient value."""
    init, kernel, dw = primary_weight.shape[0], primary_weight.shape[-1], cheap_weight.shape[-1]
    passes = ~(relu_masks_of.to(x.dtype) <= 0)
    x1 = F.conv2d(x, primary_weight, primary_bias, stride, kernel // 2) * passes[:, :init]
    x2 = F.conv2d(x1, cheap_weight, cheap_bias, 1, dw // 2, groups=init)[:, : out_channels - init]
    return torch.cat([x1, x2 * passes[:, init:]], dim=1)


def upsampled_gate(gate, size):
    """GhostNetV2's attention: sigmoid of the gate logits, nearest-upsampled to `size`."""
    return F.interpolate(torch.sigmoid(gate), size=size, mode="nearest")


def ghost_module_gated_reference(
    x, primary_weight, primary_bias, cheap_weight, cheap_bias, gate, *, out_channels, stride=1, activation="relu"
):
    """The Ghost module's output times upsampled_gate(gate) (GhostModuleV2, 'attn' mode)."""
    out = ghost_module_reference(x, primary_weight, primary_bias, cheap_weight, cheap_bias,
                                 out_channels=out_channels, stride=stride, activation=activation)
    return out * upsampled_gate(gate, out.shape[-2:])


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
