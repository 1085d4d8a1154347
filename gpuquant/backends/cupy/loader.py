"""Find the CUDA sources, compile them with NVRTC through CuPy, cache per (kernel, tier, arch).

The sources live in the repository's ``kernels/`` directory; the package reaches them through
``gpuquant/backends/cupy/kernels`` (a link in the source tree, real files in a built wheel:
setuptools package-data copies them). ``GPUQUANT_KERNELS_DIR`` overrides the location.
Local ``#include "x.cuh"`` lines are expanded here, so CuPy's on-disk cache key (the source
text and options) changes whenever any header does.
"""
from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from typing import Dict, Tuple

__all__ = ["kernels_dir", "source", "kernel_file", "get_kernel", "NVRTC_OPTIONS"]

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


def get_kernel(family: str, tier: str, capability: Tuple[int, int], device_index: int):
    """The compiled ``gq_<family>_<tier>`` kernel for a device (compiled once, then cached).

    CuPy compiles for the current device's architecture (``sm_<major><minor>``); this must
    be called inside ``cupy.cuda.Device(device_index)``.
    """
    key = (family, tier, tuple(capability), device_index)
    with _lock:
        k = _cache.get(key)
        if k is None:
            import cupy
            mod = cupy.RawModule(code=source(kernel_file(family, tier)),
                                 options=NVRTC_OPTIONS)
            k = mod.get_function(f"gq_{family}_{tier}")
            _cache[key] = k
    return k
