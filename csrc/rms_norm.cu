// RMSNorm forward and backward (Hugging Face LlamaRMSNorm semantics), with the fused residual add.
// The math and the rounding points are those of solar_kernels/ops/rms_norm.py:
//   rstd = rsqrt(mean(h^2) + eps),  y = w * to_T(h * rstd),  h = to_T(x + residual) or x
//   dx = rstd * (g - n * mean(g * n)) (+ dh),  dw = sum over rows of dy * n,  n = h * rstd, g = dy * w
// One block per row in forward; a persistent grid in backward, each block owning a range of rows
// and one fp32 row of dweight partial sums (no atomics), reduced by a second small kernel.
#include <cmath>

#include "common.cuh"
#include "launch.h"

namespace solar {
namespace {

// Vectors (16 bytes, or single elements on the scalar path) one thread keeps in registers between
// the two passes over a row; columns past them are re-read (from L2) in the second pass. Starting
// points, to be measured by benchmarks/gpu_check.sh: 4 in forward (32
// fp32 registers for bf16); 2 in backward, which also keeps dy and the dweight accumulator.
constexpr int kFwdCached = 4;
constexpr int kBwdCached = 2;
// Threads per block at most. Forward: with kFwdCached packs per thread, 1024 threads hold a bf16
// row of 32768 in registers (d = 4096 takes 128 threads). Backward: 512, so ptxas may use 128
// registers per thread (the 16-bit vector kernels spilled at 1024's cap of 64). Starting points,
// to be measured by benchmarks/gpu_check.sh.
constexpr int kFwdMaxThreads = 1024;
constexpr int kBwdMaxThreads = 512;

// 1 / sqrt(a) in fp32 to about half an ulp: IEEE sqrt and division, then one Newton step whose
// residual 1 - a * r^2 is taken with FMAs on r^2 split exactly into hi + lo. rsqrtf's 2-ulp error
// would be amplified by the backward's cancellation (g - n * mean(g * n)) on narrow rows (d = 1
// failed the tests with 1 / sqrtf alone), and the double rsqrt used before compiled to 48 fp64
// instructions per row (a serial fp64 division and rsqrt with their fix-ups).
__device__ __forceinline__ float accurate_rsqrt(float a) {
  const float r = 1.f / sqrtf(a);
  if (!(r > 0.f && r < INFINITY)) return r;  // a = 0, inf or NaN: nothing to refine
  const float r2 = r * r;
  const float r2_lo = fmaf(r, r, -r2);
  const float residual = fmaf(-a, r2_lo, fmaf(-a, r2, 1.f));
  return fmaf(0.5f * r, residual, r);
}

// One pack of the normalized input at column col: x, or h = to_T(x + residual), which is also
// stored (rounded to T, as the unfused model holds it) and returned rounded the same way.
template <typename T, int VEC, bool RESIDUAL>
__device__ __forceinline__ void load_input(const T* x, const T* residual, T* h, int64_t col, float (&out)[VEC]) {
  load_pack<VEC>(x + col, out);
  if constexpr (RESIDUAL) {
    float r[VEC];
    load_pack<VEC>(residual + col, r);
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] += r[i];
    store_pack<VEC>(h + col, out);
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = round_to<T>(out[i]);
  }
}

// y = w * to_T(h * rstd), rounded to T: the two roundings of Hugging Face.
template <typename T, typename W, int VEC>
__device__ __forceinline__ void store_normed(const float (&h)[VEC], float rstd, const W* weight, T* y, int64_t col) {
  float w[VEC];
  load_pack<VEC>(weight + col, w);
  float out[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = round_to<T>(h[i] * rstd) * w[i];
  store_pack<VEC>(y + col, out);
}

// body(k, v) for each pack k < CACHED that this thread keeps in registers, v = threadIdx.x + k * step
// its index in the row, where it lies inside the row's n_vecs packs (unrolled: k is a constant).
template <int CACHED, typename Body>
__device__ __forceinline__ void for_cached_packs(int64_t step, int64_t n_vecs, Body&& body) {
#pragma unroll
  for (int k = 0; k < CACHED; ++k) {
    const int64_t v = threadIdx.x + k * step;
    if (v < n_vecs) body(k, v);
  }
}

template <typename T, typename W, int VEC, bool RESIDUAL>
__global__ void __launch_bounds__(kFwdMaxThreads) rms_norm_fwd_kernel(const RmsNormFwd<T, W> p) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const T* x = p.x + row * p.stride_x;
  const T* residual = RESIDUAL ? p.residual + row * p.stride_residual : nullptr;
  T* h = RESIDUAL ? p.h + row * p.stride_h : nullptr;
  T* y = p.y + row * p.stride_y;
  const int64_t n_vecs = p.n_cols / VEC;
  const int64_t step = blockDim.x;

  float cached[kFwdCached][VEC];
  float sum_sq = 0.f;
  for_cached_packs<kFwdCached>(step, n_vecs, [&](int k, int64_t v) {
    load_input<T, VEC, RESIDUAL>(x, residual, h, v * VEC, cached[k]);
#pragma unroll
    for (int i = 0; i < VEC; ++i) sum_sq += cached[k][i] * cached[k][i];
  });
  for (int64_t v = threadIdx.x + kFwdCached * step; v < n_vecs; v += step) {
    float vals[VEC];
    load_input<T, VEC, RESIDUAL>(x, residual, h, v * VEC, vals);
#pragma unroll
    for (int i = 0; i < VEC; ++i) sum_sq += vals[i] * vals[i];
  }
  const float mean_sq = block_sum(sum_sq, scratch) / static_cast<float>(p.n_cols);
  const float rstd = accurate_rsqrt(mean_sq + p.eps);
  if (threadIdx.x == 0) p.rstd[row] = rstd;

  for_cached_packs<kFwdCached>(step, n_vecs,
                               [&](int k, int64_t v) { store_normed<T, W, VEC>(cached[k], rstd, p.weight, y, v * VEC); });
  // Wide rows: re-read what did not fit in registers (h was written by this same thread).
  for (int64_t v = threadIdx.x + kFwdCached * step; v < n_vecs; v += step) {
    float vals[VEC];
    load_pack<VEC>((RESIDUAL ? h : x) + v * VEC, vals);
    store_normed<T, W, VEC>(vals, rstd, p.weight, y, v * VEC);
  }
}

template <typename T, typename W, int VEC, bool HAS_DH>
__global__ void __launch_bounds__(kBwdMaxThreads) rms_norm_bwd_kernel(const RmsNormBwd<T, W> p, int64_t rows_per_block) {
  __shared__ float scratch[32];
  const int64_t n_vecs = p.n_cols / VEC;
  const int64_t step = blockDim.x;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int64_t row_end = row_begin + rows_per_block < p.n_rows ? row_begin + rows_per_block : p.n_rows;
  float* partial = p.dweight_partial + static_cast<int64_t>(blockIdx.x) * p.n_cols;

  // dweight for this thread's columns, summed over the block's rows: in registers for the cached
  // columns, in the block's own partial row for the rest (zeroed first; no other block touches it).
  float dw[kBwdCached][VEC];
#pragma unroll
  for (int k = 0; k < kBwdCached; ++k)
#pragma unroll
    for (int i = 0; i < VEC; ++i) dw[k][i] = 0.f;
  for (int64_t v = threadIdx.x + kBwdCached * step; v < n_vecs; v += step) {
    float zero[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) zero[i] = 0.f;
    store_pack<VEC>(partial + v * VEC, zero);
  }

  for (int64_t row = row_begin; row < row_end; ++row) {
    const float rstd = p.rstd[row];
    const T* dy_row = p.dy + row * p.stride_dy;
    const T* x_row = p.x + row * p.stride_x;
    T* dx_row = p.dx + row * p.stride_dx;
    const T* dh_row = HAS_DH ? p.dh + row * p.stride_dh : nullptr;

    float dy_cached[kBwdCached][VEC];
    float n_cached[kBwdCached][VEC];
    float sum_gn = 0.f;
    for_cached_packs<kBwdCached>(step, n_vecs, [&](int k, int64_t v) {
      float w[VEC];
      load_pack<VEC>(dy_row + v * VEC, dy_cached[k]);
      load_pack<VEC>(x_row + v * VEC, n_cached[k]);
      load_pack<VEC>(p.weight + v * VEC, w);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        n_cached[k][i] *= rstd;
        sum_gn += dy_cached[k][i] * w[i] * n_cached[k][i];
      }
    });
    for (int64_t v = threadIdx.x + kBwdCached * step; v < n_vecs; v += step) {
      float dy[VEC], x[VEC], w[VEC];
      load_pack<VEC>(dy_row + v * VEC, dy);
      load_pack<VEC>(x_row + v * VEC, x);
      load_pack<VEC>(p.weight + v * VEC, w);
#pragma unroll
      for (int i = 0; i < VEC; ++i) sum_gn += dy[i] * w[i] * x[i] * rstd;
    }
    const float mean_gn = block_sum(sum_gn, scratch) / static_cast<float>(p.n_cols);

    for_cached_packs<kBwdCached>(step, n_vecs, [&](int k, int64_t v) {
      float w[VEC], dx[VEC];
      load_pack<VEC>(p.weight + v * VEC, w);
      if constexpr (HAS_DH) load_pack<VEC>(dh_row + v * VEC, dx);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float value = rstd * (dy_cached[k][i] * w[i] - n_cached[k][i] * mean_gn);
        dx[i] = HAS_DH ? dx[i] + value : value;
        dw[k][i] += dy_cached[k][i] * n_cached[k][i];
      }
      store_pack<VEC>(dx_row + v * VEC, dx);
    });
    for (int64_t v = threadIdx.x + kBwdCached * step; v < n_vecs; v += step) {
      float dy[VEC], n[VEC], w[VEC], dx[VEC], acc[VEC];
      load_pack<VEC>(dy_row + v * VEC, dy);
      load_pack<VEC>(x_row + v * VEC, n);
      load_pack<VEC>(p.weight + v * VEC, w);
      load_pack<VEC>(partial + v * VEC, acc);
      if constexpr (HAS_DH) load_pack<VEC>(dh_row + v * VEC, dx);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        n[i] *= rstd;
        const float value = rstd * (dy[i] * w[i] - n[i] * mean_gn);
        dx[i] = HAS_DH ? dx[i] + value : value;
        acc[i] += dy[i] * n[i];
      }
      store_pack<VEC>(dx_row + v * VEC, dx);
      store_pack<VEC>(partial + v * VEC, acc);
    }
  }
  for_cached_packs<kBwdCached>(step, n_vecs, [&](int k, int64_t v) { store_pack<VEC>(partial + v * VEC, dw[k]); });
}

// dweight[col] = sum over blocks of partial[block, col], in fp32, in a fixed order (deterministic),
// in two levels: the partial rows are cut into groups of `group` rows, and column_sum_groups_kernel
// (grid: column blocks x groups) sums each group into its first row, in place (no other block reads
// those rows); column_sum_kernel then sums the groups' first rows. One level was 16 blocks for
// d = 4096, each thread summing 528 rows (132 SMs x 4) serially: 20-60 us next to a backward whose
// floor is ~94 us (16K x 4096 bf16 on an H100); with groups of ~sqrt(rows), the first level is 16 x
// 23 = 368 blocks of 23 rows each, and the second 23 rows.
__global__ void column_sum_groups_kernel(float* __restrict__ partial, int64_t n_parts, int64_t n_cols, int64_t group) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= n_cols) return;
  const int64_t first = static_cast<int64_t>(blockIdx.y) * group;
  const int64_t last = first + group < n_parts ? first + group : n_parts;
  float sum = 0.f;
  for (int64_t part = first; part < last; ++part) sum += partial[part * n_cols + col];
  partial[first * n_cols + col] = sum;
}

template <typename W>
__global__ void column_sum_kernel(const float* __restrict__ partial, W* __restrict__ out, int64_t n_parts, int64_t n_cols,
                                  int64_t group) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= n_cols) return;
  float sum = 0.f;
  for (int64_t part = 0; part < n_parts; part += group) sum += partial[part * n_cols + col];
  out[col] = from_float<W>(sum);
}

// Columns per block of the partial-sum reduction: 256 threads, one column each, reading rows of
// the workspace coalesced.
constexpr int kColumnSumThreads = 256;

// Rows per group of the two-level column sum: ceil(sqrt(n_parts)), so both levels are short.
inline int64_t column_sum_group(int64_t n_parts) {
  int64_t group = 1;
  while (group * group < n_parts) ++group;
  return group;
}

template <typename T, typename W>
bool fwd_vectorizable(const RmsNormFwd<T, W>& p) {
  constexpr int VEC = 16 / sizeof(T);
  return p.n_cols % VEC == 0 && rows_vectorizable<VEC>(p.x, p.stride_x) &&
         rows_vectorizable<VEC>(p.residual, p.stride_residual) && rows_vectorizable<VEC>(p.y, p.stride_y) &&
         (p.residual == nullptr || rows_vectorizable<VEC>(p.h, p.stride_h)) && is_aligned(p.weight, sizeof(W) * VEC);
}

template <typename T, typename W>
bool bwd_vectorizable(const RmsNormBwd<T, W>& p) {
  constexpr int VEC = 16 / sizeof(T);
  return p.n_cols % VEC == 0 && rows_vectorizable<VEC>(p.dy, p.stride_dy) && rows_vectorizable<VEC>(p.x, p.stride_x) &&
         rows_vectorizable<VEC>(p.dh, p.stride_dh) && rows_vectorizable<VEC>(p.dx, p.stride_dx) &&
         is_aligned(p.weight, sizeof(W) * VEC);
}

template <typename T, typename W, int VEC>
cudaError_t fwd(const RmsNormFwd<T, W>& p, cudaStream_t stream) {
  const int threads = threads_for(p.n_cols / VEC, kFwdCached, kFwdMaxThreads);
  const dim3 grid(static_cast<unsigned>(p.n_rows));
  if (p.residual != nullptr) {
    rms_norm_fwd_kernel<T, W, VEC, true><<<grid, threads, 0, stream>>>(p);
  } else {
    rms_norm_fwd_kernel<T, W, VEC, false><<<grid, threads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

template <typename T, typename W>
int bwd_threads(const RmsNormBwd<T, W>& p) {
  const int vec = bwd_vectorizable(p) ? 16 / sizeof(T) : 1;
  return threads_for(p.n_cols / vec, kBwdCached, kBwdMaxThreads);
}

template <typename T, typename W, int VEC>
cudaError_t bwd(const RmsNormBwd<T, W>& p, cudaStream_t stream) {
  const int threads = bwd_threads(p);
  const int64_t rows_per_block = (p.n_rows + p.blocks - 1) / p.blocks;
  const unsigned blocks = static_cast<unsigned>(p.blocks);
  if (p.dh != nullptr) {
    rms_norm_bwd_kernel<T, W, VEC, true><<<blocks, threads, 0, stream>>>(p, rows_per_block);
  } else {
    rms_norm_bwd_kernel<T, W, VEC, false><<<blocks, threads, 0, stream>>>(p, rows_per_block);
  }
  cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) return error;
  const unsigned column_blocks = static_cast<unsigned>((p.n_cols + kColumnSumThreads - 1) / kColumnSumThreads);
  const int64_t group = column_sum_group(p.blocks);
  const dim3 group_grid(column_blocks, static_cast<unsigned>((p.blocks + group - 1) / group));
  column_sum_groups_kernel<<<group_grid, kColumnSumThreads, 0, stream>>>(p.dweight_partial, p.blocks, p.n_cols, group);
  error = cudaGetLastError();
  if (error != cudaSuccess) return error;
  column_sum_kernel<W><<<column_blocks, kColumnSumThreads, 0, stream>>>(p.dweight_partial, p.dweight, p.blocks, p.n_cols,
                                                                         group);
  return cudaGetLastError();
}

}  // namespace

template <typename T, typename W>
int64_t rms_norm_bwd_blocks(const RmsNormBwd<T, W>& p) {
  // A persistent grid of about 1024 resident threads per SM (half of what sm_80 and sm_90 hold):
  // enough 16-byte loads in flight to cover HBM latency, while the fp32 workspace (one row per
  // block, written once and read once by the column sum) stays near 4 x SMs x d floats, as the
  // Triton kernel's 4 programs per SM. A starting point, to be measured by gpu_check.sh.
  const int64_t per_sm = 1024 / bwd_threads(p);
  int64_t sms = current_sm_count();
  if (sms <= 0) sms = 1;
  const int64_t blocks = sms * (per_sm > 0 ? per_sm : 1);
  return blocks < p.n_rows ? blocks : (p.n_rows > 0 ? p.n_rows : 1);
}

template <typename T, typename W>
cudaError_t launch_rms_norm_fwd(const RmsNormFwd<T, W>& p, cudaStream_t stream) {
  if (p.n_rows == 0) return cudaSuccess;
  if (fwd_vectorizable(p)) return fwd<T, W, 16 / sizeof(T)>(p, stream);
  return fwd<T, W, 1>(p, stream);
}

template <typename T, typename W>
cudaError_t launch_rms_norm_bwd(const RmsNormBwd<T, W>& p, cudaStream_t stream) {
  if (p.n_cols == 0) return cudaSuccess;
  if (p.blocks <= 0) return cudaErrorInvalidValue;  // the workspace has one row per block
  if (bwd_vectorizable(p)) return bwd<T, W, 16 / sizeof(T)>(p, stream);
  return bwd<T, W, 1>(p, stream);
}

#define SOLAR_INSTANTIATE_RMS_NORM(T, W)                                              \
  template int64_t rms_norm_bwd_blocks<T, W>(const RmsNormBwd<T, W>&);               \
  template cudaError_t launch_rms_norm_fwd<T, W>(const RmsNormFwd<T, W>&, cudaStream_t); \
  template cudaError_t launch_rms_norm_bwd<T, W>(const RmsNormBwd<T, W>&, cudaStream_t);

SOLAR_INSTANTIATE_RMS_NORM(float, float)
SOLAR_INSTANTIATE_RMS_NORM(__half, __half)
SOLAR_INSTANTIATE_RMS_NORM(__half, float)
SOLAR_INSTANTIATE_RMS_NORM(__nv_bfloat16, __nv_bfloat16)
SOLAR_INSTANTIATE_RMS_NORM(__nv_bfloat16, float)

}  // namespace solar
