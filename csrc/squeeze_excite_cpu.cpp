// ghostkernels::squeeze_excite_gate on the CPU: GhostNet's SE gate
//   hard_sigmoid(W_expand relu(W_reduce mean_hw(x) + b_reduce) + b_expand), (N, C, 1, 1),
// in one call. In ATen it is about fifteen small ops (mean, two 1x1 convs as GEMVs, relu,
// relu6, add, div, views), which at batch 1 cost more than the Ghost op that reads the gate.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "multiversion.h"

namespace ghostkernels {
namespace {

// Work per parallel chunk, in multiply-adds: smaller calls run on one thread.
constexpr int64_t kGrainWork = 32 * 1024;

template <typename T>
GK_INLINE T dot(const T* a, const T* b, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

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

// out[n][o] = f(w[o] . in[n] + b[o]) for rows n * outputs + o in [begin, end); f is relu
// (hard_sigmoid = false) or hard_sigmoid, relu6(v + 3) / 6 as GhostNet defines it.
template <typename T>
GK_MULTIVERSION void dense_rows(const T* in, const T* w, const T* b, int64_t inputs, int64_t outputs,
                                bool hard_sigmoid, T* out, int64_t begin, int64_t end) {
  for (int64_t row = begin; row < end; ++row) {
    const int64_t n = row / outputs, o = row % outputs;
    const T v = dot(w + o * inputs, in + n * inputs, inputs) + (b ? b[o] : T(0));
    out[row] = hard_sigmoid ? std::min(std::max(v + T(3), T(0)), T(6)) / T(6) : std::max(v, T(0));
  }
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
  if (x.scalar_type() != at::kFloat && x.scalar_type() != at::kDouble) {
    const at::Tensor hidden = at::relu(at::conv2d(x.mean({2, 3}, true), w_reduce, b_reduce));
    return at::clamp(at::conv2d(hidden, w_expand, b_expand) + 3, 0, 6) / 6;
  }
  // NCHW planes are pooled here; channels_last goes through ATen's reduction.
  const bool planes = x.is_contiguous();
  const at::Tensor means = planes ? at::empty({batch, channels}, x.options()) : x.mean({2, 3}).contiguous();
  at::Tensor hidden = at::empty({batch, reduced}, x.options());
  at::Tensor gate = at::empty({batch, channels, 1, 1}, x.options());
  const at::Tensor wr = w_reduce.contiguous(), we = w_expand.contiguous();
  const at::Tensor br = b_reduce.has_value() ? b_reduce->contiguous() : at::Tensor();
  const at::Tensor be = b_expand.has_value() ? b_expand->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "squeeze_excite_gate_cpu", [&] {
    const int64_t size = x.size(2) * x.size(3);
    scalar_t* m = means.data_ptr<scalar_t>();
    if (planes)
      at::parallel_for(0, batch * channels, std::max<int64_t>(1, kGrainWork / size), [&](int64_t begin, int64_t end) {
        plane_means(x.data_ptr<scalar_t>(), size, m, begin, end);
      });
    scalar_t* h = hidden.data_ptr<scalar_t>();
    at::parallel_for(0, batch * reduced, std::max<int64_t>(1, kGrainWork / channels), [&](int64_t begin, int64_t end) {
      dense_rows(m, wr.data_ptr<scalar_t>(), br.defined() ? br.data_ptr<scalar_t>() : nullptr, channels, reduced,
                 false, h, begin, end);
    });
    at::parallel_for(0, batch * channels, std::max<int64_t>(1, kGrainWork / reduced), [&](int64_t begin, int64_t end) {
      dense_rows(h, we.data_ptr<scalar_t>(), be.defined() ? be.data_ptr<scalar_t>() : nullptr, reduced, channels,
                 true, gate.data_ptr<scalar_t>(), begin, end);
    });
  });
  return gate;
}

}  // namespace

TORCH_LIBRARY_IMPL(ghostkernels, CPU, m) { m.impl("squeeze_excite_gate", &squeeze_excite_gate_cpu); }

}  // namespace ghostkernels
