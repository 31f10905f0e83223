// bfloat16 GEMMs on Intel AMX for float32 tensors, used by the fused CPU forward kernels when
// torch.set_float32_matmul_precision("medium") asks for bfloat16 matmuls (PyTorch's own CPU
// matmuls then run bfloat16 through oneDNN too) and the CPU and OS allow AMX tiles.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>

namespace ghostkernels {

// Whether this process may run AMX bfloat16 tile instructions (CPUID and, on Linux, the
// kernel's permission for the tile data state, asked once; GHOSTKERNELS_DISABLE_AMX=1 says no),
// and why not when it may not.
bool amx_bf16_available();
std::string amx_bf16_status();

// Whether a float32 GEMM of the fused forward kernels summing over `depth` products runs in
// bfloat16 on AMX for tensors of `dtype`: float32, a depth of at least 32,
// float32_matmul_precision "medium", and AMX available.
bool bf16_gemm_enabled(at::ScalarType dtype, int64_t depth);

// C[i * ldc + j] = sum_k A[i * a_si + k * a_sk] * B[k * ldb + j] for i < M, j < N, with A and
// B rounded to bfloat16 (to nearest even) and the products summed in float32. Call only when
// amx_bf16_available(). Thread-safe: each thread packs into buffers of its own.
void gemm_bf16_amx(int64_t M, int64_t N, int64_t K, const float* A, int64_t a_si, int64_t a_sk, const float* B,
                   int64_t ldb, float* C, int64_t ldc);

}  // namespace ghostkernels
