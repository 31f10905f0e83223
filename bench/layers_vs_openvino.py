"""A zoo model's frozen graph against OpenVINO's layers of the original model, module by module, on the CPU.

    OPENBLAS_NUM_THREADS=1 python bench/layers_vs_openvino.py --model g-ghost-regnetx-032 [--batch 1] [--size 224]
                                                              [--iters 20] [--threads 2] [--depth 2] [--no-openvino]
                                                              [--bfloat16]

Ours: ghostkernels.freeze(accelerate(model)) profiled by torch.profiler over --iters forwards;
each op node of the frozen graph (in graph order: the events line up with the nodes forward after
forward) is charged to its module scope, cut to its first --depth names ("layer3.layers.4.conv2"
-> "layer3.layers" at depth 2). OpenVINO (when installed): the original model's ONNX export
(dynamo), its nodes named by module scope (profile_batch1.name_nodes_by_module), compiled with the
f32 precision hint and PERF_COUNT (with --bfloat16: ours in the bfloat16 mode,
torch.set_float32_matmul_precision("medium"), against OpenVINO's default precision, bf16 where the
CPU has it); each executed layer charged the same way, per inference. Printed:
per module, the medians over the forwards of ours and OpenVINO's sums and their ratio, then the
totals. A module where the two differ most is where to look; the whole-model latencies are
bench/e2e.py's (the two sides here are profiled one after the other, not interleaved). Names can
differ where the export names a BN-folded conv after its BN (the stem's "conv1" is OpenVINO's
"bn1") and OpenVINO's layers without a module scope (the classifier, reorders) are "other".
PERF_COUNT's layer times sum above OpenVINO's latency where the layers are many and small
(GhostNet 1.0x at batch 1 on a Zen 3: 6.8 ms of layers, where bench/e2e.py measured 4.16 ms of
latency on that kind, bench/results/epyc-zen3-avx2-2threads-2026-12-05.md): read
the ratios of modules against each other there, not against 1.
Model names: bench/e2e.py's.
"""

import argparse
import collections
import os
import statistics
import sys

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ghostkernels  # noqa: E402
from e2e import MODELS  # noqa: E402
from profile_batch1 import aligned_op_events, name_nodes_by_module, openvino_blocks_now  # noqa: E402


def module_of(scope, depth):
    """The first `depth` names of a module scope ("" -> "other")."""
    return ".".join(scope.split(".")[:depth]) if scope else "other"


def frozen_ops_by_module(frozen, x, iters, depth):
    """{module: us per forward} of the frozen graph's op nodes, medians over `iters` forwards."""
    from torch.profiler import ProfilerActivity, profile
    nodes = frozen.op_scopes
    with torch.inference_mode():
        for _ in range(3):
            frozen(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(iters):
                frozen(x)
    events = aligned_op_events(prof, [kind for kind, _ in nodes], iters)
    if events is None:
        raise SystemExit(f"the op events of {iters} forwards do not line up with the graph's {len(nodes)} ops")
    per_forward = collections.defaultdict(lambda: [0.0] * iters)
    for i, event in enumerate(events):
        per_forward[module_of(nodes[i % len(nodes)][1], depth)][i // len(nodes)] += event.cpu_time_total
    return {module: statistics.median(us) for module, us in per_forward.items()}


def openvino_layers_by_module(eager, x, iters, depth, threads, bfloat16):
    """{module: us per inference} of OpenVINO's executed layers (f32 hint, or its default precision
    with `bfloat16`), medians over `iters` inferences, or None without openvino."""
    try:
        import openvino as ov
    except ImportError:
        return None
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"layers-{os.getpid()}.onnx")
    torch.onnx.export(eager, (x,), path, dynamo=True)
    name_nodes_by_module(path)
    core = ov.Core()
    config = {"PERF_COUNT": "YES", "INFERENCE_NUM_THREADS": threads}
    if not bfloat16:
        config["INFERENCE_PRECISION_HINT"] = "f32"
    request = core.compile_model(core.read_model(path), "CPU", config).create_infer_request()
    os.remove(path)
    feed = x.numpy()
    for _ in range(3):
        request.infer([feed])
    # name_nodes_by_module's "module:node" names; a node without a module scope has no colon
    ms = openvino_blocks_now(request, feed, iters,
                             lambda name: module_of(name.split(":")[0] if ":" in name else "", depth))
    return {module: 1e3 * value for module, value in ms.items()}


def table(ours, theirs):
    """Rows (module, ours us, theirs us or None), in our graph's order, then modules only OpenVINO has."""
    modules = list(ours) + [m for m in (theirs or {}) if m not in ours]
    return [(module, ours.get(module, 0.0), (theirs or {}).get(module)) for module in modules]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="g-ghost-regnetx-032")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--no-openvino", action="store_true")
    parser.add_argument("--bfloat16", action="store_true", help="both sides' bfloat16 modes")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    eager = MODELS[args.model]().eval()
    x = torch.randn(args.batch, 3, args.size, args.size)
    if args.bfloat16:
        torch.set_float32_matmul_precision("medium")
    frozen = ghostkernels.freeze(ghostkernels.accelerate(eager), x)
    ours = frozen_ops_by_module(frozen, x, args.iters, args.depth)
    theirs = None if args.no_openvino else openvino_layers_by_module(eager, x, args.iters, args.depth, args.threads,
                                                                        args.bfloat16)
    print(f"{args.model}, batch {args.batch}, {args.size}x{args.size}, "
          f"{'bfloat16 modes' if args.bfloat16 else 'float32'}, {args.threads} threads, medians "
          f"over {args.iters} forwards, us" + ("" if theirs is not None else "; OpenVINO: not run"))
    print(f"{'module':<24}{'frozen':>10}{'OpenVINO':>10}{'ratio':>8}")
    for module, mine, other in table(ours, theirs):
        theirs_text, ratio = (f"{other:10.1f}", f"{mine / other:8.2f}") if other else (f"{'-':>10}", "")
        print(f"{module:<24}{mine:10.1f}{theirs_text}{ratio}")
    total_ours = sum(ours.values())
    total_theirs = sum(theirs.values()) if theirs else float("nan")
    print(f"{'sum':<24}{total_ours:10.1f}{total_theirs:10.1f}{total_ours / total_theirs:8.2f}")


if __name__ == "__main__":
    main()
