// CUDA kernels for per-sample gradient products (MATH.md section 1): per_sample_grad_sqnorms, per_sample_gram,
// ef_diag. Inputs a: (N, T, d_in), g: (N, T, d_out) of one float dtype, any strides; results accumulate and return
// in float32 (float64 for float64 inputs).
//
// Ghost identity (Goodfellow 2015, "Efficient per-example gradient computations"; Li et al. 2022 for sequences):
// with the rows of a and g flattened to R = N*T rows x_q, y_q (q = n*T + t),
//     <G_i, G_j> = sum_{q in i, p in j} (x_q . x_p + beta) (y_q . y_p),     beta = 1 with bias, else 0,
// where beta folds in the bias gradient sum_t g[n,t] (a virtual ones column of a, never stored). One fused kernel
// (ghost_tile_kernel) computes a 64 x 64 tile of both row Grams X X^T and Y Y^T from shared-memory k-slices,
// multiplies them in registers, and either stores the tile (T == 1 Gram), or sums it per pair of samples
// (T > 1 Gram), or per sample along the diagonal band (T > 1 squared norms); only tiles on or above the diagonal
// are computed, the product being symmetric.
//
// Materialize path: G_n = g_n^T a_n is formed by cuBLAS batched GEMM on chunks of d_out rows, so the extra memory is
// O(N * chunk * d_in); then K += J J^T (cuBLAS), ||G_n||^2 (sumsq_rows_kernel) or sum_n G_n^2 (sq_accum_kernel).
//
// Tuning knobs (read at every call): PYCURV_CUDA_CHUNK_BYTES bounds the temporaries of the chunked paths (default
// 256 MiB); PYCURV_CUDA_FUSED_MAX_D is the largest d_in + d_out for which the ghost Gram uses the fused kernel
// rather than two cuBLAS GEMMs per block of samples (default 4096).
//
// Every cuBLAS product runs under at::NoTF32Guard: float32 inputs keep float32 accuracy whatever torch's float32
// matmul precision says, as in the fused kernels.
#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>

#include "pycurv.h"

namespace pycurv {
namespace {

// ---------------------------------------------------------------------------------------------------------------
// Device code
// ---------------------------------------------------------------------------------------------------------------

constexpr int kTile = 64;                             // rows (and columns) of one output tile
constexpr int kTileK = 32;                            // k-slice staged in shared memory per step
constexpr int kPad = kTile + 1;                       // staged rows padded so transposed stores avoid bank conflicts
constexpr int kThreads = 256;                         // 16 x 16 threads, each owning a 4 x 4 micro-tile
constexpr int kMicro = 4;
constexpr int kSide = kTile / kMicro;                 // 16
constexpr int kLoadStep = kThreads / kTileK;          // 8: rows apart of one thread's staged elements
constexpr int kLoadRows = kTile * kTileK / kThreads;  // 8 staged elements per thread per k-slice
static_assert(kSide * kSide == kThreads, "one micro-tile per thread");
static_assert(kTile * kPad <= 2 * kTileK * kPad, "the product tile fits in the operand buffers it reuses");

enum Epilogue : int {
  kStore = 0,      // T == 1 Gram: write the tile and its mirror
  kGroupSum = 1,   // T > 1 Gram: sum the tile per (sample_i, sample_j) block, atomically
  kGroupDiag = 2,  // T > 1 squared norms: sum the tile per (sample_n, sample_n) block, atomically
};

template <typename scalar_t, typename acc_t>
struct GhostArgs {
  const scalar_t* x;  // a
  int64_t xs0, xs1, xs2, dx;
  const scalar_t* y;  // g
  int64_t ys0, ys1, ys2, dy;
  int64_t T;          // rows per sample (the group size of the epilogue)
  int64_t R;          // N * T flattened rows
  int64_t row_tiles;  // ceil(R / kTile)
  int64_t band;       // kGroupDiag: tile (i, i + b) for b in [0, band)
  int64_t num_tiles;  // tiles enumerated by the grid-stride loop
  acc_t beta;
  acc_t* out;
  int64_t ldo;
};

__device__ __forceinline__ int64_t imin(int64_t x, int64_t y) { return x < y ? x : y; }
__device__ __forceinline__ int64_t imax(int64_t x, int64_t y) { return x > y ? x : y; }

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over a 1-D block whose size is a multiple of 32; every thread gets the total. `shm` holds 32 values; the
// leading barrier lets consecutive calls share it.
template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t v, acc_t* shm) {
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) shm[warp] = v;
  __syncthreads();
  v = lane < warps ? shm[lane] : acc_t(0);
  return warp_sum(v);
}

// Element offsets of the rows this thread stages for the tile starting at flattened row `row0`; -1 past the end
// (strides of a tensor are never negative, so -1 is free).
__device__ __forceinline__ void row_offsets(int64_t row0, int64_t R, int64_t T, int64_t s0, int64_t s1,
                                            int64_t (&off)[kLoadRows]) {
  const int r = threadIdx.x / kTileK;
#pragma unroll
  for (int i = 0; i < kLoadRows; ++i) {
    const int64_t q = row0 + r + i * kLoadStep;
    off[i] = q < R ? (q / T) * s0 + (q % T) * s1 : int64_t(-1);
  }
}

// Stages columns [k0, k0 + kTileK) of the tile's rows into dst[k * kPad + row], zero outside the matrix.
// Consecutive threads read consecutive k, so unit-stride inputs are read in 32-element runs.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void stage(const scalar_t* __restrict__ src, const int64_t (&off)[kLoadRows], int64_t s2,
                                      int64_t D, int64_t k0, acc_t* __restrict__ dst) {
  const int kk = threadIdx.x % kTileK;
  const int r = threadIdx.x / kTileK;
  const int64_t k = k0 + kk;
#pragma unroll
  for (int i = 0; i < kLoadRows; ++i) {
    acc_t v = acc_t(0);
    if (off[i] >= 0 && k < D) v = static_cast<acc_t>(src[off[i] + k * s2]);
    dst[kk * kPad + r + i * kLoadStep] = v;
  }
}

// acc[i][j] = row(r0 + ty + 16 i) . row(c0 + tx + 16 j) of one (R x D) row view; ends on a barrier, so the
// operand buffers are free afterwards.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void tile_gram(const scalar_t* __restrict__ src, int64_t s0, int64_t s1, int64_t s2,
                                          int64_t D, int64_t T, int64_t R, int64_t r0, int64_t c0, bool same,
                                          acc_t* As, acc_t* Bs, acc_t (&acc)[kMicro][kMicro]) {
  const int ty = threadIdx.x / kSide, tx = threadIdx.x % kSide;
  int64_t off_r[kLoadRows], off_c[kLoadRows];
  row_offsets(r0, R, T, s0, s1, off_r);
  row_offsets(c0, R, T, s0, s1, off_c);
  const acc_t* Cs = same ? As : Bs;  // a diagonal tile multiplies its rows with themselves
#pragma unroll
  for (int i = 0; i < kMicro; ++i)
#pragma unroll
    for (int j = 0; j < kMicro; ++j) acc[i][j] = acc_t(0);
  for (int64_t k0 = 0; k0 < D; k0 += kTileK) {
    stage(src, off_r, s2, D, k0, As);
    if (!same) stage(src, off_c, s2, D, k0, Bs);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; ++kk) {
      acc_t av[kMicro], cv[kMicro];
#pragma unroll
      for (int i = 0; i < kMicro; ++i) av[i] = As[kk * kPad + ty + kSide * i];
#pragma unroll
      for (int j = 0; j < kMicro; ++j) cv[j] = Cs[kk * kPad + tx + kSide * j];
#pragma unroll
      for (int i = 0; i < kMicro; ++i)
#pragma unroll
        for (int j = 0; j < kMicro; ++j) acc[i][j] += av[i] * cv[j];
    }
    __syncthreads();
  }
}

// Upper-triangle tile t -> (ti, tj), ti <= tj, enumerated column by column: t = tj (tj + 1) / 2 + ti.
__device__ __forceinline__ void triangle_tile(int64_t t, int64_t& ti, int64_t& tj) {
  int64_t j = static_cast<int64_t>((sqrt(8.0 * static_cast<double>(t) + 1.0) - 1.0) * 0.5);
  while (j * (j + 1) / 2 > t) --j;  // the double estimate may be off by one either way
  while ((j + 1) * (j + 2) / 2 <= t) ++j;
  tj = j;
  ti = t - j * (j + 1) / 2;
}

// K-tile of (X X^T + beta) * (Y Y^T) over flattened rows, reduced per the epilogue (see the file comment).
template <typename scalar_t, typename acc_t, int EPI>
__global__ void __launch_bounds__(kThreads) ghost_tile_kernel(const GhostArgs<scalar_t, acc_t> p) {
  __shared__ acc_t smem[2 * kTileK * kPad];
  acc_t* As = smem;
  acc_t* Bs = smem + kTileK * kPad;
  const int ty = threadIdx.x / kSide, tx = threadIdx.x % kSide;

  for (int64_t t = blockIdx.x; t < p.num_tiles; t += gridDim.x) {
    int64_t ti, tj;
    if (EPI == kGroupDiag) {
      ti = t / p.band;
      tj = ti + t % p.band;
      if (tj >= p.row_tiles) continue;
      // The last sample with rows in tile ti ends in column tile `last`; tiles further right meet no diagonal block.
      const int64_t last_row = imin((ti + 1) * kTile, p.R) - 1;
      const int64_t last = ((last_row / p.T + 1) * p.T - 1) / kTile;
      if (tj > last) continue;
    } else {
      triangle_tile(t, ti, tj);
    }
    const int64_t r0 = ti * kTile, c0 = tj * kTile;
    const bool same = ti == tj;

    acc_t kx[kMicro][kMicro], ky[kMicro][kMicro];
    tile_gram(p.x, p.xs0, p.xs1, p.xs2, p.dx, p.T, p.R, r0, c0, same, As, Bs, kx);
    tile_gram(p.y, p.ys0, p.ys1, p.ys2, p.dy, p.T, p.R, r0, c0, same, As, Bs, ky);

    if (EPI == kStore) {
#pragma unroll
      for (int i = 0; i < kMicro; ++i) {
        const int64_t r = r0 + ty + kSide * i;
#pragma unroll
        for (int j = 0; j < kMicro; ++j) {
          const int64_t c = c0 + tx + kSide * j;
          if (r < p.R && c < p.R) {
            const acc_t v = (kx[i][j] + p.beta) * ky[i][j];
            p.out[r * p.ldo + c] = v;
            if (!same) p.out[c * p.ldo + r] = v;
          }
        }
      }
      continue;
    }

    // Grouped epilogue. The product tile goes to shared memory (over the operand buffers, free after tile_gram's
    // final barrier); stage 1 sums each row over every column group in place, stage 2 sums those over the rows of
    // each row group. Every serial sum is at most kTile long, whatever T is.
    acc_t* P = smem;
#pragma unroll
    for (int i = 0; i < kMicro; ++i)
#pragma unroll
      for (int j = 0; j < kMicro; ++j)
        P[(ty + kSide * i) * kPad + tx + kSide * j] = (kx[i][j] + p.beta) * ky[i][j];
    __syncthreads();

    const int64_t G = p.T;
    const int nr = static_cast<int>(imin(kTile, p.R - r0));
    const int nc = static_cast<int>(imin(kTile, p.R - c0));
    const int64_t gr0 = r0 / G, gc0 = c0 / G;  // first row / column group met by this tile
    if (static_cast<int>(threadIdx.x) < nr) {
      // Column group l of the tile starts at a local column >= l, so writing entry l only overwrites columns this
      // thread has already read.
      acc_t* row = P + threadIdx.x * kPad;
      int64_t next = (gc0 + 1) * G - c0;  // local column where the next group starts
      int cur = 0;
      acc_t run = acc_t(0);
      for (int cc = 0; cc < nc; ++cc) {
        if (cc == next) {
          row[cur++] = run;
          run = acc_t(0);
          next += G;
        }
        run += row[cc];
      }
      row[cur] = run;
    }
    __syncthreads();

    const int ngr = static_cast<int>((r0 + nr - 1) / G - gr0 + 1);
    const int ngc = static_cast<int>((c0 + nc - 1) / G - gc0 + 1);
    for (int item = threadIdx.x; item < ngr * ngc; item += kThreads) {
      const int li = item / ngc, lj = item % ngc;
      const int64_t gi = gr0 + li, gj = gc0 + lj;
      if (EPI == kGroupDiag && gi != gj) continue;
      const int rs = static_cast<int>(imax(0, gi * G - r0));
      const int re = static_cast<int>(imin(nr, (gi + 1) * G - r0));
      acc_t s = acc_t(0);
      for (int rr = rs; rr < re; ++rr) s += P[rr * kPad + lj];
      if (EPI == kGroupSum) {
        // The mirror tile (tj, ti), never computed, holds the transpose: it adds the same sum to (gj, gi).
        atomicAdd(p.out + gi * p.ldo + gj, s);
        if (!same) atomicAdd(p.out + gj * p.ldo + gi, s);
      } else {
        atomicAdd(p.out + gi, same ? s : acc_t(2) * s);
      }
    }
    __syncthreads();  // P is overwritten by the next tile's staging
  }
}

// T == 1 squared norms: out[n] = (||a_n||^2 + beta) ||g_n||^2, one block per sample.
template <typename scalar_t, typename acc_t>
__global__ void sqnorm_rank1_kernel(const scalar_t* __restrict__ a, int64_t as0, int64_t as2, int64_t din,
                                    const scalar_t* __restrict__ g, int64_t gs0, int64_t gs2, int64_t dout, int64_t N,
                                    acc_t beta, acc_t* __restrict__ out) {
  __shared__ acc_t shm[32];
  for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
    acc_t sa = acc_t(0), sg = acc_t(0);
    for (int64_t k = threadIdx.x; k < din; k += blockDim.x) {
      const acc_t v = static_cast<acc_t>(a[n * as0 + k * as2]);
      sa += v * v;
    }
    for (int64_t k = threadIdx.x; k < dout; k += blockDim.x) {
      const acc_t v = static_cast<acc_t>(g[n * gs0 + k * gs2]);
      sg += v * v;
    }
    sa = block_sum(sa, shm);
    sg = block_sum(sg, shm);
    if (threadIdx.x == 0) out[n] = (sa + beta) * sg;
  }
}

// Bias gradients: out[n, o] += sum_{t in slice y} g[n, t, o]; out is (N, D) contiguous and zeroed. Slices of T
// (blockIdx.y) keep the grid full when N * D is small and T long.
template <typename scalar_t, typename acc_t>
__global__ void sum_t_kernel(const scalar_t* __restrict__ g, int64_t s0, int64_t s1, int64_t s2, int64_t N, int64_t T,
                             int64_t D, int64_t t_chunk, acc_t* __restrict__ out) {
  const int64_t dblocks = (D + blockDim.x - 1) / blockDim.x;
  const int64_t t0 = blockIdx.y * t_chunk, t1 = imin(T, t0 + t_chunk);
  for (int64_t b = blockIdx.x; b < N * dblocks; b += gridDim.x) {
    const int64_t n = b / dblocks, o = (b % dblocks) * blockDim.x + threadIdx.x;
    if (o >= D) continue;
    const scalar_t* src = g + n * s0 + o * s2;
    acc_t v = acc_t(0);
    for (int64_t t = t0; t < t1; ++t) v += static_cast<acc_t>(src[t * s1]);
    atomicAdd(out + n * D + o, v);
  }
}

// out[r] += sum_k x[r, k]^2 for a contiguous (rows, len) x; each row is cut into segments of `seg` for the grid.
template <typename acc_t>
__global__ void sumsq_rows_kernel(const acc_t* __restrict__ x, int64_t rows, int64_t len, int64_t seg,
                                  acc_t* __restrict__ out) {
  __shared__ acc_t shm[32];
  const int64_t splits = (len + seg - 1) / seg;
  for (int64_t b = blockIdx.x; b < rows * splits; b += gridDim.x) {
    const int64_t r = b / splits, k0 = (b % splits) * seg, k1 = imin(len, k0 + seg);
    acc_t v = acc_t(0);
    for (int64_t k = k0 + threadIdx.x; k < k1; k += blockDim.x) {
      const acc_t e = x[r * len + k];
      v += e * e;
    }
    v = block_sum(v, shm);
    if (threadIdx.x == 0) atomicAdd(out + r, v);
  }
}

// out[(e / width) * ldo + e % width] += sum_{n in slice y} x[n, e]^2 for a contiguous (N, L) x: the square-sum over
// samples of the empirical-Fisher diagonal. Slices of N (blockIdx.y) keep the grid full when L is small.
template <typename acc_t>
__global__ void sq_accum_kernel(const acc_t* __restrict__ x, int64_t N, int64_t L, int64_t width, int64_t ldo,
                                int64_t n_chunk, acc_t* __restrict__ out) {
  const int64_t n0 = blockIdx.y * n_chunk, n1 = imin(N, n0 + n_chunk);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < L; e += stride) {
    acc_t v = acc_t(0);
    for (int64_t n = n0; n < n1; ++n) {
      const acc_t u = x[n * L + e];
      v += u * u;
    }
    atomicAdd(out + (e / width) * ldo + e % width, v);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Host code
// ---------------------------------------------------------------------------------------------------------------

constexpr int64_t kMaxGrid = int64_t(1) << 30;  // kernels loop over their work, so the grid may be capped

int64_t ceil_div(int64_t x, int64_t y) { return (x + y - 1) / y; }

unsigned grid_of(int64_t blocks) { return static_cast<unsigned>(std::clamp<int64_t>(blocks, 1, kMaxGrid)); }

int64_t env_int(const char* name, int64_t fallback) {
  const char* s = std::getenv(name);
  if (s == nullptr || *s == '\0') return fallback;
  char* end = nullptr;
  const long long v = std::strtoll(s, &end, 10);
  TORCH_CHECK_VALUE(end != s && *end == '\0' && v >= 0, name, " must be a non-negative integer, got '", s, "'");
  return static_cast<int64_t>(v);
}

int64_t chunk_bytes() { return env_int("PYCURV_CUDA_CHUNK_BYTES", int64_t(256) << 20); }
int64_t fused_max_d() { return env_int("PYCURV_CUDA_FUSED_MAX_D", 4096); }

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

// Launches ghost_tile_kernel over all tiles of the flattened (N*T)-row problem; `out` must be zeroed for the
// grouped epilogues.
// The kernels below that add into their output with float atomicAdd give sums whose rounding depends on the order
// the blocks run in: under torch.use_deterministic_algorithms(True) they raise (or warn, with warn_only), as
// torch's own atomic kernels do. The Triton kernels use no atomics.
void alert_atomics(const char* what) { at::globalContext().alertNotDeterministic(what); }

void launch_ghost_tiles(const at::Tensor& a, const at::Tensor& g, bool bias, Epilogue epi, at::Tensor& out) {
  if (epi != kStore) alert_atomics("pycurv per-sample CUDA kernels (ghost tiles summed with atomicAdd)");
  const int64_t N = a.size(0), T = a.size(1);
  const int64_t R = N * T, row_tiles = ceil_div(R, kTile);
  const int64_t band = 2 + ceil_div(T, kTile);  // a superset of the column tiles a row tile's samples reach
  const int64_t num_tiles = epi == kGroupDiag ? row_tiles * band : row_tiles * (row_tiles + 1) / 2;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "pycurv_ghost_tiles", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    GhostArgs<scalar_t, acc_t> p;
    p.x = a.const_data_ptr<scalar_t>();
    p.xs0 = a.stride(0), p.xs1 = a.stride(1), p.xs2 = a.stride(2), p.dx = a.size(2);
    p.y = g.const_data_ptr<scalar_t>();
    p.ys0 = g.stride(0), p.ys1 = g.stride(1), p.ys2 = g.stride(2), p.dy = g.size(2);
    p.T = T, p.R = R, p.row_tiles = row_tiles, p.band = band, p.num_tiles = num_tiles;
    p.beta = bias ? acc_t(1) : acc_t(0);
    p.out = out.mutable_data_ptr<acc_t>();
    p.ldo = epi == kGroupDiag ? 1 : N;
    const unsigned grid = grid_of(num_tiles);
    switch (epi) {
      case kStore:
        ghost_tile_kernel<scalar_t, acc_t, kStore><<<grid, kThreads, 0, stream()>>>(p);
        break;
      case kGroupSum:
        ghost_tile_kernel<scalar_t, acc_t, kGroupSum><<<grid, kThreads, 0, stream()>>>(p);
        break;
      case kGroupDiag:
        ghost_tile_kernel<scalar_t, acc_t, kGroupDiag><<<grid, kThreads, 0, stream()>>>(p);
        break;
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// (N, d_out) contiguous tensor of sum_t g[n, t, :] in the accumulation dtype.
at::Tensor bias_sums(const at::Tensor& g) {
  alert_atomics("pycurv per-sample CUDA kernels (bias sums with atomicAdd)");
  const int64_t N = g.size(0), T = g.size(1), D = g.size(2);
  at::Tensor out = at::zeros({N, D}, g.options().dtype(acc_dtype(g.scalar_type())));
  if (N == 0 || T == 0 || D == 0) return out;
  constexpr int threads = 128;
  const int64_t blocks = N * ceil_div(D, threads);
  const int64_t want = std::clamp<int64_t>(ceil_div(2048, blocks), 1, std::min<int64_t>(ceil_div(T, 32), 65535));
  const int64_t t_chunk = ceil_div(T, want);
  const dim3 grid(grid_of(blocks), static_cast<unsigned>(ceil_div(T, t_chunk)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "pycurv_bias_sums", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    sum_t_kernel<scalar_t, acc_t><<<grid, threads, 0, stream()>>>(g.const_data_ptr<scalar_t>(), g.stride(0),
                                                                  g.stride(1), g.stride(2), N, T, D, t_chunk,
                                                                  out.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// out[r] += ||x[r]||^2 for a contiguous (rows, len) x of out's dtype.
void add_row_sqnorms(const at::Tensor& x, at::Tensor& out) {
  alert_atomics("pycurv per-sample CUDA kernels (row norms with atomicAdd)");
  const int64_t rows = x.size(0), len = x.numel() / std::max<int64_t>(rows, 1);
  if (rows == 0 || len == 0) return;
  constexpr int threads = 256;
  constexpr int64_t seg = 16 * 1024;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pycurv_row_sqnorms", [&] {
    sumsq_rows_kernel<scalar_t><<<grid_of(rows * ceil_div(len, seg)), threads, 0, stream()>>>(
        x.const_data_ptr<scalar_t>(), rows, len, seg, out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// dst[(e / width) * ldo + e % width] += sum_n x[n, e]^2 for a contiguous (N, L) x; dst points into a tensor of x's
// dtype that holds those elements.
void add_sample_squares(const at::Tensor& x, int64_t width, int64_t ldo, void* dst) {
  alert_atomics("pycurv per-sample CUDA kernels (squares summed with atomicAdd)");
  const int64_t N = x.size(0), L = x.numel() / std::max<int64_t>(N, 1);
  if (N == 0 || L == 0) return;
  constexpr int threads = 256;
  const int64_t xblocks = std::min<int64_t>(ceil_div(L, threads), kMaxGrid);
  const int64_t want = std::clamp<int64_t>(ceil_div(2048, xblocks), 1, std::min<int64_t>(ceil_div(N, 16), 65535));
  const int64_t n_chunk = ceil_div(N, want);
  const dim3 grid(grid_of(xblocks), static_cast<unsigned>(ceil_div(N, n_chunk)));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pycurv_sample_squares", [&] {
    sq_accum_kernel<scalar_t><<<grid, threads, 0, stream()>>>(x.const_data_ptr<scalar_t>(), N, L, width, ldo,
                                                             n_chunk, static_cast<scalar_t*>(dst));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Calls fn(o0, rows, Gc) for consecutive chunks of d_out rows, Gc = (N, rows, d_in) contiguous in the
// accumulation dtype with Gc[n] = G_n[o0 : o0 + rows, :]. The chunk keeps Gc within PYCURV_CUDA_CHUNK_BYTES.
template <typename Fn>
void for_each_grad_chunk(const at::Tensor& a, const at::Tensor& g, Fn&& fn) {
  const int64_t N = a.size(0), din = a.size(2), dout = g.size(2);
  if (din == 0 || dout == 0) return;
  const auto acc = acc_dtype(a.scalar_type());
  const at::Tensor ac = a.to(acc);
  const int64_t per_row = N * din * static_cast<int64_t>(c10::elementSize(acc));
  const int64_t rows = std::clamp<int64_t>(chunk_bytes() / per_row, 1, dout);
  for (int64_t o0 = 0; o0 < dout; o0 += rows) {
    const int64_t c = std::min(rows, dout - o0);
    const at::Tensor gc = g.narrow(2, o0, c).to(acc);                  // (N, T, c)
    const at::Tensor Gc = at::bmm(gc.transpose(1, 2), ac).contiguous();  // (N, c, d_in)
    fn(o0, c, Gc);
  }
}

// Ghost Gram through cuBLAS for wide layers, block by block of samples (I, J), J >= I, mirrored:
// K[I, J] = blocksum((X_I X_J^T + beta) * Y_I Y_J^T). The two (|I| T, |J| T) products stay within
// PYCURV_CUDA_CHUNK_BYTES (one pair of samples at least).
at::Tensor ghost_gram_blas(const at::Tensor& a, const at::Tensor& g, bool bias) {
  const int64_t N = a.size(0), T = a.size(1);
  const auto acc = acc_dtype(a.scalar_type());
  const at::Tensor xf = a.reshape({N * T, a.size(2)}).to(acc);
  const at::Tensor yf = g.reshape({N * T, g.size(2)}).to(acc);
  at::Tensor k = at::empty({N, N}, a.options().dtype(acc));
  const int64_t per_pair = 2 * T * T * static_cast<int64_t>(c10::elementSize(acc));  // two (T, T) blocks
  const auto step = std::clamp<int64_t>(
      static_cast<int64_t>(std::sqrt(static_cast<double>(chunk_bytes() / per_pair))), 1, N);
  for (int64_t i0 = 0; i0 < N; i0 += step) {
    const int64_t ci = std::min(step, N - i0);
    const at::Tensor xi = xf.narrow(0, i0 * T, ci * T), yi = yf.narrow(0, i0 * T, ci * T);
    for (int64_t j0 = i0; j0 < N; j0 += step) {
      const int64_t cj = std::min(step, N - j0);
      at::Tensor kx = at::mm(xi, xf.narrow(0, j0 * T, cj * T).t());
      const at::Tensor ky = at::mm(yi, yf.narrow(0, j0 * T, cj * T).t());
      if (bias) kx.add_(1);
      kx.mul_(ky);
      const at::Tensor blk = kx.view({ci, T, cj, T}).sum({1, 3});
      k.narrow(0, i0, ci).narrow(1, j0, cj).copy_(blk);
      if (j0 != i0) k.narrow(0, j0, cj).narrow(1, i0, ci).copy_(blk.t());
    }
  }
  return k;
}

at::Tensor per_sample_grad_sqnorms_cuda(const at::Tensor& a, const at::Tensor& g, bool bias,
                                        c10::string_view method) {
  constexpr const char* op = "per_sample_grad_sqnorms";
  check_ag(a, g, op);
  const bool ghost = parse_method_is_ghost(method, op);
  const c10::cuda::CUDAGuard guard(a.device());
  const at::NoTF32Guard no_tf32;
  const int64_t N = a.size(0), T = a.size(1), din = a.size(2), dout = g.size(2);
  at::Tensor s = at::zeros({N}, a.options().dtype(acc_dtype(a.scalar_type())));
  if (N == 0 || T == 0) return s;
  if (ghost && T == 1) {
    const int64_t widest = std::max(din, dout);
    const int threads = widest <= 128 ? 32 : widest <= 256 ? 64 : widest <= 512 ? 128 : 256;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "pycurv_sqnorms_rank1", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      sqnorm_rank1_kernel<scalar_t, acc_t><<<grid_of(N), threads, 0, stream()>>>(
          a.const_data_ptr<scalar_t>(), a.stride(0), a.stride(2), din, g.const_data_ptr<scalar_t>(), g.stride(0),
          g.stride(2), dout, N, bias ? acc_t(1) : acc_t(0), s.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  } else if (ghost) {
    launch_ghost_tiles(a, g, bias, kGroupDiag, s);
  } else {
    for_each_grad_chunk(a, g, [&](int64_t, int64_t, const at::Tensor& gc) { add_row_sqnorms(gc, s); });
    if (bias) add_row_sqnorms(bias_sums(g), s);
  }
  return s;
}

at::Tensor per_sample_gram_cuda(const at::Tensor& a, const at::Tensor& g, bool bias, c10::string_view method) {
  constexpr const char* op = "per_sample_gram";
  check_ag(a, g, op);
  const bool ghost = parse_method_is_ghost(method, op);
  const c10::cuda::CUDAGuard guard(a.device());
  const at::NoTF32Guard no_tf32;
  const int64_t N = a.size(0), T = a.size(1), din = a.size(2), dout = g.size(2);
  const auto opts = a.options().dtype(acc_dtype(a.scalar_type()));
  if (N == 0 || T == 0) return at::zeros({N, N}, opts);
  if (ghost) {
    if (din + dout > fused_max_d()) return ghost_gram_blas(a, g, bias);
    // T == 1 writes every entry exactly once; T > 1 accumulates block sums atomically.
    at::Tensor k = T == 1 ? at::empty({N, N}, opts) : at::zeros({N, N}, opts);
    launch_ghost_tiles(a, g, bias, T == 1 ? kStore : kGroupSum, k);
    return k;
  }
  at::Tensor k = at::zeros({N, N}, opts);
  for_each_grad_chunk(a, g, [&](int64_t, int64_t rows, const at::Tensor& gc) {
    const at::Tensor j = gc.view({N, rows * din});
    k.addmm_(j, j.t());
  });
  if (bias) {
    const at::Tensor gs = bias_sums(g);
    k.addmm_(gs, gs.t());
  }
  return k;
}

at::Tensor ef_diag_cuda(const at::Tensor& a, const at::Tensor& g, bool bias) {
  constexpr const char* op = "ef_diag";
  check_ag(a, g, op);
  const c10::cuda::CUDAGuard guard(a.device());
  const at::NoTF32Guard no_tf32;
  const int64_t N = a.size(0), T = a.size(1), din = a.size(2), dout = g.size(2);
  const auto acc = acc_dtype(a.scalar_type());
  const int64_t ldo = din + (bias ? 1 : 0);
  at::Tensor out = at::zeros({dout, ldo}, a.options().dtype(acc));
  if (N == 0 || T == 0 || dout == 0) return out;
  char* base = static_cast<char*>(out.mutable_data_ptr());
  const int64_t esize = static_cast<int64_t>(c10::elementSize(acc));
  if (T == 1) {
    // G_n = g_n a_n^T is rank one, so sum_n G_n^2 = (g^2)^T (a^2): one GEMM.
    if (din > 0) {
      at::Tensor w = bias ? out.narrow(1, 0, din) : out;
      at::mm_out(w, g.select(1, 0).to(acc).square().t(), a.select(1, 0).to(acc).square());
    }
  } else {
    for_each_grad_chunk(a, g, [&](int64_t o0, int64_t, const at::Tensor& gc) {
      add_sample_squares(gc.view({N, -1}), din, ldo, base + o0 * ldo * esize);
    });
  }
  if (bias) add_sample_squares(bias_sums(g), 1, ldo, base + din * esize);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pycurv, CUDA, m) {
  m.impl("per_sample_grad_sqnorms", &per_sample_grad_sqnorms_cuda);
  m.impl("per_sample_gram", &per_sample_gram_cuda);
  m.impl("ef_diag", &ef_diag_cuda);
}

}  // namespace pycurv
