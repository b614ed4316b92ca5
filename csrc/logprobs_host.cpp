// Host function of the log-probs kernel (logprobs.cu): checks, device guard, stream, dispatch,
// launch, launch check. Called once per chunk by linear_logprobs' _chunked_pass, in place of the
// Triton _logprobs_kernel.
#include "host.h"
#include "launch.h"
#include "ops.h"

namespace solar {
void logprobs_(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& logp, const at::Tensor& lse,
               const at::Tensor& grad, int64_t ignore_index, bool compute_lse, bool write_grad) {
  constexpr const char* op = "solar_kernels_C::logprobs_";
  check_rows(op, "logits", logits);
  check_same_device(op, "labels", labels, "logits", logits);
  SOLAR_CHECK(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt, op,
              "labels must be int64 or int32, got ", labels.scalar_type());
  SOLAR_CHECK(labels.dim() == 1 && labels.size(0) == logits.size(0), op, "labels has shape ", labels.sizes(),
              ", expected [", logits.size(0), "] (one label per row of logits)");
  check_row_values(op, "logp", logp, "logits", logits, /*contiguous=*/true);
  check_row_values(op, "lse", lse, "logits", logits, /*contiguous=*/true);
  check_row_values(op, "grad", grad, "logits", logits, /*contiguous=*/false);
  check_grid(op, "the number of rows", logits.size(0));
  check_cuda(op, "logits", logits);
  check_element_aligned(op, "logits", logits);

  const c10::cuda::CUDAGuard guard(logits.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(op, logits.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto launch = [&](auto label_tag) {
      using L = typename decltype(label_tag)::type;
      Logprobs<T, L> p{};
      bind(p.logits, p.stride_logits, logits);
      bind(p.labels, p.stride_labels, labels);
      bind(p.logp, logp);
      bind(p.lse, lse);
      bind(p.grad, p.stride_grad, grad);
      p.n_rows = logits.size(0);
      p.n_vocab = logits.size(1);
      p.ignore_index = ignore_index;
      p.compute_lse = compute_lse;
      p.write_grad = write_grad;
      check_launch(op, launch_logprobs(p, stream));
    };
    if (labels.scalar_type() == at::kLong) {
      launch(Type<int64_t>{});
    } else {
      launch(Type<int32_t>{});
    }
  });
}

}  // namespace solar
