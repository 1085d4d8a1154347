"""One command for a short GPU lease: the GPU tests, then the GPU benchmark suites in order
of priority, each stage in its own process under a deadline, everything packed into one
archive.

    python -m gpuquant.bench.lease --out "$OUT" --budget 540

Why a runner: a lent GPU machine may give one command a few minutes, starts bare (no
Triton cache: every autotune config compiles before it is timed) and sends back only a few
files. So the stages run in a fixed priority order (``--stages``; default
``tests,models,conv,qat_step,fake_quant,linear_dynamic,gemm``), each with a share of the
remaining budget and killed at its deadline; benchmark suites run ``--quick`` with
``--save-each-case`` (a suite cut short keeps its measured cases in
``<suite>.partial.json``) and, unless ``--full-tune``, ``GPUQUANT_TRITON_TUNE=quick``
(three autotune configs per kernel instead of up to eleven). A stage that the time left
cannot start is recorded as skipped: run the rest in a second command with ``--stages``.

On a machine with 8 or more CPUs, a background process (:mod:`.warm`, ``--warm-jobs``,
low priority, the GPU hidden from it) compiles the chosen suites' Triton kernels from the
start, in parallel, while the tests run: the suites then find most of their autotune
configs in Triton's cache instead of compiling them one by one while the GPU waits.

A prebuilt Triton cache (:mod:`.tcache`: the same warm-up, run on the development machine
for the GPU machine's Triton build, packed into ``.tcache/*.tar.gz``, carried with the
checkout) is unpacked into the run's ``TRITON_CACHE_DIR`` first when its key fits this
Triton (``--triton-cache``, default ``auto``); the summary says how many kernels it held and
how many were still compiled during the run.

Wheels of optional comparison packages carried in ``.tcache/wheels/`` (torchao: ``make
wheels``; the machine reaches no package index) are checked for import in background
processes and put on the ``linear_dynamic`` stage's ``PYTHONPATH`` if they import
(``--wheels``, :mod:`.wheels`).

Writes into ``--out``: ``lease.tar.gz``, holding ``results/<device-slug>/`` with the
suites' JSON / Markdown / PNG files, ``lease-logs/<stage>.log``, ``lease-env.txt`` and
``lease-summary.md``; and ``summary.md``, which is also printed last. ``tar -xzf
lease.tar.gz -C bench`` files it all under the checkout's ``bench/results/<device-slug>/``. Exit status 0 when every stage passed, 1 otherwise, 2 for
bad arguments.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from typing import List, Optional, Sequence, Tuple

__all__ = ["main", "DEFAULT_STAGES", "plan_caps"]

DEFAULT_STAGES = ("tests", "models", "conv", "qat_step", "fake_quant", "linear_dynamic", "gemm")
# the most seconds each stage may take (it also gets at most the time left). Measured on a
# bare H200 (2026-11-26, quick tuning): every gpu-marked test 87 s; gemm 52 s, conv 53-60 s,
# fake_quant 28 s, qat_step 30 s; models did not finish resnet50 batch 1 (with
# torch.compile) in 150 s nor batch 64 (without) in 100 s: the first case compiles every
# kernel of the network. So a 540 s command covers tests, models and conv; a second one,
# --stages qat_step,gemm,linear_dynamic,fake_quant --budget 300, most of the rest. conv: 150 s
# since its 3x3 layers tune two loop forms and its large tiles a split epilogue too (up to 10
# configs a shape instead of 3 under quick tuning) and it has a graph row.
STAGE_CAP = {"tests": 120.0, "models": 240.0, "conv": 150.0, "gemm": 90.0, "fake_quant": 60.0,
             "qat_step": 120.0,  # qat_step: 30 s with 2 providers running; now 6
             "profile": 240.0,  # its int8_forward builds and compiles the whole network, as
                                # models does, and conv_all tunes the 53 convolutions
             "counters": 180.0}  # ncu over the conv suite's quick layers: tuning, then ~30
                                 # kernels a few dozen replay passes each
DEFAULT_CAP = 90.0
# providers a stage leaves out unless --skip STAGE: (empty) says otherwise: torch.compile of
# the bf16 networks took most of the models stage's 150 s on the H200 (lease 1), for a
# comparison row the targets do not need
DEFAULT_SKIP = {"models": "torch-bf16-compile"}
MIN_STAGE_S = 45.0      # a stage is not started with less than this left (a suite's process
                        # takes ~20-30 s for start-up, CUDA and its ceilings before a case)
PACK_RESERVE_S = 10.0   # kept for writing the summary and the archive
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TCACHE_GLOB = ".tcache/*.tar.gz"  # where `tcache build` archives are carried (git-ignored)
WHEEL_STAGES = ("linear_dynamic",)  # the stages with rows of a carried package (torchao)


def plan_caps(stage: str, left: float, caps: Optional[dict] = None) -> Optional[float]:
    """The deadline (seconds) a stage gets with ``left`` seconds of budget, or None when it
    cannot start (``caps``: the command line's --cap overrides)."""
    usable = left - PACK_RESERVE_S
    if usable < MIN_STAGE_S:
        return None
    cap = (caps or {}).get(stage, STAGE_CAP.get(stage, DEFAULT_CAP))
    return min(usable, cap)


# suites whose kernels the background warm-up compiles (the tests' are many small ones)
WARM_SUITES = ("models", "conv", "gemm", "linear_dynamic", "fake_quant", "qat_step")


def _default_warm_jobs() -> int:
    n = os.cpu_count() or 1
    return n - 2 if n >= 8 else 0


def _start_warm(args, log_path: str, env: dict):
    """The background compile of the chosen suites' kernels (:mod:`.warm`), or None."""
    suites = [s for s in args.stage_list if s in WARM_SUITES]
    if not args.warm_jobs or not suites:
        return None
    cmd = [sys.executable, "-m", "gpuquant.bench.warm", "--suites", ",".join(suites),
           "--jobs", str(args.warm_jobs), "--budget", str(max(1.0, args.budget - PACK_RESERVE_S))]
    log = open(log_path, "w")
    log.write("$ " + " ".join(cmd) + "\n")
    log.flush()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=_REPO, env=env,
                            start_new_session=True)
    proc.log = log
    return proc


def _stop_warm(proc) -> str:
    """Stop the warm-up if still running; its status for the summary."""
    if proc is None:
        return ""
    status = "finished" if proc.poll() is not None else "stopped"
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    proc.log.close()
    return status


def _unpack_triton_cache(choice: str, cache_dir: str) -> Tuple[int, str]:
    """Unpack the prebuilt Triton cache ``choice`` (an archive, 'auto' or 'none') into
    ``cache_dir``: (kernels unpacked, a line for the summary)."""
    from .tcache import unpack
    if choice == "none":
        return 0, "not asked for"
    archives = [choice] if choice != "auto" else \
        sorted(glob.glob(os.path.join(_REPO, TCACHE_GLOB)), key=os.path.getmtime, reverse=True)
    if not archives:
        return 0, f"none ({TCACHE_GLOB} not in the checkout)"
    lines = []
    for path in archives:
        try:
            n, line = unpack(path, cache_dir)
        except Exception as e:  # noqa: BLE001 -- optional: a damaged archive is a line
            n, line = 0, str(e)
        lines.append(line.replace(_REPO + os.sep, ""))
        if n:
            return n, lines[-1]
    return 0, "; ".join(lines)


def _carried_wheels(choice: str, site_root: str, env: dict):
    """The import checks of the carried wheels (:class:`.wheels.Carried`), started now, or
    None when there are none."""
    from .wheels import WHEELS_GLOB, Carried
    if choice == "none":
        return None
    pattern = os.path.join(_REPO, WHEELS_GLOB) if choice == "auto" else \
        os.path.join(choice, "*.whl")
    wheels = sorted(glob.glob(pattern))
    return Carried(wheels, site_root, env) if wheels else None


def _use_carried(carried, env: dict, wait: bool = True, until: Optional[float] = None) -> None:
    """Put the carried packages that import on the stages' PYTHONPATH; their summary line
    goes into ``env["GPUQUANT_LEASE_WHEELS"]`` (printed, and read by the summary). Waits for
    the import checks at most until the monotonic time ``until``."""
    paths, line = carried.result(wait, until)
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths + [env["PYTHONPATH"]])
    env["GPUQUANT_LEASE_WHEELS"] = line
    print(f"[lease] carried packages: {line}", flush=True)


def _known_stages() -> List[str]:
    from .suites import registered
    return ["tests", "profile", "counters"] + list(registered())


def _per_stage(items, what: str, known: List[str], p) -> dict:
    """``["models:model=resnet50,batch=64", ...]`` -> {"models": "model=resnet50,batch=64"}."""
    out = {}
    for item in items or ():
        stage, sep, value = item.partition(":" if what != "cap" else "=")
        if not sep or stage.strip() not in known or (not value.strip() and what != "skip"):
            p.error(f"--{what}: expected STAGE{':' if what != 'cap' else '='}VALUE with a known "
                    f"stage ({known}), got {item!r}")
        out[stage.strip()] = value.strip()
    return out


def _parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m gpuquant.bench.lease",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder that receives lease.tar.gz and summary.md")
    p.add_argument("--budget", type=float, default=540.0,
                   help="seconds for all stages together (default 540)")
    p.add_argument("--stages", default=",".join(DEFAULT_STAGES),
                   help="comma-separated stages: 'tests' and benchmark suite names")
    p.add_argument("--full-tune", action="store_true",
                   help="autotune over every config (default: GPUQUANT_TRITON_TUNE=quick)")
    p.add_argument("--pytest-args", default="-q -m gpu tests -p no:cacheprovider --durations=15 "
                                             "-o faulthandler_timeout=60",
                   help="arguments of the 'tests' stage's pytest run")
    p.add_argument("--full-sizes", action="store_true",
                   help="run the suites without --quick")
    p.add_argument("--where", action="append", metavar="SUITE:NAME=V[|V],...",
                   help="only these cases of a suite (gpuquant bench --where), repeatable")
    p.add_argument("--skip", action="append", metavar="SUITE:PROVIDER,...",
                   help="providers a suite leaves out (gpuquant bench --skip), repeatable; "
                        f"default {DEFAULT_SKIP}, 'SUITE:' (nothing after the colon) "
                        "keeps them all")
    p.add_argument("--cap", action="append", metavar="STAGE=SECONDS",
                   help="the most seconds a stage may take, instead of its default, repeatable")
    p.add_argument("--profile-args", default="--what qat_step,int8_forward,conv_all",
                   help="arguments of the 'profile' stage (python -m gpuquant.bench.profile)")
    p.add_argument("--counters-args", default="",
                   help="arguments of the 'counters' stage (python -m gpuquant.bench.counters: "
                        "Nsight Compute counters of the conv suite's layers)")
    p.add_argument("--warm-jobs", type=int, default=None,
                   help="CPU processes compiling the suites' Triton kernels in the background "
                        "from the start (gpuquant.bench.warm; 0: none; default: CPUs - 2 "
                        "on machines with 8 or more, none when a prebuilt Triton cache was "
                        "unpacked: its compile load would only disturb the timings)")
    p.add_argument("--wheels", default="auto", metavar="DIR|auto|none",
                   help="wheels of optional comparison packages (torchao) to make importable "
                        "for the suites when they import (gpuquant.bench.wheels; `make "
                        "wheels` fetches them here); 'auto' (default): the checkout's "
                        ".tcache/wheels/*.whl")
    p.add_argument("--triton-cache", default="auto", metavar="ARCHIVE|auto|none",
                   help="a prebuilt Triton cache (gpuquant.bench.tcache build) to unpack into "
                        "the run's TRITON_CACHE_DIR first; 'auto' (default): the newest "
                        f"{TCACHE_GLOB} in the checkout, if any")
    args = p.parse_args(argv)
    if args.triton_cache not in ("auto", "none") and not os.path.isfile(args.triton_cache):
        p.error(f"--triton-cache: no such archive {args.triton_cache!r} (or 'auto', 'none')")
    if args.wheels not in ("auto", "none") and not os.path.isdir(args.wheels):
        p.error(f"--wheels: no such folder {args.wheels!r} (or 'auto', 'none')")
    if not args.budget > 0:
        p.error(f"--budget must be positive, got {args.budget}")
    if args.warm_jobs is not None and args.warm_jobs < 0:
        p.error(f"--warm-jobs must be >= 0, got {args.warm_jobs}")
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    known = _known_stages()
    bad = [s for s in stages if s not in known]
    if bad or not stages:
        p.error(f"unknown stage(s) {bad or args.stages!r}; known: {known}")
    args.stage_list = list(dict.fromkeys(stages))
    from .._paths import out_problem
    why = out_problem(args.out)
    if why is not None:  # before the lease's minutes are spent
        p.error(f"argument --out: {why}")
    args.where_map = _per_stage(args.where, "where", known, p)
    skips = {**DEFAULT_SKIP, **_per_stage(args.skip, "skip", known, p)}
    args.skip_map = {k: v for k, v in skips.items() if v}  # "--skip models:": skip nothing
    caps = _per_stage(args.cap, "cap", known, p)
    try:
        args.cap_map = {k: float(v) for k, v in caps.items()}
    except ValueError:
        p.error(f"--cap: seconds must be a number, got {caps}")
    if any(not v > 0 for v in args.cap_map.values()):
        p.error(f"--cap: seconds must be positive, got {args.cap_map}")
    _check_suite_args(args, p)
    return args


def _check_suite_args(args, p) -> None:
    """What a suite stage's ``gpuquant bench --where / --skip`` would refuse (exit 2: a
    malformed --where, a param or a provider the suite lacks), refused now: not after the
    stages before it have spent the lease."""
    from . import _argument_problem, parse_where
    from .suites import registered, suite_device
    for stage in sorted(set(args.where_map) | set(args.skip_map)):
        if stage not in registered():  # (tests, profile, counters: they take no --where)
            p.error(f"--where / --skip {stage}:...: {stage!r} is not a benchmark suite; "
                    f"suites: {sorted(registered())}")
        try:
            where = parse_where(args.where_map.get(stage))
        except ValueError as e:
            p.error(f"{stage}: {e}")
        skip = [s.strip() for s in args.skip_map.get(stage, "").split(",") if s.strip()]
        why = _argument_problem([stage], {stage: suite_device(stage)}, skip, where,
                                not args.full_sizes, True)
        if why is not None:
            p.error(f"{stage}: {why}")


def _env_report(path: str) -> str:
    """Versions, the device, and nvidia-smi's view, into ``path``; returns the device slug."""
    import torch

    from . import device_slug
    lines = [f"date {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
             f"python {platform.python_version()} ({sys.executable})",
             f"torch {torch.__version__} cuda {torch.version.cuda}"]
    for mod in ("triton", "cupy", "numpy"):
        try:
            lines.append(f"{mod} {__import__(mod).__version__}")
        except Exception as e:  # noqa: BLE001 - recorded, not fatal
            lines.append(f"{mod} unavailable ({type(e).__name__}: {e})")
    cuda = torch.cuda.is_available()
    try:
        if cuda:
            props = torch.cuda.get_device_properties(0)
            lines.append(f"device {props.name} cc {props.major}.{props.minor} "
                         f"{props.multi_processor_count} SMs "
                         f"{props.total_memory / 2 ** 30:.1f} GiB")
        else:
            lines.append("device: no CUDA GPU visible to torch")
        slug = device_slug("cuda" if cuda else "cpu")
    except Exception as e:  # noqa: BLE001 - a broken device must not cost the archive
        lines.append(f"device query failed: {type(e).__name__}: {e}")
        slug = "unknown-device"
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,"
                                  "temperature.gpu,power.draw,memory.used", "--format=csv"],
                                 capture_output=True, text=True, timeout=20)
            lines.append(out.stdout.strip())
        except (OSError, subprocess.SubprocessError) as e:
            lines.append(f"nvidia-smi failed: {e}")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return slug


def _run_stage(cmd: Sequence[str], log_path: str, deadline: float, env: dict):
    """Run ``cmd`` with output to ``log_path``; kill its process group at ``deadline``
    seconds. Returns (status, returncode, seconds)."""
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=_REPO, env=env,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=deadline)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return f"timed out at {deadline:.0f} s", None, time.monotonic() - t0
        except BaseException:  # SIGTERM / SIGINT while waiting: the stage goes too
            _kill_group(proc)
            raise
        finally:  # children it left behind (a server, a stray worker) must not hold the GPU
            _kill_group(proc, grace=0.0)
    return ("passed" if rc == 0 else f"failed (exit {rc})"), rc, time.monotonic() - t0


def _kill_group(proc, grace: float = 5.0) -> None:
    """SIGTERM then SIGKILL to ``proc``'s process group (its own session), whether or not
    the leader is still alive; ``grace`` seconds for the leader to exit in between."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        if sig == signal.SIGTERM and grace > 0:
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


class _Terminated(Exception):
    """SIGTERM, turned into an exception so the run still writes its results."""


def _terminate(signum, frame):
    raise _Terminated()


def _write_summary(args, slug, t_start, tcache_line, unpacked, tcache, env, rows, results,
                   work, ended) -> str:
    """summary.md (printed last), lease-summary.md and lease.tar.gz from what was measured."""
    total = time.monotonic() - t_start
    if unpacked:
        from .tcache import count_kernels
        tcache_line += (f"; compiled on this machine during the run: "
                        f"{count_kernels(tcache) - unpacked}")
    summary = [f"# GPU lease run ({slug}), {total:.0f} s of a {args.budget:.0f} s budget "
               f"({ended})", "",
               f"tuning: {env.get('GPUQUANT_TRITON_TUNE')} (GPUQUANT_TRITON_TUNE); "
               f"sizes: {'full' if args.full_sizes else '--quick'}", "",
               f"prebuilt Triton cache: {tcache_line}", "",
               f"carried packages: {env.get('GPUQUANT_LEASE_WHEELS', 'none carried')}", "",
               "| stage | status | seconds | last line of its log |", "|---|---|---:|---|"]
    summary += [f"| {s} | {st} | {sec:.0f} | {last.replace('|', '/')} |"
                for s, st, sec, last in rows]
    try:
        summary += ["", "```"] + (_bench_summary(results) or ["  no benchmark results"]) \
            + ["```"]
        text = "\n".join(summary) + "\n"
        for path in (os.path.join(results, "lease-summary.md"),
                     os.path.join(args.out, "summary.md")):
            with open(path, "w") as f:
                f.write(text)
    finally:  # whatever the summary did, the measured files go into the archive
        with tarfile.open(os.path.join(args.out, "lease.tar.gz"), "w:gz") as tar:
            tar.add(os.path.join(work, "results"), arcname="results")
        shutil.rmtree(work, ignore_errors=True)
    return text


def _last_line(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:160] if lines else ""


def _needs_gpu(log_path: str) -> bool:
    with open(log_path, errors="replace") as f:
        return "needs a CUDA GPU: skipped" in f.read()


def _bench_summary(results_dir: str) -> List[str]:
    from .report import summary_lines
    docs = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        try:
            with open(path) as f:
                doc = json.load(f)
        except (OSError, ValueError):
            continue
        # (not every JSON file there is a suite's results: counters-calls.json is a list)
        if isinstance(doc, dict) and isinstance(doc.get("rows"), list) and doc["rows"]:
            if doc.get("partial"):
                doc["suite"] = f"{doc.get('suite', '?')} (cut short)"
            docs.append(doc)
    try:
        return summary_lines(docs)
    except Exception as e:  # noqa: BLE001 - a summary problem must not lose the archive
        return [f"  (summary failed: {type(e).__name__}: {e})"]


def main(argv=None) -> int:
    args = _parse(argv)
    t_start = time.monotonic()
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="gpuquant-lease-")
    env_txt = os.path.join(work, "env.txt")
    slug = _env_report(env_txt)
    results = os.path.join(work, "results", slug)
    logs = os.path.join(results, "lease-logs")
    os.makedirs(logs)
    shutil.move(env_txt, os.path.join(results, "lease-env.txt"))
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (_REPO, os.environ.get("PYTHONPATH")) if p))
    env["GPUQUANT_TRITON_TUNE"] = "full" if args.full_tune else "quick"  # (never inherited)
    tcache = os.path.join(work, "triton-cache")
    unpacked, tcache_line = _unpack_triton_cache(args.triton_cache, tcache)
    if unpacked:
        env["TRITON_CACHE_DIR"] = tcache
    print(f"[lease] prebuilt Triton cache: {tcache_line}", flush=True)
    carried = _carried_wheels(args.wheels, os.path.join(work, "site"), env)
    if args.warm_jobs is None:
        args.warm_jobs = 0 if unpacked else _default_warm_jobs()
    warm = _start_warm(args, os.path.join(logs, "warm.log"), env)
    rows = []
    ended = "ran to its end"
    # SIGTERM (an outer timeout, the device tool giving the machine back): stop the stage,
    # and still write what was measured (the finally below)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        for stage in args.stage_list:
            if stage in WHEEL_STAGES and carried is not None:  # (its wait counts: before
                until = t_start + args.budget - PACK_RESERVE_S - MIN_STAGE_S  # the cap)
                _use_carried(carried, env, until=until)
                carried = None
            left = args.budget - (time.monotonic() - t_start)
            cap = plan_caps(stage, left, args.cap_map)
            if cap is None:
                rows.append((stage, "skipped: no time left", 0.0, ""))
                continue
            if stage == "tests":
                cmd = [sys.executable, "-m", "pytest"] + shlex.split(args.pytest_args)
            elif stage in ("profile", "counters"):
                cmd = [sys.executable, "-m", f"gpuquant.bench.{stage}", "--out", results] \
                    + shlex.split(args.profile_args if stage == "profile" else args.counters_args)
            else:
                cmd = [sys.executable, "-m", "gpuquant.cli", "bench", stage, "--out", results,
                       "--save-each-case"] + ([] if args.full_sizes else ["--quick"])
                if stage in args.where_map:
                    cmd += ["--where", args.where_map[stage]]
                if stage in args.skip_map:
                    cmd += ["--skip", args.skip_map[stage]]
            log = os.path.join(logs, f"{stage}.log")
            print(f"[lease] {stage}: up to {cap:.0f} s ...", flush=True)
            status, rc, secs = _run_stage(cmd, log, cap, env)
            if rc in (0, 3) and stage not in ("tests", "profile", "counters") \
                    and _needs_gpu(log):
                status = "skipped: needs a CUDA GPU"  # (gpuquant bench's exit status 3)
            rows.append((stage, status, secs, _last_line(log)))
            print(f"[lease] {stage}: {status} in {secs:.0f} s", flush=True)
    except (_Terminated, KeyboardInterrupt) as e:
        ended = f"stopped by {'SIGTERM' if isinstance(e, _Terminated) else 'SIGINT'}"
        rows.append(("(run)", ended, time.monotonic() - t_start, ""))
    finally:
        signal.signal(signal.SIGTERM, previous)
        if carried is not None:  # no stage used them: the summary says what the checks found
            _use_carried(carried, env, wait=False)
        warm_status = _stop_warm(warm)
        if warm is not None:
            rows.append(("warm (background)", warm_status, time.monotonic() - t_start,
                         _last_line(os.path.join(logs, "warm.log"))))
        text = _write_summary(args, slug, t_start, tcache_line, unpacked, tcache, env, rows,
                              results, work, ended)
    print(text, flush=True)
    return 0 if all(st == "passed" for s, st, _, _ in rows if s != "warm (background)") else 1


if __name__ == "__main__":
    sys.exit(main())
