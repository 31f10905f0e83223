// Direct k x k 'same' conv (+bias, then ReLU or none), stride 1 or 2, NCHW float32/float64, for the
// convs whose groups read at most kMaxGroupInputs channels: the depthwise `conv_dw` and shortcut
// convs of GhostNet bottlenecks after BN folding, and the 3-channel stem. oneDNN reorders such NCHW
// inputs into blocked layouts on every call, which costs more than the conv. Here each input plane
// is copied once per band of rows, zero-padded and (stride 2) split into its four row/column parity
// phases, so that every tap is one contiguous vector loop. Depthwise convs where that split costs
// more than the taps (small planes; depthwise_lanes_pays) run with a vector's lanes of channels
// side by side instead (depthwise_lanes.h), and float32 stems whose outputs fill whole vectors
// (dense_lanes_pays) with a vector's lanes of output channels (dense_lanes.h). A channels_last stem
// is made NCHW first. Grouped convs of more inputs per group (G-GhostNet's RegNetX blocks) run on
// shifted GEMMs (shifted_items); other convs, layouts and dtypes go to at::conv2d.
//
// The backward of a depthwise conv (direct_conv2d_backward; training the depthwise convs a
// GhostNet keeps outside its Ghost modules) works per (image, channel) plane with the Ghost
// kernels' plane taps (ghost_common.h): grad_x = the adjoint taps of the output grad, grad_weight
// = its products with the shifted input; stride 2 on the input's four parity phases. oneDNN's
// NCHW depthwise backward took 5-33 ms a layer at GhostNet 1.0x batch 16 (48@112, stride 2: 38
// ms, this kernel 8). Other convs go to at::convolution_backward.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/conv2d.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <vector>

#include "dense_lanes.h"
#include "depthwise_lanes.h"
#include "direct_conv.h"
#include "ghost_common.h"
#include "isa.h"
#include "ops.h"
#include "output_pool.h"
#include "scratch.h"
#include "shifted_conv.h"

namespace ghostkernels {
namespace {

// Work items [begin, end) of (image, group, band of output rows).
template <typename T>
void conv_items(const T* x, const T* w, const T* bias, Activation act, T* out,
                const PlaneGeometry<T>& g, int64_t channels, int64_t groups, int64_t out_channels,
                int64_t begin, int64_t end) {
  const int64_t group_outputs = out_channels / groups, k = g.k;
  const int64_t bands = g.bands();
  Scratch buffers;
  T* scratch = buffers.take<T>(g.scratch_size());
  for (int64_t item = begin; item < end; ++item) {
    const int64_t band = item % bands, group = item / bands % groups, n = item / bands / groups;
    const T* xs = x + (n * channels + group * g.group_inputs) * g.height * g.width;
    const T* ws = w + group * group_outputs * g.group_inputs * k * k;
    const T* bs = bias ? bias + group * group_outputs : nullptr;
    T* os = out + (n * out_channels + group * group_outputs) * g.out_height * g.out_width;
    const int64_t oh0 = band * g.band_rows();
    if (g.stride == 1)
      conv_band<T, 1>(xs, 0, ws, bs, act, group_outputs, os, g, oh0, scratch);
    else
      conv_band<T, 2>(xs, 0, ws, bs, act, group_outputs, os, g, oh0, scratch);
  }
}

// Depthwise, float32: work items [begin, end) of (image, a vector's lanes of channels, band of output rows).
template <typename T>
void depthwise_items(const T* x, const T* w, const T* bias, Activation act, T* out,
                     const LanesGeometry<T>& g, int64_t channels, int64_t begin, int64_t end) {
  constexpr int L = Simd<T>::lanes;
  const int64_t groups = (channels + L - 1) / L, bands = g.bands();
  const int64_t plane = g.height * g.width, out_plane = g.out_height * g.out_width;
  Scratch buffers;
  T* scratch = buffers.take<T>(g.scratch_size());
  for (int64_t item = begin; item < end; ++item) {
    const int64_t oh0 = item % bands * g.band_rows(), c0 = item / bands % groups * L, n = item / bands / groups;
    LaneChannels<T> ch;
    for (int64_t c = c0; c < std::min<int64_t>(channels, c0 + L); ++c)
      ch.add(x + (n * channels + c) * plane, w + c * g.k * g.k, bias ? bias[c] : T(0),
             out + (n * channels + c) * out_plane);
    if (g.stride == 1) depthwise_lanes<T, 1>(g, ch, act, 0, oh0, g.rows_in_band(oh0), scratch);
    else depthwise_lanes<T, 2>(g, ch, act, 0, oh0, g.rows_in_band(oh0), scratch);
  }
}

// Float32 dense 3x3 convs of a few inputs (dense_lanes_pays), work items [begin, end) of (image, band
// of output rows), every output channel.
void dense_items(const float* x, const float* w, const float* bias, Activation act, float* out,
                 const DenseLanesGeometry<float>& g, int64_t begin, int64_t end) {
  const int64_t bands = g.bands();
  Scratch buffers;
  float* scratch = buffers.take<float>(g.scratch_size());
  for (int64_t item = begin; item < end; ++item) {
    const int64_t n = item / bands, oh0 = item % bands * g.band_rows(), rows = g.rows_in_band(oh0);
    const float* xs = x + n * g.inputs * g.height * g.width;
    float* os = out + n * g.out_channels * g.out_height * g.out_width;
    if (g.stride == 1) dense_lanes_band<float, 1>(g, xs, w, bias, act, os, oh0, rows, scratch);
    else dense_lanes_band<float, 2>(g, xs, w, bias, act, os, oh0, rows, scratch);
  }
}

// Groups reading more input channels than this go to at::conv2d (oneDNN's GEMM-based conv), or
// with more than one group of at most kMaxShiftedGroupInputs, to shifted GEMMs.
constexpr int64_t kMaxGroupInputs = 4;
constexpr int64_t kMaxShiftedGroupInputs = 64;

// The crop of one group's padded-width outputs (`wide`, outputs apart) into its output planes,
// with bias and activation.
template <typename T>
GK_INLINE void crop_group(const T* wide, int64_t outputs, int64_t padded_width, const T* bias, Activation act,
                          T* out, int64_t group_outputs, int64_t out_height, int64_t out_width) {
  for (int64_t c = 0; c < group_outputs; ++c) {
    const T b = bias ? bias[c] : T(0);
    T* dst = out + c * out_height * out_width;
    for (int64_t h = 0; h < out_height; ++h) {
      const T* src = wide + c * outputs + h * padded_width;
      for (int64_t i = 0; i < out_width; ++i) dst[h * out_width + i] = activate(src[i] + b, act);
    }
  }
}

// Grouped convs of up to kMaxShiftedGroupInputs inputs a group (RegNetX's 3x3 convs in
// G-GhostNet: 36-48 a group), work items [begin, end) of (image, group): the group's inputs
// copied into zero-padded planes (stride 2: their four parity phases, PhasePlanes), the conv one
// GEMM over their shifted rows (shifted_conv.h, K = inputs x k x k), cropped into the output with
// bias and activation. oneDNN ran these NCHW convs at a fifth to a half of the cores'
// multiply-adds (216 channels in groups of 36 at 14x14, batch 1: 646 us for 13.7 M; at stride 2,
// 1008 in groups of 48 from 14x14, 0.82 ms for 21.3 M).
template <typename T, typename Planes>
void shifted_items(const T* x, const T* w, const T* bias, Activation act, T* out, int64_t channels,
                   int64_t height, int64_t width, int64_t k, int64_t group_inputs, int64_t out_channels,
                   int64_t begin, int64_t end) {
  const Planes p(height, width, k);
  const int64_t out_height = (height + Planes::kStride - 1) / Planes::kStride;
  const int64_t out_width = (width + Planes::kStride - 1) / Planes::kStride;
  const int64_t groups = channels / group_inputs, group_outputs = out_channels / groups;
  const int64_t plane_elements = Planes::kStride * Planes::kStride * p.stride;  // per input channel
  Scratch buffers;
  T* planes = buffers.take<T>(group_inputs * plane_elements);
  T* wide = buffers.take<T>(group_outputs * p.outputs());
  const T** rows = buffers.take<const T*>(group_inputs * k * k);
  std::fill(planes, planes + group_inputs * plane_elements, T(0));  // the padding, never written after
  p.tap_rows(planes, group_inputs, k, rows);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t n = item / groups, g = item % groups;
    p.fill(x + (n * channels + g * group_inputs) * height * width, group_inputs, planes);
    shifted_product(group_outputs, p.outputs(), group_inputs * k * k, w + g * group_outputs * group_inputs * k * k,
                    rows, wide);
    crop_group(wide, p.outputs(), p.padded_width, bias ? bias + g * group_outputs : nullptr, act,
               out + (n * out_channels + g * group_outputs) * out_height * out_width, group_outputs, out_height,
               out_width);
  }
}

// The argument errors of direct_conv2d and of its backward (direct_conv.py's _check raises the same
// from the fake kernels and the fallbacks). Mixed dtypes are no error: they go to at::conv2d, which
// autocast (not excluded inside a custom op's kernel) casts.
// Without expected_groups any multiple of weight.size(1) channels is a grouped conv: a 6-channel x
// of a 3-channel stem would run as two groups where the conv it replaced raises.
void check_conv_arguments(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                          int64_t stride, c10::optional<int64_t> expected_groups = c10::nullopt) {
  TORCH_CHECK(x.dim() == 4, "direct_conv2d: x must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  TORCH_CHECK(x.size(1) > 0, "direct_conv2d: x must have at least one channel, got ", x.sizes());
  TORCH_CHECK(!expected_groups.has_value() ||
                  (*expected_groups >= 1 && weight.dim() == 4 && x.size(1) == *expected_groups * weight.size(1)),
              "direct_conv2d: x has ", x.size(1), " channels, expected groups x weight.shape[1] = ",
              expected_groups.value_or(0), " x ", weight.dim() == 4 ? weight.size(1) : -1, " (weight ",
              weight.sizes(), ")");
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
}

}  // namespace

// expected_groups: the library's modules pass their conv's groups, so that x's channel count is
// checked; c10::nullopt infers them from it.
at::Tensor direct_conv2d_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                             int64_t stride, c10::string_view activation, c10::optional<int64_t> expected_groups) {
  check_conv_arguments(x, weight, bias, stride, expected_groups);
  const Activation act = parse_activation(activation, "direct_conv2d");
  const int64_t k = weight.size(2), group_inputs = weight.size(1), groups = x.size(1) / group_inputs;
  // A channels_last stem (one group of at most 4 inputs) is made NCHW for this kernel, whose
  // output is NCHW anyway: at::conv2d took 311 us at batch 1 and 6.5 ms at batch 8 on GhostNet's
  // 3 -> 16 stem, the copy and this kernel 172 us and 1.7 ms. Depthwise convs keep at::conv2d
  // there (its channels_last depthwise conv was faster at 72@56, stride 2).
  const at::ScalarType dtype = x.scalar_type();
  const bool kernel_dtypes = (dtype == at::kFloat || dtype == at::kDouble) && weight.scalar_type() == dtype &&
                             (!bias.has_value() || bias->scalar_type() == dtype);
  const at::Tensor input = kernel_dtypes && groups == 1 && group_inputs <= kMaxGroupInputs ? x.contiguous() : x;
  const bool shifted = kernel_dtypes && input.is_contiguous() && groups > 1 && group_inputs > kMaxGroupInputs &&
                       group_inputs <= kMaxShiftedGroupInputs;
  const bool fast = kernel_dtypes && input.is_contiguous() && (group_inputs <= kMaxGroupInputs || shifted);
  // NCHW-contiguous like every other path and the fake kernel (torch.compile trusts its strides).
  if (!fast) {
    at::Tensor out = at::conv2d(input, weight, bias, {stride, stride}, {k / 2, k / 2}, {1, 1}, groups).contiguous();
    return act == Activation::ReLU ? out.relu_() : out;
  }
  const int64_t batch = input.size(0), channels = input.size(1), height = input.size(2), width = input.size(3);
  const int64_t out_channels = weight.size(0);
  // 'same' padding: ceil(H / stride) rows
  const int64_t out_height = (height + stride - 1) / stride, out_width = (width + stride - 1) / stride;
  at::Tensor out = empty_output({batch, out_channels, out_height, out_width}, input.options());
  if (out.numel() == 0) return out;
  const at::Tensor w = weight.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  if (shifted) {
    AT_DISPATCH_FLOATING_TYPES(dtype, "direct_conv2d_cpu", [&] {
      at::parallel_for(0, batch * groups, 1, [&](int64_t begin, int64_t end) {
        const auto items = stride == 1 ? shifted_items<scalar_t, PaddedPlanes> : shifted_items<scalar_t, PhasePlanes>;
        items(input.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), b.defined() ? b.data_ptr<scalar_t>() : nullptr, act,
              out.data_ptr<scalar_t>(), channels, height, width, k, group_inputs, out_channels, begin, end);
      });
    });
    return out;
  }
  if (dtype == at::kFloat && group_inputs == 1 && out_channels == channels &&
      depthwise_lanes_pays(width, k, stride)) {
    constexpr int64_t L = Simd<float>::lanes;
    const int64_t groups = (channels + L - 1) / L;
    // bands enough for 4 items per thread
    const int64_t min_bands = (4 * at::get_num_threads() + batch * groups - 1) / (batch * groups);
    const LanesGeometry<float> geometry{height, width, k, stride, out_height, out_width, min_bands};
    at::parallel_for(0, batch * groups * geometry.bands(), 1, [&](int64_t begin, int64_t end) {
      depthwise_items(input.data_ptr<float>(), w.data_ptr<float>(), b.defined() ? b.data_ptr<float>() : nullptr, act,
                      out.data_ptr<float>(), geometry, channels, begin, end);
    });
    return out;
  }
  if (dtype == at::kFloat && dense_lanes_pays(groups, out_channels, k)) {
    // bands enough for 4 items per thread
    const int64_t min_bands = (4 * at::get_num_threads() + batch - 1) / batch;
    const DenseLanesGeometry<float> geometry{channels, height, width, stride, out_height, out_width, out_channels,
                                             min_bands};
    at::parallel_for(0, batch * geometry.bands(), 1, [&](int64_t begin, int64_t end) {
      dense_items(input.data_ptr<float>(), w.data_ptr<float>(), b.defined() ? b.data_ptr<float>() : nullptr, act,
                  out.data_ptr<float>(), geometry, begin, end);
    });
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES(dtype, "direct_conv2d_cpu", [&] {
    const PlaneGeometry<scalar_t> geometry{height, width, k, stride, out_height, out_width, group_inputs};
    // work items: (image, group, band of output rows)
    at::parallel_for(0, batch * groups * geometry.bands(), 1, [&](int64_t begin, int64_t end) {
      conv_items(input.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), b.defined() ? b.data_ptr<scalar_t>() : nullptr,
                 act, out.data_ptr<scalar_t>(), geometry, channels, groups, out_channels, begin, end);
    });
  });
  return out;
}

namespace {

// Stride 1, work items [begin, end) of (image, channel); g describes the plane (out_height x
// out_width = H x W) and the taps (dw = k, pad = k / 2). Weight and bias grads go to this
// thread's partials.
template <typename T>
void depthwise_backward_items(const T* grad, const T* x, const T* w, T* grad_x, T* weight_partials,
                              T* bias_partials, const Geometry& g, int64_t channels, const T* masks,
                              int64_t mask_stride, int64_t begin, int64_t end) {
  const int64_t P = g.out_height * g.out_width, taps_n = g.dw * g.dw;
  HaloPlane<T> grad_buffer(g), x_buffer(g);
  T *gp = grad_buffer.plane(), *xp = x_buffer.plane();
  std::vector<Tap<T>> taps(taps_n), adjoint(taps_n);  // the forward taps: offsets and masks only
  make_taps(g, masks, mask_stride, false, taps.data());
  make_taps(g, masks, mask_stride, true, adjoint.data());
  T* gw = weight_partials + at::get_thread_num() * channels * taps_n;
  T* gb = bias_partials + at::get_thread_num() * channels;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t c = item % channels;
    std::memcpy(gp, grad + item * P, P * sizeof(T));
    std::memcpy(xp, x + item * P, P * sizeof(T));
    apply_taps(grad_x + item * P, gp, P, adjoint.data(), w + c * taps_n, g.dw, false, T(0), Activation::None);
    for (const Tap<T>& tap : taps) gw[c * taps_n + tap.index] += masked_dot(gp, xp + tap.offset, P, tap.mask);
    gb[c] += sum(gp, P);
  }
}

// dst[q] = sum_t w_t * (mask_t[q] ? src[q + off_t] : 0) for q < n, `count` taps in any pattern
// (apply_taps wants a square of them). src and the masks have kSlack readable elements past n.
template <typename T>
GK_INLINE void gather_taps(T* dst, const T* src, int64_t n, const Tap<T>* taps, int64_t count) {
  using S = Simd<T>;
  using V = typename S::vec;
  constexpr int L = S::lanes;
  for (int64_t q = 0; q < n; q += L) {
    V total{};
    for (int64_t t = 0; t < count; ++t) {
      V v = S::load(src + q + taps[t].offset);
      if (taps[t].mask) v = masked(v, taps[t].mask + q);
      total += taps[t].weight * v;
    }
    if (q + L <= n) {
      S::store(dst + q, total);
    } else {
      T tail[L];
      S::store(tail, total);
      std::memcpy(dst + q, tail, (n - q) * sizeof(T));
    }
  }
}

// dst[i] = (i odd ? odds : evens)[i / 2] for i < n: deinterleave's inverse.
template <typename T>
GK_INLINE void interleave(const T* evens, const T* odds, int64_t n, T* dst) {
  using V = typename Simd<T>::vec;
  using I = typename Simd<T>::index;
  constexpr int L = Simd<T>::lanes;
  I low, high;  // lanes of (evens, odds) for dst[2 j, 2 j + L) and dst[2 j + L, 2 j + 2 L)
  for (int l = 0; l < L; ++l) {
    low[l] = (l % 2 ? L : 0) + l / 2;
    high[l] = low[l] + L / 2;
  }
  int64_t j = 0;
  for (; 2 * j + 2 * L <= n; j += L) {
    const V e = Simd<T>::load(evens + j), o = Simd<T>::load(odds + j);
    Simd<T>::store(dst + 2 * j, __builtin_shuffle(e, o, low));
    Simd<T>::store(dst + 2 * j + L, __builtin_shuffle(e, o, high));
  }
  for (int64_t i = 2 * j; i < n; ++i) dst[i] = (i % 2 ? odds : evens)[i / 2];
}

// Where tap (dy, dx) of a stride-2 depthwise conv reads: input row 2 oy + dy - pad is row
// oy + a of the input's row phase (dy - pad) mod 2, a = floor((dy - pad) / 2); columns alike.
struct PhaseTap {
  int64_t phase, offset, shift;  // phase 2 py + px; offset a * Wo + b on the output grid; b
};

// Stride 2 without the zeros of the spread: the input split into its four row/column parity
// phases, each on the output's grid (zero where the phase has no pixel), g describing that grid
// (out_height x out_width = Ho x Wo, pad = the phases' halo, ceil(pad / 2)). grad_weight is one
// masked dot per tap on that grid; each phase of grad_x gathers the output grad through its own
// taps and is scattered back to its pixels.
template <typename T>
void depthwise_backward_items_stride2(const T* grad, const T* x, const T* w, T* grad_x,
                                      T* weight_partials, T* bias_partials, const Geometry& g,
                                      int64_t height, int64_t width, int64_t k, int64_t channels,
                                      const PhaseTap* layout, const T* masks, int64_t mask_stride,
                                      int64_t begin, int64_t end) {
  const int64_t Ho = g.out_height, Wo = g.out_width, Po = Ho * Wo, taps_n = k * k;
  std::vector<HaloPlane<T>> phases(4, HaloPlane<T>(g));
  HaloPlane<T> grad_buffer(g);
  T* gp = grad_buffer.plane();
  std::vector<T> gathered(4 * Po);  // grad_x's four phases
  std::vector<Tap<T>> taps(taps_n);
  T* gw = weight_partials + at::get_thread_num() * channels * taps_n;
  T* gb = bias_partials + at::get_thread_num() * channels;
  auto mask = [&](int64_t shift) { return shift == 0 ? nullptr : masks + (shift + g.pad) * mask_stride; };
  for (int64_t item = begin; item < end; ++item) {
    const int64_t c = item % channels;
    const T* xp = x + item * height * width;
    T* gx = grad_x + item * height * width;
    for (int64_t r = 0; r < height; ++r)  // row r: phases (r % 2, 0) and (r % 2, 1), row r / 2
      deinterleave(xp + r * width, width, phases[2 * (r & 1)].plane() + r / 2 * Wo,
                   phases[2 * (r & 1) + 1].plane() + r / 2 * Wo);
    for (int64_t i = 0; width % 2 && i < Ho; ++i)  // the odd columns' last, past the image
      phases[1].plane()[i * Wo + Wo - 1] = phases[3].plane()[i * Wo + Wo - 1] = T(0);
    if (height % 2)  // the odd rows' last, past the image
      for (int64_t px = 0; px < 2; ++px) std::fill_n(phases[2 + px].plane() + (Ho - 1) * Wo, Wo, T(0));
    std::memcpy(gp, grad + item * Po, Po * sizeof(T));
    for (int64_t t = 0; t < taps_n; ++t)
      gw[c * taps_n + t] +=
          masked_dot(gp, phases[layout[t].phase].plane() + layout[t].offset, Po, mask(layout[t].shift));
    for (int64_t phase = 0; phase < 4; ++phase) {
      int64_t count = 0;
      for (int64_t t = 0; t < taps_n; ++t)  // the adjoint: x's phase pixel i took part in output i - a
        if (layout[t].phase == phase)
          taps[count++] = Tap<T>{-layout[t].offset, w[c * taps_n + t], t, mask(-layout[t].shift)};
      gather_taps(gathered.data() + phase * Po, gp, Po, taps.data(), count);
    }
    for (int64_t r = 0; r < height; ++r)
      interleave(gathered.data() + 2 * (r & 1) * Po + r / 2 * Wo, gathered.data() + (2 * (r & 1) + 1) * Po + r / 2 * Wo,
                 width, gx + r * width);
    gb[c] += sum(grad + item * Po, Po);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> direct_conv2d_backward_cpu(const at::Tensor& grad_in,
                                                                          const at::Tensor& x_in,
                                                                          const at::Tensor& weight, int64_t stride) {
  check_conv_arguments(x_in, weight, c10::nullopt, stride);
  const std::vector<int64_t> out_shape{x_in.size(0), weight.size(0), (x_in.size(2) + stride - 1) / stride,
                                       (x_in.size(3) + stride - 1) / stride};
  TORCH_CHECK(grad_in.sizes() == out_shape, "direct_conv2d_backward: grad must have shape ", at::IntArrayRef(out_shape),
              ", got ", grad_in.sizes());
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
  // From the output cache (output_pool.h): a fresh block is page-faulted in on every call, which
  // took more time than the kernel at GhostNet's 48@112 (perf: a quarter of it in the kernel).
  at::Tensor grad_x = empty_output(x.sizes(), x.options());
  at::Tensor grad_w = at::empty_like(w), grad_b = at::empty({channels}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "direct_conv2d_backward_cpu", [&] {
    using T = scalar_t;
    std::vector<T> weight_partials(threads * channels * taps_n, T(0)), bias_partials(threads * channels, T(0));
    if (stride == 1) {
      const auto masks = column_masks<T>(g, g.out_height);
      at::parallel_for(0, x.size(0) * channels, 1, [&](int64_t begin, int64_t end) {
        depthwise_backward_items(grad.data_ptr<T>(), x.data_ptr<T>(), w.data_ptr<T>(), grad_x.data_ptr<T>(),
                                 weight_partials.data(), bias_partials.data(), g, channels, masks->data(),
                                 mask_stride(g, g.out_height), begin, end);
      });
    } else {
      Geometry grid{};
      grid.out_height = (g.out_height + 1) / 2, grid.out_width = (g.out_width + 1) / 2;
      grid.pad = (k / 2 + 1) / 2, grid.dw = 2 * grid.pad + 1;
      std::vector<PhaseTap> layout(taps_n);
      for (int64_t dy = 0; dy < k; ++dy)
        for (int64_t dx = 0; dx < k; ++dx) {
          const int64_t sy = dy - k / 2, sx = dx - k / 2, py = sy & 1, px = sx & 1;  // & 1: mod 2, negatives too
          const int64_t a = (sy - py) / 2, b = (sx - px) / 2;
          layout[dy * k + dx] = PhaseTap{2 * py + px, a * grid.out_width + b, b};
        }
      const auto masks = column_masks<T>(grid, grid.out_height);
      at::parallel_for(0, x.size(0) * channels, 1, [&](int64_t begin, int64_t end) {
        depthwise_backward_items_stride2(grad.data_ptr<T>(), x.data_ptr<T>(), w.data_ptr<T>(), grad_x.data_ptr<T>(),
                                         weight_partials.data(), bias_partials.data(), grid, g.out_height,
                                         g.out_width, k, channels, layout.data(), masks->data(),
                                         mask_stride(grid, grid.out_height), begin, end);
      });
    }
    sum_thread_partials(weight_partials, channels * taps_n, grad_w.data_ptr<T>());
    sum_thread_partials(bias_partials, channels, grad_b.data_ptr<T>());
  });
  return {grad_x, grad_w, grad_b};
}

}  // namespace ghostkernels
