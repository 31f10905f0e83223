// bfloat16 copies of frozen graphs' float32 weights, for the bfloat16 mode (bf16_gemm.h's switch).
// freeze() snapshots a model's weights into constants that nothing else holds and marks them
// here: they never change, so a copy made at a weight's first use stays right for its life.
// Other weights are read in float32: a cache of them could go stale (writes through .data bump
// no version counter).
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>

namespace ghostkernels {

// A frozen weight's rows (dimension 0; the rest flattened, K elements) as bfloat16 bits (round
// to nearest even), each row zero-padded to ld, a multiple of 32, and 16 zero rows after the
// last: the layout AMX tiles read whole and dot products read as pairs (bf16_gemm.h). data is
// nullptr when there is no copy.
// Elements per row of that layout for rows of k elements (at least one row's worth: 32).
inline int64_t bf16_row_length(int64_t k) { return (std::max<int64_t>(k, 1) + 31) / 32 * 32; }

struct Bf16Rows {
  const uint16_t* data = nullptr;
  int64_t ld = 0;
  // Where row r starts, or nullptr when there is no copy.
  const uint16_t* row(int64_t r) const { return data ? data + r * ld : nullptr; }
};

// The bfloat16 copy of `weight` when freeze() marked it (a contiguous float32 CPU tensor of a
// frozen graph), made at the first call; no copy for any other tensor. It lives as long as the
// weight.
Bf16Rows frozen_bf16_rows(const at::Tensor& weight);

}  // namespace ghostkernels
