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

  // K-FAC (MATH.md section 2). Batched over B same-shape problems; the Python layer (pycurv/ops.py) adds and
  // removes the batch dimension and validates everything first.
  // factor: (B, d, d) float32/float64, contiguous, updated in place; x: (B, R, d_x) any float dtype and strides,
  // d = d_x + bias. factor <- decay * factor + (1 - decay) * xb^T xb / R, xb = [x, 1]; decay == 0 never reads
  // factor (so NaN/garbage in it is overwritten). Exactly symmetric result.
  m.def("kfac_factor_update(Tensor(a!) factor, Tensor x, float decay, bool bias) -> ()");
  // m: (B, d, d) float32/float64 (lower triangle read); damping: (B,) float64 on m's device.
  // Returns ((m + damping I)^-1 as m's dtype, exactly symmetric; info (B,) int32: 0 ok, k > 0 the k-th leading
  // minor is not positive definite / the iteration did not converge). method: "cholesky" | "eigh" |
  // "newton_schulz"; a kernel may implement a subset and says so in its error.
  m.def("damped_inverse(Tensor m, Tensor damping, str method) -> (Tensor, Tensor)");
  // m: (B, d, d) float32/float64 symmetric (lower triangle read). Returns (eigenvalues (B, d) ascending,
  // eigenvectors (B, d, d) as columns), m's dtype.
  m.def("sym_eig(Tensor m) -> (Tensor, Tensor)");
  // grad: (B, d_out, d_in), g_inv: (B, d_out, d_out), a_inv: (B, d_in, d_in), one float dtype.
  // Returns g_inv @ grad @ a_inv (B, d_out, d_in), accumulated in float32 (float64 for float64), grad's dtype.
  m.def("kron_precondition(Tensor grad, Tensor g_inv, Tensor a_inv) -> Tensor");
  // Eigenbasis form: q_g (B, d_out, d_out), q_a (B, d_in, d_in), d_g (B, d_out), d_a (B, d_in), damping (B,)
  // float64. Returns q_g [(q_g^T grad q_a) / (d_g d_a^T + damping)] q_a^T, grad's dtype.
  m.def(
      "kron_precondition_eigen(Tensor grad, Tensor q_g, Tensor q_a, Tensor d_g, Tensor d_a, Tensor damping) -> "
      "Tensor");

  // iEF / EF / SF (MATH.md section 3).
  // a: (N, T, d_in), g: (N, T, d_out) one float dtype, any strides; coef: (N,) float32 (float64 for float64
  // inputs) on a's device. Returns sum_n coef_n G_n = sum_{n,t} coef_n g[n,t] a[n,t]^T, (d_out, d_in + bias),
  // float32 (float64), the bias column sum_{n,t} coef_n g[n,t] last; no G_n is formed.
  m.def("weighted_grad_sum(Tensor a, Tensor g, Tensor coef, bool bias) -> Tensor");
  // logits: (N, T, C) float dtype, any strides; targets: (N, T) int64, each in [0, C) or == ignore_index (the
  // Python layer checks). Returns s_n = sum_t ||softmax(z_nt) - e_{y_nt}||^2 over non-ignored t, (N,) float32
  // (float64 for float64 logits), computed as (1 - p_y)^2 + sum_{c != y} p_c^2 with both sums over c != y
  // accumulated directly, so that nothing cancels when p_y is close to 1.
  m.def("logit_grad_sqnorms(Tensor logits, Tensor targets, int ignore_index) -> Tensor");

  // FOP (MATH.md section 4). m: (B, k, k) float32/float64, contiguous, updated in place; grad_prev, grad_cur:
  // (B, r, k) one float dtype (float64 with a float64 m), any strides.
  // m <- m + lr * hyper_lr * (grad_prev^T grad_cur + grad_cur^T grad_prev) m, the k x k product accumulated in
  // float32 (float64) and the product with the old m taken before m is overwritten.
  m.def("fop_update(Tensor(a!) m, Tensor grad_prev, Tensor grad_cur, float lr, float hyper_lr) -> ()");
  // m: (B, k, k) float32/float64; grad: (B, r, k) any float dtype and strides. Returns grad (m m^T), (B, r, k) in
  // grad's dtype, accumulated in float32 (float64).
  m.def("fop_precondition(Tensor m, Tensor grad) -> Tensor");
}

}  // namespace pycurv
