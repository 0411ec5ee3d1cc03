// CPU kernels of the FOP family (MATH.md section 4; Moskovitz et al. 2019).
//
// fop_update: m <- m + lr hyper_lr S m with S = C + C^T, C = G_prev^T G_cur (one k x k product per matrix; S's
//   symmetry costs nothing more). With r < k / 3 (and k past the small-k loops) S m is formed as
//   G_prev^T (G_cur m) + G_cur^T (G_prev m) instead, never forming S (see update). Small k (conv taps: few small matrices, many rows): the r rows are cut into a
//   number of splits fixed by the shapes alone, so that batch x splits gives the threads enough independent work;
//   large k: C is cut into column tiles instead (float32 / float64 gradients with large k: one batched BLAS GEMM,
//   threaded by BLAS itself). Every (matrix, split, tile) multiplies its rows chunk by chunk (ATen's matmul on
//   the calling thread, float32 or float64 accumulation) into its own partial C, and the partials are summed in
//   split order: deterministic for any thread count. For k <= 12 (float32 accumulation, AVX2) the chunks run
//   through loops of broadcasts and FMAs over the rows instead of a GEMM (see small_cross_avx2), at close to the
//   memory bandwidth. float32 / float64 gradients are read in place with their own strides; float16 / bfloat16
//   chunks are converted to float32 while they are cut (an L2-sized buffer per thread, never a copy of a whole
//   gradient). The old m is read fully before it is overwritten (S m goes to a
//   workspace), and lr hyper_lr = 0 returns before anything is read.
// fop_precondition: G m m^T = G + G D with D = m m^T - I formed once per matrix, so that m = I gives G back
//   exactly; chunks of rows of every matrix run in parallel, each one G-chunk product (16-bit chunks converted to
//   float32 first and rounded back at the end); for k <= 12 the AVX2 loops of small_precondition_avx2 instead.
//   With fewer rows than columns (r < k, a linear layer's input side wider than its output), (G m) m^T costs less
//   than forming D: see precondition_thin.
// PYCURV_CPU_SMALLK=0 turns the small-k loops off (for comparison).
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <utility>

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

// Small k (conv taps; k <= 12): AVX2 loops over the rows as they stream past, in place of a GEMM whose M and N are
// k (a BLAS GEMM with k = 9 runs far below the memory bandwidth these ops are bound by; from k = 16 on it does as
// well as these loops). float32 rows with unit column stride; 16-bit gradients are widened chunk by chunk first.
constexpr int64_t kSmallK = 12;
// Rows of one chunk of the small-k cross products: both operands' chunks stay in L1 / L2 across the passes.
inline int64_t small_chunk_rows(int64_t k) { return std::max<int64_t>(16, 4096 / k); }

#ifdef PYCURV_CPU_AVX2
__attribute__((target("avx2"))) inline __m256i lane_mask(int64_t w) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(w)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// One pass over n rows: acc[a][l] = sum_rows x[row, a] * y[row, l] for a < NA and the w <= 8 lanes l of one vector
// of y (x and y point at the first column used, rows ldx / ldy apart): one load and NA broadcasts for NA FMAs a
// row. The sums are added to out[a * sa + l * sl].
template <int NA, bool Full>
__attribute__((target("avx2,fma"))) void cross_pass(const float* x, int64_t ldx, const float* y, int64_t ldy,
                                                    int64_t n, int64_t w, float* out, int64_t sa, int64_t sl) {
  const __m256i mask = lane_mask(w);
  __m256 acc[NA];
  for (int a = 0; a < NA; ++a) acc[a] = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; ++i, x += ldx, y += ldy) {
    const __m256 v = Full ? _mm256_loadu_ps(y) : _mm256_maskload_ps(y, mask);
    for (int a = 0; a < NA; ++a) acc[a] = _mm256_fmadd_ps(_mm256_broadcast_ss(x + a), v, acc[a]);
  }
  alignas(32) float t[8];
  for (int a = 0; a < NA; ++a) {
    _mm256_store_ps(t, acc[a]);
    for (int64_t l = 0; l < w; ++l) out[a * sa + l * sl] += t[l];
  }
}

template <int NA>
void cross_pass_w(const float* x, int64_t ldx, const float* y, int64_t ldy, int64_t n, int64_t w, float* out,
                  int64_t sa, int64_t sl) {
  if (w == 8) return cross_pass<NA, true>(x, ldx, y, ldy, n, w, out, sa, sl);
  cross_pass<NA, false>(x, ldx, y, ldy, n, w, out, sa, sl);
}

using CrossPassFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, int64_t, float*, int64_t,
                             int64_t);

template <int... I>
constexpr std::array<CrossPassFn, sizeof...(I)> cross_passes(std::integer_sequence<int, I...>) {
  return {&cross_pass_w<I + 1>...};
}

// sum_i x[i] y[i] over contiguous x, y (k = 1 with unit row strides: the cross product is a dot product).
__attribute__((target("avx2,fma"))) float dot_avx2(const float* x, const float* y, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8), _mm256_loadu_ps(y + i + 8), s1);
    s2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 16), _mm256_loadu_ps(y + i + 16), s2);
    s3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 24), _mm256_loadu_ps(y + i + 24), s3);
  }
  for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i), s0);
  alignas(32) float t[8];
  _mm256_store_ps(t, _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
  float s = ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
  for (; i < n; ++i) s += x[i] * y[i];
  return s;
}

// c (k x k, row-major) += p^T q over n rows of p and q (n x k, k <= 12, unit column stride, rows ldp / ldq apart).
// The first 8 columns of c (k >= 8): every row of c broadcast from p against 8 columns of q, one pass; the last
// k % 8 columns the other way round (8 rows of c a pass, broadcast from q), so no pass wastes more than one partial
// vector per row.
void small_cross_avx2(const float* p, int64_t ldp, const float* q, int64_t ldq, int64_t n, int64_t k, float* c) {
  static constexpr auto passes = cross_passes(std::make_integer_sequence<int, kSmallK>{});
  if (k == 1 && ldp == 1 && ldq == 1) {
    c[0] += dot_avx2(p, q, n);
    return;
  }
  const int64_t kv = k / 8 * 8, kr = k - kv;
  if (kv) passes[k - 1](p, ldp, q, ldq, n, 8, c, k, 1);
  if (kr == 0) return;
  for (int64_t a0 = 0; a0 < k; a0 += 8)
    passes[kr - 1](q + kv, ldq, p + a0, ldp, n, std::min<int64_t>(8, k - a0), c + a0 * k + kv, 1, k);
}

// R rows of o (rows k apart) = g + g d for k <= 8 NB: d is padded to kp = 8 NB columns (zeros beyond k), rows of
// g ldg apart. Every row of d loaded serves R broadcasts. A last, partial column block of w lanes is loaded and
// stored whole: it reads 8 - w elements past the row's end in g and writes them past the row's end in o, over rows
// the caller writes afterwards. Safe (one row): masked loads and a partial store instead, for the rows near the end
// of the caller's range.
template <int NB, int R, bool Safe>
__attribute__((target("avx2,fma"))) void precondition_group(const float* g, int64_t ldg, const float* d, int64_t kp,
                                                            int64_t k, float* o) {
  const int64_t w = k - 8 * (NB - 1);
  const __m256i mask = lane_mask(w);
  __m256 acc[R][NB];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < NB; ++b)
      acc[r][b] = (Safe && b == NB - 1) ? _mm256_maskload_ps(g + r * ldg + 8 * b, mask)
                                        : _mm256_loadu_ps(g + r * ldg + 8 * b);
  for (int64_t j = 0; j < k; ++j) {
    __m256 dj[NB];
    for (int b = 0; b < NB; ++b) dj[b] = _mm256_loadu_ps(d + j * kp + 8 * b);
    for (int r = 0; r < R; ++r) {
      const __m256 x = _mm256_broadcast_ss(g + r * ldg + j);
      for (int b = 0; b < NB; ++b) acc[r][b] = _mm256_fmadd_ps(x, dj[b], acc[r][b]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < NB; ++b) {
      float* dst = o + r * k + 8 * b;
      if (Safe && b == NB - 1 && w < 8) {
        alignas(32) float t[8];
        _mm256_store_ps(t, acc[r][b]);
        std::copy(t, t + w, dst);
      } else {
        _mm256_storeu_ps(dst, acc[r][b]);
      }
    }
}

// o (n x k, row-major) = g + g d, rows of g ldg apart, d padded as for precondition_group. Rows go in ascending
// order, and the last rows, whose whole-block spill would reach past row n - 1, take the safe path.
template <int NB>
void precondition_rows(const float* g, int64_t ldg, const float* d, int64_t kp, int64_t n, int64_t k, float* o) {
  constexpr int R = 4;
  const int64_t w = k - 8 * (NB - 1);
  const int64_t fast = std::max<int64_t>(0, n - (w == 8 ? 0 : cdiv(8 - w, k)));
  int64_t i = 0;
  for (; i + R <= fast; i += R) precondition_group<NB, R, false>(g + i * ldg, ldg, d, kp, k, o + i * k);
  for (; i < fast; ++i) precondition_group<NB, 1, false>(g + i * ldg, ldg, d, kp, k, o + i * k);
  for (; i < n; ++i) precondition_group<NB, 1, true>(g + i * ldg, ldg, d, kp, k, o + i * k);
}

__attribute__((target("avx2,fma"))) void small_precondition_avx2(const float* g, int64_t ldg, const float* d,
                                                                 int64_t kp, int64_t n, int64_t k, float* o) {
  if (k == 1 && ldg == 1) {  // a scaling: o = g + g d_00
    const __m256 d0 = _mm256_set1_ps(d[0]);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      const __m256 x = _mm256_loadu_ps(g + i);
      _mm256_storeu_ps(o + i, _mm256_fmadd_ps(x, d0, x));
    }
    for (; i < n; ++i) o[i] = std::fma(g[i], d[0], g[i]);
    return;
  }
  if (k <= 8) return precondition_rows<1>(g, ldg, d, kp, n, k, o);
  precondition_rows<2>(g, ldg, d, kp, n, k, o);
}
#endif

// Whether the small-k loops run: float32 accumulation, k small, AVX2 present (PYCURV_CPU_SMALLK=0 turns them off,
// for comparison).
template <typename T>
bool use_small_k(int64_t k) {
#ifdef PYCURV_CPU_AVX2
  static const bool enabled = [] {
    const char* e = std::getenv("PYCURV_CPU_SMALLK");
    return !(e && std::string(e) == "0");
  }();
  return std::is_same_v<T, float> && k >= 1 && k <= kSmallK && cpu_avx2() && enabled;
#else
  return false;
#endif
}

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
  const bool small = pl.ntile == 1 && use_small_k<T>(k) && (!same || (gp.sk == 1 && gc.sk == 1));
  const int64_t rc = small ? small_chunk_rows(k) : same ? pl.split_rows : chunk_rows(k);
  parallel_tiles(ntasks, num_threads(), [&](int64_t, auto&& next) {
    Buf<float> bp, bc;
    for (int64_t t = next(); t >= 0; t = next()) {
      const int64_t j = t % pl.ntile, s = (t / pl.ntile) % pl.splits, b = t / (pl.ntile * pl.splits);
      const int64_t c0 = j * pl.tile, cn = std::min(pl.tile, k - c0);
      const int64_t r0 = s * pl.split_rows, r1 = std::min(r, r0 + pl.split_rows);
      T* out = part + (b * pl.splits + s) * k * k + c0;
      const E* p = gp.p + b * gp.sb;
      const E* c = gc.p + b * gc.sb + c0 * gc.sk;
#ifdef PYCURV_CPU_AVX2
      if constexpr (std::is_same_v<T, float>) {
        if (small) {
          std::fill(out, out + k * k, 0.0f);
          for (int64_t i0 = r0; i0 < r1; i0 += rc) {
            const int64_t n = std::min(rc, r1 - i0);
            if constexpr (same) {
              small_cross_avx2(p + i0 * gp.sr, gp.sr, c + i0 * gc.sr, gc.sr, n, k, out);
            } else {
              float* xp = bp.get(n * k);
              float* xc = bc.get(n * k);
              widen(p + i0 * gp.sr, gp.sr, gp.sk, n, k, xp);
              widen(c + i0 * gc.sr, gc.sr, gc.sk, n, k, xc);
              small_cross_avx2(xp, k, xc, k, n, k, out);
            }
          }
          continue;
        }
      }
#endif
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
  if (3 * r < k && !use_small_k<T>(k)) {
    // Thin form: S m = G_prev^T (G_cur m) + G_cur^T (G_prev m), 8 r k^2 multiply-adds against the 2 r k^2 + 2 k^3
    // of forming S (a classifier head: r classes, k inputs). The gradients are converted to m's dtype whole when
    // they are 16-bit: with r < k / 3 such a copy is smaller than m itself.
    const Tensor p = gp.to(m.scalar_type()), c = gc.to(m.scalar_type());
    const Tensor sm = at::bmm(p.mT(), at::bmm(c, m)).baddbmm_(c.mT(), at::bmm(p, m));
    m.add_(sm, alpha);
    return;
  }
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
  // (the small-k loops read past a row's end into the next: rows must not overlap)
  const bool small = use_small_k<T>(k) && (!same || (g.sk == 1 && (g.sr >= k || r == 1)));
  const int64_t rc = std::min(r, chunk_rows(k));
  const int64_t nch = cdiv(r, rc);
  // the small-k loops read d with its rows padded to a multiple of 8 columns (zeros)
  const int64_t kp = round_up(k, 8);
  Tensor dpad;
  if (small) {
    auto opt = at::TensorOptions().dtype(scalar_of<T>());
    dpad = at::zeros({B, k, kp}, opt);
    dpad.narrow(2, 0, k).copy_(at::from_blob(const_cast<T*>(d), {B, k, k}, opt));
  }
  parallel_tiles(B * nch, num_threads(), [&](int64_t, auto&& next) {
    Buf<float> bx, by;
    for (int64_t t = next(); t >= 0; t = next()) {
      const int64_t b = t / nch, i0 = (t % nch) * rc, n = std::min(rc, r - i0);
      const E* gi = g.p + b * g.sb + i0 * g.sr;
      E* oi = out + (b * r + i0) * k;
#ifdef PYCURV_CPU_AVX2
      if constexpr (std::is_same_v<T, float>) {
        if (small) {
          const float* dp = dpad.const_data_ptr<float>() + b * k * kp;
          if constexpr (same) {
            small_precondition_avx2(gi, g.sr, dp, kp, n, k, oi);
          } else {
            float* x = bx.get(n * k);
            float* y = by.get(n * k);
            widen(gi, g.sr, g.sk, n, k, x);
            small_precondition_avx2(x, k, dp, kp, n, k, y);
            narrow(y, n, k, oi, k, 1);
          }
          continue;
        }
      }
#endif
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

// Thin form for r < k (past the small-k loops): out[b] = (g[b] m[b]) m[b]^T, 4 r k^2 multiply-adds instead of the
// 2 k^3 + 2 r k^2 of forming D. float32 / float64 gradients: two batched BLAS GEMMs on the gradient in place
// (threaded by BLAS); 16-bit gradients: chunks of rows widened to float32, both products per chunk. m = I still
// gives g back exactly (every product but one is an exact zero).
template <typename E>
void precondition_thin(Grad<E> g, const Tensor& m, int64_t B, int64_t r, int64_t k, E* out) {
  const float* mp = m.const_data_ptr<float>();
  const int64_t rc = std::min(r, chunk_rows(k));
  const int64_t nch = cdiv(r, rc);
  parallel_tiles(B * nch, num_threads(), [&](int64_t, auto&& next) {
    Buf<float> bx, by;
    for (int64_t t = next(); t >= 0; t = next()) {
      const int64_t b = t / nch, i0 = (t % nch) * rc, n = std::min(rc, r - i0);
      float* x = bx.get(n * k);
      float* y = by.get(n * k);
      widen(g.p + b * g.sb + i0 * g.sr, g.sr, g.sk, n, k, x);
      const float* mb = mp + b * k * k;
      gemm_aten<float>(n, k, k, {x, k, 1}, {mb, k, 1}, false, y, k);
      gemm_aten<float>(n, k, k, {y, k, 1}, {mb, 1, k}, false, x, k);
      narrow(x, n, k, out + (b * r + i0) * k, k, 1);
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
  const c10::ScalarType acc = acc_dtype(grad.scalar_type());
  if (r < k && !(acc == c10::kFloat ? use_small_k<float>(k) : use_small_k<double>(k))) {
    const Tensor ma = m.to(acc).contiguous();
    switch (grad.scalar_type()) {
      case c10::kDouble:
      case c10::kFloat:
        at::bmm_out(out, at::bmm(grad, ma), ma.mT());
        break;
      case c10::kBFloat16:
        precondition_thin<BFloat16>(grad_view<BFloat16>(grad), ma, B, r, k, out.data_ptr<BFloat16>());
        break;
      default:
        precondition_thin<Half>(grad_view<Half>(grad), ma, B, r, k, out.data_ptr<Half>());
    }
    return out;
  }
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
