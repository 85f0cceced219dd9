// The bf16 instantiations of the Hopper linear-attention backward (linear_attention_bwd.cuh).
#include "linear_attention_bwd.cuh"

namespace based::la_sm90 {

template cudaError_t launch_bwd_for_dtype<cutlass::bfloat16_t>(const BwdParams&, int, cudaStream_t);

}  // namespace based::la_sm90
