// conv_sm90.cu: int8 conv2d (implicit GEMM over NHWC), Hopper tier: the mma80 main loop
// (mma.sync m16n8k32 s8, cp.async) with a 4-stage pipeline, built for sm_90. No wgmma / TMA
// yet: see kernels/README.md (unmeasured).
//
// x (n, H, W, C) NHWC, w (O, kh, kw, cg), out (n, ho, wo, O) NHWC. Launch grid
// (ceil(n*ho*wo / 128), ceil(og / 128), groups), block 256. cg % 16 == 0 and 16-byte aligned
// x and w (the launcher pads channels of ungrouped convs; grouped convs with other channel
// counts run conv_dp4a.cu). Built only for sm_90 and newer.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#error "conv_sm90.cu needs sm_90 or newer"
#endif
#define GQ_CP_ASYNC 1
#define GQ_MMA_16832 1
#define GQ_STAGES 4
#include "mma_tile.cuh"

GQ_MMA_CONV_KERNEL(gq_conv_sm90)
