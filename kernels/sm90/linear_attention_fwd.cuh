// Causal Taylor linear attention, forward, for Hopper (sm_90a): wgmma through CuTe, one CTA per (batch, head).
//
// The sequence is cut into chunks of 64 tokens. For chunk c with state S_c = sum over earlier tokens of
// phi(k) outer [v, 1]:
//   O_c = tril(1 + s + s^2/2) @ [v, 1] + phi(q) @ S_c,   s = q k^T / sqrt(16)
// whose last column is the normaliser. Two warpgroups split the work so that neither waits on the other's
// chain of dependent matrix products:
//   warpgroup 0 (output): S = Q K^T, the scores, O = A [V, 1] + phi(Q) S_c^T, the division, the stores;
//   warpgroup 1 (state):  phi(K) into shared memory, S_{c+1}^T = S_c^T + V^T phi(K) in fp32 registers, and a bf16
//                         (fp16) snapshot of S_{c+1} in shared memory, double-buffered, for warpgroup 0.
// The snapshots pass between them through named barriers (FULL: written, EMPTY: read). The state's feature
// order is internal (below) and converted to the public 153-feature layout only when the state enters or leaves.
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

#include "linear_attention_fwd.h"

namespace based::la_sm90 {

using FwdParams = LinearAttentionFwdParams;

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
enum Barrier : int { kOutputGroup = 1, kStateGroup = 2, kFull0 = 3, kEmpty0 = 5 };

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
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

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

template <class Element, int DV>
struct Config {
  static_assert(DV % 8 == 0 && DV >= 16 && DV <= 128, "value dim must be a multiple of 8 in [16, 128]");
  static constexpr int kOutCols = DV + 8;                 // v, then the normaliser (column DV), then zeros
  static constexpr int kStateRows = (DV + 63) / 64 * 64;  // rows of the state product (multiples of 64)

  using QKLayout = decltype(tile_to_shape(GMMA::Layout_K_SW32_Atom<Element>{}, Shape<Int<kChunk>, Int<kDim>>{}));
  // [v, 1] as the B operand (N = value columns, K = tokens) of the intra-chunk product.
  using VOutLayout = decltype(tile_to_shape(GMMA::Layout_MN_INTER_Atom<Element>{},
                                            Shape<Int<kOutCols>, Int<kChunk>>{}));
  // v^T as the A operand (M = value rows, K = tokens) of the state update.
  using VStateLayout = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<Element>{},
                                              Shape<Int<kStateRows>, Int<kChunk>>{}));
  // phi(k) as the B operand (N = features, K = tokens) of the state update.
  using PhiKLayout = decltype(tile_to_shape(GMMA::Layout_MN_SW64_Atom<Element>{},
                                            Shape<Int<kFeatures>, Int<kChunk>>{}));
  // The state snapshot, rows = value columns, K = features: the B operand (first kOutCols rows) of phi(q) @ S,
  // and where the state warpgroup writes its first kStateRows rows. Row blocks outermost, so both views address
  // a row alike.
  using SnapOutLayout = decltype(tile_to_shape(GMMA::Layout_K_SW64_Atom<Element>{},
                                               Shape<Int<kOutCols>, Int<kFeatures>>{}, Step<_2, _1>{}));
  using SnapStateLayout = decltype(tile_to_shape(GMMA::Layout_K_SW64_Atom<Element>{},
                                                 Shape<Int<kStateRows>, Int<kFeatures>>{}, Step<_2, _1>{}));
  static constexpr int kSnapSize = cute::max(int(cosize_v<SnapOutLayout>), int(cosize_v<SnapStateLayout>));

  using MmaScores = decltype(make_tiled_mma(
      SM90::GMMA::ss_op_selector<Element, Element, float, Shape<Int<kChunk>, Int<kChunk>, Int<kDim>>,
                                 GMMA::Major::K, GMMA::Major::K>()));
  using MmaIntra = decltype(make_tiled_mma(
      SM90::GMMA::rs_op_selector<Element, Element, float, Shape<Int<kChunk>, Int<kOutCols>, Int<kChunk>>,
                                 GMMA::Major::K, GMMA::Major::MN>()));
  using MmaInter = decltype(make_tiled_mma(
      SM90::GMMA::rs_op_selector<Element, Element, float, Shape<Int<kChunk>, Int<kOutCols>, Int<kFeatures>>,
                                 GMMA::Major::K, GMMA::Major::K>()));
  using MmaState = decltype(make_tiled_mma(
      SM90::GMMA::ss_op_selector<Element, Element, float, Shape<Int<64>, Int<kFeatures>, Int<kChunk>>,
                                 GMMA::Major::MN, GMMA::Major::MN>()));

  struct SharedStorage {
    array_aligned<Element, cosize_v<QKLayout>, 1024> q[2];
    array_aligned<Element, cosize_v<QKLayout>, 1024> k[2];
    array_aligned<Element, cosize_v<VOutLayout>, 1024> v_out[2];
    array_aligned<Element, cosize_v<VStateLayout>, 1024> v_state[2];
    array_aligned<Element, cosize_v<PhiKLayout>, 1024> phi_k[2];
    array_aligned<Element, kSnapSize, 1024> snap[2];
    float ksum_parts[kKsumParts][kFeatures];
  };
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

// Features [F, F + 8) of one row, packed for one 16-byte store (zeros for a token past the end).
template <int F, class Element>
__device__ __forceinline__ uint4 pack_features(const float (&x)[kDim], bool valid) {
  if (!valid) return make_uint4(0, 0, 0, 0);
  return make_uint4(pack2<Element>(feature<F>(x), feature<F + 1>(x)), pack2<Element>(feature<F + 2>(x), feature<F + 3>(x)),
                    pack2<Element>(feature<F + 4>(x), feature<F + 5>(x)), pack2<Element>(feature<F + 6>(x), feature<F + 7>(x)));
}

// Chunk c of v (64 tokens x DV) into a shared-memory tensor indexed (value column, token), by the 128 threads of
// one warpgroup with 16-byte copies; tokens past the end are zeros.
template <int DV, class Element, class SV>
__device__ __forceinline__ void load_values(SV& s_v, const Element* v, int64_t seq_stride, int c, int seqlen,
                                            int tid) {
  constexpr int kPerRow = DV / 8;
  CUTE_UNROLL
  for (int i = tid; i < kChunk * kPerRow; i += 128) {
    const int row = i / kPerRow, col = (i % kPerRow) * 8;
    const int t = c * kChunk + row;
    const bool valid = t < seqlen;
    cp_async_16(&s_v(col, row), v + (valid ? t : 0) * seq_stride + col, valid);
  }
}

// Features [F, End) of one token into its row of phi(k), 8 per 16-byte store.
template <int F, int End, class Element, class PhiK>
__device__ __forceinline__ void store_features(const float (&x)[kDim], bool valid, PhiK& s_phi, int t) {
  *reinterpret_cast<uint4*>(&s_phi(F, t)) = pack_features<F, Element>(x, valid);
  if constexpr (F + 8 < End) store_features<F + 8, End, Element>(x, valid, s_phi, t);
}

// Row `row` of q from shared memory as floats, rotated left by 2 * `lane_in_quad` elements: x[i] = q[row][(2L + i)
// % 16]. Two 16-byte loads, then a barrel shifter over the eight bf16/fp16 pairs, so no register is indexed at run
// time.
template <class Element, class SQ>
__device__ __forceinline__ void load_rotated_row(const SQ& s_q, int row, int lane_in_quad, float (&x)[kDim]) {
  uint4 lo = *reinterpret_cast<const uint4*>(&s_q(row, 0));
  uint4 hi = *reinterpret_cast<const uint4*>(&s_q(row, 8));
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

template <class Element, int DV>
__global__ void __launch_bounds__(kThreads, 1) linear_attention_fwd_kernel(const FwdParams p) {
#if defined(__CUDA_ARCH__) && defined(CUTE_ARCH_MMA_SM90A_ENABLED)
  using Cfg = Config<Element, DV>;
  constexpr int kOutCols = Cfg::kOutCols;
  constexpr int kStateRows = Cfg::kStateRows;
  extern __shared__ __align__(1024) char smem_raw[];
  auto& smem = *reinterpret_cast<typename Cfg::SharedStorage*>(smem_raw);

  const int bh = blockIdx.x;
  const int b = bh / p.heads, h = bh % p.heads;
  const int n_chunks = (p.seqlen + kChunk - 1) / kChunk;
  const int warpgroup = threadIdx.x / 128;
  const int tid = threadIdx.x % 128;
  const Element* q = static_cast<const Element*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
  const Element* k = static_cast<const Element*>(p.k) + b * p.k_batch_stride + h * p.k_head_stride;
  const Element* v = static_cast<const Element*>(p.v) + b * p.v_batch_stride + h * p.v_head_stride;

  if (warpgroup == 0) {
    // ---------------- output warpgroup ----------------
    Tensor s_v_init = make_tensor(make_smem_ptr(smem.v_out[0].data()), typename Cfg::VOutLayout{});
    // Columns DV.. of [v, 1] never change: 1 in column DV (the normaliser), zeros after.
    for (int i = tid; i < 2 * (kOutCols - DV) * kChunk; i += 128) {
      const int stage = i / ((kOutCols - DV) * kChunk), rest = i % ((kOutCols - DV) * kChunk);
      const int col = DV + rest / kChunk, t = rest % kChunk;
      Tensor s_v = make_tensor(make_smem_ptr(smem.v_out[stage].data()), typename Cfg::VOutLayout{});
      s_v(col, t) = Element(col == DV ? 1.f : 0.f);
    }
    (void)s_v_init;
    auto load_chunk = [&](int c, int stage) {
      const int row = tid / 2, col = (tid % 2) * 8;
      const int t = c * kChunk + row;
      const bool valid = t < p.seqlen;
      const int tt = valid ? t : 0;
      Tensor s_q = make_tensor(make_smem_ptr(smem.q[stage].data()), typename Cfg::QKLayout{});
      Tensor s_k = make_tensor(make_smem_ptr(smem.k[stage].data()), typename Cfg::QKLayout{});
      cp_async_16(&s_q(row, col), q + tt * p.q_seq_stride + col, valid);
      cp_async_16(&s_k(row, col), k + tt * p.k_seq_stride + col, valid);
      Tensor s_v = make_tensor(make_smem_ptr(smem.v_out[stage].data()), typename Cfg::VOutLayout{});
      load_values<DV>(s_v, v, p.v_seq_stride, c, p.seqlen, tid);
    };

    typename Cfg::MmaScores mma_scores;
    typename Cfg::MmaIntra mma_intra;
    typename Cfg::MmaInter mma_inter;
    auto thr_scores = mma_scores.get_thread_slice(tid);
    auto thr_intra = mma_intra.get_thread_slice(tid);
    auto thr_inter = mma_inter.get_thread_slice(tid);
    Tensor acc_s = partition_fragment_C(mma_scores, Shape<Int<kChunk>, Int<kChunk>>{});
    Tensor acc_o = partition_fragment_C(mma_intra, Shape<Int<kChunk>, Int<kOutCols>>{});
    Tensor frag_a = make_tensor<Element>(Shape<Shape<_2, _2, _2>, _1, Int<kChunk / 16>>{});
    Tensor frag_phi = make_tensor<Element>(Shape<Shape<_2, _2, _2>, _1, Int<kFeatures / 16>>{});
    const int warp = tid / 32, lane = tid % 32, quad = lane % 4;
    const int r0 = warp * 16 + lane / 4;

    load_chunk(0, 0);
    cp_async_commit();
    for (int c = 0; c < n_chunks; ++c) {
      const int stage = c % 2;
      if (c + 1 < n_chunks) load_chunk(c + 1, stage ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
      cutlass::arch::fence_view_async_shared();
      bar_sync(kOutputGroup, 128);

      Tensor s_q = make_tensor(make_smem_ptr(smem.q[stage].data()), typename Cfg::QKLayout{});
      Tensor s_k = make_tensor(make_smem_ptr(smem.k[stage].data()), typename Cfg::QKLayout{});
      Tensor s_v = make_tensor(make_smem_ptr(smem.v_out[stage].data()), typename Cfg::VOutLayout{});
      Tensor s_snap = make_tensor(make_smem_ptr(smem.snap[stage].data()), typename Cfg::SnapOutLayout{});

      // S = Q K^T
      Tensor t_q = thr_scores.partition_fragment_A(s_q);
      Tensor t_k = thr_scores.partition_fragment_B(s_k);
      warpgroup_fence_operand(acc_s);
      warpgroup_arrive();
      mma_scores.accumulate_ = GMMA::ScaleOut::Zero;
      gemm(mma_scores, t_q(_, _, 0), t_k(_, _, 0), acc_s);
      warpgroup_commit_batch();

      // phi(Q) while the scores run.
      {
        float x[kDim];
        load_rotated_row<Element>(s_q, r0, quad, x);
        build_phi_q<0, Element>(x, quad, frag_phi);
        load_rotated_row<Element>(s_q, r0 + 8, quad, x);
        build_phi_q<1, Element>(x, quad, frag_phi);
      }

      warpgroup_wait<0>();
      warpgroup_fence_operand(acc_s);
      // A = tril(1 + s + s^2/2), straight into the A-operand registers (same thread/value layout).
      CUTE_UNROLL
      for (int i = 0; i < size(acc_s); ++i) {
        const int row = r0 + 8 * ((i / 2) % 2);
        const int col = 8 * (i / 4) + 2 * quad + i % 2;
        const float s = acc_s(i) * kPairScale;
        frag_a(i) = Element(col <= row ? 1.f + s + 0.5f * s * s : 0.f);
      }

      bar_sync(kFull0 + stage, 256);  // the state before this chunk is in snap[stage]
      Tensor t_v = thr_intra.partition_fragment_B(s_v);
      Tensor t_snap = thr_inter.partition_fragment_B(s_snap);
      warpgroup_fence_operand(acc_o);
      warpgroup_arrive();
      mma_intra.accumulate_ = GMMA::ScaleOut::Zero;
      CUTE_UNROLL
      for (int kb = 0; kb < kChunk / 16; ++kb) {
        gemm(mma_intra, frag_a(_, _, kb), t_v(_, _, kb), acc_o);
        mma_intra.accumulate_ = GMMA::ScaleOut::One;
      }
      mma_inter.accumulate_ = GMMA::ScaleOut::One;
      CUTE_UNROLL
      for (int kb = 0; kb < kFeatures / 16; ++kb) gemm(mma_inter, frag_phi(_, _, kb), t_snap(_, _, kb), acc_o);
      warpgroup_commit_batch();
      warpgroup_wait<0>();
      warpgroup_fence_operand(acc_o);
      if (c + 2 < n_chunks) bar_arrive(kEmpty0 + stage, 256);  // snap[stage] may now take the state after c + 1

      // Epilogue: the normaliser is column DV, held by the quad's first lane.
      CUTE_UNROLL
      for (int j1 = 0; j1 < 2; ++j1) {
        const int row = r0 + 8 * j1;
        const int t = c * kChunk + row;
        const float den = __shfl_sync(0xffffffffu, acc_o(4 * (DV / 8) + 2 * j1), lane & ~3) + p.eps;
        const float scale = p.normalize ? 1.f / den : 1.f;
        if (t < p.seqlen) {
          Element* o = static_cast<Element*>(p.o) + b * p.o_batch_stride + t * p.o_seq_stride + h * p.o_head_stride;
          CUTE_UNROLL
          for (int nb = 0; nb < DV / 8; ++nb) {
            const int col = 8 * nb + 2 * quad;
            *reinterpret_cast<uint32_t*>(o + col) =
                pack2<Element>(acc_o(4 * nb + 2 * j1) * scale, acc_o(4 * nb + 2 * j1 + 1) * scale);
          }
          if (p.den != nullptr && quad == 0) p.den[static_cast<int64_t>(bh) * p.seqlen + t] = den;
        }
      }
      bar_sync(kOutputGroup, 128);  // every thread is done with this stage before it is refilled
    }
  } else {
    // ---------------- state warpgroup ----------------
    typename Cfg::MmaState mma_state;
    auto thr_state = mma_state.get_thread_slice(tid);
    Tensor acc = partition_fragment_C(mma_state, Shape<Int<kStateRows>, Int<kFeatures>>{});
    Tensor coord = thr_state.partition_C(make_identity_tensor(Shape<Int<kStateRows>, Int<kFeatures>>{}));
    const int64_t state_offset = static_cast<int64_t>(bh) * kPublicFeatures;
    CUTE_UNROLL
    for (int i = 0; i < size(acc); ++i) {
      const int m = get<0>(coord(i)), f = get<1>(coord(i));
      const int e = public_feature(f);
      acc(i) = (p.kv0 != nullptr && m < DV && e >= 0) ? p.kv0[(state_offset + e) * DV + m] : 0.f;
    }
    // ksum of features tid and (tid < 32) 128 + tid.
    float ksum[2];
    CUTE_UNROLL
    for (int j = 0; j < 2; ++j) {
      const int f = tid + 128 * j, e = f < kFeatures ? public_feature(f) : -1;
      ksum[j] = (p.ksum0 != nullptr && e >= 0) ? p.ksum0[state_offset + e] : 0.f;
    }
    // Zero the snapshot rows past the normaliser's, in both buffers, once.
    constexpr int kZeroRows = kOutCols - DV - 1;
    for (int i = tid; i < 2 * kZeroRows * kFeatures; i += 128) {
      const int buf = i / (kZeroRows * kFeatures), rest = i % (kZeroRows * kFeatures);
      Tensor s_snap = make_tensor(make_smem_ptr(smem.snap[buf].data()), typename Cfg::SnapOutLayout{});
      s_snap(DV + 1 + rest / kFeatures, rest % kFeatures) = Element(0.f);
    }
    // Columns DV.. of v^T stay zero.
    if constexpr (kStateRows > DV) {
      constexpr int kPad = (kStateRows - DV) * kChunk;
      for (int i = tid; i < 2 * kPad; i += 128) {
        Tensor s_v = make_tensor(make_smem_ptr(smem.v_state[i / kPad].data()), typename Cfg::VStateLayout{});
        s_v(DV + (i % kPad) / kChunk, i % kChunk) = Element(0.f);
      }
    }

    auto write_snapshot = [&](int buf) {
      Tensor s_snap_out = make_tensor(make_smem_ptr(smem.snap[buf].data()), typename Cfg::SnapOutLayout{});
      Tensor s_snap = make_tensor(make_smem_ptr(smem.snap[buf].data()), typename Cfg::SnapStateLayout{});
      Tensor t_snap = thr_state.partition_C(s_snap);
      // Values 2i and 2i + 1 are features f, f + 1 of one row: one 4-byte store.
      CUTE_UNROLL
      for (int i = 0; i < size(acc); i += 2) {
        if (kStateRows == DV || get<0>(coord(i)) < DV) {
          *reinterpret_cast<uint32_t*>(&t_snap(i)) = pack2<Element>(acc(i), acc(i + 1));
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

    auto load_v = [&](int c, int stage) {
      Tensor s_v = make_tensor(make_smem_ptr(smem.v_state[stage].data()), typename Cfg::VStateLayout{});
      load_values<DV>(s_v, v, p.v_seq_stride, c, p.seqlen, tid);
      cp_async_commit();
    };
    // Thread (token tid / 2, half tid % 2) builds features [80 * half, 80 * half + 80) of its token, from the raw
    // key row loaded one chunk earlier so that the load's latency hides behind a whole chunk.
    const int my_t = tid / 2, half = tid % 2;
    auto load_k = [&](int c, uint4 (&raw)[2]) {
      const int t = c * kChunk + my_t;
      if (t < p.seqlen) {
        const uint4* src = reinterpret_cast<const uint4*>(k + t * p.k_seq_stride);
        raw[0] = src[0];
        raw[1] = src[1];
      } else {
        raw[0] = raw[1] = make_uint4(0, 0, 0, 0);
      }
    };
    auto build_phi_k = [&](int c, const uint4 (&raw)[2]) {
      Tensor s_phi = make_tensor(make_smem_ptr(smem.phi_k[c % 2].data()), typename Cfg::PhiKLayout{});
      const Element* e = reinterpret_cast<const Element*>(raw);
      float x[kDim];
      CUTE_UNROLL
      for (int i = 0; i < kDim; ++i) x[i] = to_float(e[i]);
      const bool valid = c * kChunk + my_t < p.seqlen;
      if (half == 0) {
        store_features<0, 80, Element>(x, valid, s_phi, my_t);
      } else {
        store_features<80, 160, Element>(x, valid, s_phi, my_t);
      }
    };

    // Chunk c: its phi(k) and v are in shared memory when the loop reaches it; the update of the state by chunk
    // c runs on the tensor cores while the threads sum its phi(k) into ksum and build phi(k) of chunk c + 1.
    uint4 k_raw[2];
    load_k(0, k_raw);
    load_v(0, 0);
    build_phi_k(0, k_raw);
    if (n_chunks > 1) load_k(1, k_raw);
    for (int c = 0; c < n_chunks; ++c) {
      const int stage = c % 2;
      cp_async_wait<0>();
      cutlass::arch::fence_view_async_shared();
      // phi(k) and v of chunk c are complete; the update by chunk c - 1 is done, so its buffers are free.
      bar_sync(kStateGroup, 128);
      if (c + 1 < n_chunks) load_v(c + 1, stage ^ 1);

      Tensor s_v = make_tensor(make_smem_ptr(smem.v_state[stage].data()), typename Cfg::VStateLayout{});
      Tensor s_phi = make_tensor(make_smem_ptr(smem.phi_k[stage].data()), typename Cfg::PhiKLayout{});
      Tensor t_v = thr_state.partition_fragment_A(s_v);
      Tensor t_phi = thr_state.partition_fragment_B(s_phi);
      warpgroup_fence_operand(acc);
      warpgroup_arrive();
      mma_state.accumulate_ = GMMA::ScaleOut::One;
      CUTE_UNROLL
      for (int kb = 0; kb < kChunk / 16; ++kb) gemm(mma_state, t_v(_, _, kb), t_phi(_, _, kb), acc);
      warpgroup_commit_batch();

      // ksum: thread (group g, part) adds features [8g, 8g + 8) over tokens part, part + 6, ... with 16-byte
      // loads; then thread f adds the six parts of feature f.
      if (tid < kKsumGroups * kKsumParts) {
        const int g = tid % kKsumGroups, part = tid / kKsumGroups;
        float sum[8] = {};
        for (int t = part; t < kChunk; t += kKsumParts) {
          const uint4 raw = *reinterpret_cast<const uint4*>(&s_phi(8 * g, t));
          const Element* e = reinterpret_cast<const Element*>(&raw);
          CUTE_UNROLL
          for (int i = 0; i < 8; ++i) sum[i] += to_float(e[i]);
        }
        CUTE_UNROLL
        for (int i = 0; i < 8; ++i) smem.ksum_parts[part][8 * g + i] = sum[i];
      }
      if (c + 1 < n_chunks) {
        build_phi_k(c + 1, k_raw);
        if (c + 2 < n_chunks) load_k(c + 2, k_raw);
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

    if (p.kv_out != nullptr) {
      CUTE_UNROLL
      for (int i = 0; i < size(acc); ++i) {
        const int m = get<0>(coord(i)), e = public_feature(get<1>(coord(i)));
        if (m < DV && e >= 0) p.kv_out[(state_offset + e) * DV + m] = acc(i);
      }
      CUTE_UNROLL
      for (int j = 0; j < 2; ++j) {
        const int f = tid + 128 * j, e = f < kFeatures ? public_feature(f) : -1;
        if (e >= 0) p.ksum_out[state_offset + e] = ksum[j];
      }
    }
  }
#endif
}

template <class Element, int DV>
cudaError_t launch(const FwdParams& p, cudaStream_t stream) {
  using Cfg = Config<Element, DV>;
  constexpr int smem = sizeof(typename Cfg::SharedStorage);
  auto kernel = linear_attention_fwd_kernel<Element, DV>;
  // The shared-memory limit is raised once per device, not on every launch.
  static bool raised[64] = {};
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if (device < 64 && !raised[device]) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
    raised[device] = true;
  }
  kernel<<<p.batch * p.heads, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace based::la_sm90
