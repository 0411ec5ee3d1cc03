// CPU kernels for per-sample gradient products (MATH.md section 1). Placeholder: ATen formulation.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "pycurv.h"

namespace pycurv {

at::Tensor per_sample_grad_sqnorms_cpu(const at::Tensor& a, const at::Tensor& g, bool bias, c10::string_view method) {
  check_ag(a, g, "per_sample_grad_sqnorms");
  bool ghost = parse_method_is_ghost(method, "per_sample_grad_sqnorms");
  auto dt = acc_dtype(a.scalar_type());
  auto a3 = a.to(dt), g3 = g.to(dt);
  at::Tensor s = ghost ? (at::bmm(a3, a3.transpose(1, 2)) * at::bmm(g3, g3.transpose(1, 2))).sum({1, 2})
                       : at::bmm(g3.transpose(1, 2), a3).square().sum({1, 2});
  if (bias) s = s + g3.sum(1).square().sum(1);
  return s;
}

at::Tensor per_sample_gram_cpu(const at::Tensor& a, const at::Tensor& g, bool bias, c10::string_view method) {
  check_ag(a, g, "per_sample_gram");
  bool ghost = parse_method_is_ghost(method, "per_sample_gram");
  auto dt = acc_dtype(a.scalar_type());
  auto a3 = a.to(dt), g3 = g.to(dt);
  int64_t n = a3.size(0), t = a3.size(1);
  at::Tensor k;
  if (ghost) {
    auto af = a3.reshape({n * t, -1}), gf = g3.reshape({n * t, -1});
    k = (at::mm(af, af.t()) * at::mm(gf, gf.t())).view({n, t, n, t}).sum({1, 3});
  } else {
    auto j = at::bmm(g3.transpose(1, 2), a3).reshape({n, -1});
    k = at::mm(j, j.t());
  }
  if (bias) {
    auto gs = g3.sum(1);
    k = k + at::mm(gs, gs.t());
  }
  return k;
}

at::Tensor ef_diag_cpu(const at::Tensor& a, const at::Tensor& g, bool bias) {
  check_ag(a, g, "ef_diag");
  auto dt = acc_dtype(a.scalar_type());
  auto a3 = a.to(dt), g3 = g.to(dt);
  auto d = at::bmm(g3.transpose(1, 2), a3).square().sum(0);
  if (bias) d = at::cat({d, g3.sum(1).square().sum(0).unsqueeze(1)}, 1);
  return d;
}

TORCH_LIBRARY_IMPL(pycurv, CPU, m) {
  m.impl("per_sample_grad_sqnorms", &per_sample_grad_sqnorms_cpu);
  m.impl("per_sample_gram", &per_sample_gram_cpu);
  m.impl("ef_diag", &ef_diag_cpu);
}

}  // namespace pycurv
