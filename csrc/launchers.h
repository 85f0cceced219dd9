// Host-side entry points of the device code in kernels/. They take raw contiguous buffers and the stream
// to run on; csrc/ does the argument checks, allocation and dtype dispatch around them, so the .cu files
// need no ATen and compile quickly.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace based {

// Largest input dim `d` of the Taylor feature map kernel (the released models use 16).
constexpr int kMaxFeatureMapDim = 64;

// out[r, :] = phi(x[r, :]) for r < rows; x is [rows, d], out is [rows, 1 + d + d*(d+1)/2].
// scalar_t is float, c10::Half or c10::BFloat16.
template <typename scalar_t>
void launch_taylor_feature_map(const scalar_t* x, scalar_t* out, int64_t rows, int d, cudaStream_t stream);

// Largest q/k dim `d` and value dim `dv` of the decode-step kernel: phi(q), phi(k) and the output's column sums
// of one head live in shared memory.
constexpr int kMaxStepFeatureDim = 32;
constexpr int kMaxStepValueDim = 256;

// One decode step of Taylor linear attention for `heads` = B*H independent heads, all buffers contiguous:
// q, k [heads, d], v [heads, dv], kv [heads, E, dv] and ksum [heads, E] fp32 (E = 1 + d + d*(d+1)/2), out
// [heads, dv]. kv += phi(k) outer v and ksum += phi(k) in place, then out = phi(q) @ kv, divided by
// (phi(q) . ksum + eps) when `normalize`. scalar_t is float, c10::Half or c10::BFloat16.
template <typename scalar_t>
void launch_linear_attention_step(const scalar_t* q, const scalar_t* k, const scalar_t* v, float* kv, float* ksum,
                                  scalar_t* out, int64_t heads, int d, int dv, bool normalize, float eps,
                                  cudaStream_t stream);

}  // namespace based
