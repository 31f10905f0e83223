"""Triton kernels for the fused Ghost op (GPU; on the CPU under TRITON_INTERPRET=1).

Forward: one program per (2-D tile of output pixels of one image, block of ghost channels), the
channel block varying fastest so that the programs reading the same x tile run together (x
comes from HBM about once, from L2 for the other channel blocks). For each of the dw x dw taps
the program has x1 = act(W1 x + b1) at the shifted pixels and adds its share of the depthwise
op; the centre tap's x1 is the tile's own and is written to out[:, :init]. x1 comes from one of:
- recomputed per tap (PRIMARY_DOT): a tl.dot of the shifted x tile (L1/L2 hits) with W1. That
  is dw * dw dots and x tile reads, cheap next to the bytes for narrow inputs (inp <= 32:
  GhostNet's 16->16, 16->48, 24->72). x1 never leaves the SM.
- the library (PRIMARY_DOT=False): for large primary convs cuBLAS writes z1 = W1 x (no bias)
  into a channels_last buffer of its own, which the kernel reads back, adding the bias and
  activating as it loads. A k x k primary conv takes this route too, from the library conv's
  output. With a 3 x 3 cheap op (GhostNet's), _ghost_rows3_kernel does this pass
  instead of the tap loop: strips of rows, three loads an x1 row (bench/results/NVIDIA-H200-2026-12-04.md,
  second session: 1.4-2.0x faster than the tap loop at batch 256). (z1 written into out[..., :init]
  itself and rewritten activated in place saved the buffer, but cuBLAS wrote those strided rows
  at half speed on an H200, and addmm put the bias in as a copy of its own.)
Each output element is written once; on the library route z1 is one extra write and read. A
residual (ghost_module_residual: a bottleneck's ghost2 and its shortcut) is added as the kernels
store. ghost_module_depthwise with GhostNet's 3 x 3 stride-2 conv after ghost1 is one more rows
kernel, _ghost_depthwise_rows3_kernel, which feeds the Ghost rows into that conv and never writes
them. A design that kept x1 with its halo in registers and made the taps tl.gather of it spilled
registers in every configuration but the smallest (ptxas for sm_90: 255 registers and 0.3-7 KB
of stack a thread), and was replaced by this one.
Ghost channels the slice drops are never computed. Block sizes and the route come from a table
tuned on a GPU (triton_tuned.json, `bench/gpu_report.py --tune`), else a heuristic; with
GHOSTKERNELS_AUTOTUNE=1 new shapes are timed on first use and cached on disk.

Backward: one kernel per (tile of output pixels, block of intrinsic channels) computes the
activation masks from the saved output, the depthwise transpose, grad of the primary conv's
pre-activation (gz1), and per-tile partial sums of the depthwise weight and both bias grads
(one buffer, summed afterwards in a fixed order: deterministic). With a 3 x 3 cheap op and ratio
2 (GhostNet's) _ghost_backward_rows3_kernel walks strips of rows as _ghost_rows3_kernel does,
three loads a row of each input instead of the tap loop's one a tap. The primary conv's grads
(x, W1) are one library convolution backward on gz1.

Accumulation is float32 (float64 for float64 inputs, whose products are FMA loops: tl.dot has
no float64 on NVIDIA GPUs). Float32 dots run as TF32 where PyTorch's convolutions may
(torch.backends.cudnn.allow_tf32 or, from torch 2.9, cudnn.conv.fp32_precision: on by default),
IEEE float32 otherwise or with GHOSTKERNELS_TF32=0.
"""

import contextlib
import contextvars
import functools
import json
import os

import torch
import triton
import triton.language as tl

from . import _backends
from .reference import nearest_scale, output_memory_format, same_padding

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _activate(v, RELU: tl.constexpr):
    if RELU:  # NaN stays NaN, as with torch.relu (the default, maxnum, returns 0 for it)
        v = tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL)
    return v


@triton.jit
def dot_accumulate(a, b, acc, FMA: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """acc + a @ b: tl.dot, or a broadcast multiply-sum where tl.dot has no such dtype (float64).
    if/else, not an early return: Triton 3.6 compiles the code after a constexpr-true return too,
    and tl.dot rejects the FMA path's small blocks."""
    if FMA:
        acc = acc + tl.sum(a.to(acc.dtype)[:, :, None] * b.to(acc.dtype)[None, :, :], axis=1)
    else:
        if UPCAST_DOT:  # the interpreter's bfloat16 dot is wrong (Triton 3.9); float32 is exact
            a, b = a.to(acc.dtype), b.to(acc.dtype)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _gate(gate_ptr, n, channel, h, w, mask, GH, GW, scale_h, scale_w, sgn, sgc, sgh, sgw, ACC: tl.constexpr):
    """sigmoid(gate logits) at output pixels (h, w), nearest-upsampled as F.interpolate does it
    (float scale, floor, clamp)."""
    hs = tl.minimum((tl.maximum(h, 0).to(tl.float32) * scale_h).to(tl.int32), GH - 1)
    ws = tl.minimum((tl.maximum(w, 0).to(tl.float32) * scale_w).to(tl.int32), GW - 1)
    logits = tl.load(gate_ptr + n * sgn + channel[None, :] * sgc + hs[:, None] * sgh + ws[:, None] * sgw, mask=mask,
                     other=0.0).to(ACC)
    return 1.0 / (1.0 + tl.exp(-logits))


@triton.jit
def _ghost_channels(program, channel_blocks, COPIES, INIT, KEEP, BLOCK_C: tl.constexpr):
    """The program's block of ghost channels j (the block varies fastest over programs), each with
    its intrinsic channel c (ratio > 2: COPIES ghosts of one x1 channel sit side by side); lanes
    with j % COPIES == 0 also write x1 of channel c."""
    j = program % channel_blocks * BLOCK_C + tl.arange(0, BLOCK_C)
    c = j // COPIES
    c_ok = c < INIT
    return j, c, c_ok, c_ok & (j % COPIES == 0), c_ok & (j < KEEP)


# Shape arguments are not specialised (a new GhostNet layer must not mean a new compile). Strides
# and COPIES are: a channel stride or COPIES of 1 makes the channel axis contiguous, and the pixel
# strides come divided by ALIGN (their largest common power-of-two factor up to a 16-byte vector),
# so that loads and stores along channels vectorise even where the channel count is not a multiple of 16.
# INP, INIT, KEEP and W1's row stride come divided by CHANNEL_ALIGN, their common power-of-two
# factor up to a 16-byte vector: the channel masks (k < INP, c < INIT, j < KEEP) are then constant
# over CHANNEL_ALIGN lanes, which vectorised accesses need (with the counts unknown, Triton 3.6-3.9
# emitted 2-byte loads and stores for every access in float16: bench/gpu_compile_check.py's PTX).
@triton.jit(do_not_specialize=["INP", "HO", "WO", "INIT", "KEEP", "STRIDE", "GH", "GW", "TH", "TW",
                               "tiles_h", "tiles_w", "channel_blocks"])
def _ghost_forward_kernel(
    x_ptr, scale_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, gate_ptr, out_ptr, residual_ptr,
    INP, HO, WO, INIT, KEEP, COPIES, STRIDE,
    sxn, sxc, sxh, sxw, sw1, son, soc, soh, sow,
    GH, GW, scale_h, scale_w, sgn, sgc, sgh, sgw,
    TH, TW, tiles_h, tiles_w, channel_blocks,
    DW: tl.constexpr, PRIMARY_DOT: tl.constexpr,
    HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, RELU: tl.constexpr, GATED: tl.constexpr, SCALED: tl.constexpr,
    RESIDUAL: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, ALIGN: tl.constexpr,
    CHANNEL_ALIGN: tl.constexpr,
    FMA: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    PAD: tl.constexpr = DW // 2
    INP, INIT, KEEP, sw1 = INP * CHANNEL_ALIGN, INIT * CHANNEL_ALIGN, KEEP * CHANNEL_ALIGN, sw1 * CHANNEL_ALIGN
    sxn, sxh, sxw = sxn * ALIGN, sxh * ALIGN, sxw * ALIGN
    son, soh, sow = son * ALIGN, soh * ALIGN, sow * ALIGN
    program = tl.program_id(0)
    j, c, c_ok, writes_x1, writes_ghost = _ghost_channels(program, channel_blocks, COPIES, INIT, KEEP, BLOCK_C)
    tile = program // channel_blocks
    n = tile // (tiles_h * tiles_w)
    p = tl.arange(0, BLOCK_P)
    h = tile // tiles_w % tiles_h * TH + p // TW
    w = tile % tiles_w * TW + p % TW
    own = (p < TH * TW) & (h < HO) & (w < WO)

    if HAS_B2:
        b2 = tl.load(b2_ptr + j, mask=writes_ghost, other=0.0).to(ACC)
        acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC) + b2[None, :]
    else:
        acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
    if HAS_B1:
        b1 = tl.load(b1_ptr + c, mask=c_ok, other=0.0).to(ACC)
    # A runtime loop over the taps: unrolled, the compiler hoists every tap's loads at once and
    # spills registers (bench/gpu_compile_check.py); unrolled by 3 it ran slower on an H200, by 2
    # or 9 Triton 3.6 failed to compile it (bench/results/NVIDIA-H200-2026-12-04.md, 'probe').
    for tap in range(DW * DW):
        dy = tap // DW
        dx = tap % DW
        hs = h + dy - PAD
        ws = w + dx - PAD
        tap_ok = own & (hs >= 0) & (hs < HO) & (ws >= 0) & (ws < WO)
        # x1 at the tap's pixels: recomputed from x (tl.dot over inp; the x tile of a shifted tap
        # comes from L1/L2), or read from the library's z1
        if PRIMARY_DOT:
            z = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
            x_rows = x_ptr + n * sxn + (hs * STRIDE)[:, None] * sxh + (ws * STRIDE)[:, None] * sxw
            for k0 in range(0, INP, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                xk = tl.load(x_rows + k[None, :] * sxc, mask=tap_ok[:, None] & (k < INP)[None, :], other=0.0)
                if SCALED:  # the SE gate of ghost_module_scaled: x * scale[n], rounded as the product would be
                    gate_k = tl.load(scale_ptr + n * INP + k, mask=k < INP, other=0.0)
                    xk = (xk.to(ACC) * gate_k.to(ACC)[None, :]).to(xk.dtype)
                wk = tl.load(w1_ptr + c[None, :] * sw1 + k[:, None], mask=c_ok[None, :] & (k < INP)[:, None],
                             other=0.0)
                z = dot_accumulate(xk, wk, z, FMA, INPUT_PRECISION, UPCAST_DOT)
        else:  # x_ptr is z1 (N, INIT, HO, WO) without the bias, from the library
            z = tl.load(x_ptr + n * sxn + c[None, :] * sxc + hs[:, None] * sxh + ws[:, None] * sxw,
                        mask=tap_ok[:, None] & c_ok[None, :], other=0.0).to(ACC)
        if HAS_B1:
            z += b1[None, :]
        # x1 as the reference has it, rounded to the output dtype: the depthwise op reads that
        x1 = _activate(z, RELU).to(out_ptr.dtype.element_ty)
        if tap == PAD * DW + PAD:  # the centre tap is the tile's own x1
            x1_mask = own[:, None] & writes_x1[None, :]
            x1_at = n * son + c[None, :] * soc + h[:, None] * soh + w[:, None] * sow
            x1_value = x1
            if GATED:
                x1_value = x1.to(ACC) * _gate(gate_ptr, n, c, h, w, x1_mask, GH, GW, scale_h, scale_w,
                                              sgn, sgc, sgh, sgw, ACC)
            _store_output(out_ptr, residual_ptr, x1_at, x1_value, x1_mask, RESIDUAL, ACC)
        weight = tl.load(w2_ptr + j * DW * DW + tap, mask=writes_ghost, other=0.0).to(ACC)
        acc += tl.where(tap_ok[:, None], x1.to(ACC), 0.0) * weight[None, :]
    acc = _activate(acc, RELU)
    ghost_mask = own[:, None] & writes_ghost[None, :]
    if GATED:
        acc *= _gate(gate_ptr, n, INIT + j, h, w, ghost_mask, GH, GW, scale_h, scale_w, sgn, sgc, sgh, sgw, ACC)
    # at out_ptr + INIT channels: aligned to CHANNEL_ALIGN elements where the channels are contiguous
    _store_output(out_ptr, residual_ptr, (INIT + j[None, :]) * soc + n * son + h[:, None] * soh + w[:, None] * sow,
                  acc, ghost_mask, RESIDUAL, ACC)


@triton.jit
def _store_output(out_ptr, residual_ptr, at, value, mask, RESIDUAL: tl.constexpr, ACC: tl.constexpr):
    """value rounded to out's dtype, stored at out_ptr + at; with RESIDUAL the residual at the same
    offsets added to that and rounded again: what out.add_(residual) after the op gives
    (ghost_module_residual; the residual has out's strides)."""
    value = value.to(out_ptr.dtype.element_ty)
    if RESIDUAL:
        residual = tl.load(residual_ptr + at, mask=mask, other=0.0)
        value = (value.to(ACC) + residual.to(ACC)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + at, value, mask=mask)


# The library route's pass for a 3 x 3 cheap op (GhostNet's): one program per (image, strip of ROWS
# output rows, BLOCK_W columns, BLOCK_C ghost channels) walks down its strip one x1 row at a time:
# three loads a row (columns shifted by -1, 0, +1; the shifted ones mostly L1 hits), whose three
# weight rows go to the output rows below, at and above it; two partial rows ride in registers to
# the next step. The tap loop above loads every x1 nine times and waits on each load in turn
# (H200, 16->48@112 batch 256 float16: 0.47 ms for that pass, 0.16 ms with a 1 x 1 cheap op).
@triton.jit(do_not_specialize=["HO", "WO", "INIT", "KEEP", "ROWS", "row_blocks", "column_blocks",
                               "channel_blocks"])
def _ghost_rows3_kernel(
    z1_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr, residual_ptr, gate_ptr,
    HO, WO, INIT, KEEP, COPIES,
    szn, szc, szh, szw, son, soc, soh, sow,
    GH, GW, scale_h, scale_w, sgn, sgc, sgh, sgw,
    ROWS, row_blocks, column_blocks, channel_blocks,
    HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, RELU: tl.constexpr, RESIDUAL: tl.constexpr, GATED: tl.constexpr,
    BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, ALIGN: tl.constexpr, CHANNEL_ALIGN: tl.constexpr,
    ACC: tl.constexpr,
):
    INIT, KEEP = INIT * CHANNEL_ALIGN, KEEP * CHANNEL_ALIGN
    szn, szh, szw = szn * ALIGN, szh * ALIGN, szw * ALIGN
    son, soh, sow = son * ALIGN, soh * ALIGN, sow * ALIGN
    program = tl.program_id(0)
    j, c, c_ok, writes_x1, writes_ghost = _ghost_channels(program, channel_blocks, COPIES, INIT, KEEP, BLOCK_C)
    tile = program // channel_blocks
    n, first, last, w, w_ok, left, right = _strip(tile, row_blocks, column_blocks, ROWS, HO, WO, BLOCK_W)
    bias = _channel_bias(b1_ptr, c, c_ok, HAS_B1, BLOCK_C, ACC)
    ghost_bias = _channel_bias(b2_ptr, j, writes_ghost, HAS_B2, BLOCK_C, ACC)
    # the 3 x 3 weights of the block's ghost channels, w<dy><dx>
    w00, w01, w02 = _taps(w2_ptr, j, 0, writes_ghost, ACC)
    w10, w11, w12 = _taps(w2_ptr, j, 1, writes_ghost, ACC)
    w20, w21, w22 = _taps(w2_ptr, j, 2, writes_ghost, ACC)
    z1 = z1_ptr + n * szn + c[None, :] * szc + w[:, None] * szw
    x1_at = n * son + c[None, :] * soc + w[:, None] * sow
    ghost_at = n * son + (INIT + j[None, :]) * soc + w[:, None] * sow
    store_x1 = w_ok[:, None] & writes_x1[None, :]
    store_ghost = w_ok[:, None] & writes_ghost[None, :]
    # partial sums of the output rows above and at the x1 row being read
    above = tl.zeros([BLOCK_W, BLOCK_C], dtype=ACC)
    at = tl.zeros([BLOCK_W, BLOCK_C], dtype=ACC)
    for row in range(first - 1, last + 2):
        row_ok = (row >= 0) & (row < HO)
        # x1 of this row at columns w - 1, w, w + 1, as the reference has it (rounded to out's dtype)
        x1_left = _x1_row(z1 + row * szh - szw, row_ok & left[:, None] & c_ok[None, :], bias, RELU, out_ptr)
        x1_mid = _x1_row(z1 + row * szh, row_ok & w_ok[:, None] & c_ok[None, :], bias, RELU, out_ptr)
        x1_right = _x1_row(z1 + row * szh + szw, row_ok & right[:, None] & c_ok[None, :], bias, RELU, out_ptr)
        # branches, not masks, for the strip's rows: Triton 3.9's interpreter rejects a mask made of a
        # program-dependent scalar and a vector
        if row >= first:
            if row <= last:
                x1_value = x1_mid
                if GATED:  # GhostNetV2's attention, as the tap loop applies it
                    x1_value *= _gate(gate_ptr, n, c, tl.zeros([BLOCK_W], dtype=tl.int32) + row, w, store_x1, GH, GW,
                                      scale_h, scale_w, sgn, sgc, sgh, sgw, ACC)
                _store_output(out_ptr, residual_ptr, x1_at + row * soh, x1_value, store_x1, RESIDUAL, ACC)
        # the row above is complete once its last weight row meets this x1 row
        done = above + x1_left * w20[None, :] + x1_mid * w21[None, :] + x1_right * w22[None, :]
        if row > first:
            ghost_value = _activate(done, RELU)
            if GATED:
                ghost_value *= _gate(gate_ptr, n, INIT + j, tl.zeros([BLOCK_W], dtype=tl.int32) + (row - 1), w,
                                     store_ghost, GH, GW, scale_h, scale_w, sgn, sgc, sgh, sgw, ACC)
            _store_output(out_ptr, residual_ptr, ghost_at + (row - 1) * soh, ghost_value, store_ghost, RESIDUAL, ACC)
        above = at + x1_left * w10[None, :] + x1_mid * w11[None, :] + x1_right * w12[None, :]
        at = ghost_bias[None, :] + x1_left * w00[None, :] + x1_mid * w01[None, :] + x1_right * w02[None, :]


# ghost_module_depthwise as GhostNet's stride-2 bottlenecks have it (x1 from the library's z1, a 3 x 3
# cheap op, ratio 2, then a 3 x 3 stride-2 depthwise conv over both halves): one program per (image,
# strip of ROWS output rows, BLOCK_W output columns w, BLOCK_C intrinsic channels) walks down the x1
# rows its strip needs, five loads a row (columns 2w - 2 .. 2w + 2); each makes the ghost half's row
# above complete at columns 2w - 1 .. 2w + 1, as in _ghost_rows3_kernel, and that Ghost row (both
# halves) goes straight into the stride-2 conv: an even Ghost row is an output row's middle weight
# row, an odd one ends that row and starts the next. The Ghost output, four times the conv's, is
# never written.
@triton.jit(do_not_specialize=["HG", "WG", "HO", "WO", "INIT", "KEEP", "ROWS", "row_blocks", "column_blocks",
                               "channel_blocks"])
def _ghost_depthwise_rows3_kernel(
    z1_ptr, b1_ptr, w2_ptr, b2_ptr, wd_ptr, bd_ptr, out_ptr,
    HG, WG, HO, WO, INIT, KEEP,
    szn, szc, szh, szw, son, soc, soh, sow,
    ROWS, row_blocks, column_blocks, channel_blocks,
    HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, HAS_BD: tl.constexpr, RELU: tl.constexpr,
    BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, ALIGN: tl.constexpr, CHANNEL_ALIGN: tl.constexpr,
    ACC: tl.constexpr,
):
    INIT, KEEP = INIT * CHANNEL_ALIGN, KEEP * CHANNEL_ALIGN
    szn, szh, szw = szn * ALIGN, szh * ALIGN, szw * ALIGN
    son, soh, sow = son * ALIGN, soh * ALIGN, sow * ALIGN
    _, n, first, last, w, w_ok, _, _, c, c_ok, ghost_ok = _ratio2_program(
        row_blocks, column_blocks, channel_blocks, ROWS, HO, WO, INIT, KEEP, BLOCK_W, BLOCK_C)
    # the Ghost plane's columns 2w + g in the plane (zero padding of both convs elsewhere)
    q = 2 * w
    in_m2 = w_ok & (q >= 2) & (q - 2 < WG)
    in_m1 = w_ok & (q >= 1) & (q - 1 < WG)
    in_0 = w_ok & (q < WG)
    in_p1 = w_ok & (q + 1 < WG)
    in_p2 = w_ok & (q + 2 < WG)
    bias = _channel_bias(b1_ptr, c, c_ok, HAS_B1, BLOCK_C, ACC)
    ghost_bias = _channel_bias(b2_ptr, c, ghost_ok, HAS_B2, BLOCK_C, ACC)
    x1_conv_bias = _channel_bias(bd_ptr, c, c_ok, HAS_BD, BLOCK_C, ACC)
    ghost_conv_bias = _channel_bias(bd_ptr, INIT + c, ghost_ok, HAS_BD, BLOCK_C, ACC)
    # the cheap op's weights (w<dy><dx>), the stride-2 conv's of the x1 half (x<dy><dx>) and of the ghost half (g<dy><dx>)
    w00, w01, w02 = _taps(w2_ptr, c, 0, ghost_ok, ACC)
    w10, w11, w12 = _taps(w2_ptr, c, 1, ghost_ok, ACC)
    w20, w21, w22 = _taps(w2_ptr, c, 2, ghost_ok, ACC)
    x00, x01, x02 = _taps(wd_ptr, c, 0, c_ok, ACC)
    x10, x11, x12 = _taps(wd_ptr, c, 1, c_ok, ACC)
    x20, x21, x22 = _taps(wd_ptr, c, 2, c_ok, ACC)
    g00, g01, g02 = _taps(wd_ptr, INIT + c, 0, ghost_ok, ACC)
    g10, g11, g12 = _taps(wd_ptr, INIT + c, 1, ghost_ok, ACC)
    g20, g21, g22 = _taps(wd_ptr, INIT + c, 2, ghost_ok, ACC)
    z1 = z1_ptr + n * szn + c[None, :] * szc + q[:, None] * szw
    x1_at = n * son + c[None, :] * soc + w[:, None] * sow
    ghost_at = n * son + (INIT + c[None, :]) * soc + w[:, None] * sow
    store_x1 = w_ok[:, None] & c_ok[None, :]
    store_ghost = w_ok[:, None] & ghost_ok[None, :]
    zero = tl.zeros([BLOCK_W, BLOCK_C], dtype=ACC)
    # partial ghost rows (the row above and the row at the x1 row being read) at columns 2w - 1, 2w, 2w + 1
    above_m1, above_0, above_p1, at_m1, at_0, at_p1 = zero, zero, zero, zero, zero, zero
    # x1's previous row (the Ghost row whose ghost half completes now) at those columns
    last_m1, last_0, last_p1 = zero, zero, zero
    # the output row being summed, of each half
    x1_sum, ghost_sum = zero, zero
    for row in range(2 * first - 2, 2 * last + 3):
        row_ok = (row >= 0) & (row < HG)
        cm2 = _x1_row(z1 + row * szh - 2 * szw, row_ok & in_m2[:, None] & c_ok[None, :], bias, RELU, out_ptr)
        cm1 = _x1_row(z1 + row * szh - szw, row_ok & in_m1[:, None] & c_ok[None, :], bias, RELU, out_ptr)
        c0 = _x1_row(z1 + row * szh, row_ok & in_0[:, None] & c_ok[None, :], bias, RELU, out_ptr)
        cp1 = _x1_row(z1 + row * szh + szw, row_ok & in_p1[:, None] & c_ok[None, :], bias, RELU, out_ptr)
        cp2 = _x1_row(z1 + row * szh + 2 * szw, row_ok & in_p2[:, None] & c_ok[None, :], bias, RELU, out_ptr)
        # the ghost half of Ghost row `row - 1`, complete with this x1 row's weight row, rounded as the
        # Ghost op's output; 0 outside the plane (the stride-2 conv's padding)
        g_m1 = _ghost_value(above_m1 + cm2 * w20[None, :] + cm1 * w21[None, :] + c0 * w22[None, :], in_m1, RELU,
                            out_ptr)
        g_0 = _ghost_value(above_0 + cm1 * w20[None, :] + c0 * w21[None, :] + cp1 * w22[None, :], in_0, RELU, out_ptr)
        g_p1 = _ghost_value(above_p1 + c0 * w20[None, :] + cp1 * w21[None, :] + cp2 * w22[None, :], in_p1, RELU,
                            out_ptr)
        above_m1 = at_m1 + cm2 * w10[None, :] + cm1 * w11[None, :] + c0 * w12[None, :]
        above_0 = at_0 + cm1 * w10[None, :] + c0 * w11[None, :] + cp1 * w12[None, :]
        above_p1 = at_p1 + c0 * w10[None, :] + cp1 * w11[None, :] + cp2 * w12[None, :]
        at_m1 = ghost_bias[None, :] + cm2 * w00[None, :] + cm1 * w01[None, :] + c0 * w02[None, :]
        at_0 = ghost_bias[None, :] + cm1 * w00[None, :] + c0 * w01[None, :] + cp1 * w02[None, :]
        at_p1 = ghost_bias[None, :] + c0 * w00[None, :] + cp1 * w01[None, :] + cp2 * w02[None, :]
        ghost_row = row - 1
        if (ghost_row < 0) | (ghost_row >= HG):  # outside the plane: the conv's zero padding rows
            g_m1, g_0, g_p1 = zero, zero, zero
        if ghost_row >= 2 * first - 1:  # the strip's first output row reads Ghost rows from 2 * first - 1
            # odd (& 1: -1 too, where % gives -1 on a GPU): ends output row ghost_row // 2 (weight row 2)
            # and starts the next (weight row 0)
            if (ghost_row & 1) == 1:
                x1_sum += last_m1 * x20[None, :] + last_0 * x21[None, :] + last_p1 * x22[None, :]
                ghost_sum += g_m1 * g20[None, :] + g_0 * g21[None, :] + g_p1 * g22[None, :]
                if ghost_row >= 2 * first + 1:
                    done = (ghost_row // 2) * soh
                    tl.store(out_ptr + x1_at + done, x1_sum.to(out_ptr.dtype.element_ty), mask=store_x1)
                    tl.store(out_ptr + ghost_at + done, ghost_sum.to(out_ptr.dtype.element_ty), mask=store_ghost)
                x1_sum = x1_conv_bias[None, :] + last_m1 * x00[None, :] + last_0 * x01[None, :] + last_p1 * x02[None, :]
                ghost_sum = ghost_conv_bias[None, :] + g_m1 * g00[None, :] + g_0 * g01[None, :] + g_p1 * g02[None, :]
            else:
                x1_sum += last_m1 * x10[None, :] + last_0 * x11[None, :] + last_p1 * x12[None, :]
                ghost_sum += g_m1 * g10[None, :] + g_0 * g11[None, :] + g_p1 * g12[None, :]
        last_m1, last_0, last_p1 = cm1, c0, cp1


@triton.jit
def _ghost_value(z, column_ok, RELU: tl.constexpr, like):
    """act(z) rounded to the dtype `like` points to (the Ghost op's output), 0 outside the plane's
    columns, in the accumulator's dtype."""
    value = _activate(z, RELU).to(like.dtype.element_ty).to(z.dtype)
    return tl.where(column_ok[:, None], value, 0.0)


@triton.jit
def _strip(tile, row_blocks, column_blocks, ROWS, HO, WO, BLOCK_W: tl.constexpr):
    """The image, first and last rows and columns of a rows kernel's tile (image, strip of ROWS rows,
    block of BLOCK_W columns), with the columns' masks: in the image, and with a column to the left
    (w - 1 in the image) or to the right."""
    n = tile // (row_blocks * column_blocks)
    first = tile // column_blocks % row_blocks * ROWS
    last = tl.minimum(first + ROWS, HO) - 1
    w = tile % column_blocks * BLOCK_W + tl.arange(0, BLOCK_W)
    return n, first, last, w, w < WO, (w >= 1) & (w <= WO), w + 1 < WO


@triton.jit
def _ratio2_program(row_blocks, column_blocks, channel_blocks, ROWS, HO, WO, INIT, KEEP, BLOCK_W: tl.constexpr,
                    BLOCK_C: tl.constexpr):
    """This program's tile (image, strip, column block), _strip's values for it, then its BLOCK_C
    intrinsic channels c (the block varies fastest over programs) and their masks: c an x1 channel,
    INIT + c a ghost channel the output's slice keeps. For the ratio-2 rows kernels."""
    program = tl.program_id(0)
    tile = program // channel_blocks
    c = program % channel_blocks * BLOCK_C + tl.arange(0, BLOCK_C)
    n, first, last, w, w_ok, left, right = _strip(tile, row_blocks, column_blocks, ROWS, HO, WO, BLOCK_W)
    return tile, n, first, last, w, w_ok, left, right, c, c < INIT, c < KEEP


@triton.jit
def _channel_bias(bias_ptr, index, mask, HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """The bias of channels `index` (0 without one) in the accumulator's dtype."""
    bias = tl.zeros([BLOCK_C], dtype=ACC)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + index, mask=mask, other=0.0).to(ACC)
    return bias


@triton.jit
def _taps(w2_ptr, j, dy, mask, ACC: tl.constexpr):
    """Row dy of the 3 x 3 depthwise weights of ghost channels j."""
    left = tl.load(w2_ptr + j * 9 + dy * 3, mask=mask, other=0.0).to(ACC)
    mid = tl.load(w2_ptr + j * 9 + dy * 3 + 1, mask=mask, other=0.0).to(ACC)
    right = tl.load(w2_ptr + j * 9 + dy * 3 + 2, mask=mask, other=0.0).to(ACC)
    return left, mid, right


@triton.jit
def _x1_row(z1, mask, bias, RELU: tl.constexpr, like):
    """act(z1 + b1) at `mask`, rounded to the dtype `like` points to (x1 as the reference has it),
    0 elsewhere (the depthwise op's zero padding), in the accumulator's dtype."""
    z = tl.load(z1, mask=mask, other=0.0).to(bias.dtype) + bias[None, :]
    x1 = _activate(z, RELU).to(like.dtype.element_ty).to(bias.dtype)
    return tl.where(mask, x1, 0.0)


# Specialised as the forward is (COPIES, strides, pixel strides over ALIGN, the channel counts over
# CHANNEL_ALIGN); the ghost half is addressed from channel INIT, so that its accesses vectorise too.
@triton.jit(do_not_specialize=["HO", "WO", "INIT", "KEEP", "GHOSTS", "PARTIAL_ROW", "TH", "TW", "tiles_h",
                               "tiles_w"])
def _ghost_backward_kernel(
    grad_ptr, out_ptr, w2_ptr, gz1_ptr, partial_ptr,
    HO, WO, INIT, KEEP, GHOSTS, COPIES, PARTIAL_ROW,
    sgn, sgc, sgh, sgw, son, soc, soh, sow, szn, szc, szh, szw,
    TH, TW, tiles_h, tiles_w,
    DW: tl.constexpr, RELU: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ALIGN: tl.constexpr, CHANNEL_ALIGN: tl.constexpr,
    ACC: tl.constexpr,
):
    PAD: tl.constexpr = DW // 2
    INIT, KEEP, GHOSTS = INIT * CHANNEL_ALIGN, KEEP * CHANNEL_ALIGN, GHOSTS * CHANNEL_ALIGN
    sgn, sgh, sgw = sgn * ALIGN, sgh * ALIGN, sgw * ALIGN
    son, soh, sow = son * ALIGN, soh * ALIGN, sow * ALIGN
    szn, szh, szw = szn * ALIGN, szh * ALIGN, szw * ALIGN
    tile = tl.program_id(0)
    n = tile // (tiles_h * tiles_w)
    h0 = tile // tiles_w % tiles_h * TH
    w0 = tile % tiles_w * TW
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < INIT
    # the tile's partial sums: W2's grad, b1's, b2's (backward_partials)
    gw2_part = partial_ptr + tile * PARTIAL_ROW
    gb1_part = gw2_part + GHOSTS * DW * DW
    gb2_part = gb1_part + INIT
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
        ghost = INIT + j[None, :]  # the ghost half's channel
        # grad of z2 at this tile's pixels: the depthwise bias grad and the weight grads' left factor
        g2 = tl.load(grad_ptr + n * sgn + ghost * sgc + h[:, None] * sgh + w[:, None] * sgw,
                     mask=p_ok[:, None] & j_ok[None, :], other=0.0).to(ACC)
        if RELU:
            y2 = tl.load(out_ptr + n * son + ghost * soc + h[:, None] * soh + w[:, None] * sow,
                         mask=p_ok[:, None] & j_ok[None, :], other=0.0)
            g2 = tl.where(y2 <= 0, 0.0, g2)  # ReLU's mask as torch's: the grad passes where y2 is NaN
        tl.store(gb2_part + j, tl.sum(g2, axis=0), mask=j_ok)
        for tap in range(DW * DW):  # a runtime loop, as in the forward: unrolled, it spills
            dy = tap // DW
            dx = tap % DW
            wt = tl.load(w2_ptr + j * DW * DW + tap, mask=j_ok, other=0.0).to(ACC)
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
            tl.store(gw2_part + j * DW * DW + tap, tl.sum(g2 * yb, axis=0), mask=j_ok)
    if RELU:
        gy1 = tl.where(y1 <= 0, 0.0, gy1)
    tl.store(gb1_part + c, tl.sum(gy1, axis=0), mask=c_ok)
    tl.store(gz1_ptr + n * szn + c[None, :] * szc + h[:, None] * szh + w[:, None] * szw,
             gy1.to(gz1_ptr.dtype.element_ty), mask=here)



# The backward for a 3 x 3 cheap op and ratio 2 (GhostNet's), as _ghost_rows3_kernel walks the
# forward: one program per (image, strip of ROWS rows, BLOCK_W columns, BLOCK_C intrinsic channels)
# walks down its strip one row s at a time, loading that row of the ghost half's grad (masked by
# its ReLU) and of x1 at columns w - 1, w, w + 1. The masked grads go through the transposed 3 x 3
# op into gx1's rows s - 1, s and s + 1 (row s - 1 is then complete: its gz1 is stored), and x1's
# row s - 1 meets the strip's masked grads of rows s, s - 1 and s - 2 for the weight grad. The
# tap-loop kernel above loads each pixel's grad, output and x1 once a tap, one tap after another
# (its forward twin ran the H200's 3 x 3 pass at 2.8x the time of a 1 x 1 one).
@triton.jit(do_not_specialize=["HO", "WO", "INIT", "KEEP", "PARTIAL_ROW", "ROWS", "row_blocks", "column_blocks",
                               "channel_blocks"])
def _ghost_backward_rows3_kernel(
    grad_ptr, out_ptr, w2_ptr, gz1_ptr, partial_ptr,
    HO, WO, INIT, KEEP, PARTIAL_ROW,
    sgn, sgc, sgh, sgw, son, soc, soh, sow, szn, szc, szh, szw,
    ROWS, row_blocks, column_blocks, channel_blocks,
    RELU: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, ALIGN: tl.constexpr,
    CHANNEL_ALIGN: tl.constexpr, ACC: tl.constexpr,
):
    INIT, KEEP = INIT * CHANNEL_ALIGN, KEEP * CHANNEL_ALIGN
    sgn, sgh, sgw = sgn * ALIGN, sgh * ALIGN, sgw * ALIGN
    son, soh, sow = son * ALIGN, soh * ALIGN, sow * ALIGN
    szn, szh, szw = szn * ALIGN, szh * ALIGN, szw * ALIGN
    tile, n, first, last, w, w_ok, left, right, c, c_ok, ghost_ok = _ratio2_program(
        row_blocks, column_blocks, channel_blocks, ROWS, HO, WO, INIT, KEEP, BLOCK_W, BLOCK_C)
    w00, w01, w02 = _taps(w2_ptr, c, 0, ghost_ok, ACC)
    w10, w11, w12 = _taps(w2_ptr, c, 1, ghost_ok, ACC)
    w20, w21, w22 = _taps(w2_ptr, c, 2, ghost_ok, ACC)
    x1 = out_ptr + n * son + c[None, :] * soc + w[:, None] * sow
    ghost_out = out_ptr + n * son + (INIT + c[None, :]) * soc + w[:, None] * sow
    grad_x1 = grad_ptr + n * sgn + c[None, :] * sgc + w[:, None] * sgw
    grad_ghost = grad_ptr + n * sgn + (INIT + c[None, :]) * sgc + w[:, None] * sgw
    gz1 = gz1_ptr + n * szn + c[None, :] * szc + w[:, None] * szw
    here = w_ok[:, None] & c_ok[None, :]
    zero = tl.zeros([BLOCK_W, BLOCK_C], dtype=ACC)
    # gx1's partial rows s and s + 1; x1's row s - 1; the strip's masked ghost grads of rows s - 1, s - 2
    above, at = zero, zero
    x1_left, x1_mid, x1_right = zero, zero, zero
    g2_last, g2_before = zero, zero
    # per-pixel sums of the weight grad (gw<dy><dx>) and both bias grads, reduced once at the end
    gw00, gw01, gw02, gw10, gw11, gw12, gw20, gw21, gw22 = zero, zero, zero, zero, zero, zero, zero, zero, zero
    gb1, gb2 = zero, zero
    for row in range(first - 1, last + 2):
        row_ok = (row >= 0) & (row < HO)
        g2_left = _masked_grad_row(grad_ghost + row * sgh - sgw, ghost_out + row * soh - sow,
                                   row_ok & left[:, None] & ghost_ok[None, :], RELU, ACC)
        g2_mid = _masked_grad_row(grad_ghost + row * sgh, ghost_out + row * soh,
                                  row_ok & w_ok[:, None] & ghost_ok[None, :], RELU, ACC)
        g2_right = _masked_grad_row(grad_ghost + row * sgh + sgw, ghost_out + row * soh + sow,
                                    row_ok & right[:, None] & ghost_ok[None, :], RELU, ACC)
        # the weight grad counts the strip's own grads only (branches, not masks: see _ghost_rows3_kernel)
        g2_own = zero
        if row >= first:
            if row <= last:
                g2_own = g2_mid
        gw00 += x1_left * g2_own
        gw01 += x1_mid * g2_own
        gw02 += x1_right * g2_own
        gw10 += x1_left * g2_last
        gw11 += x1_mid * g2_last
        gw12 += x1_right * g2_last
        gw20 += x1_left * g2_before
        gw21 += x1_mid * g2_before
        gw22 += x1_right * g2_before
        gb2 += g2_own
        # gx1's row s - 1 is complete once its last weight row meets this grad row
        done = above + g2_right * w00[None, :] + g2_mid * w01[None, :] + g2_left * w02[None, :]
        if row > first:
            gz = done + tl.load(grad_x1 + (row - 1) * sgh, mask=here, other=0.0).to(ACC)
            if RELU:  # x1_mid is x1's row s - 1
                gz = tl.where(x1_mid <= 0, 0.0, gz)
            tl.store(gz1 + (row - 1) * szh, gz.to(gz1_ptr.dtype.element_ty), mask=here)
            gb1 += tl.where(here, gz, 0.0)
        above = at + g2_right * w10[None, :] + g2_mid * w11[None, :] + g2_left * w12[None, :]
        at = g2_right * w20[None, :] + g2_mid * w21[None, :] + g2_left * w22[None, :]
        x1_left = tl.load(x1 + row * soh - sow, mask=row_ok & left[:, None] & c_ok[None, :], other=0.0).to(ACC)
        x1_mid = tl.load(x1 + row * soh, mask=row_ok & w_ok[:, None] & c_ok[None, :], other=0.0).to(ACC)
        x1_right = tl.load(x1 + row * soh + sow, mask=row_ok & right[:, None] & c_ok[None, :], other=0.0).to(ACC)
        g2_before = g2_last
        g2_last = g2_own
    # x1's row last + 1 meets the strip's last grad row
    gw20 += x1_left * g2_before
    gw21 += x1_mid * g2_before
    gw22 += x1_right * g2_before
    sums = partial_ptr + tile * PARTIAL_ROW + c * 9  # as the tap loop's (backward_partials)
    tl.store(sums, tl.sum(gw00, axis=0), mask=c_ok)
    tl.store(sums + 1, tl.sum(gw01, axis=0), mask=c_ok)
    tl.store(sums + 2, tl.sum(gw02, axis=0), mask=c_ok)
    tl.store(sums + 3, tl.sum(gw10, axis=0), mask=c_ok)
    tl.store(sums + 4, tl.sum(gw11, axis=0), mask=c_ok)
    tl.store(sums + 5, tl.sum(gw12, axis=0), mask=c_ok)
    tl.store(sums + 6, tl.sum(gw20, axis=0), mask=c_ok)
    tl.store(sums + 7, tl.sum(gw21, axis=0), mask=c_ok)
    tl.store(sums + 8, tl.sum(gw22, axis=0), mask=c_ok)
    tl.store(partial_ptr + tile * PARTIAL_ROW + INIT * 9 + c, tl.sum(gb1, axis=0), mask=c_ok)
    tl.store(partial_ptr + tile * PARTIAL_ROW + INIT * 10 + c, tl.sum(gb2, axis=0), mask=c_ok)


@triton.jit
def _masked_grad_row(grad, out, mask, RELU: tl.constexpr, ACC: tl.constexpr):
    """The grad at `mask` with ReLU's mask taken from the output as torch's threshold_backward
    does (the grad passes where the output is NaN), 0 elsewhere, in the accumulator's dtype."""
    g = tl.load(grad, mask=mask, other=0.0).to(ACC)
    if RELU:
        g = tl.where(tl.load(out, mask=mask, other=0.0) <= 0, 0.0, g)
    return g

# -- launch plans: block sizes, tiles, which primary --------------------------------------


def _input_precision(dtype):
    """tl.dot's input precision: TF32 for float32 where _backends.tf32_float32_dots says so."""
    return "tf32" if dtype == torch.float32 and _backends.tf32_float32_dots() else "ieee"


def _accumulator(dtype):
    """float32 accumulation for 16- and 32-bit inputs, float64 for float64."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def _cdiv(a, b):
    """triton.cdiv without its cost: it is a JIT function, 5 us a call from Python."""
    return -(-a // b)


def _block(n, low, high):
    return max(low, min(high, triton.next_power_of_2(max(int(n), 1))))


@functools.lru_cache(maxsize=None)
def tiling(height, width, block_p):
    """(tiles per image, tile rows, tile columns) of the output tiles of at most block_p pixels:
    the fewest tiles, then the widest (longer contiguous rows)."""
    best = None
    for tile_w in range(1, min(width, block_p) + 1):
        tile_h = min(height, block_p // tile_w)
        tiles = _cdiv(height, tile_h) * _cdiv(width, tile_w)
        if best is None or tiles < best[0] or (tiles == best[0] and tile_w > best[2]):
            best = (tiles, tile_h, tile_w)
    return best


# NCHW inputs wider than this go through channels_last (forward): on NCHW the kernel route's
# loads are strided by the plane, and the library route needs channels_last.
NCHW_MAX_INP = 32
# The route, measured on an H200 in float16 over GhostNet 1.0x's 21 shapes
# (bench/results/NVIDIA-H200-2026-12-04.md): x1 from the library GEMM (then read back) was the
# faster on all 21 at batch 256; x1 recomputed by tl.dot in the fused kernel (one launch, no GEMM
# host work) on most at batch 1 and 32, except for inputs of 640 channels and more and primary
# convs of over ~150 M multiply-adds. A rule fitted to those three batches; the tuned table
# overrides it per shape.
LIBRARY_MIN_MACS = 150_000_000
LIBRARY_MIN_INP = 640


def primary_is_large(pixels, inp, init):
    """Whether the library GEMM should make x1: `pixels` output pixels (N * H * W) of an
    inp -> init primary conv (LIBRARY_MIN_MACS, LIBRARY_MIN_INP)."""
    return inp >= LIBRARY_MIN_INP or pixels * inp * init >= LIBRARY_MIN_MACS


def heuristic_config(inp, ghosts, dtype, library_ok, large=True):
    """Block sizes and primary for a shape no tuned table covers: 64-pixel tiles and 32 ghost
    channels a program (16 for narrow modules) with 4 warps: 54-178 registers a thread on sm_90
    for GhostNet's shapes (Triton 3.6 and 3.9) without spills, so that several programs share an
    SM to hide memory latency (bench/gpu_compile_check.py); x1 from the library GEMM where it
    applies and the primary conv is `large` (primary_is_large). On the library route, 16
    channels and 2 warps where that leaves fewer channels idle than 32 and 4 (the same 8 elements
    a thread): H200, batch 256 float16, the 3 x 3 pass at 24->72@56 0.160 ms against 0.189,
    within 3% elsewhere (NVIDIA-H200-2026-12-04.md)."""
    float64 = dtype == torch.float64
    block_c, num_warps = (16 if float64 or ghosts <= 16 else 32), 4
    primary = "library" if library_ok and large else "kernel"
    if primary == "library" and _cdiv(ghosts, 16) * 16 < _cdiv(ghosts, 32) * 32:
        block_c, num_warps = 16, 2
    return {
        "block_p": 64, "block_c": block_c, "block_k": 4 if float64 else 32 if inp > 16 else 16,
        "num_warps": num_warps, "num_stages": 2, "primary": primary,
    }


def candidate_configs(inp, ghosts, dtype, library_ok):
    """What GHOSTKERNELS_AUTOTUNE=1 and `bench/gpu_report.py --tune` time for a shape."""
    heuristic = heuristic_config(inp, ghosts, dtype, library_ok)
    if dtype == torch.float64:
        return [heuristic]
    configs = []
    for block_p in (32, 64, 128):
        for block_c in (16, 32, 64):
            if block_c > _block(ghosts, 16, 64) or block_p * block_c > 128 * 32:
                continue
            for num_warps in (4, 8):  # 2 warps spill at 64 x 64 and 128 x 32 (bench/gpu_compile_check.py)
                for primary in ("kernel", "library") if library_ok else ("kernel",):
                    configs.append(dict(heuristic, block_p=block_p, block_c=block_c, num_warps=num_warps,
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


def save_config(path, device_name, key, config):
    """Add config under {device_name: {key: ...}} to the JSON table at `path` (the autotune cache,
    or the committed table when bench/gpu_report.py --tune fills it), rewritten whole and atomically."""
    table = {}
    if os.path.exists(path):
        with open(path) as f:
            table = json.load(f)
    table.setdefault(device_name, {})[key] = config
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(path + ".tmp", path)
    _tuned_configs(device_name)[key] = config


def fastest_config(candidates, run, **bench):
    """(median ms, config, how many were timed) of the fastest of `candidates` for run(config),
    timed by triton.testing.do_bench(**bench); a candidate the GPU cannot hold is skipped."""
    timed = []
    for config in candidates:
        try:
            timed.append((triton.testing.do_bench(lambda: run(config), return_mode="median", **bench), config))
        except triton.runtime.errors.OutOfResources:  # shared memory or registers
            continue
    ms, best = min(timed, key=lambda t: t[0])
    return ms, best, len(timed)


@functools.lru_cache(maxsize=None)
def _device_name(index):
    return torch.cuda.get_device_name(index)


def shape_key(inp, init, ghosts, out_channels, height, width, kernel, dw, stride, dtype, channels_last, gated,
              scaled, large):
    """The tuned table's key of a forward: the batch enters only as the size class `large`
    (primary_is_large), since the faster route changes with it (bench/results/NVIDIA-H200-2026-12-04.md)."""
    layout = "cl" if channels_last else "nchw"
    return (f"{inp}-{init}-{ghosts}-{out_channels}-{height}x{width}-k{kernel}-d{dw}-s{stride}-"
            f"{str(dtype).removeprefix('torch.')}-{layout}{'-gated' if gated else ''}{'-scaled' if scaled else ''}"
            f"-{'large' if large else 'small'}")


@functools.lru_cache(maxsize=None)
def _gate_arguments(gate, height, width):
    """The kernels' gate arguments for an output of height x width: the gate's size, F.interpolate's
    scales, its strides."""
    return (*gate.shape[2:], nearest_scale(gate.shape[2], height), nearest_scale(gate.shape[3], width),
            *gate.stride())


def library_primary(x, primary_weight, scale=None):
    """z1 = W1 (x * scale) without the bias, by the library GEMM into a buffer of its own:
    (N, init, H, W) channels_last. Not into out[..., :init] (leading dimension out_channels): on
    an H200 cuBLAS wrote those strided rows at half the speed of contiguous ones, and addmm's bias
    came as a separate broadcast copy (bench/results/NVIDIA-H200-2026-12-04.md, section 'probe').
    A scale (N, inp, 1, 1) goes into per-image copies of W1 (a batched GEMM) instead of a
    full-size product of x."""
    batch, inp, height, width = x.shape
    init = primary_weight.shape[0]
    weight = primary_weight.view(init, inp).t()
    if scale is None:
        z1 = torch.mm(x.permute(0, 2, 3, 1).reshape(-1, inp), weight)
    else:
        z1 = torch.bmm(x.permute(0, 2, 3, 1).reshape(batch, -1, inp), scale.view(batch, inp, 1) * weight)
    return z1.view(batch, height, width, init).permute(0, 3, 1, 2)


# (device, shape) -> the config chosen at its first call: later calls cost a dict lookup.
_chosen_configs = {}


def forward(x, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride, activation,
            gate=None, config=None, scale=None, residual=None):
    """Launch the fused forward; arguments already checked (ops.check_args, ops.check_gate).
    gate: optional attention logits (N, out_channels, h, w), applied as sigmoid, nearest-upsampled.
    scale: optional (N, inp, 1, 1) factors of x (ghost_module_scaled's SE gate), applied as x is read.
    residual: optional, the output is out.add_(residual) (ghost_module_residual): added as the kernel
    stores each element where it has the output's shape, dtype and strides, else by that add_ after.
    config: block sizes and primary (heuristic_config's keys) to use instead of the tuned table's."""
    batch, inp, in_h, in_w = x.shape
    init, ghosts = primary_weight.shape[0], cheap_weight.shape[0]
    kernel, dw = primary_weight.shape[-1], cheap_weight.shape[-1]
    memory_format = output_memory_format(x)
    if (config is None and kernel == 1 and stride == 1 and gate is None and inp > NCHW_MAX_INP
            and not x.is_contiguous(memory_format=torch.channels_last)):
        # A wide NCHW input goes through channels_last (either route there, by size), and back: two
        # extra coalesced passes, where NCHW on the kernel route would be dw * dw dots over inp with
        # loads strided by the plane. (A 1 x 1 plane is both layouts at once: no conversion; asking
        # for output_memory_format(x) here recursed forever.)
        out = forward(x.contiguous(memory_format=torch.channels_last), primary_weight, primary_bias, cheap_weight,
                      cheap_bias, out_channels, stride, activation, scale=scale).contiguous()
        return out if residual is None else out.add_(residual)
    height, width = (in_h - 1) // stride + 1, (in_w - 1) // stride + 1
    out = torch.empty((batch, out_channels, height, width), dtype=x.dtype, device=x.device,
                      memory_format=memory_format)
    if out.numel() == 0:
        return out if residual is None else out.add_(residual)
    fused_residual = residual if residual is not None and residual.shape == out.shape and \
        residual.dtype == out.dtype and residual.device == out.device and residual.stride() == out.stride() else None
    primary_weight, cheap_weight = primary_weight.contiguous(), cheap_weight.contiguous()
    scale = scale.contiguous() if scale is not None else None
    gated = gate is not None
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and out.is_contiguous(
        memory_format=torch.channels_last)
    library_ok = kernel == 1 and stride == 1 and channels_last
    run = functools.partial(_launch, x, primary_weight, primary_bias, cheap_weight, cheap_bias, out, activation,
                            stride, gate, scale, fused_residual)
    if config is None:
        shape = (inp, init, ghosts, out_channels, height, width, kernel, dw, stride, x.dtype, channels_last, gated,
                 scale is not None)
        large = primary_is_large(batch * height * width, inp, init)
        config = _chosen_configs.get((x.device, shape, large))
        if config is None:
            config = _chosen_configs[(x.device, shape, large)] = _choose_config(x.device, shape, library_ok, large,
                                                                                 run)
    elif config["primary"] == "library" and not library_ok:
        raise ValueError("triton_ghost.forward: the library primary needs a 1x1, stride-1 primary conv and "
                         "channels_last x")
    run(config)
    return out if residual is None or fused_residual is not None else out.add_(residual)


def _choose_config(device, shape, library_ok, large, run):
    """The tuned table's config for this GPU and shape; else, with GHOSTKERNELS_AUTOTUNE=1, the
    fastest candidate, timed now and cached on disk; else the heuristic."""
    inp, _, ghosts, _, _, _, _, _, _, dtype = shape[:10]
    heuristic = heuristic_config(inp, ghosts, dtype, library_ok, large)
    if device.type != "cuda":
        return heuristic
    device_name = _device_name(device.index if device.index is not None else torch.cuda.current_device())
    key = shape_key(*shape, large)
    tuned = _tuned_configs(device_name).get(key)
    if tuned is not None:
        return tuned
    if os.environ.get("GHOSTKERNELS_AUTOTUNE") != "1":
        return heuristic
    _, best, _ = fastest_config(candidate_configs(inp, ghosts, dtype, library_ok), run, warmup=5, rep=25)
    save_config(_autotune_cache_file(), device_name, key, best)
    return best


def _launch(x, primary_weight, primary_bias, cheap_weight, cheap_bias, out, activation, stride, gate, scale, residual,
            config):
    source, primary_dot = x, True
    # z1 from the library, without the bias (the kernel adds it as it loads z1: cuDNN adds a bias
    # in a pass of its own); the kernel activates, stores and uses it
    if primary_weight.shape[-1] > 1:
        source = torch.nn.functional.conv2d(x if scale is None else x * scale, primary_weight, None, stride,
                                            same_padding(primary_weight))
        primary_dot, scale = False, None
    elif config["primary"] == "library":
        source, primary_dot, scale = library_primary(x, primary_weight, scale), False, None
    rows3 = takes_rows3(primary_dot, cheap_weight.shape[-1])
    # everything the launch's arguments are made of but the tensors' data (which the plan's
    # compiled kernels also key on: _run)
    key = (primary_dot, source.device, source.dtype, source.shape, source.stride(), out.shape, out.stride(),
           primary_weight.shape, cheap_weight.shape, primary_bias is None, cheap_bias is None, activation, stride,
           scale is None, None if gate is None else (gate.shape, gate.stride()), residual is None,
           tuple(config.items()), _input_precision(x.dtype))  # the user's TF32 setting may change between calls
    plan = _plans.get(key)
    if plan is None:
        if rows3:
            kernel, arguments = _ghost_rows3_kernel, rows3_arguments(source, primary_bias, cheap_weight, cheap_bias,
                                                                     out, activation, config, residual, gate)
        else:
            kernel, arguments = _ghost_forward_kernel, launch_arguments(
                source, primary_dot, primary_weight, primary_bias, cheap_weight, cheap_bias, out, activation, stride,
                gate, config, x.dtype, scale, residual)
        plan = _plans[key] = _Plan(kernel, config, *arguments)
    if rows3:
        _run(plan, _rows3_tensors(source, primary_bias, cheap_weight, cheap_bias, out, residual, gate))
    else:
        _run(plan, _forward_tensors(source, scale, primary_weight, primary_bias, cheap_weight, cheap_bias, gate, out,
                                    residual))


def takes_depthwise_rows3(x, primary_weight, cheap_weight, depthwise_weight, stride, depthwise_stride):
    """Whether ghost_module_depthwise runs as forward_depthwise (GhostNet's stride-2 bottlenecks: a
    1 x 1 stride-1 primary conv on channels_last x, a 3 x 3 cheap op, ratio 2, a 3 x 3 stride-2
    depthwise conv); else it is the Ghost op, then the library conv."""
    return (primary_weight.shape[-1] == 1 and stride == 1 and x.is_contiguous(memory_format=torch.channels_last)
            and cheap_weight.shape[0] == primary_weight.shape[0] and cheap_weight.shape[-1] == 3
            and depthwise_weight.shape[-1] == 3 and depthwise_stride == 2)


def forward_depthwise(x, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, activation,
                      depthwise_weight, depthwise_bias, launch=None):
    """ghost_module_depthwise where takes_depthwise_rows3: z1 from the library (no bias), then
    _ghost_depthwise_rows3_kernel, which never writes the Ghost output. Arguments already checked.
    launch: block_c / num_warps / num_stages to use instead of rows_launch's (bench/gpu_probe.py)."""
    batch, _, height, width = x.shape
    out = torch.empty((batch, out_channels, (height - 1) // 2 + 1, (width - 1) // 2 + 1), dtype=x.dtype,
                      device=x.device, memory_format=torch.channels_last)
    if out.numel() == 0:
        return out
    z1 = library_primary(x, primary_weight)
    weights = (primary_bias, cheap_weight.contiguous(), cheap_bias, depthwise_weight.contiguous(), depthwise_bias)
    key = ("depthwise", z1.device, z1.dtype, z1.shape, z1.stride(), out.shape, out.stride(), primary_bias is None,
           cheap_bias is None, depthwise_bias is None, activation, None if launch is None else tuple(launch.items()))
    plan = _plans.get(key)
    if plan is None:
        launch = launch or rows_launch(out.shape[3])
        plan = _plans[key] = _Plan(_ghost_depthwise_rows3_kernel, launch,
                                   *depthwise_rows3_arguments(z1, *weights, out, activation, launch["block_c"]))
    _run(plan, _depthwise_tensors(z1, *weights, out))
    return out


def _depthwise_tensors(z1, primary_bias, cheap_weight, cheap_bias, depthwise_weight, depthwise_bias, out):
    """_ghost_depthwise_rows3_kernel's tensor arguments, in order (z1 in an absent bias's place, never read)."""
    return (z1, primary_bias if primary_bias is not None else z1, cheap_weight,
            cheap_bias if cheap_bias is not None else z1, depthwise_weight,
            depthwise_bias if depthwise_bias is not None else z1, out)


def depthwise_rows3_arguments(z1, primary_bias, cheap_weight, cheap_bias, depthwise_weight, depthwise_bias, out,
                              activation, block_c):
    """(grid, positional arguments, constexpr keywords) of _ghost_depthwise_rows3_kernel (absent biases: None)."""
    batch, init, ghost_height, ghost_width = z1.shape
    out_channels, height, width = out.shape[1:]
    rows, block_w = rows3_plan(height, width)
    row_blocks, column_blocks = _cdiv(height, rows), _cdiv(width, block_w)
    channel_blocks = _cdiv(init, block_c)
    align = _alignment(out.element_size(), _pixel_strides(z1, out))
    channel_align = _alignment(out.element_size(), (init, out_channels - init))
    args = (*_depthwise_tensors(z1, primary_bias, cheap_weight, cheap_bias, depthwise_weight, depthwise_bias, out),
            ghost_height, ghost_width, height, width, init // channel_align, (out_channels - init) // channel_align,
            *_aligned_strides(align, z1, out), rows, row_blocks, column_blocks, channel_blocks)
    constants = dict(HAS_B1=primary_bias is not None, HAS_B2=cheap_bias is not None, HAS_BD=depthwise_bias is not None,
                     RELU=activation == "relu", BLOCK_W=block_w, BLOCK_C=block_c, ALIGN=align,
                     CHANNEL_ALIGN=channel_align, ACC=_accumulator(out.dtype))
    return (batch * row_blocks * column_blocks * channel_blocks,), args, constants


def takes_rows3(primary_dot, dw):
    """Whether _launch's depthwise pass is _ghost_rows3_kernel (x1 from the library's z1, a 3 x 3
    cheap op) rather than the tap loop of _ghost_forward_kernel."""
    return not primary_dot and dw == 3


# Triton versions whose compiled kernels _run launches itself (CompiledKernel[grid](*every argument)),
# as checked on a GPU: H200, Triton 3.6.0, 15-17 us a launch against 42-57 us through
# JITFunction's argument binding (bench/results/NVIDIA-H200-2026-12-04.md, second session).
# Others go through JITFunction every time.
DIRECT_LAUNCH = not INTERPRET and triton.__version__.startswith("3.6.")


class _Plan:
    """One launch's arguments but the tensors, made once per shape, layout, dtype and config (the
    key of _launch or backward), and its compiled kernels by the tensors' dtypes and 16-byte alignment:
    with the other arguments fixed by the key, those are what Triton specialises a kernel on."""

    def __init__(self, kernel, config, grid, args, constants):
        tensors = sum(isinstance(a, torch.Tensor) for a in args)
        names = kernel.arg_names
        self.kernel, self.grid, self.tail, self.constants = kernel, grid, args[tensors:], constants
        self.options = dict(num_warps=config["num_warps"], num_stages=config["num_stages"])
        self.constexpr_values = tuple(constants[name] for name in names[len(args):])  # they come last
        self.compiled = {}


_plans = {}
# Set by compile_only(): launches compile their kernel and run nothing. A context variable, so
# that another thread's launches (a server's requests while a model is precompiled) still run.
_compile_only = contextvars.ContextVar("ghostkernels_compile_only", default=False)


@contextlib.contextmanager
def compile_only():
    """Within it (in this thread), every launch of these modules' kernels compiles the kernel
    (Triton's warmup: queued, under Triton's AsyncCompileMode) and runs nothing
    (ghostkernels.precompile)."""
    token = _compile_only.set(True)
    try:
        yield
    finally:
        _compile_only.reset(token)


# Every launch's compile options beyond num_warps/num_stages. float32 a * b + c as one FMA, as
# Triton up to 3.9 does by default (3.10 turns that default off; the GPU parity runs were made
# with it on): explicit, so the kernels' rounding does not change with Triton's version, and
# Triton 3.9 does not warn at each process's first compile that the default will change.
LAUNCH_OPTIONS = {"enable_fp_fusion": True}


def launch(kernel, grid, *args, **kwargs):
    """kernel[grid](*args, **kwargs, **LAUNCH_OPTIONS), or only its compilation within
    compile_only(). Returns the compiled kernel (None when only compiling)."""
    if _compile_only.get():
        kernel.warmup(*args, grid=grid, **kwargs, **LAUNCH_OPTIONS)
        return None
    return kernel[grid](*args, **kwargs, **LAUNCH_OPTIONS)


def _run(plan, tensors):
    """plan.kernel[plan.grid](*tensors, *plan.tail, **plan.constants): through Triton's JIT the first
    time (compiling if need be), then, where DIRECT_LAUNCH, straight to the kernel it compiled."""
    specialisation = tuple((t.dtype, t.data_ptr() % 16 == 0) for t in tensors) if DIRECT_LAUNCH else None
    direct = plan.compiled.get(specialisation)
    if direct is not None and not _compile_only.get():
        direct(*tensors, *plan.tail, *plan.constexpr_values)
        return
    compiled = launch(plan.kernel, plan.grid, *tensors, *plan.tail, **plan.constants, **plan.options)
    if DIRECT_LAUNCH and compiled is not None:
        plan.compiled[specialisation] = compiled[(*plan.grid, 1, 1)[:3]]  # its runner takes a 3-D grid


def rows3_plan(height, width):
    """(output rows a strip, BLOCK_W) of _ghost_rows3_kernel: strips of at most 16 rows, as even as
    they come (each strip reads two x1 rows more than it writes), and up to 32 columns."""
    strips = _cdiv(height, 16)
    return _cdiv(height, strips), min(32, triton.next_power_of_2(width))


def _rows3_tensors(z1, primary_bias, cheap_weight, cheap_bias, out, residual, gate):
    """_ghost_rows3_kernel's tensor arguments, in order (z1 or out in an absent one's place, never read)."""
    return (z1, primary_bias if primary_bias is not None else z1, cheap_weight,
            cheap_bias if cheap_bias is not None else z1, out, residual if residual is not None else out,
            gate if gate is not None else out)


def rows3_arguments(z1, primary_bias, cheap_weight, cheap_bias, out, activation, config, residual=None, gate=None):
    """(grid, positional arguments, constexpr keywords) of _ghost_rows3_kernel, the 3 x 3 pass
    over the library's z1 (residual: added to the output as it is stored, out's strides; gate:
    attention logits, as forward's)."""
    batch, init = z1.shape[:2]
    ghosts = cheap_weight.shape[0]
    out_channels, height, width = out.shape[1:]
    rows, block_w = rows3_plan(height, width)
    row_blocks, column_blocks = _cdiv(height, rows), _cdiv(width, block_w)
    channel_blocks = _cdiv(ghosts, config["block_c"])
    align = _alignment(out.element_size(), _pixel_strides(z1, out))
    channel_align = _alignment(out.element_size(), (init, out_channels - init))
    szn, szc, szh, szw = z1.stride()
    son, soc, soh, sow = out.stride()
    args = (
        *_rows3_tensors(z1, primary_bias, cheap_weight, cheap_bias, out, residual, gate),
        height, width, init // channel_align, (out_channels - init) // channel_align, ghosts // init,
        szn // align, szc, szh // align, szw // align, son // align, soc, soh // align, sow // align,
        *_gate_arguments(gate if gate is not None else out, height, width),
        rows, row_blocks, column_blocks, channel_blocks,
    )
    constants = dict(HAS_B1=primary_bias is not None, HAS_B2=cheap_bias is not None, RELU=activation == "relu",
                     RESIDUAL=residual is not None, GATED=gate is not None, BLOCK_W=block_w, BLOCK_C=config["block_c"], ALIGN=align, CHANNEL_ALIGN=channel_align,
                     ACC=_accumulator(out.dtype))
    return (batch * row_blocks * column_blocks * channel_blocks,), args, constants


def _alignment(element_size, strides):
    """The largest power of two, up to a 16-byte vector, that divides every stride."""
    align = max(1, 16 // element_size)
    while align > 1 and any(s % align for s in strides):
        align //= 2
    return align


def _pixel_strides(*tensors):
    return [s for t in tensors for i, s in enumerate(t.stride()) if i != 1]


def backward_arguments(grad, out, cheap_weight, grad_z1, partials, activation, tile_pixels):
    """(grid, positional arguments, constexpr keywords) of _ghost_backward_kernel, the tap loop: the
    pixel strides come divided by ALIGN, their common alignment, and the channel counts by
    CHANNEL_ALIGN, theirs."""
    batch, out_channels, height, width = out.shape
    init, ghosts, dw = grad_z1.shape[1], cheap_weight.shape[0], cheap_weight.shape[-1]
    block_p, tile_h, tile_w = backward_tiles(height, width, tile_pixels)
    tiles_h, tiles_w = _cdiv(height, tile_h), _cdiv(width, tile_w)
    align = _alignment(out.element_size(), _pixel_strides(grad, out, grad_z1))
    channel_align = _alignment(out.element_size(), (init, out_channels - init, ghosts))
    args = (grad, out, cheap_weight, grad_z1, partials, height, width, init // channel_align,
            (out_channels - init) // channel_align, ghosts // channel_align, ghosts // init, partials.shape[1],
            *_aligned_strides(align, grad, out, grad_z1), tile_h, tile_w, tiles_h, tiles_w)
    constants = dict(DW=dw, RELU=activation == "relu", BLOCK_P=block_p, BLOCK_C=BACKWARD_BLOCK_C, ALIGN=align,
                     CHANNEL_ALIGN=channel_align, ACC=_accumulator(out.dtype))
    return (batch * tiles_h * tiles_w, _cdiv(init, BACKWARD_BLOCK_C)), args, constants


def backward_rows3_arguments(grad, out, cheap_weight, grad_z1, partials, activation):
    """(grid, positional arguments, constexpr keywords) of _ghost_backward_rows3_kernel."""
    batch, out_channels, height, width = out.shape
    init = grad_z1.shape[1]
    rows, block_w = rows3_plan(height, width)
    row_blocks, column_blocks = _cdiv(height, rows), _cdiv(width, block_w)
    block_c = rows_launch(width)["block_c"]
    channel_blocks = _cdiv(init, block_c)
    align = _alignment(out.element_size(), _pixel_strides(grad, out, grad_z1))
    channel_align = _alignment(out.element_size(), (init, out_channels - init))
    args = (grad, out, cheap_weight, grad_z1, partials, height, width, init // channel_align,
            (out_channels - init) // channel_align, partials.shape[1], *_aligned_strides(align, grad, out, grad_z1),
            rows, row_blocks, column_blocks, channel_blocks)
    constants = dict(RELU=activation == "relu", BLOCK_W=block_w, BLOCK_C=block_c, ALIGN=align,
                     CHANNEL_ALIGN=channel_align, ACC=_accumulator(out.dtype))
    return (batch * row_blocks * column_blocks * channel_blocks,), args, constants


def _aligned_strides(align, *tensors):
    """The tensors' (N, C, H, W) strides, the pixel strides divided by align."""
    strides = []
    for t in tensors:
        sn, sc, sh, sw = t.stride()
        strides += [sn // align, sc, sh // align, sw // align]
    return strides


def _forward_tensors(source, scale, primary_weight, primary_bias, cheap_weight, cheap_bias, gate, out, residual):
    """_ghost_forward_kernel's tensor arguments, in order; an absent one's place holds source or out
    (never read)."""
    return (source, scale if scale is not None else source, primary_weight,
            primary_bias if primary_bias is not None else source, cheap_weight,
            cheap_bias if cheap_bias is not None else source, gate if gate is not None else out, out,
            residual if residual is not None else out)


def launch_arguments(source, primary_dot, primary_weight, primary_bias, cheap_weight, cheap_bias, out,
                     activation, stride, gate, config, dtype, scale=None, residual=None):
    """(grid, positional arguments, constexpr keywords) of _ghost_forward_kernel: x1 from
    `source` by tl.dot (primary_dot: source is x) or loaded (source is the library's z1); residual:
    added to the output as it is stored (out's strides)."""
    batch, inp = source.shape[0], primary_weight.shape[1]
    init, ghosts = primary_weight.shape[0], cheap_weight.shape[0]
    out_channels, height, width = out.shape[1:]
    tiles, tile_h, tile_w = tiling(height, width, config["block_p"])
    channel_blocks = _cdiv(ghosts, config["block_c"])
    gated = gate is not None
    gate = gate if gated else out  # unread placeholder
    sxn, sxc, sxh, sxw = source.stride()
    son, soc, soh, sow = out.stride()
    align = _alignment(out.element_size(), _pixel_strides(source, out))
    channel_align = _alignment(out.element_size(), (inp, init, out_channels - init, primary_weight.stride(0)))
    args = (
        *_forward_tensors(source, scale, primary_weight, primary_bias, cheap_weight, cheap_bias, gate, out, residual),
        inp // channel_align, height, width, init // channel_align, (out_channels - init) // channel_align,
        ghosts // init, stride, sxn // align, sxc, sxh // align, sxw // align,
        primary_weight.stride(0) // channel_align, son // align, soc, soh // align, sow // align,
        *_gate_arguments(gate, height, width), tile_h, tile_w, _cdiv(height, tile_h), _cdiv(width, tile_w), channel_blocks,
    )
    constants = dict(
        DW=cheap_weight.shape[-1], PRIMARY_DOT=primary_dot,
        HAS_B1=primary_bias is not None, HAS_B2=cheap_bias is not None, RELU=activation == "relu", GATED=gated,
        SCALED=scale is not None, RESIDUAL=residual is not None, BLOCK_P=config["block_p"], BLOCK_K=config["block_k"], BLOCK_C=config["block_c"],
        ALIGN=align, CHANNEL_ALIGN=channel_align,
        FMA=dtype == torch.float64, INPUT_PRECISION=_input_precision(dtype), ACC=_accumulator(dtype),
        UPCAST_DOT=INTERPRET and dtype == torch.bfloat16,
    )
    return (batch * tiles * channel_blocks,), args, constants


# The tap-loop backward's channels a program; with 128-pixel tiles and 4 warps, 110-128 registers a
# thread on sm_90 and no spills (256 x 32 spilled: bench/gpu_compile_check.py).
BACKWARD_BLOCK_C = 16


def backward_tiles(height, width, tile_pixels):
    """(BLOCK_P, tile rows, tile columns) of the backward kernel's tiles of at most tile_pixels."""
    block_p = min(tile_pixels, _block(width * height, 16, tile_pixels))
    tile_w = min(width, block_p)
    return block_p, max(1, min(height, block_p // tile_w)), tile_w


def takes_backward_rows3(dw, copies):
    """Whether backward runs _ghost_backward_rows3_kernel (a 3 x 3 cheap op and one ghost channel an
    x1 channel: ratio 2) rather than the tap loop of _ghost_backward_kernel."""
    return dw == 3 and copies == 1


def rows_launch(width):
    """Channels a program and warps of _ghost_backward_rows3_kernel and _ghost_depthwise_rows3_kernel
    (`width`: their output's): four elements of each of their [BLOCK_W, BLOCK_C] tensors a thread
    (8-byte float16 accesses; 158-164 registers on sm_90 for the backward, no spills:
    bench/gpu_compile_check.py), 32 channels where a plane's rows are 8 columns or fewer (with 16,
    GhostNet's 7 x 7 planes had one element a thread: 2-byte accesses)."""
    block_w = rows3_plan(1, width)[1]
    block_c = 32 if block_w <= 8 else 16
    return dict(block_c=block_c, num_warps=max(1, block_w * block_c // 128), num_stages=2)


def backward_partials(batch, height, width, init, ghosts, dw, rows3, tile_pixels, dtype, device):
    """The backward's partial sums, a row per program of its kernel but the channel blocks: W2's grad
    (ghosts x dw x dw), then b1's (init), then b2's (ghosts), summed over the rows after the kernel
    (a fixed order: deterministic). Float32 (float64 for float64)."""
    if rows3:
        rows, block_w = rows3_plan(height, width)
        tiles = batch * _cdiv(height, rows) * _cdiv(width, block_w)
    else:
        _, tile_h, tile_w = backward_tiles(height, width, tile_pixels)
        tiles = batch * _cdiv(height, tile_h) * _cdiv(width, tile_w)
    # the rows kernel writes every sum; the tap loop skips the ghost channels the output's slice drops
    allocate = torch.empty if rows3 else torch.zeros
    return allocate((tiles, ghosts * dw * dw + init + ghosts), device=device,
                    dtype=torch.float64 if dtype == torch.float64 else torch.float32)


BACKWARD_LAUNCH = dict(num_warps=4, num_stages=2)  # the tap loop's (BACKWARD_BLOCK_C)


def backward_plan(tensors, activation, rows3, tile_pixels):
    """The launch plan of the backward's kernel over `tensors` (grad, out, W2, gz1, partial sums):
    _ghost_backward_rows3_kernel where rows3, else the tap loop with tiles of tile_pixels."""
    if rows3:
        return _Plan(_ghost_backward_rows3_kernel, rows_launch(tensors[1].shape[3]),
                     *backward_rows3_arguments(*tensors, activation))
    return _Plan(_ghost_backward_kernel, BACKWARD_LAUNCH, *backward_arguments(*tensors, activation, tile_pixels))


def backward(grad, out, x, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride, activation,
             tile_pixels=128):
    """Grads of (x, W1, b1, W2, b2); zeros for absent biases. tile_pixels: a power of two, the tap
    loop's tiles (see BACKWARD_BLOCK_C)."""
    batch = x.shape[0]
    init, ghosts = primary_weight.shape[0], cheap_weight.shape[0]
    dw = cheap_weight.shape[-1]
    height, width = out.shape[2:]
    grad = grad.contiguous(memory_format=output_memory_format(out))
    grad_z1 = torch.empty((batch, init, height, width), dtype=x.dtype, device=x.device,
                          memory_format=output_memory_format(out))
    rows3 = takes_backward_rows3(dw, ghosts // init)
    partials = backward_partials(batch, height, width, init, ghosts, dw, rows3, tile_pixels, x.dtype, x.device)
    tensors = (grad, out, cheap_weight, grad_z1, partials)
    if partials.shape[0] > 0:
        key = ("backward", rows3, out.device, out.dtype, out.shape, out.stride(), grad.stride(), cheap_weight.shape,
               activation, None if rows3 else tile_pixels)
        plan = _plans.get(key)
        if plan is None:
            plan = _plans[key] = backward_plan(tensors, activation, rows3, tile_pixels)
        _run(plan, tensors)
    grad_x, grad_w1, _ = torch.ops.aten.convolution_backward(
        grad_z1, x, primary_weight, None, [stride, stride], same_padding(primary_weight), [1, 1], False, [0, 0], 1,
        [True, True, False],
    )
    # one reduction for the three grads; each is copied out of it, so that no two results share storage
    grad_w2, grad_b1, grad_b2 = (sums.to(x.dtype, copy=True)
                                 for sums in partials.sum(0).split([ghosts * dw * dw, init, ghosts]))
    return (grad_x.contiguous(memory_format=output_memory_format(out)), grad_w1.contiguous(), grad_b1,
            grad_w2.view_as(cheap_weight), grad_b2)
