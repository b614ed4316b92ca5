// The host side of every elementwise op over rows (launch.h's Rows): one boxed kernel reads the op's
// tensor arguments off the dispatcher's stack, keeps only the checks that protect memory (one CUDA
// device, one float dtype, one shape [rows, width] with unit column stride, element-aligned data,
// rows within a grid), and launches on the current stream. The caller allocates the outputs
// (out-variant schemas, "Tensor(a!) y"): the output contract and the argument checks a user sees are
// written once, in Python (solar_kernels/ops/_registry.py). Messages name the op and the argument
// as the schema does.
#include <string>

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

#include "host.h"
#include "launch.h"
#include "ops.h"

namespace solar {
namespace {

int32_t rows_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return kRowsFloat32;
    case at::kHalf:
      return kRowsFloat16;
    default:
      return kRowsBFloat16;  // check_rows admitted float types only
  }
}

}  // namespace

void rows_op(RowsLauncher launcher, const c10::OperatorHandle& handle, torch::jit::Stack* stack) {
  const c10::FunctionSchema& schema = handle.schema();
  const std::string name = schema.name();
  const char* op = name.c_str();
  const auto& arguments = schema.arguments();
  const size_t count = arguments.size();
  TORCH_CHECK(count >= 1 && count <= kMaxRowTensors, op, ": an elementwise op takes 1 to ", kMaxRowTensors,
              " tensors, its schema has ", count, " arguments");
  std::vector<at::Tensor> tensors;
  tensors.reserve(count);
  for (const c10::IValue& value : torch::jit::last(*stack, count)) tensors.push_back(value.toTensor());

  const at::Tensor& first = tensors[0];
  const char* first_name = arguments[0].name().c_str();
  check_rows(op, first_name, first);
  check_element_aligned(op, first_name, first);
  for (size_t i = 1; i < count; ++i) {
    check_rows_like(op, arguments[i].name().c_str(), tensors[i], first_name, first);
  }
  check_grid(op, "the number of rows", first.size(0));
  check_cuda(op, first_name, first);

  const c10::cuda::CUDAGuard guard(first.device());
  Rows rows{};
  for (size_t i = 0; i < count; ++i) bind(rows.data[i], rows.stride[i], tensors[i]);
  rows.count = static_cast<int32_t>(count);
  rows.n_rows = first.size(0);
  rows.n_cols = first.size(1);
  check_launch(op, launcher(rows_dtype(first.scalar_type()), &rows, c10::cuda::getCurrentCUDAStream()));
  torch::jit::drop(*stack, count);
}

}  // namespace solar
