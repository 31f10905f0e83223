// AMX bfloat16 GEMM (amx_gemm.h). The operands are packed per call into tile layouts: A as
// bfloat16 rows of K padded to 32, B in the VNNI layout AMX's dot product reads (pairs of
// consecutive k interleaved per column), both zero-padded so that every tile is full; the
// float32 tiles are stored into C, those on its edges through a buffer. At GhostNet's sizes the packing is a
// pass over data the float32 GEMM reads anyway, and the dot products cost little next to it.

#include "amx_gemm.h"

#include <ATen/Context.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && __GNUC__ >= 11
#define GK_HAVE_AMX 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace ghostkernels {

#ifdef GK_HAVE_AMX
namespace {

constexpr int kArchReqXcompPerm = 0x1023;  // arch_prctl: ask for an extended state component
constexpr int kXfeatureXtiledata = 18;     // AMX's tile data

struct Probe {
  bool ok = false;
  std::string why;
};

Probe probe() {
  const char* disabled = std::getenv("GHOSTKERNELS_DISABLE_AMX");
  if (disabled && std::string(disabled) == "1") return {false, "disabled by GHOSTKERNELS_DISABLE_AMX=1"};
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return {false, "CPUID leaf 7 missing"};
  const bool tile = d & (1u << 24), bf16 = d & (1u << 22), avx512bw = b & (1u << 30);
  const bool avx512bf16 = __get_cpuid_count(7, 1, &a, &b, &c, &d) && (a & (1u << 5));
  if (!tile || !bf16 || !avx512bw || !avx512bf16)
    return {false, "this CPU has no AMX-BF16 (amx_tile, amx_bf16, avx512_bf16)"};
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0)
    return {false, "the kernel refused AMX tile data (arch_prctl ARCH_REQ_XCOMP_PERM)"};
  return {true, "AMX-BF16"};
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

struct Buffers {
  std::vector<uint16_t> a, b;
};

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
  // interleave: [b0..b15 of row k, b0..b15 of row k+1] -> k0 k1 pairs per column
  alignas(64) static const uint16_t order[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                  8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i index = _mm512_load_si512(order);
  for (int64_t k = 0; k < kp; k += 2) {
    uint16_t* dst = out + k * np;
    const float* r0 = k < K ? B + k * ldb : nullptr;
    const float* r1 = k + 1 < K ? B + (k + 1) * ldb : nullptr;
    for (int64_t j = 0; j < np; j += 16) {
      const int64_t n = std::min<int64_t>(16, N - j);
      const __mmask16 m = n <= 0 ? 0 : (n >= 16 ? 0xFFFF : (__mmask16)((1u << n) - 1));
      const __m512 lo = r0 ? _mm512_maskz_loadu_ps(m, r0 + j) : _mm512_setzero_ps();
      const __m512 hi = r1 ? _mm512_maskz_loadu_ps(m, r1 + j) : _mm512_setzero_ps();
      const __m512i pairs = _mm512_permutexvar_epi16(index, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
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

bool amx_bf16_available() { return probed().ok; }
std::string amx_bf16_status() { return probed().why; }

void gemm_bf16_amx(int64_t M, int64_t N, int64_t K, const float* A, int64_t a_si, int64_t a_sk, const float* B,
                   int64_t ldb, float* C, int64_t ldc, const uint16_t* A_bf16) {
  if (M <= 0 || N <= 0) return;
  static thread_local Buffers buffers;
  const int64_t mp = round_up(M, kTile), np = round_up(N, kTile), kp = round_up(std::max<int64_t>(K, 1), kDepth);
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

bool amx_bf16_available() { return false; }
std::string amx_bf16_status() { return "built without AMX support (needs GCC >= 11 on x86-64 Linux)"; }
void gemm_bf16_amx(int64_t, int64_t, int64_t, const float*, int64_t, int64_t, const float*, int64_t, float*, int64_t,
                   const uint16_t*) {
  TORCH_CHECK(false, "ghostkernels: gemm_bf16_amx called in a build without AMX");
}

#endif

bool bf16_gemm_enabled(at::ScalarType dtype, int64_t depth) {
  // Below 32 the zero padding to a tile's depth costs more than AMX saves (GhostNet's 16 -> 16
  // module at 112x112 ran 0.76x as fast, 24 -> 72 at 56x56 1.05x, 40 -> 120 at 28x28 1.10x).
  return dtype == at::kFloat && depth >= 32 &&
         at::globalContext().float32MatmulPrecision() == at::Float32MatmulPrecision::MEDIUM && amx_bf16_available();
}

TORCH_LIBRARY_FRAGMENT(ghostkernels, m) {
  m.def("amx_bf16_status() -> (bool, str)",
        [] { return std::make_tuple(amx_bf16_available(), amx_bf16_status()); });
}

}  // namespace ghostkernels
