"""Fused Triton Ghost module vs cuDNN eager and torch.compile on a GPU, against the memory floor.

    python bench/gpu_report.py                       # every GhostNet 1.0x shape, batch 1 32 256, fp16 bf16 fp32
    python bench/gpu_report.py --batch 256 --dtype float16 --quick

For each shape, batch and dtype: parity of the fused op with eager (NCHW and channels_last),
then triton.testing.do_bench medians (ms) of
  forward:  eager NCHW, eager channels_last, torch.compile(unfused, channels_last), fused channels_last
  fwd+bwd:  eager autograd over the reference op (channels_last), fused (channels_last)
and the floor: max(bytes in + out over the measured device-to-device copy bandwidth, FLOPs over
the measured matmul rate of the dtype), both measured on this GPU at the start of the run.
Writes the table to bench/results/<device name>.md.
"""

import argparse
import os
import re
import statistics
import sys

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ghostkernels  # noqa: E402
from cases import GHOSTNET_SHAPES, floor_ms, make_case, make_training_case, shape_name  # noqa: E402

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 2e-2, torch.float32: 1e-2}  # float32 dots run as TF32


def copy_bandwidth():
    """Bytes per second of a large device-to-device copy (read + write)."""
    src = torch.randn(256 * 2**20 // 4, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=200, return_mode="median")
    return 2 * src.numel() * 4 / (ms * 1e-3)


def matmul_rate(dtype, n=4096):
    """FLOP/s of an n x n x n torch.mm in `dtype` (float32 with TF32 on, as the fused kernels' dots)."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        ms = do_bench(lambda: torch.mm(a, b), warmup=25, rep=100, return_mode="median")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return 2 * n**3 / (ms * 1e-3)


def median(fn):
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def check(out, expected, dtype):
    tol = TOLERANCE[dtype]
    scale = max(expected.float().abs().max().item(), 1.0)
    torch.testing.assert_close(out.float(), expected.float(), rtol=tol, atol=tol * scale)


def forward_row(inp, oup, size, batch, dtype, bandwidth, flops_per_s):
    _, _, nchw = make_case(inp, oup, size, batch, channels_last=False, device="cuda", dtype=dtype)
    module, x, cl = make_case(inp, oup, size, batch, channels_last=True, device="cuda", dtype=dtype)
    compiled = torch.compile(cl["eager"])
    with torch.no_grad():
        check(cl["fused"](), cl["eager"](), dtype)
        check(nchw["fused"](), nchw["eager"](), dtype)
        check(compiled(), cl["eager"](), dtype)
        times = {
            "eager": median(nchw["eager"]),
            "eager_cl": median(cl["eager"]),
            "compile": median(compiled),
            "fused": median(cl["fused"]),
        }
    floor = floor_ms(inp, oup, size, batch, elem_bytes=x.element_size(), copy_bytes_per_s=bandwidth,
                     matmul_flops_per_s=flops_per_s)
    return dict(times, floor=floor)


def training_row(inp, oup, size, batch, dtype):
    fns = make_training_case(inp, oup, size, batch, device="cuda", dtype=dtype, channels_last=True)
    for actual, expected in zip(fns["fused"](), fns["reference"]()):
        check(actual, expected, dtype)
    return {"eager_train": median(fns["reference"]), "fused_train": median(fns["fused"])}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--quick", action="store_true", help="four shapes")
    parser.add_argument("--no-backward", action="store_true")
    parser.add_argument("--out", help="markdown file (default bench/results/<device>.md)")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "gpu_report.py needs a CUDA device; bench/report.py is the CPU one"
    device = torch.cuda.get_device_name()
    shapes = [GHOSTNET_SHAPES[i] for i in (0, 3, 10, 19)] if args.quick else GHOSTNET_SHAPES
    bandwidth = copy_bandwidth()
    matmul = {name: matmul_rate(DTYPES[name]) for name in args.dtype}
    rates = ", ".join(f"{name} matmul {rate / 1e12:.1f} TFLOP/s" for name, rate in matmul.items())
    header = (f"# {device}\n\nghostkernels {ghostkernels.__version__}, torch {torch.__version__}, "
              f"triton {triton.__version__}; measured: copy bandwidth {bandwidth / 1e9:.0f} GB/s, {rates}; "
              "do_bench medians in ms; fused and compile run channels_last\n\n"
              "| dtype | shape | batch | eager NCHW | eager CL | compile | fused | floor | vs eager CL | vs compile "
              "| x floor | eager fwd+bwd | fused fwd+bwd | fwd+bwd speedup |\n" + "|---" * 15 + "|\n")
    lines = [header]
    print(header, end="", flush=True)
    ratios = {}
    for dtype_name in args.dtype:
        dtype = DTYPES[dtype_name]
        for batch in args.batch:
            for inp, oup, size in shapes:
                row = forward_row(inp, oup, size, batch, dtype, bandwidth, matmul[dtype_name])
                train = {"eager_train": float("nan"), "fused_train": float("nan")}
                if not args.no_backward:
                    train = training_row(inp, oup, size, batch, dtype)
                key = (dtype_name, batch)
                ratios.setdefault(key, []).append(row["fused"] / row["floor"])
                line = (f"| {dtype_name} | {shape_name(inp, oup, size)} | {batch} | {row['eager']:.4f} | "
                        f"{row['eager_cl']:.4f} | {row['compile']:.4f} | {row['fused']:.4f} | {row['floor']:.4f} | "
                        f"{row['eager_cl'] / row['fused']:.2f}x | {row['compile'] / row['fused']:.2f}x | "
                        f"{row['fused'] / row['floor']:.2f}x | {train['eager_train']:.4f} | {train['fused_train']:.4f} | "
                        f"{train['eager_train'] / train['fused_train']:.2f}x |\n")
                lines.append(line)
                print(line, end="", flush=True)
    summary = "\n" + "".join(
        f"- {dtype} batch {batch}: fused / floor, geometric mean {statistics.geometric_mean(r):.2f}x\n"
        for (dtype, batch), r in ratios.items())
    lines.append(summary)
    print(summary)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-") + ".md")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.writelines(lines)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
