// The CPU kernels (csrc/ops.h) registered as the ghostkernels ops' CPU kernels, whose schemas
// the Python package defines, and the C++-only ops. The one file that includes torch/library.h.
#include <torch/library.h>

#include <string>
#include <tuple>

#include "bf16_gemm.h"
#include "ops.h"

namespace ghostkernels {

TORCH_LIBRARY_IMPL(ghostkernels, CPU, m) {
  m.impl("ghost_module", &ghost_module_cpu);
  m.impl("ghost_module_gated", &ghost_module_gated_cpu);
  m.impl("ghost_module_depthwise", &ghost_module_depthwise_cpu);
  m.impl("ghost_module_scaled", &ghost_module_scaled_cpu);
  m.impl("ghost_module_residual", &ghost_module_residual_cpu);
  m.impl("ghost_module_backward", &ghost_module_backward_cpu);
  m.impl("ghost_module_train", &ghost_module_train_cpu);
  m.impl("ghost_module_train_backward", &ghost_module_train_backward_cpu);
  m.impl("batch_norm_train", &batch_norm_train_cpu);
  m.impl("batch_norm_train_backward", &batch_norm_train_backward_cpu);
  m.impl("direct_conv2d", &direct_conv2d_cpu);
  m.impl("direct_conv2d_backward", &direct_conv2d_backward_cpu);
  m.impl("pointwise_conv2d", &pointwise_conv2d_cpu);
  m.impl("pointwise_conv2d_pool", &pointwise_conv2d_pool_cpu);
  m.impl("squeeze_excite_gate", &squeeze_excite_gate_cpu);
  m.impl("cheap_mix", &cheap_mix_cpu);
  m.impl("cheap_mix_into", &cheap_mix_into_cpu);
  m.impl("dfc_logits", &dfc_logits_cpu);
}

TORCH_LIBRARY_FRAGMENT(ghostkernels, m) {
  m.def("mark_frozen_weights(Tensor[] weights) -> ()", &mark_frozen_weights);
  m.def("frozen_weights_status() -> (int, int)", &frozen_weights_status);
  m.def("output_cache_bytes() -> int", &output_cache_bytes);
  m.def("empty_output_cache() -> int", &empty_output_cache);
  m.def("bf16_gemm_status() -> (bool, str)",
        [] { return std::make_tuple(bf16_gemm_available(), bf16_gemm_status()); });
}

}  // namespace ghostkernels
