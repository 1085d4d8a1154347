// wgmma_tile.cuh: the Hopper tensor-core main loop (tier "wgmma", sm_90a).
//
// Block tile 128 (M) x 256 (N), 256 threads = two warpgroups; warpgroup w computes rows
// 64 w .. 64 w + 63 of the tile with wgmma.mma_async.m64n256k32 s32.s8.s8, both operands in
// shared memory (K-major, 128-byte swizzle), int32 accumulators in registers (128 a
// thread). K step 128 bytes a stage (four k32 wgmmas a warpgroup), GQ_WG_STAGES stages in
// dynamic shared memory fed by cp.async (16 B, zero fill past M / N / K) from all 256
// threads.
//
// Why this tier exists: Triton keeps no int8 wgmma in flight across K steps (its MMAv3
// pipeliner makes a dot asynchronous only with a float32 accumulator), so every K step of
// the Triton GEMM / conv ends in wgmma.wait_group 0 (bench/README.md NOTES). Here the
// wgmmas of stage kt stay in flight while the threads wait for stage kt + 1's copies and
// issue stage kt + STAGES - 2's: each iteration ends in wgmma.wait_group 1.
//
// Pipeline, iteration kt (STAGES = S; slot s = stage % S):
//   cp.async.wait_group S-3          this thread's copies of stage kt have landed
//   (uint8 x: XOR this thread's A chunks of stage kt with 0x80 in place)
//   fence.proxy.async.shared::cta    generic-proxy writes visible to wgmma (async proxy)
//   __syncthreads                    every thread's copies of stage kt landed, and every
//                                    warpgroup has retired stage kt-2's wgmmas (its
//                                    wait_group 1 in iteration kt-1)
//   cp.async stage kt+S-2 -> slot (kt-2) % S, commit
//   wgmma.fence; 4 x wgmma on slot kt % S; wgmma.commit_group; wgmma.wait_group 1
//
// Shared-memory layout of one operand tile (rows x 128 bytes, K contiguous): row r at
// r * 128, its 16-byte chunk c at chunk position c ^ (r % 8) (the 128-byte swizzle, on
// absolute address bits: every tile starts 1024-byte aligned). The wgmma descriptors: start
// address (bits 0-13, >> 4) advanced by 32 bytes a k32 slice, leading byte offset 1 (unused
// by swizzled K-major layouts), stride byte offset 1024 (8 rows x 128 B), swizzle mode 1
// (128 B) in bits 62-63.
//
// Accumulator fragment (m64nNk32, s32): thread t of the warpgroup, warp v = t / 32,
// lane l = 4 g + q: d[4 j + e] is row 16 v + g + 8 (e >> 1), column 8 j + 2 q + (e & 1).
//
// GQ_HOST_EMU (tests/backends/test_cupy_kernels.py) supplies gq_emu_* stand-ins: wgmma is
// computed from the descriptors' bits at the wait_group that retires it (the latest the
// hardware may read shared memory), so a stage refilled too early shows as a wrong byte.
//
// Requirements checked by the host launcher: K % 16 == 0, A / B / x base pointers 16-byte
// aligned, conv cg % 16 == 0 (as mma_tile.cuh).
#pragma once
#ifndef GQ_CP_ASYNC
#define GQ_CP_ASYNC 1
#endif
#include "tile_copy.cuh"

#define GQ_WG_BM 128
#define GQ_WG_BN 256
#define GQ_WG_BK 128
#define GQ_WG_THREADS 256
#ifndef GQ_WG_STAGES
#define GQ_WG_STAGES 4
#endif
#define GQ_WG_A_BYTES (GQ_WG_BM * GQ_WG_BK)
#define GQ_WG_B_BYTES (GQ_WG_BN * GQ_WG_BK)
#define GQ_WG_STAGE_BYTES (GQ_WG_A_BYTES + GQ_WG_B_BYTES)
// dynamic shared memory a block: the stages plus 1 KB to align the first to 1024 bytes
#define GQ_WG_SMEM_BYTES (GQ_WG_STAGES * GQ_WG_STAGE_BYTES + 1024)
#define GQ_WG_A_CHUNKS (GQ_WG_A_BYTES / 16 / GQ_WG_THREADS)   // 4 a thread a stage
#define GQ_WG_B_CHUNKS (GQ_WG_B_BYTES / 16 / GQ_WG_THREADS)   // 8

#if GQ_WG_STAGES < 3
#error "wgmma_tile.cuh needs at least 3 stages (one computing, one retiring, one loading)"
#endif

// Byte offset of (row, 16-byte chunk c) in a swizzled [rows][128] tile.
GQ_HD int gq_wg_swz(int row, int c) { return row * GQ_WG_BK + (((c ^ row) & 7) << 4); }

// Shared-memory matrix descriptor of a K-major, 128-byte swizzled operand at saddr.
GQ_D unsigned long long gq_wg_desc(unsigned saddr) {
  return (unsigned long long)((saddr & 0x3FFFFu) >> 4) | (1ull << 16) |
         ((unsigned long long)(1024 >> 4) << 32) | (1ull << 62);
}

GQ_D void gq_wg_fence_proxy_async() {
#if !defined(GQ_HOST_EMU)
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

GQ_D void gq_wg_fence() {
#if !defined(GQ_HOST_EMU)
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}

GQ_D void gq_wg_commit() {
#if defined(GQ_HOST_EMU)
  gq_emu_wgmma_commit();
#else
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}

template <int N>
GQ_D void gq_wg_wait() {
#if defined(GQ_HOST_EMU)
  gq_emu_wgmma_wait(N);
#else
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}

// Keeps the compiler from moving reads or writes of the accumulators across the
// asynchronous wgmma window (the registers belong to the tensor cores until wait_group).
GQ_D void gq_wg_fence_acc(int* d) {
#if !defined(GQ_HOST_EMU)
#pragma unroll
  for (int i = 0; i < 128; ++i) asm volatile("" : "+r"(d[i])::"memory");
#endif
}

// d (64 x 256, this thread's 128 values) += A (64 x 32) . B (256 x 32)^T from shared memory.
GQ_D void gq_wgmma_m64n256k32(int* d, unsigned long long desc_a, unsigned long long desc_b) {
#if defined(GQ_HOST_EMU)
  gq_emu_wgmma_m64n256k32(d, desc_a, desc_b);
#else
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n256k32.s32.s8.s8 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "
      "%128, %129, 1;\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]),
        "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]),
        "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]),
        "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31]),
        "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39]),
        "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]), "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]),
        "+r"(d[48]), "+r"(d[49]), "+r"(d[50]), "+r"(d[51]), "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55]),
        "+r"(d[56]), "+r"(d[57]), "+r"(d[58]), "+r"(d[59]), "+r"(d[60]), "+r"(d[61]), "+r"(d[62]), "+r"(d[63]),
        "+r"(d[64]), "+r"(d[65]), "+r"(d[66]), "+r"(d[67]), "+r"(d[68]), "+r"(d[69]), "+r"(d[70]), "+r"(d[71]),
        "+r"(d[72]), "+r"(d[73]), "+r"(d[74]), "+r"(d[75]), "+r"(d[76]), "+r"(d[77]), "+r"(d[78]), "+r"(d[79]),
        "+r"(d[80]), "+r"(d[81]), "+r"(d[82]), "+r"(d[83]), "+r"(d[84]), "+r"(d[85]), "+r"(d[86]), "+r"(d[87]),
        "+r"(d[88]), "+r"(d[89]), "+r"(d[90]), "+r"(d[91]), "+r"(d[92]), "+r"(d[93]), "+r"(d[94]), "+r"(d[95]),
        "+r"(d[96]), "+r"(d[97]), "+r"(d[98]), "+r"(d[99]), "+r"(d[100]), "+r"(d[101]), "+r"(d[102]), "+r"(d[103]),
        "+r"(d[104]), "+r"(d[105]), "+r"(d[106]), "+r"(d[107]), "+r"(d[108]), "+r"(d[109]), "+r"(d[110]), "+r"(d[111]),
        "+r"(d[112]), "+r"(d[113]), "+r"(d[114]), "+r"(d[115]), "+r"(d[116]), "+r"(d[117]), "+r"(d[118]), "+r"(d[119]),
        "+r"(d[120]), "+r"(d[121]), "+r"(d[122]), "+r"(d[123]), "+r"(d[124]), "+r"(d[125]), "+r"(d[126]), "+r"(d[127])
      : "l"(desc_a), "l"(desc_b)
      : "memory");
#endif
}

// One stage's copies: this thread's A chunks (rows tid / 8 + 32 i, chunk tid % 8) and B
// chunks (rows tid / 8 + 32 i of the 256-row weight tile).
template <class ALoader>
GQ_D void gq_wg_load_stage(const ALoader* al, const signed char* __restrict__ w,
                           unsigned char* stage, int kt, int tid, int n0, int N, int K,
                           int group) {
  const int c = tid & 7, r0 = tid >> 3;
  const int k = kt * GQ_WG_BK + c * 16;
#pragma unroll
  for (int i = 0; i < GQ_WG_A_CHUNKS; ++i)
    al[i].load(stage + gq_wg_swz(r0 + 32 * i, c), k);
  unsigned char* bs = stage + GQ_WG_A_BYTES;
#pragma unroll
  for (int i = 0; i < GQ_WG_B_CHUNKS; ++i) {
    const int n = n0 + r0 + 32 * i;
    const bool ok = n < N && k < K;
    gq_copy16(bs + gq_wg_swz(r0 + 32 * i, c),
               ok ? w + ((gq_i64)group * N + n) * K + k : w, ok);
  }
}

template <class ALoader>
__device__ void gq_wg_tile(ALoader* al, const signed char* __restrict__ w,
                           const gq_i64* __restrict__ bias_eff, const int* __restrict__ mult,
                           const int* __restrict__ rshift, unsigned char* __restrict__ out,
                           int M, int N, int K, int ldo, int group, int a_xor,
                           int zero_point, int qmin, int qmax, unsigned char* smem_raw) {
  // first stage 1024-byte aligned in the shared window (the swizzle uses address bits 7-9)
  unsigned char* smem = smem_raw + ((1024 - (gq_smem_addr(smem_raw) & 1023)) & 1023);
  const int tid = threadIdx.x;
  const int wg = tid >> 7, v = (tid >> 5) & 3, lane = tid & 31;
  const int g = lane >> 2, q = lane & 3;
  const int m0 = blockIdx.x * GQ_WG_BM;
  const int n0 = blockIdx.y * GQ_WG_BN;
#pragma unroll
  for (int i = 0; i < GQ_WG_A_CHUNKS; ++i) al[i].set_row(m0 + (tid >> 3) + 32 * i);

  const int ktiles = (K + GQ_WG_BK - 1) / GQ_WG_BK;
#pragma unroll
  for (int s = 0; s < GQ_WG_STAGES - 2; ++s) {
    if (s < ktiles)
      gq_wg_load_stage(al, w, smem + s * GQ_WG_STAGE_BYTES, s, tid, n0, N, K, group);
    gq_commit();
  }

  int d[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) d[i] = 0;
  const unsigned axor = (unsigned)a_xor;
  const unsigned sbase = gq_smem_addr(smem);

  for (int kt = 0; kt < ktiles; ++kt) {
    gq_wait<GQ_WG_STAGES - 3>();
    unsigned char* stage = smem + (kt % GQ_WG_STAGES) * GQ_WG_STAGE_BYTES;
    if (axor) {  // uint8 x: x ^ 0x80 = x - 128 on this thread's own A chunks, in place
#pragma unroll
      for (int i = 0; i < GQ_WG_A_CHUNKS; ++i) {
        uint4* p = reinterpret_cast<uint4*>(stage + gq_wg_swz((tid >> 3) + 32 * i, tid & 7));
        uint4 u = *p;
        u.x ^= axor; u.y ^= axor; u.z ^= axor; u.w ^= axor;
        *p = u;
      }
    }
    gq_wg_fence_proxy_async();
    __syncthreads();
    {
      const int nt = kt + GQ_WG_STAGES - 2;
      if (nt < ktiles)
        gq_wg_load_stage(al, w, smem + (nt % GQ_WG_STAGES) * GQ_WG_STAGE_BYTES, nt, tid, n0,
                         N, K, group);
      gq_commit();
    }
    const unsigned sa = sbase + (kt % GQ_WG_STAGES) * GQ_WG_STAGE_BYTES + wg * 64 * GQ_WG_BK;
    const unsigned sb = sbase + (kt % GQ_WG_STAGES) * GQ_WG_STAGE_BYTES + GQ_WG_A_BYTES;
    gq_wg_fence_acc(d);
    __syncwarp();  // the conv loader branches per thread: reconverge before .sync.aligned
    gq_wg_fence();
#pragma unroll
    for (int ks = 0; ks < GQ_WG_BK / 32; ++ks)
      gq_wgmma_m64n256k32(d, gq_wg_desc(sa + 32 * ks), gq_wg_desc(sb + 32 * ks));
    gq_wg_commit();
    gq_wg_wait<1>();
    gq_wg_fence_acc(d);
  }
  gq_wg_wait<0>();
  gq_wg_fence_acc(d);
  gq_wait<0>();

#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int m = m0 + wg * 64 + v * 16 + g + 8 * h;
    if (m >= M) continue;
    unsigned char* orow = out + (gq_i64)m * ldo;
#pragma unroll
    for (int j = 0; j < 32; ++j)
      gq_store_pair(orow, &d[4 * j + 2 * h], n0 + 8 * j + 2 * q, N, group, bias_eff, mult,
                    rshift, zero_point, qmin, qmax);
  }
}

#if defined(GQ_HOST_EMU)
#define GQ_WG_SMEM_DECL static __attribute__((aligned(1024))) unsigned char gq_smem[GQ_WG_SMEM_BYTES]; \
  gq_emu_smem_base = gq_smem;
#else
// (declared 16-byte aligned only: with __align__(1024) the compiler folds the re-alignment
// in gq_wg_tile to nothing and the kernel would trust the driver's placement silently)
#define GQ_WG_SMEM_DECL extern __shared__ __align__(16) unsigned char gq_smem[];
#endif

// The entry points (same parameters as the mma tiers'; launched with GQ_WG_SMEM_BYTES of
// dynamic shared memory and 256 threads).
#define GQ_WG_GEMM_KERNEL(NAME) \
extern "C" __global__ void __launch_bounds__(GQ_WG_THREADS, 1) \
NAME(const signed char* __restrict__ a, const signed char* __restrict__ w, \
     const gq_i64* __restrict__ bias_eff, const int* __restrict__ mult, \
     const int* __restrict__ rshift, unsigned char* __restrict__ out, \
     int M, int N, int K, int a_xor, int zero_point, int qmin, int qmax) { \
  GQ_WG_SMEM_DECL \
  GqGemmChunkA al[GQ_WG_A_CHUNKS]; \
  for (int i = 0; i < GQ_WG_A_CHUNKS; ++i) { \
    al[i].a = a; al[i].M = M; al[i].K = K; al[i].base = 0; al[i].valid = false; \
  } \
  gq_wg_tile(al, w, bias_eff, mult, rshift, out, M, N, K, N, 0, a_xor, zero_point, qmin, \
             qmax, gq_smem); \
}

#define GQ_WG_CONV_KERNEL(NAME) \
extern "C" __global__ void __launch_bounds__(GQ_WG_THREADS, 1) \
NAME(const signed char* __restrict__ x, const signed char* __restrict__ w, \
     const gq_i64* __restrict__ bias_eff, const int* __restrict__ mult, \
     const int* __restrict__ rshift, unsigned char* __restrict__ out, \
     int M, int og, int Kg, int a_xor, int zero_point, int qmin, int qmax, \
     int H, int W, int C, int cg, int ho, int wo, int kw, int sh, int sw, int ph, \
     int pw, int dh, int dw, int pad_byte) { \
  GQ_WG_SMEM_DECL \
  GqConvChunkA al[GQ_WG_A_CHUNKS]; \
  for (int i = 0; i < GQ_WG_A_CHUNKS; ++i) { \
    al[i].x = x; \
    al[i].g.H = H; al[i].g.W = W; al[i].g.C = C; al[i].g.cg = cg; al[i].g.ho = ho; \
    al[i].g.wo = wo; al[i].g.kw = kw; al[i].g.sh = sh; al[i].g.sw = sw; al[i].g.ph = ph; \
    al[i].g.pw = pw; al[i].g.dh = dh; al[i].g.dw = dw; \
    al[i].M = M; al[i].K = Kg; al[i].group = blockIdx.z; \
    al[i].pad_word = 0x01010101u * ((unsigned)pad_byte & 0xffu); \
    al[i].img = al[i].ih0 = al[i].iw0 = 0; al[i].valid = false; \
  } \
  gq_wg_tile(al, w, bias_eff, mult, rshift, out, M, og, Kg, og * gridDim.z, blockIdx.z, a_xor, \
             zero_point, qmin, qmax, gq_smem); \
}
