"""Benchmark cases: GhostNet 1.0x Ghost-module shapes (docs/architecture.md section 1), their inputs and the
contenders (eager unfused module, the reference op, the fused op), on any device and dtype."""

import statistics
import time

import torch

from ghostkernels import GhostModule, ghost_module_reference

def _timed_calls(fn, min_time, min_runs, device):
    """Seconds per call of at least min_runs calls and min_time seconds. On CUDA each call is
    synchronised."""
    def call():
        fn()
        if device == "cuda":
            torch.cuda.synchronize()

    times = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return times


def times_ms(fn, min_time=0.3, min_runs=10, device="cpu"):
    """Single-call times (ms) after 3 warm-up calls: the samples behind a median and its spread."""
    _timed_calls(fn, 0, 3, device)
    return [t * 1e3 for t in _timed_calls(fn, min_time, min_runs, device)]


def median_ms(fn, min_time=0.3, min_runs=10, device="cpu"):
    """Median of single-call times after 3 warm-up calls."""
    return statistics.median(times_ms(fn, min_time, min_runs, device))


def interleaved_rounds_ms(fns, rounds=5, min_time=1.0, device="cpu"):
    """{name: [[ms of each call] of each round]} of the callables in `fns`, timed in turn for `rounds`
    rounds (min_time seconds each in all), so that a slow spell of a noisy machine hits every contender alike.
    Each round starts one contender further along: in a fixed order one contender would always run
    right after the same other one, and take whatever that one leaves behind (its thread pool still
    spinning, its data in the caches)."""
    for fn in fns.values():
        _timed_calls(fn, 0, 3, device)
    names = list(fns)
    times = {name: [] for name in fns}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append([x * 1e3 for x in _timed_calls(fns[name], min_time / rounds, 2, device)])
    return times


def calls_ms(rounds_ms):
    """{name: [ms of each call]} of interleaved_rounds_ms's result, its rounds together."""
    return {name: [t for r in per_round for t in r] for name, per_round in rounds_ms.items()}


def interleaved_times_ms(fns, rounds=5, min_time=1.0, device="cpu"):
    """{name: [ms of each call]} of interleaved_rounds_ms."""
    return calls_ms(interleaved_rounds_ms(fns, rounds, min_time, device))


def round_ratios(rounds_ms, ours, theirs):
    """Median ms of `ours` / median ms of `theirs` in each round of interleaved_rounds_ms. The machine's
    speed drifts between minutes (up to 2x on the shared Xeon), so two contenders' medians over a run
    compare less well than their ratios within each round, which shares one speed."""
    return [statistics.median(a) / statistics.median(b) for a, b in zip(rounds_ms[ours], rounds_ms[theirs])]


def interleaved_median_ms(fns, rounds=5, min_time=1.0, device="cpu"):
    """{name: median ms} of interleaved_times_ms."""
    return {name: statistics.median(t) for name, t in interleaved_times_ms(fns, rounds, min_time, device).items()}


# (inp, oup, H=W) of every Ghost module in GhostNet 1.0x.
GHOSTNET_SHAPES = [
    (16, 16, 112), (16, 48, 112), (48, 24, 56), (24, 72, 56), (72, 24, 56), (72, 40, 28),
    (40, 120, 28), (120, 40, 28), (40, 240, 28), (240, 80, 14), (80, 200, 14), (200, 80, 14),
    (80, 184, 14), (184, 80, 14), (80, 480, 14), (480, 112, 14), (112, 672, 14), (672, 112, 14),
    (672, 160, 7), (160, 960, 7), (960, 160, 7),
]

# GhostNet 1.0x's direct convs (in, out, inputs per group, k, stride, size): the stem, the 5 x 5
# conv_dw of blocks 3.0 and 7.0 (the 3 x 3 ones run fused with ghost1 on a GPU), the shortcuts'
# depthwise convs.
DIRECT_CONVS = [(3, 16, 3, 3, 2, 224), (72, 72, 1, 5, 2, 56), (672, 672, 1, 5, 2, 14), (16, 16, 1, 3, 2, 112),
                (24, 24, 1, 5, 2, 56), (40, 40, 1, 3, 2, 28), (80, 80, 1, 3, 1, 14), (112, 112, 1, 5, 2, 14)]


def direct_conv_name(inp, oup, group_inputs, k, stride, size):
    return f"{'stem' if group_inputs > 1 else 'dw'} {inp}->{oup}@{size} k{k} s{stride}"


# The reference Xeon of docs/architecture.md section 5: copy bandwidth and float32 matrix-product rate, 2 threads.
# The benchmarks measure the machine they run on instead (bench/machine.py); these are the
# defaults of floor_ms and what `--floor-rates 36,184` reproduces.
COPY_BYTES_PER_S = 36e9
MATMUL_FLOPS_PER_S = 184e9


def shape_name(inp, oup, size):
    return f"{inp}->{oup}@{size}"


def floor_ms(inp, oup, size, batch, ratio=2, dw=3, elem_bytes=4,
             copy_bytes_per_s=COPY_BYTES_PER_S, matmul_flops_per_s=MATMUL_FLOPS_PER_S):
    """max(bytes in + out / copy bandwidth, FLOPs / matrix-product rate), as in docs/architecture.md section 5,
    with the rates of the machine (bench/machine.py's floor_rates) or the reference Xeon's (docs/architecture.md section 5)."""
    init = -(-oup // ratio)
    pixels = batch * size * size
    bytes_moved = (inp + oup) * pixels * elem_bytes
    flops = 2 * pixels * (inp * init + (oup - init) * dw * dw)
    return max(bytes_moved / copy_bytes_per_s, flops / matmul_flops_per_s) * 1e3


def make_case(inp, oup, size, batch, channels_last=False, seed=0, device="cpu", dtype=torch.float32):
    """An eval GhostModule with random BN statistics, its input, and the three contenders."""
    generator = torch.Generator().manual_seed(seed)
    module = GhostModule(inp, oup).eval()
    with torch.no_grad():
        for bn in (module.primary_conv[1], module.cheap_operation[1]):
            bn.running_mean.uniform_(-1, 1, generator=generator)
            bn.running_var.uniform_(0.5, 2, generator=generator)
            bn.weight.uniform_(0.5, 1.5, generator=generator)
            bn.bias.uniform_(-0.5, 0.5, generator=generator)
    x = torch.randn(batch, inp, size, size, generator=generator)
    module, x = module.to(device, dtype), x.to(device, dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
        module = module.to(memory_format=torch.channels_last)
    weights = module.folded_weights()

    def eager():  # the unfused module as PyTorch runs it: conv, BN, ReLU, conv, BN, ReLU, cat, slice
        x1 = module.primary_conv(x)
        return torch.cat([x1, module.cheap_operation(x1)], dim=1)[:, :oup]

    def reference():
        return ghost_module_reference(x, *weights, out_channels=oup)

    def fused():
        return module(x)

    return module, x, {"eager": eager, "reference": reference, "fused": fused}


def make_training_case(inp, oup, size, batch, seed=0, device="cpu", dtype=torch.float32, channels_last=False):
    """Forward+backward of the fused op and of autograd over the reference, on folded weights."""
    from ghostkernels import ghost_module

    generator = torch.Generator().manual_seed(seed)
    init = -(-oup // 2)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, inp, size, size, generator=generator).to(device, dtype, memory_format=fmt)
    weights = [
        torch.randn(init, inp, 1, 1, generator=generator) / inp**0.5,
        torch.randn(init, generator=generator),
        torch.randn(init, 1, 3, 3, generator=generator) / 3,
        torch.randn(init, generator=generator),
    ]
    leaves = [t.to(device, dtype).requires_grad_() for t in (x, *weights)]
    x, weights = leaves[0], leaves[1:]
    grad = torch.randn(batch, oup, size, size, generator=generator).to(device, dtype, memory_format=fmt)

    def step(fn):
        def run():
            out = fn(x, *weights, out_channels=oup)
            return torch.autograd.grad(out, leaves, grad)

        return run

    return {"reference": step(ghost_module_reference), "fused": step(ghost_module)}
