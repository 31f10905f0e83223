// The dense 3x3 conv (+bias, then ReLU or none) of a few input channels, stride 1 or 2: a
// network's stem (GhostNet's 3 -> 16 at 224x224, stride 2), with a vector's lanes of output
// channels side by side. Each tap of each input channel is one FMA of the tap's weight vector
// (over the output channels) with one input pixel broadcast: no lane computes a padding column,
// and the input is not split into phases. The phase-split conv (direct_conv.h) spent ~75 us of
// its 274 us per 224x224 image on GhostNet's stem (one thread) in per-band phase buffers and
// copies, and its tap loops ran at 60-70% of the FMA rate. On that stem (AVX-512, 2 threads, in
// one process) this kernel is 1.11-1.15x faster at batch 1 and 1.30-1.48x at batch 8. Built for
// float32 (float64 is for checking, not speed); dense_lanes_pays says where it is used.
#pragma once

#include <algorithm>
#include <cstdint>

#include "depthwise_lanes.h"
#include "gemm.h"
#include "ghost_common.h"
#include "isa.h"

namespace ghostkernels {

// Whether this kernel takes a conv that the phase split would: float32 (the caller checks), one
// group of at most 4 inputs, 3x3 taps, and output channels in whole vectors of lanes. A partial
// vector made it slower than the phase split (AVX-512: 3 -> 8 and 3 -> 20 at 224x224 0.84x).
inline bool dense_lanes_pays(int64_t groups, int64_t out_channels, int64_t k) {
  return groups == 1 && k == 3 && out_channels % Simd<float>::lanes == 0;
}

// A band's geometry: the input tile (zero-bordered rows of every input channel) and the output
// pixels it makes.
template <typename T>
struct DenseLanesGeometry {
  static constexpr int L = Simd<T>::lanes;
  static constexpr int64_t k = 3;
  int64_t inputs, height, width, stride, out_height, out_width, out_channels;

  // At least `min_bands` bands (work for every thread), each tile within ~128 KiB of L2.
  DenseLanesGeometry(int64_t inputs, int64_t height, int64_t width, int64_t stride, int64_t out_height,
                     int64_t out_width, int64_t out_channels, int64_t min_bands)
      : inputs(inputs), height(height), width(width), stride(stride), out_height(out_height), out_width(out_width),
        out_channels(out_channels) {
    const int64_t per_row = inputs * stride * tile_columns();
    const int64_t fit = std::max<int64_t>(1, 128 * 1024 / int64_t(sizeof(T)) / per_row);
    const int64_t split = (out_height + min_bands - 1) / std::max<int64_t>(1, min_bands);
    band_rows_ = std::max<int64_t>(1, std::min({out_height, fit, split}));
  }
  int64_t pad() const { return k / 2; }
  int64_t band_rows() const { return band_rows_; }
  int64_t bands() const { return (out_height + band_rows_ - 1) / band_rows_; }
  int64_t rows_in_band(int64_t oh0) const { return std::min(band_rows_, out_height - oh0); }
  int64_t tile_columns() const { return (out_width - 1) * stride + k; }
  int64_t tile_rows(int64_t rows) const { return (rows - 1) * stride + k; }
  int64_t tile_plane() const { return tile_rows(band_rows_) * tile_columns(); }
  // the taps, the tile, and slack for a row's last L pixels, which may run past the tile's end
  int64_t scratch_size() const { return inputs * k * k * L + inputs * tile_plane() + 2 * L + k; }

 private:
  int64_t band_rows_;
};

// dst[j] = bias + the taps of output pixel ow0 + j (j < lanes) of the output row whose first tile
// row is at `base` (input channel ci's tile rows at base + ci * plane). Input column by input
// column: each value is broadcast once and used at once by the (at most 3) pixels it feeds, so the
// J sums, a tap row's 3 weights and one broadcast are all that is live. Tap by tap (each pixel's
// dx, then the next dx), GCC kept the broadcasts that two taps share alive across them and spilled
// sums to the stack on AVX2: a store-forwarding round trip in the FMA chains.
template <typename T, int S>
GK_INLINE void dense_pixels(const T* base, int64_t inputs, int64_t plane, int64_t columns,
                            const typename Simd<T>::vec* w, typename Simd<T>::vec bias, int64_t ow0,
                            typename Simd<T>::vec* dst) {
  using V = typename Simd<T>::vec;
  constexpr int k = 3, J = Simd<T>::lanes, U = (J - 1) * S + k;
  V acc[J];
  for (int j = 0; j < J; ++j) acc[j] = bias;
  for (int64_t ci = 0; ci < inputs; ++ci)
    for (int dy = 0; dy < k; ++dy) {
      const T* row = base + ci * plane + dy * columns + ow0 * S;
      const V* taps = w + (ci * k + dy) * k;
      const V w0 = taps[0], w1 = taps[1], w2 = taps[2];
#pragma GCC unroll 40
      for (int u = 0; u < U; ++u) {
        const T value = row[u];  // a scalar: V{} + value would add 0 before the broadcast (-0 + 0 = +0)
        // pixel j reads column u through tap dx = u - j * S
        if (u % S == 0 && u / S < J) acc[u / S] += w0 * value;
        if ((u - 1) % S == 0 && u >= 1 && (u - 1) / S < J) acc[(u - 1) / S] += w1 * value;
        if ((u - 2) % S == 0 && u >= 2 && (u - 2) / S < J) acc[(u - 2) / S] += w2 * value;
      }
    }
  for (int j = 0; j < J; ++j) dst[j] = acc[j];
}

// Output rows [oh0, oh0 + rows) of every output channel of an image: x its input planes, w the
// (out_channels, inputs, 3, 3) weights (out_channels a multiple of the lanes: dense_lanes_pays), out
// its output planes.
template <typename T, int S>
GK_INLINE void dense_lanes_band(const DenseLanesGeometry<T>& g, const T* x, const T* w, const T* bias,
                                Activation act, T* out, int64_t oh0, int64_t rows, T* scratch) {
  using V = typename Simd<T>::vec;
  constexpr int L = Simd<T>::lanes;
  const int64_t k = g.k, taps = g.inputs * k * k, pad = g.pad(), W = g.width, columns = g.tile_columns();
  const int64_t plane = g.tile_plane(), tile_rows = g.tile_rows(rows), out_width = g.out_width;
  V* wv = reinterpret_cast<V*>(scratch);
  T* tile = reinterpret_cast<T*>(wv + taps);
  std::fill(tile + g.inputs * plane, tile + g.inputs * plane + 2 * L + k, T(0));  // the slack
  // Tile row r holds input row first + r, tile column u input column u - pad; zeros outside the image.
  const int64_t first = oh0 * S - pad;
  for (int64_t ci = 0; ci < g.inputs; ++ci)
    for (int64_t r = 0; r < tile_rows; ++r) {
      T* row = tile + ci * plane + r * columns;
      const int64_t ih = first + r;
      if (ih < 0 || ih >= g.height) {
        std::fill(row, row + columns, T(0));
        continue;
      }
      std::fill(row, row + pad, T(0));
      copy_run(row + pad, x + (ci * g.height + ih) * W, std::min(W, columns - pad));
      std::fill(row + std::min(pad + W, columns), row + columns, T(0));
    }
  for (int64_t o0 = 0; o0 < g.out_channels; o0 += L) {
    const T* weight[L];
    T* planes[L];
    V b{};
    for (int c = 0; c < L; ++c) {
      weight[c] = w + (o0 + c) * taps;
      planes[c] = out + (o0 + c) * g.out_height * out_width;
      if (bias) b[c] = bias[o0 + c];
    }
    taps_in_lanes(weight, taps, wv);
    // L pixels of a row at a time, transposed in registers into the channels' rows: the lanes of
    // pixels past the row's end are computed and not stored.
    for (int64_t r = 0; r < rows; ++r) {
      const T* base = tile + r * S * columns;
      const int64_t offset = (oh0 + r) * out_width;
      for (int64_t ow = 0; ow < out_width; ow += L) {
        V block[L];
        dense_pixels<T, S>(base, g.inputs, plane, columns, wv, b, ow, block);
        transpose_block<T>(block);
        const int64_t n = std::min<int64_t>(L, out_width - ow);
        for (int c = 0; c < L; ++c) store_first(planes[c] + offset + ow, activate_vector(block[c], act), n);
      }
    }
  }
}

}  // namespace ghostkernels
