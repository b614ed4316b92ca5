// What the host functions (*_host.cpp) share: argument checks whose RuntimeError names the op and
// the problem, the dtype dispatch onto CUDA's types, binding tensors into launch.h's argument blocks
// and the launch check. Lean torch headers only (no torch/extension.h, no ATen/cuda/CUDAContext.h):
// each host file compiles in a few seconds.
#pragma once

#include <cstdint>
#include <limits>
#include <optional>

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include "launch.h"

namespace solar {

// TORCH_CHECK with the op's name first: "solar_kernels_C::rms_norm_fwd: weight has 7 elements, ..."
#define SOLAR_CHECK(cond, op, ...) TORCH_CHECK(cond, op, ": ", __VA_ARGS__)

inline bool is_float(const at::Tensor& t) {
  const auto dtype = t.scalar_type();
  return dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16;
}

inline void check_float(const char* op, const char* name, const at::Tensor& t) {
  SOLAR_CHECK(is_float(t), op, name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
}

inline void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim, const char* layout) {
  SOLAR_CHECK(t.dim() == dim, op, name, " must be ", layout, ", got ", t.dim(), " dimensions (shape ", t.sizes(), ")");
}

// Rows [N, width] of a float dtype, columns unit-stride (the layout the kernels index).
inline void check_rows(const char* op, const char* name, const at::Tensor& t) {
  check_float(op, name, t);
  check_dim(op, name, t, 2, "2-D [rows, width]");
  SOLAR_CHECK(t.stride(1) == 1 || t.size(1) <= 1, op, name, " must have unit stride along its last dimension, got strides ",
              t.strides());
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                              const at::Tensor& ref) {
  SOLAR_CHECK(t.device() == ref.device(), op, name, " is on ", t.device(), ", expected ", ref.device(), " (the device of ",
              ref_name, ")");
}

inline void check_same_dtype(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                             const at::Tensor& ref) {
  SOLAR_CHECK(t.scalar_type() == ref.scalar_type(), op, name, " has dtype ", t.scalar_type(), ", expected ",
              ref.scalar_type(), " (the dtype of ", ref_name, ")");
}

inline void check_same_shape(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                             const at::Tensor& ref) {
  SOLAR_CHECK(t.sizes() == ref.sizes(), op, name, " has shape ", t.sizes(), ", expected ", ref.sizes(), " (the shape of ",
              ref_name, ")");
}

// The last check before the launch: ops are registered for CPU too, so a CPU tensor gets every
// argument check above and then this message instead of the dispatcher's.
inline void check_cuda(const char* op, const char* name, const at::Tensor& t) {
  SOLAR_CHECK(t.is_cuda(), op, name, " is on ", t.device(), "; the CUDA kernels of solar_kernels._C run on CUDA devices only");
}

// Every kernel indexes its data through a pointer of the element type.
inline void check_element_aligned(const char* op, const char* name, const at::Tensor& t) {
  SOLAR_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % t.element_size() == 0, op, name,
              "'s data pointer is not aligned to its element size (", t.element_size(), " bytes)");
}

// t is rows [N, width] like ref (checked with check_rows): its device, dtype and shape, element-aligned.
inline void check_rows_like(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                            const at::Tensor& ref) {
  check_same_device(op, name, t, ref_name, ref);
  check_rows(op, name, t);
  check_same_dtype(op, name, t, ref_name, ref);
  check_same_shape(op, name, t, ref_name, ref);
  check_element_aligned(op, name, t);
}

// One fp32 value per row of rows [N, width] (RMSNorm's rstd, the log-probs' logp, lse and grad), on
// their device; contiguous where the kernel indexes it without a stride.
inline void check_row_values(const char* op, const char* name, const at::Tensor& t, const char* rows_name,
                             const at::Tensor& rows, bool contiguous) {
  check_same_device(op, name, t, rows_name, rows);
  SOLAR_CHECK(t.scalar_type() == at::kFloat, op, name, " must be float32, got ", t.scalar_type());
  SOLAR_CHECK(t.dim() == 1 && t.size(0) == rows.size(0), op, name, " has shape ", t.sizes(), ", expected [",
              rows.size(0), "] (one value per row of ", rows_name, ")");
  SOLAR_CHECK(!contiguous || t.stride(0) == 1 || t.size(0) <= 1, op, name, " must be contiguous, got stride ", t.stride(0));
}

// One block per row (or per token): grid.x holds at most 2^31 - 1 blocks.
inline void check_grid(const char* op, const char* what, int64_t blocks) {
  SOLAR_CHECK(blocks <= std::numeric_limits<int32_t>::max(), op, what, " is ", blocks, ", more than the 2^31 - 1 a launch holds");
}

inline void check_launch(const char* op, cudaError_t error) {
  SOLAR_CHECK(error == cudaSuccess, op, "kernel launch failed: ", cudaGetErrorString(error));
}

template <typename T>
struct Type {
  using type = T;
};

// Calls body(Type<T>{}) with T the CUDA type of dtype: float, __half or __nv_bfloat16.
template <typename Body>
void dispatch_float(const char* op, at::ScalarType dtype, Body&& body) {
  switch (dtype) {
    case at::kFloat:
      return body(Type<float>{});
    case at::kHalf:
      return body(Type<__half>{});
    case at::kBFloat16:
      return body(Type<__nv_bfloat16>{});
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", dtype);
  }
}

// A side input (RMSNorm weight, rotary cos/sin) is read in the activation dtype or in fp32; any
// other float dtype is widened to fp32 first, which is exact.
inline at::Tensor as_side_dtype(const at::Tensor& t, at::ScalarType activation) {
  if (t.scalar_type() == activation || t.scalar_type() == at::kFloat) return t;
  return t.to(at::kFloat);
}

// Calls body(p) with p a zeroed argument block Params<T, S> (launch.h): T the CUDA type of the
// activation dtype, S the side input's (as_side_dtype): T itself, or float where the side input is
// fp32 and the activations are not.
template <template <typename, typename> class Params, typename Body>
void with_params(const char* op, at::ScalarType activation, at::ScalarType side, Body&& body) {
  dispatch_float(op, activation, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (side == activation) {
      Params<T, T> p{};
      body(p);
    } else {
      Params<T, float> p{};
      body(p);
    }
  });
}

// Points an argument block's field at t's data, as the field's own type (const for what is read);
// an absent optional tensor is nullptr.
template <typename P>
void bind(P*& field, const at::Tensor& t) {
  field = static_cast<P*>(t.data_ptr());
}

template <typename P>
void bind(P*& field, const std::optional<at::Tensor>& t) {
  field = t.has_value() ? static_cast<P*>(t->data_ptr()) : nullptr;
}

// The same, with the stride field that goes with the pointer set from the same tensor in the same
// call, so a field is never paired with another tensor's strides. A row stride is t.stride(0) as it
// is; an absent optional tensor is nullptr with row stride 0.
template <typename P>
void bind(P*& field, int64_t& row_stride, const at::Tensor& t) {
  bind(field, t);
  row_stride = t.stride(0);
}

template <typename P>
void bind(P*& field, int64_t& row_stride, const std::optional<at::Tensor>& t) {
  bind(field, t);
  row_stride = t.has_value() ? t->stride(0) : 0;
}

// A dim of size 1 is never stepped along: stride 0 there, so it cannot block the vector path.
inline int64_t stride_of(const at::Tensor& t, int64_t dim) { return t.size(dim) == 1 ? 0 : t.stride(dim); }

// Rotary's q, k and their outputs [B, H, T, D]: every dim's stride.
template <typename P>
void bind(P*& field, Strides4& strides, const at::Tensor& t) {
  bind(field, t);
  strides = {stride_of(t, 0), stride_of(t, 1), stride_of(t, 2), stride_of(t, 3)};
}

// Rotary's cos and sin tables: [T, D] and [1, T, D] are shared by the batch (batch stride 0);
// [B, T, D] has one per row.
template <typename P>
void bind(P*& field, Strides3& strides, const at::Tensor& t) {
  bind(field, t);
  if (t.dim() == 2) {
    strides = {0, stride_of(t, 0), stride_of(t, 1)};
  } else {
    strides = {stride_of(t, 0), stride_of(t, 1), stride_of(t, 2)};
  }
}

}  // namespace solar
