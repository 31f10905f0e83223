"""Two builds of the C++ library against each other, on a machine whose speed drifts between processes.

    python bench/ab_libraries.py OLD.so NEW.so [--pairs 6] [--batch 1 8] [--shapes 672,160,7 160,960,7] [--threads 2]

Copy the library of each build aside first (ghostkernels/_C_avx2*.so or _C_avx512*.so, whichever
backends() names), e.g. `cp ghostkernels/_C_avx2*.so /tmp/old.so`, rebuild, copy the new one. Each
pair runs one process with each library in place (the order alternating from pair to pair), every
process timing the same cases interleaved (bench/cases.py): the Ghost module (GhostNet 1.0x shapes,
eval) and `pointwise_conv2d` on its input. Printed: per case the median of each build's process
medians and the per-pair ratios OLD / NEW (> 1: NEW is faster) with their median. Between
processes of one build the machine drifted by 20-40% (bench/results, Zen 3): a ratio within one
pair is what holds, not a median across processes. At the end the NEW library is left in place.
The library is swapped by rename, never copied over: a process with it mapped dies (SIGBUS) when
the file under it is rewritten, so run nothing else that imports ghostkernels meanwhile.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def worker(shapes, batches, min_time, threads=None):
    import torch

    sys.path.insert(0, HERE)
    from cases import interleaved_rounds_ms, make_case

    if threads:
        torch.set_num_threads(threads)
    pointwise = torch.ops.ghostkernels.pointwise_conv2d
    cases = {}
    for batch in batches:
        for inp, oup, size in shapes:
            module, x, contenders = make_case(inp, oup, size, batch)
            cases[f"ghost {inp}->{oup}@{size} b{batch}"] = contenders["fused"]
            weight = module.primary_conv[0].weight
            bias = torch.randn(weight.shape[0])
            cases[f"pointwise {inp}->{weight.shape[0]}@{size} b{batch}"] = (
                lambda x=x, weight=weight, bias=bias: pointwise(x, weight, bias))
    with torch.inference_mode():
        rounds = interleaved_rounds_ms(cases, rounds=5, min_time=min_time)
    print(json.dumps({name: statistics.median(t for r in per_round for t in r) for name, per_round in rounds.items()}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("old", nargs="?")
    parser.add_argument("new", nargs="?")
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--shapes", nargs="+", default=["672,160,7", "160,960,7", "960,160,7", "480,112,14"],
                        help="inp,oup,size of GhostNet-like Ghost modules")
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds per case per process")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes]
    if args.worker:
        return worker(shapes, args.batch, args.min_time, args.threads)
    if not (args.old and args.new):
        parser.error("OLD and NEW libraries are required")

    from ghostkernels import _backends
    name, library = _backends.cpu_library()
    if name is None:
        raise SystemExit(f"no C++ library to swap: {library}")
    command = [sys.executable, os.path.abspath(__file__), "--worker", "--batch", *map(str, args.batch),
               "--shapes", *args.shapes, "--min-time", str(args.min_time), "--threads", str(args.threads)]
    def put_in_place(path):
        shutil.copy(path, library + ".swap")
        os.replace(library + ".swap", library)

    medians = {"old": [], "new": []}
    try:
        for pair in range(args.pairs):
            for build in ("old", "new") if pair % 2 == 0 else ("new", "old"):
                put_in_place(getattr(args, build))
                result = subprocess.run(command, capture_output=True, text=True)
                if result.returncode:
                    raise SystemExit(f"the {build} build's process failed:\n{result.stderr}")
                medians[build].append(json.loads(result.stdout.strip().splitlines()[-1]))
                print(f"pair {pair + 1} {build} done", file=sys.stderr)
    finally:
        put_in_place(args.new)
    print(f"{'case':34s} {'old us':>8s} {'new us':>8s}  old / new per pair (median)")
    for name in medians["old"][0]:
        old = [m[name] * 1e3 for m in medians["old"]]
        new = [m[name] * 1e3 for m in medians["new"]]
        ratios = [o / n for o, n in zip(old, new)]
        print(f"{name:34s} {statistics.median(old):8.1f} {statistics.median(new):8.1f}  "
              f"{' '.join(f'{r:.2f}' for r in ratios)} ({statistics.median(ratios):.3f})")


if __name__ == "__main__":
    main()
