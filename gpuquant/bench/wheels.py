"""Optional comparison packages carried to a GPU machine as wheels (no network there).

The ``linear_dynamic`` suite has ``torchao`` rows (issue 12's "torchao if it installs"), but a
lent GPU machine reaches nothing outside it, so ``pip install torchao`` cannot run there.
``make wheels`` downloads the wheel here into ``.tcache/wheels/`` (git-ignored, carried with
the Triton cache); the lease runner makes it importable there:

* a wheel is a ``site-packages`` tree, so it is unzipped into its own folder (no pip, no
  dependency resolution: the packages carried need only what the GPU machine has);
* the folder goes on the stages' ``PYTHONPATH`` only if a child process then imports the
  package: a torchao built against another torch's ABI aborts the interpreter that imports
  it ("Fatal Python error: Aborted"), and that must not be a benchmark suite's process;
* a package the machine already has is left alone (its own copy is what a user would run).

The checks run in background processes, started before the first stage and collected
before the stage that needs them (:class:`Carried`), so they cost the lease no waiting.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import zipfile
from typing import Dict, List, Optional, Tuple

__all__ = ["WHEELS_GLOB", "Carried", "wheel_package"]

WHEELS_GLOB = ".tcache/wheels/*.whl"
IMPORT_TIMEOUT_S = 240.0  # from the start; importing torchao imports torch (and CUDA)

_PROBE = ("import importlib, sys; m = importlib.import_module(sys.argv[1]); "
          "print(getattr(m, '__version__', '?'))")


def wheel_package(path: str) -> Tuple[str, str]:
    """(import name, version) from a wheel's file name ``{dist}-{version}-...whl``.

    Raises:
        ValueError: not a wheel's file name.
    """
    name = os.path.basename(path)
    parts = name[:-4].split("-") if name.endswith(".whl") else []
    if len(parts) < 5:
        raise ValueError(f"not a wheel file name (dist-version-python-abi-platform.whl): "
                         f"{name!r}")
    return parts[0].replace(".", "_").lower(), parts[1]


class Carried:
    """The carried wheels' import checks, started at construction (background processes),
    collected by :meth:`result`: the folders to put on ``PYTHONPATH`` and one summary line.

    ``wheels``: wheel paths; ``site_root``: where each is unzipped (``site_root/<name>``);
    ``env``: the stages' environment (its PYTHONPATH decides what is already installed)."""

    def __init__(self, wheels: List[str], site_root: str, env: Dict[str, str]):
        self._checks = []   # (name, version, folder, plain probe, carried probe)
        self._notes = []
        self._done: Optional[Tuple[List[str], str]] = None
        self._deadline = time.monotonic() + IMPORT_TIMEOUT_S
        for path in wheels:
            try:
                name, version = wheel_package(path)
            except ValueError as e:
                self._notes.append(str(e))
                continue
            if name in (c[0] for c in self._checks):
                self._notes.append(f"{os.path.basename(path)}: another {name} wheel is used")
                continue
            folder = os.path.join(site_root, name)
            try:
                with zipfile.ZipFile(path) as z:
                    z.extractall(folder)
            except Exception as e:  # noqa: BLE001 -- optional, per wheel: zlib.error, EOFError
                shutil.rmtree(folder, ignore_errors=True)
                self._notes.append(f"{name} {version}: cannot unzip {path} "
                                   f"({type(e).__name__}: {e})")
                continue
            # both at once: installed already (the plain environment)? from the wheel?
            self._checks.append((name, version, folder, self._probe(name, env, None),
                                 self._probe(name, env, folder)))

    @staticmethod
    def _probe(name: str, env: Dict[str, str], folder: Optional[str]):
        if folder is not None:
            env = dict(env, PYTHONPATH=os.pathsep.join(
                p for p in (folder, env.get("PYTHONPATH")) if p))
        return subprocess.Popen([sys.executable, "-c", _PROBE, name], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def _wait(self, proc, wait: bool, until: Optional[float]) -> Tuple[bool, str]:
        """(imported, version or the last line of its error)."""
        if not wait and proc.poll() is None:  # still running: stop it, report that
            proc.kill()
            proc.communicate()
            return False, "its import check had not finished when the run ended"
        deadline = self._deadline if until is None else min(self._deadline, until)
        try:
            out, err = proc.communicate(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            return False, "its import check did not finish in time"
        if proc.returncode == 0:
            return True, out.strip().splitlines()[-1] if out.strip() else "?"
        lines = [ln for ln in (err or "").strip().splitlines() if ln.strip()]
        return False, (lines[-1] if lines else f"exit status {proc.returncode}")

    def result(self, wait: bool = True, until: Optional[float] = None
               ) -> Tuple[List[str], str]:
        """(folders for PYTHONPATH, a summary line), once: waits for the checks up to
        ``IMPORT_TIMEOUT_S`` from the start or the monotonic time ``until``, whichever comes
        first (``wait`` False: not at all), and stops those still running."""
        if self._done is not None:
            return self._done
        paths, notes = [], list(self._notes)
        for name, version, folder, plain, carried in self._checks:
            ok, what = self._wait(plain, wait, until)
            ok_c, what_c = self._wait(carried, wait, until)
            if ok:
                notes.append(f"{name} {what} already installed (carried {version} not used)")
            elif ok_c:
                paths.append(folder)
                notes.append(f"{name} {what_c} from the carried wheel")
            else:
                notes.append(f"{name} {version}: carried wheel does not import here "
                             f"({what_c})")
        self._done = (paths, "; ".join(notes) if notes else "none carried")
        return self._done
