// The entry points of the CPU kernels, which csrc/registration.cpp registers as the ghostkernels
// ops' CPU kernels (and the C++-only ops): one file includes torch/library.h, whose parse costs
// each file that includes it 1.6-2.1 s of compile, twice (an x86-64 install builds two ISAs).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace ghostkernels {

// batch_norm_cpu.cpp
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_train_cpu(const at::Tensor& x_in, const at::Tensor& weight,
                                                                    const at::Tensor& bias, double eps,
                                                                    const std::optional<at::Tensor>& running_mean,
                                                                    const std::optional<at::Tensor>& running_var,
                                                                    double momentum);
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_train_backward_cpu(const at::Tensor& grad_in,
                                                                             const at::Tensor& x_in,
                                                                             const at::Tensor& weight,
                                                                             const at::Tensor& mean,
                                                                             const at::Tensor& var, double eps);

// cheap_mix_cpu.cpp
void cheap_mix_into_cpu(const at::Tensor& x_full, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                        const at::Tensor& mix, int64_t offset, const at::Tensor& out);
at::Tensor cheap_mix_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                         const at::Tensor& mix, int64_t offset);

// dfc_attention_cpu.cpp
at::Tensor dfc_logits_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                          const at::Tensor& horizontal_weight, const c10::optional<at::Tensor>& horizontal_bias,
                          const at::Tensor& vertical_weight, const c10::optional<at::Tensor>& vertical_bias,
                          int64_t stride);

// direct_conv_cpu.cpp
at::Tensor direct_conv2d_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                             int64_t stride, c10::string_view activation, c10::optional<int64_t> expected_groups);
std::tuple<at::Tensor, at::Tensor, at::Tensor> direct_conv2d_backward_cpu(const at::Tensor& grad_in,
                                                                          const at::Tensor& x_in,
                                                                          const at::Tensor& weight, int64_t stride);

// frozen_weights.cpp
void mark_frozen_weights(const std::vector<at::Tensor>& weights);
std::tuple<int64_t, int64_t> frozen_weights_status();

// ghost_backward_cpu.cpp
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ghost_module_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& out_in, const at::Tensor& x_in, const at::Tensor& w1_in,
    const c10::optional<at::Tensor>& b1, const at::Tensor& w2_in, const c10::optional<at::Tensor>& b2,
    int64_t out_channels, int64_t stride, c10::string_view activation);

// ghost_cpu.cpp
at::Tensor ghost_module_cpu(const at::Tensor& x, const at::Tensor& w1, const c10::optional<at::Tensor>& b1,
                            const at::Tensor& w2, const c10::optional<at::Tensor>& b2, int64_t out_channels,
                            int64_t stride, c10::string_view activation);
at::Tensor ghost_module_gated_cpu(const at::Tensor& x, const at::Tensor& w1, const c10::optional<at::Tensor>& b1,
                                  const at::Tensor& w2, const c10::optional<at::Tensor>& b2, const at::Tensor& gate,
                                  int64_t out_channels, int64_t stride, c10::string_view activation);
at::Tensor ghost_module_depthwise_cpu(const at::Tensor& x_in, const at::Tensor& w1_in,
                                      const c10::optional<at::Tensor>& b1, const at::Tensor& w2_in,
                                      const c10::optional<at::Tensor>& b2, int64_t out_channels, int64_t stride,
                                      c10::string_view activation, const at::Tensor& w3_in,
                                      const c10::optional<at::Tensor>& b3, int64_t dw_stride);
at::Tensor ghost_module_scaled_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& w1,
                                   const c10::optional<at::Tensor>& b1, const at::Tensor& w2,
                                   const c10::optional<at::Tensor>& b2, int64_t out_channels, int64_t stride,
                                   c10::string_view activation);
at::Tensor ghost_module_residual_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& scale,
                                     const at::Tensor& w1, const c10::optional<at::Tensor>& b1, const at::Tensor& w2,
                                     const c10::optional<at::Tensor>& b2, int64_t out_channels, int64_t stride,
                                     c10::string_view activation, const at::Tensor& residual,
                                     const at::Scalar& alpha);

// ghost_train_cpu.cpp
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ghost_module_train_cpu(
    const at::Tensor& x_in, const at::Tensor& w1_in, const at::Tensor& g1_in, const at::Tensor& b1_in,
    const at::Tensor& w2_in, const at::Tensor& g2_in, const at::Tensor& b2_in, int64_t out_channels, int64_t stride,
    c10::string_view activation, double eps1, double eps2, const std::optional<at::Tensor>& running_mean1,
    const std::optional<at::Tensor>& running_var1, const std::optional<at::Tensor>& running_mean2,
    const std::optional<at::Tensor>& running_var2, double momentum1, double momentum2);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
ghost_module_train_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& w1_in,
                                const at::Tensor& g1_in, const at::Tensor& b1_in, const at::Tensor& w2_in,
                                const at::Tensor& g2_in, const at::Tensor& b2_in, const at::Tensor& z1_in,
                                const at::Tensor& z2_in, const at::Tensor& mean1, const at::Tensor& var1,
                                const at::Tensor& mean2, const at::Tensor& var2, int64_t out_channels, int64_t stride,
                                c10::string_view activation, double eps1, double eps2);

// pointwise_conv_cpu.cpp
at::Tensor pointwise_conv2d_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                int64_t stride, c10::string_view activation, const c10::optional<at::Tensor>& residual);
at::Tensor pointwise_conv2d_pool_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                     c10::string_view activation);

// squeeze_excite_cpu.cpp
at::Tensor squeeze_excite_gate_cpu(const at::Tensor& x, const at::Tensor& w_reduce,
                                   const c10::optional<at::Tensor>& b_reduce, const at::Tensor& w_expand,
                                   const c10::optional<at::Tensor>& b_expand);

// output_pool.cpp
int64_t output_cache_bytes();
int64_t empty_output_cache();

}  // namespace ghostkernels
