// torch.ops.based.linear_attention_fwd_sm90: checks, allocation and dispatch around the Hopper forward kernel in
// kernels/sm90/, plus its Meta kernel. Built only when the CUTLASS headers are found (setup.py), so its schema
// lives here rather than in extension.cpp: the op exists exactly when its kernel was built.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <mutex>

#include "../../kernels/sm90/linear_attention_fwd.h"

namespace based {
namespace {

constexpr int64_t kDim = 16;
constexpr int64_t kPublicFeatures = 153;

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const std::optional<at::Tensor>& kv0, const std::optional<at::Tensor>& ksum0) {
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
                    "linear_attention_fwd_sm90: q, k, v must be [B, T, H, d], [B, T, H, d], [B, T, H, dv]");
  TORCH_CHECK_VALUE(k.sym_sizes().equals(q.sym_sizes()), "linear_attention_fwd_sm90: q and k shapes differ: ",
                    q.sym_sizes(), " and ", k.sym_sizes());
  TORCH_CHECK_VALUE(q.sym_size(3) == kDim, "linear_attention_fwd_sm90: the feature dim must be 16, got ",
                    q.sym_sizes());
  TORCH_CHECK_VALUE(v.sym_size(0) == q.sym_size(0) && v.sym_size(1) == q.sym_size(1) &&
                        v.sym_size(2) == q.sym_size(2),
                    "linear_attention_fwd_sm90: v must be [B, T, H, dv] like q, got ", v.sym_sizes());
  const auto dv = v.sym_size(3);
  TORCH_CHECK_VALUE(dv == 64 || dv == 112 || dv == 128, "linear_attention_fwd_sm90: dv must be 64, 112 or 128, got ",
                    dv);
  const auto dtype = q.scalar_type();
  TORCH_CHECK_TYPE((dtype == at::kBFloat16 || dtype == at::kHalf) && k.scalar_type() == dtype &&
                       v.scalar_type() == dtype,
                   "linear_attention_fwd_sm90: q, k, v must all be bfloat16 or all float16, got ", dtype, ", ",
                   k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK_VALUE(kv0.has_value() == ksum0.has_value(),
                    "linear_attention_fwd_sm90: kv0 and ksum0 come together");
  if (kv0.has_value()) {
    TORCH_CHECK_TYPE(kv0->scalar_type() == at::kFloat && ksum0->scalar_type() == at::kFloat,
                     "linear_attention_fwd_sm90: the initial state must be float32");
    TORCH_CHECK_VALUE(kv0->sym_sizes().equals({q.sym_size(0), q.sym_size(2), kPublicFeatures, dv}) &&
                          ksum0->sym_sizes().equals({q.sym_size(0), q.sym_size(2), kPublicFeatures}),
                      "linear_attention_fwd_sm90: the initial state must be [B, H, 153, dv] and [B, H, 153], got ",
                      kv0->sym_sizes(), " and ", ksum0->sym_sizes());
  }
}

// A view the kernel can read with 16-byte copies: unit stride in the last dim, every other stride and the start
// a multiple of 8 elements; otherwise a fresh contiguous copy (`contiguous()` alone would keep a contiguous view
// whose start is misaligned).
at::Tensor aligned(const at::Tensor& x) {
  bool ok = x.stride(3) == 1 && reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0;
  for (int i = 0; i < 3; ++i) ok = ok && x.stride(i) % 8 == 0;
  return ok ? x : x.clone(at::MemoryFormat::Contiguous);
}

// Whether `device` has compute capability 9.0, asked of the driver once per device.
bool is_sm90(int device) {
  static std::array<std::once_flag, 64> once;
  static std::array<bool, 64> answer;
  TORCH_CHECK(device >= 0 && device < 64, "linear_attention_fwd_sm90: device index ", device, " out of range");
  std::call_once(once[device], [device] {
    int major = 0, minor = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    answer[device] = major == 9 && minor == 0;
  });
  return answer[device];
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const std::optional<at::Tensor>& kv0,
    const std::optional<at::Tensor>& ksum0, bool normalize, double eps, bool return_den, bool return_state) {
  check_inputs(q_in, k_in, v_in, kv0, ksum0);
  TORCH_CHECK_VALUE(q_in.is_cuda(), "linear_attention_fwd_sm90: needs CUDA tensors, got q on ", q_in.device());
  const c10::cuda::CUDAGuard guard(q_in.device());
  TORCH_CHECK_VALUE(is_sm90(q_in.get_device()), "linear_attention_fwd_sm90: needs a compute capability 9.0 GPU");
  const at::Tensor q = aligned(q_in), k = aligned(k_in), v = aligned(v_in);
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), dv = v.size(3);
  at::Tensor o = at::empty({B, T, H, dv}, v.options());
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor den = return_den ? at::empty({B * H, T}, f32) : at::empty({0}, f32);
  at::Tensor kv = return_state ? at::empty({B, H, kPublicFeatures, dv}, f32) : at::empty({0}, f32);
  at::Tensor ksum = return_state ? at::empty({B, H, kPublicFeatures}, f32) : at::empty({0}, f32);
  at::Tensor kv0_c, ksum0_c;
  if (kv0.has_value()) {
    kv0_c = kv0->contiguous();
    ksum0_c = ksum0->contiguous();
  }
  if (o.numel() == 0) return {o, den, kv, ksum};

  LinearAttentionFwdParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.o = o.data_ptr();
  p.q_batch_stride = q.stride(0), p.q_seq_stride = q.stride(1), p.q_head_stride = q.stride(2);
  p.k_batch_stride = k.stride(0), p.k_seq_stride = k.stride(1), p.k_head_stride = k.stride(2);
  p.v_batch_stride = v.stride(0), p.v_seq_stride = v.stride(1), p.v_head_stride = v.stride(2);
  p.o_batch_stride = o.stride(0), p.o_seq_stride = o.stride(1), p.o_head_stride = o.stride(2);
  p.den = return_den ? den.data_ptr<float>() : nullptr;
  p.kv0 = kv0.has_value() ? kv0_c.const_data_ptr<float>() : nullptr;
  p.ksum0 = kv0.has_value() ? ksum0_c.const_data_ptr<float>() : nullptr;
  p.kv_out = return_state ? kv.data_ptr<float>() : nullptr;
  p.ksum_out = return_state ? ksum.data_ptr<float>() : nullptr;
  p.batch = static_cast<int>(B), p.heads = static_cast<int>(H), p.seqlen = static_cast<int>(T);
  p.eps = static_cast<float>(eps);
  p.normalize = normalize;
  C10_CUDA_CHECK(launch_linear_attention_fwd_sm90(p, static_cast<int>(dv), q.scalar_type() == at::kBFloat16,
                                                  c10::cuda::getCurrentCUDAStream()));
  return {o, den, kv, ksum};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_meta(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& kv0,
    const std::optional<at::Tensor>& ksum0, bool /*normalize*/, double /*eps*/, bool return_den, bool return_state) {
  check_inputs(q, k, v, kv0, ksum0);
  const auto B = q.sym_size(0), T = q.sym_size(1), H = q.sym_size(2), dv = v.sym_size(3);
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor o = at::empty_symint({B, T, H, dv}, v.options());
  at::Tensor den = return_den ? at::empty_symint({B * H, T}, f32) : at::empty({0}, f32);
  at::Tensor kv = return_state ? at::empty_symint({B, H, kPublicFeatures, dv}, f32) : at::empty({0}, f32);
  at::Tensor ksum = return_state ? at::empty_symint({B, H, kPublicFeatures}, f32) : at::empty({0}, f32);
  return {o, den, kv, ksum};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(based, m) {
  m.def("linear_attention_fwd_sm90(Tensor q, Tensor k, Tensor v, Tensor? kv0, Tensor? ksum0, bool normalize, "
        "float eps, bool return_den, bool return_state) -> (Tensor, Tensor, Tensor, Tensor)");
}
TORCH_LIBRARY_IMPL(based, CUDA, m) { m.impl("linear_attention_fwd_sm90", &forward_cuda); }
TORCH_LIBRARY_IMPL(based, Meta, m) { m.impl("linear_attention_fwd_sm90", &forward_meta); }

}  // namespace based
