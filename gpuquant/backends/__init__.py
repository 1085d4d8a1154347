"""Backends: ``available()``, ``use(name)``, ``current()``; see :mod:`.registry`.

Names resolve lazily (PEP 562): importing a torch-free module below this package (the
NumPy backend's array kernels, used by :mod:`gpuquant.runtime`) does not import torch.
"""
import importlib as _importlib
import sys as _sys
import types as _types

_LAZY = {"BACKEND_NAMES": ".registry", "auto_backend": ".registry", "available": ".registry",
         "current": ".registry", "find_op": ".registry", "fused_op": ".registry", "get_backend": ".registry",
         "get_op": ".registry", "register": ".registry", "use": ".registry",
         "verify": ".verify"}

__all__ = ["available", "use", "current", "get_backend", "get_op", "find_op", "fused_op", "register", "auto_backend",
           "BACKEND_NAMES", "verify"]


def __getattr__(name):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'gpuquant.backends' has no attribute {name!r}")
    value = getattr(_importlib.import_module(mod, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


class _Package(_types.ModuleType):
    """Keeps the public function ``verify`` when the submodule ``.verify`` is first imported
    (the import machinery binds a submodule as an attribute of its package)."""

    def __setattr__(self, name, value):
        if name == "verify" and isinstance(value, _types.ModuleType):
            return
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package
