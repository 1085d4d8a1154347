// igemm.cuh: operand addressing shared by the GEMM and implicit-GEMM convolution kernels.
//
// Every kernel computes out[m][n] = requant(sum_k A[m][k] * B[n][k] + bias_eff[n]) with
//   * A: int8 activations, K contiguous. Linear: the (M, K) input. Conv: never materialised;
//     A[m][k] of the NHWC input, m = (img * ho + oh) * wo + ow, k = (r * kw + s) * cg + ci
//     (implicit GEMM, one group per blockIdx.z).
//   * B: int8 weights (N, K), K contiguous (a conv weight re-laid out on the host as
//     (O, kh, kw, cg)). Column n of group g is output channel g * og + n.
//   * uint8 activations enter the s8 x s8 instructions as x ^ 0x80 = x - 128 (the kernels
//     apply ``a_xor`` = 0x80808080 to every A word); the host folds the matching correction
//     ``-(zp_x - 128) * colsum(w)`` (or ``-zp_x * colsum(w)`` for int8 inputs) and the int32
//     bias into ``bias_eff`` (int64), so the integer dot product is exact: no partial sum
//     exceeds K * 128 * 127, within the caller's int32 worst-case check.
//   * conv padding reads the input zero point (``pad_byte``), contributing exactly 0 after
//     the correction, as (x - zp_x) = 0 in the contract's formula.
#pragma once
#include "requant.cuh"

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define GQ_D __device__ __forceinline__
#else
#define GQ_D inline
#endif

// Convolution geometry: input (n, H, W, C) NHWC, C = groups * cg; output (n, ho, wo, O).
struct GqConvGeom {
  int H, W, C, cg, ho, wo, kw, sh, sw, ph, pw, dh, dw;
};

// Output pixel m -> image index and the top-left input coordinate of its window.
GQ_HD void gq_conv_row(const GqConvGeom& g, int m, int* img, int* ih0, int* iw0) {
  const int ow = m % g.wo;
  const int t = m / g.wo;
  const int oh = t % g.ho;
  *img = t / g.ho;
  *ih0 = oh * g.sh - g.ph;
  *iw0 = ow * g.sw - g.pw;
}

// Offset of A[m][k] in the NHWC input, or -1 where the window reads padding.
GQ_HD gq_i64 gq_conv_offset(const GqConvGeom& g, int img, int ih0, int iw0, int k, int group) {
  const int ci = k % g.cg;
  const int rs = k / g.cg;
  const int ih = ih0 + (rs / g.kw) * g.dh;
  const int iw = iw0 + (rs % g.kw) * g.dw;
  if (ih < 0 || ih >= g.H || iw < 0 || iw >= g.W) return -1;
  return (((gq_i64)img * g.H + ih) * g.W + iw) * g.C + (gq_i64)group * g.cg + ci;
}

// Epilogue for one output element: exact accumulator -> stored byte.
GQ_HD unsigned char gq_epilogue(int acc, int ch, const gq_i64* bias_eff, const int* mult,
                                const int* rshift, int zero_point, int qmin, int qmax) {
  const int y = gq_requant((gq_i64)acc + bias_eff[ch], mult[ch], rshift[ch], zero_point,
                           qmin, qmax);
  return (unsigned char)(y & 0xff);  // int8 and uint8 outputs share the byte
}

// Two adjacent accumulators of one output row (columns n, n + 1 of the group, as every
// tensor-core fragment holds them) through the epilogue into the row's bytes; columns past
// N are skipped.
GQ_HD void gq_store_pair(unsigned char* orow, const int* c, int n, int N, int group,
                         const gq_i64* bias_eff, const int* mult, const int* rshift,
                         int zero_point, int qmin, int qmax) {
  for (int e = 0; e < 2; ++e) {
    if (n + e >= N) continue;
    const int ch = group * N + n + e;
    orow[ch] = gq_epilogue(c[e], ch, bias_eff, mult, rshift, zero_point, qmin, qmax);
  }
}
