// One build of the kernels per instruction set: setup.py compiles the library once for AVX-512
// (64-byte vectors) and once for AVX2 (32-byte vectors), and the loader picks the one the CPU
// runs (ghostkernels/_backends.py); other architectures get one build with 16-byte vectors. A vector type wider than the CPU's registers is no fallback:
// GCC keeps such vectors in memory, and the 64-byte GEMM ran at 1-2 GFLOPS on AVX2 (50x slower
// than with 32-byte vectors; bench/results/epyc-zen2-avx2-2threads-2026-12-02.md).
#pragma once

#ifndef GK_VECTOR_BYTES
#define GK_VECTOR_BYTES 64
#endif
#define GK_INLINE inline __attribute__((always_inline))

namespace ghostkernels {

// Register-tile accumulators of the GEMM: AVX-512 has 32 vector registers, AVX2 and SSE 16, and
// the tile's loads of B and the broadcast of A need the rest.
constexpr int kAccumulators = GK_VECTOR_BYTES == 64 ? 16 : 12;

}  // namespace ghostkernels
