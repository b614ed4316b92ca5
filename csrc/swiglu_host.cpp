// Host functions of the SwiGLU kernels (swiglu.cu): checks, device guard, stream, dispatch, launch,
// launch check.
#include <ATen/ops/empty.h>

#include "host.h"
#include "launch.h"
#include "ops.h"

namespace solar {
namespace {

// Another row tensor of gate's device, dtype and shape.
void check_like_gate(const char* op, const char* name, const at::Tensor& t, const at::Tensor& gate) {
  check_same_device(op, name, t, "gate", gate);
  check_rows(op, name, t);
  check_same_dtype(op, name, t, "gate", gate);
  check_same_shape(op, name, t, "gate", gate);
  check_element_aligned(op, name, t);
}

}  // namespace

at::Tensor swiglu_fwd(const at::Tensor& gate, const at::Tensor& up) {
  constexpr const char* op = "solar_kernels_C::swiglu_fwd";
  check_rows(op, "gate", gate);
  check_element_aligned(op, "gate", gate);
  check_like_gate(op, "up", up, gate);
  check_grid(op, "the number of rows", gate.size(0));
  check_cuda(op, "gate", gate);

  const c10::cuda::CUDAGuard guard(gate.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor y = at::empty(gate.sizes(), gate.options());
  dispatch_float(op, gate.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    SwigluFwd<T> p{};
    p.gate = ptr<T>(gate);
    p.up = ptr<T>(up);
    p.y = mutable_ptr<T>(y);
    p.stride_gate = gate.stride(0);
    p.stride_up = up.stride(0);
    p.stride_y = y.stride(0);
    p.n_rows = gate.size(0);
    p.n_cols = gate.size(1);
    check_launch(op, launch_swiglu_fwd(p, stream));
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> swiglu_bwd(const at::Tensor& dy, const at::Tensor& gate, const at::Tensor& up) {
  constexpr const char* op = "solar_kernels_C::swiglu_bwd";
  check_rows(op, "gate", gate);
  check_element_aligned(op, "gate", gate);
  check_like_gate(op, "up", up, gate);
  check_like_gate(op, "dy", dy, gate);
  check_grid(op, "the number of rows", gate.size(0));
  check_cuda(op, "gate", gate);

  const c10::cuda::CUDAGuard guard(gate.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor dgate = at::empty(gate.sizes(), gate.options());
  at::Tensor dup = at::empty(gate.sizes(), gate.options());
  dispatch_float(op, gate.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    SwigluBwd<T> p{};
    p.dy = ptr<T>(dy);
    p.gate = ptr<T>(gate);
    p.up = ptr<T>(up);
    p.dgate = mutable_ptr<T>(dgate);
    p.dup = mutable_ptr<T>(dup);
    p.stride_dy = dy.stride(0);
    p.stride_gate = gate.stride(0);
    p.stride_up = up.stride(0);
    p.stride_dgate = dgate.stride(0);
    p.stride_dup = dup.stride(0);
    p.n_rows = gate.size(0);
    p.n_cols = gate.size(1);
    check_launch(op, launch_swiglu_bwd(p, stream));
  });
  return {dgate, dup};
}

}  // namespace solar
