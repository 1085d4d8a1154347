"""Run a function in N local processes joined by a gloo process group, with timeouts so a
hang fails the test instead of blocking CI.

Processes are forked (Linux): the children inherit the imported modules, so a 2-process
test costs well under a second of start-up instead of a fresh ``import torch`` each
(``spawn``). Results travel back as plain Python / NumPy objects (tensors would travel as
shared-memory handles that die with the worker).
"""
from __future__ import annotations

import datetime
import multiprocessing as mp
import socket
import traceback

import pytest
import torch

TIMEOUT_S = 90  # whole run; a collective that hangs fails after COLLECTIVE_TIMEOUT_S
COLLECTIVE_TIMEOUT_S = 45


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world, port, queue, args):
    import torch.distributed as dist
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world,
                                timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    except BaseException:  # no group: the parent may start over on another port
        queue.put((rank, "rendezvous", traceback.format_exc()))
        return
    try:
        try:
            queue.put((rank, "ok", fn(rank, world, *args)))
        finally:
            dist.destroy_process_group()
    except BaseException:  # report it to the parent, whatever it is
        queue.put((rank, "error", traceback.format_exc()))


def run(fn, world: int = 2, args=()) -> list:
    """``[fn(rank, world, *args) for rank in range(world)]``, each in its own process inside
    an initialised gloo group; raises if a worker fails or the run exceeds the timeout."""
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not built into this torch")
    # DistributedDataParallel's constructor imports torch._dynamo (~900 modules, seconds):
    # do it once here so that every forked worker inherits it
    import torch._dynamo  # noqa: F401
    for attempt in (1, 2):
        try:
            return _run_once(fn, world, args)
        except _RendezvousFailed as e:  # no worker ran fn: start over on a fresh port
            if attempt == 2:
                raise AssertionError(str(e)) from None


class _RendezvousFailed(Exception):
    """The workers did not all join the process group (a port taken between free_port()
    and the bind, or a forked worker starved under load: seen once on a busy 2-core CI)."""


def _run_once(fn, world: int, args) -> list:
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, queue, args), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    try:
        results = {}
        for _ in procs:
            rank, status, value = queue.get(timeout=TIMEOUT_S)
            if status == "rendezvous":
                raise _RendezvousFailed(f"worker {rank} failed to join the group:\n{value}")
            if status != "ok":
                raise AssertionError(f"worker {rank} failed:\n{value}")
            results[rank] = value
        for p in procs:
            p.join(timeout=30)
            assert p.exitcode == 0, f"worker exited with {p.exitcode}"
        return [results[r] for r in range(world)]
    finally:
        for p in procs:  # never leave a worker behind
            if p.is_alive():
                p.kill()
