// CPU kernels of the iEF / EF / SF family (MATH.md section 3; Wu, Yu, Zhang & Woodland, NeurIPS 2024).
//
// weighted_grad_sum: W = sum_n coef_n G_n = g_flat^T diag(coef) a_flat, one GEMM over the K = N T rows of a and
//   g (row n T + t carries coef_n), plus the bias column sum_{n,t} coef_n g[n,t]; no G_n is formed. K is cut into
//   chunks of one micro-kernel K block (oneDNN BRGEMM through at::native::cpublas, float32 accumulation). Each
//   chunk is packed once: g^T, each row scaled by its coefficient, transposed into the A operand (the bias sums
//   ride along, in float32, in row order); a as the B operand (float32 rows read in place when evenly spaced,
//   otherwise converted). Then d_out x d_in tiles of W are multiplied in parallel. When the tiles are too few to
//   keep the threads busy the chunks are split among the threads instead (a statically assigned range and a
//   partial W per thread, summed in thread order: deterministic). Extra memory: one chunk of each operand (or one
//   per thread), never a copy of a or g.
//   Every product is exact. bfloat16 inputs with T >= kExactT multiply as bfloat16: chunks of whole samples, a in
//   VNNI-2 row pairs, and each sample's g_n^T a_n comes out of the micro-kernel in float32 and is added to W times
//   coef_n (an epilogue of about a quarter of the product's time at T = 64, which the bfloat16 speed more than
//   pays for from T = 16 on). Below that, and for float16, the inputs are converted to float32 while packing.
//   float64, and everything without the micro-kernel, runs ATen's matmul on scaled chunks of g.
//
// logit_grad_sqnorms: s_n = sum_t (S1o / S)^2 + S2o / S^2 with e_c = exp(z_c - max z), S1o = sum_{c != y} e_c,
//   S2o = sum_{c != y} e_c^2, S = S1o + e_y: the squared norm of softmax(z) - onehot(y), with both sums over
//   c != y accumulated directly so that nothing cancels when p_y is close to 1. One pass over each row's classes
//   from memory: blocks of classes (in L1) give their maximum first, S1o / S2o are rescaled whenever the running
//   maximum grows, and each block's sums are formed on their own before they join the running ones (rounding
//   error growing with the block length plus the number of blocks, not with C); the target is excluded by a lane
//   mask and e_y formed from the final maximum. AVX2 with a polynomial exp in float32 for every 16/32-bit dtype
//   (8 classes per vector; or 16 rows per pair of vectors when the rows, not the classes, are adjacent in memory,
//   as for the transposed view of an (N, C, T) tensor), scalar float64 for float64. Rows run in parallel into a
//   per-row buffer, summed over t per sample in order, in float64 (deterministic).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/gemm.h"
#include "pycurv.h"

namespace pycurv {
namespace {

using namespace cpu;
using at::Half;

// Time steps from which bfloat16 inputs multiply as bfloat16 (per-sample float32 products scaled by their
// coefficient); shorter samples are converted to float32.
constexpr int64_t kExactT = 16;
// Rows of W per per-sample product in the exact bfloat16 mode: the float32 product and its rows of W stay in L1.
constexpr int64_t kEpiRows = 32;
// Columns of g / a per packing task.
constexpr int64_t kPackCols = 64;
// Rows of a and g per chunk on the ATen path.
constexpr int64_t kAtenRows = 2048;
// Classes per block of a logits row: the block is read twice (maximum, then exponentials) from L1.
constexpr int64_t kClassBlock = 1024;

// p[j * cs] for j < n as contiguous float32: p itself when it already is, else converted into buf.
template <typename S>
const float* row_f32(const S* p, int64_t cs, int64_t n, float* buf) {
  if constexpr (std::is_same_v<S, float>) {
    if (cs == 1) return p;
  }
  if constexpr (std::is_same_v<S, BFloat16>) {
    if (cs == 1) {
      const uint16_t* b = bits(p);
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const uint32_t w = static_cast<uint32_t>(b[j]) << 16;
        std::memcpy(buf + j, &w, 4);
      }
      return buf;
    }
  }
  for (int64_t j = 0; j < n; ++j) buf[j] = static_cast<float>(p[j * cs]);
  return buf;
}

// ---------------------------------------------------------------------------------------------------------------
// weighted_grad_sum on the micro-kernel

#ifdef PYCURV_HAVE_BRGEMM

// Strided (N, T, D) input.
template <typename S>
struct View3 {
  const S* p;
  int64_t sn, st, sd;
  const S* row(int64_t k, int64_t T) const { return p + (k / T) * sn + (k % T) * st; }
};

template <typename S>
View3<S> view3(const Tensor& x) {
  return {static_cast<const S*>(x.data_ptr()), x.stride(0), x.stride(1), x.stride(2)};
}

// The micro-kernel path requires AVX2 (checked by the driver's probe), so its elementwise loops use it directly.
// v = cf x[j] (float32) for contiguous x (float or BFloat16): t[j] = v and bsum[j] += v, each where not null.
template <typename S>
__attribute__((target("avx2,fma"))) void scale_row(const S* x, int64_t n, float cf, float* t, float* bsum) {
  const __m256 f = _mm256_set1_ps(cf);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 v = _mm256_mul_ps(f, load8f(x + j));
    if (bsum) _mm256_storeu_ps(bsum + j, _mm256_add_ps(_mm256_loadu_ps(bsum + j), v));
    if (t) _mm256_storeu_ps(t + j, v);
  }
  for (; j < n; ++j) {
    const float v = cf * static_cast<float>(x[j]);
    if (bsum) bsum[j] += v;
    if (t) t[j] = v;
  }
}

// c[m * ldc + j] (=|+=) cf t[m * ldt + j] for m < rows, j < n.
__attribute__((target("avx2,fma"))) void add_scaled_rows(const float* t, int64_t ldt, int64_t rows, int64_t n,
                                                         float cf, bool set, float* c, int64_t ldc) {
  const __m256 f = _mm256_set1_ps(cf);
  for (int64_t m = 0; m < rows; ++m) {
    const float* tr = t + m * ldt;
    float* cr = c + m * ldc;
    int64_t j = 0;
    if (set) {
      for (; j + 8 <= n; j += 8) _mm256_storeu_ps(cr + j, _mm256_mul_ps(f, _mm256_loadu_ps(tr + j)));
      for (; j < n; ++j) cr[j] = cf * tr[j];
    } else {
      for (; j + 8 <= n; j += 8)
        _mm256_storeu_ps(cr + j, _mm256_fmadd_ps(f, _mm256_loadu_ps(tr + j), _mm256_loadu_ps(cr + j)));
      for (; j < n; ++j) cr[j] += cf * tr[j];
    }
  }
}

// w[j] += x[j] for j < n.
__attribute__((target("avx2,fma"))) void add_row(const float* x, int64_t n, float* w) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(w + j, _mm256_add_ps(_mm256_loadu_ps(w + j), _mm256_loadu_ps(x + j)));
  for (; j < n; ++j) w[j] += x[j];
}

// S: input dtype; E: operand dtype of the micro-kernel (float, or BFloat16 for bfloat16 inputs).
template <typename S, typename E>
class WeightedSum {
  static constexpr bool kHalf = std::is_same_v<E, BFloat16>;
  static_assert(!kHalf || std::is_same_v<S, BFloat16>, "bfloat16 operands come from bfloat16 inputs");

 public:
  // out: (d_out, d_in + bias) float32, contiguous. cfg_split: -1 by shape, 0 tiles, 1 K-split (self-tests).
  WeightedSum(const Tensor& a, const Tensor& g, const float* coef, bool bias, float* out, int cfg_split = -1)
      : a_(view3<S>(a)), g_(view3<S>(g)), N_(a.size(0)), T_(a.size(1)), di_(a.size(2)), do_(g.size(2)),
        K_(a.size(0) * a.size(1)), coef_(coef), bias_(bias), W_(out), ldw_(a.size(2) + (bias ? 1 : 0)) {
    if (per_sample_) {
      tp_ = T_ + T_ % 2;
      spc_ = std::max<int64_t>(1, kKbHalf / tp_);
      nchunk_ = cdiv(N_, spc_);
      vmax_ = std::min(spc_, N_) * tp_;
    } else {
      kc_ = kKb;
      nchunk_ = cdiv(K_, kc_);
      vmax_ = std::min(kc_, K_);
    }
    lda_ = kHalf ? round_up(vmax_, 32) + 32 : round_up(vmax_, 16) + 16;
    // Evenly spaced float32 rows of a are the B operand as they are.
    if constexpr (std::is_same_v<S, float> && !kHalf) {
      int64_t rs = -1;
      if (T_ == 1) {
        rs = a_.sn;
      } else if (N_ == 1 || a_.sn == T_ * a_.st) {
        rs = a_.st;
      }
      inplace_ = (a_.sd == 1 || di_ == 1) && rs >= di_ && rs > 0;
      rs_ = rs;
    }
    ldb_ = round_up(di_, 16) + 16;
    plan(cfg_split);
  }

  void run() {
    if (split_) {
      run_split();
    } else {
      run_tiles();
    }
  }

 private:
  // Operands of one chunk, and the float32 bias sums of the columns of g it has seen.
  struct Space {
    Buf<uint32_t> a, b;
    Buf<float> acc, bsum;
  };
  // Per-thread scratch of the packing and the per-sample epilogue.
  struct Scratch {
    Buf<float> rows, conv, tile;
    Buf<uint32_t> words;
  };

  void plan(int cfg_split) {
    const int64_t threads = num_threads();
    // Tiles: up to kMb rows of W by 4 panels, halved (rows to 64, then columns, then rows to 32) until there are
    // a few per thread and the last round of the dynamic schedule leaves at most 1/16 of the threads idle.
    mb_ = std::min<int64_t>(kMb, do_);
    gw_ = std::min<int64_t>(4 * kNb, round_up(di_, 16));
    auto tiles = [&] { return cdiv(do_, mb_) * cdiv(di_, gw_); };
    auto balanced = [&] {
      const int64_t t = tiles(), slots = round_up(t, threads);
      return t >= 4 * threads && 16 * (slots - t) <= slots;
    };
    while (!balanced() && (mb_ > 32 || gw_ > kNb)) {
      if (mb_ > 64 || (mb_ > 32 && gw_ <= kNb)) {
        mb_ = round_up(cdiv(mb_, 2), 16);
      } else {
        gw_ = std::max(kNb, gw_ / 2);
      }
    }
    split_ = threads > 1 && nchunk_ >= 2 && tiles() < 2 * threads;
    if (cfg_split >= 0) split_ = cfg_split == 1 && nchunk_ >= 2;
    nslots_ = split_ ? std::min(threads, nchunk_) : 1;
  }

  // Rows of chunk c (per sample, a zero row pads an odd T for the bfloat16 row pairs), and the source row
  // k = n T + t of row r of chunk c (-1 for a zero row).
  int64_t rows_of(int64_t c) const {
    if (per_sample_) return (std::min(N_, (c + 1) * spc_) - c * spc_) * tp_;
    return std::min(kc_, K_ - c * kc_);
  }
  int64_t src_row(int64_t c, int64_t r) const {
    if (per_sample_) {
      const int64_t s = r / tp_, t = r % tp_;
      return t < T_ ? (c * spc_ + s) * T_ + t : -1;
    }
    return c * kc_ + r;
  }

  E* a_op(const Space& sp) const { return reinterpret_cast<E*>(sp.a.data()); }

  // A operand rows [o0, o0 + ow) of chunk c, and with bias the float32 products coef_n g[k, o] added to bsum[o0:]
  // in row order. float32: coef_n g transposed. bfloat16: g transposed as it is (the coefficients scale the
  // float32 per-sample products).
  void pack_a(int64_t c, int64_t o0, int64_t ow, Space& sp, float* bsum, Scratch& s) const {
    const int64_t vr = rows_of(c);
    float* conv = s.conv.get(ow);
    uint32_t* aw = sp.a.data();
    auto row = [&](int64_t k, float* t, float* sums) {
      const float cf = coef_[k / T_];
      const S* src = g_.row(k, T_) + o0 * g_.sd;
      if constexpr (std::is_same_v<S, float> || std::is_same_v<S, BFloat16>) {
        if (g_.sd == 1) return scale_row<S>(src, ow, cf, t, sums);
      }
      scale_row<float>(row_f32<S>(src, g_.sd, ow, conv), ow, cf, t, sums);
    };
    if constexpr (kHalf) {
      const int64_t kq = vr / 2;
      uint32_t* w = s.words.get(kq * ow);
      uint16_t* lo = reinterpret_cast<uint16_t*>(s.rows.get(ow));
      uint16_t* hi = lo + ow;
      auto src = [&](int64_t k, uint16_t* buf) -> const uint16_t* {
        const BFloat16* p = g_.row(k, T_) + o0 * g_.sd;
        if (g_.sd == 1) return bits(p);
        for (int64_t j = 0; j < ow; ++j) buf[j] = bits(p + j * g_.sd)[0];
        return buf;
      };
      for (int64_t q = 0; q < kq; ++q) {
        const int64_t k0 = src_row(c, 2 * q), k1 = src_row(c, 2 * q + 1);
        interleave16(src(k0, lo), k1 >= 0 ? src(k1, hi) : nullptr, ow, w + q * ow);
      }
      transpose32(w, ow, kq, ow, aw + o0 * (lda_ / 2), lda_ / 2);
      if (bias_)
        for (int64_t r = 0; r < vr; ++r) {
          const int64_t k = src_row(c, r);
          if (k >= 0) row(k, nullptr, bsum);
        }
    } else {
      float* tmp = s.rows.get(vr * ow);
      for (int64_t r = 0; r < vr; ++r) row(src_row(c, r), tmp + r * ow, bias_ ? bsum : nullptr);
      transpose32(reinterpret_cast<const uint32_t*>(tmp), ow, vr, ow, aw + o0 * lda_, lda_);
    }
  }

  // B operand columns [i0, i0 + iw) of chunk c.
  void pack_b(int64_t c, int64_t i0, int64_t iw, Space& sp, Scratch& s) const {
    const int64_t vr = rows_of(c);
    if constexpr (kHalf) {
      uint32_t* bw = sp.b.data();
      uint16_t* lo = reinterpret_cast<uint16_t*>(s.conv.get(iw));
      uint16_t* hi = reinterpret_cast<uint16_t*>(s.tile.get(iw));
      auto src = [&](int64_t k, uint16_t* buf) -> const uint16_t* {
        const BFloat16* p = a_.row(k, T_) + i0 * a_.sd;
        if (a_.sd == 1) return bits(p);
        for (int64_t j = 0; j < iw; ++j) buf[j] = bits(p + j * a_.sd)[0];
        return buf;
      };
      for (int64_t q = 0; q < vr / 2; ++q) {
        // Only the second row of a pair can be a zero row.
        const int64_t k0 = src_row(c, 2 * q), k1 = src_row(c, 2 * q + 1);
        interleave16(src(k0, lo), k1 >= 0 ? src(k1, hi) : nullptr, iw, bw + q * ldb_ + i0);
      }
    } else {
      float* bf = reinterpret_cast<float*>(sp.b.data());
      for (int64_t r = 0; r < vr; ++r) {
        const int64_t k = src_row(c, r);
        float* dst = bf + r * ldb_ + i0;
        const float* x = row_f32<S>(a_.row(k, T_) + i0 * a_.sd, a_.sd, iw, dst);
        if (x != dst) std::memcpy(dst, x, iw * sizeof(float));
      }
    }
  }

  void pack_task(int64_t c, int64_t task, Space& sp, float* bsum, Scratch& s) const {
    const int64_t na = cdiv(do_, kPackCols);
    if (task < na) {
      const int64_t o0 = task * kPackCols;
      pack_a(c, o0, std::min(kPackCols, do_ - o0), sp, bsum + o0, s);
    } else {
      const int64_t i0 = (task - na) * kPackCols;
      pack_b(c, i0, std::min(kPackCols, di_ - i0), sp, s);
    }
  }

  int64_t pack_tasks() const { return cdiv(do_, kPackCols) + (inplace_ ? 0 : cdiv(di_, kPackCols)); }

  // B operand of chunk c from column i, and its row stride.
  const E* b_op(const Space& sp, int64_t c, int64_t i, int64_t& ldb) const {
    if constexpr (kHalf) {
      ldb = ldb_;
      return reinterpret_cast<const E*>(sp.b.data() + i);
    } else {
      if (inplace_) {
        ldb = rs_;
        return reinterpret_cast<const E*>(a_.p) + c * kc_ * rs_ + i;
      }
      ldb = ldb_;
      return reinterpret_cast<const E*>(sp.b.data()) + i;
    }
  }

  // C[o0:o0+mm, i0:i0+iw] (+)= the product of chunk c; first: C is not read (first chunk of this accumulator).
  void compute(int64_t c, const Space& sp, int64_t o0, int64_t mm, int64_t i0, int64_t iw, float* C, int64_t ldc,
               bool first, Scratch& s) const {
    const int64_t vr = rows_of(c);
    const E* a = a_op(sp) + o0 * lda_;
    for (int64_t n0 = i0; n0 < i0 + iw; n0 += kNb) {
      const int64_t nn = std::min(kNb, i0 + iw - n0);
      int64_t ldb;
      const E* b = b_op(sp, c, n0, ldb);
      float* cp = C + o0 * ldc + n0;
      if (!per_sample_) {
        cb::brgemm(mm, nn, vr, lda_, ldb, ldc, !first, a, b, cp, kHalf);
        continue;
      }
      // One sample at a time into a float32 tile, added to C times its coefficient; blocks of kEpiRows rows keep
      // the tile and its part of C in L1.
      float* tile = s.tile.get(kEpiRows * kNb);
      for (int64_t m0 = 0; m0 < mm; m0 += kEpiRows) {
        const int64_t me = std::min(kEpiRows, mm - m0);
        for (int64_t r0 = 0; r0 < vr; r0 += tp_) {
          for (int64_t k0 = 0; k0 < tp_; k0 += kKbHalf) {
            const int64_t kk = std::min(kKbHalf, tp_ - k0);
            cb::brgemm(me, nn, kk, lda_, ldb, kNb, k0 > 0, a + m0 * lda_ + r0 + k0, b + (r0 + k0) / 2 * ldb * 2,
                       tile, true);
          }
          add_scaled_rows(tile, kNb, me, nn, coef_[c * spc_ + r0 / tp_], first && r0 == 0, cp + m0 * ldc, ldc);
        }
      }
    }
  }

  void alloc(Space& sp) const {
    sp.a.get(do_ * lda_ / (kHalf ? 2 : 1));
    if (kHalf) {
      sp.b.get(vmax_ / 2 * ldb_);
    } else if (!inplace_) {
      sp.b.get(vmax_ * ldb_);
    }
    float* bsum = sp.bsum.get(do_);
    std::fill(bsum, bsum + do_, 0.0f);
  }

  // Chunks one after the other, each packed by all threads and then multiplied tile by tile.
  void run_tiles() {
    Space sp;
    alloc(sp);
    float* bsum = sp.bsum.data();
    const int64_t threads = num_threads();
    std::vector<Scratch> scratch(threads);
    const int64_t nm = cdiv(do_, mb_), ng = cdiv(di_, gw_);
    for (int64_t c = 0; c < nchunk_; ++c) {
      parallel_tiles(pack_tasks(), threads, [&](int64_t slot, auto&& next) {
        for (int64_t t = next(); t >= 0; t = next()) pack_task(c, t, sp, bsum, scratch[slot]);
      });
      parallel_tiles(nm * ng, threads, [&](int64_t slot, auto&& next) {
        for (int64_t t = next(); t >= 0; t = next()) {
          const int64_t o0 = (t / ng) * mb_, i0 = (t % ng) * gw_;
          compute(c, sp, o0, std::min(mb_, do_ - o0), i0, std::min(gw_, di_ - i0), W_, ldw_, c == 0, scratch[slot]);
        }
        release_brgemm(kHalf);
      });
    }
    finish_bias({bsum});
  }

  // K-split: thread s packs and multiplies chunks [s nchunk / nslots, (s + 1) nchunk / nslots) into its own W
  // (the first thread's is the output), then the partial Ws are summed in thread order.
  void run_split() {
    std::vector<Space> spaces(nslots_);
    at::parallel_for(0, nslots_, 1, [&](int64_t s0, int64_t s1) {
      for (int64_t si = s0; si < s1; ++si) {
        Space& sp = spaces[si];
        Scratch scratch;
        alloc(sp);
        float* C = si == 0 ? W_ : sp.acc.get(do_ * ldw_);
        const int64_t c0 = si * nchunk_ / nslots_, c1 = (si + 1) * nchunk_ / nslots_;
        for (int64_t c = c0; c < c1; ++c) {
          for (int64_t t = 0; t < pack_tasks(); ++t) pack_task(c, t, sp, sp.bsum.data(), scratch);
          for (int64_t o0 = 0; o0 < do_; o0 += mb_)
            compute(c, sp, o0, std::min(mb_, do_ - o0), 0, di_, C, ldw_, c == c0, scratch);
        }
        release_brgemm(kHalf);
      }
    });
    at::parallel_for(0, do_, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        float* w = W_ + r * ldw_;
        for (int64_t si = 1; si < nslots_; ++si) add_row(spaces[si].acc.data() + r * ldw_, di_, w);
      }
    });
    std::vector<const float*> sums;
    for (const auto& sp : spaces) sums.push_back(sp.bsum.data());
    finish_bias(sums);
  }

  void finish_bias(const std::vector<const float*>& sums) const {
    if (!bias_) return;
    for (int64_t o = 0; o < do_; ++o) {
      float v = 0;
      for (const float* s : sums) v += s[o];
      W_[o * ldw_ + di_] = v;
    }
  }

  const View3<S> a_, g_;
  const int64_t N_, T_, di_, do_, K_;
  const float* coef_;
  const bool bias_;
  float* W_;
  const int64_t ldw_;
  static constexpr bool per_sample_ = kHalf;
  bool inplace_ = false, split_ = false;
  int64_t tp_ = 0, spc_ = 0, kc_ = 0, nchunk_ = 0, vmax_ = 0, lda_ = 0, ldb_ = 0, rs_ = 0;
  int64_t mb_ = 0, gw_ = 0, nslots_ = 1;
};

template <typename S, typename E>
void weighted_sum_brgemm(const Tensor& a, const Tensor& g, const float* coef, bool bias, float* out,
                         int split = -1) {
  WeightedSum<S, E>(a, g, coef, bias, out, split).run();
}

// The micro-kernel path against exact integer results: both schedules, odd T (zero rows of the bfloat16 pairs),
// long samples, strided inputs, several chunks, the bias column.
template <typename E>
bool weighted_sum_self_test() {
  try {
    bool ok = true;
    const int64_t cases[3][4] = {{1037, 1, 70, 19}, {3, 17, 21, 40}, {2, 600, 9, 5}};  // N, T, d_in, d_out
    for (const auto& cs : cases) {
      const int64_t N = cs[0], T = cs[1], di = cs[2], dout = cs[3];
      auto opt = at::TensorOptions().dtype(at::kFloat);
      Tensor a = at::arange(N * T * di, opt).remainder(9).sub(4).reshape({N, T, di});
      Tensor g = at::arange(N * T * dout, opt).mul(7).remainder(11).sub(5).reshape({N, T, dout});
      // Powers of two keep every product and sum below 2^24 exact in float32 and in bfloat16.
      Tensor coef = at::pow(2.0, at::arange(N, opt).remainder(5).sub(2)).to(at::kFloat);
      Tensor want = at::zeros({dout, di + 1}, opt);
      const float* ap = a.data_ptr<float>();
      const float* gp = g.data_ptr<float>();
      const float* cp = coef.data_ptr<float>();
      float* wp = want.data_ptr<float>();
      for (int64_t k = 0; k < N * T; ++k)
        for (int64_t o = 0; o < dout; ++o) {
          const float v = cp[k / T] * gp[k * dout + o];
          for (int64_t i = 0; i < di; ++i) wp[o * (di + 1) + i] += v * ap[k * di + i];
          wp[o * (di + 1) + di] += v;
        }
      // A transposed copy of a (strided rows) and g as stored.
      Tensor ae = a.to(scalar_of<E>()), ge = g.to(scalar_of<E>());
      Tensor at_ = at::empty({N, di, T}, ae.options()).copy_(ae.transpose(1, 2)).transpose(1, 2);
      for (int split = 0; split < 2; ++split)
        for (const Tensor* in : {&ae, &at_}) {
          Tensor out = at::full({dout, di + 1}, NAN, opt);
          weighted_sum_brgemm<E, E>(*in, ge, cp, true, out.data_ptr<float>(), split);
          ok = ok && at::equal(out, want);
        }
    }
    release_brgemm(std::is_same_v<E, BFloat16>);
    return ok;
  } catch (...) {
    return false;
  }
}

bool wgs_brgemm_f32_ok() {
  static const bool ok = brgemm_driver_support().f32 && weighted_sum_self_test<float>();
  return ok;
}

bool wgs_brgemm_bf16_ok() {
  static const bool ok = brgemm_driver_support().bf16 && wgs_brgemm_f32_ok() && weighted_sum_self_test<BFloat16>();
  return ok;
}
#endif  // PYCURV_HAVE_BRGEMM

// Whether weighted_grad_sum runs on the micro-kernel (the user may turn oneDNN off); probed on first use.
bool use_wgs_brgemm_f32() {
#ifdef PYCURV_HAVE_BRGEMM
  return at::globalContext().userEnabledMkldnn() && wgs_brgemm_f32_ok();
#else
  return false;
#endif
}

bool use_wgs_brgemm_bf16() {
#ifdef PYCURV_HAVE_BRGEMM
  return at::globalContext().userEnabledMkldnn() && wgs_brgemm_bf16_ok();
#else
  return false;
#endif
}

// ATen path: chunks of whole samples, coef_n g scaled into the accumulation dtype, one addmm per chunk (ATen's
// matmul runs multithreaded on the calling thread).
Tensor weighted_sum_aten(const Tensor& a, const Tensor& g, const Tensor& coef, bool bias, at::ScalarType acc) {
  const int64_t N = a.size(0), T = a.size(1), di = a.size(2), dout = g.size(2);
  Tensor W = at::zeros({dout, di + (bias ? 1 : 0)}, a.options().dtype(acc));
  Tensor Wm = W.narrow(1, 0, di);
  const int64_t step = std::max<int64_t>(1, kAtenRows / std::max<int64_t>(T, 1));
  for (int64_t n0 = 0; n0 < N; n0 += step) {
    const int64_t m = std::min(step, N - n0);
    Tensor gs = at::mul(g.narrow(0, n0, m).to(acc), coef.narrow(0, n0, m).view({m, 1, 1})).reshape({m * T, dout});
    Tensor ac = a.narrow(0, n0, m).to(acc).reshape({m * T, di});
    Wm.addmm_(gs.t(), ac);
    if (bias) W.select(1, di).add_(gs.sum(0));
  }
  return W;
}

// ---------------------------------------------------------------------------------------------------------------
// logit_grad_sqnorms

// s = (S1o / S)^2 + S2o / S^2 with S = S1o + e_y.
template <typename T>
T finish_row(T s1, T s2, T ey) {
  const T S = s1 + ey;
  const T r = s1 / S;
  return r * r + s2 / (S * S);
}

// Scalar path (float64, and every dtype without AVX2): the same blocked online pass.
template <typename S, typename T>
T row_sqnorm_scalar(const S* z, int64_t cs, int64_t C, int64_t y) {
  T m = -std::numeric_limits<T>::infinity(), s1 = 0, s2 = 0;
  for (int64_t c0 = 0; c0 < C; c0 += kClassBlock) {
    const int64_t c1 = std::min(C, c0 + kClassBlock);
    T bm = -std::numeric_limits<T>::infinity();
    for (int64_t c = c0; c < c1; ++c) bm = std::max(bm, static_cast<T>(z[c * cs]));
    if (bm > m) {
      const T f = std::exp(m - bm);
      s1 *= f;
      s2 *= f * f;
      m = bm;
    }
    // While every class so far is -inf, any finite reference keeps exp(-inf) = 0 (and NaN as NaN).
    const T me = m == -std::numeric_limits<T>::infinity() ? T(0) : m;
    T b1 = 0, b2 = 0;
    for (int64_t c = c0; c < c1; ++c) {
      const T v = static_cast<T>(z[c * cs]);
      if (c == y) continue;
      const T e = std::exp(v - me);
      b1 += e;
      b2 += e * e;
    }
    s1 += b1;
    s2 += b2;
  }
  return finish_row<T>(s1, s2, std::exp(static_cast<T>(z[y * cs]) - m));
}

#ifdef PYCURV_CPU_AVX2
// AVX2 + FMA, and F16C for float16 logits.
bool lgs_avx2() {
  static const bool yes = cpu_avx2() && __builtin_cpu_supports("f16c");
  return yes;
}

// exp(x) for x <= 0 (a row minus its maximum), NaN in NaN out: x = n ln2 + r with |r| <= ln2 / 2 (ln2 in two
// parts; n rounded by the 1.5 * 2^23 shift, whose low bits then hold n), exp(r) by its degree-6 Taylor polynomial
// (relative error of exp about 3e-7), 2^n through the exponent bits. x is first raised to ln(FLT_MIN), so every
// e_c is at least 1.2e-38 (the float32 reference gives subnormals or 0 there): as S >= 1, no result moves.
__attribute__((target("avx2,fma"))) inline __m256 exp_neg(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-87.33654f), x);  // NaN stays in x (the second operand wins when one is NaN)
  const __m256 shift = _mm256_set1_ps(12582912.0f);
  const __m256 t = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), shift);
  const __m256 n = _mm256_sub_ps(t, shift);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  // The bits of t are those of the shift plus n, and the shift's own vanish when moved up by 23.
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// Eight classes as float32.
template <typename S>
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8any(const S* p) {
  if constexpr (std::is_same_v<S, Half>) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  } else {
    return load8f(p);
  }
}

__attribute__((target("avx2,fma"))) inline float hmax(__m256 v) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  x = _mm_max_ss(x, _mm_shuffle_ps(x, x, 1));
  return _mm_cvtss_f32(x);
}

__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_shuffle_ps(x, x, 1));
  return _mm_cvtss_f32(x);
}

// Eight classes from c: the row itself up to cv (its length rounded down to 8), then the padded tail.
template <typename S>
__attribute__((target("avx2,fma,f16c"))) inline __m256 load_classes(const S* z, int64_t c, int64_t cv,
                                                                    const float* tail) {
  return c < cv ? load8any(z + c) : _mm256_load_ps(tail);
}

// S1o += e, S2o += e^2 for the eight classes of x (the maximum m subtracted), the target's lane masked out.
__attribute__((target("avx2,fma"))) inline void add_terms(__m256 x, __m256 m, int64_t c, int64_t y, __m256& s1,
                                                          __m256& s2) {
  __m256 e = exp_neg(_mm256_sub_ps(x, m));
  if (y >= c && y < c + 8) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    e = _mm256_andnot_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(lane, _mm256_set1_epi32(int(y - c)))), e);
  }
  s1 = _mm256_add_ps(s1, e);
  s2 = _mm256_fmadd_ps(e, e, s2);
}

// One row of contiguous classes (S = float, BFloat16 or Half), y the target: float32 lanes throughout.
template <typename S>
__attribute__((target("avx2,fma,f16c"))) float row_sqnorm_avx2(const S* z, int64_t C, int64_t y) {
  const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  float m = -std::numeric_limits<float>::infinity();
  // Running sums, and each block's own (two-level summation: the rounding error grows with the block length plus
  // the number of blocks, not with C).
  __m256 s1 = _mm256_setzero_ps(), s2 = s1;
  // The last C % 8 classes, padded with -inf (exp gives 0).
  alignas(32) float tail[8];
  const int64_t cv = C / 8 * 8;
  for (int64_t j = 0; j < 8; ++j) tail[j] = cv + j < C ? static_cast<float>(z[cv + j]) : -INFINITY;
  const int64_t cend = round_up(C, 8);
  for (int64_t c0 = 0; c0 < cend; c0 += kClassBlock) {
    const int64_t c1 = std::min(cend, c0 + kClassBlock);
    __m256 bma = ninf, bmb = ninf;
    int64_t c = c0;
    for (; c + 16 <= c1; c += 16) {
      bma = _mm256_max_ps(bma, load_classes(z, c, cv, tail));
      bmb = _mm256_max_ps(bmb, load_classes(z, c + 8, cv, tail));
    }
    if (c < c1) bma = _mm256_max_ps(bma, load_classes(z, c, cv, tail));
    const float bm = hmax(_mm256_max_ps(bma, bmb));
    if (bm > m) {
      const float f = std::exp(m - bm);
      s1 = _mm256_mul_ps(s1, _mm256_set1_ps(f));
      s2 = _mm256_mul_ps(s2, _mm256_set1_ps(f * f));
      m = bm;
    }
    const __m256 mv = _mm256_set1_ps(m == -INFINITY ? 0.0f : m);  // as in row_sqnorm_scalar
    __m256 s1a = _mm256_setzero_ps(), s1b = s1a, s2a = s1a, s2b = s1a;
    c = c0;
    for (; c + 16 <= c1; c += 16) {
      add_terms(load_classes(z, c, cv, tail), mv, c, y, s1a, s2a);
      add_terms(load_classes(z, c + 8, cv, tail), mv, c + 8, y, s1b, s2b);
    }
    if (c < c1) add_terms(load_classes(z, c, cv, tail), mv, c, y, s1a, s2a);
    s1 = _mm256_add_ps(s1, _mm256_add_ps(s1a, s1b));
    s2 = _mm256_add_ps(s2, _mm256_add_ps(s2a, s2b));
  }
  return finish_row<float>(hsum(s1), hsum(s2), std::exp(static_cast<float>(z[y]) - m));
}

// Sixteen rows whose time steps are adjacent in memory (zt == 1, the classes zc apart: logits.transpose(1, 2) of
// an (N, C, T) tensor), one row per lane: each class is one contiguous load for all sixteen, where row by row it
// would be a gather. The same blocked online pass per lane; y[l] < 0 marks a lane without a target (its result is
// not used).
template <typename S>
__attribute__((target("avx2,fma,f16c"))) void rows16_sqnorm_avx2(const S* z, int64_t zc, int64_t C,
                                                                const int64_t* y, float* out) {
  constexpr int64_t kBlock = 128;
  const __m256 ninf = _mm256_set1_ps(-INFINITY);
  alignas(32) int32_t yl[16];
  for (int l = 0; l < 16; ++l) yl[l] = static_cast<int32_t>(y[l]);
  const __m256i y0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(yl));
  const __m256i y1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(yl + 8));
  __m256 m0 = ninf, m1 = ninf, a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
  for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
    const int64_t c1 = std::min(C, c0 + kBlock);
    __m256 n0 = m0, n1 = m1;
    for (int64_t c = c0; c < c1; ++c) {
      n0 = _mm256_max_ps(n0, load8any(z + c * zc));
      n1 = _mm256_max_ps(n1, load8any(z + c * zc + 8));
    }
    // Rescale where the maximum grew (a lane still at -inf holds zeros, or NaN, that stay so).
    const __m256 f0 = _mm256_andnot_ps(_mm256_cmp_ps(m0, ninf, _CMP_EQ_OQ), exp_neg(_mm256_sub_ps(m0, n0)));
    const __m256 f1 = _mm256_andnot_ps(_mm256_cmp_ps(m1, ninf, _CMP_EQ_OQ), exp_neg(_mm256_sub_ps(m1, n1)));
    a0 = _mm256_mul_ps(a0, f0);
    b0 = _mm256_mul_ps(b0, _mm256_mul_ps(f0, f0));
    a1 = _mm256_mul_ps(a1, f1);
    b1 = _mm256_mul_ps(b1, _mm256_mul_ps(f1, f1));
    m0 = n0;
    m1 = n1;
    const __m256 e0 = _mm256_blendv_ps(m0, _mm256_setzero_ps(), _mm256_cmp_ps(m0, ninf, _CMP_EQ_OQ));
    const __m256 e1 = _mm256_blendv_ps(m1, _mm256_setzero_ps(), _mm256_cmp_ps(m1, ninf, _CMP_EQ_OQ));
    __m256 p0 = _mm256_setzero_ps(), p1 = p0, q0 = p0, q1 = p0;  // this block's sums
    for (int64_t c = c0; c < c1; ++c) {
      const __m256i cv = _mm256_set1_epi32(static_cast<int32_t>(c));
      __m256 v0 = exp_neg(_mm256_sub_ps(load8any(z + c * zc), e0));
      __m256 v1 = exp_neg(_mm256_sub_ps(load8any(z + c * zc + 8), e1));
      v0 = _mm256_andnot_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(y0, cv)), v0);
      v1 = _mm256_andnot_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(y1, cv)), v1);
      p0 = _mm256_add_ps(p0, v0);
      q0 = _mm256_fmadd_ps(v0, v0, q0);
      p1 = _mm256_add_ps(p1, v1);
      q1 = _mm256_fmadd_ps(v1, v1, q1);
    }
    a0 = _mm256_add_ps(a0, p0);
    b0 = _mm256_add_ps(b0, q0);
    a1 = _mm256_add_ps(a1, p1);
    b1 = _mm256_add_ps(b1, q1);
  }
  alignas(32) float m[16], s1[16], s2[16];
  _mm256_store_ps(m, m0);
  _mm256_store_ps(m + 8, m1);
  _mm256_store_ps(s1, a0);
  _mm256_store_ps(s1 + 8, a1);
  _mm256_store_ps(s2, b0);
  _mm256_store_ps(s2 + 8, b1);
  for (int l = 0; l < 16; ++l)
    if (y[l] >= 0) out[l] = finish_row<float>(s1[l], s2[l], std::exp(static_cast<float>(z[y[l] * zc + l]) - m[l]));
}
#endif

// Squared logit-gradient norm of one row (classes p[c * cs]), float32 (float64 for float64 logits); buf holds
// C float32 values for rows that need converting.
template <typename S, typename T>
T row_sqnorm(const S* p, int64_t cs, int64_t C, int64_t y, float* buf) {
#ifdef PYCURV_CPU_AVX2
  if constexpr (std::is_same_v<T, float>) {
    if (lgs_avx2()) {
      if (cs == 1) return row_sqnorm_avx2<S>(p, C, y);
      for (int64_t c = 0; c < C; ++c) buf[c] = static_cast<float>(p[c * cs]);
      return row_sqnorm_avx2<float>(buf, C, y);
    }
  }
#endif
  (void)buf;
  return row_sqnorm_scalar<S, T>(p, cs, C, y);
}

template <typename S, typename T>
Tensor logit_sqnorms_impl(const Tensor& logits, const Tensor& targets, int64_t ignore_index) {
  const int64_t N = logits.size(0), Tn = logits.size(1), C = logits.size(2), R = N * Tn;
  const S* z = static_cast<const S*>(logits.data_ptr());
  const int64_t zn = logits.stride(0), zt = logits.stride(1), zc = logits.stride(2);
  const int64_t* y = targets.data_ptr<int64_t>();
  const int64_t yn = targets.stride(0), yt = targets.stride(1);
  auto opt = logits.options().dtype(scalar_of<T>());
  Tensor rows = at::empty({R}, opt);
  T* rp = rows.data_ptr<T>();
  // A bad target is reported after the parallel region (the first one in row order).
  std::atomic<int64_t> bad{R};
  // The target of row (n, t), or -1 for an ignored or bad one (whose row is 0).
  auto target = [&](int64_t n, int64_t t) -> int64_t {
    const int64_t yy = y[n * yn + t * yt], r = n * Tn + t;
    if (yy != ignore_index && yy >= 0 && yy < C) return yy;
    if (yy != ignore_index) {
      int64_t cur = bad.load();
      while (r < cur && !bad.compare_exchange_weak(cur, r)) {
      }
    }
    rp[r] = 0;
    return -1;
  };
  auto one_row = [&](int64_t n, int64_t t, float* buf) {
    const int64_t yy = target(n, t);
    if (yy >= 0) rp[n * Tn + t] = row_sqnorm<S, T>(z + n * zn + t * zt, zc, C, yy, buf);
  };
  // Sixteen rows at a time when their time steps are adjacent and the classes are not.
  bool lanes = false;
#ifdef PYCURV_CPU_AVX2
  lanes = std::is_same_v<T, float> && zt == 1 && zc != 1 && Tn >= 16 && C < (int64_t(1) << 31) && lgs_avx2();
#endif
  const int64_t per = lanes ? 16 : 1, groups = cdiv(Tn, per);
  const int64_t grain = std::max<int64_t>(1, 32768 / (per * std::max<int64_t>(C, 1)));
  at::parallel_for(0, N * groups, grain, [&](int64_t u0, int64_t u1) {
    std::vector<float> buf(zc == 1 ? 0 : C);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t n = u / groups, t0 = (u % groups) * per;
#ifdef PYCURV_CPU_AVX2
      if constexpr (std::is_same_v<T, float>) {
        if (lanes && t0 + 16 <= Tn) {
          int64_t yl[16];
          for (int64_t l = 0; l < 16; ++l) yl[l] = target(n, t0 + l);
          rows16_sqnorm_avx2<S>(z + n * zn + t0, zc, C, yl, rp + n * Tn + t0);
          continue;
        }
      }
#endif
      for (int64_t t = t0; t < std::min(Tn, t0 + per); ++t) one_row(n, t, buf.data());
    }
  });
  if (bad.load() < R) {
    const int64_t r = bad.load();
    TORCH_CHECK_VALUE(false, "logit_grad_sqnorms: targets must be in [0, ", C, ") or equal ignore_index=",
                      ignore_index, ", got ", y[(r / Tn) * yn + (r % Tn) * yt], " at (", r / Tn, ", ", r % Tn, ")");
  }
  Tensor out = at::empty({N}, opt);
  T* op = out.data_ptr<T>();
  at::parallel_for(0, N, 1024, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      double s = 0;  // T terms: no float32 rounding error that grows with T
      for (int64_t t = 0; t < Tn; ++t) s += rp[n * Tn + t];
      op[n] = static_cast<T>(s);
    }
  });
  return out;
}

}  // namespace

at::Tensor weighted_grad_sum_cpu(const at::Tensor& a, const at::Tensor& g, const at::Tensor& coef, bool bias) {
  const char* op = "weighted_grad_sum";
  check_ag(a, g, op);
  check_cpu(a, op, "a");
  const auto acc = acc_dtype(a.scalar_type());
  TORCH_CHECK_VALUE(coef.dim() == 1 && coef.size(0) == a.size(0), op, ": coef must have shape (", a.size(0),
                    ",) (one value per sample), got ", coef.sizes());
  TORCH_CHECK_TYPE(coef.scalar_type() == acc, op, ": coef must be ", (acc == c10::kDouble ? "float64" : "float32"),
                   " for ", a.scalar_type(), " inputs (float32, float64 for float64 inputs), got ", coef.scalar_type());
  check_cpu(coef, op, "coef");
  const Tensor c = coef.contiguous();
  const int64_t di = a.size(2), dout = g.size(2);
  const bool empty = a.numel() == 0 || g.numel() == 0;
#ifdef PYCURV_HAVE_BRGEMM
  if (acc == c10::kFloat && !empty && use_wgs_brgemm_f32()) {
    Tensor W = at::empty({dout, di + (bias ? 1 : 0)}, a.options().dtype(at::kFloat));
    const float* cp = c.data_ptr<float>();
    float* wp = W.data_ptr<float>();
    switch (a.scalar_type()) {
      case c10::kBFloat16:
        if (a.size(1) >= kExactT && use_wgs_brgemm_bf16()) {
          weighted_sum_brgemm<BFloat16, BFloat16>(a, g, cp, bias, wp);
        } else {
          weighted_sum_brgemm<BFloat16, float>(a, g, cp, bias, wp);
        }
        break;
      case c10::kHalf:
        weighted_sum_brgemm<Half, float>(a, g, cp, bias, wp);
        break;
      default:
        weighted_sum_brgemm<float, float>(a, g, cp, bias, wp);
    }
    return W;
  }
#endif
  (void)empty;
  return weighted_sum_aten(a, g, c, bias, acc);
}

at::Tensor logit_grad_sqnorms_cpu(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index) {
  const char* op = "logit_grad_sqnorms";
  TORCH_CHECK_VALUE(logits.dim() == 3, op, ": logits must be (N, T, C), got ", logits.dim(), "-d tensor of shape ",
                    logits.sizes());
  TORCH_CHECK_TYPE(is_float_type(logits.scalar_type()), op, ": logits must be float32/float64/float16/bfloat16, got ",
                   logits.scalar_type());
  TORCH_CHECK_TYPE(targets.scalar_type() == c10::kLong, op, ": targets must be int64, got ", targets.scalar_type());
  TORCH_CHECK_VALUE(targets.dim() == 2 && targets.size(0) == logits.size(0) && targets.size(1) == logits.size(1),
                    op, ": targets must have shape (", logits.size(0), ", ", logits.size(1), ") (logits without the "
                    "class dim), got ", targets.sizes());
  check_cpu(logits, op, "logits");
  check_cpu(targets, op, "targets");
  switch (logits.scalar_type()) {
    case c10::kDouble:
      return logit_sqnorms_impl<double, double>(logits, targets, ignore_index);
    case c10::kBFloat16:
      return logit_sqnorms_impl<BFloat16, float>(logits, targets, ignore_index);
    case c10::kHalf:
      return logit_sqnorms_impl<Half, float>(logits, targets, ignore_index);
    default:
      return logit_sqnorms_impl<float, float>(logits, targets, ignore_index);
  }
}

TORCH_LIBRARY_IMPL(pycurv, CPU, m) {
  m.impl("weighted_grad_sum", &weighted_grad_sum_cpu);
  m.impl("logit_grad_sqnorms", &logit_grad_sqnorms_cpu);
}

}  // namespace pycurv
