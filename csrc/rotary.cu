// Rotary position embedding, rotate-half convention, q and k in one launch (forward and backward).
// Per head vector x = (x1, x2) of width 2 * half, with per-token cos/sin split the same way:
//   x' = (x1 * cos1 - x2 * sin1,  x2 * cos2 + x1 * sin2)
// The backward is the transpose of that map: the same formula with sin1, sin2 := -sin2, -sin1
// (see solar_kernels/ops/rotary.py). Any strides.
#include "common.cuh"
#include "launch.h"

namespace solar {
namespace {

// A block takes a run of tokens of one batch row and a group of heads (q heads first, then k):
// each thread owns one pack of columns of one token, loads that token's cos/sin pack once, and
// rotates it into every head of the group. The kernel before this one gave each thread a (head,
// pack) item, so every head re-read cos/sin and every item cost a 64-bit division.
// Sizes: threads = tokens x packs of a half, about 256 (SOLAR bf16: 8 packs per half, 32 tokens);
// 8 heads per block, so SOLAR's 32 + 8 heads are 5 groups and cos/sin are read 5 times per token,
// not 40, while 16K tokens still give 512 x 5 = 2560 blocks (about 4 waves of 132 SMs x 5 blocks).
// __launch_bounds__(256, 4) holds the kernel to 64 registers (4 blocks, 1024 threads per SM; it
// took 70 without, 3 blocks); loading two heads before storing either needed 117, or spilled at 64.
// Starting points, to be measured by benchmarks/gpu_check.sh.
constexpr int kThreads = 256;
constexpr int kMinBlocksPerSm = 4;
constexpr int kHeadsPerBlock = 8;

template <typename T, typename C, int VEC>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    rotary_kernel(const Rotary<T, C> p, unsigned token_blocks, int tokens_per_block) {
  // 32-bit index arithmetic inside the block: packs of a half and tokens per block are small.
  const unsigned batch = blockIdx.x / token_blocks;
  const int64_t token_begin = static_cast<int64_t>(blockIdx.x - batch * token_blocks) * tokens_per_block;
  const int packs_per_half = static_cast<int>(p.half / VEC);
  const int n_heads = static_cast<int>(p.n_heads_q + p.n_heads_k);
  const int head_begin = static_cast<int>(blockIdx.y) * kHeadsPerBlock;
  const int head_end = head_begin + kHeadsPerBlock < n_heads ? head_begin + kHeadsPerBlock : n_heads;
  const int items = tokens_per_block * packs_per_half;

  for (int item = threadIdx.x; item < items; item += blockDim.x) {
    const int token_in_block = item / packs_per_half;
    const int64_t token = token_begin + token_in_block;
    if (token >= p.n_tokens) break;  // items grow with the token: the rest of this thread's are past the end
    const int64_t col = static_cast<int64_t>(item - token_in_block * packs_per_half) * VEC;  // first column in x1

    // This token's cos/sin pack, once for all the heads below. On the vector path every column
    // stride is 1, so a pack is VEC consecutive columns; on the scalar path (VEC = 1) the stride is
    // whatever the tensor has.
    const C* cos_row = p.cos + batch * p.cos_stride.b + token * p.cos_stride.t;
    const C* sin_row = p.sin + batch * p.sin_stride.b + token * p.sin_stride.t;
    float cos1[VEC], cos2[VEC], sin1[VEC], sin2[VEC];
    load_pack<VEC>(cos_row + col * p.cos_stride.d, cos1);
    load_pack<VEC>(cos_row + (col + p.half) * p.cos_stride.d, cos2);
    load_pack<VEC>(sin_row + col * p.sin_stride.d, sin1);
    load_pack<VEC>(sin_row + (col + p.half) * p.sin_stride.d, sin2);
    if (p.backward) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float lo = sin1[i];
        sin1[i] = -sin2[i];
        sin2[i] = -lo;
      }
    }

    for (int head = head_begin; head < head_end; ++head) {
      const bool is_q = head < p.n_heads_q;
      const int64_t h = is_q ? head : head - p.n_heads_q;
      const Strides4& in = is_q ? p.q_stride : p.k_stride;
      const Strides4& out = is_q ? p.q_out_stride : p.k_out_stride;
      const T* x = (is_q ? p.q : p.k) + batch * in.b + h * in.h + token * in.t;
      T* o = (is_q ? p.q_out : p.k_out) + batch * out.b + h * out.h + token * out.t;
      float x1[VEC], x2[VEC];
      load_pack<VEC>(x + col * in.d, x1);
      load_pack<VEC>(x + (col + p.half) * in.d, x2);
      float o1[VEC], o2[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        o1[i] = x1[i] * cos1[i] - x2[i] * sin1[i];
        o2[i] = x2[i] * cos2[i] + x1[i] * sin2[i];
      }
      store_pack<VEC>(o + col * out.d, o1);
      store_pack<VEC>(o + (col + p.half) * out.d, o2);
    }
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
  const int64_t packs_per_half = p.half / VEC;
  const int64_t per_block = kThreads / packs_per_half;
  const int tokens_per_block = static_cast<int>(per_block < 1 ? 1 : (per_block < p.n_tokens ? per_block : p.n_tokens));
  const int threads = threads_for(tokens_per_block * packs_per_half, 1, kThreads);
  const int64_t token_blocks = (p.n_tokens + tokens_per_block - 1) / tokens_per_block;
  const int64_t head_groups = (p.n_heads_q + p.n_heads_k + kHeadsPerBlock - 1) / kHeadsPerBlock;
  if (p.batch * token_blocks > 0x7FFFFFFF || head_groups > 65535) return cudaErrorInvalidValue;  // beyond the grid
  const dim3 grid(static_cast<unsigned>(p.batch * token_blocks), static_cast<unsigned>(head_groups));
  rotary_kernel<T, C, VEC><<<grid, threads, 0, stream>>>(p, static_cast<unsigned>(token_blocks), tokens_per_block);
  return cudaGetLastError();
}

}  // namespace

template <typename T, typename C>
cudaError_t launch_rotary(const Rotary<T, C>& p, cudaStream_t stream) {
  if (p.batch * p.n_tokens == 0 || p.half == 0 || p.n_heads_q + p.n_heads_k == 0) return cudaSuccess;
  if (vectorizable(p)) return run<T, C, 16 / sizeof(T)>(p, stream);
  return run<T, C, 1>(p, stream);
}

template cudaError_t launch_rotary<float, float>(const Rotary<float, float>&, cudaStream_t);
template cudaError_t launch_rotary<__half, __half>(const Rotary<__half, __half>&, cudaStream_t);
template cudaError_t launch_rotary<__half, float>(const Rotary<__half, float>&, cudaStream_t);
template cudaError_t launch_rotary<__nv_bfloat16, __nv_bfloat16>(const Rotary<__nv_bfloat16, __nv_bfloat16>&, cudaStream_t);
template cudaError_t launch_rotary<__nv_bfloat16, float>(const Rotary<__nv_bfloat16, float>&, cudaStream_t);

}  // namespace solar
