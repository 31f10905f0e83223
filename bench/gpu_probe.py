"""Where the fused op's GPU time goes: its stages timed apart, block-size variants, the host path.

    GHOSTKERNELS_DISABLE_CPP=1 PYTHONPATH=. python3 bench/gpu_probe.py            # stages, variants, host path
    ... ncu --profile-from-start off --clock-control none ... python3 bench/gpu_probe.py --ncu   # counters

For a few GhostNet 1.0x shapes at batch 256, float16, channels_last, each stage of the op and its
neighbours, timed from CUDA graphs of 20 calls over 4 rotating input sets (the GPU's time, no
host gaps, no input served from L2): eager (cuDNN conv, BN, ReLU, cuDNN depthwise, BN, ReLU, cat),
the fused op on either route, the library GEMM alone (triton_ghost.library_primary: mm into a
buffer of its own; and, for comparison, addmm into the output's first channels, as before), the
tap-loop depthwise pass alone over the GEMM's z1 with the 3x3 op and with a 1x1 one (what the
taps cost), the 3x3 pass that replaced it (_ghost_rows3_kernel), cuDNN's depthwise conv alone,
ghost1 with a 3x3 stride-2 conv after it (the Ghost op then cuDNN, and fused:
_ghost_depthwise_rows3_kernel), GhostNetV2's gated op on either route, and the bytes each must
move over the copy bandwidth. Then the backward's stages (its kernel by
rows and by the tap loop, the library's conv backward, the whole backward) and fwd+bwd by autograd,
eager against fused, also from CUDA graphs; both routes at batch 1 and 32 by GPU time (what a captured
model runs); block sizes of the 3x3 pass; and at
batch 1 the host's microseconds per call: the module, triton_ghost.forward, Triton's JIT launch,
a launch of the compiled kernel, eager; fwd+bwd by autograd (fused, eager) and triton_ghost.backward;
GhostNet's direct convs (stem, depthwise) at --batch and 1: cuDNN against the Triton kernel.
--ncu runs one launch of each stage between cudaProfilerStart/Stop, for ncu.
Every fused stage is parity-checked against float32 math first. Run on CPU tensors under
TRITON_INTERPRET=1 (--device cpu, tiny shapes, no timing) to check the script itself.
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cases import DIRECT_CONVS, GHOSTNET_SHAPES, direct_conv_name, make_case, shape_name  # noqa: E402
from gpu_report import check, copy_bandwidth, float32_reference, masked_reference_grads, unfused  # noqa: E402
from host_path import per_call_us  # noqa: E402

from ghostkernels import ghost_module, ghost_module_reference, triton_direct_conv, triton_ghost  # noqa: E402
from ghostkernels.reference import ghost_module_gated_reference  # noqa: E402

SHAPES = [(16, 48, 112), (24, 72, 56), (40, 240, 28), (112, 672, 14), (960, 160, 7)]
# (block_c, num_warps) of the library route's 3 x 3 pass (_ghost_rows3_kernel)
ROWS3_VARIANTS = [(16, 1), (16, 2), (32, 2), (32, 4), (64, 4), (64, 8)]


def gpu_ms(fn, sets, calls=20):
    """Median ms per call of fn(set) replayed from one CUDA graph of `calls` calls over the sets
    (warmed up on a side stream, as torch.cuda.graph asks of captures that include autograd)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for s in sets:
            fn(s)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(sets[i % len(sets)])
    return do_bench(graph.replay, warmup=10, rep=60, return_mode="median") / calls


def dw_pass(case, config, dw=3):
    """The library route's depthwise pass alone: z1 read from the GEMM's buffer (filled once)."""
    weights, cheap_1x1 = case["weights"], case["cheap_1x1"]
    cheap = weights[2] if dw == 3 else cheap_1x1

    def run(s):
        grid, args, constants = triton_ghost.launch_arguments(
            s["z1"], False, weights[0], weights[1], cheap, weights[3], s["out"], "relu", 1, None, config,
            s["out"].dtype)
        return triton_ghost.launch(triton_ghost._ghost_forward_kernel, grid, *args, **constants,
                                   num_warps=config["num_warps"], num_stages=config["num_stages"])
    return run


def rows3_pass(weights, config):
    """The library route's 3 x 3 pass alone (_ghost_rows3_kernel) over the GEMM's z1 (filled once)."""
    def run(s):
        grid, args, constants = triton_ghost.rows3_arguments(s["z1"], weights[1], weights[2], weights[3], s["out"],
                                                             "relu", config)
        triton_ghost.launch(triton_ghost._ghost_rows3_kernel, grid, *args, **constants,
                            num_warps=config["num_warps"], num_stages=config["num_stages"])
    return run


def make_probe_case(inp, oup, size, batch, dtype, device, rotate=4):
    module, x, _ = make_case(inp, oup, size, batch, channels_last=True, device=device, dtype=dtype)
    weights = [w.detach() for w in module.folded_weights()[:4]]
    init = weights[0].shape[0]
    sets = []
    for i in range(rotate):
        xi = x if i == 0 else torch.randn_like(x)
        out = torch.empty((batch, oup, size, size), device=device, dtype=dtype, memory_format=torch.channels_last)
        x1 = torch.randn(batch, init, size, size, device=device, dtype=dtype).to(memory_format=torch.channels_last)
        sets.append({"x": xi, "out": out, "x1": x1, "z1": triton_ghost.library_primary(xi, weights[0])})
    heuristic = triton_ghost.heuristic_config(inp, init, dtype, True, True)
    conv = [torch.randn(oup, 1, 3, 3, device=device, dtype=dtype) / 3, torch.randn(oup, device=device, dtype=dtype)]
    gate = torch.randn(batch, oup, (size + 1) // 2, (size + 1) // 2, device=device, dtype=dtype)  # GhostNetV2's
    return {"module": module, "x": x, "weights": weights, "init": init, "sets": sets, "heuristic": heuristic,
            "cheap_1x1": weights[2][:, :, 1:2, 1:2].contiguous(), "oup": oup, "conv": conv, "gate": gate}


def ghost_depthwise_fused(case, warps=1):
    """ghost_module_depthwise's fused path (triton_ghost.forward_depthwise) with the 3 x 3 stride-2
    conv; warps: a multiple of rows_launch's warps (fewer elements and registers a thread)."""
    weights, oup, conv, x = case["weights"], case["oup"], case["conv"], case["x"]
    launch = triton_ghost.rows_launch((x.shape[3] - 1) // 2 + 1)
    launch = dict(launch, num_warps=launch["num_warps"] * warps)
    return lambda s: triton_ghost.forward_depthwise(s["x"], *weights, oup, "relu", *conv, launch=launch)


def stages(case):
    """name -> fn(set) of every stage timed for a shape."""
    module, weights, oup, init = case["module"], case["weights"], case["oup"], case["init"]
    lib, ker = dict(case["heuristic"], primary="library"), dict(case["heuristic"], primary="kernel")
    w1t = weights[0].view(init, -1).t()
    eager = unfused(module, oup)
    return {
        "eager CL": lambda s: eager(s["x"]),
        "fused library": lambda s: triton_ghost.forward(s["x"], *weights, oup, 1, "relu", config=lib),
        "fused kernel": lambda s: triton_ghost.forward(s["x"], *weights, oup, 1, "relu", config=ker),
        "gemm (library_primary)": lambda s: triton_ghost.library_primary(s["x"], weights[0]),
        "gemm addmm->out rows": lambda s: torch.addmm(weights[1], s["x"].permute(0, 2, 3, 1).reshape(-1, w1t.shape[0]),
                                                       w1t, out=s["out"].permute(0, 2, 3, 1).view(-1, oup)[:, :init]),
        "dw pass rows3": rows3_pass(weights, lib),
        "dw pass k3": dw_pass(case, lib, 3),
        "dw pass k1": dw_pass(case, lib, 1),
        "cudnn dw k3": lambda s: F.conv2d(s["x1"], weights[2], weights[3], padding=1, groups=init),
        # ghost1 and the 3 x 3 stride-2 conv after it (GhostNet's stride-2 bottlenecks): as the CUDA op
        # ran it before (the Ghost op, then cuDNN) and fused
        "ghost+dw s2 composed": lambda s: F.conv2d(triton_ghost.forward(s["x"], *weights, oup, 1, "relu", config=lib),
                                                   *case["conv"], 2, 1, groups=oup),
        "ghost+dw s2 fused": ghost_depthwise_fused(case),
        "ghost+dw s2 fused 2x warps": ghost_depthwise_fused(case, 2),
        # GhostNetV2's gated Ghost op on either route (the library one now takes the rows kernel)
        "gated library": lambda s: triton_ghost.forward(s["x"], *weights, oup, 1, "relu", gate=case["gate"], config=lib),
        "gated kernel": lambda s: triton_ghost.forward(s["x"], *weights, oup, 1, "relu", gate=case["gate"], config=ker),
    }


def add_backward_sets(case):
    """Each set gets what the backward reads (grad, the fused output) and writes (gz1, partial sums
    of the rows kernel and of the tap loop), and leaves for fwd+bwd by autograd."""
    weights, oup, init = case["weights"], case["oup"], case["init"]
    for s in case["sets"]:
        x = s["x"]
        batch, _, height, width = x.shape
        s["grad"] = torch.randn_like(s["out"])
        s["fwd"] = triton_ghost.forward(x, *weights, oup, 1, "relu", config=case["heuristic"])
        s["gz1"] = torch.empty_like(s["x1"])
        s["x_leaf"] = x.detach().clone().requires_grad_()
        for rows3 in (True, False):
            s[f"partials {rows3}"] = triton_ghost.backward_partials(batch, height, width, init, init, 3, rows3, 128,
                                                                    x.dtype, x.device)
    case["leaves"] = [w.detach().clone().requires_grad_() for w in weights]


def backward_kernel(case, rows3):
    """The backward's kernel alone: _ghost_backward_rows3_kernel or the tap loop (128-pixel tiles)."""
    plans = {}

    def run(s):
        tensors = (s["grad"], s["fwd"], case["weights"][2], s["gz1"], s[f"partials {rows3}"])
        if "plan" not in plans:
            plans["plan"] = triton_ghost.backward_plan(tensors, "relu", rows3, 128)
        triton_ghost._run(plans["plan"], tensors)
    return run


def fwd_bwd(op, leaves, grad, oup):
    """Grads of op(*leaves) (a Ghost op taking x and the folded weights) by autograd."""
    return torch.autograd.grad(op(*leaves, out_channels=oup), leaves, grad)


def backward_stages(case):
    """name -> fn(set) of the backward's stages, the whole backward, and fwd+bwd by autograd (eager:
    the reference's conv, ReLU, depthwise conv, ReLU and cat; fused: ghostkernels.ghost_module)."""
    weights, oup, leaves = case["weights"], case["oup"], case["leaves"]

    return {
        "bwd kernel rows": backward_kernel(case, True),
        "bwd kernel taps": backward_kernel(case, False),
        "bwd conv (cuDNN)": lambda s: torch.ops.aten.convolution_backward(
            s["gz1"], s["x"], weights[0], None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, True, False]),
        "backward (whole)": lambda s: triton_ghost.backward(s["grad"], s["fwd"], s["x"], *weights, oup, 1, "relu"),
        "fwd+bwd eager": lambda s: fwd_bwd(ghost_module_reference, [s["x_leaf"], *leaves], s["grad"], oup),
        "fwd+bwd fused": lambda s: fwd_bwd(ghost_module, [s["x_leaf"], *leaves], s["grad"], oup),
    }


def backward_parity(case):
    s = case["sets"][0]
    expected = masked_reference_grads(s["x"], case["weights"], s["fwd"], s["grad"], case["oup"])
    actual = triton_ghost.backward(s["grad"], s["fwd"], s["x"], *case["weights"], case["oup"], 1, "relu")
    for name, a, e in zip(("x", "W1", "b1", "W2", "b2"), actual, expected):
        check(a, e, s["x"].dtype, f"grad of {name} {tuple(s['x'].shape)}")


def stage_bytes(case, name):
    """Bytes a stage must move at least (each input read once, each output written once)."""
    x = case["sets"][0]["x"]
    e = x.element_size()
    pixels = x.shape[0] * x.shape[2] * x.shape[3]
    inp, init, oup = x.shape[1], case["init"], case["oup"]
    return {
        "eager CL": (inp + oup) * pixels * e, "fused library": (inp + oup) * pixels * e,
        "fused kernel": (inp + oup) * pixels * e, "gemm (library_primary)": (inp + init) * pixels * e,
        "gemm addmm->out rows": (inp + init) * pixels * e,
        "dw pass k3": (init + oup) * pixels * e, "dw pass k1": (init + oup) * pixels * e,
        "dw pass rows3": (init + oup) * pixels * e,
        "cudnn dw k3": 2 * init * pixels * e,
        "ghost+dw s2 composed": (inp + oup // 4) * pixels * e, "ghost+dw s2 fused": (inp + oup // 4) * pixels * e,
        "ghost+dw s2 fused 2x warps": (inp + oup // 4) * pixels * e,
        "gated library": (inp + oup + oup // 4) * pixels * e, "gated kernel": (inp + oup + oup // 4) * pixels * e,
        # backward: grad and the output read, gz1 written (the kernel); gz1 and x read, grad x written
        # (the library's conv backward); fwd+bwd adds the forward's x read and output written
        "bwd kernel rows": (2 * oup + init) * pixels * e, "bwd kernel taps": (2 * oup + init) * pixels * e,
        "bwd conv (cuDNN)": (init + 2 * inp) * pixels * e,
        "backward (whole)": (2 * oup + 2 * init + 2 * inp) * pixels * e,
        "fwd+bwd eager": (3 * oup + 2 * init + 3 * inp) * pixels * e,
        "fwd+bwd fused": (3 * oup + 2 * init + 3 * inp) * pixels * e,
    }[name]


def parity(case):
    x, weights, oup = case["x"], case["weights"], case["oup"]
    expected = float32_reference(case["module"], x, oup)
    for primary in ("library", "kernel"):
        torch.full((2**26,), float("nan"), device=x.device)
        out = triton_ghost.forward(x, *weights, oup, 1, "relu", config=dict(case["heuristic"], primary=primary))
        check(out, expected, x.dtype, f"fused {primary} {tuple(x.shape)}")
    gated = ghost_module_gated_reference(x.float(), *(w.float() for w in weights), case["gate"].float(),
                                         out_channels=oup)
    for primary in ("library", "kernel"):
        out = triton_ghost.forward(x, *weights, oup, 1, "relu", gate=case["gate"],
                                   config=dict(case["heuristic"], primary=primary))
        check(out, gated, x.dtype, f"gated {primary} {tuple(x.shape)}")
    conv_expected = F.conv2d(expected.to(x.dtype).float(), *(t.float() for t in case["conv"]), 2, 1, groups=oup)
    for warps in (1, 2):
        check(ghost_depthwise_fused(case, warps)(case["sets"][0]), conv_expected, x.dtype,
              f"ghost+dw s2 fused {tuple(x.shape)} warps x{warps}")


def route_cells(case, timed=True):
    """'<route> <ms>' for both routes of the case's shape, parity-checked first; * marks the one the
    heuristic takes at that batch (primary_is_large)."""
    x, weights, oup, init = case["x"], case["weights"], case["oup"], case["init"]
    expected = float32_reference(case["module"], x, oup)
    cells = []
    for primary in ("kernel", "library"):
        config = dict(case["heuristic"], primary=primary)
        check(triton_ghost.forward(x, *weights, oup, 1, "relu", config=config), expected, x.dtype,
              f"{primary} route {tuple(x.shape)}")
        ms = gpu_ms(lambda s: triton_ghost.forward(s["x"], *weights, oup, 1, "relu", config=config),
                    case["sets"]) if timed else float("nan")
        chosen = triton_ghost.primary_is_large(x.shape[0] * x.shape[2] * x.shape[3], x.shape[1], init)
        cells.append(f"{primary} {ms:.4f}{'*' if chosen == (primary == 'library') else ''}")
    return cells


def direct_conv_case(inp, oup, group_inputs, k, stride, size, batch, dtype, device, rotate=4):
    """A GhostNet direct conv (cases.DIRECT_CONVS) on channels_last inputs, the stem with its ReLU
    (as freeze() gives it), and its two contenders: cuDNN (then the ReLU, in place) and the Triton
    kernel that direct_conv2d runs on CUDA. Both are parity-checked against float32 math first."""
    activation = "relu" if group_inputs > 1 else "none"
    sets = [torch.randn(batch, inp, size, size, dtype=dtype, device=device).to(memory_format=torch.channels_last)
            for _ in range(rotate)]
    weight = torch.randn(oup, group_inputs, k, k, dtype=dtype, device=device) / k
    bias = torch.randn(oup, dtype=dtype, device=device)
    groups = inp // group_inputs

    def library(x):
        out = F.conv2d(x, weight, bias, stride, k // 2, groups=groups)
        return out.relu_() if activation == "relu" else out

    def triton(x):
        return triton_direct_conv.direct_conv2d(x, weight, bias, stride, activation)

    expected = F.conv2d(sets[0].float(), weight.float(), bias.float(), stride, k // 2, groups=groups)
    expected = expected.relu() if activation == "relu" else expected
    what = direct_conv_name(inp, oup, group_inputs, k, stride, size)
    for name, fn in (("cudnn", library), ("triton", triton)):
        check(fn(sets[0]), expected, dtype, f"direct conv {what} {name}")
    out_size = -(-size // stride)
    need = (inp * size * size + oup * out_size * out_size) * batch * sets[0].element_size()
    return {"cudnn": library, "triton": triton}, sets, need


def host_us(fn, calls=300):
    """Median host microseconds per call (the GPU work of a batch-1 call is shorter than its host work)."""
    torch.cuda.synchronize()
    us = per_call_us(fn, calls)
    torch.cuda.synchronize()
    return us


def host_path(inp, oup, size, dtype):
    """Host microseconds per call at batch 1: the module's whole path, then its layers peeled off."""
    module, x, _ = make_case(inp, oup, size, 1, channels_last=True, device="cuda", dtype=dtype)
    weights = [w.detach() for w in module.folded_weights()[:4]]
    init = weights[0].shape[0]
    config = dict(triton_ghost.heuristic_config(inp, init, dtype, True, False), primary="kernel")
    out = torch.empty((1, oup, size, size), device="cuda", dtype=dtype, memory_format=torch.channels_last)
    grid, args, constants = triton_ghost.launch_arguments(x, True, weights[0], weights[1], weights[2],
                                                          weights[3], out, "relu", 1, None, config, dtype)
    jit = triton_ghost._ghost_forward_kernel
    options = dict(num_warps=config["num_warps"], num_stages=config["num_stages"])
    compiled = jit[grid](*args, **constants, **options)
    names = [p.name for p in jit.params]
    every_arg = list(args) + [constants[name] for name in names[len(args):]]
    launch = compiled[(grid[0], 1, 1)]  # the compiled kernel's runner takes a 3-D grid
    eager = unfused(module, oup)
    with torch.no_grad():
        result = {
            "module (eval, no_grad)": host_us(lambda: module(x)),
            "triton_ghost.forward": host_us(lambda: triton_ghost.forward(x, *weights, oup, 1, "relu", config=config)),
            "launch_arguments + JIT launch": host_us(lambda: jit[grid](
                *triton_ghost.launch_arguments(x, True, *weights, out, "relu", 1, None, config, dtype)[1],
                **constants, **options)),
            "JIT launch": host_us(lambda: jit[grid](*args, **constants, **options)),
            "compiled-kernel launch": host_us(lambda: launch(*every_arg)),
            "eager CL (6 modules + cat)": host_us(lambda: eager(x)),
            "empty_like": host_us(lambda: torch.empty_like(out)),
        }
    leaves = [t.detach().clone().requires_grad_() for t in (x, *weights)]
    grad = torch.randn_like(out)
    fused_out = triton_ghost.forward(x, *weights, oup, 1, "relu", config=config)

    with torch.enable_grad():
        result.update({
            "fwd+bwd fused (autograd)": host_us(lambda: fwd_bwd(ghost_module, leaves, grad, oup)),
            "triton_ghost.backward": host_us(lambda: triton_ghost.backward(grad, fused_out, x, *weights, oup, 1,
                                                                          "relu")),
            "fwd+bwd eager (autograd)": host_us(lambda: fwd_bwd(ghost_module_reference, leaves, grad, oup)),
        })
    expected = float32_reference(module, x, oup)
    out.fill_(float("nan"))
    launch(*every_arg)
    check(out, expected, dtype, "compiled-kernel launch")
    return result


def run_ncu(args):
    cases = [make_probe_case(inp, oup, size, args.batch, torch.float16, "cuda", rotate=1) for inp, oup, size in
             [SHAPES[i] for i in args.ncu_shapes]]
    chosen = ["fused kernel", "gemm (library_primary)", "dw pass rows3", "dw pass k3", "dw pass k1", "cudnn dw k3",
              "ghost+dw s2 composed", "ghost+dw s2 fused"]
    backward_chosen = ["bwd kernel rows", "bwd kernel taps"]
    for case in cases:
        add_backward_sets(case)
    runs = [(case, stages(case)[name]) for case in cases for name in chosen]
    runs += [(case, backward_stages(case)[name]) for case in cases for name in backward_chosen]
    for case, fn in runs:  # compile outside the profiled range
        fn(case["sets"][0])
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for case, fn in runs:
        fn(case["sets"][0])
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print("profiled, in order:", [f"{shape_name(c['x'].shape[1], c['oup'], c['x'].shape[2])} {n}"
                                  for names in (chosen, backward_chosen) for c in cases for n in names])


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--ncu", action="store_true")
    parser.add_argument("--ncu-shapes", type=int, nargs="+", default=[0, 2, 4], help="indices into SHAPES")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["stages", "backward", "routes", "variants", "host", "direct"])
    args = parser.parse_args()
    if args.ncu:
        return run_ncu(args)
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    shapes = SHAPES if args.device == "cuda" else [(8, 12, 6), (24, 16, 5)]
    cuda = args.device == "cuda"
    bandwidth = copy_bandwidth() if cuda else 1.0
    print(f"{torch.cuda.get_device_name() if cuda else 'cpu'}; copy bandwidth {bandwidth / 1e9:.0f} GB/s; "
          f"batch {args.batch}, {dtype}, channels_last; ms per call from CUDA graphs; x floor = ms / (bytes / bw)")
    cases = {}
    for inp, oup, size in shapes:
        case = cases[(inp, oup, size)] = make_probe_case(inp, oup, size, args.batch if cuda else 2, dtype, args.device)
        parity(case)
        for name, fn in stages(case).items():  # every stage runs (the CPU check of this script)
            fn(case["sets"][0])
        if not cuda and "routes" not in args.skip:
            route_cells(case, timed=False)
        if "backward" not in args.skip:
            with torch.enable_grad():
                add_backward_sets(case)
                backward_parity(case)
                for name, fn in backward_stages(case).items():
                    fn(case["sets"][0])
    if not cuda:
        if "direct" not in args.skip:
            for conv in [(3, 16, 3, 3, 2, 9), (8, 8, 1, 5, 2, 7)]:
                contenders, sets, _ = direct_conv_case(*conv, 2, dtype, args.device)
                for fn in contenders.values():
                    fn(sets[0])
        print("stages ran on the CPU (no timing)")
        return
    if "stages" not in args.skip:
        print(f"{'shape':>12} {'stage':>20} {'ms':>8} {'x floor':>8} {'GB/s':>6}")
        for (inp, oup, size), case in cases.items():
            for name, fn in stages(case).items():
                ms = gpu_ms(fn, case["sets"])
                need = stage_bytes(case, name)
                print(f"{shape_name(inp, oup, size):>12} {name:>20} {ms:8.4f} {ms / (need / bandwidth * 1e3):8.2f} "
                      f"{need / ms / 1e6:6.0f}", flush=True)
    if "backward" not in args.skip:
        print("\nbackward, and fwd+bwd by autograd (ms per call from CUDA graphs)")
        for (inp, oup, size), case in cases.items():
            for name, fn in backward_stages(case).items():
                try:
                    with torch.enable_grad():
                        ms = gpu_ms(fn, case["sets"])
                except Exception as error:  # noqa: BLE001 - a capture that fails is reported, not fatal
                    print(f"{shape_name(inp, oup, size):>12} {name:>20} {type(error).__name__}: {error}"[:200])
                    continue
                need = stage_bytes(case, name)
                print(f"{shape_name(inp, oup, size):>12} {name:>20} {ms:8.4f} {ms / (need / bandwidth * 1e3):8.2f} "
                      f"{need / ms / 1e6:6.0f}", flush=True)
    if "routes" not in args.skip:
        print("\nroutes by GPU time (CUDA graphs), float16 channels_last: what a captured model's Ghost ops take "
              "(the route heuristic was fitted to host-inclusive timings); ms per call, * = the heuristic's")
        for batch in (1, 32):
            for inp, oup, size in GHOSTNET_SHAPES:
                case = make_probe_case(inp, oup, size, batch, dtype, "cuda")
                print(f"batch {batch:>3} {shape_name(inp, oup, size):>12} " + ", ".join(route_cells(case)), flush=True)
    if "variants" not in args.skip:
        print("\nvariants of the 3 x 3 pass (block_c / num_warps): ms per call from CUDA graphs")
        for (inp, oup, size), case in cases.items():
            weights, cells = case["weights"], []
            for block_c, warps in ROWS3_VARIANTS:
                config = dict(case["heuristic"], block_c=block_c, num_warps=warps)
                try:
                    ms = gpu_ms(rows3_pass(weights, config), case["sets"])
                    cells.append(f"{block_c}/{warps}w {ms:.4f}")
                except Exception as error:  # noqa: BLE001 - a variant the GPU cannot hold is reported, not fatal
                    cells.append(f"{block_c}/{warps}w {type(error).__name__}")
            print(f"{shape_name(inp, oup, size):>12} rows3: " + ", ".join(cells), flush=True)
    if "direct" not in args.skip:
        print("\ndirect convs (direct_conv2d on CUDA: the Triton kernel against cuDNN, + ReLU for the stem), "
              "float16 channels_last; ms per call from CUDA graphs, x floor (x read and the output written once)")
        for batch in (args.batch, 1):
            for conv in DIRECT_CONVS:
                contenders, sets, need = direct_conv_case(*conv, batch, dtype, "cuda")
                times = {name: gpu_ms(fn, sets) for name, fn in contenders.items()}
                floor = need / bandwidth * 1e3
                print(f"batch {batch:>3} {direct_conv_name(*conv):>22} " + ", ".join(
                    f"{name} {ms:.4f} ({ms / floor:.2f}x)" for name, ms in times.items())
                      + f", cudnn / triton {times['cudnn'] / times['triton']:.2f}", flush=True)
    if "host" not in args.skip:
        print("\nhost us per call, batch 1, float16 channels_last (kernel route)")
        for inp, oup, size in [(16, 16, 112), (960, 160, 7)]:
            for name, us in host_path(inp, oup, size, torch.float16).items():
                print(f"{shape_name(inp, oup, size):>12} {name:>32} {us:8.1f}", flush=True)


if __name__ == "__main__":
    main()
