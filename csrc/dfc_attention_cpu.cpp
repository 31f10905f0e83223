// ghostkernels::dfc_logits on the CPU: the logits of GhostNetV2's DFC attention,
//   conv_v(conv_h(conv_1x1(avg_pool2d(x, 2), stride))),
// each conv with its BN folded in (1x1 to the output channels, then depthwise 1 x kw and kh x 1
// with 'same' zero padding), at the pooled resolution, in one call. ATen ran it as a pool and
// three convs, the depthwise ones on oneDNN at ~0.1 ms each even on 3x3 planes: half of a frozen
// GhostNetV2's batch-1 forward (bench/results, Zen 3). Here: x pooled once per image, the 1x1 conv
// as the fused kernels' GEMM (gemm.h) over blocks of output channels, and each channel's two
// depthwise convs while its rows are in cache.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>

#include "gemm.h"
#include "ghost_common.h"
#include "ops.h"
#include "scratch.h"

namespace ghostkernels {
namespace {

// Multiply-adds per parallel chunk: smaller calls run on one thread.
constexpr int64_t kGrainWork = 32 * 1024;

struct Shape {
  int64_t batch, inputs, outputs, height, width, stride, out_height, out_width, kw, kh;
  int64_t pixels() const { return out_height * out_width; }
};

// The 2x2 means of x's channels [k0, k1) of image n at (2 i stride, 2 j stride) into their planes
// at dst (x by its strides: NCHW or channels_last). NCHW rows at stride 1 as vectors: the two rows
// added, then even and odd columns.
template <typename T>
void pool(const at::Tensor& x, const Shape& s, int64_t n, int64_t k0, int64_t k1, T* dst) {
  using S = Simd<T>;
  using V = typename S::vec;
  constexpr int64_t L = S::lanes;
  const T* base = x.data_ptr<T>() + n * x.stride(0);
  const int64_t sc = x.stride(1), sh = x.stride(2), sw = x.stride(3), step = 2 * s.stride, W = s.out_width;
  const bool rows_in_vectors = sw == 1 && s.stride == 1;
  const auto even = S::even_lanes(), odd = even + 1;
  for (int64_t k = k0; k < k1; ++k)
    for (int64_t i = 0; i < s.out_height; ++i) {
      const T* top = base + k * sc + i * step * sh;
      const T* bottom = top + sh;
      T* out = dst + (k * s.out_height + i) * W;
      int64_t j = 0;
      if (rows_in_vectors)
        for (; j + L <= W; j += L) {
          const V a = S::load(top + 2 * j) + S::load(bottom + 2 * j);
          const V b = S::load(top + 2 * j + L) + S::load(bottom + 2 * j + L);
          S::store(out + j, (__builtin_shuffle(a, b, even) + __builtin_shuffle(a, b, odd)) * T(0.25));
        }
      for (; j < W; ++j) {
        const int64_t c = j * step * sw;
        out[j] = (top[c] + top[c + sw] + bottom[c] + bottom[c + sw]) * T(0.25);
      }
    }
}

// NV vectors of channels from c on, of pixel `out`: bias + sum over taps t in [t0, t1) of w's row t
// times src's (taps `step` apart), NV independent sums.
template <typename T, int NV>
GK_INLINE void taps_block(const T* first, const T* w, const T* bias, int64_t t0, int64_t t1, int64_t step,
                          int64_t ld, int64_t c, T* out) {
  using S = Simd<T>;
  using V = typename S::vec;
  constexpr int64_t L = S::lanes;
  V sum[NV];
  for (int v = 0; v < NV; ++v) sum[v] = S::load(bias + c + v * L);
  for (int64_t t = t0; t < t1; ++t)
    for (int v = 0; v < NV; ++v)
      sum[v] += S::load(w + t * ld + c + v * L) * S::load(first + (t - t0) * step + c + v * L);
  for (int v = 0; v < NV; ++v) S::store(out + c + v * L, sum[v]);
}

// dst[p * ld + c] = bias[c] + sum over the taps t of w[t * ld + c] * src[(p + shift(t)) * ld + c]
// for every pixel p of the Ho x Wo plane and the ld channels (a whole number of vectors), taps
// along a row (`along_rows`: 1 x k, zero-padded columns) or a column (k x 1, zero-padded rows).
// Up to four vectors of channels at a time, independent sums: with one, each sum was a chain of k
// dependent FMAs; dfc_logits is 1.02-1.24x faster on GhostNetV2's shapes with four (Zen 3, 2
// threads, in-process A/B).
template <typename T>
void taps_in_lanes(const T* src, const T* w, const T* bias, int64_t k, bool along_rows, const Shape& s, int64_t ld,
                   T* dst) {
  constexpr int64_t L = Simd<T>::lanes;
  const int64_t pad = k / 2, W = s.out_width, H = s.out_height;
  for (int64_t i = 0; i < H; ++i)
    for (int64_t j = 0; j < W; ++j) {
      const int64_t at = along_rows ? j : i, size = along_rows ? W : H, step = along_rows ? ld : W * ld;
      const int64_t t0 = std::max<int64_t>(0, pad - at), t1 = std::min(k, size + pad - at);
      const T* first = src + (i * W + j) * ld + (t0 - pad) * step;
      T* out = dst + (i * W + j) * ld;
      int64_t c = 0;
      for (; c + 4 * L <= ld; c += 4 * L) taps_block<T, 4>(first, w, bias, t0, t1, step, ld, c, out);
      switch ((ld - c) / L) {
        case 3: taps_block<T, 3>(first, w, bias, t0, t1, step, ld, c, out); break;
        case 2: taps_block<T, 2>(first, w, bias, t0, t1, step, ld, c, out); break;
        case 1: taps_block<T, 1>(first, w, bias, t0, t1, step, ld, c, out); break;
        default: break;
      }
    }
}

// Per image, x pooled once (a parallel pass over its channels), then work items of (image, block
// of output channels): the 1x1 conv as gemm_nn's tiles over the block's rows, the block
// transposed pixel-major, the two depthwise convs with its channels in the vector lanes, and the
// result transposed back into the output's planes. The depthwise convs channel by channel on
// their planes (rows of 3-28 pixels: mostly scalar edges and tails) took 1.4-2.5x as long for the
// whole op on GhostNetV2's 28x28 to 7x7 planes (Zen 3, 2 threads).
template <typename T>
void dfc_logits_kernel(const at::Tensor& x, const at::Tensor& w, const T* b, const T* wh, const T* bh, const T* wv,
                       const T* bv, const Shape& s, at::Tensor& out) {
  constexpr int64_t L = Simd<T>::lanes;
  const int64_t P = s.pixels(), inputs = s.inputs;
  const at::Tensor pooled = at::empty({s.batch, inputs, P}, x.options());
  T* pooled_data = pooled.data_ptr<T>();
  at::parallel_for(0, s.batch * inputs, std::max<int64_t>(1, kGrainWork / (4 * P)), [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end;) {  // runs of channels of one image
      const int64_t n = item / inputs, k0 = item % inputs, k1 = std::min(inputs, k0 + end - item);
      pool<T>(x, s, n, k0, k1, pooled_data + n * inputs * P);
      item += k1 - k0;
    }
  });
  // An image's channels split into blocks only where there are fewer images than threads and
  // work enough to share.
  const int64_t per_channel = (inputs + s.kw + s.kh) * P, threads = at::get_num_threads();
  const int64_t split = s.batch >= threads ? 1 : std::min({(threads + s.batch - 1) / s.batch, s.outputs,
                                                            std::max<int64_t>(1, s.outputs * per_channel / kGrainWork)});
  const int64_t block = (s.outputs + split - 1) / split, blocks = (s.outputs + block - 1) / block;
  const int64_t ld = (block + L - 1) / L * L;  // a pixel's channels, whole vectors
  const T* weight = w.data_ptr<T>();
  T* out_data = out.data_ptr<T>();
  const int64_t grain = std::max<int64_t>(1, kGrainWork / (block * per_channel));
  at::parallel_for(0, s.batch * blocks, grain, [&](int64_t begin, int64_t end) {
    Scratch scratch;
    T* z = scratch.take<T>(block * P);
    T* pixels = scratch.take<T>(P * ld);
    T* across = scratch.take<T>(P * ld);
    T* panel = scratch.take<T>(kBlock * 2 * L);
    T* taps = scratch.take<T>((s.kw + s.kh + 2) * ld);  // per tap and bias, the block's channels
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / blocks, c0 = item % blocks * block, cb = std::min(s.outputs, c0 + block) - c0;
      T* out_n = out_data + (n * s.outputs + c0) * P;
      const auto add_bias = [b, c0](int64_t i, auto v) __attribute__((always_inline)) {
        return b ? v + b[c0 + i] : v;
      };
      gemm_nn<T>(cb, P, inputs, weight + c0 * inputs, inputs, 1, pooled_data + n * inputs * P, P, z, P, false, panel,
                 add_bias);
      transpose<T>(z, cb, P, P, pixels, ld);
      // Lanes past cb: zeros (finite values, never stored).
      for (int64_t p = 0; p < P; ++p) std::fill(pixels + p * ld + cb, pixels + (p + 1) * ld, T(0));
      std::fill(taps, taps + (s.kw + s.kh + 2) * ld, T(0));
      T *h_taps = taps, *v_taps = taps + s.kw * ld, *h_bias = v_taps + s.kh * ld, *v_bias = h_bias + ld;
      for (int64_t c = 0; c < cb; ++c) {
        for (int64_t t = 0; t < s.kw; ++t) h_taps[t * ld + c] = wh[(c0 + c) * s.kw + t];
        for (int64_t t = 0; t < s.kh; ++t) v_taps[t * ld + c] = wv[(c0 + c) * s.kh + t];
        h_bias[c] = bh ? bh[c0 + c] : T(0);
        v_bias[c] = bv ? bv[c0 + c] : T(0);
      }
      taps_in_lanes<T>(pixels, h_taps, h_bias, s.kw, true, s, ld, across);
      taps_in_lanes<T>(across, v_taps, v_bias, s.kh, false, s, ld, pixels);
      transpose<T>(pixels, P, cb, ld, out_n, P);
    }
  });
}

const char* kOp = "dfc_logits";

void check_like_x(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type() && t.device() == x.device(), kOp, ": ", name,
              " must match x's dtype and device (", x.scalar_type(), ", ", x.device(), "), got ", t.scalar_type(),
              " on ", t.device());
}

void check_bias(const c10::optional<at::Tensor>& bias, const char* name, int64_t outputs, const at::Tensor& x) {
  if (!bias.has_value()) return;
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == outputs, kOp, ": ", name, " must have shape (", outputs,
              ",), got ", bias->sizes());
  check_like_x(*bias, name, x);
}

}  // namespace

at::Tensor dfc_logits_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                          const at::Tensor& horizontal_weight, const c10::optional<at::Tensor>& horizontal_bias,
                          const at::Tensor& vertical_weight, const c10::optional<at::Tensor>& vertical_bias,
                          int64_t stride) {
  TORCH_CHECK(x.dim() == 4, kOp, ": x must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  const int64_t inputs = x.size(1), outputs = weight.size(0);
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == inputs && weight.size(2) == 1 && weight.size(3) == 1,
              kOp, ": weight must be (C_out, ", inputs, ", 1, 1), got ", weight.sizes());
  TORCH_CHECK(inputs > 0 && outputs > 0, kOp, ": x and weight must have at least one channel each, got x ",
              x.sizes(), " and weight ", weight.sizes());
  const auto& hw = horizontal_weight;
  const auto& vw = vertical_weight;
  TORCH_CHECK(hw.dim() == 4 && hw.size(0) == outputs && hw.size(1) == 1 && hw.size(2) == 1 && hw.size(3) % 2 == 1,
              kOp, ": horizontal_weight must be (", outputs, ", 1, 1, k) with odd k, got ", hw.sizes());
  TORCH_CHECK(vw.dim() == 4 && vw.size(0) == outputs && vw.size(1) == 1 && vw.size(3) == 1 && vw.size(2) % 2 == 1,
              kOp, ": vertical_weight must be (", outputs, ", 1, k, 1) with odd k, got ", vw.sizes());
  TORCH_CHECK(stride >= 1, kOp, ": stride must be >= 1, got ", stride);
  check_like_x(weight, "weight", x);
  check_like_x(hw, "horizontal_weight", x);
  check_like_x(vw, "vertical_weight", x);
  check_bias(bias, "bias", outputs, x);
  check_bias(horizontal_bias, "horizontal_bias", outputs, x);
  check_bias(vertical_bias, "vertical_bias", outputs, x);
  TORCH_CHECK(x.size(2) >= 2 && x.size(3) >= 2, kOp, ": x of size ", x.sizes(),
              " is too small for the 2x2 average pool (H and W must be at least 2)");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, kOp,
              ": the CPU kernel supports float32 and float64, got ", x.scalar_type());
  Shape s{x.size(0), inputs, outputs, x.size(2), x.size(3), stride, 0, 0, hw.size(3), vw.size(2)};
  s.out_height = (s.height / 2 - 1) / stride + 1;
  s.out_width = (s.width / 2 - 1) / stride + 1;
  at::Tensor out = at::empty({s.batch, outputs, s.out_height, s.out_width}, x.options());
  if (s.batch == 0) return out;
  const at::Tensor w = weight.contiguous(), wh = hw.contiguous(), wv = vw.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor bh = horizontal_bias.has_value() ? horizontal_bias->contiguous() : at::Tensor();
  const at::Tensor bv = vertical_bias.has_value() ? vertical_bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dfc_logits_cpu", [&] {
    const auto data = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<scalar_t>() : nullptr; };
    dfc_logits_kernel<scalar_t>(x, w, data(b), wh.data_ptr<scalar_t>(), data(bh), wv.data_ptr<scalar_t>(), data(bv),
                                s, out);
  });
  return out;
}

}  // namespace ghostkernels
