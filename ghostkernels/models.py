"""GhostNet v1 (SPEC section 2) with the state-dict keys of the original code and of timm.

    model = ghostnet_100()                       # 1.0x, ImageNet head
    backbone = ghostnet(1.0, features_only=True)  # feature maps at strides 4, 8, 16, 32

Ghost modules are ghostkernels.GhostModule (fused in eval, the original ops in training), or
with fused=False the plain-PyTorch ReferenceGhostModule: the model as the original code runs it.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .modules import GhostModule
from .reference import ReferenceGhostModule

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

    def forward(self, x):
        gate = self.conv_expand(self.act1(self.conv_reduce(x.mean((2, 3), keepdim=True))))
        return x * hard_sigmoid(gate)


class ConvBnAct(nn.Module):
    def __init__(self, in_chs, out_chs, kernel_size, stride=1):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.act1 = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act1(self.bn1(self.conv(x)))


class GhostBottleneck(nn.Module):
    """ghost1 (ReLU) -> [depthwise stride conv + BN] -> [SE] -> ghost2 (no activation) + shortcut."""

    def __init__(self, in_chs, mid_chs, out_chs, dw_kernel_size=3, stride=1, se_ratio=0.0, ghost_module=GhostModule):
        super().__init__()
        self.stride = stride
        self.ghost1 = ghost_module(in_chs, mid_chs, relu=True)
        if stride > 1:
            self.conv_dw = nn.Conv2d(mid_chs, mid_chs, dw_kernel_size, stride, (dw_kernel_size - 1) // 2,
                                     groups=mid_chs, bias=False)
            self.bn_dw = nn.BatchNorm2d(mid_chs)
        self.se = SqueezeExcite(mid_chs, se_ratio) if se_ratio > 0 else None
        self.ghost2 = ghost_module(mid_chs, out_chs, relu=False)
        if in_chs == out_chs and stride == 1:
            self.shortcut = nn.Sequential()
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_chs, in_chs, dw_kernel_size, stride, (dw_kernel_size - 1) // 2, groups=in_chs, bias=False),
                nn.BatchNorm2d(in_chs),
                nn.Conv2d(in_chs, out_chs, 1, bias=False),
                nn.BatchNorm2d(out_chs),
            )

    def forward(self, x):
        out = self.ghost1(x)
        if self.stride > 1:
            out = self.bn_dw(self.conv_dw(out))
        if self.se is not None:
            out = self.se(out)
        return self.ghost2(out) + self.shortcut(x)


class GhostNet(nn.Module):
    """GhostNet v1 at a width multiplier; `features_only` returns the maps at strides 4, 8, 16, 32."""

    # Stage index (in `blocks`) whose output is the feature map at strides 4, 8, 16, 32.
    FEATURE_STAGES = (2, 4, 6, 8)

    def __init__(self, width=1.0, num_classes=1000, dropout=0.2, in_chans=3, features_only=False, fused=True):
        super().__init__()
        ghost_module = GhostModule if fused else ReferenceGhostModule
        self.dropout = dropout
        self.features_only = features_only
        stem = make_divisible(16 * width)
        self.conv_stem = nn.Conv2d(in_chans, stem, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.act1 = nn.ReLU(inplace=True)
        stages, channels = [], stem
        self.feature_channels = []
        for stage in GHOSTNET_STAGES:
            layers = []
            for kernel, expansion, out, se_ratio, stride in stage:
                out_chs, mid_chs = make_divisible(out * width), make_divisible(expansion * width)
                layers.append(GhostBottleneck(channels, mid_chs, out_chs, kernel, stride, se_ratio, ghost_module))
                channels = out_chs
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
        self.classifier = nn.Linear(1280, num_classes)

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
        x = self.act2(self.conv_head(self.global_pool(self.forward_features(x))))
        x = torch.flatten(x, 1)
        if self.dropout > 0:
            x = F.dropout(x, self.dropout, self.training)
        return self.classifier(x)


def ghostnet(width=1.0, num_classes=1000, dropout=0.2, **kwargs):
    return GhostNet(width, num_classes, dropout, **kwargs)


def ghostnet_050(**kwargs):
    return ghostnet(0.5, **kwargs)


def ghostnet_100(**kwargs):
    return ghostnet(1.0, **kwargs)


def ghostnet_130(**kwargs):
    return ghostnet(1.3, **kwargs)
