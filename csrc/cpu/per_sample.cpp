// CPU kernels for per-sample gradient products (MATH.md section 1).
//
// Sample n of a linear layer has inputs A_n = a[n]: (T, d_in) and output gradients B_n = g[n]: (T, d_out); its
// weight gradient is G_n = B_n^T A_n (plus the bias gradient sum_t B_n[t] with bias=True).
//   ghost (Goodfellow 2015; Li et al. 2022):  <G_i, G_j> = sum_{t,s} (A_i A_j^T + 1)[t,s] (B_i B_j^T)[t,s]
//     (the "+ 1" is the bias: the virtual ones column of A, never materialised);
//   materialize: G_n formed block by block, K = J J^T, ||G_n||^2 and sum_n G_n * G_n accumulated per block.
// Tiling: every GEMM runs single-threaded inside an at::parallel_for over independent tiles (sample-pair blocks
// of the Gram, d_out x d_in blocks of G_n for all samples, or single samples), so extra memory is
// O(N^2 + threads * tile), never O(N d_out d_in) or O((N T)^2). Inputs of any float dtype and strides are
// converted (or packed for the micro-kernel) once as a whole when that copy is small (a few tens of MiB at
// most), tile by tile otherwise.
//
// GEMMs: on x86 CPUs with oneDNN's BRGEMM micro-kernel (AVX2 for float32, AVX-512 for bfloat16) a small driver
// packs operand panels and calls at::native::cpublas::brgemm; bfloat16 inputs then multiply as bfloat16 with
// float32 accumulation (exact products), everything else in float32; squares (ef_diag) are formed in float32 and
// never rounded back to bfloat16. Without it (or with PYCURV_CPU_BRGEMM=0)
// the tiles go through ATen's matmul (MKL / OpenBLAS) in the accumulation dtype. float64 always uses ATen.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>


#include "cpu/gemm.h"
#include "pycurv.h"

namespace pycurv {
namespace {

using namespace cpu;

// Elements of one per-thread block X = [G_1; ...; G_N] restricted to d_out x d_in block (1 MiB of float32),
// raised to N x 64 x 256 for large N so that the per-sample GEMMs stay efficient.
constexpr int64_t kTileElems = int64_t(1) << 18;
// Rows (time steps) of one side of a ghost Gram tile: two (kGhostRows x kGhostRows) float32 tiles per thread.
constexpr int64_t kGhostRows = 512;
// Elements of one per-sample block of G_n (sqnorms / ef_diag materialize): stays in L2.
constexpr int64_t kBlockElems = int64_t(1) << 16;
// An input with at most this many elements is converted to the compute dtype once, as a whole; larger inputs
// that need a conversion (dtype or strides) are converted tile by tile.
constexpr int64_t kWholeElems = int64_t(1) << 22;
// Up to this many time steps the per-sample products sum_t g[t]^T a[t] are formed by a fused loop, not a GEMM.
constexpr int64_t kSmallT = 4;
// Below this many multiply-adds an op runs on the calling thread.
constexpr int64_t kSerialMacs = int64_t(1) << 18;
// Partial Grams of the materialize Gram: between kMinGroups and kMaxGroups of them, more only while they take at
// most kMaxPartialBytes together.
constexpr int64_t kMinGroups = 4;
constexpr int64_t kMaxGroups = 64;
constexpr int64_t kMaxPartialBytes = int64_t(32) << 20;



// ---------------------------------------------------------------------------------------------------------------
// Fused elementwise kernels (single-threaded; the callers parallelise over tiles).

template <typename T>
inline T to_acc(T x) {
  return x;
}
inline float to_acc(BFloat16 x) { return static_cast<float>(x); }

// sum_i (x[i] + bias) * y[i]
template <typename T>
inline T dot_bias(const T* x, const T* y, int64_t n, T bias) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += (x[i] + bias) * y[i];
  return s;
}

#ifdef PYCURV_CPU_AVX2
// sum_i x[i]^2 with four independent accumulators (a single one would be bound by the add latency).
template <typename E>
__attribute__((target("avx2,fma"))) float sumsq_avx2(const E* x, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m256 v0 = load8f(x + i), v1 = load8f(x + i + 8), v2 = load8f(x + i + 16), v3 = load8f(x + i + 24);
    s0 = _mm256_fmadd_ps(v0, v0, s0);
    s1 = _mm256_fmadd_ps(v1, v1, s1);
    s2 = _mm256_fmadd_ps(v2, v2, s2);
    s3 = _mm256_fmadd_ps(v3, v3, s3);
  }
  for (; i + 8 <= n; i += 8) {
    const __m256 v = load8f(x + i);
    s0 = _mm256_fmadd_ps(v, v, s0);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
  float r = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
  for (; i < n; ++i) r += static_cast<float>(x[i]) * static_cast<float>(x[i]);
  return r;
}
#endif

template <typename T, typename E>
inline T sumsq(const E* x, int64_t n) {
#ifdef PYCURV_CPU_AVX2
  if constexpr (std::is_same_v<T, float> && (std::is_same_v<E, float> || std::is_same_v<E, BFloat16>)) {
    if (cpu_avx2()) return sumsq_avx2(x, n);
  }
#endif
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) {
    const T v = to_acc(x[i]);
    s += v * v;
  }
  return s;
}

// out[p*ldo + q] = sum_{t,s < T} (ga + bias) * gb over the (T x T) block (p, q) of two row-major Gram tiles.
template <typename T>
void block_hadamard_sum(const T* ga, const T* gb, int64_t ld, int64_t P, int64_t Q, int64_t Tn, T bias, T* out,
                        int64_t ldo) {
  for (int64_t p = 0; p < P; ++p) {
    T* o = out + p * ldo;
    for (int64_t q = 0; q < Q; ++q) o[q] = 0;
    for (int64_t t = 0; t < Tn; ++t) {
      const T* ra = ga + (p * Tn + t) * ld;
      const T* rb = gb + (p * Tn + t) * ld;
      if (Tn == 1) {
#pragma omp simd
        for (int64_t q = 0; q < Q; ++q) o[q] += (ra[q] + bias) * rb[q];
      } else {
        for (int64_t q = 0; q < Q; ++q) o[q] += dot_bias(ra + q * Tn, rb + q * Tn, Tn, bias);
      }
    }
  }
}

// X(o, i) = sum_{t < T} g[t*gst + o] * a[t*ast + i] for o < bo, i < bi (row stride ldx): the per-sample gradient
// block for few time steps, where a GEMM call would be dominated by its overhead.
template <typename E, typename T>
void small_t_outer(const E* g, int64_t gst, const E* a, int64_t ast, int64_t Tn, int64_t bo, int64_t bi, T* x,
                   int64_t ldx) {
  for (int64_t o = 0; o < bo; ++o) {
    T* row = x + o * ldx;
    const T g0 = to_acc(g[o]);
#pragma omp simd
    for (int64_t i = 0; i < bi; ++i) row[i] = g0 * to_acc(a[i]);
    for (int64_t t = 1; t < Tn; ++t) {
      const T gt = to_acc(g[t * gst + o]);
      const E* at = a + t * ast;
#pragma omp simd
      for (int64_t i = 0; i < bi; ++i) row[i] += gt * to_acc(at[i]);
    }
  }
}

// Per-sample gradient block X = g_n[:, o-block]^T a_n[:, i-block] (bo x bi, row stride ldx).
template <typename E, typename T>
void grad_block(const E* g, int64_t gst, const E* a, int64_t ast, int64_t Tn, int64_t bo, int64_t bi, T* x,
                int64_t ldx, Work& w, bool brg) {
  if (Tn <= kSmallT) {
    small_t_outer<E, T>(g, gst, a, ast, Tn, bo, bi, x, ldx);
  } else {
    gemm<E, T>(bo, bi, Tn, {g, 1, gst}, {a, ast, 1}, false, x, ldx, w, brg);
  }
}

// K[j, i] = K[i, j] for i > j: the kernels fill the lower triangle (block-wise), this makes K exactly symmetric.
// 16 x 16 blocks keep the transposed writes within a few cache lines.
template <typename T>
void mirror_lower(T* k, int64_t n) {
  constexpr int64_t B = 16;
  for (int64_t i0 = 0; i0 < n; i0 += B)
    for (int64_t j0 = 0; j0 <= i0; j0 += B)
      for (int64_t i = i0; i < std::min(n, i0 + B); ++i)
        for (int64_t j = j0; j < std::min(i, j0 + B); ++j) k[j * n + i] = k[i * n + j];
}

// PYCURV_CPU_DOT_SYRK=0 sends every X X^T through the GEMM path (for comparison).
inline bool dot_syrk_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("PYCURV_CPU_DOT_SYRK");
    return !(e && e[0] == '0' && e[1] == '\0');
  }();
  return on;
}

#ifdef PYCURV_CPU_AVX2
// Up to this many rows, K += X X^T runs as direct dot products (below); beyond, as a packed GEMM.
constexpr int64_t kDotSyrkRows = 32;

// K[i0 + r][j0 + c] += <X_{i0+r}, X_{j0+c}> for r < RI, c < RJ: RI x RJ dot products over len, one vector
// accumulator each, every loaded vector of a row used RJ (or RI) times.
template <int RI, int RJ>
__attribute__((target("avx2,fma"))) void dot_block(const float* x, int64_t ldx, int64_t len, int64_t i0, int64_t j0,
                                                   float* k, int64_t ldk) {
  __m256 acc[RI][RJ];
  for (int r = 0; r < RI; ++r)
    for (int c = 0; c < RJ; ++c) acc[r][c] = _mm256_setzero_ps();
  int64_t l = 0;
  for (; l + 8 <= len; l += 8) {
    __m256 vj[RJ];
    for (int c = 0; c < RJ; ++c) vj[c] = _mm256_loadu_ps(x + (j0 + c) * ldx + l);
    for (int r = 0; r < RI; ++r) {
      const __m256 vi = _mm256_loadu_ps(x + (i0 + r) * ldx + l);
      for (int c = 0; c < RJ; ++c) acc[r][c] = _mm256_fmadd_ps(vi, vj[c], acc[r][c]);
    }
  }
  alignas(32) float t[8];
  for (int r = 0; r < RI; ++r)
    for (int c = 0; c < RJ; ++c) {
      _mm256_store_ps(t, acc[r][c]);
      float s = ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
      for (int64_t q = l; q < len; ++q) s += x[(i0 + r) * ldx + q] * x[(j0 + c) * ldx + q];
      k[(i0 + r) * ldk + j0 + c] += s;
    }
}

using DotBlockFn = void (*)(const float*, int64_t, int64_t, int64_t, int64_t, float*, int64_t);

// Lower triangle (block-wise) of K += X X^T for n <= kDotSyrkRows rows of a long X: blocks of 3 x 3 dot products
// (9 accumulators, 6 loads for 9 FMAs). A BLAS or packed GEMM with M = N = 16 and K in the tens of thousands runs
// at a fraction of the FMA rate; these loops stream X from cache at close to it.
void syrk_dots_avx2(int64_t n, int64_t len, const float* x, int64_t ldx, float* k) {
  static constexpr DotBlockFn table[3][3] = {{&dot_block<1, 1>, &dot_block<1, 2>, &dot_block<1, 3>},
                                             {&dot_block<2, 1>, &dot_block<2, 2>, &dot_block<2, 3>},
                                             {&dot_block<3, 1>, &dot_block<3, 2>, &dot_block<3, 3>}};
  for (int64_t i0 = 0; i0 < n; i0 += 3) {
    const int64_t ri = std::min<int64_t>(3, n - i0);
    for (int64_t j0 = 0; j0 <= i0; j0 += 3) {
      const int64_t rj = std::min<int64_t>(3, n - j0);
      table[ri - 1][rj - 1](x, ldx, len, i0, j0, k, n);
    }
  }
}
#endif

// Lower triangle (block-wise) of K += X X^T, X: (n, len) rows of stride ldx: row blocks of K against the columns up to
// their end, which skips about half the work once n spans several blocks. y: reusable packing of X^T.
template <typename T>
void syrk_lower(int64_t n, int64_t len, const T* x, int64_t ldx, T* k, RightNT<T, T>& y, Work& w, bool brg) {
#ifdef PYCURV_CPU_AVX2
  if constexpr (std::is_same_v<T, float>) {
    if (n <= kDotSyrkRows && cpu_avx2() && dot_syrk_enabled()) return syrk_dots_avx2(n, len, x, ldx, k);
  }
#endif
  const int64_t rb = n >= 128 ? 32 : (n >= 32 ? 16 : n);
  y.set(x, ldx, len, n, brg, w);
  for (int64_t i0 = 0; i0 < n; i0 += rb) {
    const int64_t i1 = std::min(n, i0 + rb);
    y.mul(i1 - i0, i1, x + i0 * ldx, ldx, true, k + i0 * n, n, w);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Tile access to an input x: (N, T, D) of any float dtype and strides, in the compute dtype E with a unit stride
// along D: element (n, t, d) of a tile is p[n*sn + t*st + d].

template <typename E>
struct TileView {
  const E* p;
  int64_t sn, st;
  // Row stride when the tile is read as (n T, D) rows (for T == 1 the sample stride).
  int64_t ld(int64_t tn) const { return tn == 1 ? sn : st; }
};

template <typename E>
class Input {
 public:
  // flat: the tiles must be usable as (n T, D) row-major matrices (sn == T*st), as the ghost GEMMs need.
  Input(const Tensor& x, bool flat) : src_(x), N(x.size(0)), Tn(x.size(1)), D(x.size(2)), flat_(flat) {
    if (x.scalar_type() == scalar_of<E>() && usable(x.stride(0), x.stride(1), x.stride(2))) {
      whole_ = x;
    } else if (x.numel() <= kWholeElems) {
      whole_ = at::empty({N, Tn, D}, x.options().dtype(scalar_of<E>()));
      whole_.copy_(x);
    }
  }

  bool is_whole() const { return whole_.defined(); }

  // x[n0:n1, :, c0:c1]; `scratch` keeps a converted copy alive when the input is not held whole.
  TileView<E> tile(int64_t n0, int64_t n1, int64_t c0, int64_t c1, Tensor& scratch) const {
    if (whole_.defined()) {
      return {whole_.data_ptr<E>() + n0 * whole_.stride(0) + c0, whole_.stride(0), whole_.stride(1)};
    }
    scratch = at::empty({n1 - n0, Tn, c1 - c0}, src_.options().dtype(scalar_of<E>()));
    scratch.copy_(src_.slice(0, n0, n1).slice(2, c0, c1));
    return {scratch.data_ptr<E>(), Tn * (c1 - c0), c1 - c0};
  }

 private:
  bool usable(int64_t sn, int64_t st, int64_t sd) const {
    if (sd != 1 && D > 1) return false;
    if (Tn > 1 && st < D) return false;  // GEMM operands need a row stride >= the row length
    if (Tn == 1 && sn < D) return false;
    return !flat_ || Tn == 1 || sn == Tn * st;
  }

  const Tensor& src_;

 public:
  const int64_t N, Tn, D;

 private:
  bool flat_;
  Tensor whole_;
};

// Bias sums sum_t g[n, t, :] in the accumulation dtype, (N, d_out) contiguous.
Tensor bias_sums(const Tensor& g, at::ScalarType acc) { return at::sum(g, {1}, false, acc).contiguous(); }

template <typename T>
Tensor acc_empty(at::IntArrayRef sizes) {
  return at::empty(sizes, at::TensorOptions().dtype(scalar_of<T>()));
}

template <typename T>
Tensor acc_zeros(at::IntArrayRef sizes) {
  return at::zeros(sizes, at::TensorOptions().dtype(scalar_of<T>()));
}

// Operands of the per-sample products G_n = g_n^T a_n laid out once for the micro-kernel, for a run of samples:
// g_n^T as a row-major (d_out x tp) A operand (tp = T, rounded up to even and zero-padded for bfloat16) and a_n
// as the B operand (float32 rows read in place; bfloat16 packed into VNNI-2 words, (tp/2) x d_in). Packing each
// sample once, instead of once per tile, keeps the packing cost O(input) whatever the tiling.
template <typename E>
class GradPack {
 public:
  // Packs samples [0, count) of the views (sample 0 of the views is the run's first sample).
  void pack(const TileView<E>& vg, const TileView<E>& va, int64_t count, int64_t T, int64_t dout, int64_t di,
            bool parallel) {
    constexpr bool half = std::is_same_v<E, BFloat16>;
    T_ = T;
    tp_ = half ? T + (T % 2) : T;
    dout_ = dout;
    di_ = di;
    gt_.get(count * dout * tp_);
    if constexpr (half) {
      av_.get(count * (tp_ / 2) * di);
    } else {
      a_ = va.p;
      a_sn_ = va.sn;
      a_st_ = va.st;
    }
#ifdef PYCURV_HAVE_BRGEMM
    if constexpr (!std::is_same_v<E, double>) {
      auto body = [&](int64_t s0, int64_t s1) {
        Work w;
        for (int64_t s = s0; s < s1; ++s) {
          pack_a<E>({vg.p + s * vg.sn, 1, vg.st}, 0, dout, 0, T, tp_, gt_.data() + s * dout * tp_, w);
          if constexpr (half) {
            const BFloat16* as = va.p + s * va.sn;
            uint32_t* out = av_.data() + s * (tp_ / 2) * di;
            for (int64_t k = 0; k < T / 2; ++k)
              interleave16(bits(as + 2 * k * va.st), bits(as + (2 * k + 1) * va.st), di, out + k * di);
            if (T % 2) interleave16(bits(as + (T - 1) * va.st), nullptr, di, out + (T / 2) * di);
          }
        }
      };
      if (parallel) {
        at::parallel_for(0, count, 1, body);
      } else {
        body(0, count);
      }
    }
#else
    (void)vg;
    (void)count;
#endif
  }

  // X (bo x bi, row stride ldx) = G_s[o0:o0+bo, c0:c0+bi] for packed sample s.
  void block(int64_t s, int64_t o0, int64_t bo, int64_t c0, int64_t bi, float* x, int64_t ldx) const {
#ifdef PYCURV_HAVE_BRGEMM
    if constexpr (!std::is_same_v<E, double>) {
      constexpr bool half = std::is_same_v<E, BFloat16>;
      const int64_t kb = half ? kKbHalf : kKb;
      const E* a = gt_.data() + (s * dout_ + o0) * tp_;
      for (int64_t k0 = 0; k0 < T_; k0 += kb) {
        const int64_t kk = std::min(kb, T_ - k0);
        if constexpr (half) {
          const int64_t kp = kk + (kk % 2);
          const uint32_t* b = av_.data() + s * (tp_ / 2) * di_ + (k0 / 2) * di_ + c0;
          cb::brgemm(bo, bi, kp, tp_, di_, ldx, k0 > 0, a + k0, reinterpret_cast<const BFloat16*>(b), x, true);
        } else {
          const float* b = a_ + s * a_sn_ + k0 * a_st_ + c0;
          cb::brgemm(bo, bi, kk, tp_, a_st_, ldx, k0 > 0, a + k0, b, x, false);
        }
      }
      return;
    }
#endif
    (void)s, (void)o0, (void)bo, (void)c0, (void)bi, (void)x, (void)ldx;
    TORCH_CHECK(false, "pycurv: packed per-sample gradients need the BRGEMM micro-kernel");
  }

 private:
  Buf<E> gt_;
  Buf<uint32_t> av_;
  const E* a_ = nullptr;
  int64_t a_sn_ = 0, a_st_ = 0;
  int64_t T_ = 0, tp_ = 0, dout_ = 0, di_ = 0;
};

// Inputs up to this many elements (a and g together) are packed whole for the per-sample products; larger ones
// are packed tile by tile.
constexpr int64_t kPackElems = int64_t(1) << 23;

// Whether the per-sample products of a materialize kernel run on operands packed once per sample.
template <typename E>
bool use_grad_pack(const Input<E>& ia, const Input<E>& ig, int64_t count, bool brg) {
  return brg && !std::is_same_v<E, double> && ia.Tn > kSmallT && ia.is_whole() && ig.is_whole() &&
         count * ia.Tn * (ia.D + ig.D) <= kPackElems;
}


// The packed per-sample products (wide micro-kernel calls with ldb != N, odd T) against exact integer sums.
template <typename E>
bool grad_pack_self_test() {
#ifdef PYCURV_HAVE_BRGEMM
  try {
    // (T, d_out, d_in, o0, bo, c0, bi): odd T, and T beyond one K block of the bfloat16 kernel.
    const int64_t cases[2][7] = {{9, 13, 150, 2, 11, 3, 140}, {1030, 20, 70, 4, 16, 5, 64}};
    bool ok = true;
    for (const auto& cs : cases) {
      const int64_t T = cs[0], dout = cs[1], di = cs[2], o0 = cs[3], bo = cs[4], c0 = cs[5], bi = cs[6];
      std::vector<E> g(T * dout), a(T * di);
      for (int64_t i = 0; i < T * dout; ++i) g[i] = E(static_cast<float>((i * 7) % 11) - 5.0f);
      for (int64_t i = 0; i < T * di; ++i) a[i] = E(static_cast<float>((i * 5) % 13) - 6.0f);
      GradPack<E> gp;
      gp.pack({g.data(), T * dout, dout}, {a.data(), T * di, di}, 1, T, dout, di, false);
      std::vector<float> x(bo * bi, 1.0f);
      gp.block(0, o0, bo, c0, bi, x.data(), bi);
      for (int64_t o = 0; o < bo; ++o)
        for (int64_t i = 0; i < bi; ++i) {
          float want = 0;
          for (int64_t t = 0; t < T; ++t) want += float(g[t * dout + o0 + o]) * float(a[t * di + c0 + i]);
          ok = ok && x[o * bi + i] == want;
        }
    }
    cb::brgemm_release(std::is_same_v<E, BFloat16>);
    return ok;
  } catch (...) {
    return false;
  }
#else
  return false;
#endif
}

// The driver's probe plus the packed per-sample products' self-tests.
BrgemmSupport probe_brgemm() {
  BrgemmSupport s = brgemm_driver_support();
  s.f32 = s.f32 && grad_pack_self_test<float>();
  s.bf16 = s.bf16 && s.f32 && grad_pack_self_test<BFloat16>();
  return s;
}

const BrgemmSupport& brgemm_support() {
  static const BrgemmSupport s = probe_brgemm();
  return s;
}

// Whether float32 / bfloat16 GEMMs of this call go through the micro-kernel (the user may turn oneDNN off).
// The probe runs on the first call that could use it.
bool use_brgemm_f32() { return at::globalContext().userEnabledMkldnn() && brgemm_support().f32; }
bool use_brgemm_bf16() { return at::globalContext().userEnabledMkldnn() && brgemm_support().bf16; }

// ---------------------------------------------------------------------------------------------------------------
// per_sample_gram

// sum_{t,s} (A_i A_j^T + bias)[t,s] (B_i B_j^T)[t,s] for one sample pair whose T x T Grams exceed a tile: T is
// cut into chunks of kGhostRows. For i == j (same) only chunk pairs at or below the diagonal are formed; those
// below stand for their mirror images too. Rows of A / B are `sta` / `stg` apart.
template <typename E, typename T>
T ghost_pair_chunked(const E* ai, const E* aj, int64_t sta, const E* gi, const E* gj, int64_t stg, int64_t tn,
                     int64_t di, int64_t dout, T bias, bool same, T* ga, T* gb, RightNT<E, T>& ya,
                     RightNT<E, T>& yg, Work& w, bool brg) {
  T total = 0;
  for (int64_t s0 = 0; s0 < tn; s0 += kGhostRows) {
    const int64_t ms = std::min(kGhostRows, tn - s0);
    ya.set(aj + s0 * sta, sta, di, ms, brg, w);
    yg.set(gj + s0 * stg, stg, dout, ms, brg, w);
    for (int64_t t0 = same ? s0 : 0; t0 < tn; t0 += kGhostRows) {
      const int64_t mt = std::min(kGhostRows, tn - t0);
      ya.mul(mt, ms, ai + t0 * sta, sta, false, ga, ms, w);
      yg.mul(mt, ms, gi + t0 * stg, stg, false, gb, ms, w);
      const T part = dot_bias(ga, gb, mt * ms, bias);
      total += (same && t0 != s0) ? 2 * part : part;
    }
  }
  return total;
}

// Samples per block of the ghost Gram: about 4 block rows (symmetry saving, two threads' worth of block pairs),
// blocks of at most kGhostRows rows (T per sample), and not so thin that the GEMMs starve.
int64_t ghost_block(int64_t n, int64_t t) {
  int64_t bs = std::min(cdiv(n, 4), std::max<int64_t>(1, kGhostRows / t));
  if (bs * t < 32) bs = std::min(n, cdiv(32, t));
  return std::max<int64_t>(1, std::min(bs, n));
}

template <typename E, typename T>
Tensor gram_ghost(const Tensor& a, const Tensor& g, bool bias, bool brg) {
  const int64_t n = a.size(0), tn = a.size(1), di = a.size(2), dout = g.size(2);
  Input<E> ia(a, true), ig(g, true);
  Tensor k = acc_empty<T>({n, n});
  T* kp = k.data_ptr<T>();
  const T one = bias ? T(1) : T(0);
  if (tn > kGhostRows) {
    // One sample's T x T Gram exceeds a tile: sample pairs as tasks, T in chunks.
    const int64_t npairs = n * (n + 1) / 2;
    parallel_tiles(npairs, num_threads(), [&](int64_t, auto&& next) {
      Tensor buf = acc_empty<T>({2, kGhostRows, kGhostRows});
      T* ga = buf.data_ptr<T>();
      T* gb = ga + kGhostRows * kGhostRows;
      Tensor sai, sgi, saj, sgj;
      RightNT<E, T> ya, yg;
      Work w;
      for (int64_t p = next(); p >= 0; p = next()) {
        int64_t i = 0;
        while ((i + 1) * (i + 2) / 2 <= p) ++i;
        const int64_t j = p - i * (i + 1) / 2;
        auto ai = ia.tile(i, i + 1, 0, di, sai), aj = ia.tile(j, j + 1, 0, di, saj);
        auto gi = ig.tile(i, i + 1, 0, dout, sgi), gj = ig.tile(j, j + 1, 0, dout, sgj);
        kp[i * n + j] = ghost_pair_chunked<E, T>(ai.p, aj.p, ai.st, gi.p, gj.p, gi.st, tn, di, dout, one, i == j,
                                                 ga, gb, ya, yg, w, brg);
      }
      release_brgemm(std::is_same_v<E, BFloat16>);
    });
    mirror_lower(kp, n);
    return k;
  }
  const int64_t bs = ghost_block(n, tn), nb = cdiv(n, bs);
  // (row block, col block) pairs with col <= row, grouped by column block: each thread takes a contiguous run
  // of pairs and packs a column block once for all its rows.
  std::vector<std::pair<int64_t, int64_t>> pairs;
  for (int64_t bj = 0; bj < nb; ++bj)
    for (int64_t bi = bj; bi < nb; ++bi) pairs.emplace_back(bi, bj);
  const int64_t npairs = static_cast<int64_t>(pairs.size());
  const int64_t slots = std::min(num_threads(), npairs), per = cdiv(npairs, slots);
  at::parallel_for(0, slots, 1, [&](int64_t s0, int64_t s1) {
    const int64_t rows = bs * tn;
    Tensor buf = acc_empty<T>({2, rows, rows});
    T* ga = buf.data_ptr<T>();
    T* gb = ga + rows * rows;
    Tensor sai, sgi, saj, sgj;
    RightNT<E, T> ya, yg;
    Work w;
    int64_t cur = -1;
    for (int64_t p = s0 * per; p < std::min(npairs, s1 * per); ++p) {
      const int64_t i0 = pairs[p].first * bs, i1 = std::min(n, i0 + bs);
      const int64_t j0 = pairs[p].second * bs, j1 = std::min(n, j0 + bs);
      const int64_t mi = (i1 - i0) * tn, mj = (j1 - j0) * tn;
      if (pairs[p].second != cur) {
        auto aj = ia.tile(j0, j1, 0, di, saj);
        ya.set(aj.p, aj.ld(tn), di, mj, brg, w);
        auto gj = ig.tile(j0, j1, 0, dout, sgj);
        yg.set(gj.p, gj.ld(tn), dout, mj, brg, w);
        cur = pairs[p].second;
      }
      auto ai = ia.tile(i0, i1, 0, di, sai);
      ya.mul(mi, mj, ai.p, ai.ld(tn), false, ga, mj, w);
      auto gi = ig.tile(i0, i1, 0, dout, sgi);
      yg.mul(mi, mj, gi.p, gi.ld(tn), false, gb, mj, w);
      block_hadamard_sum<T>(ga, gb, mj, i1 - i0, j1 - j0, tn, one, kp + i0 * n + j0, n);
    }
    release_brgemm(std::is_same_v<E, BFloat16>);
  });
  mirror_lower(kp, n);
  return k;
}

// d_out x d_in block of the materialised per-sample gradients, for all samples at once (bo * bi * N <= budget).
struct MatTile {
  int64_t bo, bi;
};

MatTile mat_tile(int64_t n, int64_t di, int64_t dout, int64_t budget) {
  // Blocks of about 64 d_out rows (multiples of 16 suit the micro-kernel) by as many d_in columns as fit (a
  // multiple of 64, d_in being the contiguous side of a and of the block); fewer rows only for small layers.
  const int64_t bi = std::min(di, std::max<int64_t>(64, budget / (n * 64) / 64 * 64));
  int64_t bo = std::max<int64_t>(1, budget / (n * bi));
  if (bo >= 32) bo = bo / 16 * 16;
  bo = std::min(bo, dout);
  const int64_t want = 4 * num_threads();  // a few tiles per thread for the dynamic schedule
  while (cdiv(dout, bo) * cdiv(di, bi) < want && bo >= 32) bo = cdiv(bo / 2, 16) * 16;
  return {bo, bi};
}

template <typename E, typename T>
Tensor gram_materialize(const Tensor& a, const Tensor& g, bool bias, bool brg) {
  const int64_t n = a.size(0), tn = a.size(1), di = a.size(2), dout = g.size(2);
  Input<E> ia(a, false), ig(g, false);
  // At least 64 x 256 per-sample blocks: the operands packed for each block are then reused enough.
  const MatTile mt = mat_tile(n, di, dout, std::max(kTileElems, n * 64 * 256));
  const int64_t no = cdiv(dout, mt.bo), ni = cdiv(di, mt.bi), ntiles = no * ni;
  // Tiles go to partial Grams (tile t to group t % groups, in index order within a group), summed in group order:
  // which thread takes which group does not change the result, so every run gives the same bits. At least
  // kMinGroups of them (threads to share the work), more while they fit in kMaxPartialBytes.
  const int64_t fit = kMaxPartialBytes / std::max<int64_t>(1, n * n * int64_t(sizeof(T)));
  const int64_t groups = std::min(ntiles, std::clamp(fit, kMinGroups, kMaxGroups));
  Tensor partial = acc_zeros<T>({groups, n, n});
  T* pp = partial.data_ptr<T>();
  const bool packed = use_grad_pack(ia, ig, n, brg);
  GradPack<E> gp;
  if (packed) {
    Tensor s0, s1;
    gp.pack(ig.tile(0, n, 0, dout, s0), ia.tile(0, n, 0, di, s1), n, tn, dout, di, true);
  }
  parallel_tiles(groups, num_threads(), [&](int64_t, auto&& next) {
    // Rows of X padded so that samples do not alias in the cache (their stride would often be 2^k bytes).
    const int64_t ldx = cdiv(mt.bo * mt.bi, 16) * 16 + 16;
    Tensor xb = acc_empty<T>({n * ldx});
    T* x = xb.data_ptr<T>();
    Tensor sa, sg;
    Work w;
    RightNT<T, T> y;
    for (int64_t grp = next(); grp >= 0; grp = next()) {
      T* kp = pp + grp * n * n;
      for (int64_t tile = grp; tile < ntiles; tile += groups) {
        const int64_t o0 = (tile / ni) * mt.bo, o1 = std::min(dout, o0 + mt.bo);
        const int64_t c0 = (tile % ni) * mt.bi, c1 = std::min(di, c0 + mt.bi);
        const int64_t bo = o1 - o0, bi = c1 - c0, len = bo * bi;
        if constexpr (std::is_same_v<T, float>) {
          if (packed) {
            for (int64_t s = 0; s < n; ++s) gp.block(s, o0, bo, c0, bi, x + s * ldx, bi);
          }
        }
        if (!packed) {
          auto vg = ig.tile(0, n, o0, o1, sg);
          auto va = ia.tile(0, n, c0, c1, sa);
          for (int64_t s = 0; s < n; ++s)
            grad_block<E, T>(vg.p + s * vg.sn, vg.st, va.p + s * va.sn, va.st, tn, bo, bi, x + s * ldx, bi, w, brg);
        }
        syrk_lower<T>(n, len, x, ldx, kp, y, w, brg);
      }
    }
    release_brgemm(std::is_same_v<E, BFloat16>);
  });
  Tensor k = groups == 1 ? partial[0] : partial.sum(0);
  if (bias) {
    Tensor gs = bias_sums(g, k.scalar_type());
    Work w;
    RightNT<T, T> y;
    syrk_lower<T>(n, dout, gs.data_ptr<T>(), dout, k.data_ptr<T>(), y, w, brg);
  }
  mirror_lower(k.data_ptr<T>(), n);
  return k;
}

// ---------------------------------------------------------------------------------------------------------------
// per_sample_grad_sqnorms

template <typename E, typename T>
Tensor sqnorms_ghost(const Tensor& a, const Tensor& g, bool bias, bool brg) {
  const int64_t n = a.size(0), tn = a.size(1), di = a.size(2), dout = g.size(2);
  Tensor s = acc_empty<T>({n});
  T* sp = s.data_ptr<T>();
  Input<E> ia(a, true), ig(g, true);
  const T one = bias ? T(1) : T(0);
  if (tn == 1) {
    // ||g_n a_n^T||^2 + bias ||g_n||^2 = (||a_n||^2 + bias) ||g_n||^2
    at::parallel_for(0, n, 64, [&](int64_t n0, int64_t n1) {
      Tensor sa, sg;
      auto va = ia.tile(n0, n1, 0, di, sa);
      auto vg = ig.tile(n0, n1, 0, dout, sg);
      for (int64_t i = 0; i < n1 - n0; ++i)
        sp[n0 + i] = (sumsq<T>(va.p + i * va.sn, di) + one) * sumsq<T>(vg.p + i * vg.sn, dout);
    });
    return s;
  }
  if (tn > kGhostRows) {
    parallel_tiles(n, num_threads(), [&](int64_t, auto&& next) {
      Tensor buf = acc_empty<T>({2, kGhostRows, kGhostRows});
      T* ga = buf.data_ptr<T>();
      T* gb = ga + kGhostRows * kGhostRows;
      Tensor sa, sg;
      RightNT<E, T> ya, yg;
      Work w;
      for (int64_t i = next(); i >= 0; i = next()) {
        auto va = ia.tile(i, i + 1, 0, di, sa);
        auto vg = ig.tile(i, i + 1, 0, dout, sg);
        sp[i] = ghost_pair_chunked<E, T>(va.p, va.p, va.st, vg.p, vg.p, vg.st, tn, di, dout, one, true, ga, gb, ya,
                                         yg, w, brg);
      }
      release_brgemm(std::is_same_v<E, BFloat16>);
    });
    return s;
  }
  // Only the lower triangles of the symmetric T x T Grams are formed (row strips against the columns up to
  // their end): sum = sum_t (Ga_tt + bias) Gb_tt + 2 sum_{s<t} (Ga_ts + bias) Gb_ts.
  const int64_t rb = tn >= 64 ? cdiv(tn, 4) : tn;
  parallel_tiles(n, num_threads(), [&](int64_t, auto&& next) {
    Tensor buf = acc_empty<T>({2, tn, tn});
    T* ga = buf.data_ptr<T>();
    T* gb = ga + tn * tn;
    Tensor sa, sg;
    RightNT<E, T> ya, yg;
    Work w;
    for (int64_t i = next(); i >= 0; i = next()) {
      auto va = ia.tile(i, i + 1, 0, di, sa);
      auto vg = ig.tile(i, i + 1, 0, dout, sg);
      ya.set(va.p, va.st, di, tn, brg, w);
      yg.set(vg.p, vg.st, dout, tn, brg, w);
      for (int64_t r0 = 0; r0 < tn; r0 += rb) {
        const int64_t r1 = std::min(tn, r0 + rb);
        ya.mul(r1 - r0, r1, va.p + r0 * va.st, va.st, false, ga + r0 * tn, tn, w);
        yg.mul(r1 - r0, r1, vg.p + r0 * vg.st, vg.st, false, gb + r0 * tn, tn, w);
      }
      T diag = 0, off = 0;
      for (int64_t t = 0; t < tn; ++t) {
        diag += (ga[t * tn + t] + one) * gb[t * tn + t];
        off += dot_bias(ga + t * tn, gb + t * tn, t, one);
      }
      sp[i] = diag + 2 * off;
    }
    release_brgemm(std::is_same_v<E, BFloat16>);
  });
  return s;
}

template <typename E, typename T>
Tensor sqnorms_materialize(const Tensor& a, const Tensor& g, bool bias, bool brg) {
  const int64_t n = a.size(0), tn = a.size(1), di = a.size(2), dout = g.size(2);
  Tensor s = acc_empty<T>({n});
  T* sp = s.data_ptr<T>();
  Input<E> ia(a, false), ig(g, false);
  const int64_t bi = std::min<int64_t>(di, 256);
  const int64_t bo = std::min(dout, std::max<int64_t>(1, kBlockElems / bi));
  const bool packed = brg && !std::is_same_v<E, double> && tn > kSmallT;
  parallel_tiles(n, num_threads(), [&](int64_t, auto&& next) {
    Tensor xb = acc_empty<T>({bo * bi});
    T* x = xb.data_ptr<T>();
    Tensor sa, sg;
    Work w;
    GradPack<E> gp;
    for (int64_t i = next(); i >= 0; i = next()) {
      auto va = ia.tile(i, i + 1, 0, di, sa);
      auto vg = ig.tile(i, i + 1, 0, dout, sg);
      if (packed) gp.pack(vg, va, 1, tn, dout, di, false);
      T acc = 0;
      for (int64_t o0 = 0; o0 < dout; o0 += bo) {
        const int64_t o1 = std::min(dout, o0 + bo);
        for (int64_t c0 = 0; c0 < di; c0 += bi) {
          const int64_t c1 = std::min(di, c0 + bi);
          if constexpr (std::is_same_v<T, float>) {
            if (packed) gp.block(0, o0, o1 - o0, c0, c1 - c0, x, c1 - c0);
          }
          if (!packed)
            grad_block<E, T>(vg.p + o0, vg.st, va.p + c0, va.st, tn, o1 - o0, c1 - c0, x, c1 - c0, w, brg);
          acc += sumsq<T>(x, (o1 - o0) * (c1 - c0));
        }
      }
      sp[i] = acc;
    }
    release_brgemm(std::is_same_v<E, BFloat16>);
  });
  if (bias) {
    Tensor gs = bias_sums(g, s.scalar_type());
    s.add_(gs.square().sum(1));
  }
  return s;
}

// ---------------------------------------------------------------------------------------------------------------
// ef_diag

template <typename E, typename T>
Tensor ef_diag_impl(const Tensor& a, const Tensor& g, bool bias, bool brg) {
  const int64_t n = a.size(0), tn = a.size(1), di = a.size(2), dout = g.size(2);
  const int64_t w = di + (bias ? 1 : 0);
  Input<E> ia(a, false), ig(g, false);
  Tensor d = acc_zeros<T>({dout, w});
  T* dp = d.data_ptr<T>();
  if (tn == 1) {
    // D = (g*g)^T [a*a, 1] over chunks of samples: one GEMM per chunk and d_out block, the bias column rides
    // along as ones (sum_t g = g for T = 1).
    const int64_t chunk = std::max<int64_t>(1, std::min(n, kTileElems / (w + dout)));
    Tensor sqa = acc_empty<T>({chunk, w}), sqg = acc_empty<T>({chunk, dout});
    T* qa = sqa.data_ptr<T>();
    T* qg = sqg.data_ptr<T>();
    const int64_t ob = std::max<int64_t>(16, cdiv(dout, 4 * num_threads()));
    // A small problem stays on the calling thread: waking the pool costs more than the work (about 10 us).
    const bool serial = n * dout * w < kSerialMacs;
    const int64_t slots = serial ? 1 : num_threads();
    Tensor sa, sg;
    for (int64_t n0 = 0; n0 < n; n0 += chunk) {
      const int64_t n1 = std::min(n, n0 + chunk), m = n1 - n0;
      auto va = ia.tile(n0, n1, 0, di, sa);
      auto vg = ig.tile(n0, n1, 0, dout, sg);
      at::parallel_for(0, m, serial ? m : 16, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const E* ar = va.p + r * va.sn;
          const E* gr = vg.p + r * vg.sn;
          T* qar = qa + r * w;
          T* qgr = qg + r * dout;
#pragma omp simd
          for (int64_t i = 0; i < di; ++i) qar[i] = to_acc(ar[i]) * to_acc(ar[i]);
          if (bias) qar[di] = 1;
#pragma omp simd
          for (int64_t o = 0; o < dout; ++o) qgr[o] = to_acc(gr[o]) * to_acc(gr[o]);
        }
      });
      parallel_tiles(cdiv(dout, ob), slots, [&](int64_t, auto&& next) {
        Work wk;
        for (int64_t b = next(); b >= 0; b = next()) {
          const int64_t o0 = b * ob, o1 = std::min(dout, o0 + ob);
          gemm<T, T>(o1 - o0, w, m, {qg + o0, 1, dout}, {qa, w, 1}, true, dp + o0 * w, w, wk, brg);
        }
      });
    }
    return d;
  }
  int64_t bi = std::min<int64_t>(di, 256), bo = std::min(dout, std::max<int64_t>(1, kBlockElems / bi));
  while (cdiv(dout, bo) * cdiv(di, bi) < 4 * num_threads() && bo > 8) bo = cdiv(bo, 2);
  const int64_t no = cdiv(dout, bo), ni = cdiv(di, bi);
  // Samples per converted input tile, when the input is not held whole.
  const int64_t nchunk = std::max<int64_t>(1, kTileElems / (tn * (bo + bi)));
  const bool packed = use_grad_pack(ia, ig, n, brg);
  GradPack<E> gp;
  if (packed) {
    Tensor s0, s1;
    gp.pack(ig.tile(0, n, 0, dout, s0), ia.tile(0, n, 0, di, s1), n, tn, dout, di, true);
  }
  parallel_tiles(no * ni, num_threads(), [&](int64_t, auto&& next) {
    Tensor xb = acc_empty<T>({bo * bi});
    T* x = xb.data_ptr<T>();
    Tensor sa, sg;
    Work wk;
    auto accumulate = [&](int64_t o0, int64_t mo, int64_t c0, int64_t mi) {
      for (int64_t o = 0; o < mo; ++o) {
        T* drow = dp + (o0 + o) * w + c0;
        const T* xr = x + o * mi;
#pragma omp simd
        for (int64_t i = 0; i < mi; ++i) drow[i] += xr[i] * xr[i];
      }
    };
    for (int64_t tile = next(); tile >= 0; tile = next()) {
      const int64_t o0 = (tile / ni) * bo, o1 = std::min(dout, o0 + bo);
      const int64_t c0 = (tile % ni) * bi, c1 = std::min(di, c0 + bi);
      const int64_t mo = o1 - o0, mi = c1 - c0;
      if constexpr (std::is_same_v<T, float>) {
        if (packed) {
          for (int64_t s = 0; s < n; ++s) {
            gp.block(s, o0, mo, c0, mi, x, mi);
            accumulate(o0, mo, c0, mi);
          }
        }
      }
      if (packed) continue;
      for (int64_t n0 = 0; n0 < n; n0 += nchunk) {
        const int64_t n1 = std::min(n, n0 + nchunk);
        auto vg = ig.tile(n0, n1, o0, o1, sg);
        auto va = ia.tile(n0, n1, c0, c1, sa);
        for (int64_t s = 0; s < n1 - n0; ++s) {
          grad_block<E, T>(vg.p + s * vg.sn, vg.st, va.p + s * va.sn, va.st, tn, mo, mi, x, mi, wk, brg);
          accumulate(o0, mo, c0, mi);
        }
      }
    }
    release_brgemm(std::is_same_v<E, BFloat16>);
  });
  if (bias) {
    Tensor gs = bias_sums(g, d.scalar_type());
    d.select(1, di).copy_(gs.square().sum(0));
  }
  return d;
}

// ---------------------------------------------------------------------------------------------------------------
// Dispatch on the compute dtype: float64 -> double; bfloat16 with the bfloat16 micro-kernel -> bfloat16 operands
// with float32 accumulation; everything else -> float32.

enum class Compute { f64, f32, bf16 };

Compute compute_of(const Tensor& a) {
  if (a.scalar_type() == c10::kDouble) return Compute::f64;
  if (a.scalar_type() == c10::kBFloat16 && use_brgemm_bf16()) return Compute::bf16;
  return Compute::f32;
}

// Degenerate sizes (an empty dimension) go through the plain formulas, which handle them without special cases.
bool degenerate(const Tensor& a, const Tensor& g) { return a.numel() == 0 || g.numel() == 0; }

#define PYCURV_DISPATCH(fn, a, g, bias)                                       \
  switch (compute_of(a)) {                                                    \
    case Compute::f64:                                                        \
      return fn<double, double>(a, g, bias, false);                           \
    case Compute::bf16:                                                       \
      return fn<BFloat16, float>(a, g, bias, true);                           \
    default:                                                                  \
      return fn<float, float>(a, g, bias, use_brgemm_f32());                  \
  }

}  // namespace

at::Tensor per_sample_grad_sqnorms_cpu(const at::Tensor& a, const at::Tensor& g, bool bias, c10::string_view method) {
  check_ag(a, g, "per_sample_grad_sqnorms");
  const bool ghost = parse_method_is_ghost(method, "per_sample_grad_sqnorms");
  if (degenerate(a, g)) {
    auto dt = acc_dtype(a.scalar_type());
    auto s = at::zeros({a.size(0)}, a.options().dtype(dt));
    return bias ? s + g.to(dt).sum(1).square().sum(1) : s;
  }
  if (ghost) {
    PYCURV_DISPATCH(sqnorms_ghost, a, g, bias)
  }
  PYCURV_DISPATCH(sqnorms_materialize, a, g, bias)
}

at::Tensor per_sample_gram_cpu(const at::Tensor& a, const at::Tensor& g, bool bias, c10::string_view method) {
  check_ag(a, g, "per_sample_gram");
  const bool ghost = parse_method_is_ghost(method, "per_sample_gram");
  if (degenerate(a, g)) {
    auto dt = acc_dtype(a.scalar_type());
    auto k = at::zeros({a.size(0), a.size(0)}, a.options().dtype(dt));
    if (!bias) return k;
    auto gs = g.to(dt).sum(1);
    return k + at::mm(gs, gs.t());
  }
  if (ghost) {
    PYCURV_DISPATCH(gram_ghost, a, g, bias)
  }
  PYCURV_DISPATCH(gram_materialize, a, g, bias)
}

at::Tensor ef_diag_cpu(const at::Tensor& a, const at::Tensor& g, bool bias) {
  check_ag(a, g, "ef_diag");
  if (degenerate(a, g)) {
    auto dt = acc_dtype(a.scalar_type());
    auto d = at::zeros({g.size(2), a.size(2) + (bias ? 1 : 0)}, a.options().dtype(dt));
    if (bias) d.select(1, a.size(2)).copy_(g.to(dt).sum(1).square().sum(0));
    return d;
  }
  PYCURV_DISPATCH(ef_diag_impl, a, g, bias)
}

#undef PYCURV_DISPATCH

TORCH_LIBRARY_IMPL(pycurv, CPU, m) {
  m.impl("per_sample_grad_sqnorms", &per_sample_grad_sqnorms_cpu);
  m.impl("per_sample_gram", &per_sample_gram_cpu);
  m.impl("ef_diag", &ef_diag_cpu);
}

}  // namespace pycurv
