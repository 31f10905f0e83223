// Batch statistics of NCHW planes, shared by the training-mode Ghost op (ghost_train_cpu.cpp)
// and the batch-statistics BatchNorm op (batch_norm_cpu.cpp): each (image, channel) plane's
// moments while it is in cache, combined exactly per channel in double, and BN's backward sums.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "gemm.h"
#include "ghost_common.h"
#include "isa.h"

namespace ghostkernels {

// A plane's mean and sum of squared deviations from it.
struct Moments {
  double mean, m2;
};

// Per channel, the batch mean and biased variance of equal-sized planes [image][channel]:
// mean of the means; the squared deviations plus each plane's offset from the mean.
inline void combine_moments(const std::vector<Moments>& planes, int64_t batch, int64_t channels, int64_t plane,
                     double* mean, double* var) {
  for (int64_t c = 0; c < channels; ++c) {
    double m = 0, m2 = 0;
    for (int64_t n = 0; n < batch; ++n) m += planes[n * channels + c].mean;
    m /= double(batch);
    for (int64_t n = 0; n < batch; ++n) {
      const Moments& p = planes[n * channels + c];
      m2 += p.m2 + double(plane) * (p.mean - m) * (p.mean - m);
    }
    mean[c] = m;
    var[c] = m2 / double(batch * plane);
  }
}

// A per-channel vector argument of x (a BN's weight, bias or statistics): `channels` long, in x's
// dtype and on its device.
inline void check_channels(const char* op, const std::string& name, const at::Tensor& t, int64_t channels,
                           const at::Tensor& x) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == channels, op, ": ", name, " must have shape (", channels, ",), got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type() && t.device() == x.device(), op, ": ", name, " is ",
              t.scalar_type(), " on ", t.device(), ", x is ", x.scalar_type(), " on ", x.device(), "; they must match");
}

// The running statistics a training op is given to update in place (native_batch_norm's
// running_mean and running_var, each name after `prefix`): both absent, or per-channel vectors.
inline void check_running(const char* op, const char* prefix, const std::optional<at::Tensor>& mean,
                          const std::optional<at::Tensor>& var, int64_t channels, const at::Tensor& x) {
  TORCH_CHECK(mean.has_value() == var.has_value(), op, ": ", prefix, "running_mean and ", prefix,
              "running_var must both be given or both be None");
  if (mean.has_value()) {
    check_channels(op, std::string(prefix) + "running_mean", *mean, channels, x);
    check_channels(op, std::string(prefix) + "running_var", *var, channels, x);
  }
}

// What native_batch_norm does in training to the running statistics it is given: each moved by
// `momentum` towards the batch mean and the unbiased variance of `count` values per channel,
// in double as ATen's CPU kernel.
template <typename T>
void update_running(const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
                    const double* mean, const double* var, int64_t channels, int64_t count, double momentum) {
  if (!running_mean.has_value()) return;  // check_running: then neither
  const auto blend = [&](const at::Tensor& running, const double* batch, double scale) {
    T* r = running.data_ptr<T>();
    const int64_t stride = running.stride(0);
    for (int64_t c = 0; c < channels; ++c)
      r[c * stride] = T(momentum * batch[c] * scale + (1 - momentum) * double(r[c * stride]));
  };
  blend(*running_mean, mean, 1.0);
  blend(*running_var, var, double(count) / double(count - 1));
}

// Elementwise plane loops written once for both widths: body(q, X{}) runs with X = the vector
// type over whole vectors, then with X = T over the tail. load/store/relu_grad take either.
template <typename T, typename Body>
GK_INLINE void over_plane(int64_t n, Body body) {
  constexpr int L = Simd<T>::lanes;
  int64_t q = 0;
  for (; q + L <= n; q += L) body(q, typename Simd<T>::vec{});
  for (; q < n; ++q) body(q, T{});
}

template <typename X, typename T>
GK_INLINE X load(const T* p) {
  if constexpr (std::is_same_v<X, T>) return *p;
  else return Simd<T>::load(p);
}

template <typename T, typename X>
GK_INLINE void store(T* p, X v) {
  if constexpr (std::is_same_v<X, T>) *p = v;
  else Simd<T>::store(p, v);
}

// The sum of a vector's lanes, or a scalar.
template <typename X>
GK_INLINE auto lanes_sum(X v) {
  if constexpr (std::is_floating_point_v<X>) {
    return v;
  } else {
    auto s = v[0];
    for (size_t i = 1; i < sizeof(X) / sizeof(s); ++i) s += v[i];
    return s;
  }
}

// A batch-normalised channel as y = z * scale + shift, and what its backward needs.
template <typename T>
struct Normalised {
  std::vector<T> mean, rstd, scale, shift;
  Normalised(const double* m, const double* v, const T* gamma, const T* beta, double eps, int64_t channels)
      : mean(channels), rstd(channels), scale(channels), shift(channels) {
    for (int64_t c = 0; c < channels; ++c) {
      mean[c] = T(m[c]);
      rstd[c] = T(1.0 / std::sqrt(v[c] + eps));
      scale[c] = gamma[c] * rstd[c];
      shift[c] = beta[c] - mean[c] * scale[c];
    }
  }
};

// The sums over a plane of K terms, term(q, X{}) returning std::array<X, K> (X the vector type
// over whole vectors, T over the tail): in the build's vectors over chunks of 8 vectors, each
// chunk's partial sums widened to double and added there, so that the rounding error grows with
// a chunk's 8 additions a lane, not with the plane's (784 a lane at 112 x 112). A ReLU'd map's
// equal values round alike at every addition: a cheap BN's float32 variance on a 144 x 139 plane
// came out 8e-6 off, 10x eager's (whose CPU BN sums in double).
template <typename T, int K, typename Term>
GK_INLINE std::array<double, K> plane_sums(int64_t n, Term term) {
  using V = typename Simd<T>::vec;
  constexpr int L = Simd<T>::lanes;
  typedef double Wide __attribute__((vector_size(L * sizeof(double))));
  const int64_t whole = n / L * L;
  Wide wide[K] = {};  // an array, not std::array: a template argument drops the vector attribute
  std::array<double, K> total{};
  for (int64_t c0 = 0; c0 < whole; c0 += 8 * L) {
    std::array<V, K> part{};
    for (int64_t q = c0; q < std::min(whole, c0 + 8 * L); q += L) {
      const std::array<V, K> t = term(q, V{});
      for (int k = 0; k < K; ++k) part[k] += t[k];
    }
    for (int k = 0; k < K; ++k) wide[k] += __builtin_convertvector(part[k], Wide);
  }
  for (int64_t q = whole; q < n; ++q) {
    const std::array<T, K> t = term(q, T{});
    for (int k = 0; k < K; ++k) total[k] += double(t[k]);
  }
  for (int k = 0; k < K; ++k) total[k] += lanes_sum(wide[k]);
  return total;
}

// Two passes over a plane in cache.
template <typename T>
GK_INLINE Moments plane_moments(const T* v, int64_t n) {
  const T mean = T(plane_sums<T, 1>(n, [&](int64_t q, auto x) {
    return std::array<decltype(x), 1>{load<decltype(x)>(v + q)};
  })[0] / double(n));
  const double m2 = plane_sums<T, 1>(n, [&](int64_t q, auto x) {
    using X = decltype(x);
    const X d = load<X>(v + q) - mean;
    return std::array<X, 1>{d * d};
  })[0];
  return {double(mean), m2};
}

// BN's backward on a plane: dz = scale * (dy - sum(dy) / M - (z - mean) * rstd^2 * sum(dy * (z - mean)) / M),
// with the two sums over the batch given as `mean_dy` = sum(dy) / M and `slope` = rstd^2 sum(dy (z - mean)) / M.
template <typename T>
struct BatchNormGrad {
  std::vector<T> mean_dy, slope;
  BatchNormGrad(const std::vector<double>& sums, const Normalised<T>& bn, int64_t batch, int64_t channels,
                int64_t used, double count)
      : mean_dy(channels, T(0)), slope(channels, T(0)) {
    for (int64_t c = 0; c < used; ++c) {
      double dy = 0, dyz = 0;
      for (int64_t n = 0; n < batch; ++n) {
        dy += sums[(n * used + c) * 2];
        dyz += sums[(n * used + c) * 2 + 1];
      }
      const double rstd = bn.rstd[c];
      mean_dy[c] = T(dy / count);
      slope[c] = T(dyz * rstd * rstd / count);
    }
  }
  // The grads of BN's gamma and beta: sum(dy * x_hat) and sum(dy).
  void parameter_grads(const Normalised<T>& bn, double count, T* grad_gamma, T* grad_beta, int64_t channels) const {
    for (int64_t c = 0; c < channels; ++c) {
      grad_beta[c] = T(double(mean_dy[c]) * count);
      grad_gamma[c] = T(double(slope[c]) * count / double(bn.rstd[c]));
    }
  }
};

// Per plane: sum(dy) and sum(dy * (z - mean)), dy = the activation's grad at y = BN(z).
template <typename T>
GK_INLINE void plane_grad_sums(const T* grad, const T* z, int64_t P, const Normalised<T>& bn, int64_t c,
                               Activation act, double* sums) {
  const T scale = bn.scale[c], shift = bn.shift[c], mean = bn.mean[c];
  const std::array<double, 2> s = plane_sums<T, 2>(P, [&](int64_t q, auto x) {
    using X = decltype(x);
    const X zq = load<X>(z + q);
    const X g = activation_grad(load<X>(grad + q), zq * scale + shift, act);
    return std::array<X, 2>{g, g * (zq - mean)};
  });
  sums[0] = s[0];
  sums[1] = s[1];
}

}  // namespace ghostkernels
