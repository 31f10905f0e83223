"""The per-call host (Python) cost of a Ghost module's forward on the Triton path, without a GPU.

    python bench/host_path.py [--calls 2000]

GhostNet 1.0x's 21 Ghost-module shapes at batch 1, channels_last, float16-sized work done in
float32 on CPU tensors (the host path does not look at values). The Triton launch itself is
stubbed out, so what is timed is ours:
  launcher   triton_ghost.forward: shapes, output allocation, config lookup, argument list
  op entry   ops._ghost_module_cuda (the op's CUDA kernel, called directly) + the launcher
  module     GhostModule.forward in eval (folded-weight cache, input check, ops.apply) with the
             dispatcher hop replaced by that direct call
  backward   triton_ghost.backward: gz1 and partial-sum buffers, the launch, the reduction of the
             partial sums (the library's convolution backward stubbed too: device work)
and, for scale, the dispatcher hop of a torch.library op whose kernel is a Python function
(what torch.ops.ghostkernels.ghost_module adds on CUDA). The library GEMM of wide inputs is
stubbed too (it is device work). Not measured here: Triton's own
launcher (JITFunction.run: argument binding and the specialisation key), which needs a GPU;
bench/gpu_report.py times whole calls there. Median microseconds per call.
"""

import argparse
import os
import statistics
import sys
import time
from unittest import mock

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cases import GHOSTNET_SHAPES  # noqa: E402
from machine import machine_line  # noqa: E402

import ghostkernels  # noqa: E402
from ghostkernels import ops, triton_ghost  # noqa: E402


class _StubKernel:
    """Stands for a Triton JITFunction: kernel[grid](*args, **kwargs) does nothing."""

    def __init__(self, kernel):
        self.arg_names = kernel.arg_names

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def per_call_us(fn, calls):
    for _ in range(20):
        fn()
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls // 5):
            fn()
        samples.append((time.perf_counter() - start) / (calls // 5) * 1e6)
    return statistics.median(samples)


def _convolution_backward_stub(grad_output, x, weight, *args):
    """aten.convolution_backward's outputs (grad x, grad W1, no bias grad) without the device work."""
    return torch.empty_like(x), torch.empty_like(weight), None


def _library_primary_stub(x, primary_weight, scale=None):
    """triton_ghost.library_primary's host work (its output's allocation) without the GEMM."""
    batch, _, height, width = x.shape
    return torch.empty(batch, primary_weight.shape[0], height, width).to(memory_format=torch.channels_last)


_probe = torch.library.Library("ghostkernels_host_probe", "DEF")
_probe.define("identity(Tensor x) -> Tensor")
_probe.impl("identity", lambda x: x, "CPU")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "host-path.txt"))
    args = parser.parse_args()
    lines = [f"# {machine_line(torch.get_num_threads())}",
             f"# torch {torch.__version__}; median us per call; Triton launch stubbed",
             "shape            launcher  op-entry  module  backward"]
    totals = [0.0, 0.0, 0.0, 0.0]
    # the launch plans made here hold the stubs: made anew, and dropped after
    with torch.no_grad(), mock.patch.dict(triton_ghost._plans, clear=True), \
            mock.patch.object(triton_ghost, "_ghost_forward_kernel", _StubKernel(triton_ghost._ghost_forward_kernel)), \
            mock.patch.object(triton_ghost, "_ghost_rows3_kernel", _StubKernel(triton_ghost._ghost_rows3_kernel)), \
            mock.patch.object(triton_ghost, "_ghost_backward_kernel", _StubKernel(triton_ghost._ghost_backward_kernel)), \
            mock.patch.object(triton_ghost, "_ghost_backward_rows3_kernel",
                              _StubKernel(triton_ghost._ghost_backward_rows3_kernel)), \
            mock.patch.object(torch.ops.aten, "convolution_backward", _convolution_backward_stub), \
            mock.patch.object(triton_ghost, "library_primary", _library_primary_stub), \
            mock.patch.object(ops, "call", lambda op, *a: ops._ghost_module_cuda(*a)):
        for inp, oup, size in GHOSTNET_SHAPES:
            module = ghostkernels.GhostModule(inp, oup, relu=True).eval()
            x = torch.randn(1, inp, size, size).to(memory_format=torch.channels_last)
            w1, b1, w2, b2 = module.folded_weights()[:4]
            config = (oup, 1, "relu")
            out = torch.randn(1, oup, size, size).to(memory_format=torch.channels_last)
            grad = torch.randn_like(out)
            times = [
                per_call_us(lambda: triton_ghost.forward(x, w1, b1, w2, b2, *config), args.calls),
                per_call_us(lambda: ops._ghost_module_cuda(x, w1, b1, w2, b2, *config), args.calls),
                per_call_us(lambda: module(x), args.calls),
                per_call_us(lambda: triton_ghost.backward(grad, out, x, w1, b1, w2, b2, *config), args.calls),
            ]
            totals = [t + s for t, s in zip(totals, times)]
            lines.append(f"{inp:>4}->{oup:<4}@{size:<4}  " + "  ".join(f"{t:8.1f}" for t in times))
    x = torch.randn(4)
    hop = per_call_us(lambda: torch.ops.ghostkernels_host_probe.identity(x), args.calls)
    lines.append("sum of 21         " + "  ".join(f"{t:8.1f}" for t in totals))
    lines.append(f"dispatcher hop to a Python kernel: {hop:.1f} us per call (x21: {21 * hop:.0f} us)")
    print("\n".join(lines))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
