"""GhostModule: the original module's structure and state-dict keys, the fused op in eval."""

import collections
import copy
import numbers
import sys
import warnings
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import _symbolic_trace as _fx_trace  # its _is_fx_tracing_flag
from torch.nn.modules import module as _global_hooks  # its _global_*_hooks dicts

from . import dfc_attention, ghost_train, ops
from .reference import check_activation, conv_output_format, dfc_gate, dfc_short_conv, output_memory_format


def is_same_square_conv(conv):
    """A Conv2d with a square odd kernel, 'same' zero padding, no dilation and equal strides:
    the geometry every fused op here assumes."""
    k = conv.kernel_size
    return (k[0] == k[1] and k[0] % 2 == 1 and conv.padding == (k[0] // 2,) * 2 and conv.dilation == (1, 1)
            and conv.stride[0] == conv.stride[1] and conv.padding_mode == "zeros")


def is_ghost_conv_pair(primary, cheap):
    """Whether a Ghost module's primary and cheap convs have the geometry its fused ops compute:
    'same' square convs (is_same_square_conv), the primary one of one group, the cheap one
    depthwise (whole multiples of channels a group) of stride 1 on the primary's outputs."""
    return (is_same_square_conv(primary) and is_same_square_conv(cheap) and primary.groups == 1
            and cheap.stride == (1, 1) and cheap.groups == cheap.in_channels == primary.out_channels
            and cheap.out_channels % cheap.groups == 0)


def same_conv_output_shape(x, weight, stride):
    """(N, C_out, ceil(H / stride), ceil(W / stride)): the output of a 'same' conv of x by weight
    (a 1x1 conv's too, which needs no padding)."""
    return (x.shape[0], weight.shape[0], *(-(-s // stride) for s in x.shape[2:]))


_lib = torch.library.Library("ghostkernels", "FRAGMENT")
_lib.define("pointwise_conv2d(Tensor x, Tensor weight, Tensor? bias, int stride=1, str activation=\"none\", "
            "Tensor? residual=None) -> Tensor")


def check_pointwise(op, x, weight, bias):
    """The C++ kernels' checks of a 1x1 conv's arguments (csrc/pointwise_conv_cpu.cpp), as ValueErrors."""
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be 4-D (N, C, H, W), got {x.dim()}-D")
    if x.shape[1] == 0:  # F.conv2d returns the bias there, the C++ GEMM refuses
        raise ValueError(f"{op}: x must have at least one channel, got {tuple(x.shape)}")
    if weight.dim() != 4 or tuple(weight.shape[1:]) != (x.shape[1], 1, 1):
        raise ValueError(f"{op}: weight must be (C_out, {x.shape[1]}, 1, 1), got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{op}: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")


def _check_pointwise_conv2d(x, weight, bias, stride, activation, residual):
    """pointwise_conv2d's checks (the C++ kernel's, as ValueErrors): check_pointwise's, and its
    stride, activation and residual's device (its shape and dtype are the add's business)."""
    check_pointwise("pointwise_conv2d", x, weight, bias)
    if stride < 1:
        raise ValueError(f"pointwise_conv2d: stride must be >= 1, got {stride}")
    check_activation("pointwise_conv2d", activation)
    if residual is not None and residual.device != x.device:
        raise ValueError(f"pointwise_conv2d: residual must be on {x.device} as x, got {residual.device}")


def _pointwise_composed(x, weight, bias, stride=1, activation="none", residual=None):
    """act(conv(x) + residual): the add out of place, so a residual that broadcasts or has another
    dtype gives the add's shape and dtype, as the graph freeze() fuses it from did."""
    out = F.conv2d(x, weight, bias, stride)
    if residual is not None:
        out = out + residual
    if activation == "relu":
        out = torch.relu(out)
    # The fake kernel's layout whatever the weight's (the library conv's output follows both)
    return out.contiguous(memory_format=conv_output_format(x))


@torch.library.register_fake("ghostkernels::pointwise_conv2d")
def _pointwise_fake(x, weight, bias, stride=1, activation="none", residual=None):
    _check_pointwise_conv2d(x, weight, bias, stride, activation, residual)
    out = x.new_empty(same_conv_output_shape(x, weight, stride))
    if residual is not None:
        out = out + residual  # the add's shape and dtype, and its errors
    return out.contiguous(memory_format=conv_output_format(x))


@torch.library.impl(_lib, "pointwise_conv2d", "CompositeExplicitAutograd")
def _pointwise_fallback(x, weight, bias, stride=1, activation="none", residual=None):
    _check_pointwise_conv2d(x, weight, bias, stride, activation, residual)
    return _pointwise_composed(x, weight, bias, stride, activation, residual)
ops.register_recompute_autograd("pointwise_conv2d", _pointwise_composed)


class PointwiseConv2d(nn.Conv2d):
    """A 1x1 conv (any stride) that runs as a matrix multiply on the CPU, `ghostkernels::pointwise_conv2d`
    (csrc/pointwise_conv_cpu.cpp): a register-tiled GEMM into the output cache on NCHW maps
    (strided ones gathered first: a ResNet or RegNet downsample shortcut), on
    pooled 1x1 maps (SE's conv_reduce/conv_expand, conv_head) MKL's GEMV, or float32 dot
    products (in the AVX2 build, and under torch.set_float32_matmul_precision("medium")). oneDNN's conv reorders NCHW
    inputs and weights on every call and costs up to several times that (measured in GhostNet's
    shortcuts and heads). Same parameters and keys; other inputs take the conv."""

    __prepare_scriptable__ = ops.refuse_torchscript

    @staticmethod
    def eligible(conv):
        return (type(conv) is nn.Conv2d and conv.kernel_size == (1, 1) and is_same_square_conv(conv)
                and conv.groups == 1)

    @classmethod
    def from_conv(cls, conv):
        pointwise = cls(conv.in_channels, conv.out_channels, 1, conv.stride, bias=conv.bias is not None,
                        device="meta")
        pointwise.weight, pointwise.bias = conv.weight, conv.bias
        return pointwise.train(conv.training)

    def forward(self, x):
        refuse_fx_proxy(self, x)
        # channels_last takes the conv, which keeps it; a channel slice of a batch (G-GhostNet's
        # inner blocks) the op, whose kernel reads each image in place
        if x.dim() != 4 or not x.is_cpu or (x.is_contiguous(memory_format=torch.channels_last)
                                                      and not x.is_contiguous()):
            return super().forward(x)
        return ops.call(torch.ops.ghostkernels.pointwise_conv2d, x, self.weight, self.bias, self.stride[0])


def without_epilogue(node):
    """Whether a `pointwise_conv2d` graph node (a trace records all six arguments) has no
    activation and no residual."""
    _, _, _, _, activation, residual = node.inputs()
    return ops.graph_constant(activation) == "none" and isinstance(residual.type(), torch._C.NoneType)


def fuse_pointwise_epilogues(graph):
    """Rewrites a TorchScript graph in place, for freeze(): a `pointwise_conv2d` whose output only
    an add (alpha 1) of another tensor reads takes that tensor as its residual, and one whose
    output (or that add's) only a ReLU reads takes the ReLU: a ResNet or RegNet block's last 1x1
    conv, its shortcut's add and the ReLU after them become one op (the output written once), its
    first 1x1 conv and ReLU another. The op adds out of place (the result's dtype promoted); after
    an in-place add (`out += identity`, the original G-GhostNet's and torchvision's blocks), whose
    result keeps the conv's dtype, a `type_as` of x (nothing where the dtypes agree) keeps it too.
    Returns the number of adds and ReLUs fused."""

    def conv_of(value):
        node = value.node()
        ready = node.kind() == "ghostkernels::pointwise_conv2d" and len(value.uses()) == 1 and without_epilogue(node)
        return node if ready else None

    def only_relu_of(value):
        uses = value.uses()
        return uses[0].user if len(uses) == 1 and uses[0].user.kind() in ops.GRAPH_ACTIVATIONS else None

    def fuse(conv, residual, chain):
        activation = graph.insertConstant(ops.GRAPH_ACTIVATIONS.get(chain[-1].kind(), "none"))
        activation.node().moveBefore(chain[-1])
        in_place = chain[1].kind() == "aten::add_"
        x = conv.inputsAt(0)
        node = ops.replace_chain(graph, "ghostkernels::pointwise_conv2d",
                                 [*list(conv.inputs())[:4], activation, residual], chain)
        if in_place:
            cast = graph.create("aten::type_as", [node.output(), x], 1)
            cast.copyMetadata(node)
            cast.insertAfter(node)
            cast.output().setType(node.output().type())
            node.output().replaceAllUsesWith(cast.output())
            cast.replaceInput(0, node.output())

    fused = 0
    # Node lists taken before each rewrite pass: a pass destroys only the node it visits and
    # nodes of other kinds.
    adds = [n for n in graph.nodes() if n.kind() in ("aten::add", "aten::add_") and len(list(n.inputs())) == 3]
    for add in adds:
        a, b, alpha = add.inputs()
        if ops.graph_constant(alpha) != 1 or not all(isinstance(v.type(), torch._C.TensorType) for v in (a, b)):
            continue  # add.Scalar has a number for b
        # a + b == b + a: either operand may be the conv's (the one add_ writes, in place). A
        # constant (x + 3, traced as a tensor) would be a residual that broadcasts: the add after
        # the GEMM, no gain.
        conv, residual = conv_of(a), b
        if conv is None and add.kind() == "aten::add":
            conv, residual = conv_of(b), a
        if conv is None or residual.node().kind() == "prim::Constant":
            continue
        relu = only_relu_of(add.output())
        fuse(conv, residual, [conv, add] + ([relu] if relu is not None else []))
        fused += 1 + (relu is not None)
    for relu in [n for n in graph.nodes() if n.kind() in ops.GRAPH_ACTIVATIONS]:
        conv = conv_of(relu.inputsAt(0))
        if conv is None:
            continue
        none = graph.insertConstant(None)
        none.node().moveBefore(relu)
        fuse(conv, none, [conv, relu])
        fused += 1
    return fused


class PointwiseLinear(nn.Linear):
    """An eval-mode nn.Linear (a classifier) through `ghostkernels::pointwise_conv2d` on the CPU,
    as a 1x1 conv of a 1x1 map: MKL's GEMV as F.linear, except in the AVX2 build (float32 dot
    products, measured faster there) and under
    torch.set_float32_matmul_precision("medium"), where ATen's linear converts the weight to
    bfloat16 on every call (torch 2.13, GhostNet's classifier at batch 1: 2.1x slower) and the op
    keeps float32 dot products. Same parameters and keys; other inputs take F.linear."""

    __prepare_scriptable__ = ops.refuse_torchscript

    @staticmethod
    def eligible(linear):
        return type(linear) is nn.Linear and not linear.training

    @classmethod
    def from_linear(cls, linear):
        pointwise = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        pointwise.weight, pointwise.bias = linear.weight, linear.bias
        return pointwise.train(linear.training)

    def forward(self, x):
        if x.dim() != 2 or not x.is_cpu or not x.is_contiguous():
            return super().forward(x)
        return ops.call(torch.ops.ghostkernels.pointwise_conv2d, x[:, :, None, None], self.weight[:, :, None, None],
                        self.bias).flatten(1)


def eager_module(module):
    """The module that a torch.compile wrapper (OptimizedModule) holds, else `module`: what
    accelerate()'s probes run (through the wrapper, each probe of a changed model compiled it anew:
    accelerate(torch.compile(GhostNet 0.5x)) took 18.1 s of checks, 1.1 s now) and freeze() traces
    (torch.jit.trace refuses a compiled function)."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # not imported: no module is compiled
    return module._orig_mod if eval_frame is not None and isinstance(module, eval_frame.OptimizedModule) else module


_EMPTY_CONTAINERS = (dict, collections.OrderedDict, set)


def deepcopy_module(module):
    """copy.deepcopy of a module, also where torch.nn.utils.prune or the old
    torch.nn.utils.weight_norm left a computed (non-leaf) weight as an attribute, which deepcopy
    refuses: the copy holds its value, detached, until its own forward pre-hook recomputes it.
    The empty containers every module holds (a dozen hook dicts) get fresh empty ones up front,
    as deepcopy would give them: it rebuilds each through __reduce_ex__, 40% of the time it takes
    to copy a GhostNet, and accelerate()'s self-check copies a scope for every change."""
    memo = {}
    for m in module.modules():
        for value in vars(m).values():
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
            elif type(value) in _EMPTY_CONTAINERS and not value:
                memo[id(value)] = type(value)()
    return copy.deepcopy(module, memo)


def is_int(value):
    """An integer (numpy's too), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _odd_size(name, size):
    """A square kernel size given as k or (k, k), k odd and positive."""
    if isinstance(size, (tuple, list)) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if not is_int(size):
        raise TypeError(f"GhostModule: {name} must be an int or a square pair (k, k), got {size!r}")
    if size < 1 or size % 2 == 0:
        raise ValueError(f"GhostModule: {name} must be a positive odd integer, got {size}")
    return size


def hook_dicts(module):
    """The dicts of `module`'s forward, forward-pre, backward and backward-pre hooks."""
    return (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks)


def recomputes_a_weight(hook):
    """Whether `hook` is torch.nn.utils.prune's or the old weight_norm's forward pre-hook, which
    recomputes a weight from the module's parameters before each call."""
    return type(hook).__module__ in ("torch.nn.utils.prune", "torch.nn.utils.weight_norm")


def intercepted(module):
    """Whether calling `module` may run code other than its class's forward: a hook, or a forward
    set on the instance (HF accelerate's add_hook_to_module, a monkeypatch)."""
    return any(hook_dicts(module)) or "forward" in module.__dict__


def global_module_hooks():
    """Whether a global module hook is registered (register_module_forward_hook and the like)."""
    return bool(_global_hooks._global_forward_hooks or _global_hooks._global_forward_pre_hooks
                or _global_hooks._global_backward_hooks or _global_hooks._global_backward_pre_hooks)


def hooks_inside(module):
    """Whether a module inside `module` (not `module` itself) is intercepted (a hook, or a forward
    set on the instance), or a global module hook is registered (register_module_forward_hook:
    torch.utils.module_tracker, say), which a fused op that computes those layers without calling
    them would skip: a fused module with one runs its layers in turn, as the original does
    (accelerate() leaves such modules unfused; this covers what is registered after it).
    intercepted() inlined, its dicts read directly: ~4 us a call for a Ghost module's eight
    submodules, ~0.15 ms of an accelerated GhostNet 1.0x forward (Zen 3)."""
    if global_module_hooks():
        return True
    inside = [*module._modules.values()]
    for inner in inside:  # breadth first: the loop reaches what it appends
        if inner is not None:
            if (inner._forward_hooks or inner._forward_pre_hooks or inner._backward_hooks or inner._backward_pre_hooks
                    or "forward" in inner.__dict__):
                return True
            inside += inner._modules.values()
    return False


class MergedAway(nn.Identity):
    """What accelerate() leaves in the place of a module it merged into a sibling: a bottleneck's
    conv_dw (now ghost1.depthwise, a GhostDepthwise's) and se (now ghost2.se, a
    SqueezeExciteGhost's). The merged op applies the module, so this passes its input through.
    A hook on this placeholder or on the merged sibling (a feature extractor, a summary tool that
    hooks every module) would then see tensors the original model never had: while there is one,
    the two split (split_off) and each runs its own module, as in the original. So they do for
    good once either place is given another module (acceleration.check_reassignment)."""

    separated = False  # a class-level default: placeholders pickled before it existed load with it

    def __init__(self, merged, name):
        super().__init__()
        self.name = name  # the module's attribute in `merged`
        # plain attributes, not children: the module tree and the state-dict keys stay as they are
        self.__dict__["merged"] = merged
        merged.__dict__["placeholder"] = self

    def forward(self, x):
        return getattr(self.merged, self.name)(x) if split_off(self.merged) else x

    def extra_repr(self):
        return f"merged into its sibling {type(self.merged).__name__} as its {self.name}"


def split_off(merged):
    """Whether `merged` leaves out the module merged into it, which its placeholder (MergedAway)
    then runs: once either has been replaced in the model, while a hook is on either of them, or
    while a global module hook is registered."""
    placeholder = merged.__dict__.get("placeholder")
    return placeholder is not None and (placeholder.separated or intercepted(merged) or intercepted(placeholder)
                                        or global_module_hooks())


def refuse_fx_proxy(module, x):
    """A TypeError that says how to trace with torch.fx when x is its proxy: the fused modules pick
    their kernels by the tensors' dtype, device and layout, which a symbolic trace does not have."""
    if isinstance(x, torch.fx.Proxy):
        raise TypeError(
            f"{type(module).__name__}: torch.fx's symbolic trace cannot go through the fused modules (each picks its "
            "kernel by the tensors' dtype, device and layout): trace them as leaves (a Tracer whose is_leaf_module "
            "is true for modules from ghostkernels; torchvision's create_feature_extractor takes them as "
            "tracer_kwargs={'leaf_modules': [...]}), or trace the original model")


def check_input(module, x, weight):
    """x must be what a module whose first conv has `weight` takes: a ValueError or TypeError
    naming x otherwise (the fused ops skip the argument checks of ghostkernels.ghost_module).
    One combined test on the hot path; the message is worked out only on failure."""
    if (isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[1] == weight.shape[1]
            and x.dtype is weight.dtype and x.device == weight.device):
        return
    name = type(module).__name__
    refuse_fx_proxy(module, x)
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: x must be a 4-D tensor (N, C, H, W), got {shape}")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"{name}: x has {x.shape[1]} channels, expected {weight.shape[1]}")
    if x.device == weight.device and torch.is_autocast_enabled(x.device.type):
        return  # autocast's dtype and the weights' meet in ops.call
    raise TypeError(f"{name}: x is {x.dtype} on {x.device}, the module's weights are {weight.dtype} on "
                    f"{weight.device}; they must match")


def fold_conv_bn(conv, bn):
    """(W * t, (b - mean) * t + beta) with t = gamma / sqrt(var + eps): the BN after a conv
    folded into it (b: the conv's bias or 0), in the conv's dtype, as the conv's output and the
    BN's are. Computed in float32 at least and rounded once: a float16/bfloat16 conv's BN may
    keep float32 values (mixed-precision recipes do), and (b - mean) * t in 16 bits loses digits.
    bn=None returns the conv's own weight and bias."""
    if bn is None:
        return conv.weight, conv.bias
    dtype = conv.weight.dtype
    compute = torch.promote_types(torch.promote_types(dtype, bn.running_var.dtype), torch.float32)
    scale = torch.rsqrt(bn.running_var.to(compute) + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(compute)
    mean = bn.running_mean.to(compute)
    bias = -mean if conv.bias is None else conv.bias.to(compute) - mean
    bias = bias * scale
    if bn.bias is not None:
        bias = bias + bn.bias.to(compute)
    return (conv.weight.to(compute) * scale.reshape(-1, 1, 1, 1)).to(dtype), bias.to(dtype)


def _pair_sources(conv, bn):
    """What fold_conv_bn reads of a (conv, BN or None) pair: the conv's weight and bias and the
    BN's weight, bias, running mean and variance (None where absent), and the BN's eps (None: no
    BN). Direct dict reads, as in GhostModule._fold_sources."""
    weights = conv._parameters
    if bn is None:
        return (weights["weight"], weights.get("bias"), None, None, None, None), None
    parameters, buffers = bn._parameters, bn._buffers
    return (weights["weight"], weights.get("bias"), parameters.get("weight"), parameters.get("bias"),
            buffers["running_mean"], buffers["running_var"]), bn.eps


class _CachedFold(torch.autograd.Function):
    """A Ghost module's cached folded weights, differentiable in the tensors they were folded from
    (_pair_sources, six a pair). An eval-mode call with autograd (saliency, frozen-BN fine-tuning,
    or a forward simply run outside no_grad) takes the cache as a no_grad call does, instead of
    folding every BN anew (GhostNet 1.0x at batch 1: ~35% of such a forward); the backward folds
    again, with autograd, for the vector-Jacobian product, itself differentiable (create_graph=True)."""

    @staticmethod
    def forward(ctx, folded, eps, *sources):  # ctx here: a setup_context costs an inspect.signature a call
        ctx.eps = eps
        ctx.save_for_backward(*sources)
        # new tensors on the cache's storage: the graph's outputs, the cache itself untouched
        return tuple(t.detach() if t is not None else None for t in folded)

    @staticmethod
    def backward(ctx, *grads):
        sources, create_graph = ctx.saved_tensors, torch.is_grad_enabled()
        with torch.enable_grad():
            folded = []
            for k, eps in enumerate(ctx.eps):
                weight, bias, gamma, beta, mean, var = sources[6 * k:6 * k + 6]
                bn = None if eps is None else SimpleNamespace(weight=gamma, bias=beta, running_mean=mean,
                                                              running_var=var, eps=eps)
                folded += fold_conv_bn(SimpleNamespace(weight=weight, bias=bias), bn)
        inputs = [i for i, t in enumerate(sources) if t is not None and ctx.needs_input_grad[2 + i]]
        used = [(f, g) for f, g in zip(folded, grads) if f is not None and g is not None and f.requires_grad]
        result = [None] * len(sources)
        if inputs and used:
            found = torch.autograd.grad([f for f, _ in used], [sources[i] for i in inputs], [g for _, g in used],
                                        allow_unused=True, create_graph=create_graph)
            for i, g in zip(inputs, found):
                result[i] = g
        return (None, None, *result)


def activation_name(module):
    """'relu', 'none', or None for an activation the fused ops do not have. Exact types: a
    subclass may compute something else."""
    if type(module) is nn.ReLU:
        return "relu"
    if type(module) is nn.Identity or (type(module) is nn.Sequential and len(module) == 0):
        return "none"
    return None


def _conv_bn_act(sequential, activation):
    """(conv, BN) of a Sequential (Conv2d, BatchNorm2d[, activation]) whose activation is
    `activation` ("relu" or "none"), exact types; None for anything else."""
    modules = list(sequential)
    if len(modules) not in (2, 3) or type(modules[0]) is not nn.Conv2d or type(modules[1]) is not nn.BatchNorm2d:
        return None
    if (activation_name(modules[2]) if len(modules) == 3 else "none") != activation:
        return None
    return modules[0], modules[1]


def _of_dtype(bn, dtype):
    """Whether a BN's values are of `dtype` (the op takes one dtype; nn.BatchNorm2d also takes
    float32 values for 16-bit inputs, as mixed-precision recipes keep them)."""
    return all(t.dtype == dtype for t in (bn.weight, bn.running_mean, bn.running_var) if t is not None)


def _gamma_beta(bn, x):
    """A BN's weight and bias; ones and zeros (x's dtype and device) for a BN without them."""
    if bn.weight is not None:
        return bn.weight, bn.bias
    return x.new_ones(bn.num_features), x.new_zeros(bn.num_features)


class GhostModule(nn.Module):
    """GhostNet's Ghost module (docs/math.md section 1) with the original attribute and state-dict names.

    Training mode (and BNs without running statistics) runs the fused batch-statistics op,
    ghostkernels::ghost_module_train, and updates the running statistics as nn.BatchNorm2d does,
    where it has a kernel (C++ on the CPU, Triton on CUDA, no autocast); elsewhere the original
    layers. Eval mode folds both BNs into the convs and runs the fused op; the folded weights are
    cached and refreshed whenever a parameter or buffer changes.
    """

    __prepare_scriptable__ = ops.refuse_torchscript

    def __init__(self, inp, oup, kernel_size=1, ratio=2, dw_size=3, stride=1, relu=True):
        super().__init__()
        for name, value in (("inp", inp), ("oup", oup), ("ratio", ratio), ("stride", stride)):
            if not is_int(value):
                raise TypeError(f"GhostModule: {name} must be an int, got {type(value).__name__}")
        if ratio < 2:
            raise ValueError(f"GhostModule: ratio must be an integer >= 2, got {ratio}")
        kernel_size, dw_size = _odd_size("kernel_size", kernel_size), _odd_size("dw_size", dw_size)
        if inp < 1 or oup < 1 or stride < 1:
            raise ValueError(f"GhostModule: inp, oup and stride must be >= 1, got {inp}, {oup}, {stride}")
        if not isinstance(relu, bool):
            raise TypeError(f"GhostModule: relu must be a bool, got {type(relu).__name__}")
        self.oup = oup
        init_channels = ops.intrinsic_channels(oup, ratio)
        new_channels = init_channels * (ratio - 1)
        self.init_channels, self.new_channels = init_channels, new_channels
        self.stride = stride
        self.activation = "relu" if relu else "none"

        def act():
            return nn.ReLU(inplace=True) if relu else nn.Identity()

        self.primary_conv = nn.Sequential(
            nn.Conv2d(inp, init_channels, kernel_size, stride, kernel_size // 2, bias=False),
            nn.BatchNorm2d(init_channels),
            act(),
        )
        self.cheap_operation = nn.Sequential(
            nn.Conv2d(init_channels, new_channels, dw_size, 1, dw_size // 2, groups=init_channels, bias=False),
            nn.BatchNorm2d(new_channels),
            act(),
        )
        self._folded = None
        self._folded_key = None

    @classmethod
    def from_parts(cls, primary_conv, cheap_operation, oup, activation):
        """A GhostModule around existing `primary_conv` and `cheap_operation` Sequentials
        (Conv2d, optional BatchNorm2d, optional activation), sharing their parameters: how
        ghostkernels.accelerate adopts Ghost modules of other code bases."""
        conv, cheap = primary_conv[0], cheap_operation[0]
        with torch.device("meta"):  # layers about to be replaced: no memory, no random initialisation
            module = cls(conv.in_channels, oup, conv.kernel_size[0], cheap.out_channels // conv.out_channels + 1,
                         cheap.kernel_size[0], conv.stride[0], activation == "relu")
        module.primary_conv, module.cheap_operation = primary_conv, cheap_operation
        module.init_channels, module.new_channels = conv.out_channels, cheap.out_channels
        return module

    def _conv_bn(self, sequential):
        """(conv, BN or None) of a branch that is a Conv2d (or one with parametrised weights), an
        optional BatchNorm2d and the module's activation (or none), exact types; None for anything
        else, which the fused op would not compute: a SyncBatchNorm (convert_sync_batchnorm), a
        ReLU6, an added layer. Direct dict reads, as in _fold_sources: nn.Module's attribute
        lookup of a submodule costs ~0.7 us."""
        conv, *rest = sequential._modules.values() or (None,)
        if type(conv) is not nn.Conv2d and not (type(conv).__bases__ == (nn.Conv2d,)
                                                 and "parametrizations" in conv._modules):
            return None
        bn = None
        if rest and type(rest[0]) is nn.BatchNorm2d:
            bn, rest = rest[0], rest[1:]  # not rest.pop(0): torch 2.6's dynamo takes rest for a tuple
        if len(rest) > 1 or (activation_name(rest[0]) if rest else "none") != self.activation:
            return None
        return conv, bn

    def _conv_bn_pairs(self):
        """The (conv, BN or None) pairs whose folded weights the eval forward uses, or None when a
        branch holds something the fused op does not compute (_conv_bn, _fused_geometry)."""
        modules = self._modules
        pairs = [self._conv_bn(modules["primary_conv"]), self._conv_bn(modules["cheap_operation"])]
        return None if None in pairs or not self._fused_geometry(pairs[0][0], pairs[1][0]) else pairs

    def _fused_geometry(self, primary, cheap):
        """Whether the convs are the fused op's (is_ghost_conv_pair) at this module's stride. A conv
        replaced or edited otherwise (a dilated or reflect-padded cheap conv: 0.9 off on unit
        inputs) runs as it is."""
        return is_ghost_conv_pair(primary, cheap) and primary.stride[0] == self.stride

    def _fold(self):
        return tuple(t for conv, bn in self._conv_bn_pairs() for t in fold_conv_bn(conv, bn))

    def train(self, mode=True):
        # Training updates the BN statistics in place without bumping their version (the fold's
        # key has num_batches_tracked's for BNs switched alone): every train/eval switch refolds.
        self._folded_key = None
        return super().train(mode)

    def folded_weights(self):
        """(W1, b1, W2, b2, ...) with the BNs folded in (eval mode), or None when a BN normalises
        with batch statistics (it keeps no running statistics, or is in training mode), when a
        branch holds layers the fused op does not compute (_conv_bn) and when a layer inside has a
        hook (hooks_inside): the layers then run in turn.

        Cached while every input of the fold keeps its storage and version (in-place updates,
        load_state_dict and .to() change one or the other) and its BN eps, and until the next
        train()/eval() call. Edits through `.data` bypass the version counter: call eval()
        again after one. Where autograd needs the result, the cache goes through _CachedFold,
        which differentiates the fold in the backward. Folded anew on every call under
        torch.compile and torch.jit.trace (whose graph then folds from the parameters: the
        same graph on every invocation, as trace's check wants, and one that follows a later
        load_state_dict), and for parametrised convs (weight_norm), whose weight is computed."""
        return None if hooks_inside(self) else self._unhooked_folded_weights()

    def _unhooked_folded_weights(self):
        """folded_weights once the caller has found no hook inside this module (merged_weights'
        check of the merged module covers it)."""
        sources = self._fold_sources()
        if sources is None:
            return None
        tensors, eps, cacheable, pairs = sources
        # no cache under a trace: torch.fx's would leave its proxies in it (check_input then refuses the proxy x)
        if not cacheable or torch.compiler.is_compiling() or torch.jit.is_tracing() or _fx_trace._is_fx_tracing_flag:
            return self._fold()
        try:
            key = [(t.data_ptr(), t._version) for t in tensors]
        except RuntimeError:  # an inference tensor's _version raises, a torch.func wrapper's data_ptr too
            if not any(t.is_inference() for t in tensors):
                return self._fold()
            warnings.warn(f"{type(self).__name__}: its parameters or buffers were created under torch.inference_mode, "
                          "so they have no version counter to detect in-place updates by: the BatchNorms are folded "
                          "again on every call (slower). Create or load the model outside inference_mode, or "
                          "accelerate a copy (ghostkernels.accelerate without inplace=True)", stacklevel=3)
            return self._fold()
        key.append(eps)
        if key != self._folded_key:
            # Plain tensors even under inference_mode, so that a later autograd call can save them.
            with torch.inference_mode(False), torch.no_grad():  # in that order: the first enables grad
                self._folded = tuple(t.contiguous() if t is not None else None for t in self._fold())
            self._folded_key = key
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            per_pair = [_pair_sources(conv, bn) for conv, bn in pairs]
            return _CachedFold.apply(self._folded, [e for _, e in per_pair], *(t for p, _ in per_pair for t in p))
        return self._folded

    def _fold_sources(self):
        """(the tensors the folded weights depend on, the BNs' eps, whether the fold can be
        cached, the (conv, BN or None) pairs they come from), or None if a BN normalises by batch
        statistics (no running statistics, or in training mode inside this eval-mode module:
        test-time adaptation's BNs) or a branch holds other layers (_conv_bn). Direct dict reads:
        this runs on every eval call."""
        tensors, eps, cacheable = [], [], True
        pairs = self._conv_bn_pairs()
        if pairs is None:
            return None
        for conv, bn in pairs:
            cacheable = cacheable and "parametrizations" not in conv._modules
            tensors += [t for t in conv._parameters.values() if t is not None]
            if bn is not None:
                parameters, buffers = bn._parameters, bn._buffers
                if bn.training or buffers.get("running_mean") is None:  # it normalises by batch statistics
                    return None
                # num_batches_tracked: a training-mode BN forward updates the running statistics in
                # place without bumping their version, but bumps this counter's
                tensors += [t for t in (parameters["weight"], parameters["bias"], buffers["running_mean"],
                                        buffers["running_var"], buffers.get("num_batches_tracked")) if t is not None]
                eps.append(bn.eps)
        return tensors, eps, cacheable, pairs

    def forward(self, x):
        folded = None if self.training else self.folded_weights()
        if folded is not None:
            check_input(self, x, folded[0])
            return ops.apply(x, *folded[:4], self.oup, self.stride, self.activation)
        first = next(iter(self.primary_conv._modules.values()), None)
        if isinstance(first, nn.Conv2d):  # a branch edited to start otherwise runs its layers, with their errors
            check_input(self, x, first.weight)
        out = self.batch_statistics_forward(x)
        if out is not None:
            return out
        x1 = self.primary_conv(x)
        x2 = self.cheap_operation(x1)
        # in x's layout, as the ops return it: out_channels below init + new cut a view
        return torch.cat([x1, x2], dim=1)[:, : self.oup].contiguous(memory_format=output_memory_format(x))

    def ghost_op_inputs(self, x):
        """(SE scale or None, folded weights, Ghost module) of the Ghost op this module runs on x,
        or None where it runs its layers: what a caller that fuses a following add into the op
        (ghost_residual.GhostBottleneckResidual) needs. Exact type only: a subclass's op differs."""
        folded = merged_weights(self, self, x) if type(self) is GhostModule else None
        return None if folded is None else (None, folded, self)

    def batch_statistics_forward(self, x):
        """The output when both BNs normalise by batch statistics (training mode, or no running
        statistics), through ghostkernels::ghost_module_train, which updates the running statistics; None
        where that op has no kernel (ghost_train.has_kernel: C++ on the CPU, Triton on CUDA, no
        autocast), where the branches are not Conv2d (no bias), BatchNorm2d and the module's
        activation, exact types, where a layer inside has a hook, and for one value per channel."""
        if not ghost_train.has_kernel(x) or ops.onnx_exporting() or hooks_inside(self):
            return None
        primary, cheap = _conv_bn_act(self.primary_conv, self.activation), _conv_bn_act(self.cheap_operation,
                                                                                           self.activation)
        if primary is None or cheap is None:
            return None
        (conv, bn1), (cheap_conv, bn2) = primary, cheap
        if (conv.bias is not None or cheap_conv.bias is not None or not is_ghost_conv_pair(conv, cheap_conv)
                or not (ghost_train.uses_batch_statistics(bn1) and ghost_train.uses_batch_statistics(bn2))
                or not (_of_dtype(bn1, x.dtype) and _of_dtype(bn2, x.dtype))):  # float32 BNs of a float16 model
            return None
        batch, _, height, width = ops.output_shape(x, conv.weight, self.oup, conv.stride[0])
        if batch * height * width <= 1:  # the original layers raise BatchNorm's own error
            return None
        mean1, var1, momentum1 = ghost_train.running_statistics(bn1)
        mean2, var2, momentum2 = ghost_train.running_statistics(bn2)
        return torch.ops.ghostkernels.ghost_module_train(
            x, conv.weight, *_gamma_beta(bn1, x), cheap_conv.weight, *_gamma_beta(bn2, x), self.oup, conv.stride[0],
            self.activation, bn1.eps, bn2.eps, mean1, var1, mean2, var2, momentum1, momentum2)[0]

    def extra_repr(self):
        return f"oup={self.oup}, init={self.init_channels}, new={self.new_channels}, activation={self.activation}"


def merged_weights(merged, ghost, x):
    """The folded weights of `ghost` when `merged` (ghost merged with a neighbouring module into
    one op) can run that op on x, or None to run the two modules in turn (training mode, BN
    without running statistics, a CPU dtype the kernels lack, a hook inside `merged`)."""
    folded = None if merged.training or hooks_inside(merged) else ghost._unhooked_folded_weights()
    if folded is None:
        return None
    check_input(merged, x, folded[0])
    return None if x.is_cpu and not ops.cpu_kernel_takes(x) else folded


def conv_bn_sequence(sequential):
    """[(conv, BN or None), ...] of a Sequential of nn.Conv2d layers each optionally followed by
    an nn.BatchNorm2d (exact types: a subclass may compute something else), or None if it holds
    anything else."""
    modules, pairs = list(sequential), []
    while modules:
        conv = modules.pop(0)
        if type(conv) is not nn.Conv2d:
            return None
        bn = modules.pop(0) if modules and type(modules[0]) is nn.BatchNorm2d else None
        pairs.append((conv, bn))
    return pairs


class GhostModuleV2(GhostModule):
    """GhostNetV2's Ghost module in 'attn' mode (also GhostNetV3's 'shortcut' mode): the Ghost
    output times the DFC attention gate sigmoid(short_conv(avg_pool2d(x, 2))), nearest-upsampled.

    Keys: those of GhostModule plus `short_conv.0-5` (1x1 conv to oup, depthwise 1x5, depthwise
    5x1, each followed by BN, no activation). In eval the gate's logits are one op on the folded
    convs at the pooled resolution (`dfc_logits`) and the fused op applies sigmoid, upsampling
    and the product as it writes the output.
    """

    def __init__(self, inp, oup, kernel_size=1, ratio=2, dw_size=3, stride=1, relu=True):
        super().__init__(inp, oup, kernel_size, ratio, dw_size, stride, relu)
        self.short_conv = dfc_short_conv(inp, oup, kernel_size, stride)

    def _conv_bn_pairs(self):
        pairs, gate = super()._conv_bn_pairs(), conv_bn_sequence(self._modules["short_conv"])
        return None if pairs is None or gate is None else pairs + gate

    def forward(self, x):
        folded = None if self.training else self.folded_weights()
        if folded is None:
            out = super().forward(x)
            return out * dfc_gate(self.short_conv, x, out.shape[-2:])
        check_input(self, x, folded[0])
        logits = dfc_attention.dfc_logits(x, conv_bn_sequence(self.short_conv), folded[4:])
        return ops.apply(x, *folded[:4], self.oup, self.stride, self.activation, logits)
