// requant.cuh: the fixed-point requantization epilogue shared by every gpuquant kernel.
//
// Bit-exact with gpuquant.backends.reference.requantize (contract section 1, TFLite /
// gemmlowp semantics):
//   x = acc                       (exact integer: dot product + bias)
//   if rshift < 0: x = saturate_int32(x * 2^-rshift)
//   x = SaturatingRoundingDoublingHighMul(x, multiplier)    (int64 product, nudge +-2^30,
//                                                            C truncating division by 2^31)
//   x = RoundingDivideByPOT(x, max(rshift, 0))              (round half away from zero)
//   y = clamp(x + zero_point, qmin, qmax)                   (ReLU / ReLU6 folded into the clamp)
//
// Plain C++ with no standard headers: the same text compiles under nvcc, NVRTC (CuPy) and a
// host C++ compiler (tests/backends/test_cupy_dispatch.py, the test_epilogue_* tests, check it
// on the CPU against the reference backend, bit for bit).
#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define GQ_HD __host__ __device__ __forceinline__
#else
#define GQ_HD inline
#endif

typedef long long gq_i64;
#define GQ_INT32_MIN (-2147483647 - 1)
#define GQ_INT32_MAX 2147483647

// gemmlowp SaturatingRoundingDoublingHighMul.
GQ_HD int gq_srdhm(int a, int b) {
  if (a == GQ_INT32_MIN && b == GQ_INT32_MIN) return GQ_INT32_MAX;
  const gq_i64 ab = (gq_i64)a * (gq_i64)b;
  const gq_i64 nudge = ab >= 0 ? (1LL << 30) : (1LL - (1LL << 30));
  return (int)((ab + nudge) / (1LL << 31));  // C division truncates toward zero
}

// gemmlowp RoundingDivideByPOT, 0 <= exponent <= 31.
GQ_HD int gq_rdbpot(int x, int exponent) {
  const gq_i64 mask = (1LL << exponent) - 1;
  const gq_i64 remainder = (gq_i64)x & mask;
  const gq_i64 threshold = (mask >> 1) + (x < 0 ? 1 : 0);
  return (int)(((gq_i64)x >> exponent) + (remainder > threshold ? 1 : 0));
}

// acc (exact, in int32 range by the caller's worst-case check) -> clamped output value.
GQ_HD int gq_requant(gq_i64 acc, int multiplier, int rshift, int zero_point, int qmin,
                     int qmax) {
  const int left = rshift < 0 ? -rshift : 0;    // <= 30 (larger multipliers are refused)
  const int right = rshift > 0 ? rshift : 0;    // <= 31
  gq_i64 v = acc * (1LL << left);
  v = v < (gq_i64)GQ_INT32_MIN ? (gq_i64)GQ_INT32_MIN : v;
  v = v > (gq_i64)GQ_INT32_MAX ? (gq_i64)GQ_INT32_MAX : v;
  const gq_i64 y = (gq_i64)gq_rdbpot(gq_srdhm((int)v, multiplier), right) + zero_point;
  return (int)(y < qmin ? qmin : (y > qmax ? qmax : y));
}
