// The bf16 instantiations of the Hopper linear-attention forward (linear_attention_fwd.cuh).
#include "linear_attention_fwd.cuh"

namespace based::la_sm90 {

template cudaError_t launch_for_dtype<cutlass::bfloat16_t>(const FwdParams&, int, cudaStream_t);

}  // namespace based::la_sm90
