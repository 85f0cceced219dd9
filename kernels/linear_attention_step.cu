// One decode step of Taylor linear attention for every (batch, head) at once, with the semantics of
// linear_attention_step_torch (based/ops/linear_attention/reference.py), computed in fp32:
//   kv += phi(k) outer v,  ksum += phi(k),  out = phi(q) @ kv / (phi(q) . ksum + eps)  (no division without
//   normalize), kv and ksum updated in place.
// The step is bound by the fp32 state: E * dv values per head (39 KB for d = 16, dv = 64) against 2d + dv inputs.
// So a block owns one head: it builds phi(q) and phi(k) in shared memory, then streams the head's contiguous kv
// block once, each value read, updated, written back and folded into the output in the same pass.
// Nothing is read back on the host, so the step can be captured in a CUDA graph.
#include <cstdint>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "launchers.h"
#include "taylor_features.cuh"

namespace based {
namespace {

constexpr int kMaxThreads = 256;
// Blocks of kMaxThreads that fill an SM's 2048 threads; the register cap this implies (32) costs no spills.
constexpr int kBlocksPerSm = 2048 / kMaxThreads;
constexpr int kWarpSize = 32;
constexpr int kMaxFeatures = taylor_feature_count(kMaxStepFeatureDim);
// Loads of kv each thread issues before using any of them: one at a time leaves too few bytes in flight per SM
// to cover the memory latency at full bandwidth.
constexpr int kLoadsInFlight = 4;

__device__ inline float warp_sum(float value) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  return value;  // complete in lane 0
}

// blockDim.x is a multiple of the warp size, and rows_per_pass * dv <= blockDim.x (see the launcher).
template <typename scalar_t>
__global__ void __launch_bounds__(kMaxThreads, kBlocksPerSm)
    linear_attention_step_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                                 const scalar_t* __restrict__ v, float* __restrict__ kv, float* __restrict__ ksum,
                                 scalar_t* __restrict__ out, int d, int dv, int rows_per_pass, bool normalize,
                                 float eps, TaylorScales scales) {
  __shared__ float q_in[kMaxStepFeatureDim];
  __shared__ float k_in[kMaxStepFeatureDim];
  __shared__ float v_in[kMaxStepValueDim];
  __shared__ FeaturePairs<kMaxStepFeatureDim> pairs;
  __shared__ float phi_q[kMaxFeatures];
  __shared__ float phi_k[kMaxFeatures];
  __shared__ float numerator[kMaxStepValueDim];  // (phi(q) @ kv_new)[c]
  __shared__ float denominator;                  // phi(q) . ksum_new

  const int64_t head = blockIdx.x;
  const int features = taylor_feature_count(d);

  for (int t = threadIdx.x; t < d; t += blockDim.x) {
    q_in[t] = static_cast<float>(q[head * d + t]);
    k_in[t] = static_cast<float>(k[head * d + t]);
  }
  for (int c = threadIdx.x; c < dv; c += blockDim.x) {
    v_in[c] = static_cast<float>(v[head * dv + c]);
    numerator[c] = 0.0f;
  }
  if (threadIdx.x == 0) {
    denominator = 0.0f;
  }
  pairs.fill(d);
  __syncthreads();

  // Features, ksum and the denominator, one feature per thread.
  float* head_ksum = ksum + head * features;
  float denominator_part = 0.0f;
  for (int f = threadIdx.x; f < features; f += blockDim.x) {
    const float phi_qf = taylor_feature(q_in, d, f, pairs, scales);
    const float phi_kf = taylor_feature(k_in, d, f, pairs, scales);
    phi_q[f] = phi_qf;
    phi_k[f] = phi_kf;
    const float ksum_new = head_ksum[f] + phi_kf;
    head_ksum[f] = ksum_new;
    denominator_part += phi_qf * ksum_new;
  }
  denominator_part = warp_sum(denominator_part);
  if (threadIdx.x % kWarpSize == 0) {
    atomicAdd(&denominator, denominator_part);
  }
  __syncthreads();

  // kv, in memory order. A pass covers rows_per_pass whole rows, so a thread keeps one column for the whole
  // stream and its share of numerator[column] is one register; consecutive threads touch consecutive addresses,
  // so loads and stores are coalesced for any dv.
  if (threadIdx.x < rows_per_pass * dv) {
    const int column = threadIdx.x % dv;
    const float v_column = v_in[column];
    float* head_kv = kv + head * features * dv;
    float column_sum = 0.0f;
    for (int first_row = threadIdx.x / dv; first_row < features; first_row += kLoadsInFlight * rows_per_pass) {
      float old[kLoadsInFlight];
#pragma unroll
      for (int u = 0; u < kLoadsInFlight; ++u) {
        const int row = first_row + u * rows_per_pass;
        old[u] = row < features ? head_kv[row * dv + column] : 0.0f;
      }
#pragma unroll
      for (int u = 0; u < kLoadsInFlight; ++u) {
        const int row = first_row + u * rows_per_pass;
        if (row < features) {
          // Product, then sum, each rounded (no FMA): the reference's kv.add_(phi_k * v), so the state does not
          // drift from it over many steps.
          const float updated = __fadd_rn(old[u], __fmul_rn(phi_k[row], v_column));
          head_kv[row * dv + column] = updated;
          column_sum += phi_q[row] * updated;
        }
      }
    }
    atomicAdd(&numerator[column], column_sum);
  }
  __syncthreads();

  for (int c = threadIdx.x; c < dv; c += blockDim.x) {
    const float value = normalize ? numerator[c] / (denominator + eps) : numerator[c];
    out[head * dv + c] = static_cast<scalar_t>(value);
  }
}

}  // namespace

template <typename scalar_t>
void launch_linear_attention_step(const scalar_t* q, const scalar_t* k, const scalar_t* v, float* kv, float* ksum,
                                  scalar_t* out, int64_t heads, int d, int dv, bool normalize, float eps,
                                  cudaStream_t stream) {
  // As many whole kv rows per pass as fit in kMaxThreads (dv = 112: two rows, 224 threads), rounded up to whole
  // warps for the denominator's warp sums; the extra threads sit out the kv stream.
  const int rows_per_pass = kMaxThreads / dv;
  const int threads = (rows_per_pass * dv + kWarpSize - 1) / kWarpSize * kWarpSize;
  linear_attention_step_kernel<scalar_t><<<static_cast<unsigned int>(heads), threads, 0, stream>>>(
      q, k, v, kv, ksum, out, d, dv, rows_per_pass, normalize, eps, taylor_scales(d));
}

template void launch_linear_attention_step<float>(const float*, const float*, const float*, float*, float*, float*,
                                                  int64_t, int, int, bool, float, cudaStream_t);
template void launch_linear_attention_step<c10::Half>(const c10::Half*, const c10::Half*, const c10::Half*, float*,
                                                      float*, c10::Half*, int64_t, int, int, bool, float,
                                                      cudaStream_t);
template void launch_linear_attention_step<c10::BFloat16>(const c10::BFloat16*, const c10::BFloat16*,
                                                          const c10::BFloat16*, float*, float*, c10::BFloat16*,
                                                          int64_t, int, int, bool, float, cudaStream_t);

}  // namespace based
