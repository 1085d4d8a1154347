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

GQ_MMA_CONV_KERNEL(gq_conv_mma80)
