// C entry points over the typed launchers of csrc/launch.h, for ctypes (tests/ops/test_cuda_emulated.py).
// dtype codes: 0 float32, 1 float16, 2 bfloat16. Each returns the launcher's cudaError_t. The
// elementwise launchers (SOLAR_ROWS_LAUNCHER) are extern "C" already and need no entry here.
#include "launch.h"

namespace {

template <typename Body>
int with_type(int code, Body&& body) {
  switch (code) {
    case 0:
      return body(float{});
    case 1:
      return body(__half{});
    default:
      return body(__nv_bfloat16{});
  }
}

}  // namespace

extern "C" {

int emu_rms_norm_fwd(int dtype, int weight_fp32, const void* x, const void* residual, const void* weight, void* y,
                     void* h, float* rstd, int64_t stride_x, int64_t stride_residual, int64_t stride_y,
                     int64_t stride_h, int64_t n_rows, int64_t n_cols, float eps) {
  return with_type(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto run = [&](auto weight_tag) {
      using W = decltype(weight_tag);
      solar::RmsNormFwd<T, W> p{static_cast<const T*>(x), static_cast<const T*>(residual), static_cast<const W*>(weight),
                                static_cast<T*>(y), static_cast<T*>(h), rstd, stride_x, stride_residual, stride_y,
                                stride_h, n_rows, n_cols, eps};
      return static_cast<int>(solar::launch_rms_norm_fwd(p, nullptr));
    };
    return weight_fp32 ? run(float{}) : run(T{});
  });
}

int emu_rms_norm_bwd(int dtype, int weight_fp32, const void* dy, const void* x, const void* weight, const float* rstd,
                     const void* dh, void* dx, float* partial, int64_t blocks, void* dweight, int64_t stride_dy,
                     int64_t stride_x, int64_t stride_dh, int64_t stride_dx, int64_t n_rows, int64_t n_cols) {
  return with_type(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto run = [&](auto weight_tag) {
      using W = decltype(weight_tag);
      solar::RmsNormBwd<T, W> p{static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const W*>(weight), rstd,
                                static_cast<const T*>(dh), static_cast<T*>(dx), partial, static_cast<W*>(dweight),
                                stride_dy, stride_x, stride_dh, stride_dx, n_rows, n_cols, blocks};
      return static_cast<int>(solar::launch_rms_norm_bwd(p, nullptr));
    };
    return weight_fp32 ? run(float{}) : run(T{});
  });
}

// The workspace rows the host function would allocate (rms_norm_bwd_blocks on the same pointers).
int64_t emu_rms_norm_bwd_blocks(int dtype, int weight_fp32, const void* dy, const void* x, const void* weight,
                                const void* dh, void* dx, int64_t stride_dy, int64_t stride_x, int64_t stride_dh,
                                int64_t stride_dx, int64_t n_rows, int64_t n_cols) {
  int64_t blocks = 0;
  with_type(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto run = [&](auto weight_tag) {
      using W = decltype(weight_tag);
      solar::RmsNormBwd<T, W> p{static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const W*>(weight),
                                nullptr, static_cast<const T*>(dh), static_cast<T*>(dx), nullptr, nullptr,
                                stride_dy, stride_x, stride_dh, stride_dx, n_rows, n_cols, 0};
      blocks = solar::rms_norm_bwd_blocks(p);
      return 0;
    };
    return weight_fp32 ? run(float{}) : run(T{});
  });
  return blocks;
}

int emu_rotary(int dtype, int table_fp32, const void* q, const void* k, const void* cos, const void* sin, void* q_out,
               void* k_out, const int64_t* strides /* q, k, q_out, k_out: 4 each; cos, sin: 3 each */, int64_t batch,
               int64_t n_tokens, int64_t n_heads_q, int64_t n_heads_k, int64_t half, int backward) {
  return with_type(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto run = [&](auto table_tag) {
      using C = decltype(table_tag);
      const int64_t* s = strides;
      solar::Rotary<T, C> p{static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const C*>(cos),
                            static_cast<const C*>(sin), static_cast<T*>(q_out), static_cast<T*>(k_out),
                            {s[0], s[1], s[2], s[3]}, {s[4], s[5], s[6], s[7]}, {s[8], s[9], s[10], s[11]},
                            {s[12], s[13], s[14], s[15]}, {s[16], s[17], s[18]}, {s[19], s[20], s[21]},
                            batch, n_tokens, n_heads_q, n_heads_k, half, backward != 0};
      return static_cast<int>(solar::launch_rotary(p, nullptr));
    };
    return table_fp32 ? run(float{}) : run(T{});
  });
}

int emu_logprobs(int dtype, int labels_int64, void* logits, const void* labels, float* logp, float* lse,
                 const float* grad, int64_t stride_logits, int64_t stride_labels, int64_t stride_grad, int64_t n_rows,
                 int64_t n_vocab, int64_t ignore_index, int compute_lse, int write_grad) {
  return with_type(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto run = [&](auto label_tag) {
      using L = decltype(label_tag);
      solar::Logprobs<T, L> p{static_cast<T*>(logits), static_cast<const L*>(labels), logp, lse, grad,
                              stride_logits, stride_labels, stride_grad, n_rows, n_vocab, ignore_index,
                              compute_lse != 0, write_grad != 0};
      return static_cast<int>(solar::launch_logprobs(p, nullptr));
    };
    return labels_int64 ? run(int64_t{}) : run(int32_t{});
  });
}

}  // extern "C"
