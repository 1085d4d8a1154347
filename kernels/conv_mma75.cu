// conv_mma75.cu: int8 conv2d (implicit GEMM over NHWC), Turing tier: mma.sync m8n8k16 s8 (four
// per m16n8k32 tile), 2-stage shared-memory double buffer with plain 16-byte loads (sm_75 has
// no cp.async).
//
// x (n, H, W, C) NHWC, w (O, kh, kw, cg), out (n, ho, wo, O) NHWC. Launch grid
// (ceil(n*ho*wo / 128), ceil(og / 128), groups), block 256. cg % 16 == 0 and 16-byte aligned
// x and w (the launcher pads channels of ungrouped convs; grouped convs with other channel
// counts run conv_dp4a.cu). Built only for sm_75 and newer.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 750
#error "conv_mma75.cu needs sm_75 or newer"
#endif
#define GQ_CP_ASYNC 0
#define GQ_MMA_16832 0
#define GQ_STAGES 2
#include "mma_tile.cuh"

extern "C" __global__ void __launch_bounds__(GQ_MMA_THREADS)
gq_conv_mma75(const signed char* __restrict__ x, const signed char* __restrict__ w,
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
