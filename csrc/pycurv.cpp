// Operator schemas of pycurv (one place for all devices) and the input checks they share.
// Device implementations: csrc/cpu/*.cpp (CPU), csrc/cuda/*.cu (CUDA). Fake (meta) kernels: pycurv/_meta.py.
#include <Python.h>

#include <torch/library.h>

#include "pycurv.h"

extern "C" {
// `import pycurv._C` loads this shared object, which runs the TORCH_LIBRARY static initialisers below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace pycurv {

static bool is_float(c10::ScalarType t) {
  return t == c10::kFloat || t == c10::kDouble || t == c10::kHalf || t == c10::kBFloat16;
}

void check_ag(const at::Tensor& a, const at::Tensor& g, const char* op) {
  TORCH_CHECK_VALUE(a.dim() == 3, op, ": a must be (N, T, d_in), got ", a.dim(), "-d tensor of shape ", a.sizes());
  TORCH_CHECK_VALUE(g.dim() == 3, op, ": g must be (N, T, d_out), got ", g.dim(), "-d tensor of shape ", g.sizes());
  TORCH_CHECK_TYPE(is_float(a.scalar_type()), op, ": a must be float32/float64/float16/bfloat16, got ",
                   a.scalar_type());
  TORCH_CHECK_TYPE(g.scalar_type() == a.scalar_type(), op, ": g must have a's dtype ", a.scalar_type(), ", got ",
                   g.scalar_type());
  TORCH_CHECK_VALUE(a.device() == g.device(), op, ": a and g must be on one device, got a on ", a.device(),
                    " and g on ", g.device());
  TORCH_CHECK_VALUE(a.size(0) == g.size(0), op, ": a and g must have the same N, got a ", a.sizes(), " and g ",
                    g.sizes());
  TORCH_CHECK_VALUE(a.size(1) == g.size(1), op, ": a and g must have the same T, got a ", a.sizes(), " and g ",
                    g.sizes());
}

bool parse_method_is_ghost(c10::string_view method, const char* op) {
  if (method == "ghost") return true;
  if (method == "materialize") return false;
  TORCH_CHECK_VALUE(false, op, ": method must be 'ghost' or 'materialize', got '", std::string(method), "'");
  return false;
}

TORCH_LIBRARY(pycurv, m) {
  // Per-sample gradient products (MATH.md section 1). a: (N, T, d_in), g: (N, T, d_out), any strides.
  m.def("per_sample_grad_sqnorms(Tensor a, Tensor g, bool bias, str method) -> Tensor");
  m.def("per_sample_gram(Tensor a, Tensor g, bool bias, str method) -> Tensor");
  m.def("ef_diag(Tensor a, Tensor g, bool bias) -> Tensor");
}

}  // namespace pycurv
