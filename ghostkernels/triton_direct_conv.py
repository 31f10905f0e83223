"""Triton kernel for `ghostkernels::direct_conv2d` on CUDA (on the CPU under TRITON_INTERPRET=1).

out = act(conv2d(x, weight, bias, stride, padding=k // 2, groups)) for convs whose groups read at
most 4 input channels: GhostNet's depthwise convs (a stride-2 block's conv_dw, the shortcuts') and
its 3-channel stem. The composition runs cuDNN's conv, then the ReLU as a second pass over the
output; on the H200, cuDNN's channels_last float16 depthwise conv ran at 4.5-10x the memory floor
(bench/results/NVIDIA-H200-probe-2026-12-04.txt). Here one launch reads x and writes the output
once, the bias and the ReLU applied in registers.

Each program computes BLOCK_P output pixels (flattened over the batch, so a 7x7 plane's 49 pixels
do not leave a block mostly idle) times BLOCK_C output channels, accumulating in float32 (float64
for float64) over the k x k taps and the group's inputs. Channels_last depthwise convs load
BLOCK_C contiguous channels a pixel: x's pixel strides come divided by X_ALIGN, and the output's
and C_OUT by ALIGN, their power-of-two factors up to a 16-byte vector, so that the loads, the
stores and the mask vectorise (triton_ghost); the stem's 3-channel input does not hold its
16-channel output's stores back. A dense conv (the stem, groups = 1) loads each input pixel once
and broadcasts it over the output channels.
"""

import torch
import triton
import triton.language as tl

from .reference import output_memory_format
from .triton_ghost import _Plan, _accumulator, _alignment, _block, _cdiv, _pixel_strides, _plans, _run


# The pixel strides' alignment is X_ALIGN's and ALIGN's to say; specialising them on their
# divisibility by 16 as well would only compile more variants for a model's first call. (An NCHW
# x, which the op keeps on cuDNN, loses the specialisation of its unit column stride with it.)
@triton.jit(do_not_specialize=["C_OUT", "OUT_PER_GROUP", "H", "W", "OH", "OW", "PIXELS",
                               "sxn", "sxh", "sxw", "son", "soh", "sow"])
def _direct_conv_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr,
    C_OUT, OUT_PER_GROUP, H, W, OH, OW, PIXELS,
    sxn, sxc, sxh, sxw, son, soc, soh, sow,
    K: tl.constexpr, STRIDE: tl.constexpr, GROUP_INPUTS: tl.constexpr, DEPTHWISE: tl.constexpr,
    DENSE: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, X_ALIGN: tl.constexpr, ALIGN: tl.constexpr, ACC: tl.constexpr,
):
    C_OUT = C_OUT * ALIGN
    sxn, sxh, sxw = sxn * X_ALIGN, sxh * X_ALIGN, sxw * X_ALIGN
    son, soh, sow = son * ALIGN, soh * ALIGN, sow * ALIGN
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    co = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok = p < PIXELS
    c_ok = co < C_OUT
    ow = p % OW
    oh = p // OW % OH
    n = (p // (OW * OH)).to(tl.int64)
    if DEPTHWISE:  # input channel = output channel
        x_at = x_ptr + n[:, None] * sxn + co[None, :] * sxc
    elif DENSE:  # every output channel reads inputs 0 .. GROUP_INPUTS - 1
        x_at = x_ptr + n * sxn
    else:
        x_at = x_ptr + n[:, None] * sxn + (co // OUT_PER_GROUP * GROUP_INPUTS)[None, :] * sxc
    w_at = w_ptr + co * (GROUP_INPUTS * K * K)
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
    for dy in range(K):  # a loop, not unrolled: 5 x 5 unrolled held 206 registers a thread (sm_90)
        ih = oh * STRIDE + (dy - K // 2)
        row_ok = p_ok & (ih >= 0) & (ih < H)
        for dx in tl.static_range(K):
            iw = ow * STRIDE + (dx - K // 2)
            ok = row_ok & (iw >= 0) & (iw < W)
            pixel = ih * sxh + iw * sxw
            for gi in tl.static_range(GROUP_INPUTS):
                w = tl.load(w_at + (gi * K * K + dy * K + dx), mask=c_ok, other=0.0).to(ACC)
                if DENSE:
                    v = tl.load(x_at + pixel + gi * sxc, mask=ok, other=0.0).to(ACC)
                    acc += v[:, None] * w[None, :]
                else:
                    v = tl.load(x_at + (pixel[:, None] + gi * sxc), mask=ok[:, None] & c_ok[None, :], other=0.0)
                    acc += v.to(ACC) * w[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + co, mask=c_ok, other=0.0).to(ACC)[None, :]
    if RELU:
        acc = tl.maximum(acc, 0.0, propagate_nan=tl.PropagateNan.ALL)
    out_at = out_ptr + n[:, None] * son + co[None, :] * soc + (oh * soh + ow * sow)[:, None]
    tl.store(out_at, acc.to(out_ptr.dtype.element_ty), mask=p_ok[:, None] & c_ok[None, :])


def launch(dense):
    """Triton's launch options: 8 warps a program for the depthwise convs (61-82 registers a thread
    on sm_90), 4 for a dense conv (the stem: 72-80 registers with 4 warps, 154 with 8, its input
    pixels broadcast through shared memory); Triton's default stages."""
    return dict(num_warps=4 if dense else 8, num_stages=3)


def blocks(out_channels):
    """(BLOCK_P, BLOCK_C): 2048 accumulators a program, at most 64
    channels wide so that wide depthwise convs still have pixels to spread the taps' loads over."""
    block_c = _block(out_channels, 8, 64)
    return 2048 // block_c, block_c


def arguments(x, weight, bias, out, stride, activation):
    """(grid, positional arguments, constexpr keywords) of _direct_conv_kernel writing `out`."""
    channels, out_channels, group_inputs, k = x.shape[1], weight.shape[0], weight.shape[1], weight.shape[-1]
    groups = channels // group_inputs
    batch, _, out_h, out_w = out.shape
    x_align = _alignment(x.element_size(), _pixel_strides(x))
    align = _alignment(x.element_size(), (out_channels, *_pixel_strides(out)))
    block_p, block_c = blocks(out_channels)
    pixels = batch * out_h * out_w
    sxn, sxc, sxh, sxw = x.stride()
    son, soc, soh, sow = out.stride()
    args = (x, weight, bias if bias is not None else x, out,
            out_channels // align, out_channels // groups, x.shape[2], x.shape[3], out_h, out_w, pixels,
            sxn // x_align, sxc, sxh // x_align, sxw // x_align, son // align, soc, soh // align, sow // align)
    constants = dict(K=k, STRIDE=stride, GROUP_INPUTS=group_inputs,
                     DEPTHWISE=group_inputs == 1 and out_channels == channels, DENSE=groups == 1,
                     HAS_BIAS=bias is not None, RELU=activation == "relu", BLOCK_P=block_p, BLOCK_C=block_c,
                     X_ALIGN=x_align, ALIGN=align, ACC=_accumulator(x.dtype))
    return (_cdiv(pixels, block_p), _cdiv(out_channels, block_c)), args, constants


def direct_conv2d(x, weight, bias, stride, activation):
    """The op's result in x's layout (reference.output_memory_format: on CUDA the op's
    conv_output_format; the interpreter's CPU tests get channels_last too); the caller checked the
    arguments (direct_conv.takes_triton): 4-D, one dtype and device, a square odd kernel, at most
    4 inputs per group; weight and bias contiguous."""
    batch, _, height, width = x.shape
    out = torch.empty((batch, weight.shape[0], _cdiv(height, stride), _cdiv(width, stride)), dtype=x.dtype,
                      device=x.device, memory_format=output_memory_format(x))
    if out.numel() == 0:
        return out
    key = ("direct", x.device, x.dtype, x.shape, x.stride(), weight.shape, bias is None, stride, activation)
    plan = _plans.get(key)
    if plan is None:  # the launch's arguments once per shape, and its compiled kernel (triton_ghost._run)
        grid, args, constants = arguments(x, weight, bias, out, stride, activation)
        plan = _plans[key] = _Plan(_direct_conv_kernel, launch(constants["DENSE"]), grid, args, constants)
    _run(plan, (x, weight, bias if bias is not None else x, out))
    return out
