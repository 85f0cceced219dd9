// Instantiations and the dispatch of the Hopper linear-attention backward (linear_attention_bwd.cuh).
#include "linear_attention_bwd.cuh"

namespace based {

cudaError_t launch_linear_attention_bwd_sm90(const LinearAttentionBwdParams& p, int dv, bool is_bf16,
                                             cudaStream_t stream) {
  using la_sm90::launch_bwd;
  using BF16 = cutlass::bfloat16_t;
  using F16 = cutlass::half_t;
  switch (dv) {
    case 64: return is_bf16 ? launch_bwd<BF16, 64>(p, stream) : launch_bwd<F16, 64>(p, stream);
    case 112: return is_bf16 ? launch_bwd<BF16, 112>(p, stream) : launch_bwd<F16, 112>(p, stream);
    case 128: return is_bf16 ? launch_bwd<BF16, 128>(p, stream) : launch_bwd<F16, 128>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace based
