// The pieces of the Ghost module's CPU kernels that both its inference kernels (ghost_cpu.cpp)
// and its batch-statistics training kernels (ghost_train_cpu.cpp) use: the activation, the
// depthwise taps on a flattened plane, and the call's geometry.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <type_traits>
#include <vector>

#include "gemm.h"
#include "isa.h"

namespace ghostkernels {

enum class Activation { None, ReLU };

inline Activation parse_activation(c10::string_view name, const char* op = "ghost_module") {
  if (name == "relu") return Activation::ReLU;
  if (name == "none") return Activation::None;
  TORCH_CHECK(false, op, ": activation must be 'relu' or 'none', got '", std::string(name), "'");
}

// The memory format of an op's output for input x: channels_last when x is channels_last and not
// also NCHW-contiguous (as ghostkernels.reference.output_memory_format, the fake kernels' rule).
inline at::MemoryFormat output_format(const at::Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast) ? at::MemoryFormat::ChannelsLast
                                                                                : at::MemoryFormat::Contiguous;
}

// Buffers and masks keep this many readable elements past their last one, so that a
// vector load at a tail stays in bounds.
constexpr int64_t kSlack = 64;

// std::max(v, 0) is `v < 0 ? 0 : v`: NaN stays NaN, as with torch.relu.
template <typename T>
GK_INLINE T activate(T v, Activation act) {
  return act == Activation::ReLU ? std::max(v, T(0)) : v;
}

// activate() on a vector, or on a scalar: `v < 0 ? 0 : v` keeps NaN (`v > 0 ? v : 0` would make it
// 0). As a max against a floor (0, or -inf for none; one vmaxps, no branch on act) it ran no faster.
template <typename V>
GK_INLINE V activate_vector(V v, Activation act) {
  if constexpr (std::is_floating_point_v<V>) return activate(v, act);
  else return act == Activation::ReLU ? (v < 0 ? V{} : v) : v;
}

// ReLU's backward as torch's threshold_backward, on a scalar or a vector (a select, no branch
// per lane): the grad passes where the output is NaN. `activated` may be the value before the
// activation: its sign decides the same way.
template <typename X>
GK_INLINE X activation_grad(X grad, X activated, Activation act) {
  if (act == Activation::None) return grad;
  if constexpr (std::is_floating_point_v<X>) return activated <= X(0) ? X(0) : grad;
  else return activated <= 0 ? X{} : grad;
}

// One depthwise tap on a flattened plane: src offset, weight, its index in the d x d
// weight, and the column-validity mask of its column shift (nullptr when the shift is 0).
// make_taps leaves the weight 0: the plane's taps serve every channel, and apply_taps puts a
// channel's weights into a copy of its own.
template <typename T>
struct Tap {
  int64_t offset;
  T weight;
  int64_t index;
  const T* mask;
};

// v where the column mask at `mask` (column_masks: all-ones or zero bits) is set, 0 elsewhere: one
// AND with the mask in memory, where a compare with 0 took a zero and a result register from the
// taps loops (short of AVX2's 16 with 3x3 weights).
template <typename T>
GK_INLINE typename Simd<T>::vec masked(typename Simd<T>::vec v, const T* mask) {
  using I = typename Simd<T>::index;
  return (typename Simd<T>::vec)((I)v & (I)Simd<T>::load(mask));
}

// sum + sum_t w_t * (mask_t[q] ? source(col, r)[q] : 0) at q (one vector of outputs), taps given
// column by column (dw columns of dw taps that share a mask): one select per column, not per
// tap; source(col, r) is where the values of tap r of column col start (src + its offset). Rows
// above and below the plane come from the halo rows of the buffer src points into.
// DW: dw as a compile-time constant (the loops unroll and the weights stay in registers), or 0.
// Masked = false: every lane's column shifts stay inside its row, so the masks are skipped.
template <typename T, int DW, bool Masked, typename Source>
GK_INLINE typename Simd<T>::vec add_taps(typename Simd<T>::vec sum, int64_t q, const Tap<T>* taps, int64_t dw,
                                         Source source) {
  using S = Simd<T>;
  using V = typename S::vec;
  const int64_t d = DW ? DW : dw;
#pragma GCC unroll 7
  for (int64_t col = 0; col < d; ++col) {
    const Tap<T>* column = taps + col * d;
    // from the first product, not from 0: 0 + w * x is no multiply (its zero's sign), so a zero
    // register stayed live through the loop, one too many for AVX2's 16 with 3x3 weights
    V part = column[0].weight * S::load(source(col, 0) + q);
#pragma GCC unroll 7
    for (int64_t r = 1; r < d; ++r) part += column[r].weight * S::load(source(col, r) + q);
    // make_taps gives every column a mask but the centre one (no shift): with DW known, so is which
    // columns select, and the unrolled body has no branch (with a null test per column GCC kept the
    // running sum on the stack, a store-forwarding chain per output vector).
    const bool has_mask = DW ? col != d / 2 : column[0].mask != nullptr;
    if (Masked && has_mask) part = masked(part, column[0].mask + q);
    sum += part;
  }
  return sum;
}

// Whether `taps` (dw x dw, column by column) are a forward op's (make_taps, transposed = false):
// each column's offsets are its centre column's plus the column's shift.
template <typename T>
GK_INLINE bool forward_taps(const Tap<T>* taps, int64_t dw) {
  for (int64_t col = 0; col < dw; ++col)
    for (int64_t r = 0; r < dw; ++r)
      if (taps[col * dw + r].offset != taps[dw / 2 * dw + r].offset + (col - dw / 2)) return false;
  return true;
}

// taps_pass's loops over the vectors of dst, with `at(sum, q, masked)` the taps' sum at q.
template <typename T, typename At>
GK_INLINE void taps_loops(T* dst, int64_t n, bool accumulate, T bias, Activation act, int64_t row_width,
                          int64_t pad, At at) {
  using S = Simd<T>;
  using V = typename S::vec;
  constexpr int L = S::lanes;
  const V start = V{} + bias;
  auto finish = [act](V v) __attribute__((always_inline)) { return activate_vector(v, act); };
  int64_t q = 0;
  // Rows of whole vectors (row_width, a multiple of L: 112 on AVX-512, 56 and 112 on AVX2): only a
  // row's first and last vector reach past its edges, so the others skip the masks (Ghost ops at
  // 112x112 1.02-1.07x faster, Zen 4).
  if (row_width > L && row_width % L == 0 && n % row_width == 0 && pad < L) {
    for (; q < n; q += row_width) {
      const int64_t last = q + row_width - L;
      S::store(dst + q, finish(at(accumulate ? S::load(dst + q) : start, q, std::true_type{})));
      for (int64_t v = q + L; v < last; v += L)
        S::store(dst + v, finish(at(accumulate ? S::load(dst + v) : start, v, std::false_type{})));
      S::store(dst + last, finish(at(accumulate ? S::load(dst + last) : start, last, std::true_type{})));
    }
    return;
  }
  for (; q + L <= n; q += L)
    S::store(dst + q, finish(at(accumulate ? S::load(dst + q) : start, q, std::true_type{})));
  if (q < n) {  // tail: src and the masks have kSlack readable elements past n; store n - q
    const V sum = accumulate ? S::load_first(dst + q, n - q) : start;
    S::store_first(dst + q, finish(at(sum, q, std::true_type{})), n - q);
  }
}

template <typename T, int DW>
GK_INLINE void taps_pass(T* dst, const T* src, int64_t n, const Tap<T>* plane_taps, const T* weights, int64_t dw,
                         bool accumulate, T bias, Activation act, int64_t row_width) {
  using V = typename Simd<T>::vec;
  // The plane's taps with this channel's weights, copied here: dst's stores may alias the taps for
  // all the compiler knows (it reloaded them per vector), and weights set in the shared taps just
  // before (one scalar store each) stalled the copy's vector loads on store forwarding, once per
  // channel (ghost_module 160 -> 960 @7 1.05-1.07x, frozen GhostNet 1.0x 1.01-1.04x faster
  // without; bench/results, Zen 4 section 34).
  Tap<T> fixed[DW > 0 ? DW * DW : 1];
  std::vector<Tap<T>> sized(DW > 0 ? 0 : dw * dw);  // float64 and unusual dw: checking, not speed
  Tap<T>* taps = DW > 0 ? fixed : sized.data();
  for (int64_t t = 0; t < (DW > 0 ? DW * DW : dw * dw); ++t) {
    taps[t] = plane_taps[t];
    taps[t].weight = weights[taps[t].index];
  }
  const int64_t pad = (DW ? DW : dw) / 2;
  // Where row_width is known (the inference kernels' bands) and the taps are a forward op's, each
  // row of taps is read from one pointer at constant displacements (rows[r] + col - DW / 2): a 3x3
  // op holds 3 pointers, not 9, which GCC could not keep in registers (it reloaded a pointer from
  // the stack before each tap's load). Ghost ops 1.02-1.12x faster (Zen 3). The batch-statistics
  // kernels' whole planes, which pass no row_width, ran their fwd+bwd 1-10% slower this way, and
  // the backward's adjoint taps no faster.
  if constexpr (DW > 1) {
    if (row_width > 0 && forward_taps(taps, DW)) {
      const T* rows[DW];
      for (int r = 0; r < DW; ++r) rows[r] = src + taps[DW / 2 * DW + r].offset;
      return taps_loops(dst, n, accumulate, bias, act, row_width, pad, [&](V sum, int64_t q, auto masked)
                            __attribute__((always_inline)) {
        return add_taps<T, DW, decltype(masked)::value>(sum, q, taps, DW, [&](int64_t col, int64_t r)
                                                            __attribute__((always_inline)) {
          return rows[r] + (col - DW / 2);
        });
      });
    }
  }
  taps_loops(dst, n, accumulate, bias, act, row_width, pad, [&](V sum, int64_t q, auto masked)
                 __attribute__((always_inline)) {
    return add_taps<T, DW, decltype(masked)::value>(sum, q, taps, dw, [&](int64_t col, int64_t r)
                                                        __attribute__((always_inline)) {
      return src + taps[col * (DW ? DW : dw) + r].offset;
    });
  });
}

// dst[q] = act((accumulate ? dst[q] : bias) + the taps at q) for q < n, in one pass: the plane's taps
// (make_taps: offsets, masks) with a channel's dw x dw `weights`; row_width: the plane's width when
// n covers whole rows from a row's start (0: not known).
template <typename T>
GK_INLINE void apply_taps(T* dst, const T* src, int64_t n, const Tap<T>* taps, const T* weights, int64_t dw,
                          bool accumulate, T bias, Activation act, int64_t row_width = 0) {
  // float64 is for checking, not speed: one instantiation with dw at run time compiles faster.
  if constexpr (std::is_same_v<T, double>)
    return taps_pass<T, 0>(dst, src, n, taps, weights, dw, accumulate, bias, act, row_width);
  switch (dw) {  // GhostNet's cheap ops are 3x3; the paper's ablation tries 1, 5 and 7
    case 1: return taps_pass<T, 1>(dst, src, n, taps, weights, dw, accumulate, bias, act, row_width);
    case 3: return taps_pass<T, 3>(dst, src, n, taps, weights, dw, accumulate, bias, act, row_width);
    case 5: return taps_pass<T, 5>(dst, src, n, taps, weights, dw, accumulate, bias, act, row_width);
    case 7: return taps_pass<T, 7>(dst, src, n, taps, weights, dw, accumulate, bias, act, row_width);
    default: return taps_pass<T, 0>(dst, src, n, taps, weights, dw, accumulate, bias, act, row_width);
  }
}

// sum_q x[q] * (mask[q] ? y[q] : 0) for q < n; mask may be nullptr. x, y and the mask have
// kSlack readable elements past n, so the tail is one masked vector, not a scalar loop.
template <typename T>
GK_INLINE T masked_dot(const T* x, const T* y, int64_t n, const T* mask) {
  using S = Simd<T>;
  using V = typename S::vec;
  constexpr int L = S::lanes;
  V acc{};
  for (int64_t q = 0; q < n; q += L) {
    V v = S::load(y + q);
    if (mask) v = masked(v, mask + q);
    V prod = S::load(x + q) * v;
    if (q + L > n) prod = S::load(lane_index<T>()) < T(n - q) ? prod : V{};
    acc += prod;
  }
  return lane_sum<T>(acc);
}

template <typename T>
GK_INLINE T sum(const T* x, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t q = 0; q < n; ++q) s += x[q];
  return s;
}

// An L x L block (L = the vector's lanes) of a row-major matrix transposed in registers: rows
// src + i * ld_src into rows dst + i * ld_dst. log2(L) butterfly stages, each swapping one bit
// of the row index with the same bit of the lane index.
template <typename T>
GK_INLINE void transpose_block(const T* src, int64_t ld_src, T* dst, int64_t ld_dst) {
  using S = Simd<T>;
  using V = typename S::vec;
  using I = typename S::index;
  constexpr int L = S::lanes;
  // Per stage, the lanes of (rows[i], rows[i + half]) for the new rows[i], then rows[i + half]. A
  // table: written as a loop, GCC built these vectors lane by lane on every call.
  static const auto stage_lanes = [] {
    std::array<typename S::lane_t, 2 * L * 4> t{};
    int stage = 0;
    for (int half = L / 2; half >= 1; half /= 2, ++stage)
      for (int l = 0; l < L; ++l) {
        t[2 * stage * L + l] = (l & half) ? l - half + L : l;
        t[(2 * stage + 1) * L + l] = (l & half) ? l + L : l + half;
      }
    return t;
  }();
  V rows[L];
  for (int i = 0; i < L; ++i) rows[i] = S::load(src + i * ld_src);
  int stage = 0;
  for (int half = L / 2; half >= 1; half /= 2, ++stage) {
    I low, high;
    std::memcpy(&low, stage_lanes.data() + 2 * stage * L, sizeof(I));
    std::memcpy(&high, stage_lanes.data() + (2 * stage + 1) * L, sizeof(I));
    for (int i = 0; i < L; ++i)
      if (!(i & half)) {
        const V a = rows[i], b = rows[i + half];
        rows[i] = __builtin_shuffle(a, b, low);
        rows[i + half] = __builtin_shuffle(a, b, high);
      }
  }
  for (int i = 0; i < L; ++i) S::store(dst + i * ld_dst, rows[i]);
}

// dst[c * ld_dst + r] = src[r * ld_src + c] for r < rows, c < cols: whole L x L blocks in
// registers, the edges element by element.
template <typename T>
GK_INLINE void transpose(const T* src, int64_t rows, int64_t cols, int64_t ld_src, T* dst, int64_t ld_dst) {
  constexpr int64_t L = Simd<T>::lanes;
  const int64_t block_rows = rows / L * L, block_cols = cols / L * L;
  for (int64_t r = 0; r < block_rows; r += L)
    for (int64_t c = 0; c < block_cols; c += L) transpose_block(src + r * ld_src + c, ld_src, dst + c * ld_dst + r, ld_dst);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = r < block_rows ? block_cols : 0; c < cols; ++c) dst[c * ld_dst + r] = src[r * ld_src + c];
}

// Everything about one call that does not depend on the band or the image.
struct Geometry {
  int64_t batch, inp, height, width;   // x
  int64_t init, ghosts, keep, copies;  // copies = ratio - 1: ghost j reads intrinsic j / copies
  int64_t out_channels, out_height, out_width;
  int64_t kernel, stride, dw, pad;     // primary kernel, stride, cheap kernel, dw // 2
  bool channels_last;
  Activation act;

  int64_t plane() const { return out_height * out_width; }
  int64_t ghost_begin(int64_t c) const { return std::min(c * copies, keep); }
  int64_t ghost_end(int64_t c) const { return std::min((c + 1) * copies, keep); }
};

inline int64_t mask_stride(const Geometry& g, int64_t rows) { return rows * g.out_width + kSlack; }

// Column-validity masks of a flattened (rows x width) plane, one per column shift dx - pad:
// masks[dx][q] = all-ones bits (a NaN) if 0 <= q % width + dx - pad < width, else 0; read by
// masked(). Shared by every band. Made once per
// width, kernel and row count and kept for the thread's later calls (a shared_ptr, so that
// the cache may drop them while a caller reads them): made on every call they took 2-8% of a
// batch-1 ghost_module on a 112x112 or 56x56 plane (Zen 4, 2 threads).
template <typename T>
std::shared_ptr<const std::vector<T>> column_masks(const Geometry& g, int64_t rows) {
  thread_local std::map<std::array<int64_t, 4>, std::shared_ptr<const std::vector<T>>> cache;
  thread_local size_t cached_bytes = 0;
  const std::array<int64_t, 4> key{g.out_width, g.dw, g.pad, rows};
  if (auto found = cache.find(key); found != cache.end()) return found->second;
  const int64_t stride = mask_stride(g, rows);
  auto masks = std::make_shared<std::vector<T>>(g.dw * stride, T(0));
  T valid;
  std::memset(&valid, 0xff, sizeof(T));
  for (int64_t dx = 0; dx < g.dw; ++dx) {  // the first row, then copies of it
    T* mask = masks->data() + dx * stride;
    for (int64_t w = 0; w < g.out_width; ++w) {
      const int64_t source = w + dx - g.pad;
      mask[w] = (source >= 0 && source < g.out_width) ? valid : T(0);
    }
    for (int64_t row = 1; row < rows; ++row) std::memcpy(mask + row * g.out_width, mask, g.out_width * sizeof(T));
  }
  // A bound for programs that see many plane sizes, and large ones (the training kernels' masks
  // cover whole planes).
  constexpr size_t kBound = 4 << 20;
  const size_t bytes = masks->size() * sizeof(T);
  if (bytes > kBound) return masks;
  if (cached_bytes + bytes > kBound) {
    cache.clear();
    cached_bytes = 0;
  }
  cached_bytes += bytes;
  return cache[key] = std::move(masks);
}

// The taps of a dw x dw depthwise op on a flattened plane, the same for every channel: offsets, masks
// and weight indices (apply_taps takes a channel's weights). transposed = the adjoint (backward).
template <typename T>
GK_INLINE void make_taps(const Geometry& g, const T* masks, int64_t mask_stride, bool transposed, Tap<T>* taps) {
  int n = 0;
  for (int64_t dx = 0; dx < g.dw; ++dx)  // column by column, as add_taps groups them
    for (int64_t dy = 0; dy < g.dw; ++dy) {
      const int64_t sy = dy - g.pad, sx = dx - g.pad;
      const int64_t mask_dx = transposed ? g.dw - 1 - dx : dx;
      taps[n++] = Tap<T>{transposed ? -(sy * g.out_width + sx) : sy * g.out_width + sx, T(0), dy * g.dw + dx,
                         sx == 0 ? nullptr : masks + mask_dx * mask_stride};
    }
}

// dst[i] = sum over threads t of partials[t * size + i], in thread order (deterministic for a
// fixed thread count): the per-thread weight-grad accumulators of the backward kernels.
template <typename T>
void sum_thread_partials(const std::vector<T>& partials, int64_t size, T* dst) {
  const int64_t threads = int64_t(partials.size()) / size;
  for (int64_t i = 0; i < size; ++i) {
    T total = 0;
    for (int64_t t = 0; t < threads; ++t) total += partials[t * size + i];
    dst[i] = total;
  }
}

// A buffer of one output plane (g.out_height x g.out_width) with `pad` zero rows above and below, slack before and
// kSlack after: the layout apply_taps and masked_dot read. plane() is where row 0 starts.
template <typename T>
struct HaloPlane {
  std::vector<T> data;
  int64_t offset;
  explicit HaloPlane(const Geometry& g)
      : data((g.out_height + 2 * g.pad) * g.out_width + 2 * g.pad + kSlack, T(0)),
        offset(g.pad + g.pad * g.out_width) {}
  T* plane() { return data.data() + offset; }
};

}  // namespace ghostkernels
