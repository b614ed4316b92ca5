// Host functions of the RMSNorm kernels (rms_norm.cu): checks, device guard, stream, dispatch,
// launch, launch check.
#include <ATen/ops/empty.h>

#include "host.h"
#include "launch.h"
#include "ops.h"

namespace solar {

std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                            const std::optional<at::Tensor>& residual, double eps) {
  constexpr const char* op = "solar_kernels_C::rms_norm_fwd";
  check_rows(op, "x", x);
  check_same_device(op, "weight", weight, "x", x);
  check_float(op, "weight", weight);
  check_dim(op, "weight", weight, 1, "1-D [d]");
  SOLAR_CHECK(weight.size(0) == x.size(1), op, "weight has ", weight.size(0), " elements, expected ", x.size(1), " (x.size(1))");
  if (residual.has_value()) {
    check_same_device(op, "residual", *residual, "x", x);
    check_rows(op, "residual", *residual);
    check_same_dtype(op, "residual", *residual, "x", x);
    check_same_shape(op, "residual", *residual, "x", x);
  }
  SOLAR_CHECK(eps >= 0, op, "eps must be non-negative, got ", eps);
  check_grid(op, "the number of rows", x.size(0));
  check_cuda(op, "x", x);

  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor w = as_side_dtype(weight, x.scalar_type()).contiguous();
  check_element_aligned(op, "x", x);
  check_element_aligned(op, "weight", w);
  if (residual.has_value()) check_element_aligned(op, "residual", *residual);

  const int64_t n_rows = x.size(0), n_cols = x.size(1);
  at::Tensor y = at::empty({n_rows, n_cols}, x.options());
  at::Tensor h = residual.has_value() ? at::empty({n_rows, n_cols}, x.options()) : at::empty({0}, x.options());
  at::Tensor rstd = at::empty({n_rows}, x.options().dtype(at::kFloat));
  dispatch_float(op, x.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto launch = [&](auto weight_tag) {
      using W = typename decltype(weight_tag)::type;
      RmsNormFwd<T, W> p{};
      p.x = ptr<T>(x);
      p.residual = residual.has_value() ? ptr<T>(*residual) : nullptr;
      p.weight = ptr<W>(w);
      p.y = mutable_ptr<T>(y);
      p.h = residual.has_value() ? mutable_ptr<T>(h) : nullptr;
      p.rstd = mutable_ptr<float>(rstd);
      p.stride_x = x.stride(0);
      p.stride_residual = residual.has_value() ? residual->stride(0) : 0;
      p.stride_y = y.stride(0);
      p.stride_h = residual.has_value() ? h.stride(0) : 0;
      p.n_rows = n_rows;
      p.n_cols = n_cols;
      p.eps = static_cast<float>(eps);
      check_launch(op, launch_rms_norm_fwd(p, stream));
    };
    if (w.scalar_type() == x.scalar_type()) {
      launch(Type<T>{});
    } else {
      launch(Type<float>{});
    }
  });
  return {y, h, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& h, const at::Tensor& weight,
                                                const at::Tensor& rstd, const std::optional<at::Tensor>& dh) {
  constexpr const char* op = "solar_kernels_C::rms_norm_bwd";
  check_rows(op, "h", h);
  check_same_device(op, "dy", dy, "h", h);
  check_same_device(op, "weight", weight, "h", h);
  check_same_device(op, "rstd", rstd, "h", h);
  check_rows(op, "dy", dy);
  check_same_dtype(op, "dy", dy, "h", h);
  check_same_shape(op, "dy", dy, "h", h);
  check_float(op, "weight", weight);
  check_dim(op, "weight", weight, 1, "1-D [d]");
  SOLAR_CHECK(weight.size(0) == h.size(1), op, "weight has ", weight.size(0), " elements, expected ", h.size(1), " (h.size(1))");
  SOLAR_CHECK(rstd.scalar_type() == at::kFloat, op, "rstd must be float32, got ", rstd.scalar_type());
  SOLAR_CHECK(rstd.dim() == 1 && rstd.size(0) == h.size(0), op, "rstd has shape ", rstd.sizes(), ", expected [", h.size(0),
              "] (one value per row of h)");
  if (dh.has_value()) {
    check_same_device(op, "dh", *dh, "h", h);
    check_rows(op, "dh", *dh);
    check_same_dtype(op, "dh", *dh, "h", h);
    check_same_shape(op, "dh", *dh, "h", h);
  }
  check_cuda(op, "h", h);

  const c10::cuda::CUDAGuard guard(h.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor w = as_side_dtype(weight, h.scalar_type()).contiguous();
  const at::Tensor rstd_c = rstd.contiguous();
  check_element_aligned(op, "dy", dy);
  check_element_aligned(op, "h", h);
  check_element_aligned(op, "weight", w);
  if (dh.has_value()) check_element_aligned(op, "dh", *dh);

  const int64_t n_rows = h.size(0), n_cols = h.size(1);
  at::Tensor dx = at::empty({n_rows, n_cols}, h.options());
  at::Tensor dweight = at::empty({n_cols}, w.options());
  dispatch_float(op, h.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto launch = [&](auto weight_tag) {
      using W = typename decltype(weight_tag)::type;
      RmsNormBwd<T, W> p{};
      p.dy = ptr<T>(dy);
      p.x = ptr<T>(h);
      p.weight = ptr<W>(w);
      p.rstd = ptr<float>(rstd_c);
      p.dh = dh.has_value() ? ptr<T>(*dh) : nullptr;
      p.dx = mutable_ptr<T>(dx);
      p.dweight = mutable_ptr<W>(dweight);
      p.stride_dy = dy.stride(0);
      p.stride_x = h.stride(0);
      p.stride_dh = dh.has_value() ? dh->stride(0) : 0;
      p.stride_dx = dx.stride(0);
      p.n_rows = n_rows;
      p.n_cols = n_cols;
      // One fp32 row of dweight partial sums per block, reduced in a fixed order (no atomics).
      p.blocks = rms_norm_bwd_blocks(p);
      const at::Tensor partial = at::empty({p.blocks, n_cols}, h.options().dtype(at::kFloat));
      p.dweight_partial = mutable_ptr<float>(partial);
      check_launch(op, launch_rms_norm_bwd(p, stream));
    };
    if (w.scalar_type() == h.scalar_type()) {
      launch(Type<T>{});
    } else {
      launch(Type<float>{});
    }
  });
  // A weight widened to fp32 for the kernel gets its gradient back in its own dtype.
  return {dx, dweight.scalar_type() == weight.scalar_type() ? dweight : dweight.to(weight.scalar_type())};
}

}  // namespace solar
