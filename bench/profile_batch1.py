"""Where the batch-1 latency of accelerate(ghostnet_100(fused=False)) goes, on the CPU.

    OPENBLAS_NUM_THREADS=1 python bench/profile_batch1.py [--threads 2] [--iters 50] [--no-openvino] [--batch 1]
                                                          [--width 1.0] [--bfloat16]

1. Per-module breakdown: forward pre/post hooks (time.perf_counter) on the outermost fused or
   leaf modules of the accelerated model, median per module over --iters hooked forwards
   (alternated with plain ones), grouped by kind. The hooks' own cost (the in-hook time of an nn.Identity, measured the same way)
   is subtracted per call; "Python between modules" = median forward without hooks - the sum.
   Each module is also timed alone on the input it got in the model (captured and cloned), so
   in-model / isolated shows what cold caches and the surrounding model cost.
2. torch.profiler's self-CPU table for the same forward (top 25 ops), then the frozen graph's
   (ghostkernels.freeze) ops per call, by op and input shape (top 30).
3. When openvino is installed: the ORIGINAL model exported to ONNX (dynamo), OpenVINO's per-layer
   profile grouped by layer type (f32 hint) and its 20 slowest layers, and its latencies (f32,
   default) interleaved with the accelerated model's and the same model frozen (ghostkernels.freeze),
   and by block (blocks.i.j, stem, head): ours from section 1, and in interleaved rounds the frozen
   graph's ops (a profile of --iters forwards, by their module scopes) against OpenVINO's layers over
   as many profiled inferences, which are named after the modules they came from (the ONNX
   exporter's name scopes; the classifier's layer has none: "other"). Per block the medians over
   the rounds and, as ours / theirs, the median of the per-round ratios: the machine's speed drifts
   by tens of percent from one minute to the next, so the two sides are measured side by side.
All under torch.inference_mode(), batch 1 (or --batch), 224x224, float32, GhostNet 1.0x (or --width).
With --bfloat16 ours run the bfloat16 mode (torch.set_float32_matmul_precision("medium")) and the
per-layer profile and by-block table are OpenVINO's default precision (bf16 where the CPU has it)
instead of its f32 hint: where the two bfloat16 modes differ.
"""

import argparse
import collections
import os
import re
import statistics
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ghostkernels  # noqa: E402
from ghostkernels import models  # noqa: E402
from ghostkernels.direct_conv import DirectConv2d  # noqa: E402
from ghostkernels.ghost_depthwise import GhostDepthwise  # noqa: E402
from ghostkernels.modules import GhostModule, MergedAway, PointwiseConv2d  # noqa: E402
from ghostkernels.squeeze_excite import SqueezeExciteGhost  # noqa: E402
from machine import machine_line  # noqa: E402

LEAF_TYPES = (GhostModule, GhostDepthwise, SqueezeExciteGhost, DirectConv2d, PointwiseConv2d, nn.Linear,
              nn.ReLU, nn.AdaptiveAvgPool2d, nn.Identity, nn.Sequential)


def group_of(name, module):
    """The breakdown group of a hooked module."""
    if isinstance(module, (GhostModule, GhostDepthwise, SqueezeExciteGhost)):
        return type(module).__name__
    if isinstance(module, DirectConv2d):
        return "DirectConv2d stem" if name == "conv_stem" else "DirectConv2d depthwise (shortcut)"
    if isinstance(module, PointwiseConv2d):
        return "PointwiseConv2d head" if name in ("conv_head", "blocks.9.0.conv") else "PointwiseConv2d shortcut"
    if isinstance(module, nn.Linear):
        return "classifier (Linear)"
    return "ReLU / pool / Identity / empty Sequential"


def block_of(name):
    """The stage block a module or ONNX name scope belongs to: blocks.i.j, stem, head or other."""
    match = re.match(r"blocks\.\d+\.\d+", name)
    if match:
        return match.group(0)
    module = re.split(r"[.:]", name)[0]  # OpenVINO's layers: "module.path:node_name"
    if module in ("conv_stem", "bn1", "act1"):
        return "stem"
    if module in ("global_pool", "conv_head", "act2", "flatten", "classifier"):
        return "head"
    return "other"


def block_order(block):
    """Sort key of block_of's names in the model's order."""
    if block.startswith("blocks."):
        return (1, *map(int, block.split(".")[1:]))
    return ({"stem": 0, "head": 2}.get(block, 3),)


def leaf_modules(model):
    """(name, module) of the outermost LEAF_TYPES modules (a Sequential only when empty)."""
    found = []
    for name, module in model.named_modules():
        # not a merged module's placeholder: a hook there splits the merge (MergedAway)
        if (not isinstance(module, LEAF_TYPES) or (isinstance(module, nn.Sequential) and len(module))
                or isinstance(module, MergedAway)):
            continue
        if any(name.startswith(prefix + ".") for prefix, _ in found):
            continue
        found.append((name, module))
    return found


def median_ms(fn, reps):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def hook_bias_ms(reps=2000):
    """In-hook time of an nn.Identity: what the hooks add to every hooked call."""
    ident, state, times = nn.Identity(), {}, []
    ident.register_forward_pre_hook(lambda m, a: state.__setitem__("t", time.perf_counter()))
    ident.register_forward_hook(lambda m, a, o: times.append(time.perf_counter() - state["t"]))
    x = torch.zeros(1)
    for _ in range(reps):
        ident(x)
    return statistics.median(times) * 1e3


def breakdown(model, x, iters):
    leaves = leaf_modules(model)
    per_call = collections.defaultdict(list)  # name -> [ms per forward]
    inputs, state = {}, {}

    def pre(name):
        def hook(module, args):
            if name not in inputs:
                inputs[name] = tuple(a.clone() for a in args)
            state[name] = time.perf_counter()
        return hook

    def post(name):
        def hook(module, args, out):
            per_call[name].append((time.perf_counter() - state[name]) * 1e3)
        return hook

    def hooked():
        handles = [h for name, module in leaves
                   for h in (module.register_forward_pre_hook(pre(name)), module.register_forward_hook(post(name)))]
        t0 = time.perf_counter()
        model(x)
        elapsed = time.perf_counter() - t0
        for h in handles:
            h.remove()
        return elapsed

    hooked()  # captures the inputs
    per_call.clear()
    plain, with_hooks = [], []
    for _ in range(iters):  # alternated, so that both see the machine in the same state
        plain.append(median_ms(lambda: model(x), 1))
        with_hooks.append(hooked() * 1e3)
    total, hooked_total = statistics.median(plain), statistics.median(with_hooks)
    bias = hook_bias_ms()
    rows, top = collections.OrderedDict(), []
    for name, module in leaves:
        if name not in per_call:
            continue  # not called (e.g. replaced by a fused parent's kernel)
        calls = len(per_call[name]) // iters
        in_model = statistics.median(per_call[name]) * calls - bias * calls
        mod_inputs = inputs[name]
        median_ms(lambda: module(*mod_inputs), 5)  # warm-up
        isolated = median_ms(lambda: module(*mod_inputs), 100)
        top.append((in_model, isolated * calls, name, tuple(mod_inputs[0].shape)))
        g = rows.setdefault(group_of(name, module), [0, 0.0, 0.0])
        g[0] += calls
        g[1] += in_model
        g[2] += isolated * calls
    return total, hooked_total, bias, rows, sorted(top, reverse=True)


def residual_add_ms(model, x):
    """The in-place residual adds of the GhostBottlenecks (inside their forward, not a module)."""
    shapes = []
    hooks = [m.register_forward_hook(lambda m, a, o: shapes.append(o.shape)) for m in model.modules()
             if type(m).__name__ == "GhostBottleneck"]
    model(x)
    for h in hooks:
        h.remove()
    total = 0.0
    for shape in shapes:
        a, b = torch.randn(shape), torch.randn(shape)
        total += median_ms(lambda: a.add_(b), 200)
    return len(shapes), total


def python_costs(model, x):
    """Per-forward Python costs found inside the fused modules' forward: the folded-weight cache
    check (GhostModule.folded_weights, once per fused Ghost op) and the calls of empty modules."""
    ghosts = [m for m in model.modules() if isinstance(m, GhostModule)]
    fold = sum(median_ms(m.folded_weights, 200) for m in ghosts)
    empties = [m for m in model.modules() if isinstance(m, nn.Identity) or (type(m) is nn.Sequential and not len(m))]
    empty = sum(median_ms(lambda m=m: m(x), 200) for m in empties)
    return [(f"folded_weights() cache check, {len(ghosts)} Ghost modules", fold),
            (f"calls of {len(empties)} empty Identity / Sequential modules", empty)]


def print_breakdown(total, hooked_total, bias, rows, top, residual, costs):
    summed = sum(r[1] for r in rows.values())
    print(f"forward median {total:.3f} ms without hooks, {hooked_total:.3f} ms with hooks; "
          f"hook overhead {bias * 1e3:.1f} us per hooked call (subtracted)")
    print(f"{'group':<40}{'calls':>6}{'in-model ms':>13}{'% total':>9}{'isolated ms':>13}{'ratio':>7}")
    for group, (calls, in_model, isolated) in sorted(rows.items(), key=lambda kv: -kv[1][1]):
        print(f"{group:<40}{calls:6d}{in_model:13.3f}{in_model / total:9.1%}{isolated:13.3f}"
              f"{in_model / isolated:7.2f}")
    between = total - summed
    print(f"{'Python between modules (total - sum)':<40}{'':6}{between:13.3f}{between / total:9.1%}")
    print(f"{'  of which residual adds (isolated)':<40}{residual[0]:6d}{'':13}{'':9}{residual[1]:13.3f}")
    iso = sum(r[2] for r in rows.values())
    print(f"{'sum of modules':<40}{'':6}{summed:13.3f}{summed / total:9.1%}{iso:13.3f}{summed / iso:7.2f}")
    print("\nPython costs per forward, isolated (already inside the rows above):")
    for label, ms in costs:
        print(f"  {label:<56}{ms:7.3f} ms")
    print("\ntop 12 modules, in-model ms (isolated ms), input shape:")
    for in_model, isolated, name, shape in top[:12]:
        print(f"  {name:<28}{in_model:7.3f} ({isolated:.3f})  {shape}")


def print_profiler(model, x, iters):
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            model(x)
    print(f"\ntorch.profiler, {iters} forwards (times are totals over all of them)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def frozen_op_blocks(frozen):
    """(op name, block_of its module) of each op node of the frozen graph, in the order it runs
    them. A node without a module scope (one the trace made outside any module) belongs to the
    block of the node before; ghostkernels' fusions keep their first node's (ops.replace_chain)."""
    ops, block = [], "stem"
    for kind, scope in frozen.op_scopes:
        block = block_of(scope) if scope else block
        ops.append((kind, block))
    return ops


def aligned_op_events(prof, kinds, iters):
    """The profile's events of a frozen graph's ops, `kinds` the graph's op nodes' kinds in order,
    over `iters` forwards: the events not inside another of the graph's ops (the reference
    fallbacks without a C++ library call aten ops that the graph also has, such as relu_), one per
    node, forward after forward; None if they do not line up so."""
    names = set(kinds)

    def outermost(event):
        parent = event.cpu_parent
        while parent is not None and parent.name not in names:
            parent = parent.cpu_parent
        return parent is None

    events = [e for e in prof.events() if e.name in names and outermost(e)]
    if len(events) != len(kinds) * iters or any(e.name != kinds[i % len(kinds)] for i, e in enumerate(events)):
        return None
    return events


def frozen_by_block(prof, frozen, iters):
    """ms per forward of each block of the frozen graph, from a profile of `iters` forwards: the
    graph's op events in the order of its op nodes (aligned_op_events), per block the median over
    forwards of the sum of its ops' times. Empty if the events do not line up."""
    ops = frozen_op_blocks(frozen)
    events = aligned_op_events(prof, [kind for kind, _ in ops], iters)
    if events is None:
        print(f"frozen graph by block: the op events of {iters} forwards do not line up with its {len(ops)} ops; "
              "skipped")
        return {}
    per_forward = collections.defaultdict(list)
    for start in range(0, len(events), len(ops)):
        sums = collections.defaultdict(float)
        for (_, block), event in zip(ops, events[start:start + len(ops)]):
            sums[block] += event.cpu_time_total / 1e3
        for block, ms in sums.items():
            per_forward[block].append(ms)
    return {block: statistics.median(ms) for block, ms in per_forward.items()}


def print_frozen_ops(frozen, x, iters):
    """The frozen graph (what bench/e2e.py's 'frozen' column runs), op by op: torch.profiler's self
    CPU time per call, each op and input shape a row, the slowest first."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(20):
        frozen(x)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(iters):
            frozen(x)
    events = [e for e in prof.key_averages(group_by_input_shape=True) if e.key.startswith(("ghostkernels::", "aten::"))]
    events.sort(key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events) / iters / 1e3
    print(f"\nfrozen graph, torch.profiler self CPU over {iters} forwards: ops sum {total:.3f} ms per forward")
    print(f"{'op':<40}{'calls':>6}{'us/call':>9}{'ms/fwd':>8}  first input")
    for e in events[:30]:
        calls = e.count / iters
        shape = tuple(e.input_shapes[0]) if e.input_shapes else ()
        print(f"{e.key:<40}{calls:6.0f}{e.self_cpu_time_total / e.count:9.1f}"
              f"{e.self_cpu_time_total / iters / 1e3:8.3f}  {shape}")


def frozen_blocks_now(frozen, x, iters):
    """frozen_by_block of a profile of `iters` forwards taken now."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            frozen(x)
    return frozen_by_block(prof, frozen, iters)


def openvino_blocks_now(request, feed, iters, group=None):
    """ms per inference of each block (block_of its layers' names, or `group` of them) of a
    PERF_COUNT request: the median over `iters` inferences of the sum of its executed layers' times."""
    group = group or block_of
    per_inference = collections.defaultdict(list)
    for _ in range(iters):
        request.infer([feed])
        sums = collections.defaultdict(float)
        for info in request.get_profiling_info():
            if info.status.name == "EXECUTED":
                sums[group(info.node_name)] += info.real_time.total_seconds() * 1e3
        for block, ms in sums.items():
            per_inference[block].append(ms)
    return {block: statistics.median(ms) for block, ms in per_inference.items()}


def name_nodes_by_module(path):
    """Prefixes each node of the exported ONNX file with the module it came from (the exporter's
    name scopes), so that OpenVINO's per-layer profile can be grouped by block."""
    import ast

    import onnx
    graph = onnx.load(path)
    for node in graph.graph.node:
        scopes = [ast.literal_eval(p.value) for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"]
        if scopes and len(scopes[0]) > 1:
            node.name = f"{scopes[0][-2]}:{node.name}"  # the innermost module's qualified name
    onnx.save(graph, path)


def print_openvino(eager, model, frozen, x, iters, threads, ours_by_block, bfloat16):
    try:
        import openvino as ov
    except ImportError:
        print("\nOpenVINO: not installed, skipped")
        return
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"ghostnet-{os.getpid()}.onnx")
    torch.onnx.export(eager, (x,), path, dynamo=True)
    name_nodes_by_module(path)
    core, feed = ov.Core(), x.numpy()
    # The profiled request runs the precision that ours is compared with.
    compared = "OpenVINO default" if bfloat16 else "OpenVINO f32 hint"
    profiled = f"{compared} + PERF_COUNT"
    configs = {profiled: {"PERF_COUNT": "YES", **({} if bfloat16 else {"INFERENCE_PRECISION_HINT": "f32"})},
               "OpenVINO f32 hint": {"INFERENCE_PRECISION_HINT": "f32"},
               "OpenVINO default (no hint)": {}}
    compiled = {label: core.compile_model(core.read_model(path), "CPU", {**config, "INFERENCE_NUM_THREADS": threads})
                for label, config in configs.items()}
    os.remove(path)
    requests = {label: c.create_infer_request() for label, c in compiled.items()}
    fns = {label: (lambda r=r: r.infer([feed])) for label, r in requests.items()}
    with torch.inference_mode():
        fns["ghostkernels accelerated"] = lambda: model(x)
        fns["ghostkernels frozen"] = lambda: frozen(x)
        times = collections.defaultdict(list)
        for _ in range(5):  # interleaved rounds: the machine's speed drifts
            for label, fn in fns.items():
                median_ms(fn, 10)
                times[label].append(median_ms(fn, iters))
    print(f"\nOpenVINO {ov.__version__}, {threads} threads, interleaved (5 rounds x {iters}), median of round medians:")
    for label, t in times.items():
        precision = (compiled[label].get_property("INFERENCE_PRECISION_HINT").get_type_name()
                     if label in compiled else "bf16 mode" if bfloat16 else "f32")
        print(f"  {label:<32}{statistics.median(t):8.3f} ms  (min {min(t):.3f}; precision {precision})")
    by_type = collections.defaultdict(lambda: [0, 0.0])
    for info in requests[profiled].get_profiling_info():
        if info.status.name == "EXECUTED":
            by_type[(info.node_type, info.exec_type)][0] += 1
            by_type[(info.node_type, info.exec_type)][1] += info.real_time.total_seconds() * 1e3
    total = sum(v[1] for v in by_type.values())
    print(f"per-layer profile of the last {compared} inference, by type (sum {total:.3f} ms)")
    print(f"{'layer type':<22}{'exec type':<34}{'layers':>7}{'ms':>9}{'%':>7}")
    for (node, exec_type), (count, ms) in sorted(by_type.items(), key=lambda kv: -kv[1][1]):
        print(f"{node:<22}{exec_type:<34}{count:7d}{ms:9.3f}{ms / total:7.1%}")
    layers = sorted(((info.real_time.total_seconds() * 1e6, info.node_name, info.node_type)
                     for info in requests[profiled].get_profiling_info()
                     if info.status.name == "EXECUTED"), reverse=True)
    print("top 20 layers of that inference, us:")
    for us, name, node in layers[:20]:
        print(f"  {us:8.1f}  {node:<18}{name}")
    rounds = collections.defaultdict(lambda: ([], []))  # block: (frozen ms, OpenVINO ms) per round
    with torch.inference_mode():
        for _ in range(5):
            ours, theirs = frozen_blocks_now(frozen, x, iters), openvino_blocks_now(requests[profiled], feed, iters)
            if not ours:
                return  # frozen_by_block said why
            for block in {*ours, *theirs}:
                rounds[block][0].append(ours.get(block, 0.0))
                rounds[block][1].append(theirs.get(block, 0.0))
    print(f"by block: the accelerated model's modules in the model (section 1: with their Python; none between"
          f" them), and in 5 interleaved rounds the frozen graph's ops ({iters} profiled forwards a round) and"
          f" {compared}'s layers ({iters} profiled inferences a round): medians over the rounds, ours / theirs"
          " the median of the per-round ratios")
    print(f"{'block':<14}{'accelerated ms':>15}{'frozen ms':>11}{'OpenVINO ms':>13}{'frozen / OV':>13}")
    totals = [0.0, 0.0]
    for block in sorted({*ours_by_block, *rounds}, key=block_order):
        still, ov_ms = rounds[block]
        ratios = [a / b for a, b in zip(still, ov_ms) if b]
        median = [statistics.median(t) if t else 0.0 for t in (still, ov_ms)]
        totals = [t + m for t, m in zip(totals, median)]
        print(f"{block:<14}{ours_by_block.get(block, 0.0):15.3f}{median[0]:11.3f}{median[1]:13.3f}"
              f"{(statistics.median(ratios) if ratios else float('nan')):13.2f}")
    print(f"{'sum':<14}{sum(ours_by_block.values()):15.3f}{totals[0]:11.3f}{totals[1]:13.3f}"
          f"{totals[0] / totals[1]:13.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--no-openvino", action="store_true")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--width", type=float, choices=(0.5, 1.0, 1.3), default=1.0)
    parser.add_argument("--bfloat16", action="store_true", help="ours in the bfloat16 mode, against OpenVINO's default")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.bfloat16:
        torch.set_float32_matmul_precision("medium")
    torch.manual_seed(0)
    eager = models.ghostnet(width=args.width, fused=False).eval()
    model = ghostkernels.accelerate(eager)
    x = torch.randn(args.batch, 3, 224, 224)
    print(f"ghostkernels {ghostkernels.__version__}, torch {torch.__version__}, "
          f"accelerate(ghostnet(width={args.width}, fused=False)), batch {args.batch}, 224x224, float32"
          f"{' (bfloat16 mode)' if args.bfloat16 else ''}, inference_mode, "
          f"OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']}")
    flags = open("/proc/cpuinfo").read().split()
    print(machine_line(args.threads) + "; ISA: " + " ".join(
        f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags))
    print(f"command: OPENBLAS_NUM_THREADS=1 python bench/profile_batch1.py {' '.join(sys.argv[1:])}".rstrip())
    print()
    with torch.inference_mode():
        for _ in range(20):
            model(x)
        total, hooked_total, bias, rows, top = breakdown(model, x, args.iters)
        print_breakdown(total, hooked_total, bias, rows, top, residual_add_ms(model, x), python_costs(model, x))
        ours_by_block = collections.defaultdict(float)
        for in_model, _, name, _ in top:
            ours_by_block[block_of(name)] += in_model
        print_profiler(model, x, args.iters)
        frozen = ghostkernels.freeze(model, x)
        print_frozen_ops(frozen, x, args.iters)
    if not args.no_openvino:
        print_openvino(eager, model, frozen, x, args.iters, args.threads, ours_by_block, args.bfloat16)


if __name__ == "__main__":
    main()
