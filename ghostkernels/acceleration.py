"""ghostkernels.accelerate(model): swap the Ghost modules of any model for fused ones.

Ghost modules are recognised by structure, not by class: a `primary_conv` and a depthwise
`cheap_operation`, each a Sequential of an nn.Conv2d, an optional nn.BatchNorm2d and an
optional nn.ReLU (or Identity / empty Sequential), exact types, and an `oup` or `out_chs`
attribute. That covers the original Huawei GhostModule, timm's (with `relu` or `act_layer`),
GhostModuleV2 in both modes (in 'attn' mode the DFC gate's sigmoid, upsampling and product are
fused into the Ghost op's writes), GhostNetV3 modules after re-parameterisation (conv with
bias, no BN) in both modes, and G-GhostNet stages (base, layers, merge, cheap, end). The swap
shares the parameters, keeps the state-dict keys and leaves training behaviour as it was; in
training mode the depthwise convs outside the Ghost modules also move to the direct conv
kernels, whose backward is C++ (DepthwiseConv2d), and the BNs outside them to the
batch-statistics BN kernels (TrainingBatchNorm2d). In eval mode the remaining Conv+BN pairs
that run one after the other (stem, `conv_dw`/`bn_dw`, shortcuts, ConvBnAct, the convs of
post-activation Bottleneck/BasicBlock blocks) are folded too (a timm BatchNormAct2d folds its
BN and keeps its drop and act), the depthwise convs and
the stem among them run on ghostkernels' direct conv kernel, a bottleneck's ghost1 and the
stride-2 depthwise conv after it run as one op, so do a bottleneck's SE and ghost2, and the
1x1 convs (shortcuts, SE, heads) run as matrix multiplies on the CPU.

Recognition by structure can be fooled by a module whose forward does something else, so
every change is checked (check=True): the smallest module that shows the change is run on a
probe before and after it, in float64 on the CPU where it allows (whatever the model's device),
and a change whose output differs is undone and listed as skipped with the measured error.
"""

import contextlib
import itertools
import threading
import time
import warnings
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .batch_norm import FoldedBatchNorm, FoldedSequential, TrainingBatchNorm2d
from .direct_conv import DepthwiseConv2d, DirectConv2d
from .ghost_depthwise import GhostDepthwise
from .ghost_residual import GhostBottleneckResidual
from .models.g_ghost_regnet import GGhostStage
from .modules import (GhostModule, GhostModuleV2, MergedAway, PointwiseConv2d, PointwiseLinear, activation_name,
                      hook_dicts, conv_bn_sequence, deepcopy_module, eager_module, fold_conv_bn, is_ghost_conv_pair,
                      recomputes_a_weight)
from .precompile import precompile_quietly
from .squeeze_excite import SqueezeExciteGhost


@dataclass
class AccelerationSummary:
    """What accelerate() did: fused Ghost modules, folded Conv+BN pairs, what it left alone."""

    fused: list = field(default_factory=list)
    folded: list = field(default_factory=list)
    matmul: list = field(default_factory=list)  # 1x1 convs and linear layers on ghostkernels::pointwise_conv2d
    merged: list = field(default_factory=list)  # ghost1 + folded conv_dw, se + ghost2: one op each
    residual: list = field(default_factory=list)  # bottlenecks whose residual add ghost2's op makes
    depthwise: list = field(default_factory=list)  # training mode: depthwise convs on the direct conv kernels
    batch_norms: list = field(default_factory=list)  # training mode: BNs on the batch_norm_train kernels
    skipped: list = field(default_factory=list)  # (module name, reason)
    checked: int = 0  # changes verified by the self-check
    check_seconds: float = 0.0
    precompiled: int = 0  # Triton kernels compiled on example_inputs (CUDA; None: by an ordinary forward)
    precompile_seconds: float = 0.0

    def __str__(self):
        lines = [f"ghostkernels.accelerate: {len(self.fused)} Ghost modules fused, "
                 f"{len(self.folded)} Conv+BN pairs folded, {len(self.matmul)} 1x1 convs / linear layers as matmuls, "
                 f"{len(self.merged)} depthwise convs / SE blocks merged into Ghost ops, "
                 f"{len(self.residual)} residual adds made by ghost2's op, "
                 f"{len(self.depthwise)} depthwise convs on the direct conv kernels (training), "
                 f"{len(self.batch_norms)} BNs on the batch-statistics BN kernels (training), "
                 f"{len(self.skipped)} left as they were; {self.checked} changes self-checked "
                 f"in {self.check_seconds:.2f} s"]
        if self.precompile_seconds:
            lines[0] += f"; {self.precompiled} Triton kernels compiled in {self.precompile_seconds:.2f} s"
        lines += [f"  fused   {name}" for name in self.fused]
        lines += [f"  folded  {name}" for name in self.folded]
        lines += [f"  matmul  {name}" for name in self.matmul]
        lines += [f"  merged  {name}" for name in self.merged]
        lines += [f"  residual {name}" for name in self.residual]
        lines += [f"  depthwise {name}" for name in self.depthwise]
        lines += [f"  batch_norm {name}" for name in self.batch_norms]
        lines += [f"  skipped {name}: {reason}" for name, reason in self.skipped]
        return "\n".join(lines)


# -- recognition ------------------------------------------------------------------------------


def _has_running_stats(bn):
    return bn.running_mean is not None and bn.running_var is not None


def _branch(sequential):
    """The activation of a Conv2d [BatchNorm2d] [activation] Sequential, or why it is not one."""
    if type(sequential) is not nn.Sequential or not len(sequential) or type(sequential[0]) is not nn.Conv2d:
        return None, "not a Sequential starting with an nn.Conv2d"
    rest = list(sequential)[1:]
    if rest and type(rest[0]) is nn.BatchNorm2d:
        if not _has_running_stats(rest[0]):
            return None, "BatchNorm without running statistics"
        rest = rest[1:]
    if len(rest) > 1:
        return None, "more than Conv2d, BatchNorm2d and an activation"
    activation = activation_name(rest[0]) if rest else "none"
    if activation is None:
        return None, f"{type(rest[0]).__name__} is not fused (expected nn.BatchNorm2d, then nn.ReLU or nn.Identity)"
    return activation, None


def ghost_module_activation(module):
    """The shared activation if `module` is a Ghost module the fused op can run, else (None, why)."""
    primary, cheap = getattr(module, "primary_conv", None), getattr(module, "cheap_operation", None)
    if primary is None or cheap is None:
        return None, "no primary_conv / cheap_operation"
    if getattr(module, "oup", None) is None and getattr(module, "out_chs", None) is None:
        return None, ("no oup / out_chs attribute: the output channel count the original's forward cuts its concat to "
                      "is unknown (torch.fx's traced copies of submodules drop it: accelerate before tracing)")
    act1, why = _branch(primary)
    if act1 is None:
        return None, f"primary_conv: {why}"
    act2, why = _branch(cheap)
    if act2 is None:
        return None, f"cheap_operation: {why}"
    if act1 != act2:
        return None, "the two branches have different activations"
    if not is_ghost_conv_pair(primary[0], cheap[0]):
        return None, ("convs are not square and odd with 'same' zero padding (padding_mode='zeros'), equal strides and "
                      "no dilation, the primary one of one group and the cheap one a stride-1 depthwise conv of its "
                      "output")
    return act1, None


def attention_gate(module):
    """The DFC attention of GhostModuleV2 ('attn') / GhostModuleV3 ('shortcut'): (short_conv or
    None, why not fusable). An absent or empty short_conv means no gate."""
    short_conv = getattr(module, "short_conv", None)
    if getattr(module, "mode", None) in ("original", "ori") or short_conv is None \
            or (isinstance(short_conv, (nn.Sequential, nn.Identity)) and len(short_conv._modules) == 0):
        return None, None
    if type(short_conv) is not nn.Sequential:
        return None, f"short_conv: a {type(short_conv).__name__}, not a Sequential"
    # Huawei's GhostNetV3 module has knobs for other gates (sigmoid(res / scale), other modes).
    if getattr(module, "scale", 1.0) != 1.0 or getattr(module, "inter_mode", "nearest") != "nearest":
        return None, "short_conv: a gate other than sigmoid, nearest-upsampled"
    pairs = conv_bn_sequence(short_conv)
    if pairs is None:
        return None, "short_conv: not a sequence of Conv2d [BatchNorm2d]"
    if any(bn is not None and not _has_running_stats(bn) for _, bn in pairs):
        return None, "short_conv: BatchNorm without running statistics"
    return short_conv, None


def _swap_ghost(module, activation, short_conv):
    oup = getattr(module, "oup", None) or getattr(module, "out_chs")
    cls = GhostModule if short_conv is None else GhostModuleV2
    fused = cls.from_parts(module.primary_conv, module.cheap_operation, oup, activation)
    if short_conv is not None:
        fused.short_conv = short_conv
    fused.training = module.training  # its own flag: train() would reset the adopted BNs' (test-time adaptation's)
    return fused


def _is_g_ghost_stage(module):
    """G-GhostNet's stage by structure: base, end, merge, cheap, layers and the raw/cheap split."""
    names = ("base", "end", "merge", "cheap", "cheap_relu", "layers")
    return (all(isinstance(getattr(module, n, None), nn.Module) for n in names)
            and isinstance(getattr(module, "raw_planes", None), int) and type(module.cheap) is nn.Sequential
            and type(module.cheap[0]) is nn.Conv2d and module.cheap[0].kernel_size == (1, 1)
            and [type(m) for m in module.cheap][1:] in ([], [nn.BatchNorm2d])  # what its fast path folds
            and module.cheap[0].groups == 1 and len(module.layers) > 0)


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


def _bn_tail(bn):
    """What runs after the normalisation in a foldable BN module: [] for nn.BatchNorm2d, [drop,
    act] for timm's BatchNormAct2d (BN, then self.drop, then self.act); None for any other
    module, whose forward may differ (SyncBatchNorm, other BN subclasses)."""
    if not isinstance(bn, nn.BatchNorm2d) or not _has_running_stats(bn):
        return None
    if type(bn) in (nn.BatchNorm2d, TrainingBatchNorm2d):
        return []
    if type(bn).__name__ == "BatchNormAct2d" and set(bn._modules) == {"drop", "act"}:
        return [bn.drop, bn.act]
    return None


def _folded_conv(conv, bn):
    """conv with bn folded into its weight and bias: a DirectConv2d where that kernel applies."""
    with torch.no_grad():
        weight, bias = (t.detach().clone() for t in fold_conv_bn(conv, bn))
    if DirectConv2d.eligible(conv):
        return DirectConv2d(weight, bias, conv.stride[0], conv.groups)
    folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                       conv.dilation, conv.groups, True, conv.padding_mode,
                       device=conv.weight.device, dtype=conv.weight.dtype)
    folded.weight, folded.bias = nn.Parameter(weight), nn.Parameter(bias)
    return folded


def _bn_replacement(bn, folded_into, conv_attribute):
    """The module that takes a folded BN's place: what ran after its normalisation."""
    return FoldedBatchNorm(bn.num_features, [m for m in _bn_tail(bn) if type(m) is not nn.Identity], folded_into,
                           conv_attribute)


_accelerating = threading.local()  # .rewiring: accelerate() itself is assigning modules


@contextlib.contextmanager
def _rewiring():
    _accelerating.rewiring = True
    try:
        yield
    finally:
        _accelerating.rewiring = False


def check_reassignment(owner, name, module):
    """A global module registration hook (torch.nn.modules.module, registered once at import): an
    accelerated model given another module where accelerate() tied two (model surgery, a
    converter that swaps modules) computes what the original so edited would, or says why not:
    a merge's two parts split for good, each running its own module (MergedAway); a folded BN
    replaced while its conv (which holds its values) is still in place is refused; a folded
    conv replaced takes the BN's values with it, so its FoldedBatchNorm raises if it runs."""
    old = owner._modules.get(name)
    if old is None or old is module or getattr(_accelerating, "rewiring", False):
        return
    if type(old) is FoldedBatchNorm and old.conv_attribute is not None and not old.orphaned:
        raise RuntimeError(
            f"ghostkernels.accelerate() folded the BatchNorm at {name!r} into {old.folded_into}, whose weights now "
            f"hold its values: another module there would apply a second BN. Replace {old.conv_attribute!r} first "
            "(the BN's values go with it), or edit the original model and accelerate it again")
    placeholder = old if type(old) is MergedAway else old.__dict__.get("placeholder")  # of a merged module
    if placeholder is not None:
        placeholder.separated = True
    for sibling in owner._modules.values():
        if type(sibling) is FoldedBatchNorm and sibling.conv_attribute == name:
            sibling.orphaned = True


torch.nn.modules.module.register_module_module_registration_hook(check_reassignment)


class OriginalStateDicts:
    """A load_state_dict pre-hook of an eval-mode accelerated model: a state dict with the
    original model's keys (its checkpoint) is translated into the accelerated model's as it
    loads, each folded BN folded into its conv again from the checkpoint's values and the merged
    modules' keys moved under their new names. A state dict of the accelerated model itself, or
    one that lacks a fold's conv or BN values, passes unchanged (FoldedBatchNorm then names what
    it cannot take). Picklable: the hook travels with torch.save and deepcopy of the model."""

    _BN_KEYS = FoldedBatchNorm._BN_KEYS

    def __init__(self):
        self.steps = []  # ("fold", conv, bn, eps) and ("rename", ((old prefix, new prefix), ...)), in order

    def fold(self, conv, bn, eps):
        self.steps.append(("fold", conv, bn, eps))

    def rename(self, *prefixes):
        self.steps.append(("rename", prefixes))

    def __call__(self, model, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        own = {prefix + key for key in model.state_dict()}  # never renamed: the accelerated model's keys
        for step in self.steps:
            if step[0] == "fold":
                self._fold(state_dict, prefix + step[1] + ".", prefix + step[2] + ".", step[3],
                           local_metadata.get("assign_to_params_buffers", False))
            else:
                self._rename(state_dict, [(prefix + old, prefix + new) for old, new in step[1]], own)

    def _fold(self, state_dict, conv, bn, eps, assign):
        if (conv + "weight" not in state_dict or bn + "running_mean" not in state_dict
                or bn + "running_var" not in state_dict):
            return
        values = {key: state_dict.pop(bn + key, None) for key in self._BN_KEYS}
        # load_state_dict(assign=True) keeps the checkpoint's tensors, so its dtype; otherwise the
        # float64 fold is copied into the parameter, rounded once to the model's dtype (a float32
        # checkpoint loaded into a model converted to float64 folds exactly)
        dtype = state_dict[conv + "weight"].dtype if assign else torch.float64
        with torch.no_grad():  # in float64, as fold_conv_bn reads a conv's and a BN's tensors by name
            conv_tensors = SimpleNamespace(weight=_double(state_dict[conv + "weight"]),
                                           bias=_double(state_dict.get(conv + "bias")))
            bn_tensors = SimpleNamespace(eps=eps, **{key: _double(values[key])
                                                     for key in ("weight", "bias", "running_mean", "running_var")})
            weight, bias = fold_conv_bn(conv_tensors, bn_tensors)
        state_dict[conv + "weight"], state_dict[conv + "bias"] = weight.to(dtype), bias.to(dtype)

    @staticmethod
    def _rename(state_dict, prefixes, own):
        for key in list(state_dict):
            for old, new in prefixes:
                if key.startswith(old) and key not in own:
                    state_dict[new + key[len(old):]] = state_dict.pop(key)
                    break


def _double(tensor):
    return None if tensor is None else tensor.double()


def _foldable(conv, bn):
    # not a BN in training mode inside the eval-mode model (test-time adaptation): it normalises by
    # batch statistics, which a folded conv cannot
    return (type(conv) is nn.Conv2d and _bn_tail(bn) is not None and not bn.training
            and bn.num_features == conv.out_channels)


# -- changes, undone when the self-check disagrees ---------------------------------------------------


def _hooks_reason(module):
    """Why `module` is left as it is when a hook is registered on it or inside it, or a forward set
    on an instance (a replacement would not run them), else None."""
    hooks = [hook for m in module.modules() for hook_dict in hook_dicts(m) for hook in hook_dict.values()]
    if not hooks:
        patched = next((m for m in module.modules() if "forward" in m.__dict__), None)
        return None if patched is None else (
            f"has a {type(patched).__name__} whose forward is set on the instance (HF accelerate's "
            "add_hook_to_module, a monkeypatch), which the replacement would not call")
    if any(map(recomputes_a_weight, hooks)):
        return ("is pruned or weight-normalised (torch.nn.utils.prune / weight_norm recompute its weight in a hook): "
                "prune.remove() / remove_weight_norm() make the weights plain for accelerate to fuse")
    return "has forward or backward hooks, which the replacement would drop"


def _slots(model, module):
    """Every (parent, attribute) through which `model` holds `module`: a shared instance has several."""
    return [(parent, attr) for parent in model.modules() for attr, child in parent._modules.items()
            if child is module]


class _Accelerator:
    """Applies accelerate()'s changes one at a time, each checked (when a checker is given) and
    undone if it changes the output."""

    def __init__(self, model, summary, checker):
        self.model, self.summary, self.checker = model, summary, checker
        self.original_state_dicts = OriginalStateDicts()

    def replace(self, kind, label, scope, old, build):
        """Replace `old` by `build()` wherever the model holds it (ties kept). Built only once
        `old` has passed the hooks check: a hook may have left its tensors in another state (a
        pruned conv's weight is a computed tensor, not a Parameter)."""
        if self._hooked(label, [old]):
            return False
        if self.model is old:
            return self._commit(kind, label, scope, [], old_modules=[old], root=build())
        new = build()
        return self._commit(kind, label, scope, [(parent, attr, new) for parent, attr in _slots(self.model, old)],
                            old_modules=[old])

    def rewire(self, kind, label, scope, owner, assignments):
        """setattr(owner, attr, module) for each (attr, module): a fold or a merge, which
        changes how `owner`'s children work together, so a child held elsewhere too is left."""
        old_modules = [getattr(owner, attr) for attr, _ in assignments]
        if any(len(_slots(self.model, m)) > 1 for m in old_modules):
            self.summary.skipped.append((label, "a module it changes is shared with another part of the model"))
            return False
        if self._hooked(label, old_modules):
            return False
        return self._commit(kind, label, scope, [(owner, attr, new) for attr, new in assignments], old_modules)

    def _hooked(self, label, old_modules):
        reason = next(filter(None, map(_hooks_reason, old_modules)), None)
        if reason is not None:
            self.summary.skipped.append((label, reason))
        return reason is not None

    def _commit(self, kind, label, scope, assignments, old_modules, root=None):
        """Make the assignments (replace and rewire have checked hooks and ties), then keep them
        if the self-check agrees, else undo them."""
        undo = [(parent, attr, getattr(parent, attr)) for parent, attr, _ in assignments]
        with _rewiring():
            for parent, attr, new in assignments:
                setattr(parent, attr, new)
        if root is not None:
            self.model = root
        if self.checker is not None:
            error = self.checker.error(self.model, scope)
            if error is not None:
                with _rewiring():
                    for parent, attr, old in undo:
                        setattr(parent, attr, old)
                if root is not None:
                    self.model = old_modules[0]
                self.summary.skipped.append((label, f"self-check: {error}; left as it was"))
                return False
            self.summary.checked += 1
        getattr(self.summary, kind).append(label)
        return True


# -- the self-check ---------------------------------------------------------------------------------

# Largest relative error (max |after - before| / max |before|) a change may make, by the
# model's dtype: the check runs in float64, but folded weights were rounded to the model's
# dtype (float32: ~3e-8 per fold); CUDA kernels accumulate in float32.
_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5}
_LOOSE_TOLERANCE = 1e-2  # half precision, and CUDA (TF32 dots)
_PROBE_SIZES = (9, 17, 33, 65)  # small odd sizes; deeper scopes (a whole model) need the larger ones
_PROBE_CHANNEL_GUESSES = 4
_PROBE_IMAGES = 2  # of a captured probe (two: training-mode BN needs more than one value per channel)
# Methods besides forward whose outputs a change must keep too, called on the probe like forward
# where the scope's module has them and they run on it: timm's feature API returns conv_stem's
# output before bn1 among its intermediates, which folding the stem's BN would change.
_CHECKED_METHODS = ("forward_intermediates",)


def _checked_methods(module):
    """The names of _CHECKED_METHODS that `module` has."""
    return tuple(name for name in _CHECKED_METHODS if callable(getattr(module, name, None)))


def _captured_probe(args, kwargs):
    """A detached copy of a module's inputs in the example forward, cut to their first
    _PROBE_IMAGES along dim 0 where every tensor among them has the same size there (a batch):
    a whole batch of a GPU's example (64 images, say) cost the check (float64, on the CPU) tens
    of seconds and shows it nothing more."""
    tensors = [v for v in pytree.tree_leaves((args, kwargs)) if isinstance(v, torch.Tensor)]
    if tensors and all(t.dim() > 0 and t.shape[0] == tensors[0].shape[0] for t in tensors):
        args, kwargs = pytree.tree_map(lambda v: v[:_PROBE_IMAGES] if isinstance(v, torch.Tensor) else v,
                                       (args, kwargs))
    return pytree.tree_map(_cast, args), pytree.tree_map(_cast, kwargs)


def _without_hooks(module):
    """A copy of `module` whose copies of user hooks do not fire during a probe."""
    module = deepcopy_module(module)
    for m in module.modules():
        for hooks in hook_dicts(m):
            hooks.clear()
    return module


def _first_parameter(module):
    return next(iter(module.parameters()), None)


def _cast(value, dtype=None, device=None):
    """A detached copy of a tensor argument (on `device` if given, in `dtype` if floating and
    dtype is given)."""
    if not isinstance(value, torch.Tensor):
        return value
    dtype = dtype if value.is_floating_point() else None
    return value.detach().to(device=device, dtype=dtype, copy=True)  # one copy, strides kept as clone() keeps them


def _tolerance(dtype, device):
    """The largest relative error allowed for a model of `dtype` on `device` (_TOLERANCE)."""
    return _TOLERANCE.get(dtype, _LOOSE_TOLERANCE) if device.type == "cpu" else _LOOSE_TOLERANCE


def _relative_error(actual, expected):
    """max |actual - expected| / max |expected| over every tensor of two outputs (inf when
    their structure, shapes or NaN positions differ)."""
    actual_leaves, actual_spec = pytree.tree_flatten(actual)
    expected_leaves, expected_spec = pytree.tree_flatten(expected)
    if actual_spec != expected_spec:
        return float("inf")
    worst = 0.0
    for a, e in zip(actual_leaves, expected_leaves):
        if not isinstance(e, torch.Tensor):
            if a != e:
                return float("inf")
            continue
        if not isinstance(a, torch.Tensor) or a.shape != e.shape:
            return float("inf")
        a, e = a.double(), e.double()
        if not torch.equal(torch.isnan(a), torch.isnan(e)):
            return float("inf")
        a, e = a.nan_to_num(), e.nan_to_num()
        if e.numel():
            scale = max(e.abs().max().item(), 1e-30)
            worst = max(worst, (a - e).abs().max().item() / scale)
    return worst


class _SelfCheck:
    """Runs a scope (a module name) of the model under construction and of the original on
    the same probe and compares. Probes: the scope's input in a forward of example_inputs
    through the original, else random (2, C, s, s) inputs, C the in_channels of the scope's
    first conv, s the smallest of _PROBE_SIZES the original runs on. float64 on the CPU
    first (self.settings); the model's device, and its own dtype, where that does not run."""

    def __init__(self, original, example_inputs):
        start = time.perf_counter()
        self.original = _without_hooks(original)
        parameter = _first_parameter(self.original)
        self.device = parameter.device if parameter is not None else torch.device("cpu")
        self.dtype = parameter.dtype if parameter is not None else torch.float32
        # Where and in what dtype probes run, in this order of preference: float64 on the CPU
        # first, whatever the model's device. The check is of the folds, swaps and merges, whose
        # math is the same on every device; on the CPU it can be tight (float64 kernels, no TF32)
        # and compiles no GPU kernels for the probes' shapes and dtype. The model's device next,
        # for modules that only run there; their own dtype last (dtype None: as they are).
        cpu = torch.device("cpu")
        self.settings = list(dict.fromkeys([(cpu, torch.float64), (self.device, torch.float64), (self.device, None)]))
        self.copies = {}  # setting -> the original model moved there, made at its first reference
        self.captured = {} if example_inputs is None else self._capture(example_inputs)
        self.references = {}  # scope -> _reference's tuple, or why there is none
        self.seconds = time.perf_counter() - start

    def _run(self, module, args, kwargs, setting, methods=()):
        """[the output of module, then of each of its `methods`] on copies of the probe, all
        moved to setting's (device, dtype) (a module in place: callers pass copies),
        deterministic: the same dropout masks in training mode, the caller's random state
        untouched."""
        device, dtype = setting
        devices = [torch.cuda.current_device()] if device.type == "cuda" else []
        module = eager_module(module)
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            if dtype is not None:
                module = module.to(device=device, dtype=dtype)
            outputs = []
            for call in [module, *(getattr(module, name) for name in methods)]:
                torch.manual_seed(0)
                outputs.append(call(*pytree.tree_map(lambda v: _cast(v, dtype, device), args),
                                    **pytree.tree_map(lambda v: _cast(v, dtype, device), kwargs)))
            return outputs

    def _capture(self, example_inputs):
        inputs, handles = {}, []
        for name, module in self.original.named_modules():
            def hook(module, args, kwargs, name=name):
                if name not in inputs:
                    inputs[name] = _captured_probe(args, kwargs)
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        example = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        try:
            # a copy: train-mode BN updates its stats
            self._run(deepcopy_module(self.original), example, {}, (self.device, None))
        except Exception as exc:
            if hasattr(exc, "add_note"):  # Python 3.11+: the error is the model's own, say where it came from
                exc.add_note("accelerate(): raised by the original model run on example_inputs (the input of the "
                             "model's forward, batch and all)")
            raise
        finally:
            for handle in handles:
                handle.remove()
        return inputs

    def _probes(self, scope, module):
        """(args, kwargs) candidates for the scope: its captured input, or synthetic ones. Any
        input the original runs on is a fair probe; the channel count is guessed from the
        scope's convs in the order they were registered, which need not be the order they run;
        a scope without convs (a classifier) gets (2, features) inputs for its linear layers."""
        if scope in self.captured:
            yield self.captured[scope]
            return
        generator = torch.Generator().manual_seed(0)  # the caller's random state stays
        channels = dict.fromkeys(m.in_channels for m in module.modules() if isinstance(m, nn.Conv2d))
        if not channels:
            features = dict.fromkeys(m.in_features for m in module.modules() if isinstance(m, nn.Linear))
            for f in list(features)[:_PROBE_CHANNEL_GUESSES]:
                yield (torch.randn(2, f, generator=generator, dtype=self.dtype),), {}
            return
        for c, size in itertools.product(list(channels)[:_PROBE_CHANNEL_GUESSES], _PROBE_SIZES):
            # Two images: training-mode BN needs more than one value per channel on 1x1 maps.
            yield (torch.randn(2, c, size, size, generator=generator, dtype=self.dtype),), {}

    def _original(self, setting):
        """The original model moved to setting's (device, dtype), or as it is (dtype None).
        Probes may update its BN statistics in training mode, where they do not enter the output."""
        if setting[1] is None:
            return self.original
        if setting not in self.copies:
            device, dtype = setting
            self.copies[setting] = deepcopy_module(self.original).to(device=device, dtype=dtype)
        return self.copies[setting]

    def _reference(self, scope):
        """(args, kwargs, setting, methods, outputs) of the original scope on the first probe and
        setting it runs on, outputs the forward's and each of `methods`' (those of _CHECKED_METHODS
        the scope has that run on the probe too), or why there is none."""
        if scope not in self.references:
            self.references[scope] = "no probe input runs the original module (pass example_inputs)"
            original = self.original.get_submodule(scope)
            methods = _checked_methods(original)
            for args, kwargs in self._probes(scope, original):
                outputs = None
                for setting, checked in itertools.product(self.settings, dict.fromkeys([methods, ()])):
                    try:
                        outputs = self._run(self._original(setting).get_submodule(scope), args, kwargs, setting,
                                            checked)
                    except Exception:  # noqa: BLE001 - a probe the original cannot run is no probe
                        continue
                    self.references[scope] = (args, kwargs, setting, checked, outputs)
                    break
                if outputs is not None:
                    break
        return self.references[scope]

    def error(self, model, scope):
        """None if `scope` of `model` gives the original's output on the scope's probe, else
        what differs."""
        start = time.perf_counter()
        try:
            return self._error(model, scope)
        finally:
            self.seconds += time.perf_counter() - start

    def _error(self, model, scope):
        reference = self._reference(scope)
        if isinstance(reference, str):
            return reference
        args, kwargs, setting, methods, expected = reference
        try:
            actual = self._run(_without_hooks(model.get_submodule(scope)), args, kwargs, setting, methods)
        except Exception as exc:  # noqa: BLE001 - whatever it raises, the change is undone
            return f"the changed module raised {type(exc).__name__}: {exc}"
        tolerance = _tolerance(self.dtype, setting[0])
        for name, a, e in zip(("forward", *methods), actual, expected):
            error = _relative_error(a, e)
            if not error <= tolerance:
                what = "output" if name == "forward" else f"{name}() output (a method that returns inner maps)"
                return f"{what} differs by {error:.2e} (relative; tolerance {tolerance:.0e})"
        return None


# -- the passes -------------------------------------------------------------------------------------


def _owners_outside_ghost_modules(model):
    """(name, module) of every module of `model` that is neither a GhostModule nor inside one:
    a Ghost module folds its own BNs and its fused op runs its convs."""
    ghosts = [f"{name}." for name, m in model.named_modules() if isinstance(m, GhostModule)]
    for name, owner in list(model.named_modules()):
        prefix = f"{name}." if name else ""
        if not isinstance(owner, GhostModule) and not any(prefix.startswith(g) for g in ghosts):
            yield name, owner


def _child_name(owner_name, child):
    return f"{owner_name}.{child}" if owner_name else child


def _label(name):
    """A module's name in the summary (the root's is empty)."""
    return name or "(the model itself)"


def _swap_ghost_modules(accelerator):
    for name, module in list(accelerator.model.named_modules()):
        label = _label(name)
        if isinstance(module, (GhostModule, GGhostStage)):  # ours already: fused in eval
            accelerator.summary.fused.append(label)
        elif _is_g_ghost_stage(module):
            accelerator.replace("fused", label, name, module, lambda: GGhostStage.from_parts(module))
        elif hasattr(module, "primary_rpr_conv"):  # GhostNetV3's before reparameterize() (zoo, timm, Huawei)
            accelerator.summary.skipped.append((label, "GhostNetV3's multi-branch form runs as it is; "
                                                "reparameterize() (the zoo's model.reparameterize(), timm's "
                                                "reparameterize_model) makes it fusable for inference"))
        elif hasattr(module, "primary_conv"):
            activation, why = ghost_module_activation(module)
            short_conv, gate_why = attention_gate(module)
            if activation is None or gate_why:
                accelerator.summary.skipped.append((label, why or gate_why))
                continue
            accelerator.replace("fused", label, name, module, lambda: _swap_ghost(module, activation, short_conv))


def _fold(accelerator, owner_name, owner, conv_name, bn_name):
    conv, bn = getattr(owner, conv_name), getattr(owner, bn_name)
    label = f"{_child_name(owner_name, conv_name)}+{bn_name}"
    methods = _checked_methods(owner) if accelerator.checker is None else ()
    if methods:
        accelerator.summary.skipped.append((label, f"{_label(owner_name)} has {methods[0]}(), which may return the "
                                            "conv's output before the BN: only the self-check (check=True) can tell "
                                            "whether the fold changes it"))
        return
    folded_conv, folded_bn = _child_name(owner_name, conv_name), _child_name(owner_name, bn_name)
    assignments = [(conv_name, _folded_conv(conv, bn)), (bn_name, _bn_replacement(bn, folded_conv, conv_name))]
    if accelerator.rewire("folded", label, owner_name, owner, assignments):
        accelerator.original_state_dicts.fold(folded_conv, folded_bn, bn.eps)
        if type(owner) is nn.Sequential:
            owner.__class__ = FoldedSequential  # its inserts and deletions keep the pair right


def _fold_conv_bn_pairs(accelerator):
    for owner_name, owner in _owners_outside_ghost_modules(accelerator.model):
        if type(owner) in (nn.Sequential, FoldedSequential):
            names = list(owner._modules)
            for conv_name, bn_name in zip(names, names[1:]):
                if _foldable(owner._modules[conv_name], owner._modules[bn_name]):
                    _fold(accelerator, owner_name, owner, conv_name, bn_name)
            continue
        for conv_name, bn_name in _conv_bn_attributes(owner):
            conv, bn = getattr(owner, conv_name, None), getattr(owner, bn_name, None)
            if _foldable(conv, bn):
                _fold(accelerator, owner_name, owner, conv_name, bn_name)
            elif conv_name == "conv_dw" and DirectConv2d.eligible(conv) and type(bn) is nn.Identity:
                # GhostNetV3's re-parameterised conv_dw
                accelerator.replace("folded", f"{_child_name(owner_name, conv_name)} (direct conv kernel)",
                                    owner_name, conv, lambda: DirectConv2d.from_conv(conv))


def _merge_ghost_depthwise(accelerator):
    """A bottleneck's ghost1 and the folded conv_dw it feeds (GhostNet's stride-2 blocks, in the
    original code, timm and the zoo: ghost1 -> conv_dw -> bn_dw) become one GhostDepthwise op
    in ghost1's place; conv_dw becomes its MergedAway placeholder."""
    for owner_name, owner in _owners_outside_ghost_modules(accelerator.model):
        ghost, conv_dw = getattr(owner, "ghost1", None), getattr(owner, "conv_dw", None)
        bn_dw = getattr(owner, "bn_dw", None)
        passes_through = type(bn_dw) is nn.Identity or (type(bn_dw) is FoldedBatchNorm and bn_dw.passes_through)
        if not (passes_through and GhostDepthwise.eligible(ghost, conv_dw)):
            continue
        merged = GhostDepthwise(ghost, conv_dw)
        if accelerator.rewire("merged", f"{_child_name(owner_name, 'ghost1')}+conv_dw", owner_name, owner,
                              [("ghost1", merged), ("conv_dw", MergedAway(merged, "depthwise"))]):
            ghost1_keys, conv_dw_keys = _child_name(owner_name, "ghost1."), _child_name(owner_name, "conv_dw.")
            accelerator.original_state_dicts.rename((ghost1_keys, ghost1_keys + "ghost."),
                                                    (conv_dw_keys, ghost1_keys + "depthwise."))


def _merge_squeeze_excite(accelerator):
    """A bottleneck's SE and the ghost2 it feeds become one SqueezeExciteGhost in ghost2's place
    (the SE product folded into ghost2's weights); se becomes its MergedAway placeholder."""
    for owner_name, owner in _owners_outside_ghost_modules(accelerator.model):
        se, ghost = getattr(owner, "se", None), getattr(owner, "ghost2", None)
        if se is None or not SqueezeExciteGhost.eligible(se, ghost):
            continue
        merged = SqueezeExciteGhost(se, ghost)
        if accelerator.rewire("merged", f"{_child_name(owner_name, 'se')}+ghost2", owner_name, owner,
                              [("ghost2", merged), ("se", MergedAway(merged, "se"))]):
            ghost2_keys, se_keys = _child_name(owner_name, "ghost2."), _child_name(owner_name, "se.")
            accelerator.original_state_dicts.rename((ghost2_keys, ghost2_keys + "ghost."),
                                                    (se_keys, ghost2_keys + "se."))


def _fuse_residual_adds(accelerator):
    """Every GhostNet bottleneck (GhostBottleneckResidual.eligible) becomes a
    GhostBottleneckResidual, whose ghost2 op adds the shortcut as it writes. Only where the
    self-check runs: the replacement computes what such a block's forward computes in the
    original code and timm, which a block of the same name and children in other code need not
    (an activation after the add, say), and only a probe of the block shows that."""
    blocks = [(name, m) for name, m in accelerator.model.named_modules() if GhostBottleneckResidual.eligible(m)]
    if blocks and accelerator.checker is None:
        accelerator.summary.skipped.append((f"{len(blocks)} GhostNet bottlenecks", "residual adds not fused into "
                                            "ghost2's op: that needs the self-check (check=True), which verifies "
                                            "each block's forward computes what the fused one does"))
        return
    for name, block in blocks:
        accelerator.replace("residual", _label(name), name, block,
                            lambda: GhostBottleneckResidual.from_block(block))


def _swap_children(accelerator, kind, eligible, swapped):
    """Every child of a module outside the Ghost modules that `eligible` accepts, replaced by
    `swapped(child)` and listed in the summary's `kind`. Checked on the owner: a fold may have
    given the child's name another function."""
    for owner_name, owner in _owners_outside_ghost_modules(accelerator.model):
        for child_name, child in list(owner._modules.items()):
            if eligible(child):
                accelerator.replace(kind, _child_name(owner_name, child_name), owner_name, child,
                                    lambda: swapped(child))


def accelerate(model, example_inputs=None, check=True, inplace=False):
    """Swap every Ghost module of `model` for a fused one; in eval mode also fold Conv+BN pairs,
    merge ghost1 with the depthwise conv it feeds and SE with the ghost2 it feeds, run the 1x1
    convs as matrix multiplies and, where the self-check runs, make each GhostNet bottleneck's
    residual add in its ghost2 op (GhostBottleneckResidual).

    check=True verifies every change on a probe before keeping it: the changed module's input
    in one forward of `example_inputs` (a tensor or a tuple of positional arguments) through
    the original model when given, else a random input of the right channel count and a
    small odd size; float64 where the module allows. The module's forward is compared, and its
    forward_intermediates (timm's feature API) where it has one the probe runs. A change whose
    output differs is undone and listed in `skipped` with the measured error. check=False skips
    this (it costs one probe forward per change) and keeps the BNs of modules that have
    forward_intermediates.

    Returns the model (a deep copy unless inplace=True) with the summary of what was done in
    its `acceleration_summary` attribute. Training-mode models keep their keys and Parameter
    objects and train with the original outputs, gradients and BN statistics: their Ghost
    modules run the batch-statistics op (ghost_train.py), their other depthwise convs
    DepthwiseConv2d and their other BNs TrainingBatchNorm2d; BN folding happens only in eval mode,
    where it changes the state-dict keys of the folded BNs and the merged modules (the original's
    state dicts still load: OriginalStateDicts), and the model no longer trains (FoldedBatchNorm).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"accelerate: model must be a torch.nn.Module, got {type(model).__name__}")
    if example_inputs is not None and not isinstance(example_inputs, (torch.Tensor, tuple)):
        raise TypeError("accelerate: example_inputs must be a tensor or a tuple of the model's positional "
                        f"arguments, got {type(example_inputs).__name__}")
    # Tensors made under inference_mode have no version counter (the folded-weight caches key
    # on it) and cannot be saved for backward: the copy, folds and probes are made outside it.
    with torch.inference_mode(False):
        return _accelerate(model, example_inputs, check, inplace)


def _wrapper_hint(model):
    """For the training-mode warning, where the model's BNs and Dropouts are all in eval mode: the likely cause."""
    mode_dependent = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)  # Dropout2d, AlphaDropout too
    layers = [m for m in model.modules() if isinstance(m, mode_dependent)]
    if not layers or any(m.training for m in layers):
        return ""
    return (f" (its BatchNorms and Dropouts are in eval mode: a wrapper such as this {type(model).__name__}, made "
            "around an eval-mode model, starts in training mode)")


def _accelerate(model, example_inputs, check, inplace):
    checker = _SelfCheck(model, example_inputs) if check else None
    if not inplace:
        model = deepcopy_module(model)
    summary = AccelerationSummary()
    accelerator = _Accelerator(model, summary, checker)
    _swap_ghost_modules(accelerator)
    if accelerator.model.training:
        # The same parameters (and BN buffers) on the direct conv's and the BN op's C++ forward
        # and backward: DepthwiseConv2d for conv_dw and the shortcuts', TrainingBatchNorm2d.
        _swap_children(accelerator, "depthwise", DepthwiseConv2d.eligible, DepthwiseConv2d.from_conv)
        _swap_children(accelerator, "batch_norms", TrainingBatchNorm2d.eligible, TrainingBatchNorm2d.from_batch_norm)
        warnings.warn("ghostkernels.accelerate: the model is in training mode, so only its Ghost modules (batch-"
                      "statistics BN fused), depthwise convs and BNs were swapped; Conv+BN folds, merges and 1x1 matmuls "
                      "happen only when accelerate() is given an eval-mode model: call model.eval() first for "
                      f"inference speed{_wrapper_hint(accelerator.model)}", stacklevel=3)
    else:
        # Merges last: they move modules under new names, which the self-check could not find
        # in the original model.
        _fold_conv_bn_pairs(accelerator)
        _swap_children(accelerator, "matmul", PointwiseConv2d.eligible, PointwiseConv2d.from_conv)
        _swap_children(accelerator, "matmul", PointwiseLinear.eligible, PointwiseLinear.from_linear)
        _merge_ghost_depthwise(accelerator)
        _merge_squeeze_excite(accelerator)
        _fuse_residual_adds(accelerator)
    if checker is not None:
        summary.check_seconds = checker.seconds
    if example_inputs is not None and not accelerator.model.training:
        summary.precompiled, summary.precompile_seconds = precompile_quietly(accelerator.model, example_inputs,
                                                                             "accelerate")
    if accelerator.original_state_dicts.steps:
        accelerator.model._register_load_state_dict_pre_hook(accelerator.original_state_dicts, with_module=True)
    accelerator.model.acceleration_summary = summary
    return accelerator.model
