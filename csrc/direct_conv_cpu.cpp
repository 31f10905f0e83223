// Direct k x k 'same' conv (+bias), stride 1 or 2, NCHW float32/float64, for the convs whose
// groups read at most kMaxGroupInputs channels: the depthwise `conv_dw` and shortcut convs of
// GhostNet bottlenecks after BN folding, and the 3-channel stem. oneDNN reorders such NCHW
// inputs into blocked layouts on every call, which costs more than the conv. Here each input
// plane is copied once per band of rows, zero-padded and (stride 2) split into its four
// row/column parity phases, so that every tap is one contiguous vector loop. Other convs,
// layouts and dtypes go to at::conv2d.
//
// The backward of a depthwise conv (direct_conv2d_backward; training the depthwise convs a
// GhostNet keeps outside its Ghost modules) works per (image, channel) plane at the input's
// resolution: the output grad spread onto the stride grid of a zero plane, then grad_x = the
// adjoint taps of that plane and grad_weight = its products with the shifted input, the Ghost
// kernels' plane taps (ghost_common.h). oneDNN's NCHW depthwise backward took 5-33 ms a layer
// at GhostNet 1.0x batch 16. Other convs go to at::convolution_backward.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <vector>

#include "direct_conv.h"
#include "ghost_common.h"
#include "multiversion.h"
#include "output_pool.h"

namespace ghostkernels {
namespace {

// Work items [begin, end) of (image, group, band of output rows).
template <typename T>
GK_MULTIVERSION void conv_items(const T* x, const T* w, const T* bias, T* out, const PlaneGeometry<T>& g,
                                int64_t channels, int64_t groups, int64_t out_channels, int64_t begin, int64_t end) {
  const int64_t group_outputs = out_channels / groups, k = g.k;
  const int64_t bands = g.bands();
  std::vector<T> scratch(g.scratch_size());
  for (int64_t item = begin; item < end; ++item) {
    const int64_t band = item % bands, group = item / bands % groups, n = item / bands / groups;
    const T* xs = x + (n * channels + group * g.group_inputs) * g.height * g.width;
    const T* ws = w + group * group_outputs * g.group_inputs * k * k;
    const T* bs = bias ? bias + group * group_outputs : nullptr;
    T* os = out + (n * out_channels + group * group_outputs) * g.out_height * g.out_width;
    const int64_t oh0 = band * g.band_rows();
    if (g.stride == 1)
      conv_band<T, 1>(xs, 0, ws, bs, group_outputs, os, g, oh0, scratch.data());
    else
      conv_band<T, 2>(xs, 0, ws, bs, group_outputs, os, g, oh0, scratch.data());
  }
}

// Groups reading more input channels than this go to at::conv2d (oneDNN's GEMM-based conv).
constexpr int64_t kMaxGroupInputs = 4;

at::Tensor direct_conv2d_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                             int64_t stride) {
  TORCH_CHECK(x.dim() == 4, "direct_conv2d: x must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  TORCH_CHECK(x.size(1) > 0, "direct_conv2d: x must have at least one channel, got ", x.sizes());
  // F.conv2d rejects an empty plane too (its padded size is smaller than the kernel).
  TORCH_CHECK(x.size(2) > 0 && x.size(3) > 0, "direct_conv2d: x must have H, W >= 1, got ", x.sizes());
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) > 0 && x.size(1) % weight.size(1) == 0 &&
                  weight.size(0) % (x.size(1) / weight.size(1)) == 0 && weight.size(2) == weight.size(3) &&
                  weight.size(2) % 2 == 1,
              "direct_conv2d: weight must be (C_out, C / groups, k, k) with odd k, C_out divisible by groups; got ",
              weight.sizes(), " for x with ", x.size(1), " channels");
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == weight.size(0)),
              "direct_conv2d: bias must have shape (", weight.size(0), ",), got ", bias->sizes());
  TORCH_CHECK(stride == 1 || stride == 2, "direct_conv2d: stride must be 1 or 2, got ", stride);
  const int64_t k = weight.size(2), group_inputs = weight.size(1), groups = x.size(1) / group_inputs;
  const bool fast = x.is_contiguous() && group_inputs <= kMaxGroupInputs &&
                    (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble) &&
                    weight.scalar_type() == x.scalar_type() && (!bias.has_value() || bias->scalar_type() == x.scalar_type());
  // NCHW-contiguous like every other path and the fake kernel (torch.compile trusts its strides).
  if (!fast) return at::conv2d(x, weight, bias, {stride, stride}, {k / 2, k / 2}, {1, 1}, groups).contiguous();
  const int64_t batch = x.size(0), channels = x.size(1), height = x.size(2), width = x.size(3);
  const int64_t out_channels = weight.size(0);
  // 'same' padding: ceil(H / stride) rows
  const int64_t out_height = (height + stride - 1) / stride, out_width = (width + stride - 1) / stride;
  at::Tensor out = empty_output({batch, out_channels, out_height, out_width}, x.options());
  if (out.numel() == 0) return out;
  const at::Tensor w = weight.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "direct_conv2d_cpu", [&] {
    const PlaneGeometry<scalar_t> geometry{height, width, k, stride, out_height, out_width, group_inputs};
    // work items: (image, group, band of output rows)
    at::parallel_for(0, batch * groups * geometry.bands(), 1, [&](int64_t begin, int64_t end) {
      conv_items(x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), b.defined() ? b.data_ptr<scalar_t>() : nullptr,
                 out.data_ptr<scalar_t>(), geometry, channels, groups, out_channels, begin, end);
    });
  });
  return out;
}

// Work items [begin, end) of (image, channel); g describes the input plane (out_height x
// out_width = H x W) and the taps (dw = k, pad = k / 2). Weight and bias grads go to this
// thread's partials.
template <typename T>
GK_MULTIVERSION void depthwise_backward_items(const T* grad, const T* x, const T* w, T* grad_x, T* weight_partials,
                                              T* bias_partials, const Geometry& g, int64_t channels, int64_t stride,
                                              const T* masks, int64_t mask_stride, int64_t begin, int64_t end) {
  const int64_t H = g.out_height, W = g.out_width, P = H * W, taps_n = g.dw * g.dw;
  const int64_t out_height = (H + stride - 1) / stride, out_width = (W + stride - 1) / stride;
  HaloPlane<T> spread_buffer(g), x_buffer(g);
  T *spread = spread_buffer.plane(), *xp = x_buffer.plane();
  std::vector<Tap<T>> taps(taps_n), adjoint(taps_n);
  T* gw = weight_partials + at::get_thread_num() * channels * taps_n;
  T* gb = bias_partials + at::get_thread_num() * channels;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t c = item % channels;
    const T* gp = grad + item * out_height * out_width;
    if (stride == 1) {
      std::memcpy(spread, gp, P * sizeof(T));
    } else {
      std::fill(spread, spread + P, T(0));
      for (int64_t oy = 0; oy < out_height; ++oy)
        for (int64_t ox = 0; ox < out_width; ++ox) spread[oy * stride * W + ox * stride] = gp[oy * out_width + ox];
    }
    std::memcpy(xp, x + item * P, P * sizeof(T));
    make_taps(g, w + c * taps_n, masks, mask_stride, true, adjoint.data());
    apply_taps(grad_x + item * P, spread, P, adjoint.data(), g.dw, false, T(0), Activation::None);
    make_taps(g, w + c * taps_n, masks, mask_stride, false, taps.data());
    for (const Tap<T>& tap : taps) gw[c * taps_n + tap.index] += masked_dot(spread, xp + tap.offset, P, tap.mask);
    gb[c] += sum(gp, out_height * out_width);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> direct_conv2d_backward_cpu(const at::Tensor& grad_in,
                                                                          const at::Tensor& x_in,
                                                                          const at::Tensor& weight, int64_t stride) {
  const int64_t k = weight.size(2), channels = x_in.size(1), groups = channels / weight.size(1);
  const bool depthwise = weight.size(1) == 1 && weight.size(0) == channels;
  const bool fast = depthwise && x_in.is_contiguous() && x_in.numel() > 0 &&
                    (x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kDouble) &&
                    weight.scalar_type() == x_in.scalar_type() && grad_in.scalar_type() == x_in.scalar_type();
  if (!fast) {
    const std::vector<int64_t> bias_sizes{weight.size(0)};
    auto [grad_x, grad_w, grad_b] = at::convolution_backward(grad_in, x_in, weight, bias_sizes,
                                                             {stride, stride}, {k / 2, k / 2}, {1, 1}, false, {0, 0},
                                                             groups, {true, true, true});
    return {grad_x.contiguous(), grad_w, grad_b};
  }
  const at::Tensor grad = grad_in.contiguous(), x = x_in, w = weight.contiguous();
  Geometry g{};
  g.out_height = x.size(2), g.out_width = x.size(3), g.dw = k, g.pad = k / 2;
  const int64_t threads = at::get_num_threads(), taps_n = k * k;
  at::Tensor grad_x = at::empty_like(x), grad_w = at::empty_like(w), grad_b = at::empty({channels}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "direct_conv2d_backward_cpu", [&] {
    using T = scalar_t;
    const std::vector<T> masks = column_masks<T>(g, g.out_height);
    std::vector<T> weight_partials(threads * channels * taps_n, T(0)), bias_partials(threads * channels, T(0));
    at::parallel_for(0, x.size(0) * channels, 1, [&](int64_t begin, int64_t end) {
      depthwise_backward_items(grad.data_ptr<T>(), x.data_ptr<T>(), w.data_ptr<T>(), grad_x.data_ptr<T>(),
                               weight_partials.data(), bias_partials.data(), g, channels, stride, masks.data(),
                               mask_stride(g, g.out_height), begin, end);
    });
    T *gw = grad_w.data_ptr<T>(), *gb = grad_b.data_ptr<T>();
    for (int64_t i = 0; i < channels * taps_n; ++i) {
      gw[i] = 0;
      for (int64_t t = 0; t < threads; ++t) gw[i] += weight_partials[t * channels * taps_n + i];
    }
    for (int64_t c = 0; c < channels; ++c) {
      gb[c] = 0;
      for (int64_t t = 0; t < threads; ++t) gb[c] += bias_partials[t * channels + c];
    }
  });
  return {grad_x, grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(ghostkernels, CPU, m) {
  m.impl("direct_conv2d", &direct_conv2d_cpu);
  m.impl("direct_conv2d_backward", &direct_conv2d_backward_cpu);
}

}  // namespace ghostkernels
