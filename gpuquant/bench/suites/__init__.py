"""Suite registry: suite name -> (module path, device).

``device`` is ``"cuda"`` (needs a GPU: skipped without one, and its module is not even
imported then), ``"cpu"`` (always on the CPU) or ``"any"`` (the GPU when there is one, else
the CPU). The registered module must define ``SUITE``, a :class:`gpuquant.bench.Suite` with
the same name and device. A registered suite whose module does not exist yet is simply not
listed; a module that exists but fails to import is an error (raised as is).

To add a suite: write ``gpuquant/bench/suites/<name>.py`` and add one line to ``_SUITES``.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import Dict, List, Tuple

from ..harness import Suite

__all__ = ["register_suite", "unregister_suite", "registered", "written", "load_suite", "suite_device"]

# name -> (module, device); documentation order = run order
_SUITES: Dict[str, Tuple[str, str]] = {
    "quant": ("gpuquant.bench.suites.quant", "any"),           # quantize/dequantize/fake_quant
    "cpu": ("gpuquant.bench.suites.cpu", "cpu"),               # NumPy int8 inference
    "fake_quant": ("gpuquant.bench.suites.fake_quant", "cuda"),  # Triton fused fake-quant
    "qat_step": ("gpuquant.bench.suites.qat_step", "cuda"),
    "gemm": ("gpuquant.bench.suites.gemm", "cuda"),
    "conv": ("gpuquant.bench.suites.conv", "cuda"),
    "models": ("gpuquant.bench.suites.models", "cuda"),
    "linear_dynamic": ("gpuquant.bench.suites.linear_dynamic", "cuda"),
}


def register_suite(name: str, module: str, device: str) -> None:
    """Register (or replace) suite ``name`` living in ``module`` (tests use this)."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"suite name must be a non-empty string, got {name!r}")
    if device not in ("cuda", "cpu", "any"):
        raise ValueError(f"device must be 'cuda', 'cpu' or 'any', got {device!r}")
    _SUITES[name] = (module, device)


def unregister_suite(name: str) -> None:
    _SUITES.pop(name, None)


def registered() -> List[str]:
    """All registered suite names, written or not."""
    return list(_SUITES)


def _exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package missing
        return False


def written() -> List[str]:
    """Registered suites whose module exists (what ``gpuquant bench`` runs by default)."""
    return [n for n, (m, _) in _SUITES.items() if _exists(m)]


def suite_device(name: str) -> str:
    """The registered device of suite ``name`` ("cuda", "cpu" or "any").

    Raises:
        ValueError: unknown suite or one not written yet (the message lists the suites).
    """
    if not isinstance(name, str):
        raise TypeError(f"suite name must be a string, got {type(name).__name__} ({name!r})")
    if name not in _SUITES:
        raise ValueError(f"unknown suite {name!r}; suites: {', '.join(written())}"
                         + _not_yet_note())
    if not _exists(_SUITES[name][0]):
        raise ValueError(f"suite {name!r} is registered but not written yet (no module "
                         f"{_SUITES[name][0]}); suites: {', '.join(written())}")
    return _SUITES[name][1]


def _not_yet_note() -> str:
    missing = [n for n in _SUITES if n not in written()]
    return f" (registered, not written yet: {', '.join(missing)})" if missing else ""


def load_suite(name: str) -> Suite:
    """Import suite ``name`` and return its :class:`Suite`.

    Raises:
        ValueError: unknown or unwritten suite; a module whose ``SUITE`` is missing or
            disagrees with the registry. Import errors of an existing module propagate.
    """
    device = suite_device(name)
    module = importlib.import_module(_SUITES[name][0])
    suite = getattr(module, "SUITE", None)
    if not isinstance(suite, Suite):
        raise ValueError(f"module {module.__name__} must define SUITE = gpuquant.bench.Suite(...), "
                         f"got {type(suite).__name__}")
    if suite.name != name or suite.device != device:
        raise ValueError(f"module {module.__name__}: SUITE has name {suite.name!r}, device "
                         f"{suite.device!r}; the registry says {name!r}, {device!r}")
    return suite
