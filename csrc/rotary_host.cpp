// Host function of the rotary kernel (rotary.cu), an out-variant op: the caller allocates q_out and
// k_out (solar_kernels/ops/rotary.py, in q's and k's layouts). Checks what protects memory (devices,
// dtypes, shapes of every tensor, alignment, grid), then device guard, stream, dispatch, launch,
// launch check.
#include "host.h"
#include "launch.h"
#include "ops.h"

namespace solar {
namespace {

void check_table(const char* op, const char* name, const at::Tensor& t, const at::Tensor& q) {
  check_same_device(op, name, t, "q", q);
  check_float(op, name, t);
  const int64_t batch = q.size(0), tokens = q.size(2), head_dim = q.size(3);
  const bool ok = (t.dim() == 2 && t.size(0) == tokens && t.size(1) == head_dim) ||
                  (t.dim() == 3 && (t.size(0) == batch || t.size(0) == 1) && t.size(1) == tokens && t.size(2) == head_dim);
  SOLAR_CHECK(ok, op, name, " must be [T, D] = [", tokens, ", ", head_dim, "] or [B, T, D] = [", batch, ", ", tokens, ", ",
              head_dim, "] (B may be 1), got ", t.sizes());
}

}  // namespace

void rotary(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
            const at::Tensor& q_out, const at::Tensor& k_out, bool backward) {
  constexpr const char* op = "solar_kernels_C::rotary";
  check_float(op, "q", q);
  check_dim(op, "q", q, 4, "4-D [B, Hq, T, D]");
  check_same_device(op, "k", k, "q", q);
  check_same_dtype(op, "k", k, "q", q);
  check_dim(op, "k", k, 4, "4-D [B, Hkv, T, D]");
  SOLAR_CHECK(k.size(0) == q.size(0) && k.size(2) == q.size(2) && k.size(3) == q.size(3), op,
              "k must be [B, Hkv, T, D] with B, T, D of q ", q.sizes(), ", got ", k.sizes());
  SOLAR_CHECK(q.size(3) % 2 == 0, op, "head_dim must be even (rotate-half pairs its halves), got ", q.size(3));
  check_table(op, "cos", cos, q);
  check_table(op, "sin", sin, q);
  // The outputs are written through their own strides: each must be shaped like its input.
  const auto check_out = [&](const char* name, const at::Tensor& out, const char* in_name, const at::Tensor& in) {
    check_same_device(op, name, out, in_name, in);
    check_same_dtype(op, name, out, in_name, in);
    check_same_shape(op, name, out, in_name, in);
    check_element_aligned(op, name, out);
  };
  check_out("q_out", q_out, "q", q);
  check_out("k_out", k_out, "k", k);
  check_grid(op, "batch x tokens", q.size(0) * q.size(2));
  check_cuda(op, "q", q);

  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // cos and sin are read in q's dtype or in fp32, both the same.
  const bool tables_as_is = cos.scalar_type() == sin.scalar_type() &&
                            (cos.scalar_type() == q.scalar_type() || cos.scalar_type() == at::kFloat);
  const at::Tensor cos_t = tables_as_is ? cos : cos.to(at::kFloat);
  const at::Tensor sin_t = tables_as_is ? sin : sin.to(at::kFloat);
  check_element_aligned(op, "q", q);
  check_element_aligned(op, "k", k);
  check_element_aligned(op, "cos", cos_t);
  check_element_aligned(op, "sin", sin_t);

  with_params<Rotary>(op, q.scalar_type(), cos_t.scalar_type(), [&](auto& p) {
    bind(p.q, p.q_stride, q);
    bind(p.k, p.k_stride, k);
    bind(p.cos, p.cos_stride, cos_t);
    bind(p.sin, p.sin_stride, sin_t);
    bind(p.q_out, p.q_out_stride, q_out);
    bind(p.k_out, p.k_out_stride, k_out);
    p.batch = q.size(0);
    p.n_tokens = q.size(2);
    p.n_heads_q = q.size(1);
    p.n_heads_k = k.size(1);
    p.half = q.size(3) / 2;
    p.backward = backward;
    check_launch(op, launch_rotary(p, stream));
  });
}

}  // namespace solar
