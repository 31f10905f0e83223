"""ghostify(model): a plain CNN's Ghost version, as in the paper (Ghost-VGG, Ghost-ResNet), and
count_params_flops(model, input_size) to compare the two."""

from typing import NamedTuple

import torch
from torch import nn

from .modules import GhostModule, deepcopy_module, is_int, is_same_square_conv

_KEEP_NAMES = ("stem", "downsample")
# module names under which torchvision/timm ("downsample") and CIFAR ResNets/GhostNet ("shortcut")
# put a residual block's projection branch
_SHORTCUT_MODULE_NAMES = ("downsample", "shortcut")


class ParamsFlops(NamedTuple):
    """count_params_flops' result: parameters and multiply-adds of one forward pass."""

    params: int
    macs: int


def _eligible(conv):
    """A dense, undilated, 'same'-padded square odd conv with more than one input channel."""
    return type(conv) is nn.Conv2d and is_same_square_conv(conv) and conv.groups == 1 and conv.in_channels > 1


def _keep_predicate(model, keep):
    """keep (names among _KEEP_NAMES, or a callable) as one predicate (name, conv) -> bool."""
    if callable(keep):
        return keep
    if keep is None:
        keep = ()
    try:
        names = (keep,) if isinstance(keep, str) else tuple(keep)
    except TypeError:
        raise TypeError(f"ghostify: keep must be a callable keep(name, conv) -> bool or names among {_KEEP_NAMES}, "
                        f"got {keep!r}") from None
    unknown = [name for name in names if name not in _KEEP_NAMES]
    if unknown:
        raise ValueError(f"ghostify: keep accepts the names {_KEEP_NAMES} (or a callable), got {unknown[0]!r}")
    stem = next((name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)

    def kept(name, conv):
        if "stem" in names and name == stem:
            return True
        return "downsample" in names and any(part in _SHORTCUT_MODULE_NAMES for part in name.split("."))

    return kept


def ghostify(model, ratio=2, dw_size=3, relu=False, inplace=False, keep=()):
    """Replace every eligible Conv2d by a GhostModule with the same in/out channels, kernel size
    and stride (the primary conv's); depthwise, grouped, dilated and 1-channel convs stay.

    keep chooses eligible convs that stay dense:
      "stem"        the model's first Conv2d (registration order, as model.modules() lists it);
      "downsample"  every conv inside a submodule named `downsample` or `shortcut` (a residual
                    block's projection branch, 1x1 ones included);
      a tuple of these names (() or None: none kept), or a callable keep(name, conv) -> bool,
      called with each eligible conv of the model passed in and its qualified name, that keeps
      those it returns True for.
    The paper's Ghost-VGG-16 and Ghost-ResNet-56 replace every conv (keep=()); its
    Ghost-ResNet-50 keeps the stem (keep="stem") and replaces the downsample convs.

    The Ghost modules are new layers (freshly initialised, BN inside): the result is the
    compressed architecture, to be trained. relu=False because the network's own BN/ReLU
    after each conv stay in place. Returns the model (a deep copy unless inplace=True).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"ghostify: model must be a torch.nn.Module, got {type(model).__name__}")
    if not is_int(ratio):
        raise TypeError(f"ghostify: ratio must be an integer >= 2, got {ratio!r}")
    if ratio < 2:
        raise ValueError(f"ghostify: ratio must be an integer >= 2, got {ratio}")
    if not is_int(dw_size):
        raise TypeError(f"ghostify: dw_size must be a positive odd integer, got {dw_size!r}")
    if dw_size < 1 or dw_size % 2 == 0:
        raise ValueError(f"ghostify: dw_size must be a positive odd integer, got {dw_size}")
    for flag, value in (("relu", relu), ("inplace", inplace)):
        if not isinstance(value, bool):
            raise TypeError(f"ghostify: {flag} must be True or False, got {value!r}")
    kept = _keep_predicate(model, keep)
    ghosts = _ghost_prefixes(model)  # convs already inside Ghost modules stay
    # chosen on the original model, so that a keep callable may compare modules by identity
    replaced = [name for name, conv in model.named_modules()
                if _eligible(conv) and not any(name.startswith(g) for g in ghosts) and not kept(name, conv)]
    if not inplace:
        model = deepcopy_module(model)
    for name in replaced:
        conv = model.get_submodule(name)
        ghost = GhostModule(conv.in_channels, conv.out_channels, conv.kernel_size[0], ratio, dw_size,
                            conv.stride[0], relu).to(conv.weight.device, conv.weight.dtype)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, ghost)
    return model


def _ghost_prefixes(model):
    return [f"{name}." for name, m in model.named_modules() if isinstance(m, GhostModule)]


def _check_input_size(input_size):
    expected = "a shape such as (1, 3, 224, 224): a tuple of positive integers"
    if not isinstance(input_size, (tuple, list, torch.Size)) or not all(is_int(n) for n in input_size):
        raise TypeError(f"count_params_flops: input_size must be {expected}, got {input_size!r}")
    if not input_size or any(n < 1 for n in input_size):
        raise ValueError(f"count_params_flops: input_size must be {expected}, got {input_size!r}")


def count_params_flops(model, input_size, ghost_channels_computed=False):
    """ParamsFlops(params, macs): the model's parameters and the multiply-adds of one forward
    pass of a random input of shape `input_size` (e.g. (1, 3, 224, 224)), made on the device
    and in the dtype of the model's parameters. Unpacks as a tuple: params, macs = ...

    Counts convolutions and linear layers. A GhostModule counts its primary conv and its cheap
    depthwise conv over all init * (ratio - 1) ghost channels, as the paper does, however it
    runs; ghost_channels_computed=True counts only the
    oup - init ghost channels the fused kernel computes.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"count_params_flops: model must be a torch.nn.Module, got {type(model).__name__}")
    _check_input_size(input_size)
    parameter = next(model.parameters(), None)
    if parameter is None:
        raise ValueError("count_params_flops: model has no parameters; expected a model with parameters "
                         "(their device and dtype make the input)")
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
    modes = [(module, module.training) for module in model.modules()]  # each module's: they may differ
    model.eval()  # no running-statistics updates from counting
    try:
        with torch.no_grad():
            model(torch.randn(tuple(input_size), device=parameter.device, dtype=parameter.dtype))
    finally:
        for module, training in modes:  # parents first: each module's own train() call sets it last
            module.train(training)
        for handle in handles:
            handle.remove()
    return ParamsFlops(sum(p.numel() for p in model.parameters()), macs)
