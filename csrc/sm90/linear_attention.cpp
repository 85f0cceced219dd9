// torch.ops.based.linear_attention_{fwd,bwd}_sm90: checks, allocation and dispatch around the Hopper kernels in
// kernels/sm90/, plus their Meta kernels; and torch.ops.based.linear_attention_sm90, the two as one differentiable
// op. Built only when the CUTLASS headers are found (setup.py), so their schemas live here rather than in
// extension.cpp: the ops exist exactly when their kernels were built.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <array>
#include <mutex>

#include "../../kernels/sm90/linear_attention_bwd.h"
#include "../../kernels/sm90/linear_attention_fwd.h"

namespace based {
namespace {

constexpr int64_t kDim = 16;
constexpr int64_t kPublicFeatures = 153;
constexpr const char* kFwd = "linear_attention_fwd_sm90";
constexpr const char* kBwd = "linear_attention_bwd_sm90";

void check_state(const char* op, const char* what, const at::Tensor& q, const at::Tensor& v,
                 const std::optional<at::Tensor>& kv, const std::optional<at::Tensor>& ksum) {
  TORCH_CHECK_VALUE(kv.has_value() == ksum.has_value(), op, ": the ", what, " (kv and ksum) come together");
  if (!kv.has_value()) return;
  TORCH_CHECK_TYPE(kv->scalar_type() == at::kFloat && ksum->scalar_type() == at::kFloat, op, ": the ", what,
                   " must be float32");
  TORCH_CHECK_VALUE(kv->sym_sizes().equals({q.sym_size(0), q.sym_size(2), kPublicFeatures, v.sym_size(3)}) &&
                        ksum->sym_sizes().equals({q.sym_size(0), q.sym_size(2), kPublicFeatures}),
                    op, ": the ", what, " must be [B, H, 153, dv] and [B, H, 153], got ", kv->sym_sizes(), " and ",
                    ksum->sym_sizes());
}

// q, k [B, T, H, 16] and v [B, T, H, dv] of one dtype the kernels take.
void check_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op,
                    ": q, k, v must be [B, T, H, d], [B, T, H, d], [B, T, H, dv]");
  TORCH_CHECK_VALUE(k.sym_sizes().equals(q.sym_sizes()), op, ": q and k shapes differ: ", q.sym_sizes(), " and ",
                    k.sym_sizes());
  TORCH_CHECK_VALUE(q.sym_size(3) == kDim, op, ": the feature dim must be 16, got ", q.sym_sizes());
  TORCH_CHECK_VALUE(v.sym_size(0) == q.sym_size(0) && v.sym_size(1) == q.sym_size(1) &&
                        v.sym_size(2) == q.sym_size(2),
                    op, ": v must be [B, T, H, dv] like q, got ", v.sym_sizes());
  const auto dv = v.sym_size(3);
  TORCH_CHECK_VALUE(dv == 64 || dv == 112 || dv == 128, op, ": dv must be 64, 112 or 128, got ", dv);
  const auto dtype = q.scalar_type();
  TORCH_CHECK_TYPE((dtype == at::kBFloat16 || dtype == at::kHalf) && k.scalar_type() == dtype &&
                       v.scalar_type() == dtype,
                   op, ": q, k, v must all be bfloat16 or all float16, got ", dtype, ", ", k.scalar_type(), ", ",
                   v.scalar_type());
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
  TORCH_CHECK(device >= 0 && device < 64, "based: device index ", device, " out of range");
  std::call_once(once[device], [device] {
    int major = 0, minor = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    answer[device] = major == 9 && minor == 0;
  });
  return answer[device];
}

void check_device(const char* op, const at::Tensor& q) {
  TORCH_CHECK_VALUE(q.is_cuda(), op, ": needs CUDA tensors, got q on ", q.device());
  TORCH_CHECK_VALUE(is_sm90(q.get_device()), op, ": needs a compute capability 9.0 GPU");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const std::optional<at::Tensor>& kv0,
    const std::optional<at::Tensor>& ksum0, bool normalize, double eps, bool return_den, bool return_state) {
  check_inputs(kFwd, q_in, k_in, v_in);
  check_state(kFwd, "initial state", q_in, v_in, kv0, ksum0);
  check_device(kFwd, q_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
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
  check_inputs(kFwd, q, k, v);
  check_state(kFwd, "initial state", q, v, kv0, ksum0);
  const auto B = q.sym_size(0), T = q.sym_size(1), H = q.sym_size(2), dv = v.sym_size(3);
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor o = at::empty_symint({B, T, H, dv}, v.options());
  at::Tensor den = return_den ? at::empty_symint({B * H, T}, f32) : at::empty({0}, f32);
  at::Tensor kv = return_state ? at::empty_symint({B, H, kPublicFeatures, dv}, f32) : at::empty({0}, f32);
  at::Tensor ksum = return_state ? at::empty_symint({B, H, kPublicFeatures}, f32) : at::empty({0}, f32);
  return {o, den, kv, ksum};
}


void check_backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& o,
                    const at::Tensor& dout, const std::optional<at::Tensor>& den,
                    const std::optional<at::Tensor>& kv0, const std::optional<at::Tensor>& ksum0,
                    const std::optional<at::Tensor>& d_kv, const std::optional<at::Tensor>& d_ksum) {
  check_inputs(kBwd, q, k, v);
  for (const auto* x : {&o, &dout}) {
    TORCH_CHECK_VALUE(x->sym_sizes().equals(v.sym_sizes()) && x->scalar_type() == v.scalar_type(), kBwd,
                      ": o and dout must be like v, got ", x->sym_sizes(), " ", x->scalar_type());
  }
  if (den.has_value()) {
    const c10::SymInt rows = q.sym_size(0) * q.sym_size(2);
    TORCH_CHECK_VALUE(den->scalar_type() == at::kFloat && den->sym_sizes().equals({rows, q.sym_size(1)}), kBwd,
                      ": den must be float32 [B*H, T], got ", den->sym_sizes(), " ", den->scalar_type());
  }
  check_state(kBwd, "initial state", q, v, kv0, ksum0);
  check_state(kBwd, "final state's gradient", q, v, d_kv, d_ksum);
}

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Grads empty_grads(const at::Tensor& q, const at::Tensor& v, bool need_d_state0) {
  const auto f32 = q.options().dtype(at::kFloat);
  const auto B = q.sym_size(0), T = q.sym_size(1), H = q.sym_size(2), d = q.sym_size(3), dv = v.sym_size(3);
  return {at::empty_symint({B, T, H, d}, q.options()), at::empty_symint({B, T, H, d}, q.options()),
          at::empty_symint({B, T, H, dv}, v.options()),
          need_d_state0 ? at::empty_symint({B, H, kPublicFeatures, dv}, f32) : at::empty({0}, f32),
          need_d_state0 ? at::empty_symint({B, H, kPublicFeatures}, f32) : at::empty({0}, f32)};
}

Grads backward_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& o_in,
                    const at::Tensor& dout_in, const std::optional<at::Tensor>& den,
                    const std::optional<at::Tensor>& kv0, const std::optional<at::Tensor>& ksum0,
                    const std::optional<at::Tensor>& d_kv, const std::optional<at::Tensor>& d_ksum,
                    bool need_d_state0) {
  check_backward(q_in, k_in, v_in, o_in, dout_in, den, kv0, ksum0, d_kv, d_ksum);
  check_device(kBwd, q_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = aligned(q_in), k = aligned(k_in), v = aligned(v_in);
  const at::Tensor o = aligned(o_in), dout = aligned(dout_in);
  auto grads = empty_grads(q, v, need_d_state0);
  auto& [dq, dk, dv, d_kv0, d_ksum0] = grads;
  if (need_d_state0 && q.size(1) == 0) {
    // No tokens: the initial state passes straight through to the final one.
    d_kv0.copy_(d_kv.has_value() ? *d_kv : at::zeros_like(d_kv0));
    d_ksum0.copy_(d_ksum.has_value() ? *d_ksum : at::zeros_like(d_ksum0));
  }
  if (dq.numel() == 0 && dv.numel() == 0) return grads;
  auto contiguous = [](const std::optional<at::Tensor>& x) { return x.has_value() ? x->contiguous() : at::Tensor(); };
  auto ptr = [](const at::Tensor& x) { return x.defined() ? x.const_data_ptr<float>() : nullptr; };
  const at::Tensor den_c = contiguous(den), kv0_c = contiguous(kv0),
                   ksum0_c = contiguous(ksum0), d_kv_c = contiguous(d_kv), d_ksum_c = contiguous(d_ksum);

  LinearAttentionBwdParams p{};
  at::Tensor w = den.has_value() ? at::empty_like(den_c) : at::Tensor();
  p.q = q.data_ptr(), p.k = k.data_ptr(), p.v = v.data_ptr(), p.o = o.data_ptr(), p.dout = dout.data_ptr();
  p.dq = dq.data_ptr(), p.dk = dk.data_ptr(), p.dv = dv.data_ptr();
  p.q_batch_stride = q.stride(0), p.q_seq_stride = q.stride(1), p.q_head_stride = q.stride(2);
  p.k_batch_stride = k.stride(0), p.k_seq_stride = k.stride(1), p.k_head_stride = k.stride(2);
  p.v_batch_stride = v.stride(0), p.v_seq_stride = v.stride(1), p.v_head_stride = v.stride(2);
  p.o_batch_stride = o.stride(0), p.o_seq_stride = o.stride(1), p.o_head_stride = o.stride(2);
  p.dout_batch_stride = dout.stride(0), p.dout_seq_stride = dout.stride(1), p.dout_head_stride = dout.stride(2);
  p.den = ptr(den_c), p.w = w.defined() ? w.data_ptr<float>() : nullptr;
  p.kv0 = ptr(kv0_c), p.ksum0 = ptr(ksum0_c), p.d_kv = ptr(d_kv_c), p.d_ksum = ptr(d_ksum_c);
  p.d_kv0 = need_d_state0 ? d_kv0.data_ptr<float>() : nullptr;
  p.d_ksum0 = need_d_state0 ? d_ksum0.data_ptr<float>() : nullptr;
  p.batch = static_cast<int>(q.size(0)), p.heads = static_cast<int>(q.size(2)), p.seqlen = static_cast<int>(q.size(1));
  C10_CUDA_CHECK(launch_linear_attention_bwd_sm90(p, static_cast<int>(v.size(3)), q.scalar_type() == at::kBFloat16,
                                                  c10::cuda::getCurrentCUDAStream()));
  return grads;
}

Grads backward_meta(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& o,
                    const at::Tensor& dout, const std::optional<at::Tensor>& den,
                    const std::optional<at::Tensor>& kv0, const std::optional<at::Tensor>& ksum0,
                    const std::optional<at::Tensor>& d_kv, const std::optional<at::Tensor>& d_ksum,
                    bool need_d_state0) {
  check_backward(q, k, v, o, dout, den, kv0, ksum0, d_kv, d_ksum);
  return empty_grads(q, v, need_d_state0);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> call_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& kv0,
    const std::optional<at::Tensor>& ksum0, bool normalize, double eps, bool return_den, bool return_state) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("based::linear_attention_fwd_sm90", "")
                             .typed<decltype(forward_cuda)>();
  return op.call(q, k, v, kv0, ksum0, normalize, eps, return_den, return_state);
}

Grads call_backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& o,
                    const at::Tensor& dout, const std::optional<at::Tensor>& den,
                    const std::optional<at::Tensor>& kv0, const std::optional<at::Tensor>& ksum0,
                    const std::optional<at::Tensor>& d_kv, const std::optional<at::Tensor>& d_ksum,
                    bool need_d_state0) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("based::linear_attention_bwd_sm90", "")
                             .typed<decltype(backward_cuda)>();
  return op.call(q, k, v, o, dout, den, kv0, ksum0, d_kv, d_ksum, need_d_state0);
}

std::optional<at::Tensor> if_defined(const at::Tensor& x) {
  return x.defined() ? std::optional<at::Tensor>(x) : std::nullopt;
}

// The forward and backward kernels as one autograd node, in C++: at a few thousand tokens a training step's call
// is bound by host time, and a Python autograd.Function costs more of it than the two kernels take on the GPU.
// Gradients are not materialised: an unused output (the state, when not asked for) costs no zeros.
struct LinearAttentionFunction : public torch::autograd::Function<LinearAttentionFunction> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& q,
                                                const at::Tensor& k, const at::Tensor& v,
                                                const std::optional<at::Tensor>& kv0,
                                                const std::optional<at::Tensor>& ksum0, bool normalize, double eps,
                                                bool return_state) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->set_materialize_grads(false);
    // The normaliser is kept whenever there is one: the backward needs it, at 4 bytes per token-head.
    auto [o, den, kv, ksum] = call_forward(q, k, v, kv0, ksum0, normalize, eps, normalize, return_state);
    ctx->save_for_backward({q, k, v, o, normalize ? den : at::Tensor(), kv0.value_or(at::Tensor()),
                            ksum0.value_or(at::Tensor())});
    if (!return_state) ctx->mark_non_differentiable({kv, ksum});
    return {o, kv, ksum};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &k = saved[1], &v = saved[2], &o = saved[3], &den = saved[4];
    const at::Tensor &kv0 = saved[5], &ksum0 = saved[6];
    at::Tensor dout = grads[0].defined() ? grads[0] : at::zeros_like(o);  // only the final state was used
    at::Tensor d_kv = grads[1], d_ksum = grads[2];
    if (d_kv.defined() != d_ksum.defined()) {  // one of the two final states was used: the other's gradient is 0
      const auto f32 = q.options().dtype(at::kFloat);
      if (!d_kv.defined()) d_kv = at::zeros({q.size(0), q.size(2), kPublicFeatures, v.size(3)}, f32);
      if (!d_ksum.defined()) d_ksum = at::zeros({q.size(0), q.size(2), kPublicFeatures}, f32);
    }
    // Edges 3 and 4 exist only when the initial state was given.
    const bool need_d_state0 = kv0.defined() && (ctx->needs_input_grad(3) || ctx->needs_input_grad(4));
    auto [dq, dk, dv, d_kv0, d_ksum0] =
        call_backward(q, k, v, o, dout, if_defined(den), if_defined(kv0), if_defined(ksum0), if_defined(d_kv),
                      if_defined(d_ksum), need_d_state0);
    if (!need_d_state0) d_kv0 = d_ksum0 = at::Tensor();
    return {dq, dk, dv, d_kv0, d_ksum0, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_attention_autograd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& kv0,
    const std::optional<at::Tensor>& ksum0, bool normalize, double eps, bool return_state) {
  auto out = LinearAttentionFunction::apply(q, k, v, kv0, ksum0, normalize, eps, return_state);
  return {out[0], out[1], out[2]};
}

// Below autograd (no gradient needed, and the Meta/fake path of torch.compile): the forward kernel alone.
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_attention_no_grad(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& kv0,
    const std::optional<at::Tensor>& ksum0, bool normalize, double eps, bool return_state) {
  auto [o, den, kv, ksum] = call_forward(q, k, v, kv0, ksum0, normalize, eps, false, return_state);
  return {o, kv, ksum};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(based, m) {
  // Causal Taylor linear attention, differentiable in q, k, v and the initial state: the output o and, when
  // return_state, the final state (else both empty), in the public fp32 layout.
  m.def("linear_attention_sm90(Tensor q, Tensor k, Tensor v, Tensor? kv0, Tensor? ksum0, bool normalize, "
        "float eps, bool return_state) -> (Tensor, Tensor, Tensor)");
  m.def("linear_attention_fwd_sm90(Tensor q, Tensor k, Tensor v, Tensor? kv0, Tensor? ksum0, bool normalize, "
        "float eps, bool return_den, bool return_state) -> (Tensor, Tensor, Tensor, Tensor)");
  // Gradients of q, k, v (contiguous, the inputs' dtypes) and, when need_d_state0, of the initial state, from the
  // forward's output o and normaliser den ([B*H, T] fp32, given exactly when it normalised).
  m.def("linear_attention_bwd_sm90(Tensor q, Tensor k, Tensor v, Tensor o, Tensor dout, Tensor? den, "
        "Tensor? kv0, Tensor? ksum0, Tensor? d_kv, Tensor? d_ksum, bool need_d_state0) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}
TORCH_LIBRARY_IMPL(based, CUDA, m) {
  m.impl("linear_attention_fwd_sm90", &forward_cuda);
  m.impl("linear_attention_bwd_sm90", &backward_cuda);
}
TORCH_LIBRARY_IMPL(based, Autograd, m) { m.impl("linear_attention_sm90", &linear_attention_autograd); }
TORCH_LIBRARY_IMPL(based, CompositeExplicitAutograd, m) {
  m.impl("linear_attention_sm90", &linear_attention_no_grad);
}
TORCH_LIBRARY_IMPL(based, Meta, m) {
  m.impl("linear_attention_fwd_sm90", &forward_meta);
  m.impl("linear_attention_bwd_sm90", &backward_meta);
}

}  // namespace based
