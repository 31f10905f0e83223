"""Fused Ghost module vs eager PyTorch on the CPU: parity check, medians, ratios, floor.

    python bench/report.py                 # every GhostNet 1.0x shape, batch 1 and 8
    python bench/report.py --quick         # four shapes, batch 1: the README's demo
    python bench/report.py --backward      # forward+backward, fused vs autograd over the reference
    python bench/report.py --channels-last --json out.json
    python bench/report.py --quick --plot report.png         # also a PNG of speedup and x floor (matplotlib)
    python bench/report.py --floor-rates 36,184              # the reference Xeon's floor (docs/architecture.md section 5) instead of measuring

Medians of repeated calls after warm-up, 2 threads unless --threads says otherwise. The floor's
rates (copy bandwidth, float32 GEMM rate) are measured on this machine at the start of the run.
Rows whose repeated timings spread more than --noise ((p90 - p10) / median) are marked noisy.
"""

import argparse
import json
import os
import platform
import statistics
import sys

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy's idle BLAS threads would steal a core

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ghostkernels  # noqa: E402
from cases import GHOSTNET_SHAPES, floor_ms, make_case, make_training_case, shape_name, times_ms  # noqa: E402
from machine import (DEFAULT_NOISE, add_floor_rates_option, cpu_model, floor_rates, import_pyplot, is_noisy,  # noqa: E402
                     machine_line, noise_summary, plot_rows, row_spread)

QUICK_SHAPES = [(16, 16, 112), (24, 72, 56), (80, 200, 14), (160, 960, 7)]
FORWARD_COLUMNS = ["eager", "reference", "fused"]
BACKWARD_COLUMNS = ["reference", "fused"]


def check_parity(outputs, expected, rtol=1e-5):
    for out in outputs:
        scale = expected.abs().max().item()
        torch.testing.assert_close(out, expected, rtol=rtol, atol=rtol * max(scale, 1.0))


def timed_row(shape, batch, floor, fns, noise):
    """A row of medians (ms) with the repeated timings behind them, their spread and the noisy flag."""
    samples = {name: times_ms(fn) for name, fn in fns.items()}
    medians = {name: statistics.median(t) for name, t in samples.items()}
    worst = row_spread(samples)
    return dict(shape=shape, batch=batch, floor=floor, **medians, spread=worst, noisy=is_noisy(worst, noise),
                samples={name: [round(x, 5) for x in t] for name, t in samples.items()})


def forward_rows(shapes, batches, channels_last, rates, noise=DEFAULT_NOISE):
    rows = []
    for batch in batches:
        for inp, oup, size in shapes:
            _, _, fns = make_case(inp, oup, size, batch, channels_last)
            floor = floor_ms(inp, oup, size, batch, copy_bytes_per_s=rates.copy_bytes_per_s,
                             matmul_flops_per_s=rates.matmul_flops_per_s)
            with torch.no_grad():
                results = {name: fn() for name, fn in fns.items()}
                check_parity([results["fused"], results["reference"]], results["eager"])
                rows.append(timed_row(shape_name(inp, oup, size), batch, floor, fns, noise))
            print(format_row(rows[-1], FORWARD_COLUMNS), flush=True)
    return rows


def backward_rows(shapes, batches, noise=DEFAULT_NOISE):
    rows = []
    for batch in batches:
        for inp, oup, size in shapes:
            fns = make_training_case(inp, oup, size, batch)
            grads = {name: fn() for name, fn in fns.items()}
            for a, b in zip(grads["fused"], grads["reference"]):
                check_parity([a], b, rtol=1e-4)
            rows.append(timed_row(shape_name(inp, oup, size), batch, float("nan"), fns, noise))
            print(format_row(rows[-1], BACKWARD_COLUMNS), flush=True)
    return rows


def format_header(columns):
    names = "".join(f"{c:>11}" for c in columns)
    return f"{'shape':>14} {'batch':>5}{names}{'floor':>9}{'speedup':>9}{'x floor':>9}{'spread':>8}"


def format_row(row, columns):
    """One table line; the spread is the largest (p90 - p10) / median of the row's contenders,
    and a trailing `noisy` marks a row above the --noise threshold."""
    baseline = row[columns[0]]
    cells = "".join(f"{row[c]:11.3f}" for c in columns)
    line = (f"{row['shape']:>14} {row['batch']:5d}{cells}{row['floor']:9.3f}{baseline / row['fused']:8.2f}x"
            f"{row['fused'] / row['floor']:8.1f}x{row['spread']:8.0%}")
    return line + ("  noisy" if row.get("noisy") else "")


def print_header(columns):
    print(format_header(columns))


def print_row(row, columns):
    print(format_row(row, columns), flush=True)


def noise_fraction(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"--noise wants a positive fraction (e.g. 0.2), got {text!r}")
    return value


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="four shapes at batch 1")
    parser.add_argument("--batch", type=int, nargs="+", help="batch sizes (default 1 8; --quick: 1)")
    parser.add_argument("--backward", action="store_true", help="time forward+backward instead of forward")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the rows (with their repeated timings) to this file")
    parser.add_argument("--plot", metavar="PATH", help="also draw speedup and x floor to this PNG (needs matplotlib)")
    parser.add_argument("--noise", type=noise_fraction, default=DEFAULT_NOISE,
                        help="flag rows whose (p90 - p10) / median exceeds this fraction (default %(default)s)")
    add_floor_rates_option(parser)
    args = parser.parse_args()
    if args.plot:
        import_pyplot()  # fail now, not after the whole run
    torch.set_num_threads(args.threads)
    shapes = QUICK_SHAPES if args.quick else GHOSTNET_SHAPES
    batches = args.batch or ([1] if args.quick else [1, 8])
    rates = floor_rates(args.floor_rates, args.threads)
    print(f"ghostkernels {ghostkernels.__version__}, torch {torch.__version__}, {platform.machine()}, "
          f"{args.threads} threads, float32, {'channels_last' if args.channels_last else 'NCHW'}")
    print(machine_line(args.threads))
    print(rates.describe())
    print(f"backends: {ghostkernels.backends()['cpu']}")
    print("milliseconds (median); speedup = first column / fused; x floor = fused / floor; "
          "spread = (p90 - p10) / median, worst contender; parity checked\n")
    if args.backward:
        columns = BACKWARD_COLUMNS
        print_header(columns)
        rows = backward_rows(shapes, batches, args.noise)
        label = "autograd over the reference"
    else:
        columns = FORWARD_COLUMNS
        print_header(columns)
        rows = forward_rows(shapes, batches, args.channels_last, rates, args.noise)
        label = "eager"
    speedups = [r[columns[0]] / r["fused"] for r in rows]
    print(f"\nfused vs {label}: min {min(speedups):.2f}x, geometric mean "
          f"{statistics.geometric_mean(speedups):.2f}x, max {max(speedups):.2f}x")
    summary = noise_summary(rows, args.noise, [r[c] for r in rows for c in columns])
    for line in summary:
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.plot:
        title = (f"fused vs {label}, {'backward' if args.backward else 'forward'}, {cpu_model()}, "
                 f"{args.threads} threads\n{rates.describe()}")
        if any("medians" in line for line in summary):
            title += "\nWARNING: medians quantised by the clock or scheduler; repeat on a quiet machine"
        print(f"plot written to {plot_rows(rows, args.plot, columns[0], title)}")


if __name__ == "__main__":
    main()
