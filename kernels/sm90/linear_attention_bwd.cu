// The dispatch of the Hopper linear-attention backward (linear_attention_bwd.cuh).
#include "linear_attention_bwd.cuh"

namespace based {

cudaError_t launch_linear_attention_bwd_sm90(const LinearAttentionBwdParams& p, int dv, bool is_bf16,
                                             cudaStream_t stream) {
  return is_bf16 ? la_sm90::launch_bwd_for_dtype<cutlass::bfloat16_t>(p, dv, stream)
                 : la_sm90::launch_bwd_for_dtype<cutlass::half_t>(p, dv, stream);
}

}  // namespace based
