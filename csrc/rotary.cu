// Rotary position embedding, rotate-half convention, q and k in one launch (forward and backward).
// Per head vector x = (x1, x2) of width 2 * half, with per-token cos/sin split the same way:
//   x' = (x1 * cos1 - x2 * sin1,  x2 * cos2 + x1 * sin2)
// The backward is the transpose of that map: the same formula with sin1, sin2 := -sin2, -sin1
// (see solar_kernels/ops/rotary.py). Any strides; one block per (batch, token) pair.
#include "common.cuh"
#include "launch.h"

namespace solar {
namespace {

// Threads per block: SOLAR's 32 + 8 heads x 64 pairs of bf16 are 320 packs per token, so 160
// threads take two each; narrower tokens get fewer threads. A starting point, to be measured by
// benchmarks/gpu_check.sh (no GPU number exists yet).
constexpr int kMaxThreads = 256;
constexpr int kPacksPerThread = 2;

template <typename T, typename C, int VEC>
__global__ void __launch_bounds__(kMaxThreads) rotary_kernel(const Rotary<T, C> p) {
  const int64_t batch = blockIdx.x / p.n_tokens;
  const int64_t token = blockIdx.x - batch * p.n_tokens;
  const int64_t packs_per_half = p.half / VEC;
  const int64_t total = (p.n_heads_q + p.n_heads_k) * packs_per_half;
  // cos/sin rows of this token; every head reads them again, from L1.
  const C* cos_row = p.cos + batch * p.cos_stride.b + token * p.cos_stride.t;
  const C* sin_row = p.sin + batch * p.sin_stride.b + token * p.sin_stride.t;

  for (int64_t item = threadIdx.x; item < total; item += blockDim.x) {
    int64_t head = item / packs_per_half;
    const int64_t col = (item - head * packs_per_half) * VEC;  // first column of this pack in x1
    const bool is_q = head < p.n_heads_q;
    if (!is_q) head -= p.n_heads_q;
    const Strides4 in = is_q ? p.q_stride : p.k_stride;
    const Strides4 out = is_q ? p.q_out_stride : p.k_out_stride;
    const T* x = (is_q ? p.q : p.k) + batch * in.b + head * in.h + token * in.t;
    T* o = (is_q ? p.q_out : p.k_out) + batch * out.b + head * out.h + token * out.t;

    // On the vector path every column stride is 1, so a pack is VEC consecutive columns; on the
    // scalar path (VEC = 1) the stride is whatever the tensor has.
    float x1[VEC], x2[VEC], cos1[VEC], cos2[VEC], sin_lo[VEC], sin_hi[VEC];
    load_pack<VEC>(x + col * in.d, x1);
    load_pack<VEC>(x + (col + p.half) * in.d, x2);
    load_pack<VEC>(cos_row + col * p.cos_stride.d, cos1);
    load_pack<VEC>(cos_row + (col + p.half) * p.cos_stride.d, cos2);
    load_pack<VEC>(sin_row + col * p.sin_stride.d, sin_lo);
    load_pack<VEC>(sin_row + (col + p.half) * p.sin_stride.d, sin_hi);
    float o1[VEC], o2[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float sin1 = p.backward ? -sin_hi[i] : sin_lo[i];
      const float sin2 = p.backward ? -sin_lo[i] : sin_hi[i];
      o1[i] = x1[i] * cos1[i] - x2[i] * sin1;
      o2[i] = x2[i] * cos2[i] + x1[i] * sin2;
    }
    store_pack<VEC>(o + col * out.d, o1);
    store_pack<VEC>(o + (col + p.half) * out.d, o2);
  }
}

template <int VEC, typename X>
bool heads_vectorizable(const X* ptr, const Strides4& s) {
  return is_aligned(ptr, sizeof(X) * VEC) && s.d == 1 && s.b % VEC == 0 && s.h % VEC == 0 && s.t % VEC == 0;
}

template <int VEC, typename X>
bool table_vectorizable(const X* ptr, const Strides3& s) {
  return is_aligned(ptr, sizeof(X) * VEC) && s.d == 1 && s.b % VEC == 0 && s.t % VEC == 0;
}

template <typename T, typename C>
bool vectorizable(const Rotary<T, C>& p) {
  constexpr int VEC = 16 / sizeof(T);
  return p.half % VEC == 0 && heads_vectorizable<VEC>(p.q, p.q_stride) && heads_vectorizable<VEC>(p.k, p.k_stride) &&
         heads_vectorizable<VEC>(p.q_out, p.q_out_stride) && heads_vectorizable<VEC>(p.k_out, p.k_out_stride) &&
         table_vectorizable<VEC>(p.cos, p.cos_stride) && table_vectorizable<VEC>(p.sin, p.sin_stride);
}

template <typename T, typename C, int VEC>
cudaError_t run(const Rotary<T, C>& p, cudaStream_t stream) {
  const int64_t packs = (p.n_heads_q + p.n_heads_k) * (p.half / VEC);
  const int threads = threads_for(packs, kPacksPerThread, kMaxThreads);
  rotary_kernel<T, C, VEC><<<static_cast<unsigned>(p.batch * p.n_tokens), threads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

template <typename T, typename C>
cudaError_t launch_rotary(const Rotary<T, C>& p, cudaStream_t stream) {
  if (p.batch * p.n_tokens == 0 || p.half == 0) return cudaSuccess;
  if (vectorizable(p)) return run<T, C, 16 / sizeof(T)>(p, stream);
  return run<T, C, 1>(p, stream);
}

template cudaError_t launch_rotary<float, float>(const Rotary<float, float>&, cudaStream_t);
template cudaError_t launch_rotary<__half, __half>(const Rotary<__half, __half>&, cudaStream_t);
template cudaError_t launch_rotary<__half, float>(const Rotary<__half, float>&, cudaStream_t);
template cudaError_t launch_rotary<__nv_bfloat16, __nv_bfloat16>(const Rotary<__nv_bfloat16, __nv_bfloat16>&, cudaStream_t);
template cudaError_t launch_rotary<__nv_bfloat16, float>(const Rotary<__nv_bfloat16, float>&, cudaStream_t);

}  // namespace solar
