"""Triton kernels for the fused Ghost op (GPU; on the CPU under TRITON_INTERPRET=1).

Forward: a program takes bands of output rows (full width) of one image and a block of
intrinsic channels. It computes the primary pointwise conv (tl.dot, +bias, activation) for
the band plus its dw//2 halo rows into a per-program scratch that stays in L2, writes the
band's rows to out[:, :init], then runs the depthwise op from the scratch into
out[:, init:oup]. Programs are persistent (a grid of a few per SM looping over bands), so the
scratch is bounded by the grid, not by the batch. Ghost channels the slice drops are never
computed. With a primary kernel larger than 1x1 the library conv makes x1 and the kernel
does the rest.

Backward: one kernel per (tile of output pixels, block of intrinsic channels) computes the
activation masks from the saved output, the depthwise transpose, grad of the primary conv's
pre-activation (gz1), and per-tile partial sums of the depthwise weight and both bias grads
(summed afterwards in a fixed order: deterministic). The primary conv's grads (x, W1) are
one library convolution backward on gz1.

Accumulation is float32 (float64 for float64 inputs). Float32 dots run as TF32 by default (GHOSTKERNELS_TF32=0 asks for IEEE float32).
"""

import os

import torch
import triton
import triton.language as tl

from .reference import output_memory_format

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _activate(v, RELU: tl.constexpr):
    if RELU:  # NaN stays NaN, as with torch.relu (the default, maxnum, returns 0 for it)
        v = tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL)
    return v


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
def _ghost_forward_kernel(
    x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, gate_ptr, out_ptr, scratch_ptr,
    INP, HO, WO, INIT, KEEP, STRIDE,
    sxn, sxc, sxh, sxw, son, soc, soh, sow,
    GH, GW, scale_h, scale_w, sgn, sgc, sgh, sgw,
    bands_per_image, total_bands,
    COPIES: tl.constexpr, DW: tl.constexpr, ROWS: tl.constexpr,
    HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, RELU: tl.constexpr, PRIMARY_1X1: tl.constexpr,
    GATED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ACC: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    PAD: tl.constexpr = DW // 2
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < INIT
    halo_pixels = (ROWS + 2 * PAD) * WO
    program = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    scratch = scratch_ptr + program * halo_pixels * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    m_range = tl.arange(0, BLOCK_M)
    if HAS_B1:
        b1 = tl.load(b1_ptr + c, mask=c_ok, other=0.0).to(ACC)
    for band in range(tl.program_id(0), total_bands, tl.num_programs(0)):
        n = band // bands_per_image
        r0 = band % bands_per_image * ROWS
        # Phase 1: x1 of rows [r0 - PAD, r0 + ROWS + PAD) into the scratch (zeros off the image).
        for m0 in range(0, halo_pixels, BLOCK_M):
            m = m0 + m_range
            h = r0 - PAD + m // WO
            w = m % WO
            in_image = (m < halo_pixels) & (h >= 0) & (h < HO)
            if PRIMARY_1X1:
                acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=ACC)
                x_rows = x_ptr + n * sxn + (h * STRIDE)[:, None] * sxh + (w * STRIDE)[:, None] * sxw
                for k0 in range(0, INP, BLOCK_K):
                    k = k0 + tl.arange(0, BLOCK_K)
                    xk = tl.load(x_rows + k[None, :] * sxc, mask=in_image[:, None] & (k < INP)[None, :], other=0.0)
                    wk = tl.load(w1_ptr + c[None, :] * INP + k[:, None], mask=c_ok[None, :] & (k < INP)[:, None],
                                 other=0.0)
                    if UPCAST_DOT:  # the interpreter's bfloat16 dot is wrong (Triton 3.9); float32 is exact
                        xk, wk = xk.to(ACC), wk.to(ACC)
                    acc = tl.dot(xk, wk, acc, input_precision=INPUT_PRECISION)
                if HAS_B1:
                    acc += b1[None, :]
                acc = _activate(acc, RELU)
            else:  # x holds the library conv's activated output, (N, INIT, HO, WO)
                acc = tl.load(x_ptr + n * sxn + c[None, :] * sxc + h[:, None] * sxh + w[:, None] * sxw,
                              mask=in_image[:, None] & c_ok[None, :], other=0.0).to(ACC)
            x1 = tl.where(in_image[:, None] & c_ok[None, :], acc, 0.0).to(out_ptr.dtype.element_ty)
            in_band = in_image & (h >= r0) & (h < r0 + ROWS)
            band_mask = in_band[:, None] & c_ok[None, :]
            if GATED:  # the scratch keeps the ungated x1: the depthwise op reads it
                gated = x1.to(ACC) * _gate(gate_ptr, n, c, h, w, band_mask, GH, GW, scale_h, scale_w,
                                           sgn, sgc, sgh, sgw, ACC)
                tl.store(out_ptr + n * son + c[None, :] * soc + h[:, None] * soh + w[:, None] * sow,
                         gated.to(out_ptr.dtype.element_ty), mask=band_mask)
            else:
                tl.store(out_ptr + n * son + c[None, :] * soc + h[:, None] * soh + w[:, None] * sow, x1,
                         mask=band_mask)
            tl.store(scratch + m[:, None] * BLOCK_C, x1, mask=(m < halo_pixels)[:, None])
        tl.debug_barrier()
        # Phase 2: the depthwise op of the band's rows, read from the scratch.
        for p0 in range(0, ROWS * WO, BLOCK_M):
            p = p0 + m_range
            h = r0 + p // WO
            w = p % WO
            p_ok = (p < ROWS * WO) & (h < HO)
            for copy in tl.static_range(COPIES):
                j = c * COPIES + copy
                j_ok = c_ok & (j < KEEP)
                if HAS_B2:
                    acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=ACC) + tl.load(
                        b2_ptr + j, mask=j_ok, other=0.0).to(ACC)[None, :]
                else:
                    acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=ACC)
                for dy in tl.static_range(DW):
                    for dx in tl.static_range(DW):
                        ws = w + dx - PAD
                        tap_ok = p_ok & (ws >= 0) & (ws < WO)
                        src = (p + dy * WO + dx - PAD)[:, None] * BLOCK_C
                        v = tl.load(scratch + src, mask=tap_ok[:, None], other=0.0).to(ACC)
                        wt = tl.load(w2_ptr + j * DW * DW + dy * DW + dx, mask=j_ok, other=0.0).to(ACC)
                        acc += v * wt[None, :]
                acc = _activate(acc, RELU)
                ghost_mask = p_ok[:, None] & j_ok[None, :]
                if GATED:
                    acc *= _gate(gate_ptr, n, INIT + j, h, w, ghost_mask, GH, GW, scale_h, scale_w,
                                 sgn, sgc, sgh, sgw, ACC)
                tl.store(out_ptr + n * son + (INIT + j)[None, :] * soc + h[:, None] * soh + w[:, None] * sow,
                         acc.to(out_ptr.dtype.element_ty), mask=ghost_mask)
        tl.debug_barrier()  # the next band overwrites the scratch


# Tuned per GhostNet shape on the GPU; the interpreter runs one fixed configuration.
_FORWARD_CONFIGS = [
    triton.Config({"BLOCK_M": block_m}, num_warps=warps, num_stages=stages)
    for block_m in (32, 64, 128) for warps in (4, 8) for stages in (1, 2)
]
_forward_kernel = _ghost_forward_kernel if INTERPRET else triton.autotune(
    _FORWARD_CONFIGS, key=["INP", "HO", "WO", "INIT", "KEEP", "COPIES", "DW", "PRIMARY_1X1", "GATED"])(_ghost_forward_kernel)
_INTERPRETER_CONFIG = {"BLOCK_M": 64} if INTERPRET else {}


@triton.jit
def _ghost_backward_kernel(
    grad_ptr, out_ptr, w2_ptr, gz1_ptr, gw2_part_ptr, gb1_part_ptr, gb2_part_ptr,
    HO, WO, INIT, KEEP, GHOSTS,
    sgn, sgc, sgh, sgw, son, soc, soh, sow, szn, szc, szh, szw,
    tiles_h, tiles_w,
    COPIES: tl.constexpr, DW: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr, RELU: tl.constexpr,
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
    for copy in tl.static_range(COPIES):
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


# -- launchers ------------------------------------------------------------------------------


def _input_precision(dtype):
    if dtype == torch.float32 and os.environ.get("GHOSTKERNELS_TF32", "1") == "1":
        return "tf32"
    return "ieee"


def _accumulator(dtype):
    """float32 accumulation for 16- and 32-bit inputs, float64 for float64."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def _block(n, low, high):
    return max(low, min(high, triton.next_power_of_2(max(int(n), 1))))


def _persistent_programs(device, work):
    if device.type == "cuda":
        return min(work, 4 * torch.cuda.get_device_properties(device).multi_processor_count)
    return min(work, 4)  # interpreter: a few programs still exercise the persistent loop


def _nearest_scale(source, size):
    """float32(source) / size rounded once to float32, the scale F.interpolate's nearest mode uses."""
    return (torch.tensor(source, dtype=torch.float32) / size).item()


def forward(x, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride, activation,
            band_pixels=512, gate=None):
    """Launch the fused forward; arguments already checked (ops.check_args, ops.check_gate).
    band_pixels: output pixels per band (rows of full width), the halo-recompute trade-off.
    gate: optional attention logits (N, out_channels, h, w), applied as sigmoid, nearest-upsampled."""
    batch, inp = x.shape[:2]
    init, ghosts = primary_weight.shape[0], cheap_weight.shape[0]
    kernel, dw = primary_weight.shape[-1], cheap_weight.shape[-1]
    relu = activation == "relu"
    if kernel == 1:
        source = x
        height, width = ((s - 1) // stride + 1 for s in x.shape[2:])
    else:  # library conv for the primary; the kernel fuses the rest
        source = torch.nn.functional.conv2d(x, primary_weight, primary_bias, stride, kernel // 2)
        if relu:
            source = source.relu_()
        height, width = source.shape[2:]
    out = torch.empty((batch, out_channels, height, width), dtype=x.dtype, device=x.device,
                      memory_format=output_memory_format(x))
    if out.numel() == 0:
        return out
    # Bands of about 512 output pixels: enough rows to amortise the 2 * (dw // 2) halo rows,
    # few enough that the scratch of all resident programs stays in L2.
    rows = max(1, min(height, band_pixels // width))
    bands = triton.cdiv(height, rows)
    block_c = _block(init, 16, 32 if dw <= 5 else 16)
    block_k = _block(inp, 16, 32)
    programs = _persistent_programs(x.device, batch * bands)
    channel_blocks = triton.cdiv(init, block_c)
    scratch = torch.empty(programs * channel_blocks * (rows + 2 * (dw // 2)) * width * block_c,
                          dtype=x.dtype, device=x.device)
    gated = gate is not None
    gate = gate if gated else out[:, :, :1, :1]  # unread placeholder
    _forward_kernel[(programs, channel_blocks)](
        source, primary_weight.contiguous(), primary_bias if primary_bias is not None else source,
        cheap_weight.contiguous(), cheap_bias if cheap_bias is not None else source, gate, out, scratch,
        inp, height, width, init, out_channels - init, stride,
        *source.stride(), *out.stride(),
        *gate.shape[2:], _nearest_scale(gate.shape[2], height), _nearest_scale(gate.shape[3], width), *gate.stride(),
        bands, batch * bands,
        COPIES=ghosts // init, DW=dw, ROWS=rows,
        HAS_B1=primary_bias is not None and kernel == 1, HAS_B2=cheap_bias is not None, RELU=relu,
        PRIMARY_1X1=kernel == 1, GATED=gated, BLOCK_K=block_k, BLOCK_C=block_c, **_INTERPRETER_CONFIG,
        INPUT_PRECISION=_input_precision(x.dtype), ACC=_accumulator(x.dtype),
        UPCAST_DOT=INTERPRET and x.dtype == torch.bfloat16,
    )
    return out


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
    tiles_h, tiles_w = triton.cdiv(height, tile_h), triton.cdiv(width, tile_w)
    tiles = batch * tiles_h * tiles_w
    block_c = _block(init, 16, 32)
    partial = dict(dtype=torch.float64 if x.dtype == torch.float64 else torch.float32, device=x.device)
    gw2_part = torch.zeros((tiles, ghosts, dw * dw), **partial)
    gb1_part = torch.zeros((tiles, init), **partial)
    gb2_part = torch.zeros((tiles, ghosts), **partial)
    if tiles > 0:
        _ghost_backward_kernel[(tiles, triton.cdiv(init, block_c))](
            grad, out, cheap_weight.contiguous(), grad_z1, gw2_part, gb1_part, gb2_part,
            height, width, init, out_channels - init, ghosts,
            *grad.stride(), *out.stride(), *grad_z1.stride(),
            tiles_h, tiles_w,
            COPIES=ghosts // init, DW=dw, TH=tile_h, TW=tile_w, RELU=activation == "relu",
            BLOCK_P=block_p, BLOCK_C=block_c, ACC=_accumulator(x.dtype),
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
