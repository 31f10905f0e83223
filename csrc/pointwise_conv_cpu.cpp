// ghostkernels::pointwise_conv2d on the CPU: a 1x1 stride-1 conv (+bias) of an NCHW map as one
// batched GEMM, out[n] = W x[n] + b (MKL), into an output from the output cache. oneDNN's NCHW
// 1x1 conv reorders its input and weight on every call; ATen's baddbmm writes a fresh tensor
// that page-faults at batch 8 (GhostNet's shortcuts and blocks.9 conv).

#include <ATen/ATen.h>
#include <torch/library.h>

#include "output_pool.h"

namespace ghostkernels {
namespace {

at::Tensor pointwise_conv2d_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 4, "pointwise_conv2d: x must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == x.size(1) && weight.size(2) == 1 && weight.size(3) == 1,
              "pointwise_conv2d: weight must be (C_out, ", x.size(1), ", 1, 1), got ", weight.sizes());
  // With no input channels F.conv2d (the other path) returns no output channels and the GEMM C_out of bias.
  TORCH_CHECK(x.size(1) > 0, "pointwise_conv2d: x must have at least one channel, got ", x.sizes());
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == weight.size(0)),
              "pointwise_conv2d: bias must have shape (", weight.size(0), ",)");
  const bool fast = x.is_contiguous() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble);
  if (!fast) return at::conv2d(x, weight, bias);
  const int64_t batch = x.size(0), inputs = x.size(1), outputs = weight.size(0), pixels = x.size(2) * x.size(3);
  at::Tensor out = empty_output({batch, outputs, x.size(2), x.size(3)}, x.options());
  if (out.numel() == 0) return out;
  const at::Tensor w = weight.reshape({1, outputs, inputs}).expand({batch, outputs, inputs});
  at::Tensor flat = out.view({batch, outputs, pixels});
  const at::Tensor xs = x.view({batch, inputs, pixels});
  if (bias.has_value()) at::baddbmm_out(flat, bias->view({1, outputs, 1}).expand({batch, outputs, pixels}), w, xs);
  else at::bmm_out(flat, w, xs);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ghostkernels, CPU, m) { m.impl("pointwise_conv2d", &pointwise_conv2d_cpu); }

}  // namespace ghostkernels
