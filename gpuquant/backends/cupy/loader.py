"""Find the CUDA sources, compile them with NVRTC through CuPy, cache per (kernel, tier, arch).

The sources live in the repository's ``kernels/`` directory; the package reaches them through
``gpuquant/backends/cupy/kernels`` (a link in the source tree, real files in a built wheel:
setuptools package-data copies them). ``GPUQUANT_KERNELS_DIR`` overrides the location.
Local ``#include "x.cuh"`` lines are expanded here, so CuPy's on-disk cache key (the source
text and options) changes whenever any header does.
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Dict, Tuple

from . import dispatch

__all__ = ["kernels_dir", "source", "kernel_file", "get_kernel", "NVRTC_OPTIONS",
           "dynamic_smem", "arch_options"]

# No floating point is computed in these kernels; --fmad=false keeps it that way if any is
# ever added (contract section 4).
NVRTC_OPTIONS = ("--std=c++17", "--fmad=false")

_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.M)
_cache: Dict[Tuple[str, str, Tuple[int, int], int], object] = {}
_lock = threading.Lock()


def kernels_dir() -> Path:
    """Directory holding ``*.cu`` / ``*.cuh`` (env override, packaged copy, source tree).

    Raises:
        FileNotFoundError: no directory with the sources was found (names where it looked).
    """
    here = Path(__file__).resolve().parent
    env = os.environ.get("GPUQUANT_KERNELS_DIR")
    # an explicit override is the only place looked at: a wrong one fails, never falls back
    candidates = [Path(env)] if env else [here / "kernels", here.parents[2] / "kernels"]
    for d in candidates:
        if (d / "requant.cuh").is_file():
            return d
    raise FileNotFoundError(f"gpuquant CUDA kernel sources not found; looked in "
                            f"{[str(c) for c in candidates]}")


def kernel_file(family: str, tier: str) -> str:
    """File name of a kernel family's source for a tier, e.g. ``gemm_mma80.cu``."""
    return f"{family}_{tier}.cu"


def source(name: str, _seen=None) -> str:
    """Text of ``kernels/<name>`` with local includes expanded once each (``#pragma once``)."""
    d = kernels_dir()
    seen = set() if _seen is None else _seen
    seen.add(name)
    text = (d / name).read_text()

    def expand(m):
        inc = m.group(1)
        if inc in seen:
            return f"// {inc} already included"
        return f"// ---- begin {inc}\n{source(inc, seen)}\n// ---- end {inc}"
    return _INCLUDE.sub(expand, text).replace("#pragma once", "")


# Dynamic shared memory a block of an arch-specific tier's kernels asks for (the other
# tiers use static shared memory only): kernels/wgmma_tile.cuh's GQ_WG_SMEM_BYTES.
_DYNAMIC_SMEM = {"wgmma": 4 * (128 + 256) * 128 + 1024}


def dynamic_smem(tier: str) -> int:
    """Bytes of dynamic shared memory a block of ``tier``'s GEMM / conv kernel takes."""
    return _DYNAMIC_SMEM.get(tier, 0)


def arch_options(tier: str) -> Tuple[str, ...]:
    """NVRTC options of an architecture-specific tier (``--gpu-architecture=sm_90a``); empty
    for the others (CuPy picks the device's architecture)."""
    if tier in dispatch.TIER_ARCH_SPECIFIC:
        return (f"--gpu-architecture=sm_{dispatch.TIER_ARCH_SPECIFIC[tier][1]}",)
    return ()


# Part of the on-disk cache key of arch-specific cubins; bumped when what is written changes.
_CACHE_FORMAT = "2"  # 2: the cubin padded to its full ELF extent (see _whole_cubin)


def _whole_cubin(data: bytes) -> bytes:
    """CuPy 13 / 14's ``nvrtc.getCUBIN`` returns the cubin less its last byte (it slices
    ``size - 1`` as for PTX's terminating NUL; NVRTC's CUBIN size has none), which a
    file loaded with ``cuModuleLoad`` would miss: pad the ELF back to the extent its
    program and section header tables declare."""
    import struct
    if data[:4] == b"\x7fELF" and len(data) >= 0x40 and data[4] == 2:  # 64-bit ELF
        phoff, shoff = struct.unpack_from("<QQ", data, 0x20)
        phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", data, 0x36)
        end = max(phoff + phnum * phentsize, shoff + shnum * shentsize)
        if len(data) < end:
            data += b"\0" * (end - len(data))
    return data


def _compile_arch_specific(family: str, tier: str):
    """An arch-specific tier's kernel: NVRTC (CuPy's bindings) to a cubin for the tier's
    target, cached on disk by source and options, loaded with ``cupy.RawModule(path=)``.
    CuPy's own compile path picks ``sm_<major><minor>`` itself, which cannot express
    ``sm_90a``."""
    import cupy
    from cupy.cuda import nvrtc
    name = kernel_file(family, tier)
    src = source(name)
    opts = NVRTC_OPTIONS + arch_options(tier)
    use_cubin = hasattr(nvrtc, "getCUBIN")
    if not use_cubin:  # old CuPy: PTX for the arch-specific virtual target, driver JIT
        opts = NVRTC_OPTIONS + tuple(o.replace("=sm_", "=compute_") for o in arch_options(tier))
    digest = hashlib.sha256("\0".join((_CACHE_FORMAT, src) + opts).encode()).hexdigest()[:24]
    cache = Path(os.environ.get("CUPY_CACHE_DIR", Path.home() / ".cupy" / "kernel_cache"))
    path = cache / f"gpuquant_{family}_{tier}_{digest}.{'cubin' if use_cubin else 'ptx'}"
    if not path.is_file():
        prog = nvrtc.createProgram(src, name, (), ())
        try:
            try:
                nvrtc.compileProgram(prog, opts)
            except nvrtc.NVRTCError as e:
                raise RuntimeError(f"NVRTC could not compile {name} with {opts}: "
                                   f"{nvrtc.getProgramLog(prog)}") from e
            data = _whole_cubin(nvrtc.getCUBIN(prog)) if use_cubin else nvrtc.getPTX(prog)
        finally:
            nvrtc.destroyProgram(prog)
        if isinstance(data, str):
            data = data.encode()
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache, suffix=path.suffix)  # atomic: rename
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    k = cupy.RawModule(path=str(path)).get_function(f"gq_{family}_{tier}")
    smem = dynamic_smem(tier)
    if smem > 48 * 1024 and family in ("gemm", "conv"):
        k.max_dynamic_shared_size_bytes = smem
    return k


def get_kernel(family: str, tier: str, capability: Tuple[int, int], device_index: int):
    """The compiled ``gq_<family>_<tier>`` kernel for a device (compiled once, then cached).

    CuPy compiles for the current device's architecture (``sm_<major><minor>``); an
    architecture-specific tier (``dispatch.TIER_ARCH_SPECIFIC``) for its own target. This
    must be called inside ``cupy.cuda.Device(device_index)``.
    """
    key = (family, tier, tuple(capability), device_index)
    with _lock:
        k = _cache.get(key)
        if k is None:
            if tier in dispatch.TIER_ARCH_SPECIFIC:
                k = _compile_arch_specific(family, tier)
            else:
                import cupy
                mod = cupy.RawModule(code=source(kernel_file(family, tier)),
                                     options=NVRTC_OPTIONS)
                k = mod.get_function(f"gq_{family}_{tier}")
            _cache[key] = k
    return k
