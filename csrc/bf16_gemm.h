// bfloat16 GEMMs for float32 tensors, used by the fused CPU forward kernels when
// torch.set_float32_matmul_precision("medium") asks for bfloat16 matmuls (PyTorch's own CPU
// matmuls then run bfloat16 through oneDNN too), on one of two engines picked once per process:
// Intel AMX tiles, or AVX-512 BF16 dot products (vdpbf16ps) where they outpace float32 FMAs
// (AMD Zen 4: 2x; an Intel Xeon without AMX: 0.5x, so not there).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "gemm.h"

namespace ghostkernels {

// Whether this process has a bfloat16 GEMM engine, and which or why not. Probed once: CPUID,
// Linux's permission for AMX tile data, and for the dot products a timing of vdpbf16ps against
// vfmadd231ps (under a millisecond). GHOSTKERNELS_BF16_GEMM=amx|avx512bf16|off forces an
// engine (avx512bf16 without the timing) or none; auto (the default) prefers AMX.
bool bf16_gemm_available();
std::string bf16_gemm_status();

// Whether a float32 GEMM of the fused forward kernels summing over `depth` products runs in
// bfloat16 for tensors of `dtype`: float32, float32_matmul_precision "medium", an engine, and a
// depth the engine gains at (AMX: 32, a tile's depth; dot products: any).
bool bf16_gemm_enabled(at::ScalarType dtype, int64_t depth);

// C[i * ldc + j] = sum_k A[i * a_si + k * a_sk] * B[k * ldb + j] for i < M, j < N, with A and
// B rounded to bfloat16 (to nearest even) and the products summed in float32. A_bf16: A already
// so, in the layout of a frozen weight's copy (frozen_weights.h: rows of K rounded up to 32
// elements, readable for M rounded up to 16 rows), or nullptr to pack A here. Call only when
// bf16_gemm_available(). Thread-safe: each thread packs into buffers of its own.
void gemm_bf16(int64_t M, int64_t N, int64_t K, const float* A, int64_t a_si, int64_t a_sk, const float* B,
                   int64_t ldb, float* C, int64_t ldc, const uint16_t* A_bf16 = nullptr);

// C = finish(A B) for A's M x K rows (row stride K) and B's K x N (row stride ldb): in bfloat16
// by gemm_bf16 when `bf16` (float32 only; A read from A_bf16 when it is not nullptr), the
// epilogue then a pass over C; else gemm_nn with the epilogue applied while each tile is in
// registers.
template <typename T, typename Finish>
GK_INLINE void product_rows(bool bf16, int64_t M, int64_t N, int64_t K, const T* A, const T* B, int64_t ldb, T* C,
                            int64_t ldc, T* panel, const uint16_t* A_bf16, Finish finish) {
  if constexpr (std::is_same_v<T, float>) {
    if (bf16) {
      gemm_bf16(M, N, K, A, K, 1, B, ldb, C, ldc, A_bf16);
      finish_rows<T>(M, N, C, ldc, finish);
      return;
    }
  }
  gemm_nn<T>(M, N, K, A, K, 1, B, ldb, C, ldc, false, panel, finish);
}

}  // namespace ghostkernels
