"""Backends: ``available()``, ``use(name)``, ``current()``; see :mod:`.registry`."""
from .registry import (BACKEND_NAMES, auto_backend, available, current, find_op, get_backend,
                       get_op, register, use)
from .verify import verify

__all__ = ["available", "use", "current", "get_backend", "get_op", "find_op", "register", "auto_backend",
           "BACKEND_NAMES", "verify"]
