// Python module `lt_recipes._C` and the input checks shared by the CPU (ops_cpu.cpp) and CUDA (ops_cuda.cu)
// kernels. The op schemas of the `lt_recipes` torch.library namespace, and their fake kernels, are defined in
// lt_recipes/ops.py; this library only implements them (TORCH_LIBRARY_IMPL).
#include <Python.h>

#include <algorithm>
#include <sstream>
#include <string>
#include <vector>

#include <ATen/MemoryOverlap.h>

#include "lt_ops.h"

extern "C" PyObject* PyInit__C(void) {
  // Importing the module loads this library, whose static initializers register the kernels with the dispatcher;
  // the module itself holds the kernels' group limit, MAX_GROUPS.
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                               "lt_recipes fused ops (kernels of torch.ops.lt_recipes; MAX_GROUPS: most groups a "
                               "kernel takes)",
                               -1, nullptr};
  PyObject* m = PyModule_Create(&module);
  if (m != nullptr && PyModule_AddIntConstant(m, "MAX_GROUPS", static_cast<long>(lt_recipes::kMaxGroups)) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}

namespace lt_recipes {
namespace {

std::string describe(const at::Tensor& t) {
  std::ostringstream s;
  s << "shape " << t.sizes() << " dtype " << t.scalar_type() << " on " << t.device()
    << (t.is_contiguous() ? "" : " (non-contiguous)");
  return s.str();
}

bool dtype_in(at::ScalarType t, const std::vector<at::ScalarType>& allowed) {
  return std::find(allowed.begin(), allowed.end(), t) != allowed.end();
}

// "float32" or "float64": the name lt_recipes/ops.py gives a compute dtype in its messages.
std::string dtype_name(at::ScalarType t) { return t == at::kDouble ? "float64" : "float32"; }

// A tensor argument with `ndim` dimensions, one of `dtypes`, `length` rows when length >= 0 (`from` says why), on
// `device`, contiguous; checked in that order, as _check of lt_recipes/ops.py does.
void check_arg(const char* op, const char* name, const at::Tensor& t, int64_t ndim, const std::string& what,
               const std::vector<at::ScalarType>& dtypes, const at::Device& device, int64_t length = -1,
               const char* from = "") {
  TORCH_CHECK_VALUE(t.defined(), op, ": ", name, " must be a tensor, got an undefined tensor");
  TORCH_CHECK_VALUE(t.dim() == ndim && dtype_in(t.scalar_type(), dtypes), op, ": ", name, " must be a ", what,
                    ", got ", describe(t));
  TORCH_CHECK_VALUE(length < 0 || t.size(0) == length, op, ": ", name, " must have length ", length, " (", from,
                    "), got ", describe(t));
  TORCH_CHECK_VALUE(t.device() == device, op, ": ", name, " must be on ", device, " like the first argument, got ",
                    describe(t));
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous, got ", describe(t));
}

void check_groups(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.size(0) >= 1, op, ": ", name, " must have at least one row (group), got ", describe(t));
  TORCH_CHECK_VALUE(t.size(0) <= kMaxGroups, op, ": the fused kernels take at most ", kMaxGroups, " groups, got ",
                    t.size(0), " (the reference backend takes any number)");
}

}  // namespace

void check_gsa_project(const at::Tensor& grads, const at::Tensor& weights, const at::Tensor& global_grad) {
  const char* op = "gsa_project";
  check_arg(op, "grads", grads, 2, "2-D float32 or float64 tensor [G, d]", {at::kFloat, at::kDouble}, grads.device());
  check_groups(op, "grads", grads);
  const at::ScalarType t = grads.scalar_type();
  const std::string dt = dtype_name(t);
  check_arg(op, "weights", weights, 1, "1-D " + dt + " tensor [G]", {t}, grads.device(), grads.size(0),
            "G, the rows of grads");
  check_arg(op, "out", global_grad, 1, "1-D " + dt + " tensor [d]", {t}, grads.device(), grads.size(1),
            "d, the columns of grads");
  TORCH_CHECK_VALUE(at::get_overlap_status(global_grad, grads) == at::MemOverlapStatus::No, op,
                    ": out must not share memory with grads");
}

void check_gkp(const at::Tensor& theta, const at::Tensor& anchors, const at::Tensor& fisher, const at::Tensor& coef,
               const at::Tensor* grad_out) {
  const char* op = "gkp_penalty";
  check_arg(op, "theta", theta, 1, "1-D float32 or float64 tensor [d]", {at::kFloat, at::kDouble}, theta.device());
  const at::ScalarType t = theta.scalar_type();
  const std::string dt = dtype_name(t);
  // float64 anchors and Fisher only on the float64 path; narrower storage on both
  const bool wide = t == at::kDouble;
  const std::vector<at::ScalarType> stored =
      wide ? std::vector<at::ScalarType>{at::kDouble, at::kFloat, at::kBFloat16, at::kHalf}
           : std::vector<at::ScalarType>{at::kFloat, at::kBFloat16, at::kHalf};
  const std::string what =
      std::string("2-D ") + (wide ? "float64, " : "") + "float32, bfloat16 or float16 tensor [G, d]";
  const int64_t d = theta.size(0);
  check_arg(op, "anchors", anchors, 2, what, stored, theta.device());
  TORCH_CHECK_VALUE(anchors.size(1) == d, op, ": anchors must have ", d, " columns (d, the length of theta), got ",
                    describe(anchors));
  check_groups(op, "anchors", anchors);
  check_arg(op, "fisher", fisher, 2, what, stored, theta.device());
  TORCH_CHECK_VALUE(fisher.sizes() == anchors.sizes(), op, ": fisher must have the shape of anchors ",
                    anchors.sizes(), ", got ", describe(fisher));
  check_arg(op, "coef", coef, 1, "1-D " + dt + " tensor [G]", {t}, theta.device(), anchors.size(0),
            "G, the rows of anchors");
  if (grad_out != nullptr) {
    check_arg(op, "grad_out", *grad_out, 1, "1-D " + dt + " tensor [d]", {t}, theta.device(), d,
              "d, the length of theta");
  }
}

}  // namespace lt_recipes
