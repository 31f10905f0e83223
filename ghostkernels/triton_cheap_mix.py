"""Triton kernel for G-GhostNet's cheap part (GPU; on the CPU under TRITON_INTERPRET=1).

out = relu(W @ x[:, offset:offset + cin] + b + mix), mix broadcast over H and W. One program
per (block of pixels, block of output channels, image): a tl.dot over cin, then the epilogue,
stored through `out`'s strides, so `out` can be the channel slice of the stage's concatenated
output and x's channel slice is read in place.
"""

import torch
import triton
import triton.language as tl

from .triton_ghost import INTERPRET, _accumulator, _block, _cdiv, _input_precision, dot_accumulate, launch


@triton.jit
def _cheap_mix_kernel(
    x_ptr, w_ptr, b_ptr, mix_ptr, out_ptr,
    CIN, COUT, W, PIXELS,
    sxn, sxc, sxh, sxw, son, soc, soh, sow,
    HAS_BIAS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
    FMA: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    n = tl.program_id(2)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok, c_ok = p < PIXELS, c < COUT
    h, w = p // W, p % W
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
    x_rows = x_ptr + n * sxn + h[:, None] * sxh + w[:, None] * sxw
    for k0 in range(0, CIN, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        xk = tl.load(x_rows + k[None, :] * sxc, mask=p_ok[:, None] & (k < CIN)[None, :], other=0.0)
        wk = tl.load(w_ptr + c[None, :] * CIN + k[:, None], mask=c_ok[None, :] & (k < CIN)[:, None], other=0.0)
        acc = dot_accumulate(xk, wk, acc, FMA, INPUT_PRECISION, UPCAST_DOT)
    shift = tl.load(mix_ptr + n * COUT + c, mask=c_ok, other=0.0).to(ACC)
    if HAS_BIAS:
        shift += tl.load(b_ptr + c, mask=c_ok, other=0.0).to(ACC)
    acc = tl.maximum(acc + shift[None, :], 0.0, propagate_nan=tl.PropagateNan.ALL)  # NaN stays, as in torch.relu
    tl.store(out_ptr + n * son + c[None, :] * soc + h[:, None] * soh + w[:, None] * sow,
             acc.to(out_ptr.dtype.element_ty), mask=p_ok[:, None] & c_ok[None, :])


def cheap_mix_into(x, weight, bias, mix, offset, out):
    """Write relu(W @ x[:, offset:offset + cin] + b + mix) into `out` (any strides); arguments
    already checked (cheap_mix.check_args)."""
    cout, cin = weight.shape[:2]
    batch, _, height, width = x.shape
    if out.numel() == 0:
        return out
    pixels = height * width
    float64 = x.dtype == torch.float64  # no tl.dot in float64 on GPUs: an FMA loop of small blocks
    block_p = _block(pixels, 16, 32 if float64 else 64)
    block_c = _block(cout, 16, 16 if float64 else 64)
    xs = x.narrow(1, offset, cin)
    grid = (_cdiv(pixels, block_p), _cdiv(cout, block_c), batch)
    launch(
        _cheap_mix_kernel, grid,
        xs, weight.reshape(cout, cin).contiguous(), bias if bias is not None else mix, mix.contiguous(), out,
        cin, cout, width, pixels, *xs.stride(), *out.stride(),
        HAS_BIAS=bias is not None, BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_K=4 if float64 else _block(cin, 16, 32),
        FMA=float64, INPUT_PRECISION=_input_precision(x.dtype), ACC=_accumulator(x.dtype),
        UPCAST_DOT=INTERPRET and x.dtype == torch.bfloat16,
    )
    return out
