// conv_mma80.cu: int8 conv2d (implicit GEMM over NHWC), Ampere / Ada tier: mma.sync m16n8k32
// s8 with a 3-stage cp.async pipeline.
//
// x (n, H, W, C) NHWC, w (O, kh, kw, cg), out (n, ho, wo, O) NHWC. Launch grid
// (ceil(n*ho*wo / 128), ceil(og / 128), groups), block 256. cg % 16 == 0 and 16-byte aligned
// x and w (the launcher pads channels of ungrouped convs; grouped convs with other channel
// counts run conv_dp4a.cu). Built only for sm_80 and newer.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "conv_mma80.cu needs sm_80 or newer"
#endif
#define GQ_CP_ASYNC 1
#define GQ_MMA_16832 1
#define GQ_STAGES 3
#include "mma_tile.cuh"

extern "C" __global__ void __launch_bounds__(GQ_MMA_THREADS)
gq_conv_mma80(const signed char* __restrict__ x, const signed char* __restrict__ w,
              const gq_i64* __restrict__ bias_eff, const int* __restrict__ mult,
              const int* __restrict__ rshift, unsigned char* __restrict__ out,
              int M, int og, int Kg, int a_xor, int zero_point, int qmin, int qmax,
              int H, int W, int C, int cg, int ho, int wo, int kw, int sh, int sw, int ph,
              int pw, int dh, int dw, int pad_byte) {
  GqConvChunkA al;
  al.x = x;
  al.g.H = H; al.g.W = W; al.g.C = C; al.g.cg = cg; al.g.ho = ho; al.g.wo = wo;
  al.g.kw = kw; al.g.sh = sh; al.g.sw = sw; al.g.ph = ph; al.g.pw = pw; al.g.dh = dh;
  al.g.dw = dw;
  al.M = M;
  al.K = Kg;
  al.group = blockIdx.z;
  al.pad_word = 0x01010101u * ((unsigned)pad_byte & 0xffu);
  al.img = al.ih0 = al.iw0 = 0;
  al.valid = false;
  gq_mma_tile(al, w, bias_eff, mult, rshift, out, M, og, Kg, og * gridDim.z, blockIdx.z, a_xor,
              zero_point, qmin, qmax);
}
