"""ghostify(model): a plain CNN's Ghost version, as in the paper (Ghost-VGG, Ghost-ResNet), and
count_params_flops(model, input_size) to compare the two."""

import copy

import torch
from torch import nn

from .modules import GhostModule, is_same_square_conv


def _eligible(conv):
    """A dense, undilated, 'same'-padded square odd conv with more than one input channel."""
    return type(conv) is nn.Conv2d and is_same_square_conv(conv) and conv.groups == 1 and conv.in_channels > 1


def ghostify(model, ratio=2, dw_size=3, relu=False, inplace=False):
    """Replace every eligible Conv2d by a GhostModule with the same in/out channels, kernel size
    and stride (the primary conv's); depthwise, grouped, dilated and 1-channel convs stay.

    The Ghost modules are new layers (freshly initialised, BN inside): the result is the
    compressed architecture, to be trained. relu=False because the network's own BN/ReLU
    after each conv stay in place. Returns the model (a deep copy unless inplace=True).
    """
    if not inplace:
        model = copy.deepcopy(model)
    ghosts = _ghost_prefixes(model)  # convs already inside Ghost modules stay
    for name, conv in list(model.named_modules()):
        if not _eligible(conv) or any(name.startswith(g) for g in ghosts):
            continue
        ghost = GhostModule(conv.in_channels, conv.out_channels, conv.kernel_size[0], ratio, dw_size,
                            conv.stride[0], relu).to(conv.weight.device, conv.weight.dtype)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, ghost)
    return model


def _ghost_prefixes(model):
    return [f"{name}." for name, m in model.named_modules() if isinstance(m, GhostModule)]


def count_params_flops(model, input_size, ghost_channels_computed=False):
    """(parameters, multiply-adds) of one forward pass of `input_size` (e.g. (1, 3, 224, 224)).

    Counts convolutions and linear layers. A GhostModule counts its primary conv and its cheap
    depthwise conv over all init * (ratio - 1) ghost channels, as the paper does, however it
    runs (fused in eval, op by op in training); ghost_channels_computed=True counts only the
    oup - init ghost channels the fused kernel computes.
    """
    ghosts = _ghost_prefixes(model)
    macs = 0

    def conv_hook(module, inputs, output):
        nonlocal macs
        kernel = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
        macs += output.numel() * kernel

    def linear_hook(module, inputs, output):
        nonlocal macs
        macs += output.numel() * module.in_features

    def ghost_hook(module, inputs, output):
        nonlocal macs
        conv, cheap = module.primary_conv[0], module.cheap_operation[0]
        pixels = output.shape[0] * output.shape[2] * output.shape[3]
        ghost = module.oup - module.init_channels if ghost_channels_computed else cheap.out_channels
        macs += pixels * conv.out_channels * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        macs += pixels * ghost * cheap.kernel_size[0] * cheap.kernel_size[1]

    handles = []
    for name, module in model.named_modules():
        if isinstance(module, GhostModule):
            handles.append(module.register_forward_hook(ghost_hook))
        elif any(name.startswith(g) for g in ghosts):
            continue  # counted by its Ghost module
        elif isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))
    parameter = next(model.parameters())
    training = model.training
    model.eval()  # no running-statistics updates from counting
    try:
        with torch.no_grad():
            model(torch.randn(input_size, device=parameter.device, dtype=parameter.dtype))
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    return sum(p.numel() for p in model.parameters()), macs
