"""Triton kernels for the fused Ghost op (GPU; on the CPU under TRITON_INTERPRET=1).

Forward: one program per (2-D tile of output pixels of one image, block of intrinsic
channels), the channel block varying fastest so that the programs reading the same x tile run
together (x comes from HBM about once, from L2 for the other channel blocks). The program
computes x1 = act(W1 x + b1) with tl.dot on the tile plus its dw//2 halo (clipped to the
image), keeps it in registers, writes the tile's own x1 to out[:, :init], then forms the
depthwise op from x1 itself: each tap is a tl.gather of x1 at the shifted pixel (on the GPU,
through shared memory). x1 never leaves the SM; each output element is written once. The halo
is recomputed: the tiles are chosen to keep the computed pixels within ~1.3x of the written
ones for dw 3 (`tiling`). Ghost channels the slice drops are never computed.

Two other sources of x1 use the same kernel (PRIMARY_DOT=False, x1 loaded, activated on load):
a k x k primary conv (the library conv makes z1) and, for wide inputs, a library GEMM that
writes z1 straight into out[..., :init] of the channels_last output (x1 then read back from
L2 and rewritten activated: relu(relu(v)) = relu(v), so a neighbour's halo read sees a right
value before or after). Which primary runs, and the block sizes, come from a table tuned on a
GPU (triton_tuned.json, `bench/gpu_report.py --tune`), else a heuristic; with
GHOSTKERNELS_AUTOTUNE=1 new shapes are timed on first use and cached on disk.

Backward: one kernel per (tile of output pixels, block of intrinsic channels) computes the
activation masks from the saved output, the depthwise transpose, grad of the primary conv's
pre-activation (gz1), and per-tile partial sums of the depthwise weight and both bias grads
(summed afterwards in a fixed order: deterministic). The primary conv's grads (x, W1) are
one library convolution backward on gz1.

Accumulation is float32 (float64 for float64 inputs, whose products are FMA loops: tl.dot has
no float64 on NVIDIA GPUs). Float32 dots run as TF32 by default (GHOSTKERNELS_TF32=0 asks for
IEEE float32).
"""

import functools
import json
import os
import struct

import torch
import triton
import triton.language as tl

from .reference import output_memory_format

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Read once, when the first CUDA call imports this module: a per-call environment read costs 1-3 us.
TF32 = os.environ.get("GHOSTKERNELS_TF32", "1") == "1"


@triton.jit
def _activate(v, RELU: tl.constexpr):
    if RELU:  # NaN stays NaN, as with torch.relu (the default, maxnum, returns 0 for it)
        v = tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL)
    return v


@triton.jit
def dot_accumulate(a, b, acc, FMA: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """acc + a @ b: tl.dot, or a broadcast multiply-sum where tl.dot has no such dtype (float64)."""
    if FMA:
        return acc + tl.sum(a.to(acc.dtype)[:, :, None] * b.to(acc.dtype)[None, :, :], axis=1)
    if UPCAST_DOT:  # the interpreter's bfloat16 dot is wrong (Triton 3.9); float32 is exact
        a, b = a.to(acc.dtype), b.to(acc.dtype)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def _gate(gate_ptr, n, channel, h, w, mask, GH, GW, scale_h, scale_w, sgn, sgc, sgh, sgw, ACC: tl.constexpr):
    """sigmoid(gate logits) at output pixels (h, w), nearest-upsampled as F.interpolate does it
    (float scale, floor, clamp)."""
    hs = tl.minimum((tl.maximum(h, 0).to(tl.float32) * scale_h).to(tl.int32), GH - 1)
    ws = tl.minimum((tl.maximum(w, 0).to(tl.float32) * scale_w).to(tl.int32), GW - 1)
    logits = tl.load(gate_ptr + n * sgn + channel[None, :] * sgc + hs[:, None] * sgh + ws[:, None] * sgw, mask=mask,
                     other=0.0).to(ACC)
    return 1.0 / (1.0 + tl.exp(-logits))


# Shape arguments are not specialised (a new GhostNet layer must not mean a new compile);
# strides are, since their divisibility by 16 is what lets loads and stores vectorise.
@triton.jit(do_not_specialize=["INP", "HO", "WO", "INIT", "KEEP", "COPIES", "STRIDE", "GH", "GW", "TH", "TW",
                               "tiles_h", "tiles_w", "channel_blocks"])
def _ghost_forward_kernel(
    x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, gate_ptr, out_ptr,
    INP, HO, WO, INIT, KEEP, COPIES, STRIDE,
    sxn, sxc, sxh, sxw, son, soc, soh, sow,
    GH, GW, scale_h, scale_w, sgn, sgc, sgh, sgw,
    TH, TW, tiles_h, tiles_w, channel_blocks,
    DW: tl.constexpr, PRIMARY_DOT: tl.constexpr, STORE_X1: tl.constexpr,
    HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, RELU: tl.constexpr, GATED: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
    FMA: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    PAD: tl.constexpr = DW // 2
    program = tl.program_id(0)
    c = program % channel_blocks * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < INIT
    tile = program // channel_blocks
    n = tile // (tiles_h * tiles_w)
    h0 = tile // tiles_w % tiles_h * TH
    w0 = tile % tiles_w * TW
    # The local grid: the tile and its halo, clipped to the image, flattened row-major.
    top = tl.maximum(h0 - PAD, 0)
    left = tl.maximum(w0 - PAD, 0)
    grid_w = tl.minimum(w0 + TW + PAD, WO) - left
    grid_pixels = (tl.minimum(h0 + TH + PAD, HO) - top) * grid_w
    q = tl.arange(0, BLOCK_H)
    h = top + q // grid_w
    w = left + q % grid_w
    in_grid = q < grid_pixels
    own = in_grid & (h >= h0) & (h < h0 + TH) & (w >= w0) & (w < w0 + TW)

    if PRIMARY_DOT:
        acc = tl.zeros([BLOCK_H, BLOCK_C], dtype=ACC)
        x_rows = x_ptr + n * sxn + (h * STRIDE)[:, None] * sxh + (w * STRIDE)[:, None] * sxw
        for k0 in range(0, INP, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            xk = tl.load(x_rows + k[None, :] * sxc, mask=in_grid[:, None] & (k < INP)[None, :], other=0.0)
            wk = tl.load(w1_ptr + c[None, :] * INP + k[:, None], mask=c_ok[None, :] & (k < INP)[:, None], other=0.0)
            acc = dot_accumulate(xk, wk, acc, FMA, INPUT_PRECISION, UPCAST_DOT)
        if HAS_B1:
            acc += tl.load(b1_ptr + c, mask=c_ok, other=0.0).to(ACC)[None, :]
    else:  # z1 (bias included) from the library: x_ptr is (N, INIT, HO, WO), maybe out itself
        acc = tl.load(x_ptr + n * sxn + c[None, :] * sxc + h[:, None] * sxh + w[:, None] * sxw,
                      mask=in_grid[:, None] & c_ok[None, :], other=0.0).to(ACC)
    # x1 as the reference has it, rounded to the output dtype: the depthwise op reads that.
    x1 = _activate(acc, RELU).to(out_ptr.dtype.element_ty)
    own_mask = own[:, None] & c_ok[None, :]
    if STORE_X1:
        if GATED:
            gated = x1.to(ACC) * _gate(gate_ptr, n, c, h, w, own_mask, GH, GW, scale_h, scale_w,
                                       sgn, sgc, sgh, sgw, ACC)
            tl.store(out_ptr + n * son + c[None, :] * soc + h[:, None] * soh + w[:, None] * sow,
                     gated.to(out_ptr.dtype.element_ty), mask=own_mask)
        else:
            tl.store(out_ptr + n * son + c[None, :] * soc + h[:, None] * soh + w[:, None] * sow, x1, mask=own_mask)

    for copy in range(COPIES):
        j = c * COPIES + copy
        j_ok = c_ok & (j < KEEP)
        if HAS_B2:
            acc = tl.zeros([BLOCK_H, BLOCK_C], dtype=ACC) + tl.load(b2_ptr + j, mask=j_ok, other=0.0).to(ACC)[None, :]
        else:
            acc = tl.zeros([BLOCK_H, BLOCK_C], dtype=ACC)
        for dy in tl.static_range(DW):
            for dx in tl.static_range(DW):
                wt = tl.load(w2_ptr + j * DW * DW + dy * DW + dx, mask=j_ok, other=0.0).to(ACC)
                if DW == 1:
                    v = x1.to(ACC)
                else:
                    hs = h + dy - PAD
                    ws = w + dx - PAD
                    tap_ok = own & (hs >= 0) & (hs < HO) & (ws >= 0) & (ws < WO)
                    # an own pixel's tap inside the image lies in the grid; other lanes read their own pixel
                    source = tl.where(tap_ok, q + (dy - PAD) * grid_w + (dx - PAD), q)
                    v = tl.gather(x1, tl.broadcast_to(source[:, None], (BLOCK_H, BLOCK_C)), axis=0)
                    v = tl.where(tap_ok[:, None], v.to(ACC), 0.0)
                acc += v * wt[None, :]
        acc = _activate(acc, RELU)
        ghost_mask = own[:, None] & j_ok[None, :]
        if GATED:
            acc *= _gate(gate_ptr, n, INIT + j, h, w, ghost_mask, GH, GW, scale_h, scale_w, sgn, sgc, sgh, sgw, ACC)
        tl.store(out_ptr + n * son + (INIT + j)[None, :] * soc + h[:, None] * soh + w[:, None] * sow,
                 acc.to(out_ptr.dtype.element_ty), mask=ghost_mask)

@triton.jit(do_not_specialize=["HO", "WO", "INIT", "KEEP", "GHOSTS", "COPIES", "TH", "TW", "tiles_h", "tiles_w"])
def _ghost_backward_kernel(
    grad_ptr, out_ptr, w2_ptr, gz1_ptr, gw2_part_ptr, gb1_part_ptr, gb2_part_ptr,
    HO, WO, INIT, KEEP, GHOSTS, COPIES,
    sgn, sgc, sgh, sgw, son, soc, soh, sow, szn, szc, szh, szw,
    TH, TW, tiles_h, tiles_w,
    DW: tl.constexpr, RELU: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    PAD: tl.constexpr = DW // 2
    tile = tl.program_id(0)
    n = tile // (tiles_h * tiles_w)
    h0 = tile // tiles_w % tiles_h * TH
    w0 = tile % tiles_w * TW
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < INIT
    p = tl.arange(0, BLOCK_P)
    h = h0 + p // TW
    w = w0 + p % TW
    p_ok = (p < TH * TW) & (h < HO) & (w < WO)
    here = p_ok[:, None] & c_ok[None, :]
    y1 = tl.load(out_ptr + n * son + c[None, :] * soc + h[:, None] * soh + w[:, None] * sow, mask=here, other=0.0)
    gy1 = tl.load(grad_ptr + n * sgn + c[None, :] * sgc + h[:, None] * sgh + w[:, None] * sgw, mask=here,
                  other=0.0).to(ACC)
    for copy in range(COPIES):
        j = c * COPIES + copy
        j_ok = c_ok & (j < KEEP)
        ghost = (INIT + j)[None, :]
        # grad of z2 at this tile's pixels: the depthwise bias grad and the weight grads' left factor
        g2 = tl.load(grad_ptr + n * sgn + ghost * sgc + h[:, None] * sgh + w[:, None] * sgw,
                     mask=p_ok[:, None] & j_ok[None, :], other=0.0).to(ACC)
        if RELU:
            y2 = tl.load(out_ptr + n * son + ghost * soc + h[:, None] * soh + w[:, None] * sow,
                         mask=p_ok[:, None] & j_ok[None, :], other=0.0)
            g2 = tl.where(y2 <= 0, 0.0, g2)  # ReLU's mask as torch's: the grad passes where y2 is NaN
        tl.store(gb2_part_ptr + tile * GHOSTS + j, tl.sum(g2, axis=0), mask=j_ok)
        for dy in tl.static_range(DW):
            for dx in tl.static_range(DW):
                wt = tl.load(w2_ptr + j * DW * DW + dy * DW + dx, mask=j_ok, other=0.0).to(ACC)
                # adjoint of the depthwise conv: grad of x1 here gathers grad of z2 at (h - sy, w - sx)
                ha = h - (dy - PAD)
                wa = w - (dx - PAD)
                a_ok = p_ok & (ha >= 0) & (ha < HO) & (wa >= 0) & (wa < WO)
                a_mask = a_ok[:, None] & j_ok[None, :]
                ga = tl.load(grad_ptr + n * sgn + ghost * sgc + ha[:, None] * sgh + wa[:, None] * sgw, mask=a_mask,
                             other=0.0).to(ACC)
                if RELU:
                    ya = tl.load(out_ptr + n * son + ghost * soc + ha[:, None] * soh + wa[:, None] * sow,
                                 mask=a_mask, other=0.0)
                    ga = tl.where(ya <= 0, 0.0, ga)
                gy1 += ga * wt[None, :]
                # depthwise weight grad: grad of z2 here times x1 at (h + sy, w + sx)
                hb = h + dy - PAD
                wb = w + dx - PAD
                b_ok = p_ok & (hb >= 0) & (hb < HO) & (wb >= 0) & (wb < WO)
                yb = tl.load(out_ptr + n * son + c[None, :] * soc + hb[:, None] * soh + wb[:, None] * sow,
                             mask=b_ok[:, None] & c_ok[None, :], other=0.0).to(ACC)
                tl.store(gw2_part_ptr + (tile * GHOSTS + j) * DW * DW + dy * DW + dx, tl.sum(g2 * yb, axis=0),
                         mask=j_ok)
    if RELU:
        gy1 = tl.where(y1 <= 0, 0.0, gy1)
    tl.store(gb1_part_ptr + tile * INIT + c, tl.sum(gy1, axis=0), mask=c_ok)
    tl.store(gz1_ptr + n * szn + c[None, :] * szc + h[:, None] * szh + w[:, None] * szw,
             gy1.to(gz1_ptr.dtype.element_ty), mask=here)


# -- launch plans: block sizes, tiles, which primary --------------------------------------


def _input_precision(dtype):
    if dtype == torch.float32 and TF32:
        return "tf32"
    return "ieee"


def _accumulator(dtype):
    """float32 accumulation for 16- and 32-bit inputs, float64 for float64."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def _cdiv(a, b):
    """triton.cdiv without its cost: it is a JIT function, 5 us a call from Python."""
    return -(-a // b)


def _block(n, low, high):
    return max(low, min(high, triton.next_power_of_2(max(int(n), 1))))


@functools.lru_cache(maxsize=None)
def tiling(height, width, dw, block_h):
    """(tiles per image, tile rows, tile columns): the output tiles whose halo grid (the tile
    and dw // 2 pixels around it, clipped to the image) fits block_h pixels, fewest tiles
    first, then the widest (coalesced rows). None if not even one pixel and its halo fit."""
    pad = dw // 2
    best = None
    for tile_w in range(1, width + 1):
        rows = block_h // min(tile_w + 2 * pad, width)
        tile_h = height if height <= rows else rows - 2 * pad
        if tile_h < 1:
            break
        tiles = _cdiv(height, tile_h) * _cdiv(width, tile_w)
        if best is None or tiles <= best[0]:
            best = (tiles, tile_h, tile_w)
    return best


def heuristic_config(inp, init, height, width, dw, dtype, library_ok):
    """Block sizes and primary for a shape no tuned table covers: the grid size with the least
    computed-but-not-written pixels, 32 channels a program (16 for narrow modules), the library
    GEMM for wide inputs (inp >= 480, where x1's extra trip through L2 is small next to x)."""
    float64 = dtype == torch.float64
    candidates = [b for b in ((64,) if float64 else (64, 128, 256)) if tiling(height, width, dw, b)]
    block_h = min(candidates, key=lambda b: (tiling(height, width, dw, b)[0] * b, -b))
    block_c = 16 if float64 or init <= 16 else 32
    return {
        "block_h": block_h, "block_c": block_c, "block_k": 4 if float64 else 32,
        "num_warps": 8 if block_h * block_c >= 8192 else 4, "num_stages": 2,
        "primary": "library" if library_ok and inp >= 480 else "kernel",
    }


def candidate_configs(inp, init, height, width, dw, dtype, library_ok):
    """What GHOSTKERNELS_AUTOTUNE=1 and `bench/gpu_report.py --tune` time for a shape."""
    heuristic = heuristic_config(inp, init, height, width, dw, dtype, library_ok)
    if dtype == torch.float64:
        return [heuristic]
    configs = []
    for block_h in (64, 128, 256):
        if tiling(height, width, dw, block_h) is None:
            continue
        for block_c in (16, 32, 64):
            if block_c > _block(init, 16, 64) or block_h * block_c > 256 * 32:
                continue
            for num_warps in (4, 8):
                for primary in ("kernel", "library") if library_ok else ("kernel",):
                    configs.append(dict(heuristic, block_h=block_h, block_c=block_c, num_warps=num_warps,
                                        primary=primary))
    return configs


_TUNED_TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "triton_tuned.json")


def _autotune_cache_file():
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "ghostkernels", "triton-autotune.json")


@functools.lru_cache(maxsize=None)
def _tuned_configs(device_name):
    """{shape key: config} for this GPU: the committed table, then this machine's autotune cache."""
    configs = {}
    for path in (_TUNED_TABLE, _autotune_cache_file()):
        if os.path.exists(path):
            with open(path) as f:
                configs.update(json.load(f).get(device_name, {}))
    return configs


def _save_autotuned(device_name, key, config):
    path = _autotune_cache_file()
    table = {}
    if os.path.exists(path):
        with open(path) as f:
            table = json.load(f)
    table.setdefault(device_name, {})[key] = config
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)
    _tuned_configs(device_name)[key] = config


@functools.lru_cache(maxsize=None)
def _device_name(index):
    return torch.cuda.get_device_name(index)


def shape_key(inp, init, ghosts, out_channels, height, width, kernel, dw, stride, dtype, channels_last, gated):
    """The tuned table's key of a forward (the batch is left out: one table serves all)."""
    layout = "cl" if channels_last else "nchw"
    return (f"{inp}-{init}-{ghosts}-{out_channels}-{height}x{width}-k{kernel}-d{dw}-s{stride}-"
            f"{str(dtype).removeprefix('torch.')}-{layout}{'-gated' if gated else ''}")


@functools.lru_cache(maxsize=None)
def _nearest_scale(source, size):
    """float32(source) / size rounded once to float32, the scale F.interpolate's nearest mode
    uses (the float64 quotient of two integers < 2**24 rounds to the same float32)."""
    return struct.unpack("f", struct.pack("f", source / size))[0]


def _library_primary_into(x, primary_weight, primary_bias, out):
    """z1 = W1 x + b1 by the library GEMM, written into out[..., :init] of the channels_last
    output in place (leading dimension out_channels)."""
    init, inp = primary_weight.shape[:2]
    rows = out.permute(0, 2, 3, 1).view(-1, out.shape[1])[:, :init]
    x_rows = x.permute(0, 2, 3, 1).view(-1, inp)
    weight = primary_weight.view(init, inp).t()
    if primary_bias is None:
        torch.mm(x_rows, weight, out=rows)
    else:
        torch.addmm(primary_bias, x_rows, weight, out=rows)


# (device, shape) -> the config chosen at its first call: later calls cost a dict lookup.
_chosen_configs = {}


def forward(x, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride, activation,
            gate=None, config=None):
    """Launch the fused forward; arguments already checked (ops.check_args, ops.check_gate).
    gate: optional attention logits (N, out_channels, h, w), applied as sigmoid, nearest-upsampled.
    config: block sizes and primary (heuristic_config's keys) to use instead of the tuned table's."""
    batch, inp, in_h, in_w = x.shape
    init, ghosts = primary_weight.shape[0], cheap_weight.shape[0]
    kernel, dw = primary_weight.shape[-1], cheap_weight.shape[-1]
    height, width = (in_h - 1) // stride + 1, (in_w - 1) // stride + 1
    out = torch.empty((batch, out_channels, height, width), dtype=x.dtype, device=x.device,
                      memory_format=output_memory_format(x))
    if out.numel() == 0:
        return out
    primary_weight, cheap_weight = primary_weight.contiguous(), cheap_weight.contiguous()
    gated = gate is not None
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and out.is_contiguous(
        memory_format=torch.channels_last)
    library_ok = kernel == 1 and stride == 1 and channels_last and not gated
    run = functools.partial(_launch, x, primary_weight, primary_bias, cheap_weight, cheap_bias, out, activation,
                            stride, gate)
    if config is None:
        shape = (inp, init, ghosts, out_channels, height, width, kernel, dw, stride, x.dtype, channels_last, gated)
        config = _chosen_configs.get((x.device, shape))
        if config is None:
            config = _chosen_configs[(x.device, shape)] = _choose_config(x.device, shape, library_ok, run)
    elif config["primary"] == "library" and not library_ok:
        raise ValueError("triton_ghost.forward: the library primary needs a 1x1, stride-1 primary conv, "
                         "channels_last x and no gate")
    run(config)
    return out


def _choose_config(device, shape, library_ok, run):
    """The tuned table's config for this GPU and shape; else, with GHOSTKERNELS_AUTOTUNE=1, the
    fastest candidate, timed now and cached on disk; else the heuristic."""
    inp, init, _, _, height, width, _, dw, _, dtype = shape[:10]
    heuristic = heuristic_config(inp, init, height, width, dw, dtype, library_ok)
    if device.type != "cuda":
        return heuristic
    device_name = _device_name(device.index if device.index is not None else torch.cuda.current_device())
    key = shape_key(*shape)
    tuned = _tuned_configs(device_name).get(key)
    if tuned is not None:
        return tuned
    if os.environ.get("GHOSTKERNELS_AUTOTUNE") != "1":
        return heuristic
    timed = []
    for config in candidate_configs(inp, init, height, width, dw, dtype, library_ok):
        try:
            timed.append((triton.testing.do_bench(lambda: run(config), warmup=5, rep=25, return_mode="median"),
                          config))
        except triton.runtime.errors.OutOfResources:  # shared memory or registers: not a candidate
            continue
    best = min(timed, key=lambda t: t[0])[1]
    _save_autotuned(device_name, key, best)
    return best


def _launch(x, primary_weight, primary_bias, cheap_weight, cheap_bias, out, activation, stride, gate, config):
    batch, inp = x.shape[:2]
    init, ghosts = primary_weight.shape[0], cheap_weight.shape[0]
    kernel, dw = primary_weight.shape[-1], cheap_weight.shape[-1]
    out_channels, height, width = out.shape[1:]
    relu = activation == "relu"
    gated = gate is not None
    primary_dot, store_x1 = True, True
    source = x
    if kernel > 1:  # the library conv makes z1; the kernel activates, stores and uses it
        source = torch.nn.functional.conv2d(x, primary_weight, primary_bias, stride, kernel // 2)
        primary_dot = False
    elif config["primary"] == "library":
        _library_primary_into(x, primary_weight, primary_bias, out)
        source = out
        primary_dot, store_x1 = False, relu  # rewritten only to activate it
    tiles, tile_h, tile_w = tiling(height, width, dw, config["block_h"])
    channel_blocks = _cdiv(init, config["block_c"])
    gate = gate if gated else out  # unread placeholder
    _ghost_forward_kernel[(batch * tiles * channel_blocks,)](
        source, primary_weight, primary_bias if primary_bias is not None else source,
        cheap_weight, cheap_bias if cheap_bias is not None else source, gate, out,
        inp, height, width, init, out_channels - init, ghosts // init, stride,
        *source.stride(), *out.stride(),
        *gate.shape[2:], _nearest_scale(gate.shape[2], height), _nearest_scale(gate.shape[3], width), *gate.stride(),
        tile_h, tile_w, _cdiv(height, tile_h), _cdiv(width, tile_w), channel_blocks,
        DW=dw, PRIMARY_DOT=primary_dot, STORE_X1=store_x1,
        HAS_B1=primary_bias is not None, HAS_B2=cheap_bias is not None, RELU=relu, GATED=gated,
        BLOCK_H=config["block_h"], BLOCK_K=config["block_k"], BLOCK_C=config["block_c"],
        FMA=x.dtype == torch.float64, INPUT_PRECISION=_input_precision(x.dtype), ACC=_accumulator(x.dtype),
        UPCAST_DOT=INTERPRET and x.dtype == torch.bfloat16,
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )


def backward(grad, out, x, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride, activation,
             tile_pixels=256):
    """Grads of (x, W1, b1, W2, b2); zeros for absent biases. tile_pixels: a power of two."""
    batch = x.shape[0]
    init, ghosts = primary_weight.shape[0], cheap_weight.shape[0]
    kernel, dw = primary_weight.shape[-1], cheap_weight.shape[-1]
    height, width = out.shape[2:]
    grad = grad.contiguous(memory_format=output_memory_format(out))
    grad_z1 = torch.empty((batch, init, height, width), dtype=x.dtype, device=x.device,
                          memory_format=output_memory_format(out))
    block_p = min(tile_pixels, _block(width * height, 16, tile_pixels))
    tile_w = min(width, block_p)
    tile_h = max(1, min(height, block_p // tile_w))
    tiles_h, tiles_w = _cdiv(height, tile_h), _cdiv(width, tile_w)
    tiles = batch * tiles_h * tiles_w
    block_c = _block(init, 16, 32)
    partial = dict(dtype=torch.float64 if x.dtype == torch.float64 else torch.float32, device=x.device)
    gw2_part = torch.zeros((tiles, ghosts, dw * dw), **partial)
    gb1_part = torch.zeros((tiles, init), **partial)
    gb2_part = torch.zeros((tiles, ghosts), **partial)
    if tiles > 0:
        _ghost_backward_kernel[(tiles, _cdiv(init, block_c))](
            grad, out, cheap_weight, grad_z1, gw2_part, gb1_part, gb2_part,
            height, width, init, out_channels - init, ghosts, ghosts // init,
            *grad.stride(), *out.stride(), *grad_z1.stride(),
            tile_h, tile_w, tiles_h, tiles_w,
            DW=dw, RELU=activation == "relu", BLOCK_P=block_p, BLOCK_C=block_c, ACC=_accumulator(x.dtype),
        )
    grad_x, grad_w1, _ = torch.ops.aten.convolution_backward(
        grad_z1, x, primary_weight, None, [stride, stride], [kernel // 2, kernel // 2], [1, 1], False, [0, 0], 1,
        [True, True, False],
    )
    dtype = x.dtype
    return (
        grad_x.contiguous(memory_format=output_memory_format(out)),
        grad_w1.contiguous(),
        gb1_part.sum(0).to(dtype),
        gw2_part.sum(0).view_as(cheap_weight).to(dtype),
        gb2_part.sum(0).to(dtype),
    )
