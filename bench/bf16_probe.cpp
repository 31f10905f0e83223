// Does AVX512-BF16 make a faster 1x1 conv on this CPU? (#16's bfloat16 mode; no AMX here.)
// 1. Instruction throughput: 16 independent accumulators of vdpbf16ps (64 flops each) against
//    16 of vfmadd231ps (32 flops each).
// 2. The Ghost op's primary GEMMs (the 21 GhostNet 1.0x shapes, one image): our float32 gemm_nn
//    (csrc/gemm.h) against the same register tiling on vdpbf16ps, B converted to bf16 pairs per
//    panel, A (the weights) packed once, float32 accumulation; checked against a double dot of
//    the bf16-rounded operands.
// Build and run (one thread; needs a CPU with avx512_bf16):
//   g++ -O3 -march=native -fopenmp -I csrc bench/bf16_probe.cpp -o /tmp/bf16_probe && /tmp/bf16_probe
// Results: bench/results/xeon-avx512-bf16-probe.txt.
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "gemm.h"

using ghostkernels::gemm_nn;

template <class F>
double median_us(F f, int runs = 300) {
  for (int i = 0; i < 20; ++i) f();
  std::vector<double> t;
  for (int i = 0; i < runs; ++i) {
    auto a = std::chrono::steady_clock::now();
    f();
    t.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - a).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

void throughput() {
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_set1_ps(i * 1e-3f);
  __m512bh a = (__m512bh)_mm512_set1_epi32(0x3f803f80), b = (__m512bh)_mm512_set1_epi32(0x3c003c00);
  __m512 fa = _mm512_set1_ps(1.0001f), fb = _mm512_set1_ps(1e-4f);
  const long n = 50000000;
  auto t0 = std::chrono::steady_clock::now();
  for (long i = 0; i < n; ++i) {
#pragma GCC unroll 16
    for (int r = 0; r < 16; ++r) acc[r] = _mm512_dpbf16_ps(acc[r], a, b);
    __asm__ volatile("" : "+v"(a), "+v"(b));
  }
  auto t1 = std::chrono::steady_clock::now();
  for (long i = 0; i < n; ++i) {
#pragma GCC unroll 16
    for (int r = 0; r < 16; ++r) acc[r] = _mm512_fmadd_ps(fa, fb, acc[r]);
    __asm__ volatile("" : "+v"(fa), "+v"(fb));
  }
  auto t2 = std::chrono::steady_clock::now();
  const double bf = std::chrono::duration<double>(t1 - t0).count(), fm = std::chrono::duration<double>(t2 - t1).count();
  float sink = 0;
  for (int i = 0; i < 16; ++i) sink += acc[i][0];
  printf("throughput, one core: vdpbf16ps %.2f G instructions/s = %.0f GFLOP/s; vfmadd231ps %.2f G/s = %.0f GFLOP/s "
         "(sink %g)\n", 16 * n / bf / 1e9, 64 * 16 * n / bf / 1e9, 16 * n / fm / 1e9, 32 * 16 * n / fm / 1e9, sink);
}

// C (M x N) = A B: A as bf16 pairs (k, k+1) per row, B float32 (K x N) converted per panel.
template <int NV>
void gemm_bf16(int64_t M, int64_t N, int64_t K, const uint32_t* a_pairs, int64_t lda, const float* B, float* C,
               __m512i* panel) {
  constexpr int L = 16, NR = NV * L, MR = 16 / NV;
  constexpr int64_t kPairsPerPanel = 128;
  // lane l of the result takes element (l / 2) of the first source, then of the second
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                              22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const int64_t pairs = (K + 1) / 2;
  for (int64_t p0 = 0; p0 < pairs; p0 += kPairsPerPanel) {
    const int64_t pb = std::min(kPairsPerPanel, pairs - p0);
    for (int64_t j0 = 0; j0 < N; j0 += NR) {
      const int64_t nr = std::min<int64_t>(NR, N - j0);
      for (int64_t p = 0; p < pb; ++p) {
        const int64_t k = 2 * (p0 + p);
        for (int v = 0; v < NV; ++v) {
          const int64_t left = nr - v * L;
          const __mmask16 m = left >= L ? 0xffff : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
          const __m512 even = _mm512_maskz_loadu_ps(m, B + k * N + j0 + v * L);
          const __m512 odd = k + 1 < K ? _mm512_maskz_loadu_ps(m, B + (k + 1) * N + j0 + v * L) : _mm512_setzero_ps();
          panel[p * NV + v] = _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(odd, even));
        }
      }
      for (int64_t i0 = 0; i0 < M; i0 += MR) {
        const uint32_t* rows[MR];
        for (int r = 0; r < MR; ++r) rows[r] = a_pairs + std::min<int64_t>(i0 + r, M - 1) * lda + p0;
        __m512 acc[MR][NV];
        for (int r = 0; r < MR; ++r)
          for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
        for (int64_t p = 0; p < pb; ++p) {
          __m512bh bv[NV];
          for (int v = 0; v < NV; ++v) bv[v] = (__m512bh)panel[p * NV + v];
#pragma GCC unroll 16
          for (int r = 0; r < MR; ++r) {
            const __m512bh a = (__m512bh)_mm512_set1_epi32(rows[r][p]);
            for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], a, bv[v]);
          }
        }
        for (int64_t r = 0; r < std::min<int64_t>(MR, M - i0); ++r)
          for (int v = 0; v < NV; ++v) {
            const int64_t left = nr - v * L;
            if (left <= 0) break;
            const __mmask16 m = left >= L ? 0xffff : (__mmask16)((1u << left) - 1);
            float* c = C + (i0 + r) * N + j0 + v * L;
            const __m512 sum = p0 > 0 ? _mm512_add_ps(acc[r][v], _mm512_maskz_loadu_ps(m, c)) : acc[r][v];
            _mm512_mask_storeu_ps(c, m, sum);
          }
      }
    }
  }
}

uint16_t to_bf16(float x) {  // round to nearest even, as torch's .bfloat16() and vcvtne2ps2bf16
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return uint16_t((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

float from_bf16(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

int main() {
  throughput();
  const int shapes[][3] = {{16, 8, 112},  {16, 24, 112}, {48, 12, 56},  {24, 36, 56},  {72, 12, 56},  {72, 20, 28},
                           {40, 60, 28},  {120, 20, 28}, {40, 120, 28}, {240, 40, 14}, {80, 100, 14}, {200, 40, 14},
                           {80, 92, 14},  {184, 40, 14}, {80, 240, 14}, {480, 56, 14}, {112, 336, 14}, {672, 56, 14},
                           {672, 80, 7},  {160, 480, 7}, {960, 80, 7}};
  std::mt19937 generator(0);
  std::normal_distribution<float> normal;
  double total_f32 = 0, total_bf16 = 0;
  printf("%-14s %10s %8s %10s %8s %7s %9s\n", "K->M@plane", "f32 us", "GFLOP/s", "bf16 us", "GFLOP/s", "ratio",
         "bf16 err");
  for (const auto& s : shapes) {
    const int64_t K = s[0], M = s[1], N = int64_t(s[2]) * s[2], pairs = (K + 1) / 2;
    std::vector<float> A(M * K), B(K * N), C(M * N), C16(M * N), tail(ghostkernels::kBlock * 32);
    std::vector<uint32_t> a_pairs(M * pairs, 0);
    __m512i panel[128 * 2];  // kPairsPerPanel pairs x up to 2 vectors
    for (auto& v : A) v = normal(generator);
    for (auto& v : B) v = normal(generator);
    for (int64_t i = 0; i < M; ++i)
      for (int64_t k = 0; k < K; ++k) a_pairs[i * pairs + k / 2] |= uint32_t(to_bf16(A[i * K + k])) << (16 * (k & 1));
    const double flops = 2.0 * M * N * K;
    const double f32 = median_us([&] { gemm_nn<float>(M, N, K, A.data(), K, 1, B.data(), N, C.data(), N, false, tail.data()); });
    const double bf16 = median_us([&] {
      if (N <= 16) gemm_bf16<1>(M, N, K, a_pairs.data(), pairs, B.data(), C16.data(), panel);
      else gemm_bf16<2>(M, N, K, a_pairs.data(), pairs, B.data(), C16.data(), panel);
    });
    double error = 0;
    for (int64_t i = 0; i < M; i += 7)
      for (int64_t j = 0; j < N; j += 5) {
        double exact = 0;
        for (int64_t k = 0; k < K; ++k)
          exact += double(from_bf16(to_bf16(A[i * K + k]))) * from_bf16(to_bf16(B[k * N + j]));
        error = std::max(error, std::abs(exact - C16[i * N + j]) / (1 + std::abs(exact)));
      }
    total_f32 += f32;
    total_bf16 += bf16;
    char name[32];
    snprintf(name, sizeof name, "%lld->%lld@%d", (long long)K, (long long)M, s[2]);
    printf("%-14s %10.1f %8.0f %10.1f %8.0f %6.2fx %9.1e\n", name, f32, flops / f32 / 1e3, bf16, flops / bf16 / 1e3,
           f32 / bf16, error);
  }
  printf("sum of the 21 shapes: float32 %.0f us, bf16 %.0f us (%.2fx)\n", total_f32, total_bf16, total_f32 / total_bf16);
}
