// Batch-statistics (training-mode) CPU kernels of the Ghost module, docs/math.md section 8:
// conv -> BN -> act -> depthwise -> BN -> act -> concat, each BN normalising by the batch's
// own mean and biased variance, as nn.BatchNorm2d does in train mode.
//
// Forward, three passes over the batch, NCHW:
//  1. per image, z1 = W1 x (one GEMM; shifted GEMMs for a k x k stride-1 primary of few input
//     channels, the library conv for the others, see Primary), and each (image, channel)
//     plane's mean and sum of squared deviations while it is in cache;
//  2. per (image, intrinsic channel), x1 = act(BN1(z1)) written once to out and into a plane
//     buffer with zero halo rows, z2 = its depthwise taps for each of its ghost channels, and
//     their plane moments;
//  3. act(BN2(z2)) into out's ghost channels the slice keeps.
// The plane moments combine exactly (Chan et al.) in double. z1 and z2 are returned for the
// backward; out is not needed there (x1 and the ReLU masks are recomputed from z1 and z2), so
// the caller may add into out in place, as GhostNet's bottlenecks do.
//
// Backward, three passes: BN2's two sums per ghost plane; per (image, intrinsic channel) the
// grad of z2, its depthwise adjoint added to the grad of x1, the depthwise weight grads and
// BN1's two sums; the grad of z1 in place, then grad_x and grad_W1 as GEMMs.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/conv2d.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>

#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "batch_stats.h"
#include "gemm.h"
#include "ghost_common.h"
#include "isa.h"
#include "ops.h"
#include "output_pool.h"
#include "shifted_conv.h"

namespace ghostkernels {
namespace {

// How the primary conv runs: a 1x1 stride-1 one by our GEMM; a k x k stride-1 one with at
// most kMostShiftedInputs input channels by shifted_conv.h (forward, grad_x and grad_W1); any
// other by the library (oneDNN), whose k x k convs of few channels are slow: measured here at
// batch 64, 3x3 16->8 at 32x32, channels_last, 1.09 ms forward and 2.65 ms backward (about
// 140 and 115 GFLOP/s, where 32->16 at 16x16 runs at 300), plus the layout conversions.
enum class Primary { Gemm, Shifted, Library };
constexpr int64_t kMostShiftedInputs = 16;

Primary primary_kind(const Geometry& g) {
  if (g.stride != 1) return Primary::Library;
  if (g.kernel == 1) return Primary::Gemm;
  return g.inp <= kMostShiftedInputs ? Primary::Shifted : Primary::Library;
}

template <typename T>
struct TrainArgs {
  const Geometry* g;
  const T *x, *w1, *w2;
  const T* masks;
  int64_t mask_stride;
  Primary primary;
};

// ---------------------------------------------------------------------------------------
// Forward

template <typename T>
void primary_pass(const TrainArgs<T>& a, T* z1, Moments* moments, int64_t begin, int64_t end) {
  const Geometry& g = *a.g;
  const int64_t P = g.plane();
  std::vector<T> panel(kBlock * 2 * Simd<T>::lanes);
  const bool shifted = a.primary == Primary::Shifted;
  const PaddedPlanes pad(g.height, g.width, g.kernel);
  std::vector<T> planes(shifted ? g.inp * pad.stride : 0, T(0)), wide(shifted ? g.init * pad.outputs() : 0);
  std::vector<const T*> rows(shifted ? g.inp * g.kernel * g.kernel : 0);
  for (int64_t n = begin; n < end; ++n) {
    T* z = z1 + n * g.init * P;
    const T* x = a.x + n * g.inp * g.height * g.width;
    if (a.primary == Primary::Gemm) gemm_nn<T>(g.init, P, g.inp, a.w1, g.inp, 1, x, P, z, P, false, panel.data());
    if (shifted) {
      pad.fill(x, g.inp, planes.data());
      shifted_conv(pad, planes.data(), g.inp, g.kernel, a.w1, g.init, rows.data(), wide.data());
      pad.crop(wide.data(), g.init, z);
    }
    for (int64_t c = 0; c < g.init; ++c) moments[n * g.init + c] = plane_moments(z + c * P, P);
  }
}

// Items are (image, intrinsic channel): x1 into out and a halo plane, then z2 for every ghost
// channel (BN2's statistics cover those the slice drops, as the original module's do).
template <typename T>
void cheap_pass(const TrainArgs<T>& a, const Normalised<T>& bn1, const T* z1, T* z2, T* out,
                Moments* moments, int64_t begin, int64_t end) {
  const Geometry& g = *a.g;
  const int64_t P = g.plane(), taps_n = g.dw * g.dw;
  HaloPlane<T> buffer(g);
  T* x1 = buffer.plane();
  std::vector<Tap<T>> taps(taps_n);
  make_taps(g, a.masks, a.mask_stride, false, taps.data());
  for (int64_t item = begin; item < end; ++item) {
    const int64_t n = item / g.init, c = item % g.init;
    const T* z = z1 + item * P;
    T* o = out + (n * g.out_channels + c) * P;
    const T scale = bn1.scale[c], shift = bn1.shift[c];
    const Activation act = g.act;
    over_plane<T>(P, [&](int64_t q, auto x) {
      using X = decltype(x);
      const X v = activate_vector(load<X>(z + q) * scale + shift, act);
      store(x1 + q, v);
      store(o + q, v);
    });
    for (int64_t j = c * g.copies; j < (c + 1) * g.copies; ++j) {
      T* z2j = z2 + (n * g.ghosts + j) * P;
      apply_taps(z2j, x1, P, taps.data(), a.w2 + j * taps_n, g.dw, false, T(0), Activation::None);
      moments[n * g.ghosts + j] = plane_moments(z2j, P);
    }
  }
}

// Items are (image, kept ghost channel).
template <typename T>
void ghost_output_pass(const Geometry& g, const Normalised<T>& bn2, const T* z2, T* out,
                       int64_t begin, int64_t end) {
  const int64_t P = g.plane(), keep = g.keep;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t n = item / keep, j = item % keep;
    const T* z = z2 + (n * g.ghosts + j) * P;
    T* o = out + (n * g.out_channels + g.init + j) * P;
    const T scale = bn2.scale[j], shift = bn2.shift[j];
    const Activation act = g.act;
    over_plane<T>(P, [&](int64_t q, auto x) {
      using X = decltype(x);
      store(o + q, activate_vector(load<X>(z + q) * scale + shift, act));
    });
  }
}

// ---------------------------------------------------------------------------------------
// Backward

// Items are (image, kept ghost channel): BN2's two sums.
template <typename T>
void ghost_sums_pass(const Geometry& g, const Normalised<T>& bn2, const T* grad, const T* z2,
                     double* sums, int64_t begin, int64_t end) {
  const int64_t P = g.plane(), keep = g.keep;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t n = item / keep, j = item % keep;
    plane_grad_sums(grad + (n * g.out_channels + g.init + j) * P, z2 + (n * g.ghosts + j) * P, P, bn2, j, g.act,
                    sums + item * 2);
  }
}

// Items are (image, intrinsic channel): dz2 of the channel's kept ghosts, its depthwise adjoint
// added to out's grad at x1, the depthwise weight grads (into this thread's `grad_w2`), then
// dy1 = the activation's grad into `grad_z1` and BN1's two sums.
template <typename T>
void cheap_backward_pass(const TrainArgs<T>& a, const Normalised<T>& bn1, const Normalised<T>& bn2,
                         const BatchNormGrad<T>& d2, const T* grad, const T* z1, const T* z2,
                         T* grad_z1, T* grad_w2_all, double* sums, int64_t begin, int64_t end) {
  const Geometry& g = *a.g;
  const int64_t P = g.plane(), taps_n = g.dw * g.dw;
  HaloPlane<T> x1_buffer(g), dz2_buffer(g);
  T *x1 = x1_buffer.plane(), *dz2 = dz2_buffer.plane();
  std::vector<Tap<T>> taps(taps_n), adjoint(taps_n);  // the forward taps: offsets and masks only
  make_taps(g, a.masks, a.mask_stride, false, taps.data());
  make_taps(g, a.masks, a.mask_stride, true, adjoint.data());
  T* grad_w2 = grad_w2_all + at::get_thread_num() * g.ghosts * taps_n;
  const Activation act = g.act;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t n = item / g.init, c = item % g.init;
    const T* z = z1 + item * P;
    T* dx1 = grad_z1 + item * P;
    const T scale1 = bn1.scale[c], shift1 = bn1.shift[c];
    std::memcpy(dx1, grad + (n * g.out_channels + c) * P, P * sizeof(T));
    over_plane<T>(P, [&](int64_t q, auto x) {
      using X = decltype(x);
      store(x1 + q, activate_vector(load<X>(z + q) * scale1 + shift1, act));
    });
    for (int64_t j = g.ghost_begin(c); j < g.ghost_end(c); ++j) {
      const T* dy = grad + (n * g.out_channels + g.init + j) * P;
      const T* z2j = z2 + (n * g.ghosts + j) * P;
      const T scale = bn2.scale[j], shift = bn2.shift[j], mean = bn2.mean[j];
      const T mean_dy = d2.mean_dy[j], slope = d2.slope[j];
      over_plane<T>(P, [&](int64_t q, auto x) {
        using X = decltype(x);
        const X zq = load<X>(z2j + q);
        store(dz2 + q, scale * (activation_grad(load<X>(dy + q), zq * scale + shift, act) - mean_dy -
                                (zq - mean) * slope));
      });
      apply_taps(dx1, dz2, P, adjoint.data(), a.w2 + j * taps_n, g.dw, true, T(0), Activation::None);
      for (const Tap<T>& tap : taps) grad_w2[j * taps_n + tap.index] += masked_dot(dz2, x1 + tap.offset, P, tap.mask);
    }
    over_plane<T>(P, [&](int64_t q, auto x) {
      using X = decltype(x);
      store(dx1 + q, activation_grad(load<X>(dx1 + q), load<X>(z + q) * scale1 + shift1, act));
    });
    plane_grad_sums(dx1, z, P, bn1, c, Activation::None, sums + item * 2);
  }
}

// Items are images: dz1 = BN1's backward in place, then grad_x = W1^T dz1 on the GEMM path;
// on the shifted path grad_x = the conv of dz1 by `w1_flipped` (W1 transposed, its taps
// reversed) and this thread's grad_W1 lane partials (in `grad_w1_all`) += dz1 . the taps of x.
template <typename T>
void primary_backward_pass(const TrainArgs<T>& a, const Normalised<T>& bn1,
                           const BatchNormGrad<T>& d1, const T* z1, T* grad_z1, T* grad_x,
                           const T* w1_flipped, T* grad_w1_all, int64_t begin, int64_t end) {
  const Geometry& g = *a.g;
  const int64_t P = g.plane(), k = g.kernel;
  std::vector<T> panel(kBlock * 2 * Simd<T>::lanes);
  const bool shifted = a.primary == Primary::Shifted;
  const PaddedPlanes pad(g.height, g.width, k);
  std::vector<T> x_planes(shifted ? g.inp * pad.stride : 0, T(0)), dz_planes(shifted ? g.init * pad.stride : 0, T(0));
  std::vector<T> wide(shifted ? g.inp * pad.outputs() : 0);
  std::vector<const T*> rows(shifted ? std::max(g.inp, g.init) * k * k : 0);
  // per thread, lane by lane (shifted_dots)
  T* grad_w1 = shifted ? grad_w1_all + at::get_thread_num() * g.init * g.inp * k * k * Simd<T>::lanes : nullptr;
  for (int64_t n = begin; n < end; ++n) {
    for (int64_t c = 0; c < g.init; ++c) {
      const T* z = z1 + (n * g.init + c) * P;
      T* dz = grad_z1 + (n * g.init + c) * P;
      const T scale = bn1.scale[c], mean = bn1.mean[c], mean_dy = d1.mean_dy[c], slope = d1.slope[c];
      over_plane<T>(P, [&](int64_t q, auto x) {
        using X = decltype(x);
        store(dz + q, scale * (load<X>(dz + q) - mean_dy - (load<X>(z + q) - mean) * slope));
      });
    }
    if (a.primary == Primary::Gemm)  // grad_x[k][q] = sum_c W1[c][k] dz1[c][q]
      gemm_nn<T>(g.inp, P, g.init, a.w1, 1, g.inp, grad_z1 + n * g.init * P, P, grad_x + n * g.inp * P, P, false,
                 panel.data());
    if (shifted) {
      pad.fill(grad_z1 + n * g.init * P, g.init, dz_planes.data());
      shifted_conv(pad, dz_planes.data(), g.init, k, w1_flipped, g.inp, rows.data(), wide.data());
      pad.crop(wide.data(), g.inp, grad_x + n * g.inp * P);
      pad.fill(a.x + n * g.inp * P, g.inp, x_planes.data());
      pad.tap_rows(static_cast<const T*>(x_planes.data()), g.inp, k, rows.data());
      shifted_dots(g.init, g.inp * k * k, pad.outputs(), pad.as_padded_width(dz_planes.data()), pad.stride,
                   rows.data(), grad_w1);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Argument checks and the op entry points

Geometry describe(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& g1, const at::Tensor& b1,
                  const at::Tensor& w2, const at::Tensor& g2, const at::Tensor& b2, int64_t out_channels,
                  int64_t stride, c10::string_view activation) {
  TORCH_CHECK(x.dim() == 4, "ghost_module_train: x must be a 4-D tensor (N, C, H, W), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "ghost_module_train: the CPU kernel takes float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(w1.dim() == 4 && w1.size(1) == x.size(1) && w1.size(2) == w1.size(3) && w1.size(2) % 2 == 1,
              "ghost_module_train: primary_weight must be (init, ", x.size(1), ", k, k) with odd k, got ", w1.sizes());
  const int64_t init = w1.size(0);
  TORCH_CHECK(w2.dim() == 4 && w2.size(1) == 1 && w2.size(2) == w2.size(3) && w2.size(2) % 2 == 1 && init > 0 &&
                  w2.size(0) > 0 && w2.size(0) % init == 0,
              "ghost_module_train: cheap_weight must be (a positive multiple of init=", init,
              ", 1, d, d) with odd d, got ", w2.sizes());
  const int64_t ghosts = w2.size(0);
  TORCH_CHECK(init <= out_channels && out_channels <= init + ghosts, "ghost_module_train: out_channels must be in [",
              init, ", ", init + ghosts, "], got ", out_channels);
  TORCH_CHECK(stride >= 1, "ghost_module_train: stride must be >= 1, got ", stride);
  const std::pair<const char*, const at::Tensor*> vectors[] = {
      {"primary_gamma", &g1}, {"primary_beta", &b1}, {"cheap_gamma", &g2}, {"cheap_beta", &b2}};
  for (const auto& [name, t] : vectors) {
    const int64_t expected = name[0] == 'p' ? init : ghosts;
    TORCH_CHECK(t->dim() == 1 && t->size(0) == expected, "ghost_module_train: ", name, " must have shape (",
                expected, ",), got ", t->sizes());
  }
  for (const at::Tensor* t : {&w1, &w2, &g1, &b1, &g2, &b2})
    TORCH_CHECK(t->scalar_type() == x.scalar_type() && t->device() == x.device(),
                "ghost_module_train: the weights and BN parameters must match x's dtype and device (",
                x.scalar_type(), ", ", x.device(), ")");
  Geometry g{};
  g.batch = x.size(0), g.inp = x.size(1), g.height = x.size(2), g.width = x.size(3);
  g.init = init, g.ghosts = ghosts, g.keep = out_channels - init, g.copies = ghosts / init;
  g.out_channels = out_channels;
  g.kernel = w1.size(2), g.stride = stride, g.dw = w2.size(2), g.pad = w2.size(2) / 2;
  g.out_height = (g.height + 2 * (g.kernel / 2) - g.kernel) / stride + 1;
  g.out_width = (g.width + 2 * (g.kernel / 2) - g.kernel) / stride + 1;
  TORCH_CHECK(g.out_height >= 1 && g.out_width >= 1, "ghost_module_train: x of spatial size ", x.sizes().slice(2),
              " is smaller than the ", g.kernel, "x", g.kernel, " primary kernel");
  TORCH_CHECK(g.batch * g.out_height * g.out_width > 1,
              "ghost_module_train: expected more than 1 value per channel when training, got input size ", x.sizes());
  g.channels_last = false;  // the kernels run NCHW; a channels_last x is converted
  g.act = parse_activation(activation);
  return g;
}

// The BN of `channels` channels from their planes' moments; their batch mean and biased variance
// also into `mean` and `var`, and the running statistics given moved by them.
template <typename T>
Normalised<T> batch_norm(const std::vector<Moments>& planes, const Geometry& g, int64_t channels,
                         const at::Tensor& gamma, const at::Tensor& beta, double eps, at::Tensor& mean,
                         at::Tensor& var, const std::optional<at::Tensor>& running_mean,
                         const std::optional<at::Tensor>& running_var, double momentum) {
  std::vector<double> m(channels), v(channels);
  combine_moments(planes, g.batch, channels, g.plane(), m.data(), v.data());
  update_running<T>(running_mean, running_var, m.data(), v.data(), channels, g.batch * g.plane(), momentum);
  for (int64_t c = 0; c < channels; ++c) {
    mean.data_ptr<T>()[c] = T(m[c]);
    var.data_ptr<T>()[c] = T(v[c]);
  }
  return Normalised<T>(m.data(), v.data(), gamma.data_ptr<T>(), beta.data_ptr<T>(), eps, channels);
}

// Images [begin, end) of x's (C x HW) matrices transposed (to_channels_last) or back; C and HW
// are multiples of the lanes.
template <typename T>
void transpose_images(const T* src, T* dst, int64_t channels, int64_t pixels, bool to_channels_last,
                      int64_t begin, int64_t end) {
  const int64_t rows = to_channels_last ? channels : pixels, cols = to_channels_last ? pixels : channels;
  for (int64_t n = begin; n < end; ++n) transpose(src + n * rows * cols, rows, cols, cols, dst + n * rows * cols, rows);
}

// x in `format` (NCHW or channels_last). Maps whose channels and pixels are multiples of the
// vector width are transposed in registers: ATen's copy converts Ghost-ResNet's 16-channel
// maps at about 3.5 GB/s (4 MB in 1.13 ms).
at::Tensor with_format(const at::Tensor& x, at::MemoryFormat format) {
  if (x.is_contiguous(format)) return x;
  const bool to_channels_last = format == at::MemoryFormat::ChannelsLast;
  const int64_t channels = x.size(1), pixels = x.size(2) * x.size(3), lanes = 64 / x.element_size();
  const auto source = to_channels_last ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast;
  const bool vectors = (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble) && channels % lanes == 0 &&
                       pixels % lanes == 0 && x.is_contiguous(source);
  if (!vectors) return x.contiguous(format);
  at::Tensor out = empty_output(x.sizes(), x.options(), format);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "with_format", [&] {
    at::parallel_for(0, x.size(0), 1, [&](int64_t begin, int64_t end) {
      transpose_images(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), channels, pixels, to_channels_last, begin,
                       end);
    });
  });
  return out;
}

// x as the primary conv reads it: NCHW for our kernels. The library's strided conv reads
// inputs of at most 16 channels channels_last: oneDNN reorders such NCHW inputs on every call.
// Measured here, 3x3 at batch 64 (forward / backward ms, NCHW vs channels_last): 16->8 at 32x32
// 2.05 / 9.12 vs 1.33 / 2.41, 16->16 stride 2 0.71 / 5.37 vs 0.40 / 2.39; the conversions cost
// 0.1-1.1 ms. From 32 channels on NCHW is as fast (32->16 at 16x16 0.64 / 1.33 vs 0.52 / 1.12,
// 64->32 at 8x8 0.52 / 1.22 vs 0.48 / 1.48), not worth the conversions.
at::Tensor primary_input(const at::Tensor& x, const Geometry& g) {
  const bool channels_last = primary_kind(g) == Primary::Library && g.inp <= 16;
  return with_format(x, channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ghost_module_train_cpu(
    const at::Tensor& x_in, const at::Tensor& w1_in, const at::Tensor& g1_in, const at::Tensor& b1_in,
    const at::Tensor& w2_in, const at::Tensor& g2_in, const at::Tensor& b2_in, int64_t out_channels, int64_t stride,
    c10::string_view activation, double eps1, double eps2, const std::optional<at::Tensor>& running_mean1,
    const std::optional<at::Tensor>& running_var1, const std::optional<at::Tensor>& running_mean2,
    const std::optional<at::Tensor>& running_var2, double momentum1, double momentum2) {
  const Geometry g = describe(x_in, w1_in, g1_in, b1_in, w2_in, g2_in, b2_in, out_channels, stride, activation);
  check_running("ghost_module_train", "primary_", running_mean1, running_var1, g.init, x_in);
  check_running("ghost_module_train", "cheap_", running_mean2, running_var2, g.ghosts, x_in);
  const at::Tensor x = primary_input(x_in, g), w1 = w1_in.contiguous(), w2 = w2_in.contiguous();
  const at::Tensor g1 = g1_in.contiguous(), b1 = b1_in.contiguous(), g2 = g2_in.contiguous(), b2 = b2_in.contiguous();
  const at::TensorOptions options = x.options();
  at::Tensor out = empty_output({g.batch, out_channels, g.out_height, g.out_width}, options);
  // Outputs from the output cache (output_pool.h): fresh blocks are page-faulted in on every call.
  at::Tensor z1 = primary_kind(g) != Primary::Library ? empty_output({g.batch, g.init, g.out_height, g.out_width}, options)
                                  : with_format(at::conv2d(x, w1, {}, {stride, stride}, {g.kernel / 2, g.kernel / 2}),
                                                at::MemoryFormat::Contiguous);
  at::Tensor z2 = empty_output({g.batch, g.ghosts, g.out_height, g.out_width}, options);
  at::Tensor mean1 = at::empty({g.init}, options), var1 = at::empty({g.init}, options);
  at::Tensor mean2 = at::empty({g.ghosts}, options), var2 = at::empty({g.ghosts}, options);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ghost_module_train_cpu", [&] {
    const auto masks = column_masks<scalar_t>(g, g.out_height);
    const TrainArgs<scalar_t> a{&g, x.data_ptr<scalar_t>(), w1.data_ptr<scalar_t>(), w2.data_ptr<scalar_t>(),
                                masks->data(), mask_stride(g, g.out_height), primary_kind(g)};
    scalar_t *z1p = z1.data_ptr<scalar_t>(), *z2p = z2.data_ptr<scalar_t>(), *outp = out.data_ptr<scalar_t>();
    std::vector<Moments> moments1(g.batch * g.init), moments2(g.batch * g.ghosts);
    at::parallel_for(0, g.batch, 1, [&](int64_t begin, int64_t end) {
      primary_pass(a, z1p, moments1.data(), begin, end);
    });
    const Normalised<scalar_t> bn1 = batch_norm<scalar_t>(moments1, g, g.init, g1, b1, eps1, mean1, var1,
                                                                running_mean1, running_var1, momentum1);
    at::parallel_for(0, g.batch * g.init, 1, [&](int64_t begin, int64_t end) {
      cheap_pass(a, bn1, z1p, z2p, outp, moments2.data(), begin, end);
    });
    const Normalised<scalar_t> bn2 = batch_norm<scalar_t>(moments2, g, g.ghosts, g2, b2, eps2, mean2, var2,
                                                                running_mean2, running_var2, momentum2);
    at::parallel_for(0, g.batch * g.keep, 1, [&](int64_t begin, int64_t end) {
      ghost_output_pass(g, bn2, z2p, outp, begin, end);
    });
  });
  if (output_format(x_in) == at::MemoryFormat::ChannelsLast) out = out.contiguous(at::MemoryFormat::ChannelsLast);
  return {out, z1, z2, mean1, var1, mean2, var2};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
ghost_module_train_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& w1_in,
                                const at::Tensor& g1_in, const at::Tensor& b1_in, const at::Tensor& w2_in,
                                const at::Tensor& g2_in, const at::Tensor& b2_in, const at::Tensor& z1_in,
                                const at::Tensor& z2_in, const at::Tensor& mean1, const at::Tensor& var1,
                                const at::Tensor& mean2, const at::Tensor& var2, int64_t out_channels, int64_t stride,
                                c10::string_view activation, double eps1, double eps2) {
  const Geometry g = describe(x_in, w1_in, g1_in, b1_in, w2_in, g2_in, b2_in, out_channels, stride, activation);
  TORCH_CHECK(grad_in.sizes() == at::IntArrayRef({g.batch, out_channels, g.out_height, g.out_width}) &&
                  z1_in.sizes() == at::IntArrayRef({g.batch, g.init, g.out_height, g.out_width}) &&
                  z2_in.sizes() == at::IntArrayRef({g.batch, g.ghosts, g.out_height, g.out_width}),
              "ghost_module_train_backward: grad, primary_z and cheap_z do not match the forward's shapes");
  const std::pair<const char*, const at::Tensor*> statistics[] = {
      {"primary_mean", &mean1}, {"primary_var", &var1}, {"cheap_mean", &mean2}, {"cheap_var", &var2}};
  for (const auto& [name, t] : statistics) {
    const int64_t expected = name[0] == 'p' ? g.init : g.ghosts;
    TORCH_CHECK(t->dim() == 1 && t->size(0) == expected, "ghost_module_train_backward: ", name, " must have shape (",
                expected, ",), got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == x_in.scalar_type() && t->device() == x_in.device(), "ghost_module_train_backward: ",
                name, " must match x's dtype and device");
  }
  const at::Tensor x = primary_input(x_in, g), w1 = w1_in.contiguous(), w2 = w2_in.contiguous();
  const at::Tensor grad = grad_in.contiguous(), z1 = z1_in.contiguous(), z2 = z2_in.contiguous();
  const at::TensorOptions options = x.options();
  const int64_t P = g.plane(), taps_n = g.dw * g.dw, threads = at::get_num_threads();
  const double count = double(g.batch * P);
  at::Tensor grad_z1 = empty_output(z1.sizes(), options);
  const Primary primary = primary_kind(g);
  at::Tensor grad_x = primary != Primary::Library ? empty_output(x.sizes(), options) : at::Tensor();
  at::Tensor grad_w1 = primary == Primary::Shifted ? at::empty_like(w1) : at::Tensor();
  at::Tensor grad_w2 = at::empty_like(w2);
  at::Tensor grad_g1 = at::empty({g.init}, options), grad_b1 = at::empty({g.init}, options);
  at::Tensor grad_g2 = at::zeros({g.ghosts}, options), grad_b2 = at::zeros({g.ghosts}, options);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ghost_module_train_backward_cpu", [&] {
    using T = scalar_t;
    const auto masks = column_masks<T>(g, g.out_height);
    const TrainArgs<T> a{&g, x.data_ptr<T>(), w1.data_ptr<T>(), w2.data_ptr<T>(), masks->data(),
                         mask_stride(g, g.out_height), primary};
    auto moments = [](const at::Tensor& m, const at::Tensor& v) {
      const at::Tensor md = m.to(at::kDouble).contiguous(), vd = v.to(at::kDouble).contiguous();
      return std::make_pair(md, vd);
    };
    const auto [m1, v1] = moments(mean1, var1);
    const auto [m2, v2] = moments(mean2, var2);
    const Normalised<T> bn1(m1.data_ptr<double>(), v1.data_ptr<double>(), g1_in.contiguous().data_ptr<T>(),
                            b1_in.contiguous().data_ptr<T>(), eps1, g.init);
    const Normalised<T> bn2(m2.data_ptr<double>(), v2.data_ptr<double>(), g2_in.contiguous().data_ptr<T>(),
                            b2_in.contiguous().data_ptr<T>(), eps2, g.ghosts);
    const T *gradp = grad.data_ptr<T>(), *z1p = z1.data_ptr<T>(), *z2p = z2.data_ptr<T>();
    T* gz1 = grad_z1.data_ptr<T>();

    std::vector<double> sums2(g.batch * g.keep * 2), sums1(g.batch * g.init * 2);
    at::parallel_for(0, g.batch * g.keep, 1, [&](int64_t begin, int64_t end) {
      ghost_sums_pass(g, bn2, gradp, z2p, sums2.data(), begin, end);
    });
    const BatchNormGrad<T> d2(sums2, bn2, g.batch, g.ghosts, g.keep, count);
    d2.parameter_grads(bn2, count, grad_g2.data_ptr<T>(), grad_b2.data_ptr<T>(), g.keep);

    std::vector<T> w2_partials(threads * g.ghosts * taps_n, T(0));
    at::parallel_for(0, g.batch * g.init, 1, [&](int64_t begin, int64_t end) {
      cheap_backward_pass(a, bn1, bn2, d2, gradp, z1p, z2p, gz1, w2_partials.data(), sums1.data(), begin, end);
    });
    sum_thread_partials(w2_partials, g.ghosts * taps_n, grad_w2.data_ptr<T>());
    const BatchNormGrad<T> d1(sums1, bn1, g.batch, g.init, g.init, count);
    d1.parameter_grads(bn1, count, grad_g1.data_ptr<T>(), grad_b1.data_ptr<T>(), g.init);
    const int64_t w1_size = g.init * g.inp * g.kernel * g.kernel;
    std::vector<T> w1_flipped, w1_partials;
    if (primary == Primary::Shifted) {  // (inp, init, k, k): W1 transposed, each kernel reversed
      w1_flipped.resize(w1_size);
      const int64_t taps = g.kernel * g.kernel;
      for (int64_t c = 0; c < g.init; ++c)
        for (int64_t i = 0; i < g.inp; ++i)
          for (int64_t t = 0; t < taps; ++t)
            w1_flipped[(i * g.init + c) * taps + t] = a.w1[(c * g.inp + i) * taps + taps - 1 - t];
      w1_partials.assign(threads * w1_size * Simd<T>::lanes, T(0));
    }
    at::parallel_for(0, g.batch, 1, [&](int64_t begin, int64_t end) {
      primary_backward_pass(a, bn1, d1, z1p, gz1, primary != Primary::Library ? grad_x.data_ptr<T>() : nullptr,
                            w1_flipped.data(), w1_partials.data(), begin, end);
    });
    if (primary == Primary::Shifted) {  // each weight's threads x lanes partial sums
      std::vector<T> lane_sums(threads * w1_size, T(0));
      for (int64_t i = 0; i < threads * w1_size; ++i)
        for (int64_t l = 0; l < Simd<T>::lanes; ++l) lane_sums[i] += w1_partials[i * Simd<T>::lanes + l];
      sum_thread_partials(lane_sums, w1_size, grad_w1.data_ptr<T>());
    }
  });
  if (primary == Primary::Gemm) {  // sum over images of dz1[n] x[n]^T
    grad_w1 = at::bmm(grad_z1.view({g.batch, g.init, P}), x.view({g.batch, g.inp, P}).transpose(1, 2))
                  .sum(0)
                  .view(w1.sizes());
  } else if (primary == Primary::Library) {
    const int64_t pad = g.kernel / 2;
    auto grads = at::convolution_backward(with_format(grad_z1, x.suggest_memory_format()), x, w1, c10::nullopt,
                                          {stride, stride}, {pad, pad}, {1, 1}, false,
                                          {0, 0}, 1, {true, true, false});
    grad_x = std::get<0>(grads);
    grad_w1 = std::get<1>(grads);
  }
  return {with_format(grad_x, output_format(x_in)), grad_w1, grad_g1, grad_b1, grad_w2, grad_g2, grad_b2};
}

}  // namespace ghostkernels
