"""precompile(): compile, on a thread pool, the Triton kernels a model's CUDA forward launches.

A first CUDA forward compiles each Triton kernel variant it meets, one after the other (0.1-1 s
each; an accelerated GhostNet meets dozens: `bench/first_call_compile.py` counts them). Triton's
compilation (its MLIR passes, ptxas) releases the GIL for most of its time: two threads compiled
GhostNet 1.0x's 24 forward variants 1.5x faster than one on a 2-core CPU. So precompile runs the forward
once with every ghostkernels launch turned into a compile request (Triton's warmup, queued by its
AsyncCompileMode), compiles them on `workers` threads, and the next forward finds them compiled.
That forward's other ops (cuBLAS, cuDNN) run on uninitialised activations and its output is
discarded; in eval mode a forward changes nothing else.
"""

import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch


def precompile(model, example_inputs, workers=None):
    """Compile the Triton kernels that `model(*example_inputs)` launches (an eval-mode model; a
    tensor or a tuple of positional arguments) on `workers` threads (default: one per CPU).
    Returns (kernels compiled, seconds); (0, 0.0) where nothing runs on Triton (no CUDA input,
    Triton's interpreter). With GHOSTKERNELS_AUTOTUNE=1, or a Triton without AsyncCompileMode,
    it runs one ordinary forward instead (tuning times real launches), kernels counted as None."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"precompile: model must be a torch.nn.Module, got {type(model).__name__}")
    if getattr(model, "training", False):  # a frozen TorchScript graph has no such attribute
        raise ValueError("precompile: the model must be in eval mode (a training-mode forward would update its "
                         "BatchNorm statistics from the uninitialised activations of a compile-only forward)")
    example = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    if not any(isinstance(t, torch.Tensor) and t.is_cuda for t in example):
        return 0, 0.0
    return compile_forward(model, example, workers)


def compile_forward(model, example, workers=None):
    """precompile's work on any device whose ops launch ghostkernels' Triton kernels."""
    from . import _backends

    triton_ghost = _backends.triton_kernels()  # Triton only where there is something to compile
    if triton_ghost is None or triton_ghost.INTERPRET:  # none (or too old): the ops run the reference
        return 0, 0.0
    start = time.perf_counter()
    try:
        from triton.runtime._async_compile import AsyncCompileMode  # private: Triton 3.5+
    except ImportError:
        AsyncCompileMode = None
    if AsyncCompileMode is None or os.environ.get("GHOSTKERNELS_AUTOTUNE") == "1":
        with torch.no_grad():
            model(*example)
        return None, time.perf_counter() - start
    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool, AsyncCompileMode(pool) as requests:
        with torch.no_grad(), triton_ghost.compile_only():
            model(*example)
        kernels = len(requests.future_kernels)
    return kernels, time.perf_counter() - start


def jit_kernels():
    """ghostkernels' Triton kernels (JITFunctions; their device_caches hold the compiled variants)."""
    import triton

    from . import triton_cheap_mix, triton_direct_conv, triton_ghost, triton_ghost_train, triton_squeeze_excite
    for module in (triton_ghost, triton_direct_conv, triton_squeeze_excite, triton_cheap_mix, triton_ghost_train):
        yield from (value for value in vars(module).values() if isinstance(value, triton.runtime.JITFunction))


def precompile_quietly(model, example_inputs, caller):
    """precompile for accelerate(), capture() and freeze(), which do not need it to succeed: a failure
    (a Triton whose warmup or AsyncCompileMode changed, say) leaves the compiling to the first
    forward, with a warning. Returns precompile's (kernels, seconds), (0, 0.0) on a failure."""
    try:
        return precompile(model, example_inputs)
    except Exception as exc:  # noqa: BLE001 - an optimisation only; the forward compiles what it needs
        warnings.warn(f"ghostkernels.{caller}: compiling the Triton kernels ahead of the first forward failed "
                      f"({type(exc).__name__}: {exc}); the first forward compiles them one by one", stacklevel=3)
        return 0, 0.0
