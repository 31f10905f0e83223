"""The fused Ghost op: its `torch.library` schema, fake and fallback kernels, and autograd.

The compiled extension registers the CPU kernel (csrc/ghost_cpu.cpp); the CUDA kernel below
launches the Triton kernels (triton_ghost.py), imported at the first CUDA call. Where no
kernel applies, the reference runs, with one warning per device type. The fused backward
kernels serve plain backward passes; a backward with create_graph=True (double backward:
gradient penalties, Hessian-vector products) differentiates the reference instead.
"""

import functools
import math
import warnings

import torch

from . import _backends
from .reference import (check_activation, ghost_module_gated_reference, ghost_module_gradients, ghost_module_reference,
                        output_memory_format, upsample_nearest)

_lib = torch.library.Library("ghostkernels", "DEF")
_lib.define(
    "ghost_module(Tensor x, Tensor primary_weight, Tensor? primary_bias, Tensor cheap_weight, "
    "Tensor? cheap_bias, int out_channels, int stride, str activation) -> Tensor"
)
# GhostNetV2's attention fused into the writes: out * nearest-upsample(sigmoid(gate)).
_lib.define(
    "ghost_module_gated(Tensor x, Tensor primary_weight, Tensor? primary_bias, Tensor cheap_weight, "
    "Tensor? cheap_bias, Tensor gate, int out_channels, int stride, str activation) -> Tensor"
)
_lib.define(
    "ghost_module_backward(Tensor grad, Tensor out, Tensor x, Tensor primary_weight, Tensor? primary_bias, "
    "Tensor cheap_weight, Tensor? cheap_bias, int out_channels, int stride, str activation) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)

# Dtypes the compiled CPU kernel takes; others run the reference on the CPU.
CPU_KERNEL_DTYPES = (torch.float32, torch.float64)
_warned = set()  # the keys of the warnings given once per process


def _warn_once(key, message):
    """warnings.warn(message()) the first time this process meets `key`, attributed to the caller
    of the function that calls this."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message(), stacklevel=4)


def refuse_torchscript(module, reason=None):
    """__prepare_scriptable__ of the library's modules and models: torch.jit.script calls it on every
    submodule before it compiles any, so scripting a model that holds one fails with this message,
    not with TorchScript's about some line of ours (forwards that choose kernels in Python, layers
    that only some configurations have)."""
    raise RuntimeError(
        f"torch.jit.script cannot compile ghostkernels' {type(module).__name__}: " + (reason or (
            "the library's modules are written for eager PyTorch and its tracers, not for TorchScript's compiler. "
            "torch.jit.trace(model, example), ghostkernels.freeze(model, example) (a traced, frozen TorchScript "
            "graph), torch.export.export and torch.compile keep the fused kernels.")))


def cpu_kernel_takes(x):
    """Whether the C++ kernels take x (a CPU tensor) by its dtype. Another dtype runs the ops'
    PyTorch compositions: right, but without the kernels' speed, so one warning per process and
    dtype says so, and how to get bfloat16 speed from them."""
    if x.dtype in CPU_KERNEL_DTYPES:
        return True
    _warn_once(("cpu dtype", x.dtype), lambda: (
        f"ghostkernels: the C++ CPU kernels take float32 and float64 tensors; {x.dtype} ones (a model converted "
        "with .half() or .bfloat16(), or CPU autocast) run each op's PyTorch composition, without the fused "
        "kernels' speed. For bfloat16 speed keep the model and its inputs float32 and call "
        "torch.set_float32_matmul_precision('medium'): the kernels' matmuls then run in bfloat16 where the CPU "
        "has AVX512-BF16 or AMX (ghostkernels.backends() says whether)"))
    return False


def check_args(x, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride, activation):
    """Raise a ValueError/TypeError naming the argument when the call is malformed."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"ghost_module: x must be a 4-D tensor (N, C, H, W), got {shape}")
    if primary_weight.dim() != 4 or primary_weight.shape[2] != primary_weight.shape[3] or primary_weight.shape[2] % 2 == 0:
        raise ValueError(
            f"ghost_module: primary_weight must be (init, inp, k, k) with odd k, got {tuple(primary_weight.shape)}"
        )
    init, inp = primary_weight.shape[:2]
    if inp != x.shape[1]:
        raise ValueError(f"ghost_module: x has {x.shape[1]} channels, primary_weight expects {inp}")
    if inp == 0:
        raise ValueError(
            f"ghost_module: primary_weight must have at least one input channel, got {tuple(primary_weight.shape)}")
    if (
        cheap_weight.dim() != 4
        or cheap_weight.shape[1] != 1
        or cheap_weight.shape[2] != cheap_weight.shape[3]
        or cheap_weight.shape[2] % 2 == 0
    ):
        raise ValueError(
            f"ghost_module: cheap_weight must be (new, 1, d, d) with odd d, got {tuple(cheap_weight.shape)}"
        )
    ghosts = cheap_weight.shape[0]
    if init == 0 or ghosts == 0 or ghosts % init != 0:
        raise ValueError(
            f"ghost_module: cheap_weight must have a positive multiple of init={init} channels "
            f"(init * (ratio - 1)), got {ghosts}"
        )
    if not init <= out_channels <= init + ghosts:
        raise ValueError(f"ghost_module: out_channels must be in [{init}, {init + ghosts}], got {out_channels}")
    if stride < 1:
        raise ValueError(f"ghost_module: stride must be >= 1, got {stride}")
    check_activation("ghost_module", activation)
    named = {"primary_weight": primary_weight, "cheap_weight": cheap_weight,
             "primary_bias": primary_bias, "cheap_bias": cheap_bias}
    for name, t in named.items():
        if t is None:
            continue
        if t.dtype != x.dtype or t.device != x.device:
            raise TypeError(
                f"ghost_module: {name} is {t.dtype} on {t.device}, x is {x.dtype} on {x.device}; they must match"
            )
    for name, bias, n in (("primary_bias", primary_bias, init), ("cheap_bias", cheap_bias, ghosts)):
        if bias is not None and tuple(bias.shape) != (n,):
            raise ValueError(f"ghost_module: {name} must have shape ({n},), got {tuple(bias.shape)}")
    kernel = primary_weight.shape[2]
    if min(x.shape[2], x.shape[3]) + 2 * (kernel // 2) < kernel:
        # the C++ kernel's wording (csrc/ghost_cpu.cpp), so that a test or a user matches either
        raise ValueError(f"ghost_module: x of size {tuple(x.shape)} is too small for a {kernel}x{kernel} primary "
                         "kernel")


def check_gate(x, gate, out_channels):
    """The gate logits of ghost_module_gated: (N, out_channels, h, w), x's dtype and device."""
    if not isinstance(gate, torch.Tensor) or gate.dim() != 4:
        shape = tuple(gate.shape) if isinstance(gate, torch.Tensor) else type(gate).__name__
        raise ValueError(f"ghost_module: gate must be a 4-D tensor (N, out_channels, h, w), got {shape}")
    if gate.shape[0] != x.shape[0] or gate.shape[1] != out_channels or min(gate.shape[2:]) < 1:
        raise ValueError(
            f"ghost_module: gate must be ({x.shape[0]}, {out_channels}, h, w) with h, w >= 1, got {tuple(gate.shape)}")
    if gate.dtype != x.dtype or gate.device != x.device:
        raise TypeError(f"ghost_module: gate is {gate.dtype} on {gate.device}, x is {x.dtype} on {x.device}; "
                        "they must match")


def check_gated_args(x, primary_weight, primary_bias, cheap_weight, cheap_bias, gate, out_channels, stride, activation):
    check_args(x, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride, activation)
    check_gate(x, gate, out_channels)


def check_backward_args(grad, out, x, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride,
                        activation):
    """check_args, and grad and out of the forward output's shape, dtype and device."""
    check_args(x, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride, activation)
    shape = output_shape(x, primary_weight, out_channels, stride)
    if grad.shape != shape or out.shape != shape:
        # the C++ kernel's wording (csrc/ghost_backward_cpu.cpp)
        raise ValueError(f"ghost_module_backward: grad and out must have shape {list(shape)}, got "
                         f"{list(grad.shape)} and {list(out.shape)}")
    for name, t in (("grad", grad), ("out", out)):
        if t.dtype != x.dtype or t.device != x.device:
            raise TypeError(f"ghost_module_backward: {name} is {t.dtype} on {t.device}, x is {x.dtype} on {x.device}; "
                            "they must match")


# (check, signature) of the calls already checked: see check_once.
_checked_signatures = set()


def check_once(check, *args):
    """check(*args) for a call of an op itself (torch.ops.ghostkernels.*), whose kernels take the
    arguments as given, once per signature: the tensors' shapes, dtypes and devices and the other
    arguments, all that the ops' checks read. The CUDA kernels' host path then pays ~2.5 us a call
    for the lookup instead of the checks (4-6 us)."""
    signature = (check, *[(a.shape, a.dtype, a.device) if isinstance(a, torch.Tensor) else a for a in args])
    if signature not in _checked_signatures:
        check(*args)
        _checked_signatures.add(signature)


def output_shape(x, primary_weight, out_channels, stride):
    kernel = primary_weight.shape[2]
    height, width = ((s + 2 * (kernel // 2) - kernel) // stride + 1 for s in x.shape[2:])
    return (x.shape[0], out_channels, height, width)


# -- fake kernels (shapes for torch.compile / torch.export) ---------------------------


@torch.library.register_fake("ghostkernels::ghost_module")
def _ghost_module_fake(x, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride, activation):
    check_args(x, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride, activation)
    shape = output_shape(x, primary_weight, out_channels, stride)
    return x.new_empty(shape).contiguous(memory_format=output_memory_format(x))


@torch.library.register_fake("ghostkernels::ghost_module_gated")
def _ghost_module_gated_fake(x, primary_weight, primary_bias, cheap_weight, cheap_bias, gate, out_channels, stride,
                             activation):
    check_gate(x, gate, out_channels)
    return _ghost_module_fake(x, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride,
                              activation)


@torch.library.register_fake("ghostkernels::ghost_module_backward")
def _ghost_module_backward_fake(grad, out, x, primary_weight, primary_bias, cheap_weight, cheap_bias,
                                out_channels, stride, activation):
    check_backward_args(grad, out, x, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride,
                        activation)
    fmt = output_memory_format(x)
    return (
        torch.empty_like(x, memory_format=fmt),
        torch.empty_like(primary_weight, memory_format=torch.contiguous_format),
        x.new_empty(primary_weight.shape[0]),
        torch.empty_like(cheap_weight, memory_format=torch.contiguous_format),
        x.new_empty(cheap_weight.shape[0]),
    )


# -- fallback kernels (any device without a compiled or Triton kernel) -----------------

def _warn_fallback(device_type):
    _warn_once(("fallback", device_type), lambda: (
        f"ghostkernels: no fused kernel for {device_type} "
        f"({_backends.backends().get(device_type, {}).get('reason', 'no fused kernel is registered')}); "
        "running the PyTorch reference"))


@torch.library.impl(_lib, "ghost_module", "CompositeExplicitAutograd")
def _ghost_module_fallback(x, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride, activation):
    check_once(check_args, x, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride, activation)
    _warn_fallback(x.device.type)
    return _reference_output(x, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride,
                             activation)


@torch.library.impl(_lib, "ghost_module_gated", "CompositeExplicitAutograd")
def _ghost_module_gated_fallback(x, primary_weight, primary_bias, cheap_weight, cheap_bias, gate, out_channels,
                                 stride, activation):
    check_once(check_gated_args, x, primary_weight, primary_bias, cheap_weight, cheap_bias, gate, out_channels, stride,
               activation)
    _warn_fallback(x.device.type)
    return _reference_output(x, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride,
                             activation, gate)


def _reference_output(x, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride, activation,
                      gate=None):
    """The reference's result in the op's output layout (x's memory format, not a slice view)."""
    config = dict(out_channels=out_channels, stride=stride, activation=activation)
    if gate is None:
        out = ghost_module_reference(x, primary_weight, primary_bias, cheap_weight, cheap_bias, **config)
    else:
        out = ghost_module_gated_reference(x, primary_weight, primary_bias, cheap_weight, cheap_bias, gate, **config)
    # A view (the reference slices its concat) as an op's output breaks in-place use after it
    # (a residual add): autograd forbids modifying a custom op's view output.
    if out._base is not None:
        return out.clone(memory_format=output_memory_format(x))
    return out.contiguous(memory_format=output_memory_format(x))


@torch.library.impl(_lib, "ghost_module_backward", "CompositeExplicitAutograd")
def _ghost_module_backward_fallback(grad, out, x, primary_weight, primary_bias, cheap_weight, cheap_bias,
                                    out_channels, stride, activation):
    check_once(check_backward_args, grad, out, x, primary_weight, primary_bias, cheap_weight, cheap_bias,
               out_channels, stride, activation)
    _warn_fallback(x.device.type)
    return ghost_module_gradients(grad, out, x, primary_weight, cheap_weight, stride, activation)


@torch.library.impl(_lib, "ghost_module", "CUDA")
def _ghost_module_cuda(x, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride, activation):
    check_once(check_args, x, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride, activation)
    kernels = _backends.triton_kernels()
    if kernels is None:
        return _ghost_module_fallback(
            x, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride, activation)
    return kernels.forward(x, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride, activation)


@torch.library.impl(_lib, "ghost_module_gated", "CUDA")
def _ghost_module_gated_cuda(x, primary_weight, primary_bias, cheap_weight, cheap_bias, gate, out_channels, stride,
                             activation):
    check_once(check_gated_args, x, primary_weight, primary_bias, cheap_weight, cheap_bias, gate, out_channels, stride,
               activation)
    kernels = _backends.triton_kernels()
    if kernels is None:
        return _ghost_module_gated_fallback(
            x, primary_weight, primary_bias, cheap_weight, cheap_bias, gate, out_channels, stride, activation)
    return kernels.forward(x, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride, activation,
                           gate=gate)


@torch.library.impl(_lib, "ghost_module_backward", "CUDA")
def _ghost_module_backward_cuda(grad, out, x, primary_weight, primary_bias, cheap_weight, cheap_bias,
                                out_channels, stride, activation):
    check_once(check_backward_args, grad, out, x, primary_weight, primary_bias, cheap_weight, cheap_bias,
               out_channels, stride, activation)
    kernels = _backends.triton_kernels()
    if kernels is None:
        return _ghost_module_backward_fallback(grad, out, x, primary_weight, primary_bias, cheap_weight,
                                               cheap_bias, out_channels, stride, activation)
    return kernels.backward(grad, out, x, primary_weight, primary_bias, cheap_weight, cheap_bias,
                            out_channels, stride, activation)


# -- autograd ---------------------------------------------------------------------------


def _setup_context(ctx, inputs, output):
    x, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride, activation = inputs
    # The output holds x1 = act(z1) and act(z2): the backward needs nothing else. Without an
    # activation it is not saved but recomputed: GhostNet bottlenecks (the original code, timm)
    # add the shortcut into ghost2's output in place, which a saved output would forbid.
    saved_out = output if activation != "none" else None
    ctx.save_for_backward(x, primary_weight, primary_bias, cheap_weight, cheap_bias, saved_out)
    ctx.config = (out_channels, stride, activation)


def _weight_grads(grad, out, x, primary_weight, primary_bias, cheap_weight, cheap_bias, config):
    """(grad_x, grad_W1, grad_b1, grad_W2, grad_b2) with None for absent biases."""
    gx, gw1, gb1, gw2, gb2 = torch.ops.ghostkernels.ghost_module_backward(
        grad, out, x, primary_weight, primary_bias, cheap_weight, cheap_bias, *config
    )
    return gx, gw1, gb1 if primary_bias is not None else None, gw2, gb2 if cheap_bias is not None else None


def gradients_with_graph(ctx, grad, composed, args):
    """The backward of a backward run with create_graph=True (grad mode is on exactly then):
    the grads of composed(*args) for the inputs ctx.needs_input_grad asks for, by autograd
    through `composed` (differentiable ops) on the saved tensors themselves, so that they are
    differentiable again in those tensors and in grad. The fused backward kernels are not.
    None for the other inputs and for non-tensor arguments."""
    args = list(args)
    wanted = [i for i, arg in enumerate(args)
              if isinstance(arg, torch.Tensor) and i < len(ctx.needs_input_grad) and ctx.needs_input_grad[i]]
    for i in wanted:
        # One node per argument (the same tensor may be passed twice), still attached to the graph.
        args[i] = args[i].view_as(args[i]) if args[i].requires_grad else args[i].detach().requires_grad_()
    result = [None] * len(args)
    if not wanted:
        return result
    inputs = [args[i] for i in wanted]
    grads = torch.autograd.grad(composed(*args), inputs, grad, create_graph=True, allow_unused=True)
    for i, arg, g in zip(wanted, inputs, grads):
        result[i] = g if g is not None else torch.zeros_like(arg)
    return result


def _reference_gradients_with_graph(ctx, grad, reference, tensors):
    """The Ghost op's (or gated op's) gradients through `reference` on the saved `tensors`,
    differentiable again, plus None for the three config arguments."""
    out_channels, stride, activation = ctx.config
    composed = functools.partial(reference, out_channels=out_channels, stride=stride, activation=activation)
    return tuple(gradients_with_graph(ctx, grad, composed, tensors)) + (None, None, None)


def _backward(ctx, grad):
    x, primary_weight, primary_bias, cheap_weight, cheap_bias, out = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: see gradients_with_graph
        return _reference_gradients_with_graph(ctx, grad, ghost_module_reference,
                                               (x, primary_weight, primary_bias, cheap_weight, cheap_bias))
    if out is None:
        out = torch.ops.ghostkernels.ghost_module(x, primary_weight, primary_bias, cheap_weight, cheap_bias,
                                                  *ctx.config)
    grads = _weight_grads(grad, out, x, primary_weight, primary_bias, cheap_weight, cheap_bias, ctx.config)
    return grads + (None, None, None)


torch.library.register_autograd("ghostkernels::ghost_module", _backward, setup_context=_setup_context)


def _setup_gated_context(ctx, inputs, output):
    x, primary_weight, primary_bias, cheap_weight, cheap_bias, gate, out_channels, stride, activation = inputs
    # The output is gated, so the ungated one (and its activation masks) is recomputed in backward.
    ctx.save_for_backward(x, primary_weight, primary_bias, cheap_weight, cheap_bias, gate)
    ctx.config = (out_channels, stride, activation)


def _gated_backward(ctx, grad):
    x, primary_weight, primary_bias, cheap_weight, cheap_bias, gate = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: see gradients_with_graph
        return _reference_gradients_with_graph(ctx, grad, ghost_module_gated_reference,
                                               (x, primary_weight, primary_bias, cheap_weight, cheap_bias, gate))
    ungated = torch.ops.ghostkernels.ghost_module(x, primary_weight, primary_bias, cheap_weight, cheap_bias,
                                                  *ctx.config)
    size = list(ungated.shape[-2:])
    sigmoid = torch.sigmoid(gate)
    grad_sigmoid = torch.ops.aten.upsample_nearest2d_backward(grad * ungated, size, list(gate.shape), None, None)
    grad_gate = grad_sigmoid * sigmoid * (1 - sigmoid)
    grad_ungated = grad * upsample_nearest(sigmoid, size)  # the forward's sources, not F.interpolate's
    grads = _weight_grads(grad_ungated, ungated, x, primary_weight, primary_bias, cheap_weight, cheap_bias,
                          ctx.config)
    return grads + (grad_gate, None, None, None)


torch.library.register_autograd("ghostkernels::ghost_module_gated", _gated_backward,
                                setup_context=_setup_gated_context)


# -- public entry -----------------------------------------------------------------------


def ghost_module(
    x, primary_weight, primary_bias, cheap_weight, cheap_bias, *, out_channels, stride=1, activation="relu", gate=None
):
    """The fused Ghost module on folded weights (docs/math.md section 4, docs/op-contract.md section 1).

    x: (N, inp, H, W), NCHW or channels_last; primary_weight: (init, inp, k, k) with odd k;
    cheap_weight: (init * (ratio - 1), 1, d, d) with odd d; biases of init and
    init * (ratio - 1) entries or None. gate: optional GhostNetV2 attention logits
    (N, out_channels, h, w); the output is then multiplied by sigmoid(gate) nearest-upsampled
    to its size, inside the same pass. Returns (N, out_channels, H', W') in x's memory format.
    Differentiable in x, the weights, the biases and the gate.
    """
    check_args(x, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride, activation)
    if gate is not None:
        check_gate(x, gate, out_channels)
    return apply(x, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride, activation, gate)


def apply(x, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride, activation, gate=None):
    """ghost_module without the argument checks, for callers that built the arguments themselves."""
    args = (x, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride, activation)
    if x.is_cpu and not cpu_kernel_takes(x):  # is_cpu: 0.1 us, x.device.type 0.6 (a device object a call)
        return _reference_output(*args, gate)
    if gate is None:
        op = torch.ops.ghostkernels.ghost_module
    else:
        op = torch.ops.ghostkernels.ghost_module_gated
        args = args[:5] + (gate,) + args[5:]
    return call(op, *args)


def _never():
    return False


def _onnx_export_flags():
    """Readers of torch.onnx.export's flags: (either exporter's, for eager code; the dynamo=True
    exporter's alone, for code that torch.export traces: _never where this torch's dynamo=True
    exporter sets no flag, torch 2.6 and 2.7, before pytorch/pytorch#149678). Both read where this torch
    keeps the flags: torch.onnx.is_in_onnx_export costs two imports a call (1.3 us, as much as a
    small op's kernel), and torch.compile refuses to trace either it or the TorchScript exporter's flag."""
    try:
        from torch.onnx._internal.exporter import _flags
        try:
            from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
        except ImportError:  # torch < 2.9
            from torch.onnx._globals import GLOBALS
    except ImportError:
        return torch.onnx.is_in_onnx_export, _never
    if not hasattr(_flags, "_is_onnx_exporting") or not hasattr(GLOBALS, "in_onnx_export"):
        return torch.onnx.is_in_onnx_export, _never
    return (lambda: GLOBALS.in_onnx_export or _flags._is_onnx_exporting), (lambda: _flags._is_onnx_exporting)


_onnx_export_flag_reader, _dynamo_onnx_export_flag_reader = _onnx_export_flags()
# Whether torch.onnx.export(dynamo=True) of a model runs the library's compositions by itself;
# where not, a program decomposed first (onnx_export.decompositions()) exports.
DYNAMO_ONNX_EXPORT_IS_FLAGGED = _dynamo_onnx_export_flag_reader is not _never


def onnx_exporting():
    """Whether torch.onnx.export is capturing the model, with either exporter (dynamo=True: its
    torch.export trace included): the library's entry points then run their ops' ATen
    compositions (onnx_export.py)."""
    if torch.compiler.is_compiling():
        return _dynamo_onnx_export_flag_reader()
    return _onnx_export_flag_reader()


def _composed(op, args):
    from .onnx_export import composed
    return composed(op, *args)


def call(op, *args):
    """op(*args), skipping the Python autograd kernel (several microseconds a call) when no
    graph is recorded. During an ONNX export, op's ATen composition (onnx_export.py); under
    autocast, see _autocast_call."""
    if torch.compiler.is_compiling():  # onnx_exporting() as traced
        return _composed(op, args) if _dynamo_onnx_export_flag_reader() else op(*args)
    if _onnx_export_flag_reader():  # onnx_exporting(), is_compiling() already known False
        return _composed(op, args)
    if torch._C._is_any_autocast_enabled():
        device_type = args[0].device.type
        if torch.is_autocast_enabled(device_type):
            return _autocast_call(op, args, device_type)
    if not torch.is_grad_enabled():
        if torch.is_inference_mode_enabled():  # which already skips the autograd kernels: no guard (~2 us)
            return op(*args)
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)
    return op(*args)


def _autocast_call(op, args, device_type):
    """op(*args) under autocast, which does not cast a custom op's arguments: an accelerated model's
    activations then arrive in autocast's dtype and its folded weights in float32. On CUDA the
    floating tensors are cast to autocast's dtype, as autocast casts a conv's, and the fused op runs
    in it (the Triton kernels take float16 and bfloat16). Elsewhere (the CPU kernels take float32
    and float64) the op's ATen composition runs, which autocast casts op by op, as it does the
    original model's layers."""
    if device_type == "cuda":
        dtype = torch.get_autocast_dtype(device_type)
        cast = [a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
        with torch.autocast(device_type, enabled=False):
            return call(op, *cast)
    return _composed(op, args)


def register_recompute_autograd(name, composed):
    """Gradients for op `name` (of this library) by recomputing `composed`, its composition of
    differentiable ops with the same arguments: for the inference-first ops accelerate() uses
    (ghost_module_depthwise, ghost_module_scaled, squeeze_excite_gate, pointwise_conv2d), whose
    C++ kernels have no backward of their own. Under create_graph=True the recomputation keeps
    the saved tensors attached, so that the grads are differentiable again (gradients_with_graph)."""

    def setup_context(ctx, inputs, output):
        ctx.tensors = [i for i, arg in enumerate(inputs) if isinstance(arg, torch.Tensor)]
        ctx.save_for_backward(*(inputs[i] for i in ctx.tensors))
        ctx.arguments = [None if isinstance(arg, torch.Tensor) else arg for arg in inputs]

    def backward(ctx, grad):
        if torch.is_grad_enabled():  # create_graph=True: grads that are differentiable again
            args = list(ctx.arguments)
            for i, saved in zip(ctx.tensors, ctx.saved_tensors):
                args[i] = saved
            return tuple(gradients_with_graph(ctx, grad, composed, args))
        args, wanted = list(ctx.arguments), [i for i in ctx.tensors if ctx.needs_input_grad[i]]
        with torch.enable_grad():
            for i, saved in zip(ctx.tensors, ctx.saved_tensors):
                args[i] = saved.detach().requires_grad_(i in wanted)
            grads = torch.autograd.grad(composed(*args), [args[i] for i in wanted], grad)
        result = [None] * len(args)
        for i, g in zip(wanted, grads):
            result[i] = g
        return tuple(result)

    torch.library.register_autograd(f"ghostkernels::{name}", backward, setup_context=setup_context)


def _any_tensor_requires_grad(*args):
    return any(isinstance(arg, torch.Tensor) and arg.requires_grad for arg in args)


# torch's own check, in C++ where torch has it (torch 2.6 has not; the ops take tensors and scalars, no lists)
_any_requires_grad = getattr(torch._C, "_any_requires_grad", _any_tensor_requires_grad)


def register_autograd_updating_statistics(name, backward, setup_context):
    """torch.library.register_autograd for op `name` (of this library) whose schema also updates
    BN running statistics in place, as native_batch_norm's does; register_autograd takes
    functional schemas only. The op's Autograd kernel: an autograd.Function that runs the op
    below autograd. The update happens inside the op, before its tensors are saved: non-reentrant
    activation checkpointing, whose recomputation stops at the last saved tensor, repeats it as it
    repeats eager BatchNorm's. `backward` returns grads for the leading arguments; the rest (the
    statistics, momenta, and the defaults the dispatcher leaves out) get None."""
    op = getattr(torch.ops.ghostkernels, name).default

    def run_below_autograd(*args):
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)

    # forward(ctx, ...) with the context set up inside, not a setup_context staticmethod: with one,
    # Function.apply binds the arguments through inspect.signature, ~30 us a call.
    def forward(ctx, *args):
        output = run_below_autograd(*args)
        ctx.argument_count = len(args)
        setup_context(ctx, args, output)
        return output

    def backward_of_all(ctx, *grads):
        result = tuple(backward(ctx, *grads))
        return result + (None,) * (ctx.argument_count - len(result))

    function = type(f"{name}_autograd", (torch.autograd.Function,),
                    {"forward": staticmethod(forward), "backward": staticmethod(backward_of_all)})

    def autograd_kernel(*args):
        if torch.is_grad_enabled() and _any_requires_grad(*args):
            return function.apply(*args)
        return run_below_autograd(*args)

    _lib.impl(name, autograd_kernel, "Autograd")


# The TorchScript node kinds of the activations the ops' `activation` argument names, for
# freeze()'s graph passes that fuse an activation into the op before it.
GRAPH_ACTIVATIONS = {"aten::relu": "relu", "aten::relu_": "relu"}


def graph_constant(value):
    """The value of a TorchScript graph value made by a prim::Constant, or None for anything else."""
    return value.toIValue() if value.node().kind() == "prim::Constant" else None


def replace_chain(graph, kind, inputs, chain):
    """In a TorchScript graph, the nodes of `chain` (each read only by the next; the last one's
    output is the chain's result) replaced by one `kind` node of `inputs`, where the last one was,
    with the first one's module scope and source line (so that profiles name the module it came
    from). Returns that node."""
    last = chain[-1]
    node = graph.create(kind, inputs, 1)
    node.copyMetadata(chain[0])
    node.insertBefore(last)
    node.output().setType(last.output().type())
    last.output().replaceAllUsesWith(node.output())
    for dead in reversed(chain):  # readers first: a node still read cannot go
        dead.destroy()
    return node


def intrinsic_channels(out_channels, ratio):
    """init = ceil(oup / ratio): the channels the primary conv makes."""
    return math.ceil(out_channels / ratio)
