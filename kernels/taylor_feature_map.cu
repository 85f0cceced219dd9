// Taylor feature map, the layout of based/ops/feature_map/reference.py:
//   phi(x) = [1, x / d^(1/4), x_i * x_j * c_ij for i <= j in row-major upper-triangle order],
//   c_ii = 1 / sqrt(2d), c_ij = 1 / sqrt(d) for i < j.
// A block handles kRowsPerBlock rows. It stages them in shared memory as fp32, together with the (i, j)
// pair behind each second-order feature, then its threads write the block's rows * E outputs in memory
// order, so global stores are coalesced for any d. Products are computed in fp32 and rounded once.
#include <cstdint>
#include <cmath>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "launchers.h"

namespace based {
namespace {

constexpr int kThreads = 256;
constexpr int kRowsPerBlock = 16;
constexpr int kMaxPairs = kMaxFeatureMapDim * (kMaxFeatureMapDim + 1) / 2;

struct Scales {
  float first;     // d^(-1/4)
  float diagonal;  // 1 / sqrt(2d)
  float off;       // 1 / sqrt(d)
};

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    taylor_feature_map_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, int64_t rows, int d,
                              Scales scales) {
  __shared__ float xs[kRowsPerBlock * kMaxFeatureMapDim];
  __shared__ uint8_t pair_i[kMaxPairs];
  __shared__ uint8_t pair_j[kMaxPairs];

  const int pairs = d * (d + 1) / 2;
  const int features = 1 + d + pairs;
  const int64_t first_row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock;
  const int block_rows = static_cast<int>(min(static_cast<int64_t>(kRowsPerBlock), rows - first_row));

  for (int k = threadIdx.x; k < block_rows * d; k += blockDim.x) {
    xs[k] = static_cast<float>(x[first_row * d + k]);
  }
  // Pair p lies in row i of the upper triangle, whose (d - i) entries start at p = row_start.
  for (int p = threadIdx.x; p < pairs; p += blockDim.x) {
    int i = 0;
    int row_start = 0;
    while (p >= row_start + d - i) {
      row_start += d - i;
      ++i;
    }
    pair_i[p] = static_cast<uint8_t>(i);
    pair_j[p] = static_cast<uint8_t>(i + p - row_start);
  }
  __syncthreads();

  scalar_t* block_out = out + first_row * features;
  for (int k = threadIdx.x; k < block_rows * features; k += blockDim.x) {
    const int r = k / features;
    const int f = k - r * features;
    const float* xr = xs + r * d;
    float value;
    if (f == 0) {
      value = 1.0f;
    } else if (f <= d) {
      value = xr[f - 1] * scales.first;
    } else {
      const int i = pair_i[f - 1 - d];
      const int j = pair_j[f - 1 - d];
      value = xr[i] * xr[j] * (i == j ? scales.diagonal : scales.off);
    }
    block_out[k] = static_cast<scalar_t>(value);
  }
}

}  // namespace

template <typename scalar_t>
void launch_taylor_feature_map(const scalar_t* x, scalar_t* out, int64_t rows, int d, cudaStream_t stream) {
  // Rounded from double once, as the PyTorch reference's Python-float scales are.
  const Scales scales{static_cast<float>(std::pow(static_cast<double>(d), -0.25)),
                      static_cast<float>(1.0 / std::sqrt(2.0 * d)), static_cast<float>(1.0 / std::sqrt(double(d)))};
  const auto blocks = static_cast<unsigned int>((rows + kRowsPerBlock - 1) / kRowsPerBlock);
  taylor_feature_map_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(x, out, rows, d, scales);
}

template void launch_taylor_feature_map<float>(const float*, float*, int64_t, int, cudaStream_t);
template void launch_taylor_feature_map<c10::Half>(const c10::Half*, c10::Half*, int64_t, int, cudaStream_t);
template void launch_taylor_feature_map<c10::BFloat16>(const c10::BFloat16*, c10::BFloat16*, int64_t, int,
                                                       cudaStream_t);

}  // namespace based
