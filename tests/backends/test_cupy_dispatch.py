"""Compute capability -> tier dispatch (faked capabilities), availability without CuPy, the
NVRTC loader's source handling, and the shared epilogue header checked bit for bit on the CPU
against the reference backend's requantize."""
from __future__ import annotations

import ctypes
import shutil
import subprocess

import pytest
import torch

from gpuquant.backends import reference as ref
from gpuquant.backends.cupy import dispatch, loader
from gpuquant.functional.requant import INT32_MAX, INT32_MIN, Requant, quantize_multiplier
from gpuquant.dtypes import get_dtype


# --------------------------------------------------------------------------- dispatch table
@pytest.mark.parametrize("cap,tier", [
    ((6, 1), "dp4a"), ((7, 0), "dp4a"), ((7, 2), "dp4a"), ((7, 5), "mma75"),
    ((8, 0), "mma80"), ((8, 6), "mma80"), ((8, 7), "mma80"), ((8, 9), "mma80"),
    ((9, 0), "sm90"), ((10, 0), "mma80"), ((12, 0), "mma80"),
])
def test_default_tier_table(monkeypatch, cap, tier):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert dispatch.default_tier(cap) == tier
    assert dispatch.select_tier(cap) == tier


def test_too_old_device_has_no_tier():
    with pytest.raises(ValueError, match=r"5\.2 is below 6\.1"):
        dispatch.default_tier((5, 2))


@pytest.mark.parametrize("forced,cap", [("dp4a", (9, 0)), ("mma75", (8, 0)), ("mma80", (9, 0)),
                                        ("sm90", (9, 0)), ("MMA80", (8, 6)), ("dp4a", (6, 1))])
def test_forced_tier_from_environment(monkeypatch, forced, cap):
    monkeypatch.setenv(dispatch.ENV_VAR, forced)
    assert dispatch.select_tier(cap) == forced.lower()


@pytest.mark.parametrize("forced,cap", [("mma80", (7, 5)), ("sm90", (8, 9)), ("mma75", (7, 0)),
                                        ("sm90", (6, 1))])
def test_forced_tier_too_new_for_the_device(monkeypatch, forced, cap):
    monkeypatch.setenv(dispatch.ENV_VAR, forced)
    with pytest.raises(ValueError) as e:
        dispatch.select_tier(cap)
    msg = str(e.value)
    assert repr(forced) in msg and f"{cap[0]}.{cap[1]}" in msg


def test_invalid_tier_name(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "tma")
    with pytest.raises(ValueError, match=r"unknown gpuquant CUDA tier 'tma'.*dp4a"):
        dispatch.select_tier((9, 0))
    with pytest.raises(ValueError, match="unknown"):
        dispatch.select_tier((9, 0), forced="tensorcore")
    with pytest.raises(TypeError):
        dispatch.select_tier((9, 0), forced=80)
    with pytest.raises(TypeError, match="capability"):
        dispatch.default_tier("sm_90")


def test_empty_env_means_the_table(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "")
    assert dispatch.select_tier((7, 5)) == "mma75"


def test_build_archs_follow_minimum_capability():
    assert dispatch.TIER_BUILD_ARCHS["dp4a"] == (75, 80, 86, 89, 90, 100, 120)
    assert dispatch.TIER_BUILD_ARCHS["mma75"] == (75, 80, 86, 89, 90, 100, 120)
    assert dispatch.TIER_BUILD_ARCHS["mma80"] == (80, 86, 89, 90, 100, 120)
    assert dispatch.TIER_BUILD_ARCHS["sm90"] == (90, 100, 120)
    assert dispatch.TIER_BUILD_ARCHS["wgmma"] == ("90a",)   # arch-specific: sm_90a only
    for cap, tier in dispatch.CAPABILITY_TIER.items():
        assert cap >= dispatch.TIER_MIN_CAPABILITY[tier]


def test_backend_tier_for_uses_the_device_capability(monkeypatch):
    import gpuquant.backends.cupy as cb
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 6))
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert cb.tier_for("cuda:0") == "mma80"
    monkeypatch.setenv(dispatch.ENV_VAR, "sm90")
    with pytest.raises(ValueError, match=r"'sm90' needs compute capability 9\.0.*8\.6"):
        cb.tier_for("cuda:0")
    with pytest.raises(ValueError, match="tier_for needs a CUDA device, got cpu"):
        cb.tier_for("cpu")  # (torch's AssertionError 'not compiled with CUDA' here before)


def test_cuda13_compiler_refuses_pascal_and_volta(monkeypatch):
    """CUDA 13's NVRTC builds sm_75+ only: a 6.1 .. 7.2 device gets a clear ValueError naming
    the fix (CUDA 12 CuPy), not a compiler exception at the first call."""
    import gpuquant.backends.cupy as cb
    assert dispatch.build_min_capability(13) == (7, 5)
    assert dispatch.build_min_capability(12) == dispatch.build_min_capability(0) == (6, 1)
    monkeypatch.setattr(cb, "_NVRTC", [13])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 0))
    with pytest.raises(ValueError, match=r"7\.0.*CUDA 13 compiler builds for 7\.5.*cuda12"):
        cb._capability("cuda:0")
    # tier_for says what the ops would: no tier for a device the compiler cannot build for
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    with pytest.raises(ValueError, match=r"7\.0.*CUDA 13 compiler builds for 7\.5"):
        cb.tier_for("cuda:0")
    monkeypatch.setattr(cb, "_NVRTC", [12])
    assert cb._capability("cuda:0") == (7, 0)


# --------------------------------------------------------------------------- availability
def test_unavailable_without_cupy_or_gpu_says_why():
    import gpuquant.backends.cupy as cb
    from gpuquant.backends import registry
    ok, reason = cb.is_available()
    try:
        import cupy  # noqa: F401
        has_cupy = True
    except ImportError:
        has_cupy = False
    if not has_cupy:
        assert not ok and "cupy is not installed" in reason
    elif not torch.cuda.is_available():
        assert not ok and "CUDA" in reason
    if not ok:
        assert registry._load("cupy") is None
        with pytest.raises(ValueError, match="cupy"):
            registry.get_backend("cupy")
    assert cb.NAME == "cupy" and cb.DEVICES == {"cuda"}
    assert set(cb.OPS) == {"conv2d", "linear"}


def test_ops_refuse_cpu_tensors():
    import gpuquant.backends.cupy as cb
    with pytest.raises(ValueError, match="CUDA tensors"):
        cb.linear(torch.zeros(2, 3, dtype=torch.int8), 0, torch.zeros(4, 3, dtype=torch.int8),
                  None, None)


# --------------------------------------------------------------------------- loader
def test_loader_finds_and_expands_sources():
    d = loader.kernels_dir()
    assert (d / "requant.cuh").is_file()
    src = loader.source("gemm_mma80.cu")
    assert '#include "' not in src and "#pragma once" not in src
    assert src.count("GQ_HD int gq_srdhm") == 1          # each header once
    assert "gq_gemm_mma80" in src
    assert loader.kernel_file("conv", "dp4a") == "conv_dp4a.cu"


def test_loader_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("GPUQUANT_KERNELS_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not found"):
        loader.kernels_dir()
    (tmp_path / "requant.cuh").write_text("// test\n")
    assert loader.kernels_dir() == tmp_path


# --------------------------------------------------------------------------- epilogue on CPU
_SHIM = r"""
#include "requant.cuh"
extern "C" void gq_requant_array(const long long* acc, const int* mult, const int* shift,
                                 long long n, int zp, int qmin, int qmax, int* out) {
  for (long long i = 0; i < n; ++i) out[i] = gq_requant(acc[i], mult[i], shift[i], zp, qmin, qmax);
}
extern "C" int gq_srdhm_c(int a, int b) { return gq_srdhm(a, b); }
extern "C" int gq_rdbpot_c(int x, int e) { return gq_rdbpot(x, e); }
"""


@pytest.fixture(scope="module")
def epilogue(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler (g++) to build requant.cuh for the CPU")
    d = tmp_path_factory.mktemp("requant")
    (d / "shim.cpp").write_text(_SHIM)
    so = d / "shim.so"
    r = subprocess.run([cxx, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", "-shared",
                        "-fPIC", f"-I{loader.kernels_dir()}", str(d / "shim.cpp"), "-o", str(so)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return ctypes.CDLL(str(so))


def _run_requant(lib, acc, mult, shift, zp, qmin, qmax):
    acc = acc.to(torch.int64).contiguous()
    mult = mult.to(torch.int32).contiguous()
    shift = shift.to(torch.int32).contiguous()
    out = torch.empty(acc.numel(), dtype=torch.int32)
    lib.gq_requant_array(ctypes.c_void_p(acc.data_ptr()), ctypes.c_void_p(mult.data_ptr()),
                         ctypes.c_void_p(shift.data_ptr()), ctypes.c_longlong(acc.numel()),
                         zp, qmin, qmax, ctypes.c_void_p(out.data_ptr()))
    return out


def test_epilogue_matches_reference_requantize(epilogue):
    gen = torch.Generator().manual_seed(5)
    n = 20000
    edges = torch.tensor([0, 1, -1, INT32_MAX, INT32_MIN, INT32_MAX - 1, INT32_MIN + 1,
                          1 << 30, -(1 << 30), 12345, -12345], dtype=torch.int64)
    acc = torch.cat([edges, torch.randint(INT32_MIN, INT32_MAX, (n,), generator=gen,
                                          dtype=torch.int64),
                     torch.randint(-5000, 5000, (n,), generator=gen, dtype=torch.int64)])
    # multipliers over every shift TFLite produces, left shifts (rshift < 0) included
    real = torch.exp2(torch.empty(acc.numel(), dtype=torch.float64).uniform_(-40, 29.9,
                                                                             generator=gen))
    mult, shift = quantize_multiplier(real)
    assert (shift < 0).any() and (shift > 20).any() and (mult == 0).any()
    for dt, zp, lo, hi in (("qint8", -3, -128, 127), ("quint8", 128, 128, 255),
                           ("quint8", 7, 0, 255), ("qint8", 0, 0, 40)):
        rq = Requant(mult, shift, zp, lo, hi, get_dtype(dt))
        want = ref.requantize(acc, rq, axis=0).to(torch.int32)
        got = _run_requant(epilogue, acc, mult, shift, zp, lo, hi)
        assert torch.equal(got, want), f"{(got != want).sum()} mismatches ({dt}, zp {zp})"


def test_epilogue_primitives_edges(epilogue):
    # gemmlowp's saturating case and round-half-away-from-zero ties
    assert epilogue.gq_srdhm_c(INT32_MIN, INT32_MIN) == INT32_MAX
    for a, b in ((INT32_MIN, INT32_MAX), (INT32_MAX, INT32_MAX), (-7, 1 << 30), (7, 1 << 30),
                 (-1, 1 << 30), (3, INT32_MIN)):
        want = int(ref.srdhm(torch.tensor([a]), b)[0])
        assert epilogue.gq_srdhm_c(a, b) == want, (a, b)
    for x, e in ((5, 1), (-5, 1), (6, 2), (-6, 2), (INT32_MAX, 31), (INT32_MIN, 31), (-1, 31),
                 (3, 0), (-(1 << 20) - (1 << 19), 20)):
        want = int(ref.rdbpot(torch.tensor([x], dtype=torch.int64), e)[0])
        assert epilogue.gq_rdbpot_c(x, e) == want, (x, e)


def test_bench_tier_providers():
    from gpuquant.bench.harness import ProviderUnavailable
    from gpuquant.backends.cupy.bench import tier_providers
    import gpuquant.backends.cupy as cb
    provs = tier_providers("linear")
    assert sorted(provs) == sorted(f"gpuquant-cupy-{t}" for t in dispatch.TIERS)
    with pytest.raises(ValueError, match="op must be"):
        tier_providers("matmul")
    with pytest.raises(ValueError, match="unknown tier"):
        tier_providers("conv2d", tiers=("tma",))
    if not cb.is_available()[0]:
        with pytest.raises(ProviderUnavailable, match="cupy backend"):
            provs["gpuquant-cupy-dp4a"].setup(())


def test_wgmma_tier_is_hopper_only_and_opt_in():
    """sm_90a code runs on 9.x only (not on 10.0, whose instruction set has no wgmma); the
    table keeps Hopper on sm90 until the wgmma tier is measured."""
    assert dispatch.default_tier((9, 0)) == "sm90"
    assert dispatch.select_tier((9, 0), forced="wgmma") == "wgmma"
    assert dispatch.runs_tier("wgmma", (9, 0)) and not dispatch.runs_tier("wgmma", (8, 9))
    with pytest.raises(ValueError, match=r"'wgmma' is built for sm_90a .* 10\.0"):
        dispatch.select_tier((10, 0), forced="wgmma")
    with pytest.raises(ValueError, match=r"'wgmma' needs compute capability 9\.0"):
        dispatch.check_tier("wgmma", (8, 6))
    assert dispatch.select_tier((10, 0), forced="sm90") == "sm90"


def test_wgmma_dynamic_shared_memory_matches_the_kernel_header():
    """The launcher's dynamic shared memory equals kernels/wgmma_tile.cuh's GQ_WG_SMEM_BYTES."""
    import re
    from gpuquant.backends.cupy import loader
    text = (loader.kernels_dir() / "wgmma_tile.cuh").read_text()
    d = {k: int(v) for k, v in re.findall(r"#define (GQ_WG_B[MNK]|GQ_WG_STAGES) (\d+)", text)}
    want = d["GQ_WG_STAGES"] * (d["GQ_WG_BM"] + d["GQ_WG_BN"]) * d["GQ_WG_BK"] + 1024
    assert loader.dynamic_smem("wgmma") == want == 197632
    assert want <= 227 * 1024                       # an H100 block's opt-in maximum
    assert loader.dynamic_smem("mma80") == 0
    assert loader.arch_options("wgmma") == ("--gpu-architecture=sm_90a",)
    assert loader.arch_options("sm90") == ()


def test_cupy_stream_uses_the_stream_protocol_where_cupy_has_it():
    """CuPy 14 deprecates ExternalStream (a warning on every launch): torch's stream goes
    through Stream.from_external and the CUDA stream protocol there, ExternalStream on
    CuPy 13."""
    import types

    from gpuquant.backends.cupy.launch import cupy_stream
    seen = []

    class Stream14:
        @classmethod
        def from_external(cls, obj):
            seen.append(obj.__cuda_stream__())
            return "from_external"
    new = types.SimpleNamespace(cuda=types.SimpleNamespace(Stream=Stream14))
    assert cupy_stream(new, 0xABC) == "from_external" and seen == [(0, 0xABC)]
    old = types.SimpleNamespace(cuda=types.SimpleNamespace(
        Stream=type("Stream13", (), {}), ExternalStream=lambda ptr: ("external", ptr)))
    assert cupy_stream(old, 0xABC) == ("external", 0xABC)


def test_plans_check_their_arguments_before_indexing():
    """The exported plan functions (CPU tensors stand in: nothing is launched) refuse bad
    arguments with ValueError / TypeError naming them; a linear whose x has another K than
    the weight is refused even when the weight's prepared form is cached for a K padded to
    the same multiple of 16 (it ran on the first K columns)."""
    from gpuquant.backends.cupy.launch import plan_conv2d, plan_linear
    from gpuquant.functional.requant import make_requant
    rq = make_requant(0.02, torch.full((3,), 0.01), 0.1, 0, get_dtype("qint8"))
    w = torch.randint(-127, 128, (3, 20), dtype=torch.int8)
    plan_linear(torch.zeros(9, 20, dtype=torch.int8), 0, w, None, rq, "mma80")  # cached
    with pytest.raises(ValueError, match=r"x has 17 features but the weight \(3, 20\)"):
        plan_linear(torch.zeros(9, 17, dtype=torch.int8), 0, w, None, rq, "mma80")
    x4 = torch.zeros(1, 4, 5, 5, dtype=torch.int8)
    w4 = torch.zeros(3, 4, 3, 3, dtype=torch.int8)
    cases = [
        (lambda: plan_linear(torch.zeros(9, 20, dtype=torch.int8), 0, w, None, rq, "tensor"),
         ValueError, "unknown gpuquant CUDA tier 'tensor'"),
        (lambda: plan_linear(torch.zeros(9, 20, dtype=torch.int8), 0.5, w, None, rq, "mma80"),
         TypeError, "x_zp must be an int"),
        (lambda: plan_linear(torch.zeros(9, 20, dtype=torch.uint8), 300, w, None, rq, "mma80"),
         ValueError, r"x_zp 300 is outside"),
        (lambda: plan_linear(torch.zeros(9, 20, dtype=torch.int8), 0, w,
                             torch.zeros(3), rq, "mma80"), TypeError, "bias must be None or an int32"),
        (lambda: plan_linear(torch.zeros(9, 20, dtype=torch.int8), 0, w,
                             torch.zeros(1, dtype=torch.int32), rq, "mma80"),
         ValueError, r"bias must have shape \(3,\)"),
        (lambda: plan_linear(torch.zeros((), dtype=torch.int8), 0, w, None, rq, "mma80"),
         ValueError, "x must be a tensor with"),
        (lambda: plan_conv2d(x4, 0, w4, None, 1, 0, 1, 0, rq, "mma80"),
         ValueError, "groups must be a positive int, got 0"),
        (lambda: plan_conv2d(x4, 0, w4, None, 0, 0, 1, 1, rq, "mma80"),
         ValueError, "stride must be >= 1"),
        (lambda: plan_conv2d(x4, 0, w4, None, 1, -1, 1, 1, rq, "mma80"),
         ValueError, "padding must be >= 0"),
        (lambda: plan_conv2d(x4, 0, w4, None, 1, 0, 0, 1, rq, "mma80"),
         ValueError, "dilation must be >= 1"),
        (lambda: plan_conv2d(x4[0], 0, w4, None, 1, 0, 1, 1, rq, "mma80"),
         ValueError, "x must be a tensor with 4 dimensions"),
        (lambda: plan_conv2d(x4, 0, w4[0], None, 1, 0, 1, 1, rq, "mma80"),
         ValueError, "weight must have 4 dimensions"),
    ]
    for call, err, msg in cases:
        with pytest.raises(err, match=msg):
            call()
