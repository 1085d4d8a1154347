"""Running test code with Triton's compiler instead of its interpreter: the conftest sets
``TRITON_INTERPRET=1`` for the whole CPU test session, and Triton reads it at import, so
code that compiles kernels to PTX / SASS or runs the stand-in CUDA driver runs in a child
process without it."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_compiled(args, cache_dir=None, timeout: int = 900, **env_extra):
    """``python ARGS`` (e.g. ``["-c", script]``) from the repository root with
    ``TRITON_INTERPRET`` unset, the checkout on ``PYTHONPATH``, Triton's cache in
    ``cache_dir`` when given and ``env_extra`` set; returns the CompletedProcess (text)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if cache_dir is not None:
        env["TRITON_CACHE_DIR"] = str(cache_dir)
    env.update({k: str(v) for k, v in env_extra.items()})
    return subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def run_json(script: str, cache_dir=None, timeout: int = 900, **env_extra):
    """Run ``script`` as :func:`run_compiled` does; it prints its result as one line
    ``JSON<json>``, returned parsed. Asserts the script succeeded (its stderr tail)."""
    proc = run_compiled(["-c", script], cache_dir, timeout, **env_extra)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("JSON")][-1][4:])
