// Depthwise k x k conv (+bias), stride 1 or 2, 'same' padding, NCHW float32/float64: the
// stride-2 `conv_dw` and shortcut convs of GhostNet bottlenecks after BN folding. oneDNN
// reorders NCHW depthwise inputs into blocked layouts on every call, which costs more than
// the conv. Here each plane is copied once, zero-padded and (stride 2) split into its four
// row/column parity phases, so that every tap is one contiguous vector loop over the plane.
// Other layouts and dtypes go to at::conv2d.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "gemm.h"
#include "multiversion.h"
#include "output_pool.h"

namespace ghostkernels {
namespace {

// A phase is the padded plane's rows and columns congruent to (ry, rx) mod S:
// out[oh][ow] = bias + sum w[dy][dx] phase[dy % S][dx % S][oh + dy / S][ow + dx / S].
// Outputs are computed at the phase width (columns past out_width are discarded), which makes
// each tap a shift of one flat index. A plane is done in bands of output rows whose phases
// stay in L1; `slack` keeps the last vector block's reads inside the band's buffer.
template <typename T>
struct PlaneGeometry {
  static constexpr int64_t kVectorBlock = 4 * Simd<T>::lanes;
  static constexpr int64_t kL1Elements = 24 * 1024 / sizeof(T);
  int64_t height, width, k, stride, out_height, out_width;
  int64_t pad() const { return k / 2; }
  int64_t phase_width() const { return (width + 2 * pad() + stride - 1) / stride; }
  int64_t halo_rows() const { return (k - 1) / stride; }
  int64_t band_rows() const {
    const int64_t per_row = (stride * stride + 1) * phase_width();
    return std::clamp<int64_t>(kL1Elements / per_row - halo_rows(), 1, out_height);
  }
  int64_t flat_size() const { return (band_rows() * phase_width() + kVectorBlock - 1) / kVectorBlock * kVectorBlock; }
  int64_t phase_size() const { return flat_size() + halo_rows() * (phase_width() + 1); }
  // stride 2: the band's input rows split into even and odd columns in one pass
  int64_t split_size() const { return stride == 1 ? 0 : (band_rows() + halo_rows()) * stride * width + 1; }
  int64_t scratch_size() const { return stride * stride * phase_size() + flat_size() + split_size(); }
};

// Even- and odd-indexed elements of src[0, n) to evens[0, (n + 1) / 2) and odds[0, n / 2).
template <typename T>
GK_INLINE void deinterleave(const T* src, int64_t n, T* evens, T* odds) {
  using V = typename Simd<T>::vec;
  using I = typename Simd<T>::index;
  constexpr int L = Simd<T>::lanes;
  const I even_lanes = Simd<T>::even_lanes(), odd_lanes = even_lanes + 1;
  int64_t j = 0;
  for (; 2 * j + 2 * L <= n; j += L) {
    const V a = Simd<T>::load(src + 2 * j), b = Simd<T>::load(src + 2 * j + L);
    Simd<T>::store(evens + j, __builtin_shuffle(a, b, even_lanes));
    Simd<T>::store(odds + j, __builtin_shuffle(a, b, odd_lanes));
  }
  for (int64_t i = 2 * j; i < n; ++i) (i % 2 ? odds : evens)[i / 2] = src[i];
}

template <typename T, int S>
GK_MULTIVERSION void depthwise_plane(const T* x, const T* w, T bias, T* out, const PlaneGeometry<T>& g, T* scratch) {
  using V = typename Simd<T>::vec;
  constexpr int L = Simd<T>::lanes;
  const int64_t pad = g.pad(), phase_width = g.phase_width(), phase_size = g.phase_size(), k = g.k;
  const int64_t band_rows = g.band_rows(), halo = g.halo_rows();
  T* phases = scratch;
  T* flat = scratch + S * S * phase_size;
  T* split = flat + g.flat_size();
  for (int64_t oh0 = 0; oh0 < g.out_height; oh0 += band_rows) {
    const int64_t rows = std::min(band_rows, g.out_height - oh0);
    std::fill(phases, phases + S * S * phase_size, T(0));
    // padded rows [oh0 * S, (oh0 + rows + halo) * S) hold this band's phase rows
    const int64_t ih_begin = std::max<int64_t>(0, oh0 * S - pad);
    const int64_t ih_end = std::min<int64_t>(g.height, (oh0 + rows + halo) * S - pad);
    // stride 2, even width: column parity is flat-index parity, so a band of short rows splits in one
    // vector pass (short rows would not fill a vector) and are then copied row by row
    const int64_t half_width = g.width / 2;
    const bool split_band = S == 2 && g.width % 2 == 0 && g.width < 4 * L;
    if (split_band) deinterleave(x + ih_begin * g.width, (ih_end - ih_begin) * g.width, split, split + g.split_size() / 2);
    for (int64_t ih = ih_begin; ih < ih_end; ++ih) {
      const int64_t row = ih + pad;
      T* dst = phases + (row % S) * S * phase_size + (row / S - oh0) * phase_width;
      const T* src = x + ih * g.width;
      if (S == 1) {
        std::copy(src, src + g.width, dst + pad);
        continue;
      }
      // column ix sits in phase (ix + pad) % 2 at (ix + pad) / 2
      T* even_dst = dst + (pad % 2) * phase_size + pad / 2;
      T* odd_dst = dst + (1 - pad % 2) * phase_size + (pad + 1) / 2;
      if (split_band) {
        const T* evens = split + (ih - ih_begin) * half_width;
        std::copy(evens, evens + half_width, even_dst);
        std::copy(evens + g.split_size() / 2, evens + g.split_size() / 2 + half_width, odd_dst);
      } else {
        deinterleave(src, g.width, even_dst, odd_dst);
      }
    }
    const int64_t flat_end = rows * phase_width;
    for (int64_t f0 = 0; f0 < flat_end; f0 += PlaneGeometry<T>::kVectorBlock) {
      V acc[4];
      for (int v = 0; v < 4; ++v) acc[v] = V{} + bias;
      for (int64_t dy = 0; dy < k; ++dy) {
        for (int64_t dx = 0; dx < k; ++dx) {
          const T* src = phases + ((dy % S) * S + dx % S) * phase_size + (dy / S) * phase_width + dx / S + f0;
          const T wt = w[dy * k + dx];
          for (int v = 0; v < 4; ++v) acc[v] += wt * Simd<T>::load(src + v * L);
        }
      }
      for (int v = 0; v < 4; ++v) Simd<T>::store(flat + f0 + v * L, acc[v]);
    }
    for (int64_t r = 0; r < rows; ++r)
      std::copy(flat + r * phase_width, flat + r * phase_width + g.out_width, out + (oh0 + r) * g.out_width);
  }
}

at::Tensor depthwise_conv2d_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                int64_t stride) {
  TORCH_CHECK(x.dim() == 4, "depthwise_conv2d: x must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == x.size(1) && weight.size(1) == 1 &&
                  weight.size(2) == weight.size(3) && weight.size(2) % 2 == 1,
              "depthwise_conv2d: weight must be (C, 1, k, k) with odd k and C = x's channels, got ", weight.sizes());
  TORCH_CHECK(stride == 1 || stride == 2, "depthwise_conv2d: stride must be 1 or 2, got ", stride);
  const int64_t k = weight.size(2);
  const bool fast = x.is_contiguous() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble) &&
                    weight.scalar_type() == x.scalar_type() && (!bias.has_value() || bias->scalar_type() == x.scalar_type());
  if (!fast) return at::conv2d(x, weight, bias, {stride, stride}, {k / 2, k / 2}, {1, 1}, x.size(1));
  const int64_t batch = x.size(0), channels = x.size(1), height = x.size(2), width = x.size(3);
  const int64_t out_height = (height - 1) / stride + 1, out_width = (width - 1) / stride + 1;
  at::Tensor out = empty_output({batch, channels, out_height, out_width}, x.options());
  const at::Tensor w = weight.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "depthwise_conv2d_cpu", [&] {
    const PlaneGeometry<scalar_t> geometry{height, width, k, stride, out_height, out_width};
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const scalar_t* bp = b.defined() ? b.data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, batch * channels, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> scratch(geometry.scratch_size());
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t c = plane % channels;
        const scalar_t* xs = xp + plane * height * width;
        scalar_t* os = op + plane * out_height * out_width;
        const scalar_t bias_c = bp ? bp[c] : scalar_t(0);
        if (stride == 1)
          depthwise_plane<scalar_t, 1>(xs, wp + c * k * k, bias_c, os, geometry, scratch.data());
        else
          depthwise_plane<scalar_t, 2>(xs, wp + c * k * k, bias_c, os, geometry, scratch.data());
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ghostkernels, CPU, m) { m.impl("depthwise_conv2d", &depthwise_conv2d_cpu); }

}  // namespace ghostkernels
