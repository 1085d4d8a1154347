// gemm_mma80.cu: int8 linear layer, Ampere / Ada tier: mma.sync m16n8k32 s8 with a 3-stage
// cp.async pipeline.
//
// out (M, N) = requant(A (M, K) . W (N, K)^T + bias_eff); launch grid
// (ceil(M / 128), ceil(N / 128), 1), block 256. K % 16 == 0 and 16-byte aligned A and W (the
// launcher pads K otherwise). Built only for sm_80 and newer.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "gemm_mma80.cu needs sm_80 or newer"
#endif
#define GQ_CP_ASYNC 1
#define GQ_MMA_16832 1
#define GQ_STAGES 3
#include "mma_tile.cuh"

GQ_MMA_GEMM_KERNEL(gq_gemm_mma80)
