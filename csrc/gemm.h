// The register-tiled GEMM the fused CPU kernels share.
// Everything here but gemm_nn_call is GK_INLINE: forced into the kernels that call it.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "isa.h"

#if (defined(__AVX512F__) && GK_VECTOR_BYTES == 64) || (defined(__AVX2__) && GK_VECTOR_BYTES == 32)
#include <immintrin.h>
#endif

namespace ghostkernels {

// {0, 2, 4, ...}: the lanes of a pair of L-lane vectors that hold its even elements (a shuffle index).
template <typename Index, int L>
GK_INLINE Index even_lane_indices() {
  Index i;
  for (int l = 0; l < L; ++l) i[l] = 2 * l;
  return i;
}

// The build's vectors (isa.h: 64 bytes for AVX-512, 32 for AVX2) through GCC/Clang vector extensions.
template <typename T>
struct Simd {
  typedef T vec __attribute__((vector_size(GK_VECTOR_BYTES)));
  static constexpr int lanes = GK_VECTOR_BYTES / sizeof(T);
  GK_INLINE static vec load(const T* p) { vec v; std::memcpy(&v, p, sizeof(vec)); return v; }
  GK_INLINE static void store(T* p, vec v) { std::memcpy(p, &v, sizeof(vec)); }
  // The first n < lanes elements at p (the other lanes zero) and their store: masked on AVX-512,
  // the load masked on AVX2 too (vmaskmovps/pd: masked lanes read nothing, so never fault);
  // elsewhere through a buffer, whose scalar stores and vector load stall store forwarding (7% of
  // a 480@7 depthwise conv's samples on Zen 3; the masked load made the lanes kernel 1.07-1.35x
  // faster there). AVX2's stores stay a buffer: a vector store then scalar loads forward.
  GK_INLINE static vec load_first(const T* p, int64_t n) {
#if defined(__AVX512F__) && GK_VECTOR_BYTES == 64
    if constexpr (sizeof(T) == 4) return (vec)_mm512_maskz_loadu_ps(__mmask16((1u << n) - 1), p);
    else return (vec)_mm512_maskz_loadu_pd(__mmask8((1u << n) - 1), p);
#elif defined(__AVX2__) && GK_VECTOR_BYTES == 32
    if constexpr (std::is_same_v<T, float>) {
      const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(int(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
      return (vec)_mm256_maskload_ps(p, mask);
    } else {
      const __m256i mask = _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3));
      return (vec)_mm256_maskload_pd(p, mask);
    }
#else
    T buffer[lanes] = {};
    for (int64_t i = 0; i < n; ++i) buffer[i] = p[i];
    return load(buffer);
#endif
  }
  GK_INLINE static void store_first(T* p, vec v, int64_t n) {
#if defined(__AVX512F__) && GK_VECTOR_BYTES == 64
    if constexpr (sizeof(T) == 4) _mm512_mask_storeu_ps(p, __mmask16((1u << n) - 1), (__m512)v);
    else _mm512_mask_storeu_pd(p, __mmask8((1u << n) - 1), (__m512d)v);
#else
    T buffer[lanes];
    store(buffer, v);
    for (int64_t i = 0; i < n; ++i) p[i] = buffer[i];
#endif
  }
  // lane indices for __builtin_shuffle: 0, 2, 4, ... picks the even elements of two vectors
  typedef std::conditional_t<sizeof(T) == 4, int32_t, int64_t> lane_t;
  typedef lane_t index __attribute__((vector_size(GK_VECTOR_BYTES)));
  GK_INLINE static index even_lanes() { return even_lane_indices<index, lanes>(); }
};

// A weight row's values as float32 vectors and scalars, from float32, float64 or the bits of
// bfloat16 (a bfloat16 is a float32's upper half: widening is a shift). The GEMVs of the
// bfloat16 mode read frozen weights this way (frozen_weights.h).
template <typename T>
GK_INLINE typename Simd<T>::vec load_widened(const T* p) {
  return Simd<T>::load(p);
}
GK_INLINE Simd<float>::vec load_widened(const uint16_t* p) {
  typedef uint16_t half_vec __attribute__((vector_size(GK_VECTOR_BYTES / 2)));
  typedef uint32_t word_vec __attribute__((vector_size(GK_VECTOR_BYTES)));
  half_vec h;
  std::memcpy(&h, p, sizeof(h));
  const word_vec w = __builtin_convertvector(h, word_vec) << 16;
  Simd<float>::vec v;
  std::memcpy(&v, &w, sizeof(v));
  return v;
}
template <typename T>
GK_INLINE T widened(T v) {
  return v;
}
GK_INLINE float widened(uint16_t bits) {
  const uint32_t u = uint32_t(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// The sum of a vector's lanes by halves: the upper half added to the lower, log2(lanes) times, not
// a chain of lanes - 1 dependent scalar adds.
template <typename T, int Bytes = GK_VECTOR_BYTES>
struct LaneSum {
  typedef T vec __attribute__((vector_size(Bytes)));
  GK_INLINE static T of(vec v) {
    if constexpr (Bytes == 2 * sizeof(T)) {
      return v[0] + v[1];
    } else {
      typedef typename LaneSum<T, Bytes / 2>::vec half;
      half low, high;
      std::memcpy(&low, &v, sizeof(half));
      std::memcpy(&high, reinterpret_cast<const char*>(&v) + sizeof(half), sizeof(half));
      return LaneSum<T, Bytes / 2>::of(low + high);
    }
  }
};
template <typename T>
GK_INLINE T lane_sum(typename Simd<T>::vec v) {
  return LaneSum<T>::of(v);
}

// {0, 1, 2, ...}: compared with a count, it masks the lanes of a partial vector.
template <typename T>
const T* lane_index() {
  static constexpr auto table = [] {
    std::array<T, Simd<T>::lanes> t{};
    for (int i = 0; i < Simd<T>::lanes; ++i) t[i] = T(i);
    return t;
  }();
  return table.data();
}

// dst[i] = src[i] for i < n, inline: std::copy and memcpy call memmove, which cost more than the
// copy on the short rows of small planes (7-28 elements). Inline only with setup.py's
// -fno-tree-loop-distribute-patterns: GCC otherwise makes this loop a memmove call again.
template <typename T>
GK_INLINE void copy_run(T* __restrict dst, const T* __restrict src, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
}

// deinterleave by pairs of Bytes-wide vectors, for n >= 2 such vectors' elements: whole pairs, then
// one more overlapping the last. Returns how many evens (and odds) it wrote.
template <typename T, int Bytes>
GK_INLINE int64_t deinterleave_pairs(const T* src, int64_t n, T* evens, T* odds) {
  typedef T V __attribute__((vector_size(Bytes)));
  typedef typename Simd<T>::lane_t I __attribute__((vector_size(Bytes)));
  constexpr int L = Bytes / sizeof(T);
  const I even_lanes = even_lane_indices<I, L>(), odd_lanes = even_lanes + 1;
  const auto pair = [&](int64_t j) __attribute__((always_inline)) {
    V a, b;
    std::memcpy(&a, src + 2 * j, sizeof(V));
    std::memcpy(&b, src + 2 * j + L, sizeof(V));
    const V e = __builtin_shuffle(a, b, even_lanes), o = __builtin_shuffle(a, b, odd_lanes);
    std::memcpy(evens + j, &e, sizeof(V));
    std::memcpy(odds + j, &o, sizeof(V));
  };
  int64_t j = 0;
  for (; 2 * j + 2 * L <= n; j += L) pair(j);
  if (2 * j < n) {
    j = (n - 2 * L) / 2;
    pair(j);
    j += L;
  }
  return j;
}

// Even- and odd-indexed elements of src[0, n) to evens[0, (n + 1) / 2) and odds[0, n / 2): by
// pairs of the build's vectors, rows of one to two of them (a 14-wide plane on AVX2) by half
// vectors (they went element by element), the rest element by element.
template <typename T>
GK_INLINE void deinterleave(const T* src, int64_t n, T* evens, T* odds) {
  constexpr int L = Simd<T>::lanes;
  int64_t j = 0;
  if (n >= 2 * L) j = deinterleave_pairs<T, GK_VECTOR_BYTES>(src, n, evens, odds);
  else if (n >= L) j = deinterleave_pairs<T, GK_VECTOR_BYTES / 2>(src, n, evens, odds);
  for (int64_t i = 2 * j; i < n; ++i) (i % 2 ? odds : evens)[i / 2] = src[i];
}

// Rows of B per pass: a panel of kBlock x (2 * lanes) stays in L1 across the i loop.
constexpr int64_t kBlock = 256;

// Whether gemm_tiles copies every strip of B into the panel (rows of 2 * lanes, 64 bytes on AVX2)
// instead of reading it in place: where B's rows are not 16-byte multiples (a 7x7 plane's 49
// columns) most of the strip's loads in place straddle two cache lines. Zen 3, one core, N = 49:
// 80 x 960 103.6 -> 91.9 us, 160 x 672 143.3 -> 123.7, 480 x 160 88.6 -> 84.7 (with gemm_nn's
// rows in one block, below). AVX2 and narrower builds only: AVX-512's three-vector strips do not
// fit the panel, and no AVX-512 machine measured it.
template <typename T>
GK_INLINE bool packs_rows(int64_t ldb) {
  return GK_VECTOR_BYTES < 64 && (ldb * int64_t(sizeof(T))) % 16 != 0;
}

// The identity epilogue of gemm_nn.
struct Unchanged {
  template <typename V>
  GK_INLINE V operator()(int64_t, V v) const { return v; }
};

// Rows [i0, i0 + mr) of C's columns [j0, j0 + nr) for the k block [k0, k0 + kb): MR rows of A
// (the last one repeated past M) times B's rows [0, split) read in place and the rest from the
// panel, finished when the block is the last.
template <typename T, int NV, int MR, typename Finish>
GK_INLINE void row_tile(int64_t i0, int64_t mr, int64_t M, const T* A, int64_t a_si, int64_t a_sk, int64_t k0,
                        const T* b, int64_t ldb, const T* panel, int64_t split, int64_t kb, T* C, int64_t ldc,
                        int64_t j0, int64_t nr, bool add, bool last, Finish& finish) {
  using S = Simd<T>;
  using V = typename S::vec;
  constexpr int L = S::lanes;
  constexpr int NR = NV * L;
  const T* a_row[MR];
  for (int r = 0; r < MR; ++r) a_row[r] = A + std::min<int64_t>(i0 + r, M - 1) * a_si + k0 * a_sk;
  V acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = V{};
  // Two runs over k: rows [0, split) of B in place, then the rest from the panel.
  for (int run = 0; run < (split < kb ? 2 : 1); ++run) {
    const T* rows = run ? panel : b;
    const int64_t ld = run ? NR : ldb, k_begin = run ? split : 0, k_end = run ? kb : split;
    for (int64_t k = k_begin; k < k_end; ++k) {
      V bv[NV];
      for (int v = 0; v < NV; ++v) bv[v] = S::load(rows + (k - k_begin) * ld + v * L);
      const int64_t ak = k * a_sk;
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) {
        const T a = a_row[r][ak];
        for (int v = 0; v < NV; ++v) acc[r][v] += a * bv[v];
      }
    }
  }
  // acc is read at constant rows only (loops over MR, unrolled, that stop at mr), so that it stays
  // in registers: indexed by a runtime row, acc went through the stack (zeroed there, stored after
  // the k loop, read back here), which at a depth of 16 cost as much as a third of the FMAs
  // (pointwise_conv2d 16 -> 24 @56 and @112 1.12-1.22x faster without, 64 -> 96 @56 1.07-1.16x;
  // bench/results, Zen 4 section 34).
  if (nr == NR) {
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      if (r >= mr) break;
      T* c = C + (i0 + r) * ldc + j0;
      for (int v = 0; v < NV; ++v) {
        const V sum = add ? acc[r][v] + S::load(c + v * L) : acc[r][v];
        S::store(c + v * L, last ? finish(i0 + r, sum) : sum);
      }
    }
    return;
  }
  // A column tail (C has only nr columns) goes through buffers, in a loop of its own: unrolled
  // with the rest, its copies made the library a third larger.
  V rows[MR][NV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) rows[r][v] = acc[r][v];
  for (int64_t r = 0; r < mr; ++r) {
    T* c = C + (i0 + r) * ldc + j0;
    T tail[NR];
    std::fill_n(tail, NR, T(0));
    if (add) copy_run(tail, c, nr);
    for (int v = 0; v < NV; ++v) {
      const V sum = add ? rows[r][v] + S::load(tail + v * L) : rows[r][v];
      S::store(tail + v * L, last ? finish(i0 + r, sum) : sum);
    }
    copy_run(c, tail, nr);
  }
}

// Slice `slice` of `slices` of the rows [0, rows) of a strip of `width` elements at `strip` (row
// stride ld) fetched into L2, each cache line of a row once: a GEMM fetches its next strip of B
// one slice before each row tile of the current one.
template <typename T>
GK_INLINE void prefetch_slice(const T* strip, int64_t ld, int64_t rows, int64_t slice, int64_t slices, int64_t width) {
  const int64_t per_slice = (rows + slices - 1) / slices, end = std::min(rows, (slice + 1) * per_slice);
  for (int64_t k = slice * per_slice; k < end; ++k) {
    const uintptr_t first = reinterpret_cast<uintptr_t>(strip + k * ld), last = first + (width - 1) * sizeof(T);
    for (uintptr_t line = first & ~uintptr_t(63); line <= last; line += 64)
      __builtin_prefetch(reinterpret_cast<const void*>(line), 0, 2);
  }
}

// C[i, j] (+)= sum_k A[i * a_si + k * a_sk] * B[k * ldb + j] for i < M, j < N, with NV
// vectors of B's columns per register tile (kAccumulators either way), and finish(i, v) of
// each vector v of row i's finished sums is what is stored (a bias and an activation applied
// while the tile is in registers, not in another pass over C).
// B is read in place, a column tail too: its loads run on past the tail into the rest of B's
// span (the next row), and the lanes beyond N are never stored. Only the last rows, whose loads
// would pass B's last element, are copied, zero-padded, into `panel` (kBlock * 2 * lanes).
// Copying every row of the tail (the kernel before this one) cost up to 40% of a 7x7 plane's
// GEMM (N = 49, K = 960: 87 -> 49 us). Full panels are not packed either: packing them for reuse across row blocks cost more
// than it saved on every GhostNet shape (bench/report.py, forward 8% faster in geometric mean
// without), except where packs_rows says.
template <typename T, int NV, typename Finish>
GK_INLINE void gemm_tiles(int64_t M, int64_t N, int64_t K, const T* A, int64_t a_si, int64_t a_sk,
                          const T* B, int64_t ldb, T* C, int64_t ldc, bool accumulate, T* panel, Finish finish) {
  constexpr int L = Simd<T>::lanes;
  constexpr int NR = NV * L;
  // Three vectors (AVX-512 only: 24 accumulators of its 32 registers) run 8 rows, not 5.
  constexpr int MR = NV == 3 ? 8 : kAccumulators / NV;
  const int64_t b_size = (K - 1) * ldb + N;  // B's elements from B[0] to its last one
  for (int64_t k0 = 0; k0 < K; k0 += kBlock) {
    const int64_t kb = std::min(kBlock, K - k0);
    const bool add = accumulate || k0 > 0, last = k0 + kb == K;
    for (int64_t j0 = 0; j0 < N; j0 += NR) {
      const int64_t nr = std::min<int64_t>(NR, N - j0);
      const T* b = B + k0 * ldb + j0;
      // Rows [0, split) of this block are read in place (row k's loads end at k * ldb + NR), the
      // rest from the panel.
      int64_t split = kb;
      if (packs_rows<T>(ldb)) {
        split = 0;
      } else if (nr < NR) {
        const int64_t room = b_size - (k0 * ldb + j0);
        split = room < NR ? 0 : std::min(kb, ldb > 0 ? (room - NR) / ldb + 1 : kb);
      }
      for (int64_t k = split; k < kb; ++k) {
        copy_run(panel + (k - split) * NR, b + k * ldb, nr);
        std::fill(panel + (k - split) * NR + nr, panel + (k - split + 1) * NR, T(0));
      }
      // The next strip of B (the next columns of this k block, else the first of the next block)
      // goes to L2 while this one computes, a slice of its rows before each row tile. At batch 8 a
      // forward's activations are beyond L2 and the first row tile of a strip waited on L3:
      // frozen GhostNets at batch 8 1.02-1.13x faster with it (bench/results, Zen 4 section 27).
      const bool next_columns = j0 + NR < N;
      const T* next = next_columns ? b + NR : B + std::min(k0 + kb, K - 1) * ldb;
      const int64_t next_rows = next_columns ? kb : std::min(kBlock, K - k0 - kb);
      const int64_t row_tiles = (M + MR - 1) / MR;
      for (int64_t i0 = 0; i0 < M; i0 += MR) {
        const int64_t mr = std::min<int64_t>(MR, M - i0);
        prefetch_slice(next, ldb, next_rows, i0 / MR, row_tiles, NR);
        // A last tile of at most MR / 2 rows computes only MR / 2: a full one would spend FMAs
        // on copies of row M - 1 (10 rows cost as much as 16).
        if (mr <= MR / 2)
          row_tile<T, NV, MR / 2>(i0, mr, M, A, a_si, a_sk, k0, b, ldb, panel, split, kb, C, ldc, j0, nr, add, last,
                                  finish);
        else
          row_tile<T, NV, MR>(i0, mr, M, A, a_si, a_sk, k0, b, ldb, panel, split, kb, C, ldc, j0, nr, add, last,
                              finish);
      }
    }
  }
}

// finish(i, v) of every vector v of row i < M of C (N columns, row stride ldc), in place: gemm_nn's
// epilogue for a product computed elsewhere (the bfloat16 GEMMs of bf16_gemm.h).
template <typename T, typename Finish>
GK_INLINE void finish_rows(int64_t M, int64_t N, T* C, int64_t ldc, Finish finish) {
  using S = Simd<T>;
  constexpr int L = S::lanes;
  for (int64_t i = 0; i < M; ++i) {
    T* c = C + i * ldc;
    int64_t j = 0;
    for (; j + L <= N; j += L) S::store(c + j, finish(i, S::load(c + j)));
    if (j < N) S::store_first(c + j, finish(i, S::load_first(c + j, N - j)), N - j);
  }
}

// store(o, n, W[o] . x[n]) for the R rows of W at wr[] (o from o0 on) and the I images from x[n0]
// on (rows of `inputs` elements): R x I independent sums, each vector of W loaded (and widened)
// once for the I images.
template <int R, int I, typename T, typename W, typename Store>
GK_INLINE void dot_tile(int64_t inputs, const T* x, int64_t n0, const W* const* wr, int64_t o0, Store& store) {
  using S = Simd<T>;
  using V = typename S::vec;
  constexpr int L = S::lanes;
  // P sums per row and image along k, so that a tile of fewer than four keeps four FMA chains in flight
  constexpr int P = R * I >= 4 ? 1 : 4 / (R * I);
  const int64_t whole = inputs / L * L;
  const T* xi[I];
  for (int i = 0; i < I; ++i) xi[i] = x + (n0 + i) * inputs;
  V acc[R][I][P] = {};
  auto step = [&](int64_t k, int p) __attribute__((always_inline)) {
    V xv[I];
    for (int i = 0; i < I; ++i) xv[i] = S::load(xi[i] + k);
    for (int r = 0; r < R; ++r) {
      const V wv = load_widened(wr[r] + k);
      for (int i = 0; i < I; ++i) acc[r][i][p] += wv * xv[i];
    }
  };
  int64_t k = 0;
  for (; k + P * L <= whole; k += P * L)
    for (int p = 0; p < P; ++p) step(k + p * L, p);
  for (; k < whole; k += L) step(k, 0);
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < I; ++i) {
      V total = acc[r][i][0];
      for (int p = 1; p < P; ++p) total += acc[r][i][p];
      T sum = lane_sum<T>(total);
      for (int64_t k = whole; k < inputs; ++k) sum += widened(wr[r][k]) * xi[i][k];
      store(o0 + r, n0 + i, sum);
    }
}

// dot_tile over R rows of W from row o0 on and every image: by four images while four are left,
// then two, then one.
template <int R, typename T, typename W, typename Store>
GK_INLINE void dot_row_tile(int64_t batch, int64_t inputs, const T* x, const W* w, int64_t ld, int64_t o0,
                            Store& store) {
  const W* wr[R];
  for (int r = 0; r < R; ++r) wr[r] = w + (o0 + r) * ld;
  int64_t n = 0;
  for (; n + 4 <= batch; n += 4) dot_tile<R, 4>(inputs, x, n, wr, o0, store);
  if (n + 2 <= batch) {
    dot_tile<R, 2>(inputs, x, n, wr, o0, store);
    n += 2;
  }
  for (; n < batch; ++n) dot_tile<R, 1>(inputs, x, n, wr, o0, store);
}

// store(o, n, W[o] . x[n]) for the rows o in [begin, end) of W (row o at w + o * ld) and every
// image n < batch: four rows at a time (two on AVX2 from 4 images on; the rest one by one), by
// tiles of images; one by one where `streamed` (dot_rows).
template <typename T, typename W, typename Store>
GK_INLINE void dot_products(int64_t batch, int64_t inputs, const T* x, const W* w, int64_t ld, int64_t begin,
                            int64_t end, Store store, bool streamed = false) {
  int64_t o = begin;
  // AVX2's 16 registers do not hold a tile of 4 rows by 4 images (16 sums, 4 image vectors and a
  // row's: two sums went to the stack and back on every step): 2 rows by 4 images there, from 4
  // images on (Zen 3: 960 -> 1280 at batch 8 1.17x, the median of 8 process pairs alternating the
  // two builds, 208 -> 188 us; the SE gate of 960 at 7x7 1.04x; batch 2 keeps 4 rows by 2).
  if (!streamed && GK_VECTOR_BYTES < 64 && batch >= 4)
    for (; o + 2 <= end; o += 2) dot_row_tile<2>(batch, inputs, x, w, ld, o, store);
  if (!streamed)
    for (; o + 4 <= end; o += 4) dot_row_tile<4>(batch, inputs, x, w, ld, o, store);
  for (; o < end; ++o) dot_row_tile<1>(batch, inputs, x, w, ld, o, store);
}

// The columns of N past its whole vectors of `lanes` that go to dot products, not to a tile: a
// tail of at most an eighth of a vector (gemm_nn, and the bfloat16 dot_product of bf16_gemm.h).
GK_INLINE int64_t dot_product_tail(int64_t N, int64_t lanes) {
  const int64_t tail = N % lanes;
  return N > lanes && tail <= lanes / 8 ? tail : 0;
}

// The register tiles' strips over N columns of L lanes (gemm_nn's, and the bfloat16 dot products'):
// one vector wide when N fits in one, two otherwise, a last strip of at most one vector's columns
// one vector wide (a 7x7 plane on AVX2: 48 + 1 columns, not 64 for 49; the GEMM alone 7-8% faster
// there, frozen GhostNets 0.2-1.6%). A tile's epilogue depends on its row only, so the strips may
// finish apart.
// ThreeWide (AVX-512's 32 registers): columns of two vectors and a last one, and no more (a 7x7
// plane's 48 + 1), are one strip three vectors wide: as two strips, the last one's 16-row tiles
// kept their row pointers on the stack (two loads per FMA). ghost_module at 7x7 1.04-1.10x,
// pointwise_conv2d 1.06-1.08x (Zen 4, batch 1 and 8), the same sums in the same order; wider
// planes gained nothing.
template <int64_t L, bool ThreeWide, typename Strip>
GK_INLINE void column_strips(int64_t N, Strip strip) {
  // strip(NV as a std::integral_constant, first column, columns): ThreeWide as a template
  // argument, so that builds without the registers for it do not instantiate three-vector tiles.
  if (N <= L) return strip(std::integral_constant<int, 1>{}, 0, N);
  const int64_t rest = N % (2 * L), wide = rest > 0 && rest <= L ? N - rest : N;
  if constexpr (ThreeWide)
    if (wide < N && N <= 3 * L) return strip(std::integral_constant<int, 3>{}, 0, N);
  strip(std::integral_constant<int, 2>{}, 0, wide);
  if (wide < N) strip(std::integral_constant<int, 1>{}, wide, N - wide);
}

// C (+)= A B by gemm_tiles over column_strips, except that a tail of at most an eighth of a vector
// past N's whole vectors (a 7x7 plane's 49th column), which a tile would compute in a whole
// vector's lanes, is dot products instead: A's rows (contiguous, a_sk == 1) with the tail's columns
// copied into `panel`, finished in place. ghost_module at 7x7:
// 1.10-1.23x faster on AVX-512, 1.09-1.18x on AVX2. Tails of a quarter (14x14: 192 + 4 on AVX-512)
// gained nothing (0.94-1.06x).
template <typename T, typename Finish = Unchanged>
GK_INLINE void gemm_nn(int64_t M, int64_t N, int64_t K, const T* A, int64_t a_si, int64_t a_sk,
                       const T* B, int64_t ldb, T* C, int64_t ldc, bool accumulate, T* panel,
                       Finish finish = Finish()) {
  constexpr int64_t L = Simd<T>::lanes;
  const int64_t tail = dot_product_tail(N, L);
  const bool dots = tail > 0 && K > 0 && a_sk == 1 && tail * K <= kBlock * 2 * L;
  const int64_t tiled = dots ? N - tail : N;
  // With dot products, A's rows go in blocks of kDotRows, tiles then dots: the dots read rows
  // that the tiles have just brought into L1/L2, not all of A a second time (ghost_module at 7x7
  // 1.01-1.03x, pointwise_conv2d 208 -> 624 @7 1.03-1.04x; Zen 4, batch 1 and 8). Not where the
  // strips are packed: each block would pack them again (Zen 3, N = 49: 480 x 160 87.8 -> 84.7 us
  // in one block, 960 x 160 178.1 -> 174.2).
  constexpr int64_t kDotRows = 128;
  const int64_t block = dots && !packs_rows<T>(ldb) ? kDotRows : M;
  for (int64_t i0 = 0; i0 < M; i0 += block) {
    const int64_t m = std::min(block, M - i0);
    const T* a = A + i0 * a_si;
    T* c = C + i0 * ldc;
    const auto rows_finish = [&finish, i0](int64_t i, auto v) __attribute__((always_inline)) {
      return finish(i0 + i, v);
    };
    column_strips<L, GK_VECTOR_BYTES == 64>(tiled, [&](auto nv, int64_t j0, int64_t n) {
      gemm_tiles<T, decltype(nv)::value>(m, n, K, a, a_si, a_sk, B + j0, ldb, c + j0, ldc, accumulate, panel,
                                         rows_finish);
    });
    if (!dots) continue;
    for (int64_t k = 0; k < K; ++k)  // the tiles may have used the panel
      for (int64_t j = 0; j < tail; ++j) panel[j * K + k] = B[k * ldb + tiled + j];
    T* c_tail = c + tiled;
    dot_products(tail, K, panel, a, a_si, 0, m, [c_tail, ldc, accumulate](int64_t i, int64_t j, T sum) {
      T& out = c_tail[i * ldc + j];
      out = accumulate ? out + sum : sum;
    });
    finish_rows<T>(m, tail, c_tail, ldc, rows_finish);
  }
}

// The GEMVs of 1x1 maps and SE gates: out[n * outputs + o] = finish(o, W[o] . x[n]) for the rows
// o in [begin, end) of W and every image n < batch, in float32 (or float64) arithmetic: four rows
// at a time, by tiles of images. Each vector of W is loaded once per tile of images, not per image
// (960 -> 1280 and 1280 -> 1000: 1.25-1.40x faster at batch 4-16, 1.19x at batch 2 than image by
// image). A single image takes the rows one by one, with four sums along k: W is read as one
// stream, which from memory (a batch-1 forward's head and SE weights) ran faster than four rows
// side by side (Zen 4, weights evicted: SE gates 1.07-1.22x, 1x1 maps 1.03-1.18x; frozen GhostNets
// 1.02-1.05x; in cache 0.95-1.08x). W: T, or the bits of bfloat16 weights (float32 x only); row o
// of w at w + o * ld.
template <typename T, typename W, typename Finish>
GK_INLINE void dot_rows(int64_t batch, int64_t inputs, int64_t outputs, const T* x, const W* w, int64_t ld, T* out,
                        int64_t begin, int64_t end, Finish finish) {
  dot_products(
      batch, inputs, x, w, ld, begin, end,
      [&finish, out, outputs](int64_t o, int64_t n, T sum) { out[n * outputs + o] = finish(o, sum); }, batch == 1);
}

// The work items of a batch of 1x1 products (images x output pixels x output channels, one GEMM
// each): pixel chunks of about 512 and of one size (whole float vectors), as many as a multiple of
// the threads where the images do not share out evenly (rounding the size up to whole vectors can
// leave one chunk fewer when many threads share few pixels), then output-channel blocks of at
// least 16 rows until every thread has an item. At batch 1 a 56x56 map's 512-pixel chunks (the
// seventh 64 pixels) went four to one thread and three to the other, a 28x28 map's 512 + 272
// pixels one each, and the first thread ran 1.6x as long as the second: equal chunks made those
// ops 1.22-1.26x faster at batch 1, the same at batch 8 (Zen 4, 2 threads); a 14x14 or 7x7 map at
// batch 1 is one chunk, which the channel blocks share out.
struct WorkItems {
  // The smallest output-channel block worth a work item of its own (two register tiles' rows).
  static constexpr int64_t kMinBlock = 16;
  int64_t chunk, chunks, block, blocks;
  static WorkItems balanced(int64_t batch, int64_t pixels, int64_t outputs, int64_t threads) {
    constexpr int64_t kChunk = 512, lanes = Simd<float>::lanes;
    int64_t chunks = (pixels + kChunk - 1) / kChunk;
    if (batch % threads != 0 && chunks > 1) chunks = (chunks + threads - 1) / threads * threads;
    const int64_t chunk = ((pixels + chunks - 1) / chunks + lanes - 1) / lanes * lanes;
    chunks = (pixels + chunk - 1) / chunk;
    int64_t blocks = 1;
    while (batch * chunks * blocks < threads && (outputs + blocks - 1) / blocks >= 2 * kMinBlock) blocks *= 2;
    return {chunk, chunks, (outputs + blocks - 1) / blocks, blocks};
  }
  // One chunk of `pixels` per image (whole planes), the outputs in `blocks` blocks.
  static WorkItems whole_planes(int64_t pixels, int64_t outputs, int64_t blocks) {
    return {pixels, 1, (outputs + blocks - 1) / blocks, blocks};
  }
  int64_t count(int64_t batch) const { return batch * chunks * blocks; }
  // Item `item`'s image, first pixel and first output channel.
  void locate(int64_t item, int64_t& n, int64_t& p0, int64_t& c0) const {
    c0 = item % blocks * block;
    p0 = item / blocks % chunks * chunk;
    n = item / blocks / chunks;
  }
};

// gemm_nn without an epilogue as a function of its own: a kernel that multiplies in
// several places (the backward's five products) compiles the GEMM once, not once per call site
// (ghost_backward_cpu.cpp took 340 s to compile with them inlined, 117 s with this).
template <typename T>
__attribute__((noinline)) void gemm_nn_call(int64_t M, int64_t N, int64_t K, const T* A, int64_t a_si,
                                            int64_t a_sk, const T* B, int64_t ldb, T* C, int64_t ldc,
                                            bool accumulate, T* panel) {
  gemm_nn<T>(M, N, K, A, a_si, a_sk, B, ldb, C, ldc, accumulate, panel);
}

}  // namespace ghostkernels
