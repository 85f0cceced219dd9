// torch.ops.based.linear_attention_step: checks, output allocation and dtype dispatch around the CUDA kernel in
// kernels/linear_attention_step.cu, plus the shape-only (Meta) kernel that torch.compile traces with.
// kv and ksum are updated in place (the schema marks them mutable), so they must be fp32 and contiguous as given;
// q, k, v are copied to contiguous buffers when they are not.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "launchers.h"

namespace based {
namespace {

struct StepDims {
  int64_t d;
  int64_t dv;
};

void check_rank(const at::Tensor& x, const char* name, int64_t rank, const char* layout) {
  TORCH_CHECK_VALUE(x.dim() == rank, "linear_attention_step: ", name, " must be ", layout, ", got shape ",
                    x.sym_sizes());
}

// The fp32 state tensor `name` must have exactly `shape` and be contiguous.
void check_state(const at::Tensor& x, const char* name, c10::SymIntArrayRef shape) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, "linear_attention_step: ", name, " has dtype ", x.scalar_type(),
                   "; the state must be float32");
  TORCH_CHECK_VALUE(x.sym_sizes().equals(shape), "linear_attention_step: ", name, " must have shape ", shape,
                    ", got ", x.sym_sizes());
  TORCH_CHECK_VALUE(x.is_contiguous(), "linear_attention_step: ", name,
                    " must be contiguous (it is updated in place), got strides ", x.sym_strides());
}

// Checks that do not depend on the device. TORCH_CHECK_VALUE/_TYPE reach Python as ValueError/TypeError, like
// the checks of the Python ops.
StepDims check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& kv,
                      const at::Tensor& ksum) {
  check_rank(q, "q", 3, "[B, H, d]");
  check_rank(k, "k", 3, "[B, H, d]");
  check_rank(v, "v", 3, "[B, H, dv]");
  check_rank(kv, "kv", 4, "[B, H, E, dv]");
  check_rank(ksum, "ksum", 3, "[B, H, E]");
  TORCH_CHECK_VALUE(k.sym_sizes().equals(q.sym_sizes()),
                    "linear_attention_step: q and k must have the same shape, got q ", q.sym_sizes(), " and k ",
                    k.sym_sizes());
  TORCH_CHECK_VALUE(v.sym_size(0) == q.sym_size(0) && v.sym_size(1) == q.sym_size(1),
                    "linear_attention_step: batch and heads of q and v must match, got q ", q.sym_sizes(), " and v ",
                    v.sym_sizes());
  const int64_t d = q.sym_size(2).guard_int(__FILE__, __LINE__);
  const int64_t dv = v.sym_size(2).guard_int(__FILE__, __LINE__);
  TORCH_CHECK_VALUE(d >= 1 && d <= kMaxStepFeatureDim, "linear_attention_step: the last dimension of q must be in [1, ",
                    kMaxStepFeatureDim, "] for the CUDA kernel, got shape ", q.sym_sizes());
  TORCH_CHECK_VALUE(dv >= 1 && dv <= kMaxStepValueDim, "linear_attention_step: the last dimension of v must be in [1, ",
                    kMaxStepValueDim, "] for the CUDA kernel, got shape ", v.sym_sizes());
  const auto dtype = q.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
                   "linear_attention_step: q has dtype ", dtype,
                   "; the CUDA kernel supports float32, float16, bfloat16");
  TORCH_CHECK_TYPE(k.scalar_type() == dtype && v.scalar_type() == dtype,
                   "linear_attention_step: q, k, v must share a dtype, got ", dtype, ", ", k.scalar_type(), ", ",
                   v.scalar_type());
  const c10::SymInt features = 1 + d + d * (d + 1) / 2;
  const c10::SymInt batch = q.sym_size(0);
  const c10::SymInt heads = q.sym_size(1);
  check_state(kv, "kv", {batch, heads, features, v.sym_size(2)});
  check_state(ksum, "ksum", {batch, heads, features});
  return {d, dv};
}

template <typename scalar_t>
void launch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& kv, at::Tensor& ksum,
            at::Tensor& out, StepDims dims, bool normalize, double eps) {
  launch_linear_attention_step(q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
                               v.const_data_ptr<scalar_t>(), kv.mutable_data_ptr<float>(),
                               ksum.mutable_data_ptr<float>(), out.mutable_data_ptr<scalar_t>(), q.size(0) * q.size(1),
                               static_cast<int>(dims.d), static_cast<int>(dims.dv), normalize,
                               static_cast<float>(eps), c10::cuda::getCurrentCUDAStream());
}

at::Tensor linear_attention_step_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& kv,
                                      at::Tensor& ksum, bool normalize, double eps) {
  const StepDims dims = check_inputs(q, k, v, kv, ksum);
  // Registered for CPU too, so that a direct call on CPU tensors gets this message instead of the dispatcher's
  // list of backends.
  TORCH_CHECK_VALUE(q.is_cuda(), "linear_attention_step: based._C has only a CUDA kernel, got q on ", q.device(),
                    "; based.ops.linear_attention_step(...) runs the PyTorch version anywhere");
  const std::pair<const char*, const at::Tensor*> others[] = {{"k", &k}, {"v", &v}, {"kv", &kv}, {"ksum", &ksum}};
  for (const auto& [name, tensor] : others) {
    TORCH_CHECK_VALUE(tensor->device() == q.device(),
                      "linear_attention_step: all inputs must be on one device, got q on ", q.device(), " and ", name,
                      " on ", tensor->device());
  }
  const c10::cuda::CUDAGuard guard(q.device());
  // The kernel reads rows of d (q, k) and dv (v) contiguous values.
  const at::Tensor q_rows = q.contiguous();
  const at::Tensor k_rows = k.contiguous();
  const at::Tensor v_rows = v.contiguous();
  at::Tensor out = at::empty(v.sizes(), v.options());
  if (out.numel() == 0) {
    return out;
  }
  switch (q.scalar_type()) {
    case at::kFloat:
      launch<float>(q_rows, k_rows, v_rows, kv, ksum, out, dims, normalize, eps);
      break;
    case at::kHalf:
      launch<c10::Half>(q_rows, k_rows, v_rows, kv, ksum, out, dims, normalize, eps);
      break;
    default:  // bfloat16, the only other dtype check_inputs lets through
      launch<c10::BFloat16>(q_rows, k_rows, v_rows, kv, ksum, out, dims, normalize, eps);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor linear_attention_step_meta(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& kv,
                                      at::Tensor& ksum, bool /*normalize*/, double /*eps*/) {
  check_inputs(q, k, v, kv, ksum);
  return at::empty_symint(v.sym_sizes(), v.options());
}

}  // namespace

TORCH_LIBRARY_IMPL(based, CUDA, m) { m.impl("linear_attention_step", &linear_attention_step_cuda); }
TORCH_LIBRARY_IMPL(based, CPU, m) { m.impl("linear_attention_step", &linear_attention_step_cuda); }
TORCH_LIBRARY_IMPL(based, Meta, m) { m.impl("linear_attention_step", &linear_attention_step_meta); }

}  // namespace based
