// dp4a_tile.cuh: the portable tier's tiled main loop (any GPU with __dp4a, sm_61+).
//
// A 64 x 64 output tile per block of 256 threads (16 x 16), each thread 4 x 4 outputs.
// K advances 32 bytes a step; operands go to shared memory as int32 words of four K values:
// one aligned 32-bit load where K % 4 == 0 (linear) or channels per group % 4 == 0 (conv),
// else gathered byte by byte (so any K, any channel count, any group count and every conv
// geometry run without host padding); multiplied with __dp4a (s8 x s8 -> s32).
// Words are padded to 9 a row so the 16 B-rows a warp reads fall into distinct banks.
#pragma once
#include "igemm.cuh"

#define GQ_DP4A_BM 64
#define GQ_DP4A_BN 64
#define GQ_DP4A_BKW 8          // K words (4 bytes each) per step
#define GQ_DP4A_THREADS 256

GQ_D int gq_pack4(int b0, int b1, int b2, int b3) {
  return (int)(((unsigned)b0 & 0xffu) | (((unsigned)b1 & 0xffu) << 8) |
               (((unsigned)b2 & 0xffu) << 16) | (((unsigned)b3 & 0xffu) << 24));
}

// A operand of a linear layer: (M, K) row-major.
struct GqGemmA {
  const signed char* a;
  int M, K;
  gq_i64 base;
  bool valid;
  GQ_D void set_row(int m) { valid = m < M; base = (gq_i64)m * K; }
  GQ_D int byte(int k) const { return (valid && k < K) ? (int)a[base + k] : 0; }
  // A[m][k..k+3] packed (k % 4 == 0): one aligned 32-bit load when K % 4 == 0 (the host
  // hands 16-byte aligned bases), else four byte loads.
  GQ_D int word(int k) const {
    if ((K & 3) == 0) return (valid && k < K) ? *reinterpret_cast<const int*>(a + base + k) : 0;
    return gq_pack4(byte(k), byte(k + 1), byte(k + 2), byte(k + 3));
  }
};

// A operand of a convolution: the implicit im2col matrix of an NHWC input, one group.
struct GqConvA {
  const signed char* x;
  GqConvGeom g;
  int M, K, group, pad_byte;
  int img, ih0, iw0;
  bool valid;
  GQ_D void set_row(int m) {
    valid = m < M;
    if (valid) gq_conv_row(g, m, &img, &ih0, &iw0);
  }
  GQ_D int byte(int k) const {
    if (!valid || k >= K) return 0;
    const gq_i64 off = gq_conv_offset(g, img, ih0, iw0, k, group);
    return off < 0 ? pad_byte : (int)x[off];
  }
  // Four channels of one pixel in one aligned 32-bit load when cg % 4 == 0 (k % 4 == 0 then
  // never straddles a window position), else four byte gathers.
  GQ_D int word(int k) const {
    if ((g.cg & 3) == 0) {
      if (!valid || k >= K) return 0;
      const gq_i64 off = gq_conv_offset(g, img, ih0, iw0, k, group);
      return off < 0 ? (int)(0x01010101u * ((unsigned)pad_byte & 0xffu))
                     : *reinterpret_cast<const int*>(x + off);
    }
    return gq_pack4(byte(k), byte(k + 1), byte(k + 2), byte(k + 3));
  }
};

// One block: output rows [m0, m0 + 64), columns [n0, n0 + 64) of group ``group``.
//   w: (groups * N, K) weights; out: row stride ldo, column offset group * N.
template <class ALoader>
__device__ void gq_dp4a_tile(ALoader al, const signed char* __restrict__ w,
                             const gq_i64* __restrict__ bias_eff, const int* __restrict__ mult,
                             const int* __restrict__ rshift, unsigned char* __restrict__ out,
                             int M, int N, int K, int ldo, int group, int a_xor, int zero_point,
                             int qmin, int qmax) {
  __shared__ int As[GQ_DP4A_BM][GQ_DP4A_BKW + 1];
  __shared__ int Bs[GQ_DP4A_BN][GQ_DP4A_BKW + 1];
  const int tid = threadIdx.x;
  const int tx = tid & 15, ty = tid >> 4;
  const int m0 = blockIdx.x * GQ_DP4A_BM;
  const int n0 = blockIdx.y * GQ_DP4A_BN;

  // This thread loads words (row lr + 32 p, word lw) of both operands at every step.
  const int lr = tid >> 3, lw = tid & 7;
  ALoader rows[2] = {al, al};
  bool bvalid[2];
  gq_i64 bbase[2];
#pragma unroll
  for (int p = 0; p < 2; ++p) {
    rows[p].set_row(m0 + lr + 32 * p);
    const int n = n0 + lr + 32 * p;
    bvalid[p] = n < N;
    bbase[p] = ((gq_i64)group * N + n) * K;
  }

  int acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0;

  for (int k0 = 0; k0 < K; k0 += 4 * GQ_DP4A_BKW) {
    const int k = k0 + 4 * lw;
#pragma unroll
    for (int p = 0; p < 2; ++p) {
      As[lr + 32 * p][lw] = rows[p].word(k) ^ a_xor;
      if ((K & 3) == 0) {
        Bs[lr + 32 * p][lw] =
            (bvalid[p] && k < K) ? *reinterpret_cast<const int*>(w + bbase[p] + k) : 0;
      } else {
        int b[4];
#pragma unroll
        for (int e = 0; e < 4; ++e)
          b[e] = (bvalid[p] && k + e < K) ? (int)w[bbase[p] + k + e] : 0;
        Bs[lr + 32 * p][lw] = gq_pack4(b[0], b[1], b[2], b[3]);
      }
    }
    __syncthreads();
#pragma unroll
    for (int kw = 0; kw < GQ_DP4A_BKW; ++kw) {
      int a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = As[ty + 16 * i][kw];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = Bs[tx + 16 * j][kw];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = __dp4a(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int m = m0 + ty + 16 * i;
    if (m >= M) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int n = n0 + tx + 16 * j;
      if (n >= N) continue;
      const int ch = group * N + n;
      out[(gq_i64)m * ldo + ch] =
          gq_epilogue(acc[i][j], ch, bias_eff, mult, rshift, zero_point, qmin, qmax);
    }
  }
}
