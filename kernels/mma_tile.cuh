// mma_tile.cuh: the tensor-core main loop shared by the mma75, mma80 and sm90 tiers.
//
// Block tile 128 (M) x 128 (N), K step 32 bytes, 256 threads = 8 warps as 2 (M) x 4 (N),
// each warp 64 x 32 = 4 x 4 tiles of m16n8k32; int32 accumulators in registers.
// Shared memory holds GQ_STAGES stages of A[128][32] and B[128][32] bytes; the two 16-byte
// chunks of a row are swapped on rows 4..7 mod 8 (chunk ^ ((row >> 2) & 1)) so a warp's
// ldmatrix phases (8 rows x 16 bytes) hit 32 distinct banks.
//
// Tier macros, set by the including .cu file:
//   GQ_CP_ASYNC  1: global -> shared with cp.async.cg (16 B, zero fill past M/N/K), a
//                GQ_STAGES-deep pipeline (sm_80+); 0: plain 16 B loads and stores (sm_75).
//   GQ_MMA_16832 1: mma.sync.aligned.m16n8k32 (sm_80+); 0: the same m16n8k32 tile as four
//                mma.sync.aligned.m8n8k16 (sm_75 Turing IMMA). Same fragments either way.
//   GQ_STAGES    shared-memory pipeline depth.
//   GQ_HOST_EMU  defined only by the CPU test harness (tests/backends/test_cupy_kernels.py),
//                which supplies gq_emu_* stand-ins for the inline PTX and runs this very
//                source on host fibers, one per CUDA thread.
//
// Requirements checked by the host launcher: K % 16 == 0 (a 16-byte chunk is either fully
// inside K or fully past it), A / B / x base pointers 16-byte aligned, and for conv
// cg % 16 == 0 (a chunk never straddles a (r, s) window position).
#pragma once
#include "tile_copy.cuh"

#define GQ_MMA_BM 128
#define GQ_MMA_BN 128
#define GQ_MMA_BK 32
#define GQ_MMA_THREADS 256
#define GQ_MMA_STAGE_BYTES (GQ_MMA_BM * GQ_MMA_BK)

// Byte offset of (row, byte col) in a swizzled [rows][32] stage.
GQ_HD int gq_swz(int row, int col) {
  return row * GQ_MMA_BK + ((((col >> 4) ^ (row >> 2)) & 1) << 4) + (col & 15);
}

// One m16n8k32 tile, s8 x s8 -> s32. PTX fragment layout, lane = 4 * g + t:
// a[0] = A[g][4t..4t+3], a[1] = A[g+8][4t..], a[2] = A[g][16+4t..], a[3] = A[g+8][16+4t..];
// b[0] = B[4t..4t+3][g], b[1] = B[16+4t..][g]; c[0..1] = C[g][2t, 2t+1], c[2..3] = C[g+8][..].
GQ_D void gq_mma_m16n8k32(int* c, const unsigned* a, const unsigned* b) {
#if defined(GQ_HOST_EMU)
  gq_emu_mma_m16n8k32(c, a, b);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// One m8n8k16 tile (Turing): a = A[g][4t..4t+3], b = B[4t..4t+3][g], c[0..1] = C[g][2t, 2t+1].
GQ_D void gq_mma_m8n8k16(int* c, unsigned a, unsigned b) {
#if defined(GQ_HOST_EMU)
  gq_emu_mma_m8n8k16(c, a, b);
#else
  asm volatile("mma.sync.aligned.m8n8k16.row.col.s32.s8.s8.s32 {%0,%1}, {%2}, {%3}, {%0,%1};\n"
               : "+r"(c[0]), "+r"(c[1]) : "r"(a), "r"(b));
#endif
}

// c (16 x 8) += a (16 x 32) . b (32 x 8) with the m16n8k32 fragments above; on the Turing tier
// as four m8n8k16 whose fragments are exactly the quarters of these registers.
GQ_D void gq_mma(int* c, const unsigned* a, const unsigned* b) {
#if GQ_MMA_16832
  gq_mma_m16n8k32(c, a, b);
#else
  gq_mma_m8n8k16(c, a[0], b[0]);       // rows 0..7,  k 0..15
  gq_mma_m8n8k16(c, a[2], b[1]);       // rows 0..7,  k 16..31
  gq_mma_m8n8k16(c + 2, a[1], b[0]);   // rows 8..15, k 0..15
  gq_mma_m8n8k16(c + 2, a[3], b[1]);   // rows 8..15, k 16..31
#endif
}

// ldmatrix.sync.aligned.m8n8.x4.shared.b16: lane l gives the address of row l % 8 of matrix
// l / 8 (16 bytes); register j of lane 4g + t receives bytes 4t..4t+3 of row g of matrix j
// (sm_75+). For int8 operands that is exactly the mma.sync fragment of an 8 x 16-byte block.
GQ_D void gq_ldmatrix_x4(unsigned* r, const unsigned char* p) {
#if defined(GQ_HOST_EMU)
  gq_emu_ldmatrix_x4(r, p);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(gq_smem_addr(p)));
#endif
}

template <class ALoader>
__device__ void gq_mma_tile(ALoader al, const signed char* __restrict__ w,
                            const gq_i64* __restrict__ bias_eff, const int* __restrict__ mult,
                            const int* __restrict__ rshift, unsigned char* __restrict__ out,
                            int M, int N, int K, int ldo, int group, int a_xor,
                            int zero_point, int qmin, int qmax) {
  __shared__ __align__(16) unsigned char As[GQ_STAGES][GQ_MMA_STAGE_BYTES];
  __shared__ __align__(16) unsigned char Bs[GQ_STAGES][GQ_MMA_STAGE_BYTES];

  const int tid = threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  const int wm = warp >> 2, wn = warp & 3;   // warp tile origin: (64 wm, 32 wn)
  const int g = lane >> 2, t = lane & 3;
  const int m0 = blockIdx.x * GQ_MMA_BM;
  const int n0 = blockIdx.y * GQ_MMA_BN;

  // Each thread copies one 16-byte chunk of A and one of B a stage: row lr, chunk lc.
  const int lr = tid >> 1, lc = tid & 1;
  al.set_row(m0 + lr);
  const int bn = n0 + lr;
  const bool bvalid = bn < N;
  const signed char* brow = w + (bvalid ? ((gq_i64)group * N + bn) * K : 0);
  const int soff = gq_swz(lr, lc * 16);

  const int ktiles = (K + GQ_MMA_BK - 1) / GQ_MMA_BK;

#pragma unroll
  for (int s = 0; s < GQ_STAGES - 1; ++s) {
    if (s < ktiles) {
      const int k = s * GQ_MMA_BK + lc * 16;
      al.load(&As[s][soff], k);
      gq_copy16(&Bs[s][soff], bvalid && k < K ? brow + k : w, bvalid && k < K);
    }
    gq_commit();
  }

  int acc[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0;

  const unsigned axor = (unsigned)a_xor;
  for (int kt = 0; kt < ktiles; ++kt) {
    gq_wait<GQ_STAGES - 2>();
    __syncthreads();  // stage kt landed for every thread; stage kt - 1 fully read
    {
      const int nt = kt + GQ_STAGES - 1;
      if (nt < ktiles) {
        const int s = nt % GQ_STAGES;
        const int k = nt * GQ_MMA_BK + lc * 16;
        al.load(&As[s][soff], k);
        gq_copy16(&Bs[s][soff], bvalid && k < K ? brow + k : w, bvalid && k < K);
      }
      gq_commit();
    }
    const unsigned char* as = As[kt % GQ_STAGES];
    const unsigned char* bs = Bs[kt % GQ_STAGES];
    unsigned a[4][4], b[4][2];
    // A: one ldmatrix.x4 per m16 tile; lane l addresses row 8 ((l >> 3) & 1) + (l & 7) of the
    // tile, chunk l >> 4, so the four 8x8 matrices come back as a[0..3] exactly.
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = wm * 64 + i * 16 + ((lane >> 3) & 1) * 8 + (lane & 7);
      gq_ldmatrix_x4(a[i], as + gq_swz(row, (lane >> 4) * 16));
#pragma unroll
      for (int r = 0; r < 4; ++r) a[i][r] ^= axor;
    }
    // B: one ldmatrix.x4 per pair of n8 tiles: matrices (tile 2p, k 0..15), (2p, 16..31),
    // (2p + 1, 0..15), (2p + 1, 16..31).
#pragma unroll
    for (int p = 0; p < 2; ++p) {
      const int row = wn * 32 + (2 * p + (lane >> 4)) * 8 + (lane & 7);
      unsigned r[4];
      gq_ldmatrix_x4(r, bs + gq_swz(row, ((lane >> 3) & 1) * 16));
      b[2 * p][0] = r[0];
      b[2 * p][1] = r[1];
      b[2 * p + 1][0] = r[2];
      b[2 * p + 1][1] = r[3];
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) gq_mma(acc[i][j], a[i], b[j]);
  }
  gq_wait<0>();

#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int m = m0 + wm * 64 + i * 16 + g + 8 * h;
      if (m >= M) continue;
      unsigned char* orow = out + (gq_i64)m * ldo;
#pragma unroll
      for (int j = 0; j < 4; ++j)
        gq_store_pair(orow, &acc[i][j][2 * h], n0 + wn * 32 + j * 8 + 2 * t, N, group,
                      bias_eff, mult, rshift, zero_point, qmin, qmax);
    }
  }
}

// The entry points of the mma tiers. Each tier file sets GQ_CP_ASYNC / GQ_MMA_16832 /
// GQ_STAGES, includes this header and names its kernels with these two macros, so the tiers
// differ only in those settings.
#define GQ_MMA_GEMM_KERNEL(NAME) \
extern "C" __global__ void __launch_bounds__(GQ_MMA_THREADS) \
NAME(const signed char* __restrict__ a, const signed char* __restrict__ w, \
              const gq_i64* __restrict__ bias_eff, const int* __restrict__ mult, \
              const int* __restrict__ rshift, unsigned char* __restrict__ out, \
              int M, int N, int K, int a_xor, int zero_point, int qmin, int qmax) { \
  GqGemmChunkA al; \
  al.a = a; \
  al.M = M; \
  al.K = K; \
  al.base = 0; \
  al.valid = false; \
  gq_mma_tile(al, w, bias_eff, mult, rshift, out, M, N, K, N, 0, a_xor, zero_point, qmin, qmax); \
}

#define GQ_MMA_CONV_KERNEL(NAME) \
extern "C" __global__ void __launch_bounds__(GQ_MMA_THREADS) \
NAME(const signed char* __restrict__ x, const signed char* __restrict__ w, \
              const gq_i64* __restrict__ bias_eff, const int* __restrict__ mult, \
              const int* __restrict__ rshift, unsigned char* __restrict__ out, \
              int M, int og, int Kg, int a_xor, int zero_point, int qmin, int qmax, \
              int H, int W, int C, int cg, int ho, int wo, int kw, int sh, int sw, int ph, \
              int pw, int dh, int dw, int pad_byte) { \
  GqConvChunkA al; \
  al.x = x; \
  al.g.H = H; al.g.W = W; al.g.C = C; al.g.cg = cg; al.g.ho = ho; al.g.wo = wo; \
  al.g.kw = kw; al.g.sh = sh; al.g.sw = sw; al.g.ph = ph; al.g.pw = pw; al.g.dh = dh; \
  al.g.dw = dw; \
  al.M = M; \
  al.K = Kg; \
  al.group = blockIdx.z; \
  al.pad_word = 0x01010101u * ((unsigned)pad_byte & 0xffu); \
  al.img = al.ih0 = al.iw0 = 0; \
  al.valid = false; \
  gq_mma_tile(al, w, bias_eff, mult, rshift, out, M, og, Kg, og * gridDim.z, blockIdx.z, a_xor, \
              zero_point, qmin, qmax); \
}
