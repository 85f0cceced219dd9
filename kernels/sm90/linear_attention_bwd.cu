// Instantiations and the dispatch of the Hopper linear-attention backward (linear_attention_bwd.cuh).
#include "linear_attention_bwd.cuh"

namespace based {

cudaError_t launch_linear_attention_bwd_sm90(const LinearAttentionBwdParams& p, int dv, bool is_bf16,
                                             cudaStream_t stream) {
  return la_sm90::dispatch(dv, is_bf16, [&](auto element, auto dv_tag) {
    return la_sm90::launch_bwd<decltype(element), decltype(dv_tag)::value>(p, stream);
  });
}

}  // namespace based
