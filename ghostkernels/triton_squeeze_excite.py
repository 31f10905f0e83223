"""Triton kernel for GhostNet's squeeze-and-excitation gate (GPU; on the CPU under TRITON_INTERPRET=1).

gate = hard_sigmoid(W_e relu(W_r mean_hw(x) + b_r) + b_e), shape (N, C, 1, 1): about fifteen
small ATen launches (mean, two 1x1 convs, bias adds, ReLU, hard sigmoid) become one. One program
per image: it pools C channels a block at a time and feeds each block straight into the reduce
GEMV (hidden += W_r[:, block] @ pooled[block]), then the expand GEMV writes the gate a block at a
time. Everything stays in float32 registers (float64 for float64) until the gate is written.
"""

import torch
import triton
import triton.language as tl

from .triton_ghost import _accumulator, _alignment, _block, launch


# C comes divided by CHANNEL_ALIGN (its power-of-two factor up to a 16-byte vector), so that the
# mask c < C is constant over that many lanes and the loads along channels vectorise (triton_ghost).
@triton.jit(do_not_specialize=["C", "R", "W", "PIXELS"])
def _squeeze_excite_gate_kernel(
    x_ptr, wr_ptr, br_ptr, we_ptr, be_ptr, out_ptr,
    C, R, W, PIXELS,
    sxn, sxc, sxh, sxw,
    HAS_BR: tl.constexpr, HAS_BE: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, CHANNEL_ALIGN: tl.constexpr,
    ACC: tl.constexpr,
):
    C = C * CHANNEL_ALIGN
    n = tl.program_id(0)
    r = tl.arange(0, BLOCK_R)
    r_ok = r < R
    hidden = tl.zeros([BLOCK_R], dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        total = tl.zeros([BLOCK_C], dtype=ACC)
        for p0 in range(0, PIXELS, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            h = p // W
            w = p % W
            v = tl.load(x_ptr + n * sxn + c[None, :] * sxc + h[:, None] * sxh + w[:, None] * sxw,
                        mask=(p < PIXELS)[:, None] & c_ok[None, :], other=0.0)
            total += tl.sum(v.to(ACC), axis=0)
        pooled = total / PIXELS
        wr = tl.load(wr_ptr + r[:, None] * C + c[None, :], mask=r_ok[:, None] & c_ok[None, :], other=0.0).to(ACC)
        hidden += tl.sum(wr * pooled[None, :], axis=1)
    if HAS_BR:
        hidden += tl.load(br_ptr + r, mask=r_ok, other=0.0).to(ACC)
    hidden = tl.maximum(hidden, 0.0, propagate_nan=tl.PropagateNan.ALL)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        we = tl.load(we_ptr + c[:, None] * R + r[None, :], mask=c_ok[:, None] & r_ok[None, :], other=0.0).to(ACC)
        g = tl.sum(we * hidden[None, :], axis=1)
        if HAS_BE:
            g += tl.load(be_ptr + c, mask=c_ok, other=0.0).to(ACC)
        # hard sigmoid, relu6(g + 3) / 6, NaN kept as torch's relu6 keeps it
        g = tl.minimum(tl.maximum(g + 3.0, 0.0, propagate_nan=tl.PropagateNan.ALL), 6.0,
                       propagate_nan=tl.PropagateNan.ALL) / 6.0
        tl.store(out_ptr + n * C + c, g.to(out_ptr.dtype.element_ty), mask=c_ok)


def blocks(reduced):
    """(BLOCK_C, BLOCK_R, num_warps): the reduce tile BLOCK_R x BLOCK_C is 4K float32 elements at
    most; with 8 warps GhostNet's widest gate (960 -> 240) takes 117 registers a thread on sm_90
    without spills (bench/gpu_compile_check.py; 32 channels or 4 warps spilled)."""
    block_r = _block(reduced, 16, 1024)
    return max(16, min(64, 4096 // block_r)), block_r, 8


def squeeze_excite_gate(x, reduce_weight, reduce_bias, expand_weight, expand_bias):
    """The gate (N, C, 1, 1) in one launch; arguments already checked (squeeze_excite.check_gate_args)."""
    batch, channels, _, width = x.shape
    reduced = reduce_weight.shape[0]
    out = torch.empty((batch, channels, 1, 1), dtype=x.dtype, device=x.device)
    if batch == 0:
        return out
    block_c, block_r, num_warps = blocks(reduced)
    pixels = x.shape[2] * width
    channel_align = _alignment(x.element_size(), (channels,))
    launch(
        _squeeze_excite_gate_kernel, (batch,),
        x, reduce_weight.contiguous(), reduce_bias if reduce_bias is not None else x, expand_weight.contiguous(),
        expand_bias if expand_bias is not None else x, out,
        channels // channel_align, reduced, width, pixels, *x.stride(),
        HAS_BR=reduce_bias is not None, HAS_BE=expand_bias is not None,
        BLOCK_C=block_c, BLOCK_P=_block(pixels, 16, 64), BLOCK_R=block_r, CHANNEL_ALIGN=channel_align,
        ACC=_accumulator(x.dtype),
        num_warps=num_warps,
    )
    return out
