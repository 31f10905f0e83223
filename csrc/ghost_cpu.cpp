// Fused CPU kernels for the Ghost module (docs/math.md section 4, the folded form).
//
// Forward, per (image, band of output rows, group of intrinsic channels): the primary
// conv for the band plus its dw//2 halo rows goes into a cache-sized thread-local buffer
// (bias and activation applied there), the band's rows are copied to out[:, :init], and
// the depthwise op reads the buffer and writes out[:, init:oup]. No full-size
// intermediate, no concat, and ghost channels that the slice drops are never computed.
//
// The backward is in ghost_backward_cpu.cpp, what both share in ghost_cpu.h.
//
// A primary kernel larger than 1x1 uses at::conv2d for the primary conv; the cheap op and the
// concat stay fused.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/conv2d.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "bf16_gemm.h"
#include "depthwise_lanes.h"
#include "direct_conv.h"
#include "frozen_weights.h"
#include "gemm.h"
#include "ghost_common.h"
#include "ghost_cpu.h"
#include "isa.h"
#include "ops.h"
#include "output_pool.h"
#include "scratch.h"

namespace ghostkernels {
namespace {

// ---------------------------------------------------------------------------------------
// Forward

// Source index of output index i under nearest upsampling from `in` to `out`, as
// F.interpolate(mode='nearest') computes it (float scale, floor, clamp).
std::vector<int64_t> nearest_sources(int64_t in, int64_t out) {
  const float scale = float(in) / float(out);
  std::vector<int64_t> sources(out);
  for (int64_t i = 0; i < out; ++i)
    sources[i] = std::min<int64_t>(static_cast<int64_t>(std::floor(float(i) * scale)), in - 1);
  return sources;
}

// dst[i] = 1 / (1 + exp(-src[i])) for i < n. float32 by vectors: exp(t) = 2^k * e^r with
// k = floor(t / ln 2 + 1/2), r = t - k ln 2 (ln 2 in two parts) and e^r by Cephes' expf
// polynomial; t is clamped to +-87.3 (2^k stays a normal float), which moves only sigmoids below
// 1.3e-38. Within 2e-7 relative of torch.sigmoid over [-120, 120]; NaN stays NaN. at::sigmoid ran
// at ~1 ns an element on one thread (Zen 3), a third of a GhostNetV2 module's gating time.
// float64 (the tests' dtype) by std::exp.
template <typename T>
GK_INLINE void sigmoid_run(T* dst, const T* src, int64_t n) {
  int64_t i = 0;
  if constexpr (std::is_same_v<T, float>) {
    using S = Simd<float>;
    using V = S::vec;
    using I = S::index;
    constexpr int L = S::lanes;
    for (; i + L <= n; i += L) {
      const V x = S::load(src + i);
      V t = -x;
      t = t > V{} + 87.3f ? V{} + 87.3f : t;
      t = t < V{} - 87.3f ? V{} - 87.3f : t;
      const V shifted = t * 1.44269504088896341f + 0.5f;
      V k = __builtin_convertvector(__builtin_convertvector(shifted, I), V);  // toward zero
      k += __builtin_convertvector(k > shifted, V);                           // floor: -1 where above
      const V r = t - k * 0.693359375f + k * 2.12194440e-4f;
      V p = V{} + 1.9875691500e-4f;
      p = p * r + 1.3981999507e-3f;
      p = p * r + 8.3334519073e-3f;
      p = p * r + 4.1665795894e-2f;
      p = p * r + 1.6666665459e-1f;
      p = p * r + 5.0000001201e-1f;
      p = p * r * r + r + 1.0f;
      V scale;
      const I bits = (__builtin_convertvector(k, I) + 127) << 23;
      std::memcpy(&scale, &bits, sizeof(V));
      const V y = 1.0f / (1.0f + p * scale);
      S::store(dst + i, x == x ? y : x);
    }
  }
  for (; i < n; ++i) dst[i] = T(1) / (T(1) + std::exp(-src[i]));
}

// d[2i] and d[2i + 1] times gate[i] for i < width: a gate row against an output row twice its
// width. Its own function, with __restrict (the two never overlap): the gating of 14-column
// rows cost 24-31% less than with the loop inline (Zen 3, 2 threads).
template <typename T>
__attribute__((noinline)) void multiply_doubled(T* __restrict d, const T* __restrict gate, int64_t width) {
  for (int64_t i = 0; i < width; ++i) {
    d[2 * i] *= gate[i];
    d[2 * i + 1] *= gate[i];
  }
}

// GhostNetV2's attention: sigmoid(gate logits), nearest-upsampled to the output, multiplies
// every output element as it is written. `values` = sigmoid of the logits in the output's
// layout, (N, oup, gate_height, gate_width); rows/cols map an output row/column to its source.
template <typename T>
struct Gate {
  const T* values;
  int64_t height, width;
  std::vector<int64_t> rows, cols;
  // NCHW: source[h * out_width + w] = rows[h] * width + cols[w], the gate element of each output
  // pixel within a channel's gate plane, for a vector loop of indexed loads; none where the
  // columns are upsampled exactly twice (GhostNetV2's gates are 2x2-pooled), whose loop pairs
  // each gate element with two outputs by a shuffle. A lookup through rows and cols per element
  // kept the loop scalar: the gated op took up to twice the ungated one.
  std::vector<int32_t> source;
  bool doubled_columns = false;

  Gate() = default;
  Gate(const T* values, int64_t height, int64_t width, int64_t out_height, int64_t out_width, bool planes)
      : values(values), height(height), width(width), rows(nearest_sources(height, out_height)),
        cols(nearest_sources(width, out_width)), doubled_columns(out_width == 2 * width) {
    if (!planes || doubled_columns) return;
    TORCH_CHECK(height * width <= std::numeric_limits<int32_t>::max(),
                "ghost_module_gated: gate planes of more than 2^31 - 1 elements are not supported, got ", height, " x ",
                width);
    source.resize(out_height * out_width);
    for (int64_t h = 0; h < out_height; ++h)
      for (int64_t w = 0; w < out_width; ++w) source[h * out_width + w] = int32_t(rows[h] * width + cols[w]);
  }

  // NCHW: dst[q] *= gate of (n, channel) at output row h0 + q / W, column q % W. In place only:
  // with a separate source the loops would be vectorised behind an overlap test that the
  // ghost channels (gated where they are) fail.
  GK_INLINE void apply_rows(T* dst, int64_t n, int64_t channel, int64_t out_channels, int64_t h0, int64_t h1,
                            int64_t W) const {
    const T* plane = values + (n * out_channels + channel) * height * width;
    if (doubled_columns) {
      for (int64_t h = h0; h < h1; ++h) multiply_doubled(dst + (h - h0) * W, plane + rows[h] * width, width);
      return;
    }
    const int32_t* index = source.data() + h0 * W;
    const int64_t p = (h1 - h0) * W;
#pragma omp simd
    for (int64_t q = 0; q < p; ++q) dst[q] *= plane[index[q]];
  }
  // NHWC: the gates of all channels at output pixel (h, w).
  GK_INLINE const T* pixel(int64_t n, int64_t h, int64_t w, int64_t out_channels) const {
    return values + ((n * height + rows[h]) * width + cols[w]) * out_channels;
  }
};

template <typename T>
struct ForwardArgs {
  const Geometry* g;
  const Tiling* t;
  const T* x;       // input, or the primary conv's activated output when kernel > 1
  const T* w1;      // [init, inp] (1x1 primary only)
  const T* w1t;     // [inp, init] (1x1 primary only)
  const T* input_scale;  // [N, inp]: x's channels times this per image (a folded SE gate), or nullptr
  const T* b1;      // [init] (nullptr: no bias; already applied when kernel > 1)
  const T* w2;      // [ghosts, dw * dw]
  const T* w2t;     // [dw * dw, ghosts] (NHWC only)
  const T* w2_rows; // NHWC, ratio 2: per channel group [dw * dw][out_width][group], w2t repeated per column
  const T* b2;      // [ghosts] or nullptr
  const T* masks;   // column_masks(g, t->rows + 2 * pad)
  int64_t mask_stride;
  T* out;
  const Gate<T>* gate;  // nullptr: ungated
  const T* residual;    // nullptr, or a tensor laid out as out, added to every element written
  bool bf16_gemm;       // the 1x1 primary conv in bfloat16 (float32 only; bf16_gemm.h)
  Bf16Rows w1_bf16;  // with bf16_gemm, W1's frozen copy (frozen_weights.h), if it has one
};

// x1 rows [h0, h1) of one image, channels [c0, c1), NCHW; `dst` row stride ld (per channel).
// `pack` holds inp x (h1 - h0) x out_width elements for strided or scaled x, `scaled`
// (c1 - c0) x inp for W1's rows times the input scale.
template <typename T>
GK_INLINE void primary_rows_nchw(const ForwardArgs<T>& a, int64_t n, int64_t h0, int64_t h1, int64_t c0,
                                 int64_t c1, T* dst, int64_t ld, T* pack, T* panel, T* scaled) {
  const Geometry& g = *a.g;
  const int64_t p = (h1 - h0) * g.out_width;
  if (g.kernel != 1) {  // copy the library conv's output
    for (int64_t c = c0; c < c1; ++c)
      std::memcpy(dst + (c - c0) * ld, a.x + ((n * g.init + c) * g.out_height + h0) * g.out_width,
                  p * sizeof(T));
    return;
  }
  const T* src = a.x + n * g.inp * g.height * g.width + h0 * g.width;
  int64_t ld_src = g.height * g.width;
  const T* s = a.input_scale ? a.input_scale + n * g.inp : nullptr;
  // W1 (x * s) = (W1 diag(s)) x. On the dot products the scale multiplies x's rows as they are
  // rounded to bfloat16 pairs, and W1 stays its (frozen) bfloat16 copy: scaled W1s rounded per call
  // and image, or x * s packed first, made ghost_module_residual with the SE scale up to 1.25x
  // slower (960 -> 160 @7 1.21-1.25x at batch 1 and 1.10x at batch 8, 672 -> 160 @7 1.12-1.18x,
  // 480 -> 112 @14 1.05-1.07x). Elsewhere the scale goes into whichever is smaller, the band's
  // pixels of x (small planes) or W1's rows.
  bool scale_in_pairs = false;
#ifdef GK_BF16_DOT
  if constexpr (std::is_same_v<T, float>)
    scale_in_pairs = s && g.stride == 1 && a.bf16_gemm && bf16_gemm_on_dot_products();
#endif
  const bool scale_x = s && !scale_in_pairs && p < c1 - c0;
  if (g.stride != 1) {
    for (int64_t k = 0; k < g.inp; ++k)
      for (int64_t h = h0; h < h1; ++h)
        for (int64_t w = 0; w < g.out_width; ++w)
          pack[k * p + (h - h0) * g.out_width + w] =
              a.x[((n * g.inp + k) * g.height + h * g.stride) * g.width + w * g.stride] * (scale_x ? s[k] : T(1));
    src = pack;
    ld_src = p;
  } else if (scale_x) {
    for (int64_t k = 0; k < g.inp; ++k)
      for (int64_t q = 0; q < p; ++q) pack[k * p + q] = src[k * ld_src + q] * s[k];
    src = pack;
    ld_src = p;
  }
  const T* w1 = a.w1 + c0 * g.inp;
  const uint16_t* w1_bf16 = a.w1_bf16.row(c0);
  const T* b1 = a.b1;
  const Activation act = g.act;
  const auto finish = [b1, act, c0](int64_t i, auto v) __attribute__((always_inline)) {
    v += b1 ? b1[c0 + i] : T(0);
    return activate_vector(v, act);
  };
#ifdef GK_BF16_DOT
  if constexpr (std::is_same_v<T, float>)
    if (scale_in_pairs) return dot_product(c1 - c0, p, g.inp, w1, g.inp, 1, src, ld_src, dst, ld, w1_bf16, finish, s);
#endif
  if (s && !scale_x) {
    for (int64_t c = 0; c < c1 - c0; ++c)
      for (int64_t k = 0; k < g.inp; ++k) scaled[c * g.inp + k] = w1[c * g.inp + k] * s[k];
    w1 = scaled;
    w1_bf16 = nullptr;
  }
  product_rows<T>(a.bf16_gemm, c1 - c0, p, g.inp, w1, src, ld_src, dst, ld, panel, w1_bf16, finish);
}

// x1 rows [r0, r1) of channels [c0, c1) of image n with the cheap op's halo rows, into `buf`:
// per channel ld elements, pad slack | halo rows | rows | halo rows | pad slack, so channel c's
// row r0 starts at buf + (c - c0) * ld + pad + pad * W. Rows outside the image and the slack
// are zeros, which the taps read there.
template <typename T>
GK_INLINE void intrinsic_band(const ForwardArgs<T>& a, int64_t n, int64_t r0, int64_t r1, int64_t c0, int64_t c1,
                              T* buf, int64_t ld, T* pack, T* panel, T* scaled) {
  const Geometry& g = *a.g;
  const int64_t W = g.out_width, pad = g.pad;
  const int64_t h0 = std::max<int64_t>(0, r0 - pad), h1 = std::min(g.out_height, r1 + pad);
  // buffer element of x1 row h, column w: pad + (h - (r0 - pad)) * W + w
  primary_rows_nchw(a, n, h0, h1, c0, c1, buf + pad + (h0 - (r0 - pad)) * W, ld, pack, panel, scaled);
  for (int64_t c = c0; c < c1; ++c) {
    T* chan = buf + (c - c0) * ld;
    std::fill(chan, chan + pad + (h0 - (r0 - pad)) * W, T(0));
    std::fill(chan + pad + (h1 - (r0 - pad)) * W, chan + ld, T(0));
  }
}

// out[q] += residual[q] for the p elements from dst on (a run of out), when there is a residual:
// ghost_module_residual's add, while the run is in cache.
template <typename T>
GK_INLINE void add_residual(const ForwardArgs<T>& a, T* dst, int64_t p) {
  if (!a.residual) return;
  const T* r = a.residual + (dst - a.out);
#pragma omp simd
  for (int64_t q = 0; q < p; ++q) dst[q] += r[q];
}

template <typename T>
void forward_nchw(const ForwardArgs<T>& a, int64_t begin, int64_t end) {
  const Geometry& g = *a.g;
  const Tiling& t = *a.t;
  const int64_t W = g.out_width, pad = g.pad;
  // Per channel: pad slack | halo rows | band rows | halo rows | pad slack.
  const int64_t ld = (t.rows + 2 * pad) * W + 2 * pad + kSlack;
  Scratch scratch;
  T* buf = scratch.take<T>(t.group * ld);
  T* pack = scratch.take<T>(g.stride != 1 || a.input_scale ? g.inp * (t.rows + 2 * pad) * W : 0);
  T* panel = scratch.take<T>(kBlock * 2 * Simd<T>::lanes);
  T* scaled = scratch.take<T>(a.input_scale ? g.inp * t.group : 0);
  std::vector<Tap<T>> taps(g.dw * g.dw);
  make_taps(g, a.masks, a.mask_stride, false, taps.data());
  for (int64_t item = begin; item < end; ++item) {
    const int64_t n = item / (t.bands * t.groups);
    const int64_t band = item / t.groups % t.bands;
    const int64_t c0 = item % t.groups * t.group, c1 = std::min(g.init, c0 + t.group);
    const int64_t r0 = band * t.rows, r1 = std::min(g.out_height, r0 + t.rows);
    intrinsic_band(a, n, r0, r1, c0, c1, buf, ld, pack, panel, scaled);
    const int64_t p = (r1 - r0) * W;
    for (int64_t c = c0; c < c1; ++c) {
      const T* center = buf + (c - c0) * ld + pad + pad * W;
      T* intrinsic = a.out + ((n * g.out_channels + c) * g.out_height + r0) * W;
      copy_run(intrinsic, center, p);
      if (a.gate) a.gate->apply_rows(intrinsic, n, c, g.out_channels, r0, r1, W);
      add_residual(a, intrinsic, p);
      for (int64_t j = g.ghost_begin(c); j < g.ghost_end(c); ++j) {
        T* dst = a.out + ((n * g.out_channels + g.init + j) * g.out_height + r0) * W;
        apply_taps(dst, center, p, taps.data(), a.w2 + j * g.dw * g.dw, g.dw, false, a.b2 ? a.b2[j] : T(0), g.act, W);
        if (a.gate) a.gate->apply_rows(dst, n, g.init + j, g.out_channels, r0, r1, W);
        add_residual(a, dst, p);
      }
    }
  }
}

template <typename T>
void forward_nhwc(const ForwardArgs<T>& a, int64_t begin, int64_t end) {
  const Geometry& g = *a.g;
  const Tiling& t = *a.t;
  const int64_t W = g.out_width, pad = g.pad, dw = g.dw;
  Scratch scratch;
  T* buf = scratch.take<T>((t.rows + 2 * pad) * W * t.group);  // [row][col][channel]
  T* pack = scratch.take<T>(g.stride != 1 ? (t.rows + 2 * pad) * W * g.inp : 0);
  T* panel = scratch.take<T>(kBlock * 2 * Simd<T>::lanes);
  T* row = scratch.take<T>(W * g.copies * t.group);
  T* scaled = scratch.take<T>(a.input_scale ? g.inp * t.group : 0);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t n = item / (t.bands * t.groups);
    const int64_t band = item / t.groups % t.bands;
    const int64_t c0 = item % t.groups * t.group, c1 = std::min(g.init, c0 + t.group), cg = c1 - c0;
    const int64_t r0 = band * t.rows, r1 = std::min(g.out_height, r0 + t.rows);
    const int64_t h0 = std::max<int64_t>(0, r0 - pad), h1 = std::min(g.out_height, r1 + pad);
    const int64_t p = (h1 - h0) * W;
    T* first = buf + (h0 - (r0 - pad)) * W * cg;  // buffer row i holds x1 row r0 - pad + i
    if (g.kernel != 1) {
      for (int64_t q = 0; q < p; ++q)
        std::memcpy(first + q * cg, a.x + ((n * g.out_height + h0) * W + q) * g.init + c0, cg * sizeof(T));
    } else {
      const T* src = a.x + (n * g.height + h0) * g.width * g.inp;
      if (g.stride != 1) {
        for (int64_t h = h0; h < h1; ++h)
          for (int64_t w = 0; w < W; ++w)
            std::memcpy(pack + ((h - h0) * W + w) * g.inp,
                        a.x + ((n * g.height + h * g.stride) * g.width + w * g.stride) * g.inp,
                        g.inp * sizeof(T));
        src = pack;
      }
      const T* w1t = a.w1t + c0;
      int64_t ld_w1t = g.init;
      if (a.input_scale) {  // rows of W1^T times the input scale
        const T* s = a.input_scale + n * g.inp;
        for (int64_t k = 0; k < g.inp; ++k)
          for (int64_t c = 0; c < cg; ++c) scaled[k * cg + c] = w1t[k * g.init + c] * s[k];
        w1t = scaled;
        ld_w1t = cg;
      }
      bool in_bf16 = false;
      if constexpr (std::is_same_v<T, float>) {
        in_bf16 = a.bf16_gemm;
        if (in_bf16) gemm_bf16(p, cg, g.inp, src, g.inp, 1, w1t, ld_w1t, first, cg);
      }
      if (!in_bf16) gemm_nn<T>(p, cg, g.inp, src, g.inp, 1, w1t, ld_w1t, first, cg, false, panel);
      for (int64_t q = 0; q < p; ++q)
        for (int64_t c = 0; c < cg; ++c) first[q * cg + c] = activate(first[q * cg + c] + (a.b1 ? a.b1[c0 + c] : T(0)), g.act);
    }
    // Depthwise op row by row into `row` ([col][ghost]); per tap the valid columns are one
    // range. With ratio 2 (ghost j reads intrinsic j, and the whole channel range is one
    // group's ghosts are its intrinsic channels) a tap is one flat multiply-add over
    // (col, channel) with the weights replicated along the row (w2_rows); otherwise a loop
    // over each pixel's ghost channels.
    const int64_t j0 = g.ghost_begin(c0), jn = g.ghost_end(c1 - 1) - j0;
    const bool flat = a.w2_rows != nullptr;
    const int64_t row_ld = flat ? cg : jn;  // row's stride per column
    for (int64_t h = r0; h < r1; ++h) {
      T* o = a.out + (n * g.out_height + h) * W * g.out_channels;
      const T* center = buf + (h - r0 + pad) * W * cg;
      for (int64_t w = 0; w < W; ++w)
        for (int64_t jj = 0; jj < row_ld; ++jj) row[w * row_ld + jj] = a.b2 ? a.b2[j0 + jj] : T(0);
      for (int64_t dy = 0; dy < dw; ++dy) {
        const int64_t hs = h + dy - pad;
        if (hs < 0 || hs >= g.out_height) continue;
        const T* src_row = buf + (hs - r0 + pad) * W * cg;
        for (int64_t dx = 0; dx < dw; ++dx) {
          const int64_t sx = dx - pad, tap = dy * dw + dx;
          const int64_t w_lo = std::max<int64_t>(0, -sx), w_hi = std::min(W, W - sx);
          if (flat) {
            const T* wr = a.w2_rows + (c0 * dw * dw + tap * cg) * W;  // group block, then tap
            T* r = row;
            const T* sr = src_row + sx * cg;
#pragma omp simd
            for (int64_t f = w_lo * cg; f < w_hi * cg; ++f) r[f] += wr[f] * sr[f];
            continue;
          }
          const T* wt = a.w2t + tap * g.ghosts + j0;
          for (int64_t w = w_lo; w < w_hi; ++w) {
            const T* sp = src_row + (w + sx) * cg;
            T* r = row + w * jn;
            for (int64_t jj = 0; jj < jn; ++jj) r[jj] += wt[jj] * sp[(j0 + jj) / g.copies - c0];
          }
        }
      }
      // Pixel by pixel, the group's intrinsic and ghost channels (short runs: no memcpy calls).
      for (int64_t w = 0; w < W; ++w) {
        T* ow = o + w * g.out_channels;
        for (int64_t c = 0; c < cg; ++c) ow[c0 + c] = center[w * cg + c];
        for (int64_t jj = 0; jj < jn; ++jj) ow[g.init + j0 + jj] = activate(row[w * row_ld + jj], g.act);
        if (a.gate) {
          const T* gp = a.gate->pixel(n, h, w, g.out_channels);
          for (int64_t c = c0; c < c1; ++c) ow[c] *= gp[c];
          for (int64_t j = g.init + j0; j < g.init + j0 + jn; ++j) ow[j] *= gp[j];
        }
        add_residual(a, ow + c0, cg);
        add_residual(a, ow + g.init + j0, jn);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Forward into a depthwise conv (ghost_module_depthwise)

// The depthwise k x k conv (+bias) that reads the Ghost output: a GhostBottleneck's folded
// conv_dw + bn_dw. Work items are (image, band of its output rows, group of intrinsic
// channels); the bands of output rows are the direct conv's: Plane is its PlaneGeometry
// (direct_conv.h, a channel at a time) or LanesGeometry (depthwise_lanes.h, channels in lanes).
template <typename T, typename Plane>
struct DepthwiseArgs {
  const Plane* plane;             // input: the Ghost output's planes (PlaneGeometry: group_inputs 1)
  const T* weight;                // [out_channels, k * k]
  const T* bias;                  // [out_channels] or nullptr
  int64_t group, groups;
  T* out;                         // [N, out_channels, plane->out_height, plane->out_width]

  // Output rows [oh0, oh0 + band_rows) of `channel` of image n from its Ghost rows from row0 on.
  GK_INLINE void band(const T* rows, int64_t row0, int64_t n, int64_t channel, int64_t channels, int64_t oh0,
                      T* scratch) const {
    T* dst = out + (n * channels + channel) * plane->out_height * plane->out_width;
    const T* w = weight + channel * plane->k * plane->k;
    const T* b = bias ? bias + channel : nullptr;
    if (plane->stride == 1) conv_band<T, 1>(rows, row0, w, b, Activation::None, 1, dst, *plane, oh0, scratch);
    else conv_band<T, 2>(rows, row0, w, b, Activation::None, 1, dst, *plane, oh0, scratch);
  }
};

// Per item, the Ghost rows the band reads exist only in `buf` (intrinsic channels, with the cheap
// op's halo) and `ghosts` (ghost channels made one at a time; with the channels in lanes, one
// per lane): no Ghost output in memory. With LanesGeometry the item's Ghost channels, intrinsic
// then ghost, go to the conv a vector's lanes at a time.
template <typename T, typename Plane>
void forward_nchw_depthwise(const ForwardArgs<T>& a, const DepthwiseArgs<T, Plane>& d, int64_t begin,
                            int64_t end) {
  constexpr bool in_lanes = std::is_same_v<Plane, LanesGeometry<T>>;
  const Geometry& g = *a.g;
  const Plane& plane = *d.plane;
  const int64_t W = g.out_width, pad = g.pad;
  const int64_t input_rows = plane.max_input_rows(), bands = plane.bands();
  const int64_t ld = (input_rows + 2 * pad) * W + 2 * pad + kSlack, slot = input_rows * W + kSlack;
  Scratch buffers;
  T* buf = buffers.take<T>(d.group * ld);
  T* ghosts = buffers.take<T>((in_lanes ? Simd<T>::lanes : 1) * slot);
  T* pack = buffers.take<T>(g.stride != 1 ? g.inp * (input_rows + 2 * pad) * W : 0);
  T* panel = buffers.take<T>(kBlock * 2 * Simd<T>::lanes);
  T* scratch = buffers.take<T>(plane.scratch_size());
  std::vector<Tap<T>> taps(g.dw * g.dw);
  make_taps(g, a.masks, a.mask_stride, false, taps.data());
  for (int64_t item = begin; item < end; ++item) {
    const int64_t n = item / (bands * d.groups);
    const int64_t oh0 = item / d.groups % bands * plane.band_rows(), rows = plane.rows_in_band(oh0);
    const int64_t c0 = item % d.groups * d.group, c1 = std::min(g.init, c0 + d.group);
    const int64_t r0 = plane.first_input_row(oh0), r1 = plane.last_input_row(oh0, rows);
    intrinsic_band(a, n, r0, r1, c0, c1, buf, ld, pack, panel, static_cast<T*>(nullptr));
    const int64_t p = (r1 - r0) * W;
    const T* center = buf + pad + pad * W;  // channel c0's row r0
    if constexpr (in_lanes) {
      const int64_t intrinsic = c1 - c0, j_begin = g.ghost_begin(c0);
      const int64_t channels = intrinsic + g.ghost_end(c1 - 1) - j_begin;
      const int64_t out_plane = plane.out_height * plane.out_width, taps_k = plane.k * plane.k;
      LaneChannels<T> lanes;
      for (int64_t i = 0; i < channels; ++i) {
        int64_t channel;
        const T* rows_in;
        if (i < intrinsic) {
          channel = c0 + i;
          rows_in = center + i * ld;
        } else {
          const int64_t j = j_begin + i - intrinsic;
          T* ghost = ghosts + lanes.count * slot;  // the lane it will take
          apply_taps(ghost, center + (j / g.copies - c0) * ld, p, taps.data(), a.w2 + j * g.dw * g.dw, g.dw, false,
                     a.b2 ? a.b2[j] : T(0), g.act, W);
          channel = g.init + j;
          rows_in = ghost;
        }
        lanes.add(rows_in, d.weight + channel * taps_k, d.bias ? d.bias[channel] : T(0),
                  d.out + (n * g.out_channels + channel) * out_plane);
        if (lanes.full() || i == channels - 1) {
          depthwise_lanes<T, 2>(plane, lanes, Activation::None, r0, oh0, rows, scratch);  // the entry sends stride 2 only
          lanes.count = 0;
        }
      }
    } else {
      for (int64_t c = c0; c < c1; ++c) {
        const T* rows_in = center + (c - c0) * ld;
        d.band(rows_in, r0, n, c, g.out_channels, oh0, scratch);
        for (int64_t j = g.ghost_begin(c); j < g.ghost_end(c); ++j) {
          apply_taps(ghosts, rows_in, p, taps.data(), a.w2 + j * g.dw * g.dw, g.dw, false, a.b2 ? a.b2[j] : T(0),
                     g.act, W);
          d.band(ghosts, r0, n, g.init + j, g.out_channels, oh0, scratch);
        }
      }
    }
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Argument checks and the op entry points

Geometry check_and_describe(const at::Tensor& x, const at::Tensor& w1, const c10::optional<at::Tensor>& b1,
                            const at::Tensor& w2, const c10::optional<at::Tensor>& b2,
                            int64_t out_channels, int64_t stride, c10::string_view activation) {
  TORCH_CHECK(x.dim() == 4, "ghost_module: x must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  TORCH_CHECK(w1.dim() == 4 && w1.size(2) == w1.size(3) && w1.size(2) % 2 == 1,
              "ghost_module: primary_weight must be (init, inp, k, k) with odd k, got ", w1.sizes());
  TORCH_CHECK(w2.dim() == 4 && w2.size(1) == 1 && w2.size(2) == w2.size(3) && w2.size(2) % 2 == 1,
              "ghost_module: cheap_weight must be (new, 1, d, d) with odd d, got ", w2.sizes());
  TORCH_CHECK(w1.size(1) == x.size(1), "ghost_module: primary_weight expects ", w1.size(1),
              " input channels, x has ", x.size(1));
  // The reference fails there too, and the kernels would read init channels of nothing.
  TORCH_CHECK(w1.size(1) > 0, "ghost_module: primary_weight must have at least one input channel, got ",
              w1.sizes());
  const int64_t init = w1.size(0), ghosts = w2.size(0);
  TORCH_CHECK(init > 0 && ghosts % init == 0 && ghosts >= init,
              "ghost_module: cheap_weight must have a positive multiple of init=", init,
              " channels (init * (ratio - 1)), got ", ghosts);
  TORCH_CHECK(out_channels >= init && out_channels <= init + ghosts,
              "ghost_module: out_channels must be in [", init, ", ", init + ghosts, "], got ", out_channels);
  TORCH_CHECK(stride >= 1, "ghost_module: stride must be >= 1, got ", stride);
  for (const auto* t : {&w1, &w2})
    TORCH_CHECK(t->scalar_type() == x.scalar_type() && t->device() == x.device(),
                "ghost_module: weights must match x's dtype and device (", x.scalar_type(), ", ", x.device(), ")");
  for (const auto* b : {&b1, &b2})
    if (b->has_value())
      TORCH_CHECK((*b)->scalar_type() == x.scalar_type() && (*b)->device() == x.device(),
                  "ghost_module: biases must match x's dtype and device (", x.scalar_type(), ", ", x.device(), ")");
  TORCH_CHECK(!b1.has_value() || (b1->dim() == 1 && b1->size(0) == init),
              "ghost_module: primary_bias must have shape (", init, ",)");
  TORCH_CHECK(!b2.has_value() || (b2->dim() == 1 && b2->size(0) == ghosts),
              "ghost_module: cheap_bias must have shape (", ghosts, ",)");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "ghost_module: the CPU kernel supports float32 and float64, got ", x.scalar_type());
  Geometry g;
  g.batch = x.size(0);
  g.inp = x.size(1);
  g.height = x.size(2);
  g.width = x.size(3);
  g.init = init;
  g.ghosts = ghosts;
  g.keep = out_channels - init;
  g.copies = ghosts / init;
  g.out_channels = out_channels;
  g.kernel = w1.size(2);
  g.stride = stride;
  g.dw = w2.size(2);
  g.pad = g.dw / 2;
  // F.conv2d's floor((H + 2 * pad - k) / stride) + 1: for an empty x the span is -1, which C++'s
  // truncating division would turn into one output row at stride > 1.
  auto out_size = [&](int64_t size) {
    const int64_t span = size + 2 * (g.kernel / 2) - g.kernel;
    return span < 0 ? 0 : span / stride + 1;
  };
  g.out_height = out_size(g.height);
  g.out_width = out_size(g.width);
  TORCH_CHECK(g.out_height > 0 && g.out_width > 0, "ghost_module: x of size ", x.sizes(),
              " is too small for a ", g.kernel, "x", g.kernel, " primary kernel");
  g.channels_last = output_format(x) == at::MemoryFormat::ChannelsLast;
  g.act = parse_activation(activation);
  return g;
}

Tiling choose_tiling(const Geometry& g, size_t elem_size, bool split_channels, int64_t budget,
                     int64_t items_per_thread) {
  const int64_t least_items = items_per_thread * at::get_num_threads();
  Tiling t{g.out_height, 1, g.init, 1};
  auto bytes = [&](const Tiling& c) {
    return int64_t(elem_size) * c.group * (c.rows + 2 * g.pad) * g.out_width * 3;
  };
  auto items = [&](const Tiling& c) { return g.batch * c.bands * c.groups; };
  auto regroup = [&](int64_t group) {
    t.group = std::max<int64_t>(1, group);
    t.groups = (g.init + t.group - 1) / t.group;
  };
  auto reband = [&](int64_t rows) {
    t.rows = std::max<int64_t>(1, rows);
    t.bands = (g.out_height + t.rows - 1) / t.rows;
  };
  // Channel groups cost no recompute, so they come first; halo rows are recomputed.
  while (split_channels && bytes(t) > budget && t.group > 32) regroup((t.group + 1) / 2);
  while (bytes(t) > budget && t.rows > std::max<int64_t>(4, 2 * g.pad)) reband((t.rows + 1) / 2);
  while (items(t) < least_items && split_channels && t.group > 16) regroup((t.group + 1) / 2);
  while (items(t) < least_items && t.rows > std::max<int64_t>(8, 4 * g.pad)) reband((t.rows + 1) / 2);
  return t;
}

namespace {

// dst = src^T for a rows x cols src: float32 in lanes x lanes blocks through the vector registers
// (transpose_block), the edges and float64 element by element. The element loop took 140 us
// of a 230 us channels_last ghost_module (W1^T of 960 -> 160 at 7x7, batch 1; perf).
template <typename T>
void transpose_into(const T* src, int64_t rows, int64_t cols, T* dst) {
  int64_t block_rows = 0, block_cols = 0;
  if constexpr (std::is_same_v<T, float>) {
    constexpr int L = Simd<T>::lanes;
    typename Simd<T>::vec block[L];
    block_rows = rows / L * L, block_cols = cols / L * L;
    for (int64_t r0 = 0; r0 < block_rows; r0 += L)
      for (int64_t c0 = 0; c0 < block_cols; c0 += L) {
        for (int i = 0; i < L; ++i) block[i] = Simd<T>::load(src + (r0 + i) * cols + c0);
        transpose_block<T>(block);
        for (int i = 0; i < L; ++i) Simd<T>::store(dst + (c0 + i) * rows + r0, block[i]);
      }
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = r < block_rows ? block_cols : 0; c < cols; ++c) dst[c * rows + r] = src[r * cols + c];
}

}  // namespace

template <typename T>
std::vector<T> transposed(const T* src, int64_t rows, int64_t cols) {
  std::vector<T> dst(rows * cols);
  transpose_into(src, rows, cols, dst.data());
  return dst;
}
template std::vector<float> transposed(const float*, int64_t, int64_t);
template std::vector<double> transposed(const double*, int64_t, int64_t);

namespace {

// The primary conv's activated output when its kernel is larger than 1x1 (library conv).
at::Tensor library_primary(const at::Tensor& x, const at::Tensor& w1, const c10::optional<at::Tensor>& b1,
                           const Geometry& g) {
  at::Tensor z = at::conv2d(x, w1, b1, {g.stride, g.stride}, {g.kernel / 2, g.kernel / 2});
  if (g.act == Activation::ReLU) z.relu_();
  return z.contiguous(memory_format(g));
}

// input_scale: (N, inp, 1, 1) multiplying x's channels per image (GhostBottleneck's SE gate), folded
// into per-image copies of W1.
// residual: a tensor of the output's shape, dtype and memory format added to it as it is written
// (ghost_module_residual_cpu checks that), or undefined.
at::Tensor forward_cpu(const at::Tensor& x_in, const at::Tensor& w1_in, const c10::optional<at::Tensor>& b1,
                       const at::Tensor& w2_in, const c10::optional<at::Tensor>& b2,
                       const c10::optional<at::Tensor>& gate_logits, const c10::optional<at::Tensor>& input_scale,
                       int64_t out_channels, int64_t stride, c10::string_view activation,
                       const at::Tensor& residual = at::Tensor()) {
  const Geometry g = check_and_describe(x_in, w1_in, b1, w2_in, b2, out_channels, stride, activation);
  at::Tensor gate_values;
  if (gate_logits.has_value()) {
    const at::Tensor& logits = *gate_logits;
    TORCH_CHECK(logits.dim() == 4 && logits.size(0) == g.batch && logits.size(1) == out_channels &&
                    logits.size(2) > 0 && logits.size(3) > 0,
                "ghost_module_gated: gate must be (", g.batch, ", ", out_channels, ", h, w) with h, w >= 1, got ",
                logits.sizes());
    TORCH_CHECK(logits.scalar_type() == x_in.scalar_type() && logits.device() == x_in.device(),
                "ghost_module_gated: gate must match x's dtype and device (", x_in.scalar_type(), ", ",
                x_in.device(), ")");
    const at::Tensor dense_logits = logits.contiguous(memory_format(g));
    gate_values = at::empty_like(dense_logits);
    AT_DISPATCH_FLOATING_TYPES(dense_logits.scalar_type(), "ghost_module_gated_sigmoid", [&] {
      const scalar_t* src = dense_logits.data_ptr<scalar_t>();
      scalar_t* dst = gate_values.data_ptr<scalar_t>();
      at::parallel_for(0, dense_logits.numel(), 4096,
                       [&](int64_t begin, int64_t end) { sigmoid_run(dst + begin, src + begin, end - begin); });
    });
  }
  at::Tensor x = x_in.contiguous(memory_format(g));
  const at::Tensor w1 = w1_in.contiguous(), w2 = w2_in.contiguous();
  at::Tensor scale;  // (N, inp)
  if (input_scale.has_value()) {
    TORCH_CHECK(input_scale->dim() == 4 && input_scale->size(0) == g.batch && input_scale->size(1) == g.inp &&
                    input_scale->size(2) == 1 && input_scale->size(3) == 1,
                "ghost_module_scaled: scale must be (", g.batch, ", ", g.inp, ", 1, 1), got ", input_scale->sizes());
    TORCH_CHECK(input_scale->scalar_type() == x.scalar_type() && input_scale->device() == x.device(),
                "ghost_module_scaled: scale must match x's dtype and device (", x.scalar_type(), ", ", x.device(),
                ")");
    if (g.kernel == 1) scale = input_scale->reshape({g.batch, g.inp}).contiguous();
    else x = x.mul(*input_scale).contiguous(memory_format(g));  // the library conv reads the product
  }
  at::Tensor out = empty_output({g.batch, out_channels, g.out_height, g.out_width}, x.options(), memory_format(g));
  if (out.numel() == 0) return out;
  const at::Tensor source = g.kernel == 1 ? x : library_primary(x, w1, b1, g);
  const at::Tensor b1c = b1.has_value() ? b1->contiguous() : at::Tensor();
  const at::Tensor b2c = b2.has_value() ? b2->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ghost_module_cpu", [&] {
    // NHWC keeps all channels in one group (measured faster): its depthwise loop runs along
    // whole rows of them, and x's pixels are read once.
    const Tiling t = choose_tiling(g, sizeof(scalar_t), !g.channels_last, 512 * 1024, 1);
    const int64_t mask_rows = t.rows + 2 * g.pad;
    const auto masks = column_masks<scalar_t>(g, mask_rows);
    const scalar_t* w1p = w1.data_ptr<scalar_t>();
    // NHWC broadcasts x and loads rows of W1^T, and its depthwise loop reads W2^T; NCHW broadcasts
    // W1 and loads rows of x, and reads W2's rows.
    const std::vector<scalar_t> w1t =
        g.channels_last && g.kernel == 1 ? transposed(w1p, g.init, g.inp) : std::vector<scalar_t>();
    const std::vector<scalar_t> w2t =
        g.channels_last ? transposed(w2.data_ptr<scalar_t>(), g.ghosts, g.dw * g.dw) : std::vector<scalar_t>();
    std::vector<scalar_t> w2_rows;
    if (g.channels_last && g.copies == 1) {
      const int64_t taps = g.dw * g.dw;
      w2_rows.resize(taps * g.out_width * g.ghosts);
      for (int64_t c0 = 0; c0 < g.init; c0 += t.group) {
        const int64_t cg = std::min(t.group, g.init - c0);
        for (int64_t tap = 0; tap < taps; ++tap)
          for (int64_t w = 0; w < g.out_width; ++w)
            std::copy_n(w2t.data() + tap * g.ghosts + c0, cg,
                        w2_rows.data() + (c0 * taps + tap * cg) * g.out_width + w * cg);
      }
    }
    Gate<scalar_t> gate;
    if (gate_values.defined()) {
      gate = Gate<scalar_t>(gate_values.data_ptr<scalar_t>(), gate_values.size(2), gate_values.size(3), g.out_height,
                            g.out_width, !g.channels_last);
    }
    ForwardArgs<scalar_t> a{&g, &t, source.data_ptr<scalar_t>(), w1p, w1t.data(),
                            scale.defined() ? scale.data_ptr<scalar_t>() : nullptr,
                            g.kernel == 1 && b1c.defined() ? b1c.data_ptr<scalar_t>() : nullptr,
                            w2.data_ptr<scalar_t>(), w2t.data(), w2_rows.empty() ? nullptr : w2_rows.data(),
                            b2c.defined() ? b2c.data_ptr<scalar_t>() : nullptr,
                            masks->data(), mask_stride(g, mask_rows), out.data_ptr<scalar_t>(),
                            gate_values.defined() ? &gate : nullptr,
                            residual.defined() ? residual.data_ptr<scalar_t>() : nullptr,
                            g.kernel == 1 && bf16_gemm_enabled(x.scalar_type(), g.inp)};
    if (a.bf16_gemm) a.w1_bf16 = frozen_bf16_rows(w1);
    at::parallel_for(0, g.batch * t.bands * t.groups, 1, [&](int64_t begin, int64_t end) {
      if (g.channels_last) forward_nhwc(a, begin, end);
      else forward_nchw(a, begin, end);
    });
  });
  return out;
}

}  // namespace

// ghost_module followed by a depthwise conv (+bias) of its output, stride 1 or 2: what
// accelerate() makes of a GhostBottleneck's ghost1 -> conv_dw -> bn_dw in eval. NCHW runs
// forward_nchw_depthwise, with the channels in lanes or, where that is slower
// (depthwise_lanes_pays), a plane at a time; channels_last composes the Ghost kernel and the library conv.
at::Tensor ghost_module_depthwise_cpu(const at::Tensor& x_in, const at::Tensor& w1_in,
                                      const c10::optional<at::Tensor>& b1, const at::Tensor& w2_in,
                                      const c10::optional<at::Tensor>& b2, int64_t out_channels, int64_t stride,
                                      c10::string_view activation, const at::Tensor& w3_in,
                                      const c10::optional<at::Tensor>& b3, int64_t dw_stride) {
  const Geometry g = check_and_describe(x_in, w1_in, b1, w2_in, b2, out_channels, stride, activation);
  TORCH_CHECK(w3_in.dim() == 4 && w3_in.size(0) == out_channels && w3_in.size(1) == 1 &&
                  w3_in.size(2) == w3_in.size(3) && w3_in.size(2) % 2 == 1,
              "ghost_module_depthwise: depthwise_weight must be (", out_channels, ", 1, k, k) with odd k, got ",
              w3_in.sizes());
  TORCH_CHECK(!b3.has_value() || (b3->dim() == 1 && b3->size(0) == out_channels),
              "ghost_module_depthwise: depthwise_bias must have shape (", out_channels, ",)");
  for (const at::Tensor* t : {&w3_in, b3.has_value() ? &*b3 : &w3_in})
    TORCH_CHECK(t->scalar_type() == x_in.scalar_type() && t->device() == x_in.device(),
                "ghost_module_depthwise: the depthwise weight and bias must match x's dtype and device (",
                x_in.scalar_type(), ", ", x_in.device(), ")");
  TORCH_CHECK(dw_stride == 1 || dw_stride == 2, "ghost_module_depthwise: depthwise_stride must be 1 or 2, got ",
              dw_stride);
  const int64_t k = w3_in.size(2);
  if (g.channels_last) {
    const at::Tensor ghost =
        forward_cpu(x_in, w1_in, b1, w2_in, b2, c10::nullopt, c10::nullopt, out_channels, stride, activation);
    return at::conv2d(ghost, w3_in, b3, {dw_stride, dw_stride}, {k / 2, k / 2}, {1, 1}, out_channels);
  }
  const at::Tensor x = x_in.contiguous();
  const at::Tensor w1 = w1_in.contiguous(), w2 = w2_in.contiguous(), w3 = w3_in.contiguous();
  const int64_t out_height = (g.out_height - 1) / dw_stride + 1, out_width = (g.out_width - 1) / dw_stride + 1;
  at::Tensor out = empty_output({g.batch, out_channels, out_height, out_width}, x.options());
  if (out.numel() == 0) return out;
  const at::Tensor source = g.kernel == 1 ? x : library_primary(x, w1, b1, g);
  const at::Tensor b1c = b1.has_value() ? b1->contiguous() : at::Tensor();
  const at::Tensor b2c = b2.has_value() ? b2->contiguous() : at::Tensor();
  const at::Tensor b3c = b3.has_value() ? b3->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ghost_module_depthwise_cpu", [&] {
    auto run = [&](const auto& plane) {
      DepthwiseArgs<scalar_t, std::decay_t<decltype(plane)>> d{
          &plane, w3.data_ptr<scalar_t>(), b3c.defined() ? b3c.data_ptr<scalar_t>() : nullptr, g.init, 1,
          out.data_ptr<scalar_t>()};
      // Intrinsic channels per item: their buffers within 256 KiB, and an item for every thread (as
      // choose_tiling's forward: two per thread ran 0-8% slower at batch 1).
      const int64_t mask_rows = plane.max_input_rows() + 2 * g.pad;
      const int64_t channel_bytes = mask_rows * g.out_width * int64_t(sizeof(scalar_t));
      auto regroup = [&](int64_t group) {
        d.group = std::max<int64_t>(1, group);
        d.groups = (g.init + d.group - 1) / d.group;
      };
      while (d.group > 8 && d.group * channel_bytes > 256 * 1024) regroup((d.group + 1) / 2);
      while (d.group > 8 && g.batch * plane.bands() * d.groups < at::get_num_threads()) regroup((d.group + 1) / 2);
      const auto masks = column_masks<scalar_t>(g, mask_rows);
      ForwardArgs<scalar_t> a{&g, nullptr, source.data_ptr<scalar_t>(), w1.data_ptr<scalar_t>(), nullptr, nullptr,
                              g.kernel == 1 && b1c.defined() ? b1c.data_ptr<scalar_t>() : nullptr,
                              w2.data_ptr<scalar_t>(), nullptr, nullptr,
                              b2c.defined() ? b2c.data_ptr<scalar_t>() : nullptr,
                              masks->data(), mask_stride(g, mask_rows), nullptr, nullptr, nullptr,
                              g.kernel == 1 && bf16_gemm_enabled(x.scalar_type(), g.inp)};
      if (a.bf16_gemm) a.w1_bf16 = frozen_bf16_rows(w1);
      at::parallel_for(0, g.batch * plane.bands() * d.groups, 1,
                       [&](int64_t begin, int64_t end) { forward_nchw_depthwise(a, d, begin, end); });
    };
    // Lanes for float32 at stride 2 (GhostNet's conv_dw) only: each instantiation costs build time.
    // A generic lambda, because `if constexpr` discards the float64 lanes code only in a template.
    auto choose = [&](auto zero) {
      using T = decltype(zero);
      if constexpr (std::is_same_v<T, float>)
        if (dw_stride == 2 && depthwise_lanes_pays(g.out_width, k, dw_stride))
          return run(LanesGeometry<T>{g.out_height, g.out_width, k, dw_stride, out_height, out_width, 1});
      run(PlaneGeometry<T>{g.out_height, g.out_width, k, dw_stride, out_height, out_width, 1});
    };
    choose(scalar_t(0));
  });
  return out;
}

at::Tensor ghost_module_cpu(const at::Tensor& x, const at::Tensor& w1, const c10::optional<at::Tensor>& b1,
                            const at::Tensor& w2, const c10::optional<at::Tensor>& b2, int64_t out_channels,
                            int64_t stride, c10::string_view activation) {
  return forward_cpu(x, w1, b1, w2, b2, c10::nullopt, c10::nullopt, out_channels, stride, activation);
}

at::Tensor ghost_module_gated_cpu(const at::Tensor& x, const at::Tensor& w1, const c10::optional<at::Tensor>& b1,
                                  const at::Tensor& w2, const c10::optional<at::Tensor>& b2, const at::Tensor& gate,
                                  int64_t out_channels, int64_t stride, c10::string_view activation) {
  return forward_cpu(x, w1, b1, w2, b2, gate, c10::nullopt, out_channels, stride, activation);
}

at::Tensor ghost_module_scaled_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& w1,
                                   const c10::optional<at::Tensor>& b1, const at::Tensor& w2,
                                   const c10::optional<at::Tensor>& b2, int64_t out_channels, int64_t stride,
                                   c10::string_view activation) {
  return forward_cpu(x, w1, b1, w2, b2, c10::nullopt, scale, out_channels, stride, activation);
}

// ghost_module (or ghost_module_scaled when scale is given), then out.add_(residual, alpha=alpha):
// a bottleneck's ghost2 and its shortcut add, which freeze() makes one op. A residual of the
// output's shape, dtype and layout with alpha 1 is added as the kernel writes; otherwise (a
// broadcast, another dtype) by add_ after it, with add_'s rules and errors.
at::Tensor ghost_module_residual_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& scale,
                                     const at::Tensor& w1, const c10::optional<at::Tensor>& b1, const at::Tensor& w2,
                                     const c10::optional<at::Tensor>& b2, int64_t out_channels, int64_t stride,
                                     c10::string_view activation, const at::Tensor& residual,
                                     const at::Scalar& alpha) {
  const Geometry g = check_and_describe(x, w1, b1, w2, b2, out_channels, stride, activation);
  const std::vector<int64_t> out_shape{g.batch, out_channels, g.out_height, g.out_width};
  const bool fused = residual.sizes() == out_shape && residual.scalar_type() == x.scalar_type() &&
                     residual.device() == x.device() && residual.is_contiguous(memory_format(g)) &&
                     alpha.equal(1);
  if (!fused) {
    at::Tensor out = forward_cpu(x, w1, b1, w2, b2, c10::nullopt, scale, out_channels, stride, activation);
    return out.add_(residual, alpha);
  }
  return forward_cpu(x, w1, b1, w2, b2, c10::nullopt, scale, out_channels, stride, activation, residual);
}

}  // namespace ghostkernels
