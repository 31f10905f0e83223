// ghostkernels::batch_norm_train and its backward on the CPU: nn.BatchNorm2d in training mode
// (normalised by the batch mean and biased variance) on NCHW float32/float64 maps, for the BNs a
// training model keeps outside its Ghost modules (a Ghost-ResNet's bn1/bn2 after each Ghost module).
// On the 2-core Xeon of bench/results, a (64, 16, 32, 32) float32 map: ATen's kernel 0.93 ms
// forward, 1.49 ms forward + backward; these 0.37 and 0.89 ms (one copy of the map: 0.15 ms).
//
// Forward, two passes: each (image, channel) plane's mean and squared deviations while it is in
// cache, combined per channel in double (batch_stats.h); then y = (x - mean) * scale + beta
// plane by plane. Backward, two passes: per plane sum(dy) and sum(dy * (x - mean)); then
// dx = scale * (dy - mean(dy) - (x - mean) * rstd^2 * mean(dy * (x - mean))).

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <tuple>
#include <vector>

#include "batch_stats.h"
#include "isa.h"
#include "ops.h"
#include "output_pool.h"

namespace ghostkernels {
namespace {

template <typename T>
void moments_pass(const T* x, int64_t plane, Moments* moments, int64_t begin, int64_t end) {
  for (int64_t item = begin; item < end; ++item) moments[item] = plane_moments(x + item * plane, plane);
}

// (x - mean) * scale + beta, not x * scale + shift: where |mean| >> std (a BN over a few values
// per channel) the folded shift cancels x * scale's digits, as ATen's kernel does not.
template <typename T>
void normalise_pass(const T* x, const Normalised<T>& bn, const T* beta, int64_t channels,
                    int64_t plane, T* out, int64_t begin, int64_t end) {
  for (int64_t item = begin; item < end; ++item) {
    const int64_t c = item % channels;
    const T *src = x + item * plane, mean = bn.mean[c], scale = bn.scale[c], shift = beta[c];
    T* dst = out + item * plane;
    over_plane<T>(plane, [&](int64_t q, auto v) {
      using X = decltype(v);
      store(dst + q, (load<X>(src + q) - mean) * scale + shift);
    });
  }
}

template <typename T>
void grad_sums_pass(const T* grad, const T* x, const Normalised<T>& bn, int64_t channels,
                    int64_t plane, double* sums, int64_t begin, int64_t end) {
  for (int64_t item = begin; item < end; ++item)
    plane_grad_sums(grad + item * plane, x + item * plane, plane, bn, item % channels, Activation::None,
                    sums + item * 2);
}

template <typename T>
void grad_input_pass(const T* grad, const T* x, const Normalised<T>& bn, const BatchNormGrad<T>& d,
                     int64_t channels, int64_t plane, T* grad_x, int64_t begin, int64_t end) {
  for (int64_t item = begin; item < end; ++item) {
    const int64_t c = item % channels;
    const T *dy = grad + item * plane, *src = x + item * plane;
    const T scale = bn.scale[c], mean = bn.mean[c], mean_dy = d.mean_dy[c], slope = d.slope[c];
    T* dx = grad_x + item * plane;
    over_plane<T>(plane, [&](int64_t q, auto v) {
      using X = decltype(v);
      store(dx + q, scale * (load<X>(dy + q) - mean_dy - (load<X>(src + q) - mean) * slope));
    });
  }
}

void check_input(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be a 4-D tensor (N, C, H, W), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": the CPU kernel takes float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.size(0) * x.size(2) * x.size(3) > 1, op,
              ": expected more than 1 value per channel when training, got input size ", x.sizes());
}

}  // namespace
// Returns (out, mean, biased var); out in x's memory format.
// The running statistics given are updated in place, as native_batch_norm's.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_train_cpu(const at::Tensor& x_in, const at::Tensor& weight,
                                                                    const at::Tensor& bias, double eps,
                                                                    const std::optional<at::Tensor>& running_mean,
                                                                    const std::optional<at::Tensor>& running_var,
                                                                    double momentum) {
  check_input("batch_norm_train", x_in);
  check_channels("batch_norm_train", "weight", weight, x_in.size(1), x_in);
  check_channels("batch_norm_train", "bias", bias, x_in.size(1), x_in);
  check_running("batch_norm_train", "", running_mean, running_var, x_in.size(1), x_in);
  const at::Tensor x = x_in.contiguous();
  const int64_t batch = x.size(0), channels = x.size(1), plane = x.size(2) * x.size(3);
  at::Tensor out = empty_output(x.sizes(), x.options());
  at::Tensor mean = at::empty({channels}, x.options()), var = at::empty({channels}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_norm_train_cpu", [&] {
    using T = scalar_t;
    const T* xp = x.data_ptr<T>();
    std::vector<Moments> moments(batch * channels);
    at::parallel_for(0, batch * channels, 1, [&](int64_t begin, int64_t end) {
      moments_pass(xp, plane, moments.data(), begin, end);
    });
    std::vector<double> m(channels), v(channels);
    combine_moments(moments, batch, channels, plane, m.data(), v.data());
    for (int64_t c = 0; c < channels; ++c) {
      mean.data_ptr<T>()[c] = T(m[c]);
      var.data_ptr<T>()[c] = T(v[c]);
    }
    update_running<T>(running_mean, running_var, m.data(), v.data(), channels, batch * plane, momentum);
    const at::Tensor beta = bias.contiguous();
    const Normalised<T> bn(m.data(), v.data(), weight.contiguous().data_ptr<T>(), beta.data_ptr<T>(), eps, channels);
    at::parallel_for(0, batch * channels, 1, [&](int64_t begin, int64_t end) {
      normalise_pass(xp, bn, beta.data_ptr<T>(), channels, plane, out.data_ptr<T>(), begin, end);
    });
  });
  return {out.contiguous(output_format(x_in)), mean, var};
}

// Returns (grad_x, grad_weight, grad_bias) for the forward's (mean, biased var).
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_train_backward_cpu(const at::Tensor& grad_in,
                                                                             const at::Tensor& x_in,
                                                                             const at::Tensor& weight,
                                                                             const at::Tensor& mean,
                                                                             const at::Tensor& var, double eps) {
  const char* op = "batch_norm_train_backward";
  check_input(op, x_in);
  for (const auto& [name, t] : {std::make_pair("weight", &weight), std::make_pair("mean", &mean), std::make_pair("var", &var)})
    check_channels(op, name, *t, x_in.size(1), x_in);
  TORCH_CHECK(grad_in.sizes() == x_in.sizes(), op, ": grad must have x's shape ", x_in.sizes(),
              ", got ", grad_in.sizes());
  const at::Tensor x = x_in.contiguous(), grad = grad_in.contiguous();
  const int64_t batch = x.size(0), channels = x.size(1), plane = x.size(2) * x.size(3);
  const double count = double(batch * plane);
  at::Tensor grad_x = empty_output(x.sizes(), x.options());
  at::Tensor grad_weight = at::empty({channels}, x.options()), grad_bias = at::empty({channels}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_norm_train_backward_cpu", [&] {
    using T = scalar_t;
    const at::Tensor m = mean.to(at::kDouble).contiguous(), v = var.to(at::kDouble).contiguous();
    const at::Tensor zero = at::zeros({channels}, x.options());  // no shift: the backward needs scale and rstd
    const Normalised<T> bn(m.data_ptr<double>(), v.data_ptr<double>(), weight.contiguous().data_ptr<T>(),
                           zero.data_ptr<T>(), eps, channels);
    const T *gp = grad.data_ptr<T>(), *xp = x.data_ptr<T>();
    std::vector<double> sums(batch * channels * 2);
    at::parallel_for(0, batch * channels, 1, [&](int64_t begin, int64_t end) {
      grad_sums_pass(gp, xp, bn, channels, plane, sums.data(), begin, end);
    });
    const BatchNormGrad<T> d(sums, bn, batch, channels, channels, count);
    d.parameter_grads(bn, count, grad_weight.data_ptr<T>(), grad_bias.data_ptr<T>(), channels);
    at::parallel_for(0, batch * channels, 1, [&](int64_t begin, int64_t end) {
      grad_input_pass(gp, xp, bn, d, channels, plane, grad_x.data_ptr<T>(), begin, end);
    });
  });
  return {grad_x.contiguous(output_format(x_in)), grad_weight, grad_bias};
}

}  // namespace ghostkernels
