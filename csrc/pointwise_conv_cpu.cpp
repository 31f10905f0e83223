// ghostkernels::pointwise_conv2d on the CPU: a 1x1 conv (+bias) of an NCHW map, out[n] = W x[n] + b,
// as the fused kernels' register-tiled GEMM (gemm.h) over work items of images x pixel chunks x
// output-channel blocks, the bias and a ReLU applied while a tile is in registers, into an output
// from the output cache. At stride > 1 (a ResNet or RegNet block's downsample shortcut) each item
// first gathers its pixels' inputs into a scratch; with a residual (the block's last 1x1 conv and
// its shortcut's add, which freeze() fuses) the item's rows get it, then the ReLU, while in cache.
// oneDNN's NCHW 1x1 conv reorders its input and weight on every call; MKL's batched GEMM (the
// kernel before this one) split GhostNet's small batch-1 shortcut convs badly across threads;
// ATen's baddbmm writes a fresh tensor that page-faults at batch 8. Below it,
// pointwise_conv2d_pool: the same GEMM, its rows averaged in a scratch.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_unsafe_view.h>
#include <ATen/ops/conv2d.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>

#include <algorithm>
#include <type_traits>

#include "bf16_gemm.h"
#include "frozen_weights.h"
#include "gemm.h"
#include "ghost_common.h"
#include "isa.h"
#include "ops.h"
#include "output_pool.h"
#include "scratch.h"

namespace ghostkernels {
namespace {

struct PointwiseArgs {
  int64_t inputs, outputs, pixels;
  WorkItems items;
  int64_t image_stride;  // x's: a channel slice of a wider map (G-GhostNet's inner blocks) is one image apart
  bool bf16_gemm;  // in bfloat16 (float32 only; bf16_gemm.h)
  Bf16Rows w_bf16;  // with bf16_gemm, W's frozen copy (frozen_weights.h), if it has one
  // stride > 1: x's plane is height x width, the output's out_width wide; gathered_ld is the row
  // stride of an item's gathered inputs (its chunk rounded up to 64 bytes).
  int64_t stride = 1, height = 0, width = 0, out_width = 0, gathered_ld = 0;
  Activation act = Activation::None;  // applied after the residual where there is one
  const void* residual = nullptr;     // laid out as out, added before the activation
};

// Row k < inputs of dst (row stride ld) = input channel k of x's (height, width) plane at the
// output pixels [p0, p0 + np) of a stride-`stride` 1x1 conv (out_width wide), zero-padded to ld.
template <typename T>
void gather_strided(const PointwiseArgs& a, const T* x, int64_t p0, int64_t np, T* dst) {
  for (int64_t k = 0; k < a.inputs; ++k) {
    const T* plane = x + k * a.height * a.width;
    T* row = dst + k * a.gathered_ld;
    for (int64_t p = p0, end = p0 + np; p < end;) {
      const int64_t oy = p / a.out_width, ox = p % a.out_width, n = std::min(end - p, a.out_width - ox);
      const T* src = plane + oy * a.stride * a.width + ox * a.stride;
      for (int64_t i = 0; i < n; ++i) row[p - p0 + i] = src[i * a.stride];
      p += n;
    }
    // The GEMM's vector loads run past np into the padding: zeros, not whatever the scratch held
    // (a denormal or NaN there costs time, though never stored).
    std::fill(row + np, row + a.gathered_ld, T(0));
  }
}

// ReluInTile: a ReLU and no residual, the ReLU applied in the tile's registers (a template
// argument: a runtime test there cost pointwise_conv2d 24 -> 36 @56 ~10%, an epilogue of 24 FMAs).
template <typename T, bool ReluInTile>
void pointwise_items(const PointwiseArgs& a, const T* x, const T* w, const T* b, T* out,
                     int64_t begin, int64_t end) {
  Scratch scratch;
  T* panel = scratch.take<T>(kBlock * 2 * Simd<T>::lanes);
  T* gathered = a.stride > 1 ? scratch.take<T>(a.inputs * a.gathered_ld) : nullptr;
  const T* residual = static_cast<const T*>(a.residual);
  for (int64_t item = begin; item < end; ++item) {
    int64_t n, p0, c0;
    a.items.locate(item, n, p0, c0);
    const int64_t channels = std::min(a.items.block, a.outputs - c0), np = std::min(a.items.chunk, a.pixels - p0);
    if (channels <= 0) continue;
    const T* bias = b ? b + c0 : nullptr;
    T* o = out + (n * a.outputs + c0) * a.pixels + p0;
    const T* xn = x + n * a.image_stride + p0;
    int64_t ldb = a.pixels;
    if (gathered) {
      gather_strided(a, x + n * a.image_stride, p0, np, gathered);
      xn = gathered;
      ldb = a.gathered_ld;
    }
    const auto finish = [bias](int64_t c, auto v) __attribute__((always_inline)) {
      v = bias ? v + bias[c] : v;
      return ReluInTile ? activate_vector(v, Activation::ReLU) : v;
    };
    product_rows<T>(a.bf16_gemm, channels, np, a.inputs, w + c0 * a.inputs, xn, ldb, o, a.pixels, panel,
                    a.w_bf16.row(c0), finish);
    if (!residual) continue;
    const T* r = residual + (o - out);
    for (int64_t c = 0; c < channels; ++c) {
      T* row = o + c * a.pixels;
      const T* r_row = r + c * a.pixels;
      for (int64_t i = 0; i < np; ++i) row[i] = activate(row[i] + r_row[i], a.act);
    }
  }
}

// 1x1 maps (conv_head, classifiers) in the AVX2 build and under float32_matmul_precision "medium":
// dot_rows over all of W's rows (with_gemv_rows: a frozen W as its bfloat16 copy in the bfloat16
// mode) of the (batch, inputs) x, into out.
template <typename T>
void pointwise_gemv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, const at::Tensor& out) {
  const int64_t batch = x.size(0), inputs = x.size(1), outputs = w.size(0);
  const T* bias = b.defined() ? b.data_ptr<T>() : nullptr;
  with_gemv_rows<T>(w, inputs, [&](const auto* weights, int64_t ld) {
    // Blocks of 64 rows: 20 blocks to share out at conv_head's 1280 outputs.
    at::parallel_for(0, outputs, 64, [&](int64_t begin, int64_t end) {
      dot_rows(batch, inputs, outputs, x.data_ptr<T>(), weights, ld, out.data_ptr<T>(), begin, end,
               [bias](int64_t o, T sum) { return bias ? sum + bias[o] : sum; });
    });
  });
}

// The arguments of `op` (pointwise_conv2d or its pooled form) checked; whether the GEMM kernels
// take them (NCHW float32/float64 throughout) or the library conv does.
bool check_pointwise(const char* op, const at::Tensor& x, const at::Tensor& weight,
                     const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == x.size(1) && weight.size(2) == 1 && weight.size(3) == 1,
              op, ": weight must be (C_out, ", x.size(1), ", 1, 1), got ", weight.sizes());
  // With no input channels F.conv2d (the other path) returns no output channels and the GEMM C_out of bias.
  TORCH_CHECK(x.size(1) > 0, op, ": x must have at least one channel, got ", x.sizes());
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == weight.size(0)),
              op, ": bias must have shape (", weight.size(0), ",)");
  // Each image contiguous (C, H, W), the images at any stride: a channel slice of a batch.
  bool images_contiguous = true;
  for (int64_t d = 3, step = 1; d >= 1; step *= x.size(d), --d)
    images_contiguous = images_contiguous && (x.size(d) == 1 || x.stride(d) == step);
  return images_contiguous && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble) &&
         weight.scalar_type() == x.scalar_type() && (!bias.has_value() || bias->scalar_type() == x.scalar_type());
}

// Whether this is an Intel CPU: MKL runs its fast code paths on those only.
bool on_intel_cpu() {
#if defined(__x86_64__) || defined(__i386__)
  return __builtin_cpu_is("intel");
#else
  return false;
#endif
}

// act(out + residual) by ATen ops, NCHW: the paths that do not run the GEMM's items, and a
// residual that broadcasts or has another dtype (the result is then the add's: its shape and
// promoted dtype, as the op's fake kernel says).
at::Tensor finish_with_aten(at::Tensor out, const c10::optional<at::Tensor>& residual, Activation act) {
  if (residual.has_value()) out = out.add(*residual).contiguous();
  return act == Activation::ReLU ? out.relu_() : out;
}

}  // namespace

at::Tensor pointwise_conv2d_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                int64_t stride, c10::string_view activation, const c10::optional<at::Tensor>& residual) {
  const bool fast = check_pointwise("pointwise_conv2d", x, weight, bias);
  TORCH_CHECK(stride >= 1, "pointwise_conv2d: stride must be >= 1, got ", stride);
  const Activation act = parse_activation(activation, "pointwise_conv2d");
  const int64_t batch = x.size(0), inputs = x.size(1), outputs = weight.size(0);
  const int64_t out_height = (x.size(2) + stride - 1) / stride, out_width = (x.size(3) + stride - 1) / stride;
  const int64_t pixels = out_height * out_width;
  TORCH_CHECK(!residual.has_value() || residual->device() == x.device(), "pointwise_conv2d: residual must be on ",
              x.device(), " as x, got ", residual->device());
  // The GEMM's items add a residual of the output's shape and dtype; another one (a broadcast, a
  // promotion) is added after them by ATen, and so is the ReLU then.
  const bool late = residual.has_value() && (residual->sizes() != at::IntArrayRef({batch, outputs, out_height,
                                                                                    out_width}) ||
                                             residual->scalar_type() != x.scalar_type());
  // NCHW out whatever x's layout, as the fake kernel promises.
  if (!fast) return finish_with_aten(at::conv2d(x, weight, bias, stride).contiguous(), residual, act);
  // 1x1 maps: MKL's GEMV in the AVX-512 build on Intel CPUs; our dot products elsewhere and where
  // bfloat16 matmuls are asked for (float32_matmul_precision "medium"), where ATen converts W to
  // bfloat16 on every call (torch 2.13, batch 1: 2.5x slower). Frozen GhostNets with the dots instead of MKL: 1.5-3% slower on
  // an AVX-512 Xeon, 3-15% faster on an AVX2 EPYC (Zen 2), batch 1 and 8
  // (bench/results/epyc-zen2-avx2-2threads-2026-12-02.md), 9-15% faster at batch 1 on an AVX-512
  // EPYC (Zen 4), where MKL's GEMV ran 2.3x slower than the dots alone
  // (bench/results/epyc-zen4-avx512-2threads-2026-12-02.md).
  static const bool mkl_gemv = GK_VECTOR_BYTES == 64 && on_intel_cpu();
  const bool one_pixel = x.size(2) == 1 && x.size(3) == 1;
  if (one_pixel && mkl_gemv && !bf16_matmuls_requested())  // _unsafe_view: an op's output must not be a view (autograd forbids in-place on it)
    return finish_with_aten(at::_unsafe_view(at::linear(x.reshape({batch, inputs}), weight.reshape({outputs, inputs}), bias),
                                             {batch, outputs, 1, 1}), residual, act);
  at::Tensor out = empty_output({batch, outputs, out_height, out_width}, x.options());
  if (out.numel() == 0) return finish_with_aten(out, residual, act);
  const at::Tensor w = weight.contiguous(), b = bias.has_value() ? bias->contiguous() : at::Tensor();
  if (one_pixel) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pointwise_conv2d_cpu",
                               [&] { pointwise_gemv<scalar_t>(x.contiguous(), w, b, out); });
    return finish_with_aten(out, residual, act);
  }
  PointwiseArgs a{inputs, outputs, pixels, WorkItems::balanced(batch, pixels, outputs, at::get_num_threads()), x.stride(0),
                  bf16_gemm_enabled(x.scalar_type(), inputs)};
  if (a.bf16_gemm) a.w_bf16 = frozen_bf16_rows(w);
  const int64_t line = 64 / int64_t(x.element_size());
  a.stride = stride, a.height = x.size(2), a.width = x.size(3), a.out_width = out_width;
  a.gathered_ld = (a.items.chunk + line - 1) / line * line;
  a.act = late ? Activation::None : act;
  const at::Tensor r = residual.has_value() && !late ? residual->contiguous() : at::Tensor();
  a.residual = r.defined() ? r.data_ptr() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pointwise_conv2d_cpu", [&] {
    at::parallel_for(0, a.items.count(batch), 1, [&](int64_t begin, int64_t end) {
      auto items = a.act == Activation::ReLU && !r.defined() ? pointwise_items<scalar_t, true> : pointwise_items<scalar_t, false>;
      items(a, x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), b.defined() ? b.data_ptr<scalar_t>() : nullptr,
            out.data_ptr<scalar_t>(), begin, end);
    });
  });
  return late ? finish_with_aten(out, residual, act) : out;
}

namespace {

// ghostkernels::pointwise_conv2d_pool: mean over each plane of act(W x[n] + b), (N, C_out, 1, 1):
// a network's last 1x1 conv, its activation and the global average pool that follows (freeze()
// makes one op of the three). Per work item (image, block of output channels) the GEMM's rows
// go into a cache-sized scratch and are summed there: the conv's output is never written out
// and read back by the pool.
template <typename T>
void pooled_items(const PointwiseArgs& a, Activation act, const T* x, const T* w, const T* b, T* out,
                  int64_t begin, int64_t end) {
  Scratch scratch;
  T* panel = scratch.take<T>(kBlock * 2 * Simd<T>::lanes);
  T* rows = scratch.take<T>(a.items.block * a.pixels);
  for (int64_t item = begin; item < end; ++item) {
    int64_t n, p0, c0;
    a.items.locate(item, n, p0, c0);
    const int64_t channels = std::min(a.items.block, a.outputs - c0);
    if (channels <= 0) continue;
    const T* bias = b ? b + c0 : nullptr;
    const T* xn = x + n * a.image_stride;
    const auto finish = [bias, act](int64_t c, auto v) __attribute__((always_inline)) {
      v = bias ? v + bias[c] : v;
      return activate_vector(v, act);
    };
    product_rows<T>(a.bf16_gemm, channels, a.pixels, a.inputs, w + c0 * a.inputs, xn, a.pixels, rows, a.pixels, panel,
                    a.w_bf16.row(c0), finish);
    for (int64_t c = 0; c < channels; ++c) out[n * a.outputs + c0 + c] = sum(rows + c * a.pixels, a.pixels) / T(a.pixels);
  }
}

}  // namespace

at::Tensor pointwise_conv2d_pool_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                     c10::string_view activation) {
  const bool fast = check_pointwise("pointwise_conv2d_pool", x, weight, bias);
  TORCH_CHECK(x.size(2) > 0 && x.size(3) > 0, "pointwise_conv2d_pool: x must have a non-empty plane to average, got ",
              x.sizes());
  const Activation act = parse_activation(activation, "pointwise_conv2d_pool");
  if (!fast) {
    at::Tensor z = at::conv2d(x, weight, bias);
    return (act == Activation::ReLU ? z.relu_() : z).mean({2, 3}, /*keepdim=*/true).contiguous();
  }
  const int64_t batch = x.size(0), inputs = x.size(1), outputs = weight.size(0), pixels = x.size(2) * x.size(3);
  at::Tensor out = at::empty({batch, outputs, 1, 1}, x.options());
  if (out.numel() == 0) return out;
  const at::Tensor w = weight.contiguous(), b = bias.has_value() ? bias->contiguous() : at::Tensor();
  // Output-channel blocks whose rows fit the scratch (256 KiB), then until every thread has an item.
  const auto block_of = [outputs](int64_t blocks) { return (outputs + blocks - 1) / blocks; };
  const int64_t row_bytes = pixels * int64_t(x.element_size());
  int64_t blocks = 1;
  while (block_of(blocks) > WorkItems::kMinBlock && block_of(blocks) * row_bytes > 256 * 1024) blocks *= 2;
  while (batch * blocks < at::get_num_threads() && block_of(blocks) >= 2 * WorkItems::kMinBlock) blocks *= 2;
  PointwiseArgs a{inputs, outputs, pixels, WorkItems::whole_planes(pixels, outputs, blocks), x.stride(0),
                  bf16_gemm_enabled(x.scalar_type(), inputs)};
  if (a.bf16_gemm) a.w_bf16 = frozen_bf16_rows(w);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pointwise_conv2d_pool_cpu", [&] {
    at::parallel_for(0, a.items.count(batch), 1, [&](int64_t begin, int64_t end) {
      pooled_items<scalar_t>(a, act, x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                             b.defined() ? b.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(), begin, end);
    });
  });
  return out;
}

}  // namespace ghostkernels
