// conv_dp4a.cu: int8 conv2d (implicit GEMM over NHWC), portable tier (__dp4a, sm_61+).
//
// x (n, H, W, C) NHWC int8 bytes, w (O, kh, kw, cg), out (n, ho, wo, O) NHWC.
// Launch grid (ceil(n*ho*wo / 64), ceil(og / 64), groups), block 256. Any channel count,
// any groups (depthwise included), stride, padding and dilation.
#include "dp4a_tile.cuh"

extern "C" __global__ void __launch_bounds__(GQ_DP4A_THREADS)
gq_conv_dp4a(const signed char* __restrict__ x, const signed char* __restrict__ w,
             const gq_i64* __restrict__ bias_eff, const int* __restrict__ mult,
             const int* __restrict__ rshift, unsigned char* __restrict__ out,
             int M, int og, int Kg, int a_xor, int zero_point, int qmin, int qmax,
             int H, int W, int C, int cg, int ho, int wo, int kw, int sh, int sw, int ph,
             int pw, int dh, int dw, int pad_byte) {
  GqConvA al;
  al.x = x;
  al.g.H = H; al.g.W = W; al.g.C = C; al.g.cg = cg; al.g.ho = ho; al.g.wo = wo;
  al.g.kw = kw; al.g.sh = sh; al.g.sw = sw; al.g.ph = ph; al.g.pw = pw; al.g.dh = dh;
  al.g.dw = dw;
  al.M = M;
  al.K = Kg;
  al.group = blockIdx.z;
  al.pad_byte = pad_byte;
  al.img = al.ih0 = al.iw0 = 0;
  al.valid = false;
  gq_dp4a_tile(al, w, bias_eff, mult, rshift, out, M, og, Kg, og * gridDim.z, blockIdx.z,
               a_xor, zero_point, qmin, qmax);
}
