"""GhostNet v1 (docs/architecture.md section 1), v2 and v3 (section 2) with the state-dict keys of timm and the
original Huawei code.

    model = ghostnet_100()                       # 1.0x, ImageNet head
    backbone = ghostnet(1.0, features_only=True)  # feature maps at strides 4, 8, 16, 32
    v2 = ghostnetv2_100()                        # DFC attention in ghost1 of every block past the second
    v3 = ghostnetv3_100().reparameterize()       # train multi-branch, collapse, then accelerate()

v1/v2 Ghost modules are ghostkernels.GhostModule / GhostModuleV2 (fused in eval and, with
batch-statistics BN, in training), or with fused=False the plain-PyTorch reference modules: the model as the
original code runs it. v3 modules are the training-time multi-branch ones (plain PyTorch);
reparameterize() collapses them into the folded form, which ghostkernels.accelerate() fuses.
"""

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from ..modules import GhostModule, GhostModuleV2, fold_conv_bn
from ..ops import refuse_torchscript
from ..reference import ReferenceGhostModule, ReferenceGhostModuleV2, dfc_gate, dfc_short_conv

# Per stage: (dw kernel, expansion, out channels, SE ratio, stride) of each bottleneck.
GHOSTNET_STAGES = [
    [(3, 16, 16, 0, 1)],
    [(3, 48, 24, 0, 2)],
    [(3, 72, 24, 0, 1)],
    [(5, 72, 40, 0.25, 2)],
    [(5, 120, 40, 0.25, 1)],
    [(3, 240, 80, 0, 2)],
    [(3, 200, 80, 0, 1), (3, 184, 80, 0, 1), (3, 184, 80, 0, 1), (3, 480, 112, 0.25, 1), (3, 672, 112, 0.25, 1)],
    [(5, 672, 160, 0.25, 2)],
    [(5, 960, 160, 0, 1), (5, 960, 160, 0.25, 1), (5, 960, 160, 0, 1), (5, 960, 160, 0.25, 1)],
]


def make_divisible(value, divisor=4):
    """max(divisor, int(v + divisor / 2) // divisor * divisor), plus divisor if under 0.9 v."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def hard_sigmoid(x):
    return F.relu6(x + 3.0) / 6.0


class SqueezeExcite(nn.Module):
    def __init__(self, channels, se_ratio=0.25, divisor=4):
        super().__init__()
        reduced = make_divisible(channels * se_ratio, divisor)
        self.conv_reduce = nn.Conv2d(channels, reduced, 1, bias=True)
        self.act1 = nn.ReLU(inplace=True)
        self.conv_expand = nn.Conv2d(reduced, channels, 1, bias=True)
        self.gate_fn = hard_sigmoid

    def forward(self, x):
        gate = self.conv_expand(self.act1(self.conv_reduce(x.mean((2, 3), keepdim=True))))
        return x * self.gate_fn(gate)


class ConvBnAct(nn.Module):
    def __init__(self, in_chs, out_chs, kernel_size, stride=1):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.act1 = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act1(self.bn1(self.conv(x)))


class GhostBottleneck(nn.Module):
    """ghost1 (ReLU) -> [depthwise stride conv + BN] -> [SE] -> ghost2 (no activation) + shortcut.
    ghost1_module: the class of ghost1 (GhostNetV2's attention module), ghost_module's otherwise."""

    def __init__(self, in_chs, mid_chs, out_chs, dw_kernel_size=3, stride=1, se_ratio=0.0, ghost_module=GhostModule,
                 ghost1_module=None):
        super().__init__()
        self.stride = stride
        self.ghost1 = (ghost1_module or ghost_module)(in_chs, mid_chs, relu=True)
        if stride > 1:
            self.conv_dw = nn.Conv2d(mid_chs, mid_chs, dw_kernel_size, stride, (dw_kernel_size - 1) // 2,
                                     groups=mid_chs, bias=False)
            self.bn_dw = nn.BatchNorm2d(mid_chs)
        self.se = SqueezeExcite(mid_chs, se_ratio) if se_ratio > 0 else None
        self.ghost2 = ghost_module(mid_chs, out_chs, relu=False)
        self.shortcut = _shortcut(in_chs, out_chs, dw_kernel_size, stride)

    def forward(self, x):
        out = self.ghost1(x)
        if self.stride > 1:
            out = self.bn_dw(self.conv_dw(out))
        if self.se is not None:
            out = self.se(out)
        out = self.ghost2(out)
        out += self.shortcut(x)  # in place, as the original code and timm do
        return out


def _shortcut(in_chs, out_chs, kernel, stride):
    """Empty when the block keeps shape; else depthwise k x k stride conv, BN, 1x1 conv, BN."""
    if in_chs == out_chs and stride == 1:
        return nn.Sequential()
    return nn.Sequential(
        nn.Conv2d(in_chs, in_chs, kernel, stride, (kernel - 1) // 2, groups=in_chs, bias=False),
        nn.BatchNorm2d(in_chs),
        nn.Conv2d(in_chs, out_chs, 1, bias=False),
        nn.BatchNorm2d(out_chs),
    )


# -- GhostNetV3: training-time branches and their re-parameterisation ----------------------


class ConvBn(nn.Module):
    """A conv without bias and its BN (timm's ConvBnAct without activation: keys conv, bn1)."""

    def __init__(self, in_chs, out_chs, kernel_size, stride=1, groups=1, padding=None):
        super().__init__()
        padding = kernel_size // 2 if padding is None else padding
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, groups=groups, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)

    def forward(self, x):
        return self.bn1(self.conv(x))

    def folded(self, kernel_size):
        """(weight, bias) with the BN folded in, zero-padded to kernel_size x kernel_size."""
        weight, bias = fold_conv_bn(self.conv, self.bn1)
        pad = (kernel_size - weight.shape[-1]) // 2
        return F.pad(weight, [pad] * 4), bias


def _identity_folded(bn, kernel_size):
    """A BN-only skip branch as a depthwise kernel_size x kernel_size conv: (weight, bias)."""
    weight = torch.zeros(bn.num_features, 1, kernel_size, kernel_size, dtype=bn.running_var.dtype,
                         device=bn.running_var.device)
    weight[:, 0, kernel_size // 2, kernel_size // 2] = 1
    return fold_conv_bn(SimpleNamespace(weight=weight, bias=None), bn)  # the identity conv, then the BN


def _summed_conv(template, branches):
    """A Conv2d with bias, template's geometry, holding the sum of the (weight, bias) branches."""
    conv = nn.Conv2d(template.in_channels, template.out_channels, template.kernel_size, template.stride,
                     template.padding, groups=template.groups, bias=True,
                     device=template.weight.device, dtype=template.weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(sum(w for w, _ in branches))
        conv.bias.copy_(sum(b for _, b in branches))
    return conv


class GhostModuleV3(nn.Module):
    """GhostNetV3's Ghost module (timm's keys): the primary conv is 3 conv+BN branches summed, the
    cheap op 3 depthwise conv+BN branches, a depthwise 1x1 conv+BN scale branch and (ratio 2) a
    BN-only skip, summed; mode='shortcut' adds GhostNetV2's DFC gate (short_conv).
    reparameterize() collapses the branches into primary_conv.0 / cheap_operation.0 with bias:
    the folded form that ghostkernels.accelerate() fuses."""

    __prepare_scriptable__ = refuse_torchscript

    branches = 3

    def __init__(self, in_chs, out_chs, kernel_size=1, ratio=2, dw_size=3, stride=1, relu=True, mode="original"):
        super().__init__()
        self.out_chs, self.mode = out_chs, mode
        init_chs = math.ceil(out_chs / ratio)
        new_chs = init_chs * (ratio - 1)
        self.dw_size = dw_size
        self.primary_rpr_conv = nn.ModuleList(
            ConvBn(in_chs, init_chs, kernel_size, stride) for _ in range(self.branches))
        self.primary_activation = nn.ReLU(inplace=True) if relu else nn.Identity()
        self.cheap_rpr_skip = nn.BatchNorm2d(init_chs) if new_chs == init_chs else None
        self.cheap_rpr_conv = nn.ModuleList(
            ConvBn(init_chs, new_chs, dw_size, groups=init_chs) for _ in range(self.branches))
        self.cheap_rpr_scale = ConvBn(init_chs, new_chs, 1, groups=init_chs) if dw_size > 1 else None
        self.cheap_activation = nn.ReLU(inplace=True) if relu else nn.Identity()
        self.short_conv = dfc_short_conv(in_chs, out_chs, kernel_size, stride) if mode == "shortcut" else nn.Identity()

    @property
    def reparameterized(self):
        return "primary_conv" in self._modules

    def forward(self, x):
        if self.reparameterized:
            x1 = self.primary_conv(x)
            x2 = self.cheap_operation(x1)
        else:
            x1 = self.primary_activation(sum(branch(x) for branch in self.primary_rpr_conv))
            x2 = sum(branch(x1) for branch in self.cheap_rpr_conv)
            if self.cheap_rpr_scale is not None:
                x2 = x2 + self.cheap_rpr_scale(x1)
            if self.cheap_rpr_skip is not None:
                x2 = x2 + self.cheap_rpr_skip(x1)
            x2 = self.cheap_activation(x2)
        out = torch.cat([x1, x2], dim=1)[:, : self.out_chs]
        if self.mode == "shortcut":
            out = out * dfc_gate(self.short_conv, x, out.shape[-2:])
        return out

    def reparameterize(self):
        """Collapse the branches (eval statistics) into primary_conv = (Conv2d with bias, act) and
        cheap_operation = (depthwise Conv2d with bias, act); idempotent."""
        if self.reparameterized:
            return self
        primary = [branch.folded(branch.conv.kernel_size[0]) for branch in self.primary_rpr_conv]
        cheap = [branch.folded(self.dw_size) for branch in self.cheap_rpr_conv]
        if self.cheap_rpr_scale is not None:
            cheap.append(self.cheap_rpr_scale.folded(self.dw_size))
        if self.cheap_rpr_skip is not None:
            cheap.append(_identity_folded(self.cheap_rpr_skip, self.dw_size))
        self.primary_conv = nn.Sequential(_summed_conv(self.primary_rpr_conv[0].conv, primary), self.primary_activation)
        self.cheap_operation = nn.Sequential(_summed_conv(self.cheap_rpr_conv[0].conv, cheap), self.cheap_activation)
        for name in ("primary_rpr_conv", "primary_activation", "cheap_rpr_skip", "cheap_rpr_conv", "cheap_rpr_scale",
                     "cheap_activation"):
            delattr(self, name)
        return self


class GhostBottleneckV3(nn.Module):
    """GhostNetV3's bottleneck: as GhostBottleneck, with GhostModuleV3s and, at stride 2, the
    depthwise conv as 3 conv+BN branches plus a 1x1 stride-2 conv+BN scale branch (no BN after)."""

    def __init__(self, in_chs, mid_chs, out_chs, dw_kernel_size=3, stride=1, se_ratio=0.0, mode="original"):
        super().__init__()
        self.stride, self.dw_kernel_size = stride, dw_kernel_size
        self.conv_dw, self.bn_dw = nn.Identity(), nn.Identity()  # the re-parameterised depthwise conv
        self.ghost1 = GhostModuleV3(in_chs, mid_chs, relu=True, mode=mode)
        if stride > 1:
            self.dw_rpr_conv = nn.ModuleList(
                ConvBn(mid_chs, mid_chs, dw_kernel_size, stride, mid_chs, (dw_kernel_size - 1) // 2)
                for _ in range(GhostModuleV3.branches))
            self.dw_rpr_scale = ConvBn(mid_chs, mid_chs, 1, 2, mid_chs, 0)
        self.se = SqueezeExcite(mid_chs, se_ratio) if se_ratio > 0 else None
        self.ghost2 = GhostModuleV3(mid_chs, out_chs, relu=False)
        self.shortcut = _shortcut(in_chs, out_chs, dw_kernel_size, stride)

    def forward(self, x):
        out = self.ghost1(x)
        if self.stride > 1:
            if "dw_rpr_conv" in self._modules:
                out = self.dw_rpr_scale(out) + sum(branch(out) for branch in self.dw_rpr_conv)
            else:
                out = self.bn_dw(self.conv_dw(out))
        if self.se is not None:
            out = self.se(out)
        out = self.ghost2(out)
        out += self.shortcut(x)  # in place, as the original code and timm do
        return out

    def reparameterize(self):
        """Collapse ghost1, ghost2 and the stride-2 depthwise branches; idempotent."""
        self.ghost1.reparameterize()
        self.ghost2.reparameterize()
        if "dw_rpr_conv" in self._modules:
            branches = [b.folded(self.dw_kernel_size) for b in (*self.dw_rpr_conv, self.dw_rpr_scale)]
            self.conv_dw = _summed_conv(self.dw_rpr_conv[0].conv, branches)
            del self.dw_rpr_conv, self.dw_rpr_scale
        return self


class GhostNet(nn.Module):
    """GhostNet v1/v2/v3 at a width multiplier; `features_only` returns the maps at strides 4,
    8, 16, 32. version 'v2' and 'v3' give ghost1 of every block past the second the DFC gate."""

    __prepare_scriptable__ = refuse_torchscript

    # Stage index (in `blocks`) whose output is the feature map at strides 4, 8, 16, 32.
    FEATURE_STAGES = (2, 4, 6, 8)

    def __init__(self, width=1.0, num_classes=1000, dropout=0.2, in_chans=3, features_only=False, fused=True,
                 version="v1"):
        super().__init__()
        if version not in ("v1", "v2", "v3"):
            raise ValueError(f"GhostNet: version must be 'v1', 'v2' or 'v3', got {version!r}")
        ghost_module, attention_module = (GhostModule, GhostModuleV2) if fused else \
            (ReferenceGhostModule, ReferenceGhostModuleV2)
        self.version = version
        self.dropout = dropout
        self.features_only = features_only
        stem = make_divisible(16 * width)
        self.conv_stem = nn.Conv2d(in_chans, stem, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.act1 = nn.ReLU(inplace=True)
        stages, channels, layer_index = [], stem, 0
        self.feature_channels = []
        for stage in GHOSTNET_STAGES:
            layers = []
            for kernel, expansion, out, se_ratio, stride in stage:
                out_chs, mid_chs = make_divisible(out * width), make_divisible(expansion * width)
                attention = version != "v1" and layer_index > 1
                if version == "v3":
                    block = GhostBottleneckV3(channels, mid_chs, out_chs, kernel, stride, se_ratio,
                                              "shortcut" if attention else "original")
                else:
                    block = GhostBottleneck(channels, mid_chs, out_chs, kernel, stride, se_ratio, ghost_module,
                                            attention_module if attention else None)
                layers.append(block)
                channels = out_chs
                layer_index += 1
            stages.append(nn.Sequential(*layers))
            self.feature_channels.append(channels)
        self.feature_channels = [self.feature_channels[i] for i in self.FEATURE_STAGES]
        self.num_features = make_divisible(GHOSTNET_STAGES[-1][-1][1] * width)
        stages.append(nn.Sequential(ConvBnAct(channels, self.num_features, 1)))
        self.blocks = nn.Sequential(*stages)
        if features_only:
            return
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.conv_head = nn.Conv2d(self.num_features, 1280, 1, bias=True)
        self.act2 = nn.ReLU(inplace=True)
        self.reset_classifier(num_classes)

    def reset_classifier(self, num_classes):
        """A new classifier for `num_classes` classes (fine-tuning); 0: none, the model returns
        the 1280 features before it (timm's convention, as for its ghostnet_*)."""
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"GhostNet: num_classes must be an int >= 0, got {num_classes!r}")
        self.num_classes = num_classes
        self.classifier = nn.Linear(1280, num_classes) if num_classes else nn.Identity()

    def reparameterize(self):
        """GhostNetV3: collapse every multi-branch module into its folded, deployable form (uses
        the BN running statistics: call it on a trained model). Returns the model."""
        for module in self.modules():
            if isinstance(module, GhostBottleneckV3):
                module.reparameterize()
        return self

    def forward_features(self, x):
        return self.blocks(self.act1(self.bn1(self.conv_stem(x))))

    def forward(self, x):
        if self.features_only:
            features = []
            x = self.act1(self.bn1(self.conv_stem(x)))
            for index, stage in enumerate(self.blocks[: self.FEATURE_STAGES[-1] + 1]):
                x = stage(x)
                if index in self.FEATURE_STAGES:
                    features.append(x)
            return features
        return self.forward_head(self.forward_features(x))

    def forward_head(self, x, pre_logits=False):
        """The head on forward_features' maps: pool, conv_head, ReLU, dropout, classifier
        (pre_logits=True: the 1280 features before the classifier)."""
        x = torch.flatten(self.act2(self.conv_head(self.global_pool(x))), 1)
        if self.dropout > 0:
            x = F.dropout(x, self.dropout, self.training)
        return x if pre_logits else self.classifier(x)


def ghostnet(width=1.0, num_classes=1000, dropout=0.2, **kwargs):
    return GhostNet(width, num_classes, dropout, **kwargs)


def ghostnet_050(**kwargs):
    return ghostnet(0.5, **kwargs)


def ghostnet_100(**kwargs):
    return ghostnet(1.0, **kwargs)


def ghostnet_130(**kwargs):
    return ghostnet(1.3, **kwargs)


def ghostnetv2(width=1.0, num_classes=1000, dropout=0.2, **kwargs):
    return GhostNet(width, num_classes, dropout, version="v2", **kwargs)


def ghostnetv2_100(**kwargs):
    return ghostnetv2(1.0, **kwargs)


def ghostnetv2_130(**kwargs):
    return ghostnetv2(1.3, **kwargs)


def ghostnetv2_160(**kwargs):
    return ghostnetv2(1.6, **kwargs)


def ghostnetv3(width=1.0, num_classes=1000, dropout=0.2, **kwargs):
    return GhostNet(width, num_classes, dropout, version="v3", **kwargs)


def ghostnetv3_050(**kwargs):
    return ghostnetv3(0.5, **kwargs)


def ghostnetv3_100(**kwargs):
    return ghostnetv3(1.0, **kwargs)


def ghostnetv3_130(**kwargs):
    return ghostnetv3(1.3, **kwargs)


def ghostnetv3_160(**kwargs):
    return ghostnetv3(1.6, **kwargs)
