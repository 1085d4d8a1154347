"""Output folder checks shared by the command-line tools (demo, bench, the lease runner)."""
from __future__ import annotations

import os
from typing import Optional

__all__ = ["out_problem"]


def out_problem(out) -> Optional[str]:
    """Why ``out`` cannot be the demo's output folder (None when it can): checked before the
    run, so a bad path fails at once rather than after training."""
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
    return None
