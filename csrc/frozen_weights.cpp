// The registry of frozen weights and their bfloat16 copies (frozen_weights.h).
#include "frozen_weights.h"

#include <ATen/ops/zeros.h>

#include <iterator>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "ops.h"

namespace ghostkernels {
namespace {

struct Entry {
  // Holds the weight's TensorImpl allocated (not its data) while the entry lives, so that the
  // key, its address, cannot come to name another tensor; expired once the weight is gone.
  c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> weight;
  at::Tensor bf16;  // made at the first lookup
};

std::mutex registry_mutex;
std::unordered_map<const c10::TensorImpl*, Entry> registry;

}  // namespace

void mark_frozen_weights(const std::vector<at::Tensor>& weights) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  for (auto it = registry.begin(); it != registry.end();)
    it = it->second.weight.expired() ? registry.erase(it) : std::next(it);
  for (const at::Tensor& w : weights)
    if (w.defined() && w.device().is_cpu() && w.scalar_type() == at::kFloat && w.is_contiguous() && w.dim() > 0 &&
        w.numel() > 0)
      registry.try_emplace(w.unsafeGetTensorImpl(), Entry{decltype(Entry::weight)(w.getIntrusivePtr()), {}});
}

// The marked weights alive now and the bytes of their bfloat16 copies.
std::tuple<int64_t, int64_t> frozen_weights_status() {
  std::lock_guard<std::mutex> lock(registry_mutex);
  int64_t alive = 0, bytes = 0;
  for (const auto& [impl, entry] : registry) {
    if (entry.weight.expired()) continue;
    ++alive;
    if (entry.bf16.defined()) bytes += entry.bf16.nbytes();
  }
  return {alive, bytes};
}

Bf16Rows frozen_bf16_rows(const at::Tensor& weight) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  const auto it = registry.find(weight.unsafeGetTensorImpl());
  if (it == registry.end()) return {};
  const int64_t rows = weight.size(0), k = weight.numel() / rows, ld = bf16_row_length(k);
  at::Tensor& copy = it->second.bf16;
  if (!copy.defined()) {
    c10::InferenceMode guard;  // a copy that autograd never tracks
    copy = at::zeros({rows + 16, ld}, weight.options().dtype(at::kBFloat16));
    copy.narrow(0, 0, rows).narrow(1, 0, k).copy_(weight.reshape({rows, k}));
  }
  return {reinterpret_cast<const uint16_t*>(copy.data_ptr<at::BFloat16>()), ld};
}

}  // namespace ghostkernels
