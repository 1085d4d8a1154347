// conv_wgmma.cu: int8 conv2d (implicit GEMM over NHWC), Hopper tier "wgmma": the main loop
// of kernels/wgmma_tile.cuh (wgmma.mma_async m64n256k32 s8, 4-stage cp.async pipeline).
// Exact on an H200, slower than Triton: see kernels/README.md.
//
// x (n, H, W, C) NHWC, w (O, kh, kw, cg), out (n, ho, wo, O) NHWC. Launch grid
// (ceil(n*ho*wo / 128), ceil(og / 256), groups), block 256, GQ_WG_SMEM_BYTES of dynamic
// shared memory. cg % 16 == 0 and 16-byte aligned x and w (the launcher pads channels of
// ungrouped convs; grouped convs with other channel counts run conv_dp4a.cu). Built only for
// sm_90a.
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ < 900 || !defined(__CUDA_ARCH_FEAT_SM90_ALL))
#error "conv_wgmma.cu needs sm_90a only (nvcc -gencode arch=compute_90a,code=sm_90a)"
#endif
#include "wgmma_tile.cuh"

GQ_WG_CONV_KERNEL(gq_conv_wgmma)
