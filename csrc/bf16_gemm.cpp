// bfloat16 GEMMs (bf16_gemm.h) on two engines. Both read A as bfloat16 rows of K padded to 32
// (a frozen weight's copy, or packed per call) and B in the VNNI layout of bfloat16 dot
// products (pairs of consecutive k interleaved per column), sum in float32 and store float32.
// - AMX: B packed whole per call, zero-padded so that every tile is full; the tiles on C's edges
//   stored through a buffer. At GhostNet's sizes the packing is a pass over data the float32
//   GEMM reads anyway, and the dot products cost little next to it.
// - AVX-512 BF16: gemm_nn's register tiling (gemm.h) on vdpbf16ps, two k per instruction; B
//   converted panel by panel into a buffer that stays in L1 across the row tiles. A template in
//   bf16_gemm.h (dot_tiles), so that product_rows' epilogues run in registers as gemm_nn's do.

#include "bf16_gemm.h"

#include <ATen/Context.h>
#include <torch/version.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <vector>

#ifdef GK_HAVE_BF16
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace ghostkernels {

#ifdef GK_HAVE_BF16
namespace {

constexpr int kArchReqXcompPerm = 0x1023;  // arch_prctl: ask for an extended state component
constexpr int kXfeatureXtiledata = 18;     // AMX's tile data

enum class Engine { none, amx, dot };

struct Probe {
  Engine engine = Engine::none;
  std::string why;
};

#ifdef GK_BF16_DOT
// Each of 12 independent accumulators through `n` dependent steps of vdpbf16ps (Dot) or
// vfmadd231ps: the instruction's throughput, the latency hidden. Not inlined, so that the two
// loops are timed as compiled.
template <bool Dot>
__attribute__((target("avx512f,avx512bf16"), noinline)) float steps(long n) {
  __m512 acc[12];
  for (int r = 0; r < 12; ++r) acc[r] = _mm512_set1_ps(float(r));
  // bfloat16 pairs (1.0, 1.0) and (2^-7, 2^-7) for the dot products; 1.0001 and 1e-4 for the FMAs
  __m512 a = Dot ? (__m512)_mm512_set1_epi32(0x3f803f80) : _mm512_set1_ps(1.0001f);
  __m512 b = Dot ? (__m512)_mm512_set1_epi32(0x3c003c00) : _mm512_set1_ps(1e-4f);
  for (long i = 0; i < n; ++i) {
#pragma GCC unroll 12
    for (int r = 0; r < 12; ++r)
      acc[r] = Dot ? _mm512_dpbf16_ps(acc[r], (__m512bh)a, (__m512bh)b) : _mm512_fmadd_ps(a, b, acc[r]);
    __asm__ volatile("" : "+v"(a), "+v"(b));  // not hoisted out of the loop
  }
  for (int r = 1; r < 12; ++r) acc[0] = _mm512_add_ps(acc[0], acc[r]);
  return _mm512_cvtss_f32(acc[0]);
}

// The multiply-adds per second of vdpbf16ps over those of vfmadd231ps on this core (each at
// its best of 5 interleaved runs of about 0.1 ms): a dot product does two per lane.
double dot_to_fma_rate() {
  constexpr long kSteps = 20000;
  double dot = 1e30, fma = 1e30;
  volatile float sink = 0;
  for (int run = 0; run < 5; ++run) {
    auto t0 = std::chrono::steady_clock::now();
    sink = sink + steps<true>(kSteps);
    auto t1 = std::chrono::steady_clock::now();
    sink = sink + steps<false>(kSteps);
    auto t2 = std::chrono::steady_clock::now();
    dot = std::min(dot, std::chrono::duration<double>(t1 - t0).count());
    fma = std::min(fma, std::chrono::duration<double>(t2 - t1).count());
  }
  return 2 * fma / dot;
}

// Dot products from this ratio of the float32 FMA rate on: a bfloat16 GEMM also converts B, and
// the rate is 2.0 on AMD Zen 4 and 0.49 on an Intel Xeon without AMX (Sapphire Rapids kind).
constexpr double kDotGain = 1.5;
#endif

Probe probe() {
  const char* set = std::getenv("GHOSTKERNELS_BF16_GEMM");
  const std::string choice = set ? set : "auto";
  if (choice == "off") return {Engine::none, "off by GHOSTKERNELS_BF16_GEMM=off"};
  if (choice != "auto" && choice != "amx" && choice != "avx512bf16")
    return {Engine::none, "GHOSTKERNELS_BF16_GEMM=" + choice + " is none of auto, amx, avx512bf16, off"};
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return {Engine::none, "CPUID leaf 7 missing"};
  const bool tile = d & (1u << 24), amx_bf16 = d & (1u << 22), avx512bw = b & (1u << 30);
  const bool avx512bf16 = avx512bw && __get_cpuid_count(7, 1, &a, &b, &c, &d) && (a & (1u << 5));
  std::string no_amx = "this CPU has no AMX-BF16 (amx_tile, amx_bf16, avx512_bf16)";
  if (choice != "avx512bf16" && tile && amx_bf16 && avx512bf16) {
    if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0) return {Engine::amx, "AMX-BF16 tiles"};
    no_amx = "the kernel refused AMX tile data (arch_prctl ARCH_REQ_XCOMP_PERM)";
  }
  if (choice == "amx") return {Engine::none, "GHOSTKERNELS_BF16_GEMM=amx, but " + no_amx};
  if (!avx512bf16) return {Engine::none, "this CPU has neither AMX-BF16 nor AVX512-BF16"};
#ifndef GK_BF16_DOT
  return {Engine::none, no_amx + ", and the AVX2 build of the kernels has no AVX512-BF16 dot products"};
#else
  if (choice == "avx512bf16") return {Engine::dot, "AVX512-BF16 dot products (GHOSTKERNELS_BF16_GEMM=avx512bf16)"};
  const double rate = dot_to_fma_rate();
  char measured[128];
  std::snprintf(measured, sizeof measured, "AVX512-BF16 dot products at %.2fx the float32 FMA rate", rate);
  if (rate >= kDotGain) return {Engine::dot, measured};
  char verdict[64];
  std::snprintf(verdict, sizeof verdict, " would not pay (they do from %.1fx)", kDotGain);
  return {Engine::none, no_amx + ", and its " + measured + verdict};
#endif
}

const Probe& probed() {
  static const Probe p = probe();
  return p;
}

// Tile registers: 0-3 the 2x2 float32 accumulators of a 32x32 block of C, 4-5 A's two 16-row
// halves, 6-7 B's two 16-column halves; every tile is 16 rows of 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

constexpr int64_t kTile = 16, kDepth = 32;  // C tile 16 x 16, A tile 16 x 32 bfloat16

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Each thread's packed operands: A's rows (either engine), B's pairs (AMX).
struct Buffers {
  std::vector<uint16_t> a, b;
};
thread_local Buffers buffers;

// float32 to bfloat16, to nearest even as VCVTNE2PS2BF16 (NaN stays a quiet NaN).
uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return uint16_t((u >> 16) | 0x40);
  return uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// A (M x K, strides a_si, a_sk) as bfloat16 rows of kp, zero-padded to mp rows.
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void pack_a(const float* A, int64_t a_si, int64_t a_sk,
                                                                   int64_t M, int64_t K, int64_t mp, int64_t kp,
                                                                   uint16_t* out) {
  for (int64_t i = 0; i < mp; ++i) {
    uint16_t* row = out + i * kp;
    if (i >= M) {
      std::memset(row, 0, kp * sizeof(uint16_t));
      continue;
    }
    const float* src = A + i * a_si;
    int64_t k = 0;
    if (a_sk == 1) {
      for (; k + 32 <= K; k += 32) {
        __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + k + 16), _mm512_loadu_ps(src + k));
        _mm512_storeu_si512(row + k, (__m512i)v);
      }
    }
    for (; k < kp; ++k) {
      row[k] = k < K ? to_bf16(src[k * a_sk]) : 0;
    }
  }
}

// B (K x N, row stride ldb) in VNNI pairs: out[(k / 2) * np * 2 + j * 2 + k % 2], zero-padded
// to kp rows and np columns.
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void pack_b(const float* B, int64_t ldb, int64_t K,
                                                                   int64_t N, int64_t kp, int64_t np,
                                                                   uint16_t* out) {
  for (int64_t k = 0; k < kp; k += 2) {
    uint16_t* dst = out + k * np;
    const float* r1 = k + 1 < K ? B + (k + 1) * ldb : nullptr;
    for (int64_t j = 0; j < np; j += 16) {
      const int64_t n = std::min<int64_t>(16, N - j);
      const __mmask16 m = n <= 0 ? 0 : (n >= 16 ? 0xFFFF : (__mmask16)((1u << n) - 1));
      const __m512i pairs =
          k < K ? bf16_column_pairs(B + k * ldb + j, r1 ? r1 + j : nullptr, m) : _mm512_setzero_si512();
      _mm512_storeu_si512(dst + j * 2, pairs);
    }
  }
}

// Tile register `t` (a 16 x 16 float32 block of C at row i, column j) into C: in place when
// the block lies inside M x N, else through `edge` and its valid part copied. A macro: the
// tile intrinsics take the register number as a literal.
#define GK_STORE_TILE(t, i, j)                                                                   \
  do {                                                                                          \
    if ((i) + kTile <= M && (j) + kTile <= N) {                                                 \
      _tile_stored(t, C + (i) * ldc + (j), ldc * sizeof(float));                                \
    } else {                                                                                    \
      _tile_stored(t, edge, kTile * sizeof(float));                                             \
      for (int64_t r = 0; r < std::min(kTile, M - (i)); ++r)                                    \
        std::memcpy(C + ((i) + r) * ldc + (j), edge + r * kTile, std::min(kTile, N - (j)) * sizeof(float)); \
    }                                                                                           \
  } while (0)

__attribute__((target("amx-tile,amx-bf16,avx512f"))) void tile_product(const uint16_t* a, const uint16_t* b,
                                                                      float* C, int64_t ldc, int64_t M, int64_t N,
                                                                      int64_t mp, int64_t np, int64_t kp) {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = kTile;
    config.colsb[t] = 64;
  }
  _tile_loadconfig(&config);
  alignas(64) float edge[kTile * kTile];
  const int64_t lda = kp * 2, ldb = np * 4;  // bytes
  for (int64_t i = 0; i < mp; i += 2 * kTile) {
    const bool two_rows = i + kTile < mp;
    for (int64_t j = 0; j < np; j += 2 * kTile) {
      const bool two_cols = j + kTile < np;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t k = 0; k < kp; k += kDepth) {
        _tile_loadd(4, a + i * kp + k, lda);
        _tile_loadd(6, b + (k / 2) * np * 2 + j * 2, ldb);
        _tile_dpbf16ps(0, 4, 6);
        if (two_cols) {
          _tile_loadd(7, b + (k / 2) * np * 2 + (j + kTile) * 2, ldb);
          _tile_dpbf16ps(1, 4, 7);
        }
        if (two_rows) {
          _tile_loadd(5, a + (i + kTile) * kp + k, lda);
          _tile_dpbf16ps(2, 5, 6);
          if (two_cols) _tile_dpbf16ps(3, 5, 7);
        }
      }
      GK_STORE_TILE(0, i, j);
      if (two_cols) GK_STORE_TILE(1, i, j + kTile);
      if (two_rows) GK_STORE_TILE(2, i + kTile, j);
      if (two_rows && two_cols) GK_STORE_TILE(3, i + kTile, j + kTile);
    }
  }
  _tile_release();
}
#undef GK_STORE_TILE

}  // namespace

bool bf16_gemm_available() { return probed().engine != Engine::none; }
std::string bf16_gemm_status() { return probed().why; }

#ifdef GK_BF16_DOT
bool bf16_gemm_on_dot_products() { return probed().engine == Engine::dot; }

const uint32_t* bf16_pairs(const float* A, int64_t a_si, int64_t a_sk, int64_t M, int64_t K, const uint16_t* A_bf16) {
  if (!A_bf16) {
    const int64_t kp = bf16_row_length(K);
    buffers.a.resize(std::max<size_t>(buffers.a.size(), M * kp));
    pack_a(A, a_si, a_sk, M, K, M, kp, buffers.a.data());
    A_bf16 = buffers.a.data();
  }
  return reinterpret_cast<const uint32_t*>(A_bf16);
}
#endif

void gemm_bf16(int64_t M, int64_t N, int64_t K, const float* A, int64_t a_si, int64_t a_sk, const float* B,
               int64_t ldb, float* C, int64_t ldc, const uint16_t* A_bf16) {
  if (M <= 0 || N <= 0) return;
#ifdef GK_BF16_DOT
  if (probed().engine == Engine::dot) return dot_product(M, N, K, A, a_si, a_sk, B, ldb, C, ldc, A_bf16, Unchanged());
#endif
  // AMX reads whole tiles: A's rows rounded up to 16, B's columns too
  const int64_t mp = round_up(M, kTile), np = round_up(N, kTile), kp = bf16_row_length(K);  // kp: a multiple of kDepth
  if (!A_bf16) {
    buffers.a.resize(std::max<size_t>(buffers.a.size(), mp * kp));
    pack_a(A, a_si, a_sk, M, K, mp, kp, buffers.a.data());
    A_bf16 = buffers.a.data();
  }
  buffers.b.resize(std::max<size_t>(buffers.b.size(), kp * np));
  pack_b(B, ldb, K, N, kp, np, buffers.b.data());
  tile_product(A_bf16, buffers.b.data(), C, ldc, M, N, mp, np, kp);
}

#else

bool bf16_gemm_available() { return false; }
std::string bf16_gemm_status() { return "built without bfloat16 GEMMs (they need GCC >= 11 on x86-64 Linux)"; }
void gemm_bf16(int64_t, int64_t, int64_t, const float*, int64_t, int64_t, const float*, int64_t, float*, int64_t,
               const uint16_t*) {
  TORCH_CHECK(false, "ghostkernels: gemm_bf16 called in a build without bfloat16 GEMMs");
}

#endif

bool bf16_matmuls_requested() {
  // Once torch >= 2.9's fp32_precision settings are used, reading the legacy one raises.
#if TORCH_VERSION_MAJOR > 2 || TORCH_VERSION_MINOR >= 10
  return at::globalContext().float32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL) ==
         at::Float32Precision::BF16;
#elif TORCH_VERSION_MINOR == 9
  return at::globalContext().float32Precision("mkldnn", "matmul") == "bf16";
#else
  return at::globalContext().float32MatmulPrecision() == at::Float32MatmulPrecision::MEDIUM;
#endif
}

bool bf16_gemm_enabled(at::ScalarType dtype, int64_t depth) {
  if (dtype != at::kFloat || !bf16_matmuls_requested() || !bf16_gemm_available())
    return false;
#ifdef GK_HAVE_BF16
  // Below 32 the zero padding to a tile's depth costs more than AMX saves (GhostNet's 16 -> 16
  // module at 112x112 ran 0.76x as fast, 24 -> 72 at 56x56 1.05x, 40 -> 120 at 28x28 1.10x).
  if (probed().engine == Engine::amx) return depth >= 32;
#endif
  return depth > 0;
}

}  // namespace ghostkernels
