// Shared declarations for pycurv's C++ ops: input checks used by every device implementation.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace pycurv {

// float64 inputs accumulate and return in float64; float32/float16/bfloat16 accumulate and return in float32.
inline c10::ScalarType acc_dtype(c10::ScalarType t) {
  return t == c10::kDouble ? c10::kDouble : c10::kFloat;
}

// a: (N, T, d_in), g: (N, T, d_out), same floating dtype and device (the Python layer turns 2-D inputs into
// T = 1). Errors name the op, the argument and what it got.
void check_ag(const at::Tensor& a, const at::Tensor& g, const char* op);

// "ghost" -> true, "materialize" -> false, anything else is an error naming `method`.
bool parse_method_is_ghost(c10::string_view method, const char* op);

}  // namespace pycurv
