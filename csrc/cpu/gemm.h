// Building blocks shared by the CPU kernels: input checks, AVX2 loads, strided matrix views, scratch buffers, a
// packing driver around oneDNN's BRGEMM micro-kernel (at::native::cpublas::brgemm; AVX2 for float32, AVX-512 for
// bfloat16 operands with float32 accumulation) with a self-test probe, an ATen fallback, and a dynamic tile
// scheduler.
//
// Everything here is single-threaded: callers run it inside at::parallel_for over independent tiles (where BLAS
// calls run serially). PYCURV_CPU_BRGEMM=0 turns the micro-kernel off (ATen / MKL is used instead).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <ATen/native/CPUBlas.h>
#include <immintrin.h>
#if defined(CPUBLAS_BRGEMM_F32F32F32) && defined(CPUBLAS_BRGEMM_BF16BF16F32) && !defined(PYCURV_NO_BRGEMM)
#define PYCURV_HAVE_BRGEMM 1
#endif
#endif

namespace pycurv {
namespace cpu {

using at::BFloat16;
using at::Tensor;

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int64_t round_up(int64_t a, int64_t b) { return cdiv(a, b) * b; }

template <typename E>
constexpr c10::ScalarType scalar_of() {
  return c10::CppTypeToScalarType<E>::value;
}

inline bool is_float_type(c10::ScalarType t) {
  return t == c10::kFloat || t == c10::kDouble || t == c10::kHalf || t == c10::kBFloat16;
}

inline void check_cpu(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got one on ", t.device());
}

#if defined(__x86_64__) && defined(__GNUC__)
#define PYCURV_CPU_AVX2 1

// Whether this CPU runs the AVX2 + FMA loops (probed once).
inline bool cpu_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}

// Eight float32 lanes from float32, or from bfloat16 (a 16-bit shift of the bit pattern).
__attribute__((target("avx2"))) inline __m256 load8f(const float* p) { return _mm256_loadu_ps(p); }

__attribute__((target("avx2"))) inline __m256 load8f(const BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
#endif

// ---------------------------------------------------------------------------------------------------------------
// GEMM. An operand is a strided matrix view: element (r, c) at p[r*rs + c*cs], one of rs / cs being 1.

template <typename E>
struct Mat {
  const E* p;
  int64_t rs, cs;
};

// Scratch array that grows on demand and is never initialised (packing overwrites what it uses).
template <typename U>
class Buf {
 public:
  U* get(int64_t n) {
    if (n > cap_) {
      p_.reset(new U[n]);
      cap_ = n;
    }
    return p_.get();
  }
  U* data() const { return p_.get(); }

 private:
  std::unique_ptr<U[]> p_;
  int64_t cap_ = 0;
};

// B operand of the micro-kernel, packed: K blocks of kb rows, each cut into panels of kNb columns (float32
// row-major, or bfloat16 in the VNNI-2 layout: rows 2k and 2k+1 interleaved into 32-bit words).
struct Packed {
  Buf<uint32_t> buf;
  int64_t K = 0, N = 0, kb = 0, np = 0, nw = 0;  // nw: panel width
};

// Per-thread packing space of the micro-kernel driver.
struct Work {
  Buf<uint32_t> a, tmp;
  Packed b;
};

// C = A B (+ C when accumulate) through ATen on the calling thread (inside at::parallel_for BLAS runs serially).
template <typename T>
void gemm_aten(int64_t M, int64_t N, int64_t K, Mat<T> A, Mat<T> B, bool accumulate, T* c, int64_t ldc) {
  if (M == 0 || N == 0) return;
  auto opt = at::TensorOptions().dtype(scalar_of<T>());
  Tensor C = at::from_blob(c, {M, N}, {ldc, 1}, opt);
  if (K == 0) {
    if (!accumulate) C.zero_();
    return;
  }
  Tensor a = at::from_blob(const_cast<T*>(A.p), {M, K}, {A.rs, A.cs}, opt);
  Tensor b = at::from_blob(const_cast<T*>(B.p), {K, N}, {B.rs, B.cs}, opt);
  if (accumulate) {
    C.addmm_(a, b);
  } else {
    at::mm_out(C, a, b);
  }
}

#ifdef PYCURV_HAVE_BRGEMM
namespace cb = at::native::cpublas;

// Driver blocking: panels of kNb columns (4 AVX-512 vectors of float32), A blocks of up to kMb rows, K blocks
// of kKb (float32) / kKbHalf (bfloat16) rows so that a panel stays in L2.
constexpr int64_t kNb = 64, kMb = 256, kKb = 512, kKbHalf = 1024;

// Panels are kNb columns wide; a narrower B gets one panel rounded up to a vector of float32.
inline int64_t panel_width(int64_t n) { return n >= kNb ? kNb : cdiv(n, 16) * 16; }

inline uint32_t load_word(const void* p) {
  uint32_t w;
  std::memcpy(&w, p, 4);
  return w;
}

// d[c*ldd + r] = s[r*lds + c] for r < R, c < C on 32-bit words (float32, or pairs of bfloat16): 8 x 8 blocks
// in AVX2 registers. Only called on the micro-kernel path, which requires AVX2.
inline __attribute__((target("avx2"))) void transpose32(const uint32_t* s, int64_t lds, int64_t R, int64_t C,
                                                        uint32_t* d, int64_t ldd) {
  int64_t r = 0;
  for (; r + 8 <= R; r += 8) {
    int64_t c = 0;
    for (; c + 8 <= C; c += 8) {
      const uint32_t* sp = s + r * lds + c;
      __m256 r0 = _mm256_castsi256_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sp)));
      __m256 r1 = _mm256_castsi256_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sp + lds)));
      __m256 r2 = _mm256_castsi256_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sp + 2 * lds)));
      __m256 r3 = _mm256_castsi256_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sp + 3 * lds)));
      __m256 r4 = _mm256_castsi256_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sp + 4 * lds)));
      __m256 r5 = _mm256_castsi256_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sp + 5 * lds)));
      __m256 r6 = _mm256_castsi256_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sp + 6 * lds)));
      __m256 r7 = _mm256_castsi256_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sp + 7 * lds)));
      __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
      __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
      __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
      __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
      __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
      __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
      __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
      __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
      uint32_t* dp = d + c * ldd + r;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dp), _mm256_castps_si256(_mm256_permute2f128_ps(u0, u4, 0x20)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dp + ldd),
                          _mm256_castps_si256(_mm256_permute2f128_ps(u1, u5, 0x20)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dp + 2 * ldd),
                          _mm256_castps_si256(_mm256_permute2f128_ps(u2, u6, 0x20)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dp + 3 * ldd),
                          _mm256_castps_si256(_mm256_permute2f128_ps(u3, u7, 0x20)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dp + 4 * ldd),
                          _mm256_castps_si256(_mm256_permute2f128_ps(u0, u4, 0x31)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dp + 5 * ldd),
                          _mm256_castps_si256(_mm256_permute2f128_ps(u1, u5, 0x31)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dp + 6 * ldd),
                          _mm256_castps_si256(_mm256_permute2f128_ps(u2, u6, 0x31)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dp + 7 * ldd),
                          _mm256_castps_si256(_mm256_permute2f128_ps(u3, u7, 0x31)));
    }
    for (; c < C; ++c)
      for (int64_t i = 0; i < 8; ++i) d[c * ldd + r + i] = load_word(s + (r + i) * lds + c);
  }
  for (; r < R; ++r)
    for (int64_t c = 0; c < C; ++c) d[c * ldd + r] = load_word(s + r * lds + c);
}

// w[n] = lo[n] | hi[n] << 16 on bfloat16 bit patterns (hi == nullptr pairs with zero): one VNNI-2 row pair.
inline __attribute__((target("avx2"))) void interleave16(const uint16_t* lo, const uint16_t* hi, int64_t n,
                                                        uint32_t* w) {
  int64_t i = 0;
  const __m256i zero = _mm256_setzero_si256();
  for (; i + 16 <= n; i += 16) {
    const __m256i l = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo + i));
    const __m256i h = hi ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(hi + i)) : zero;
    const __m256i a = _mm256_unpacklo_epi16(l, h), b = _mm256_unpackhi_epi16(l, h);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w + i), _mm256_permute2x128_si256(a, b, 0x20));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w + i + 8), _mm256_permute2x128_si256(a, b, 0x31));
  }
  for (; i < n; ++i) w[i] = static_cast<uint32_t>(lo[i]) | (hi ? static_cast<uint32_t>(hi[i]) << 16 : 0u);
}

inline const uint16_t* bits(const BFloat16* p) { return reinterpret_cast<const uint16_t*>(p); }

// Panel of B(k0:k0+kk, n0:n0+nn) with row stride nw >= nn (in 32-bit words).
template <typename E>
void pack_b_panel(Mat<E> B, int64_t k0, int64_t kk, int64_t n0, int64_t nn, uint32_t* out, int64_t nw) {
  const E* base = B.p + k0 * B.rs + n0 * B.cs;
  if constexpr (std::is_same_v<E, float>) {
    if (B.cs == 1) {
      for (int64_t k = 0; k < kk; ++k) std::memcpy(out + k * nw, base + k * B.rs, nn * sizeof(float));
    } else {  // B = Y^T with Y rows of stride cs: a transpose of the (nn x kk) block of Y
      transpose32(reinterpret_cast<const uint32_t*>(base), B.cs, nn, kk, out, nw);
    }
  } else {
    const int64_t kq = kk / 2;
    if (B.cs == 1) {
      for (int64_t k = 0; k < kq; ++k)
        interleave16(bits(base + 2 * k * B.rs), bits(base + (2 * k + 1) * B.rs), nn, out + k * nw);
      if (kk % 2) interleave16(bits(base + (kk - 1) * B.rs), nullptr, nn, out + kq * nw);
    } else {
      // B = Y^T: a VNNI-2 word of column n is two consecutive elements of row n of Y, so the packing is a
      // transpose of 32-bit words when rows start on word boundaries.
      if (B.cs % 2 == 0) {
        transpose32(reinterpret_cast<const uint32_t*>(base), B.cs / 2, nn, kq, out, nw);
      } else {
        for (int64_t n = 0; n < nn; ++n)
          for (int64_t k = 0; k < kq; ++k) out[k * nw + n] = load_word(base + n * B.cs + 2 * k);
      }
      if (kk % 2)
        for (int64_t n = 0; n < nn; ++n) out[kq * nw + n] = bits(base + n * B.cs + kk - 1)[0];
    }
  }
}

// Packs B (K x N) whole: all K blocks, all panels.
template <typename E>
void pack_b(Mat<E> B, int64_t K, int64_t N, Packed& pb) {
  constexpr bool half = std::is_same_v<E, BFloat16>;
  pb.K = K;
  pb.N = N;
  pb.kb = half ? kKbHalf : kKb;
  pb.nw = panel_width(N);
  pb.np = cdiv(N, pb.nw);
  const int64_t wfull = (half ? pb.kb / 2 : pb.kb) * pb.nw;
  const int64_t nkb = cdiv(K, pb.kb);
  uint32_t* buf = pb.buf.get(nkb * pb.np * wfull);
  for (int64_t kbi = 0; kbi < nkb; ++kbi) {
    const int64_t k0 = kbi * pb.kb, kk = std::min(pb.kb, K - k0);
    const int64_t wpanel = (half ? cdiv(kk, 2) : kk) * pb.nw;
    for (int64_t p = 0; p < pb.np; ++p)
      pack_b_panel(B, k0, kk, p * pb.nw, std::min(pb.nw, N - p * pb.nw), buf + kbi * pb.np * wfull + p * wpanel, pb.nw);
  }
}

// A(m0:m0+mm, k0:k0+kk) row-major with row length kp >= kk (zero-padded).
template <typename E>
void pack_a(Mat<E> A, int64_t m0, int64_t mm, int64_t k0, int64_t kk, int64_t kp, E* out, Work& w) {
  const E* base = A.p + m0 * A.rs + k0 * A.cs;
  if (A.cs == 1) {
    for (int64_t m = 0; m < mm; ++m) {
      std::memcpy(out + m * kp, base + m * A.rs, kk * sizeof(E));
      for (int64_t k = kk; k < kp; ++k) out[m * kp + k] = E(0.0f);
    }
    return;
  }
  // A = column-major view (rows of stride A.cs hold columns of A): transpose.
  if constexpr (std::is_same_v<E, float>) {
    transpose32(reinterpret_cast<const uint32_t*>(base), A.cs, kk, mm, reinterpret_cast<uint32_t*>(out), kp);
  } else {
    // Interleave pairs of source rows (k, k+1) into words, then transpose the words: row m of the result holds
    // A(m, k), A(m, k+1), ... in order.
    const int64_t kq = kp / 2;
    uint32_t* tmp = w.tmp.get(kq * mm);
    for (int64_t k = 0; k < kq; ++k) {
      const BFloat16* hi = 2 * k + 1 < kk ? base + (2 * k + 1) * A.cs : nullptr;
      interleave16(bits(base + 2 * k * A.cs), hi ? bits(hi) : nullptr, mm, tmp + k * mm);
    }
    transpose32(tmp, mm, kq, mm, reinterpret_cast<uint32_t*>(out), kq);
  }
}

// C (M x N, N <= pb.N) = A B (+ C) with B packed; float32 accumulation.
template <typename E>
void gemm_packed(int64_t M, int64_t N, Mat<E> A, const Packed& pb, bool accumulate, float* C, int64_t ldc,
                 Work& w) {
  constexpr bool half = std::is_same_v<E, BFloat16>;
  const int64_t K = pb.K, kb = pb.kb;
  if (M == 0 || N == 0) return;
  if (K == 0) {
    if (!accumulate)
      for (int64_t m = 0; m < M; ++m) std::fill(C + m * ldc, C + m * ldc + N, 0.0f);
    return;
  }
  const int64_t nw = pb.nw;
  const int64_t wfull = (half ? kb / 2 : kb) * nw;
  const int64_t np = cdiv(N, nw);
  for (int64_t kbi = 0; kbi * kb < K; ++kbi) {
    const int64_t k0 = kbi * kb, kk = std::min(kb, K - k0);
    const int64_t kp = half ? kk + (kk % 2) : kk;
    const int64_t wpanel = (half ? kp / 2 : kp) * nw;
    const uint32_t* base = pb.buf.data() + kbi * pb.np * wfull;
    const bool add = accumulate || kbi > 0;
    for (int64_t m0 = 0; m0 < M; m0 += kMb) {
      const int64_t mm = std::min(kMb, M - m0);
      const E* ap;
      int64_t lda;
      if (A.cs == 1 && kp == kk) {
        ap = A.p + m0 * A.rs + k0;
        lda = A.rs;
      } else {
        E* pa = reinterpret_cast<E*>(w.a.get(cdiv(mm * kp * static_cast<int64_t>(sizeof(E)), 4)));
        pack_a(A, m0, mm, k0, kk, kp, pa, w);
        ap = pa;
        lda = kp;
      }
      for (int64_t p = 0; p < np; ++p) {
        const int64_t n0 = p * nw, nn = std::min(nw, N - n0);
        cb::brgemm(mm, nn, kp, lda, nw, ldc, add, ap, reinterpret_cast<const E*>(base + p * wpanel),
                   C + m0 * ldc + n0, half);
      }
    }
  }
}

// C = A B (+ C) with float32 accumulation through the micro-kernel; E = float or BFloat16.
template <typename E>
void gemm_brgemm(int64_t M, int64_t N, int64_t K, Mat<E> A, Mat<E> B, bool accumulate, float* C, int64_t ldc,
                 Work& w) {
  if (M == 0 || N == 0) return;
  if constexpr (std::is_same_v<E, float>) {
    if (B.cs == 1 && K > 0) {
      // A row-major float32 B is read in place.
      for (int64_t k0 = 0; k0 < K; k0 += kKb) {
        const int64_t kk = std::min(kKb, K - k0);
        for (int64_t m0 = 0; m0 < M; m0 += kMb) {
          const int64_t mm = std::min(kMb, M - m0);
          const float* ap;
          int64_t lda;
          if (A.cs == 1) {
            ap = A.p + m0 * A.rs + k0;
            lda = A.rs;
          } else {
            float* pa = reinterpret_cast<float*>(w.a.get(mm * kk));
            pack_a(A, m0, mm, k0, kk, kk, pa, w);
            ap = pa;
            lda = kk;
          }
          for (int64_t n0 = 0; n0 < N; n0 += kNb)
            cb::brgemm(mm, std::min(kNb, N - n0), kk, lda, B.rs, ldc, accumulate || k0 > 0, ap,
                       B.p + k0 * B.rs + n0, C + m0 * ldc + n0, false);
        }
      }
      return;
    }
  }
  pack_b(B, K, N, w.b);
  gemm_packed(M, N, A, w.b, accumulate, C, ldc, w);
}
#endif  // PYCURV_HAVE_BRGEMM

// C (+)= A B: E the operands' dtype, T the accumulation / output dtype; brg selects the micro-kernel.
template <typename E, typename T>
void gemm(int64_t M, int64_t N, int64_t K, Mat<E> A, Mat<E> B, bool accumulate, T* C, int64_t ldc, Work& w,
          bool brg) {
#ifdef PYCURV_HAVE_BRGEMM
  if constexpr (std::is_same_v<T, float>) {
    if (brg) return gemm_brgemm<E>(M, N, K, A, B, accumulate, C, ldc, w);
  }
#endif
  if constexpr (std::is_same_v<E, T>) {
    gemm_aten<T>(M, N, K, A, B, accumulate, C, ldc);
  } else {
    TORCH_CHECK(false, "pycurv: bfloat16 operands need the BRGEMM micro-kernel");
  }
}

// Right operand Y of C = X Y^T (Y: (N, K) rows of stride ldy), packed once and reused for many X.
template <typename E, typename T>
class RightNT {
 public:
  void set(const E* y, int64_t ldy, int64_t K, int64_t N, bool brg, Work& w) {
    y_ = y;
    ldy_ = ldy;
    K_ = K;
    N_ = N;
    brg_ = brg;
#ifdef PYCURV_HAVE_BRGEMM
    if constexpr (std::is_same_v<T, float>) {
      if (brg) pack_b<E>({y, 1, ldy}, K, N, packed_);
    }
#endif
    (void)w;
  }

  // C[:, :n] (+)= X Y[:n]^T, X: (M, K) rows of stride ldx, n <= N.
  void mul(int64_t M, int64_t n, const E* x, int64_t ldx, bool accumulate, T* c, int64_t ldc, Work& w) const {
#ifdef PYCURV_HAVE_BRGEMM
    if constexpr (std::is_same_v<T, float>) {
      if (brg_) return gemm_packed<E>(M, n, {x, ldx, 1}, packed_, accumulate, c, ldc, w);
    }
#endif
    gemm<E, T>(M, n, K_, {x, ldx, 1}, {y_, 1, ldy_}, accumulate, c, ldc, w, false);
  }

 private:
  const E* y_ = nullptr;
  int64_t ldy_ = 0, K_ = 0, N_ = 0;
  bool brg_ = false;
  Packed packed_;
};

// Releases the micro-kernel's hardware context (AMX tiles) held by this thread, if any.
inline void release_brgemm(bool used_half) {
#ifdef PYCURV_HAVE_BRGEMM
  if (used_half) cb::brgemm_release(true);
#endif
}

// ---------------------------------------------------------------------------------------------------------------
// Scheduling

// Runs body(slot, next) on up to `slots` threads; next() hands out tile indices [0, ntiles) dynamically (tiles
// differ in cost at the edges), or -1 when none are left. slot indexes per-thread partial results.
template <typename F>
void parallel_tiles(int64_t ntiles, int64_t slots, const F& body) {
  std::atomic<int64_t> counter{0};
  auto next = [&]() -> int64_t {
    const int64_t t = counter.fetch_add(1, std::memory_order_relaxed);
    return t < ntiles ? t : -1;
  };
  at::parallel_for(0, std::max<int64_t>(1, std::min(slots, ntiles)), 1,
                   [&](int64_t s0, int64_t /*s1*/) { body(s0, next); });
}

inline int64_t num_threads() { return std::max(1, at::get_num_threads()); }

// ---------------------------------------------------------------------------------------------------------------
// Whether the micro-kernel path is usable here: CPU features, and self-tests of the driver against exact integer
// results (any exception or mismatch falls back to ATen).

struct BrgemmSupport {
  bool f32 = false, bf16 = false;
};

#ifdef PYCURV_HAVE_BRGEMM
// Runs the driver on small problems with odd sizes and every operand layout, against exact integer products.
template <typename E>
bool brgemm_self_test() {
  try {
    bool ok = true;
    // Odd and even K, a narrow and a wide B, and a shape with several K blocks and a K tail.
    const int64_t shapes[3][3] = {{13, 70, 9}, {13, 40, 10}, {70, 130, 1100}};
    for (const auto& sh : shapes) {
      const int64_t M = sh[0], N = sh[1], K = sh[2];
      std::vector<E> a(M * K), at(K * M), bt(N * K), brow(K * N);
      for (int64_t i = 0; i < M * K; ++i) a[i] = E(static_cast<float>((i * 7) % 11) - 5.0f);
      for (int64_t i = 0; i < N * K; ++i) bt[i] = E(static_cast<float>((i * 5) % 13) - 6.0f);
      for (int64_t k = 0; k < K; ++k) {
        for (int64_t n = 0; n < N; ++n) brow[k * N + n] = bt[n * K + k];
        for (int64_t m = 0; m < M; ++m) at[k * M + m] = a[m * K + k];
      }
      // Integer products and sums below 2^24: exact in float32 in any order.
      std::vector<float> c(M * N), want(M * N, 0.0f);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n)
          for (int64_t k = 0; k < K; ++k) want[m * N + n] += float(a[m * K + k]) * float(bt[n * K + k]);
      Work w;
      for (int layout = 0; layout < 4; ++layout) {
        Mat<E> A = layout & 1 ? Mat<E>{at.data(), 1, M} : Mat<E>{a.data(), K, 1};
        Mat<E> B = layout & 2 ? Mat<E>{brow.data(), N, 1} : Mat<E>{bt.data(), 1, K};
        std::fill(c.begin(), c.end(), 1.0f);
        gemm_brgemm<E>(M, N, K, A, B, false, c.data(), N, w);
        ok = ok && c == want;
      }
    }
    cb::brgemm_release(std::is_same_v<E, BFloat16>);
    return ok;
  } catch (...) {
    return false;
  }
}
#endif

// The float32 / bfloat16 driver's availability: CPU features, oneDNN, and the self-tests (probed once).
inline BrgemmSupport probe_brgemm_driver() {
  BrgemmSupport s;
#ifdef PYCURV_HAVE_BRGEMM
  const char* env = std::getenv("PYCURV_CPU_BRGEMM");
  if (env != nullptr && env[0] == '0') return s;
  if (!at::hasMKLDNN()) return s;
  // The float32 micro-kernel and the packing need AVX2; the bfloat16 micro-kernel AVX-512.
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  s.f32 = avx2 && brgemm_self_test<float>();
  s.bf16 = s.f32 && avx512 && brgemm_self_test<BFloat16>();
#endif
  return s;
}

inline const BrgemmSupport& brgemm_driver_support() {
  static const BrgemmSupport s = probe_brgemm_driver();
  return s;
}

}  // namespace cpu
}  // namespace pycurv
