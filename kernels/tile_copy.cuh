// tile_copy.cuh: global -> shared copies of the tensor-core tiers (mma_tile.cuh, wgmma_tile.cuh)
// and their A-operand loaders (a linear layer's rows, a convolution's implicit-GEMM rows).
//
//   GQ_CP_ASYNC  1: cp.async.cg (16 B, zero fill where invalid) with commit_group /
//                wait_group (sm_80+); 0: plain 16-byte loads and stores (sm_75).
//   GQ_HOST_EMU  the CPU test harness's gq_emu_* stand-ins for the inline PTX.
#pragma once
#include "igemm.cuh"

#ifndef GQ_CP_ASYNC
#error "define GQ_CP_ASYNC (0 or 1) before including tile_copy.cuh"
#endif

#if defined(GQ_HOST_EMU)
GQ_D unsigned gq_smem_addr(const void* p) { return gq_emu_smem_addr(p); }
#else
GQ_D unsigned gq_smem_addr(const void* p) {
  return (unsigned)__cvta_generic_to_shared(p);
}
#endif

// 16 bytes global -> shared; valid == false writes 16 zero bytes.
GQ_D void gq_copy16(unsigned char* dst, const signed char* src, bool valid) {
#if GQ_CP_ASYNC && defined(GQ_HOST_EMU)
  gq_emu_cp_async(dst, src, valid);
#elif GQ_CP_ASYNC
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(gq_smem_addr(dst)),
               "l"(src), "r"(valid ? 16 : 0)
               : "memory");
#else
  uint4 v = make_uint4(0u, 0u, 0u, 0u);
  if (valid) v = *reinterpret_cast<const uint4*>(src);
  *reinterpret_cast<uint4*>(dst) = v;
#endif
}

GQ_D void gq_fill16(unsigned char* dst, unsigned word) {
  *reinterpret_cast<uint4*>(dst) = make_uint4(word, word, word, word);
}

GQ_D void gq_commit() {
#if GQ_CP_ASYNC && defined(GQ_HOST_EMU)
  gq_emu_commit();
#elif GQ_CP_ASYNC
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

template <int N>
GQ_D void gq_wait() {
#if GQ_CP_ASYNC && defined(GQ_HOST_EMU)
  gq_emu_wait(N);
#elif GQ_CP_ASYNC
  // "memory": plain shared-memory reads after the wait (the wgmma tier's uint8 pass) must
  // not be hoisted above it
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// A chunks of a linear layer: (M, K) row-major.
struct GqGemmChunkA {
  const signed char* a;
  int M, K;
  gq_i64 base;
  bool valid;
  GQ_D void set_row(int m) { valid = m < M; base = valid ? (gq_i64)m * K : 0; }
  // 16 bytes at k into dst (zeros past K or M).
  GQ_D void load(unsigned char* dst, int k) const {
    const bool ok = valid && k < K;
    gq_copy16(dst, a + (ok ? base + k : 0), ok);
  }
};

// A chunks of a convolution: 16 channels of one input pixel, or the zero point (padding).
struct GqConvChunkA {
  const signed char* x;
  GqConvGeom g;
  int M, K, group;
  unsigned pad_word;
  int img, ih0, iw0;
  bool valid;
  GQ_D void set_row(int m) {
    valid = m < M;
    img = ih0 = iw0 = 0;
    if (valid) gq_conv_row(g, m, &img, &ih0, &iw0);
  }
  GQ_D void load(unsigned char* dst, int k) const {
    if (!valid || k >= K) {
      gq_copy16(dst, x, false);
      return;
    }
    const gq_i64 off = gq_conv_offset(g, img, ih0, iw0, k, group);
    if (off < 0)
      gq_fill16(dst, pad_word);
    else
      gq_copy16(dst, x + off, true);
  }
};
