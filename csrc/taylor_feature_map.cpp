// torch.ops.based.taylor_feature_map: checks, output allocation and dtype dispatch around the CUDA kernel
// in kernels/taylor_feature_map.cu, plus the shape-only (Meta) kernel that torch.compile traces with.
// Only c10/cuda headers: ATen/cuda ones pull in cuSPARSE/cuBLAS headers that minimal CUDA toolkits lack.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "launchers.h"

namespace based {
namespace {

int64_t feature_count(int64_t d) { return 1 + d + d * (d + 1) / 2; }

// Checks that do not depend on the device; returns d. TORCH_CHECK_VALUE/_TYPE reach Python as
// ValueError/TypeError, like the checks of the Python ops.
int64_t check_input(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() >= 1, "taylor_feature_map: x must have at least one dimension, got a scalar");
  const int64_t d = x.sym_size(-1).guard_int(__FILE__, __LINE__);
  TORCH_CHECK_VALUE(d >= 1 && d <= kMaxFeatureMapDim, "taylor_feature_map: the last dimension of x must be in [1, ",
                    kMaxFeatureMapDim, "] for the CUDA kernel, got shape ", x.sym_sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
                   "taylor_feature_map: x has dtype ", dtype, "; the CUDA kernel supports float32, float16, bfloat16");
  return d;
}

std::vector<c10::SymInt> output_shape(const at::Tensor& x, int64_t d) {
  std::vector<c10::SymInt> shape = x.sym_sizes().vec();
  shape.back() = feature_count(d);
  return shape;
}

at::Tensor taylor_feature_map_cuda(const at::Tensor& x) {
  const int64_t d = check_input(x);
  // Registered for CPU too, so that a direct call on a CPU tensor gets this message instead of the
  // dispatcher's list of backends.
  TORCH_CHECK_VALUE(x.is_cuda(), "taylor_feature_map: based._C has only a CUDA kernel, got x on ", x.device(),
                    "; based.ops.taylor_feature_map(x) runs the PyTorch version anywhere");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor input = x.contiguous();  // the kernel reads rows of d contiguous values
  at::Tensor out = at::empty_symint(output_shape(x, d), x.options());
  const int64_t rows = input.numel() / d;
  if (rows == 0) {
    return out;
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (x.scalar_type()) {
    case at::kFloat:
      launch_taylor_feature_map(input.const_data_ptr<float>(), out.mutable_data_ptr<float>(), rows, d, stream);
      break;
    case at::kHalf:
      launch_taylor_feature_map(input.const_data_ptr<c10::Half>(), out.mutable_data_ptr<c10::Half>(), rows, d,
                                stream);
      break;
    default:  // bfloat16, the only other dtype check_input lets through
      launch_taylor_feature_map(input.const_data_ptr<c10::BFloat16>(), out.mutable_data_ptr<c10::BFloat16>(), rows,
                                d, stream);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor taylor_feature_map_meta(const at::Tensor& x) {
  return at::empty_symint(output_shape(x, check_input(x)), x.options());
}

}  // namespace

TORCH_LIBRARY_IMPL(based, CUDA, m) { m.impl("taylor_feature_map", &taylor_feature_map_cuda); }
TORCH_LIBRARY_IMPL(based, CPU, m) { m.impl("taylor_feature_map", &taylor_feature_map_cuda); }
TORCH_LIBRARY_IMPL(based, Meta, m) { m.impl("taylor_feature_map", &taylor_feature_map_meta); }

}  // namespace based
