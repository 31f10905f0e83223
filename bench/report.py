"""Fused Ghost module vs eager PyTorch on the CPU: parity check, medians, ratios, floor.

    python bench/report.py                 # every GhostNet 1.0x shape, batch 1 and 8
    python bench/report.py --quick         # four shapes, batch 1: the README's demo
    python bench/report.py --backward      # forward+backward, fused vs autograd over the reference
    python bench/report.py --channels-last --json out.json

Medians of repeated calls after warm-up, 2 threads unless --threads says otherwise.
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
from cases import GHOSTNET_SHAPES, floor_ms, make_case, make_training_case, median_ms, shape_name  # noqa: E402

QUICK_SHAPES = [(16, 16, 112), (24, 72, 56), (80, 200, 14), (160, 960, 7)]


def check_parity(outputs, expected, rtol=1e-5):
    for out in outputs:
        scale = expected.abs().max().item()
        torch.testing.assert_close(out, expected, rtol=rtol, atol=rtol * max(scale, 1.0))


def forward_rows(shapes, batches, channels_last):
    rows = []
    for batch in batches:
        for inp, oup, size in shapes:
            _, _, fns = make_case(inp, oup, size, batch, channels_last)
            with torch.no_grad():
                results = {name: fn() for name, fn in fns.items()}
                check_parity([results["fused"], results["reference"]], results["eager"])
                times = {name: median_ms(fn) for name, fn in fns.items()}
            rows.append(dict(shape=shape_name(inp, oup, size), batch=batch, floor=floor_ms(inp, oup, size, batch), **times))
            print_row(rows[-1], ["eager", "reference", "fused"])
    return rows


def backward_rows(shapes, batches):
    rows = []
    for batch in batches:
        for inp, oup, size in shapes:
            fns = make_training_case(inp, oup, size, batch)
            grads = {name: fn() for name, fn in fns.items()}
            for a, b in zip(grads["fused"], grads["reference"]):
                check_parity([a], b, rtol=1e-4)
            times = {name: median_ms(fn) for name, fn in fns.items()}
            rows.append(dict(shape=shape_name(inp, oup, size), batch=batch, floor=float("nan"), **times))
            print_row(rows[-1], ["reference", "fused"])
    return rows


def print_header(columns):
    names = "".join(f"{c:>11}" for c in columns)
    print(f"{'shape':>14} {'batch':>5}{names}{'floor':>9}{'speedup':>9}{'x floor':>9}")


def print_row(row, columns):
    baseline = row[columns[0]]
    cells = "".join(f"{row[c]:11.3f}" for c in columns)
    print(f"{row['shape']:>14} {row['batch']:5d}{cells}{row['floor']:9.3f}{baseline / row['fused']:8.2f}x"
          f"{row['fused'] / row['floor']:8.1f}x", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="four shapes at batch 1")
    parser.add_argument("--batch", type=int, nargs="+", help="batch sizes (default 1 8; --quick: 1)")
    parser.add_argument("--backward", action="store_true", help="time forward+backward instead of forward")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = QUICK_SHAPES if args.quick else GHOSTNET_SHAPES
    batches = args.batch or ([1] if args.quick else [1, 8])
    print(f"ghostkernels {ghostkernels.__version__}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} threads, float32, {'channels_last' if args.channels_last else 'NCHW'}")
    print(f"backends: {ghostkernels.backends()['cpu']}")
    print("milliseconds (median); speedup = first column / fused; x floor = fused / floor; parity checked\n")
    if args.backward:
        print_header(["reference", "fused"])
        rows = backward_rows(shapes, batches)
        speedups = [r["reference"] / r["fused"] for r in rows]
        label = "autograd over the reference"
    else:
        print_header(["eager", "reference", "fused"])
        rows = forward_rows(shapes, batches, args.channels_last)
        speedups = [r["eager"] / r["fused"] for r in rows]
        label = "eager"
    print(f"\nfused vs {label}: min {min(speedups):.2f}x, geometric mean "
          f"{statistics.geometric_mean(speedups):.2f}x, max {max(speedups):.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
