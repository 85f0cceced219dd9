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
// order is internal (linear_attention_common.cuh) and converted to the public 153-feature layout only when the
// state enters or leaves.
#pragma once

#include "linear_attention_common.cuh"
#include "linear_attention_fwd.h"

namespace based::la_sm90 {

using FwdParams = LinearAttentionFwdParams;

template <class Element, int DV>
struct Config : StateConfig<Element, DV> {
  using Base = StateConfig<Element, DV>;
  static constexpr int kOutCols = Base::kSnapRows;  // v, then the normaliser (column DV), then zeros
  // [v, 1] as the B operand (N = value columns, K = tokens) of the intra-chunk product.
  using VOutLayout = decltype(tile_to_shape(GMMA::Layout_MN_INTER_Atom<Element>{},
                                            Shape<Int<kOutCols>, Int<kChunk>>{}));
  using SnapOut = typename Base::template SnapLayout<kOutCols>;
  using MmaIntra = RsMma<Element, kOutCols, kChunk, GMMA::Major::MN>;
  using MmaInter = RsMma<Element, kOutCols, kFeatures, GMMA::Major::K>;

  struct SharedStorage {
    array_aligned<Element, cosize_v<typename Base::QKLayout>, 1024> q[Base::kLoadStages];
    array_aligned<Element, cosize_v<typename Base::QKLayout>, 1024> k[Base::kLoadStages];
    array_aligned<Element, cosize_v<VOutLayout>, 1024> v_out[Base::kLoadStages];
    typename Base::Storage state;
  };
};

template <class Element, int DV>
__global__ void __launch_bounds__(kThreads, 1) linear_attention_fwd_kernel(const FwdParams p) {
#if defined(__CUDA_ARCH__) && defined(CUTE_ARCH_MMA_SM90A_ENABLED)
  using Cfg = Config<Element, DV>;
  constexpr int kOutCols = Cfg::kOutCols;
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
  const TokenOrder order{p.seqlen, false};

  if (warpgroup == 0) {
    // ---------------- output warpgroup ----------------
    // Columns DV.. of [v, 1] never change: 1 in column DV (the normaliser), zeros after.
    constexpr int kStages = Cfg::kLoadStages;
    for (int i = tid; i < kStages * (kOutCols - DV) * kChunk; i += 128) {
      const int stage = i / ((kOutCols - DV) * kChunk), rest = i % ((kOutCols - DV) * kChunk);
      const int col = DV + rest / kChunk, t = rest % kChunk;
      Tensor s_v = make_tensor(make_smem_ptr(smem.v_out[stage].data()), typename Cfg::VOutLayout{});
      s_v(col, t) = Element(col == DV ? 1.f : 0.f);
    }
    auto load_chunk = [&](int c, int stage) {
      const int row = tid / 2, col = (tid % 2) * 8;
      const int t = c * kChunk + row;
      const bool valid = t < p.seqlen;
      const int tt = valid ? t : 0;
      const uint32_t offset = smem_offset<typename Cfg::QKLayout, Element>(row, col);
      cp_async_16_at(smem_address(smem.q[stage].data()) + offset, q + tt * p.q_seq_stride + col, valid);
      cp_async_16_at(smem_address(smem.k[stage].data()) + offset, k + tt * p.k_seq_stride + col, valid);
      load_values<DV, typename Cfg::VOutLayout>(smem_address(smem.v_out[stage].data()), v, p.v_seq_stride, c, order,
                                                tid);
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

    // Chunks load kStages - 1 ahead, one cp.async group each.
    for (int i = 0; i < kStages - 1; ++i) {
      if (i < n_chunks) load_chunk(i, i);
      cp_async_commit();
    }
    for (int c = 0; c < n_chunks; ++c) {
      const int stage = c % kStages, buf = c % 2;  // load stage, snapshot buffer
      if (c + kStages - 1 < n_chunks) load_chunk(c + kStages - 1, (c + kStages - 1) % kStages);
      cp_async_commit();
      cp_async_wait<kStages - 1>();
      cutlass::arch::fence_view_async_shared();
      bar_sync(kMathGroup, 128);

      Tensor s_q = make_tensor(make_smem_ptr(smem.q[stage].data()), typename Cfg::QKLayout{});
      Tensor s_k = make_tensor(make_smem_ptr(smem.k[stage].data()), typename Cfg::QKLayout{});
      Tensor s_v = make_tensor(make_smem_ptr(smem.v_out[stage].data()), typename Cfg::VOutLayout{});
      Tensor s_snap = make_tensor(make_smem_ptr(smem.state.snap[buf].data()), typename Cfg::SnapOut{});

      // S = Q K^T
      Tensor t_q = thr_scores.partition_fragment_A(s_q);
      Tensor t_k = thr_scores.partition_fragment_B(s_k);
      warpgroup_fence_operand(acc_s);
      warpgroup_arrive();
      mma_k_blocks(mma_scores, t_q, t_k, acc_s, true);
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

      bar_sync(kFull0 + buf, 256);  // the state before this chunk is in snap[buf]
      Tensor t_v = thr_intra.partition_fragment_B(s_v);
      Tensor t_snap = thr_inter.partition_fragment_B(s_snap);
      warpgroup_fence_operand(acc_o);
      warpgroup_arrive();
      mma_k_blocks(mma_intra, frag_a, t_v, acc_o, true);
      mma_k_blocks(mma_inter, frag_phi, t_snap, acc_o, false);
      warpgroup_commit_batch();
      warpgroup_wait<0>();
      warpgroup_fence_operand(acc_o);
      if (c + 2 < n_chunks) bar_arrive(kEmpty0 + buf, 256);  // snap[buf] may now take the state after c + 1

      // Epilogue: the normaliser is column DV, held by the quad's first lane.
      CUTE_UNROLL
      for (int j1 = 0; j1 < 2; ++j1) {
        const int row = r0 + 8 * j1;
        const int t = c * kChunk + row;
        const float den = __shfl_sync(0xffffffffu, acc_o(4 * (DV / 8) + 2 * j1), lane & ~3) + p.eps;
        const float scale = p.normalize ? reciprocal(den) : 1.f;
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
      bar_sync(kMathGroup, 128);  // every thread is done with this stage before it is refilled
    }
  } else {
    const int64_t state_offset = static_cast<int64_t>(bh) * kPublicFeatures;
    StateSweep<Element> sw{};
    sw.y = k, sw.y_stride = p.k_seq_stride;
    sw.b = v, sw.b_stride = p.v_seq_stride;
    sw.z_ones = true;
    sw.kv0 = p.kv0 != nullptr ? p.kv0 + state_offset * DV : nullptr;
    sw.ksum0 = p.ksum0 != nullptr ? p.ksum0 + state_offset : nullptr;
    sw.kv_out = p.kv_out != nullptr ? p.kv_out + state_offset * DV : nullptr;
    sw.ksum_out = p.ksum_out != nullptr ? p.ksum_out + state_offset : nullptr;
    sw.order = order;
    state_warpgroup<Element, DV>(smem.state, sw, n_chunks, tid);
  }
#endif
}

template <class Element, int DV>
cudaError_t launch(const FwdParams& p, cudaStream_t stream) {
  using Cfg = Config<Element, DV>;
  constexpr int smem = sizeof(typename Cfg::SharedStorage);
  constexpr auto kernel = linear_attention_fwd_kernel<Element, DV>;
  cudaError_t err = allow_shared_memory<kernel>(smem);
  if (err != cudaSuccess) return err;
  kernel<<<p.batch * p.heads, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

// One dtype's launches, each instantiated in its own file (linear_attention_fwd_{bf16,fp16}.cu) so that the build
// compiles the two in parallel.
template <class Element>
cudaError_t launch_for_dtype(const FwdParams& p, int dv, cudaStream_t stream) {
  return dispatch_value_dim(dv, [&](auto dv_tag) { return launch<Element, decltype(dv_tag)::value>(p, stream); });
}
extern template cudaError_t launch_for_dtype<cutlass::bfloat16_t>(const FwdParams&, int, cudaStream_t);
extern template cudaError_t launch_for_dtype<cutlass::half_t>(const FwdParams&, int, cudaStream_t);

}  // namespace based::la_sm90
