"""End-to-end Ghost-family models: eager PyTorch vs ghostkernels.accelerate (and the same
model frozen by ghostkernels.freeze) vs torch.compile, and ONNX Runtime / OpenVINO (float32
hint and default precision) when they are installed.

    OPENBLAS_NUM_THREADS=1 python bench/e2e.py                   # CPU: GhostNet 0.5x/1.0x/1.3x, batch 1 and 8
    OPENBLAS_NUM_THREADS=1 python bench/e2e.py --models ghostnetv2-1.0 ghostnetv3-1.0 g-ghost-regnetx-032
    OPENBLAS_NUM_THREADS=1 python bench/e2e.py --models ghostnet-1.0 --no-compile
    python bench/e2e.py --device cuda                            # GPU: float16, batch 1/64/256

Eager is the model as the original code runs it (plain PyTorch modules, eval; GhostNetV3
re-parameterised). Every contender's output is checked against eager first; then they are
timed in turn, five rounds, and each row gives the median ms of all its calls; a row whose calls
spread more than --noise ((p90 - p10) / median, worst contender) is marked noisy.
"""

import argparse
import functools
import os
import statistics
import sys
import warnings

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ghostkernels  # noqa: E402
from cases import interleaved_times_ms  # noqa: E402
from machine import DEFAULT_NOISE, is_noisy, machine_line, noise_summary, row_spread  # noqa: E402
from ghostkernels import models  # noqa: E402

# name: the eager model, built the way the original code runs it.
MODELS = {
    "ghostnet-0.5": lambda: models.ghostnet(0.5, fused=False),
    "ghostnet-1.0": lambda: models.ghostnet(1.0, fused=False),
    "ghostnet-1.3": lambda: models.ghostnet(1.3, fused=False),
    "ghostnetv2-1.0": lambda: models.ghostnetv2(1.0, fused=False),
    "ghostnetv3-1.0": lambda: models.ghostnetv3(1.0).eval().reparameterize(),
    "g-ghost-regnetx-032": lambda: models.g_ghost_regnetx("032", fused=False),
}


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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS),
                        default=["ghostnet-0.5", "ghostnet-1.0", "ghostnet-1.3"])
    parser.add_argument("--batch", type=int, nargs="+", help="default: 1 8 (CPU), 1 64 256 (CUDA)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows (slow to build)")
    parser.add_argument("--noise", type=float, default=DEFAULT_NOISE,
                        help="flag rows whose (p90 - p10) / median exceeds this fraction (default %(default)s)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = args.device
    dtype = torch.float16 if device == "cuda" else torch.float32
    batches = args.batch or ([1, 64, 256] if device == "cuda" else [1, 8])
    contenders = ["eager", "accelerated", "frozen"]
    if not args.no_compile:
        contenders += ["compile(eager)", "compile(accelerated)"]
    if device == "cpu":
        contenders += ["onnxruntime", "openvino f32", "openvino default"]
    progress = Progress(len(args.models) * len(batches) * len(contenders))
    rows, notes = [], set()
    for model_name in args.models:
        eager = MODELS[model_name]().eval().to(device, dtype)
        accelerated = ghostkernels.accelerate(eager)
        for batch in batches:
            x = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)
            fns = {}
            export = functools.cache(lambda: onnx_file(eager, x))  # once per row, for ORT and both OpenVINOs
            # Fresh compile caches per row: the models share forward code objects, and past
            # dynamo's recompile limit torch.compile silently runs eager (1.3x rows did).
            torch._dynamo.reset()
            with torch.no_grad():
                expected = eager(x)
                for name in contenders:
                    progress.step(f"{model_name} batch {batch} {name}")
                    if name == "eager":
                        fn = lambda: eager(x)  # noqa: E731
                    elif name == "accelerated":
                        fn = lambda: accelerated(x)  # noqa: E731
                    elif name == "frozen":
                        frozen = ghostkernels.freeze(accelerated, x)
                        fn = lambda frozen=frozen: frozen(x)  # noqa: E731
                    elif name.startswith("compile"):
                        compiled = torch.compile(eager if name == "compile(eager)" else accelerated)
                        fn = lambda compiled=compiled: compiled(x)  # noqa: E731
                    else:
                        fn, why = (onnx_runtime(export, x) if name == "onnxruntime"
                                   else openvino(export, x, f32=name == "openvino f32"))
                        if fn is None:
                            notes.add(f"{name}: {why}")
                            continue
                    # OpenVINO's default may compute in bfloat16 (8 mantissa bits)
                    tol = 1e-2 if dtype == torch.float16 or name == "openvino default" else 1e-4
                    torch.testing.assert_close(fn().float(), expected.float(), rtol=tol, atol=tol)
                    fns[name] = fn
                samples = interleaved_times_ms(fns, min_time=2.0, device=device)
            worst = row_spread(samples)
            rows.append({"model": model_name, "batch": batch, **{n: statistics.median(t) for n, t in samples.items()},
                         "spread": worst, "noisy": is_noisy(worst, args.noise)})
    print(f"\nghostkernels {ghostkernels.__version__}, torch {torch.__version__}, {device} "
          f"({torch.cuda.get_device_name() if device == 'cuda' else f'{args.threads} threads'}), {dtype}, "
          "224x224, median ms; speedup = eager / accelerated; spread = (p90 - p10) / median, worst contender")
    if device == "cpu":
        print(machine_line(args.threads))
    print()
    shown = [c for c in contenders if any(c in r for r in rows)]
    print(f"{'model':>20} {'batch':>5}" + "".join(f"{c:>22}" for c in shown) + f"{'speedup':>9}{'spread':>8}")
    for r in rows:
        cells = "".join(f"{r[c]:22.2f}" if c in r else f"{'-':>22}" for c in shown)
        print(f"{r['model']:>20} {r['batch']:5d}{cells}{r['eager'] / r['accelerated']:8.2f}x{r['spread']:8.0%}"
              + ("  noisy" if r["noisy"] else ""))
    for line in noise_summary(rows, args.noise, [r[c] for r in rows for c in shown if c in r]):
        print(line)
    for note in sorted(notes):
        print(f"skipped {note}")


if __name__ == "__main__":
    main()
