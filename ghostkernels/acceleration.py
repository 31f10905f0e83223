"""ghostkernels.accelerate(model): swap the Ghost modules of any model for fused ones.

Ghost modules are recognised by structure, not by class: a `primary_conv` and a depthwise
`cheap_operation`, each a Sequential of Conv2d, an optional BatchNorm2d and an optional
ReLU (or Identity / empty Sequential), and an `oup` or `out_chs` attribute. That covers the
original Huawei GhostModule, timm's (with `relu` or `act_layer`), GhostModuleV2 in both modes
(in 'attn' mode the DFC gate's sigmoid, upsampling and product are fused into the Ghost op's
writes), GhostNetV3 modules after re-parameterisation (conv with bias, no BN) in both modes,
and G-GhostNet stages (base, layers, merge, cheap, end). The swap shares the parameters,
keeps the state-dict keys and leaves training behaviour as it was. In eval mode the remaining
Conv+BN pairs that run one after the other (stem, `conv_dw`/`bn_dw`, shortcuts, ConvBnAct,
the convs of post-activation Bottleneck/BasicBlock blocks) are folded too, the depthwise
convs and the stem among them run on ghostkernels' direct conv kernel, a bottleneck's ghost1
and the stride-2 depthwise conv after it run as one op, so do a bottleneck's SE and ghost2,
and the 1x1 convs (shortcuts, SE, heads) run as matrix multiplies on the CPU.
"""

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from .direct_conv import DirectConv2d
from .ghost_depthwise import GhostDepthwise
from .models.g_ghost_regnet import GGhostStage
from .modules import GhostModule, GhostModuleV2, PointwiseConv2d, conv_bn_sequence, fold_conv_bn, is_same_square_conv
from .squeeze_excite import SqueezeExciteGhost


@dataclass
class AccelerationSummary:
    """What accelerate() did: fused Ghost modules, folded Conv+BN pairs, what it left alone."""

    fused: list = field(default_factory=list)
    folded: list = field(default_factory=list)
    matmul: list = field(default_factory=list)  # 1x1 convs run as matrix multiplies
    merged: list = field(default_factory=list)  # ghost1 + folded conv_dw, se + ghost2: one op each
    skipped: list = field(default_factory=list)  # (module name, reason)

    def __str__(self):
        lines = [f"ghostkernels.accelerate: {len(self.fused)} Ghost modules fused, "
                 f"{len(self.folded)} Conv+BN pairs folded, {len(self.matmul)} 1x1 convs as matmuls, "
                 f"{len(self.merged)} depthwise convs / SE blocks merged into Ghost ops, "
                 f"{len(self.skipped)} left as they were"]
        lines += [f"  fused   {name}" for name in self.fused]
        lines += [f"  folded  {name}" for name in self.folded]
        lines += [f"  matmul  {name}" for name in self.matmul]
        lines += [f"  merged  {name}" for name in self.merged]
        lines += [f"  skipped {name}: {reason}" for name, reason in self.skipped]
        return "\n".join(lines)


def _activation(module):
    """'relu', 'none', or None for an activation the fused op does not have."""
    if isinstance(module, nn.ReLU):
        return "relu"
    if isinstance(module, nn.Identity) or (isinstance(module, nn.Sequential) and len(module) == 0):
        return "none"
    return None


def _branch(sequential):
    """The activation of a Conv2d [BatchNorm2d] [activation] Sequential, or why it is not one."""
    if not isinstance(sequential, nn.Sequential) or not len(sequential) or not isinstance(sequential[0], nn.Conv2d):
        return None, "not a Sequential starting with a Conv2d"
    rest = list(sequential)[1:]
    if rest and isinstance(rest[0], nn.BatchNorm2d):
        if rest[0].running_mean is None:
            return None, "BatchNorm without running statistics"
        rest = rest[1:]
    if len(rest) > 1:
        return None, "more than Conv2d, BatchNorm2d and an activation"
    activation = _activation(rest[0]) if rest else "none"
    if activation is None:
        return None, f"activation {type(rest[0]).__name__} is not fused (relu or none)"
    return activation, None


def ghost_module_activation(module):
    """The shared activation if `module` is a Ghost module the fused op can run, else (None, why)."""
    primary, cheap = getattr(module, "primary_conv", None), getattr(module, "cheap_operation", None)
    if primary is None or cheap is None:
        return None, "no primary_conv / cheap_operation"
    if getattr(module, "oup", None) is None and getattr(module, "out_chs", None) is None:
        return None, "no oup / out_chs"
    act1, why = _branch(primary)
    if act1 is None:
        return None, f"primary_conv: {why}"
    act2, why = _branch(cheap)
    if act2 is None:
        return None, f"cheap_operation: {why}"
    if act1 != act2:
        return None, "the two branches have different activations"
    conv, dw = primary[0], cheap[0]
    if not (is_same_square_conv(conv) and is_same_square_conv(dw) and conv.groups == 1):
        return None, "convs are not square, odd, 'same'-padded and undilated"
    if dw.groups != conv.out_channels or dw.in_channels != conv.out_channels or dw.stride != (1, 1) \
            or dw.out_channels % conv.out_channels:
        return None, "cheap_operation is not a depthwise conv of the primary output"
    return act1, None


def attention_gate(module):
    """The DFC attention of GhostModuleV2 ('attn') / GhostModuleV3 ('shortcut'): (short_conv or
    None, why not fusable). An absent or empty short_conv means no gate."""
    short_conv = getattr(module, "short_conv", None)
    if getattr(module, "mode", None) in ("original", "ori") or short_conv is None \
            or (isinstance(short_conv, (nn.Sequential, nn.Identity)) and len(short_conv._modules) == 0):
        return None, None
    if not isinstance(short_conv, nn.Sequential):
        return None, f"short_conv: a {type(short_conv).__name__}, not a Sequential"
    # Huawei's GhostNetV3 module has knobs for other gates (sigmoid(res / scale), other modes).
    if getattr(module, "scale", 1.0) != 1.0 or getattr(module, "inter_mode", "nearest") != "nearest":
        return None, "short_conv: a gate other than sigmoid, nearest-upsampled"
    pairs = conv_bn_sequence(short_conv)
    if pairs is None:
        return None, "short_conv: not a sequence of Conv2d [BatchNorm2d]"
    if any(bn is not None and bn.running_mean is None for _, bn in pairs):
        return None, "short_conv: BatchNorm without running statistics"
    return short_conv, None


def _swap_ghost(module, activation, short_conv):
    oup = getattr(module, "oup", None) or getattr(module, "out_chs")
    cls = GhostModule if short_conv is None else GhostModuleV2
    fused = cls.from_parts(module.primary_conv, module.cheap_operation, oup, activation)
    if short_conv is not None:
        fused.short_conv = short_conv
    fused.train(module.training)
    return fused


# Attribute pairs (conv, bn) that run one after the other in GhostNet-family code.
_CONV_BN_ATTRIBUTES = [("conv_stem", "bn1"), ("conv_dw", "bn_dw"), ("conv", "bn1"), ("conv", "bn")]
# ...and in post-activation residual blocks (RegNet / ResNet Bottleneck and BasicBlock). Only
# there: a pre-activation block applies bn1 before conv1.
_BLOCK_CONV_BN_ATTRIBUTES = [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")]


def _conv_bn_attributes(owner):
    name = type(owner).__name__
    if name.endswith(("Bottleneck", "BasicBlock")) and not name.startswith("PreAct"):
        return _CONV_BN_ATTRIBUTES + _BLOCK_CONV_BN_ATTRIBUTES
    if hasattr(owner, "layer1"):  # a ResNet / RegNet / G-Ghost RegNet: its stem is conv1 -> bn1
        return _CONV_BN_ATTRIBUTES + _BLOCK_CONV_BN_ATTRIBUTES[:1]
    return _CONV_BN_ATTRIBUTES


def _fold_pair(owner, conv_name, bn_name, conv, bn):
    """Replace conv by a conv with bias that includes bn (a DirectConv2d where that kernel applies),
    and bn by Identity."""
    with torch.no_grad():
        weight, bias = (t.detach().clone() for t in fold_conv_bn(conv, bn))
    if DirectConv2d.eligible(conv):
        folded = DirectConv2d(weight, bias, conv.stride[0])
    else:
        folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                           conv.dilation, conv.groups, True, conv.padding_mode,
                           device=conv.weight.device, dtype=conv.weight.dtype)
        folded.weight, folded.bias = nn.Parameter(weight), nn.Parameter(bias)
    setattr(owner, conv_name, folded)
    setattr(owner, bn_name, nn.Identity())


def _foldable(conv, bn):
    return (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.running_mean is not None
            and bn.num_features == conv.out_channels)


def _owners_outside_ghost_modules(model):
    """(name prefix, module) of every module of `model` that is neither a GhostModule nor inside
    one: a Ghost module folds its own BNs and its fused op runs its convs."""
    ghosts = [f"{name}." for name, m in model.named_modules() if isinstance(m, GhostModule)]
    for name, owner in list(model.named_modules()):
        prefix = f"{name}." if name else ""
        if not isinstance(owner, GhostModule) and not any(prefix.startswith(g) for g in ghosts):
            yield prefix, owner


def _fold_conv_bn_pairs(model, summary):
    for prefix, owner in _owners_outside_ghost_modules(model):
        if isinstance(owner, nn.Sequential):
            children = list(owner._modules.items())
            for (conv_name, conv), (bn_name, bn) in zip(children, children[1:]):
                if _foldable(conv, bn):
                    _fold_pair(owner, conv_name, bn_name, conv, bn)
                    summary.folded.append(f"{prefix}{conv_name}+{bn_name}")
            continue
        for conv_name, bn_name in _conv_bn_attributes(owner):
            conv, bn = getattr(owner, conv_name, None), getattr(owner, bn_name, None)
            if _foldable(conv, bn):
                _fold_pair(owner, conv_name, bn_name, conv, bn)
                summary.folded.append(f"{prefix}{conv_name}+{bn_name}")
            elif conv_name == "conv_dw" and DirectConv2d.eligible(conv) and isinstance(bn, nn.Identity):
                setattr(owner, conv_name, DirectConv2d.from_conv(conv))  # GhostNetV3's re-parameterised conv_dw
                summary.folded.append(f"{prefix}{conv_name} (direct conv kernel)")


def _merge_ghost_depthwise(model, summary):
    """A bottleneck's ghost1 and the folded conv_dw it feeds (GhostNet's stride-2 blocks, in the
    original code, timm and the zoo: ghost1 -> conv_dw -> bn_dw) become one GhostDepthwise op
    in ghost1's place; conv_dw becomes Identity."""
    for prefix, owner in _owners_outside_ghost_modules(model):
        ghost, conv_dw = getattr(owner, "ghost1", None), getattr(owner, "conv_dw", None)
        if isinstance(getattr(owner, "bn_dw", None), nn.Identity) and GhostDepthwise.eligible(ghost, conv_dw):
            owner.ghost1, owner.conv_dw = GhostDepthwise(ghost, conv_dw), nn.Identity()
            summary.merged.append(f"{prefix}ghost1+conv_dw")


def _merge_squeeze_excite(model, summary):
    """A bottleneck's SE and the ghost2 it feeds become one SqueezeExciteGhost in ghost2's place
    (the SE product folded into ghost2's weights); se becomes Identity."""
    for prefix, owner in _owners_outside_ghost_modules(model):
        se, ghost = getattr(owner, "se", None), getattr(owner, "ghost2", None)
        if se is not None and SqueezeExciteGhost.eligible(se, ghost):
            owner.ghost2, owner.se = SqueezeExciteGhost(se, ghost), nn.Identity()
            summary.merged.append(f"{prefix}se+ghost2")


def _pointwise_convs_as_matmuls(model, summary):
    for prefix, owner in _owners_outside_ghost_modules(model):
        for child_name, conv in list(owner._modules.items()):
            if PointwiseConv2d.eligible(conv):
                setattr(owner, child_name, PointwiseConv2d.from_conv(conv))
                summary.matmul.append(f"{prefix}{child_name}")


def _replace(model, name, module):
    """model with its submodule `name` replaced by `module` ('' replaces the model itself)."""
    if not name:
        return module
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)
    return model


def _is_g_ghost_stage(module):
    """G-GhostNet's stage by structure: base, end, merge, cheap, layers and the raw/cheap split."""
    names = ("base", "end", "merge", "cheap", "cheap_relu", "layers")
    return (all(isinstance(getattr(module, n, None), nn.Module) for n in names)
            and isinstance(getattr(module, "raw_planes", None), int) and isinstance(module.cheap, nn.Sequential)
            and isinstance(module.cheap[0], nn.Conv2d) and module.cheap[0].kernel_size == (1, 1)
            and module.cheap[0].groups == 1 and len(module.layers) > 0)


def accelerate(model, inplace=False):
    """Swap every Ghost module of `model` for a fused one; in eval mode also fold Conv+BN pairs
    merge ghost1 with the depthwise conv it feeds and SE with the ghost2 it feeds, and run the
    1x1 convs as matrix multiplies.

    Returns the model (a deep copy unless inplace=True) with the summary of what was done in
    its `acceleration_summary` attribute. Outputs match the original model (float32
    tolerance); training-mode models stay trainable with the original gradients (BN folding
    happens only in eval mode, where it changes the state-dict keys of the folded BNs).
    """
    if not inplace:
        model = copy.deepcopy(model)
    summary = AccelerationSummary()
    for name, module in list(model.named_modules()):
        if isinstance(module, (GhostModule, GGhostStage)):  # ours already: fused in eval
            summary.fused.append(name or "(the model itself)")
            continue
        if _is_g_ghost_stage(module):
            model = _replace(model, name, GGhostStage.from_parts(module))
            summary.fused.append(name or "(the model itself)")
            continue
        if not hasattr(module, "primary_conv"):
            continue
        activation, why = ghost_module_activation(module)
        short_conv, gate_why = attention_gate(module)
        if activation is None or gate_why:
            summary.skipped.append((name, why or gate_why))
            continue
        model = _replace(model, name, _swap_ghost(module, activation, short_conv))
        summary.fused.append(name or "(the model itself)")
    if not model.training:
        _fold_conv_bn_pairs(model, summary)
        _merge_ghost_depthwise(model, summary)
        _merge_squeeze_excite(model, summary)
        _pointwise_convs_as_matmuls(model, summary)
    model.acceleration_summary = summary
    return model
