// SwiGLU, y = silu(gate) * up, and its backward (sigmoid recomputed, not saved):
//   dup = dy * silu(gate),  dgate = dy * up * sigmoid(gate) * (1 + gate * (1 - sigmoid(gate)))
// Elementwise over rows [n_rows, n_cols] with row strides (the two halves of a fused gate/up
// projection are read in place). fp32 arithmetic, one rounding per output.
#include "common.cuh"
#include "launch.h"

namespace solar {
namespace {

// One pack per thread per step, 256 threads per block: 4 KB of each bf16 input per block-step;
// grid.y tiles the columns (grid-stride past 65535 blocks), grid.x the rows. A starting point, to
// be measured by benchmarks/gpu_check.sh.
constexpr int kThreads = 256;
constexpr int64_t kMaxColumnBlocks = 65535;

__device__ __forceinline__ float sigmoid(float g) { return 1.f / (1.f + expf(-g)); }

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) swiglu_fwd_kernel(const SwigluFwd<T> p) {
  const int64_t row = blockIdx.x;
  const T* gate = p.gate + row * p.stride_gate;
  const T* up = p.up + row * p.stride_up;
  T* y = p.y + row * p.stride_y;
  const int64_t n_vecs = p.n_cols / VEC;
  for (int64_t v = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; v < n_vecs;
       v += static_cast<int64_t>(gridDim.y) * blockDim.x) {
    float g[VEC], u[VEC], out[VEC];
    load_pack<VEC>(gate + v * VEC, g);
    load_pack<VEC>(up + v * VEC, u);
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = g[i] * sigmoid(g[i]) * u[i];
    store_pack<VEC>(y + v * VEC, out);
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) swiglu_bwd_kernel(const SwigluBwd<T> p) {
  const int64_t row = blockIdx.x;
  const T* dy = p.dy + row * p.stride_dy;
  const T* gate = p.gate + row * p.stride_gate;
  const T* up = p.up + row * p.stride_up;
  T* dgate = p.dgate + row * p.stride_dgate;
  T* dup = p.dup + row * p.stride_dup;
  const int64_t n_vecs = p.n_cols / VEC;
  for (int64_t v = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; v < n_vecs;
       v += static_cast<int64_t>(gridDim.y) * blockDim.x) {
    float d[VEC], g[VEC], u[VEC], dg[VEC], du[VEC];
    load_pack<VEC>(dy + v * VEC, d);
    load_pack<VEC>(gate + v * VEC, g);
    load_pack<VEC>(up + v * VEC, u);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float sig = sigmoid(g[i]);
      du[i] = d[i] * g[i] * sig;
      dg[i] = d[i] * u[i] * sig * (1.f + g[i] * (1.f - sig));
    }
    store_pack<VEC>(dgate + v * VEC, dg);
    store_pack<VEC>(dup + v * VEC, du);
  }
}

dim3 grid_for(int64_t n_rows, int64_t n_vecs) {
  int64_t column_blocks = (n_vecs + kThreads - 1) / kThreads;
  if (column_blocks > kMaxColumnBlocks) column_blocks = kMaxColumnBlocks;
  return dim3(static_cast<unsigned>(n_rows), static_cast<unsigned>(column_blocks));
}

}  // namespace

template <typename T>
cudaError_t launch_swiglu_fwd(const SwigluFwd<T>& p, cudaStream_t stream) {
  if (p.n_rows == 0 || p.n_cols == 0) return cudaSuccess;
  constexpr int VEC = 16 / sizeof(T);
  if (p.n_cols % VEC == 0 && rows_vectorizable<VEC>(p.gate, p.stride_gate) &&
      rows_vectorizable<VEC>(p.up, p.stride_up) && rows_vectorizable<VEC>(p.y, p.stride_y)) {
    swiglu_fwd_kernel<T, VEC><<<grid_for(p.n_rows, p.n_cols / VEC), kThreads, 0, stream>>>(p);
  } else {
    swiglu_fwd_kernel<T, 1><<<grid_for(p.n_rows, p.n_cols), kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_swiglu_bwd(const SwigluBwd<T>& p, cudaStream_t stream) {
  if (p.n_rows == 0 || p.n_cols == 0) return cudaSuccess;
  constexpr int VEC = 16 / sizeof(T);
  if (p.n_cols % VEC == 0 && rows_vectorizable<VEC>(p.dy, p.stride_dy) &&
      rows_vectorizable<VEC>(p.gate, p.stride_gate) && rows_vectorizable<VEC>(p.up, p.stride_up) &&
      rows_vectorizable<VEC>(p.dgate, p.stride_dgate) && rows_vectorizable<VEC>(p.dup, p.stride_dup)) {
    swiglu_bwd_kernel<T, VEC><<<grid_for(p.n_rows, p.n_cols / VEC), kThreads, 0, stream>>>(p);
  } else {
    swiglu_bwd_kernel<T, 1><<<grid_for(p.n_rows, p.n_cols), kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

template cudaError_t launch_swiglu_fwd<float>(const SwigluFwd<float>&, cudaStream_t);
template cudaError_t launch_swiglu_fwd<__half>(const SwigluFwd<__half>&, cudaStream_t);
template cudaError_t launch_swiglu_fwd<__nv_bfloat16>(const SwigluFwd<__nv_bfloat16>&, cudaStream_t);
template cudaError_t launch_swiglu_bwd<float>(const SwigluBwd<float>&, cudaStream_t);
template cudaError_t launch_swiglu_bwd<__half>(const SwigluBwd<__half>&, cudaStream_t);
template cudaError_t launch_swiglu_bwd<__nv_bfloat16>(const SwigluBwd<__nv_bfloat16>&, cudaStream_t);

}  // namespace solar
