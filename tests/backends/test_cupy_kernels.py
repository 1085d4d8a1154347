"""The CuPy backend's CUDA kernels against the oracle, byte for byte.

Two ways to run the same cases:

* on the CPU (always, needs g++): the very sources in ``kernels/`` are compiled for the host
  with ``GQ_HOST_EMU`` and run one fiber per CUDA thread; block-wide barriers for
  ``__syncthreads``, between which the warps run one after another (a missing barrier shows
  as a wrong byte), warp-level syncs for ``ldmatrix`` / ``shfl`` / ``mma.sync`` (the last
  computed from the PTX ISA fragment layouts),
  ``cp.async`` copies deferred to ``cp.async.wait_group`` (the latest the hardware may land
  them) or done at once (the earliest). The host-side plans (padding, zero-point correction,
  weight layout) are the backend's own (:mod:`gpuquant.backends.cupy.launch`).
* on a GPU (``@pytest.mark.gpu``): every tier the device can run, forced with
  ``GPUQUANT_CUPY_TIER``, through the public backend, against the NumPy backend.

GPU run (one command, on a machine with CuPy and a CUDA GPU)::

    python -m pytest -q tests/backends/test_cupy_kernels.py tests/backends/test_cupy_dispatch.py
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess
import zlib

import pytest
import torch

from gpuquant.backends import reference as ref
from gpuquant.backends.cupy import dispatch, launch, loader
from gpuquant.dtypes import get_dtype
from gpuquant.functional.requant import make_requant

TIERS = dispatch.TIERS

# --------------------------------------------------------------------------- cases
LINEAR_CASES = [  # (lead shape, K, N)
    ((1,), 7, 5),            # M = 1 (GEMV kernel), K not a multiple of 4 or 16
    ((2, 4), 96, 21),        # M = 8 (GEMV kernel, 16-byte loads), N not a multiple of 8
    ((5,), 1040, 13),        # GEMV, every lane busy, loop wraps (16-byte loads)
    ((3,), 530, 6),          # GEMV, every lane busy, K % 4 != 0 (byte loads)
    ((9,), 33, 9),           # M = 9: the GEMM kernels again
    ((33,), 123, 37),
    ((2, 65), 64, 131),      # M > 128 rows, N > 128 columns: several tiles each way
    ((3,), 300, 9),          # K past several 32-byte steps, tail chunk
]
CONV_CASES = [  # (n, c, h, w, o, (kh, kw), stride, padding, dilation, groups)
    (2, 3, 9, 7, 5, (3, 3), 2, 1, 1, 1),          # first layer: 3 channels (padded to 16)
    (1, 16, 6, 6, 20, (3, 1), 1, (2, 0), 2, 1),   # dilation, asymmetric kernel and padding
    (2, 32, 5, 5, 8, (3, 3), 1, 1, 1, 2),         # grouped, 16 channels a group
    (1, 8, 7, 7, 8, (3, 3), 1, 1, 1, 8),          # depthwise (dp4a kernel on every tier)
    (2, 24, 10, 10, 130, (1, 1), 1, 0, 1, 1),     # 1x1, 200 rows, 130 channels, C % 16 != 0
]
SCALES = ["normal", "left_shift", "tiny"]


def _qrange(dtype):
    return (0, 255) if dtype == torch.uint8 else (-128, 127)


def _rand_act(shape, dtype, gen):
    lo, hi = _qrange(dtype)
    return torch.randint(lo, hi + 1, shape, generator=gen).to(dtype)


def _requant_for(acc: torch.Tensor, ch_axis: int, n_out: int, out_dtype: str, regime: str,
                 activation: str, gen):
    """A Requant whose outputs spread over the output range (or overflow it on purpose)."""
    s_x = 0.02
    s_w = (torch.rand(n_out, generator=gen, dtype=torch.float64) * 0.01 + 0.001).float()
    spread = float(acc.double().std()) if acc.numel() > 1 else 1.0
    spread = max(spread, 1.0)
    mean_sw = float(s_w.double().mean())
    if regime == "normal":
        s_y = s_x * mean_sw * spread / 40.0
    elif regime == "left_shift":          # real multiplier > 1: negative rshift
        s_y = s_x * mean_sw / 7.0
    else:                                  # tiny multiplier, large rshift
        s_y = s_x * mean_sw * spread * 1e3
    qd = get_dtype(out_dtype)
    zp = int(torch.randint(qd.qmin // 2, qd.qmax // 2 + 1, (1,), generator=gen))
    return make_requant(s_x, s_w, s_y, zp, qd, activation)


def make_linear(lead, k, n, x_dtype, out_dtype, regime, gen, activation="none"):
    x = _rand_act(lead + (k,), x_dtype, gen)
    lo, hi = _qrange(x_dtype)
    x_zp = int(torch.randint(lo, hi + 1, (1,), generator=gen))
    w = torch.randint(-127, 128, (n, k), generator=gen).to(torch.int8)
    bias = torch.randint(-20000, 20001, (n,), generator=gen).to(torch.int32)
    acc = (x.double() - x_zp) @ w.double().t()
    rq = _requant_for(acc, -1, n, out_dtype, regime, activation, gen)
    return x, x_zp, w, bias, rq


def make_conv(case, x_dtype, out_dtype, regime, gen, activation="none"):
    nimg, c, h, wd, o, (kh, kw), stride, padding, dilation, groups = case
    x = _rand_act((nimg, c, h, wd), x_dtype, gen).contiguous(memory_format=torch.channels_last)
    lo, hi = _qrange(x_dtype)
    x_zp = int(torch.randint(lo, hi + 1, (1,), generator=gen))
    w = torch.randint(-127, 128, (o, c // groups, kh, kw), generator=gen).to(torch.int8)
    bias = torch.randint(-20000, 20001, (o,), generator=gen).to(torch.int32)
    acc = torch.nn.functional.conv2d(x.double() - x_zp, w.double(), None, stride, padding,
                                     dilation, groups)
    rq = _requant_for(acc, 1, o, out_dtype, regime, activation, gen)
    return x, x_zp, w, bias, (stride, padding, dilation, groups), rq


def _oracles():
    """(name, ops) of the oracles importable here: the NumPy backend when present, and the
    reference (which the NumPy backend's own tests tie to it)."""
    out = []
    try:
        from gpuquant.backends import numpy as npb
        if "linear" in getattr(npb, "OPS", {}) and "conv2d" in npb.OPS:
            out.append(("numpy", npb.OPS))
    except ImportError:
        pass
    out.append(("reference", ref.OPS))
    return out


# --------------------------------------------------------------------------- host emulation
_EMU_PRELUDE = r"""
#include <ucontext.h>
#include <functional>
#include <vector>
#define GQ_HOST_EMU 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
struct gq_dim3 { unsigned x, y, z; };
struct uint4 { unsigned x, y, z, w; };
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }

namespace gqemu {
const int kStack = 64 * 1024;
struct Copy { unsigned char* dst; const signed char* src; bool valid; long group; };
struct Wgmma { int* d; unsigned long long a, b; long group; };
// wait: 0 running, 1 at a warp-level sync (ldmatrix, mma, shfl), 2 at __syncthreads
struct Fiber { ucontext_t ctx; gq_dim3 tid; bool done; int wait; std::vector<Copy> pending; long committed;
               std::vector<Wgmma> wg_pending; long wg_committed; };
static Fiber F[1024];
static std::vector<char> stacks;
static int nthreads = 0, cur = 0, mode = 0;
static ucontext_t sched;
static gq_dim3 block_idx, grid_dim;
static std::function<void()> body;
static unsigned A_s[32][32][4], B_s[32][32][2];

inline void barrier() { F[cur].wait = 2; swapcontext(&F[cur].ctx, &sched); }
inline void warp_barrier() { F[cur].wait = 1; swapcontext(&F[cur].ctx, &sched); }
static void entry() { body(); F[cur].done = true; swapcontext(&F[cur].ctx, &sched); }

inline void do_copy(const Copy& c) {
  for (int i = 0; i < 16; ++i) c.dst[i] = c.valid ? (unsigned char)c.src[i] : 0;
}

// Runs every block in turn. Inside a block, between two __syncthreads, the warps run one
// after another (warp 0 to its next __syncthreads, then warp 1, ...): the most skew a GPU can
// show, so a missing block barrier lets a warp overwrite shared memory another still reads.
// A warp's 32 fibers run in lockstep from one warp-level sync to the next. Returns 0; -1 when
// threads leave while others wait at a barrier; -2 when cp.async copies were never waited
// for; -3 when a warp's fibers diverge between a warp sync and __syncthreads; -4 when
// wgmma groups were never waited for.
inline int launch(int gx, int gy, int gz, int nt) {
  nthreads = nt;
  stacks.assign((size_t)nt * kStack, 0);
  grid_dim = {(unsigned)gx, (unsigned)gy, (unsigned)gz};
  for (int bz = 0; bz < gz; ++bz)
    for (int by = 0; by < gy; ++by)
      for (int bx = 0; bx < gx; ++bx) {
        block_idx = {(unsigned)bx, (unsigned)by, (unsigned)bz};
        for (int t = 0; t < nt; ++t) {
          getcontext(&F[t].ctx);
          F[t].ctx.uc_stack.ss_sp = &stacks[(size_t)t * kStack];
          F[t].ctx.uc_stack.ss_size = kStack;
          F[t].ctx.uc_link = nullptr;
          makecontext(&F[t].ctx, entry, 0);
          F[t].tid = {(unsigned)t, 0u, 0u};
          F[t].done = false;
          F[t].wait = 0;
          F[t].pending.clear();
          F[t].committed = 0;
          F[t].wg_pending.clear();
          F[t].wg_committed = 0;
        }
        for (;;) {
          for (int w0 = 0; w0 < nt; w0 += 32) {  // each warp up to its next __syncthreads
            const int w1 = w0 + 32 < nt ? w0 + 32 : nt;
            for (;;) {
              bool ran = false;
              for (int t = w0; t < w1; ++t)
                if (!F[t].done && F[t].wait != 2) {
                  F[t].wait = 0; cur = t; swapcontext(&sched, &F[t].ctx); ran = true;
                }
              if (!ran) break;
              int at_warp = 0, other = 0;
              for (int t = w0; t < w1; ++t) (F[t].wait == 1 && !F[t].done ? at_warp : other)++;
              if (at_warp && other) return -3;
            }
          }
          int ndone = 0;
          for (int t = 0; t < nt; ++t) ndone += F[t].done;
          if (ndone == nt) break;
          if (ndone) return -1;
          for (int t = 0; t < nt; ++t) F[t].wait = 0;  // every thread at __syncthreads
        }
        for (int t = 0; t < nt; ++t)
          if (!F[t].pending.empty()) return -2;
        for (int t = 0; t < nt; ++t)
          if (!F[t].wg_pending.empty()) return -4;
      }
  return 0;
}
}  // namespace gqemu

#define threadIdx (gqemu::F[gqemu::cur].tid)
#define blockIdx (gqemu::block_idx)
#define gridDim (gqemu::grid_dim)
inline void __syncthreads() { gqemu::barrier(); }
inline void __syncwarp(unsigned = 0xffffffffu) { gqemu::warp_barrier(); }

inline int __dp4a(int a, int b, int c) {
  unsigned s = (unsigned)c;
  for (int i = 0; i < 4; ++i)
    s += (unsigned)((int)(signed char)(a >> (8 * i)) * (int)(signed char)(b >> (8 * i)));
  return (int)s;
}

inline void gq_emu_cp_async(unsigned char* dst, const signed char* src, bool valid) {
  gqemu::Copy c{dst, src, valid, gqemu::F[gqemu::cur].committed};
  if (gqemu::mode == 1) gqemu::do_copy(c); else gqemu::F[gqemu::cur].pending.push_back(c);
}
inline void gq_emu_commit() { gqemu::F[gqemu::cur].committed++; }
inline void gq_emu_wait(int n) {
  gqemu::Fiber& f = gqemu::F[gqemu::cur];
  std::vector<gqemu::Copy> keep;
  for (const auto& c : f.pending) {
    if (c.group < f.committed - n) gqemu::do_copy(c); else keep.push_back(c);
  }
  f.pending.swap(keep);
}

// ldmatrix .x4 .b16: lane l supplies the row address l % 8 of matrix l / 8; register j of lane
// 4 g + t gets the 4 bytes at (row g of matrix j) + 4 t.
static const unsigned char* gq_emu_addr[32][32];
inline void gq_emu_ldmatrix_x4(unsigned* r, const unsigned char* p) {
  const int tid = (int)threadIdx.x, w = tid / 32, lane = tid % 32;
  gq_emu_addr[w][lane] = p;
  gqemu::warp_barrier();
  const int g = lane >> 2, t = lane & 3;
  for (int j = 0; j < 4; ++j) {
    const unsigned char* q = gq_emu_addr[w][8 * j + g] + 4 * t;
    r[j] = (unsigned)q[0] | ((unsigned)q[1] << 8) | ((unsigned)q[2] << 16) | ((unsigned)q[3] << 24);
  }
  gqemu::warp_barrier();
}

// __shfl_xor_sync over the full warp: lane l reads lane l ^ mask's value.
static int gq_emu_shfl_s[32][32];
inline int __shfl_xor_sync(unsigned, int v, int mask) {
  const int tid = (int)threadIdx.x, w = tid / 32, lane = tid % 32;
  gq_emu_shfl_s[w][lane] = v;
  gqemu::warp_barrier();
  const int r = gq_emu_shfl_s[w][lane ^ mask];
  gqemu::warp_barrier();
  return r;
}

static inline int gq_emu_byte(unsigned reg, int k) { return (int)(signed char)(reg >> (8 * (k & 3))); }

// mma.sync m16n8k32 .row.col s32.s8.s8.s32, lane = 4 g + t (PTX ISA fragment tables):
// A[r][k] in lane 4 (r % 8) + (k % 16) / 4, register (r >= 8) + 2 (k >= 16);
// B[k][n] in lane 4 n + (k % 16) / 4, register (k >= 16); C[r][c] in lane 4 (r % 8) + c / 2,
// register 2 (r >= 8) + c % 2.
inline void gq_emu_mma_m16n8k32(int* c, const unsigned* a, const unsigned* b) {
  const int tid = (int)threadIdx.x, w = tid / 32, lane = tid % 32;
  for (int i = 0; i < 4; ++i) gqemu::A_s[w][lane][i] = a[i];
  for (int i = 0; i < 2; ++i) gqemu::B_s[w][lane][i] = b[i];
  gqemu::warp_barrier();
  const int g = lane >> 2, t = lane & 3;
  for (int i = 0; i < 4; ++i) {
    const int r = g + 8 * (i >> 1), col = 2 * t + (i & 1);
    unsigned s = (unsigned)c[i];
    for (int k = 0; k < 32; ++k) {
      const int av = gq_emu_byte(gqemu::A_s[w][4 * (r & 7) + ((k & 15) >> 2)][(r >= 8) + 2 * (k >= 16)], k);
      const int bv = gq_emu_byte(gqemu::B_s[w][4 * col + ((k & 15) >> 2)][k >= 16], k);
      s += (unsigned)(av * bv);
    }
    c[i] = (int)s;
  }
  gqemu::warp_barrier();
}

// Shared memory of the wgmma tier: one aligned static buffer a kernel; a "shared address"
// is the offset from its start (what the 14-bit descriptor fields hold, >> 4).
static unsigned char* gq_emu_smem_base = nullptr;
inline unsigned gq_emu_smem_addr(const void* p) {
  return (unsigned)((const unsigned char*)p - gq_emu_smem_base);
}

// wgmma.mma_async m64n256k32 s32.s8.s8, both operands K-major in shared memory, decoded
// from the descriptors' bits (start address 0-13, stride byte offset 32-45, swizzle 62-63;
// 128-byte swizzle: address bits 4-6 ^= bits 7-9). Issued into the thread's open group,
// computed at the wait_group that retires it (the latest the hardware may read).
inline const unsigned char* gq_emu_desc_byte(unsigned long long desc, int row, int k) {
  const unsigned start = (unsigned)(desc & 0x3FFF) << 4;
  const unsigned sbo = (unsigned)((desc >> 32) & 0x3FFF) << 4;
  const unsigned swz = (unsigned)(desc >> 62);
  unsigned addr = start + (unsigned)(row >> 3) * sbo + (unsigned)(row & 7) * 128u + (unsigned)k;
  if (swz == 1) addr ^= ((addr >> 7) & 7u) << 4;
  else return nullptr;  // only the 128-byte swizzle is emulated
  return gq_emu_smem_base + addr;
}
static bool gq_emu_bad_desc = false;
inline void gq_emu_wgmma_compute(const gqemu::Wgmma& w) {
  const int t = (int)threadIdx.x % 128, v = t / 32, lane = t % 32, g = lane >> 2, q = lane & 3;
  for (int j = 0; j < 32; ++j)
    for (int e = 0; e < 4; ++e) {
      const int row = 16 * v + g + 8 * (e >> 1), col = 8 * j + 2 * q + (e & 1);
      unsigned s = (unsigned)w.d[4 * j + e];
      for (int k = 0; k < 32; ++k) {
        const unsigned char* a = gq_emu_desc_byte(w.a, row, k);
        const unsigned char* b = gq_emu_desc_byte(w.b, col, k);
        if (!a || !b) { gq_emu_bad_desc = true; return; }
        s += (unsigned)((int)(signed char)*a * (int)(signed char)*b);
      }
      w.d[4 * j + e] = (int)s;
    }
}
inline void gq_emu_wgmma_m64n256k32(int* d, unsigned long long a, unsigned long long b) {
  gqemu::Fiber& f = gqemu::F[gqemu::cur];
  f.wg_pending.push_back({d, a, b, f.wg_committed});
}
inline void gq_emu_wgmma_commit() { gqemu::F[gqemu::cur].wg_committed++; }
inline void gq_emu_wgmma_wait(int n) {
  gqemu::Fiber& f = gqemu::F[gqemu::cur];
  std::vector<gqemu::Wgmma> keep;
  for (const auto& w : f.wg_pending) {
    if (w.group < f.wg_committed - n) gq_emu_wgmma_compute(w); else keep.push_back(w);
  }
  f.wg_pending.swap(keep);
}

// mma.sync m8n8k16: A[r][k] in lane 4 r + k / 4; B[k][n] in lane 4 n + k / 4;
// C[r][c] in lane 4 r + c / 2, register c % 2.
inline void gq_emu_mma_m8n8k16(int* c, unsigned a, unsigned b) {
  const int tid = (int)threadIdx.x, w = tid / 32, lane = tid % 32;
  gqemu::A_s[w][lane][0] = a;
  gqemu::B_s[w][lane][0] = b;
  gqemu::warp_barrier();
  const int g = lane >> 2, t = lane & 3;
  for (int i = 0; i < 2; ++i) {
    const int col = 2 * t + i;
    unsigned s = (unsigned)c[i];
    for (int k = 0; k < 16; ++k)
      s += (unsigned)(gq_emu_byte(gqemu::A_s[w][4 * g + (k >> 2)][0], k) *
                      gq_emu_byte(gqemu::B_s[w][4 * col + (k >> 2)][0], k));
    c[i] = (int)s;
  }
  gqemu::warp_barrier();
}
"""

_EMU_ENTRY = r"""
#include GQ_KERNEL_FILE
extern "C" __attribute__((visibility("default"))) int gq_emu_run(int gx, int gy, int gz, int mode, void** p, const int* iv) {
  gqemu::mode = mode;
  gqemu::body = [=] {
    GQ_KERNEL((const signed char*)p[0], (const signed char*)p[1], (const gq_i64*)p[2],
              (const int*)p[3], (const int*)p[4], (unsigned char*)p[5], GQ_INT_ARGS);
  };
  gq_emu_bad_desc = false;
  const int rc = gqemu::launch(gx, gy, gz, 256);
  return rc ? rc : (gq_emu_bad_desc ? -5 : 0);
}
"""
_GEMM_INTS = ",".join(f"iv[{i}]" for i in range(7))
_CONV_INTS = ",".join(f"iv[{i}]" for i in range(21))


@pytest.fixture(scope="module")
def emu_build(tmp_path_factory):
    """Compiles kernels/<family>_<tier>.cu for the host on first use; returns a loader."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler (g++) to build the kernel emulation")
    d = tmp_path_factory.mktemp("cupy_emu")
    (d / "emu_prelude.h").write_text(_EMU_PRELUDE)
    libs = {}

    def get(family, tier):
        key = (family, tier)
        if key not in libs:
            src = d / f"emu_{family}_{tier}.cpp"
            src.write_text('#include "emu_prelude.h"\n' + _EMU_ENTRY)
            so = d / f"emu_{family}_{tier}.so"
            cmd = [cxx, "-std=c++17", "-O1", "-shared", "-fPIC", "-w",
                   # each library keeps its own shared-memory statics (no GNU unique symbols
                   # merging the tiers' differently sized As / Bs arrays across libraries)
                   "-fvisibility=hidden", "-fno-gnu-unique", f"-I{d}",
                   f"-I{loader.kernels_dir()}",
                   f'-DGQ_KERNEL_FILE="{loader.kernel_file(family, tier)}"',
                   f"-DGQ_KERNEL=gq_{family}_{tier}",
                   f"-DGQ_INT_ARGS={_CONV_INTS if family == 'conv' else _GEMM_INTS}",
                   str(src), "-o", str(so)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            assert r.returncode == 0, r.stderr[-4000:]
            lib = ctypes.CDLL(str(so))
            lib.gq_emu_run.restype = ctypes.c_int
            libs[key] = lib
        return libs[key]
    return get


def emu_execute(get_lib, plan: launch.Launch, mode: int) -> torch.Tensor:
    """Run a launch plan (CPU tensors) through the host emulation of its kernel."""
    if plan.empty:
        return plan.finish(plan.out)
    lib = get_lib(plan.family, plan.tier)
    tensors = [a for a in plan.args if isinstance(a, torch.Tensor)]
    ints = [int(a) for a in plan.args if not isinstance(a, torch.Tensor)]
    assert len(tensors) == 6
    ptrs = (ctypes.c_void_p * 6)(*[t.data_ptr() for t in tensors])
    iv = (ctypes.c_int * len(ints))(*ints)
    gx, gy, gz = plan.grid
    assert plan.block == (256, 1, 1)
    rc = lib.gq_emu_run(gx, gy, gz, mode, ptrs, iv)
    assert rc == 0, (f"emulated kernel failed: rc={rc} (-1 barrier divergence, -2 cp.async "
                     f"left, -3 a warp diverged between a warp sync and __syncthreads, -4 "
                     f"wgmma groups left, -5 a wgmma descriptor the emulation cannot read)")
    return plan.finish(plan.out)


def _poison(plan):
    plan.out.fill_(0x5A)


def _check(got, x, x_zp, w, bias, rq, conv_args=None):
    for name, ops in _oracles():
        if conv_args is None:
            want = ops["linear"](x, x_zp, w, bias, rq)
        else:
            want = ops["conv2d"](x, x_zp, w, bias, *conv_args, rq)
        assert got.shape == want.shape, (name, got.shape, want.shape)
        assert got.dtype == want.dtype, (name, got.dtype, want.dtype)
        assert torch.equal(got, want), (
            f"differs from {name}: {(got != want).sum().item()} of {got.numel()} bytes")


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("x_dtype,out_dtype", [(torch.int8, "qint8"), (torch.uint8, "quint8")])
def test_emulated_linear_matches_oracle(emu_build, tier, x_dtype, out_dtype):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{tier}{x_dtype}".encode()))
    for i, (lead, k, n) in enumerate(LINEAR_CASES):
        regime = SCALES[i % len(SCALES)]
        x, x_zp, w, bias, rq = make_linear(lead, k, n, x_dtype, out_dtype, regime, gen,
                                           activation=("none", "relu", "relu6")[i % 3])
        plan = launch.plan_linear(x, x_zp, w, None if i == 1 else bias, rq, tier)
        _poison(plan)
        mode = i % 2 if tier in ("mma80", "sm90", "wgmma") else 0
        got = emu_execute(emu_build, plan, mode)
        _check(got, x, x_zp, w, None if i == 1 else bias, rq)


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("x_dtype,out_dtype", [(torch.int8, "qint8"), (torch.uint8, "quint8")])
def test_emulated_conv_matches_oracle(emu_build, tier, x_dtype, out_dtype):
    gen = torch.Generator().manual_seed(zlib.crc32(f"conv{tier}{x_dtype}".encode()))
    for i, case in enumerate(CONV_CASES):
        regime = SCALES[i % len(SCALES)]
        x, x_zp, w, bias, conv_args, rq = make_conv(case, x_dtype, out_dtype, regime, gen,
                                                    activation=("none", "relu6", "relu")[i % 3])
        plan = launch.plan_conv2d(x, x_zp, w, bias, *conv_args, rq, tier)
        _poison(plan)
        got = emu_execute(emu_build, plan, mode=(i + 1) % 2)
        assert got.is_contiguous(memory_format=torch.channels_last)
        _check(got, x, x_zp, w, bias, rq, conv_args)


@pytest.mark.parametrize("mode", [0, 1])
def test_emulated_wgmma_pipeline_deep_k(emu_build, mode):
    """The wgmma tier's pipeline over many K stages (its stage is 128 bytes of K), several
    tiles both ways, in both copy timings: copies landing at issue (mode 1) with every wgmma
    read at its retiring wait_group is where a stage refilled while a wgmma may still read
    it shows (tested: prefetching one stage further, or waiting for one wgmma group less,
    fails here)."""
    gen = torch.Generator().manual_seed(21 + mode)
    x, x_zp, w, bias, rq = make_linear((130,), 1200, 300, torch.uint8, "quint8", "normal", gen)
    plan = launch.plan_linear(x, x_zp, w, bias, rq, "wgmma")
    assert plan.grid == (2, 2, 1)
    _poison(plan)
    _check(emu_execute(emu_build, plan, mode), x, x_zp, w, bias, rq)
    case = (1, 64, 6, 6, 272, (3, 3), 1, 1, 1, 1)   # Kg = 576: 5 stages; 272 channels: 2 tiles
    x, x_zp, w, bias, conv_args, rq = make_conv(case, torch.int8, "qint8", "left_shift", gen,
                                                activation="relu")
    plan = launch.plan_conv2d(x, x_zp, w, bias, *conv_args, rq, "wgmma")
    _poison(plan)
    _check(emu_execute(emu_build, plan, mode), x, x_zp, w, bias, rq, conv_args)


def test_emulated_conv_pads_with_the_zero_point(emu_build):
    """Every output reads padding: the pad value must be x's zero point (contributing 0)."""
    gen = torch.Generator().manual_seed(7)
    case = (1, 16, 2, 2, 16, (5, 5), 1, 3, 1, 1)
    for tier in ("dp4a", "mma80"):
        x, x_zp, w, bias, conv_args, rq = make_conv(case, torch.uint8, "quint8", "normal", gen)
        x_zp = 200
        plan = launch.plan_conv2d(x, x_zp, w, bias, *conv_args, rq, tier)
        _poison(plan)
        _check(emu_execute(emu_build, plan, 0), x, x_zp, w, bias, rq, conv_args)


def test_plans_choose_kernels_and_padding():
    gen = torch.Generator().manual_seed(3)
    x, x_zp, w, bias, rq = make_linear((15,), 27, 3, torch.uint8, "quint8", "normal", gen)
    p = launch.plan_linear(x, x_zp, w, bias, rq, "mma80")
    assert (p.family, p.tier) == ("gemm", "mma80")
    assert p.args[8] == 32 and p.args[0].shape == (15, 32)   # K padded to a multiple of 16
    assert p.args[9] == -2139062144                           # uint8: x ^ 0x80
    p = launch.plan_linear(x, x_zp, w, bias, rq, "dp4a")
    assert p.args[8] == 27 and p.grid == (1, 1, 1) and p.family == "gemm"
    x1 = x[:3]
    p = launch.plan_linear(x1, x_zp, w, bias, rq, "mma80")   # 3 rows: the GEMV kernel
    assert (p.family, p.tier, p.grid, p.args[8]) == ("gemv", "dp4a", (1, 1, 1), 27)
    case = (1, 8, 7, 7, 8, (3, 3), 1, 1, 1, 8)                 # depthwise
    x, x_zp, w, bias, conv_args, rq = make_conv(case, torch.int8, "qint8", "normal", gen)
    assert launch.plan_conv2d(x, x_zp, w, bias, *conv_args, rq, "mma80").tier == "dp4a"
    case = (1, 3, 7, 7, 8, (3, 3), 1, 1, 1, 1)
    x, x_zp, w, bias, conv_args, rq = make_conv(case, torch.int8, "qint8", "normal", gen)
    p = launch.plan_conv2d(x, x_zp, w, bias, *conv_args, rq, "sm90")
    assert p.tier == "sm90" and p.args[16] == 16 and p.args[8] == 9 * 16   # cg padded


def test_plan_rejects_bad_inputs():
    gen = torch.Generator().manual_seed(4)
    x, x_zp, w, bias, rq = make_linear((5,), 16, 3, torch.int8, "qint8", "normal", gen)
    with pytest.raises(TypeError, match="int8 or torch.uint8"):
        launch.plan_linear(x.to(torch.int32), x_zp, w, bias, rq, "dp4a")
    case = (1, 16, 4, 4, 8, (3, 3), 1, 1, 1, 1)
    x, x_zp, w, bias, conv_args, rq = make_conv(case, torch.int8, "qint8", "normal", gen)
    with pytest.raises(ValueError, match="padding"):
        launch.plan_conv2d(x, x_zp, w, bias, 1, "same", 1, 1, rq, "dp4a")
    with pytest.raises(ValueError, match="output would be empty"):
        launch.plan_conv2d(x, x_zp, w, bias, 1, 0, 3, 1, rq, "dp4a")
    # the kernels store a byte an output: an int32 requantization is refused, not packed
    from gpuquant import qint32
    from gpuquant.functional.requant import make_requant
    rq32 = make_requant(0.02, torch.full((8,), 0.01), 2e-4, 0, qint32)
    with pytest.raises(NotImplementedError, match="8-bit outputs only, got .* qint32"):
        launch.plan_conv2d(x, x_zp, w, bias, *conv_args, rq32, "mma80")
    x, x_zp, w, bias, rq = make_linear((5,), 16, 3, torch.int8, "qint8", "normal", gen)
    with pytest.raises(NotImplementedError, match="8-bit outputs only"):
        launch.plan_linear(x, x_zp, w, bias, make_requant(0.02, 0.01, 2e-4, 0, qint32), "dp4a")


def test_plan_checks_a_requantization_edited_in_place():
    """A shift edited in place past make_requant's range (or a Requant made on the device):
    the kernel shifted a 64-bit value by >= 64 (undefined), bytes unlike NumPy's with no
    error, where Triton raised. Checked once per tensor version, as Triton does."""
    gen = torch.Generator().manual_seed(5)
    x, x_zp, w, bias, rq = make_linear((5,), 16, 3, torch.int8, "qint8", "normal", gen)
    launch.plan_linear(x, x_zp, w, bias, rq, "dp4a")
    rq.rshift.reshape(-1)[0] = 70
    with pytest.raises(ValueError, match=r"cupy conv / linear epilogue: multipliers must be .*"
                                         r"shifts \[70\]"):
        launch.plan_linear(x, x_zp, w, bias, rq, "dp4a")


def test_plans_past_cuda_grid_limits_are_refused():
    """A grid past CUDA's limits (y, z <= 65535) is a ValueError at planning, not a driver
    error at launch: 70000 groups put the group axis on z."""
    from gpuquant.functional.requant import make_requant
    from gpuquant.dtypes import get_dtype
    rq = make_requant(0.02, torch.tensor(0.01), 0.5, 0, get_dtype("qint8"), "none")
    c = 70000
    x = torch.ones((1, c, 2, 2), dtype=torch.int8)
    w = torch.ones((c, 1, 1, 1), dtype=torch.int8)
    with pytest.raises(ValueError, match="past CUDA's limits"):
        launch.plan_conv2d(x, 0, w, None, 1, 0, 1, c, rq, "mma80")


def test_weights_made_under_inference_mode_are_planned(emu_build):
    """Inference tensors carry no version counter: the weight cache keys on storage."""
    gen = torch.Generator().manual_seed(5)
    x, x_zp, w, bias, rq = make_linear((20,), 16, 5, torch.int8, "qint8", "normal", gen)
    with torch.inference_mode():
        wi = w.clone()
    for tier in ("dp4a", "mma80"):
        _check(emu_execute(emu_build, launch.plan_linear(x, x_zp, wi, bias, rq, tier), 0),
               x, x_zp, w, bias, rq)


def test_weight_in_kernel_layout_is_not_copied():
    """A weight already in the kernel's layout (K % 16 == 0) is cached as itself: the
    cache held a clone, a second copy of every Linear weight on the GPU."""
    gen = torch.Generator().manual_seed(6)
    x, x_zp, w, bias, rq = make_linear((20,), 32, 8, torch.int8, "qint8", "normal", gen)
    plan = launch.plan_linear(x, x_zp, w, bias, rq, "mma80")
    again = launch.plan_linear(x, x_zp, w, bias, rq, "mma80")
    assert plan.args[1].untyped_storage().data_ptr() == w.untyped_storage().data_ptr()
    assert again.args[1] is plan.args[1]  # cached


# --------------------------------------------------------------------------- real GPU
def _gpu_tiers():
    if not torch.cuda.is_available():
        return list(TIERS)
    cap = torch.cuda.get_device_capability()
    # opt-in tiers never run on a GPU before run in a child process first (below)
    return [t for t in TIERS if dispatch.runs_tier(t, cap) and t not in dispatch.OPT_IN_TIERS]


@pytest.fixture
def cupy_backend():
    from gpuquant.backends import registry
    try:
        return registry.get_backend("cupy")
    except ValueError as e:
        pytest.skip(f"cupy backend cannot run here: {e}")


def _gpu_oracle():
    for name, ops in _oracles():
        if name == "numpy":
            return ops
    return ref.OPS


@pytest.mark.gpu
@pytest.mark.parametrize("tier", _gpu_tiers())
@pytest.mark.parametrize("x_dtype,out_dtype", [(torch.int8, "qint8"), (torch.uint8, "quint8"),
                                               (torch.uint8, "qint8")])
def test_gpu_linear_byte_identical(cupy_backend, monkeypatch, tier, x_dtype, out_dtype):
    monkeypatch.setenv(dispatch.ENV_VAR, tier)
    _gpu_linear_cases(cupy_backend, tier, x_dtype, out_dtype)


def _gpu_linear_cases(cupy_backend, tier, x_dtype, out_dtype):
    gen = torch.Generator().manual_seed(11)
    oracle = _gpu_oracle()
    shapes = LINEAR_CASES + [((1,), 4096, 1000), ((257,), 2048, 77), ((1000,), 1, 3),
                             ((513,), 768, 3072)]
    for i, (lead, k, n) in enumerate(shapes):
        x, x_zp, w, bias, rq = make_linear(lead, k, n, x_dtype, out_dtype, SCALES[i % 3], gen,
                                           activation=("none", "relu", "relu6")[i % 3])
        want = oracle["linear"](x, x_zp, w, bias, rq)
        got = cupy_backend.OPS["linear"](x.cuda(), x_zp, w.cuda(), bias.cuda(), rq.to("cuda"))
        torch.cuda.synchronize()
        assert torch.equal(got.cpu(), want), (tier, lead, k, n)


@pytest.mark.gpu
@pytest.mark.parametrize("tier", _gpu_tiers())
@pytest.mark.parametrize("x_dtype,out_dtype", [(torch.int8, "qint8"), (torch.uint8, "quint8")])
def test_gpu_conv_byte_identical(cupy_backend, monkeypatch, tier, x_dtype, out_dtype):
    monkeypatch.setenv(dispatch.ENV_VAR, tier)
    _gpu_conv_cases(cupy_backend, tier, x_dtype, out_dtype)


def _gpu_conv_cases(cupy_backend, tier, x_dtype, out_dtype):
    gen = torch.Generator().manual_seed(12)
    oracle = _gpu_oracle()
    cases = CONV_CASES + [(4, 64, 28, 28, 96, (3, 3), 1, 1, 1, 1),
                          (2, 3, 57, 45, 32, (7, 7), 2, 3, 1, 1),
                          (3, 96, 14, 14, 96, (3, 3), 2, 1, 1, 96),
                          (1, 128, 9, 9, 64, (3, 3), 1, 2, 2, 4)]
    for i, case in enumerate(cases):
        x, x_zp, w, bias, conv_args, rq = make_conv(case, x_dtype, out_dtype, SCALES[i % 3], gen,
                                                    activation=("none", "relu6", "relu")[i % 3])
        want = oracle["conv2d"](x, x_zp, w, bias, *conv_args, rq)
        got = cupy_backend.OPS["conv2d"](x.cuda(), x_zp, w.cuda(), bias.cuda(), *conv_args,
                                         rq.to("cuda"))
        torch.cuda.synchronize()
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(got.cpu(), want), (tier, case)


@pytest.mark.gpu
@pytest.mark.parametrize("tier", dispatch.OPT_IN_TIERS)
def test_gpu_opt_in_tier_in_a_child_process(cupy_backend, monkeypatch, tier):
    """An opt-in tier's first GPU run (a kernel written without a GPU may fault, and a CUDA
    fault would fail every later test of this process): the self-check in a child process,
    byte for byte against NumPy; then, only if it passed, the linear and conv cases of the
    other tiers' GPU tests here (grouped, depthwise, int8 and uint8 input)."""
    from gpuquant.backends.cupy.selfcheck import check_isolated
    if not dispatch.runs_tier(tier, torch.cuda.get_device_capability()):
        pytest.skip(f"this GPU cannot run tier {tier!r}")
    passed, report = check_isolated(tier)
    assert passed, report
    monkeypatch.setenv(dispatch.ENV_VAR, tier)
    for x_dtype, out_dtype in ((torch.int8, "qint8"), (torch.uint8, "quint8"),
                               (torch.uint8, "qint8")):
        _gpu_linear_cases(cupy_backend, tier, x_dtype, out_dtype)
        _gpu_conv_cases(cupy_backend, tier, x_dtype, out_dtype)


@pytest.mark.gpu
def test_gpu_default_tier_and_forced_tier_errors(cupy_backend, monkeypatch):
    from gpuquant.backends.cupy import tier_for
    cap = torch.cuda.get_device_capability()
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert tier_for("cuda") == dispatch.default_tier(cap)
    too_new = [t for t in TIERS if not dispatch.runs_tier(t, cap)]
    for t in too_new:
        monkeypatch.setenv(dispatch.ENV_VAR, t)
        with pytest.raises(ValueError, match=t):
            tier_for("cuda")


def test_weight_preparation_is_cached_and_invalidated(emu_build):
    import gc
    gen = torch.Generator().manual_seed(9)
    x, x_zp, w, bias, rq = make_linear((9,), 40, 17, torch.uint8, "quint8", "normal", gen)
    p1 = launch.plan_linear(x, x_zp, w, bias, rq, "mma80")
    p2 = launch.plan_linear(x, x_zp, w, bias, rq, "mma80")
    assert p2.args[1] is p1.args[1]                       # re-laid-out weight reused
    assert p1.args[1].untyped_storage().data_ptr() != w.untyped_storage().data_ptr()
    w[0, :5] = torch.tensor([127, -127, 3, 0, -1], dtype=torch.int8)   # in place: new version
    p3 = launch.plan_linear(x, x_zp, w, bias, rq, "mma80")
    assert p3.args[1] is not p1.args[1]
    _check(emu_execute(emu_build, p3, 0), x, x_zp, w, bias, rq)
    wid = id(w)
    assert wid in launch._WEIGHT_CACHE
    del w, p1, p2, p3
    gc.collect()
    assert wid not in launch._WEIGHT_CACHE                # the cache does not keep it alive



def test_weight_cache_releases_weights_already_in_kernel_layout():
    """A weight already in the kernel's layout is cached as a view of itself (no copy); that
    view must not keep the weight alive (a view's ``_base`` did: the weak reference never
    fired, and every such weight stayed in GPU memory after its module was gone)."""
    import gc
    import weakref
    gen = torch.Generator().manual_seed(10)
    x, x_zp, w, bias, rq = make_linear((20,), 32, 8, torch.int8, "qint8", "normal", gen)
    case = (1, 16, 5, 5, 8, (3, 3), 1, 1, 1, 1)
    xc, zc, wc, bc, conv_args, rqc = make_conv(case, torch.int8, "qint8", "normal", gen)
    wc = wc.contiguous(memory_format=torch.channels_last)   # (O, kh, kw, cg) already
    for tier in ("dp4a", "mma80"):
        for wt, plan in ((w, lambda t: launch.plan_linear(x, x_zp, w, bias, rq, t)),
                         (w, lambda t: launch.plan_linear(x[:2], x_zp, w, bias, rq, t)),
                         (wc, lambda t: launch.plan_conv2d(xc, zc, wc, bc, *conv_args, rqc, t))):
            p = plan(tier)
            assert p.args[1].untyped_storage().data_ptr() == wt.untyped_storage().data_ptr()
            assert id(wt) in launch._WEIGHT_CACHE
    refs = [(weakref.ref(w), id(w)), (weakref.ref(wc), id(wc))]
    del w, wc, p, plan, wt
    gc.collect()
    for r, wid in refs:
        assert r() is None, "the weight cache keeps the weight tensor alive"
        assert wid not in launch._WEIGHT_CACHE


@pytest.mark.gpu
def test_gpu_bench_providers_run_every_tier(cupy_backend):
    from gpuquant.backends.cupy.bench import tier_providers
    gen = torch.Generator().manual_seed(13)
    x, x_zp, w, bias, rq = make_linear((77,), 96, 50, torch.uint8, "quint8", "normal", gen)
    want = _gpu_oracle()["linear"](x, x_zp, w, bias, rq)
    inputs = (x.cuda(), x_zp, w.cuda(), bias.cuda(), rq.to("cuda"))
    for name, prov in tier_providers("linear", tiers=_gpu_tiers()).items():
        run = prov.setup(inputs)
        got = run()
        torch.cuda.synchronize()
        assert torch.equal(got.cpu(), want), name


def test_bench_tiers_whose_case_runs_another_kernel_are_left_out(monkeypatch):
    """A linear of M <= 8 runs the dp4a GEMV kernel whatever the tier forced: the other
    tiers' providers had timed that same kernel, five rows that looked like five kernels.
    They report unavailable now, naming the tier that runs it (planned on the CPU here)."""
    import gpuquant.backends.cupy as cb
    from gpuquant.backends.cupy import bench as cbench
    from gpuquant.bench.harness import ProviderUnavailable
    monkeypatch.setattr(cbench, "is_available", lambda: (True, ""))
    monkeypatch.setattr(cb, "_capability", lambda device: (9, 0))
    gen = torch.Generator().manual_seed(14)
    for rows, runs in ((3, {"dp4a"}), (40, {"dp4a", "mma75", "mma80", "sm90"})):
        inputs = make_linear((rows,), 64, 24, torch.int8, "qint8", "normal", gen)
        ok = set()
        for name, prov in cbench.tier_providers("linear", tiers=("dp4a", "mma75", "mma80",
                                                                   "sm90")).items():
            try:
                prov.setup(inputs)
                ok.add(name.rsplit("-", 1)[1])
            except ProviderUnavailable as e:
                assert rows == 3 and "runs the dp4a tier's kernel" in str(e)
        assert ok == runs


def test_bench_args_fit_the_gemm_and_conv_suites(emu_build):
    """The argument extraction given for suites/gemm.py and suites/conv.py builds valid plans
    (run here through the emulation, tiny shapes, on the CPU)."""
    from gpuquant.bench.suites import conv as conv_suite
    from gpuquant.bench.suites import gemm as gemm_suite
    inp = gemm_suite.make_inputs(20, 24, 40, "cpu")(0)
    args = (inp["x"], 0, inp["w"], inp["bias"], inp["rq"])
    out = emu_execute(emu_build, launch.plan_linear(*args, "mma80"), 0)
    assert gemm_suite._check_requant(inp, out)
    spec = conv_suite.ConvSpec(16, 6, 8, 3, 2, 1)
    layers = conv_suite.make_inputs([spec], 2, "cpu")(0)
    calls = [(L["x"], L["zp"], L["w"], L["bias"], (L["spec"].stride,) * 2,
              (L["spec"].pad,) * 2, (1, 1), 1, L["rq"]) for L in layers]
    outs = [emu_execute(emu_build, launch.plan_conv2d(*c, "dp4a"), 0) for c in calls]
    assert conv_suite._check(layers, outs)


def test_selfcheck_child_process_reports_instead_of_raising():
    """The isolation wrapper: whatever the child does comes back as (False, why); here it
    exits 2 (no CUDA device, or no CuPy), and a bad tier name is a usage error."""
    from gpuquant.backends.cupy import selfcheck
    selfcheck.check_isolated.cache_clear()
    passed, why = selfcheck.check_isolated("wgmma", timeout=120)
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the GPU test covers the real run")
    assert not passed and "exited with status 2" in why and "wgmma" in why
    assert selfcheck.main(["tensorcores"]) == 64
    selfcheck.check_isolated.cache_clear()


def test_selfcheck_compares_every_case_with_numpy(monkeypatch):
    """run_cases' comparison on the CPU: a backend that returns NumPy's bytes passes every
    case; one byte changed in each output fails every case; the tier it forces is not left
    in the caller's environment."""
    import os

    from gpuquant import backends
    from gpuquant.backends.cupy import selfcheck
    npb = backends.get_backend("numpy")
    get = backends.get_backend

    def fake(flip):
        def op(name):
            def run(*a):
                out = npb.OPS[name](*a).clone()
                if flip:
                    out[(0,) * out.dim()] ^= 1
                return out
            return run
        return type("B", (), {"OPS": {"linear": op("linear"), "conv2d": op("conv2d")}})
    for flip, want in ((False, 0), (True, 7)):
        monkeypatch.setattr(backends, "get_backend",
                            lambda n, f=flip: fake(f) if n == "cupy" else get(n))
        monkeypatch.setenv("GPUQUANT_CUPY_TIER", "mma80")
        bad, report = selfcheck.run_cases("wgmma", device="cpu")
        assert bad == want, report
        assert report.count("\n") == 6
        # the forced tier is the caller's again (it leaked into the process)
        assert os.environ["GPUQUANT_CUPY_TIER"] == "mma80"
    monkeypatch.delenv("GPUQUANT_CUPY_TIER")
    monkeypatch.setattr(backends, "get_backend",
                        lambda n: fake(False) if n == "cupy" else get(n))
    selfcheck.run_cases("wgmma", device="cpu")
    assert "GPUQUANT_CUPY_TIER" not in os.environ
