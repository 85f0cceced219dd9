// Causal Taylor linear attention, backward, for Hopper (sm_90a): wgmma through CuTe, two sweeps per (batch, head).
//
// With a_ij = <phi(q_i), phi(k_j)> = 1 + s + s^2/2 (s = q_i.k_j / 4), g_i = do_i / den_i and
// w_i = -(do_i . o_i) / den_i (g = do and w = 0 without normalisation), and da_ij = g_i.v_j + w_i:
//   dq_i = sum_{j <= i} da_ij (1 + s_ij) k_j / 4,   dk_j = sum_{i >= j} da_ij (1 + s_ij) q_i / 4,
//   dv_j = sum_{i >= j} a_ij g_i.
// Both gradients of the feature rows have one form. For rows x with value-side vectors a and columns y with
// value-side vectors b (da_rc = a_r.b_c * scale_r * scale_c + a_w,r * b_w,c), chunk by chunk:
//   dx_r = sum over earlier chunks: J_phi(x_r)^T (S a_r)  +  within the chunk: sum_{c <= r} da_rc (1 + s_rc) y_c / 4
// with the state S = sum phi(y_c) [b_c, b_w,c] over earlier chunks (the forward's state warpgroup builds it), and
// J_phi^T applied in registers on the feature order of linear_attention_common.cuh. So one CTA runs
//   the dq sweep:    x = q, y = k, a = do (scaled by 1 / den, a_w = w), b = v (b_w = 1), forward in time, state
//                    from the forward's initial state; or
//   the dk/dv sweep: x = k, y = q, a = v (a_w = 1), b = do (scaled by 1 / den, b_w = w), backwards in time, state
//                    from the gradient of the final state; it also makes dv_j = phi(k_j) R[:, :DV] +
//                    sum a_ij g_i (R its state), and its last state is the initial state's gradient.
// The grid holds both: CTAs [0, B*H) the dk/dv sweeps, [B*H, 2*B*H) the dq sweeps.
#pragma once

#include <type_traits>

#include "linear_attention_bwd.h"
#include "linear_attention_common.cuh"

namespace based::la_sm90 {

using BwdParams = LinearAttentionBwdParams;

template <class Element, int DV>
struct BwdConfig : StateConfig<Element, DV> {
  using Base = StateConfig<Element, DV>;
  // Value tiles [64 tokens, DV] are read both as K-major operands (K = value columns) and as MN-major ones
  // (N = value columns): the same bytes when the swizzle atom spans whole rows of value columns.
  static constexpr int kAtomWidth = DV % 64 == 0 ? 64 : DV % 32 == 0 ? 32 : 16;
  using AtomK = std::conditional_t<kAtomWidth == 64, GMMA::Layout_K_SW128_Atom<Element>,
                                   std::conditional_t<kAtomWidth == 32, GMMA::Layout_K_SW64_Atom<Element>,
                                                      GMMA::Layout_K_SW32_Atom<Element>>>;
  using AtomMN = std::conditional_t<kAtomWidth == 64, GMMA::Layout_MN_SW128_Atom<Element>,
                                    std::conditional_t<kAtomWidth == 32, GMMA::Layout_MN_SW64_Atom<Element>,
                                                       GMMA::Layout_MN_SW32_Atom<Element>>>;
  using ValueByToken = decltype(tile_to_shape(AtomK{}, Shape<Int<kChunk>, Int<DV>>{}, Step<_2, _1>{}));
  using ValueByColumn = decltype(tile_to_shape(AtomMN{}, Shape<Int<DV>, Int<kChunk>>{}));
  // y [64 tokens, 16] (Base::QKLayout) as an MN-major operand (N = dims, K = tokens).
  using YByDim = decltype(tile_to_shape(GMMA::Layout_MN_SW32_Atom<Element>{}, Shape<Int<kDim>, Int<kChunk>>{}));
  using SnapZ = typename Base::template SnapLayout<Base::kSnapRows>;
  using SnapValues = typename Base::template SnapLayout<DV>;

  using MmaDa = SsMma<Element, kChunk, DV, GMMA::Major::K, GMMA::Major::K>;
  using MmaDx = RsMma<Element, kDim, kChunk, GMMA::Major::MN>;
  using MmaOutIntra = RsMma<Element, DV, kChunk, GMMA::Major::MN>;
  using MmaOutInter = RsMma<Element, DV, kFeatures, GMMA::Major::K>;
  using MmaP = SsMma<Element, kFeatures, DV, GMMA::Major::K, GMMA::Major::MN>;

  // dv = 128 double-buffered would not fit in 227 KB of shared memory.
  static constexpr int kValueStages = DV <= 112 ? 2 : 1;
  struct SharedStorage {
    array_aligned<Element, cosize_v<typename Base::QKLayout>, 1024> x[2];
    array_aligned<Element, cosize_v<typename Base::QKLayout>, 1024> y[2];
    array_aligned<Element, cosize_v<ValueByToken>, 1024> a[kValueStages];
    array_aligned<Element, cosize_v<ValueByToken>, 1024> b[kValueStages];
    alignas(16) float den[2][kChunk];  // read as float2 pairs
    alignas(16) float w[2][kChunk];
    typename Base::Storage state;
  };
};

// One sweep's gradient warpgroup (names as in the header comment). Pointers are at this (batch, head).
template <class Element>
struct GradSweep {
  const Element *x, *y, *a, *b;
  int64_t x_stride, y_stride, a_stride, b_stride;
  const float* den;  // [T] or null (no normalisation); w is null exactly when den is
  const float* w;
  bool den_on_rows;  // the dq sweep: rows take 1 / den and w; the dk/dv sweep: columns do
  Element* dx;       // [T, 16] rows of dq or dk
  Element* out;      // dk/dv sweep: dv [T, DV] rows; else null
  int64_t dx_stride, out_stride;
  TokenOrder order;
};

// The four quad lanes hold parts of one row's gradient, each rotated by its own 2 * lane (load_rotated_row). Lane
// L needs dims 2L + o of the others' parts, which sit at rotated index o + 2 (L - L'), a compile-time index picked
// by the sender's lane.
template <int O>
__device__ __forceinline__ float quad_sum(const float (&part)[kDim], int quad) {
  auto at = [&](int shift) { return part[(O + shift) % kDim]; };
  const float to1 = (quad & 1) == 0 ? at(2) : at(14);
  const float to2 = (quad & 2) == 0 ? at(4) : at(12);
  const float to3 = quad == 0 ? at(6) : quad == 1 ? at(2) : quad == 2 ? at(14) : at(10);
  return part[O] + __shfl_xor_sync(0xffffffffu, to1, 1) + __shfl_xor_sync(0xffffffffu, to2, 2) +
         __shfl_xor_sync(0xffffffffu, to3, 3);
}

template <class Element, int DV, bool kOut>
__device__ __forceinline__ void gradient_warpgroup(typename BwdConfig<Element, DV>::SharedStorage& smem,
                                                   const GradSweep<Element>& g, int n_chunks, int tid) {
  using Cfg = BwdConfig<Element, DV>;
  using QK = typename Cfg::QKLayout;
  constexpr int kStages = Cfg::kValueStages;
  const int warp = tid / 32, lane = tid % 32, quad = lane % 4;
  const int r0 = warp * 16 + lane / 4;
  const bool normalize = g.den != nullptr;

  auto load_rows = [&](int c, int stage) {
    const int row = tid / 2, col = (tid % 2) * 8;
    const int t = c * kChunk + row;
    const bool valid = t < g.order.seqlen;
    const int64_t tt = g.order.row(valid ? t : 0);
    const uint32_t offset = smem_offset<QK, Element>(row, col);
    cp_async_16_at(smem_address(smem.x[stage].data()) + offset, g.x + tt * g.x_stride + col, valid);
    cp_async_16_at(smem_address(smem.y[stage].data()) + offset, g.y + tt * g.y_stride + col, valid);
    if (normalize && tid < kChunk) {
      const int64_t r = g.order.row(min(c * kChunk + tid, g.order.seqlen - 1));
      cp_async_4(&smem.den[stage][tid], g.den + r);
      cp_async_4(&smem.w[stage][tid], g.w + r);
    }
  };
  auto load_value_tiles = [&](int c, int vstage) {
    using Layout = typename Cfg::ValueByColumn;
    load_values<DV, Layout>(smem_address(smem.a[vstage].data()), g.a, g.a_stride, c, g.order, tid);
    load_values<DV, Layout>(smem_address(smem.b[vstage].data()), g.b, g.b_stride, c, g.order, tid);
  };

  typename Cfg::MmaScores mma_scores;
  typename Cfg::MmaDa mma_da;
  typename Cfg::MmaDx mma_dx;
  typename Cfg::MmaOutIntra mma_out_intra;
  typename Cfg::MmaOutInter mma_out_inter;
  typename Cfg::MmaP mma_p;
  auto thr_scores = mma_scores.get_thread_slice(tid);
  auto thr_da = mma_da.get_thread_slice(tid);
  auto thr_dx = mma_dx.get_thread_slice(tid);
  auto thr_out_intra = mma_out_intra.get_thread_slice(tid);
  auto thr_out_inter = mma_out_inter.get_thread_slice(tid);
  auto thr_p = mma_p.get_thread_slice(tid);
  Tensor acc_s = partition_fragment_C(mma_scores, Shape<Int<kChunk>, Int<kChunk>>{});
  Tensor acc_da = partition_fragment_C(mma_da, Shape<Int<kChunk>, Int<kChunk>>{});
  Tensor acc_dx = partition_fragment_C(mma_dx, Shape<Int<kChunk>, Int<kDim>>{});
  Tensor acc_p = partition_fragment_C(mma_p, Shape<Int<kChunk>, Int<kFeatures>>{});
  Tensor frag_d = make_tensor<Element>(Shape<Shape<_2, _2, _2>, _1, Int<kChunk / 16>>{});

  load_rows(0, 0);
  load_value_tiles(0, 0);
  cp_async_commit();
  for (int c = 0; c < n_chunks; ++c) {
    const int stage = c % 2, vstage = c % kStages;
    if (c + 1 < n_chunks) {
      load_rows(c + 1, stage ^ 1);
      if constexpr (kStages == 2) load_value_tiles(c + 1, vstage ^ 1);
    }
    cp_async_commit();
    cp_async_wait<1>();
    cutlass::arch::fence_view_async_shared();
    bar_sync(kMathGroup, 128);

    Tensor s_x = make_tensor(make_smem_ptr(smem.x[stage].data()), QK{});
    Tensor s_y = make_tensor(make_smem_ptr(smem.y[stage].data()), QK{});
    Tensor s_y_by_dim = make_tensor(make_smem_ptr(smem.y[stage].data()), typename Cfg::YByDim{});
    Tensor s_a = make_tensor(make_smem_ptr(smem.a[vstage].data()), typename Cfg::ValueByToken{});
    Tensor s_b = make_tensor(make_smem_ptr(smem.b[vstage].data()), typename Cfg::ValueByToken{});
    Tensor s_b_by_col = make_tensor(make_smem_ptr(smem.b[vstage].data()), typename Cfg::ValueByColumn{});
    Tensor s_snap_v = make_tensor(make_smem_ptr(smem.state.snap[stage].data()), typename Cfg::SnapValues{});
    Tensor s_snap_f = make_tensor(make_smem_ptr(smem.state.snap[stage].data()), typename Cfg::SnapByFeature{});

    // s = X Y^T and a.b^T of the chunk.
    Tensor t_x = thr_scores.partition_fragment_A(s_x);
    Tensor t_y = thr_scores.partition_fragment_B(s_y);
    Tensor t_a = thr_da.partition_fragment_A(s_a);
    Tensor t_b = thr_da.partition_fragment_B(s_b);
    warpgroup_fence_operand(acc_s);
    warpgroup_fence_operand(acc_da);
    warpgroup_arrive();
    mma_k_blocks(mma_scores, t_x, t_y, acc_s, true);
    mma_k_blocks(mma_da, t_a, t_b, acc_da, true);
    warpgroup_commit_batch();

    // P = a S^T reads the snapshot of the state before this chunk. The dq sweep issues it now, so that it runs while
    // the threads build D and apply J^T; the dk/dv sweep, which holds more registers, after its other products, so
    // that it runs while the threads store dv.
    auto issue_p = [&] {
      Tensor t_a_p = thr_p.partition_fragment_A(s_a);
      Tensor t_snap_f = thr_p.partition_fragment_B(s_snap_f);
      warpgroup_fence_operand(acc_p);
      warpgroup_arrive();
      mma_k_blocks(mma_p, t_a_p, t_snap_f, acc_p, true);
      warpgroup_commit_batch();
    };
    if constexpr (!kOut) {
      bar_sync(kFull0 + stage, 256);  // the state before this chunk is in snap[stage]
      issue_p();
    }

    // The per-token factors: rows r0 and r0 + 8, and the 16 columns this thread holds.
    float row_scale[2], row_w[2];
    CUTE_UNROLL
    for (int j1 = 0; j1 < 2; ++j1) {
      const int r = r0 + 8 * j1;
      row_scale[j1] = normalize && g.den_on_rows ? reciprocal(smem.den[stage][r]) : 1.f;
      row_w[j1] = g.den_on_rows ? (normalize ? smem.w[stage][r] : 0.f) : 1.f;
    }
    // Column 2k + e of this thread is token 8k + 2 quad + e (loaded once per chunk: the shared-memory accesses in
    // inline assembly elsewhere keep the compiler from reusing loads across them).
    float col_scale[16], col_w[16];
    CUTE_UNROLL
    for (int k = 0; k < 8; ++k) {
      const float2 den = *reinterpret_cast<const float2*>(&smem.den[stage][8 * k + 2 * quad]);
      const float2 w = *reinterpret_cast<const float2*>(&smem.w[stage][8 * k + 2 * quad]);
      const bool scaled = normalize && !g.den_on_rows;
      col_scale[2 * k] = scaled ? reciprocal(den.x) : 1.f;
      col_scale[2 * k + 1] = scaled ? reciprocal(den.y) : 1.f;
      col_w[2 * k] = g.den_on_rows ? 1.f : (normalize ? w.x : 0.f);
      col_w[2 * k + 1] = g.den_on_rows ? 1.f : (normalize ? w.y : 0.f);
    }

    Tensor frag_phi = make_tensor<Element>(Shape<Shape<_2, _2, _2>, _1, Int<kFeatures / 16>>{});
    if constexpr (kOut) {
      float x[kDim];
      load_rotated_row<Element>(s_x, r0, quad, x);
      build_phi_q<0, Element>(x, quad, frag_phi);
      load_rotated_row<Element>(s_x, r0 + 8, quad, x);
      build_phi_q<1, Element>(x, quad, frag_phi);
    }

    warpgroup_wait<kOut ? 0 : 1>();  // s and a.b^T
    warpgroup_fence_operand(acc_s);
    warpgroup_fence_operand(acc_da);
    // D = tril(da (1 + s)) / 4 and (dk/dv sweep) A = tril(1 + s + s^2/2) scaled by the columns' 1 / den, straight
    // into A-operand registers (same thread/value layout as the accumulators).
    Tensor frag_a = make_tensor<Element>(Shape<Shape<_2, _2, _2>, _1, Int<kChunk / 16>>{});
    CUTE_UNROLL
    for (int i = 0; i < size(acc_s); ++i) {
      const int j1 = (i / 2) % 2;
      const int row = r0 + 8 * j1;
      const int col = 8 * (i / 4) + 2 * quad + i % 2;
      const float s = acc_s(i) * kPairScale;
      const float cs = col_scale[2 * (i / 4) + i % 2];
      const float da = acc_da(i) * row_scale[j1] * cs + row_w[j1] * col_w[2 * (i / 4) + i % 2];
      frag_d(i) = Element(col <= row ? da * (1.f + s) * kPairScale : 0.f);
      if constexpr (kOut) frag_a(i) = Element(col <= row ? (1.f + s + 0.5f * s * s) * cs : 0.f);
    }
    if constexpr (kOut) bar_sync(kFull0 + stage, 256);  // the state before this chunk is in snap[stage]

    // dx within the chunk = D y, and (dk/dv sweep) dv = A g + phi(x) R[:, :DV].
    Tensor t_y_by_dim = thr_dx.partition_fragment_B(s_y_by_dim);
    Tensor t_b_by_col = thr_out_intra.partition_fragment_B(s_b_by_col);
    Tensor t_snap_v = thr_out_inter.partition_fragment_B(s_snap_v);
    Tensor acc_out = partition_fragment_C(mma_out_intra, Shape<Int<kChunk>, Int<DV>>{});
    // Without these fences on the register operands ptxas serialises every wgmma of the kernel (C7520).
    warpgroup_fence_operand(frag_d);
    if constexpr (kOut) {
      warpgroup_fence_operand(frag_a);
      warpgroup_fence_operand(frag_phi);
    }
    warpgroup_fence_operand(acc_dx);
    warpgroup_fence_operand(acc_out);
    warpgroup_arrive();
    mma_k_blocks(mma_dx, frag_d, t_y_by_dim, acc_dx, true);
    if constexpr (kOut) {
      mma_k_blocks(mma_out_intra, frag_a, t_b_by_col, acc_out, true);
      mma_k_blocks(mma_out_inter, frag_phi, t_snap_v, acc_out, false);
    }
    warpgroup_commit_batch();
    if constexpr (kOut) {
      issue_p();
      warpgroup_wait<1>();  // dx and dv; P runs on while the threads store dv
      warpgroup_fence_operand(acc_out);
      CUTE_UNROLL
      for (int j1 = 0; j1 < 2; ++j1) {
        const int t = c * kChunk + r0 + 8 * j1;
        if (t < g.order.seqlen) {
          Element* out = g.out + g.order.row(t) * g.out_stride;
          CUTE_UNROLL
          for (int nb = 0; nb < DV / 8; ++nb) {
            *reinterpret_cast<uint32_t*>(out + 8 * nb + 2 * quad) =
                pack2<Element>(acc_out(4 * nb + 2 * j1), acc_out(4 * nb + 2 * j1 + 1));
          }
        }
      }
      warpgroup_wait<0>();
    } else {
      warpgroup_wait<1>();  // P; dx runs on while the threads apply J^T
    }
    warpgroup_fence_operand(acc_p);

    // dx of the earlier chunks: J_phi(x_r)^T applied to P_r = scale_r (a_r S) + a_w,r z, feature by feature, into
    // rotated partial sums (index o is dim 2 * quad + o of the row).
    float part[2][kDim] = {};
    {
      float x[2][kDim];
      load_rotated_row<Element>(s_x, r0, quad, x[0]);
      load_rotated_row<Element>(s_x, r0 + 8, quad, x[1]);
      // z of features 8j + 2 quad, + 1: one 4-byte load each, at the row's address plus a compile-time offset (the
      // swizzle moves 16-byte chunks, so 2 quad stays inside one).
      const uint32_t z_row = smem_address(smem.state.snap[stage].data()) + 4 * quad;
      CUTE_UNROLL
      for (int i = 0; i < size(acc_p); ++i) {
        const int j = i / 4, e = i % 2, j1 = (i / 2) % 2;
        if (j == 19) continue;  // the constant feature and padding: no gradient
        const uint32_t pair = ld_shared_32_at(z_row + smem_offset<typename Cfg::SnapZ, Element>(DV, 8 * j));
        const float z = to_float(Element::bitcast(static_cast<uint16_t>(e == 0 ? pair & 0xffffu : pair >> 16)));
        const float pf = acc_p(i) * row_scale[j1] + row_w[j1] * z;
        if (j < 16) {
          const int delta = j / 2, o = 8 * (j % 2) + e;
          if (delta == 0) {
            part[j1][o] += pf * (2.f * kSquareScale) * x[j1][o];
          } else {
            const int o2 = (o + delta) % kDim;
            part[j1][o] += pf * kPairScale * x[j1][o2];
            part[j1][o2] += pf * kPairScale * x[j1][o];
          }
        } else if (j < 18) {
          part[j1][8 * (j % 2) + e] += pf * kLinearScale;
        } else {
          part[j1][e] += pf * kPairScale * x[j1][e + 8];
          part[j1][e + 8] += pf * kPairScale * x[j1][e];
        }
      }
    }
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc_dx);
    if (c + 2 < n_chunks) bar_arrive(kEmpty0 + stage, 256);  // snap[stage] may now take the state after c + 1

    CUTE_UNROLL
    for (int j1 = 0; j1 < 2; ++j1) {
      // Value i of the m64n16 accumulator is dim 8 * (i / 4) + 2 * quad + i % 2 of row r0 + 8 * ((i / 2) % 2).
      const float d0 = quad_sum<0>(part[j1], quad) + acc_dx(2 * j1);
      const float d1 = quad_sum<1>(part[j1], quad) + acc_dx(2 * j1 + 1);
      const float d8 = quad_sum<8>(part[j1], quad) + acc_dx(4 + 2 * j1);
      const float d9 = quad_sum<9>(part[j1], quad) + acc_dx(4 + 2 * j1 + 1);
      const int t = c * kChunk + r0 + 8 * j1;
      if (t < g.order.seqlen) {
        Element* dx = g.dx + g.order.row(t) * g.dx_stride + 2 * quad;
        *reinterpret_cast<uint32_t*>(dx) = pack2<Element>(d0, d1);
        *reinterpret_cast<uint32_t*>(dx + 8) = pack2<Element>(d8, d9);
      }
    }
    bar_sync(kMathGroup, 128);  // every thread is done with this stage before it is refilled
    if constexpr (kStages == 1) {
      if (c + 1 < n_chunks) load_value_tiles(c + 1, 0);
      cp_async_commit();  // its own group, older than the next chunk's rows, so cp_async_wait<1> there covers it
    }
  }
}

template <class Element, int DV>
__global__ void __launch_bounds__(kThreads, 1) linear_attention_bwd_kernel(const BwdParams p) {
#if defined(__CUDA_ARCH__) && defined(CUTE_ARCH_MMA_SM90A_ENABLED)
  using Cfg = BwdConfig<Element, DV>;
  extern __shared__ __align__(1024) char smem_raw[];
  auto& smem = *reinterpret_cast<typename Cfg::SharedStorage*>(smem_raw);

  const int n_heads = p.batch * p.heads;
  const bool dkdv = blockIdx.x < n_heads;
  const int bh = dkdv ? blockIdx.x : blockIdx.x - n_heads;
  const int b = bh / p.heads, h = bh % p.heads;
  const int n_chunks = (p.seqlen + kChunk - 1) / kChunk;
  const int warpgroup = threadIdx.x / 128;
  const int tid = threadIdx.x % 128;
  auto at = [&](const void* base, int64_t batch_stride, int64_t head_stride) {
    return static_cast<const Element*>(base) + b * batch_stride + h * head_stride;
  };
  const Element* q = at(p.q, p.q_batch_stride, p.q_head_stride);
  const Element* k = at(p.k, p.k_batch_stride, p.k_head_stride);
  const Element* v = at(p.v, p.v_batch_stride, p.v_head_stride);
  const Element* dout = at(p.dout, p.dout_batch_stride, p.dout_head_stride);
  const int64_t token_offset = static_cast<int64_t>(bh) * p.seqlen;
  const float* den = p.den != nullptr ? p.den + token_offset : nullptr;
  const float* w = p.w != nullptr ? p.w + token_offset : nullptr;
  const TokenOrder order{p.seqlen, dkdv};
  // The gradients are contiguous [B, T, H, *].
  const int64_t dx_stride = static_cast<int64_t>(p.heads) * kDim, dv_stride = static_cast<int64_t>(p.heads) * DV;
  const int64_t dx_offset = static_cast<int64_t>(b) * p.seqlen * dx_stride + h * kDim;

  if (warpgroup == 0) {
    GradSweep<Element> g{};
    g.den = den, g.w = w;
    g.order = order;
    g.dx_stride = dx_stride;
    if (dkdv) {
      g.x = k, g.x_stride = p.k_seq_stride;
      g.y = q, g.y_stride = p.q_seq_stride;
      g.a = v, g.a_stride = p.v_seq_stride;
      g.b = dout, g.b_stride = p.dout_seq_stride;
      g.den_on_rows = false;
      g.dx = static_cast<Element*>(p.dk) + dx_offset;
      g.out = static_cast<Element*>(p.dv) + static_cast<int64_t>(b) * p.seqlen * dv_stride + h * DV;
      g.out_stride = dv_stride;
      gradient_warpgroup<Element, DV, true>(smem, g, n_chunks, tid);
    } else {
      g.x = q, g.x_stride = p.q_seq_stride;
      g.y = k, g.y_stride = p.k_seq_stride;
      g.a = dout, g.a_stride = p.dout_seq_stride;
      g.b = v, g.b_stride = p.v_seq_stride;
      g.den_on_rows = true;
      g.dx = static_cast<Element*>(p.dq) + dx_offset;
      gradient_warpgroup<Element, DV, false>(smem, g, n_chunks, tid);
    }
  } else {
    const int64_t state_offset = static_cast<int64_t>(bh) * kPublicFeatures;
    auto head_state = [&](const float* s, int64_t width) { return s != nullptr ? s + state_offset * width : nullptr; };
    StateSweep<Element> sw{};
    sw.order = order;
    if (dkdv) {
      sw.y = q, sw.y_stride = p.q_seq_stride;
      sw.b = dout, sw.b_stride = p.dout_seq_stride;
      sw.den = den, sw.w = w;
      sw.z_ones = false;
      sw.kv0 = head_state(p.d_kv, DV), sw.ksum0 = head_state(p.d_ksum, 1);
      sw.kv_out = p.d_kv0 != nullptr ? p.d_kv0 + state_offset * DV : nullptr;
      sw.ksum_out = p.d_ksum0 != nullptr ? p.d_ksum0 + state_offset : nullptr;
    } else {
      sw.y = k, sw.y_stride = p.k_seq_stride;
      sw.b = v, sw.b_stride = p.v_seq_stride;
      sw.z_ones = true;
      sw.kv0 = head_state(p.kv0, DV), sw.ksum0 = head_state(p.ksum0, 1);
    }
    state_warpgroup<Element, DV>(smem.state, sw, n_chunks, tid);
  }
#endif
}

// w[b*H + h, t] = -(dout . o) / den of every token-head: kLanes lanes per row, one 16-byte load of each per lane.
constexpr int output_weight_lanes(int dv) { return dv <= 64 ? 8 : 16; }

template <class Element, int DV>
__global__ void output_weight_kernel(const BwdParams p, float* w) {
  constexpr int kLanes = output_weight_lanes(DV);
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kLanes;
  const int lane = threadIdx.x % kLanes;
  const int64_t n_rows = static_cast<int64_t>(p.batch) * p.heads * p.seqlen;
  float sum = 0.f;
  const int64_t bh = row / p.seqlen;
  const int t = row % p.seqlen, b = bh / p.heads, h = bh % p.heads;
  if (row < n_rows && lane < DV / 8) {
    auto vec = [&](const void* base, int64_t bs, int64_t ts, int64_t hs) {
      return *reinterpret_cast<const uint4*>(static_cast<const Element*>(base) + b * bs + t * ts + h * hs + 8 * lane);
    };
    const uint4 d = vec(p.dout, p.dout_batch_stride, p.dout_seq_stride, p.dout_head_stride);
    const uint4 o = vec(p.o, p.o_batch_stride, p.o_seq_stride, p.o_head_stride);
    const Element* de = reinterpret_cast<const Element*>(&d);
    const Element* oe = reinterpret_cast<const Element*>(&o);
    CUTE_UNROLL
    for (int i = 0; i < 8; ++i) sum += to_float(de[i]) * to_float(oe[i]);
  }
  CUTE_UNROLL
  for (int offset = kLanes / 2; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset, kLanes);
  if (row < n_rows && lane == 0) w[row] = -sum / p.den[row];
}

template <class Element, int DV>
cudaError_t launch_bwd(const BwdParams& p, cudaStream_t stream) {
  using Cfg = BwdConfig<Element, DV>;
  constexpr int smem = sizeof(typename Cfg::SharedStorage);
  constexpr auto kernel = linear_attention_bwd_kernel<Element, DV>;
  cudaError_t err = allow_shared_memory<kernel>(smem);
  if (err != cudaSuccess) return err;
  if (p.den != nullptr) {
    const int64_t threads = static_cast<int64_t>(p.batch) * p.heads * p.seqlen * output_weight_lanes(DV);
    output_weight_kernel<Element, DV><<<(threads + 255) / 256, 256, 0, stream>>>(p, p.w);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  kernel<<<2 * p.batch * p.heads, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

// One dtype's launches, each instantiated in its own file (linear_attention_bwd_{bf16,fp16}.cu) so that the build
// compiles the two in parallel.
template <class Element>
cudaError_t launch_bwd_for_dtype(const BwdParams& p, int dv, cudaStream_t stream) {
  return dispatch_value_dim(dv, [&](auto dv_tag) { return launch_bwd<Element, decltype(dv_tag)::value>(p, stream); });
}
extern template cudaError_t launch_bwd_for_dtype<cutlass::bfloat16_t>(const BwdParams&, int, cudaStream_t);
extern template cudaError_t launch_bwd_for_dtype<cutlass::half_t>(const BwdParams&, int, cudaStream_t);

}  // namespace based::la_sm90
