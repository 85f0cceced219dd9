// Taylor feature map phi (layout and scales: taylor_features.cuh) of many rows at once.
// A block handles kRowsPerBlock rows. It stages them in shared memory as fp32, together with the (i, j)
// pair behind each second-order feature, then its threads write the block's rows * E outputs in memory
// order, so global stores are coalesced for any d. Products are computed in fp32 and rounded once.
#include <cstdint>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "launchers.h"
#include "taylor_features.cuh"

namespace based {
namespace {

constexpr int kThreads = 256;
constexpr int kRowsPerBlock = 16;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    taylor_feature_map_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, int64_t rows, int d,
                              TaylorScales scales) {
  __shared__ float xs[kRowsPerBlock * kMaxFeatureMapDim];
  __shared__ FeaturePairs<kMaxFeatureMapDim> pairs;

  const int features = taylor_feature_count(d);
  const int64_t first_row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock;
  const int block_rows = static_cast<int>(min(static_cast<int64_t>(kRowsPerBlock), rows - first_row));

  for (int k = threadIdx.x; k < block_rows * d; k += blockDim.x) {
    xs[k] = static_cast<float>(x[first_row * d + k]);
  }
  pairs.fill(d);
  __syncthreads();

  scalar_t* block_out = out + first_row * features;
  for (int k = threadIdx.x; k < block_rows * features; k += blockDim.x) {
    const int r = k / features;
    const int f = k - r * features;
    block_out[k] = static_cast<scalar_t>(taylor_feature(xs + r * d, d, f, pairs, scales));
  }
}

}  // namespace

template <typename scalar_t>
void launch_taylor_feature_map(const scalar_t* x, scalar_t* out, int64_t rows, int d, cudaStream_t stream) {
  const auto blocks = static_cast<unsigned int>((rows + kRowsPerBlock - 1) / kRowsPerBlock);
  taylor_feature_map_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(x, out, rows, d, taylor_scales(d));
}

template void launch_taylor_feature_map<float>(const float*, float*, int64_t, int, cudaStream_t);
template void launch_taylor_feature_map<c10::Half>(const c10::Half*, c10::Half*, int64_t, int, cudaStream_t);
template void launch_taylor_feature_map<c10::BFloat16>(const c10::BFloat16*, c10::BFloat16*, int64_t, int,
                                                       cudaStream_t);

}  // namespace based
