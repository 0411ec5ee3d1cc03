// CUDA kernels of the K-FAC family (MATH.md section 2): damped_inverse, method "cholesky".
//
// (m + lambda_b I)^{-1} for a batch of B small or medium symmetric matrices (many K-FAC factors of one size) in
// one launch, where torch.linalg runs a solver per matrix. Each matrix lives in shared memory and is owned by one
// thread block, or by one warp when d <= 32 and the batch is large enough to fill the device with blocks of
// kWarpTeams matrices. The factorisation is Cholesky's square-root-free form
//     m + lambda I = M P M^T,    M unit lower triangular, P = diag(p_0 .. p_{d-1}),    L = M P^{1/2},
// so the pivots p_k = L_kk^2 are positive exactly when Cholesky succeeds, and (m + lambda I)^{-1} = V^T P^{-1} V
// with V = M^{-1} = P^{1/2} L^{-1}. One sweep of d steps, one barrier each, does both triangular stages:
//     step k: pivot p_k = S[k][k]; if !(p_k > 0), info = k + 1 and stop;
//             S[i][j] -= S[i][k] S[j][k] / p_k   for k < j <= i       (right-looking update of the lower triangle)
//             V[i][j] -= M[i][k] V[k][j]          for j <= k < i       (outer-product substitution, V[k][k] = 1)
// V is kept transposed in the strict upper triangle (V[i][j] at S[j][i]). Both updates read only column k and
// write disjoint regions, so they share the step's barrier. Then, for i >= j,
//     inv[i][j] = sum_{x >= i} V[x][i] V[x][j] / p_x,
// is formed into the lower triangle and written out mirrored: the result is exactly symmetric. Only the lower
// triangle of m is read. Arithmetic is in m's dtype (float32 or float64). A matrix that is not positive definite
// gets the identity as its (finite) output and info = the order of its first non-positive pivot; the caller
// raises its damping. The shared-memory row pitch is odd, so column walks hit distinct banks.
//
// Larger matrices, or ones that do not fit the device's shared memory, go through ATen's batched
// linalg_cholesky_ex + cholesky_inverse with the same info, identity-on-failure and symmetrisation.
//
// Tuning knob (read at every call): PYCURV_CUDA_INV_MAX_D is the largest d inverted by the shared-memory kernel
// (default and upper bound kMaxKernelD; 0 sends every size to ATen).
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/cholesky_inverse.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/eye.h>
#include <ATen/ops/linalg_cholesky_ex.h>
#include <ATen/ops/where.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "pycurv.h"

namespace pycurv {
namespace {

// ---------------------------------------------------------------------------------------------------------------
// Device code
// ---------------------------------------------------------------------------------------------------------------

constexpr int kWarp = 32;
constexpr int kMaxWarps = 16;   // largest block of the block-per-matrix kernel
constexpr int kWarpTeams = 4;   // matrices (one per warp) in a block of the warp-per-matrix kernel
constexpr int kMaxKernelD = 192;  // the widest kernel instantiation: kChunks = 6

// Row pitch of a matrix in shared memory: odd, so a warp walking down a column touches 32 distinct banks (and
// 16 distinct bank pairs for float64).
__host__ __device__ constexpr int padded_ld(int d) { return d | 1; }

// Shared elements per matrix: the matrix and the reciprocal pivots.
__host__ __device__ constexpr int64_t team_elems(int d) { return int64_t(d) * padded_ld(d) + d; }

template <bool kWarpTeam>
__device__ __forceinline__ void team_sync() {
  if constexpr (kWarpTeam) {
    __syncwarp();
  } else {
    __syncthreads();
  }
}

// out[b] = (m[b] + damping[b] I)^{-1}, info[b] as in the file comment, for contiguous (B, d, d) m and out and
// d <= 32 kChunks. A team (the block, or one warp when kWarpTeam) inverts matrices b = team, team + teams, ...:
// warp w of the team's wp warps takes rows w, w + wp, ..., its lanes take the columns 32 apart.
template <typename scalar_t, int kChunks, bool kWarpTeam>
__global__ void __launch_bounds__(kWarp * kMaxWarps)
    damped_inverse_kernel(const scalar_t* __restrict__ m, const double* __restrict__ damping, int64_t B, int d,
                          scalar_t* __restrict__ out, int* __restrict__ info) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int w = kWarpTeam ? 0 : warp;
  const int wp = kWarpTeam ? 1 : static_cast<int>(blockDim.x / kWarp);
  const int64_t team = kWarpTeam ? int64_t(blockIdx.x) * (blockDim.x / kWarp) + warp : int64_t(blockIdx.x);
  const int64_t teams = kWarpTeam ? int64_t(gridDim.x) * (blockDim.x / kWarp) : int64_t(gridDim.x);
  const int ld = padded_ld(d);
  scalar_t* S = reinterpret_cast<scalar_t*>(smem_raw) + (kWarpTeam ? warp * team_elems(d) : 0);
  scalar_t* rp = S + d * ld;  // rp[k] = 1 / p_k

  for (int64_t b = team; b < B; b += teams) {
    const scalar_t* a = m + b * d * d;
    scalar_t* o = out + b * d * d;
    team_sync<kWarpTeam>();  // the previous matrix's last reads of S are done
    const scalar_t lambda = static_cast<scalar_t>(damping[b]);
    for (int i = w; i < d; i += wp)
      for (int j = lane; j <= i; j += kWarp) S[i * ld + j] = i == j ? a[i * d + j] + lambda : a[i * d + j];
    team_sync<kWarpTeam>();

    int failed = 0;
    for (int k = 0; k < d; ++k) {
      const scalar_t p = S[k * ld + k];
      if (!(p > scalar_t(0))) {  // NaN fails too; every thread of the team reads the same p
        failed = k + 1;
        break;
      }
      const scalar_t r = scalar_t(1) / p;
      if (w == 0 && lane == 0) rp[k] = r;
      // c[cc] = M[x][k] for x = k + 1 + lane + 32 cc: the step's multipliers, both as columns j of the trailing
      // update and as rows x of the substitution.
      scalar_t c[kChunks];
#pragma unroll
      for (int cc = 0; cc < kChunks; ++cc) {
        const int x = k + 1 + lane + kWarp * cc;
        c[cc] = x < d ? S[x * ld + k] * r : scalar_t(0);
      }
      for (int i = k + 1 + w; i < d; i += wp) {
        const scalar_t l = S[i * ld + k];
#pragma unroll
        for (int cc = 0; cc < kChunks; ++cc) {
          if (k + 1 + kWarp * cc > i) break;  // warp-uniform: no column of this chunk is in the triangle
          const int j = k + 1 + lane + kWarp * cc;
          if (j <= i) S[i * ld + j] -= l * c[cc];
        }
      }
      for (int j = w; j <= k; j += wp) {
        const bool first = j == k;  // column k of V starts here: V[x][k] = -M[x][k]
        const scalar_t v = first ? scalar_t(1) : S[j * ld + k];
#pragma unroll
        for (int cc = 0; cc < kChunks; ++cc) {
          const int x = k + 1 + lane + kWarp * cc;
          if (k + 1 + kWarp * cc >= d) break;
          if (x < d) S[j * ld + x] = (first ? scalar_t(0) : S[j * ld + x]) - c[cc] * v;
        }
      }
      team_sync<kWarpTeam>();
    }

    if (failed) {
      for (int i = w; i < d; i += wp)
        for (int j = lane; j < d; j += kWarp) o[i * d + j] = i == j ? scalar_t(1) : scalar_t(0);
      if (w == 0 && lane == 0) info[b] = failed;
      continue;
    }

    // inv[i][j], j <= i, from the strict upper triangle (V) into the lower one, which is free now.
    for (int i = w; i < d; i += wp) {
      const scalar_t ri = rp[i];
      scalar_t acc[kChunks];
#pragma unroll
      for (int cc = 0; cc < kChunks; ++cc) {
        const int j = lane + kWarp * cc;
        acc[cc] = j < i ? ri * S[j * ld + i] : (j == i ? ri : scalar_t(0));
      }
      for (int x = i + 1; x < d; ++x) {
        const scalar_t u = S[i * ld + x] * rp[x];
#pragma unroll
        for (int cc = 0; cc < kChunks; ++cc) {
          if (kWarp * cc > i) break;
          const int j = lane + kWarp * cc;
          if (j <= i) acc[cc] += u * S[j * ld + x];
        }
      }
#pragma unroll
      for (int cc = 0; cc < kChunks; ++cc) {
        const int j = lane + kWarp * cc;
        if (j <= i) S[i * ld + j] = acc[cc];
      }
    }
    team_sync<kWarpTeam>();
    for (int i = w; i < d; i += wp)
      for (int j = lane; j < d; j += kWarp) o[i * d + j] = j <= i ? S[i * ld + j] : S[j * ld + i];
    if (w == 0 && lane == 0) info[b] = 0;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Host code
// ---------------------------------------------------------------------------------------------------------------

constexpr int64_t kMaxGrid = int64_t(1) << 30;  // the kernel loops over its matrices, so the grid may be capped
constexpr size_t kDefaultSmem = 48 * 1024;     // dynamic shared memory a kernel gets without opting in

int64_t ceil_div(int64_t x, int64_t y) { return (x + y - 1) / y; }

int64_t env_int(const char* name, int64_t fallback) {
  const char* s = std::getenv(name);
  if (s == nullptr || *s == '\0') return fallback;
  char* end = nullptr;
  const long long v = std::strtoll(s, &end, 10);
  TORCH_CHECK_VALUE(end != s && *end == '\0' && v >= 0, name, " must be a non-negative integer, got '", s, "'");
  return static_cast<int64_t>(v);
}

int device_attr(cudaDeviceAttr attr, int device) {
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, attr, device));
  return v;
}

template <typename scalar_t, int kChunks, bool kWarpTeam>
void launch_damped_inverse(const at::Tensor& m, const at::Tensor& damping, int64_t blocks, int threads,
                           size_t smem, at::Tensor& out, at::Tensor& info) {
  auto kernel = damped_inverse_kernel<scalar_t, kChunks, kWarpTeam>;
  if (smem > kDefaultSmem) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  const unsigned grid = static_cast<unsigned>(std::clamp<int64_t>(blocks, 1, kMaxGrid));
  kernel<<<grid, threads, smem, c10::cuda::getCurrentCUDAStream()>>>(
      m.const_data_ptr<scalar_t>(), damping.const_data_ptr<double>(), m.size(0), static_cast<int>(m.size(1)),
      out.mutable_data_ptr<scalar_t>(), info.mutable_data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ATen's batched Cholesky for matrices the kernel does not take; same contract as the kernel.
std::tuple<at::Tensor, at::Tensor> damped_inverse_aten(const at::Tensor& m, const at::Tensor& damping) {
  const int64_t B = m.size(0), d = m.size(1);
  at::Tensor md = m.clone();
  md.diagonal(0, 1, 2).add_(damping.to(m.scalar_type()).unsqueeze(1));
  auto [low, info] = at::linalg_cholesky_ex(md, /*upper=*/false, /*check_errors=*/false);
  low = at::where(info.gt(0).view({B, 1, 1}), at::eye(d, m.options()), low);
  at::Tensor inv = at::cholesky_inverse(low).tril_();
  inv.add_(inv.tril(-1).transpose(1, 2));
  return {inv.contiguous(), info.to(at::kInt)};  // cholesky_inverse returns column-major batches
}

std::tuple<at::Tensor, at::Tensor> damped_inverse_cuda(const at::Tensor& m, const at::Tensor& damping,
                                                       c10::string_view method) {
  constexpr const char* op = "damped_inverse";
  TORCH_CHECK_VALUE(method == "cholesky", op, ": the CUDA kernel implements method 'cholesky' only, got method '",
                    std::string(method), "'");
  TORCH_CHECK_VALUE(m.dim() == 3 && m.size(1) == m.size(2), op, ": m must be (B, d, d), got ", m.dim(),
                    "-d tensor of shape ", m.sizes());
  TORCH_CHECK_TYPE(m.scalar_type() == c10::kFloat || m.scalar_type() == c10::kDouble, op,
                   ": m must be float32/float64, got ", m.scalar_type());
  TORCH_CHECK_VALUE(m.is_cuda(), op, ": m must be a CUDA tensor, got one on ", m.device());
  TORCH_CHECK_VALUE(damping.dim() == 1 && damping.size(0) == m.size(0), op, ": damping must be (B,) = (",
                    m.size(0), ",), got ", damping.dim(), "-d tensor of shape ", damping.sizes());
  TORCH_CHECK_TYPE(damping.scalar_type() == c10::kDouble, op, ": damping must be float64, got ",
                   damping.scalar_type());
  TORCH_CHECK_VALUE(damping.device() == m.device(), op, ": damping must be on m's device ", m.device(), ", got ",
                    damping.device());
  const c10::cuda::CUDAGuard guard(m.device());
  const int64_t B = m.size(0), d = m.size(1);
  const at::Tensor mc = m.contiguous();
  const at::Tensor dc = damping.contiguous();
  at::Tensor out = at::empty({B, d, d}, m.options());
  at::Tensor info = at::empty({B}, m.options().dtype(at::kInt));
  if (B == 0) return {out, info};
  if (d == 0) return {out, info.zero_()};

  const int64_t max_d = std::min<int64_t>(env_int("PYCURV_CUDA_INV_MAX_D", kMaxKernelD), kMaxKernelD);
  if (d > max_d) return damped_inverse_aten(mc, dc);
  const int device = m.device().index();
  const bool warp_team = d <= kWarp && B >= int64_t(kWarpTeams) * device_attr(cudaDevAttrMultiProcessorCount, device);
  const size_t team_bytes = static_cast<size_t>(team_elems(static_cast<int>(d))) * mc.element_size();
  const size_t smem = warp_team ? kWarpTeams * team_bytes : team_bytes;
  if (smem > static_cast<size_t>(device_attr(cudaDevAttrMaxSharedMemoryPerBlockOptin, device))) {
    return damped_inverse_aten(mc, dc);
  }
  const int warps = static_cast<int>(std::clamp<int64_t>(ceil_div(d, 8), 2, kMaxWarps));
  AT_DISPATCH_FLOATING_TYPES(mc.scalar_type(), "pycurv_damped_inverse", [&] {
    if (warp_team) {
      launch_damped_inverse<scalar_t, 1, true>(mc, dc, ceil_div(B, kWarpTeams), kWarp * kWarpTeams, smem, out, info);
    } else if (d <= 2 * kWarp) {
      launch_damped_inverse<scalar_t, 2, false>(mc, dc, B, kWarp * warps, smem, out, info);
    } else if (d <= 4 * kWarp) {
      launch_damped_inverse<scalar_t, 4, false>(mc, dc, B, kWarp * warps, smem, out, info);
    } else {
      launch_damped_inverse<scalar_t, 6, false>(mc, dc, B, kWarp * warps, smem, out, info);
    }
  });
  return {out, info};
}

}  // namespace

TORCH_LIBRARY_IMPL(pycurv, CUDA, m) { m.impl("damped_inverse", &damped_inverse_cuda); }

}  // namespace pycurv
