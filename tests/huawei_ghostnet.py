"""Test-local stand-in for Huawei's original GhostNet V1/V2/V3 PyTorch code.

Written anew (not copied) after reading, on 2026-11-30, huawei-noah/Efficient-AI-Backbones at its stored
snapshot HEAD f90e129b645c3b1684fe07cd361cd557d0ad71f7 (2025-03-15):
  ghostnet_pytorch/ghostnet.py                  (last changed 991ef1fe, 2020-12-16)  -> V1
  ghostnetv2_pytorch/model/ghostnetv2_torch.py  (last changed 860e89a0, 2022-12-23)  -> V2
  ghostnetv3_pytorch/ghostnetv3.py              (last changed 8c36fa3d, 2024-04-30)  -> V3

Same class names, attribute names, module registration order (hence state-dict keys) and forward
semantics. V3's classes are named GhostModule / GhostBottleneck / GhostNet in Huawei's file, like V1's, so
they live in the namespace `V3` here (type(m).__name__ is still 'GhostModule' etc.).

V3 is built directly in the form `GhostNet.reparameterize()` leaves it: each GhostModule has
`primary_conv = Sequential(Conv2d(bias=True), ReLU or empty Sequential)` and likewise `cheap_operation`
(registered after the kept `primary_activation`/`cheap_activation`, as reparameterize appends them),
`infer_mode=True`; a stride-2 GhostBottleneck gets `conv_dw = Conv2d(bias=True)`, `bn_dw = Identity`
registered last, `infer_mode=True`; stride-1 bottlenecks are left as they are (no conv_dw at all).
Huawei's reparameterize detach_()es parameters (requires_grad=False) like timm's; `huawei_ghostnet('v3')`
copies those flags. Not modelled: the training-time multi-branch form, and `primary_rpr_skip` (it exists
only where inp == init_channels, which no module of the width-1.0 net has; Huawei's fusion of it would
use the cheap op's 3x3 identity kernel).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


def _make_divisible(v, divisor, min_value=None):
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def hard_sigmoid(x, inplace: bool = False):
    """A plain function (not a module): relu6(x + 3) / 6."""
    if inplace:
        return x.add_(3.).clamp_(0., 6.).div_(6.)
    return F.relu6(x + 3.) / 6.


class SqueezeExcite(nn.Module):
    """avg_pool -> conv_reduce -> act1 (ReLU) -> conv_expand -> x * gate_fn (the hard_sigmoid function)."""

    def __init__(self, in_chs, se_ratio=0.25, reduced_base_chs=None, act_layer=nn.ReLU, gate_fn=hard_sigmoid,
                 divisor=4, **_):
        super().__init__()
        self.gate_fn = gate_fn
        reduced_chs = _make_divisible((reduced_base_chs or in_chs) * se_ratio, divisor)
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.conv_reduce = nn.Conv2d(in_chs, reduced_chs, 1, bias=True)
        self.act1 = act_layer(inplace=True)
        self.conv_expand = nn.Conv2d(reduced_chs, in_chs, 1, bias=True)

    def forward(self, x):
        x_se = self.conv_expand(self.act1(self.conv_reduce(self.avg_pool(x))))
        return x * self.gate_fn(x_se)


class ConvBnAct(nn.Module):
    """conv -> bn1 (a plain nn.BatchNorm2d) -> act1 (a separate ReLU)."""

    def __init__(self, in_chs, out_chs, kernel_size, stride=1, act_layer=nn.ReLU):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.act1 = act_layer(inplace=True)

    def forward(self, x):
        return self.act1(self.bn1(self.conv(x)))


def _primary_cheap(inp, oup, kernel_size, ratio, dw_size, stride, relu, bias=False, bn=True):
    init_channels = math.ceil(oup / ratio)
    new_channels = init_channels * (ratio - 1)
    act = (lambda: nn.ReLU(inplace=True)) if relu else nn.Sequential  # no activation: an empty Sequential
    primary = [nn.Conv2d(inp, init_channels, kernel_size, stride, kernel_size // 2, bias=bias)]
    cheap = [nn.Conv2d(init_channels, new_channels, dw_size, 1, dw_size // 2, groups=init_channels, bias=bias)]
    if bn:
        primary.append(nn.BatchNorm2d(init_channels))
        cheap.append(nn.BatchNorm2d(new_channels))
    return nn.Sequential(*primary, act()), nn.Sequential(*cheap, act())


def _dfc_short_conv(inp, oup, kernel_size, stride):
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel_size, stride, kernel_size // 2, bias=False), nn.BatchNorm2d(oup),
        nn.Conv2d(oup, oup, kernel_size=(1, 5), stride=1, padding=(0, 2), groups=oup, bias=False),
        nn.BatchNorm2d(oup),
        nn.Conv2d(oup, oup, kernel_size=(5, 1), stride=1, padding=(2, 0), groups=oup, bias=False),
        nn.BatchNorm2d(oup))


def _shortcut(in_chs, out_chs, dw_kernel_size, stride):
    if in_chs == out_chs and stride == 1:
        return nn.Sequential()
    return nn.Sequential(
        nn.Conv2d(in_chs, in_chs, dw_kernel_size, stride=stride, padding=(dw_kernel_size - 1) // 2,
                  groups=in_chs, bias=False), nn.BatchNorm2d(in_chs),
        nn.Conv2d(in_chs, out_chs, 1, stride=1, padding=0, bias=False), nn.BatchNorm2d(out_chs))


# ---------------------------------------------------------------------------------------------- V1

class GhostModule(nn.Module):
    def __init__(self, inp, oup, kernel_size=1, ratio=2, dw_size=3, stride=1, relu=True):
        super().__init__()
        self.oup = oup
        self.primary_conv, self.cheap_operation = _primary_cheap(inp, oup, kernel_size, ratio, dw_size, stride,
                                                                 relu)

    def forward(self, x):
        x1 = self.primary_conv(x)
        x2 = self.cheap_operation(x1)
        return torch.cat([x1, x2], dim=1)[:, :self.oup]


class GhostBottleneck(nn.Module):
    """ghost1 -> [conv_dw -> bn_dw if stride 2] -> [se] -> ghost2 -> += shortcut(x)."""

    def __init__(self, in_chs, mid_chs, out_chs, dw_kernel_size=3, stride=1, act_layer=nn.ReLU, se_ratio=0.):
        super().__init__()
        has_se = se_ratio is not None and se_ratio > 0.
        self.stride = stride
        self.ghost1 = GhostModule(in_chs, mid_chs, relu=True)
        if stride > 1:  # no attribute at all for stride 1
            self.conv_dw = nn.Conv2d(mid_chs, mid_chs, dw_kernel_size, stride=stride,
                                     padding=(dw_kernel_size - 1) // 2, groups=mid_chs, bias=False)
            self.bn_dw = nn.BatchNorm2d(mid_chs)
        self.se = SqueezeExcite(mid_chs, se_ratio=se_ratio) if has_se else None
        self.ghost2 = GhostModule(mid_chs, out_chs, relu=False)
        self.shortcut = _shortcut(in_chs, out_chs, dw_kernel_size, stride)

    def forward(self, x):
        residual = x
        x = self.ghost1(x)
        if self.stride > 1:
            x = self.bn_dw(self.conv_dw(x))
        if self.se is not None:
            x = self.se(x)
        x = self.ghost2(x)
        x += self.shortcut(residual)
        return x


def _stem_and_stages(net, cfgs, width, make_block):
    output_channel = _make_divisible(16 * width, 4)
    net.conv_stem = nn.Conv2d(3, output_channel, 3, 2, 1, bias=False)
    net.bn1 = nn.BatchNorm2d(output_channel)
    net.act1 = nn.ReLU(inplace=True)
    input_channel = output_channel
    stages, layer_id = [], 0
    for cfg in cfgs:
        layers = []
        for k, exp_size, c, se_ratio, s in cfg:
            output_channel = _make_divisible(c * width, 4)
            hidden_channel = _make_divisible(exp_size * width, 4)
            layers.append(make_block(input_channel, hidden_channel, output_channel, k, s, se_ratio, layer_id))
            input_channel = output_channel
            layer_id += 1
        stages.append(nn.Sequential(*layers))
    output_channel = _make_divisible(exp_size * width, 4)
    stages.append(nn.Sequential(ConvBnAct(input_channel, output_channel, 1)))
    net.blocks = nn.Sequential(*stages)
    net.global_pool = nn.AdaptiveAvgPool2d((1, 1))
    net.conv_head = nn.Conv2d(output_channel, 1280, 1, 1, 0, bias=True)
    net.act2 = nn.ReLU(inplace=True)


class GhostNet(nn.Module):
    def __init__(self, cfgs, num_classes=1000, width=1.0, dropout=0.2):
        super().__init__()
        self.cfgs = cfgs
        self.dropout = dropout
        _stem_and_stages(self, cfgs, width, lambda i, m, o, k, s, se, _: GhostBottleneck(i, m, o, k, s, se_ratio=se))
        self.classifier = nn.Linear(1280, num_classes)

    def forward(self, x):
        x = self.blocks(self.act1(self.bn1(self.conv_stem(x))))
        x = self.act2(self.conv_head(self.global_pool(x)))
        x = x.view(x.size(0), -1)
        if self.dropout > 0.:
            x = F.dropout(x, p=self.dropout, training=self.training)
        return self.classifier(x)


# ---------------------------------------------------------------------------------------------- V2

class GhostModuleV2(nn.Module):
    """mode 'original': a GhostModule; mode 'attn': times the sigmoid DFC gate (short_conv registered last)."""

    def __init__(self, inp, oup, kernel_size=1, ratio=2, dw_size=3, stride=1, relu=True, mode=None, args=None):
        super().__init__()
        self.mode = mode
        self.gate_fn = nn.Sigmoid()
        self.oup = oup
        self.primary_conv, self.cheap_operation = _primary_cheap(inp, oup, kernel_size, ratio, dw_size, stride,
                                                                 relu)
        if mode == 'attn':
            self.short_conv = _dfc_short_conv(inp, oup, kernel_size, stride)

    def forward(self, x):
        if self.mode == 'attn':
            res = self.short_conv(F.avg_pool2d(x, kernel_size=2, stride=2))
        x1 = self.primary_conv(x)
        x2 = self.cheap_operation(x1)
        out = torch.cat([x1, x2], dim=1)[:, :self.oup]
        if self.mode == 'attn':
            out = out * F.interpolate(self.gate_fn(res), size=(out.shape[-2], out.shape[-1]), mode='nearest')
        return out


class GhostBottleneckV2(nn.Module):
    def __init__(self, in_chs, mid_chs, out_chs, dw_kernel_size=3, stride=1, act_layer=nn.ReLU, se_ratio=0.,
                 layer_id=None, args=None):
        super().__init__()
        has_se = se_ratio is not None and se_ratio > 0.
        self.stride = stride
        self.ghost1 = GhostModuleV2(in_chs, mid_chs, relu=True, mode='original' if layer_id <= 1 else 'attn')
        if stride > 1:
            self.conv_dw = nn.Conv2d(mid_chs, mid_chs, dw_kernel_size, stride=stride,
                                     padding=(dw_kernel_size - 1) // 2, groups=mid_chs, bias=False)
            self.bn_dw = nn.BatchNorm2d(mid_chs)
        self.se = SqueezeExcite(mid_chs, se_ratio=se_ratio) if has_se else None
        self.ghost2 = GhostModuleV2(mid_chs, out_chs, relu=False, mode='original')
        self.shortcut = _shortcut(in_chs, out_chs, dw_kernel_size, stride)

    forward = GhostBottleneck.forward


class GhostNetV2(nn.Module):
    def __init__(self, cfgs, num_classes=1000, width=1.0, dropout=0.2, block=GhostBottleneckV2, args=None):
        super().__init__()
        self.cfgs = cfgs
        self.dropout = dropout
        _stem_and_stages(self, cfgs, width,
                         lambda i, m, o, k, s, se, lid: block(i, m, o, k, s, se_ratio=se, layer_id=lid, args=args))
        self.classifier = nn.Linear(1280, num_classes)

    forward = GhostNet.forward


# ---------------------------------------------------------------------------------------------- V3

class V3:
    """Huawei's ghostnetv3.py classes, in the form GhostNet.reparameterize() leaves them."""

    class GhostModule(nn.Module):
        """mode 'ori' (returns cat(x1, x2), no slice) or 'ori_shortcut_mul_conv15' (DFC gate, short_conv
        registered first)."""

        def __init__(self, inp, oup, kernel_size=1, ratio=2, dw_size=3, stride=1, relu=True, mode=None, args=None):
            super().__init__()
            self.mode = mode
            self.gate_loc = 'before'
            self.inter_mode = 'nearest'
            self.scale = 1.0
            self.infer_mode = True
            self.num_conv_branches = 3
            self.dconv_scale = True
            self.gate_fn = nn.Sigmoid()
            self.oup = oup
            init_channels = math.ceil(oup / ratio)
            if mode == 'ori_shortcut_mul_conv15':
                self.short_conv = _dfc_short_conv(inp, oup, kernel_size, stride)
            primary_conv, cheap_operation = _primary_cheap(inp, oup, kernel_size, ratio, dw_size, stride, relu,
                                                           bias=True, bn=False)
            # the kept activations (None without relu), then the fused convs appended by reparameterize()
            self.primary_activation = primary_conv[1] if relu else None
            self.cheap_activation = cheap_operation[1] if relu else None
            self.in_channels = init_channels
            self.groups = init_channels
            self.kernel_size = dw_size
            self.primary_conv = primary_conv
            self.cheap_operation = cheap_operation

        def forward(self, x):
            if self.mode == 'ori_shortcut_mul_conv15':
                res = self.short_conv(F.avg_pool2d(x, kernel_size=2, stride=2))
            x1 = self.primary_conv(x)
            x2 = self.cheap_operation(x1)
            out = torch.cat([x1, x2], dim=1)
            if self.mode == 'ori':
                return out
            return out[:, :self.oup] * F.interpolate(self.gate_fn(res / self.scale), size=out.shape[-2:],
                                                      mode=self.inter_mode)

        def reparameterize(self):  # already in deploy form
            pass

    class GhostBottleneck(nn.Module):
        """ghost1 -> [conv_dw (fused, bias) -> bn_dw (Identity) if stride 2] -> [se] -> ghost2 -> += shortcut."""

        def __init__(self, in_chs, mid_chs, out_chs, dw_kernel_size=3, stride=1, act_layer=nn.ReLU, se_ratio=0.,
                     layer_id=None, args=None):
            super().__init__()
            has_se = se_ratio is not None and se_ratio > 0.
            self.stride = stride
            self.num_conv_branches = 3
            self.infer_mode = stride > 1  # reparameterize() returns early for stride 1
            self.dconv_scale = True
            self.ghost1 = V3.GhostModule(in_chs, mid_chs, relu=True,
                                         mode='ori' if layer_id <= 1 else 'ori_shortcut_mul_conv15')
            if stride > 1:
                self.kernel_size = dw_kernel_size
                self.in_channels = mid_chs
            self.se = SqueezeExcite(mid_chs, se_ratio=se_ratio) if has_se else None
            self.ghost2 = V3.GhostModule(mid_chs, out_chs, relu=False, mode='ori')
            self.shortcut = _shortcut(in_chs, out_chs, dw_kernel_size, stride)
            if stride > 1:  # appended by reparameterize()
                self.conv_dw = nn.Conv2d(mid_chs, mid_chs, dw_kernel_size, stride, (dw_kernel_size - 1) // 2,
                                         groups=mid_chs, bias=True)
                self.bn_dw = nn.Identity()

        forward = GhostBottleneck.forward

        def reparameterize(self):  # already in deploy form
            pass

    class GhostNet(nn.Module):
        def __init__(self, cfgs, num_classes=1000, width=1.0, dropout=0.2, block=None, args=None):
            super().__init__()
            block = block or V3.GhostBottleneck
            self.cfgs = cfgs
            self.dropout = dropout  # unused: the dropout in forward is commented out
            _stem_and_stages(self, cfgs, width,
                             lambda i, m, o, k, s, se, lid: block(i, m, o, k, s, se_ratio=se, layer_id=lid, args=args))
            self.classifier = nn.Linear(1280, num_classes)

        def forward(self, x):
            x = self.blocks(self.act1(self.bn1(self.conv_stem(x))))
            x = self.act2(self.conv_head(self.global_pool(x)))
            x = x.view(x.size(0), -1)
            return self.classifier(x).squeeze()

        def reparameterize(self):
            for module in self.modules():
                if isinstance(module, (V3.GhostModule, V3.GhostBottleneck)):
                    module.reparameterize()


# the same 16-bottleneck cfgs in all three files: k, t (expansion), c, SE ratio, s
CFGS = [
    [[3, 16, 16, 0, 1]],
    [[3, 48, 24, 0, 2]],
    [[3, 72, 24, 0, 1]],
    [[5, 72, 40, 0.25, 2]],
    [[5, 120, 40, 0.25, 1]],
    [[3, 240, 80, 0, 2]],
    [[3, 200, 80, 0, 1], [3, 184, 80, 0, 1], [3, 184, 80, 0, 1], [3, 480, 112, 0.25, 1], [3, 672, 112, 0.25, 1]],
    [[5, 672, 160, 0.25, 2]],
    [[5, 960, 160, 0, 1], [5, 960, 160, 0.25, 1], [5, 960, 160, 0, 1], [5, 960, 160, 0.25, 1]],
]


def huawei_ghostnet(version='v1', width=1.0, num_classes=1000, dropout=0.2):
    """ghostnet() / ghostnetv2() / ghostnetv3() (after reparameterize()) of Huawei's repository."""
    if version == 'v1':
        return GhostNet(CFGS, num_classes=num_classes, width=width, dropout=dropout)
    if version == 'v2':
        return GhostNetV2(CFGS, num_classes=num_classes, width=width, dropout=dropout)
    assert version == 'v3'
    model = V3.GhostNet(CFGS, num_classes=num_classes, width=width, dropout=dropout)
    for m in model.modules():  # requires_grad as reparameterize()'s detach_() leaves it
        if isinstance(m, V3.GhostBottleneck) and m.stride > 1 or isinstance(m, V3.GhostModule):
            m.requires_grad_(False)
    return model
