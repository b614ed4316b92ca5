// Host functions of the RMSNorm kernels (rms_norm.cu), out-variant ops: the caller allocates y, h,
// rstd and dx, dweight (solar_kernels/ops/rms_norm.py, its records' allocators). Checks what protects
// memory (devices, dtypes, shapes, unit column stride, alignment, grid), then device guard, stream,
// dispatch, launch, launch check. The dweight partial sums are a workspace allocated here.
#include <ATen/ops/empty.h>

#include "host.h"
#include "launch.h"
#include "ops.h"

namespace solar {
namespace {

// weight [d] of a float dtype on the rows' device, as the kernels read it: in the rows' dtype or fp32
// (widened on its device where it is neither; the launch's only copy of an input).
at::Tensor side_weight(const char* op, const at::Tensor& weight, const char* rows_name, const at::Tensor& rows) {
  check_same_device(op, "weight", weight, rows_name, rows);
  check_float(op, "weight", weight);
  check_dim(op, "weight", weight, 1, "1-D [d]");
  SOLAR_CHECK(weight.size(0) == rows.size(1), op, "weight has ", weight.size(0), " elements, expected ", rows.size(1), " (",
              rows_name, ".size(1))");
  const at::Tensor w = as_side_dtype(weight, rows.scalar_type()).contiguous();
  check_element_aligned(op, "weight", w);
  return w;
}

// The fields the forward's and the backward's argument blocks share: the rows that are normalized
// (x; h in the backward) with their row stride and the sizes, the weight as side_weight gives it,
// and rstd (written by the forward, read by the backward).
template <typename P>
void bind_normalized(P& p, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& rstd) {
  bind(p.x, p.stride_x, x);
  bind(p.weight, weight);
  bind(p.rstd, rstd);
  p.n_rows = x.size(0);
  p.n_cols = x.size(1);
}

}  // namespace

void rms_norm_fwd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& residual,
                  const at::Tensor& y, const std::optional<at::Tensor>& h, const at::Tensor& rstd, double eps) {
  constexpr const char* op = "solar_kernels_C::rms_norm_fwd";
  check_rows(op, "x", x);
  check_element_aligned(op, "x", x);
  if (residual.has_value()) check_rows_like(op, "residual", *residual, "x", x);
  check_rows_like(op, "y", y, "x", x);
  SOLAR_CHECK(h.has_value() == residual.has_value(), op, "h (x + residual) is written exactly when residual is given, got ",
              residual.has_value() ? "a residual and no h" : "an h and no residual");
  if (h.has_value()) check_rows_like(op, "h", *h, "x", x);
  check_row_values(op, "rstd", rstd, "x", x, /*contiguous=*/true);
  const at::Tensor w = side_weight(op, weight, "x", x);
  check_grid(op, "the number of rows", x.size(0));
  check_cuda(op, "x", x);

  const c10::cuda::CUDAGuard guard(x.device());
  with_params<RmsNormFwd>(op, x.scalar_type(), w.scalar_type(), [&](auto& p) {
    bind_normalized(p, x, w, rstd);
    bind(p.residual, p.stride_residual, residual);
    bind(p.y, p.stride_y, y);
    bind(p.h, p.stride_h, h);
    p.eps = static_cast<float>(eps);
    check_launch(op, launch_rms_norm_fwd(p, c10::cuda::getCurrentCUDAStream()));
  });
}

void rms_norm_bwd(const at::Tensor& dy, const at::Tensor& h, const at::Tensor& weight, const at::Tensor& rstd,
                  const std::optional<at::Tensor>& dh, const at::Tensor& dx, const at::Tensor& dweight) {
  constexpr const char* op = "solar_kernels_C::rms_norm_bwd";
  check_rows(op, "h", h);
  check_element_aligned(op, "h", h);
  check_rows_like(op, "dy", dy, "h", h);
  if (dh.has_value()) check_rows_like(op, "dh", *dh, "h", h);
  check_rows_like(op, "dx", dx, "h", h);
  check_row_values(op, "rstd", rstd, "h", h, /*contiguous=*/false);
  const at::Tensor w = side_weight(op, weight, "h", h);
  check_same_device(op, "dweight", dweight, "weight", weight);
  check_same_dtype(op, "dweight", dweight, "weight", weight);
  check_same_shape(op, "dweight", dweight, "weight", weight);
  check_grid(op, "the number of rows", h.size(0));
  check_cuda(op, "h", h);

  const c10::cuda::CUDAGuard guard(h.device());
  const at::Tensor rstd_c = rstd.contiguous();
  // The column sum writes dweight contiguous in the dtype the kernel reads weight in; any other
  // dweight (a widened weight's, a strided one) gets the result copied in.
  const bool direct = dweight.scalar_type() == w.scalar_type() && dweight.is_contiguous();
  const at::Tensor dw = direct ? dweight : at::empty({h.size(1)}, w.options());
  with_params<RmsNormBwd>(op, h.scalar_type(), w.scalar_type(), [&](auto& p) {
    bind_normalized(p, h, w, rstd_c);
    bind(p.dy, p.stride_dy, dy);
    bind(p.dh, p.stride_dh, dh);
    bind(p.dx, p.stride_dx, dx);
    bind(p.dweight, dw);
    // One fp32 row of dweight partial sums per block, reduced in a fixed order (no atomics).
    p.blocks = rms_norm_bwd_blocks(p);
    const at::Tensor partial = at::empty({p.blocks, h.size(1)}, h.options().dtype(at::kFloat));
    bind(p.dweight_partial, partial);
    check_launch(op, launch_rms_norm_bwd(p, c10::cuda::getCurrentCUDAStream()));
  });
  if (!direct) dweight.copy_(dw);
}

}  // namespace solar
