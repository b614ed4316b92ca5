// SwiGLU, y = silu(gate) * up, and its backward (sigmoid recomputed, not saved):
//   dup = dy * silu(gate),  dgate = dy * up * sigmoid(gate) * (1 + gate * (1 - sigmoid(gate)))
// Elementwise over rows [n_rows, n_cols] with row strides (the two halves of a fused gate/up
// projection are read in place). fp32 arithmetic, one rounding per output. The arguments come as a
// Rows block in the order of the schemas in torch_bindings.cpp: (gate, up, y) and
// (dy, gate, up, dgate, dup).
#include "common.cuh"
#include "launch.h"

namespace solar {
namespace {

// One pack per thread per step, 256 threads per block: 4 KB of each bf16 input per block-step;
// grid.y tiles the columns (grid-stride past 65535 blocks), grid.x the rows.
constexpr int kThreads = 256;
constexpr int64_t kMaxColumnBlocks = 65535;

__device__ __forceinline__ float sigmoid(float g) { return 1.f / (1.f + expf(-g)); }

// Row `row` of tensor `i` of the block.
template <typename T>
__device__ __forceinline__ T* row_of(const Rows& p, int i, int64_t row) {
  return static_cast<T*>(const_cast<void*>(p.data[i])) + row * p.stride[i];
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) swiglu_fwd_kernel(const Rows p) {
  const int64_t row = blockIdx.x;
  const T* gate = row_of<T>(p, 0, row);
  const T* up = row_of<T>(p, 1, row);
  T* y = row_of<T>(p, 2, row);
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
__global__ void __launch_bounds__(kThreads) swiglu_bwd_kernel(const Rows p) {
  const int64_t row = blockIdx.x;
  const T* dy = row_of<T>(p, 0, row);
  const T* gate = row_of<T>(p, 1, row);
  const T* up = row_of<T>(p, 2, row);
  T* dgate = row_of<T>(p, 3, row);
  T* dup = row_of<T>(p, 4, row);
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

// Every tensor of the block starts and steps its rows on 16-byte packs of T.
template <typename T, int VEC>
bool all_vectorizable(const Rows& p) {
  if (p.n_cols % VEC != 0) return false;
  for (int i = 0; i < p.count; ++i)
    if (!rows_vectorizable<VEC>(static_cast<const T*>(p.data[i]), p.stride[i])) return false;
  return true;
}

template <template <typename, int> class Launch>
cudaError_t with_dtype(int32_t dtype, const Rows& p, cudaStream_t stream) {
  switch (dtype) {
    case kRowsFloat32:
      return Launch<float, 16 / sizeof(float)>::run(p, stream);
    case kRowsFloat16:
      return Launch<__half, 16 / sizeof(__half)>::run(p, stream);
    case kRowsBFloat16:
      return Launch<__nv_bfloat16, 16 / sizeof(__nv_bfloat16)>::run(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

using RowsKernel = void (*)(const Rows);

// The vector kernel where every tensor allows 16-byte packs, else the scalar one (VEC = 1).
template <typename T, int VEC>
cudaError_t launch_rows(RowsKernel vector, RowsKernel scalar, const Rows& p, cudaStream_t stream) {
  const bool packs = all_vectorizable<T, VEC>(p);
  const RowsKernel kernel = packs ? vector : scalar;
  kernel<<<grid_for(p.n_rows, packs ? p.n_cols / VEC : p.n_cols), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int VEC>
struct Fwd {
  static cudaError_t run(const Rows& p, cudaStream_t stream) {
    return launch_rows<T, VEC>(swiglu_fwd_kernel<T, VEC>, swiglu_fwd_kernel<T, 1>, p, stream);
  }
};

template <typename T, int VEC>
struct Bwd {
  static cudaError_t run(const Rows& p, cudaStream_t stream) {
    return launch_rows<T, VEC>(swiglu_bwd_kernel<T, VEC>, swiglu_bwd_kernel<T, 1>, p, stream);
  }
};

}  // namespace
}  // namespace solar

SOLAR_ROWS_LAUNCHER(solar_swiglu_fwd) {
  if (rows->count != 3) return cudaErrorInvalidValue;
  if (rows->n_rows == 0 || rows->n_cols == 0) return cudaSuccess;
  return solar::with_dtype<solar::Fwd>(dtype, *rows, stream);
}

SOLAR_ROWS_LAUNCHER(solar_swiglu_bwd) {
  if (rows->count != 5) return cudaErrorInvalidValue;
  if (rows->n_rows == 0 || rows->n_cols == 0) return cudaSuccess;
  return solar::with_dtype<solar::Bwd>(dtype, *rows, stream);
}
