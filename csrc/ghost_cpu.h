// What the Ghost module's inference kernels (ghost_cpu.cpp) and its backward
// (ghost_backward_cpu.cpp) share: how a call is cut into work items, the argument checks that
// describe its geometry, and small layout helpers. Two translation units, so that the build
// compiles them on two cores (ghost_cpu.cpp alone took 6.5 minutes, the longest of the build).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "ghost_common.h"

namespace ghostkernels {

// How the work is cut: bands of `rows` output rows, groups of `group` intrinsic channels.
struct Tiling {
  int64_t rows, bands, group, groups;
};

// budget: bytes of buffers per work item. Measured on a 2 MiB-L2 core: 512 KiB for the
// forward, 1 MiB for the backward (fewer bands there, so less halo work).
// items_per_thread: the least work items per thread. The forward asks for one: at batch 1 two
// halved the channel groups once more, into GEMMs of 10-20 rows that each read all of x
// (GhostNet 1.0x's ghost2 modules at 28x28 to 7x7 ran 7-30% slower, 2 threads, alternating in
// one process); the backward asks for two (3% faster at 24x56x56 than one).
Tiling choose_tiling(const Geometry& g, size_t elem_size, bool split_channels, int64_t budget,
                     int64_t items_per_thread);

// The geometry of a call, or a TORCH_CHECK error that names the bad argument.
Geometry check_and_describe(const at::Tensor& x, const at::Tensor& w1, const c10::optional<at::Tensor>& b1,
                            const at::Tensor& w2, const c10::optional<at::Tensor>& b2,
                            int64_t out_channels, int64_t stride, c10::string_view activation);

inline at::MemoryFormat memory_format(const Geometry& g) {
  return g.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// rows x cols -> cols x rows (float32 and float64; ghost_cpu.cpp)
template <typename T>
std::vector<T> transposed(const T* src, int64_t rows, int64_t cols);

}  // namespace ghostkernels
