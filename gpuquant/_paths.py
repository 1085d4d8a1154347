"""Output folder checks shared by the command-line tools (demo, bench, the lease runner)."""
from __future__ import annotations

import os
from typing import Optional, Tuple

__all__ = ["out_problem"]


def out_problem(out, files: Tuple[str, ...] = ()) -> Optional[str]:
    """Why ``out`` cannot be the demo's output folder (None when it can): checked before the
    run, so a bad path fails at once rather than after training. ``files``: the names the
    run will write in ``out``; one that exists there as something other than a file (a
    folder) is a problem too."""
    if not isinstance(out, (str, os.PathLike)):
        return f"must be a folder path (str or os.PathLike), got {type(out).__name__}"
    out = os.fspath(out)
    if not out:
        return "must not be empty"
    if os.path.exists(out) and not os.path.isdir(out):
        return f"{out!r} exists and is not a folder"
    parent = os.path.abspath(out)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{out!r} cannot be created: {parent!r} is not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{out!r} cannot be written: no write permission in {parent!r}"
    for name in files:
        path = os.path.join(out, name)
        if os.path.exists(path) and not os.path.isfile(path):
            return f"{path!r} exists and is not a file: it cannot be written"
    return _try_write(out)


def _try_write(out: str) -> Optional[str]:
    """Create ``out`` and a file in it, then remove what was made: ``os.access`` says yes to
    root on read-only or virtual file systems (``/proc``), where only trying tells."""
    import shutil
    import tempfile
    first_new = None
    path = os.path.abspath(out)
    while not os.path.exists(path):
        first_new, path = path, os.path.dirname(path)
    try:
        os.makedirs(out, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".gpuquant-write-check-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        return f"{out!r} cannot be written: {e.strerror or e}"
    finally:
        if first_new is not None and os.path.isdir(first_new):
            shutil.rmtree(first_new, ignore_errors=True)
    return None
