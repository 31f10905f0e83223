"""Depthwise k x k conv (+bias), stride 1 or 2, 'same' padding: `ghostkernels::depthwise_conv2d`.

What a stride-2 `conv_dw` + `bn_dw` (or a shortcut's depthwise conv + BN) becomes once
accelerate() folds the BN. The C++ CPU kernel (csrc/depthwise_cpu.cpp) serves NCHW float32/64
and hands other layouts to at::conv2d; elsewhere the fallback is the library conv itself.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .modules import is_same_square_conv

_lib = torch.library.Library("ghostkernels", "FRAGMENT")
_lib.define("depthwise_conv2d(Tensor x, Tensor weight, Tensor? bias, int stride) -> Tensor")


def _library_conv(x, weight, bias, stride):
    return F.conv2d(x, weight, bias, stride, weight.shape[-1] // 2, groups=x.shape[1])


@torch.library.register_fake("ghostkernels::depthwise_conv2d")
def _fake(x, weight, bias, stride):
    height, width = ((s - 1) // stride + 1 for s in x.shape[2:])
    return x.new_empty((x.shape[0], x.shape[1], height, width))


@torch.library.impl(_lib, "depthwise_conv2d", "CompositeExplicitAutograd")
def _fallback(x, weight, bias, stride):
    return _library_conv(x, weight, bias, stride).contiguous()


def _setup_context(ctx, inputs, output):
    x, weight, bias, stride = inputs
    ctx.save_for_backward(x, weight)
    ctx.stride, ctx.has_bias = stride, bias is not None


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    k = weight.shape[-1]
    grad_x, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
        grad, x, weight, [weight.shape[0]] if ctx.has_bias else None, [ctx.stride] * 2, [k // 2] * 2, [1, 1],
        False, [0, 0], x.shape[1], [True, True, ctx.has_bias])
    return grad_x, grad_weight, grad_bias, None


torch.library.register_autograd("ghostkernels::depthwise_conv2d", _backward, setup_context=_setup_context)


class DepthwiseConv2d(nn.Module):
    """A depthwise 'same' conv with bias, stride 1 or 2, run by ghostkernels::depthwise_conv2d."""

    def __init__(self, weight, bias, stride):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias) if bias is not None else None
        self.stride = stride

    @staticmethod
    def eligible(conv):
        return (type(conv) is nn.Conv2d and is_same_square_conv(conv) and conv.groups == conv.in_channels == conv.out_channels
                and conv.stride in ((1, 1), (2, 2)))

    @classmethod
    def from_conv(cls, conv):
        bias = conv.bias.detach().clone() if conv.bias is not None else None
        return cls(conv.weight.detach().clone(), bias, conv.stride[0])

    def forward(self, x):
        return torch.ops.ghostkernels.depthwise_conv2d(x, self.weight, self.bias, self.stride)

    def extra_repr(self):
        return f"{self.weight.shape[0]}, kernel_size={self.weight.shape[-1]}, stride={self.stride}"
