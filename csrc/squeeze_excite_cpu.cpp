// ghostkernels::squeeze_excite_gate on the CPU: GhostNet's SE gate
//   hard_sigmoid(W_expand relu(W_reduce mean_hw(x) + b_reduce) + b_expand), (N, C, 1, 1),
// in one call. From Python it is about fifteen small ops (mean, two 1x1 convs as GEMVs, relu,
// relu6, add, div, views), which at batch 1 cost more than the Ghost op that reads the gate;
// here the pooling is one pass and each 1x1 conv one pass over its weight with its activation.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/conv2d.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/relu.h>

#include <algorithm>
#include <type_traits>

#include "bf16_gemm.h"
#include "gemm.h"
#include "isa.h"
#include "ops.h"

namespace ghostkernels {
namespace {

// Elements pooled, or multiply-adds, per parallel chunk: smaller calls run on one thread.
constexpr int64_t kGrainWork = 32 * 1024;

// means[p] = mean of plane p (of `size` elements) for p in [begin, end).
template <typename T>
void plane_means(const T* x, int64_t size, T* means, int64_t begin, int64_t end) {
  for (int64_t p = begin; p < end; ++p) {
    const T* plane = x + p * size;
    T s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < size; ++i) s += plane[i];
    means[p] = s / T(size);
  }
}

enum class Finish { ReLU, HardSigmoid };

// One 1x1 conv on the pooled (batch, inputs) means, as dot_rows (gemm.h): each row of the weight
// read from memory once for all images (MKL's addmm took ~28 us for each of GhostNet's 960x240
// ones at batch 1, plus a copy of the bias), both threads taking rows of the weight when there is
// enough of it to share; a frozen graph's weight read as its bfloat16 copy in the bfloat16 mode
// (with_gemv_rows).
template <typename T>
void dense(const T* x, int64_t batch, int64_t inputs, const at::Tensor& weight, const at::Tensor& bias,
           Finish finish, T* out) {
  const int64_t outputs = weight.size(0);
  if (batch == 0) return;
  const T* b = bias.defined() ? bias.data_ptr<T>() : nullptr;
  // std::max(v, 0) keeps NaN (as relu and the composed gate do)
  const auto activate = [b, finish](int64_t o, T sum) {
    sum += b ? b[o] : T(0);
    return finish == Finish::ReLU ? std::max(sum, T(0)) : std::min(std::max(sum + T(3), T(0)), T(6)) / T(6);
  };
  with_gemv_rows<T>(weight, inputs, [&](const auto* w, int64_t ld) {
    at::parallel_for(0, outputs, std::max<int64_t>(1, kGrainWork / (inputs * batch)), [&](int64_t begin, int64_t end) {
      dot_rows(batch, inputs, outputs, x, w, ld, out, begin, end, activate);
    });
  });
}

}  // namespace

at::Tensor squeeze_excite_gate_cpu(const at::Tensor& x, const at::Tensor& w_reduce,
                                   const c10::optional<at::Tensor>& b_reduce, const at::Tensor& w_expand,
                                   const c10::optional<at::Tensor>& b_expand) {
  TORCH_CHECK(x.dim() == 4, "squeeze_excite_gate: x must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  const int64_t batch = x.size(0), channels = x.size(1), reduced = w_reduce.size(0);
  TORCH_CHECK(w_reduce.dim() == 4 && w_reduce.size(1) == channels && w_reduce.size(2) == 1 && w_reduce.size(3) == 1,
              "squeeze_excite_gate: reduce_weight must be (R, ", channels, ", 1, 1), got ", w_reduce.sizes());
  TORCH_CHECK(w_expand.dim() == 4 && w_expand.size(0) == channels && w_expand.size(1) == reduced &&
                  w_expand.size(2) == 1 && w_expand.size(3) == 1,
              "squeeze_excite_gate: expand_weight must be (", channels, ", ", reduced, ", 1, 1), got ",
              w_expand.sizes());
  TORCH_CHECK(!b_reduce.has_value() || (b_reduce->dim() == 1 && b_reduce->size(0) == reduced),
              "squeeze_excite_gate: reduce_bias must have shape (", reduced, ",)");
  TORCH_CHECK(!b_expand.has_value() || (b_expand->dim() == 1 && b_expand->size(0) == channels),
              "squeeze_excite_gate: expand_bias must have shape (", channels, ",)");
  for (const c10::optional<at::Tensor>& t : {c10::optional<at::Tensor>(w_reduce), b_reduce,
                                              c10::optional<at::Tensor>(w_expand), b_expand})
    TORCH_CHECK(!t.has_value() || (t->scalar_type() == x.scalar_type() && t->device() == x.device()),
                "squeeze_excite_gate: weights and biases must match x's dtype and device (", x.scalar_type(), ", ",
                x.device(), ")");
  TORCH_CHECK(x.size(2) * x.size(3) > 0, "squeeze_excite_gate: x has no pixels to pool (", x.sizes(), ")");
  // As the composed gate's F.conv2d: no convs of or into zero channels.
  TORCH_CHECK(channels > 0 && reduced > 0, "squeeze_excite_gate: x and reduce_weight must have at least one ",
              "channel each, got x ", x.sizes(), " and reduce_weight ", w_reduce.sizes());
  if (x.scalar_type() != at::kFloat && x.scalar_type() != at::kDouble) {
    const at::Tensor hidden = at::relu(at::conv2d(x.mean({2, 3}, true), w_reduce, b_reduce));
    return at::conv2d(hidden, w_expand, b_expand).add(3).clamp(0, 6).div(6);
  }
  // NCHW planes are pooled here; channels_last goes through ATen's reduction.
  const bool planes = x.is_contiguous();
  const at::Tensor means = planes ? at::empty({batch, channels}, x.options()) : x.mean({2, 3}).contiguous();
  const at::Tensor br = b_reduce.has_value() ? b_reduce->contiguous() : at::Tensor();
  const at::Tensor be = b_expand.has_value() ? b_expand->contiguous() : at::Tensor();
  if (planes)
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "squeeze_excite_gate_cpu", [&] {
      const int64_t size = x.size(2) * x.size(3);
      at::parallel_for(0, batch * channels, std::max<int64_t>(1, kGrainWork / size), [&](int64_t begin, int64_t end) {
        plane_means(x.data_ptr<scalar_t>(), size, means.data_ptr<scalar_t>(), begin, end);
      });
    });
  const at::Tensor hidden = at::empty({batch, reduced}, x.options());
  const at::Tensor gate = at::empty({batch, channels, 1, 1}, x.options());
  const at::Tensor wr = w_reduce.contiguous(), we = w_expand.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "squeeze_excite_gate_cpu", [&] {
    dense(means.data_ptr<scalar_t>(), batch, channels, wr, br, Finish::ReLU, hidden.data_ptr<scalar_t>());
    dense(hidden.data_ptr<scalar_t>(), batch, reduced, we, be, Finish::HardSigmoid, gate.data_ptr<scalar_t>());
  });
  return gate;
}

}  // namespace ghostkernels
