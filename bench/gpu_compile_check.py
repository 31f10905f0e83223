"""Compile the Triton kernels for a GPU without one: compile time, registers, spills, shared memory.

    python bench/gpu_compile_check.py [--arch 90] [--out FILE]
    PYTHONPATH=<a triton==3.6.0 install>:. python bench/gpu_compile_check.py   # the GPU image's Triton

Triton compiles ahead of time for a given target (`triton.compile` with a GPUTarget) with the
ptxas it ships, and cuobjdump (shipped too) reads the cubin's resource usage. So without a GPU
we can see what a GPU would run: whether every variant compiles (float64 included), how many
registers a thread takes (255 is the cap; beyond it ptxas spills to local memory, "stack"),
and how long compilation takes, the first call's cost. Variants: the forward of every
GhostNet 1.0x shape with the heuristic config (float16; bfloat16 compiles the same), the
tuning candidates of two shapes, float64, ratio 3, NCHW, gated, the residual added in the stores,
ghost1 fused with its stride-2 conv, the backward (by rows and by the tap loop), G-GhostNet's
cheap op and the SE gate. Each is specialised as a real launch of that shape would be (`compile_launch`).
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

# A fresh Triton cache, so that the compile times are a fresh process's (a first call's).
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="ghostkernels-compile-check-")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cases import DIRECT_CONVS, GHOSTNET_SHAPES, direct_conv_name, shape_name  # noqa: E402

from ghostkernels import (triton_cheap_mix, triton_direct_conv, triton_ghost, triton_ghost_train,  # noqa: E402
                          triton_squeeze_excite)

POINTER = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float64: "*fp64"}
_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def compile_launch(fn, args, constants, arch, num_warps, num_stages):
    """triton.compile of `fn` for sm_<arch> as a launch fn[grid](*args, **constants) would
    specialise it: a tensor 16-byte aligned, an int equal to 1 or divisible by 16 (unless the
    kernel says do_not_specialize) become known to the compiler. Returns (seconds, kernel)."""
    signature, attrs, constexprs = {}, {}, dict(constants)
    values = iter(args)
    for i, param in enumerate(fn.params):
        name = param.name
        if name in constants:
            signature[name] = "constexpr"
            continue
        value = next(values)
        if isinstance(value, torch.Tensor):
            signature[name] = POINTER[value.dtype]
            if value.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1 and not param.do_not_specialize:
            signature[name] = "constexpr"
            constexprs[name] = 1
        else:
            signature[name] = "i32"
            if value % 16 == 0 and not param.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    start = time.perf_counter()
    kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages, **triton_ghost.LAUNCH_OPTIONS})
    return time.perf_counter() - start, kernel


def resource_usage(kernel):
    """{"REG": registers a thread, "STACK": bytes of stack a thread (spills), ...} from cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        text = subprocess.run([os.path.join(_BIN, "cuobjdump"), "--dump-resource-usage", f.name],
                              capture_output=True, text=True, check=True).stdout
    fields = text.strip().splitlines()[-1].split()
    usage = {k: int(v) for k, v in (field.split(":")[:2] for field in fields if field.count(":") == 1)}
    return dict(usage, **access_bytes(kernel.asm["ptx"]))


_ACCESS = re.compile(r"\b(ld|st)\.global(?:\.[\w:]+?)*?(?:\.v(\d))?\.[bfsu](\d+)\b")


def access_bytes(ptx):
    """{"LOAD": widest global load in bytes, "STORE": widest global store}: a memory-bound kernel
    wants 16 (a float16 kernel whose channel masks Triton could not prove constant over a vector
    made every access 2 bytes, 7-30x off the H200's memory floor)."""
    widest = {"LOAD": 0, "STORE": 0}
    for op, lanes, bits in _ACCESS.findall(ptx):
        key = "LOAD" if op == "ld" else "STORE"
        widest[key] = max(widest[key], int(lanes or 1) * int(bits) // 8)
    return widest


_compiled = {}  # specialisation -> kernel: a variant a real process would reuse compiles once here too


def compile_forward(inp, oup, size, config, dtype=torch.float16, arch=90, ratio=2, dw=3, relu=True,
                    channels_last=True, gated=False, scaled=False, residual=False):
    """(seconds, resource usage) of the forward a batch-1 call of this shape and config launches
    (seconds 0 when an identical variant was compiled already)."""
    init = -(-oup // ratio)
    ghosts = init * (ratio - 1)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.empty(1, inp, size, size, dtype=dtype).to(memory_format=fmt)
    out = torch.empty(1, oup, size, size, dtype=dtype).to(memory_format=fmt)
    w1, b1 = torch.empty(init, inp, 1, 1, dtype=dtype), torch.empty(init, dtype=dtype)
    w2, b2 = torch.empty(ghosts, 1, dw, dw, dtype=dtype), torch.empty(ghosts, dtype=dtype)
    gate = torch.empty(1, oup, max(1, size // 2), max(1, size // 2), dtype=dtype) if gated else None
    library = config["primary"] == "library"
    z1 = torch.empty(1, init, size, size, dtype=dtype).to(memory_format=fmt)
    activation = "relu" if relu else "none"
    kernel = triton_ghost._ghost_forward_kernel
    if triton_ghost.takes_rows3(not library, dw):  # what _launch runs there: the 3 x 3 pass over z1
        kernel = triton_ghost._ghost_rows3_kernel
        _, args, constants = triton_ghost.rows3_arguments(z1, b1, w2, b2, out, activation, config,
                                                          torch.empty_like(out) if residual else None, gate)
    else:
        _, args, constants = triton_ghost.launch_arguments(
            z1 if library else x, not library, w1, b1, w2, b2, out, activation, 1,
            gate, config, dtype, torch.empty(1, inp, 1, 1, dtype=dtype) if scaled and not library else None,
            torch.empty_like(out) if residual else None)
        constants["INPUT_PRECISION"] = "ieee" if dtype in (torch.float32, torch.float64) else "tf32"
        constants["UPCAST_DOT"] = False
    key = (repr(sorted(constants.items(), key=lambda kv: kv[0])), config["num_warps"], config["num_stages"],
           tuple(type(a).__name__ if isinstance(a, torch.Tensor) else (a == 1, a % 16 == 0) for a in args
                 if not isinstance(a, float)),
           tuple(a.data_ptr() % 16 == 0 for a in args if isinstance(a, torch.Tensor)))
    seconds = 0.0
    if key not in _compiled:
        seconds, _compiled[key] = compile_launch(kernel, args, constants, arch, config["num_warps"],
                                                 config["num_stages"])
    return seconds, resource_usage(_compiled[key])


def compile_backward(dtype, arch=90, dw=3, tile_pixels=128, oup=200, size=14, ratio=2):
    """(seconds, resource usage) of the backward kernel a call of this shape launches (the rows
    kernel where triton_ghost.takes_backward_rows3, else the tap loop with tiles of tile_pixels)."""
    init = -(-oup // ratio)
    ghosts = init * (ratio - 1)
    fmt = torch.channels_last
    out = torch.empty(1, oup, size, size, dtype=dtype).to(memory_format=fmt)
    grad = torch.empty_like(out)
    grad_z1 = torch.empty(1, init, size, size, dtype=dtype).to(memory_format=fmt)
    rows3 = triton_ghost.takes_backward_rows3(dw, ghosts // init)
    partials = triton_ghost.backward_partials(1, size, size, init, ghosts, dw, rows3, tile_pixels, dtype, "cpu")
    tensors = (grad, out, torch.empty(ghosts, 1, dw, dw, dtype=dtype), grad_z1, partials)
    if rows3:
        kernel, launch = triton_ghost._ghost_backward_rows3_kernel, triton_ghost.rows_launch(size)
        _, args, constants = triton_ghost.backward_rows3_arguments(*tensors, "relu")
    else:
        kernel, launch = triton_ghost._ghost_backward_kernel, triton_ghost.BACKWARD_LAUNCH
        _, args, constants = triton_ghost.backward_arguments(*tensors, "relu", tile_pixels)
    seconds, kernel = compile_launch(kernel, args, constants, arch, launch["num_warps"], launch["num_stages"])
    return seconds, resource_usage(kernel)


def compile_ghost_depthwise(inp, oup, size, dtype=torch.float16, arch=90):
    """(seconds, resource usage) of _ghost_depthwise_rows3_kernel for ghost_module_depthwise of this shape
    (ratio 2, 3 x 3 cheap op and stride-2 conv, channels_last), as forward_depthwise launches it."""
    init = -(-oup // 2)
    fmt = torch.channels_last
    z1 = torch.empty(1, init, size, size, dtype=dtype).to(memory_format=fmt)
    out = torch.empty(1, oup, (size - 1) // 2 + 1, (size - 1) // 2 + 1, dtype=dtype).to(memory_format=fmt)
    b1, w2, b2 = torch.empty(init, dtype=dtype), torch.empty(init, 1, 3, 3, dtype=dtype), torch.empty(init, dtype=dtype)
    wd, bd = torch.empty(oup, 1, 3, 3, dtype=dtype), torch.empty(oup, dtype=dtype)
    launch = triton_ghost.rows_launch(out.shape[3])
    _, args, constants = triton_ghost.depthwise_rows3_arguments(z1, b1, w2, b2, wd, bd, out, "relu", launch["block_c"])
    seconds, kernel = compile_launch(triton_ghost._ghost_depthwise_rows3_kernel, args, constants, arch,
                                     launch["num_warps"], launch["num_stages"])
    return seconds, resource_usage(kernel)


def compile_cheap_mix(dtype, arch=90):
    float64 = dtype == torch.float64
    x = torch.empty(1, 64, 14, 14, dtype=dtype).to(memory_format=torch.channels_last)
    weight, bias, mix = torch.empty(64, 32, dtype=dtype), torch.empty(64, dtype=dtype), torch.empty(1, 64, dtype=dtype)
    args = (x, weight, bias, mix, x, 32, 64, 14, 196, *x.stride(), *x.stride())
    constants = {"HAS_BIAS": True, "BLOCK_P": 32 if float64 else 64, "BLOCK_C": 16 if float64 else 64,
                 "BLOCK_K": 4 if float64 else 32, "FMA": float64, "INPUT_PRECISION": "ieee",
                 "ACC": tl.float64 if float64 else tl.float32, "UPCAST_DOT": False}
    seconds, kernel = compile_launch(triton_cheap_mix._cheap_mix_kernel, args, constants, arch, 4, 2)
    return seconds, resource_usage(kernel)


def compile_squeeze_excite(dtype, arch=90, channels=960, reduced=240, size=7):
    """(seconds, resource usage) of the SE gate kernel for GhostNet's widest gate."""
    x = torch.empty(1, channels, size, size, dtype=dtype).to(memory_format=torch.channels_last)
    reduce_weight = torch.empty(reduced, channels, dtype=dtype)
    expand_weight = torch.empty(channels, reduced, dtype=dtype)
    bias = torch.empty(channels, dtype=dtype)
    channel_align = triton_ghost._alignment(x.element_size(), (channels,))
    args = (x, reduce_weight, bias, expand_weight, bias, bias, channels // channel_align, reduced, size, size * size,
            *x.stride())
    block_c, block_r, num_warps = triton_squeeze_excite.blocks(reduced)
    constants = {"HAS_BR": True, "HAS_BE": True, "BLOCK_C": block_c, "BLOCK_P": 64, "BLOCK_R": block_r,
                 "CHANNEL_ALIGN": channel_align, "ACC": tl.float64 if dtype == torch.float64 else tl.float32}
    seconds, kernel = compile_launch(triton_squeeze_excite._squeeze_excite_gate_kernel, args, constants, arch,
                                     num_warps, 2)
    return seconds, resource_usage(kernel)


def compile_direct_conv(inp, oup, group_inputs, k, stride, size, dtype=torch.float16, arch=90):
    """(seconds, resource usage) of _direct_conv_kernel for this channels_last conv with a ReLU."""
    x = torch.empty(1, inp, size, size, dtype=dtype).to(memory_format=torch.channels_last)
    out = torch.empty(1, oup, -(-size // stride), -(-size // stride), dtype=dtype).to(memory_format=torch.channels_last)
    weight, bias = torch.empty(oup, group_inputs, k, k, dtype=dtype), torch.empty(oup, dtype=dtype)
    _, args, constants = triton_direct_conv.arguments(x, weight, bias, out, stride, "relu")
    options = triton_direct_conv.launch(constants["DENSE"])
    seconds, kernel = compile_launch(triton_direct_conv._direct_conv_kernel, args, constants, arch,
                                     options["num_warps"], options["num_stages"])
    return seconds, resource_usage(kernel)


TRAIN_KERNELS = ("cheap_forward", "ghost_output", "grad_sums", "cheap_backward", "batch_norm_backward")


def compile_train(name, dtype, arch=90, init=60, size=28, d=3):
    """(seconds, resource usage) of training-mode kernel `name` (triton_ghost_train) at GhostNet
    1.0x's 40->120@28 (60 intrinsic channels, ratio 2, 3x3 cheap op, ReLU), launched as
    forward()/backward() launch it (Triton's default 4 warps, 3 stages)."""
    plane = torch.empty(1, 2 * init, size, size, dtype=dtype)
    stats = torch.empty(2 * init, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    w2 = torch.empty(init, 1, d, d, dtype=dtype)
    pixel_align = triton_ghost._alignment(plane.element_size(), (size * size,))
    common = {"BLOCK": triton_ghost_train.BLOCK, "PIXEL_ALIGN": pixel_align,
              "ACC": tl.float64 if dtype == torch.float64 else tl.float32}
    cheap = dict(common, D=d, COPIES=1, CP=1, RELU=True)
    pixels = size * size // pixel_align
    fn, args, constants = {
        "cheap_forward": (triton_ghost_train._cheap_forward_kernel,
                          (plane, stats, stats, w2, plane, plane, size, size, pixels, init, init, 2 * init), cheap),
        "ghost_output": (triton_ghost_train._ghost_output_kernel,
                         (plane, stats, stats, plane, pixels, init, init, init, 2 * init), dict(common, RELU=True)),
        "grad_sums": (triton_ghost_train._grad_sums_kernel,
                      (plane, plane, stats, stats, stats, stats, pixels, init, 2 * init, init, init),
                      dict(common, RELU=True)),
        "cheap_backward": (triton_ghost_train._cheap_backward_kernel,
                           (plane, plane, plane, w2, *[stats] * 7, plane, stats, size, size, pixels, init, init, init,
                            2 * init), cheap),
        "batch_norm_backward": (triton_ghost_train._batch_norm_backward_kernel,
                                (plane, plane, stats, stats, stats, stats, pixels, init), common),
    }[name]
    seconds, kernel = compile_launch(fn, args, constants, arch, 4, 3)
    return seconds, resource_usage(kernel)


def smoke():
    """{variant: resource usage} of one variant of each kernel and dtype family (the test suite's
    check that everything compiles for sm_90; run without TRITON_INTERPRET)."""
    results = {}
    for primary, dtype in (("kernel", torch.float16), ("library", torch.float16), ("kernel", torch.float64)):
        config = dict(triton_ghost.heuristic_config(40, 60, dtype, True), primary=primary)
        results[f"forward {primary} {dtype}"] = compile_forward(40, 120, 28, config, dtype)[1]
    config = dict(triton_ghost.heuristic_config(24, 36, torch.float16, False), primary="kernel")
    results["forward kernel scaled gated torch.float16"] = compile_forward(24, 72, 28, config, scaled=True,
                                                                           gated=True)[1]
    config = dict(triton_ghost.heuristic_config(40, 60, torch.float16, True), primary="library")
    results["forward library residual torch.float16"] = compile_forward(40, 120, 28, config, relu=False,
                                                                        residual=True)[1]
    for dtype in (torch.float16, torch.float64):
        results[f"backward {dtype}"] = compile_backward(dtype)[1]
    results["backward tap loop torch.float16"] = compile_backward(torch.float16, dw=5)[1]
    results["cheap_mix torch.float64"] = compile_cheap_mix(torch.float64)[1]
    results["ghost_depthwise torch.float16"] = compile_ghost_depthwise(16, 48, 112)[1]
    for dtype in (torch.float16, torch.float64):
        results[f"squeeze_excite_gate {dtype}"] = compile_squeeze_excite(dtype)[1]
    results["direct_conv stem torch.float16"] = compile_direct_conv(*DIRECT_CONVS[0])[1]
    results["direct_conv dw torch.float64"] = compile_direct_conv(*DIRECT_CONVS[1], dtype=torch.float64)[1]
    for name, dtype in (("cheap_forward", torch.float16), ("cheap_backward", torch.float16),
                        ("cheap_backward", torch.float64)):
        results[f"train {name} {dtype}"] = compile_train(name, dtype)[1]
    return results


def row(what, config, seconds, usage):
    spill = " **spills**" if usage.get("STACK", 0) or usage.get("LOCAL", 0) else ""
    config_text = ", ".join(f"{k}={v}" for k, v in config.items()) if config else "-"
    return (f"| {what} | {config_text} | {seconds:.1f} | {usage.get('REG')} | {usage.get('STACK', 0)}{spill} | "
            f"{usage.get('SHARED', 0)} | {usage['LOAD']} / {usage['STORE']} |\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    parser.add_argument("--out", help="default: bench/results/sm<arch>-compile-check-triton<version>.md")
    args = parser.parse_args()
    args.out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                        f"sm{args.arch}-compile-check-triton{triton.__version__}.md")
    lines = [f"# Triton kernels compiled for sm_{args.arch} without a GPU (`python bench/gpu_compile_check.py`)\n\n"
             f"triton {triton.__version__}, torch {torch.__version__}. Seconds: compile time on this CPU (0: the "
             "variant was compiled above already); REG: registers a thread; STACK: bytes of spill a thread; "
             "SHARED: static shared memory; LD / ST: the widest global load / store in bytes (16: a full "
             "vector).\n\n",
             "| kernel | config | s | REG | STACK | SHARED | LD / ST |\n", "|---" * 7 + "|\n"]

    def emit(text):
        lines.append(text)
        print(text, end="", flush=True)

    start = time.perf_counter()
    for inp, oup, size in GHOSTNET_SHAPES:
        init = -(-oup // 2)
        config = triton_ghost.heuristic_config(inp, init, torch.float16, True)
        for relu in (True, False):  # GhostNet's ghost1 and ghost2
            emit(row(f"forward {shape_name(inp, oup, size)} float16 {'relu' if relu else 'none'}", config,
                     *compile_forward(inp, oup, size, config, arch=args.arch, relu=relu)))
    emit(f"| **GhostNet 1.0x's forward variants, compiled in all** | | {time.perf_counter() - start:.1f} | | | | |\n")
    for shape in ((24, 72, 56), (80, 200, 14)):
        init = -(-shape[1] // 2)
        for config in triton_ghost.candidate_configs(shape[0], init, torch.float16, True):
            emit(row(f"forward candidate {shape_name(*shape)}", config,
                     *compile_forward(*shape, config, arch=args.arch)))
    config = triton_ghost.heuristic_config(16, 8, torch.float64, False)
    emit(row("forward 16->16@56 float64", config, *compile_forward(16, 16, 56, config, torch.float64, args.arch)))
    config = triton_ghost.heuristic_config(24, 24, torch.float16, False)
    emit(row("forward 24->36@28 ratio 3 float16", config,
             *compile_forward(24, 36, 28, config, arch=args.arch, ratio=3)))
    emit(row("forward 24->36@28 float16 NCHW", config,
             *compile_forward(24, 36, 28, config, arch=args.arch, channels_last=False)))
    emit(row("forward 24->36@28 float16 gated", config,
             *compile_forward(24, 36, 28, config, arch=args.arch, gated=True)))
    for inp, oup, size in ((16, 48, 112), (112, 672, 14)):  # GhostNetV2's gated ghost1s on the library route
        config = dict(triton_ghost.heuristic_config(inp, oup // 2, torch.float16, True), primary="library")
        emit(row(f"forward {shape_name(inp, oup, size)} float16 gated (library)", config,
                 *compile_forward(inp, oup, size, config, arch=args.arch, gated=True)))
    emit(row("forward 24->36@28 float16 scaled (SE gate)", config,
             *compile_forward(24, 36, 28, config, arch=args.arch, scaled=True)))
    emit(row("forward 24->36@28 float16 scaled + residual", config,
             *compile_forward(24, 36, 28, config, arch=args.arch, relu=False, scaled=True, residual=True)))
    for inp, oup, size in ((72, 24, 56), (672, 112, 14), (960, 160, 7)):  # GhostNet 1.0x ghost2s with a shortcut
        config = triton_ghost.heuristic_config(inp, -(-oup // 2), torch.float16, True)
        emit(row(f"forward {shape_name(inp, oup, size)} float16 none + residual", config,
                 *compile_forward(inp, oup, size, config, arch=args.arch, relu=False, residual=True)))
    for inp, oup, size in ((16, 48, 112), (40, 240, 28)):  # GhostNet 1.0x's ghost1s before a 3 x 3 stride-2 conv
        emit(row(f"ghost_depthwise {shape_name(inp, oup, size)} float16 (rows)",
                 triton_ghost.rows_launch((size - 1) // 2 + 1), *compile_ghost_depthwise(inp, oup, size, arch=args.arch)))
    emit(row("ghost_depthwise 40->240@28 float64 (rows)", triton_ghost.rows_launch(14),
             *compile_ghost_depthwise(40, 240, 28, torch.float64, args.arch)))
    for conv in DIRECT_CONVS:
        emit(row(f"direct_conv {direct_conv_name(*conv)} float16 relu", None,
                 *compile_direct_conv(*conv, arch=args.arch)))
    emit(row(f"direct_conv {direct_conv_name(*DIRECT_CONVS[1])} float64 relu", None,
             *compile_direct_conv(*DIRECT_CONVS[1], dtype=torch.float64, arch=args.arch)))
    for inp, oup, size in GHOSTNET_SHAPES:
        emit(row(f"backward {shape_name(inp, oup, size)} float16 (rows)", triton_ghost.rows_launch(size),
                 *compile_backward(torch.float16, args.arch, oup=oup, size=size)))
    for dtype in (torch.float16, torch.float64):
        backward_config = {"tile_pixels": 128, "block_c": triton_ghost.BACKWARD_BLOCK_C}
        emit(row(f"backward 80->200@14 {str(dtype)[6:]} (rows)", triton_ghost.rows_launch(14),
                 *compile_backward(dtype, args.arch)))
        emit(row(f"backward 80->200@14 {str(dtype)[6:]} dw 5 (tap loop)", backward_config,
                 *compile_backward(dtype, args.arch, dw=5)))
        emit(row(f"cheap_mix {str(dtype)[6:]}", None, *compile_cheap_mix(dtype, args.arch)))
        emit(row(f"squeeze_excite_gate 960/240@7 {str(dtype)[6:]}", None, *compile_squeeze_excite(dtype, args.arch)))
        for name in TRAIN_KERNELS:
            emit(row(f"train {name} 40->120@28 {str(dtype)[6:]}", {"block": triton_ghost_train.BLOCK},
                     *compile_train(name, dtype, args.arch)))
    with open(args.out, "w") as f:
        f.writelines(lines)


if __name__ == "__main__":
    main()
