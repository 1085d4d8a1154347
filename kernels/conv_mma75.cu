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

GQ_MMA_CONV_KERNEL(gq_conv_mma75)
