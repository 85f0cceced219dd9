// Pieces of the Hopper (sm_90a) Taylor linear-attention kernels that the forward (linear_attention_fwd.cuh) and
// the backward (linear_attention_bwd.cuh) share: the internal feature order, phi in registers and in shared
// memory, and the state warpgroup that carries S = sum phi(y) b^T across chunks of 64 tokens.
//
// Internal features (d = 16, 160 = 153 padded): the second-order pairs are laid out by cyclic distance, so that
// every thread can build its slice of phi(q) in the wgmma register-operand layout from one rotated copy of its
// rows with compile-time register indices:
//   f = 16*delta + a (delta 0..7):  x_a x_{(a+delta)%16} / sqrt(d)   (delta = 0: x_a^2 / sqrt(2d))
//   f = 128 + a:                    x_a / d^(1/4)
//   f = 144 + a (a 0..7):           x_a x_{a+8} / sqrt(d)
//   f = 152:                        1;   f = 153..159: 0
// Each unordered pair {a, b} appears once, so <phi(q), phi(k)> = 1 + s + s^2/2 exactly as the public map gives.
#pragma once

#define CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED
#include <cute/tensor.hpp>
#include <cute/arch/mma_sm90.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/numeric_types.h>

namespace based::la_sm90 {

using namespace cute;

constexpr int kChunk = 64;
constexpr int kDim = 16;
constexpr int kFeatures = 160;
constexpr int kPublicFeatures = 153;
constexpr int kThreads = 256;

// Named barriers (0 is __syncthreads).
// kFull0 + i: snapshot i written (state warpgroup arrives, the other waits); kEmpty0 + i: snapshot i read.
enum Barrier : int { kMathGroup = 1, kStateGroup = 2, kFull0 = 3, kEmpty0 = 5 };

__device__ __forceinline__ void bar_sync(int id, int count) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(count) : "memory");
}
__device__ __forceinline__ void bar_arrive(int id, int count) {
  asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(count) : "memory");
}

// Byte offset of element `coord` of a shared-memory buffer in `Layout`, as CuTe's tensors address it: the layout's
// swizzle acts on the byte offset of its unswizzled part, not on the element offset that evaluating the layout
// itself gives. Every buffer is 1024-byte aligned, beyond every swizzle's reach, so offsets add to its address.
template <class Layout, class Element, class... Coord>
CUTE_HOST_DEVICE uint32_t smem_offset(Coord... coord) {
  return get_swizzle_portion(Layout{})(static_cast<uint32_t>(get_nonswizzle_portion(Layout{})(coord...)) *
                                       static_cast<uint32_t>(sizeof(Element)));
}

// 16-byte global -> shared copy to a 32-bit shared address; reads nothing and writes zeros when !valid.
__device__ __forceinline__ void cp_async_16_at(uint32_t smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem), "l"(gmem), "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
// 4-byte global -> shared copy (per-token scalars).
__device__ __forceinline__ void cp_async_4(void* smem, const void* gmem) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(dst), "l"(gmem) : "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

// Shared-memory accesses in PTX. Swizzled CuTe tensors compute addresses in integers, so a pointer taken from
// them is generic and plain C++ accesses through it compile to generic LD.E/ST.E; these are LDS/STS.
__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void st_shared(void* p, uint16_t v) {
  asm volatile("st.shared.b16 [%0], %1;" ::"r"(smem_address(p)), "h"(v) : "memory");
}
// Stores and loads at a 32-bit shared-memory address: a buffer's address plus a layout offset, which skips the generic
// pointer arithmetic and the conversion back for every access.
__device__ __forceinline__ void st_shared_at(uint32_t address, uint4 v) {
  asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};" ::"r"(address), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
}
__device__ __forceinline__ uint32_t ld_shared_32_at(uint32_t address) {
  uint32_t v;
  asm volatile("ld.shared.b32 %0, [%1];" : "=r"(v) : "r"(address) : "memory");
  return v;
}
// Four 8x8 16-bit matrices, transposed: lane l gives the address of row l % 8 of matrix l / 8.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t address, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address)
               : "memory");
}
__device__ __forceinline__ uint4 ld_shared_128(const void* p) {
  uint4 v;
  asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(smem_address(p))
               : "memory");
  return v;
}

// The public index (0..152) of internal feature f, -1 for padding.
__host__ __device__ constexpr int public_feature(int f) {
  auto pair = [](int a, int b) {
    const int i = a < b ? a : b, j = a < b ? b : a;
    return 1 + kDim + i * kDim - i * (i - 1) / 2 + (j - i);
  };
  if (f < 128) return pair(f % 16, (f % 16 + f / 16) % 16);
  if (f < 144) return 1 + (f - 128);
  if (f < 152) return pair(f - 144, f - 144 + 8);
  return f == 152 ? 0 : -1;
}

constexpr float kLinearScale = 0.5f;         // d^(-1/4)
constexpr float kPairScale = 0.25f;          // d^(-1/2)
constexpr float kSquareScale = 0.17677669529663687f;  // (2d)^(-1/2)

// Which token of the sequence is step t of a sweep: the forward and the dq sweep walk it in order, the dk/dv
// sweep backwards (as a causal forward over the reversed sequence).
struct TokenOrder {
  int seqlen;
  bool reverse;
  __device__ __forceinline__ int64_t row(int t) const { return reverse ? seqlen - 1 - t : t; }
};

template <class Element>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<Element, cutlass::bfloat16_t>) {
    __nv_bfloat162 p = __floats2bfloat162_rn(lo, hi);
    return reinterpret_cast<uint32_t&>(p);
  } else {
    __half2 p = __floats2half2_rn(lo, hi);
    return reinterpret_cast<uint32_t&>(p);
  }
}

// 1 / x for the per-token normalisers (x >= 1/2): the hardware reciprocal (one instruction, within 1 ulp), where
// IEEE division costs a Newton step and a slow-path branch per call, which the backward makes dozens of per chunk.
__device__ __forceinline__ float reciprocal(float x) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}

template <class Element>
__device__ __forceinline__ float to_float(Element x) {
  return static_cast<float>(x);
}

// A row of y readied for its features times `scale` at one multiply each: y = x sqrt(scale) d^(-1/4), so that the
// pair features x_a x_b scale / sqrt(d) are y_a y_b, the squares y_a^2 / sqrt(2), the linear features
// x_a scale d^(-1/4) are y_a sqrt(scale) (as d^(-1/4) = sqrt(d^(-1/2))) and the constant one is `scale`.
struct ScaledRow {
  float y[kDim];
  float root, scale;  // sqrt(scale), scale
};

__device__ __forceinline__ ScaledRow scaled_row(const float (&x)[kDim], float scale) {
  ScaledRow r;
  r.scale = scale;
  r.root = sqrtf(scale);
  CUTE_UNROLL
  for (int i = 0; i < kDim; ++i) r.y[i] = x[i] * (r.root * kLinearScale);
  return r;
}

constexpr float kSquareOverPair = kSquareScale / kPairScale;  // 1 / sqrt(2)

// Internal feature f of a scaled row (f a compile-time constant after unrolling).
template <int F>
__device__ __forceinline__ float feature(const ScaledRow& r) {
  if constexpr (F < 16) {
    return r.y[F] * r.y[F] * kSquareOverPair;
  } else if constexpr (F < 128) {
    return r.y[F % 16] * r.y[(F % 16 + F / 16) % 16];
  } else if constexpr (F < 144) {
    return r.y[F - 128] * r.root;
  } else if constexpr (F < 152) {
    return r.y[F - 144] * r.y[F - 144 + 8];
  } else {
    return F == 152 ? r.scale : 0.f;
  }
}

// Features [F, F + 8) of one scaled row, packed for one 16-byte store.
template <int F, class Element>
__device__ __forceinline__ uint4 pack_features(const ScaledRow& r) {
  auto two = [&](float f0, float f1) { return pack2<Element>(f0, f1); };
  return make_uint4(two(feature<F>(r), feature<F + 1>(r)), two(feature<F + 2>(r), feature<F + 3>(r)),
                    two(feature<F + 4>(r), feature<F + 5>(r)), two(feature<F + 6>(r), feature<F + 7>(r)));
}

// Chunk c of the rows of v (64 tokens x DV, in `order`) into a shared-memory tensor indexed (value column,
// token), by the 128 threads of one warpgroup with 16-byte copies; tokens past the end are zeros.
// The destination is a 32-bit shared address plus the layout's offset, which skips generic pointer arithmetic.
template <int DV, class Layout, class Element>
__device__ __forceinline__ void load_values(uint32_t s_v, const Element* v, int64_t seq_stride, int c,
                                            const TokenOrder& order, int tid) {
  constexpr int kPerRow = DV / 8;
  static_assert(kChunk * kPerRow % 128 == 0, "every thread copies the same number of 16-byte pieces");
  CUTE_UNROLL
  for (int i = tid; i < kChunk * kPerRow; i += 128) {
    const int row = i / kPerRow, col = (i % kPerRow) * 8;
    const int t = c * kChunk + row;
    const bool valid = t < order.seqlen;
    cp_async_16_at(s_v + smem_offset<Layout, Element>(col, row), v + order.row(valid ? t : 0) * seq_stride + col,
                   valid);
  }
}

// Features [F, End) of one token's scaled row into its row of phi(k), 8 per 16-byte store.
template <int F, int End, class Element, class PhiKLayout>
__device__ __forceinline__ void store_features(const ScaledRow& r, uint32_t phi_address, int t) {
  st_shared_at(phi_address + smem_offset<PhiKLayout, Element>(F, t), pack_features<F, Element>(r));
  if constexpr (F + 8 < End) store_features<F + 8, End, Element, PhiKLayout>(r, phi_address, t);
}

// Row `row` of q from shared memory as floats, rotated left by 2 * `lane_in_quad` elements: x[i] = q[row][(2L + i)
// % 16]. Two 16-byte loads, then a barrel shifter over the eight bf16/fp16 pairs, so no register is indexed at run
// time.
template <class Element, class SQ>
__device__ __forceinline__ void load_rotated_row(const SQ& s_q, int row, int lane_in_quad, float (&x)[kDim]) {
  const uint4 lo = ld_shared_128(&s_q(row, 0));
  const uint4 hi = ld_shared_128(&s_q(row, 8));
  uint32_t w[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
  CUTE_UNROLL
  for (int bit = 1; bit < 4; bit *= 2) {
    const bool shift = lane_in_quad & bit;
    uint32_t r[8];
    CUTE_UNROLL
    for (int i = 0; i < 8; ++i) r[i] = shift ? w[(i + bit) % 8] : w[i];
    CUTE_UNROLL
    for (int i = 0; i < 8; ++i) w[i] = r[i];
  }
  const Element* e = reinterpret_cast<const Element*>(w);
  CUTE_UNROLL
  for (int i = 0; i < kDim; ++i) x[i] = to_float(e[i]);
}

// phi(q) of one of a thread's rows (j1 = 0: row r0, 1: r0 + 8) in the register layout of a wgmma A operand (64 x
// 160, ten k-blocks of 16): value j0 + 2*j1 + 4*j2 + 8*kb holds column 16*kb + 2*L + j0 + 8*j2 (L = lane % 4).
// `x` is the row rotated by 2L (load_rotated_row), so every feature index below is a compile-time constant.
template <int J1, class Element, class Fragment>
__device__ __forceinline__ void build_phi_q(const float (&x)[kDim], int lane_in_quad, Fragment& frag) {
  const ScaledRow r = scaled_row(x, 1.f);
  CUTE_UNROLL
  for (int j2 = 0; j2 < 2; ++j2) {
    CUTE_UNROLL
    for (int j0 = 0; j0 < 2; ++j0) {
      const int o = j0 + 8 * j2;  // column offset within the k-block, less 2L
      const int v = j0 + 2 * J1 + 4 * j2;
      frag(v) = Element(r.y[o] * r.y[o] * kSquareOverPair);
      CUTE_UNROLL
      for (int delta = 1; delta < 8; ++delta) frag(v + 8 * delta) = Element(r.y[o] * r.y[(o + delta) % 16]);
      frag(v + 8 * 8) = Element(r.y[o]);
      // f = 144 + 2L + o: the pair (a, a + 8) for o < 8; then the constant (f = 152), then padding.
      const float last = j2 == 0 ? r.y[o] * r.y[o + 8] : (j0 == 0 && lane_in_quad == 0 ? 1.f : 0.f);
      frag(v + 8 * 9) = Element(last);
    }
  }
}

// One warpgroup's 64 x N x K wgmma product (fp32 accumulators): both operands in shared memory, or A in registers.
template <class Element, int N, int K, GMMA::Major MajorA, GMMA::Major MajorB>
using SsMma = decltype(make_tiled_mma(
    SM90::GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<N>, Int<K>>, MajorA, MajorB>()));
template <class Element, int N, int K, GMMA::Major MajorB>
using RsMma = decltype(make_tiled_mma(
    SM90::GMMA::rs_op_selector<Element, Element, float, Shape<_64, Int<N>, Int<K>>, GMMA::Major::K, MajorB>()));

// Calls launch(Int<DV>{}) for the run-time value dim, one of kFwdSm90ValueDims.
template <class Launch>
cudaError_t dispatch_value_dim(int dv, Launch&& launch) {
  switch (dv) {
    case 64: return launch(Int<64>{});
    case 112: return launch(Int<112>{});
    case 128: return launch(Int<128>{});
    default: return cudaErrorInvalidValue;
  }
}

// acc (+)= sum over the k-blocks of a(_, _, kb) b(_, _, kb) as one warpgroup's wgmma chain; `overwrite` starts
// from zero instead of acc's contents. The caller brackets it with warpgroup_arrive / warpgroup_commit_batch.
template <class Mma, class TA, class TB, class TC>
__device__ __forceinline__ void mma_k_blocks(Mma& mma, const TA& a, const TB& b, TC& acc, bool overwrite) {
  mma.accumulate_ = overwrite ? GMMA::ScaleOut::Zero : GMMA::ScaleOut::One;
  CUTE_UNROLL
  for (int kb = 0; kb < size<2>(a); ++kb) {
    gemm(mma, a(_, _, kb), b(_, _, kb), acc);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
}

// Raises Kernel's dynamic shared-memory limit to `bytes`, once per device rather than on every launch.
template <auto Kernel>
cudaError_t allow_shared_memory(int bytes) {
  static bool raised[64] = {};
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess || device >= 64 || raised[device]) return err;
  err = cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  raised[device] = err == cudaSuccess;
  return err;
}

// Shapes, shared-memory layouts and matrix products both sweeps use (the forward's and the backward's).
template <class Element, int DV>
struct StateConfig {
  static_assert(DV % 16 == 0 && DV >= 16 && DV <= 128, "value dim must be a multiple of 16 in [16, 128]");
  static constexpr int kSnapRows = DV + 8;                // state columns, then z (row DV), then zeros
  static constexpr int kStateRows = (DV + 63) / 64 * 64;  // rows of the state product (multiples of 64)

  using QKLayout = decltype(tile_to_shape(GMMA::Layout_K_SW32_Atom<Element>{}, Shape<Int<kChunk>, Int<kDim>>{}));
  // v^T as the A operand (M = value rows, K = tokens) of the state update.
  using VStateLayout = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<Element>{},
                                              Shape<Int<kStateRows>, Int<kChunk>>{}));
  // phi(k) as the B operand (N = features, K = tokens) of the state update.
  using PhiKLayout = decltype(tile_to_shape(GMMA::Layout_MN_SW64_Atom<Element>{},
                                            Shape<Int<kFeatures>, Int<kChunk>>{}));
  // The state snapshot, rows = value columns, K = features: the B operand of phi(q) @ S (its first kSnapRows or DV
  // rows), and where the state warpgroup writes its first kStateRows rows. Row blocks outermost, so every view
  // addresses a row alike; SnapByFeature is the same memory as an MN-major operand (N = features, K = rows).
  template <int Rows>
  using SnapLayout = decltype(tile_to_shape(GMMA::Layout_K_SW64_Atom<Element>{},
                                            Shape<Int<Rows>, Int<kFeatures>>{}, Step<_2, _1>{}));
  using SnapByFeature = decltype(tile_to_shape(GMMA::Layout_MN_SW64_Atom<Element>{},
                                               Shape<Int<kFeatures>, Int<DV>>{}));
  static constexpr int kSnapSize =
      cute::max(int(cosize_v<SnapLayout<kSnapRows>>), int(cosize_v<SnapLayout<kStateRows>>));

  using MmaScores = SsMma<Element, kChunk, kDim, GMMA::Major::K, GMMA::Major::K>;
  using MmaState = SsMma<Element, kFeatures, kChunk, GMMA::Major::MN, GMMA::Major::MN>;

  // Chunks of b and y in flight: loads run kLoadStages - 1 chunks ahead of the update (y's one further, as
  // phi(y) is built a chunk early); three where shared memory allows (every value dim's forward and backward
  // fit with two).
  static constexpr int kLoadStages = DV <= 64 ? 3 : 2;

  // The state warpgroup's buffers.
  struct Storage {
    array_aligned<Element, cosize_v<VStateLayout>, 1024> v[kLoadStages];
    array_aligned<Element, cosize_v<PhiKLayout>, 1024> phi_k[2];
    array_aligned<Element, kSnapSize, 1024> snap[2];
    array_aligned<Element, kChunk * kDim, 16> y_rows[kLoadStages];  // [token][dim]
    float den[kLoadStages][kChunk];
    float w[kLoadStages][kChunk];
    float z_weight[2][kChunk];
  };
};

// z = sum over tokens of z_weight_t phi(y_t) on the tensor cores, as z^T = phi(y)^T W per 16-feature tile: a
// 16 x 8 x 64 mma.sync product per tile and chunk whose B = W holds the tokens' z weights rounded to Element in
// column 0 and their rounding remainders in column 1 (zeros elsewhere), so the two accumulator columns, which the
// same lane holds, sum to z at fp32 accuracy. Warp w keeps tiles w, w + 4 and (warps 0, 1) w + 8 of the ten.
// phi(y)^T comes in with transposing ldmatrix straight from the swizzled layout the state update reads.
template <class Element>
struct ZSum {
  using Mma = std::conditional_t<std::is_same_v<Element, cutlass::bfloat16_t>, SM80_16x8x16_F32BF16BF16F32_TN,
                                 SM80_16x8x16_F32F16F16F32_TN>;
  static constexpr int kTiles = kFeatures / 16;
  static constexpr int kTilesPerWarp = (kTiles + 3) / 4;
  // Tile i of this warp: rows g and g + 8 (features 16 tile + g, + 8) in acc[i][0..1] and acc[i][2..3] of the
  // lanes with lane % 4 == 0; the other lanes' columns are zero.
  float acc[kTilesPerWarp][4];
  int warp, lane;

  __device__ __forceinline__ int tile(int i) const { return warp + 4 * i; }
  __device__ __forceinline__ bool has_tile(int i) const { return tile(i) < kTiles; }
  __device__ __forceinline__ int feature(int i, int upper) const { return 16 * tile(i) + lane / 4 + 8 * upper; }

  __device__ __forceinline__ void init(const float* ksum0, int tid) {
    warp = tid / 32, lane = tid % 32;
    CUTE_UNROLL
    for (int i = 0; i < kTilesPerWarp; ++i) {
      CUTE_UNROLL
      for (int v = 0; v < 4; ++v) {
        const int e = has_tile(i) ? public_feature(feature(i, v / 2)) : -1;
        acc[i][v] = (ksum0 != nullptr && lane % 4 == 0 && v % 2 == 0 && e >= 0) ? ksum0[e] : 0.f;
      }
    }
  }

  // Adds one chunk: phi(y) at shared address `phi_address` in PhiKLayout (features x tokens), z weights in
  // `weights` ([64] fp32), or all `uniform_weight` when `weights` is null.
  template <class PhiKLayout>
  __device__ __forceinline__ void add(uint32_t phi_address, const float* weights, float uniform_weight) {
    const int col = lane / 4, q = lane % 4;
    CUTE_UNROLL
    for (int kk = 0; kk < kChunk / 16; ++kk) {
      // B: lanes 0-3 hold column 0 (tokens 16 kk + 2q, + 1 in b[0]; + 8 in b[1]), lanes 4-7 column 1.
      uint32_t b[2] = {0, 0};
      if (col < 2) {
        CUTE_UNROLL
        for (int half = 0; half < 2; ++half) {
          float w[2];
          CUTE_UNROLL
          for (int i = 0; i < 2; ++i) w[i] = weights != nullptr ? weights[16 * kk + 8 * half + 2 * q + i] : uniform_weight;
          const Element hi0(w[0]), hi1(w[1]);
          b[half] = col == 0 ? pack2<Element>(w[0], w[1])
                             : pack2<Element>(w[0] - static_cast<float>(hi0), w[1] - static_cast<float>(hi1));
        }
      }
      CUTE_UNROLL
      for (int i = 0; i < kTilesPerWarp; ++i) {
        if (!has_tile(i)) continue;
        // A = phi(y)^T of the tile's 16 features x 16 tokens: matrix m of the four is features + 8 (m % 2),
        // tokens + 8 (m / 2); lane l gives the address of row (token) l % 8 of matrix l / 8.
        const int token = 16 * kk + 8 * (lane / 16) + lane % 8;
        uint32_t a[4];
        ldmatrix_x4_trans(phi_address + smem_offset<PhiKLayout, Element>(16 * tile(i) + 8 * ((lane / 8) % 2), token), a);
        Mma::fma(acc[i][0], acc[i][1], acc[i][2], acc[i][3], a[0], a[1], a[2], a[3], b[0], b[1], acc[i][0],
                 acc[i][1], acc[i][2], acc[i][3]);
      }
    }
  }

  // z's snapshot row (bf16/fp16) through `write(f, z_f)` and, when `out` is given, z in the public layout.
  template <class Write>
  __device__ __forceinline__ void store(Write&& write, float* out) const {
    if (lane % 4 != 0) return;
    CUTE_UNROLL
    for (int i = 0; i < kTilesPerWarp; ++i) {
      CUTE_UNROLL
      for (int upper = 0; upper < 2 && has_tile(i); ++upper) {
        const int f = feature(i, upper), e = public_feature(f);
        const float z = acc[i][2 * upper] + acc[i][2 * upper + 1];
        write(f, z);
        if (out != nullptr && e >= 0) out[e] = z;
      }
    }
  }
};

// One sweep's state, S = S0 + sum over tokens of phi(y_t) [b_t / den_t, z_weight_t] (rows: features), for the
// state warpgroup. The forward has y = k, b = v, den = 1, z_weight = 1; the backward's sweeps are in
// linear_attention_bwd.cuh. Every pointer is at this (batch, head); the states are in the public layout.
template <class Element>
struct StateSweep {
  const Element* y;
  int64_t y_stride;
  const Element* b;
  int64_t b_stride;
  const float* den;   // [T] per-token divisor of b, or null (1)
  const float* w;     // [T] z_weight = w, or null: z_weight = 1 when z_ones, else 0
  bool z_ones;
  const float* kv0;   // [153, DV] or null (zeros)
  const float* ksum0; // [153] or null
  float* kv_out;      // [153, DV] or null (not written)
  float* ksum_out;    // [153]
  TokenOrder order;
};

// The state warpgroup: phi(y) into shared memory, S_{c+1}^T = S_c^T + b^T phi(y) in fp32 registers, and a bf16
// (fp16) snapshot of S_c in snap[c % 2] (row DV: z) for the other warpgroup, announced on kFull0 + c % 2 and
// reused once it arrives on kEmpty0 + c % 2.
template <class Element, int DV>
__device__ __forceinline__ void state_warpgroup(typename StateConfig<Element, DV>::Storage& smem,
                                                const StateSweep<Element>& sw, int n_chunks, int tid) {
  using Cfg = StateConfig<Element, DV>;
  constexpr int kSnapRows = Cfg::kSnapRows;
  constexpr int kStateRows = Cfg::kStateRows;
  using SnapOut = typename Cfg::template SnapLayout<kSnapRows>;
  using SnapState = typename Cfg::template SnapLayout<kStateRows>;
  typename Cfg::MmaState mma_state;
  auto thr_state = mma_state.get_thread_slice(tid);
  Tensor acc = partition_fragment_C(mma_state, Shape<Int<kStateRows>, Int<kFeatures>>{});
  Tensor coord = thr_state.partition_C(make_identity_tensor(Shape<Int<kStateRows>, Int<kFeatures>>{}));
  CUTE_UNROLL
  for (int i = 0; i < size(acc); ++i) {
    const int m = get<0>(coord(i)), e = public_feature(get<1>(coord(i)));
    acc(i) = (sw.kv0 != nullptr && m < DV && e >= 0) ? sw.kv0[e * DV + m] : 0.f;
  }
  ZSum<Element> z;
  z.init(sw.ksum0, tid);
  // Zero the snapshot rows past z's, in both buffers, once.
  constexpr int kZeroRows = kSnapRows - DV - 1;
  for (int i = tid; i < 2 * kZeroRows * kFeatures; i += 128) {
    const int buf = i / (kZeroRows * kFeatures), rest = i % (kZeroRows * kFeatures);
    Tensor s_snap = make_tensor(make_smem_ptr(smem.snap[buf].data()), SnapOut{});
    s_snap(DV + 1 + rest / kFeatures, rest % kFeatures) = Element(0.f);
  }
  // Columns DV.. of b^T stay zero.
  if constexpr (kStateRows > DV) {
    constexpr int kPad = (kStateRows - DV) * kChunk;
    for (int i = tid; i < Cfg::kLoadStages * kPad; i += 128) {
      Tensor s_v = make_tensor(make_smem_ptr(smem.v[i / kPad].data()), typename Cfg::VStateLayout{});
      s_v(DV + (i % kPad) / kChunk, i % kChunk) = Element(0.f);
    }
  }

  // The snapshot leaves the accumulators through stmatrix (8x8 bf16/fp16 tiles, four per instruction).
  auto snap_copy = make_tiled_copy_C(Copy_Atom<SM90_U32x4_STSM_N, Element>{}, mma_state);
  auto thr_snap_copy = snap_copy.get_thread_slice(tid);
  const int warp = tid / 32;
  auto write_snapshot = [&](int buf) {
    Tensor s_snap_out = make_tensor(make_smem_ptr(smem.snap[buf].data()), SnapOut{});
    Tensor s_snap = make_tensor(make_smem_ptr(smem.snap[buf].data()), SnapState{});
    Tensor src = thr_snap_copy.retile_S(acc);  // ((8 values of one stmatrix, k), m, 1)
    Tensor dst = thr_snap_copy.partition_D(s_snap);
    CUTE_UNROLL
    for (int m = 0; m < size<1>(dst); ++m) {
      // Row block m of a warp is rows 64m + 16 warp ... + 15; those at DV and past it are z's row and the zero
      // rows, which the state (always zero there) must not overwrite.
      if (kStateRows != DV && 64 * m + 16 * warp >= DV) continue;
      CUTE_UNROLL
      for (int k = 0; k < size<0, 1>(src); ++k) {
        // Converted one stmatrix at a time, so that no second copy of the state is ever live.
        Tensor tile = make_tensor<Element>(shape<0, 0>(src));
        Tensor tile_pairs = recast<uint32_t>(tile);
        CUTE_UNROLL
        for (int i = 0; i < size(tile_pairs); ++i) {
          tile_pairs(i) = pack2<Element>(src(make_coord(2 * i, k), m, 0), src(make_coord(2 * i + 1, k), m, 0));
        }
        copy(snap_copy, tile, dst(make_coord(_, k), m, 0));
      }
    }
    z.store([&](int f, float z_f) { st_shared(&s_snap_out(DV, f), Element(z_f).raw()); }, nullptr);
    cutlass::arch::fence_view_async_shared();
    bar_arrive(kFull0 + buf, 256);
  };
  write_snapshot(0);

  // Group i of cp.async copies: b of chunk i and y (with its scalars) of chunk i + 1, into stage (chunk) %
  // kLoadStages. Tokens past the end read nothing and come in as zeros.
  constexpr int kStages = Cfg::kLoadStages;
  auto load_y = [&](int c) {
    const int stage = c % kStages, t = c * kChunk + tid / 2;
    const bool valid = t < sw.order.seqlen;
    const int64_t row = sw.order.row(valid ? t : 0);
    cp_async_16_at(smem_address(smem.y_rows[stage].data() + tid * 8), sw.y + row * sw.y_stride + (tid % 2) * 8,
                   valid);
    // Thread j < 64 fetches token j's divisor, thread 64 + j its z weight.
    const int j = tid % kChunk, tj = c * kChunk + j;
    const float* scalars = tid < kChunk ? sw.den : sw.w;
    if (scalars != nullptr && tj < sw.order.seqlen) {
      cp_async_4(&(tid < kChunk ? smem.den : smem.w)[stage][j], scalars + sw.order.row(tj));
    }
  };
  auto issue_group = [&](int i) {
    if (i < n_chunks) {
      load_values<DV, typename Cfg::VStateLayout>(smem_address(smem.v[i % kStages].data()), sw.b, sw.b_stride, i,
                                                  sw.order, tid);
    }
    if (i + 1 < n_chunks) load_y(i + 1);
    cp_async_commit();
  };
  // Thread (token tid / 2, half tid % 2) builds features [80 * half, 80 * half + 80) of its token of chunk c.
  const int my_t = tid / 2, half = tid % 2;
  auto build_phi_y = [&](int c) {
    const int stage = c % kStages;
    const bool valid = c * kChunk + my_t < sw.order.seqlen;
    const uint4 lo = ld_shared_128(smem.y_rows[stage].data() + my_t * kDim);
    const uint4 hi = ld_shared_128(smem.y_rows[stage].data() + my_t * kDim + 8);
    const uint32_t words[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
    const Element* e = reinterpret_cast<const Element*>(words);
    float x[kDim];
    CUTE_UNROLL
    for (int i = 0; i < kDim; ++i) x[i] = to_float(e[i]);
    const float den = sw.den != nullptr && valid ? smem.den[stage][my_t] : 1.f;
    // A token past the end has phi(y) = 0; phi(y) is stored divided by den, and z adds z_weight * phi(y).
    const ScaledRow row = scaled_row(x, valid ? reciprocal(den) : 0.f);
    const uint32_t phi_address = smem_address(smem.phi_k[c % 2].data());
    if (half == 0) {
      store_features<0, 80, Element, typename Cfg::PhiKLayout>(row, phi_address, my_t);
      smem.z_weight[c % 2][my_t] = !valid ? 0.f : sw.w != nullptr ? smem.w[stage][my_t] * den
                                                                  : (sw.z_ones ? 1.f : 0.f);
    } else {
      store_features<80, 160, Element, typename Cfg::PhiKLayout>(row, phi_address, my_t);
    }
  };

  // Chunk c: its phi(y) and b are in shared memory when the loop reaches it; the update of the state by chunk
  // c runs on the tensor cores while the threads sum its phi(y) into z and build phi(y) of chunk c + 1.
  load_y(0);
  for (int i = 0; i < kStages - 1; ++i) issue_group(i);
  cp_async_wait<kStages - 2>();
  bar_sync(kStateGroup, 128);  // y of chunk 0 is in, from every thread's copies
  build_phi_y(0);
  for (int c = 0; c < n_chunks; ++c) {
    const int stage = c % 2;
    cp_async_wait<kStages - 2>();
    cutlass::arch::fence_view_async_shared();
    // phi(y) and b of chunk c and y of chunk c + 1 are complete; the update by chunk c - 1 is done, so its
    // buffers are free.
    bar_sync(kStateGroup, 128);
    issue_group(c + kStages - 1);

    Tensor s_v = make_tensor(make_smem_ptr(smem.v[c % kStages].data()), typename Cfg::VStateLayout{});
    Tensor s_phi = make_tensor(make_smem_ptr(smem.phi_k[stage].data()), typename Cfg::PhiKLayout{});
    Tensor t_v = thr_state.partition_fragment_A(s_v);
    Tensor t_phi = thr_state.partition_fragment_B(s_phi);
    warpgroup_fence_operand(acc);
    warpgroup_arrive();
    mma_k_blocks(mma_state, t_v, t_phi, acc, false);
    warpgroup_commit_batch();

    // z on the tensor cores too, while the update runs; then phi(y) of the next chunk.
    z.template add<typename Cfg::PhiKLayout>(smem_address(smem.phi_k[stage].data()),
                                            sw.w != nullptr ? smem.z_weight[stage] : nullptr, sw.z_ones ? 1.f : 0.f);
    if (c + 1 < n_chunks) build_phi_y(c + 1);
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc);

    if (c + 1 < n_chunks) {
      const int buf = (c + 1) % 2;
      if (c + 1 >= 2) bar_sync(kEmpty0 + buf, 256);
      write_snapshot(buf);
    }
  }

  if (sw.kv_out != nullptr) {
    CUTE_UNROLL
    for (int i = 0; i < size(acc); ++i) {
      const int m = get<0>(coord(i)), e = public_feature(get<1>(coord(i)));
      if (m < DV && e >= 0) sw.kv_out[e * DV + m] = acc(i);
    }
  }
  if (sw.kv_out != nullptr) z.store([](int, float) {}, sw.ksum_out);
}

}  // namespace based::la_sm90
