"""Backend registry: which implementation runs each op.

Backends are packages under ``gpuquant.backends`` (``reference``, ``numpy``, ``triton``,
``cupy``). Each exposes:

* ``NAME``: its public name;
* ``is_available() -> (bool, reason)``: whether it can run in this process;
* ``DEVICES``: the torch device types it computes on (``{"cpu"}``, ``{"cuda"}``, ...);
* ``PRIORITY``: larger wins in automatic selection (fastest correct first); an int, or a
  dict device type -> int; a negative priority means the backend is used on that device only
  when chosen explicitly (the Triton interpreter on CPU tensors);
* ``OPS``: a dict op name -> callable, with the signatures of
  :mod:`gpuquant.backends.reference` (the readable definition).

Selection: ``use(name)`` (a context manager) or the ``GPUQUANT_BACKEND`` environment variable
pick one backend explicitly; asking for one that cannot run here raises and lists those that
can, and an explicitly chosen backend that lacks an op raises too. With no explicit choice
each op goes to the available backend with the highest priority that implements it for the
input's device; if that is not the first choice for the device, it says so once in the log.
"""
from __future__ import annotations

import importlib
import logging
import os
import contextvars
from typing import Callable, Dict, List, Optional

import torch

__all__ = ["available", "use", "current", "get_backend", "get_op", "find_op", "try_op",
           "fused_op", "register", "unregister", "auto_backend", "BACKEND_NAMES"]

log = logging.getLogger("gpuquant.backends")

# name -> module path; the order is the documentation order, not the priority.
_MODULES: Dict[str, str] = {
    "reference": "gpuquant.backends.reference",
    "numpy": "gpuquant.backends.numpy",
    "triton": "gpuquant.backends.triton",
    "cupy": "gpuquant.backends.cupy",
}
BACKEND_NAMES = tuple(_MODULES)

_loaded: Dict[str, object] = {}
_unavailable: Dict[str, str] = {}
# the stack of use() choices, per thread and per asyncio task (a ContextVar: a thread-local
# stack was shared by the tasks of one event loop, each seeing the other's choice)
_STACK: "contextvars.ContextVar[tuple]" = contextvars.ContextVar("gpuquant_backend", default=())
_fallback_logged: set = set()


def register(name: str, module_path: str) -> None:
    """Register an extra backend package (tests use this to plant a faulty backend)."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"backend name must be a non-empty string, got {name!r}")
    if not isinstance(module_path, str) or not module_path:
        raise TypeError(f"backend module path must be a non-empty string (a module name), got "
                        f"{module_path!r}")
    _MODULES[name] = module_path
    _forget(name)


def unregister(name: str) -> None:
    """Remove a backend added with :func:`register` (tests)."""
    _MODULES.pop(name, None)
    _forget(name)


def _forget(name: str) -> None:
    """Drop what is known of backend ``name`` (loaded module, unavailability, priorities)."""
    _loaded.pop(name, None)
    _unavailable.pop(name, None)
    _candidates.clear()


def _load(name: str):
    if name in _loaded:
        return _loaded[name]
    if name in _unavailable:
        return None
    try:
        mod = importlib.import_module(_MODULES[name])
        missing = [a for a in ("is_available", "OPS", "DEVICES", "PRIORITY")
                   if not hasattr(mod, a)]
        if missing:  # (register() of a module that is no backend: one unavailable entry)
            ok, reason = False, f"{_MODULES[name]} is not a gpuquant backend (no {missing})"
        else:
            ok, reason = mod.is_available()
    except ImportError as e:  # a missing optional dependency (cupy, triton) is not an error
        ok, reason = False, f"import failed: {e}"
    if ok:
        _loaded[name] = mod
        return mod
    _unavailable[name] = reason
    return None


def available() -> List[str]:
    """Names of the backends usable in this process, e.g. ``["reference", "numpy"]``."""
    return [n for n in _MODULES if _load(n) is not None]


def _why_not(name: str) -> str:
    _load(name)
    return _unavailable.get(name, "")


def get_backend(name: str):
    """The backend module called ``name``.

    Raises:
        ValueError: unknown name, or a backend that cannot run here (the message lists the
            available ones and says why this one is not).
    """
    if not isinstance(name, str):
        raise TypeError(f"backend name must be a string, got {type(name).__name__} ({name!r})")
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; known: {list(_MODULES)}, available here: "
                         f"{available()}")
    mod = _load(name)
    if mod is None:
        raise ValueError(f"backend {name!r} cannot run here ({_why_not(name)}); available here: "
                         f"{available()}")
    return mod


def _explicit() -> Optional[str]:
    stack = _STACK.get()
    if stack:
        return stack[-1]
    env = os.environ.get("GPUQUANT_BACKEND")
    if env and env not in _MODULES:
        raise ValueError(f"GPUQUANT_BACKEND={env!r} names no backend; known: "
                         f"{list(_MODULES)}, available here: {available()}")
    return env or None


def current() -> Optional[str]:
    """The explicitly chosen backend (``use`` or ``GPUQUANT_BACKEND``), or None for automatic."""
    name = _explicit()
    if name is not None:
        get_backend(name)  # validate
    return name


class use:
    """Run the ops inside the ``with`` block on backend ``name``; ``use(None)``: automatic
    selection inside the block (whatever an outer ``use`` or ``GPUQUANT_BACKEND`` says).

    Raises:
        ValueError: unknown backend or one that cannot run here.

    Example:
        >>> with gpuquant.backends.use("numpy"):
        ...     y = qmodel(x)
    """

    __slots__ = ("_name", "_mod")

    # a class, not a @contextmanager generator: 0.4 instead of 1.4 us a ``with`` (a per-op
    # cost for callers that pick the backend around every call). It holds no per-entry
    # state, so one instance may be entered by several threads or tasks at once.
    def __init__(self, name: Optional[str]):
        self._mod = get_backend(name) if name is not None else None
        self._name = name

    def __enter__(self):
        _STACK.set(_STACK.get() + (self._name,))
        return self._mod

    def __exit__(self, *exc) -> bool:
        _STACK.set(_STACK.get()[:-1])
        return False


def _device_type(device) -> str:
    """The device type of a tensor, a ``torch.device`` or a device string (``"cuda:0"``).

    Raises:
        TypeError / ValueError: anything else, or a string torch does not read as a device.
    """
    if isinstance(device, torch.Tensor):
        return device.device.type
    if isinstance(device, torch.device):
        return device.type
    if isinstance(device, str):
        try:
            return torch.device(device).type
        except RuntimeError as e:
            raise ValueError(f"not a device: {device!r} ({e})") from None
    raise TypeError(f"expected a tensor, a torch.device or a device string, got "
                    f"{type(device).__name__} {device!r}")


def _priority(mod, dev: str) -> int:
    p = mod.PRIORITY
    return p.get(dev, -1) if isinstance(p, dict) else p


_candidates: Dict[str, list] = {}  # device type -> backends by priority (register() clears)


def _auto_candidates(dev: str) -> list:
    # A negative priority means "usable only when chosen explicitly" (the Triton interpreter).
    got = _candidates.get(dev)
    if got is None:
        mods = [m for m in (_load(n) for n in _MODULES)
                if m is not None and dev in m.DEVICES and _priority(m, dev) >= 0]
        got = _candidates[dev] = sorted(mods, key=lambda m: -_priority(m, dev))
    return got


def find_op(op: str, device) -> Optional[Callable]:
    """Like :func:`get_op` but returns None where no backend implements ``op`` (for optional
    fast paths such as fused kernels); an explicit backend lacking it also gives None."""
    dev = _device_type(device)
    name = _explicit()
    if name is not None:
        mod = get_backend(name)
        return mod.OPS.get(op) if dev in mod.DEVICES else None
    for mod in _auto_candidates(dev):
        if op in mod.OPS:
            return mod.OPS[op]
    return None


def try_op(op: str, device, *args, **kwargs):
    """``find_op(op, device)(*args, **kwargs)``, or None where no backend has ``op`` or its
    op declines the case (returns None): the optional fast paths' one calling convention,
    the caller then runs the definition."""
    fn = find_op(op, device)
    return None if fn is None else fn(*args, **kwargs)


def fused_op(op: str, base: str, device) -> Optional[Callable]:
    """The fused op ``op`` (for example ``"conv2d_add"``) of the backend that :func:`get_op`
    picks for its base op ``base`` (``"conv2d"``), or None where that backend has no such
    kernel (the caller then composes the base ops; see :mod:`gpuquant.backends.fused`).
    Unlike :func:`find_op` it never mixes backends: the fused kernel replaces the very op
    that would have run. Wrapped for ``GPUQUANT_VERIFY=1`` as :func:`get_op` wraps."""
    dev = _device_type(device)
    name = _explicit()
    if name is not None:
        mod = get_backend(name)
        fn = mod.OPS.get(op) if dev in mod.DEVICES else None
        return None if fn is None else _verified(op, fn, name)
    for mod in _auto_candidates(dev):
        if base in mod.OPS:
            fn = mod.OPS.get(op)
            return None if fn is None else _verified(op, fn, mod.NAME)
    return None


_ON, _OFF = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def verifying() -> bool:
    """Whether ``GPUQUANT_VERIFY`` asks for each op to be checked against the NumPy oracle
    (read on every call: tests and users set it at run time).

    Raises:
        ValueError: a value that is neither on (1, true, yes, on) nor off (empty, 0, false,
            no, off): ``disable`` must not turn checking on.
    """
    v = os.environ.get("GPUQUANT_VERIFY", "").strip().lower()
    if v in _OFF:
        return False
    if v in _ON:
        return True
    raise ValueError(f"GPUQUANT_VERIFY={os.environ['GPUQUANT_VERIFY']!r}: use one of "
                     f"{list(_ON)} (check every op against the NumPy oracle) or {list(_OFF)}")


def _verified(op: str, fn: Callable, backend: str) -> Callable:
    """``GPUQUANT_VERIFY=1``: check each call against the NumPy oracle (see :mod:`.verify`)."""
    if backend == "numpy" or not verifying():
        return fn
    from .verify import checked_op
    return checked_op(op, fn, backend)


def get_op(op: str, device) -> Callable:
    """The implementation of ``op`` for tensors on ``device``.

    Raises:
        NotImplementedError: the explicitly chosen backend lacks ``op`` or cannot compute on
            that device, or no available backend implements it.
    """
    dev = _device_type(device)
    name = _explicit()
    if name is not None:
        mod = get_backend(name)
        if dev not in mod.DEVICES:
            raise NotImplementedError(
                f"backend {name!r} computes on {sorted(mod.DEVICES)} tensors, got a {dev} tensor "
                f"for op {op!r}; move the tensors or choose another backend ({available()})")
        fn = mod.OPS.get(op)
        if fn is None:
            have = [n for n in available() if op in get_backend(n).OPS]
            raise NotImplementedError(f"backend {name!r} does not implement op {op!r}; backends "
                                      f"that do: {have}")
        return _verified(op, fn, name)
    cands = _auto_candidates(dev)
    for i, mod in enumerate(cands):
        fn = mod.OPS.get(op)
        if fn is not None:
            if i > 0 and (op, dev) not in _fallback_logged:
                _fallback_logged.add((op, dev))
                log.info("gpuquant: op %r on %s runs on backend %r (%r does not implement it)",
                         op, dev, mod.NAME, cands[0].NAME)
            return _verified(op, fn, mod.NAME)
    raise NotImplementedError(f"no available backend implements op {op!r} for {dev} tensors "
                              f"(available: {available()})")


def auto_backend(device) -> str:
    """Name of the backend automatic selection prefers for ``device``."""
    cands = _auto_candidates(_device_type(device))
    if not cands:
        raise NotImplementedError(f"no available backend computes on {_device_type(device)} tensors")
    return cands[0].NAME
