// CPU kernels of the K-FAC family (MATH.md section 2; Martens & Grosse 2015, Grosse & Martens 2016).
//
// kfac_factor_update: factor <- decay * factor + (1 - decay) * xb^T xb / R with xb = [x, 1]; the ones column is
//   virtual (its products are the column sums of x, and R). A SYRK: only the lower blocks of x^T x are formed,
//   row block I against the columns up to its end (diagonal blocks by strips), over chunks of rows of x. Each
//   chunk is packed once for all row blocks (transposed for the left operand; bfloat16 also in VNNI-2 pairs for
//   the right one; float32 rows are read in place) and multiplied by oneDNN's BRGEMM micro-kernel (float32
//   accumulation, bfloat16 products exact); float64, and float32 where the micro-kernel is unavailable, go through
//   ATen's matmul. Row blocks of all factors of the batch are spread over the threads, with the packing of the
//   next chunk interleaved; when there are too few row blocks the chunks are split among the threads instead
//   (K-split, one partial sum per thread). The epilogue runs per row block as soon as its last chunk is in:
//   scale by 1/R, running average, mirror onto the upper triangle (exactly symmetric; decay = 0 never reads the
//   old factor).
// damped_inverse "cholesky": per matrix, a blocked left-looking Cholesky factorisation L L^T = m + damping I,
//   L^-1 by block rows, then the lower triangle of L^-T L^-1 (about d^3 flops in all), on a register-blocked
//   GEMM micro-kernel that works in cache; matrices in parallel. Beyond d = 2048, LAPACK.
//   "eigh": per-matrix LAPACK eigendecompositions in parallel, Q diag(1 / lambda) Q^T.
// kron_precondition / kron_precondition_eigen: ATen batched matmuls (both association orders cost
//   d_out d_in (d_out + d_in) per layer, so the reference's left-to-right order is kept); the division by the
//   grid of eigenvalue products (George et al. 2018) is one fused pass over the middle intermediate.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/gemm.h"
#include "pycurv.h"

namespace pycurv {
namespace {

using namespace cpu;

// ---------------------------------------------------------------------------------------------------------------
// kfac_factor_update

// Rows of the factor per row block (the M of one micro-kernel call) and columns of its right-hand panels.
constexpr int64_t kRowBlock = 64;
constexpr int64_t kPanel = 64;
// Rows per strip of a diagonal block (each strip stops at its own end, skipping most of the upper triangle).
constexpr int64_t kDiagRows = 16;
// Bytes of one packed chunk of the whole batch (the unit between synchronisations; measured best when it stays
// about the size of L2), and rows per chunk on the ATen path.
constexpr int64_t kChunkBytes = int64_t(2) << 20;
constexpr int64_t kChunkAten = 1024;
// Rows of x per micro-kernel call (its K): a block of A and a panel of B stay in L2.
constexpr int64_t kKBlock = 512, kKBlockHalf = 1024;
// Columns of x per packing task.
constexpr int64_t kPackCols = 64;
// Working set (packed chunk, accumulator) of the factors processed together, and the most that the per-thread
// copies of a K-split may take.
constexpr int64_t kGroupBytes = int64_t(24) << 20;
constexpr int64_t kSplitBytes = int64_t(128) << 20;

#ifdef PYCURV_CPU_AVX2
// s[c] += sum_k p[k*ld + c] for c < cols: 32 columns in four registers while the rows stream by.
template <typename E>
__attribute__((target("avx2"))) void col_sums_avx2(const E* p, int64_t ld, int64_t rows, int64_t cols, float* s) {
  int64_t c = 0;
  for (; c + 32 <= cols; c += 32) {
    __m256 a0 = _mm256_loadu_ps(s + c), a1 = _mm256_loadu_ps(s + c + 8);
    __m256 a2 = _mm256_loadu_ps(s + c + 16), a3 = _mm256_loadu_ps(s + c + 24);
    for (int64_t k = 0; k < rows; ++k) {
      const E* r = p + k * ld + c;
      a0 = _mm256_add_ps(a0, load8f(r));
      a1 = _mm256_add_ps(a1, load8f(r + 8));
      a2 = _mm256_add_ps(a2, load8f(r + 16));
      a3 = _mm256_add_ps(a3, load8f(r + 24));
    }
    _mm256_storeu_ps(s + c, a0);
    _mm256_storeu_ps(s + c + 8, a1);
    _mm256_storeu_ps(s + c + 16, a2);
    _mm256_storeu_ps(s + c + 24, a3);
  }
  for (; c + 8 <= cols; c += 8) {
    __m256 a0 = _mm256_loadu_ps(s + c);
    for (int64_t k = 0; k < rows; ++k) a0 = _mm256_add_ps(a0, load8f(p + k * ld + c));
    _mm256_storeu_ps(s + c, a0);
  }
  for (; c < cols; ++c) {
    float t = s[c];
    for (int64_t k = 0; k < rows; ++k) t += static_cast<float>(p[k * ld + c]);
    s[c] = t;
  }
}

// s[c] += sum_k a[c*lda + k] for c < rows, k < len: four independent accumulators per row.
template <typename E>
__attribute__((target("avx2"))) void row_sums_avx2(const E* a, int64_t lda, int64_t rows, int64_t len, float* s) {
  for (int64_t c = 0; c < rows; ++c) {
    const E* r = a + c * lda;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 32 <= len; k += 32) {
      a0 = _mm256_add_ps(a0, load8f(r + k));
      a1 = _mm256_add_ps(a1, load8f(r + k + 8));
      a2 = _mm256_add_ps(a2, load8f(r + k + 16));
      a3 = _mm256_add_ps(a3, load8f(r + k + 24));
    }
    for (; k + 8 <= len; k += 8) a0 = _mm256_add_ps(a0, load8f(r + k));
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    float t = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
    for (; k < len; ++k) t += static_cast<float>(r[k]);
    s[c] += t;
  }
}
#endif

// s[c] += sum_k a[c*lda + k] for c < rows, k < len (the column sums of x from its transposed chunk).
template <typename E>
void add_row_sums(const E* a, int64_t lda, int64_t rows, int64_t len, float* s) {
#ifdef PYCURV_CPU_AVX2
  if (cpu_avx2()) return row_sums_avx2<E>(a, lda, rows, len, s);
#endif
  for (int64_t c = 0; c < rows; ++c) {
    float t = 0;
    for (int64_t k = 0; k < len; ++k) t += static_cast<float>(a[c * lda + k]);
    s[c] += t;
  }
}

// s[c] += sum_k p[k*ld + c] for c < cols.
template <typename E, typename T>
void add_col_sums(const E* p, int64_t ld, int64_t rows, int64_t cols, T* s) {
#ifdef PYCURV_CPU_AVX2
  if constexpr (std::is_same_v<T, float> && (std::is_same_v<E, float> || std::is_same_v<E, BFloat16>)) {
    if (cpu_avx2()) return col_sums_avx2<E>(p, ld, rows, cols, s);
  }
#endif
  for (int64_t k = 0; k < rows; ++k) {
    const E* row = p + k * ld;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) s[c] += static_cast<T>(row[c]);
  }
}

// Tuning of one update; the defaults follow the shapes, tests override them.
struct UpdateConfig {
  int64_t chunk = 0;  // rows of x per chunk (0: default)
  int split = -1;     // 1: K-split, 0: row blocks over threads, -1: by shape
};

// E: operand dtype of the GEMMs (float or BFloat16 with Brg, else T); T: accumulation and factor dtype.
template <typename E, typename T, bool Brg>
class FactorUpdate {
  static_assert(!Brg || std::is_same_v<T, float>, "the micro-kernel accumulates in float32");
  static constexpr bool kHalf = std::is_same_v<E, BFloat16>;

 public:
  FactorUpdate(const Tensor& factor, const Tensor& x, double decay, bool bias, UpdateConfig cfg)
      : x_(x), B_(x.size(0)), R_(x.size(1)), dx_(x.size(2)), d_(factor.size(1)), F_(factor.data_ptr<T>()),
        decay_(static_cast<T>(decay)), scale_(static_cast<T>((1.0 - decay) / static_cast<double>(x.size(1)))),
        bias_(bias) {
    sb_ = x.stride(0);
    sr_ = x.stride(1);
    const int64_t sc = x.stride(2);
    inplace_ = x.scalar_type() == scalar_of<E>() && (sc == 1 || dx_ <= 1) && (sr_ >= dx_ || R_ == 1);
    xp_ = inplace_ ? static_cast<const E*>(x.data_ptr()) : nullptr;
    kc_ = cfg.chunk > 0 ? cfg.chunk : (Brg ? chunk_rows() : kChunkAten);
    kc_ = std::min(kc_, R_);
    if (kHalf) kc_ = std::min(round_up(kc_, 2), round_up(R_, 2));
    nchunk_ = cdiv(R_, kc_);
    nblk_ = cdiv(dx_, kRowBlock);
    ncb_ = cdiv(dx_, kPackCols);
    lda_ = round_up(kc_, 32) + 32;
    ldb_ = round_up(dx_, 16) + 16;
    ldc_ = round_up(dx_, 16) + 16;
    // Two sets of packed operands (the next chunk is packed while this one is multiplied) and the accumulator.
    const int64_t per = 2 * ((Brg ? dx_ * lda_ * int64_t(sizeof(E)) : 0) + (kHalf || !inplace_ ? bbytes() : 0)) +
                        dx_ * ldc_ * int64_t(sizeof(T));
    group_ = std::clamp<int64_t>(kGroupBytes / std::max<int64_t>(per, 1), 1, std::max<int64_t>(B_, 1));
    // K-split when the row blocks of the whole batch cannot keep the threads busy, with one accumulator (and
    // packing space) per thread as long as those fit in memory.
    const int64_t threads = num_threads();
    nslots_ = std::min({threads, nchunk_, kSplitBytes / std::max<int64_t>(B_ * per, 1)});
    split_ = nslots_ >= 2 && B_ * nblk_ < 2 * threads;
    if (cfg.split >= 0) {
      split_ = cfg.split == 1;
      nslots_ = std::max<int64_t>(1, std::min(threads, nchunk_));
    }
    if (split_) {
      group_ = B_;
    } else {
      nslots_ = 1;
    }
  }

  // Rows per chunk: packed chunks of the whole batch of about kChunkBytes, 1 to 4 K blocks of the micro-kernel.
  int64_t chunk_rows() const {
    const int64_t kb = kHalf ? kKBlockHalf : kKBlock;
    const int64_t fit = kChunkBytes / std::max<int64_t>(B_ * dx_ * int64_t(sizeof(E)), 1);
    return std::clamp<int64_t>(fit / kb * kb, kb, 4 * kb);
  }

  void run() {
    std::vector<Slot> slots(split_ ? nslots_ : std::min<int64_t>(nchunk_, 2));
    for (size_t k = 0; k < slots.size(); ++k) slots[k] = make_slot(std::min(group_, B_), split_ || k == 0);
    for (int64_t g0 = 0; g0 < B_; g0 += group_) {
      const int64_t ng = std::min(group_, B_ - g0);
      for (auto& s : slots) {
        if (s.sums.defined()) s.sums.zero_();
        s.used = false;
      }
      if (split_) {
        run_split(slots, g0, ng);
      } else {
        run_tiles(slots, g0, ng);
      }
    }
  }

 private:
  // Packed operands of a chunk (at, bb) and accumulators (acc, sums) for `ng` factors: one per thread for the
  // K-split; otherwise two sets of operands, the first of which also holds the accumulators.
  struct Slot {
    Tensor at, bb, acc, sums;
    bool used = false;
    E* a(int64_t bl, int64_t lda, int64_t dx) const { return static_cast<E*>(at.data_ptr()) + bl * dx * lda; }
    void* b(int64_t bl, int64_t bytes) const { return static_cast<char*>(bb.data_ptr()) + bl * bytes; }
    T* c(int64_t bl, int64_t per) const { return acc.data_ptr<T>() + bl * per; }
    T* s(int64_t bl, int64_t dx) const { return sums.data_ptr<T>() + bl * dx; }
  };

  Slot make_slot(int64_t ng, bool accumulators) const {
    Slot s;
    auto opt = at::TensorOptions().dtype(at::kByte);
    if (Brg) s.at = at::empty({ng * dx_ * lda_ * int64_t(sizeof(E))}, opt);
    if (kHalf || !inplace_) s.bb = at::empty({ng * bbytes()}, opt);
    if (accumulators) {
      s.acc = at::empty({ng * dx_ * ldc_}, at::TensorOptions().dtype(scalar_of<T>()));
      s.sums = at::zeros({ng * dx_}, at::TensorOptions().dtype(scalar_of<T>()));
    }
    return s;
  }

  // Bytes of the right-hand operand buffer of one factor: a converted chunk (kc x ldb), or VNNI-2 words.
  int64_t bbytes() const { return kc_ * ldb_ * (sizeof(E) == 8 ? 8 : 4); }

  int64_t rows_of(int64_t ch) const { return std::min(kc_, R_ - ch * kc_); }

  // Packs columns [c0, c1) of chunk ch of factor b (local index bl) into s; adds their column sums to acc.
  void pack(const Slot& s, const Slot& acc, int64_t bl, int64_t b, int64_t ch, int64_t c0, int64_t c1) const {
    const int64_t r0 = ch * kc_, kk = rows_of(ch), cw = c1 - c0;
    const E* rows;
    int64_t ldr;
    Tensor tmp;
    if (inplace_) {
      rows = xp_ + b * sb_ + r0 * sr_ + c0;
      ldr = sr_;
    } else {
      auto src = x_.select(0, b).narrow(0, r0, kk).narrow(1, c0, cw);
      if (kHalf) {
        tmp = at::empty({kk, cw}, at::TensorOptions().dtype(scalar_of<E>()));
        tmp.copy_(src);
        rows = static_cast<const E*>(tmp.data_ptr());
        ldr = cw;
      } else {
        E* dst = static_cast<E*>(s.b(bl, bbytes())) + c0;
        at::from_blob(dst, {kk, cw}, {ldb_, 1}, at::TensorOptions().dtype(scalar_of<E>())).copy_(src);
        rows = dst;
        ldr = ldb_;
      }
    }
    if (bias_ && !Brg) add_col_sums<E, T>(rows, ldr, kk, cw, acc.s(bl, dx_) + c0);
#ifdef PYCURV_HAVE_BRGEMM
    if constexpr (Brg) {
      uint32_t* at_words = reinterpret_cast<uint32_t*>(s.a(bl, lda_, dx_));
      if constexpr (kHalf) {
        uint32_t* bv = static_cast<uint32_t*>(s.b(bl, bbytes()));
        const int64_t kq = kk / 2;
        for (int64_t q = 0; q < kq; ++q)
          interleave16(bits(rows + 2 * q * ldr), bits(rows + (2 * q + 1) * ldr), cw, bv + q * ldb_ + c0);
        if (kk % 2) interleave16(bits(rows + (kk - 1) * ldr), nullptr, cw, bv + kq * ldb_ + c0);
        transpose32(bv + c0, ldb_, cdiv(kk, 2), cw, at_words + c0 * (lda_ / 2), lda_ / 2);
      } else {
        transpose32(reinterpret_cast<const uint32_t*>(rows), ldr, kk, cw, at_words + c0 * lda_, lda_);
      }
      // The column sums from the transposed rows, still in cache.
      if (bias_) add_row_sums<E>(s.a(bl, lda_, dx_) + c0 * lda_, lda_, cw, kk, acc.s(bl, dx_) + c0);
    }
#endif
  }

  // acc[I, 0:i1] (+)= chunk[:, I]^T chunk[:, 0:i1] for row block i of factor b, chunk packed in s.
  void compute(const Slot& s, const Slot& acc, int64_t bl, int64_t b, int64_t ch, int64_t i, bool first) const {
    const int64_t i0 = i * kRowBlock, i1 = std::min(dx_, i0 + kRowBlock), m = i1 - i0;
    const int64_t r0 = ch * kc_, kk = rows_of(ch);
    T* c = acc.c(bl, dx_ * ldc_) + i0 * ldc_;
#ifdef PYCURV_HAVE_BRGEMM
    if constexpr (Brg) {
      const E* a = s.a(bl, lda_, dx_) + i0 * lda_;
      // rows [r, r + mm) of the block against columns [n0, n0 + nn)
      // K blocks of the chunk that keep a block of A and a panel of B in L2; A is reused across the panels.
      const int64_t kb = kHalf ? kKBlockHalf : kKBlock;
      for (int64_t k0 = 0; k0 < kk; k0 += kb) {
        const int64_t kl = std::min(kb, kk - k0);
        const bool add = !first || k0 > 0;
        // rows [r, r + mm) of the block against columns [n0, n0 + nn)
        auto piece = [&](int64_t r, int64_t mm, int64_t n0, int64_t nn) {
          if constexpr (kHalf) {
            const uint32_t* bv = static_cast<const uint32_t*>(s.b(bl, bbytes())) + (k0 / 2) * ldb_;
            cb::brgemm(mm, nn, kl + (kl % 2), lda_, ldb_, ldc_, add, a + r * lda_ + k0,
                       reinterpret_cast<const BFloat16*>(bv + n0), c + r * ldc_ + n0, true);
          } else {
            const float* bp = inplace_ ? xp_ + b * sb_ + (r0 + k0) * sr_
                                       : static_cast<const float*>(s.b(bl, bbytes())) + k0 * ldb_;
            cb::brgemm(mm, nn, kl, lda_, inplace_ ? sr_ : ldb_, ldc_, add, a + r * lda_ + k0, bp + n0,
                       c + r * ldc_ + n0, false);
          }
        };
        for (int64_t n0 = 0; n0 < i0; n0 += kPanel) piece(0, m, n0, std::min(kPanel, i0 - n0));
        // The diagonal block by strips of rows.
        for (int64_t r = 0; r < m; r += kDiagRows) {
          const int64_t re = std::min(m, r + kDiagRows);
          piece(r, re - r, i0, re);
        }
      }
      return;
    }
#endif
    if constexpr (!Brg) {
      const T* bp = inplace_ ? xp_ + b * sb_ + r0 * sr_ : static_cast<const T*>(s.b(bl, bbytes()));
      const int64_t ldb = inplace_ ? sr_ : ldb_;
      gemm_aten<T>(m, i1, kk, {bp + i0, 1, ldb}, {bp, ldb, 1}, !first, c, ldc_);
    }
    (void)r0, (void)b;
  }

  // Factor rows I of factor b from the accumulators of `slots`: running average, then the mirror image.
  void epilogue(const std::vector<const Slot*>& slots, int64_t bl, int64_t b, int64_t i, Buf<T>& row) const {
    const int64_t i0 = i * kRowBlock, i1 = std::min(dx_, i0 + kRowBlock);
    T* f = F_ + b * d_ * d_;
    const int64_t per = dx_ * ldc_;
    const T dec = decay_, sc = scale_;
    for (int64_t r = i0; r < i1; ++r) {
      const T* v = slots[0]->c(bl, per) + r * ldc_;
      if (slots.size() > 1) {
        T* sum = row.get(r + 1);
        std::copy(v, v + r + 1, sum);
        for (size_t k = 1; k < slots.size(); ++k) {
          const T* w = slots[k]->c(bl, per) + r * ldc_;
#pragma omp simd
          for (int64_t c = 0; c <= r; ++c) sum[c] += w[c];
        }
        v = sum;
      }
      T* fr = f + r * d_;
      if (dec == T(0)) {
#pragma omp simd
        for (int64_t c = 0; c <= r; ++c) fr[c] = v[c] * sc;
      } else {
#pragma omp simd
        for (int64_t c = 0; c <= r; ++c) fr[c] = dec * fr[c] + v[c] * sc;
      }
    }
    // Upper triangle, columns I: 16-column strips keep the transposed writes within a few cache lines.
    for (int64_t c0 = 0; c0 < i1; c0 += 16)
      for (int64_t c = c0; c < std::min(i1 - 1, c0 + 16); ++c)
        for (int64_t r = std::max(i0, c + 1); r < i1; ++r) f[c * d_ + r] = f[r * d_ + c];
  }

  // Row and column d_x of factor b (the ones column): column sums and R.
  void bias_row(const std::vector<const Slot*>& slots, int64_t bl, int64_t b) const {
    T* f = F_ + b * d_ * d_;
    T* fb = f + dx_ * d_;
    const T dec = decay_, sc = scale_;
    for (int64_t c = 0; c <= dx_; ++c) {
      T v = 0;
      if (c < dx_) {
        for (const Slot* s : slots) v += s->s(bl, dx_)[c];
      } else {
        v = static_cast<T>(R_);
      }
      fb[c] = dec == T(0) ? v * sc : dec * fb[c] + v * sc;
      f[c * d_ + dx_] = fb[c];
    }
  }

  void finish_release() const {
#ifdef PYCURV_HAVE_BRGEMM
    if constexpr (Brg) release_brgemm(kHalf);
#endif
  }

  // Row blocks over threads: all row blocks of the group multiply one chunk (in parallel, the costliest first)
  // while the next chunk is packed into the other set of operands, its packing tasks spread among them; each row
  // block's epilogue follows its last chunk.
  void run_tiles(std::vector<Slot>& slot, int64_t g0, int64_t ng) const {
    const Slot& acc = slot[0];
    const std::vector<const Slot*> accs{&acc};
    const int64_t npack = ng * ncb_, nitems = ng * nblk_;
    auto pack_task = [&](int64_t ch, int64_t p) {
      const int64_t bl = p / ncb_, c0 = (p % ncb_) * kPackCols;
      pack(slot[ch % 2], acc, bl, g0 + bl, ch, c0, std::min(dx_, c0 + kPackCols));
    };
    at::parallel_for(0, npack, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) pack_task(0, p);
    });
    // Task order: row blocks (costliest first), with packing task p after row block p * nitems / npack.
    std::vector<int64_t> order;
    int64_t p = 0;
    for (int64_t t = 0; t < nitems; ++t) {
      order.push_back(t);
      for (; p < npack && p * nitems <= t * npack; ++p) order.push_back(nitems + p);
    }
    for (; p < npack; ++p) order.push_back(nitems + p);
    for (int64_t ch = 0; ch < nchunk_; ++ch) {
      const bool first = ch == 0, last = ch == nchunk_ - 1;
      const Slot& cur = slot[ch % 2];
      parallel_tiles(static_cast<int64_t>(order.size()), num_threads(), [&](int64_t, auto&& next) {
        Buf<T> row;
        for (int64_t t = next(); t >= 0; t = next()) {
          const int64_t task = order[t];
          if (task >= nitems) {
            if (!last) pack_task(ch + 1, task - nitems);
            continue;
          }
          const int64_t i = nblk_ - 1 - task / ng, bl = task % ng;
          compute(cur, acc, bl, g0 + bl, ch, i, first);
          if (last) epilogue(accs, bl, g0 + bl, i, row);
        }
        finish_release();
      });
    }
    if (bias_)
      for (int64_t bl = 0; bl < ng; ++bl) bias_row(accs, bl, g0 + bl);
  }

  // K-split: each thread packs and multiplies whole chunks into its own accumulator; the epilogue sums them.
  void run_split(std::vector<Slot>& slot, int64_t g0, int64_t ng) const {
    parallel_tiles(nchunk_, static_cast<int64_t>(slot.size()), [&](int64_t si, auto&& next) {
      Slot& s = slot[si];
      for (int64_t ch = next(); ch >= 0; ch = next()) {
        for (int64_t bl = 0; bl < ng; ++bl) {
          for (int64_t c0 = 0; c0 < dx_; c0 += kPackCols)
            pack(s, s, bl, g0 + bl, ch, c0, std::min(dx_, c0 + kPackCols));
          for (int64_t i = 0; i < nblk_; ++i) compute(s, s, bl, g0 + bl, ch, i, !s.used);
        }
        s.used = true;
      }
      finish_release();
    });
    std::vector<const Slot*> used;
    for (const auto& s : slot)
      if (s.used) used.push_back(&s);
    const int64_t nitems = ng * nblk_;
    parallel_tiles(nitems, num_threads(), [&](int64_t, auto&& next) {
      Buf<T> row;
      for (int64_t t = next(); t >= 0; t = next()) epilogue(used, t % ng, g0 + t % ng, nblk_ - 1 - t / ng, row);
    });
    if (bias_)
      for (int64_t bl = 0; bl < ng; ++bl) bias_row(used, bl, g0 + bl);
  }

  const Tensor& x_;
  const int64_t B_, R_, dx_, d_;
  T* F_;
  const T decay_, scale_;
  const bool bias_;
  int64_t sb_ = 0, sr_ = 0;
  bool inplace_ = false;
  const E* xp_ = nullptr;
  int64_t kc_ = 1, nchunk_ = 0, nblk_ = 0, ncb_ = 0, lda_ = 0, ldb_ = 0, ldc_ = 0, group_ = 1, nslots_ = 1;
  bool split_ = false;
};

template <typename E, typename T, bool Brg>
void factor_update(const Tensor& factor, const Tensor& x, double decay, bool bias, UpdateConfig cfg = {}) {
  FactorUpdate<E, T, Brg>(factor, x, decay, bias, cfg).run();
}

// The micro-kernel path against exact integer results: odd row counts (bfloat16 padding), several chunks, a
// partial row block, both schedules and a strided input.
template <typename E>
bool factor_update_self_test() {
#ifdef PYCURV_HAVE_BRGEMM
  try {
    const int64_t R = 37, dx = 70, d = dx + 1;
    Tensor xf = at::empty({2, R, dx}, at::TensorOptions().dtype(at::kFloat));
    float* p = xf.data_ptr<float>();
    for (int64_t i = 0; i < xf.numel(); ++i) p[i] = static_cast<float>((i * 7) % 9) - 4.0f;
    // Integer sums below 2^24 are exact in float32; the epilogue then scales them as the kernel does.
    std::vector<float> want(2 * d * d);
    const float scale = static_cast<float>(1.0 / R);
    for (int64_t b = 0; b < 2; ++b)
      for (int64_t i = 0; i < d; ++i)
        for (int64_t j = 0; j < d; ++j) {
          float v = 0;
          for (int64_t r = 0; r < R; ++r)
            v += (i < dx ? p[(b * R + r) * dx + i] : 1.0f) * (j < dx ? p[(b * R + r) * dx + j] : 1.0f);
          want[(b * d + i) * d + j] = v * scale;
        }
    const Tensor x = xf.to(scalar_of<E>());
    const Tensor xs = at::empty({2, dx, R}, x.options()).copy_(x.transpose(1, 2)).transpose(1, 2);
    bool ok = true;
    for (int split = 0; split < 2; ++split)
      for (const Tensor* in : {&x, &xs}) {
        Tensor f = at::full({2, d, d}, NAN, at::TensorOptions().dtype(at::kFloat));
        factor_update<E, float, true>(f, *in, 0.0, true, {16, split});
        ok = ok && std::equal(want.begin(), want.end(), f.data_ptr<float>());
      }
    release_brgemm(std::is_same_v<E, BFloat16>);
    return ok;
  } catch (...) {
    return false;
  }
#else
  return false;
#endif
}

// Whether the update runs on the micro-kernel (the user may turn oneDNN off); probed on first use.
bool update_brgemm_f32_ok() {
  static const bool ok = brgemm_driver_support().f32 && factor_update_self_test<float>();
  return ok;
}

bool use_update_brgemm_f32() { return at::globalContext().userEnabledMkldnn() && update_brgemm_f32_ok(); }

bool use_update_brgemm_bf16() {
  static const bool ok = brgemm_driver_support().bf16 && update_brgemm_f32_ok() &&
                         factor_update_self_test<BFloat16>();
  return at::globalContext().userEnabledMkldnn() && ok;
}

// ---------------------------------------------------------------------------------------------------------------
// Dense kernels for one small / medium matrix in cache (single-threaded; the callers run matrices in parallel).
//
// C (+)= alpha A B on row-major C with A(r, k) = a[r*ars + k*acs] and B(k, n) = b[k*brs + n*bcs]: panels of NR
// columns of B (read in place when rows are contiguous, else packed), MR x NR blocks of C accumulated in registers
// (AVX2 + FMA), whatever the strides of A.

template <typename T>
struct MicroShape;
template <>
struct MicroShape<float> {
  static constexpr int MR = 6, NR = 16;
};
template <>
struct MicroShape<double> {
  static constexpr int MR = 6, NR = 8;
};

#ifdef PYCURV_CPU_AVX2
// One 256-bit register of T: L lanes, and the few operations the block kernel needs.
template <typename T>
struct Ymm;
template <>
struct Ymm<float> {
  using V = __m256;
  static constexpr int L = 8;
  __attribute__((target("avx2"))) static V zero() { return _mm256_setzero_ps(); }
  __attribute__((target("avx2"))) static V set1(float x) { return _mm256_set1_ps(x); }
  __attribute__((target("avx2"))) static V bcast(const float* p) { return _mm256_broadcast_ss(p); }
  __attribute__((target("avx2"))) static V load(const float* p) { return _mm256_loadu_ps(p); }
  __attribute__((target("avx2"))) static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  __attribute__((target("avx2"))) static V add(V a, V b) { return _mm256_add_ps(a, b); }
  __attribute__((target("avx2"))) static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  __attribute__((target("avx2,fma"))) static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
};
template <>
struct Ymm<double> {
  using V = __m256d;
  static constexpr int L = 4;
  __attribute__((target("avx2"))) static V zero() { return _mm256_setzero_pd(); }
  __attribute__((target("avx2"))) static V set1(double x) { return _mm256_set1_pd(x); }
  __attribute__((target("avx2"))) static V bcast(const double* p) { return _mm256_broadcast_sd(p); }
  __attribute__((target("avx2"))) static V load(const double* p) { return _mm256_loadu_pd(p); }
  __attribute__((target("avx2"))) static void store(double* p, V v) { _mm256_storeu_pd(p, v); }
  __attribute__((target("avx2"))) static V add(V a, V b) { return _mm256_add_pd(a, b); }
  __attribute__((target("avx2"))) static V mul(V a, V b) { return _mm256_mul_pd(a, b); }
  __attribute__((target("avx2,fma"))) static V fma(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
};

// Block of C (MR x nn, nn <= NR = two registers' lanes) = alpha A(MR x K) B(K x NR) (+ C when accumulate); B rows
// ldb apart.
template <int MR, typename T>
__attribute__((target("avx2,fma"))) void micro_avx2(int64_t K, const T* a, int64_t ars, int64_t acs, const T* bp,
                                                     int64_t ldb, T alpha, bool accumulate, T* c, int64_t ldc,
                                                     int64_t nn) {
  using Y = Ymm<T>;
  using V = typename Y::V;
  constexpr int L = Y::L;
  static_assert(2 * L == MicroShape<T>::NR, "a block is two registers wide");
  V c0[MR], c1[MR];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) c0[r] = c1[r] = Y::zero();
  for (int64_t k = 0; k < K; ++k) {
    const V b0 = Y::load(bp + k * ldb), b1 = Y::load(bp + k * ldb + L);
    const T* ak = a + k * acs;
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      const V av = Y::bcast(ak + r * ars);
      c0[r] = Y::fma(av, b0, c0[r]);
      c1[r] = Y::fma(av, b1, c1[r]);
    }
  }
  const V al = Y::set1(alpha);
  alignas(32) T tmp[2 * L];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    T* cr = c + r * ldc;
    if (nn == 2 * L) {
      V v0 = Y::mul(al, c0[r]), v1 = Y::mul(al, c1[r]);
      if (accumulate) {
        v0 = Y::add(v0, Y::load(cr));
        v1 = Y::add(v1, Y::load(cr + L));
      }
      Y::store(cr, v0);
      Y::store(cr + L, v1);
    } else {
      Y::store(tmp, Y::mul(al, c0[r]));
      Y::store(tmp + L, Y::mul(al, c1[r]));
      for (int64_t j = 0; j < nn; ++j) cr[j] = accumulate ? cr[j] + tmp[j] : tmp[j];
    }
  }
}
#endif

// Portable block kernel (no AVX2): same contract as micro_avx2.
template <typename T>
void micro_plain(int mr, int64_t K, const T* a, int64_t ars, int64_t acs, const T* bp, int64_t ldb, T alpha,
                 bool accumulate,
                 T* c, int64_t ldc, int64_t nn) {
  constexpr int NR = MicroShape<T>::NR;
  for (int r = 0; r < mr; ++r) {
    T acc[NR] = {};
    for (int64_t k = 0; k < K; ++k) {
      const T av = a[r * ars + k * acs];
#pragma omp simd
      for (int j = 0; j < NR; ++j) acc[j] += av * bp[k * ldb + j];
    }
    T* cr = c + r * ldc;
    for (int64_t j = 0; j < nn; ++j) cr[j] = accumulate ? cr[j] + alpha * acc[j] : alpha * acc[j];
  }
}

template <typename T>
void micro(int mr, int64_t K, const T* a, int64_t ars, int64_t acs, const T* bp, int64_t ldb, T alpha,
           bool accumulate, T* c, int64_t ldc, int64_t nn) {
#ifdef PYCURV_CPU_AVX2
  if (cpu_avx2()) {
    switch (mr) {
      case 6: return micro_avx2<6>(K, a, ars, acs, bp, ldb, alpha, accumulate, c, ldc, nn);
      case 5: return micro_avx2<5>(K, a, ars, acs, bp, ldb, alpha, accumulate, c, ldc, nn);
      case 4: return micro_avx2<4>(K, a, ars, acs, bp, ldb, alpha, accumulate, c, ldc, nn);
      case 3: return micro_avx2<3>(K, a, ars, acs, bp, ldb, alpha, accumulate, c, ldc, nn);
      case 2: return micro_avx2<2>(K, a, ars, acs, bp, ldb, alpha, accumulate, c, ldc, nn);
      default: return micro_avx2<1>(K, a, ars, acs, bp, ldb, alpha, accumulate, c, ldc, nn);
    }
  }
#endif
  micro_plain<T>(mr, K, a, ars, acs, bp, ldb, alpha, accumulate, c, ldc, nn);
}

// C (M x N, row stride ldc) = alpha A B (+ C when accumulate); `pack` holds K * NR elements.
template <typename T>
void small_gemm(int64_t M, int64_t N, int64_t K, T alpha, const T* a, int64_t ars, int64_t acs, const T* b,
                int64_t brs, int64_t bcs, bool accumulate, T* c, int64_t ldc, T* pack) {
  constexpr int MR = MicroShape<T>::MR, NR = MicroShape<T>::NR;
  if (M <= 0 || N <= 0) return;
  for (int64_t n0 = 0; n0 < N; n0 += NR) {
    const int64_t nn = std::min<int64_t>(NR, N - n0);
    // Row-major full panels are read in place; others are packed (zero-padded) into K x NR.
    const T* bp = b + n0;
    int64_t ldb = brs;
    if (bcs != 1 || nn < NR) {
      for (int64_t k = 0; k < K; ++k) {
        T* pk = pack + k * NR;
        const T* bk = b + k * brs + n0 * bcs;
        for (int64_t j = 0; j < nn; ++j) pk[j] = bk[j * bcs];
        for (int64_t j = nn; j < NR; ++j) pk[j] = T(0);
      }
      bp = pack;
      ldb = NR;
    }
    for (int64_t m0 = 0; m0 < M; m0 += MR)
      micro<T>(static_cast<int>(std::min<int64_t>(MR, M - m0)), K, a + m0 * ars, ars, acs, bp, ldb, alpha,
               accumulate, c + m0 * ldc + n0, ldc, nn);
  }
}

// In-place Cholesky factor of the kb x kb block at a (row stride ld), lower triangle read and written. Returns
// -1, or the index of the first column whose pivot is not positive (or NaN).
template <typename T>
int64_t chol_block(T* a, int64_t ld, int64_t kb) {
  for (int64_t j = 0; j < kb; ++j) {
    T* rj = a + j * ld;
    T s = rj[j];
    T dot = 0;
#pragma omp simd reduction(+ : dot)
    for (int64_t p = 0; p < j; ++p) dot += rj[p] * rj[p];
    s -= dot;
    if (!(s > T(0))) return j;
    const T ljj = std::sqrt(s), inv = T(1) / ljj;
    rj[j] = ljj;
    for (int64_t i = j + 1; i < kb; ++i) {
      T* ri = a + i * ld;
      T t = 0;
#pragma omp simd reduction(+ : t)
      for (int64_t p = 0; p < j; ++p) t += ri[p] * rj[p];
      ri[j] = (ri[j] - t) * inv;
    }
  }
  return -1;
}

// D = L^-1 for the lower-triangular kb x kb block L (row stride ld), D lower with zeros above (row stride ldd).
template <typename T>
void tri_inverse_block(const T* l, int64_t ld, int64_t kb, T* dm, int64_t ldd) {
  for (int64_t i = 0; i < kb; ++i) {
    T* di = dm + i * ldd;
    std::fill(di, di + kb, T(0));
    const T* li = l + i * ld;
    for (int64_t p = 0; p < i; ++p) {
      const T lp = li[p];
      const T* dp = dm + p * ldd;
#pragma omp simd
      for (int64_t c = 0; c <= p; ++c) di[c] += lp * dp[c];
    }
    const T inv = T(1) / li[i];
#pragma omp simd
    for (int64_t c = 0; c < i; ++c) di[c] *= -inv;
    di[i] = inv;
  }
}

// a[c * ld + r] = a[r * ld + c] for c < r < n: 16 x 16 tiles keep both sides of the copy in L1.
template <typename T>
void mirror_tiles(T* a, int64_t ld, int64_t n) {
  constexpr int64_t kT = 16;
  for (int64_t r0 = 0; r0 < n; r0 += kT)
    for (int64_t c0 = 0; c0 <= r0; c0 += kT)
      for (int64_t r = r0; r < std::min(n, r0 + kT); ++r)
        for (int64_t c = c0; c < std::min(r, c0 + kT); ++c) a[c * ld + r] = a[r * ld + c];
}

// Short copies (a block row) without a library call.
template <typename T>
inline void copy_row(const T* src, int64_t n, T* dst) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dst[j] = src[j];
}

// Per-thread space of chol_inverse.
template <typename T>
struct CholWork {
  Buf<T> w, dinv, tmp, pack;
};

// Block size of the blocked Cholesky inverse: small, so that nearly all the work is in the GEMM micro-kernel
// (the unblocked steps on diagonal blocks are not vectorised as well).
constexpr int64_t kCholBlock = 16;

// out (d x d, row stride ldo) = (m + damping I)^-1 for the matrix m (lower triangle read, strides rs / cs):
// L L^T = m + damping I (left-looking by block columns), V = L^-1 (by block rows), out = lower(V^T V) mirrored.
// Returns 0, or the order of the first leading minor that is not positive definite (out is then the identity).
template <typename T>
int64_t chol_inverse(const T* m, int64_t rs, int64_t cs, int64_t d, T damping, T* out, int64_t ldo,
                     CholWork<T>& ws) {
  constexpr int NR = MicroShape<T>::NR;
  const int64_t nb = std::min(d, kCholBlock);
  const int64_t ld = d >= 64 ? round_up(d, 16) + 8 : d;
  T* w = ws.w.get(d * ld);
  T* dinv = ws.dinv.get(d * nb);
  T* tmp = ws.tmp.get(d * nb);
  T* pack = ws.pack.get(d * NR);
  for (int64_t r = 0; r < d; ++r) {
    T* wr = w + r * ld;
    const T* mr = m + r * rs;
    if (cs == 1) {
      std::memcpy(wr, mr, (r + 1) * sizeof(T));
    } else {
      for (int64_t c = 0; c <= r; ++c) wr[c] = mr[c * cs];
    }
    std::fill(wr + r + 1, wr + d, T(0));
    wr[r] += damping;
  }
  // Factorisation.
  for (int64_t k0 = 0; k0 < d; k0 += nb) {
    const int64_t kb = std::min(nb, d - k0), k1 = k0 + kb;
    if (k0 > 0)
      small_gemm<T>(d - k0, kb, k0, T(-1), w + k0 * ld, ld, 1, w + k0 * ld, 1, ld, true, w + k0 * ld + k0, ld,
                    pack);
    const int64_t fail = chol_block<T>(w + k0 * ld + k0, ld, kb);
    if (fail >= 0) {
      for (int64_t r = 0; r < d; ++r) {
        std::fill(out + r * ldo, out + r * ldo + d, T(0));
        out[r * ldo + r] = T(1);
      }
      return k0 + fail + 1;
    }
    T* dk = dinv + k0 * nb;
    tri_inverse_block<T>(w + k0 * ld + k0, ld, kb, dk, nb);
    if (k1 < d) {
      // Panel below the diagonal block: L_ik = A_ik L_kk^-T.
      small_gemm<T>(d - k1, kb, kb, T(1), w + k1 * ld + k0, ld, 1, dk, 1, nb, false, tmp, nb, pack);
      for (int64_t r = k1; r < d; ++r) copy_row(tmp + (r - k1) * nb, kb, w + r * ld + k0);
    }
  }
  // V = L^-1 in place, by block rows: V_ij = -D_i sum_{j <= k < i} L_ik V_kj, V_ii = D_i.
  for (int64_t i0 = 0; i0 < d; i0 += nb) {
    const int64_t kb = std::min(nb, d - i0);
    const T* di = dinv + i0 * nb;
    if (i0 > 0) {
      for (int64_t j0 = 0; j0 < i0; j0 += nb)
        small_gemm<T>(kb, std::min(nb, i0 - j0), i0 - j0, T(1), w + i0 * ld + j0, ld, 1, w + j0 * ld + j0, ld, 1,
                      false, tmp + j0, d, pack);
      small_gemm<T>(kb, i0, kb, T(-1), di, nb, 1, tmp, d, 1, false, w + i0 * ld, ld, pack);
    }
    for (int64_t r = 0; r < kb; ++r) copy_row(di + r * nb, kb, w + (i0 + r) * ld + i0);
  }
  // Lower triangle of V^T V, block rows: out[I, 0:i1] = V[i0:, I]^T V[i0:, 0:i1].
  for (int64_t i0 = 0; i0 < d; i0 += nb) {
    const int64_t kb = std::min(nb, d - i0), i1 = i0 + kb;
    small_gemm<T>(kb, i1, d - i0, T(1), w + i0 * ld + i0, 1, ld, w + i0 * ld, ld, 1, false, out + i0 * ldo, ldo,
                  pack);
  }
  mirror_tiles(out, ldo, d);
  return 0;
}

// ---------------------------------------------------------------------------------------------------------------
// damped_inverse / sym_eig

// Up to this size the blocked kernel runs (one matrix per thread); beyond it, LAPACK (each call multithreaded).
// The crossover was chosen from timings on a 2-core CPU (bench/bench_kfac.py covers d <= 256 only).
constexpr int64_t kOwnCholMax = 2048;

void check_square_batch(const Tensor& m, const char* op) {
  TORCH_CHECK_VALUE(m.dim() == 3 && m.size(1) == m.size(2), op, ": m must be (B, d, d), got shape ", m.sizes());
  TORCH_CHECK_TYPE(m.scalar_type() == c10::kFloat || m.scalar_type() == c10::kDouble, op,
                   ": m must be float32 or float64, got ", m.scalar_type());
  check_cpu(m, op, "m");
}

// m + damping I as a contiguous copy (the solvers read its lower triangle).
Tensor damped_copy(const Tensor& m, const Tensor& damping) {
  Tensor md = m.clone(at::MemoryFormat::Contiguous);
  md.diagonal(0, 1, 2).add_(damping.to(m.scalar_type()).unsqueeze(1));
  return md;
}

// The lower triangle of each matrix of `inv` (B, d, d) mirrored onto its upper triangle, in parallel.
template <typename T>
void mirror_batch(Tensor& inv) {
  const int64_t n = inv.size(0), d = inv.size(1);
  T* p = inv.data_ptr<T>();
  at::parallel_for(0, n, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) mirror_tiles(p + b * d * d, d, d);
  });
}

template <typename T>
void cholesky_inverse_own(const Tensor& m, const Tensor& damping, Tensor& inv, Tensor& info) {
  const int64_t n = m.size(0), d = m.size(1);
  const T* mp = m.data_ptr<T>();
  const double* dp = damping.data_ptr<double>();
  T* op = inv.data_ptr<T>();
  int32_t* ip = info.data_ptr<int32_t>();
  const int64_t sb = m.stride(0), rs = m.stride(1), cs = m.stride(2);
  parallel_tiles(n, num_threads(), [&](int64_t, auto&& next) {
    CholWork<T> ws;
    for (int64_t b = next(); b >= 0; b = next())
      ip[b] = static_cast<int32_t>(
          chol_inverse<T>(mp + b * sb, rs, cs, d, static_cast<T>(dp[b]), op + b * d * d, d, ws));
  });
}

template <typename T>
void cholesky_inverse_lapack(const Tensor& m, const Tensor& damping, Tensor& inv, Tensor& info) {
  auto [low, inf] = at::linalg_cholesky_ex(damped_copy(m, damping), false, false);
  // Failed factorisations are replaced by the identity, as the reference does.
  Tensor bad = (inf > 0).reshape({-1, 1, 1});
  low = at::where(bad, at::eye(m.size(1), m.options()).expand_as(low), low);
  inv.copy_(at::cholesky_inverse(low, false));
  mirror_batch<T>(inv);
  info.copy_(inf);
}

template <typename T>
void eigh_inverse(const Tensor& m, const Tensor& damping, Tensor& inv, Tensor& info) {
  const int64_t n = m.size(0), d = m.size(1);
  const double* dp = damping.data_ptr<double>();
  int32_t* ip = info.data_ptr<int32_t>();
  T* op = inv.data_ptr<T>();
  // info: 1 + the index of the first eigenvalue <= 0; inverse Q diag(1 / lambda) Q^T, lower triangle mirrored.
  auto one = [&](int64_t b, const Tensor& vals, const Tensor& vecs) {
    const T* v = vals.data_ptr<T>();
    int32_t k = 0;
    for (int64_t j = 0; j < d && k == 0; ++j)
      if (v[j] <= T(0)) k = static_cast<int32_t>(j + 1);
    ip[b] = k;
    Tensor out = inv.select(0, b);
    at::mm_out(out, vecs / vals.unsqueeze(0), vecs.t());
    mirror_tiles(op + b * d * d, d, d);
  };
  if (n >= num_threads()) {
    parallel_tiles(n, num_threads(), [&](int64_t, auto&& next) {
      for (int64_t b = next(); b >= 0; b = next()) {
        Tensor mb = m.select(0, b).clone(at::MemoryFormat::Contiguous);
        mb.diagonal().add_(static_cast<T>(dp[b]));
        auto [vals, vecs] = at::linalg_eigh(mb, "L");
        one(b, vals, vecs);
      }
    });
  } else {
    auto [vals, vecs] = at::linalg_eigh(damped_copy(m, damping), "L");
    for (int64_t b = 0; b < n; ++b) one(b, vals.select(0, b), vecs.select(0, b));
  }
}

// ---------------------------------------------------------------------------------------------------------------
// kron_precondition

// One per-layer operand of the preconditioning ops and the shape that grad implies for it.
struct Operand {
  const char* name;
  const Tensor& t;
  std::vector<int64_t> shape;
};

void check_precondition(const Tensor& grad, const std::vector<Operand>& operands, const char* op) {
  for (const Operand& o : operands) {
    TORCH_CHECK_VALUE(o.t.sizes() == at::IntArrayRef(o.shape), op, ": grad is ", grad.sizes(), ", so ", o.name,
                      " must be ", at::IntArrayRef(o.shape), ", got ", o.t.sizes());
    TORCH_CHECK_TYPE(o.t.scalar_type() == grad.scalar_type(), op, ": ", o.name, " must have grad's dtype ",
                     grad.scalar_type(), ", got ", o.t.scalar_type());
    check_cpu(o.t, op, o.name);
  }
}

void check_grad(const Tensor& grad, const char* op) {
  TORCH_CHECK_VALUE(grad.dim() == 3, op, ": grad must be (B, d_out, d_in), got ", grad.dim(), "-d tensor of shape ",
                    grad.sizes());
  TORCH_CHECK_TYPE(is_float_type(grad.scalar_type()), op, ": grad must be float32/float64/float16/bfloat16, got ",
                   grad.scalar_type());
  check_cpu(grad, op, "grad");
}

// v[b, i, j] /= d_g[b, i] d_a[b, j] + damping[b], in place (v contiguous).
template <typename T>
void divide_by_eigen_grid(Tensor& v, const Tensor& dg, const Tensor& da, const Tensor& damping) {
  const int64_t n = v.size(0), dout = v.size(1), din = v.size(2);
  T* vp = v.data_ptr<T>();
  const Tensor g = dg.contiguous(), a = da.contiguous();
  const T* gp = g.data_ptr<T>();
  const T* ap = a.data_ptr<T>();
  const double* dp = damping.data_ptr<double>();
  at::parallel_for(0, n * dout, std::max<int64_t>(1, 16384 / std::max<int64_t>(din, 1)), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t b = p / dout;
      const T gi = gp[p], lam = static_cast<T>(dp[b]);
      const T* ab = ap + b * din;
      T* row = vp + p * din;
#pragma omp simd
      for (int64_t j = 0; j < din; ++j) row[j] /= gi * ab[j] + lam;
    }
  });
}

}  // namespace

void kfac_factor_update_cpu(const at::Tensor& factor, const at::Tensor& x, double decay, bool bias) {
  const char* op = "kfac_factor_update";
  TORCH_CHECK_VALUE(factor.dim() == 3 && factor.size(1) == factor.size(2), op,
                    ": factor must be (B, d, d), got shape ", factor.sizes());
  TORCH_CHECK_TYPE(factor.scalar_type() == c10::kFloat || factor.scalar_type() == c10::kDouble, op,
                   ": factor must be float32 or float64, got ", factor.scalar_type());
  TORCH_CHECK_VALUE(factor.is_contiguous(), op, ": factor must be contiguous, got strides ", factor.strides());
  TORCH_CHECK_VALUE(x.dim() == 3, op, ": x must be (B, R, d_x), got ", x.dim(), "-d tensor of shape ", x.sizes());
  TORCH_CHECK_TYPE(is_float_type(x.scalar_type()), op, ": x must be float32/float64/float16/bfloat16, got ",
                   x.scalar_type());
  TORCH_CHECK_TYPE((x.scalar_type() == c10::kDouble) == (factor.scalar_type() == c10::kDouble), op,
                   ": x and factor must both be float64 or neither, got x ", x.scalar_type(), " and factor ",
                   factor.scalar_type());
  check_cpu(factor, op, "factor");
  check_cpu(x, op, "x");
  const int64_t d = factor.size(1);
  TORCH_CHECK_VALUE(x.size(0) == factor.size(0), op, ": x must have factor's batch size ", factor.size(0),
                    " in dim 0, got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.size(2) + (bias ? 1 : 0) == d, op, ": factor is (", d, ", ", d, "), so x must have d_x = ",
                    d - (bias ? 1 : 0), " features (bias=", bias ? "True" : "False", "), got shape ", x.sizes());
  TORCH_CHECK_VALUE(std::isfinite(decay) && decay >= 0.0 && decay <= 1.0, op, ": decay must be in [0, 1], got ",
                    decay);
  if (factor.numel() == 0) return;
  TORCH_CHECK_VALUE(x.size(1) > 0, op, ": x must have at least one row, got shape ", x.sizes());
  at::assert_no_overlap(factor, x);
  if (factor.scalar_type() == c10::kDouble) return factor_update<double, double, false>(factor, x, decay, bias);
  if (x.size(2) > 0) {
    if (x.scalar_type() == c10::kBFloat16 && use_update_brgemm_bf16())
      return factor_update<BFloat16, float, true>(factor, x, decay, bias);
    if (use_update_brgemm_f32()) return factor_update<float, float, true>(factor, x, decay, bias);
  }
  factor_update<float, float, false>(factor, x, decay, bias);
}

std::tuple<at::Tensor, at::Tensor> damped_inverse_cpu(const at::Tensor& m, const at::Tensor& damping,
                                                      c10::string_view method) {
  const char* op = "damped_inverse";
  check_square_batch(m, op);
  TORCH_CHECK_VALUE(damping.dim() == 1 && damping.size(0) == m.size(0), op, ": damping must be (", m.size(0),
                    ",) for m of shape ", m.sizes(), ", got shape ", damping.sizes());
  TORCH_CHECK_TYPE(damping.scalar_type() == c10::kDouble, op, ": damping must be float64, got ",
                   damping.scalar_type());
  check_cpu(damping, op, "damping");
  const bool chol = method == "cholesky";
  TORCH_CHECK_VALUE(chol || method == "eigh", op, ": the CPU kernel implements method 'cholesky' and 'eigh', got '",
                    std::string(method), "'");
  Tensor inv = at::empty(m.sizes(), m.options().memory_format(at::MemoryFormat::Contiguous));
  Tensor info = at::zeros({m.size(0)}, m.options().dtype(at::kInt));
  if (m.numel() == 0) return {inv, info};
  const Tensor damp = damping.contiguous();
  AT_DISPATCH_FLOATING_TYPES(m.scalar_type(), "damped_inverse_cpu", [&] {
    if (!chol) {
      eigh_inverse<scalar_t>(m, damp, inv, info);
    } else if (m.size(1) <= kOwnCholMax) {
      cholesky_inverse_own<scalar_t>(m, damp, inv, info);
    } else {
      cholesky_inverse_lapack<scalar_t>(m, damp, inv, info);
    }
  });
  return {inv, info};
}

std::tuple<at::Tensor, at::Tensor> sym_eig_cpu(const at::Tensor& m) {
  const char* op = "sym_eig";
  check_square_batch(m, op);
  const int64_t n = m.size(0), d = m.size(1);
  if (m.numel() == 0 || n < num_threads()) {
    auto [w, q] = at::linalg_eigh(m, "L");
    return {w.contiguous(), q.contiguous()};
  }
  Tensor vals = at::empty({n, d}, m.options());
  Tensor vecs = at::empty({n, d, d}, m.options());
  parallel_tiles(n, num_threads(), [&](int64_t, auto&& next) {
    for (int64_t b = next(); b >= 0; b = next()) {
      auto [w, q] = at::linalg_eigh(m.select(0, b), "L");
      vals.select(0, b).copy_(w);
      vecs.select(0, b).copy_(q);
    }
  });
  return {vals, vecs};
}

at::Tensor kron_precondition_cpu(const at::Tensor& grad, const at::Tensor& g_inv, const at::Tensor& a_inv) {
  const char* op = "kron_precondition";
  check_grad(grad, op);
  const int64_t n = grad.size(0), dout = grad.size(1), din = grad.size(2);
  check_precondition(grad, {{"g_inv", g_inv, {n, dout, dout}}, {"a_inv", a_inv, {n, din, din}}}, op);
  const auto acc = acc_dtype(grad.scalar_type());
  Tensor out = at::bmm(at::bmm(g_inv.to(acc), grad.to(acc)), a_inv.to(acc));
  return out.to(grad.scalar_type()).contiguous();
}

at::Tensor kron_precondition_eigen_cpu(const at::Tensor& grad, const at::Tensor& q_g, const at::Tensor& q_a,
                                       const at::Tensor& d_g, const at::Tensor& d_a, const at::Tensor& damping) {
  const char* op = "kron_precondition_eigen";
  check_grad(grad, op);
  const int64_t n = grad.size(0), dout = grad.size(1), din = grad.size(2);
  check_precondition(grad,
                     {{"q_g", q_g, {n, dout, dout}}, {"q_a", q_a, {n, din, din}}, {"d_g", d_g, {n, dout}},
                      {"d_a", d_a, {n, din}}},
                     op);
  TORCH_CHECK_VALUE(damping.dim() == 1 && damping.size(0) == grad.size(0), op, ": damping must be (", grad.size(0),
                    ",), got shape ", damping.sizes());
  TORCH_CHECK_TYPE(damping.scalar_type() == c10::kDouble, op, ": damping must be float64, got ",
                   damping.scalar_type());
  check_cpu(damping, op, "damping");
  const auto acc = acc_dtype(grad.scalar_type());
  const Tensor qg = q_g.to(acc), qa = q_a.to(acc);
  Tensor t = at::bmm(qg.transpose(1, 2), grad.to(acc));
  Tensor v = at::bmm(t, qa);
  const Tensor damp = damping.contiguous();
  AT_DISPATCH_FLOATING_TYPES(acc, "kron_precondition_eigen_cpu",
                             [&] { divide_by_eigen_grid<scalar_t>(v, d_g.to(acc), d_a.to(acc), damp); });
  at::bmm_out(t, qg, v);
  Tensor out = at::bmm(t, qa.transpose(1, 2));
  return out.to(grad.scalar_type()).contiguous();
}

TORCH_LIBRARY_IMPL(pycurv, CPU, m) {
  m.impl("kfac_factor_update", &kfac_factor_update_cpu);
  m.impl("damped_inverse", &damped_inverse_cpu);
  m.impl("sym_eig", &sym_eig_cpu);
  m.impl("kron_precondition", &kron_precondition_cpu);
  m.impl("kron_precondition_eigen", &kron_precondition_eigen_cpu);
}

}  // namespace pycurv
