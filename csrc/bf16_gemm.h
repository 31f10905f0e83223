// bfloat16 GEMMs for float32 tensors, used by the fused CPU forward kernels when
// torch.set_float32_matmul_precision("medium") asks for bfloat16 matmuls (PyTorch's own CPU
// matmuls then run bfloat16 through oneDNN too), on one of two engines picked once per process:
// Intel AMX tiles, or AVX-512 BF16 dot products (vdpbf16ps) where they outpace float32 FMAs
// (AMD Zen 4: 2x; an Intel Xeon without AMX: 0.5x, so not there).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "frozen_weights.h"
#include "gemm.h"

// Both engines need GCC's AMX and AVX512-BF16 intrinsics; the dot products also the AVX-512
// build's 64-byte vectors (an epilogue's vectors are the accumulators), elsewhere the engine is
// AMX's or none.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && __GNUC__ >= 11
#define GK_HAVE_BF16 1
#include <immintrin.h>
#if GK_VECTOR_BYTES == 64
#define GK_BF16_DOT 1
#endif
#endif

namespace ghostkernels {

// Whether this process has a bfloat16 GEMM engine, and which or why not. Probed once: CPUID,
// Linux's permission for AMX tile data, and for the dot products a timing of vdpbf16ps against
// vfmadd231ps (under a millisecond). GHOSTKERNELS_BF16_GEMM=amx|avx512bf16|off forces an
// engine (avx512bf16 without the timing) or none; auto (the default) prefers AMX.
bool bf16_gemm_available();
std::string bf16_gemm_status();

// Whether the user asks for bfloat16 float32 matmuls on the CPU, as PyTorch's own test has it:
// torch.set_float32_matmul_precision("medium"), or from torch 2.9 on
// torch.backends.mkldnn.matmul.fp32_precision = "bf16" (or "bf16" set for all of mkldnn, or for
// every backend).
bool bf16_matmuls_requested();

// Whether a float32 GEMM of the fused forward kernels summing over `depth` products runs in
// bfloat16 for tensors of `dtype`: float32, bf16_matmuls_requested(), an engine, and a depth the
// engine gains at (AMX: 32, a tile's depth; dot products: any).
bool bf16_gemm_enabled(at::ScalarType dtype, int64_t depth);

// fn(rows, ld) with the weight rows a GEMV reads (gemm.h dot_rows): in the bfloat16 mode a frozen
// weight's bfloat16 copy (frozen_weights.h; half the bytes of a pass that at batch 1 is all weight
// reads), otherwise the weight itself, rows of `inputs` elements.
template <typename T, typename Fn>
void with_gemv_rows(const at::Tensor& weight, int64_t inputs, Fn fn) {
  if constexpr (std::is_same_v<T, float>) {
    const Bf16Rows w16 = bf16_gemm_enabled(at::kFloat, inputs) ? frozen_bf16_rows(weight) : Bf16Rows{};
    if (w16.data) return fn(w16.data, w16.ld);
  }
  fn(weight.data_ptr<T>(), inputs);
}

// C[i * ldc + j] = sum_k A[i * a_si + k * a_sk] * B[k * ldb + j] for i < M, j < N, with A and
// B rounded to bfloat16 (to nearest even) and the products summed in float32. A_bf16: A already
// so, in the layout of a frozen weight's copy (frozen_weights.h: rows of K rounded up to 32
// elements, readable for M rounded up to 16 rows), or nullptr to pack A here. Call only when
// bf16_gemm_available(). Thread-safe: each thread packs into buffers of its own.
void gemm_bf16(int64_t M, int64_t N, int64_t K, const float* A, int64_t a_si, int64_t a_sk, const float* B,
               int64_t ldb, float* C, int64_t ldc, const uint16_t* A_bf16 = nullptr);

#ifdef GK_HAVE_BF16
// Columns [0, 16) in `mask` of a float32 row and the next row (nullptr past the matrix: zeros) as
// bfloat16 pairs (row's, next's) per column, rounded to nearest even: B's layout for vdpbf16ps
// and for AMX's bfloat16 tiles. With `scale`, the rows times scale[0] and scale[1] (an SE gate's
// per-channel scale of x) before the rounding.
__attribute__((target("avx512f,avx512bw,avx512bf16"))) inline __m512i bf16_column_pairs(const float* row,
                                                                                        const float* next,
                                                                                        __mmask16 mask,
                                                                                        const float* scale = nullptr) {
  // vcvtne2ps2bf16(next, row) holds row's 16 values, then next's; this interleaves them
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                              22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  __m512 even = _mm512_maskz_loadu_ps(mask, row);
  __m512 odd = next ? _mm512_maskz_loadu_ps(mask, next) : _mm512_setzero_ps();
  if (scale) {
    even = _mm512_mul_ps(even, _mm512_set1_ps(scale[0]));
    if (next) odd = _mm512_mul_ps(odd, _mm512_set1_ps(scale[1]));
  }
  return _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(odd, even));
}
#endif

#ifdef GK_BF16_DOT
// Whether gemm_bf16 runs on the AVX512-BF16 dot products.
bool bf16_gemm_on_dot_products();

// A (M x K, strides a_si, a_sk) as bfloat16 pairs, rows of K padded to 32 (frozen_weights.h's
// layout): A_bf16 when it is not nullptr, else A rounded into a buffer of this thread's, valid
// until its next call.
const uint32_t* bf16_pairs(const float* A, int64_t a_si, int64_t a_sk, int64_t M, int64_t K, const uint16_t* A_bf16);

// Rows [i0, i0 + min(MR, M - i0)) of C's columns [j0, j0 + NV * 16) for the pair block from p0 (pb
// pairs, B's in `panel`): MR rows of A (the last one repeated past M), C taking the first block's
// sums, adding the rest's, finish(i, v) of the last.
template <int NV, int MR, typename Finish>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) inline void dot_row_tile(
    const uint32_t* a_pairs, int64_t lda, const __m512i* panel, int64_t p0, int64_t pb, bool last, int64_t i0,
    int64_t M, const __mmask16* masks, float* C, int64_t ldc, int64_t j0, Finish& finish) {
  using V = Simd<float>::vec;
  constexpr int L = 16;
  const uint32_t* rows[MR];
  for (int r = 0; r < MR; ++r) rows[r] = a_pairs + std::min<int64_t>(i0 + r, M - 1) * lda + p0;
  __m512 acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pb; ++p) {
    __m512bh b[NV];
    for (int v = 0; v < NV; ++v) b[v] = (__m512bh)panel[p * NV + v];
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(int(rows[r][p]));
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], a, b[v]);
    }
  }
  // Over MR with a break, not to the last row, so that acc stays in registers (gemm.h row_tile)
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    if (r >= M - i0) break;
    for (int v = 0; v < NV; ++v) {
      float* c = C + (i0 + r) * ldc + j0 + v * L;
      V sum = (V)acc[r][v];
      if (p0 > 0) sum += (V)_mm512_maskz_loadu_ps(masks[v], c);
      if (last) sum = finish(i0 + r, sum);
      _mm512_mask_storeu_ps(c, masks[v], (__m512)sum);
    }
  }
}

// C = finish(A B) on the dot products, gemm_nn's tiling (gemm.h): NV vectors of 16 columns and
// 16 / NV rows per register tile (a last tile of at most half that many rows computes only half,
// as gemm_nn's), a column tail masked; A as bfloat16 pairs (row i's pair p at a_pairs[i * lda + p]),
// B float32 (row k times b_scale[k] when b_scale is given). Each panel of B's k pairs is rounded to
// bfloat16 pairs once and read by every row tile.
template <int NV, typename Finish>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) inline void dot_tiles(const uint32_t* a_pairs, int64_t lda,
                                                                              const float* B, int64_t ldb, float* C,
                                                                              int64_t ldc, int64_t M, int64_t N,
                                                                              int64_t K, Finish& finish,
                                                                              const float* b_scale) {
  constexpr int L = 16, NR = NV * L, MR = NV == 3 ? 8 : 16 / NV;  // three vectors: 24 accumulators, as gemm_tiles
  constexpr int64_t kPanelPairs = 128;  // 128 pairs x 2 vectors = 16 KB of B, in L1 across the row tiles
  alignas(64) __m512i panel[kPanelPairs * NV];
  const int64_t pairs = (K + 1) / 2;
  for (int64_t p0 = 0; p0 < pairs; p0 += kPanelPairs) {
    const int64_t pb = std::min(kPanelPairs, pairs - p0);
    const bool last = p0 + pb == pairs;
    for (int64_t j0 = 0; j0 < N; j0 += NR) {
      __mmask16 masks[NV];
      for (int v = 0; v < NV; ++v) {
        const int64_t left = std::min<int64_t>(L, N - j0 - v * L);
        masks[v] = left <= 0 ? 0 : __mmask16((1u << left) - 1);
      }
      for (int64_t p = 0; p < pb; ++p) {
        const int64_t k = 2 * (p0 + p);
        for (int v = 0; v < NV; ++v) {
          const float* even = B + k * ldb + j0 + v * L;
          panel[p * NV + v] =
              bf16_column_pairs(even, k + 1 < K ? even + ldb : nullptr, masks[v], b_scale ? b_scale + k : nullptr);
        }
      }
      // The next strip of B into L2 while this one computes, as gemm_tiles does (gemm.h): frozen
      // GhostNets in this mode 1.02-1.06x faster at batch 8 (bench/results, Zen 4 section 27).
      const bool next_columns = j0 + NR < N;
      const int64_t next_k = next_columns ? 2 * p0 : 2 * (p0 + pb);  // the next strip's first row
      const float* next = B + std::min(next_k, K - 1) * ldb + (next_columns ? j0 + NR : 0);
      const int64_t next_rows = std::max<int64_t>(0, std::min(2 * (next_columns ? pb : kPanelPairs), K - next_k));
      const int64_t row_tiles = (M + MR - 1) / MR;
      for (int64_t i0 = 0; i0 < M; i0 += MR) {
        prefetch_slice(next, ldb, next_rows, i0 / MR, row_tiles, NR);
        // A last tile of at most MR / 2 rows computes only MR / 2, as gemm_tiles' (ghost_module
        // with 12 or 18 rows a thread, at 56x56 and 28x28: 1.05-1.13x faster in this mode).
        if (M - i0 <= MR / 2)
          dot_row_tile<NV, MR / 2>(a_pairs, lda, panel, p0, pb, last, i0, M, masks, C, ldc, j0, finish);
        else
          dot_row_tile<NV, MR>(a_pairs, lda, panel, p0, pb, last, i0, M, masks, C, ldc, j0, finish);
      }
    }
  }
}

// C's columns [0, columns) = finish(A B) as dot products along k (gemm.h dot_product_tail): each of
// B's columns rounded to bfloat16 pairs as dot_tiles rounds it (vcvtne2ps2bf16), zero-padded to A's
// row length, then a vdpbf16ps chain per row of A, four rows side by side.
template <typename Finish>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) inline void dot_columns(const uint32_t* a_pairs, int64_t lda,
                                                                                const float* B, int64_t ldb, float* C,
                                                                                int64_t ldc, int64_t M, int64_t columns,
                                                                                int64_t K, Finish& finish,
                                                                                const float* b_scale) {
  const int64_t vectors = lda / 16;  // A's rows: lda pairs, a multiple of 16
  static thread_local std::vector<float> column;
  static thread_local std::vector<__m512i> pairs;
  column.assign(lda * 2, 0.f);
  pairs.resize(vectors);
  for (int64_t j = 0; j < columns; ++j) {
    for (int64_t k = 0; k < K; ++k) column[k] = b_scale ? B[k * ldb + j] * b_scale[k] : B[k * ldb + j];
    // vcvtne2ps2bf16(high, low): element e of the result is column[32 q + e], so that dword p
    // holds the pair (2p, 2p + 1) as A's rows do
    for (int64_t q = 0; q < vectors; ++q)
      pairs[q] = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(&column[32 * q + 16]), _mm512_loadu_ps(&column[32 * q]));
    for (int64_t i0 = 0; i0 < M; i0 += 4) {
      // Over four rows with a break, so that acc stays in registers (gemm.h row_tile): 7x7 1x1
      // convs in this mode 1.02-1.04x faster, the Ghost ops unchanged (bench/results, Zen 4 section 34)
      const int rows = int(std::min<int64_t>(4, M - i0));
      __m512 acc[4] = {};
      for (int64_t q = 0; q < vectors; ++q)
#pragma GCC unroll 4
        for (int r = 0; r < 4; ++r) {
          if (r >= rows) break;
          acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_loadu_si512(a_pairs + (i0 + r) * lda + 16 * q),
                                    (__m512bh)pairs[q]);
        }
#pragma GCC unroll 4
      for (int r = 0; r < 4; ++r) {
        if (r >= rows) break;
        C[(i0 + r) * ldc + j] = _mm512_reduce_add_ps(acc[r]);
      }
    }
  }
  finish_rows<float>(M, columns, C, ldc, finish);
}

// dot_tiles over gemm.h's column_strips, as gemm_nn, and a tail of a column or two past whole
// vectors as dot_columns (a 7x7 plane: 48 + 1 columns; ghost_module at 7x7 1.02-1.16x faster than
// with 32 + 17 columns in four vectors). b_scale: B's row k times b_scale[k] (x times an SE gate) as
// B is rounded, so that A may stay a frozen weight's bfloat16 copy.
template <typename Finish>
GK_INLINE void dot_product(int64_t M, int64_t N, int64_t K, const float* A, int64_t a_si, int64_t a_sk,
                           const float* B, int64_t ldb, float* C, int64_t ldc, const uint16_t* A_bf16,
                           Finish finish, const float* b_scale = nullptr) {
  if (M <= 0 || N <= 0) return;
  const uint32_t* a_pairs = bf16_pairs(A, a_si, a_sk, M, K, A_bf16);
  const int64_t lda = bf16_row_length(K) / 2;  // in pairs
  const int64_t tiled = N - dot_product_tail(N, 16);
  column_strips<16, true>(tiled, [&](auto nv, int64_t j0, int64_t n) {
    dot_tiles<decltype(nv)::value>(a_pairs, lda, B + j0, ldb, C + j0, ldc, M, n, K, finish, b_scale);
  });
  if (tiled < N) dot_columns(a_pairs, lda, B + tiled, ldb, C + tiled, ldc, M, N - tiled, K, finish, b_scale);
}
#endif

// C = finish(A B) for A's M x K rows (row stride K) and B's K x N (row stride ldb): in bfloat16
// when `bf16` (float32 only; A read from A_bf16 when it is not nullptr), on the dot products
// with the epilogue in registers, on AMX with the epilogue then a pass over C; else gemm_nn with
// the epilogue in registers.
template <typename T, typename Finish>
GK_INLINE void product_rows(bool bf16, int64_t M, int64_t N, int64_t K, const T* A, const T* B, int64_t ldb, T* C,
                            int64_t ldc, T* panel, const uint16_t* A_bf16, Finish finish) {
  if constexpr (std::is_same_v<T, float>) {
    if (bf16) {
#ifdef GK_BF16_DOT
      if (bf16_gemm_on_dot_products()) return dot_product(M, N, K, A, K, 1, B, ldb, C, ldc, A_bf16, finish);
#endif
      gemm_bf16(M, N, K, A, K, 1, B, ldb, C, ldc, A_bf16);
      finish_rows<T>(M, N, C, ldc, finish);
      return;
    }
  }
  gemm_nn<T>(M, N, K, A, K, 1, B, ldb, C, ldc, false, panel, finish);
}

}  // namespace ghostkernels
