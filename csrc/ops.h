// Host entry points of solar_kernels._C, registered in torch_bindings.cpp as torch.ops.solar_kernels_C.*
// (schemas there). Every op is an out-variant: the caller allocates what it writes (the records of
// solar_kernels/ops/_registry.py), so no op needs a fake. Each checks what protects memory and
// raises a RuntimeError naming the op and the problem before any kernel runs, then launches on the
// current stream of the inputs' device. The Python ops (solar_kernels/ops/*.py) flatten inputs to
// the row views these take. Dtypes: fp32, fp16, bf16 activations; fp32 accumulation everywhere.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/core/stack.h>

#include "launch.h"

namespace c10 {
class OperatorHandle;
}

namespace solar {

// x [N, d] (row-strided, unit column stride), weight [d] (x's dtype or another float dtype),
// residual like x or none. Writes y [N, d] = weight * to_T(h * rstd) in x's dtype, h [N, d] =
// x + residual rounded to x's dtype (given exactly when residual is) and rstd [N] fp32 (contiguous).
void rms_norm_fwd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& residual,
                  const at::Tensor& y, const std::optional<at::Tensor>& h, const at::Tensor& rstd, double eps);

// dy [N, d], h [N, d] (the normalized input: x, or h of the residual variant), weight [d],
// rstd [N] fp32 from the forward, dh like h or none (added to dx). Writes dx [N, d] in h's dtype
// and dweight [d] in weight's dtype.
void rms_norm_bwd(const at::Tensor& dy, const at::Tensor& h, const at::Tensor& weight, const at::Tensor& rstd,
                  const std::optional<at::Tensor>& dh, const at::Tensor& dx, const at::Tensor& dweight);

// q [B, Hq, T, D], k [B, Hkv, T, D] (any strides, one dtype), cos and sin [T, D], [1, T, D] or
// [B, T, D] (any float dtype, any strides). Writes q' and k' into q_out and k_out (shaped like q and
// k, any strides); with backward = true, the transposed rotation (the gradient).
void rotary(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
            const at::Tensor& q_out, const at::Tensor& k_out, bool backward);

// In place, over one chunk of logits [C, V] (unit column stride): labels [C] int32/int64;
// logp, lse [C] fp32 contiguous (written when compute_lse; lse read otherwise); grad [C] fp32, any
// stride (read when write_grad; logits then become grad * (onehot - softmax)).
void logprobs_(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& logp, const at::Tensor& lse,
               const at::Tensor& grad, int64_t ignore_index, bool compute_lse, bool write_grad);

// Elementwise ops over rows (launch.h's Rows; SwiGLU's in swiglu.cu): the boxed kernel of any op whose
// schema lists only row tensors, inputs then outputs, and returns nothing. rows_kernel<launcher> is
// what torch_bindings.cpp registers (SOLAR_ROWS_OP).
void rows_op(RowsLauncher launcher, const c10::OperatorHandle& op, torch::jit::Stack* stack);

template <RowsLauncher launcher>
void rows_kernel(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  rows_op(launcher, op, stack);
}

}  // namespace solar
