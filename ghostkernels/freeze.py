"""freeze(): an accelerated model's forward as one native call.

At batch 1 the fused kernels of GhostNet 1.0x take about 4.1 ms on 2 cores and the Python
around them (module calls, the folded-weight cache checks, the residual adds' dispatch) 1.6 ms
more. A TorchScript trace of the eval-mode forward, frozen, keeps the kernel calls and drops the
Python: the graph runs in TorchScript's interpreter with the folded weights as constants.
torch.jit is deprecated (torch 2.13 warns) but still ships; the alternatives measured slower at
batch 1 (torch 2.13, 2 cores, GhostNet 1.0x: accelerated 5.9 ms, frozen 4.2 ms): torch.compile
with freezing and cpp_wrapper 5.5 ms (its guards over every parameter cost 0.3 ms a call), an
FX graph of the same ops from make_fx 4.75 ms (Python calls every op).
"""

import contextlib
import io
import os
import warnings

import torch
from torch import nn

from ._backends import ieee_float32_matmuls, load_cpu_extension
from .acceleration import _relative_error, _tolerance
from .direct_conv import fuse_direct_conv_relus
from .ghost_residual import fuse_residual_adds
from .modules import (deepcopy_module, eager_module, fuse_pointwise_epilogues, global_module_hooks, hook_dicts,
                      recomputes_a_weight)
from .ops import refuse_torchscript
from .pointwise_pool import fuse_pointwise_pools
from .precompile import precompile_quietly

# ghostkernels' own forwards raise TracerWarnings about shape tests whose outcome the trace
# keeps, harmlessly: check_input's argument checks (the kernels check again).
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_TORCH_JIT_DIR = os.path.dirname(os.path.abspath(torch.jit.__file__)) + os.sep


class FrozenModel(nn.Module):
    """What freeze() returns: the frozen graph, run without autograd, with the checks that name a
    wrong input's dtype or device (the graph's constants are the example's). `op_scopes`: (op, the
    module it came from) for each op node of the graph, in order, as the trace named them (the
    graph is a saved and loaded copy, which keeps no module scopes): what profiles by module read."""

    def __prepare_scriptable__(self):
        refuse_torchscript(self, "it holds a TorchScript graph already: torch.save(model, path) keeps it with its "
                                 "input checks, torch.jit.save(model.graph, path) saves the graph alone.")

    def __init__(self, graph, dtypes, device, op_scopes):
        super().__init__()
        self.graph = graph
        self.dtypes = dtypes
        self.device = device
        self.op_scopes = op_scopes

    def forward(self, *args):
        check_tensor_arguments("FrozenModel", args, len(self.dtypes))
        for index, (arg, dtype) in enumerate(zip(args, self.dtypes)):
            if arg.dtype != dtype or arg.device != self.device:
                raise TypeError(f"FrozenModel: argument {index} is {arg.dtype} on {arg.device}; the model was "
                                f"frozen for {dtype} on {self.device}: freeze it again with such an example")
        # Below autograd, as ops.call runs the ops: the graph's ops would otherwise each pass
        # through their Python autograd kernel (GhostNet 1.0x batch 1: 4.55 ms instead of 3.94).
        with torch.no_grad(), torch._C._AutoDispatchBelowAutograd():
            return self.graph(*args)

    def extra_repr(self):
        return f"device={self.device}, dtypes={list(self.dtypes)}"

    def __reduce__(self):
        """torch.save / pickle: the graph as TorchScript's archive (a ScriptModule inside a
        Module does not pickle), loaded back by this module, whose import registers the ops."""
        return _unpickle_frozen, (_archive(self.graph), self.dtypes, self.device, self.op_scopes)


def _unpickle_frozen(archive, dtypes, device, op_scopes=()):  # () for files saved before op_scopes
    return FrozenModel(_loaded(archive, device), dtypes, device, op_scopes)


def _op_scopes(graph):
    """(op, module name) of each op node of a traced graph (not prim:: nodes), in order; "" for a
    node the trace made outside any module."""
    return tuple((node.kind(), node.scopeName().split("/")[-1].removeprefix("__module."))
                 for node in graph.nodes() if not node.kind().startswith("prim::"))


@contextlib.contextmanager
def _without_jit_deprecation_notices():
    """torch.jit's deprecation notices silenced, as freeze() silences them (it chose torch.jit): a
    DeprecationWarning in torch 2.13, a FutureWarning, which Python shows users, from torch 2.14."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        yield


def _archive(graph):
    """A TorchScript module as the bytes of torch.jit.save."""
    archive = io.BytesIO()
    with _without_jit_deprecation_notices():
        torch.jit.save(graph, archive)
    return archive.getvalue()


def _loaded(archive, device):
    """torch.jit.load of _archive's bytes, onto `device`: a module in a compilation unit of its
    own, released with it."""
    with _without_jit_deprecation_notices():
        return torch.jit.load(io.BytesIO(archive), map_location=device)


def _releasable(built, device):
    """`built`, the graph torch.jit.freeze made, as a loaded copy, and `built`'s tensor constants
    dropped. TorchScript keeps every module that torch.jit.freeze makes, its graph and its
    constants (the frozen weights) for the rest of the process (pytorch/pytorch#96726): each
    freeze() of GhostNet 1.0x held on to 49 MB. A loaded copy is released with the FrozenModel;
    what stays of `built` is a graph of empty tensors (and, as after any torch.jit.trace, the
    traced modules' types: 18 MB for GhostNet 1.0x). A graph that does not save (one that calls
    Python: a traced autograd.Function) is returned as it is, and kept as before."""
    try:
        copy = _loaded(_archive(built), device)
    except RuntimeError:  # "Could not export Python function call"
        return built
    empty = torch.empty(0)
    blocks = [built.graph]
    for block in blocks:  # the loop reaches the blocks it appends
        for node in block.nodes():
            if node.kind() == "prim::Constant" and node.hasAttribute("value") and node.kindOf("value") == "t":
                node.t_("value", empty)
            blocks += node.blocks()
    return copy


def check_tensor_arguments(caller, args, expected):
    """`expected` positional arguments, every one a tensor, or a TypeError that names the
    argument: the calling convention of a model recorded on an example (FrozenModel,
    CapturedModel)."""
    if len(args) != expected:
        raise TypeError(f"{caller}: expected {expected} positional arguments, got {len(args)}")
    for index, arg in enumerate(args):
        if not isinstance(arg, torch.Tensor):
            raise TypeError(f"{caller}: argument {index} must be a tensor, got {type(arg).__name__}")


def _fresh(inputs, extra_batch):
    """Random inputs shaped like `inputs` (floating tensors redrawn, others kept), with
    `extra_batch` more rows in dimension 0 of every tensor."""
    fresh = []
    for t in inputs:
        if t.dim() == 0:
            fresh.append(t)
            continue
        shape = (t.shape[0] + extra_batch, *t.shape[1:])
        if t.is_floating_point():
            new = torch.randn(shape, dtype=t.dtype, device=t.device)
        else:
            new = t[torch.arange(shape[0], device=t.device) % max(1, t.shape[0])]
        fresh.append(new.contiguous(memory_format=torch.channels_last) if t.dim() == 4 and
                     t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous() else new)
    return tuple(fresh)


def checked_example(caller, verb, model, example_inputs):
    """The positional arguments of an eval-mode `model` that freeze() or capture() records:
    `example_inputs` as a tuple of tensors, or a TypeError/ValueError naming what is wrong; a
    warning where hooks would run during the recording only."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}: model must be a torch.nn.Module, got {type(model).__name__}")
    if model.training:
        raise ValueError(f"{caller}: the model is in training mode; {caller}() {verb} inference: call model.eval() "
                         "first")
    # BatchNorms in training mode inside it (test-time adaptation's); a Dropout in training mode
    # (Monte Carlo dropout) traces as it runs
    training = [name for name, module in model.named_modules()
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training]
    if training:
        raise ValueError(f"{caller}: the BatchNorm {training[0]} ({len(training)} in all) is in training mode inside the "
                         f"eval-mode model: it normalises by the batch's statistics and updates its running ones, which "
                         f"{caller}() cannot record; call model.eval() first")
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    if not isinstance(inputs, tuple) or not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise TypeError(f"{caller}: example_inputs must be a tensor or a non-empty tuple of tensors (the model's "
                        f"positional arguments), got {type(example_inputs).__name__}")
    # not prune's and weight_norm's: the weight they compute is recorded, as every weight is
    hooked = [name or "the model" for name, module in model.named_modules()
              if any(not recomputes_a_weight(hook) for hooks in hook_dicts(module) for hook in hooks.values())]
    if hooked or global_module_hooks():
        where = (f"on {len(hooked)} module(s) ({', '.join(hooked[:3])}{', ...' if len(hooked) > 3 else ''})" if hooked
                 else "registered globally (register_module_forward_hook)")
        warnings.warn(f"{caller}: hooks {where} run while it {verb} the forward only: what they did to the outputs "
                      "then is kept, and they are never called again (a hook that records tensors records nothing)",
                      stacklevel=3)
    return inputs


def _mark_frozen_weights(graph):
    """Tell the C++ kernels which tensors are the frozen graph's constants: private to it (the
    model was deep-copied) and never changed, so in the bfloat16 mode the kernels may read
    bfloat16 copies of them, made once (csrc/frozen_weights.h): the GEMVs of the head and the SE
    gates, and the AMX GEMMs' W1."""
    if load_cpu_extension()[0] != "cpp":
        return
    constants = [node.output().toIValue() for node in graph.graph.nodes() if node.kind() == "prim::Constant"]
    torch.ops.ghostkernels.mark_frozen_weights([t for t in constants
                                                if isinstance(t, torch.Tensor) and t.device.type == "cpu"])


def freeze(model, example_inputs):
    """The eval-mode `model` (typically `ghostkernels.accelerate(model)`) as a FrozenModel: its
    forward traced once on `example_inputs` (a tensor or a tuple of positional arguments) into a
    frozen TorchScript graph, run in one native call with no Python between the ops.

    - The weights are snapshotted: later changes to `model` are not seen; freeze again after
      loading new ones. A deleted FrozenModel releases them (not one whose graph calls Python,
      which TorchScript cannot save: _releasable).
    - Inference only: the frozen model runs without autograd (its outputs never require grad).
    - It takes the example's dtypes and device (other ones raise a TypeError); other batch
      sizes, resolutions and memory formats run the same graph.
    - A Ghost op followed by an in-place residual add (a bottleneck's ghost2 and shortcut)
      becomes one `ghost_module_residual` op in the graph, and a 1x1 conv followed by a ReLU and
      the global average pool (GhostNet's last block and pool) one `pointwise_conv2d_pool`; a
      direct conv followed by a ReLU (the stem) one `direct_conv2d` with the ReLU.
    - A torch.compile wrapper is frozen as the eager model it holds.
    - Hooks run while it traces only (a warning says so): their effect on the outputs is kept,
      the hooks themselves are never called again.
    - The trace is checked before it is returned: on the example, on fresh random inputs of
      its shape and on ones with one more image, the frozen model must give the model's
      outputs within accelerate()'s self-check tolerance (1e-5 relative in float32). A forward
      whose Python takes a branch on tensor values (TorchScript's TracerWarning from the model's
      own code) or that fails the check raises a RuntimeError instead: such a trace would
      silently keep one branch.
    """
    model = eager_module(model)  # before the checks: its own mode and module names, not the wrapper's
    inputs = checked_example("freeze", "traces", model, example_inputs)
    devices = {t.device for t in inputs}
    if len(devices) != 1:
        raise ValueError(f"freeze: example_inputs must all be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    precompile_quietly(model, inputs, "freeze")  # on a GPU: the trace's Triton kernels, on a thread pool
    # Outside inference_mode (in that order: the first enables grad): the copy's tensors must
    # keep version counters, which the traced forward's folded-weight caches read.
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # A copy: the frozen graph's constants share storage with the traced module's tensors,
        # and in-place updates of the model must not reach (some of) them.
        traced = torch.jit.trace(deepcopy_module(model), inputs, check_trace=False, strict=False)
        built = torch.jit.freeze(traced.eval())
        fuse_residual_adds(built.graph)
        fuse_pointwise_pools(built.graph)
        fuse_pointwise_epilogues(built.graph)
        fuse_direct_conv_relus(built.graph)
        op_scopes = _op_scopes(built.graph)
        graph = _releasable(built, device)
    _mark_frozen_weights(graph)
    for warning in caught:
        source = os.path.abspath(warning.filename)
        if issubclass(warning.category, torch.jit.TracerWarning):
            if not source.startswith(_PACKAGE_DIR):
                raise RuntimeError("freeze: the model's forward takes a Python branch on its inputs' values or "
                                   f"shapes ({warning.filename}:{warning.lineno}: {warning.message}); a trace "
                                   "would keep one branch for every input: use the model itself")
        elif not source.startswith(_TORCH_JIT_DIR):  # torch.jit's deprecation notices: freeze() chose it
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    same_shape, one_more_image = _fresh(inputs, 0), _fresh(inputs, 1)
    for probe in (inputs, one_more_image):  # the graph's merged ops' kernels for the checks' two shapes
        precompile_quietly(graph, probe, "freeze")
    # accelerate()'s self-check measure and tolerance, for the dtype of the first floating input
    dtype = next((t.dtype for t in inputs if t.is_floating_point()), torch.float32)
    tolerance = _tolerance(dtype, device)
    # In float32 matmuls: the check is of the trace, and under "medium" the graph reads bfloat16
    # copies of its weights where the model reads float32 ones (1e-3 apart in GhostNet's logits).
    with ieee_float32_matmuls(), torch.no_grad():
        for probe, label in ((inputs, "the example"), (same_shape, "random inputs of the example's shape"),
                             (one_more_image, "random inputs with one more image")):
            error = _relative_error(graph(*probe), model(*probe))
            if not error <= tolerance:
                raise RuntimeError(
                    f"freeze: the traced graph gives outputs that differ by {error:.2e} (relative; tolerance "
                    f"{tolerance:.0e}) on {label}; the model's forward does not trace (Python control flow or "
                    "state that a trace keeps fixed): use the model itself")
    return FrozenModel(graph, tuple(t.dtype for t in inputs), device, op_scopes)
