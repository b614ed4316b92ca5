// A CPU stand-in for the parts of CUDA the kernels in csrc/ use, so their source runs here
// unchanged (tests/ops/test_cuda_emulated.py): the blocks of a launch run in turn, their threads as
// real threads that meet at __syncthreads (a barrier) and exchange values through warp shuffles.
// It checks the launch configuration as a GPU would (block size, grid limits) and checks nothing
// about speed, registers or memory ordering beyond what barriers give.
#pragma once

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
// One block runs at a time, so a function-local static is that block's shared memory.
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};

typedef int cudaError_t;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidValue = 1;
constexpr cudaError_t cudaErrorInvalidConfiguration = 9;
typedef struct CUstream_st* cudaStream_t;
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

namespace solar_emu {
// A barrier that sleeps on a futex (C++20 atomic wait): a block has up to 1024 threads on a couple
// of cores, where spinning waits, or a mutex every waiter must take in turn, would crawl.
class Barrier {
 public:
  explicit Barrier(unsigned count) : count_(count) {}
  void arrive_and_wait() {
    const unsigned generation = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) + 1 == count_) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_acq_rel);
      generation_.notify_all();
      return;
    }
    while (generation_.load(std::memory_order_acquire) == generation) generation_.wait(generation, std::memory_order_acquire);
  }

 private:
  const unsigned count_;
  std::atomic<unsigned> arrived_{0};
  std::atomic<unsigned> generation_{0};
};

inline thread_local uint3 thread_idx{0, 0, 0};
inline thread_local uint3 block_idx{0, 0, 0};
inline dim3 block_dim, grid_dim;
inline std::unique_ptr<Barrier> block_barrier;
inline std::vector<std::unique_ptr<Barrier>> warp_barriers;
inline std::vector<float> exchange;
inline cudaError_t last_error = cudaSuccess;
inline int sm_count = 3;  // a small GPU: persistent grids get several blocks
}  // namespace solar_emu

#define threadIdx (::solar_emu::thread_idx)
#define blockIdx (::solar_emu::block_idx)
#define blockDim (::solar_emu::block_dim)
#define gridDim (::solar_emu::grid_dim)

inline void __syncthreads() { solar_emu::block_barrier->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float value, int lane_mask) {
  const unsigned tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  auto& barrier = *solar_emu::warp_barriers[warp];
  solar_emu::exchange[tid] = value;
  barrier.arrive_and_wait();
  const float other = solar_emu::exchange[warp * 32 + (lane ^ static_cast<unsigned>(lane_mask))];
  barrier.arrive_and_wait();
  return other;
}

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }

inline cudaError_t cudaGetLastError() {
  const cudaError_t error = solar_emu::last_error;
  solar_emu::last_error = cudaSuccess;
  return error;
}
inline const char* cudaGetErrorString(cudaError_t error) { return error ? "emulated launch error" : "no error"; }
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int) {
  *value = solar_emu::sm_count;
  return cudaSuccess;
}

// 16-bit floats as storage, converted with round-to-nearest-even like CUDA's intrinsics.
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.bits, 2);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float v) {
  const _Float16 f = static_cast<_Float16>(v);
  __half h;
  std::memcpy(&h.bits, &f, 2);
  return h;
}
inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t u = static_cast<uint32_t>(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if (std::isnan(v)) return {static_cast<uint16_t>((u >> 16) | 0x40)};
  u += 0x7FFF + ((u >> 16) & 1);
  return {static_cast<uint16_t>(u >> 16)};
}

namespace solar_emu {

// kernel<<<grid, block, smem, stream>>>(args) becomes launch(grid, block, smem, stream)(kernel, args).
struct Launch {
  dim3 grid, block;

  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), Args... args) const {
    const bool ok = block.x >= 1 && block.x <= 1024 && block.x % 32 == 0 && block.y == 1 && block.z == 1 &&
                    grid.x >= 1 && grid.x <= 0x7FFFFFFFu && grid.y >= 1 && grid.y <= 65535 && grid.z >= 1 &&
                    grid.z <= 65535;
    if (!ok) {  // what a GPU answers (the kernels also rely on whole warps)
      last_error = cudaErrorInvalidConfiguration;
      return;
    }
    block_dim = block;
    grid_dim = grid;
    block_barrier = std::make_unique<Barrier>(block.x);
    warp_barriers.clear();
    for (unsigned w = 0; w < block.x / 32; ++w) warp_barriers.push_back(std::make_unique<Barrier>(32));
    exchange.assign(block.x, 0.f);
    // One thread per thread index, walking the blocks in turn; all of a block's threads finish it
    // before any starts the next, so the statics standing in for shared memory belong to one block.
    std::vector<std::thread> threads;
    threads.reserve(block.x);
    for (unsigned t = 0; t < block.x; ++t) {
      threads.emplace_back([=, this] {
        thread_idx = {t, 0, 0};
        for (unsigned bz = 0; bz < grid.z; ++bz)
          for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
              block_idx = {bx, by, bz};
              kernel(args...);
              block_barrier->arrive_and_wait();
            }
      });
    }
    for (auto& thread : threads) thread.join();
  }
};

inline Launch launch(dim3 grid, dim3 block, size_t = 0, cudaStream_t = nullptr) { return {grid, block}; }

}  // namespace solar_emu
