// Device helpers the kernels share: conversions with torch's rounding, aligned packs for 16-byte
// loads and stores, warp-shuffle then block reductions, and the launch-side alignment tests.
#pragma once

#include <cstdint>
#include <cstring>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace solar {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// fp32 -> storage type, rounding to nearest even as torch's .to(dtype) does.
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// The value a T tensor would hold: the rounding an unfused model applies between two ops.
template <typename T>
__device__ __forceinline__ float round_to(float v) { return to_float(from_float<T>(v)); }

// N consecutive elements moved as one aligned unit: 16 bytes on the vector path, one element on
// the scalar path (N = 1). A float pack next to a 16-bit one (fp32 weight, bf16 x) is 32 bytes and
// compiles to two 16-byte accesses.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int N, typename T>
__device__ __forceinline__ void load_pack(const T* ptr, float (&out)[N]) {
  const Pack<T, N> pack = *reinterpret_cast<const Pack<T, N>*>(ptr);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_float(pack.v[i]);
}

// A pack of 16 bytes (or 32) is stored with st.global.v4.b32 (one plain 128-bit STG each): a C++
// store of a Pack or a uint4 built from 16-bit elements was seen split by the compiler into 16-bit
// PTX stores (four 32-bit STG in SASS) for half of RMSNorm's y stores, and __stwb/__stcg compile to
// STG.STRONG. The "memory" clobber keeps later loads of the same address after the store. The CPU
// emulator (tests/ops/cuda_emulator) stores the Pack as it is.
template <int N, typename T>
__device__ __forceinline__ void store_pack(T* ptr, const float (&in)[N]) {
  Pack<T, N> pack;
#pragma unroll
  for (int i = 0; i < N; ++i) pack.v[i] = from_float<T>(in[i]);
#if defined(__CUDACC__)
  if constexpr (sizeof(pack) % 16 == 0) {
    uint32_t words[sizeof(pack) / 4];
    memcpy(words, &pack, sizeof(words));
#pragma unroll
    for (int i = 0; i < static_cast<int>(sizeof(pack) / 16); ++i) {
      asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(reinterpret_cast<char*>(ptr) + 16 * i),
                   "r"(words[4 * i]), "r"(words[4 * i + 1]), "r"(words[4 * i + 2]), "r"(words[4 * i + 3])
                   : "memory");
    }
    return;
  }
#endif
  *reinterpret_cast<Pack<T, N>*>(ptr) = pack;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block, returned to every thread. blockDim.x is a multiple of 32 (at most 1024);
// scratch is a __shared__ float[32], free for reuse when this returns.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int n_warps = blockDim.x >> 5;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = warp_sum(lane < n_warps ? scratch[lane] : 0.f);
  __syncthreads();
  return v;
}

// Host side: alignment tests for the vector path.
inline bool is_aligned(const void* ptr, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % static_cast<uintptr_t>(bytes) == 0;
}

// Rows of T that can be read as packs of VEC: the base is aligned to the pack and every row starts
// on a pack boundary. A null pointer (an absent optional input) does not block the vector path.
template <int VEC, typename T>
inline bool rows_vectorizable(const T* base, int64_t row_stride) {
  return base == nullptr || (is_aligned(base, sizeof(T) * VEC) && row_stride % VEC == 0);
}

// Threads for a block whose threads each take about `per_thread` of `items`: a multiple of 32
// between 32 and max_threads.
inline int threads_for(int64_t items, int64_t per_thread, int max_threads) {
  int64_t threads = (items + per_thread - 1) / per_thread;
  threads = (threads + 31) / 32 * 32;
  if (threads < 32) threads = 32;
  if (threads > max_threads) threads = max_threads;
  return static_cast<int>(threads);
}

// Streaming multiprocessors of the current device (0 if the runtime cannot say).
inline int current_sm_count() {
  int device = 0;
  int sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) return 0;
  return sms;
}

}  // namespace solar
