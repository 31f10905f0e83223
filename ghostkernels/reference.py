"""The Ghost module in plain PyTorch: the oracle of every test and the fallback kernel.

Folded form of SPEC section 1: the primary conv and the cheap depthwise op carry their
(folded BatchNorm) biases, each followed by the activation.
"""

import torch
import torch.nn.functional as F

ACTIVATIONS = {"relu": F.relu, "none": lambda t: t}


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The output keeps channels_last only when x is channels_last and not also NCHW-contiguous."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def ghost_module_reference(
    x, primary_weight, primary_bias, cheap_weight, cheap_bias, *, out_channels, stride=1, activation="relu"
):
    act = ACTIVATIONS[activation]
    kernel, dw = primary_weight.shape[-1], cheap_weight.shape[-1]
    x1 = act(F.conv2d(x, primary_weight, primary_bias, stride, kernel // 2))
    x2 = act(F.conv2d(x1, cheap_weight, cheap_bias, 1, dw // 2, groups=primary_weight.shape[0]))
    return torch.cat([x1, x2], dim=1)[:, :out_channels]
