"""The Ghost module in training mode: both BatchNorms normalise by batch statistics inside one
op, `ghostkernels::ghost_module_train`, with a backward op of its own (docs/math.md section 8).

The op returns the output and what its backward needs: the pre-BN maps z1 and z2 and the batch
mean and biased variance of each BN; the running statistics it is given it updates in place, as
native_batch_norm does. The C++ CPU kernels (csrc/ghost_train_cpu.cpp) serve
float32/float64, the Triton kernels (triton_ghost_train.py) CUDA tensors; elsewhere the
composition below runs (conv, batch statistics, activation, depthwise conv, batch statistics,
activation, concat). GhostModule uses the op only where a kernel exists
(GhostModule.batch_statistics_forward), with the arguments nn.BatchNorm2d would give
F.batch_norm (running_statistics).
"""

import functools

import torch
import torch.nn.functional as F

from . import _backends, ops
from .reference import (ACTIVATIONS, batch_norm_backward, conv_backward, output_memory_format, same_padding,
                        split_output_grad)

_lib = torch.library.Library("ghostkernels", "FRAGMENT")
_lib.define(
    "ghost_module_train(Tensor x, Tensor primary_weight, Tensor primary_gamma, Tensor primary_beta, "
    "Tensor cheap_weight, Tensor cheap_gamma, Tensor cheap_beta, int out_channels, int stride, str activation, "
    "float primary_eps, float cheap_eps, Tensor(a!)? primary_running_mean=None, Tensor(b!)? primary_running_var=None, "
    "Tensor(c!)? cheap_running_mean=None, Tensor(d!)? cheap_running_var=None, float primary_momentum=0.1, "
    "float cheap_momentum=0.1) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)
# The schema's defaults of the running-statistics arguments (after the first 12), which the
# dispatcher leaves out of a Python kernel's arguments where a call does not change them.
RUNNING_DEFAULTS = tuple(a.default_value for a in torch.ops.ghostkernels.ghost_module_train.default._schema.arguments[12:])
_lib.define(
    "ghost_module_train_backward(Tensor grad, Tensor x, Tensor primary_weight, Tensor primary_gamma, "
    "Tensor primary_beta, Tensor cheap_weight, Tensor cheap_gamma, Tensor cheap_beta, Tensor primary_z, "
    "Tensor cheap_z, Tensor primary_mean, Tensor primary_var, Tensor cheap_mean, Tensor cheap_var, "
    "int out_channels, int stride, str activation, float primary_eps, float cheap_eps) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)

# Dtypes the Triton kernels take (the C++ kernels: ops.CPU_KERNEL_DTYPES).
CUDA_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def has_kernel(x):
    """Whether ghost_module_train has a kernel for x's device and dtype: the C++ library on the
    CPU, Triton on CUDA; not under autocast, whose dtypes the op does not follow."""
    device = x.device.type
    if device not in ("cpu", "cuda") or torch.is_autocast_enabled(device):
        return False
    if device == "cpu":
        return ops.cpu_kernel_takes(x) and _backends.load_cpu_extension()[0] == "cpp"
    return x.dtype in CUDA_KERNEL_DTYPES and _backends.triton_kernels("triton_ghost_train") is not None


def _normalize(z, mean, var, gamma, beta, eps):
    shape = (1, -1, 1, 1)
    return (z - mean.view(shape)) * torch.rsqrt(var + eps).view(shape) * gamma.view(shape) + beta.view(shape)


def _batch_norm(z, gamma, beta, eps):
    """(act-ready BN(z) with z's batch statistics, mean, biased variance)."""
    var, mean = torch.var_mean(z, dim=(0, 2, 3), correction=0)
    return _normalize(z, mean, var, gamma, beta, eps), mean, var


def ghost_module_train_reference(x, primary_weight, primary_gamma, primary_beta, cheap_weight, cheap_gamma,
                                 cheap_beta, out_channels, stride, activation, primary_eps, cheap_eps):
    """(out, z1, z2, mean1, var1, mean2, var2) of the training-mode Ghost module in plain PyTorch."""
    act = ACTIVATIONS[activation]
    z1 = F.conv2d(x, primary_weight, None, stride, same_padding(primary_weight))
    y1, mean1, var1 = _batch_norm(z1, primary_gamma, primary_beta, primary_eps)
    x1 = act(y1)
    z2 = F.conv2d(x1, cheap_weight, None, 1, same_padding(cheap_weight), groups=primary_weight.shape[0])
    y2, mean2, var2 = _batch_norm(z2, cheap_gamma, cheap_beta, cheap_eps)
    out = torch.cat([x1, act(y2)], dim=1)[:, :out_channels].contiguous(memory_format=output_memory_format(x))
    return out, z1.contiguous(), z2.contiguous(), mean1, var1, mean2, var2


def check_both_or_neither(op, prefix, running_mean, running_var, error):
    """The running statistics an op updates are both given or both None (C++: check_running)."""
    if (running_mean is None) != (running_var is None):
        raise error(f"{op}: {prefix}running_mean and {prefix}running_var must both be given or both be None")


def _check(x, primary_weight, primary_gamma, primary_beta, cheap_weight, cheap_gamma, cheap_beta, out_channels,
           stride, activation, primary_running_mean=None, primary_running_var=None, cheap_running_mean=None,
           cheap_running_var=None):
    """The folded op's argument checks, plus the BN parameters' and running statistics' shapes and
    the batch size."""
    ops.check_args(x, primary_weight, None, cheap_weight, None, out_channels, stride, activation)
    init, ghosts = primary_weight.shape[0], cheap_weight.shape[0]
    named = (("primary_gamma", primary_gamma, init), ("primary_beta", primary_beta, init),
             ("cheap_gamma", cheap_gamma, ghosts), ("cheap_beta", cheap_beta, ghosts),
             ("primary_running_mean", primary_running_mean, init), ("primary_running_var", primary_running_var, init),
             ("cheap_running_mean", cheap_running_mean, ghosts), ("cheap_running_var", cheap_running_var, ghosts))
    check_both_or_neither("ghost_module_train", "primary_", primary_running_mean, primary_running_var, ValueError)
    check_both_or_neither("ghost_module_train", "cheap_", cheap_running_mean, cheap_running_var, ValueError)
    for name, t, n in named:
        if t is None:  # only the running statistics are optional
            continue
        if tuple(t.shape) != (n,):
            raise ValueError(f"ghost_module_train: {name} must have shape ({n},), got {tuple(t.shape)}")
        if t.dtype != x.dtype or t.device != x.device:
            raise TypeError(f"ghost_module_train: {name} is {t.dtype} on {t.device}, x is {x.dtype} on {x.device}; "
                            "they must match")
    shape = ops.output_shape(x, primary_weight, out_channels, stride)
    if shape[0] * shape[2] * shape[3] <= 1:
        raise ValueError(f"ghost_module_train: expected more than 1 value per channel when training, got input "
                         f"size {tuple(x.shape)}")
    return shape


def _split(args):
    """(the op's first 12 arguments, its 6 running-statistics arguments with their defaults)."""
    running = tuple(args[12:])
    return args[:12], running + RUNNING_DEFAULTS[len(running):]


def update_running_statistics_(running_mean, running_var, mean, var, momentum, count):
    """What native_batch_norm does in training to the running statistics it is given (both or
    neither): each moved by `momentum` towards the batch mean, and the unbiased batch variance of
    `count` values per channel."""
    if running_mean is not None:
        running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
        running_var.mul_(1 - momentum).add_(var * (count / (count - 1)), alpha=momentum)


def _update_running(outputs, running):
    """The op's running statistics moved by its outputs' batch statistics."""
    out, _, _, primary_mean, primary_var, cheap_mean, cheap_var = outputs
    count = out.shape[0] * out.shape[2] * out.shape[3]
    update_running_statistics_(*running[0:2], primary_mean, primary_var, running[4], count)
    update_running_statistics_(*running[2:4], cheap_mean, cheap_var, running[5], count)


def _check_backward(grad, x, primary_weight, primary_gamma, primary_beta, cheap_weight, cheap_gamma, cheap_beta,
                    primary_z, cheap_z, primary_mean, primary_var, cheap_mean, cheap_var, out_channels, stride,
                    activation, *eps):
    """_check, and the forward's outputs that the backward reads (grad of out, z1, z2 and the
    statistics) of the shapes the forward gives them, x's dtype and device."""
    n, _, height, width = _check(x, primary_weight, primary_gamma, primary_beta, cheap_weight, cheap_gamma, cheap_beta,
                                 out_channels, stride, activation)
    init, ghosts = primary_weight.shape[0], cheap_weight.shape[0]
    expected = (("grad", grad, (n, out_channels, height, width)), ("primary_z", primary_z, (n, init, height, width)),
                ("cheap_z", cheap_z, (n, ghosts, height, width)), ("primary_mean", primary_mean, (init,)),
                ("primary_var", primary_var, (init,)), ("cheap_mean", cheap_mean, (ghosts,)),
                ("cheap_var", cheap_var, (ghosts,)))
    for name, t, shape in expected:
        if tuple(t.shape) != shape:
            raise ValueError(f"ghost_module_train_backward: {name} must have shape {shape}, got {tuple(t.shape)}")
        if t.dtype != x.dtype or t.device != x.device:
            raise TypeError(f"ghost_module_train_backward: {name} is {t.dtype} on {t.device}, x is {x.dtype} on "
                            f"{x.device}; they must match")


@torch.library.register_fake("ghostkernels::ghost_module_train")
def _fake(*args):
    args, running = _split(args)
    n, _, height, width = _check(*args[:10], *running[:4])
    x, primary_weight, _, _, cheap_weight, _, _, out_channels = args[:8]
    init, ghosts = primary_weight.shape[0], cheap_weight.shape[0]
    out = x.new_empty((n, out_channels, height, width)).contiguous(memory_format=output_memory_format(x))
    return (out, x.new_empty((n, init, height, width)), x.new_empty((n, ghosts, height, width)),
            x.new_empty(init), x.new_empty(init), x.new_empty(ghosts), x.new_empty(ghosts))


@torch.library.register_fake("ghostkernels::ghost_module_train_backward")
def _backward_fake(grad, x, primary_weight, primary_gamma, primary_beta, cheap_weight, cheap_gamma, cheap_beta,
                   *rest):
    _check_backward(grad, x, primary_weight, primary_gamma, primary_beta, cheap_weight, cheap_gamma, cheap_beta, *rest)
    return (torch.empty_like(x, memory_format=output_memory_format(x)),
            *(torch.empty_like(t, memory_format=torch.contiguous_format)
              for t in (primary_weight, primary_gamma, primary_beta, cheap_weight, cheap_gamma, cheap_beta)))


@torch.library.impl(_lib, "ghost_module_train", "CompositeExplicitAutograd")
def _fallback(*args):
    args, running = _split(args)
    _check(*args[:10], *running[:4])
    outputs = ghost_module_train_reference(*args)
    _update_running(outputs, running)
    return outputs


@torch.library.impl(_lib, "ghost_module_train_backward", "CompositeExplicitAutograd")
def _backward_fallback(grad, x, primary_weight, primary_gamma, primary_beta, cheap_weight, cheap_gamma, cheap_beta,
                       primary_z, cheap_z, primary_mean, primary_var, cheap_mean, cheap_var, out_channels, stride,
                       activation, primary_eps, cheap_eps):
    """Grads of (x, W1, gamma1, beta1, W2, gamma2, beta2) of ghost_module_train_reference, written
    out (reference.conv_backward says why not by autograd), from the forward's z1, z2 and statistics."""
    ops.check_once(_check_backward, grad, x, primary_weight, primary_gamma, primary_beta, cheap_weight, cheap_gamma,
                   cheap_beta, primary_z, cheap_z, primary_mean, primary_var, cheap_mean, cheap_var, out_channels,
                   stride, activation, primary_eps, cheap_eps)
    init = primary_weight.shape[0]
    y1 = _normalize(primary_z, primary_mean, primary_var, primary_gamma, primary_beta, primary_eps)
    y2 = _normalize(cheap_z, cheap_mean, cheap_var, cheap_gamma, cheap_beta, cheap_eps)
    relu = activation == "relu"
    grad_x1, grad_y2 = split_output_grad(grad, init, cheap_weight.shape[0])
    if relu:  # torch's ReLU backward: not where the output <= 0, so NaN passes
        grad_y2 = torch.ops.aten.threshold_backward(grad_y2, y2, 0)
    grad_z2, grad_cheap_gamma, grad_cheap_beta = batch_norm_backward(grad_y2, cheap_z, cheap_gamma, cheap_mean,
                                                                     cheap_var, cheap_eps)
    grad_cheap_input, grad_cheap_weight, _ = conv_backward(grad_z2, ACTIVATIONS[activation](y1), cheap_weight, 1,
                                                           init, bias=False)
    grad_y1 = grad_x1 + grad_cheap_input
    if relu:
        grad_y1 = torch.ops.aten.threshold_backward(grad_y1, y1, 0)
    grad_z1, grad_primary_gamma, grad_primary_beta = batch_norm_backward(grad_y1, primary_z, primary_gamma,
                                                                         primary_mean, primary_var, primary_eps)
    grad_x, grad_primary_weight, _ = conv_backward(grad_z1, x, primary_weight, stride, 1, bias=False)
    return (grad_x.contiguous(memory_format=output_memory_format(x)), grad_primary_weight.contiguous(),
            grad_primary_gamma, grad_primary_beta, grad_cheap_weight.contiguous(), grad_cheap_gamma, grad_cheap_beta)


@torch.library.impl(_lib, "ghost_module_train", "CUDA")
def _cuda(*args):
    kernels = _backends.triton_kernels("triton_ghost_train")
    if kernels is None:
        return _fallback(*args)
    args, running = _split(args)
    ops.check_once(_check, *args[:10], *running[:4])
    outputs = kernels.forward(*args)
    _update_running(outputs, running)
    return outputs


@torch.library.impl(_lib, "ghost_module_train_backward", "CUDA")
def _backward_cuda(*args):
    kernels = _backends.triton_kernels("triton_ghost_train")
    # The kernels sum across programs by atomic adds, in no fixed order: under
    # torch.use_deterministic_algorithms the composition, which PyTorch's own rules govern
    if kernels is None or torch.are_deterministic_algorithms_enabled():
        return _backward_fallback(*args)
    ops.check_once(_check_backward, *args)
    return kernels.backward(*args)


def _setup_context(ctx, inputs, output):
    x, primary_weight, primary_gamma, primary_beta, cheap_weight, cheap_gamma, cheap_beta = inputs[:7]
    _, primary_z, cheap_z, primary_mean, primary_var, cheap_mean, cheap_var = output
    # Not the output: the backward recomputes x1 and the masks from z1 and z2, so that the
    # caller may add into the output in place (GhostNet's bottlenecks add their shortcut).
    ctx.save_for_backward(x, primary_weight, primary_gamma, primary_beta, cheap_weight, cheap_gamma, cheap_beta,
                          primary_z, cheap_z, primary_mean, primary_var, cheap_mean, cheap_var)
    ctx.config = inputs[7:12]
    ctx.mark_non_differentiable(primary_z, cheap_z, primary_mean, primary_var, cheap_mean, cheap_var)
    # No zero-filled grads for the six outputs that carry none (two of them as large as the
    # output: 19 ms of fills in a GhostNet 1.0x training step at batch 16).
    ctx.set_materialize_grads(False)


def _backward(ctx, grad, *_):
    """Grads of the seven tensors before out_channels (ops.register_autograd_updating_statistics
    gives the other arguments None)."""
    if grad is None:  # the output itself was not used
        return (None,) * 7
    saved = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: grads differentiable again, through the reference
        composed = functools.partial(_output_of_reference, config=ctx.config)
        return tuple(ops.gradients_with_graph(ctx, grad, composed, saved[:7]))
    grads = torch.ops.ghostkernels.ghost_module_train_backward(grad, *saved, *ctx.config)
    return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad))


def _output_of_reference(*tensors, config):
    return ghost_module_train_reference(*tensors, *config)[0]


ops.register_autograd_updating_statistics("ghost_module_train", _backward, _setup_context)


# -- the module side ------------------------------------------------------------------------


def uses_batch_statistics(bn):
    """Whether `bn` normalises by the batch's statistics in its next forward (nn.BatchNorm2d's rule)."""
    return bn.training or (bn.running_mean is None and bn.running_var is None)


def running_statistics(bn):
    """(running_mean, running_var, momentum) as nn.BatchNorm2d's forward passes them to
    F.batch_norm, for an op that updates the two in place (None where the BN keeps none or is in
    eval mode), its num_batches_tracked counted as that forward counts it."""
    if not (bn.training and bn.track_running_stats):
        return None, None, 0.0
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average
            factor = 1.0 / float(bn.num_batches_tracked)
    return bn.running_mean, bn.running_var, factor
