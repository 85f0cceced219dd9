// The Taylor feature map phi, one feature at a time, for kernels that stage their input x (d values) as floats
// in shared memory. The layout is that of based/ops/feature_map/reference.py:
//   phi(x) = [1, x / d^(1/4), x_i * x_j * c_ij for i <= j in row-major upper-triangle order],
//   c_ii = 1 / sqrt(2d), c_ij = 1 / sqrt(d) for i < j.
// Features are computed in fp32; the kernels round once, if at all, when they store.
#pragma once

#include <cmath>
#include <cstdint>

namespace based {

__host__ __device__ constexpr int taylor_feature_count(int d) { return 1 + d + d * (d + 1) / 2; }

struct TaylorScales {
  float first;     // d^(-1/4)
  float diagonal;  // 1 / sqrt(2d)
  float off;       // 1 / sqrt(d)
};

// Rounded from double once, as the PyTorch reference's Python-float scales are.
inline TaylorScales taylor_scales(int d) {
  return {static_cast<float>(std::pow(static_cast<double>(d), -0.25)), static_cast<float>(1.0 / std::sqrt(2.0 * d)),
          static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)))};
}

// The inputs (i, j) multiplied in second-order feature p (feature f = 1 + d + p), for any d <= kMaxDim.
// A block fills it once in shared memory, so each feature it computes costs a lookup, not a walk of the triangle.
template <int kMaxDim>
struct FeaturePairs {
  static_assert(kMaxDim <= 256, "input indices are stored as uint8_t");
  uint8_t i[kMaxDim * (kMaxDim + 1) / 2];
  uint8_t j[kMaxDim * (kMaxDim + 1) / 2];

  // Run by all threads of the block; __syncthreads() before reading.
  __device__ void fill(int d) {
    // Pair p lies in row i of the upper triangle, whose (d - i) entries start at p = row_start.
    for (int p = threadIdx.x; p < d * (d + 1) / 2; p += blockDim.x) {
      int row = 0;
      int row_start = 0;
      while (p >= row_start + d - row) {
        row_start += d - row;
        ++row;
      }
      i[p] = static_cast<uint8_t>(row);
      j[p] = static_cast<uint8_t>(row + p - row_start);
    }
  }
};

// Feature f of phi(x), 0 <= f < taylor_feature_count(d); `pairs` was filled for this d.
template <int kMaxDim>
__device__ inline float taylor_feature(const float* x, int d, int f, const FeaturePairs<kMaxDim>& pairs,
                                       const TaylorScales& scales) {
  if (f == 0) {
    return 1.0f;
  }
  if (f <= d) {
    return x[f - 1] * scales.first;
  }
  const int i = pairs.i[f - 1 - d];
  const int j = pairs.j[f - 1 - d];
  return x[i] * x[j] * (i == j ? scales.diagonal : scales.off);
}

}  // namespace based
