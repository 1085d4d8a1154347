"""Compute capability -> kernel tier: the one place that decides which kernels a GPU runs.

Tiers (sources in ``kernels/``, see ``kernels/README.md``):

=======  ==============  =====================================================================
tier     needs           instructions
=======  ==============  =====================================================================
dp4a     sm_61+          ``__dp4a`` (s8 x s8 -> s32 four-way dot), any shape
mma75    sm_75+          ``mma.sync.aligned.m8n8k16`` s8 (Turing IMMA), plain 16-byte loads
mma80    sm_80+          ``mma.sync.aligned.m16n8k32`` s8 + ``cp.async`` 3-stage pipeline
sm90     sm_90+          the mma80 main loop with a 4-stage pipeline, built for sm_90
wgmma    sm_90 (9.x)     ``wgmma.mma_async`` m64n256k32 s8 from swizzled shared memory, a
                         4-stage cp.async pipeline with one stage of wgmmas in flight; built
                         for sm_90a (an architecture-specific target: Hopper only, not
                         Blackwell). Opt-in (``GPUQUANT_CUPY_TIER=wgmma``): exact on an H200,
                         0.40x the Triton GEMM there
=======  ==============  =====================================================================

``GPUQUANT_CUPY_TIER=dp4a|mma75|mma80|sm90|wgmma`` forces a tier (tests, benchmarks); a tier the GPU
cannot run raises ``ValueError`` naming the tier and the device's capability.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

__all__ = ["TIERS", "TIER_MIN_CAPABILITY", "TIER_BUILD_ARCHS", "TIER_ARCH_SPECIFIC",
           "OPT_IN_TIERS",
           "runs_tier", "CAPABILITY_TIER", "ENV_VAR",
           "default_tier", "select_tier", "check_tier", "build_min_capability"]

ENV_VAR = "GPUQUANT_CUPY_TIER"
TIERS = ("dp4a", "mma75", "mma80", "sm90", "wgmma")

# Oldest compute capability each tier's instructions exist on.
TIER_MIN_CAPABILITY = {"dp4a": (6, 1), "mma75": (7, 5), "mma80": (8, 0), "sm90": (9, 0),
                       "wgmma": (9, 0)}
# Tiers built for an architecture-specific target ("sm_90a"): they run on that major
# version only (wgmma is not in sm_100's instruction set), and are compiled for that target.
TIER_ARCH_SPECIFIC = {"wgmma": ((9, 0), "90a")}
# Tiers not in the table and not yet run on a GPU: their benchmark rows and GPU tests first
# pass :func:`gpuquant.backends.cupy.selfcheck.check_isolated` (a child process: a fault
# there cannot poison the caller's CUDA context).
OPT_IN_TIERS = ("wgmma",)

# The architectures CI compiles each tier's sources for with nvcc (no GPU needed); the
# kernels/*.cu files of a tier carry an #error guard below their minimum architecture.
# 100 / 120 (Blackwell): capabilities the table does not list run mma80 (and a forced tier
# may run there), so those builds are checked too.
CI_ARCHS = (75, 80, 86, 89, 90, 100, 120)
TIER_BUILD_ARCHS = {t: ((TIER_ARCH_SPECIFIC[t][1],) if t in TIER_ARCH_SPECIFIC else
                        tuple(a for a in CI_ARCHS if a >= 10 * c[0] + c[1]))
                    for t, c in TIER_MIN_CAPABILITY.items()}

# The table. Capabilities not listed: >= 8.0 (newer chips keep mma.sync and cp.async) run
# mma80; 6.1 .. 7.4 (Pascal, Volta: no integer MMA) run dp4a; older have no __dp4a.
CAPABILITY_TIER = {
    (7, 5): "mma75",                                   # Turing: T4, RTX 20xx
    (8, 0): "mma80", (8, 6): "mma80", (8, 7): "mma80",  # Ampere: A100, A10/RTX 30xx, Orin
    (8, 9): "mma80",                                   # Ada: L4, L40, RTX 40xx
    (9, 0): "sm90",                                    # Hopper: H100, H200
}


def build_min_capability(nvrtc_major: int) -> Tuple[int, int]:
    """The oldest compute capability CuPy's NVRTC of major version ``nvrtc_major`` compiles
    for: CUDA 13 dropped sm_50 .. sm_72 (Pascal and Volta: the dp4a tier there needs CuPy
    built for CUDA 12, ``gpuquant[cuda12]``)."""
    return (7, 5) if nvrtc_major >= 13 else TIER_MIN_CAPABILITY["dp4a"]


def _cap(capability) -> Tuple[int, int]:
    try:
        major, minor = capability
        return int(major), int(minor)
    except (TypeError, ValueError):
        raise TypeError(f"compute capability must be a (major, minor) pair, got {capability!r}")


def default_tier(capability) -> str:
    """The tier the table picks for ``capability`` (a ``(major, minor)`` pair).

    Raises:
        ValueError: capability below 6.1 (no ``__dp4a``): no tier runs there.
    """
    cap = _cap(capability)
    if cap in CAPABILITY_TIER:
        return CAPABILITY_TIER[cap]
    if cap >= (8, 0):
        return "mma80"
    if cap >= TIER_MIN_CAPABILITY["dp4a"]:
        return "dp4a"
    raise ValueError(f"compute capability {cap[0]}.{cap[1]} is below 6.1: no gpuquant CUDA tier "
                     f"runs there (dp4a needs 6.1+)")


def check_tier(tier: str, capability) -> str:
    """Validate a tier name against a device.

    Raises:
        ValueError: unknown tier name, or a tier the device cannot run (the message names the
            tier, its minimum capability and the device's).
    """
    cap = _cap(capability)
    if tier not in TIER_MIN_CAPABILITY:
        raise ValueError(f"unknown gpuquant CUDA tier {tier!r}; allowed: {list(TIERS)}")
    need = TIER_MIN_CAPABILITY[tier]
    if cap < need:
        raise ValueError(f"tier {tier!r} needs compute capability {need[0]}.{need[1]} or newer; "
                         f"this device has {cap[0]}.{cap[1]} (its default tier: "
                         f"{_default_or_none(cap)!r})")
    if tier in TIER_ARCH_SPECIFIC and cap[0] != TIER_ARCH_SPECIFIC[tier][0][0]:
        raise ValueError(f"tier {tier!r} is built for sm_{TIER_ARCH_SPECIFIC[tier][1]} and runs "
                         f"on compute capability {need[0]}.x only; this device has "
                         f"{cap[0]}.{cap[1]} (its default tier: {_default_or_none(cap)!r})")
    return tier


def _default_or_none(cap) -> Optional[str]:
    try:
        return default_tier(cap)
    except ValueError:
        return None


def select_tier(capability, forced: Optional[str] = None) -> str:
    """The tier to run on a device of ``capability``.

    Args:
        capability: ``(major, minor)``, e.g. ``torch.cuda.get_device_capability(device)``.
        forced: a tier name; None reads ``GPUQUANT_CUPY_TIER`` (unset or empty: the table).

    Raises:
        ValueError: see :func:`default_tier` and :func:`check_tier`.
    """
    if forced is None:
        forced = os.environ.get(ENV_VAR) or None
    if forced is None:
        return default_tier(capability)
    if not isinstance(forced, str):
        raise TypeError(f"tier must be a string, got {type(forced).__name__} ({forced!r})")
    return check_tier(forced.strip().lower(), capability)


def runs_tier(tier: str, capability) -> bool:
    """Whether a device of ``capability`` can run ``tier`` (:func:`check_tier` without the
    error)."""
    try:
        check_tier(tier, capability)
    except ValueError:
        return False
    return True
