// gemm_wgmma.cu: int8 linear layer, Hopper tier "wgmma": wgmma.mma_async m64n256k32 s8 from
// 128-byte swizzled shared memory, a 4-stage cp.async pipeline, the wgmmas of one stage in
// flight while the next stages load (kernels/wgmma_tile.cuh). Exact on an H200, slower
// than the Triton GEMM: see kernels/README.md.
//
// out (M, N) = requant(A (M, K) . W (N, K)^T + bias_eff); launch grid
// (ceil(M / 128), ceil(N / 256), 1), block 256, GQ_WG_SMEM_BYTES of dynamic shared memory.
// K % 16 == 0 and 16-byte aligned A and W (the launcher pads K otherwise). Built only for
// sm_90a (wgmma is an architecture-specific feature).
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ < 900 || !defined(__CUDA_ARCH_FEAT_SM90_ALL))
#error "gemm_wgmma.cu needs sm_90a only (nvcc -gencode arch=compute_90a,code=sm_90a)"
#endif
#include "wgmma_tile.cuh"

GQ_WG_GEMM_KERNEL(gq_gemm_wgmma)
