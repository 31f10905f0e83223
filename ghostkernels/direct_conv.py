"""Direct k x k conv (+bias, then a ReLU or none), stride 1 or 2, 'same' padding:
`ghostkernels::direct_conv2d`.

What a stride-2 `conv_dw` + `bn_dw`, a shortcut's depthwise conv + BN, or the 3-channel stem
conv + BN become once accelerate() folds the BN: convs whose groups read few channels
(groups = C / weight.shape[1], or the op's `groups`, which the library's modules pass: x's
channel count is then checked, as the conv they replace checks it). freeze() gives the stem's op
the ReLU that follows it (fuse_direct_conv_relus): one pass over the 112x112 output instead of
two. The C++ CPU kernel (csrc/direct_conv_cpu.cpp) serves NCHW float32/64 with at most 4 input
channels per group (a channels_last stem is made NCHW for it) and hands other convs and layouts
to at::conv2d; on CUDA a Triton kernel (triton_direct_conv.py) serves channels_last inputs, the
bias and ReLU in its stores; elsewhere the fallback is the library conv itself. The output is
NCHW on the CPU and keeps x's layout elsewhere (reference.conv_output_format).
"""

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from . import _backends, ops
from .modules import is_same_square_conv, same_conv_output_shape
from .reference import ACTIVATIONS, check_activation, conv_backward, conv_output_format, same_padding

_lib = torch.library.Library("ghostkernels", "FRAGMENT")
_lib.define("direct_conv2d(Tensor x, Tensor weight, Tensor? bias, int stride, str activation=\"none\", "
            "int? groups=None) -> Tensor")
# (grad_x, grad_weight, grad_bias); the C++ kernel serves depthwise convs (csrc/direct_conv_cpu.cpp).
_lib.define("direct_conv2d_backward(Tensor grad, Tensor x, Tensor weight, int stride) -> (Tensor, Tensor, Tensor)")

# The most input channels per group the C++ kernel takes (csrc/direct_conv_cpu.cpp): any conv,
# and convs of more than one group (shifted GEMMs).
MAX_GROUP_INPUTS = 4
MAX_SHIFTED_GROUP_INPUTS = 64


def _groups(x, weight):
    return x.shape[1] // weight.shape[1]


def _check(x, weight, bias, stride, activation, groups=None):
    """The C++ kernel's argument errors (csrc/direct_conv_cpu.cpp), raised alike by the fake kernel,
    the library fallback and the CUDA kernel: the library conv would raise other ones or none (an
    even kernel, a stride of 3). Without `groups` any multiple of weight.shape[1] channels is a
    grouped conv: a 6-channel x of a 3-channel stem would run as 2 groups."""
    check_activation("direct_conv2d", activation, RuntimeError)
    if x.dim() != 4:
        raise RuntimeError(f"direct_conv2d: x must be 4-D (N, C, H, W), got {x.dim()}-D")
    if x.shape[1] == 0:
        raise RuntimeError(f"direct_conv2d: x must have at least one channel, got {tuple(x.shape)}")
    if groups is not None and (groups < 1 or weight.dim() != 4 or x.shape[1] != groups * weight.shape[1]):
        raise RuntimeError(f"direct_conv2d: x has {x.shape[1]} channels, expected groups x weight.shape[1] = "
                           f"{groups} x {weight.shape[1] if weight.dim() == 4 else -1} (weight {list(weight.shape)})")
    if x.shape[2] == 0 or x.shape[3] == 0:
        raise RuntimeError(f"direct_conv2d: x must have H, W >= 1, got {tuple(x.shape)}")
    if not (weight.dim() == 4 and weight.shape[1] > 0 and x.shape[1] % weight.shape[1] == 0
            and weight.shape[0] % _groups(x, weight) == 0 and weight.shape[2] == weight.shape[3]
            and weight.shape[2] % 2 == 1):
        raise RuntimeError("direct_conv2d: weight must be (C_out, C / groups, k, k) with odd k, C_out divisible by "
                           f"groups; got {tuple(weight.shape)} for x of {x.shape[1]} channels")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise RuntimeError(f"direct_conv2d: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if stride not in (1, 2):
        raise RuntimeError(f"direct_conv2d: stride must be 1 or 2, got {stride}")


def _check_backward(grad, x, weight, stride):
    """_check, and grad of the forward output's shape (the C++ kernel's errors)."""
    _check(x, weight, None, stride, "none")
    shape = same_conv_output_shape(x, weight, stride)
    if grad.shape != shape:
        raise RuntimeError(f"direct_conv2d_backward: grad must have shape {list(shape)}, got {list(grad.shape)}")


@torch.library.register_fake("ghostkernels::direct_conv2d")
def _fake(x, weight, bias, stride, activation="none", groups=None):
    _check(x, weight, bias, stride, activation, groups)  # raised before anything runs
    return x.new_empty(same_conv_output_shape(x, weight, stride)).contiguous(memory_format=conv_output_format(x))


def _library(x, weight, bias, stride, activation):
    """The library conv, then the activation, in the op's layout; the arguments checked."""
    return ACTIVATIONS[activation](F.conv2d(x, weight, bias, stride, same_padding(weight),
                                            groups=_groups(x, weight)).contiguous(
                                                memory_format=conv_output_format(x)))


@torch.library.impl(_lib, "direct_conv2d", "CompositeExplicitAutograd")
def _fallback(x, weight, bias, stride, activation="none", groups=None):
    _check(x, weight, bias, stride, activation, groups)
    return _library(x, weight, bias, stride, activation)


def takes_triton(x, weight, bias):
    """Whether the Triton kernel (triton_direct_conv.py) serves a call, its arguments checked, on
    CUDA: a channels_last x (the layout of an accelerated model on a GPU; NCHW keeps cuDNN, not
    yet measured against it), at most 4 inputs per group, one dtype and device. Anything else
    goes to the library conv (which autocast casts), raising its own errors for what _check does
    not cover."""
    return (x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
            and x.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
            and weight.dtype == x.dtype and weight.device == x.device
            and (bias is None or (bias.dtype == x.dtype and bias.device == x.device))
            and weight.shape[1] <= MAX_GROUP_INPUTS)


@torch.library.impl(_lib, "direct_conv2d", "CUDA")
def _cuda(x, weight, bias, stride, activation="none", groups=None):
    """One Triton launch with the bias and ReLU in its stores, where takes_triton; else the
    library conv and the ReLU after it."""
    ops.check_once(_check, x, weight, bias, stride, activation, groups)
    kernels = _backends.triton_kernels("triton_direct_conv") if takes_triton(x, weight, bias) else None
    if kernels is None:
        return _library(x, weight, bias, stride, activation)
    return kernels.direct_conv2d(x, weight.contiguous(), bias.contiguous() if bias is not None else None, stride,
                                 activation)


@torch.library.register_fake("ghostkernels::direct_conv2d_backward")
def _backward_fake(grad, x, weight, stride):
    _check_backward(grad, x, weight, stride)
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight), \
        x.new_empty(weight.shape[0])


@torch.library.impl(_lib, "direct_conv2d_backward", "CompositeExplicitAutograd")
def _backward_fallback(grad, x, weight, stride):
    _check_backward(grad, x, weight, stride)
    grad_x, grad_weight, grad_bias = conv_backward(grad, x, weight, stride, _groups(x, weight))
    return grad_x.contiguous(), grad_weight, grad_bias


def _setup_context(ctx, inputs, output):
    x, weight, bias, stride, activation = inputs[:5]
    ctx.relu = activation == "relu"
    ctx.save_for_backward(x, weight, output if ctx.relu else None)
    ctx.stride, ctx.has_bias = stride, bias is not None


def _backward(ctx, grad):
    x, weight, output = ctx.saved_tensors
    if ctx.relu:  # ReLU's backward as torch's threshold_backward
        grad = torch.ops.aten.threshold_backward(grad, output, 0)
    # create_graph=True (grad mode on): the library's backward, which autograd differentiates again
    backward = _backward_fallback if torch.is_grad_enabled() else torch.ops.ghostkernels.direct_conv2d_backward
    grad_x, grad_weight, grad_bias = backward(grad, x, weight, ctx.stride)
    return grad_x, grad_weight, grad_bias if ctx.has_bias else None, None, None, None


torch.library.register_autograd("ghostkernels::direct_conv2d", _backward, setup_context=_setup_context)


def fuse_direct_conv_relus(graph):
    """Rewrites a TorchScript graph in place: every ReLU of a `direct_conv2d`'s output, used only
    there, becomes the op's activation (GhostNet's stem: conv_stem, then act1). Returns the number
    of ReLUs fused."""
    fused = 0
    for relu in list(graph.nodes()):
        if relu.kind() not in ops.GRAPH_ACTIVATIONS:
            continue
        conv_out = relu.inputsAt(0)
        conv = conv_out.node()
        if conv.kind() != "ghostkernels::direct_conv2d" or len(conv_out.uses()) != 1:
            continue
        activation = graph.insertConstant(ops.GRAPH_ACTIVATIONS[relu.kind()])
        activation.node().moveBefore(relu)
        inputs = list(conv.inputs())
        ops.replace_chain(graph, "ghostkernels::direct_conv2d", [*inputs[:4], activation, inputs[5]], [conv, relu])
        fused += 1
    return fused


class DirectConv2d(nn.Module):
    """A 'same' conv with bias, stride 1 or 2, depthwise or with few input channels per group
    (the stem), or grouped (RegNetX's 3x3 convs in G-GhostNet), run by
    ghostkernels::direct_conv2d."""

    __prepare_scriptable__ = ops.refuse_torchscript

    def __init__(self, weight, bias, stride, groups):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias) if bias is not None else None
        self.stride = stride
        self.groups = groups

    def __setstate__(self, state):
        # A whole module pickled by ghostkernels 0.1.0, which did not record its conv's groups: None
        # infers them from x, as 0.1.0 did (it accepts some wrong channel counts); say so, not fail.
        if "groups" not in state:
            warnings.warn("DirectConv2d: this module was pickled by ghostkernels 0.1.0, which did not record its conv's "
                          "groups; they are inferred from each input, which does not catch a wrong channel count. "
                          "Accelerate the original model again to restore the check", stacklevel=2)
            state = {**state, "groups": None}
        super().__setstate__(state)

    @staticmethod
    def eligible(conv):
        if type(conv) is not nn.Conv2d:
            return False
        depthwise = conv.groups == conv.in_channels == conv.out_channels
        group_inputs = conv.in_channels // conv.groups
        grouped = conv.groups > 1 and group_inputs <= MAX_SHIFTED_GROUP_INPUTS
        return (is_same_square_conv(conv) and conv.stride in ((1, 1), (2, 2))
                and (depthwise or group_inputs <= MAX_GROUP_INPUTS or grouped))

    @classmethod
    def from_conv(cls, conv):
        bias = conv.bias.detach().clone() if conv.bias is not None else None
        return cls(conv.weight.detach().clone(), bias, conv.stride[0], conv.groups)

    def forward(self, x):
        if ops.onnx_exporting():
            return _fallback(x, self.weight, self.bias, self.stride, groups=self.groups)
        return torch.ops.ghostkernels.direct_conv2d(x, self.weight, self.bias, self.stride, groups=self.groups)

    def extra_repr(self):
        return (f"out_channels={self.weight.shape[0]}, groups={self.groups}, group_inputs={self.weight.shape[1]}, "
                f"kernel_size={self.weight.shape[-1]}, stride={self.stride}")


class DepthwiseConv2d(nn.Conv2d):
    """A depthwise 'same' conv, stride 1 or 2, on ghostkernels::direct_conv2d (forward and the
    C++ backward) for NCHW CPU float32/float64 inputs: what accelerate() makes of the depthwise
    convs a training-mode GhostNet keeps outside its Ghost modules (conv_dw, the shortcuts').
    The same parameters (shared: optimiser state carries over) and keys; other inputs take the
    conv."""

    __prepare_scriptable__ = ops.refuse_torchscript

    @staticmethod
    def eligible(conv):
        return (type(conv) is nn.Conv2d and conv.groups == conv.in_channels == conv.out_channels
                and is_same_square_conv(conv) and conv.stride in ((1, 1), (2, 2)))

    @classmethod
    def from_conv(cls, conv):
        depthwise = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                        groups=conv.groups, bias=conv.bias is not None, device="meta")
        depthwise.weight, depthwise.bias = conv.weight, conv.bias
        return depthwise.train(conv.training)

    def forward(self, x):
        if (x.dim() != 4 or not x.is_cpu or not ops.cpu_kernel_takes(x) or not x.is_contiguous()
                or ops.onnx_exporting()):
            return super().forward(x)
        return ops.call(torch.ops.ghostkernels.direct_conv2d, x, self.weight, self.bias, self.stride[0], "none",
                        self.groups)
