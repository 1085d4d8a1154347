"""The CuPy backend: hand-written CUDA kernels (``kernels/*.cu``) per architecture tier.

Integer ``conv2d`` and ``linear`` run as raw CUDA kernels compiled at first use with NVRTC
(``cupy.RawModule``) for the tensor's GPU; the tier (dp4a, mma75, mma80, sm90) comes from the
compute capability through one table (:mod:`.dispatch`), or from ``GPUQUANT_CUPY_TIER``.
Every other op goes to the next backend by automatic selection. Results are byte-identical
to the NumPy backend (the oracle): the epilogue is the contract's fixed-point requantization,
``kernels/requant.cuh``.

CuPy is optional (``pip install gpuquant[cuda12]`` or ``[cuda13]``): without it, or without a
GPU, this package still imports and :func:`is_available` says why it cannot run.
"""
from __future__ import annotations

import torch

from . import dispatch
from .launch import execute, plan_conv2d, plan_linear

NAME = "cupy"
DEVICES = frozenset({"cuda"})
# Below Triton (20) until the GPU benchmarks say otherwise (unmeasured so far).
PRIORITY = 15

__all__ = ["NAME", "DEVICES", "PRIORITY", "OPS", "is_available", "tier_for", "conv2d",
           "linear"]


def is_available():
    """(True, "") when CuPy imports and a CUDA device of compute capability >= 6.1 is visible."""
    try:
        import cupy
    except ImportError as e:
        return False, (f"cupy is not installed ({e}); install gpuquant[cuda12] or "
                       f"gpuquant[cuda13]")
    if not torch.cuda.is_available():
        return False, "no CUDA device visible to torch"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDARuntimeError and friends: report, never hide
        return False, f"CuPy cannot reach a CUDA device ({type(e).__name__}: {e})"
    if n == 0:
        return False, "CuPy sees no CUDA device"
    caps = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    if not any(tuple(c) >= dispatch.TIER_MIN_CAPABILITY["dp4a"] for c in caps):
        return False, f"no CUDA device of compute capability >= 6.1 (found {caps})"
    low = _build_min()
    if not any(tuple(c) >= low for c in caps):
        return False, (f"CuPy's CUDA {_nvrtc_major()} compiler builds for compute capability "
                       f">= {low[0]}.{low[1]} only (found {caps}); install gpuquant[cuda12]")
    return True, ""


_NVRTC: list = []


def _nvrtc_major() -> int:
    """Major version of CuPy's NVRTC (0 where it cannot be read: no limit assumed)."""
    if not _NVRTC:
        try:
            import cupy
            _NVRTC.append(int(cupy.cuda.nvrtc.getVersion()[0]))
        except Exception:  # noqa: BLE001 - an old CuPy or no NVRTC: the build says why
            _NVRTC.append(0)
    return _NVRTC[0]


def _build_min():
    return dispatch.build_min_capability(_nvrtc_major())


def _capability(device):
    """The device's compute capability, refused where CuPy's compiler cannot build for it."""
    cap = torch.cuda.get_device_capability(device)
    low = _build_min()
    if tuple(cap) < low:
        raise ValueError(f"cupy backend: device {device} has compute capability "
                         f"{cap[0]}.{cap[1]}, but CuPy's CUDA {_nvrtc_major()} compiler builds "
                         f"for {low[0]}.{low[1]} and newer only; install gpuquant[cuda12] (CUDA "
                         f"12 builds the dp4a tier for 6.1+) or use the triton backend")
    return cap


def tier_for(device) -> str:
    """The tier ops on ``device`` run (the table, or ``GPUQUANT_CUPY_TIER``).

    Raises:
        ValueError: not a CUDA device; a device CuPy's compiler cannot build for (as the ops
            refuse it), a forced tier the device cannot run, or an unknown tier name.
    """
    dev = torch.device(device)
    if dev.type != "cuda":  # (torch's own error there: "not compiled with CUDA enabled")
        raise ValueError(f"cupy backend: tier_for needs a CUDA device, got {dev}")
    return dispatch.select_tier(_capability(dev))


def _check_cuda(op, *tensors):
    for t in tensors:
        if t is not None and t.device.type != "cuda":
            raise ValueError(f"cupy backend op {op!r} needs CUDA tensors, got one on {t.device}")


def linear(x, x_zp, w, bias, rq):
    """Integer linear, signature and bytes as ``gpuquant.backends.reference.linear``."""
    _check_cuda("linear", x, w, bias)
    cap = _capability(x.device)
    return execute(plan_linear(x, x_zp, w, bias, rq, dispatch.select_tier(cap)), cap)


def conv2d(x, x_zp, w, bias, stride, padding, dilation, groups, rq):
    """Integer conv2d, signature and bytes as ``gpuquant.backends.reference.conv2d``
    (output channels_last)."""
    _check_cuda("conv2d", x, w, bias)
    cap = _capability(x.device)
    plan = plan_conv2d(x, x_zp, w, bias, stride, padding, dilation, groups, rq,
                       dispatch.select_tier(cap))
    return execute(plan, cap)


OPS = {"conv2d": conv2d, "linear": linear}
