// Shared declarations of the lt_recipes fused ops: input checks used by the CPU and the CUDA implementations.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace lt_recipes {

// Most groups (rows of grads / anchors) a fused kernel takes: the CUDA kernels keep 2 accumulators per group in
// registers. Python reads it as lt_recipes._C.MAX_GROUPS; backend="auto" sends larger G to the reference backend.
constexpr int64_t kMaxGroups = 32;

// Each check raises c10::ValueError (Python ValueError) naming the op, the argument, what was expected and what was
// given: the rules and messages of _check_gsa_project / _check_gkp in lt_recipes/ops.py, which the fake kernels use.
void check_gsa_project(const at::Tensor& grads, const at::Tensor& weights, const at::Tensor& global_grad);
void check_gkp(const at::Tensor& theta, const at::Tensor& anchors, const at::Tensor& fisher, const at::Tensor& coef,
               const at::Tensor* grad_out);

// Calls fn(T{}) with T the C++ type of the anchors / Fisher storage dtype (float32, bfloat16 or float16; also
// float64 with kWithDouble, the float64 path's).
template <bool kWithDouble = false, typename Fn>
void dispatch_stored(at::ScalarType t, Fn&& fn) {
  if constexpr (kWithDouble) {
    if (t == at::kDouble) {
      fn(double{});
      return;
    }
  }
  switch (t) {
    case at::kFloat:
      fn(float{});
      return;
    case at::kBFloat16:
      fn(c10::BFloat16{});
      return;
    case at::kHalf:
      fn(c10::Half{});
      return;
    default:
      TORCH_CHECK(false, "gkp_penalty: anchors and fisher must be ", kWithDouble ? "float64, " : "",
                  "float32, bfloat16 or float16, got ", t);
  }
}

}  // namespace lt_recipes
