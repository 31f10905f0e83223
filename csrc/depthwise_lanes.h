// The depthwise k x k conv (+bias, then ReLU or none), stride 1 or 2, of up to one vector's lanes
// of channels at once, with the channels in the lanes: each tap is one FMA of a weight vector with
// an input pixel's vector, at any stride, with no per-channel setup. The planes come in NCHW and go
// out NCHW: lanes x lanes in-register transposes move them into a zero-bordered tile of pixel vectors and
// the results back. Built for float32 only (depthwise_lanes_pays). The phase-split conv
// (direct_conv.h), one plane at a time, paid ~200 ns per channel and band for its phases and
// copies: 672@14 k5 stride 2 took 130 us there.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "gemm.h"
#include "ghost_common.h"
#include "isa.h"

namespace ghostkernels {

// Whether this kernel beats the phase-split one: it pays 4 shuffles per input element for the
// transposes, the phase split a fixed cost per channel and band. Measured in one process on
// GhostNet's stride-2 convs and a few stride-1 ones (bench/results/xeon-amx-2threads-small-plane-ab.txt,
// section 8): the phase split kept 112x112 planes with 3x3 taps at stride 2 and planes wider than
// 28 at stride 1, where its fixed costs are spread thin. The kernel is built for float32 with 3x3
// and 5x5 taps (GhostNet's) only, which the callers check too: each further instantiation added
// minutes to the build for convs the phase split serves (float64 is for checking, not speed).
inline bool depthwise_lanes_pays(int64_t width, int64_t k, int64_t stride) {
  if (k != 3 && k != 5) return false;
  return stride == 1 ? width <= 32 : width <= 64 || k >= 5;
}

// Shuffle indices for bit d of transpose_block: [0] row i's new lanes, [1] row i | d's.
template <typename T, int d>
constexpr auto transpose_lanes() {
  constexpr int L = Simd<T>::lanes;
  std::array<std::array<typename Simd<T>::lane_t, L>, 2> t{};
  for (int c = 0; c < L; ++c) {
    t[0][c] = (c & d) ? L + (c ^ d) : c;
    t[1][c] = (c & d) ? L + c : (c ^ d);
  }
  return t;
}

template <typename T, int d>
GK_INLINE void transpose_step(typename Simd<T>::vec* v) {
  static constexpr auto lanes = transpose_lanes<T, d>();
  typename Simd<T>::index own, partner;
  std::memcpy(&own, lanes[0].data(), sizeof(own));
  std::memcpy(&partner, lanes[1].data(), sizeof(partner));
  for (int i = 0; i < Simd<T>::lanes; ++i)
    if (!(i & d)) {
      const auto a = v[i], b = v[i | d];
      v[i] = __builtin_shuffle(a, b, own);
      v[i | d] = __builtin_shuffle(a, b, partner);
    }
}

// v[r][c] -> v[c][r] for a lanes x lanes block: for each bit d of the index, rows i and i | d swap
// the lanes in which that bit differs (one two-source shuffle per row and bit).
template <typename T, int d = 1>
GK_INLINE void transpose_block(typename Simd<T>::vec* v) {
  static_assert(std::is_same_v<T, float>, "the lanes kernels are built for float32");
  transpose_step<T, d>(v);
  if constexpr (2 * d < Simd<T>::lanes) transpose_block<T, 2 * d>(v);
}

// src[0, n) and zeros: a vector that reads nothing past src[n - 1].
template <typename T>
GK_INLINE typename Simd<T>::vec load_first(const T* src, int64_t n) {
  return n >= Simd<T>::lanes ? Simd<T>::load(src) : Simd<T>::load_first(src, n);
}

// dst[0, n) = v's first n lanes, writing nothing past dst[n - 1].
template <typename T>
GK_INLINE void store_first(T* dst, typename Simd<T>::vec v, int64_t n) {
  if (n >= Simd<T>::lanes) return Simd<T>::store(dst, v);
  Simd<T>::store_first(dst, v, n);
}

// dst[t][c] = weight[c][t] for t < taps, c < lanes: taps given per channel (rows of `taps`
// values), as vectors over the channels.
template <typename T>
GK_INLINE void taps_in_lanes(const T* const* weight, int64_t taps, typename Simd<T>::vec* dst) {
  constexpr int L = Simd<T>::lanes;
  typename Simd<T>::vec block[L];
  for (int64_t t0 = 0; t0 < taps; t0 += L) {
    const int64_t n = std::min<int64_t>(L, taps - t0);
    for (int c = 0; c < L; ++c) block[c] = load_first(weight[c] + t0, n);
    transpose_block<T>(block);
    for (int64_t t = 0; t < n; ++t) dst[t0 + t] = block[t];
  }
}

// A plane's extent, the output rows per band and the tile of pixel vectors that a band reads.
template <typename T>
struct LanesGeometry {
  static constexpr int L = Simd<T>::lanes;
  int64_t height, width, k, stride, out_height, out_width;

  // At least `min_bands` bands (work for every thread when the channels alone give too few items),
  // and the tile within ~256 KiB of L2: each output row's k tile rows stay in L1.
  LanesGeometry(int64_t height, int64_t width, int64_t k, int64_t stride, int64_t out_height, int64_t out_width,
                int64_t min_bands)
      : height(height), width(width), k(k), stride(stride), out_height(out_height), out_width(out_width) {
    const int64_t fit = 256 * 1024 / (tile_columns() * L * int64_t(sizeof(T)));
    const int64_t split = (out_height + min_bands - 1) / std::max<int64_t>(1, min_bands);
    band_rows_ = std::max<int64_t>(1, std::min({out_height, (fit - k) / stride + 1, split}));
  }
  int64_t pad() const { return k / 2; }
  int64_t band_rows() const { return band_rows_; }
  int64_t bands() const { return (out_height + band_rows_ - 1) / band_rows_; }
  int64_t rows_in_band(int64_t oh0) const { return std::min(band_rows_, out_height - oh0); }
  // Input rows [first, last) that the band of `rows` output rows from oh0 reads.
  int64_t first_input_row(int64_t oh0) const { return std::max<int64_t>(0, oh0 * stride - pad()); }
  int64_t last_input_row(int64_t oh0, int64_t rows) const {
    return std::min(height, (oh0 + rows - 1) * stride - pad() + k);
  }
  // Whether a row of output pixels is one taps pass of 8 (rows of 5-7 pixels: a 7x7 output), its
  // extra pixels computed on zero tile columns: as passes of 4, 2 and 1, each a chain of k * k
  // dependent FMAs per pixel, the 5x5 stride-2 conv 14x14 -> 7x7 ran 1.07-1.15x slower. Wider rows
  // keep exact passes (their padded columns cost more than the tail's chains: 0.91-0.98x at 14 and
  // 28 pixels; bench/results, Zen 3).
  bool row_in_one_pass() const { return out_width > 4 && out_width < 8; }
  // The tile's columns: at least pad + width for k >= 3 (every input column has one).
  int64_t tile_columns() const { return ((row_in_one_pass() ? 8 : out_width) - 1) * stride + k; }
  int64_t tile_rows(int64_t rows) const { return (rows - 1) * stride + k; }
  int64_t max_input_rows() const { return tile_rows(band_rows_); }  // a band's, halo included
  int64_t scratch_size() const {  // the tile, the output band (+ a vector's lanes of slack), the taps
    return (tile_rows(band_rows_) * tile_columns() + band_rows_ * out_width + L + k * k) * L;
  }

 private:
  int64_t band_rows_;
};

// Up to a vector's lanes of channels: each one's input plane (at the row the caller's x_row0 names,
// rows of `width` elements), k * k taps, bias and output plane (at row 0).
template <typename T>
struct LaneChannels {
  static constexpr int L = Simd<T>::lanes;
  const T* in[L];
  const T* weight[L];
  T bias[L];
  T* out[L];
  int count = 0;
  GK_INLINE bool full() const { return count == L; }
  GK_INLINE void add(const T* plane, const T* taps, T b, T* out_plane) {
    in[count] = plane, weight[count] = taps, bias[count] = b, out[count] = out_plane;
    ++count;
  }
};

// acc[j] = bias + the taps of output pixels ow0 + j of the output row whose first tile row is `tile`.
template <typename T, int S, int K, int J>
GK_INLINE void lanes_pixels(const typename Simd<T>::vec* tile, int64_t columns, const typename Simd<T>::vec* w,
                            typename Simd<T>::vec bias, int64_t ow0, typename Simd<T>::vec* dst) {
  using V = typename Simd<T>::vec;
  constexpr int k = K;
  V acc[J];
  for (int j = 0; j < J; ++j) acc[j] = bias;
  for (int dy = 0; dy < k; ++dy) {
    const V* row = tile + dy * columns + ow0 * S;
    for (int dx = 0; dx < k; ++dx) {
      const V wv = w[dy * k + dx];
      for (int j = 0; j < J; ++j) acc[j] += wv * row[j * S + dx];
    }
  }
  for (int j = 0; j < J; ++j) dst[j] = acc[j];
}

// Output rows [oh0, oh0 + rows) of the channels in ch; their input planes hold rows from x_row0 on.
template <typename T, int S, int K>
GK_INLINE void depthwise_lanes_k(const LanesGeometry<T>& g, const LaneChannels<T>& ch, Activation act, int64_t x_row0,
                                 int64_t oh0, int64_t rows, T* scratch) {
  using V = typename Simd<T>::vec;
  constexpr int L = Simd<T>::lanes;
  const int64_t k = K, taps = k * k, pad = g.pad(), W = g.width, columns = g.tile_columns();
  const int64_t tile_rows = g.tile_rows(rows), out_width = g.out_width, count = ch.count;
  V* tile = reinterpret_cast<V*>(scratch);
  V* pixels = tile + tile_rows * columns;  // the output band, pixel-major
  V* w = pixels + rows * out_width + L;
  V block[L];
  // Lanes past count repeat channel 0 (no branch per load); their results are not stored.
  const T* in[L];
  const T* weight[L];
  for (int c = 0; c < L; ++c) in[c] = ch.in[c < count ? c : 0], weight[c] = ch.weight[c < count ? c : 0];
  // The taps' weights and the biases as vectors over the channels.
  taps_in_lanes(weight, taps, w);
  V bias{};
  for (int64_t c = 0; c < count; ++c) bias[c] = ch.bias[c];
  // Tile row r holds input row first + r, tile column u input column u - pad; zeros outside the plane.
  const int64_t first = oh0 * S - pad;
  const int64_t ih_begin = std::max<int64_t>(0, first), ih_end = std::min(g.height, first + tile_rows);
  for (int64_t r = 0; r < tile_rows; ++r) {
    V* row = tile + r * columns;
    if (first + r < ih_begin || first + r >= ih_end) {
      std::fill(row, row + columns, V{});
    } else {
      std::fill(row, row + pad, V{});
      std::fill(row + pad + W, row + columns, V{});
    }
  }
  // The band's input pixels, L at a time in flat order (rows are contiguous), one vector each, stored
  // at their tile columns.
  const int64_t f_begin = (ih_begin - x_row0) * W, f_end = (ih_end - x_row0) * W;
  V* dst = tile + (ih_begin - first) * columns + pad;
  int64_t iw = 0;
  for (int64_t f = f_begin; f < f_end; f += L) {
    const int64_t n = std::min<int64_t>(L, f_end - f);
    if (n == L) {
      for (int c = 0; c < L; ++c) block[c] = Simd<T>::load(in[c] + f);
    } else {
      for (int c = 0; c < L; ++c) block[c] = load_first(in[c] + f, n);
    }
    transpose_block<T>(block);
    // A vector at a time from the registers: indexed by run lengths, the block went through the stack.
#pragma GCC unroll 16
    for (int i = 0; i < L; ++i) {
      if (i == n) break;
      dst[iw] = block[i];
      const bool wrap = ++iw == W;
      iw = wrap ? 0 : iw;
      dst = wrap ? dst + columns : dst;
    }
  }
  // The taps, up to 8 output pixels of a row at a time; a row in one pass (row_in_one_pass) writes
  // its (at most 3) extra pixels over the next row's, computed after it, or into the band's slack.
  for (int64_t r = 0; r < rows; ++r) {
    const V* base = tile + r * S * columns;
    V* dst = pixels + r * out_width;
    if (g.row_in_one_pass()) {
      lanes_pixels<T, S, K, 8>(base, columns, w, bias, 0, dst);
      continue;
    }
    int64_t ow = 0;
    for (; ow + 8 <= out_width; ow += 8) lanes_pixels<T, S, K, 8>(base, columns, w, bias, ow, dst + ow);
    if (ow + 4 <= out_width) lanes_pixels<T, S, K, 4>(base, columns, w, bias, ow, dst + ow), ow += 4;
    if (ow + 2 <= out_width) lanes_pixels<T, S, K, 2>(base, columns, w, bias, ow, dst + ow), ow += 2;
    if (ow < out_width) lanes_pixels<T, S, K, 1>(base, columns, w, bias, ow, dst + ow);
  }
  // Back to the channels' planes, L output pixels at a time (the band's rows are contiguous there too).
  const int64_t p_end = rows * out_width, offset = oh0 * out_width;
  for (int64_t p = 0; p < p_end; p += L) {
    const int64_t n = std::min<int64_t>(L, p_end - p);
    for (int64_t i = 0; i < L; ++i) block[i] = pixels[p + i];  // past p_end: lanes not stored
    transpose_block<T>(block);
#pragma GCC unroll 16
    for (int c = 0; c < L; ++c) {  // constant indices: the block stays in registers
      if (c == count) break;
      store_first(ch.out[c] + offset + p, activate_vector(block[c], act), n);
    }
  }
}

// Output rows [oh0, oh0 + rows) of the channels in ch, a band of at most g.band_rows() at a time;
// k is 3 or 5 (depthwise_lanes_pays).
template <typename T, int S>
GK_INLINE void depthwise_lanes(const LanesGeometry<T>& g, const LaneChannels<T>& ch, Activation act, int64_t x_row0,
                               int64_t oh0, int64_t rows, T* scratch) {
  for (int64_t oh = oh0; oh < oh0 + rows; oh += g.band_rows()) {
    const int64_t band = std::min(g.band_rows(), oh0 + rows - oh);
    if (g.k == 3) depthwise_lanes_k<T, S, 3>(g, ch, act, x_row0, oh, band, scratch);
    else depthwise_lanes_k<T, S, 5>(g, ch, act, x_row0, oh, band, scratch);
  }
}

}  // namespace ghostkernels
