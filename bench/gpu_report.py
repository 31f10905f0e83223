"""The GPU harness: one command on a fresh GPU machine, no C++ build, <= 8 minutes.

    GHOSTKERNELS_DISABLE_CPP=1 PYTHONPATH=. python bench/gpu_report.py        # everything below
    ... python bench/gpu_report.py --quick --no-tests --no-first-call           # four shapes, op table only
    ... python bench/gpu_report.py --tune --dtype float16 --batch 256           # fill ghostkernels/triton_tuned.json

In order, each step's result written as it comes to bench/results/<device>.md:
1. tests: `pytest` of GPU_TESTS (the Triton kernels, G-GhostNet's cheap op, the SE ops, CUDA graphs) on the GPU;
2. first call: a fresh process (and Triton cache) runs accelerate(GhostNet 1.0x) (timm's ghostnet_100
   when timm is installed, else the zoo's) on float16 channels_last batch 64 and times its first
   forward (Triton compilation included) and second, with the logits' error against float32 eager;
   twice: plain, and with accelerate(..., example_inputs=x), which precompiles on a thread pool;
3. the op table: every GhostNet 1.0x Ghost-module shape at batch 256, 32, 1 (in that order, the
   target first) and float16, bfloat16: parity first, then triton.testing.do_bench medians (ms) of
   eager NCHW, eager channels_last, torch.compile (channels_last; batches 256 and 32), the fused op
   with the in-kernel primary and with the library-GEMM primary (where it applies), and the floor:
   max(bytes in + out over the measured copy bandwidth, FLOPs over the measured matmul rate);
   then eager channels_last and the op's choice replayed from CUDA graphs (the GPU's time alone).
   fwd+bwd: autograd over the reference vs the fused op, both channels_last.
   Rows stop when --budget-s is spent (the rest are listed as not measured).
Timed calls rotate over four input sets (an input that fits in L2 is not timed from L2), and
freed memory is filled with NaN before each fused parity check (an element never written fails).
Parity is against float32 math on the same (rounded) inputs; the backward's is against float32
autograd with the fused forward's own ReLU masks (a float16 pre-activation within rounding of
zero may flip a mask, which changes a gradient by a whole grad value: not an error).
--tune times triton_ghost.candidate_configs for each Ghost-module shape of GhostNet 0.5x, 1.0x and
1.3x (--quick: four) and writes the best into the tuned table.
"""

import argparse
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import triton
from triton.testing import do_bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import ghostkernels  # noqa: E402
from ghostkernels import ghost_module_reference, triton_ghost  # noqa: E402
from ghostkernels.reference import ghost_module_masked_reference  # noqa: E402
from cases import GHOSTNET_SHAPES, floor_ms, make_case, shape_name  # noqa: E402

GPU_TESTS = ["tests/test_triton.py", "tests/test_cheap_mix.py", "tests/test_squeeze_excite.py",
             "tests/test_cuda_graph.py", "tests/test_timm_current.py::test_accelerated_eval_under_cuda_autocast",
             "tests/test_never_wrong.py::test_self_check_runs_in_float64_on_the_cpu", "tests/test_precompile.py",
             "tests/test_main.py::test_cuda_half_precision_agrees",
             "tests/test_freeze.py::test_a_dropped_frozen_model_releases_its_gpu_memory",
             *(f"tests/test_direct_conv.py::{name}" for name in (
                 "test_triton_kernel_matches_conv2d", "test_triton_kernel_keeps_nan_through_the_relu",
                 "test_cuda_op_takes_triton_and_checks", "test_cuda_ghost_depthwise_5x5_runs_its_conv_on_triton"))]
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 2e-2, torch.float32: 1e-2}  # float32 dots run as TF32

FIRST_CALL = r"""
import json, sys, time, torch, ghostkernels
try:
    import timm
    model, source = timm.create_model("ghostnet_100"), "timm ghostnet_100"
except ImportError:
    from ghostkernels import models
    model, source = models.ghostnet_100(), "ghostkernels.models.ghostnet_100"
model = model.eval().cuda().to(memory_format=torch.channels_last)
x = torch.randn(64, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
with torch.no_grad():
    expected = model(x).float()
    start = time.perf_counter()
    # with example inputs, accelerate() compiles the forward's Triton kernels on a thread pool
    fast = ghostkernels.accelerate(model.half(), example_inputs=x.half() if sys.argv[1] == "precompile" else None)
    accelerate_s = time.perf_counter() - start
    times = []
    for _ in range(2):
        torch.cuda.synchronize(); start = time.perf_counter()
        out = fast(x.half()); torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
error = ((out.float() - expected).norm() / expected.norm()).item()
print(json.dumps({"model": source, "accelerate_s": accelerate_s, "first_s": times[0], "second_s": times[1],
                  "rel_error_vs_fp32": error, "precompiled": fast.acceleration_summary.precompiled,
                  "precompile_s": fast.acceleration_summary.precompile_seconds}))
"""


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


def check(out, expected, dtype, what):
    tol = TOLERANCE[dtype]
    scale = max(expected.float().abs().max().item(), 1.0)
    torch.testing.assert_close(out.float(), expected.float(), rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


def float32_reference(module, x, oup):
    """The Ghost module's output in float32 math from its folded weights and x as they are."""
    weights = module.folded_weights()[:4]
    return ghost_module_reference(x.float(), *(w.float() for w in weights), out_channels=oup)


def poison(device):
    """Fill freed allocator memory with NaN, so that an output element the op never writes shows
    up in its parity check instead of passing with an earlier call's value."""
    if device == "cuda":
        torch.full((64 * 2**20,), float("nan"), device=device)  # 256 MiB, freed to the cache at once


def unfused(module, oup):
    """The module as eager PyTorch runs it, on any input: conv, BN, ReLU, conv, BN, ReLU, cat, slice."""
    def run(x):
        x1 = module.primary_conv(x)
        return torch.cat([x1, module.cheap_operation(x1)], dim=1)[:, :oup]
    return run


def forward_row(inp, oup, size, batch, dtype, bandwidth, flops_per_s, with_compile, device="cuda", rotate=4):
    """Parity, then medians. Each timed call takes the next of `rotate` input sets, so that a
    shape whose input fits in L2 is not timed from L2."""
    nchw_module, nchw_x, nchw = make_case(inp, oup, size, batch, channels_last=False, device=device, dtype=dtype)
    module, x, cl = make_case(inp, oup, size, batch, channels_last=True, device=device, dtype=dtype)
    weights = module.folded_weights()[:4]
    init = weights[0].shape[0]
    heuristic = triton_ghost.heuristic_config(inp, init, dtype, True,
                                              triton_ghost.primary_is_large(batch * size * size, inp, init))
    configs = {name: dict(heuristic, primary=name) for name in ("kernel", "library")}
    inputs = {"cl": [x] + [torch.randn_like(x) for _ in range(rotate - 1)],
              "nchw": [nchw_x] + [torch.randn_like(nchw_x) for _ in range(rotate - 1)]}

    def timed(fn, layout="cl"):
        cycle = itertools.cycle(inputs[layout])
        return median(lambda: fn(next(cycle)))

    def graph_timed(fn):
        """Median ms of fn replayed from CUDA graphs, one per input set: the GPU's time without the
        host's (on the H200 the @7 and @14 rows took as long at batch 256 as at batch 32)."""
        graphs = []
        for xi in inputs["cl"]:
            fn(xi)  # compilation and library handles outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn(xi)
            graphs.append(graph)
        cycle = itertools.cycle(graphs)
        return median(lambda: next(cycle).replay())

    eager_cl, eager_nchw = unfused(module, oup), unfused(nchw_module, oup)
    times = {}
    with torch.no_grad():
        expected = float32_reference(module, x, oup)
        check(eager_cl(x), expected, dtype, "eager channels_last")
        poison(device)
        check(nchw["fused"](), float32_reference(nchw_module, nchw_x, oup), dtype, "fused NCHW (the op's choice)")
        poison(device)
        check(cl["fused"](), expected, dtype, "fused channels_last (the op's choice)")
        for name, config in configs.items():
            poison(device)
            check(triton_ghost.forward(x, *weights, oup, 1, "relu", config=config), expected, dtype,
                  f"fused {name} primary")
        times["eager"] = timed(eager_nchw, "nchw")
        times["fused_nchw"] = timed(nchw_module, "nchw")  # the op as an NCHW user gets it
        times["eager_cl"] = timed(eager_cl)
        if with_compile:
            torch._dynamo.reset()  # past dynamo's recompile limit (8 shapes) torch.compile silently runs eager
            compiled = torch.compile(eager_cl)
            check(compiled(x), expected, dtype, "compile")
            times["compile"] = timed(compiled)
        for name, config in configs.items():
            times[name] = timed(lambda xi, c=config: triton_ghost.forward(xi, *weights, oup, 1, "relu", config=c))
        if device == "cuda":
            chosen = configs[heuristic["primary"]]
            times["eager_cl_graph"] = graph_timed(eager_cl)
            times["fused_graph"] = graph_timed(
                lambda xi: triton_ghost.forward(xi, *weights, oup, 1, "relu", config=chosen))
    floor = floor_ms(inp, oup, size, batch, elem_bytes=x.element_size(), copy_bytes_per_s=bandwidth,
                     matmul_flops_per_s=flops_per_s)
    return dict(times, floor=floor, chosen=heuristic["primary"])


def masked_reference_grads(x, weights, out, grad, oup):
    """Float32 autograd of the Ghost module with the ReLU masks taken from the fused output `out`:
    what the fused backward must give for that forward."""
    leaves = [t.detach().float().requires_grad_() for t in (x, *weights)]
    with torch.enable_grad():
        expected = ghost_module_masked_reference(*leaves, out_channels=oup, relu_masks_of=out)
        return torch.autograd.grad(expected, leaves, grad.float())


def training_row(inp, oup, size, batch, dtype, device="cuda"):
    from ghostkernels import ghost_module

    init = -(-oup // 2)
    x = torch.randn(batch, inp, size, size, device=device, dtype=dtype).to(memory_format=torch.channels_last)
    weights = [torch.randn(init, inp, 1, 1) / inp**0.5, torch.randn(init), torch.randn(init, 1, 3, 3) / 3,
               torch.randn(init)]
    leaves = [t.requires_grad_() for t in (x, *(w.to(device, dtype) for w in weights))]
    grad = torch.randn(batch, oup, size, size, device=device, dtype=dtype).to(memory_format=torch.channels_last)

    def step(fn):
        return lambda: torch.autograd.grad(fn(*leaves, out_channels=oup), leaves, grad)

    with torch.no_grad():
        out = ghost_module(*leaves, out_channels=oup)
    for name, actual, expected in zip(("x", "W1", "b1", "W2", "b2"), step(ghost_module)(),
                                      masked_reference_grads(leaves[0], leaves[1:], out, grad, oup)):
        check(actual, expected, dtype, f"grad of {name}")
    return {"eager_train": median(step(ghost_module_reference)), "fused_train": median(step(ghost_module))}


def run_tests(budget_s):
    """The GPU test files' summary line, then their ten slowest tests (the files' 3-minute limit)."""
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "--durations=10", *GPU_TESTS], cwd=ROOT,
                              capture_output=True, text=True, timeout=budget_s)
    except subprocess.TimeoutExpired:
        return f"{' + '.join(GPU_TESTS)} on the GPU: NOT DONE within {budget_s} s"
    lines = proc.stdout.strip().splitlines() or ["(no output)"]
    slowest = [line for line in lines if line[:1].isdigit() and "s " in line and "::" in line]
    return f"{' + '.join(GPU_TESTS)} on the GPU: rc {proc.returncode}, " \
           f"{time.perf_counter() - start:.0f} s: {lines[-1]}" + "".join(f"\n  - {line}" for line in slowest)


def first_call(budget_s, mode):
    """The first call in a fresh process with an empty Triton cache; mode "precompile": accelerate()
    is given the example input, so it compiles the forward's kernels on a thread pool."""
    env = dict(os.environ, TRITON_CACHE_DIR=tempfile.mkdtemp(prefix="ghostkernels-first-call-"))
    try:
        proc = subprocess.run([sys.executable, "-c", FIRST_CALL, mode], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=budget_s)
    except subprocess.TimeoutExpired:
        return f"first call ({mode}): NOT DONE within {budget_s} s (the target is 20 s)"
    if proc.returncode != 0:
        return f"first call ({mode}) FAILED (rc {proc.returncode}): {proc.stderr.strip()[-600:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return (f"first call ({mode}), fresh process and Triton cache, accelerate({result['model']}) float16 "
            f"channels_last batch 64: accelerate() {result['accelerate_s']:.1f} s (of which precompile "
            f"{result['precompile_s']:.1f} s, {result['precompiled']} kernels), "
            f"first forward {result['first_s']:.1f} s, "
            f"second {result['second_s'] * 1e3:.1f} ms, "
            f"logits rel. error vs float32 eager {result['rel_error_vs_fp32']:.1e}")


def ghostnet_shapes(widths=(0.5, 1.0, 1.3)):
    """(inp, oup, output size) of every Ghost module of the zoo's GhostNets at 224x224, deduplicated."""
    from ghostkernels import models
    shapes = []

    def record(module, inputs, output):
        shape = (inputs[0].shape[1], output.shape[1], output.shape[2])
        if shape not in shapes:
            shapes.append(shape)

    for width in widths:
        model = models.ghostnet(width, fused=False).eval()
        for module in model.modules():
            if "GhostModule" in type(module).__name__:
                module.register_forward_hook(record)
        with torch.no_grad():
            model(torch.randn(1, 3, 224, 224))
    return shapes


def tune(shapes, dtype, batch, device):
    """Time every candidate config per shape; write the best into ghostkernels/triton_tuned.json
    after each shape (a call cut short keeps what it tuned)."""
    lines = []
    for inp, oup, size in shapes:
        module, x, _ = make_case(inp, oup, size, batch, channels_last=True, device="cuda", dtype=dtype)
        weights = module.folded_weights()[:4]
        init = weights[0].shape[0]
        ms, best, timed = triton_ghost.fastest_config(
            triton_ghost.candidate_configs(inp, init, dtype, True),
            lambda config: triton_ghost.forward(x, *weights, oup, 1, "relu", config=config), warmup=25, rep=100)
        key = triton_ghost.shape_key(inp, init, init, oup, size, size, 1, 3, 1, dtype, True, False, False,
                                     triton_ghost.primary_is_large(batch * size * size, inp, init))
        triton_ghost.save_config(triton_ghost._TUNED_TABLE, device, key, best)
        lines.append(f"- tuned {key}: {ms:.4f} ms with {best} ({timed} candidates)\n")
        print(lines[-1], end="", flush=True)
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[256, 32, 1])
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["float16", "bfloat16"])
    parser.add_argument("--quick", action="store_true", help="four shapes")
    parser.add_argument("--no-backward", action="store_true")
    parser.add_argument("--no-tests", action="store_true")
    parser.add_argument("--no-first-call", action="store_true")
    parser.add_argument("--tune", action="store_true", help="tune the first --dtype at the first --batch, then stop")
    parser.add_argument("--budget-s", type=float, default=420, help="stop starting rows after this many seconds")
    parser.add_argument("--out", help="markdown file (default bench/results/<device>.md)")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "gpu_report.py needs a CUDA device; bench/report.py is the CPU one"
    start = time.perf_counter()
    device = torch.cuda.get_device_name()
    shapes = [GHOSTNET_SHAPES[i] for i in (0, 3, 10, 19)] if args.quick else GHOSTNET_SHAPES
    out_path = args.out or os.path.join(ROOT, "bench", "results",
                                        re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-") + ".md")
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    lines = [f"# {device}\n\nghostkernels {ghostkernels.__version__}, torch {torch.__version__}, "
             f"triton {triton.__version__}\n\n"]

    def emit(text):
        lines.append(text)
        print(text, end="", flush=True)
        with open(out_path, "w") as f:
            f.writelines(lines)

    if args.tune:  # GhostNet 0.5x, 1.0x and 1.3x's shapes
        for line in tune(shapes if args.quick else ghostnet_shapes(), DTYPES[args.dtype[0]], args.batch[0], device):
            emit(line)
        return
    if not args.no_tests:
        emit(f"- {run_tests(240)}\n")
    if not args.no_first_call:
        for mode in ("plain", "precompile"):
            emit(f"- {first_call(180, mode)}\n")
    bandwidth = copy_bandwidth()
    matmul = {name: matmul_rate(DTYPES[name]) for name in args.dtype}
    rates = ", ".join(f"{name} matmul {rate / 1e12:.1f} TFLOP/s" for name, rate in matmul.items())
    emit(f"- measured: copy bandwidth {bandwidth / 1e9:.0f} GB/s, {rates}; do_bench medians in ms; "
         "everything but the NCHW columns runs channels_last; 'fused NCHW' = GhostModule on NCHW input "
         "(wide inputs converted to channels_last and back); 'kernel' = x1 by tl.dot in the fused kernel, "
         "'library' = z1 by cuBLAS into a buffer + the fused depthwise pass; * = the op's default choice; "
         "ratios use the faster fused column\n\n"
         "| dtype | shape | batch | eager NCHW | fused NCHW | eager CL | compile | kernel | library | floor "
         "| vs eager CL | vs compile | x floor | eager CL graph | fused graph | graph x floor "
         "| eager fwd+bwd | fused fwd+bwd | fwd+bwd speedup |\n"
         + "|---" * 19 + "|\n")
    ratios, graph_ratios, skipped = {}, {}, []
    rows = [(d, b, s) for b in args.batch for d in args.dtype for s in shapes]
    for dtype_name, batch, (inp, oup, size) in rows:
        if time.perf_counter() - start > args.budget_s:
            skipped.append(f"{dtype_name} {shape_name(inp, oup, size)} batch {batch}")
            continue
        dtype = DTYPES[dtype_name]
        row = forward_row(inp, oup, size, batch, dtype, bandwidth, matmul[dtype_name], with_compile=batch >= 32)
        train = {"eager_train": float("nan"), "fused_train": float("nan")}
        if not args.no_backward and batch >= 32:
            train = training_row(inp, oup, size, batch, dtype)
        best = min(row[p] for p in ("kernel", "library") if p in row)
        ratios.setdefault((dtype_name, batch), []).append(best / row["floor"])
        graph_ratios.setdefault((dtype_name, batch), []).append(row["fused_graph"] / row["floor"])
        cells = [f"{row[k]:.4f}" if k in row else "-" for k in ("eager", "fused_nchw", "eager_cl", "compile")]
        cells += [f"{row[k]:.4f}{'*' if row['chosen'] == k else ''}" if k in row else "-"
                  for k in ("kernel", "library")]
        vs_compile = f"{row['compile'] / best:.2f}x" if "compile" in row else "-"
        emit(f"| {dtype_name} | {shape_name(inp, oup, size)} | {batch} | {' | '.join(cells)} | {row['floor']:.4f} | "
             f"{row['eager_cl'] / best:.2f}x | {vs_compile} | {best / row['floor']:.2f}x | "
             f"{row['eager_cl_graph']:.4f} | {row['fused_graph']:.4f} | {row['fused_graph'] / row['floor']:.2f}x | "
             f"{train['eager_train']:.4f} | {train['fused_train']:.4f} | "
             f"{train['eager_train'] / train['fused_train']:.2f}x |\n")
    emit("\n" + "".join(f"- {dtype} batch {batch}: faster fused / floor, geometric mean "
                        f"{statistics.geometric_mean(r):.2f}x over {len(r)} shapes; the op's choice "
                        f"replayed from a CUDA graph {statistics.geometric_mean(graph_ratios[(dtype, batch)]):.2f}x\n"
                        for (dtype, batch), r in ratios.items()))
    if skipped:
        emit(f"- not measured (--budget-s {args.budget_s:.0f} spent): {', '.join(skipped)}\n")
    emit(f"- whole run: {time.perf_counter() - start:.0f} s\n")


if __name__ == "__main__":
    main()
