// gemm_sm90.cu: int8 linear layer, Hopper tier: the mma80 main loop (mma.sync m16n8k32 s8,
// cp.async) with a 4-stage pipeline, built for sm_90. No wgmma / TMA yet: see
// kernels/README.md (unmeasured).
//
// out (M, N) = requant(A (M, K) . W (N, K)^T + bias_eff); launch grid
// (ceil(M / 128), ceil(N / 128), 1), block 256. K % 16 == 0 and 16-byte aligned A and W (the
// launcher pads K otherwise). Built only for sm_90 and newer.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#error "gemm_sm90.cu needs sm_90 or newer"
#endif
#define GQ_CP_ASYNC 1
#define GQ_MMA_16832 1
#define GQ_STAGES 4
#include "mma_tile.cuh"

GQ_MMA_GEMM_KERNEL(gq_gemm_sm90)
