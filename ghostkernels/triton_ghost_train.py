"""Triton kernels of the training-mode Ghost op (GPU; on the CPU under TRITON_INTERPRET=1):
ghost_module_train and its backward with batch-statistics BN (docs/math.md section 8), the
passes of the C++ kernels (csrc/ghost_train_cpu.cpp) on NCHW planes.

Forward: z1 by the library conv (cuDNN), its statistics by torch.var_mean; one kernel makes
x1 = act(BN1(z1)) at each depthwise tap's shifted pixels from z1, writes the centre's as out's
intrinsic channels and z2 for the channel's ghosts; z2's statistics; one kernel writes
act(BN2(z2)) into out's kept ghost channels. Backward: BN2's two sums per channel (atomic adds
of per-program sums); one kernel per (image, intrinsic channel, pixel block) forms dz2 at each
tap's shifted pixels from out's grad and z2, adds its depthwise adjoint to the grad of x1,
adds dz2 * x1 to the depthwise weight grads, and writes dy1; BN1's two sums; dz1 in place;
grad_x and grad_W1 by the library's convolution backward. Statistics and sums are float32
(float64 for float64). Written without a GPU: tested in the interpreter and compiled for sm_90
(bench/gpu_compile_check.py), not yet timed.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .reference import output_memory_format, same_padding
from .triton_ghost import _accumulator, _alignment, _block, _cdiv, launch

BLOCK = 256  # pixels of one plane a program takes


@triton.jit
def _activate(v, RELU: tl.constexpr):
    if RELU:
        v = tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL)
    return v


@triton.jit
def _activation_grad(grad, y, RELU: tl.constexpr):
    """ReLU's grad at pre-activation y as torch's threshold_backward: NaN passes."""
    if RELU:
        grad = tl.where(y <= 0.0, 0.0, grad)
    return grad


@triton.jit
def _intrinsic_block(H, W, P, INIT, BLOCK: tl.constexpr):
    """This program's (item = image * INIT + intrinsic channel, image, channel, plane size P = H * W,
    pixels, pixel mask, rows, columns)."""
    item = tl.program_id(0)
    p = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    return item, item // INIT, item % INIT, P, p, p < P, p // W, p % W


# The plane size P comes divided by PIXEL_ALIGN, its power-of-two factor up to a 16-byte vector:
# the mask p < P is then constant over that many pixels and the planes start aligned, so that the
# accesses at a program's own pixels vectorise (with P unknown, every float16 access was 2 bytes).
@triton.jit(do_not_specialize=["H", "W", "P", "INIT", "GHOSTS", "OUT_C"])
def _cheap_forward_kernel(z1_ptr, scale1_ptr, shift1_ptr, w2_ptr, out_ptr, z2_ptr, H, W, P, INIT, GHOSTS, OUT_C,
                          D: tl.constexpr, COPIES: tl.constexpr, CP: tl.constexpr, RELU: tl.constexpr,
                          BLOCK: tl.constexpr, PIXEL_ALIGN: tl.constexpr, ACC: tl.constexpr):
    item, n, c, P, p, ok, h, w = _intrinsic_block(H, W, P * PIXEL_ALIGN, INIT, BLOCK)
    scale = tl.load(scale1_ptr + c).to(ACC)
    shift = tl.load(shift1_ptr + c).to(ACC)
    z_plane = z1_ptr + item.to(tl.int64) * P
    j = tl.arange(0, CP)
    j_ok = j < COPIES
    ghost = c * COPIES + j
    acc = tl.zeros([CP, BLOCK], dtype=ACC)
    for t in range(0, D * D):
        hh = h + t // D - D // 2
        ww = w + t % D - D // 2
        valid = ok & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
        x1 = _activate(tl.load(z_plane + hh * W + ww, mask=valid, other=0.0).to(ACC) * scale + shift, RELU)
        x1 = tl.where(valid, x1, 0.0)  # the depthwise conv's zero padding
        weight = tl.load(w2_ptr + ghost * (D * D) + t, mask=j_ok, other=0.0).to(ACC)
        acc += weight[:, None] * x1[None, :]
    x1 = _activate(tl.load(z_plane + p, mask=ok, other=0.0).to(ACC) * scale + shift, RELU)
    tl.store(out_ptr + (n * OUT_C + c).to(tl.int64) * P + p, x1.to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(z2_ptr + (n * GHOSTS + ghost[:, None]).to(tl.int64) * P + p[None, :], acc.to(z2_ptr.dtype.element_ty),
             mask=j_ok[:, None] & ok[None, :])


@triton.jit(do_not_specialize=["P", "KEEP", "GHOSTS", "INIT", "OUT_C"])
def _ghost_output_kernel(z2_ptr, scale2_ptr, shift2_ptr, out_ptr, P, KEEP, GHOSTS, INIT, OUT_C,
                         RELU: tl.constexpr, BLOCK: tl.constexpr, PIXEL_ALIGN: tl.constexpr, ACC: tl.constexpr):
    P = P * PIXEL_ALIGN
    item = tl.program_id(0)  # image * KEEP + kept ghost channel
    n = item // KEEP
    j = item % KEEP
    p = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = p < P
    z = tl.load(z2_ptr + (n * GHOSTS + j).to(tl.int64) * P + p, mask=ok, other=0.0).to(ACC)
    y = _activate(z * tl.load(scale2_ptr + j).to(ACC) + tl.load(shift2_ptr + j).to(ACC), RELU)
    tl.store(out_ptr + (n * OUT_C + INIT + j).to(tl.int64) * P + p, y.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["P", "C", "GRAD_C", "GRAD_OFFSET", "Z_C"])
def _grad_sums_kernel(grad_ptr, z_ptr, scale_ptr, shift_ptr, mean_ptr, sums_ptr, P, C, GRAD_C, GRAD_OFFSET, Z_C,
                      RELU: tl.constexpr, BLOCK: tl.constexpr, PIXEL_ALIGN: tl.constexpr, ACC: tl.constexpr):
    """sums[c] += sum(dy), sums[C + c] += sum(dy * (z - mean)) over this program's pixels, dy =
    the activation's grad at BN(z) of grad channel GRAD_OFFSET + c."""
    P = P * PIXEL_ALIGN
    item = tl.program_id(0)  # image * C + channel
    n = item // C
    c = item % C
    p = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = p < P
    z = tl.load(z_ptr + (n * Z_C + c).to(tl.int64) * P + p, mask=ok, other=0.0).to(ACC)
    grad = tl.load(grad_ptr + (n * GRAD_C + GRAD_OFFSET + c).to(tl.int64) * P + p, mask=ok, other=0.0).to(ACC)
    dy = _activation_grad(grad, z * tl.load(scale_ptr + c).to(ACC) + tl.load(shift_ptr + c).to(ACC), RELU)
    tl.atomic_add(sums_ptr + c, tl.sum(dy, axis=0))
    tl.atomic_add(sums_ptr + C + c, tl.sum(dy * (z - tl.load(mean_ptr + c).to(ACC)), axis=0))


@triton.jit(do_not_specialize=["H", "W", "P", "INIT", "GHOSTS", "KEEP", "OUT_C"])
def _cheap_backward_kernel(grad_ptr, z1_ptr, z2_ptr, w2_ptr, scale1_ptr, shift1_ptr, scale2_ptr, shift2_ptr,
                           mean2_ptr, mean_dy2_ptr, slope2_ptr, dy1_ptr, grad_w2_ptr,
                           H, W, P, INIT, GHOSTS, KEEP, OUT_C,
                           D: tl.constexpr, COPIES: tl.constexpr, CP: tl.constexpr, RELU: tl.constexpr,
                           BLOCK: tl.constexpr, PIXEL_ALIGN: tl.constexpr, ACC: tl.constexpr):
    item, n, c, P, p, ok, h, w = _intrinsic_block(H, W, P * PIXEL_ALIGN, INIT, BLOCK)
    j = tl.arange(0, CP)
    ghost = c * COPIES + j
    j_ok = (j < COPIES) & (ghost < KEEP)  # ghosts the slice drops have no grad
    scale2 = tl.load(scale2_ptr + ghost, mask=j_ok, other=0.0).to(ACC)[:, None]
    shift2 = tl.load(shift2_ptr + ghost, mask=j_ok, other=0.0).to(ACC)[:, None]
    mean2 = tl.load(mean2_ptr + ghost, mask=j_ok, other=0.0).to(ACC)[:, None]
    mean_dy2 = tl.load(mean_dy2_ptr + ghost, mask=j_ok, other=0.0).to(ACC)[:, None]
    slope2 = tl.load(slope2_ptr + ghost, mask=j_ok, other=0.0).to(ACC)[:, None]
    scale1 = tl.load(scale1_ptr + c).to(ACC)
    shift1 = tl.load(shift1_ptr + c).to(ACC)
    grad_planes = grad_ptr + (n * OUT_C + INIT + ghost[:, None]).to(tl.int64) * P
    z2_planes = z2_ptr + (n * GHOSTS + ghost[:, None]).to(tl.int64) * P
    z1_plane = z1_ptr + item.to(tl.int64) * P
    # dz2 at this program's own pixels, for the weight grads
    own = j_ok[:, None] & ok[None, :]
    z2 = tl.load(z2_planes + p[None, :], mask=own, other=0.0).to(ACC)
    dy2 = _activation_grad(tl.load(grad_planes + p[None, :], mask=own, other=0.0).to(ACC), z2 * scale2 + shift2, RELU)
    dz2_own = tl.where(own, scale2 * (dy2 - mean_dy2 - (z2 - mean2) * slope2), 0.0)
    dx1 = tl.load(grad_ptr + (n * OUT_C + c).to(tl.int64) * P + p, mask=ok, other=0.0).to(ACC)
    for t in range(0, D * D):
        dy = t // D - D // 2
        dx = t % D - D // 2
        weight = tl.load(w2_ptr + ghost * (D * D) + t, mask=j_ok, other=0.0).to(ACC)
        # the adjoint: x1 at p fed the ghosts' outputs at p - (dy, dx)
        hh = h - dy
        ww = w - dx
        valid = j_ok[:, None] & (ok & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W))[None, :]
        q = (hh * W + ww)[None, :]
        z2 = tl.load(z2_planes + q, mask=valid, other=0.0).to(ACC)
        dy2 = _activation_grad(tl.load(grad_planes + q, mask=valid, other=0.0).to(ACC), z2 * scale2 + shift2, RELU)
        dz2 = tl.where(valid, scale2 * (dy2 - mean_dy2 - (z2 - mean2) * slope2), 0.0)
        dx1 += tl.sum(weight[:, None] * dz2, axis=0)
        # the weight grad: dz2 at p times x1 at p + (dy, dx)
        hh = h + dy
        ww = w + dx
        valid1 = ok & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
        x1 = _activate(tl.load(z1_plane + hh * W + ww, mask=valid1, other=0.0).to(ACC) * scale1 + shift1, RELU)
        x1 = tl.where(valid1, x1, 0.0)
        tl.atomic_add(grad_w2_ptr + ghost * (D * D) + t, tl.sum(dz2_own * x1[None, :], axis=1), mask=j_ok)
    y1 = tl.load(z1_plane + p, mask=ok, other=0.0).to(ACC) * scale1 + shift1
    tl.store(dy1_ptr + item.to(tl.int64) * P + p, _activation_grad(dx1, y1, RELU).to(dy1_ptr.dtype.element_ty),
             mask=ok)


@triton.jit(do_not_specialize=["P", "C"])
def _batch_norm_backward_kernel(dy_ptr, z_ptr, scale_ptr, mean_ptr, mean_dy_ptr, slope_ptr, P, C,
                                BLOCK: tl.constexpr, PIXEL_ALIGN: tl.constexpr, ACC: tl.constexpr):
    """dz = scale (dy - mean(dy) - (z - mean) slope), in place over dy."""
    P = P * PIXEL_ALIGN
    item = tl.program_id(0)  # image * C + channel
    c = item % C
    p = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = p < P
    offsets = item.to(tl.int64) * P + p
    dy = tl.load(dy_ptr + offsets, mask=ok, other=0.0).to(ACC)
    z = tl.load(z_ptr + offsets, mask=ok, other=0.0).to(ACC)
    dz = tl.load(scale_ptr + c).to(ACC) * (dy - tl.load(mean_dy_ptr + c).to(ACC)
                                           - (z - tl.load(mean_ptr + c).to(ACC)) * tl.load(slope_ptr + c).to(ACC))
    tl.store(dy_ptr + offsets, dz.to(dy_ptr.dtype.element_ty), mask=ok)


def _normalisation(gamma, beta, mean, var, eps):
    """(rstd, scale, shift): BN(z) = z * scale + shift."""
    rstd = torch.rsqrt(var + eps)
    scale = gamma.to(rstd.dtype) * rstd
    return rstd, scale, beta.to(rstd.dtype) - mean * scale


def _statistics(z, accumulate):
    var, mean = torch.var_mean(z.to(accumulate), dim=(0, 2, 3), correction=0)
    return mean, var


def forward(x, primary_weight, primary_gamma, primary_beta, cheap_weight, cheap_gamma, cheap_beta, out_channels,
            stride, activation, primary_eps, cheap_eps):
    """ghost_module_train's outputs (arguments checked by the caller)."""
    d = cheap_weight.shape[-1]
    z1 = F.conv2d(x, primary_weight, None, stride, same_padding(primary_weight)).contiguous()
    batch, init, height, width = z1.shape
    ghosts, plane = cheap_weight.shape[0], height * width
    copies, keep = ghosts // init, out_channels - init
    accumulate = torch.float64 if x.dtype == torch.float64 else torch.float32
    acc = _accumulator(x.dtype)
    relu = activation == "relu"
    mean1, var1 = _statistics(z1, accumulate)
    _, scale1, shift1 = _normalisation(primary_gamma, primary_beta, mean1, var1, primary_eps)
    out = torch.empty((batch, out_channels, height, width), dtype=x.dtype, device=x.device)
    z2 = torch.empty((batch, ghosts, height, width), dtype=x.dtype, device=x.device)
    blocks = _cdiv(plane, BLOCK)
    pixel_align = _alignment(x.element_size(), (plane,))
    launch(
        _cheap_forward_kernel, (batch * init, blocks),
        z1, scale1, shift1, cheap_weight.contiguous(), out, z2, height, width, plane // pixel_align, init, ghosts,
        out_channels, D=d, COPIES=copies, CP=_block(copies, 1, 64), RELU=relu, BLOCK=BLOCK, PIXEL_ALIGN=pixel_align,
        ACC=acc)
    mean2, var2 = _statistics(z2, accumulate)
    _, scale2, shift2 = _normalisation(cheap_gamma, cheap_beta, mean2, var2, cheap_eps)
    if keep:
        launch(_ghost_output_kernel, (batch * keep, blocks), z2, scale2, shift2, out, plane // pixel_align, keep,
               ghosts, init, out_channels, RELU=relu, BLOCK=BLOCK, PIXEL_ALIGN=pixel_align, ACC=acc)
    stats = (t.to(x.dtype) for t in (mean1, var1, mean2, var2))
    return (out.contiguous(memory_format=output_memory_format(x)), z1, z2, *stats)


def backward(grad, x, primary_weight, primary_gamma, primary_beta, cheap_weight, cheap_gamma, cheap_beta, z1, z2,
             mean1, var1, mean2, var2, out_channels, stride, activation, primary_eps, cheap_eps):
    """ghost_module_train_backward's grads (x, W1, gamma1, beta1, W2, gamma2, beta2)."""
    d = cheap_weight.shape[-1]
    batch, init, height, width = z1.shape
    ghosts, plane = cheap_weight.shape[0], height * width
    copies, keep = ghosts // init, out_channels - init
    count = batch * plane
    accumulate = torch.float64 if x.dtype == torch.float64 else torch.float32
    acc = _accumulator(x.dtype)
    relu = activation == "relu"
    grad = grad.contiguous()
    mean1, var1, mean2, var2 = (t.to(accumulate) for t in (mean1, var1, mean2, var2))
    rstd1, scale1, shift1 = _normalisation(primary_gamma, primary_beta, mean1, var1, primary_eps)
    rstd2, scale2, shift2 = _normalisation(cheap_gamma, cheap_beta, mean2, var2, cheap_eps)
    blocks = _cdiv(plane, BLOCK)
    pixel_align = _alignment(x.element_size(), (plane,))
    sums2 = torch.zeros(2 * keep, dtype=accumulate, device=x.device)
    if keep:
        launch(_grad_sums_kernel, (batch * keep, blocks), grad, z2, scale2, shift2, mean2, sums2,
               plane // pixel_align, keep, out_channels, init, ghosts, RELU=relu, BLOCK=BLOCK,
               PIXEL_ALIGN=pixel_align, ACC=acc)
    grad_beta2, grad_gamma2 = (torch.zeros(ghosts, dtype=accumulate, device=x.device) for _ in range(2))
    grad_beta2[:keep] = sums2[:keep]
    grad_gamma2[:keep] = sums2[keep:] * rstd2[:keep]
    mean_dy2, slope2 = grad_beta2 / count, grad_gamma2 * rstd2 / count
    dy1 = torch.empty_like(z1)
    grad_w2 = torch.zeros(ghosts * d * d, dtype=accumulate, device=x.device)
    launch(
        _cheap_backward_kernel, (batch * init, blocks),
        grad, z1, z2, cheap_weight.contiguous(), scale1, shift1, scale2, shift2, mean2, mean_dy2, slope2, dy1, grad_w2,
        height, width, plane // pixel_align, init, ghosts, keep, out_channels,
        D=d, COPIES=copies, CP=_block(copies, 1, 64), RELU=relu, BLOCK=BLOCK, PIXEL_ALIGN=pixel_align, ACC=acc)
    sums1 = torch.zeros(2 * init, dtype=accumulate, device=x.device)
    launch(_grad_sums_kernel, (batch * init, blocks), dy1, z1, scale1, shift1, mean1, sums1, plane // pixel_align,
           init, init, 0, init, RELU=False, BLOCK=BLOCK, PIXEL_ALIGN=pixel_align, ACC=acc)
    grad_beta1, grad_gamma1 = sums1[:init], sums1[init:] * rstd1
    launch(_batch_norm_backward_kernel, (batch * init, blocks), dy1, z1, scale1, mean1, grad_beta1 / count,
           grad_gamma1 * rstd1 / count, plane // pixel_align, init, BLOCK=BLOCK, PIXEL_ALIGN=pixel_align, ACC=acc)
    grad_x, grad_w1, _ = torch.ops.aten.convolution_backward(
        dy1, x, primary_weight, None, [stride] * 2, same_padding(primary_weight), [1, 1], False, [0, 0], 1, [True, True, False])
    grads = (grad_gamma1, grad_beta1, grad_w2.view(cheap_weight.shape), grad_gamma2, grad_beta2)
    return (grad_x.contiguous(memory_format=output_memory_format(x)), grad_w1.contiguous(),
            *(g.to(x.dtype) for g in grads))
