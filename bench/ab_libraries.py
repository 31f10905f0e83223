"""An earlier revision's C++ kernels against the installed ones (or a second revision's), in one process.

    python bench/ab_libraries.py OLD_REVISION [--new NEW_REVISION] [--rounds 11] [--batch 1 8]
                                              [--shapes 672,160,7 160,960,7] [--depthwise-kernels 3 5]
                                              [--threads 2] [--min-time 0.02] [--stem]

OLD_REVISION's csrc/ (any git revision: a commit, HEAD~1, a branch) is compiled with the installed
build's own flags (its build/temp/<build>/build.ninja, which `pip install --no-build-isolation -e .`
leaves in the source tree) plus -Dghostkernels=ghostkernels_old, which puts its C++ code and its
torch.library registrations under a namespace of their own; once it is loaded, the schemas it does
not define itself are copied from the installed ops'. Each case (bench/cases.py: the Ghost module at
GhostNet 1.0x shapes, eval; `pointwise_conv2d` on its input; the Ghost module into a 3x3 (and with
--depthwise-kernels 3 5, a 5x5) stride-2 depthwise conv, `ghost_module_depthwise`; a stride-2
depthwise `direct_conv2d` of its input of the same kernel sizes) then calls the op of one build and
of the other in alternated rounds, outputs compared first (equal, or the largest difference is
printed). Printed per case: each build's median and old / new, the median of the per-round ratios
(> 1: the installed build is faster) with its quartiles. Between processes this machine kind's speed
drifts by 20-40% (bench/results, Zen 3): only a comparison within one process reads a few percent.
With --new NEW_REVISION, that revision's csrc/ is built the same way under ghostkernels_new and
takes the installed build's place: two revisions compared by one builder, neither installed (the
installed package still supplies the schemas). Each library is cached by revision and namespace
under build/ab/; a case whose op a revision lacks is reported, not compared.
"""

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from cases import interleaved_rounds_ms, make_case, round_ratios  # noqa: E402
OLD_NAMESPACE, NEW_NAMESPACE = "ghostkernels_old", "ghostkernels_new"


def build_flags(build):
    """(compiler, flags before the source, flags after it) of the installed build `build` (_C_avx2...)."""
    path = os.path.join(ROOT, "build", "temp", build, "build.ninja")
    if not os.path.exists(path):
        raise SystemExit(f"{path} is missing: build the project first (pip install --no-build-isolation -e .)")
    values = dict(re.findall(r"^(\w+) = (.*)$", open(path).read(), re.M))
    return values.get("cxx", "c++"), values["cflags"].split(), values["post_cflags"].split()


def build_library(revision, build, namespace):
    """The C++ library of `revision`'s csrc/ under `namespace` (ghostkernels_old, or
    ghostkernels_new for --new): its path."""
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--verify", f"{revision}^{{commit}}"],
                            capture_output=True, text=True, check=True).stdout.strip()
    library = os.path.join(ROOT, "build", "ab", f"{build}-{commit[:12]}-{namespace}.so")
    if os.path.exists(library):
        return library
    compiler, cflags, post_cflags = build_flags(build)
    with tempfile.TemporaryDirectory() as tree:
        archive = subprocess.run(["git", "-C", ROOT, "archive", commit, "csrc"], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
        sources = sorted(os.path.join(tree, "csrc", f) for f in os.listdir(os.path.join(tree, "csrc"))
                         if f.endswith(".cpp"))
        objects = [source[:-4] + ".o" for source in sources]
        running, failed = [], False
        for source, obj in zip(sources, objects):  # as many compilers at once as cores
            if len(running) == (os.cpu_count() or 1):
                failed |= running.pop(0).wait() != 0
            running.append(subprocess.Popen([compiler, *cflags, source, "-o", obj, *post_cflags,
                                             f"-Dghostkernels={namespace}"]))
        failed |= any(job.wait() for job in running)
        if failed:
            raise SystemExit(f"{revision}'s sources did not compile")
        torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
        os.makedirs(os.path.dirname(library), exist_ok=True)
        subprocess.run([compiler, "-shared", *objects, f"-L{torch_lib}", "-lc10", "-ltorch", "-ltorch_cpu",
                        "-ltorch_python", "-fopenmp", "-s", "-o", library + ".tmp"], check=True)
    shutil.move(library + ".tmp", library)
    return library


def mirror_schemas(library):
    """Defines in `library` (a torch.library.Library fragment, ghostkernels_old's) the schema of every
    ghostkernels op that its namespace lacks: the old build's kernels are registered by name, and
    most schemas by the Python package (the C++ defines a few itself). An op whose old kernel takes
    other arguments than today's schema (the schema changed since) is left without one, and its
    cases are reported, not compared."""
    for qualified in sorted(torch._C._dispatch_get_all_op_names()):
        namespace, name = qualified.split("::", 1)
        if namespace != "ghostkernels":
            continue
        packet = getattr(torch.ops.ghostkernels, name)
        for overload in packet.overloads():
            schema = getattr(packet, overload)._schema
            try:  # the old build's kernel makes an entry for the op, its def a schema
                torch._C._dispatch_find_schema_or_throw(f"{library.ns}::{name}", schema.overload_name)
            except RuntimeError:
                try:
                    library.define(str(schema).split("::", 1)[1])
                except RuntimeError as error:  # the kernel's inferred schema disagrees
                    print(f"{name}: not mirrored, its schema changed since the old revision "
                          f"({str(error).splitlines()[0][:120]})")


def make_cases(shapes, batches, namespaces, depthwise_kernels=(3,), stem=False):
    """{case: {build: callable}} for the builds' op namespaces (torch.ops.ghostkernels...), the
    stride-2 depthwise cases once per kernel size in depthwise_kernels (named "... 5x5" but for 3),
    and with `stem` GhostNet's stem conv (folded BN, ReLU) per batch."""
    def ghost(ops, x, weights, oup):
        return lambda: ops.ghost_module(x, *weights[:4], oup, 1, "relu")

    def pointwise(ops, x, weight, bias):
        return lambda: ops.pointwise_conv2d(x, weight, bias, 1, "relu", None)

    def ghost_depthwise(ops, x, weights, oup, depthwise, depthwise_bias):
        return lambda: ops.ghost_module_depthwise(x, *weights[:4], oup, 1, "relu", depthwise, depthwise_bias, 2)

    def depthwise_conv(ops, x, depthwise, depthwise_bias):
        return lambda: ops.direct_conv2d(x, depthwise, depthwise_bias, 2, "none")

    def stem_conv(ops, x, weight, bias):
        return lambda: ops.direct_conv2d(x, weight, bias, 2, "relu")

    cases = {}
    for batch in batches:
        if stem:
            x, weight, bias = torch.randn(batch, 3, 224, 224), torch.randn(16, 3, 3, 3), torch.randn(16)
            cases[f"stem 3->16@224 s2 b{batch}"] = {build: stem_conv(ops, x, weight, bias)
                                                   for build, ops in namespaces.items()}
        for inp, oup, size in shapes:
            module, x, _ = make_case(inp, oup, size, batch)
            weights = module.folded_weights()
            weight = module.primary_conv[0].weight
            bias = torch.randn(weight.shape[0])
            cases[f"ghost {inp}->{oup}@{size} b{batch}"] = {
                build: ghost(ops, x, weights, oup) for build, ops in namespaces.items()}
            cases[f"pointwise {inp}->{weight.shape[0]}@{size} b{batch}"] = {
                build: pointwise(ops, x, weight, bias) for build, ops in namespaces.items()}
            # a GhostBottleneck's ghost1 with its stride-2 conv_dw (GhostNet's: 3x3 and 5x5), and a
            # shortcut's depthwise conv
            for k in depthwise_kernels:
                suffix = "" if k == 3 else f" {k}x{k}"
                depthwise, depthwise_bias = torch.randn(oup, 1, k, k), torch.randn(oup)
                cases[f"ghost+dw s2 {inp}->{oup}@{size} b{batch}{suffix}"] = {
                    build: ghost_depthwise(ops, x, weights, oup, depthwise, depthwise_bias)
                    for build, ops in namespaces.items()}
                shortcut, shortcut_bias = torch.randn(inp, 1, k, k), torch.randn(inp)
                cases[f"depthwise s2 {inp}@{size} b{batch}{suffix}"] = {
                    build: depthwise_conv(ops, x, shortcut, shortcut_bias) for build, ops in namespaces.items()}
    return cases


def compare(cases, rounds, min_time):
    """Prints each case's line; min_time: seconds per build per case per round."""
    print(f"{'case':34s} {'old us':>8s} {'new us':>8s}  old / new (quartiles)")
    with torch.inference_mode():
        for name, calls in cases.items():
            try:
                old, new = calls["old"](), calls["new"]()
            except (AttributeError, RuntimeError, NotImplementedError) as error:  # an op the old revision lacks
                print(f"{name:34s} not compared: {str(error).splitlines()[0]}")
                continue
            if not torch.equal(old, new):
                print(f"{name:34s} outputs differ: largest difference {(old - new).abs().max().item():.3g}")
            rounds_ms = interleaved_rounds_ms(calls, rounds, min_time * rounds)
            ratios = round_ratios(rounds_ms, "old", "new")
            q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
            old_us, new_us = (statistics.median(statistics.median(r) for r in rounds_ms[b]) * 1e3 for b in ("old", "new"))
            print(f"{name:34s} {old_us:8.1f} {new_us:8.1f}  {statistics.median(ratios):.3f} ({q[0]:.3f}-{q[2]:.3f})",
                  flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("old", help="the git revision whose csrc/ is the old build")
    parser.add_argument("--new", help="a git revision whose csrc/ is the new build, built the same way (by "
                                      "default the installed build): two revisions compared without installing either")
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--shapes", nargs="+", default=["672,160,7", "160,960,7", "960,160,7", "480,112,14"],
                        help="inp,oup,size of GhostNet-like Ghost modules")
    parser.add_argument("--depthwise-kernels", type=int, nargs="+", default=[3],
                        help="kernel sizes of the stride-2 depthwise cases (GhostNet's conv_dw: 3 and 5)")
    parser.add_argument("--stem", action="store_true", help="add GhostNet's stem conv (3 -> 16, 3x3, stride 2, 224x224)")
    parser.add_argument("--min-time", type=float, default=0.02, help="seconds per build per case per round")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import ghostkernels
    from ghostkernels import _backends

    build, library = _backends.cpu_library()
    if build is None:
        raise SystemExit(f"no installed C++ library to compare against: {library}")
    ghostkernels.backends()  # loads the installed build
    built = {"old": (args.old, OLD_NAMESPACE)} | ({"new": (args.new, NEW_NAMESPACE)} if args.new else {})
    namespaces, fragments = {"new": torch.ops.ghostkernels}, []  # the fragments stay referenced
    described = {"new": f"the installed {build}"}
    for side, (revision, namespace) in built.items():
        library = build_library(revision, build, namespace)
        torch.ops.load_library(library)
        fragments.append(torch.library.Library(namespace, "FRAGMENT"))
        mirror_schemas(fragments[-1])
        namespaces[side], described[side] = getattr(torch.ops, namespace), f"{revision} ({library})"
    print(f"old: {described['old']}; new: {described['new']}, {args.threads} threads")
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes]
    compare(make_cases(shapes, args.batch, namespaces, args.depthwise_kernels, args.stem), args.rounds, args.min_time)


if __name__ == "__main__":
    main()
