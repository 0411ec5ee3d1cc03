// CPU kernels of the FOP family (MATH.md section 4; Moskovitz et al. 2019).
//
// fop_update: m <- m + lr hyper_lr S m with S = C + C^T, C = G_prev^T G_cur (one k x k product per matrix; S's
//   symmetry costs nothing more). Small k (conv taps: few small matrices, many rows): the r rows are cut into a
//   number of splits fixed by the shapes alone, so that batch x splits gives the threads enough independent work;
//   large k: C is cut into column tiles instead (float32 / float64 gradients with large k: one batched BLAS GEMM,
//   threaded by BLAS itself). Every (matrix, split, tile) multiplies its rows chunk by chunk (ATen's matmul on
//   the calling thread, float32 or float64 accumulation) into its own partial C, and the partials are summed in
//   split order: deterministic for any thread count. float32 / float64 gradients are read in place with their
//   own strides; float16 / bfloat16 chunks are converted to float32 while they are cut (an L2-sized buffer per
//   thread, never a copy of a whole gradient). The old m is read fully before it is overwritten (S m goes to a
//   workspace), and lr hyper_lr = 0 returns before anything is read.
// fop_precondition: G m m^T = G + G D with D = m m^T - I formed once per matrix, so that m = I gives G back
//   exactly; chunks of rows of every matrix run in parallel, each one G-chunk product (16-bit chunks converted to
//   float32 first and rounded back at the end).
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "cpu/gemm.h"
#include "pycurv.h"

namespace pycurv {
namespace {

using namespace cpu;
using at::Half;

// Elements of one converted chunk (per operand; about L2), and the fewest rows of a chunk (the K of its GEMM).
constexpr int64_t kChunkElems = int64_t(1) << 16;
constexpr int64_t kMinChunkRows = 256;
// Order of C beyond which C is cut into column tiles (of half that width; no split of the rows then), and the
// work items the splits aim for.
constexpr int64_t kTile = 256;
constexpr int64_t kTargetItems = 16;
// Fewest multiply-adds per split of the rows (smaller splits cost more in partial sums than they gain), and the
// most memory the partial sums may take.
constexpr int64_t kMinSplitFlops = int64_t(1) << 20;
constexpr int64_t kMaxPartialBytes = int64_t(32) << 20;

inline int64_t chunk_rows(int64_t k) { return std::max(kMinChunkRows, kChunkElems / std::max<int64_t>(k, 1)); }

#ifdef PYCURV_CPU_AVX2
__attribute__((target("avx2,f16c"))) inline __m256 load8h(const Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

__attribute__((target("avx2,f16c"))) void widen_row_avx2(const Half* s, int64_t n, float* d) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(d + i, load8h(s + i));
  for (; i < n; ++i) d[i] = static_cast<float>(s[i]);
}

__attribute__((target("avx2"))) void widen_row_avx2(const BFloat16* s, int64_t n, float* d) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(d + i, load8f(s + i));
  for (; i < n; ++i) d[i] = static_cast<float>(s[i]);
}
#endif

// d (rows x cols, row-major, ld cols) = float32 of s(i, j) = s[i*rs + j*cs].
template <typename E>
void widen(const E* s, int64_t rs, int64_t cs, int64_t rows, int64_t cols, float* d) {
  if (cs == 1 && rs == cols && rows > 1) return widen(s, rows * cols, 1, 1, rows * cols, d);
  for (int64_t i = 0; i < rows; ++i) {
    const E* si = s + i * rs;
    float* di = d + i * cols;
#ifdef PYCURV_CPU_AVX2
    if (cs == 1 && cpu_avx2()) {
      widen_row_avx2(si, cols, di);
      continue;
    }
#endif
    for (int64_t j = 0; j < cols; ++j) di[j] = static_cast<float>(si[j * cs]);
  }
}

// d[i*rs + j*cs] = s (rows x cols, row-major) rounded to E.
template <typename E>
void narrow(const float* s, int64_t rows, int64_t cols, E* d, int64_t rs, int64_t cs) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) d[i * rs + j * cs] = static_cast<E>(s[i * cols + j]);
}

// A strided (B, r, k) operand of element type E.
template <typename E>
struct Grad {
  const E* p;
  int64_t sb, sr, sk;
};

template <typename E>
Grad<E> grad_view(const Tensor& g) {
  return {g.const_data_ptr<E>(), g.stride(0), g.stride(1), g.stride(2)};
}

// ---------------------------------------------------------------------------------------------------------------
// fop_update

struct UpdatePlan {
  int64_t tile, ntile, splits, split_rows;
};

UpdatePlan plan_update(int64_t B, int64_t r, int64_t k, int64_t elem) {
  UpdatePlan p;
  p.tile = k > kTile ? kTile / 2 : k;
  p.ntile = cdiv(k, p.tile);
  int64_t s = 1;
  if (p.ntile == 1) {
    // Few, small matrices with many rows (conv taps): split the rows.
    const int64_t min_rows = std::max<int64_t>(1, kMinSplitFlops / std::max<int64_t>(1, k * k));
    s = std::min(cdiv(kTargetItems, B), cdiv(r, min_rows));
    s = std::min(s, std::max<int64_t>(1, kMaxPartialBytes / std::max<int64_t>(1, B * k * k * elem)));
    s = std::max<int64_t>(1, s);
  }
  p.split_rows = cdiv(r, s);
  p.splits = cdiv(r, p.split_rows);
  return p;
}

// part[(b, s)] (k x k, contiguous) = G_prev[b, rows of s]^T G_cur[b, rows of s], T the accumulation dtype.
template <typename E, typename T>
void cross_products(Grad<E> gp, Grad<E> gc, int64_t B, int64_t r, int64_t k, const UpdatePlan& pl, T* part) {
  constexpr bool same = std::is_same_v<E, T>;
  const int64_t ntasks = B * pl.splits * pl.ntile;
  const int64_t rc = same ? pl.split_rows : chunk_rows(k);
  parallel_tiles(ntasks, num_threads(), [&](int64_t, auto&& next) {
    Buf<float> bp, bc;
    for (int64_t t = next(); t >= 0; t = next()) {
      const int64_t j = t % pl.ntile, s = (t / pl.ntile) % pl.splits, b = t / (pl.ntile * pl.splits);
      const int64_t c0 = j * pl.tile, cn = std::min(pl.tile, k - c0);
      const int64_t r0 = s * pl.split_rows, r1 = std::min(r, r0 + pl.split_rows);
      T* out = part + (b * pl.splits + s) * k * k + c0;
      const E* p = gp.p + b * gp.sb;
      const E* c = gc.p + b * gc.sb + c0 * gc.sk;
      for (int64_t i0 = r0; i0 < r1; i0 += rc) {
        const int64_t n = std::min(rc, r1 - i0);
        if constexpr (same) {
          gemm_aten<T>(k, cn, n, {p + i0 * gp.sr, gp.sk, gp.sr}, {c + i0 * gc.sr, gc.sr, gc.sk}, i0 > r0, out, k);
        } else {
          float* xp = bp.get(n * k);
          float* xc = bc.get(n * cn);
          widen(p + i0 * gp.sr, gp.sr, gp.sk, n, k, xp);
          widen(c + i0 * gc.sr, gc.sr, gc.sk, n, cn, xc);
          gemm_aten<float>(k, cn, n, {xp, 1, k}, {xc, cn, 1}, i0 > r0, out, k);
        }
      }
    }
  });
}

// s[b] = C + C^T with C the sum over the splits of part[b] in split order; blocks of kSymBlock^2 keep both
// orientations in cache. s may be part itself when there is one split (each pair (i, j), (j, i) is read before
// it is written).
constexpr int64_t kSymBlock = 32;

template <typename T>
void symmetrize(const T* part, int64_t B, int64_t splits, int64_t k, T* s) {
  const int64_t nb = cdiv(k, kSymBlock);
  at::parallel_for(0, B * nb, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / nb, i0 = (t % nb) * kSymBlock, i1 = std::min(k, i0 + kSymBlock);
      const T* pb = part + b * splits * k * k;
      T* sb = s + b * k * k;
      for (int64_t j0 = 0; j0 < i1; j0 += kSymBlock) {
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t j1 = std::min(i + 1, j0 + kSymBlock);
          for (int64_t j = j0; j < j1; ++j) {
            T cij = pb[i * k + j], cji = pb[j * k + i];
            for (int64_t q = 1; q < splits; ++q) {
              cij += pb[q * k * k + i * k + j];
              cji += pb[q * k * k + j * k + i];
            }
            sb[i * k + j] = sb[j * k + i] = cij + cji;
          }
        }
      }
    }
  });
}

template <typename E, typename T>
void update(const Tensor& m, const Tensor& gp, const Tensor& gc, double alpha) {
  const int64_t B = m.size(0), k = m.size(1), r = gp.size(1);
  const UpdatePlan pl = plan_update(B, r, k, sizeof(T));
  Tensor part;
  if (std::is_same_v<E, T> && pl.ntile > 1) {
    // One large GEMM per matrix on the gradients in place: BLAS's own threading does best.
    part = at::bmm(gp.mT(), gc).contiguous();
  } else {
    part = at::empty({B, pl.splits, k, k}, m.options());
    cross_products<E, T>(grad_view<E>(gp), grad_view<E>(gc), B, r, k, pl, part.data_ptr<T>());
  }
  Tensor s = pl.splits == 1 ? part.view({B, k, k}) : at::empty({B, k, k}, m.options());
  symmetrize<T>(part.data_ptr<T>(), B, pl.splits, k, s.data_ptr<T>());
  m.copy_(at::baddbmm(m, s, m, 1.0, alpha));
}

// ---------------------------------------------------------------------------------------------------------------
// fop_precondition

// out[b] = g[b] + g[b] d[b] over chunks of rows; d (B, k, k) contiguous in T.
template <typename E, typename T>
void precondition(Grad<E> g, const T* d, int64_t B, int64_t r, int64_t k, E* out) {
  constexpr bool same = std::is_same_v<E, T>;
  const int64_t rc = std::min(r, chunk_rows(k));
  const int64_t nch = cdiv(r, rc);
  parallel_tiles(B * nch, num_threads(), [&](int64_t, auto&& next) {
    Buf<float> bx, by;
    for (int64_t t = next(); t >= 0; t = next()) {
      const int64_t b = t / nch, i0 = (t % nch) * rc, n = std::min(rc, r - i0);
      const E* gi = g.p + b * g.sb + i0 * g.sr;
      E* oi = out + (b * r + i0) * k;
      const Mat<T> db{d + b * k * k, k, 1};
      if constexpr (same) {
        auto opt = at::TensorOptions().dtype(scalar_of<T>());
        at::from_blob(oi, {n, k}, {k, 1}, opt)
            .copy_(at::from_blob(const_cast<E*>(gi), {n, k}, {g.sr, g.sk}, opt));
        gemm_aten<T>(n, k, k, {gi, g.sr, g.sk}, db, true, oi, k);
      } else {
        float* x = bx.get(n * k);
        float* y = by.get(n * k);
        widen(gi, g.sr, g.sk, n, k, x);
        std::copy(x, x + n * k, y);
        gemm_aten<float>(n, k, k, {x, k, 1}, db, true, y, k);
        narrow(y, n, k, oi, k, 1);
      }
    }
  });
}

void check_grad(const Tensor& g, const char* name, const Tensor& m, const char* op) {
  check_cpu(g, op, name);
  TORCH_CHECK_VALUE(g.dim() == 3 && g.size(0) == m.size(0) && g.size(2) == m.size(1), op, ": ", name,
                    " must be (B=", m.size(0), ", r, k=", m.size(1), ") for m of shape ", m.sizes(), ", got shape ",
                    g.sizes());
  TORCH_CHECK_TYPE(is_float_type(g.scalar_type()), op, ": ", name, " must be float32/float64/float16/bfloat16, got ",
                   g.scalar_type());
}

void check_m(const Tensor& m, const char* op) {
  check_cpu(m, op, "m");
  TORCH_CHECK_VALUE(m.dim() == 3 && m.size(1) == m.size(2), op, ": m must be (B, k, k), got shape ", m.sizes());
  TORCH_CHECK_TYPE(m.scalar_type() == c10::kFloat || m.scalar_type() == c10::kDouble, op,
                   ": m must be float32 or float64, got ", m.scalar_type());
}

}  // namespace

void fop_update_cpu(const at::Tensor& m, const at::Tensor& grad_prev, const at::Tensor& grad_cur, double lr,
                    double hyper_lr) {
  const char* op = "fop_update";
  check_m(m, op);
  TORCH_CHECK_VALUE(m.is_contiguous(), op, ": m must be contiguous, got strides ", m.strides());
  check_grad(grad_prev, "grad_prev", m, op);
  check_grad(grad_cur, "grad_cur", m, op);
  TORCH_CHECK_VALUE(grad_prev.sizes() == grad_cur.sizes(), op, ": grad_prev and grad_cur must have one shape, got ",
                    grad_prev.sizes(), " and ", grad_cur.sizes());
  TORCH_CHECK_TYPE(grad_prev.scalar_type() == grad_cur.scalar_type(), op,
                   ": grad_prev and grad_cur must have one dtype, got ", grad_prev.scalar_type(), " and ",
                   grad_cur.scalar_type());
  TORCH_CHECK_TYPE((grad_prev.scalar_type() == c10::kDouble) == (m.scalar_type() == c10::kDouble), op,
                   ": grad_prev / grad_cur and m must both be float64 or neither, got gradients ",
                   grad_prev.scalar_type(), " and m ", m.scalar_type());
  TORCH_CHECK_VALUE(std::isfinite(lr) && lr >= 0.0, op, ": lr must be a finite number >= 0, got ", lr);
  TORCH_CHECK_VALUE(std::isfinite(hyper_lr) && hyper_lr >= 0.0, op, ": hyper_lr must be a finite number >= 0, got ",
                    hyper_lr);
  const double alpha = lr * hyper_lr;
  if (alpha == 0.0 || m.numel() == 0 || grad_prev.size(1) == 0) return;
  at::assert_no_overlap(m, grad_prev);
  at::assert_no_overlap(m, grad_cur);
  switch (grad_prev.scalar_type()) {
    case c10::kDouble:
      return update<double, double>(m, grad_prev, grad_cur, alpha);
    case c10::kFloat:
      return update<float, float>(m, grad_prev, grad_cur, alpha);
    case c10::kBFloat16:
      return update<BFloat16, float>(m, grad_prev, grad_cur, alpha);
    default:
      return update<Half, float>(m, grad_prev, grad_cur, alpha);
  }
}

at::Tensor fop_precondition_cpu(const at::Tensor& m, const at::Tensor& grad) {
  const char* op = "fop_precondition";
  check_m(m, op);
  check_grad(grad, "grad", m, op);
  TORCH_CHECK_TYPE(grad.scalar_type() != c10::kDouble || m.scalar_type() == c10::kDouble, op,
                   ": a float64 grad needs a float64 m, got m ", m.scalar_type());
  Tensor out = at::empty(grad.sizes(), grad.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const int64_t B = m.size(0), k = m.size(1), r = grad.size(1);
  // D = m m^T - I in m's precision, then in the accumulation dtype.
  Tensor d = at::bmm(m, m.mT());
  d.diagonal(0, 1, 2).sub_(1.0);
  d = d.to(acc_dtype(grad.scalar_type())).contiguous();
  switch (grad.scalar_type()) {
    case c10::kDouble:
      precondition<double, double>(grad_view<double>(grad), d.const_data_ptr<double>(), B, r, k,
                                   out.data_ptr<double>());
      break;
    case c10::kFloat:
      precondition<float, float>(grad_view<float>(grad), d.const_data_ptr<float>(), B, r, k, out.data_ptr<float>());
      break;
    case c10::kBFloat16:
      precondition<BFloat16, float>(grad_view<BFloat16>(grad), d.const_data_ptr<float>(), B, r, k,
                                    out.data_ptr<BFloat16>());
      break;
    default:
      precondition<Half, float>(grad_view<Half>(grad), d.const_data_ptr<float>(), B, r, k, out.data_ptr<Half>());
  }
  return out;
}

}  // namespace pycurv

TORCH_LIBRARY_IMPL(pycurv, CPU, m) {
  m.impl("fop_update", &pycurv::fop_update_cpu);
  m.impl("fop_precondition", &pycurv::fop_precondition_cpu);
}
