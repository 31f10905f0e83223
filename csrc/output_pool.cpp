#include "output_pool.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/impl/alloc_cpu.h>

#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "ops.h"

namespace ghostkernels {
namespace {

// Smaller blocks come straight from c10's CPU allocation: glibc keeps them in its heap.
constexpr size_t kMinPooled = 256 * 1024;
constexpr size_t kGranule = 64 * 1024;
// A pooled block's size sits in a header before its data; 64 bytes keep c10's alignment.
constexpr size_t kHeader = 64;
constexpr size_t kDefaultLimitMB = 1024;

// GHOSTKERNELS_OUTPUT_CACHE_MB in bytes: a whole number of MiB, 0 turning the cache off. A typo
// or a negative number warns and keeps the default: parsed as is, it would turn the cache off
// ("abc", "1O24" as 0 or 1) or lift its cap ("-1" as 2^64 - 1).
size_t cache_limit() {
  const char* value = std::getenv("GHOSTKERNELS_OUTPUT_CACHE_MB");
  if (value == nullptr) return kDefaultLimitMB << 20;
  char* end = nullptr;
  errno = 0;
  const long long mb = std::strtoll(value, &end, 10);
  if (end != value && *end == '\0' && errno == 0 && mb >= 0 &&
      static_cast<unsigned long long>(mb) <= (SIZE_MAX >> 20))
    return static_cast<size_t>(mb) << 20;
  TORCH_WARN("ghostkernels: GHOSTKERNELS_OUTPUT_CACHE_MB='", value,
             "' is not a whole number of MiB >= 0 (0 turns the output cache off); using the default, ",
             kDefaultLimitMB, " MiB");
  return kDefaultLimitMB << 20;
}

class OutputPool final : public c10::Allocator {
 public:
  OutputPool() : limit_(cache_limit()) {}

  c10::DataPtr allocate(size_t nbytes) override {
    const c10::Device cpu(c10::kCPU);
    if (nbytes < kMinPooled || limit_ == 0) {
      void* data = c10::alloc_cpu(nbytes);
      return {data, data, &c10::free_cpu, cpu};
    }
    const size_t block = (nbytes + kGranule - 1) / kGranule * kGranule;
    void* base = take(block);
    if (base == nullptr) {
      base = c10::alloc_cpu(block + kHeader);
      std::memcpy(base, &block, sizeof(block));
    }
    return {static_cast<char*>(base) + kHeader, base, &release, cpu};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  int64_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return static_cast<int64_t>(cached_);
  }

  // Frees every cached block; returns the bytes freed.
  int64_t clear() {
    std::unordered_map<size_t, std::vector<void*>> blocks;
    size_t freed;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      blocks.swap(free_);
      freed = cached_;
      cached_ = 0;
    }
    for (auto& entry : blocks)
      for (void* base : entry.second) c10::free_cpu(base);
    return static_cast<int64_t>(freed);
  }

 private:
  void* take(size_t block) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto found = free_.find(block);
    if (found == free_.end() || found->second.empty()) return nullptr;
    void* base = found->second.back();
    found->second.pop_back();
    cached_ -= block;
    return base;
  }

  static void release(void* base);

  void give_back(void* base) {
    size_t block;
    std::memcpy(&block, base, sizeof(block));
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (cached_ + block <= limit_) {
        free_[block].push_back(base);
        cached_ += block;
        return;
      }
    }
    c10::free_cpu(base);
  }

  std::mutex mutex_;
  std::unordered_map<size_t, std::vector<void*>> free_;
  size_t cached_ = 0;
  const size_t limit_;
};

// Never destroyed: tensors may still be freed during interpreter shutdown.
OutputPool& pool() {
  static OutputPool* instance = new OutputPool();
  return *instance;
}

void OutputPool::release(void* base) { pool().give_back(base); }

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options, at::MemoryFormat memory_format) {
  return at::detail::empty_generic(sizes, &pool(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   options.dtype().toScalarType(), memory_format);
}

int64_t output_cache_bytes() { return pool().cached_bytes(); }

int64_t empty_output_cache() { return pool().clear(); }

}  // namespace ghostkernels
