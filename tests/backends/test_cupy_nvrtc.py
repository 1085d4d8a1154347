"""The backend's real compile path, without a GPU: NVRTC (what ``cupy.RawModule`` calls)
compiles the include-expanded source of every kernel with the loader's options for each
architecture its tier supports, with an empty log (no warnings), to a cubin.

NVRTC is a host library (no device needed); the test looks for it as the CUDA toolkit or the
``nvidia-cuda-nvrtc`` wheel installs it and says plainly when it is skipped for want of it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import site
import sys

import pytest

from gpuquant.backends.cupy import dispatch, loader


def _find_nvrtc():
    cands = []
    name = ctypes.util.find_library("nvrtc")
    if name:
        cands.append(name)
    roots = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"] + site.getsitepackages() + [
        p for p in sys.path if p.endswith("site-packages")]
    for root in roots:
        if not root:
            continue
        for pat in ("lib64/libnvrtc.so*", "lib/libnvrtc.so*", "nvidia/cu*/lib/libnvrtc.so*",
                    "nvidia/cuda_nvrtc/lib/libnvrtc.so*"):
            cands += sorted(glob.glob(os.path.join(root, pat)))
    for c in cands:
        if "builtins" in c:
            continue
        try:
            return ctypes.CDLL(c)
        except OSError:
            continue
    return None


NVRTC = _find_nvrtc()
pytestmark = pytest.mark.skipif(NVRTC is None, reason="NVRTC (libnvrtc) not found: the "
                                "NVRTC compile path was NOT checked in this run (pip install "
                                "nvidia-cuda-nvrtc, or a CUDA toolkit)")


def _nvrtc_compile(src: str, name: str, options):
    """(ok, log, cubin bytes) of one NVRTC compilation."""
    lib = NVRTC
    prog = ctypes.c_void_p()
    rc = lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), name.encode(), 0, None, None)
    assert rc == 0, f"nvrtcCreateProgram returned {rc}"
    try:
        opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
        rc = lib.nvrtcCompileProgram(prog, len(options), opts)
        n = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
        buf = ctypes.create_string_buffer(n.value)
        lib.nvrtcGetProgramLog(prog, buf)
        log = buf.value.decode(errors="replace").strip()
        cubin = b""
        if rc == 0:
            lib.nvrtcGetCUBINSize(prog, ctypes.byref(n))
            cb = ctypes.create_string_buffer(n.value)
            lib.nvrtcGetCUBIN(prog, cb)
            cubin = cb.raw
        return rc == 0, log, cubin
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


CASES = [(fam, tier, arch) for fam in ("gemm", "conv") for tier in dispatch.TIERS
         for arch in ((dispatch.TIER_BUILD_ARCHS[tier][0],) if tier in dispatch.TIER_ARCH_SPECIFIC
                      else (dispatch.TIER_BUILD_ARCHS[tier][0], 90))] + [
    ("gemv", "dp4a", 75), ("gemv", "dp4a", 90)]


@pytest.mark.parametrize("family,tier,arch", sorted(set(CASES)))
def test_nvrtc_compiles_kernel(family, tier, arch):
    src = loader.source(loader.kernel_file(family, tier))
    opts = list(loader.NVRTC_OPTIONS) + [f"--gpu-architecture=sm_{arch}"]
    ok, log, cubin = _nvrtc_compile(src, loader.kernel_file(family, tier), opts)
    assert ok, f"NVRTC failed for {family}_{tier} on sm_{arch}:\n{log}"
    assert log == "", f"NVRTC printed diagnostics for {family}_{tier} on sm_{arch}:\n{log}"
    assert cubin[:4] == b"\x7fELF" and f"gq_{family}_{tier}".encode() in cubin
