// The per-row part of linear_logprobs over one chunk of logits z [rows, V]: a drop-in for the
// Triton _logprobs_kernel in solar_kernels/ops/linear_logprobs.py (same arguments, same results);
// the matmuls around it stay cuBLAS through torch.
//   compute_lse: lse = logsumexp(z) by an online max/sum in fp32, logp = z[label] - lse
//                (0 and lse 0 for ignore_index, NaN for a label outside [0, V))
//   write_grad:  z is overwritten in place with g * (onehot(label) - softmax(z)), g = grad[row]
//                (0 for ignored rows, NaN for out-of-range labels)
// One block per row.
#include <cmath>

#include "common.cuh"
#include "launch.h"

namespace solar {
namespace {

// Threads per row: about 4 packs each, at most 512 (SOLAR's V = 32000 in bf16 is 4000 packs, so
// 512 threads take ~8 each); a 16 K-token chunk is 16 K blocks, plenty to fill the GPU. A starting
// point, to be measured by benchmarks/gpu_check.sh.
constexpr int kMaxThreads = 512;
constexpr int kPacksPerThread = 4;
// Packs each thread loads before it uses any (both passes): the loop before this one kept one
// 16-byte load in flight per thread, a quarter of what covers HBM latency at this occupancy.
constexpr int kUnroll = 4;

// A running log-sum-exp: the largest value seen and the sum of exp(value - max).
struct MaxSum {
  float max;
  float sum;
};

__device__ __forceinline__ MaxSum combine(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.max, b.max);
  if (m == -INFINITY) return {m, 0.f};
  return {m, a.sum * expf(a.max - m) + b.sum * expf(b.max - m)};
}

__device__ __forceinline__ MaxSum warp_combine(MaxSum s) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const MaxSum other{__shfl_xor_sync(0xffffffffu, s.max, offset), __shfl_xor_sync(0xffffffffu, s.sum, offset)};
    s = combine(s, other);
  }
  return s;
}

// Combined over the block and returned to every thread (blockDim.x a multiple of 32).
__device__ __forceinline__ MaxSum block_combine(MaxSum s, float* scratch_max, float* scratch_sum) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int n_warps = blockDim.x >> 5;
  s = warp_combine(s);
  if (lane == 0) {
    scratch_max[warp] = s.max;
    scratch_sum[warp] = s.sum;
  }
  __syncthreads();
  s = lane < n_warps ? MaxSum{scratch_max[lane], scratch_sum[lane]} : MaxSum{-INFINITY, 0.f};
  s = warp_combine(s);
  __syncthreads();
  return s;
}

template <typename T, typename L, int VEC>
__global__ void __launch_bounds__(kMaxThreads) logprobs_kernel(const Logprobs<T, L> p) {
  __shared__ float scratch_max[32];
  __shared__ float scratch_sum[32];
  const int64_t row = blockIdx.x;
  const int64_t label = static_cast<int64_t>(p.labels[row * p.stride_labels]);
  const bool valid = label != p.ignore_index;
  const bool in_range = label >= 0 && label < p.n_vocab;
  T* z = p.logits + row * p.stride_logits;
  const int64_t n_vecs = p.n_vocab / VEC;

  float lse;
  if (p.compute_lse) {
    // Ignored rows read no logits.
    MaxSum state{-INFINITY, 0.f};
    if (valid) {
      for (int64_t base = threadIdx.x; base < n_vecs; base += kUnroll * blockDim.x) {
        // kUnroll packs loaded before any is used: that many 16-byte loads in flight per thread.
        float vals[kUnroll][VEC];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t v = base + u * blockDim.x;
          if (v < n_vecs) {
            load_pack<VEC>(z + v * VEC, vals[u]);
          } else {
#pragma unroll
            for (int i = 0; i < VEC; ++i) vals[u][i] = -INFINITY;  // adds nothing to the max/sum
          }
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          MaxSum local{vals[u][0], 0.f};
#pragma unroll
          for (int i = 1; i < VEC; ++i) local.max = fmaxf(local.max, vals[u][i]);
          if (local.max != -INFINITY) {
#pragma unroll
            for (int i = 0; i < VEC; ++i) local.sum += expf(vals[u][i] - local.max);
          }
          state = combine(state, local);
        }
      }
    }
    state = block_combine(state, scratch_max, scratch_sum);
    lse = valid ? state.max + logf(state.sum) : 0.f;
    if (threadIdx.x == 0) {
      const float z_label = valid && in_range ? to_float(z[label]) : 0.f;
      p.logp[row] = !valid ? 0.f : (in_range ? z_label - lse : NAN);
      p.lse[row] = lse;
    }
    // z[label] is read above before any thread overwrites the row below.
    if (p.write_grad) __syncthreads();
  } else {
    lse = p.lse[row];
  }
  if (!p.write_grad) return;

  const float g = !valid ? 0.f : (in_range ? p.grad[row * p.stride_grad] : NAN);
  for (int64_t base = threadIdx.x; base < n_vecs; base += kUnroll * blockDim.x) {
    float dz[kUnroll][VEC];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = base + u * blockDim.x;
      if (valid && v < n_vecs) {
        load_pack<VEC>(z + v * VEC, dz[u]);
      } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) dz[u][i] = 0.f;
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = base + u * blockDim.x;
      if (v >= n_vecs) break;
      if (valid) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const float onehot = v * VEC + i == label ? g : 0.f;
          dz[u][i] = onehot - g * expf(dz[u][i] - lse);
        }
      }
      store_pack<VEC>(z + v * VEC, dz[u]);
    }
  }
}

}  // namespace

template <typename T, typename L>
cudaError_t launch_logprobs(const Logprobs<T, L>& p, cudaStream_t stream) {
  if (p.n_rows == 0) return cudaSuccess;
  constexpr int VEC = 16 / sizeof(T);
  const bool vector = p.n_vocab % VEC == 0 && rows_vectorizable<VEC>(p.logits, p.stride_logits);
  const int64_t packs = vector ? p.n_vocab / VEC : p.n_vocab;
  const int threads = threads_for(packs, kPacksPerThread, kMaxThreads);
  const unsigned blocks = static_cast<unsigned>(p.n_rows);
  if (vector) {
    logprobs_kernel<T, L, VEC><<<blocks, threads, 0, stream>>>(p);
  } else {
    logprobs_kernel<T, L, 1><<<blocks, threads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

#define SOLAR_INSTANTIATE_LOGPROBS(T)                                                          \
  template cudaError_t launch_logprobs<T, int32_t>(const Logprobs<T, int32_t>&, cudaStream_t); \
  template cudaError_t launch_logprobs<T, int64_t>(const Logprobs<T, int64_t>&, cudaStream_t);

SOLAR_INSTANTIATE_LOGPROBS(float)
SOLAR_INSTANTIATE_LOGPROBS(__half)
SOLAR_INSTANTIATE_LOGPROBS(__nv_bfloat16)

}  // namespace solar
