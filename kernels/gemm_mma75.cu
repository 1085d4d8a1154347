// gemm_mma75.cu: int8 linear layer, Turing tier: mma.sync m8n8k16 s8 (four per m16n8k32 tile),
// 2-stage shared-memory double buffer with plain 16-byte loads (sm_75 has no cp.async).
//
// out (M, N) = requant(A (M, K) . W (N, K)^T + bias_eff); launch grid
// (ceil(M / 128), ceil(N / 128), 1), block 256. K % 16 == 0 and 16-byte aligned A and W (the
// launcher pads K otherwise). Built only for sm_75 and newer.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 750
#error "gemm_mma75.cu needs sm_75 or newer"
#endif
#define GQ_CP_ASYNC 0
#define GQ_MMA_16832 0
#define GQ_STAGES 2
#include "mma_tile.cuh"

GQ_MMA_GEMM_KERNEL(gq_gemm_mma75)
