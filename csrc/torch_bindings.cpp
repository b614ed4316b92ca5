// The ops of solar_kernels._C as torch.ops.solar_kernels_C.*: string schemas (mutated arguments
// marked; this file is the only place a schema is written), implementations for CUDA (and for CPU,
// where the same functions run every argument check and then say that they need a CUDA device), and
// the Python module the extension loads as. Every op is an out-variant (outputs allocated by the
// caller, nothing returned), so none needs a fake (meta) implementation: torch.compile traces them as
// writing their Tensor(a!) arguments.
//
// An elementwise kernel over rows binds in three lines: its launcher's declaration below, its
// schema in TORCH_LIBRARY (inputs, then outputs as Tensor(a!), Tensor(b!), ...; returns ()), and
// SOLAR_ROWS_OP in SOLAR_IMPLEMENT_ALL. The schema's argument names are the names its errors use.
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

// Elementwise launchers (launch.h's SOLAR_ROWS_LAUNCHER), one per out-variant op below.
SOLAR_ROWS_LAUNCHER(solar_swiglu_fwd);
SOLAR_ROWS_LAUNCHER(solar_swiglu_bwd);

// The architectures this build carries, e.g. "sm_80+sm_90a" (setup.py passes them in).
#ifndef SOLAR_KERNELS_CUDA_ARCHS
#define SOLAR_KERNELS_CUDA_ARCHS unknown
#endif
#define SOLAR_STRINGIFY_(x) #x
#define SOLAR_STRINGIFY(x) SOLAR_STRINGIFY_(x)

TORCH_LIBRARY(solar_kernels_C, m) {
  // torch imports this module for the fake implementations when it meets an op without one.
  m.set_python_module("solar_kernels._cuda");
  m.def(
      "rms_norm_fwd(Tensor x, Tensor weight, Tensor? residual, Tensor(a!) y, Tensor(b!)? h, Tensor(c!) rstd, float eps) "
      "-> ()");
  m.def(
      "rms_norm_bwd(Tensor dy, Tensor h, Tensor weight, Tensor rstd, Tensor? dh, Tensor(a!) dx, Tensor(b!) dweight) -> ()");
  m.def("rotary(Tensor q, Tensor k, Tensor cos, Tensor sin, Tensor(a!) q_out, Tensor(b!) k_out, bool backward) -> ()");
  m.def("swiglu_fwd(Tensor gate, Tensor up, Tensor(a!) y) -> ()");
  m.def("swiglu_bwd(Tensor dy, Tensor gate, Tensor up, Tensor(a!) dgate, Tensor(b!) dup) -> ()");
  m.def(
      "logprobs_(Tensor(a!) logits, Tensor labels, Tensor(b!) logp, Tensor(c!) lse, Tensor grad, int ignore_index, "
      "bool compute_lse, bool write_grad) -> ()");
}

#define SOLAR_ROWS_OP(m, name) \
  m.impl(#name, torch::CppFunction::makeFromBoxedFunction<&solar::rows_kernel<&solar_##name>>());

#define SOLAR_IMPLEMENT_ALL(m)                  \
  m.impl("rms_norm_fwd", &solar::rms_norm_fwd); \
  m.impl("rms_norm_bwd", &solar::rms_norm_bwd); \
  m.impl("rotary", &solar::rotary);             \
  SOLAR_ROWS_OP(m, swiglu_fwd)                  \
  SOLAR_ROWS_OP(m, swiglu_bwd)                  \
  m.impl("logprobs_", &solar::logprobs_);

TORCH_LIBRARY_IMPL(solar_kernels_C, CUDA, m) { SOLAR_IMPLEMENT_ALL(m) }

TORCH_LIBRARY_IMPL(solar_kernels_C, CPU, m) { SOLAR_IMPLEMENT_ALL(m) }

// A plain extension module (no pybind11: it would triple this file's build time). Importing it
// runs the registrations above; cuda_archs tells Python which GPUs this build has code for.
static PyModuleDef solar_kernels_c_module = {
    PyModuleDef_HEAD_INIT, "_C", "CUDA C++ kernels of solar_kernels, registered as torch.ops.solar_kernels_C", -1, nullptr,
};

PyMODINIT_FUNC PyInit__C() {
  PyObject* module = PyModule_Create(&solar_kernels_c_module);
  if (module != nullptr &&
      PyModule_AddStringConstant(module, "cuda_archs", SOLAR_STRINGIFY(SOLAR_KERNELS_CUDA_ARCHS)) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
