"""The logits of GhostNetV2's DFC attention: `ghostkernels::dfc_logits`.

GhostModuleV2 gates its output with sigmoid(short_conv(avg_pool2d(x, 2))), upsampled; short_conv
is a 1x1 conv, a depthwise 1x5 and a depthwise 5x1 conv, each followed by BN. In eval, with the
BNs folded, that is a pool and three convs at a quarter of x's pixels, which ATen ran at ~0.3-0.4
ms per module at batch 1 (oneDNN's 1x5 and 5x1 depthwise convs ~0.1 ms each even on 3x3 planes):
half of a frozen GhostNetV2's forward. The C++ kernel (csrc/dfc_attention_cpu.cpp) runs the
branch in one call; elsewhere (CUDA, other dtypes) the op is its ATen composition, and gradients
recompute that. The gated Ghost op (`ghost_module_gated`) takes the logits.
"""

import torch
import torch.nn.functional as F

from . import ops

_lib = torch.library.Library("ghostkernels", "FRAGMENT")
_lib.define(
    "dfc_logits(Tensor x, Tensor weight, Tensor? bias, Tensor horizontal_weight, Tensor? horizontal_bias, "
    "Tensor vertical_weight, Tensor? vertical_bias, int stride) -> Tensor"
)


def _check(x, weight, bias, horizontal_weight, horizontal_bias, vertical_weight, vertical_bias, stride):
    """The C++ kernel's checks, as ValueError/TypeError naming the argument."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"dfc_logits: x must be 4-D (N, C, H, W), got {getattr(x, 'shape', type(x))}")
    inputs, outputs = x.shape[1], weight.shape[0]
    if weight.dim() != 4 or tuple(weight.shape[1:]) != (inputs, 1, 1):
        raise ValueError(f"dfc_logits: weight must be (C_out, {inputs}, 1, 1), got {tuple(weight.shape)}")
    if inputs == 0 or outputs == 0:
        raise ValueError(f"dfc_logits: x and weight must have at least one channel each, got x {tuple(x.shape)} and "
                         f"weight {tuple(weight.shape)}")
    for name, w, horizontal in (("horizontal_weight", horizontal_weight, True),
                                ("vertical_weight", vertical_weight, False)):
        k = w.shape[3 if horizontal else 2] if w.dim() == 4 else 0
        if tuple(w.shape) != ((outputs, 1, 1, k) if horizontal else (outputs, 1, k, 1)) or k % 2 == 0:
            shape = f"({outputs}, 1, 1, k)" if horizontal else f"({outputs}, 1, k, 1)"
            raise ValueError(f"dfc_logits: {name} must be {shape} with odd k, got {tuple(w.shape)}")
    if stride < 1:
        raise ValueError(f"dfc_logits: stride must be >= 1, got {stride}")
    named = {"weight": weight, "bias": bias, "horizontal_weight": horizontal_weight,
             "horizontal_bias": horizontal_bias, "vertical_weight": vertical_weight, "vertical_bias": vertical_bias}
    for name, t in named.items():
        if t is None:
            continue
        if name.endswith("bias") and tuple(t.shape) != (outputs,):
            raise ValueError(f"dfc_logits: {name} must have shape ({outputs},), got {tuple(t.shape)}")
        if t.dtype != x.dtype or t.device != x.device:
            raise TypeError(f"dfc_logits: {name} must match x's dtype and device ({x.dtype}, {x.device}), got "
                            f"{t.dtype} on {t.device}")
    if x.shape[2] < 2 or x.shape[3] < 2:
        raise ValueError(f"dfc_logits: x of size {tuple(x.shape)} is too small for the 2x2 average pool (H and W "
                         "must be at least 2)")


def _output_shape(x, weight, stride):
    height, width = ((size // 2 - 1) // stride + 1 for size in x.shape[2:])
    return (x.shape[0], weight.shape[0], height, width)


def composed(x, weight, bias, horizontal_weight, horizontal_bias, vertical_weight, vertical_bias, stride):
    """The op as ATen ops: GhostNetV2's short_conv (BNs folded) on avg_pool2d(x, 2), NCHW."""
    logits = F.conv2d(F.avg_pool2d(x, kernel_size=2, stride=2), weight, bias, stride)
    channels = weight.shape[0]
    logits = F.conv2d(logits, horizontal_weight, horizontal_bias, 1, (0, horizontal_weight.shape[3] // 2),
                      groups=channels)
    logits = F.conv2d(logits, vertical_weight, vertical_bias, 1, (vertical_weight.shape[2] // 2, 0), groups=channels)
    return logits.contiguous()


@torch.library.register_fake("ghostkernels::dfc_logits")
def _fake(x, weight, bias, horizontal_weight, horizontal_bias, vertical_weight, vertical_bias, stride):
    _check(x, weight, bias, horizontal_weight, horizontal_bias, vertical_weight, vertical_bias, stride)
    return x.new_empty(_output_shape(x, weight, stride))


@torch.library.impl(_lib, "dfc_logits", "CompositeExplicitAutograd")
def _fallback(x, weight, bias, horizontal_weight, horizontal_bias, vertical_weight, vertical_bias, stride):
    _check(x, weight, bias, horizontal_weight, horizontal_bias, vertical_weight, vertical_bias, stride)
    return composed(x, weight, bias, horizontal_weight, horizontal_bias, vertical_weight, vertical_bias, stride)


ops.register_recompute_autograd("dfc_logits", composed)


def fused_stride(pairs):
    """The stride of short_conv's 1x1 conv when its (conv, BN) pairs (modules.conv_bn_sequence)
    are the structure the op computes: a 1x1 conv without padding, then a depthwise 1 x k and a
    depthwise k x 1 conv (odd k, 'same' zero padding, stride 1); None otherwise."""
    if pairs is None or len(pairs) != 3:
        return None
    pointwise, horizontal, vertical = (conv for conv, _ in pairs)
    if not (pointwise.kernel_size == (1, 1) and pointwise.padding == (0, 0) and pointwise.groups == 1
            and pointwise.stride[0] == pointwise.stride[1]):
        return None
    channels = pointwise.out_channels
    for conv, dim in ((horizontal, 1), (vertical, 0)):
        k = conv.kernel_size[dim]
        padding = [0, 0]
        padding[dim] = k // 2
        if not (conv.kernel_size[1 - dim] == 1 and k % 2 == 1 and conv.padding == tuple(padding)
                and conv.stride == (1, 1) and conv.groups == channels == conv.in_channels == conv.out_channels):
            return None
    if any(conv.dilation != (1, 1) or conv.padding_mode != "zeros" for conv, _ in pairs):
        return None
    return pointwise.stride[0]


def dfc_logits(x, pairs, folded):
    """The DFC attention's logits of x: short_conv(avg_pool2d(x, 2)), short_conv's (conv, BN)
    pairs `pairs` with the BNs folded into `folded` (W, b per pair), by the op where the structure
    is the one it computes and the CPU kernel takes x's dtype, else op by op."""
    stride = fused_stride(pairs)
    if stride is None or (x.device.type == "cpu" and not ops.cpu_kernel_takes(x)):
        logits = F.avg_pool2d(x, kernel_size=2, stride=2)
        for (conv, _), weight, bias in zip(pairs, folded[::2], folded[1::2]):
            logits = conv._conv_forward(logits, weight, bias)  # the conv's own padding mode too
        return logits
    return ops.call(torch.ops.ghostkernels.dfc_logits, x, *folded, stride)

