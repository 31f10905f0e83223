"""Why a fused CPU op runs slower inside a model than alone: one op timed after different
preludes, the fixed cost of an op call in a frozen graph, and the read bandwidth per buffer size.

    OPENBLAS_NUM_THREADS=1 python bench/cold_op.py [--threads 2] [--rounds 3] [--calls 60]

1. `ghost_module` at three GhostNet 1.0x shapes (batch 1, NCHW, float32), each call preceded by:
     warm              nothing (the previous call was this one)
     read 16 MB        a 16 MB tensor summed (evicts both cores' L2, stays in L3)
     + own data        then the op's input and weights summed by the calling thread
     + other shape     then the same kernel on other tensors (16 more inputs, 32 more outputs)
     + other, 1 thread that call with one thread (the calling thread's state only)
     sleep 2 ms        the process idle for 2 ms
   Median us per call of the round medians; the conditions alternate within each round.
   Then warm and after the 16 MB read for other kernels, ours and the library's (oneDNN's
   conv, MKL's matmul): whether the penalty is ours.
2. Fixed cost per op call: a frozen TorchScript graph of 61 calls minus one of 1 call, on
   tensors too small to have work (aten relu, ghostkernels direct_conv2d, squeeze_excite_gate
   and the aten mul that applies its gate),
   at 1 and --threads threads (the difference: the parallel region's fork and join).
3. Read bandwidth of --threads threads summing a buffer of 1 MB to 512 MB (the cache levels).
"""

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import machine_line  # noqa: E402

import ghostkernels  # noqa: E402, F401  (registers the ops)

SHAPES = [(160, 480, 7), (112, 336, 14), (80, 184, 14)]  # (inp, oup, H = W)


def ghost_args(inp, oup, size):
    init = (oup + 1) // 2
    return (torch.randn(1, inp, size, size), torch.randn(init, inp, 1, 1), torch.randn(init),
            torch.randn(oup - init, 1, 3, 3), torch.randn(oup - init), oup, 1, "relu")


def median_us(fn, prelude, calls):
    times = []
    for _ in range(calls):
        prelude()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def on_threads(threads, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fn()
    finally:
        torch.set_num_threads(before)


def preludes(args, other):
    big = torch.ones(16 * 1024 * 1024 // 4)
    op = torch.ops.ghostkernels.ghost_module
    return {
        "warm": lambda: None,
        "read 16 MB": lambda: big.sum(),
        "+ own data": lambda: (big.sum(), [a.sum() for a in args if isinstance(a, torch.Tensor)]),
        "+ other shape": lambda: (big.sum(), op(*other)),
        "+ other, 1 thread": lambda: (big.sum(), on_threads(1, lambda: op(*other))),
        "sleep 2 ms": lambda: time.sleep(0.002),
    }


def cold_table(rounds, calls):
    op = torch.ops.ghostkernels.ghost_module
    rows = []
    for inp, oup, size in SHAPES:
        args, other = ghost_args(inp, oup, size), ghost_args(inp + 16, oup + 32, size)
        conditions = preludes(args, other)
        results = {name: [] for name in conditions}
        for _ in range(rounds):
            for name, prelude in conditions.items():
                results[name].append(median_us(lambda: op(*args), prelude, calls))
        rows.append((f"{inp}->{oup}@{size}", {name: statistics.median(v) for name, v in results.items()}))
    names = list(rows[0][1])
    print("1. ghost_module, us per call after each prelude")
    print(f"{'shape':14s}" + "".join(f"{name:>19s}" for name in names))
    for label, values in rows:
        print(f"{label:14s}" + "".join(f"{values[name]:19.1f}" for name in names))


def other_kernels(rounds, calls):
    ops = torch.ops.ghostkernels
    x, w, b = torch.randn(1, 160, 7, 7), torch.randn(240, 160, 1, 1), torch.randn(240)
    plane, taps = torch.randn(1, 240, 14, 14), torch.randn(240, 1, 5, 5)
    pooled = torch.randn(1, 960, 7, 7)
    se = (torch.randn(240, 960, 1, 1), torch.randn(240), torch.randn(960, 240, 1, 1), torch.randn(960))
    kernels = {
        "pointwise_conv2d 160->240@7": lambda: ops.pointwise_conv2d(x, w, b),
        "F.conv2d 1x1 160->240@7": lambda: F.conv2d(x, w, b),
        "torch.mm 240x160x49": lambda: torch.mm(w.view(240, 160), x.view(160, 49)),
        "direct_conv2d dw5 s2 240@14": lambda: ops.direct_conv2d(plane, taps, None, 2),
        "F.conv2d dw5 s2 240@14": lambda: F.conv2d(plane, taps, None, 2, 2, groups=240),
        "squeeze_excite_gate 960@7": lambda: ops.squeeze_excite_gate(pooled, *se),
    }
    big = torch.ones(16 * 1024 * 1024 // 4)
    print(f"\n{'kernel':30s}{'warm':>8s}{'read 16 MB':>12s}")
    for name, kernel in kernels.items():
        warm = statistics.median(median_us(kernel, lambda: None, calls) for _ in range(rounds))
        cold = statistics.median(median_us(kernel, big.sum, calls) for _ in range(rounds))
        print(f"{name:30s}{warm:8.1f}{cold:12.1f}")


class _Chain(torch.nn.Module):
    def __init__(self, calls, kind):
        super().__init__()
        self.calls, self.kind = calls, kind
        self.w = torch.randn(8, 1, 3, 3)
        self.se = (torch.randn(4, 8, 1, 1), torch.randn(4), torch.randn(8, 4, 1, 1), torch.randn(8))

    def forward(self, x):
        for _ in range(self.calls):
            if self.kind == "aten relu":
                x = x.relu()
            elif self.kind == "direct_conv2d":
                x = torch.ops.ghostkernels.direct_conv2d(x, self.w, None, 1)
            else:  # the product keeps x contiguous (the kernel pools NCHW planes itself)
                x = x * torch.ops.ghostkernels.squeeze_excite_gate(x, *self.se)
        return x


def per_call_us(kind, calls=61, reps=500):
    x = torch.randn(1, 8, 2, 2)
    medians = {}
    for n in (1, calls):
        graph = torch.jit.freeze(torch.jit.trace(_Chain(n, kind).eval(), x, check_trace=False))
        medians[n] = median_us(lambda: graph(x), lambda: None, reps)
    return (medians[calls] - medians[1]) / (calls - 1)


def overhead_table(threads):
    print("\n2. fixed cost per op call in a frozen graph, us (tiny tensors)")
    print(f"{'op':28s}{'1 thread':>10s}{f'{threads} threads':>12s}")
    for kind in ("aten relu", "direct_conv2d", "squeeze_excite_gate + mul"):
        costs = []
        for t in (1, threads):
            torch.set_num_threads(t)
            costs.append(per_call_us(kind))
        print(f"{kind:28s}{costs[0]:10.2f}{costs[1]:12.2f}")
    torch.set_num_threads(threads)


def bandwidth_table():
    print("\n3. read bandwidth (tensor.sum), GB/s")
    for mb in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512):
        buffer = torch.ones(mb * 1024 * 1024 // 4)
        buffer.sum()
        seconds = median_us(buffer.sum, lambda: None, max(3, 200 // mb)) / 1e6
        print(f"{mb:5d} MB {buffer.numel() * 4 / seconds / 1e9:8.1f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=60)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(machine_line(args.threads))
    with torch.inference_mode():
        cold_table(args.rounds, args.calls)
        other_kernels(args.rounds, args.calls)
        overhead_table(args.threads)
        bandwidth_table()


if __name__ == "__main__":
    main()
