// gemm_dp4a.cu: int8 linear layer, portable tier (__dp4a, sm_61+).
//
// out (M, N) = requant(A (M, K) . W (N, K)^T + bias_eff); launch grid
// (ceil(M / 64), ceil(N / 64), 1), block 256. Any M, N, K; A and W contiguous.
#include "dp4a_tile.cuh"

extern "C" __global__ void __launch_bounds__(GQ_DP4A_THREADS)
gq_gemm_dp4a(const signed char* __restrict__ a, const signed char* __restrict__ w,
             const gq_i64* __restrict__ bias_eff, const int* __restrict__ mult,
             const int* __restrict__ rshift, unsigned char* __restrict__ out,
             int M, int N, int K, int a_xor, int zero_point, int qmin, int qmax) {
  GqGemmA al;
  al.a = a;
  al.M = M;
  al.K = K;
  al.base = 0;
  al.valid = false;
  gq_dp4a_tile(al, w, bias_eff, mult, rshift, out, M, N, K, N, 0, a_xor, zero_point, qmin,
               qmax);
}
