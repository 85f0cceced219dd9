// The dispatch of the Hopper linear-attention forward (linear_attention_fwd.cuh).
#include "linear_attention_fwd.cuh"

namespace based {

cudaError_t launch_linear_attention_fwd_sm90(const LinearAttentionFwdParams& p, int dv, bool is_bf16,
                                             cudaStream_t stream) {
  return is_bf16 ? la_sm90::launch_for_dtype<cutlass::bfloat16_t>(p, dv, stream)
                 : la_sm90::launch_for_dtype<cutlass::half_t>(p, dv, stream);
}

}  // namespace based
