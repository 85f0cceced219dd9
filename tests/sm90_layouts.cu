// Host-side checks of the shared-memory addressing in kernels/sm90/ (built and run by test_kernel_sources.py).
// The kernels compute 32-bit shared addresses as buffer address + smem_offset<Layout>(coord) instead of going
// through CuTe tensors; these must be the bytes CuTe's tensors (and so the wgmma descriptors) address. The
// z-sum's ldmatrix rows must also give mma.sync the A fragment it expects. Exit status: the number of mismatches.
#include "linear_attention_bwd.cuh"
#include "linear_attention_fwd.cuh"

#include <cstdio>

using namespace based::la_sm90;
using Elt = cutlass::bfloat16_t;
alignas(1024) static Elt buffer[1 << 16];

template <class L, int Rows, int Cols>
int offsets_match(const char* name) {
  Tensor t = make_tensor(make_smem_ptr(buffer), L{});
  int bad = 0;
  for (int i = 0; i < Rows; ++i)
    for (int j = 0; j < Cols; ++j) bad += (&t(i, j) - buffer) * 2 != smem_offset<L, Elt>(i, j);
  if (bad) printf("%s: %d offsets differ from the tensor's\n", name, bad);
  return bad;
}

template <int DV>
int check() {
  using S = StateConfig<Elt, DV>;
  using F = Config<Elt, DV>;
  using B = BwdConfig<Elt, DV>;
  int bad = offsets_match<typename S::PhiKLayout, kFeatures, kChunk>("phi") +
            offsets_match<typename S::VStateLayout, S::kStateRows, kChunk>("state values") +
            offsets_match<typename S::QKLayout, kChunk, kDim>("q, k") +
            offsets_match<typename F::VOutLayout, F::kOutCols, kChunk>("output values") +
            offsets_match<typename B::ValueByColumn, DV, kChunk>("backward values");
  // The backward reads z as pairs: the row's offset at feature 8j, plus 4 bytes per pair.
  Tensor snap = make_tensor(make_smem_ptr(buffer), typename B::SnapZ{});
  for (int j = 0; j < kFeatures / 8; ++j)
    for (int q = 0; q < 4; ++q)
      for (int e = 0; e < 2; ++e)
        bad += (&snap(DV, 8 * j + 2 * q + e) - buffer) * 2 != smem_offset<typename B::SnapZ, Elt>(DV, 8 * j) + 4 * q + 2 * e;
  // ZSum::add: lane l of a warp gives the row address of matrix l / 8 of a transposing ldmatrix.x4; thread t then
  // holds rows 2(t % 4), + 1 of column t / 4 of each matrix, which must be the mma.sync A fragment of
  // phi(y)^T (16 features of the tile x 16 tokens of the k-block).
  Tensor phi = make_tensor(make_smem_ptr(buffer), typename S::PhiKLayout{});
  for (int f = 0; f < kFeatures; ++f)
    for (int t = 0; t < kChunk; ++t) phi(f, t) = Elt(float(f % 61 + 64 * (t % 3)));
  auto expected = [](int f, int t) { return float(Elt(float(f % 61 + 64 * (t % 3)))); };
  for (int warp = 0; warp < 4; ++warp)
    for (int i = 0; i < ZSum<Elt>::kTilesPerWarp; ++i) {
      const int tile = warp + 4 * i;
      if (tile >= ZSum<Elt>::kTiles) continue;
      for (int kk = 0; kk < kChunk / 16; ++kk) {
        uint32_t row_address[32];
        for (int lane = 0; lane < 32; ++lane) {
          row_address[lane] = smem_offset<typename S::PhiKLayout, Elt>(16 * tile + 8 * ((lane / 8) % 2),
                                                                       16 * kk + 8 * (lane / 16) + lane % 8);
        }
        for (int th = 0; th < 32; ++th)
          for (int m = 0; m < 4; ++m)
            for (int e = 0; e < 2; ++e) {
              const float got = float(buffer[row_address[8 * m + 2 * (th % 4) + e] / 2 + th / 4]);
              const int feature = 16 * tile + th / 4 + 8 * (m % 2), token = 16 * kk + 2 * (th % 4) + e + 8 * (m / 2);
              bad += got != expected(feature, token);
            }
      }
    }
  if (bad) printf("dv %d: %d mismatches\n", DV, bad);
  return bad;
}

int main() { return check<64>() + check<112>() + check<128>(); }
