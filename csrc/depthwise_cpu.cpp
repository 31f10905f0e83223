// Depthwise k x k conv (+bias), stride 1 or 2, 'same' padding, NCHW float32/float64: the
// stride-2 `conv_dw` and shortcut convs of GhostNet bottlenecks after BN folding. oneDNN
// reorders NCHW depthwise inputs into blocked layouts on every call, which costs more than
// the conv; this reads each input row once per tap row instead. Other layouts and dtypes
// go to at::conv2d.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "multiversion.h"

namespace ghostkernels {
namespace {

// One (image, channel) plane: out[oh][ow] = bias + sum w[dy][dx] x[oh * S + dy - p][ow * S + dx - p].
template <typename T, int S>
GK_MULTIVERSION void depthwise_plane(const T* x, int64_t height, int64_t width, const T* w, int64_t k, T bias,
                                     T* out, int64_t out_height, int64_t out_width) {
  const int64_t pad = k / 2;
  for (int64_t oh = 0; oh < out_height; ++oh) {
    T* o = out + oh * out_width;
    std::fill(o, o + out_width, bias);
    for (int64_t dy = 0; dy < k; ++dy) {
      const int64_t ih = oh * S + dy - pad;
      if (ih < 0 || ih >= height) continue;
      const T* row = x + ih * width;
      for (int64_t dx = 0; dx < k; ++dx) {
        const T wt = w[dy * k + dx];
        // valid ow: 0 <= ow * S + dx - pad < width (numerators can be negative: no truncation)
        const int64_t lo = std::max<int64_t>(0, (pad - dx + S - 1) / S);
        const int64_t last = width - 1 + pad - dx;
        const int64_t hi = last < 0 ? 0 : std::min<int64_t>(out_width, last / S + 1);
        const T* src = row + dx - pad;
#pragma omp simd
        for (int64_t ow = lo; ow < hi; ++ow) o[ow] += wt * src[ow * S];
      }
    }
  }
}

at::Tensor depthwise_conv2d_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                int64_t stride) {
  TORCH_CHECK(x.dim() == 4, "depthwise_conv2d: x must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == x.size(1) && weight.size(1) == 1 &&
                  weight.size(2) == weight.size(3) && weight.size(2) % 2 == 1,
              "depthwise_conv2d: weight must be (C, 1, k, k) with odd k and C = x's channels, got ", weight.sizes());
  TORCH_CHECK(stride == 1 || stride == 2, "depthwise_conv2d: stride must be 1 or 2, got ", stride);
  const int64_t k = weight.size(2);
  const bool fast = x.is_contiguous() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble) &&
                    weight.scalar_type() == x.scalar_type() && (!bias.has_value() || bias->scalar_type() == x.scalar_type());
  if (!fast) return at::conv2d(x, weight, bias, {stride, stride}, {k / 2, k / 2}, {1, 1}, x.size(1));
  const int64_t batch = x.size(0), channels = x.size(1), height = x.size(2), width = x.size(3);
  const int64_t out_height = (height - 1) / stride + 1, out_width = (width - 1) / stride + 1;
  at::Tensor out = at::empty({batch, channels, out_height, out_width}, x.options());
  const at::Tensor w = weight.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "depthwise_conv2d_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const scalar_t* bp = b.defined() ? b.data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, batch * channels, 1, [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t c = plane % channels;
        const scalar_t* xs = xp + plane * height * width;
        scalar_t* os = op + plane * out_height * out_width;
        const scalar_t bias_c = bp ? bp[c] : scalar_t(0);
        if (stride == 1)
          depthwise_plane<scalar_t, 1>(xs, height, width, wp + c * k * k, k, bias_c, os, out_height, out_width);
        else
          depthwise_plane<scalar_t, 2>(xs, height, width, wp + c * k * k, k, bias_c, os, out_height, out_width);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ghostkernels, CPU, m) { m.impl("depthwise_conv2d", &depthwise_conv2d_cpu); }

}  // namespace ghostkernels
