// The Ghost module's fused CPU backward (docs/math.md section 4): per (image, band), the forward
// output holds x1 = act(z1) and act(z2), so the activation masks need no recomputation; the
// depthwise transpose, both masks and the depthwise weight grads run in one pass, then two small
// GEMMs give grad_x and grad_W1. A primary kernel larger than 1x1 gets its grads from
// at::convolution_backward.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "gemm.h"
#include "ghost_common.h"
#include "ghost_cpu.h"
#include "isa.h"
#include "ops.h"
#include "output_pool.h"
#include "scratch.h"

namespace ghostkernels {
namespace {

template <typename T>
struct BackwardArgs {
  const Geometry* g;
  const Tiling* t;
  const T* grad;   // grad of out, same layout as out
  const T* out;    // forward output: x1 and act(z2)
  const T* x;
  const T* w1;     // [init, inp]
  const T* w2;     // [ghosts, dw * dw]
  const T* w2t;    // [dw * dw, ghosts]
  const T* masks;
  int64_t mask_stride;
  T* grad_x;       // 1x1 primary: grad of x (zeroed when a stride > 1 skips pixels); else nullptr
  T* grad_z1;      // kernel > 1: grad of the primary conv's pre-activation output
  T* partials;     // per thread: gw1 [init * inp] (NCHW: transposed), gb1 [init], gw2, gb2
};

// NCHW with more input than intrinsic channels keeps its gw1 partials transposed (inp x init).
bool gw1_transposed(const Geometry& g) { return !g.channels_last && g.inp > g.init; }

// One thread's gradient accumulators inside a shared array (NCHW with inp > init keeps gw1
// transposed, see gw1_transposed).
template <typename T>
struct Partials {
  T *gw1, *gb1, *gw2, *gb2;
  static int64_t size(const Geometry& g) { return g.init * g.inp + g.init + g.ghosts * g.dw * g.dw + g.ghosts; }
  Partials(T* all, int64_t thread, const Geometry& g) {
    gw1 = all + thread * size(g);
    gb1 = gw1 + g.init * g.inp;
    gw2 = gb1 + g.init;
    gb2 = gw2 + g.ghosts * g.dw * g.dw;
  }
};

// grad_x[n, :, rows] += W1^T gz1 and gw1 += gz1 x^T for the band [r0, r1) of one image.
// gz1 is [init][p] (NCHW) or [p][init] (NHWC).
template <typename T>
GK_INLINE void primary_grads(const BackwardArgs<T>& a, int64_t n, int64_t r0, int64_t r1, const T* gz1,
                   T* scratch, T* gw1, T* pack, T* gx_band, T* panel) {
  const Geometry& g = *a.g;
  const int64_t W = g.out_width, p = (r1 - r0) * W, s = g.stride;
  const bool strided = s != 1;
  if (!g.channels_last) {
    const T* xb = a.x + n * g.inp * g.height * g.width + r0 * g.width;
    int64_t ld_x = g.height * g.width;
    if (strided) {
      for (int64_t k = 0; k < g.inp; ++k)
        for (int64_t q = 0; q < p; ++q)
          pack[k * p + q] = a.x[((n * g.inp + k) * g.height + (r0 + q / W) * s) * g.width + q % W * s];
      xb = pack;
      ld_x = p;
    }
    // gx[k][q] = sum_c W1[c][k] gz1[c][q]
    T* gx = strided ? gx_band : a.grad_x + n * g.inp * g.height * g.width + r0 * g.width;
    const int64_t ld_gx = strided ? p : g.height * g.width;
    gemm_nn_call<T>(g.inp, p, g.init, a.w1, 1, g.inp, gz1, p, gx, ld_gx, false, panel);
    if (strided)
      for (int64_t k = 0; k < g.inp; ++k)
        for (int64_t q = 0; q < p; ++q)
          a.grad_x[((n * g.inp + k) * g.height + (r0 + q / W) * s) * g.width + q % W * s] = gx[k * p + q];
    // Both operands of gw1 are pixel-contiguous: transpose the smaller one (into `scratch`).
    if (gw1_transposed(g)) {  // gw1^T[k][c] += sum_q x[k][q] gz1^T[q][c]
      transpose(gz1, g.init, p, p, scratch, g.init);
      gemm_nn_call<T>(g.inp, g.init, p, xb, ld_x, 1, scratch, g.init, gw1, g.init, true, panel);
    } else {  // gw1[c][k] += sum_q gz1[c][q] x^T[q][k]
      transpose(xb, g.inp, p, ld_x, scratch, g.inp);
      gemm_nn_call<T>(g.init, g.inp, p, gz1, p, 1, scratch, g.inp, gw1, g.inp, true, panel);
    }
  } else {
    const T* xb = a.x + (n * g.height + r0) * g.width * g.inp;
    if (strided) {
      for (int64_t q = 0; q < p; ++q)
        std::memcpy(pack + q * g.inp,
                    a.x + ((n * g.height + (r0 + q / W) * s) * g.width + q % W * s) * g.inp,
                    g.inp * sizeof(T));
      xb = pack;
    }
    // gx[q][k] = sum_c gz1[q][c] W1[c][k]
    T* gx = strided ? gx_band : a.grad_x + (n * g.height + r0) * g.width * g.inp;
    gemm_nn_call<T>(p, g.inp, g.init, gz1, g.init, 1, a.w1, g.inp, gx, g.inp, false, panel);
    if (strided)
      for (int64_t q = 0; q < p; ++q)
        std::memcpy(a.grad_x + ((n * g.height + (r0 + q / W) * s) * g.width + q % W * s) * g.inp,
                    gx + q * g.inp, g.inp * sizeof(T));
    // gw1[c][k] += sum_q gz1[q][c] x[q][k]
    gemm_nn_call<T>(g.init, g.inp, p, gz1, 1, g.init, xb, g.inp, gw1, g.inp, true, panel);
  }
}

template <typename T>
void backward_nchw(const BackwardArgs<T>& a, int64_t begin, int64_t end) {
  const Geometry& g = *a.g;
  const Tiling& t = *a.t;
  const int64_t W = g.out_width, pad = g.pad, taps_n = g.dw * g.dw;
  const int64_t ld = (t.rows + 2 * pad) * W + 2 * pad + kSlack;
  std::vector<T> y1(g.init * ld), gz2(std::max<int64_t>(g.keep, 1) * ld);
  std::vector<T> gz1(g.init * t.rows * W);
  std::vector<T> scratch(g.kernel == 1 ? std::min(g.init, g.inp) * t.rows * W : 0);
  std::vector<T> pack(g.stride != 1 ? g.inp * t.rows * W : 0), gx_band(pack.size());
  std::vector<T> panel(kBlock * 2 * Simd<T>::lanes);
  // The adjoint taps take each ghost channel's weights; the forward ones serve the weight grads'
  // offsets and masks only.
  std::vector<Tap<T>> taps(taps_n), adjoint(taps_n);
  make_taps(g, a.masks, a.mask_stride, false, taps.data());
  make_taps(g, a.masks, a.mask_stride, true, adjoint.data());
  const Partials<T> part(a.partials, at::get_thread_num(), g);
  T *gw1 = part.gw1, *gb1 = part.gb1, *gw2 = part.gw2, *gb2 = part.gb2;
  const int64_t plane = g.plane();
  for (int64_t item = begin; item < end; ++item) {
    const int64_t n = item / t.bands, band = item % t.bands;
    const int64_t r0 = band * t.rows, r1 = std::min(g.out_height, r0 + t.rows);
    const int64_t h0 = std::max<int64_t>(0, r0 - pad), h1 = std::min(g.out_height, r1 + pad);
    const int64_t p = (r1 - r0) * W, lead = pad + (h0 - (r0 - pad)) * W, rows_p = (h1 - h0) * W;
    auto load_halo = [&](T* dst, int64_t channel, bool masked) {
      const int64_t off = (n * g.out_channels + channel) * plane + h0 * W;
      std::fill(dst, dst + lead, T(0));
      for (int64_t q = 0; q < rows_p; ++q)
        dst[lead + q] = masked ? activation_grad(a.grad[off + q], a.out[off + q], g.act) : a.out[off + q];
      std::fill(dst + lead + rows_p, dst + ld, T(0));
    };
    for (int64_t c = 0; c < g.init; ++c) load_halo(y1.data() + c * ld, c, false);
    for (int64_t j = 0; j < g.keep; ++j) load_halo(gz2.data() + j * ld, g.init + j, true);
    for (int64_t c = 0; c < g.init; ++c) {
      const T* y1c = y1.data() + c * ld + pad + pad * W;
      T* gzc = gz1.data() + c * p;
      std::memcpy(gzc, a.grad + (n * g.out_channels + c) * plane + r0 * W, p * sizeof(T));
      for (int64_t j = g.ghost_begin(c); j < g.ghost_end(c); ++j) {
        const T* gz2j = gz2.data() + j * ld + pad + pad * W;
        apply_taps(gzc, gz2j, p, adjoint.data(), a.w2 + j * taps_n, g.dw, true, T(0), Activation::None);
        for (const Tap<T>& tap : taps)
          gw2[j * taps_n + tap.index] += masked_dot(gz2j, y1c + tap.offset, p, tap.mask);
        gb2[j] += sum(gz2j, p);
      }
      for (int64_t q = 0; q < p; ++q) gzc[q] = activation_grad(gzc[q], y1c[q], g.act);
      gb1[c] += sum(gzc, p);
    }
    if (g.kernel == 1) {
      primary_grads(a, n, r0, r1, gz1.data(), scratch.data(), gw1, pack.data(), gx_band.data(), panel.data());
    } else {
      for (int64_t c = 0; c < g.init; ++c)
        std::memcpy(a.grad_z1 + ((n * g.init + c) * g.out_height + r0) * W, gz1.data() + c * p, p * sizeof(T));
    }
  }
}

template <typename T>
void backward_nhwc(const BackwardArgs<T>& a, int64_t begin, int64_t end) {
  const Geometry& g = *a.g;
  const Tiling& t = *a.t;
  const int64_t W = g.out_width, pad = g.pad, dw = g.dw, taps_n = dw * dw, C = g.out_channels;
  std::vector<T> gz2((t.rows + 2 * pad) * W * std::max<int64_t>(g.keep, 1));  // [row][col][ghost]
  std::vector<T> gz1(t.rows * W * g.init);                                   // [q][channel]
  std::vector<T> pack(g.stride != 1 ? t.rows * W * g.inp : 0), gx_band(pack.size());
  std::vector<T> panel(kBlock * 2 * Simd<T>::lanes);
  const Partials<T> part(a.partials, at::get_thread_num(), g);
  T *gw1 = part.gw1, *gb1 = part.gb1, *gw2 = part.gw2, *gb2 = part.gb2;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t n = item / t.bands, band = item % t.bands;
    const int64_t r0 = band * t.rows, r1 = std::min(g.out_height, r0 + t.rows);
    const int64_t h0 = std::max<int64_t>(0, r0 - pad), h1 = std::min(g.out_height, r1 + pad);
    // gz2 row i holds output row r0 - pad + i; rows outside the image are never read.
    for (int64_t h = h0; h < h1; ++h)
      for (int64_t w = 0; w < W; ++w) {
        const int64_t off = ((n * g.out_height + h) * W + w) * C + g.init;
        T* dst = gz2.data() + ((h - r0 + pad) * W + w) * g.keep;
        for (int64_t j = 0; j < g.keep; ++j) dst[j] = activation_grad(a.grad[off + j], a.out[off + j], g.act);
      }
    for (int64_t h = r0; h < r1; ++h)
      for (int64_t w = 0; w < W; ++w) {
        const int64_t off = ((n * g.out_height + h) * W + w) * C;
        T* gzq = gz1.data() + ((h - r0) * W + w) * g.init;
        std::memcpy(gzq, a.grad + off, g.init * sizeof(T));
        const T* gz2q = gz2.data() + ((h - r0 + pad) * W + w) * g.keep;
        for (int64_t j = 0; j < g.keep; ++j) gb2[j] += gz2q[j];
        for (int64_t dy = 0; dy < dw; ++dy)
          for (int64_t dx = 0; dx < dw; ++dx) {
            const int64_t sy = dy - pad, sx = dx - pad;
            const int64_t tp = dy * dw + dx;
            const T* wt = a.w2t + tp * g.ghosts;
            // Adjoint: grad of x1 at (h, w) gathers gz2 at (h - sy, w - sx).
            const int64_t ha = h - sy, wa = w - sx;
            if (ha >= 0 && ha < g.out_height && wa >= 0 && wa < W) {
              const T* s = gz2.data() + ((ha - r0 + pad) * W + wa) * g.keep;
              for (int64_t j = 0; j < g.keep; ++j) gzq[j / g.copies] += wt[j] * s[j];
            }
            // Weight grad: gz2 at (h, w) times x1 at (h + sy, w + sx).
            const int64_t hb = h + sy, wb = w + sx;
            if (hb >= 0 && hb < g.out_height && wb >= 0 && wb < W) {
              const T* y = a.out + ((n * g.out_height + hb) * W + wb) * C;
              for (int64_t j = 0; j < g.keep; ++j) gw2[j * taps_n + tp] += gz2q[j] * y[j / g.copies];
            }
          }
        const T* y1 = a.out + off;
        for (int64_t c = 0; c < g.init; ++c) {
          gzq[c] = activation_grad(gzq[c], y1[c], g.act);
          gb1[c] += gzq[c];
        }
      }
    if (g.kernel == 1) {
      primary_grads<T>(a, n, r0, r1, gz1.data(), nullptr, gw1, pack.data(), gx_band.data(), panel.data());
    } else {
      std::memcpy(a.grad_z1 + (n * g.out_height + r0) * W * g.init, gz1.data(), (r1 - r0) * W * g.init * sizeof(T));
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ghost_module_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& out_in, const at::Tensor& x_in, const at::Tensor& w1_in,
    const c10::optional<at::Tensor>& b1, const at::Tensor& w2_in, const c10::optional<at::Tensor>& b2,
    int64_t out_channels, int64_t stride, c10::string_view activation) {
  const Geometry g = check_and_describe(x_in, w1_in, b1, w2_in, b2, out_channels, stride, activation);
  const std::vector<int64_t> out_shape{g.batch, out_channels, g.out_height, g.out_width};
  TORCH_CHECK(grad_in.sizes() == out_shape && out_in.sizes() == out_shape,
              "ghost_module_backward: grad and out must have shape ", out_shape);
  const at::MemoryFormat fmt = memory_format(g);
  const at::Tensor x = x_in.contiguous(fmt), grad = grad_in.contiguous(fmt), out = out_in.contiguous(fmt);
  const at::Tensor w1 = w1_in.contiguous(), w2 = w2_in.contiguous();
  // 1x1 primary: bands write every element of grad_x except where a strided primary skips
  // pixels. A larger primary gets grad_x from convolution_backward below.
  at::Tensor grad_x = g.kernel != 1 ? at::Tensor() : empty_output(x.sizes(), x.options(), fmt);
  if (g.kernel == 1 && g.stride != 1) grad_x.zero_();
  at::Tensor grad_z1 = g.kernel == 1 ? at::Tensor()
                                     : empty_output({g.batch, g.init, g.out_height, g.out_width}, x.options(), fmt);
  const int64_t threads = at::get_num_threads();
  at::Tensor gw1 = at::zeros_like(w1), gb1 = at::zeros({g.init}, x.options());
  at::Tensor gw2 = at::zeros_like(w2), gb2 = at::zeros({g.ghosts}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ghost_module_backward_cpu", [&] {
    using T = scalar_t;
    std::vector<T> partials(threads * Partials<T>::size(g), T(0));
    if (grad.numel() > 0) {
      Tiling t = choose_tiling(g, sizeof(T), false, 1024 * 1024, 2);
      const int64_t mask_rows = t.rows + 2 * g.pad;
      const auto masks = column_masks<T>(g, mask_rows);
      const std::vector<T> w2t = transposed(w2.data_ptr<T>(), g.ghosts, g.dw * g.dw);
      BackwardArgs<T> a{&g, &t, grad.data_ptr<T>(), out.data_ptr<T>(), x.data_ptr<T>(), w1.data_ptr<T>(),
                        w2.data_ptr<T>(), w2t.data(), masks->data(), mask_stride(g, mask_rows),
                        grad_x.defined() ? grad_x.data_ptr<T>() : nullptr,
                        grad_z1.defined() ? grad_z1.data_ptr<T>() : nullptr,
                        partials.data()};
      at::parallel_for(0, g.batch * t.bands, 1, [&](int64_t begin, int64_t end) {
        if (g.channels_last) backward_nhwc(a, begin, end);
        else backward_nchw(a, begin, end);
      });
    }
    // Sum the per-thread partials in thread order: deterministic for a fixed thread count.
    const int64_t taps_n = g.dw * g.dw;
    T* gw1p = gw1.data_ptr<T>();
    for (int64_t th = 0; th < threads; ++th) {
      const Partials<T> part(partials.data(), th, g);
      if (g.kernel == 1) {
        for (int64_t c = 0; c < g.init; ++c)
          for (int64_t k = 0; k < g.inp; ++k)
            gw1p[c * g.inp + k] += gw1_transposed(g) ? part.gw1[k * g.init + c] : part.gw1[c * g.inp + k];
      }
      for (int64_t c = 0; c < g.init; ++c) gb1.data_ptr<T>()[c] += part.gb1[c];
      for (int64_t i = 0; i < g.ghosts * taps_n; ++i) gw2.data_ptr<T>()[i] += part.gw2[i];
      for (int64_t j = 0; j < g.ghosts; ++j) gb2.data_ptr<T>()[j] += part.gb2[j];
    }
  });
  if (g.kernel != 1) {
    auto grads = at::convolution_backward(grad_z1, x, w1, at::IntArrayRef{g.init}, {g.stride, g.stride},
                                          {g.kernel / 2, g.kernel / 2}, {1, 1}, false, {0, 0}, 1,
                                          {true, true, false});
    grad_x = std::get<0>(grads);
    gw1 = std::get<1>(grads);
  }
  return {grad_x, gw1, gb1, gw2, gb2};
}

}  // namespace ghostkernels
