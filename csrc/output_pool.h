// Output tensors of the fused CPU kernels come from a cache of freed blocks, keyed by size.
// A forward pass allocates the same large outputs every call; from glibc they are fresh
// mmap'd or trimmed pages that the kernel zero-fills on first touch, which at batch 8 costs
// as much as the kernels' own work. ONNX Runtime avoids it with an arena, CUDA PyTorch with
// its caching allocator. GHOSTKERNELS_OUTPUT_CACHE_MB caps the cached bytes (whole MiB, 0 disables;
// any other value warns and keeps the default, 1024).
#pragma once

#include <ATen/core/Tensor.h>

namespace ghostkernels {

// at::empty(sizes, options.memory_format(memory_format)) on a CPU tensor, from the cache.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options,
                        at::MemoryFormat memory_format = at::MemoryFormat::Contiguous);

}  // namespace ghostkernels
