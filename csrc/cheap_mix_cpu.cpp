// G-GhostNet's cheap part in one pass (CPU): out = relu(W @ x[:, offset:offset + cin] + b + mix),
// mix broadcast over H and W. `out` may be a channel slice of the stage's concatenated
// output, so the cheap features land in place and no concat copy follows; x's channel
// slice is read in place too.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/conv2d.h>

#include <algorithm>

#include "gemm.h"
#include "ghost_common.h"
#include "isa.h"
#include "ops.h"
#include "output_pool.h"
#include "scratch.h"

namespace ghostkernels {
namespace {

struct MixArgs {
  int64_t batch, cin, cout, pixels;
  WorkItems items;
  bool planar;                                  // NCHW planes (else pixel-major, channels last)
  int64_t x_batch, x_step, out_batch, out_step;  // planar: channel strides; else pixel strides
};

template <typename T>
void cheap_mix_items(const MixArgs& m, const T* x, const T* w, const T* wt, const T* b, const T* mix,
                     T* out, int64_t begin, int64_t end) {
  Scratch scratch;
  T* panel = scratch.take<T>(kBlock * 2 * Simd<T>::lanes);
  for (int64_t item = begin; item < end; ++item) {
    int64_t n, p0, c0;
    m.items.locate(item, n, p0, c0);
    const int64_t channels = std::min(m.items.block, m.cout - c0), np = std::min(m.items.chunk, m.pixels - p0);
    if (channels <= 0) continue;
    const T* shift = mix + n * m.cout + c0;
    const T* bias = b ? b + c0 : nullptr;
    if (m.planar) {
      T* o = out + n * m.out_batch + c0 * m.out_step + p0;
      gemm_nn<T>(channels, np, m.cin, w + c0 * m.cin, m.cin, 1, x + n * m.x_batch + p0, m.x_step, o, m.out_step,
                 false, panel, [shift, bias](int64_t c, auto v) __attribute__((always_inline)) {
                   return activate_vector(v + (shift[c] + (bias ? bias[c] : T(0))), Activation::ReLU);
                 });
    } else {
      T* o = out + n * m.out_batch + p0 * m.out_step + c0;
      gemm_nn<T>(np, channels, m.cin, x + n * m.x_batch + p0 * m.x_step, m.x_step, 1, wt + c0, m.cout, o,
                 m.out_step, false, panel);
      for (int64_t q = 0; q < np; ++q)
        for (int64_t c = 0; c < channels; ++c) {
          T& value = o[q * m.out_step + c];
          value = activate(value + shift[c] + (bias ? bias[c] : T(0)), Activation::ReLU);
        }
    }
  }
}

// The layouts the kernel reads and writes directly: NCHW planes or pixel-major rows (any
// channel and batch strides, so channel slices of either qualify).
bool is_planar(const at::Tensor& t) { return t.stride(3) == 1 && t.stride(2) == t.size(3); }
bool is_pixel_major(const at::Tensor& t) {
  return t.stride(1) == 1 && t.stride(2) == t.size(3) * t.stride(3);
}

}  // namespace

void cheap_mix_into_cpu(const at::Tensor& x_full, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                        const at::Tensor& mix, int64_t offset, const at::Tensor& out) {
  TORCH_CHECK(x_full.dim() == 4, "cheap_mix: x must be 4-D (N, C, H, W), got ", x_full.dim(), "-D");
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == 1 && weight.size(3) == 1,
              "cheap_mix: weight must be (cout, cin, 1, 1), got ", weight.sizes());
  const int64_t cout = weight.size(0), cin = weight.size(1);
  // A GEMM over no channels writes nothing, and F.conv2d returns no output channels there.
  TORCH_CHECK(cin > 0, "cheap_mix: weight must have at least one input channel (cin >= 1), got ", weight.sizes());
  TORCH_CHECK(offset >= 0 && offset + cin <= x_full.size(1), "cheap_mix: channel_offset ", offset, " + cin ", cin,
              " exceeds x's ", x_full.size(1), " channels");
  TORCH_CHECK(mix.dim() == 2 && mix.size(0) == x_full.size(0) && mix.size(1) == cout,
              "cheap_mix: mix must be (", x_full.size(0), ", ", cout, "), got ", mix.sizes());
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == cout),
              "cheap_mix: bias must have shape (", cout, ",)");
  TORCH_CHECK(out.dim() == 4 && out.size(0) == x_full.size(0) && out.size(1) == cout &&
                  out.size(2) == x_full.size(2) && out.size(3) == x_full.size(3),
              "cheap_mix: out must be (", x_full.size(0), ", ", cout, ", ", x_full.size(2), ", ", x_full.size(3),
              "), got ", out.sizes());
  for (const at::Tensor* t : {&weight, &mix, &out})
    TORCH_CHECK(t->scalar_type() == x_full.scalar_type() && t->device() == x_full.device(),
                "cheap_mix: weight, mix and out must match x's dtype and device (", x_full.scalar_type(), ")");
  TORCH_CHECK(!bias.has_value() || bias->scalar_type() == x_full.scalar_type(), "cheap_mix: bias must match x's dtype");
  const at::Tensor x = x_full.narrow(1, offset, cin);
  const bool planar = is_planar(x) && is_planar(out), pixel_major = is_pixel_major(x) && is_pixel_major(out);
  const bool supported = x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble;
  if (out.numel() == 0) return;
  if (!supported || !(planar || pixel_major)) {  // other layouts and dtypes: library ops
    at::Tensor shift = mix.reshape({mix.size(0), cout, 1, 1});
    out.copy_(at::conv2d(x, weight, bias).add(shift).relu());
    return;
  }
  const at::Tensor w = weight.reshape({cout, cin}).contiguous();
  const at::Tensor mixc = mix.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const int64_t pixels = x.size(2) * x.size(3);
  MixArgs m{x.size(0), cin, cout, pixels, WorkItems::balanced(x.size(0), pixels, cout, at::get_num_threads()), planar,
            x.stride(0), planar ? x.stride(1) : x.stride(3), out.stride(0), planar ? out.stride(1) : out.stride(3)};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cheap_mix_cpu", [&] {
    const at::Tensor wt = planar ? at::Tensor() : w.t().contiguous();
    at::parallel_for(0, m.items.count(m.batch), 1, [&](int64_t begin, int64_t end) {
      cheap_mix_items<scalar_t>(m, x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                                wt.defined() ? wt.data_ptr<scalar_t>() : nullptr,
                                b.defined() ? b.data_ptr<scalar_t>() : nullptr, mixc.data_ptr<scalar_t>(),
                                out.data_ptr<scalar_t>(), begin, end);
    });
  });
}

at::Tensor cheap_mix_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                         const at::Tensor& mix, int64_t offset) {
  TORCH_CHECK(x.dim() == 4 && weight.dim() == 4, "cheap_mix: x and weight must be 4-D, got ", x.dim(), "-D and ",
              weight.dim(), "-D");
  const bool channels_last = !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor out = empty_output({x.size(0), weight.size(0), x.size(2), x.size(3)}, x.options(),
                                channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  cheap_mix_into_cpu(x, weight, bias, mix, offset, out);
  return out;
}

}  // namespace ghostkernels
