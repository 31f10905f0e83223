// A k x k stride-1 'same' conv of one NCHW image, its input grad and its weight grad, as GEMMs
// whose B rows are shifted views of zero-padded planes: the training-mode Ghost op's primary
// conv where oneDNN is slow (few input channels; ghost_train_cpu.cpp, Primary::Shifted).
//
// Layout. A padded plane has Hp = H + 2p rows of Wp = W + 2p columns (p = k / 2), the map at
// (p, p), zeros around it, then kPlaneSlack zeros. Outputs are computed at the "padded-width"
// positions q = h * Wp + w, w < Wp, of which w < W are the conv's: the tap (dy, dx) of input
// channel ci reads the padded plane at q + dy * Wp + dx for every q, one contiguous row, and
// the 2p extra columns per row (6% at 32x32) cost less than masking the row ends.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "gemm.h"
#include "isa.h"

namespace ghostkernels {

// Columns of a tile; the zeros every padded plane keeps after its last row, so that a tile's
// loads past the last output stay inside the plane's buffer.
constexpr int64_t kShiftedTile = 32;
constexpr int64_t kPlaneSlack = 2 * kShiftedTile;

struct PaddedPlanes {
  static constexpr int64_t kStride = 1;              // the conv's
  int64_t height, width, pad, padded_width, stride;  // stride: elements from one plane to the next
  PaddedPlanes(int64_t h, int64_t w, int64_t k)
      : height(h), width(w), pad(k / 2), padded_width(w + 2 * (k / 2)),
        stride((h + 2 * (k / 2)) * (w + 2 * (k / 2)) + kPlaneSlack) {}
  int64_t outputs() const { return height * padded_width; }  // padded-width positions
  // Copies `channels` H x W planes into the interiors of zero-initialised padded planes.
  template <typename T>
  GK_INLINE void fill(const T* src, int64_t channels, T* dst) const {
    for (int64_t c = 0; c < channels; ++c)
      for (int64_t h = 0; h < height; ++h)
        copy_run(dst + c * stride + (h + pad) * padded_width + pad, src + (c * height + h) * width, width);
  }
  // The H x W maps of `channels` rows of padded-width outputs (`wide`, outputs() apart) into dst.
  template <typename T>
  GK_INLINE void crop(const T* wide, int64_t channels, T* dst) const {
    for (int64_t c = 0; c < channels; ++c)
      for (int64_t h = 0; h < height; ++h)
        copy_run(dst + (c * height + h) * width, wide + c * outputs() + h * padded_width, width);
  }
  // The padded plane read so that position q of the padded-width layout is the map's (h, w),
  // and the pad columns (w >= W) read zeros.
  template <typename T>
  GK_INLINE const T* as_padded_width(const T* plane) const { return plane + pad * padded_width + pad; }
  // The rows a tap-major GEMM reads: rows[(c * k + dy) * k + dx] = planes + c * stride + dy * Wp + dx.
  template <typename T>
  GK_INLINE void tap_rows(const T* planes, int64_t channels, int64_t k, const T** rows) const {
    for (int64_t c = 0; c < channels; ++c)
      for (int64_t dy = 0; dy < k; ++dy)
        for (int64_t dx = 0; dx < k; ++dx) rows[(c * k + dy) * k + dx] = planes + c * stride + dy * padded_width + dx;
  }
};

// A stride-2 'same' conv's input as four parity phases per channel (phase (py, px) holds the map's
// rows 2i + py, columns 2j + px), each zero-padded by ceil(p / 2) rows and columns before and
// floor(p / 2) after (p = k / 2) and followed by kPlaneSlack zeros: tap (dy, dx) of output (i, j)
// reads input row 2i + dy - p, which is phase (dy - p) & 1's row i + (dy - p) >> 1, so every tap is
// one shifted row of a phase plane at the padded-width positions q = i * Wq + j, as at stride 1.
struct PhasePlanes {
  static constexpr int64_t kStride = 2;
  int64_t height, width, out_height, out_width, lead, padded_width, stride;
  PhasePlanes(int64_t h, int64_t w, int64_t k)
      : height(h), width(w), out_height((h + 1) / 2), out_width((w + 1) / 2), lead((k / 2 + 1) / 2),
        padded_width(out_width + k / 2), stride((out_height + k / 2) * padded_width + kPlaneSlack) {}
  int64_t outputs() const { return out_height * padded_width; }  // padded-width positions
  // The phases of `channels` H x W planes into zero-initialised phase planes (4 per channel); a
  // phase of an odd-sized map has a last row or column fewer, which stays zero. Rows split by
  // vector shuffles (deinterleave), not element by element: with the GEMM compiled apart
  // (shifted_product), 96 channels in groups of 48 from 112x112 on one thread, the 1x1 conv 0.82
  // -> 0.70 ms, the 3x3 4.06 -> 3.91.
  template <typename T>
  GK_INLINE void fill(const T* src, int64_t channels, T* dst) const {
    for (int64_t c = 0; c < channels; ++c)
      for (int64_t py = 0; py < 2; ++py) {
        T* evens = dst + (c * 4 + py * 2) * stride + lead * padded_width + lead;
        for (int64_t i = 0; 2 * i + py < height; ++i)
          deinterleave(src + (c * height + 2 * i + py) * width, width, evens + i * padded_width,
                       evens + stride + i * padded_width);
      }
  }
  // The rows a tap-major GEMM reads, as PaddedPlanes::tap_rows at stride 1.
  template <typename T>
  GK_INLINE void tap_rows(const T* planes, int64_t channels, int64_t k, const T** rows) const {
    for (int64_t c = 0; c < channels; ++c)
      for (int64_t dy = 0; dy < k; ++dy)
        for (int64_t dx = 0; dx < k; ++dx) {
          const int64_t ry = dy - k / 2, rx = dx - k / 2;  // the input's offsets from (2i, 2j)
          rows[(c * k + dy) * k + dx] = planes + (c * 4 + (ry & 1) * 2 + (rx & 1)) * stride +
                                        ((ry >> 1) + lead) * padded_width + (rx >> 1) + lead;
        }
  }
};

// C[i * ldc + q] = sum_j A[i * K + j] * rows[j][q] for i < M, q < N: register tiles of MR rows
// and NV vectors of columns; rows[j] must be readable up to N rounded up to the tile.
template <typename T, int NV>
GK_INLINE void shifted_gemm(int64_t M, int64_t N, int64_t K, const T* A, const T* const* rows, T* C, int64_t ldc) {
  using S = Simd<T>;
  using V = typename S::vec;
  constexpr int L = S::lanes, NR = NV * L, MR = kAccumulators / NV;
  for (int64_t j0 = 0; j0 < N; j0 += NR) {
    const int64_t nr = std::min<int64_t>(NR, N - j0);
    for (int64_t i0 = 0; i0 < M; i0 += MR) {
      const T* a_row[MR];
      for (int r = 0; r < MR; ++r) a_row[r] = A + std::min<int64_t>(i0 + r, M - 1) * K;
      V acc[MR][NV];
      for (int r = 0; r < MR; ++r)
        for (int v = 0; v < NV; ++v) acc[r][v] = V{};
      for (int64_t j = 0; j < K; ++j) {
        V bv[NV];
        for (int v = 0; v < NV; ++v) bv[v] = S::load(rows[j] + j0 + v * L);
#pragma GCC unroll 16
        for (int r = 0; r < MR; ++r) {
          const T a = a_row[r][j];
          for (int v = 0; v < NV; ++v) acc[r][v] += a * bv[v];
        }
      }
      for (int64_t r = 0; r < std::min<int64_t>(MR, M - i0); ++r) {
        T tile[NR];
        for (int v = 0; v < NV; ++v) S::store(tile + v * L, acc[r][v]);
        copy_run(C + (i0 + r) * ldc + j0, tile, nr);
      }
    }
  }
}

// G[(i * J + j) * L + l] += the lane-l part of sum_q D[i * ldd + q] * rows[j][q] for i < M,
// j < J, q < N (L lanes; the caller sums the lanes once, not per call): eight rows of D and two
// of the shifted rows per pass.
template <typename T>
GK_INLINE void shifted_dots(int64_t M, int64_t J, int64_t N, const T* D, int64_t ldd, const T* const* rows, T* G) {
  using S = Simd<T>;
  using V = typename S::vec;
  constexpr int L = S::lanes, MR = 8;
  const int64_t whole = N / L * L;
  for (int64_t j0 = 0; j0 < J; j0 += 2) {
    const T* x[2] = {rows[j0], rows[std::min<int64_t>(j0 + 1, J - 1)]};
    for (int64_t i0 = 0; i0 < M; i0 += MR) {
      const T* d[MR];
      for (int r = 0; r < MR; ++r) d[r] = D + std::min<int64_t>(i0 + r, M - 1) * ldd;
      V acc[MR][2];
      for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = V{};
      for (int64_t q = 0; q < whole; q += L) {
        const V x0 = S::load(x[0] + q), x1 = S::load(x[1] + q);
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r) {
          const V dv = S::load(d[r] + q);
          acc[r][0] += dv * x0;
          acc[r][1] += dv * x1;
        }
      }
      for (int64_t r = 0; r < std::min<int64_t>(MR, M - i0); ++r)
        for (int64_t jj = 0; jj < std::min<int64_t>(2, J - j0); ++jj) {
          T* g = G + ((i0 + r) * J + j0 + jj) * L;
          S::store(g, S::load(g) + acc[r][jj]);
          for (int64_t q = whole; q < N; ++q) g[0] += d[r][q] * x[jj][q];
        }
    }
  }
}

// out (M x N) = the products of W (M x K) with the K shifted rows, N padded-width positions. Not
// inlined: inlined with the stride-2 phase split before it, GCC compiled the same GEMM 1.7x slower.
template <typename T>
__attribute__((noinline)) void shifted_product(int64_t M, int64_t N, int64_t K, const T* w, const T* const* rows, T* out) {
  if (N <= Simd<T>::lanes) shifted_gemm<T, 1>(M, N, K, w, rows, out, N);
  else shifted_gemm<T, 2>(M, N, K, w, rows, out, N);
}

// out (M x outputs, padded-width) = the conv of `planes` (channels padded planes) by W (M x
// channels x k x k): the forward with W1, and the input grad with W1 transposed and flipped.
template <typename T>
GK_INLINE void shifted_conv(const PaddedPlanes& p, const T* planes, int64_t channels, int64_t k, const T* w,
                            int64_t M, const T** rows, T* out) {
  p.tap_rows(planes, channels, k, rows);
  shifted_product(M, p.outputs(), channels * k * k, w, rows, out);
}

}  // namespace ghostkernels
