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

}  // namespace based
