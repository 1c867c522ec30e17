// Python module `lt_recipes._C`, the op schemas of the `lt_recipes` torch.library namespace, and the input checks
// shared by the CPU (ops_cpu.cpp) and CUDA (ops_cuda.cu) implementations.
#include <Python.h>

#include <sstream>
#include <string>

#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include "lt_ops.h"

extern "C" PyObject* PyInit__C(void) {
  // Importing the module loads this library, whose static initializers register the ops with the dispatcher;
  // the module itself holds nothing.
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "lt_recipes fused ops (registered in torch.ops.lt_recipes)",
                               -1, nullptr};
  return PyModule_Create(&module);
}

namespace lt_recipes {
namespace {

std::string describe(const at::Tensor& t) {
  std::ostringstream s;
  s << "shape " << t.sizes() << " dtype " << t.scalar_type() << " on " << t.device()
    << (t.is_contiguous() ? "" : " (non-contiguous)");
  return s.str();
}

bool dtype_in(at::ScalarType t, std::initializer_list<at::ScalarType> allowed) {
  for (auto a : allowed) {
    if (a == t) return true;
  }
  return false;
}

// A tensor argument with `ndim` dimensions, one of `dtypes`, on `device`, contiguous.
void check_arg(const char* op, const char* name, const at::Tensor& t, int64_t ndim, const char* what,
               std::initializer_list<at::ScalarType> dtypes, const at::Device& device) {
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a tensor, got an undefined tensor");
  TORCH_CHECK(t.dim() == ndim && dtype_in(t.scalar_type(), dtypes), op, ": ", name, " must be a ", what,
              ", got ", describe(t));
  TORCH_CHECK(t.device() == device, op, ": ", name, " must be on ", device, " like the first argument, got ",
              describe(t));
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous, got ", describe(t));
}

void check_len(const char* op, const char* name, const at::Tensor& t, int64_t expected, const char* from) {
  TORCH_CHECK(t.size(0) == expected, op, ": ", name, " must have length ", expected, " (", from, "), got ",
              describe(t));
}

void check_groups(const char* op, int64_t groups) {
  TORCH_CHECK(groups >= 1 && groups <= kMaxGroups, op, ": the fused kernels take 1 to ", kMaxGroups,
              " groups, got ", groups);
}

}  // namespace

void check_gsa_project(const at::Tensor& grads, const at::Tensor& weights, const at::Tensor& global_grad) {
  const char* op = "gsa_project";
  check_arg(op, "grads", grads, 2, "2-D float32 tensor [G, d]", {at::kFloat}, grads.device());
  check_groups(op, grads.size(0));
  check_arg(op, "weights", weights, 1, "1-D float32 tensor [G]", {at::kFloat}, grads.device());
  check_len(op, "weights", weights, grads.size(0), "G, the rows of grads");
  check_arg(op, "out", global_grad, 1, "1-D float32 tensor [d]", {at::kFloat}, grads.device());
  check_len(op, "out", global_grad, grads.size(1), "d, the columns of grads");
  TORCH_CHECK(at::get_overlap_status(global_grad, grads) == at::MemOverlapStatus::No, op,
              ": out must not share memory with grads");
}

void check_gkp(const at::Tensor& theta, const at::Tensor& anchors, const at::Tensor& fisher, const at::Tensor& coef,
               const at::Tensor* grad_out) {
  const char* op = "gkp_penalty";
  const auto stored = {at::kFloat, at::kBFloat16, at::kHalf};
  check_arg(op, "theta", theta, 1, "1-D float32 tensor [d]", {at::kFloat}, theta.device());
  const int64_t d = theta.size(0);
  check_arg(op, "anchors", anchors, 2, "2-D float32, bfloat16 or float16 tensor [G, d]", stored, theta.device());
  check_groups(op, anchors.size(0));
  TORCH_CHECK(anchors.size(1) == d, op, ": anchors must have ", d, " columns (d, the length of theta), got ",
              describe(anchors));
  check_arg(op, "fisher", fisher, 2, "2-D float32, bfloat16 or float16 tensor [G, d]", stored, theta.device());
  TORCH_CHECK(fisher.sizes() == anchors.sizes(), op, ": fisher must have the shape of anchors ", anchors.sizes(),
              ", got ", describe(fisher));
  check_arg(op, "coef", coef, 1, "1-D float32 tensor [G]", {at::kFloat}, theta.device());
  check_len(op, "coef", coef, anchors.size(0), "G, the rows of anchors");
  if (grad_out != nullptr) {
    check_arg(op, "grad_out", *grad_out, 1, "1-D float32 tensor [d]", {at::kFloat}, theta.device());
    check_len(op, "grad_out", *grad_out, d, "d, the length of theta");
  }
}

}  // namespace lt_recipes

TORCH_LIBRARY(lt_recipes, m) {
  // Writes global_grad = sum_g weights_g grads_g; returns coef_g = <grads_g, global_grad> / ||global_grad||^2
  // (0 when that is 0) and residual_norm_g = ||grads_g - coef_g global_grad||.
  m.def("gsa_project(Tensor grads, Tensor weights, Tensor(a!) global_grad) -> (Tensor coef, Tensor residual_norm)");
  // sum_j coef_j sum_i fisher_ji (theta_i - anchors_ji)^2.
  m.def("gkp_penalty(Tensor theta, Tensor anchors, Tensor fisher, Tensor coef) -> Tensor");
  // The same value; also grad_out += 2 sum_j coef_j fisher_ji (theta_i - anchors_ji), in the same pass.
  m.def("gkp_penalty_accumulate(Tensor theta, Tensor anchors, Tensor fisher, Tensor coef, Tensor(a!) grad_out) "
        "-> Tensor");
}
