// Per-thread working memory of the CPU kernels, kept from call to call and never zero-filled.
// The kernels' band buffers were std::vectors: allocated, zero-filled and freed by every thread
// on every call, 5% of GhostNet 1.0x's batch-1 forward in memset alone (perf, 2 threads).
// A kernel takes all its buffers of one thread's work in one Scratch; a thread holds at most one
// at a time (checked). What a buffer held before is undefined: kernels write before they read.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <vector>

namespace ghostkernels {

class Scratch {
 public:
  Scratch() {
    TORCH_INTERNAL_ASSERT(!arena().held, "ghostkernels: a thread took two Scratch leases at once");
    arena().held = true;
  }
  ~Scratch() {
    Arena& a = arena();
    // Buffers that did not fit went to blocks of their own; next time one block holds them all.
    if (!a.overflow.empty()) {
      a.overflow.clear();
      a.block.reset(static_cast<char*>(std::aligned_alloc(kAlign, used_)));
      a.capacity = a.block ? used_ : 0;  // out of memory: the next take() reports it
    }
    a.held = false;
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;

  // `count` elements of T, 64-byte aligned, contents undefined, valid while this Scratch lives.
  template <typename T>
  T* take(int64_t count) {
    const size_t bytes = (size_t(count) * sizeof(T) + kAlign - 1) / kAlign * kAlign;
    Arena& a = arena();
    char* p;
    if (used_ + bytes <= a.capacity) {
      p = a.block.get() + used_;
    } else {
      a.overflow.emplace_back(static_cast<char*>(std::aligned_alloc(kAlign, bytes ? bytes : kAlign)));
      p = a.overflow.back().get();
      TORCH_CHECK(p != nullptr, "ghostkernels: out of memory for ", bytes, " bytes of kernel scratch");
    }
    used_ += bytes;
    return reinterpret_cast<T*>(p);
  }

 private:
  static constexpr size_t kAlign = 64;
  struct Free {
    void operator()(char* p) const { std::free(p); }
  };
  struct Arena {
    std::unique_ptr<char, Free> block;
    size_t capacity = 0;
    std::vector<std::unique_ptr<char, Free>> overflow;
    bool held = false;
  };
  static Arena& arena() {
    static thread_local Arena a;
    return a;
  }
  size_t used_ = 0;
};

}  // namespace ghostkernels
