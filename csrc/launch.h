// Kernel launchers: plain C++ over raw pointers, sizes and strides (in elements) and a stream.
//
// This header and the .cu files that implement it include no torch header, so nvcc compiles them
// in seconds; the torch-facing host functions (*_host.cpp) check the tensors, pick the types and
// call these. Each launcher picks its own block sizes, takes the 16-byte vector path when every
// pointer, row stride and width allows it (the scalar path otherwise), and returns the launch's
// cudaError_t for the caller to check.
//
// Types: T is the activation dtype (float, __half, __nv_bfloat16); W (RMSNorm weight) and C (rotary
// cos/sin) are T or float. Everything accumulates in fp32.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

namespace solar {

// ---- RMSNorm (rms_norm.cu) ------------------------------------------------------------------
// Rows of width n_cols; row strides in elements, columns unit-stride.
template <typename T, typename W>
struct RmsNormFwd {
  const T* x;         // [n_rows, n_cols]
  const T* residual;  // like x, or nullptr
  const W* weight;    // [n_cols]
  T* y;               // [n_rows, n_cols]: weight * to_T(h * rstd)
  T* h;               // [n_rows, n_cols]: to_T(x + residual); unused (may be nullptr) without residual
  float* rstd;        // [n_rows]: rsqrt(mean(h^2) + eps)
  int64_t stride_x, stride_residual, stride_y, stride_h;
  int64_t n_rows, n_cols;
  float eps;
};

template <typename T, typename W>
struct RmsNormBwd {
  const T* dy;        // [n_rows, n_cols]
  const T* x;         // [n_rows, n_cols]: the normalized input (h for the residual variant)
  const W* weight;    // [n_cols]
  const float* rstd;  // [n_rows], from the forward
  const T* dh;        // [n_rows, n_cols] gradient of h added to dx, or nullptr
  T* dx;              // [n_rows, n_cols]
  float* dweight_partial;  // [blocks, n_cols] fp32 workspace, one row per block
  W* dweight;         // [n_cols]: column sums of dweight_partial
  int64_t stride_dy, stride_x, stride_dh, stride_dx;
  int64_t n_rows, n_cols;
  int64_t blocks;     // blocks of the launch: rms_norm_bwd_blocks(p), asked before allocating the workspace
};

// Blocks the backward launches for these sizes and pointers (rows of dweight_partial to allocate).
template <typename T, typename W>
int64_t rms_norm_bwd_blocks(const RmsNormBwd<T, W>& p);
template <typename T, typename W>
cudaError_t launch_rms_norm_fwd(const RmsNormFwd<T, W>& p, cudaStream_t stream);
template <typename T, typename W>
cudaError_t launch_rms_norm_bwd(const RmsNormBwd<T, W>& p, cudaStream_t stream);

// ---- Rotary (rotary.cu) ---------------------------------------------------------------------
struct Strides4 {
  int64_t b, h, t, d;
};
struct Strides3 {
  int64_t b, t, d;  // b = 0 for a table shared by the batch ([T, D] or [1, T, D])
};

template <typename T, typename C>
struct Rotary {
  const T* q;     // [batch, n_heads_q, n_tokens, 2 * half]
  const T* k;     // [batch, n_heads_k, n_tokens, 2 * half]
  const C* cos;   // [batch or 1, n_tokens, 2 * half]
  const C* sin;
  T* q_out;       // like q
  T* k_out;       // like k
  Strides4 q_stride, k_stride, q_out_stride, k_out_stride;
  Strides3 cos_stride, sin_stride;
  int64_t batch, n_tokens, n_heads_q, n_heads_k, half;
  bool backward;  // the transposed rotation: sin1, sin2 := -sin2, -sin1
};

template <typename T, typename C>
cudaError_t launch_rotary(const Rotary<T, C>& p, cudaStream_t stream);

// ---- Elementwise kernels over rows (swiglu.cu) ---------------------------------------------------
// The one argument block of every elementwise kernel: the op's tensor arguments in the order of its
// schema (inputs, then the outputs it writes), each [n_rows, n_cols] of one dtype with unit column
// stride. The host side (rows_host.cpp) checks and fills it from any such op; the launchers are
// extern "C" (SOLAR_ROWS_LAUNCHER), so one line in torch_bindings.cpp binds one, and the tests'
// CPU emulation calls them by name through ctypes.
constexpr int kMaxRowTensors = 8;
struct Rows {
  const void* data[kMaxRowTensors];
  int64_t stride[kMaxRowTensors];  // row strides, in elements
  int32_t count;                   // tensors in data; a launcher given another count than its op's fails
  int64_t n_rows, n_cols;
};
// dtype codes of a Rows launch (at::ScalarType is not visible to the .cu files).
enum RowsDtype : int32_t { kRowsFloat32 = 0, kRowsFloat16 = 1, kRowsBFloat16 = 2 };
using RowsLauncher = cudaError_t (*)(int32_t dtype, const Rows* rows, cudaStream_t stream);

}  // namespace solar

#define SOLAR_ROWS_LAUNCHER(name) \
  extern "C" cudaError_t name(int32_t dtype, const ::solar::Rows* rows, cudaStream_t stream)

namespace solar {

// ---- Log-probs over a chunk of logits (logprobs.cu) -------------------------------------------
// L is the label type (int32_t or int64_t).
template <typename T, typename L>
struct Logprobs {
  T* logits;           // [n_rows, n_vocab]; overwritten with grad * (onehot - softmax) if write_grad
  const L* labels;     // [n_rows] (stride_labels)
  float* logp;         // [n_rows]: written if compute_lse
  float* lse;          // [n_rows]: written if compute_lse, else read
  const float* grad;   // [n_rows] (stride_grad, may be 0): d loss / d logp; read if write_grad
  int64_t stride_logits, stride_labels, stride_grad;
  int64_t n_rows, n_vocab, ignore_index;
  bool compute_lse, write_grad;
};

template <typename T, typename L>
cudaError_t launch_logprobs(const Logprobs<T, L>& p, cudaStream_t stream);

}  // namespace solar
