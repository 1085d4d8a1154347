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


def test_arch_specific_loader_writes_the_whole_cubin(tmp_path, monkeypatch):
    """The wgmma tier's compile path (``loader._compile_arch_specific``) run against this
    NVRTC through a stand-in for CuPy's bindings that truncates the cubin by one byte, as
    CuPy 13 / 14's ``nvrtc.getCUBIN`` does: the file handed to ``RawModule(path=)`` is the
    whole cubin NVRTC made, the kernel gets its dynamic shared memory limit, and a second
    call reuses the file."""
    import types

    made = {}

    class NVRTCError(RuntimeError):
        pass

    def create(src, name, headers, include_names):
        assert isinstance(src, str) and isinstance(name, str) and headers == ()
        return {"src": src, "name": name}

    def compile_(prog, options):
        ok, log, cubin = _nvrtc_compile(prog["src"], prog["name"], list(options))
        if not ok:
            prog["log"] = log
            raise NVRTCError(log)
        prog["cubin"], made["cubin"], made["options"] = cubin, cubin, tuple(options)

    nvrtc_mod = types.SimpleNamespace(
        createProgram=create, compileProgram=compile_, NVRTCError=NVRTCError,
        getCUBIN=lambda p: p["cubin"][:-1],      # CuPy's off-by-one
        getPTX=lambda p: b"", getProgramLog=lambda p: p.get("log", ""),
        destroyProgram=lambda p: None)

    class Kernel:
        max_dynamic_shared_size_bytes = 0

    class RawModule:
        def __init__(self, path):
            made.setdefault("paths", []).append(path)
            self.path = path

        def get_function(self, name):
            made["name"] = name
            return Kernel()

    cupy = types.ModuleType("cupy")
    cupy.RawModule = RawModule
    cuda = types.ModuleType("cupy.cuda")
    cuda.nvrtc = nvrtc_mod
    cupy.cuda = cuda
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setitem(sys.modules, "cupy.cuda", cuda)
    monkeypatch.setenv("CUPY_CACHE_DIR", str(tmp_path))
    k = loader._compile_arch_specific("gemm", "wgmma")
    assert "--gpu-architecture=sm_90a" in made["options"]
    assert made["name"] == "gq_gemm_wgmma"
    with open(made["paths"][0], "rb") as f:
        assert f.read() == made["cubin"]                 # not one byte short
    assert k.max_dynamic_shared_size_bytes == loader.dynamic_smem("wgmma")
    loader._compile_arch_specific("gemm", "wgmma")
    assert made["paths"][1] == made["paths"][0] and len(list(tmp_path.iterdir())) == 1
