"""G-Ghost RegNet ("GhostNets on Heterogeneous Devices via Cheap Operations"), with the
state-dict keys of Huawei's g_ghost_regnet.py.

In a G-Ghost stage the first block's output x0 is split: its first raw_planes channels go
through the stage's inner RegNetX blocks, the other channels through a cheap 1x1 conv + BN,
plus a "mix" vector (the global pool of x0 and every inner block's output -> 1x1 conv, BN,
ReLU, 1x1 conv, BN) broadcast over H, W, and a ReLU; the two parts are concatenated before
the stage's last block.

GGhostStage runs the original ops in training (Stage always does). In eval without autograd
it writes the last inner block's output and the cheap part (ghostkernels::cheap_mix) straight into the two
channel slices of one buffer (no concat copy) and pools each feature map as it goes instead
of concatenating them for the mix.

    model = g_ghost_regnetx_032()   # 10.5M parameters
"""

import torch
from torch import nn

from ..batch_norm import FoldedBatchNorm
from ..cheap_mix import cheap_mix
from ..ghost_train import uses_batch_statistics
from ..modules import PointwiseConv2d, fold_conv_bn, hooks_inside, intercepted
from ..ops import onnx_exporting, refuse_torchscript


class Bottleneck(nn.Module):
    """RegNetX block: 1x1, grouped 3x3 (stride), 1x1, each with BN, ReLU after the residual add."""

    def __init__(self, inplanes, planes, stride=1, downsample=None, group_width=1):
        super().__init__()
        width = planes
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=width // min(width, group_width), bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        return self.relu(_residual_branch(self, x) + _identity(self, x))


def _residual_branch(block, x):
    out = block.relu(block.bn1(block.conv1(x)))
    out = block.relu(block.bn2(block.conv2(out)))
    return block.bn3(block.conv3(out))


def _identity(block, x):
    return block.downsample(x) if block.downsample is not None else x


def _block_into(block, x, out):
    """A Bottleneck-structured block's output written into `out` (a channel slice of a buffer)."""
    torch.add(_residual_branch(block, x), _identity(block, x), out=out)
    return out.relu_()


class FirstChannels(nn.Module):
    """x[:, :channels]: the first inner block's 'downsample' (no parameters)."""

    def __init__(self, channels):
        super().__init__()
        self.channels = channels

    def forward(self, x):
        return x[:, : self.channels]


class Stage(nn.Module):
    """A G-Ghost stage of `blocks` RegNetX blocks (blocks >= 3): base, blocks - 2 inner blocks on
    the raw channels, the cheap part with its mix, and the end block on the concatenation.
    The original code's ops, one by one (GGhostStage is the fast one)."""

    def __init__(self, inplanes, planes, group_width, blocks, stride=2, cheap_ratio=0.5):
        super().__init__()
        if blocks < 3:
            raise ValueError(f"Stage: blocks must be >= 3, got {blocks}")
        downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        self.base = Bottleneck(inplanes, planes, stride, downsample, group_width)
        self.end = Bottleneck(planes, planes, group_width=group_width)
        inner_width = int(group_width * 0.75)
        self.raw_planes = int(planes * (1 - cheap_ratio) / inner_width) * inner_width
        self.cheap_planes = planes - self.raw_planes
        self.merge = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(planes + self.raw_planes * (blocks - 2), self.cheap_planes, 1, bias=False),
            nn.BatchNorm2d(self.cheap_planes),
            nn.ReLU(inplace=True),
            nn.Conv2d(self.cheap_planes, self.cheap_planes, 1, bias=False),
            nn.BatchNorm2d(self.cheap_planes),
        )
        self.cheap = nn.Sequential(nn.Conv2d(self.cheap_planes, self.cheap_planes, 1, bias=False),
                                   nn.BatchNorm2d(self.cheap_planes))
        self.cheap_relu = nn.ReLU(inplace=True)
        self.layers = nn.Sequential(
            Bottleneck(self.raw_planes, self.raw_planes, 1, FirstChannels(self.raw_planes), inner_width),
            *(Bottleneck(self.raw_planes, self.raw_planes, group_width=inner_width) for _ in range(blocks - 3)),
        )

    def forward(self, x):
        x0 = self.base(x)
        features = [x0]
        raw = x0[:, : self.raw_planes]
        for block in self.layers:
            raw = block(raw)
            features.append(raw)
        mix = self.merge(torch.cat(features, 1))
        cheap = self.cheap_relu(self.cheap(x0[:, self.raw_planes:]) + mix)
        return self.end(torch.cat((raw, cheap), 1))


class GGhostStage(Stage):
    """Stage with the fast inference path (eval, no autograd): the last inner block and
    ghostkernels::cheap_mix write the two channel slices of one buffer; the original ops
    otherwise."""

    __prepare_scriptable__ = refuse_torchscript

    @classmethod
    def from_parts(cls, stage):
        """A GGhostStage sharing the submodules of a structurally equal stage (the original code's
        Stage): how ghostkernels.accelerate adopts it."""
        adopted = cls.__new__(cls)
        nn.Module.__init__(adopted)
        for name in ("base", "end", "merge", "cheap", "cheap_relu", "layers"):
            setattr(adopted, name, getattr(stage, name))
        adopted.raw_planes, adopted.cheap_planes = stage.raw_planes, stage.cheap_planes
        adopted.training = stage.training  # its own flag only: train() would reset the adopted BNs'
        return adopted

    def _cheap_conv_bn(self):
        """(conv, BN or None) of the cheap branch when the fast path computes what the original
        ops do, else None. The fast path computes the merge's pool, the cheap conv, its BN and
        cheap_relu without calling them, and the last inner block from its layers (its own
        forward as the zoo's Bottleneck's, or the original code's, which accelerate()'s self-check
        compared): they must be what it assumes (a global average pool, a 1x1 conv, a BatchNorm2d
        or the empty tail of one accelerate() folded into the conv, ReLUs; not a SyncBatchNorm
        from convert_sync_batchnorm, say) and carry no hook (one registered after accelerate(),
        which leaves hooked stages as they are)."""
        last, pool = self.layers[-1], self.merge[0]
        uncalled = (last, last.relu, self.merge, pool, self.cheap, self.cheap_relu)
        if (type(last.relu) is not nn.ReLU or type(self.cheap_relu) is not nn.ReLU
                or type(pool) is not nn.AdaptiveAvgPool2d or pool.output_size not in (1, (1, 1))
                or len(self.cheap) != 2 or any(map(intercepted, uncalled)) or hooks_inside(self.cheap)):
            return None
        conv, bn = self.cheap
        if type(conv) not in (nn.Conv2d, PointwiseConv2d) or conv.kernel_size != (1, 1) or conv.groups != 1:
            return None
        if type(bn) is nn.BatchNorm2d:  # not one that normalises by batch statistics (test-time adaptation's)
            return None if uses_batch_statistics(bn) else (conv, bn)
        return (conv, None) if type(bn) is FoldedBatchNorm and bn.passes_through else None

    def forward(self, x):
        # autocast: its dtype and the folded float32 weights would meet in cheap_mix, which
        # autocast does not cast; the original ops it does
        cheap = None if self.training or torch.is_grad_enabled() else self._cheap_conv_bn()
        if cheap is None or torch.is_autocast_enabled(x.device.type):
            return super().forward(x)
        x0 = self.base(x)
        pooled = [x0.mean((2, 3))]
        raw = x0[:, : self.raw_planes]
        for block in self.layers[:-1]:
            raw = block(raw)
            pooled.append(raw.mean((2, 3)))
        # Under torch.compile and ONNX export the functional ops (out= into a slice does not
        # trace); Inductor plans the concatenation's buffer itself.
        compiling = torch.compiler.is_compiling() or onnx_exporting()
        if compiling:
            last = self.layers[-1](raw)
        else:
            joined = torch.empty_like(x0)  # x0's shape and memory format: [raw | cheap]
            last = _block_into(self.layers[-1], raw, joined[:, : self.raw_planes])
        pooled.append(last.mean((2, 3)))
        # The pool of the concatenation is the concatenation of the pools.
        mix = self.merge[1:](torch.cat(pooled, 1)[:, :, None, None]).flatten(1)
        weight, bias = fold_conv_bn(*cheap)
        if compiling:
            joined = torch.cat((last, cheap_mix(x0, weight, bias, mix, channel_offset=self.raw_planes)), 1)
        else:
            cheap_mix(x0, weight, bias, mix, channel_offset=self.raw_planes, out=joined[:, self.raw_planes:])
        return self.end(joined)


class GGhostRegNet(nn.Module):
    """G-Ghost RegNetX: stem (3x3 s2 conv to 32, BN, ReLU), four stride-2 stages (layer2 and
    layer4 G-Ghost stages when deeper than 2 blocks, layer3 always), pool, dropout 0.2, fc.
    fused=False: the stages run the original ops (the eager baseline)."""

    __prepare_scriptable__ = refuse_torchscript

    def __init__(self, depths, widths, group_width, num_classes=1000, cheap_ratio=0.5, dropout=0.2, fused=True):
        super().__init__()
        stage_class = GGhostStage if fused else Stage
        self.conv1 = nn.Conv2d(3, 32, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.relu = nn.ReLU(inplace=True)
        inplanes = 32
        for index, (depth, width) in enumerate(zip(depths, widths)):
            ghost = index == 2 or (index in (1, 3) and depth > 2)
            if ghost:
                layer = stage_class(inplanes, width, group_width, depth, 2, cheap_ratio)
            else:
                layer = self._plain_layer(inplanes, width, depth, group_width)
            setattr(self, f"layer{index + 1}", layer)
            inplanes = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(widths[-1], num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    @staticmethod
    def _plain_layer(inplanes, planes, blocks, group_width):
        downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, 2, bias=False), nn.BatchNorm2d(planes))
        layers = [Bottleneck(inplanes, planes, 2, downsample, group_width)]
        layers += [Bottleneck(planes, planes, group_width=group_width) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))


# name: (depths, widths, group width), as in the original code.
G_GHOST_REGNET_CONFIGS = {
    "002": ([1, 1, 4, 7], [24, 56, 152, 368], 8),
    "004": ([1, 2, 7, 12], [32, 64, 160, 384], 16),
    "006": ([1, 3, 5, 7], [48, 96, 240, 528], 24),
    "008": ([1, 3, 7, 5], [64, 128, 288, 672], 16),
    "016": ([2, 4, 10, 2], [72, 168, 408, 912], 24),
    "032": ([2, 6, 15, 2], [96, 192, 432, 1008], 48),
    "040": ([2, 5, 14, 2], [80, 240, 560, 1360], 40),
    "064": ([2, 4, 10, 1], [168, 392, 784, 1624], 56),
    "080": ([2, 5, 15, 1], [80, 240, 720, 1920], 120),
    "120": ([2, 5, 11, 1], [224, 448, 896, 2240], 112),
    "160": ([2, 6, 13, 1], [256, 512, 896, 2048], 128),
    "320": ([2, 7, 13, 1], [336, 672, 1344, 2520], 168),
}


def g_ghost_regnetx(name, **kwargs):
    """G-Ghost RegNetX by its RegNet name ('002' ... '320'), e.g. g_ghost_regnetx('032')."""
    if name not in G_GHOST_REGNET_CONFIGS:
        raise ValueError(f"g_ghost_regnetx: name must be one of {sorted(G_GHOST_REGNET_CONFIGS)}, got {name!r}")
    return GGhostRegNet(*G_GHOST_REGNET_CONFIGS[name], **kwargs)


def g_ghost_regnetx_016(**kwargs):
    return g_ghost_regnetx("016", **kwargs)


def g_ghost_regnetx_032(**kwargs):
    return g_ghost_regnetx("032", **kwargs)


def g_ghost_regnetx_040(**kwargs):
    return g_ghost_regnetx("040", **kwargs)
