"""A prebuilt Triton kernel cache for the GPU lease: built here, carried, unpacked there.

    python -m gpuquant.bench.tcache build --wheel triton-3.6.0-cp312-...whl \\
        --out .tcache/sm90.tar.gz            # here, on the CPU (tens of minutes on 2 cores)
    python -m gpuquant.bench.tcache check .tcache/sm90.tar.gz   # does it fit this Triton?

A lent GPU machine starts bare, and a lease is short (15 minutes of device time, start
included): every autotune candidate of every benchmark shape compiles there before it is
timed, and the background warm-up (:mod:`.warm`) that compiles them on the machine's CPUs
runs beside the timed stages. Compiling needs no GPU, so ``build`` runs that same warm-up
here, into a private cache directory, and packs what it compiled (each kernel's metadata
and cubin; not its PTX or the intermediate IRs) into one archive. The lease runner
(:mod:`.lease`, ``--triton-cache``) unpacks it into the run's ``TRITON_CACHE_DIR``; the
suites then find their kernels compiled.

Triton keys a compiled kernel on its own build (``triton_key``: a hash of its Python sources
and of the ``libtriton`` binary, which differs between CPython versions), the kernel's
source and specialisation, the target and the options. The GPU machines run a CPython other
than this one (3.12 against 3.11), so ``build`` takes that Triton's wheel (``pip download
--no-deps --python-version 3.12 ... triton==3.6.0``), checks that its Python sources are
byte for byte the installed ones, and computes the key as the GPU machine will: the
installed key with the wheel's ``libtriton`` hash in place of the local one. The archive's
manifest holds a hash of that key; ``unpack`` on the GPU machine compares it with its own
and unpacks nothing when they differ (a mismatch costs nothing but the transfer).

Triton's cache records each kernel's files by absolute path (``__grp__*.json``): ``unpack``
rewrites them for the directory it unpacks into.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import zlib
import tempfile
import zipfile
from typing import Optional, Tuple

__all__ = ["triton_key_for_wheel", "key_id", "pack", "unpack", "read_manifest", "count_kernels",
           "main", "KEY_ENV"]

MANIFEST = "MANIFEST.json"
# What a launch needs of an entry. Not the PTX: nothing run on the GPU machine reads a
# cached kernel's PTX (the probes' PTX checks are their --compile-only mode, here), and it
# was a third of the archive (51.0 -> 33.7 MiB at 1047 kernels, 2026-11-28): the checkout,
# the archive and the wheels travel to the GPU machine within 64 MiB together.
KEEP = (".json", ".cubin")
KEY_ENV = "GPUQUANT_TRITON_KEY"  # the triton_key the warm-up's workers compile under


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _libtriton_path() -> str:
    import sysconfig

    import triton
    ext = sysconfig.get_config_var("EXT_SUFFIX").split(".")[-1]
    return os.path.join(os.path.dirname(triton.__file__), "_C", f"libtriton.{ext}")


def local_triton_key() -> str:
    from triton.runtime.cache import triton_key
    return triton_key()


def key_id(key: str) -> str:
    """A short name of a ``triton_key`` (the manifest holds this, not the 13 KB key)."""
    return _sha256(key.encode())[:16]


def triton_key_for_wheel(wheel: str) -> str:
    """The ``triton_key`` a machine with Triton installed from ``wheel`` computes.

    Raises:
        ValueError: ``wheel`` is not a Triton wheel, or one of its Python files differs from
            the installed Triton's (another release: build the cache with that release).
    """
    import triton
    site = os.path.dirname(os.path.dirname(triton.__file__))
    try:
        z = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"wheel must be a Triton wheel file, got {wheel!r} ({e})") from None
    lib = None
    with z:
        names = [n for n in z.namelist() if n.startswith("triton/") and not n.endswith("/")]
        if not any(n == "triton/__init__.py" for n in names):
            raise ValueError(f"wheel must be a Triton wheel file, got {wheel!r} (no "
                             f"triton/__init__.py in it)")
        for n in names:
            if n.startswith("triton/_C/libtriton."):
                lib = _sha256(z.read(n))
            elif n.endswith(".py"):
                local = os.path.join(site, n)
                try:
                    with open(local, "rb") as f:
                        same = f.read() == z.read(n)
                except OSError:
                    same = False
                if not same:
                    raise ValueError(f"{wheel!r}: {n} differs from the installed Triton "
                                     f"{triton.__version__}'s; build the cache with the "
                                     f"wheel's Triton release installed")
    if lib is None:
        raise ValueError(f"wheel must be a Triton wheel file, got {wheel!r} (no libtriton)")
    with open(_libtriton_path(), "rb") as f:
        here = _sha256(f.read())
    key = local_triton_key()
    if key.count(here) != 1:  # pragma: no cover - a Triton whose key is built otherwise
        raise ValueError(f"cannot place the wheel's libtriton hash in Triton "
                         f"{triton.__version__}'s cache key")
    return key.replace(here, lib)


def patch_triton_key(key: str) -> None:
    """Compile under ``key`` in this process (``get_cache_key`` reads the module global)."""
    import triton.runtime.cache as cache
    cache.triton_key = lambda: key


def _entries(cache_dir: str):
    """(entry directory name, its group files) of every compiled kernel in ``cache_dir``."""
    for name in sorted(os.listdir(cache_dir)):
        d = os.path.join(cache_dir, name)
        if not os.path.isdir(d):
            continue
        groups = [f for f in os.listdir(d) if f.startswith("__grp__") and f.endswith(".json")]
        if groups:
            yield name, groups


def count_kernels(cache_dir: Optional[str]) -> int:
    """Compiled kernels in a Triton cache directory (0 if it does not exist)."""
    if not cache_dir or not os.path.isdir(cache_dir):
        return 0
    return sum(1 for _ in _entries(cache_dir))


def pack(cache_dir: str, out: str, key: str, note: str = "") -> dict:
    """Write ``cache_dir``'s compiled kernels (metadata and cubin: :data:`KEEP`) to the
    gzipped tar ``out``, its manifest (naming ``key``) first; returns the manifest."""
    import triton
    entries = list(_entries(cache_dir))
    manifest = {"triton": triton.__version__, "key_id": key_id(key), "kernels": len(entries),
                "created": datetime.datetime.now(datetime.timezone.utc)
                .isoformat(timespec="seconds"), "note": note}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        data = json.dumps(manifest, indent=1).encode()
        info = tarfile.TarInfo(MANIFEST)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        for name, _ in entries:
            d = os.path.join(cache_dir, name)
            for f in sorted(os.listdir(d)):
                if f.endswith(KEEP):
                    tar.add(os.path.join(d, f), arcname=f"{name}/{f}")
    os.replace(tmp, out)
    return manifest


def read_manifest(archive: str) -> dict:
    """The manifest of a cache archive.

    Raises:
        ValueError: not a readable archive with a manifest.
    """
    try:
        with tarfile.open(archive, "r:gz") as tar:
            f = tar.extractfile(MANIFEST)
            return json.loads(f.read())
    except (OSError, EOFError, zlib.error, KeyError, tarfile.TarError, ValueError,
            AttributeError) as e:  # (a truncated gzip raises EOFError, a damaged one zlib's)
        raise ValueError(f"{archive!r} is not a Triton cache archive of "
                         f"gpuquant.bench.tcache ({type(e).__name__}: {e})") from None


def unpack(archive: str, cache_dir: str, key: Optional[str] = None) -> Tuple[int, str]:
    """Unpack ``archive`` into ``cache_dir`` if it was built for this Triton (``key``:
    default, the installed Triton's ``triton_key``). Returns (kernels unpacked, a line for
    the log); 0 kernels when the keys differ.

    Raises:
        ValueError: ``archive`` is not a cache archive.
    """
    manifest = read_manifest(archive)
    mine = key_id(key if key is not None else local_triton_key())
    if manifest.get("key_id") != mine:
        return 0, (f"{archive}: built for another Triton build (key {manifest.get('key_id')}, "
                   f"Triton {manifest.get('triton')}; this one: {mine}): not used")
    os.makedirs(cache_dir, exist_ok=True)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name != MANIFEST
                       and m.name.count("/") == 1 and ".." not in m.name
                       and not m.name.startswith("/")]
            tar.extractall(cache_dir, members=members)
    except (OSError, EOFError, zlib.error, tarfile.TarError) as e:  # damaged past the manifest
        raise ValueError(f"{archive!r}: cannot be unpacked ({type(e).__name__}: {e})") from None
    kernels = 0
    for name, groups in _entries(cache_dir):
        d = os.path.join(cache_dir, name)
        for g in groups:
            path = os.path.join(d, g)
            with open(path) as f:
                children = json.load(f).get("child_paths", {})
            here = {c: os.path.join(d, c) for c in children if os.path.exists(os.path.join(d, c))}
            with open(path, "w") as f:
                json.dump({"child_paths": here}, f)
        kernels += 1
    return kernels, (f"{archive}: {kernels} kernels unpacked into {cache_dir} (built "
                     f"{manifest.get('created')}, {manifest.get('note', '')})")


def _git_head() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=os.path.dirname(__file__), timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m gpuquant.bench.tcache",
                                description="a prebuilt Triton cache for the GPU lease")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="compile the suites' kernels here and pack them")
    b.add_argument("--wheel", required=True,
                   help="the Triton wheel the GPU machine runs (pip download --no-deps "
                        "--python-version 3.12 --only-binary=:all: triton==3.6.0)")
    b.add_argument("--out", required=True, help="archive to write (.tar.gz)")
    b.add_argument("--suites", default=None,
                   help="suites to warm (default: warm's, and its weight_only_tiles and "
                        "gluon_tiles: the weight-only and Gluon GEMMs' forced configs of "
                        "the GPU probes and tests)")
    b.add_argument("--jobs", type=int, default=max(1, os.cpu_count() or 1))
    c = sub.add_parser("check", help="print an archive's manifest and whether it fits here")
    c.add_argument("archive")
    args = p.parse_args(argv)
    if args.cmd == "check":
        try:
            m = read_manifest(args.archive)
        except ValueError as e:
            print(e, file=sys.stderr)
            return 2
        mine = key_id(local_triton_key())
        print(json.dumps(m, indent=1))
        print("fits this Triton" if m.get("key_id") == mine else
              f"does not fit this Triton (key {mine})")
        return 0
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if os.path.isdir(args.out) or not os.path.isdir(out_dir) or \
            not os.access(out_dir, os.W_OK):
        p.error(f"argument --out: {args.out!r} must be a file path in a writable folder "
                f"(checked before the minutes of compiling)")
    try:
        key = triton_key_for_wheel(args.wheel)
    except ValueError as e:
        p.error(str(e))
    with tempfile.TemporaryDirectory(prefix="gpuquant-tcache-") as cache:
        env = dict(os.environ, TRITON_CACHE_DIR=cache, **{KEY_ENV: key})
        from .warm import DEFAULT_SUITES, GLUON_TILES, WEIGHT_ONLY_TILES
        suites = args.suites or ",".join(DEFAULT_SUITES + (WEIGHT_ONLY_TILES, GLUON_TILES))
        cmd = [sys.executable, "-m", "gpuquant.bench.warm", "--jobs", str(args.jobs),
               "--nice", "0", "--suites", suites]
        rc = subprocess.call(cmd, env=env)
        m = pack(cache, args.out, key, note=f"commit {_git_head()}, suites {suites}, "
                 f"warm exit {rc}")
    print(f"{args.out}: {m['kernels']} kernels, {os.path.getsize(args.out) / 2 ** 20:.1f} MiB, "
          f"key {m['key_id']}")
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
