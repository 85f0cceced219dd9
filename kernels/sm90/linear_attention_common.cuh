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
// ksum of a chunk: 20 groups of 8 features times 6 partial sums over tokens, 120 of the state warpgroup's threads.
constexpr int kKsumGroups = 20;
constexpr int kKsumParts = 6;

// Named barriers (0 is __syncthreads).
// kFull0 + i: snapshot i written (state warpgroup arrives, the other waits); kEmpty0 + i: snapshot i read.
enum Barrier : int { kMathGroup = 1, kStateGroup = 2, kFull0 = 3, kEmpty0 = 5 };

__device__ __forceinline__ void bar_sync(int id, int count) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(count) : "memory");
}
__device__ __forceinline__ void bar_arrive(int id, int count) {
  asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(count) : "memory");
}

// 16-byte global -> shared copy; reads nothing and writes zeros when !valid.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(gmem), "r"(valid ? 16 : 0)
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
__device__ __forceinline__ void st_shared(void* p, uint32_t v) {
  asm volatile("st.shared.b32 [%0], %1;" ::"r"(smem_address(p)), "r"(v) : "memory");
}
__device__ __forceinline__ void st_shared(void* p, uint4 v) {
  asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};" ::"r"(smem_address(p)), "r"(v.x), "r"(v.y), "r"(v.z),
               "r"(v.w)
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
__device__ __forceinline__ uint16_t ld_shared_16(const void* p) {
  uint16_t v;
  asm volatile("ld.shared.b16 %0, [%1];" : "=h"(v) : "r"(smem_address(p)) : "memory");
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

template <class Element>
__device__ __forceinline__ float to_float(Element x) {
  return static_cast<float>(x);
}

// Internal feature f of the row x[0..15] (f a compile-time constant after unrolling).
template <int F>
__device__ __forceinline__ float feature(const float (&x)[kDim]) {
  if constexpr (F < 128) {
    constexpr int a = F % 16, b = (F % 16 + F / 16) % 16;
    return x[a] * x[b] * (F / 16 == 0 ? kSquareScale : kPairScale);
  } else if constexpr (F < 144) {
    return x[F - 128] * kLinearScale;
  } else if constexpr (F < 152) {
    return x[F - 144] * x[F - 144 + 8] * kPairScale;
  } else {
    return F == 152 ? 1.f : 0.f;
  }
}

// Features [F, F + 8) of one row times `scale`, packed for one 16-byte store (zeros for a token past the end).
template <int F, class Element>
__device__ __forceinline__ uint4 pack_features(const float (&x)[kDim], float scale, bool valid) {
  if (!valid) return make_uint4(0, 0, 0, 0);
  auto two = [&](auto f0, auto f1) { return pack2<Element>(f0 * scale, f1 * scale); };
  return make_uint4(two(feature<F>(x), feature<F + 1>(x)), two(feature<F + 2>(x), feature<F + 3>(x)),
                    two(feature<F + 4>(x), feature<F + 5>(x)), two(feature<F + 6>(x), feature<F + 7>(x)));
}

// Chunk c of the rows of v (64 tokens x DV, in `order`) into a shared-memory tensor indexed (value column,
// token), by the 128 threads of one warpgroup with 16-byte copies; tokens past the end are zeros.
template <int DV, class Element, class SV>
__device__ __forceinline__ void load_values(SV& s_v, const Element* v, int64_t seq_stride, int c,
                                            const TokenOrder& order, int tid) {
  constexpr int kPerRow = DV / 8;
  CUTE_UNROLL
  for (int i = tid; i < kChunk * kPerRow; i += 128) {
    const int row = i / kPerRow, col = (i % kPerRow) * 8;
    const int t = c * kChunk + row;
    const bool valid = t < order.seqlen;
    cp_async_16(&s_v(col, row), v + order.row(valid ? t : 0) * seq_stride + col, valid);
  }
}

// Features [F, End) of one token times `scale` into its row of phi(k), 8 per 16-byte store.
template <int F, int End, class Element, class PhiK>
__device__ __forceinline__ void store_features(const float (&x)[kDim], float scale, bool valid, PhiK& s_phi,
                                               int t) {
  st_shared(&s_phi(F, t), pack_features<F, Element>(x, scale, valid));
  if constexpr (F + 8 < End) store_features<F + 8, End, Element>(x, scale, valid, s_phi, t);
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
  CUTE_UNROLL
  for (int j2 = 0; j2 < 2; ++j2) {
    CUTE_UNROLL
    for (int j0 = 0; j0 < 2; ++j0) {
      const int o = j0 + 8 * j2;  // column offset within the k-block, less 2L
      const int v = j0 + 2 * J1 + 4 * j2;
      CUTE_UNROLL
      for (int delta = 0; delta < 8; ++delta) {
        frag(v + 8 * delta) = Element(x[o] * x[(o + delta) % 16] * (delta == 0 ? kSquareScale : kPairScale));
      }
      frag(v + 8 * 8) = Element(x[o] * kLinearScale);
      // f = 144 + 2L + o: the pair (a, a + 8) for o < 8; then the constant (f = 152), then padding.
      const float last = j2 == 0 ? x[o] * x[o + 8] * kPairScale : (j0 == 0 && lane_in_quad == 0 ? 1.f : 0.f);
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

  // The state warpgroup's buffers.
  struct Storage {
    array_aligned<Element, cosize_v<VStateLayout>, 1024> v[2];
    array_aligned<Element, cosize_v<PhiKLayout>, 1024> phi_k[2];
    array_aligned<Element, kSnapSize, 1024> snap[2];
    float ksum_parts[kKsumParts][kFeatures];
    float z_weight[2][kChunk];
  };
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
  // z of features tid and (tid < 32) 128 + tid.
  float ksum[2];
  CUTE_UNROLL
  for (int j = 0; j < 2; ++j) {
    const int f = tid + 128 * j, e = f < kFeatures ? public_feature(f) : -1;
    ksum[j] = (sw.ksum0 != nullptr && e >= 0) ? sw.ksum0[e] : 0.f;
  }
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
    for (int i = tid; i < 2 * kPad; i += 128) {
      Tensor s_v = make_tensor(make_smem_ptr(smem.v[i / kPad].data()), typename Cfg::VStateLayout{});
      s_v(DV + (i % kPad) / kChunk, i % kChunk) = Element(0.f);
    }
  }

  auto write_snapshot = [&](int buf) {
    Tensor s_snap_out = make_tensor(make_smem_ptr(smem.snap[buf].data()), SnapOut{});
    Tensor s_snap = make_tensor(make_smem_ptr(smem.snap[buf].data()), SnapState{});
    Tensor t_snap = thr_state.partition_C(s_snap);
    // Values 2i and 2i + 1 are features f, f + 1 of one row: one 4-byte store.
    CUTE_UNROLL
    for (int i = 0; i < size(acc); i += 2) {
      if (kStateRows == DV || get<0>(coord(i)) < DV) {
        st_shared(&t_snap(i), pack2<Element>(acc(i), acc(i + 1)));
      }
    }
    CUTE_UNROLL
    for (int j = 0; j < 2; ++j) {
      const int f = tid + 128 * j;
      if (f < kFeatures) s_snap_out(DV, f) = Element(ksum[j]);
    }
    cutlass::arch::fence_view_async_shared();
    bar_arrive(kFull0 + buf, 256);
  };
  write_snapshot(0);

  auto load_b = [&](int c, int stage) {
    Tensor s_v = make_tensor(make_smem_ptr(smem.v[stage].data()), typename Cfg::VStateLayout{});
    load_values<DV>(s_v, sw.b, sw.b_stride, c, sw.order, tid);
    cp_async_commit();
  };
  // Thread (token tid / 2, half tid % 2) builds features [80 * half, 80 * half + 80) of its token, from the raw
  // row of y (and its scalars) loaded one chunk earlier so that the loads' latency hides behind a whole chunk.
  const int my_t = tid / 2, half = tid % 2;
  struct Row {
    uint4 raw[2];
    float scale, z_weight;
  };
  auto load_y = [&](int c, Row& r) {
    const int t = c * kChunk + my_t;
    r.raw[0] = r.raw[1] = make_uint4(0, 0, 0, 0);
    r.scale = 1.f;
    r.z_weight = 0.f;
    if (t < sw.order.seqlen) {
      const int64_t row = sw.order.row(t);
      const uint4* src = reinterpret_cast<const uint4*>(sw.y + row * sw.y_stride);
      r.raw[0] = src[0];
      r.raw[1] = src[1];
      const float den = sw.den != nullptr ? sw.den[row] : 1.f;
      r.scale = 1.f / den;
      // z adds z_weight * phi(y), and phi(y) is stored divided by den.
      r.z_weight = sw.w != nullptr ? sw.w[row] * den : (sw.z_ones ? 1.f : 0.f);
    }
  };
  auto build_phi_y = [&](int c, const Row& r) {
    Tensor s_phi = make_tensor(make_smem_ptr(smem.phi_k[c % 2].data()), typename Cfg::PhiKLayout{});
    const Element* e = reinterpret_cast<const Element*>(r.raw);
    float x[kDim];
    CUTE_UNROLL
    for (int i = 0; i < kDim; ++i) x[i] = to_float(e[i]);
    const bool valid = c * kChunk + my_t < sw.order.seqlen;
    if (half == 0) {
      store_features<0, 80, Element>(x, r.scale, valid, s_phi, my_t);
      smem.z_weight[c % 2][my_t] = r.z_weight;
    } else {
      store_features<80, 160, Element>(x, r.scale, valid, s_phi, my_t);
    }
  };

  // Chunk c: its phi(y) and b are in shared memory when the loop reaches it; the update of the state by chunk
  // c runs on the tensor cores while the threads sum its phi(y) into z and build phi(y) of chunk c + 1.
  Row y_row;
  load_y(0, y_row);
  load_b(0, 0);
  build_phi_y(0, y_row);
  if (n_chunks > 1) load_y(1, y_row);
  for (int c = 0; c < n_chunks; ++c) {
    const int stage = c % 2;
    cp_async_wait<0>();
    cutlass::arch::fence_view_async_shared();
    // phi(y) and b of chunk c are complete; the update by chunk c - 1 is done, so its buffers are free.
    bar_sync(kStateGroup, 128);
    if (c + 1 < n_chunks) load_b(c + 1, stage ^ 1);

    Tensor s_v = make_tensor(make_smem_ptr(smem.v[stage].data()), typename Cfg::VStateLayout{});
    Tensor s_phi = make_tensor(make_smem_ptr(smem.phi_k[stage].data()), typename Cfg::PhiKLayout{});
    Tensor t_v = thr_state.partition_fragment_A(s_v);
    Tensor t_phi = thr_state.partition_fragment_B(s_phi);
    warpgroup_fence_operand(acc);
    warpgroup_arrive();
    mma_k_blocks(mma_state, t_v, t_phi, acc, false);
    warpgroup_commit_batch();

    // z: thread (group g, part) adds features [8g, 8g + 8) over tokens part, part + 6, ... with 16-byte loads;
    // then thread f adds the six parts of feature f.
    if (tid < kKsumGroups * kKsumParts) {
      const int g = tid % kKsumGroups, part = tid / kKsumGroups;
      float sum[8] = {};
      for (int t = part; t < kChunk; t += kKsumParts) {
        const uint4 raw = ld_shared_128(&s_phi(8 * g, t));
        const Element* e = reinterpret_cast<const Element*>(&raw);
        const float weight = smem.z_weight[stage][t];
        CUTE_UNROLL
        for (int i = 0; i < 8; ++i) sum[i] += to_float(e[i]) * weight;
      }
      CUTE_UNROLL
      for (int i = 0; i < 8; ++i) smem.ksum_parts[part][8 * g + i] = sum[i];
    }
    if (c + 1 < n_chunks) {
      build_phi_y(c + 1, y_row);
      if (c + 2 < n_chunks) load_y(c + 2, y_row);
    }
    bar_sync(kStateGroup, 128);
    CUTE_UNROLL
    for (int j = 0; j < 2; ++j) {
      const int f = tid + 128 * j;
      if (f < kFeatures) {
        CUTE_UNROLL
        for (int part = 0; part < kKsumParts; ++part) ksum[j] += smem.ksum_parts[part][f];
      }
    }
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
    CUTE_UNROLL
    for (int j = 0; j < 2; ++j) {
      const int f = tid + 128 * j, e = f < kFeatures ? public_feature(f) : -1;
      if (e >= 0) sw.ksum_out[e] = ksum[j];
    }
  }
}

}  // namespace based::la_sm90
