// The banded, phase-split direct conv that direct_conv_cpu.cpp runs over whole planes and
// ghost_cpu.cpp runs over the Ghost rows it keeps in cache (ghost_module_depthwise).
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>

#include "gemm.h"
#include "ghost_common.h"
#include "isa.h"

namespace ghostkernels {

// A phase is the padded plane's rows and columns congruent to (ry, rx) mod S:
// out[oh][ow] = bias + sum w[dy][dx] phase[dy % S][dx % S][oh + dy / S][ow + dx / S].
// Outputs are computed at the phase width (columns past out_width are discarded), which makes
// each tap a shift of one flat index. A plane is done in bands of output rows whose phases
// stay in L1; `slack` keeps the last vector block's reads inside the band's buffer.
// The sizes are computed once: their divisions, redone per channel and band, took 13% of
// ghost_module_depthwise's kernel time on a 14x14 plane (perf).
template <typename T>
struct PlaneGeometry {
  static constexpr int64_t kVectorBlock = 4 * Simd<T>::lanes;
  static constexpr int64_t kL1Elements = 24 * 1024 / sizeof(T);
  static constexpr int kOutputBlock = 4;  // output channels computed together (band_outputs)
  int64_t height, width, k, stride, out_height, out_width, group_inputs;

  PlaneGeometry(int64_t height, int64_t width, int64_t k, int64_t stride, int64_t out_height, int64_t out_width,
                int64_t group_inputs)
      : height(height), width(width), k(k), stride(stride), out_height(out_height), out_width(out_width),
        group_inputs(group_inputs) {
    pad_ = k / 2;
    phase_width_ = (width + 2 * pad_ + stride - 1) / stride;
    halo_rows_ = (k - 1) / stride;
    const int64_t per_row = (stride * stride * group_inputs + 1) * phase_width_;
    band_rows_ = std::max<int64_t>(1, std::min<int64_t>(kL1Elements / per_row - halo_rows_, out_height));
    bands_ = (out_height + band_rows_ - 1) / band_rows_;
    // Bands of equal rows: the threads share items of whole bands, and a short last band left one
    // idle (ghost_module_depthwise 16 -> 48 @112, 56 output rows as 20 + 20 + 16: 1.05-1.07x
    // faster as 19 + 19 + 18 at batch 1, 1.02-1.03x at batch 8).
    band_rows_ = (out_height + bands_ - 1) / bands_;
    max_input_rows_ = (band_rows_ + halo_rows_) * stride;
    flat_size_ = (band_rows_ * phase_width_ + kVectorBlock - 1) / kVectorBlock * kVectorBlock;
    // a vector's slack after each phase and each half of the split: short rows are written and
    // read as whole vectors (padded_row)
    phase_size_ = flat_size_ + halo_rows_ * (phase_width_ + 1) + Simd<T>::lanes;
    split_size_ = stride == 1 ? 0 : max_input_rows_ * width + 1 + 2 * Simd<T>::lanes;
  }
  int64_t pad() const { return pad_; }
  int64_t phase_width() const { return phase_width_; }
  int64_t halo_rows() const { return halo_rows_; }
  int64_t band_rows() const { return band_rows_; }
  int64_t bands() const { return bands_; }
  int64_t rows_in_band(int64_t oh0) const { return std::min(band_rows_, out_height - oh0); }
  // Input rows [first, last) that the band of `rows` output rows from oh0 reads, and their most.
  int64_t first_input_row(int64_t oh0) const { return std::max<int64_t>(0, oh0 * stride - pad_); }
  int64_t last_input_row(int64_t oh0, int64_t rows) const {
    return std::min(height, (oh0 + rows + halo_rows_) * stride - pad_);
  }
  int64_t max_input_rows() const { return max_input_rows_; }
  int64_t flat_size() const { return flat_size_; }
  int64_t phase_size() const { return phase_size_; }
  // stride 2: the band's input rows split into even and odd columns in one pass
  int64_t split_size() const { return split_size_; }
  int64_t phases_size() const { return group_inputs * stride * stride * phase_size_; }
  int64_t scratch_size() const { return phases_size() + kOutputBlock * flat_size_ + split_size_; }

 private:
  int64_t pad_, phase_width_, halo_rows_, band_rows_, bands_, max_input_rows_, flat_size_, phase_size_, split_size_;
};

// dst[0, LEAD) = zeros, then src[0, n), then zeros up to a whole number of vectors, as vector
// stores: a phase row of a small plane with its padding, where a copy loop of n = 7-31
// elements ran element by element. src has a vector's slack readable after n; dst as many
// writable elements, those past the row being the next row's (written after it) or padding
// that must be zero.
template <typename T, int LEAD>
GK_INLINE void padded_row(T* dst, const T* src, int64_t n) {
  using S = Simd<T>;
  using V = typename S::vec;
  static constexpr auto shifted = [] {  // the lanes shifted up by LEAD behind the zero vector's
    std::array<typename S::lane_t, S::lanes> t{};
    for (int l = 0; l < S::lanes; ++l) t[l] = l < LEAD ? 0 : S::lanes + l - LEAD;
    return t;
  }();
  typename S::index from;
  std::memcpy(&from, shifted.data(), sizeof(from));
  const V lane = S::load(lane_index<T>());
  const V row = __builtin_shuffle(V{}, S::load(src), from);
  S::store(dst, lane < T(LEAD + n) ? row : V{});  // one compare and select, as masked_dot's tail
  for (int64_t c = S::lanes; c < LEAD + n; c += S::lanes)
    S::store(dst + c, lane < T(LEAD + n - c) ? S::load(src + c - LEAD) : V{});
}

// Where phase rx of a padded row holds the input: padded column ix + pad sits in phase (ix + pad) % S
// at (ix + pad) / S, so the row's input columns are [lead, lead + columns) of it.
struct PhaseColumns {
  int64_t rx, lead, columns;
  PhaseColumns(int64_t width, int64_t pad, int64_t S, int64_t rx)
      : rx(rx), lead((pad - rx + S - 1) / S), columns((width + pad - rx + S - 1) / S - lead) {}
};

// Zeros in the phases before their first row of input and after their last (the padding rows, and
// the tail that the vector blocks past the band's last output read: stale values there could be
// denormals). fill_phases zeroes the padding between rows as it copies them, by vector stores (as
// one std::fill per row it took 3% of the samples). Zeroing the whole phases first took 7% of
// ghost_module_depthwise 16 -> 48 @112's samples: it and the 112x112 depthwise convs ran 1.06-1.09x
// faster without (Zen 3, one process).
template <typename T, int S>
GK_INLINE void zero_outside_rows(const PlaneGeometry<T>& g, int64_t oh0, int64_t ih_begin, int64_t ih_end,
                                 T* phases) {
  const int64_t pad = g.pad(), phase_width = g.phase_width(), phase_size = g.phase_size();
  for (int64_t ry = 0; ry < S; ++ry) {
    // the phase rows [first, last) that hold input rows: padded rows ih + pad = ry + S * (oh0 + row)
    const int64_t first = (ih_begin + pad - ry + S - 1) / S - oh0, last = (ih_end + pad - 1 - ry) / S + 1 - oh0;
    for (int64_t rx = 0; rx < S; ++rx) {
      T* phase = phases + (ry * S + rx) * phase_size;
      const PhaseColumns c(g.width, pad, S, rx);
      if (last <= first) {
        std::fill(phase, phase + phase_size, T(0));
        continue;
      }
      std::fill(phase, phase + first * phase_width + c.lead, T(0));
      std::fill(phase + (last - 1) * phase_width + c.lead + c.columns, phase + phase_size, T(0));
    }
  }
}

// The zero-padded phases of one input plane's rows for the band of output rows from oh0. x points
// at the plane's row x_row0 (0 for a whole plane); the band's rows are read from there on.
template <typename T, int S>
GK_INLINE void fill_phases(const T* x, int64_t x_row0, const PlaneGeometry<T>& g, int64_t oh0, int64_t rows, T* phases,
                           T* split) {
  constexpr int L = Simd<T>::lanes;
  const int64_t pad = g.pad(), phase_width = g.phase_width(), phase_size = g.phase_size();
  // padded rows [oh0 * S, (oh0 + rows + halo) * S) hold this band's phase rows
  const int64_t ih_begin = g.first_input_row(oh0), ih_end = g.last_input_row(oh0, rows);
  zero_outside_rows<T, S>(g, oh0, ih_begin, ih_end, phases);
  // After a row's input in phase rx, its right padding and the next row's left padding: zero vectors
  // (the next row's input, copied later, overwrites those that reach into it).
  const PhaseColumns even(g.width, pad, S, pad % S), odd(g.width, pad, S, (pad + 1) % S);  // S = 1: even
  auto zero_gap = [phase_width](T* end, const PhaseColumns& c) __attribute__((always_inline)) {
    for (int64_t i = 0; i < phase_width - c.columns; i += L) Simd<T>::store(end + i, typename Simd<T>::vec{});
  };
  // stride 2, even width: column parity is flat-index parity, so a band of short rows splits in one
  // vector pass (short rows would not fill a vector) and are then copied row by row
  const int64_t half_width = g.width / 2;
  const bool split_band = S == 2 && g.width % 2 == 0 && g.width < 4 * L;
  const bool vector_rows = pad <= 2;  // padded_row's LEAD: 0 or 1
  if (split_band) deinterleave(x + (ih_begin - x_row0) * g.width, (ih_end - ih_begin) * g.width, split, split + g.split_size() / 2);
  for (int64_t ih = ih_begin; ih < ih_end; ++ih) {
    const int64_t row = ih + pad;
    T* dst = phases + (row % S) * S * phase_size + (row / S - oh0) * phase_width;
    const T* src = x + (ih - x_row0) * g.width;
    if (S == 1) {
      copy_run(dst + even.lead, src, g.width);
      zero_gap(dst + even.lead + even.columns, even);
      continue;
    }
    T* even_dst = dst + even.rx * phase_size + even.lead;
    T* odd_dst = dst + odd.rx * phase_size + odd.lead;
    zero_gap(even_dst + even.columns, even);
    zero_gap(odd_dst + odd.columns, odd);
    if (split_band) {
      const T* evens = split + (ih - ih_begin) * half_width;
      if (vector_rows) {
        // each phase row leads with its `lead` zeros, 0 or 1 for k <= 5
        const T* odds = evens + g.split_size() / 2;
        if (even.lead == 0) padded_row<T, 0>(even_dst, evens, half_width);
        else padded_row<T, 1>(even_dst - 1, evens, half_width);
        if (odd.lead == 0) padded_row<T, 0>(odd_dst, odds, half_width);
        else padded_row<T, 1>(odd_dst - 1, odds, half_width);
        continue;
      }
      copy_run(even_dst, evens, half_width);
      copy_run(odd_dst, evens + g.split_size() / 2, half_width);
    } else {
      deinterleave(src, g.width, even_dst, odd_dst);
    }
  }
}

// Output channels [co, co + CO) of a band whose phases are filled: CO at a time, so that each
// loaded vector of input feeds CO accumulators (the stem's 16 outputs had loaded every input
// vector 16 times). Each output goes through its own flat buffer in scratch.
template <typename T, int S, int K, int CO>
GK_INLINE void band_outputs(const T* phases, const T* w, const T* bias, Activation act, int64_t co, T* out,
                            const PlaneGeometry<T>& g, int64_t oh0, int64_t rows, T* flat) {
  using V = typename Simd<T>::vec;
  constexpr int L = Simd<T>::lanes;
  const int64_t phase_width = g.phase_width(), phase_size = g.phase_size(), k = K ? K : g.k, inputs = g.group_inputs;
  const int64_t flat_end = rows * phase_width, flat_size = g.flat_size();
  for (int64_t f0 = 0; f0 < flat_end; f0 += PlaneGeometry<T>::kVectorBlock) {
    V acc[CO][4];
    for (int c = 0; c < CO; ++c)
      for (int v = 0; v < 4; ++v) acc[c][v] = V{} + (bias ? bias[co + c] : T(0));
    for (int64_t ci = 0; ci < inputs; ++ci) {
      const T* input = phases + ci * S * S * phase_size + f0;
#pragma GCC unroll 5
      for (int64_t dy = 0; dy < k; ++dy) {
#pragma GCC unroll 5
        for (int64_t dx = 0; dx < k; ++dx) {
          const T* src = input + ((dy % S) * S + dx % S) * phase_size + (dy / S) * phase_width + dx / S;
          V xv[4];
          for (int v = 0; v < 4; ++v) xv[v] = Simd<T>::load(src + v * L);
          for (int c = 0; c < CO; ++c) {
            const T wt = w[((co + c) * inputs + ci) * k * k + dy * k + dx];
            for (int v = 0; v < 4; ++v) acc[c][v] += wt * xv[v];
          }
        }
      }
    }
    for (int c = 0; c < CO; ++c)
      for (int v = 0; v < 4; ++v) Simd<T>::store(flat + c * flat_size + f0 + v * L, activate_vector(acc[c][v], act));
  }
  // A row of at most two vectors is stored as whole vectors while they stay inside this band's
  // rows and the flat buffer: the lanes past it land on the band's next rows, stored after it.
  const int64_t out_width = g.out_width, span = (out_width + L - 1) / L * L;
  const bool vector_rows = span <= 2 * L;
  for (int c = 0; c < CO; ++c) {
    T* plane = out + (co + c) * g.out_height * out_width + oh0 * out_width;
    const T* rows_c = flat + c * flat_size;
    for (int64_t r = 0; r < rows; ++r) {
      T* dst = plane + r * out_width;
      const T* src = rows_c + r * phase_width;
      if (vector_rows && r * out_width + span <= rows * out_width && r * phase_width + span <= flat_size) {
        Simd<T>::store(dst, Simd<T>::load(src));
        if (span > L) Simd<T>::store(dst + L, Simd<T>::load(src + L));
      } else {
        copy_run(dst, src, out_width);
      }
    }
  }
}

// One group's band of output rows [oh0, oh0 + band_rows): x holds the group's group_inputs
// input planes from row x_row0 on, w its (outputs, group_inputs, k, k) weights, out its
// `outputs` output planes. K: k as a compile-time constant (the tap loops unroll and their
// offsets fold: the stem's 3x3 conv spent a third of its time computing them), or 0.
template <typename T, int S, int K>
GK_INLINE void conv_band_k(const T* x, int64_t x_row0, const T* w, const T* bias, Activation act, int64_t outputs,
                           T* out, const PlaneGeometry<T>& g, int64_t oh0, T* scratch) {
  const int64_t rows = g.rows_in_band(oh0);
  T* flat = scratch + g.phases_size();
  T* split = flat + PlaneGeometry<T>::kOutputBlock * g.flat_size();
  for (int64_t ci = 0; ci < g.group_inputs; ++ci)
    fill_phases<T, S>(x + ci * g.height * g.width, x_row0, g, oh0, rows, scratch + ci * S * S * g.phase_size(), split);
  constexpr int CO = PlaneGeometry<T>::kOutputBlock;
  int64_t co = 0;
  for (; co + CO <= outputs; co += CO) band_outputs<T, S, K, CO>(scratch, w, bias, act, co, out, g, oh0, rows, flat);
  for (; co < outputs; ++co) band_outputs<T, S, K, 1>(scratch, w, bias, act, co, out, g, oh0, rows, flat);
}

template <typename T, int S>
GK_INLINE void conv_band(const T* x, int64_t x_row0, const T* w, const T* bias, Activation act, int64_t outputs,
                         T* out, const PlaneGeometry<T>& g, int64_t oh0, T* scratch) {
  // float64 is for checking, not speed: one instantiation with k at run time compiles faster.
  if constexpr (std::is_same_v<T, double>)
    return conv_band_k<T, S, 0>(x, x_row0, w, bias, act, outputs, out, g, oh0, scratch);
  switch (g.k) {  // GhostNet's stem and depthwise convs are 3x3 and 5x5
    case 3: return conv_band_k<T, S, 3>(x, x_row0, w, bias, act, outputs, out, g, oh0, scratch);
    case 5: return conv_band_k<T, S, 5>(x, x_row0, w, bias, act, outputs, out, g, oh0, scratch);
    default: return conv_band_k<T, S, 0>(x, x_row0, w, bias, act, outputs, out, g, oh0, scratch);
  }
}

}  // namespace ghostkernels
