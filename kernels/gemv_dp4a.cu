// gemv_dp4a.cu: int8 linear layer for a few rows (M <= 8: decode-like shapes), every tier.
//
// The GEMM tiles (64 or 128 rows) would leave almost all of their rows empty and launch too
// few blocks to stream the weights at full bandwidth. Here one warp computes one output
// column n for all M rows: its lanes walk K in 16-byte chunks of W's row n (aligned 128-bit
// loads where K % 16 == 0, else bytes), x's rows come through the cache, __dp4a multiplies
// and a warp shuffle reduction sums; lane m < M writes row m's requantized output.
// Launch grid (ceil(N / 8), 1, 1), block 256 (8 warps); sm_61+ (__dp4a, __shfl_xor_sync).
#include "igemm.cuh"

#define GQ_GEMV_MAX_M 8
#define GQ_GEMV_WARPS 8

// 4 bytes at p[k..k+3] (zeros past K), packed little-endian.
GQ_D int gq_gemv_word(const signed char* p, int k, int K) {
  unsigned v = 0;
#pragma unroll
  for (int e = 0; e < 4; ++e)
    if (k + e < K) v |= ((unsigned)(unsigned char)p[k + e]) << (8 * e);
  return (int)v;
}

extern "C" __global__ void __launch_bounds__(GQ_GEMV_WARPS * 32)
gq_gemv_dp4a(const signed char* __restrict__ a, const signed char* __restrict__ w,
             const gq_i64* __restrict__ bias_eff, const int* __restrict__ mult,
             const int* __restrict__ rshift, unsigned char* __restrict__ out,
             int M, int N, int K, int a_xor, int zero_point, int qmin, int qmax) {
  const int lane = threadIdx.x & 31;
  const int n = blockIdx.x * GQ_GEMV_WARPS + (threadIdx.x >> 5);
  const bool active = n < N;   // idle warps still take part in the shuffles below
  const signed char* wrow = w + (gq_i64)(active ? n : 0) * K;

  int acc[GQ_GEMV_MAX_M];
#pragma unroll
  for (int m = 0; m < GQ_GEMV_MAX_M; ++m) acc[m] = 0;

  if (active) {
    if ((K & 15) == 0) {
      for (int k = lane * 16; k < K; k += 32 * 16) {
        const uint4 wv = *reinterpret_cast<const uint4*>(wrow + k);
#pragma unroll
        for (int m = 0; m < GQ_GEMV_MAX_M; ++m) {
          if (m < M) {
            const uint4 xv = *reinterpret_cast<const uint4*>(a + (gq_i64)m * K + k);
            int s = acc[m];
            s = __dp4a((int)(xv.x ^ (unsigned)a_xor), (int)wv.x, s);
            s = __dp4a((int)(xv.y ^ (unsigned)a_xor), (int)wv.y, s);
            s = __dp4a((int)(xv.z ^ (unsigned)a_xor), (int)wv.z, s);
            s = __dp4a((int)(xv.w ^ (unsigned)a_xor), (int)wv.w, s);
            acc[m] = s;
          }
        }
      }
    } else {
      for (int k = lane * 4; k < K; k += 32 * 4) {
        const int wv = gq_gemv_word(wrow, k, K);
#pragma unroll
        for (int m = 0; m < GQ_GEMV_MAX_M; ++m) {
          // past K both words are zero-padded: x's padding bytes ^ a_xor times w = 0 adds 0
          if (m < M) acc[m] = __dp4a(gq_gemv_word(a + (gq_i64)m * K, k, K) ^ a_xor, wv, acc[m]);
        }
      }
    }
  }

#pragma unroll
  for (int m = 0; m < GQ_GEMV_MAX_M; ++m) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc[m] += __shfl_xor_sync(0xffffffffu, acc[m], off);
  }

  if (active) {
#pragma unroll
    for (int m = 0; m < GQ_GEMV_MAX_M; ++m) {
      if (m < M && lane == m)
        out[(gq_i64)m * N + n] =
            gq_epilogue(acc[m], n, bias_eff, mult, rshift, zero_point, qmin, qmax);
    }
  }
}
