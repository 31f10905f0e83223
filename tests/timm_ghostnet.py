"""Test-local stand-in for timm's GhostNet V1/V2/V3 (timm cannot be imported here: no torchvision).

Written anew (not copied) after reading, on 2026-11-30, huggingface/pytorch-image-models at its stored
snapshot HEAD aa4b5850c1543fa488abf260f18390eda46cf85d (2026-08-08, timm 1.0.29.dev0):
  timm/models/ghostnet.py             (last changed c0e3d24f, 2026-01-09)
  timm/models/_efficientnet_blocks.py (SqueezeExcite, ConvBnAct, num_groups; last changed 6ee68e55, 2025-10-03)
  timm/layers/norm_act.py             (BatchNormAct2d, _create_act; 6ee68e55, 2025-10-03)
  timm/layers/create_norm_act.py, create_act.py (get_norm_act_layer, 'hard_sigmoid' -> nn.Hardsigmoid; 446e8a84)
  timm/layers/helpers.py              (make_divisible; d4ab5165, 2025-12-26)
  timm/layers/padding.py, conv2d_same.py, create_conv2d.py (pad_type '' -> symmetric padding, bias=False)
  timm/layers/adaptive_avgmax_pool.py (SelectAdaptivePool2d), timm/layers/linear.py (Linear)
  timm/utils/model.py                 (reparameterize_model; 8d81fdf3, 2025-01-19)
  timm/models/_manipulate.py          (checkpoint_seq; read 2026-12-07 at 17452b8a: use_reentrant None means
                                       timm.layers.config's _USE_REENTRANT_CKPT, False unless TIMM_REENTRANT_CKPT)

Same class names, attribute names, module registration order (hence state-dict keys) and forward
semantics as timm. GhostNetV3 is built directly in the form `timm.utils.reparameterize_model` leaves it:
every GhostModuleV3 has `primary_conv = Sequential(Conv2d(bias=True), act)` and
`cheap_operation = Sequential(Conv2d(bias=True), act)` (the rpr branches deleted, `infer_mode=True`);
a stride-2 GhostBottleneckV3 has `conv_dw = Conv2d(bias=True)`, `bn_dw = Identity` (`infer_mode=True`);
a stride-1 one keeps `conv_dw = bn_dw = Identity`, `dw_rpr_conv = ModuleList()`, `dw_rpr_scale =
Identity` and `infer_mode=False`. timm's switch_to_deploy calls `p.detach_()` on the parameters of each
re-parameterised module, i.e. sets requires_grad=False; `timm_ghostnet('v3')` copies those flags.
"""
import math
from functools import partial
from itertools import chain

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn


def make_divisible(v, divisor=8, min_value=None, round_limit=.9):
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < round_limit * v else new_v


def _act(layer, **kwargs):
    """timm's create_act_layer for the cases GhostNet uses (a class, 'hard_sigmoid', or None)."""
    layer = {'hard_sigmoid': nn.Hardsigmoid, 'sigmoid': nn.Sigmoid, 'relu': nn.ReLU}.get(layer, layer)
    if layer is None:
        return None
    try:
        return layer(**kwargs)
    except TypeError:  # no `inplace` argument
        kwargs.pop('inplace', None)
        return layer(**kwargs)


class BatchNormAct2d(nn.BatchNorm2d):
    """timm.layers.BatchNormAct2d: a BatchNorm2d subclass whose forward is batch_norm -> drop -> act."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 apply_act=True, act_layer=nn.ReLU, act_kwargs=None, inplace=True, drop_layer=None):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        act_kwargs = dict(act_kwargs or {})
        act_kwargs.setdefault('inplace', inplace)
        act = _act(act_layer, **act_kwargs) if apply_act else None
        self.act = nn.Identity() if act is None else act

    def forward(self, x):
        # timm re-implements BatchNorm2d.forward (for torchscript), then applies drop, then act
        assert x.ndim == 4
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        use_buffers = not self.training or self.track_running_stats
        x = F.batch_norm(x, self.running_mean if use_buffers else None, self.running_var if use_buffers else None,
                         self.weight, self.bias, bn_training, factor, self.eps)
        x = self.drop(x)
        x = self.act(x)
        return x


class SqueezeExcite(nn.Module):
    """timm.models._efficientnet_blocks.SqueezeExcite: mean -> conv_reduce -> act1 -> conv_expand -> gate."""

    def __init__(self, in_chs, rd_ratio=0.25, rd_channels=None, act_layer=nn.ReLU, gate_layer=nn.Sigmoid,
                 force_act_layer=None, rd_round_fn=None):
        super().__init__()
        if rd_channels is None:
            rd_channels = (rd_round_fn or round)(in_chs * rd_ratio)
        self.conv_reduce = nn.Conv2d(in_chs, rd_channels, 1, bias=True)
        self.act1 = _act(force_act_layer or act_layer, inplace=True)
        self.conv_expand = nn.Conv2d(rd_channels, in_chs, 1, bias=True)
        self.gate = _act(gate_layer)  # 'hard_sigmoid' -> nn.Hardsigmoid()

    def forward(self, x):
        x_se = x.mean((2, 3), keepdim=True)
        x_se = self.conv_expand(self.act1(self.conv_reduce(x_se)))
        return x * self.gate(x_se)


class ConvBnAct(nn.Module):
    """timm.models._efficientnet_blocks.ConvBnAct: conv (no bias) -> bn1 (BatchNormAct2d: bn, drop, act) -> aa."""

    def __init__(self, in_chs, out_chs, kernel_size, stride=1, dilation=1, group_size=0, pad_type='',
                 skip=False, act_layer=nn.ReLU, drop_path_rate=0.):
        super().__init__()
        groups = 1 if not group_size else in_chs // group_size  # group_size=1 -> depthwise
        self.has_skip = skip and stride == 1 and in_chs == out_chs
        padding = ((stride - 1) + dilation * (kernel_size - 1)) // 2 if pad_type == '' else pad_type
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride=stride, dilation=dilation, groups=groups,
                              padding=padding, bias=False)
        self.bn1 = BatchNormAct2d(out_chs, inplace=True, act_layer=act_layer)
        self.aa = nn.Identity()  # no aa_layer
        self.drop_path = nn.Identity()
        assert not drop_path_rate

    def forward(self, x):
        shortcut = x
        x = self.aa(self.bn1(self.conv(x)))
        if self.has_skip:
            x = self.drop_path(x) + shortcut
        return x


_SE_LAYER = partial(SqueezeExcite, gate_layer='hard_sigmoid', rd_round_fn=partial(make_divisible, divisor=4))


class GhostModule(nn.Module):
    def __init__(self, in_chs, out_chs, kernel_size=1, ratio=2, dw_size=3, stride=1, act_layer=nn.ReLU):
        super().__init__()
        self.out_chs = out_chs
        init_chs = math.ceil(out_chs / ratio)
        new_chs = init_chs * (ratio - 1)
        self.primary_conv = nn.Sequential(
            nn.Conv2d(in_chs, init_chs, kernel_size, stride, kernel_size // 2, bias=False),
            nn.BatchNorm2d(init_chs), act_layer(inplace=True))
        self.cheap_operation = nn.Sequential(
            nn.Conv2d(init_chs, new_chs, dw_size, 1, dw_size // 2, groups=init_chs, bias=False),
            nn.BatchNorm2d(new_chs), act_layer(inplace=True))

    def forward(self, x):
        x1 = self.primary_conv(x)
        x2 = self.cheap_operation(x1)
        return torch.cat([x1, x2], dim=1)[:, :self.out_chs]


def _dfc_short_conv(in_chs, out_chs, kernel_size, stride):
    """The DFC attention branch (GhostNetV2's 'attn', GhostNetV3's 'shortcut' mode)."""
    return nn.Sequential(
        nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, bias=False), nn.BatchNorm2d(out_chs),
        nn.Conv2d(out_chs, out_chs, (1, 5), 1, (0, 2), groups=out_chs, bias=False), nn.BatchNorm2d(out_chs),
        nn.Conv2d(out_chs, out_chs, (5, 1), 1, (2, 0), groups=out_chs, bias=False), nn.BatchNorm2d(out_chs))


class GhostModuleV2(nn.Module):
    """timm's GhostModuleV2 is always the DFC-attention ('attn') variant."""

    def __init__(self, in_chs, out_chs, kernel_size=1, ratio=2, dw_size=3, stride=1, act_layer=nn.ReLU):
        super().__init__()
        self.gate_fn = nn.Sigmoid()
        self.out_chs = out_chs
        init_chs = math.ceil(out_chs / ratio)
        new_chs = init_chs * (ratio - 1)
        self.primary_conv = nn.Sequential(
            nn.Conv2d(in_chs, init_chs, kernel_size, stride, kernel_size // 2, bias=False),
            nn.BatchNorm2d(init_chs), act_layer(inplace=True))
        self.cheap_operation = nn.Sequential(
            nn.Conv2d(init_chs, new_chs, dw_size, 1, dw_size // 2, groups=init_chs, bias=False),
            nn.BatchNorm2d(new_chs), act_layer(inplace=True))
        self.short_conv = _dfc_short_conv(in_chs, out_chs, kernel_size, stride)

    def forward(self, x):
        res = self.short_conv(F.avg_pool2d(x, kernel_size=2, stride=2))
        x1 = self.primary_conv(x)
        x2 = self.cheap_operation(x1)
        out = torch.cat([x1, x2], dim=1)
        return out[:, :self.out_chs] * F.interpolate(self.gate_fn(res), size=out.shape[-2:], mode='nearest')


class GhostModuleV3(nn.Module):
    """timm's GhostModuleV3 after reparameterize(): fused primary/cheap convs with bias; the
    activation module is shared by `primary_conv[1]` and `primary_activation` (same for cheap)."""

    def __init__(self, in_chs, out_chs, kernel_size=1, ratio=2, dw_size=3, stride=1, act_layer=nn.ReLU,
                 mode='original'):
        super().__init__()
        self.gate_fn = nn.Sigmoid()
        self.out_chs = out_chs
        init_chs = math.ceil(out_chs / ratio)
        new_chs = init_chs * (ratio - 1)
        self.mode = mode
        self.num_conv_branches = 3
        self.infer_mode = True
        primary_activation = act_layer(inplace=True)
        cheap_activation = act_layer(inplace=True)
        self.primary_conv = nn.Sequential(
            nn.Conv2d(in_chs, init_chs, kernel_size, stride, kernel_size // 2, bias=True), primary_activation)
        self.cheap_operation = nn.Sequential(
            nn.Conv2d(init_chs, new_chs, dw_size, 1, dw_size // 2, groups=init_chs, bias=True), cheap_activation)
        self.primary_activation = primary_activation
        self.cheap_activation = cheap_activation
        self.short_conv = _dfc_short_conv(in_chs, out_chs, kernel_size, stride) if mode == 'shortcut' \
            else nn.Identity()
        self.in_channels = init_chs
        self.groups = init_chs
        self.kernel_size = dw_size

    def forward(self, x):
        x1 = self.primary_conv(x)
        x2 = self.cheap_operation(x1)
        out = torch.cat([x1, x2], dim=1)  # no [:out_chs] slice here, unlike GhostModule
        if self.mode != 'shortcut':
            return out
        res = self.short_conv(F.avg_pool2d(x, kernel_size=2, stride=2))
        return out[:, :self.out_chs] * F.interpolate(self.gate_fn(res), size=out.shape[-2:], mode='nearest')

    def reparameterize(self):  # already in deploy form
        pass


def _shortcut(in_chs, out_chs, dw_kernel_size, stride):
    return nn.Sequential(
        nn.Conv2d(in_chs, in_chs, dw_kernel_size, stride=stride, padding=(dw_kernel_size - 1) // 2,
                  groups=in_chs, bias=False), nn.BatchNorm2d(in_chs),
        nn.Conv2d(in_chs, out_chs, 1, stride=1, padding=0, bias=False), nn.BatchNorm2d(out_chs))


class GhostBottleneck(nn.Module):
    """V1/V2: ghost1 -> [conv_dw -> bn_dw if stride 2] -> [se] -> ghost2 -> += shortcut(x)."""

    def __init__(self, in_chs, mid_chs, out_chs, dw_kernel_size=3, stride=1, act_layer=nn.ReLU, se_ratio=0.,
                 mode='original'):
        super().__init__()
        has_se = se_ratio is not None and se_ratio > 0.
        self.stride = stride
        self.ghost1 = (GhostModule if mode == 'original' else GhostModuleV2)(in_chs, mid_chs, act_layer=act_layer)
        if stride > 1:
            self.conv_dw = nn.Conv2d(mid_chs, mid_chs, dw_kernel_size, stride=stride,
                                     padding=(dw_kernel_size - 1) // 2, groups=mid_chs, bias=False)
            self.bn_dw = nn.BatchNorm2d(mid_chs)
        else:
            self.conv_dw = None
            self.bn_dw = None
        self.se = _SE_LAYER(mid_chs, rd_ratio=se_ratio) if has_se else None
        self.ghost2 = GhostModule(mid_chs, out_chs, act_layer=nn.Identity)
        self.shortcut = nn.Sequential() if in_chs == out_chs and stride == 1 \
            else _shortcut(in_chs, out_chs, dw_kernel_size, stride)

    def forward(self, x):
        shortcut = x
        x = self.ghost1(x)
        if self.conv_dw is not None:
            x = self.bn_dw(self.conv_dw(x))
        if self.se is not None:
            x = self.se(x)
        x = self.ghost2(x)
        x += self.shortcut(shortcut)
        return x


class GhostBottleneckV3(nn.Module):
    """V3 after reparameterize(); conv_dw/bn_dw are registered first (before ghost1), as in timm."""

    def __init__(self, in_chs, mid_chs, out_chs, dw_kernel_size=3, stride=1, act_layer=nn.ReLU, se_ratio=0.,
                 mode='original'):
        super().__init__()
        has_se = se_ratio is not None and se_ratio > 0.
        self.stride = stride
        self.num_conv_branches = 3
        self.infer_mode = stride > 1  # timm's switch_to_deploy returns early for stride 1
        if stride > 1:
            self.conv_dw = nn.Conv2d(mid_chs, mid_chs, dw_kernel_size, stride, (dw_kernel_size - 1) // 2,
                                     groups=mid_chs, bias=True)
        else:
            self.conv_dw = nn.Identity()
        self.bn_dw = nn.Identity()
        self.ghost1 = GhostModuleV3(in_chs, mid_chs, act_layer=act_layer, mode=mode)
        if stride > 1:
            self.kernel_size = dw_kernel_size
            self.in_channels = mid_chs
        else:
            self.dw_rpr_conv = nn.ModuleList()
            self.dw_rpr_scale = nn.Identity()
            self.dw_rpr_skip = None
        self.se = _SE_LAYER(mid_chs, rd_ratio=se_ratio) if has_se else nn.Identity()
        self.ghost2 = GhostModuleV3(mid_chs, out_chs, act_layer=nn.Identity, mode='original')
        self.shortcut = nn.Identity() if in_chs == out_chs and stride == 1 \
            else _shortcut(in_chs, out_chs, dw_kernel_size, stride)

    def forward(self, x):
        shortcut = x
        x = self.ghost1(x)
        if self.stride > 1:  # infer_mode: the multi-branch path is gone
            x = self.bn_dw(self.conv_dw(x))
        x = self.se(x)
        x = self.ghost2(x)
        x += self.shortcut(shortcut)
        return x

    def reparameterize(self):  # already in deploy form
        pass


class SelectAdaptivePool2d(nn.Module):
    """timm's SelectAdaptivePool2d for pool_type='avg', flatten=False."""

    def __init__(self, output_size=1, pool_type='avg', flatten=False):
        super().__init__()
        assert pool_type == 'avg'
        self.pool_type = pool_type
        self.pool = nn.AdaptiveAvgPool2d(output_size)
        self.flatten = nn.Flatten(1) if flatten else nn.Identity()

    def forward(self, x):
        return self.flatten(self.pool(x))


class Linear(nn.Linear):
    """timm.layers.Linear (casts for torchscript only; eager forward is F.linear)."""

    def forward(self, input):
        return F.linear(input, self.weight, self.bias)


def checkpoint_seq(functions, x, every=1, flatten=False, use_reentrant=False):
    """timm's helper (GhostNet.set_grad_checkpointing): the modules of a Sequential (with flatten,
    of its Sequentials) in segments of `every`, each under torch.utils.checkpoint, non-reentrant as
    timm's default."""
    functions = list(chain.from_iterable(functions) if flatten else functions)

    def segment(start):
        def forward(y):
            for function in functions[start:start + every]:
                y = function(y)
            return y
        return forward

    for start in range(0, len(functions), every):
        x = torch.utils.checkpoint.checkpoint(segment(start), x, use_reentrant=use_reentrant)
    return x


class GhostNet(nn.Module):
    def __init__(self, cfgs, num_classes=1000, width=1.0, in_chans=3, global_pool='avg', drop_rate=0.2,
                 version='v1'):
        super().__init__()
        self.cfgs = cfgs
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        block = GhostBottleneckV3 if version == 'v3' else GhostBottleneck
        stem_chs = make_divisible(16 * width, 4)
        self.conv_stem = nn.Conv2d(in_chans, stem_chs, 3, 2, 1, bias=False)
        # the stride-2 feature is conv_stem's output, before bn1 (forward_intermediates returns it)
        self.feature_info = [dict(num_chs=stem_chs, reduction=2, module='conv_stem')]
        self.bn1 = nn.BatchNorm2d(stem_chs)
        self.act1 = nn.ReLU(inplace=True)
        prev_chs = stem_chs
        stages = []
        layer_idx = 0
        for cfg in cfgs:
            layers = []
            s = 1
            for k, exp_size, c, se_ratio, s in cfg:
                out_chs = make_divisible(c * width, 4)
                mid_chs = make_divisible(exp_size * width, 4)
                kwargs = {}
                if version == 'v2' and layer_idx > 1:
                    kwargs['mode'] = 'attn'
                if version == 'v3' and layer_idx > 1:
                    kwargs['mode'] = 'shortcut'
                layers.append(block(prev_chs, mid_chs, out_chs, k, s, se_ratio=se_ratio, **kwargs))
                prev_chs = out_chs
                layer_idx += 1
            if s > 1:  # a stage that ends at a new stride is a feature
                self.feature_info.append(dict(num_chs=prev_chs, reduction=2 * 2 ** (len(self.feature_info)),
                                              module=f'blocks.{len(stages)}'))
            stages.append(nn.Sequential(*layers))
        out_chs = make_divisible(exp_size * width, 4)
        stages.append(nn.Sequential(ConvBnAct(prev_chs, out_chs, 1)))  # blocks.9.0: bn1 is a BatchNormAct2d
        self.pool_dim = prev_chs = out_chs
        self.blocks = nn.Sequential(*stages)
        self.num_features = prev_chs
        self.head_hidden_size = out_chs = 1280
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool)
        self.conv_head = nn.Conv2d(prev_chs, out_chs, 1, 1, 0, bias=True)
        self.act2 = nn.ReLU(inplace=True)
        self.flatten = nn.Flatten(1) if global_pool else nn.Identity()
        self.classifier = Linear(out_chs, num_classes) if num_classes > 0 else nn.Identity()

    def set_grad_checkpointing(self, enable=True):
        self.grad_checkpointing = enable

    def forward_features(self, x):
        x = self.act1(self.bn1(self.conv_stem(x)))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x, flatten=True)
        return self.blocks(x)

    def forward_intermediates(self, x, indices=None, norm=False, stop_early=False, output_fmt='NCHW',
                              intermediates_only=False):
        """timm's feature API: the final features and the maps at the chosen feature_info entries
        (all by default; an int n: the last n; a list: those), the first being conv_stem's output."""
        assert output_fmt == 'NCHW'
        stage_ends = [-1] + [int(info['module'].split('.')[-1]) for info in self.feature_info[1:]]
        count = len(stage_ends)
        if indices is None:
            indices = count
        wanted = range(count - indices, count) if isinstance(indices, int) else [i % count for i in indices]
        take = [stage_ends[i] + 1 for i in wanted]
        intermediates = []
        x = self.conv_stem(x)
        if 0 in take:
            intermediates.append(x)
        x = self.act1(self.bn1(x))
        stages = self.blocks[:stage_ends[max(wanted)] + 1] if stop_early else self.blocks
        for feature_index, stage in enumerate(stages, start=1):
            x = stage(x)
            if feature_index in take:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)

    def forward_head(self, x, pre_logits=False):
        x = self.flatten(self.act2(self.conv_head(self.global_pool(x))))
        if self.drop_rate > 0.:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.classifier(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


# timm's _create_ghostnet cfgs: k, t (expansion), c, SE ratio, s -- 16 bottlenecks in 9 stages
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


def _deploy_grad_flags(model):
    """requires_grad as timm's reparameterize_model leaves it: switch_to_deploy detach_()es the parameters
    of every stride-2 GhostBottleneckV3 (all of them, SE and shortcut included) and of every GhostModuleV3."""
    for m in model.modules():
        if isinstance(m, GhostBottleneckV3) and m.stride > 1 or isinstance(m, GhostModuleV3):
            m.requires_grad_(False)
    return model


def timm_ghostnet(version='v1', width=1.0, num_classes=1000, **kwargs):
    """ghostnet_100 / ghostnetv2_100 / ghostnetv3_100 (after reparameterize_model) at width 1.0."""
    assert version in ('v1', 'v2', 'v3')
    model = GhostNet(CFGS, num_classes=num_classes, width=width, version=version, **kwargs)
    return _deploy_grad_flags(model) if version == 'v3' else model
