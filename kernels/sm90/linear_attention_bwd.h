// Host-visible interface of the Hopper (sm_90a) linear-attention backward in linear_attention_bwd.cuh.
// Kept free of CuTe so that csrc/ includes it without the CUTLASS headers.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace based {

// Gradients of causal Taylor linear attention, d = 16, for one launch. q, k [B, T, H, 16], v, dout [B, T, H, DV]
// given by pointers and element strides (the last dim contiguous, every stride and pointer 16-byte aligned);
// o [B, T, H, DV] is the forward's output; dq, dk, dv the shapes of q, k, v, contiguous, written whole. den
// [B*H, T] fp32 is the forward's normaliser (+ eps), or null without normalisation; then w [B*H, T] fp32 is
// scratch for -(dout . o) / den. kv0/ksum0: the forward's initial state;
// d_kv/d_ksum: the gradient of its final state; d_kv0/d_ksum0: where the initial state's gradient goes. All
// states in the public layout ([B, H, 153, DV] and [B, H, 153] fp32, contiguous), each pair null when absent.
struct LinearAttentionBwdParams {
  const void* q;
  const void* k;
  const void* v;
  const void* o;
  const void* dout;
  void* dq;
  void* dk;
  void* dv;
  int64_t q_batch_stride, q_seq_stride, q_head_stride;
  int64_t k_batch_stride, k_seq_stride, k_head_stride;
  int64_t v_batch_stride, v_seq_stride, v_head_stride;
  int64_t o_batch_stride, o_seq_stride, o_head_stride;
  int64_t dout_batch_stride, dout_seq_stride, dout_head_stride;
  const float* den;
  float* w;
  const float* kv0;
  const float* ksum0;
  const float* d_kv;
  const float* d_ksum;
  float* d_kv0;
  float* d_ksum0;
  int batch, heads, seqlen;
};

// Launches the kernel for `dv` (one of kFwdSm90ValueDims); is_bf16 picks bf16, else fp16 inputs.
cudaError_t launch_linear_attention_bwd_sm90(const LinearAttentionBwdParams& p, int dv, bool is_bf16,
                                             cudaStream_t stream);

}  // namespace based
