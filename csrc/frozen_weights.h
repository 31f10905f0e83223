// bfloat16 copies of frozen graphs' float32 weights, for the bfloat16 mode (amx_gemm.h's switch).
// freeze() snapshots a model's weights into constants that nothing else holds and marks them
// here: they never change, so a copy made at a weight's first use stays right for its life.
// Other weights are read in float32: a cache of them could go stale (writes through .data bump
// no version counter).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace ghostkernels {

// The bfloat16 bits (round to nearest even) of `weight` when freeze() marked it: a contiguous
// float32 CPU tensor of a frozen graph. nullptr for any other tensor. The copy lives as long as
// the weight.
const uint16_t* frozen_bf16_copy(const at::Tensor& weight);

}  // namespace ghostkernels
