// ghostkernels::squeeze_excite_gate on the CPU: GhostNet's SE gate
//   hard_sigmoid(W_expand relu(W_reduce mean_hw(x) + b_reduce) + b_expand), (N, C, 1, 1),
// in one call. From Python it is about fifteen small ops (mean, two 1x1 convs as GEMVs, relu,
// relu6, add, div, views), which at batch 1 cost more than the Ghost op that reads the gate;
// here the pooling is one pass and the two GEMMs go to MKL.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "multiversion.h"

namespace ghostkernels {
namespace {

// Elements pooled per parallel chunk: smaller calls run on one thread.
constexpr int64_t kGrainWork = 32 * 1024;

// means[p] = mean of plane p (of `size` elements) for p in [begin, end).
template <typename T>
GK_MULTIVERSION void plane_means(const T* x, int64_t size, T* means, int64_t begin, int64_t end) {
  for (int64_t p = begin; p < end; ++p) {
    const T* plane = x + p * size;
    T s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < size; ++i) s += plane[i];
    means[p] = s / T(size);
  }
}

// W x + b for the rows of x (N, inputs) and a 1x1 conv's (outputs, inputs, 1, 1) weight: MKL's GEMM.
at::Tensor dense(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  const at::Tensor w = weight.reshape({weight.size(0), weight.size(1)}).t();
  return bias.defined() ? at::addmm(bias, x, w) : at::mm(x, w);
}

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
    return at::clamp(at::conv2d(hidden, w_expand, b_expand) + 3, 0, 6) / 6;
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
  const at::Tensor gate = dense(dense(means, w_reduce, br).relu_(), w_expand, be);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "squeeze_excite_gate_cpu", [&] {
    scalar_t* g = gate.data_ptr<scalar_t>();
    for (int64_t i = 0; i < gate.numel(); ++i)
      g[i] = std::min(std::max(g[i] + scalar_t(3), scalar_t(0)), scalar_t(6)) / scalar_t(6);
  });
  return gate.view({batch, channels, 1, 1});
}

}  // namespace

TORCH_LIBRARY_IMPL(ghostkernels, CPU, m) { m.impl("squeeze_excite_gate", &squeeze_excite_gate_cpu); }

}  // namespace ghostkernels
