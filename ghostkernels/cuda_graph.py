"""capture(): an eval-mode model's forward as one CUDA graph, replayed for a fixed input shape.

At batch 1 a GhostNet on a GPU is bound by the host: each of its ~100 kernels costs a launch
(several microseconds of Python, dispatch and driver) for a few microseconds of GPU work. A CUDA
graph records the launches once and replays them in one call. The ghostkernels ops are
capturable: no host synchronisation, no `.item()`, Triton configurations chosen at the first
(warm-up) call, outputs allocated from the graph's pool.
"""

import torch
from torch import nn

from .acceleration import _relative_error, _tolerance
from .freeze import check_tensor_arguments, checked_example
from .ops import refuse_torchscript
from .precompile import precompile_quietly


class CapturedModel(nn.Module):
    """What capture() returns: the recorded graph and its static input and output tensors."""

    __prepare_scriptable__ = refuse_torchscript

    def __init__(self, model, graph, static_inputs, static_output):
        super().__init__()
        self.model = model
        self.graph = graph
        self.static_inputs = static_inputs
        self.static_output = static_output

    def forward(self, *args):
        check_tensor_arguments("CapturedModel", args, len(self.static_inputs))
        for index, (arg, static) in enumerate(zip(args, self.static_inputs)):
            if arg.shape != static.shape or arg.dtype != static.dtype or arg.device != static.device:
                raise ValueError(
                    f"CapturedModel: argument {index} is {tuple(arg.shape)} {arg.dtype} on {arg.device}; the graph was "
                    f"captured for {tuple(static.shape)} {static.dtype} on {static.device}: capture() again with "
                    "such an example (a graph replays fixed shapes)")
        for static, arg in zip(self.static_inputs, args):
            static.copy_(arg)
        self.graph.replay()
        # A copy: the next replay overwrites the static output, and an output the caller kept
        # must not change under it (a clone of the logits is a few kilobytes).
        return self.static_output.clone()

    def extra_repr(self):
        return ", ".join(f"{tuple(t.shape)} {t.dtype}" for t in self.static_inputs)


def capture(model, example_inputs, warmup=3):
    """The eval-mode `model` (typically `ghostkernels.accelerate(model)`) on CUDA as a
    CapturedModel: its forward recorded once into a CUDA graph on `example_inputs` (a tensor or a
    tuple of positional arguments), then replayed on each call with the call's inputs copied in.

    - Fixed shapes: a call whose inputs differ from the example in shape, dtype or device raises
      a ValueError (capture again for another batch size or resolution).
    - Inference only (no autograd); the weights are those at capture time as far as the model
      reads them in place (a parameter replaced by a new tensor is not seen: capture again).
    - `warmup` forwards run first on a side stream: Triton compiles and picks its
      configurations there, and cuDNN its algorithms, outside the recording.
    - The replay is checked against the model on the example before it is returned (accelerate()'s
      self-check tolerance for the dtype).
    - The model's forward must return one tensor.
    """
    inputs = checked_example("capture", "records", model, example_inputs)
    devices = {t.device for t in inputs}
    if len(devices) != 1 or next(iter(devices)).type != "cuda":
        raise ValueError(f"capture: example_inputs must all be on one CUDA device, got {sorted(map(str, devices))}")
    if not isinstance(warmup, int) or warmup < 1:
        raise ValueError(f"capture: warmup must be a positive int, got {warmup!r}")
    static_inputs = tuple(t.clone() for t in inputs)
    side = torch.cuda.Stream(device=static_inputs[0].device)
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        precompile_quietly(model, static_inputs, "capture")  # the kernels in parallel, then the warm-up runs
        for _ in range(warmup):
            expected = model(*static_inputs)
    torch.cuda.current_stream().wait_stream(side)
    if not isinstance(expected, torch.Tensor):
        raise TypeError(f"capture: the model must return one tensor, got {type(expected).__name__}")
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_output = model(*static_inputs)
    captured = CapturedModel(model, graph, static_inputs, static_output)
    with torch.no_grad():
        error = _relative_error(captured(*inputs), model(*inputs))
    tolerance = _tolerance(expected.dtype, expected.device)
    if not error <= tolerance:
        raise RuntimeError(f"capture: the replayed graph differs from the model by {error:.2e} (relative; tolerance "
                           f"{tolerance:.0e}): the forward does something a CUDA graph cannot replay (host-side "
                           "state, a synchronisation, a fresh random draw): use the model itself")
    return captured
