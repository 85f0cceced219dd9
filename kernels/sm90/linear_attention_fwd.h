// Host-visible interface of the Hopper (sm_90a) linear-attention forward in linear_attention_fwd.cuh.
// Kept free of CuTe so that csrc/ includes it without the CUTLASS headers.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace based {

// Causal Taylor linear attention, d = 16, for one launch. q, k [B, T, H, 16], v, o [B, T, H, DV] given by
// pointers and element strides (the last dim contiguous, every stride and pointer 16-byte aligned). den
// [B*H, T] fp32 (normaliser + eps) or null. kv0/ksum0 and kv_out/ksum_out: the initial and final state in the
// public layout ([B, H, 153, DV] and [B, H, 153] fp32, contiguous) or null.
struct LinearAttentionFwdParams {
  const void* q;
  const void* k;
  const void* v;
  void* o;
  int64_t q_batch_stride, q_seq_stride, q_head_stride;
  int64_t k_batch_stride, k_seq_stride, k_head_stride;
  int64_t v_batch_stride, v_seq_stride, v_head_stride;
  int64_t o_batch_stride, o_seq_stride, o_head_stride;
  float* den;
  const float* kv0;
  const float* ksum0;
  float* kv_out;
  float* ksum_out;
  int batch, heads, seqlen;
  float eps;
  bool normalize;
};

// The value dims the kernel is built for.
constexpr int kFwdSm90ValueDims[] = {64, 112, 128};

// Launches the kernel for `dv` (one of kFwdSm90ValueDims); is_bf16 picks bf16, else fp16 inputs.
cudaError_t launch_linear_attention_fwd_sm90(const LinearAttentionFwdParams& p, int dv, bool is_bf16,
                                             cudaStream_t stream);

}  // namespace based
