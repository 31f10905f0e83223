"""What a first CUDA forward compiles, measured without a GPU: the Triton kernel variants of an
accelerated GhostNet's forward, compiled for sm_<arch> one by one and by ghostkernels.precompile's
thread pool, on this machine's CPU.

    PYTHONPATH=<a triton==3.6.0 install>:. python bench/first_call_compile.py [--batch 64] [--workers 1 2]

The ops' CUDA entries run on CPU tensors (registered as the CPU kernels, as in
tests/test_cuda_entries_on_cpu.py) under precompile's compile-only forward, with a stand-in for
Triton's CUDA driver that answers "sm_<arch>, device 0": Triton binds, specialises and compiles each
launch as it would on that GPU (ptxas included) and nothing runs. Each run uses a fresh Triton cache.
The model is the zoo's GhostNet 1.0x by default, eval, float16, channels_last at 224 x 224 (as
gpu_report.py's first call; the configurations are the heuristic's: a GPU's tuned table may pick
others). tests/test_precompile.py runs it on a small GhostNet.
"""

import argparse
import os
import sys
import tempfile
import time
import warnings

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from test_cuda_entries_on_cpu import CUDA_ENTRIES  # noqa: E402

os.environ.pop("TRITON_INTERPRET", None)  # tests/conftest.py sets it; the Triton modules are not imported yet
import ghostkernels  # noqa: E402
from ghostkernels import ops, triton_ghost  # noqa: E402
from ghostkernels.precompile import compile_forward, jit_kernels  # noqa: E402


class CompileOnlyDriver:
    """Triton's active driver where there is no GPU: what the JIT asks before it compiles."""

    def __init__(self, arch):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


compile_seconds = []  # (seconds, kernel name) of each compilation, in the order they finished


def timed(compile):
    """triton.compiler.compile, each call's seconds recorded (JITFunction binds it when its
    device cache is made, so forget_compiled_kernels() lets the wrapper in)."""
    def compile_and_time(src, *args, **kwargs):
        start = time.perf_counter()
        kernel = compile(src, *args, **kwargs)
        compile_seconds.append((time.perf_counter() - start, src.name))
        return kernel
    return compile_and_time


triton.compiler.compile = timed(triton.compiler.compile)


def forget_compiled_kernels():
    """A fresh process's state: an empty Triton cache on disk and in memory."""
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="ghostkernels-first-call-")
    for plan in triton_ghost._plans.values():
        plan.compiled.clear()
    for kernel in jit_kernels():
        kernel.device_caches.clear()


def compile_first_forward(model, x, workers, arch=90):
    """(kernels, seconds) of precompile's compile-only forward."""
    library = torch.library.Library("ghostkernels", "IMPL")
    previous, cpu_dtypes = driver._active, ops.CPU_KERNEL_DTYPES
    driver.set_active(CompileOnlyDriver(arch))
    ops.CPU_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # reach the ops
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Overriding a previously registered kernel": the point
            for name, entry in CUDA_ENTRIES.items():
                library.impl(name, entry, "CPU")
        return compile_forward(model, (x,), workers)
    finally:
        driver._active, ops.CPU_KERNEL_DTYPES = previous, cpu_dtypes
        library._destroy()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ghostnet_100", help="a GhostNet of the zoo (ghostkernels.models)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    parser.add_argument("--arch", type=int, default=90)
    args = parser.parse_args()
    # self-checked, as accelerate() runs by default: only then are the residual adds fused (their variants compiled)
    model = ghostkernels.accelerate(getattr(ghostkernels.models, args.model)().eval())
    model = model.half().to(memory_format=torch.channels_last)
    x = torch.randn(args.batch, 3, args.size, args.size, dtype=torch.float16).to(memory_format=torch.channels_last)
    print(f"triton {triton.__version__}, torch {torch.__version__}, {os.cpu_count()} CPUs, sm_{args.arch}, "
          f"{args.model} batch {args.batch} x 3 x {args.size} x {args.size} float16 channels_last")
    for workers in args.workers:
        forget_compiled_kernels()
        compile_seconds.clear()
        kernels, seconds = compile_first_forward(model, x, workers, args.arch)
        slowest = ", ".join(f"{name} {t:.2f}" for t, name in sorted(compile_seconds, reverse=True)[:4])
        again, forward = compile_first_forward(model, x, workers, args.arch)  # all compiled: the forward alone
        print(f"workers {workers}: {kernels} kernel variants, precompile {seconds:.1f} s, of which the "
              f"compile-only forward on this CPU {forward:.1f} s: compiling {seconds - forward:.1f} s; again: {again} "
              f"compiled; each compile {sum(t for t, _ in compile_seconds):.1f} s in all, the slowest (s): {slowest}",
              flush=True)


if __name__ == "__main__":
    main()
