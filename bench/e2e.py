"""End-to-end Ghost-family models: eager PyTorch vs ghostkernels.accelerate (and the same
model frozen by ghostkernels.freeze, in float32 and, on CPUs with AMX or fast AVX512-BF16, in
bfloat16 under torch.set_float32_matmul_precision("medium")) vs torch.compile, and ONNX Runtime / OpenVINO
(float32 hint and default precision) when they are installed.

    OPENBLAS_NUM_THREADS=1 python bench/e2e.py                   # CPU: GhostNet 0.5x/1.0x/1.3x, batch 1 and 8
    OPENBLAS_NUM_THREADS=1 python bench/e2e.py --models ghostnetv2-1.0 ghostnetv3-1.0 g-ghost-regnetx-032
    OPENBLAS_NUM_THREADS=1 python bench/e2e.py --models ghostnet-1.0 --no-compile
    python bench/e2e.py --device cuda --budget-s 480 [--profile 20]  # GPU: 6 models, fp16/bf16, batch 256/1/64

Eager is the model as the original code runs it (plain PyTorch modules, eval; GhostNetV3
re-parameterised). Every contender's output is checked first: against eager on the CPU, against
the model in float32 on CUDA (half precision within twice eager's own error). Then they are
timed in turn, --rounds rounds (2 s per contender in all), and each row gives the median ms of all
its calls; a row whose calls spread more than --noise ((p90 - p10) / median, worst contender) is
marked noisy. Under the table, ours / theirs (frozen vs OpenVINO and ONNX Runtime) as the median of
the ratios within each round, which share the machine's speed of the moment.
On CUDA (channels_last) the contenders are eager, accelerated, accelerated captured as a CUDA
graph (ghostkernels.capture), accelerated frozen (the ops' merges of freeze(), one TorchScript call)
and that captured, torch.compile of eager and of accelerated, and compile's reduce-overhead mode;
the table goes to bench/results/<device>-e2e.md with a PNG bar chart of
images per second beside it. Each row compiles its torch.compile contenders anew (a minute or
more on a GPU machine), so --budget-s stops starting rows in time; the default order puts the
issue's targets first (GhostNet 1.0x at batch 256 and 1, float16).
"""

import argparse
import copy
import functools
import os
import re
import statistics
import sys
import time
import warnings

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ghostkernels  # noqa: E402
from cases import calls_ms, interleaved_rounds_ms, round_ratios  # noqa: E402
from machine import DEFAULT_NOISE, import_pyplot, is_noisy, machine_line, noise_summary, row_spread  # noqa: E402
from ghostkernels import models  # noqa: E402
from ghostkernels.acceleration import _relative_error  # noqa: E402

# name: the eager model, built the way the original code runs it.
MODELS = {
    "ghostnet-0.5": lambda: models.ghostnet(0.5, fused=False),
    "ghostnet-1.0": lambda: models.ghostnet(1.0, fused=False),
    "ghostnet-1.3": lambda: models.ghostnet(1.3, fused=False),
    "ghostnetv2-1.0": lambda: models.ghostnetv2(1.0, fused=False),
    "ghostnetv3-1.0": lambda: models.ghostnetv3(1.0).eval().reparameterize(),
    "g-ghost-regnetx-032": lambda: models.g_ghost_regnetx("032", fused=False),
}


# (ours, theirs): the per-round ratios printed under the table (issue 16's targets are on these).
RATIOS = [("frozen", "openvino f32"), ("frozen bf16", "openvino default"), ("frozen", "onnxruntime")]


def ratio_lines(rows):
    """The table of RATIOS found in `rows`: the median of each row's per-round ratios, its lowest and
    highest round beside it."""
    pairs = [pair for pair in RATIOS if any(pair in r["ratios"] for r in rows)]
    if not pairs:
        return []
    lines = ["ours / theirs, median of the per-round ratios (lowest-highest round); below 1: ours is faster",
             f"{'model':>20} {'dtype':>8} {'batch':>5}" + "".join(f"{ours + ' / ' + theirs:>36}" for ours, theirs in pairs)]
    for r in rows:
        cells = [r["ratios"].get(pair) for pair in pairs]
        lines.append(f"{r['model']:>20} {r['dtype']:>8} {r['batch']:5d}" + "".join(
            f"{f'{statistics.median(v):.3f} ({min(v):.2f}-{max(v):.2f})' if v else '-':>36}" for v in cells))
    return lines


def onnx_file(model, x):
    """`model` exported to ONNX (TorchScript exporter), the file ONNX Runtime and OpenVINO read."""
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"ghostnet-{os.getpid()}.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), path, input_names=["x"], dynamo=False)
    return path


def onnx_runtime(export, x):
    """A callable running the model that export() writes to ONNX in ONNX Runtime (CPU), or None
    with the reason."""
    try:
        import onnxruntime
    except ImportError:
        return None, "onnxruntime not installed (pip install onnxruntime onnx)"
    path = export()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feed = {"x": x.numpy()}
    return (lambda: torch.from_numpy(session.run(None, feed)[0])), None


def openvino(export, x, f32):
    """The model that export() writes to ONNX in OpenVINO on the CPU: with the float32 precision
    hint (f32), or its default, which runs bfloat16 on CPUs with AVX512-BF16 or AMX. It reads the
    ONNX export: OpenVINO 2026.4's PyTorch frontend (ov.convert_model of the module) gave a graph
    1.4x slower here (GhostNet 1.0x batch 1 f32: 4.57 vs 3.17 ms)."""
    try:
        import openvino as ov
    except ImportError:
        return None, "openvino not installed (pip install openvino)"
    config = {"INFERENCE_NUM_THREADS": torch.get_num_threads()}
    if f32:
        config["INFERENCE_PRECISION_HINT"] = "f32"
    core = ov.Core()
    compiled = core.compile_model(core.read_model(export()), "CPU", config)
    return (lambda: torch.from_numpy(compiled(x.numpy())[0])), None


class Progress:
    """A one-line text progress bar on stderr."""

    def __init__(self, total):
        self.total, self.done = total, 0

    def step(self, label):
        self.done += 1
        filled = 30 * self.done // self.total
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} {label:<40}")
        sys.stderr.flush()
        if self.done == self.total:
            sys.stderr.write("\n")


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def with_matmul_precision(precision, fn):
    """fn under torch.set_float32_matmul_precision(precision), restored after each call."""
    def call():
        before = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(precision)
        try:
            return fn()
        finally:
            torch.set_float32_matmul_precision(before)
    return call


# Contenders not yet run on a GPU: a failure of theirs (freeze's trace, the capture, parity) is
# reported in the table's notes instead of ending a GPU session's only run.
UNTRIED_ON_CUDA = ("frozen", "frozen captured")


def build(name, x, eager, accelerated, export):
    """(callable, None) for contender `name`, or (None, why) when it cannot run here."""
    if name == "eager":
        return (lambda: eager(x)), None
    if name == "accelerated":
        return (lambda: accelerated(x)), None
    if name == "frozen":
        frozen = ghostkernels.freeze(accelerated, x)
        return (lambda: frozen(x)), None
    if name == "frozen bf16":
        available, why = torch.ops.ghostkernels.bf16_gemm_status()
        if not available:
            return None, why
        frozen = ghostkernels.freeze(accelerated, x)
        return with_matmul_precision("medium", lambda: frozen(x)), None
    if name == "captured":
        captured = ghostkernels.capture(accelerated, x)
        return (lambda: captured(x)), None
    if name == "frozen captured":  # the frozen graph's fused ops (residual adds in ghost2's stores) in a CUDA graph
        captured = ghostkernels.capture(ghostkernels.freeze(accelerated, x), x)
        return (lambda: captured(x)), None
    if name.startswith("compile"):
        mode = "reduce-overhead" if "reduce-overhead" in name else None
        compiled = torch.compile(accelerated if "accelerated" in name else eager, mode=mode)
        return (lambda: compiled(x)), None
    if name == "onnxruntime":
        return onnx_runtime(export, x)
    return openvino(export, x, f32=name == "openvino f32")


def float32_reference(model, x):
    """`model` (float32) on x in float32 with TF32 off: the parity reference on CUDA."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        return model(x.float()).float()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def check_parity(name, out, expected, reference, dtype):
    """On the CPU: within 1e-4 of eager (1e-2 for the bfloat16 modes: OpenVINO's default and
    frozen under float32_matmul_precision "medium"). On CUDA, against the float32 reference: float32 within 1e-4 (TF32 off: GHOSTKERNELS_TF32=0), half precision within
    twice eager's own error in that dtype (at least 1e-3). Returns the error against the reference."""
    if reference is None:
        tol = 1e-2 if dtype == torch.float16 or name in ("openvino default", "frozen bf16") else 1e-4
        torch.testing.assert_close(out.float(), expected.float(), rtol=tol, atol=tol)
        return None
    error = _relative_error(out.float(), reference)
    allowed = 1e-4 if dtype == torch.float32 else max(2 * _relative_error(expected.float(), reference), 1e-3)
    if not error <= allowed:
        raise AssertionError(f"{name}: relative error {error:.2e} against float32 eager, allowed {allowed:.1e}")
    return error


def plot_throughput(rows, contenders, path):
    """A PNG of images per second per contender, one group of bars per model/dtype/batch row."""
    plt = import_pyplot()
    labels = [f"{r['model']} {r['dtype']} b{r['batch']}" for r in rows]
    fig, ax = plt.subplots(figsize=(10, max(3.0, 0.45 * len(rows) * len(contenders) / 3 + 1.5)))
    height = 0.8 / len(contenders)
    for i, name in enumerate(contenders):
        values = [r["batch"] / r[name] * 1e3 if name in r else 0.0 for r in rows]
        ax.barh([j + i * height for j in range(len(rows))], values, height=height, label=name)
    ax.set_yticks([j + 0.4 - height / 2 for j in range(len(rows))])
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("images / s")
    ax.legend(fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS),
                        help="default: GhostNet 0.5x/1.0x/1.3x (CPU); those, V2, V3 and G-Ghost RegNetX-032 (CUDA)")
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES),
                        help="default: float32 (CPU), float16 bfloat16 (CUDA)")
    parser.add_argument("--batch", type=int, nargs="+", help="default: 1 8 (CPU), 256 1 64 (CUDA)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows (slow to build)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="rounds of interleaved timing per row, 2 s per contender in all: more rounds "
                             "interleave the contenders more finely (default %(default)s)")
    parser.add_argument("--noise", type=float, default=DEFAULT_NOISE,
                        help="flag rows whose (p90 - p10) / median exceeds this fraction (default %(default)s)")
    parser.add_argument("--out", help="also write the table as markdown (default on CUDA: "
                                      "bench/results/<device>-e2e.md)")
    parser.add_argument("--plot", help="PNG bar chart of images per second (needs matplotlib; default on CUDA: "
                                       "beside --out)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="CUDA: after the table, torch.profiler of N forwards of eager, accelerated and its "
                             "torch.compile (the "
                             "first model and dtype, batch 1): self CPU and self CUDA time per op, to <out>-profile.txt")
    parser.add_argument("--budget-s", type=float, default=float("inf"),
                        help="start no row after this many seconds (the rest are listed as skipped)")
    args = parser.parse_args()
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    device = args.device
    cuda = device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("e2e.py --device cuda: no CUDA device is visible")
    # On CUDA the targets first: GhostNet 1.0x at batch 256 and 1, then V2, V3, G-Ghost.
    model_names = args.models or (["ghostnet-1.0", "ghostnetv2-1.0", "ghostnetv3-1.0", "g-ghost-regnetx-032",
                                   "ghostnet-0.5", "ghostnet-1.3"] if cuda else
                                  ["ghostnet-0.5", "ghostnet-1.0", "ghostnet-1.3"])
    dtypes = [DTYPES[d] for d in (args.dtype or (["float16", "bfloat16"] if cuda else ["float32"]))]
    batches = args.batch or ([256, 1, 64] if cuda else [1, 8])
    contenders = ["eager", "accelerated"] + (["captured", "frozen", "frozen captured"] if cuda else
                                             ["frozen", "frozen bf16"])
    if not args.no_compile:
        contenders += ["compile(eager)", "compile(accelerated)"]
        if cuda:
            contenders.append("compile(eager, reduce-overhead)")
    if not cuda:
        contenders += ["onnxruntime", "openvino f32", "openvino default"]
    progress = Progress(len(model_names) * len(dtypes) * len(batches) * len(contenders))
    rows, notes = [], set()
    for model_name in model_names:
        base = MODELS[model_name]().eval().to(device)  # float32: the reference on CUDA
        if cuda:
            base = base.to(memory_format=torch.channels_last)
        for dtype in dtypes:
            eager = copy.deepcopy(base).to(dtype)
            accelerated = ghostkernels.accelerate(eager)
            for batch in batches:
                if time.perf_counter() - start > args.budget_s:
                    notes.add(f"{model_name} {str(dtype)[6:]} batch {batch}: --budget-s {args.budget_s:.0f} spent")
                    progress.done += len(contenders)
                    continue
                x = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)
                if cuda:
                    x = x.contiguous(memory_format=torch.channels_last)
                export = functools.cache(lambda: onnx_file(eager, x))  # once per row, for ORT and both OpenVINOs
                # Fresh compile caches per row: the models share forward code objects, and past
                # dynamo's recompile limit torch.compile silently runs eager (1.3x rows did).
                torch._dynamo.reset()
                fns, errors = {}, {}
                with torch.no_grad():
                    expected = eager(x)
                    reference = float32_reference(base, x) if cuda else None
                    for name in contenders:
                        progress.step(f"{model_name} {str(dtype)[6:]} batch {batch} {name}")
                        try:
                            fn, why = build(name, x, eager, accelerated, export)
                            if fn is not None:
                                errors[name] = check_parity(name, fn(), expected, reference, dtype)
                        except Exception as error:  # noqa: BLE001
                            if not (cuda and name in UNTRIED_ON_CUDA):
                                raise
                            fn, why = None, f"FAILED on CUDA ({type(error).__name__}: {str(error)[:300]})"
                        if fn is None:
                            notes.add(f"{name}: {why}")
                            continue
                        fns[name] = fn
                    rounds = interleaved_rounds_ms(fns, args.rounds, 2.0, device)
                samples = calls_ms(rounds)
                worst = row_spread(samples)
                rows.append({"model": model_name, "dtype": str(dtype)[6:], "batch": batch,
                             **{n: statistics.median(t) for n, t in samples.items()},
                             "ratios": {(a, b): round_ratios(rounds, a, b) for a, b in RATIOS if a in fns and b in fns},
                             "errors": errors, "spread": worst, "noisy": is_noisy(worst, args.noise)})
    header = (f"ghostkernels {ghostkernels.__version__}, torch {torch.__version__}, {device} "
              f"({torch.cuda.get_device_name() if cuda else f'{args.threads} threads'}), "
              "224x224, median ms; speedup = eager / accelerated; spread = (p90 - p10) / median, worst contender")
    print("\n" + header)
    if not cuda:
        print(machine_line(args.threads))
    print()
    shown = [c for c in contenders if any(c in r for r in rows)]
    print(f"{'model':>20} {'dtype':>8} {'batch':>5}" + "".join(f"{c:>22}" for c in shown)
          + f"{'speedup':>9}{'spread':>8}")
    for r in rows:
        cells = "".join(f"{r[c]:22.2f}" if c in r else f"{'-':>22}" for c in shown)
        print(f"{r['model']:>20} {r['dtype']:>8} {r['batch']:5d}{cells}{r['eager'] / r['accelerated']:8.2f}x"
              f"{r['spread']:8.0%}" + ("  noisy" if r["noisy"] else ""))
    summary = noise_summary(rows, args.noise, [r[c] for r in rows for c in shown if c in r])
    for line in summary:
        print(line)
    ratios = ratio_lines(rows)
    if ratios:
        print()
        print("\n".join(ratios))
    for note in sorted(notes):
        print(f"skipped {note}")
    out = args.out or (os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                    re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name()).strip("-")
                                    + "-e2e.md") if cuda else None)
    if out:
        write_markdown(out, header, rows, shown, summary, notes, ratios)
        print(f"written to {out}")
    plot = args.plot or (os.path.splitext(out)[0] + ".png" if cuda else None)
    if plot:
        plot_throughput(rows, shown, plot)
        print(f"plotted to {plot}")
    if cuda and args.profile:
        path = os.path.splitext(out)[0] + "-profile.txt"
        with open(path, "w") as f:
            f.write(profile_forwards(model_names[0], dtypes[0], args.profile))
        print(f"profiled to {path}")


def profile_forwards(model_name, dtype, forwards, device="cuda"):
    """Where a batch-1 forward's host and device time go, eager against accelerated and compiled
    accelerated: at batch 1 on an H200 accelerated ran slower than eager (9.3 against 7.3 ms), its
    CUDA graph 1.8x slower than compile's, and compiled it was slower still (11.9 ms)."""
    from torch.profiler import ProfilerActivity, profile
    eager = MODELS[model_name]().eval().to(device, dtype).to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 224, 224, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    text = []
    accelerated = ghostkernels.accelerate(copy.deepcopy(eager))
    torch._dynamo.reset()
    for name, model in (("eager", eager), ("accelerated", accelerated),
                        ("compile(accelerated)", torch.compile(accelerated))):
        with torch.no_grad():
            for _ in range(3):
                model(x)
            sync()
            with profile(activities=activities) as prof:
                for _ in range(forwards):
                    model(x)
                sync()
        table = prof.key_averages()
        for sort in ("self_cpu_time_total", "self_device_time_total"):
            text.append(f"== {model_name} {str(dtype)[6:]} batch 1, {name}, {forwards} forwards, by {sort}\n"
                        + table.table(sort_by=sort, row_limit=25) + "\n")
    return "\n".join(text)


def write_markdown(path, header, rows, shown, summary, notes, ratios=()):
    lines = [f"# Whole models: {header}\n\n",
             "| model | dtype | batch | " + " | ".join(f"{c} ms (img/s)" for c in shown)
             + " | speedup | rel. error vs float32 (accelerated / captured) | spread |\n",
             "|---" * (len(shown) + 6) + "|\n"]
    for r in rows:
        cells = [f"{r[c]:.2f} ({r['batch'] / r[c] * 1e3:.0f})" if c in r else "-" for c in shown]
        errors = " / ".join(f"{r['errors'][c]:.1e}" for c in ("accelerated", "captured")
                            if r["errors"].get(c) is not None) or "-"
        lines.append(f"| {r['model']} | {r['dtype']} | {r['batch']} | " + " | ".join(cells)
                     + f" | {r['eager'] / r['accelerated']:.2f}x | {errors} | {r['spread']:.0%}"
                     + (" noisy" if r["noisy"] else "") + " |\n")
    lines += [f"\n- {line}\n" for line in summary] + [f"- skipped {note}\n" for note in sorted(notes)]
    if ratios:
        lines += ["\n```\n"] + [f"{line}\n" for line in ratios] + ["```\n"]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(lines)


if __name__ == "__main__":
    main()
