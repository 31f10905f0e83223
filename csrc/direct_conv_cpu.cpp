// Direct k x k 'same' conv (+bias), stride 1 or 2, NCHW float32/float64, for the convs whose
// groups read at most kMaxGroupInputs channels: the depthwise `conv_dw` and shortcut convs of
// GhostNet bottlenecks after BN folding, and the 3-channel stem. oneDNN reorders such NCHW
// inputs into blocked layouts on every call, which costs more than the conv. Here each input
// plane is copied once per band of rows, zero-padded and (stride 2) split into its four
// row/column parity phases, so that every tap is one contiguous vector loop. Other convs,
// layouts and dtypes go to at::conv2d.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "direct_conv.h"
#include "multiversion.h"
#include "output_pool.h"

namespace ghostkernels {
namespace {

// Work items [begin, end) of (image, group, band of output rows).
template <typename T>
GK_MULTIVERSION void conv_items(const T* x, const T* w, const T* bias, T* out, const PlaneGeometry<T>& g,
                                int64_t channels, int64_t groups, int64_t out_channels, int64_t begin, int64_t end) {
  const int64_t group_outputs = out_channels / groups, k = g.k;
  const int64_t bands = g.bands();
  std::vector<T> scratch(g.scratch_size());
  for (int64_t item = begin; item < end; ++item) {
    const int64_t band = item % bands, group = item / bands % groups, n = item / bands / groups;
    const T* xs = x + (n * channels + group * g.group_inputs) * g.height * g.width;
    const T* ws = w + group * group_outputs * g.group_inputs * k * k;
    const T* bs = bias ? bias + group * group_outputs : nullptr;
    T* os = out + (n * out_channels + group * group_outputs) * g.out_height * g.out_width;
    const int64_t oh0 = band * g.band_rows();
    if (g.stride == 1)
      conv_band<T, 1>(xs, 0, ws, bs, group_outputs, os, g, oh0, scratch.data());
    else
      conv_band<T, 2>(xs, 0, ws, bs, group_outputs, os, g, oh0, scratch.data());
  }
}

// Groups reading more input channels than this go to at::conv2d (oneDNN's GEMM-based conv).
constexpr int64_t kMaxGroupInputs = 4;

at::Tensor direct_conv2d_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                             int64_t stride) {
  TORCH_CHECK(x.dim() == 4, "direct_conv2d: x must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  TORCH_CHECK(x.size(1) > 0, "direct_conv2d: x must have at least one channel, got ", x.sizes());
  // F.conv2d rejects an empty plane too (its padded size is smaller than the kernel).
  TORCH_CHECK(x.size(2) > 0 && x.size(3) > 0, "direct_conv2d: x must have H, W >= 1, got ", x.sizes());
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) > 0 && x.size(1) % weight.size(1) == 0 &&
                  weight.size(0) % (x.size(1) / weight.size(1)) == 0 && weight.size(2) == weight.size(3) &&
                  weight.size(2) % 2 == 1,
              "direct_conv2d: weight must be (C_out, C / groups, k, k) with odd k, C_out divisible by groups; got ",
              weight.sizes(), " for x with ", x.size(1), " channels");
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == weight.size(0)),
              "direct_conv2d: bias must have shape (", weight.size(0), ",), got ", bias->sizes());
  TORCH_CHECK(stride == 1 || stride == 2, "direct_conv2d: stride must be 1 or 2, got ", stride);
  const int64_t k = weight.size(2), group_inputs = weight.size(1), groups = x.size(1) / group_inputs;
  const bool fast = x.is_contiguous() && group_inputs <= kMaxGroupInputs &&
                    (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble) &&
                    weight.scalar_type() == x.scalar_type() && (!bias.has_value() || bias->scalar_type() == x.scalar_type());
  // NCHW-contiguous like every other path and the fake kernel (torch.compile trusts its strides).
  if (!fast) return at::conv2d(x, weight, bias, {stride, stride}, {k / 2, k / 2}, {1, 1}, groups).contiguous();
  const int64_t batch = x.size(0), channels = x.size(1), height = x.size(2), width = x.size(3);
  const int64_t out_channels = weight.size(0);
  // 'same' padding: ceil(H / stride) rows
  const int64_t out_height = (height + stride - 1) / stride, out_width = (width + stride - 1) / stride;
  at::Tensor out = empty_output({batch, out_channels, out_height, out_width}, x.options());
  if (out.numel() == 0) return out;
  const at::Tensor w = weight.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "direct_conv2d_cpu", [&] {
    const PlaneGeometry<scalar_t> geometry{height, width, k, stride, out_height, out_width, group_inputs};
    // work items: (image, group, band of output rows)
    at::parallel_for(0, batch * groups * geometry.bands(), 1, [&](int64_t begin, int64_t end) {
      conv_items(x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), b.defined() ? b.data_ptr<scalar_t>() : nullptr,
                 out.data_ptr<scalar_t>(), geometry, channels, groups, out_channels, begin, end);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ghostkernels, CPU, m) { m.impl("direct_conv2d", &direct_conv2d_cpu); }

}  // namespace ghostkernels
