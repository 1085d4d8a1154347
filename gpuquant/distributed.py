"""Distributed QAT on ``torch.distributed``: what DDP needs from a QAT model, BatchNorm
statistics across processes, and checkpoint / resume.

gpuquant runs on PyTorch's own engine (``torchrun``, NCCL on GPUs, gloo on CPUs,
``DistributedDataParallel``); this module only adds what quantization needs on top
(docs/DISTRIBUTED.md has the worked example and the reasoning):

* **Activation ranges.** Use :data:`gpuquant.quantization.sync_ema_fakequant_qconfig` (or any
  QConfig whose activation observers are ``Sync*``): each observation all-reduces the batch
  min / max, so every process holds the same qparams, equal to those of one process that
  sees the whole global batch. Plain observers see only their process's shard.
* **BatchNorm.** The fused QAT ``ConvBn*`` / ``LinearBn*`` modules compute the batch
  statistics themselves (to fold BN into the quantized weight), so they do not call their
  ``bn`` submodule's forward. :func:`convert_sync_batchnorm` (CPU and GPU; or torch's
  ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``, GPU only under DDP) makes them reduce
  mean and variance over the process group with :func:`batch_mean_var` (differentiable
  all-reduces), so training equals one process with the global batch. Without it each
  process normalises with its own shard (as plain DDP + BatchNorm does).
* **Lazy state.** Per-channel observer buffers and LSQ / TQT scales take their size and first
  value on the first forward pass. Run one forward pass (a calibration batch) *before*
  wrapping in DDP: DDP then broadcasts rank 0's parameters and buffers, so every process
  starts identical and DDP's gradient buckets see the final shapes.
  :func:`check_ready_for_ddp` says whether a model is there.
* **Checkpoints.** ``model.state_dict()`` holds everything of a QAT model: weights, learned
  LSQ / TQT scales, observer ranges, the observer / fake-quant enabled switches and
  ``bn_frozen`` (extra state). :func:`save_checkpoint` / :func:`load_checkpoint` add the
  optimizer, a step counter and every process's RNG states, so resuming gives the same next
  step as an uninterrupted run (bit-identical on CPU; tested).
"""
from __future__ import annotations

import os
import random
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["check_group", "convert_sync_batchnorm", "batch_mean_var", "syncs_batch_stats", "check_ready_for_ddp",
           "save_checkpoint", "load_checkpoint", "unwrap", "world_size", "rank"]

_CHECKPOINT_FORMAT = "gpuquant-qat-checkpoint-1"


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size(group=None) -> int:
    """Processes in ``group`` (default group), 1 when torch.distributed is not initialised.

    Raises:
        TypeError: ``group`` neither None nor a process group (:func:`check_group`).
    """
    check_group(group, "world_size")
    return dist.get_world_size(group) if _initialized() else 1


def rank(group=None) -> int:
    """This process's rank in ``group`` (default group), 0 when not initialised.

    Raises:
        TypeError: ``group`` neither None nor a process group (:func:`check_group`).
    """
    check_group(group, "rank")
    return dist.get_rank(group) if _initialized() else 0


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper (or the model
    itself).

    Raises:
        TypeError: ``model`` is not a torch.nn.Module.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    while isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        model = model.module
    return model


# --------------------------------------------------------------------------- BatchNorm
def _fused_bn_modules(model):
    from .nn.qat.conv import BnFoldedModule  # ConvBn2d, LinearBn1d
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BnFoldedModule)]


def check_group(group, who: str):
    """``group`` if it is None (the default group), a torch.distributed process group, or
    ``new_group``'s value on a process outside the group it made.

    Raises:
        TypeError: anything else (it would fail only at the first all-reduce, inside torch).
    """
    if group is None:
        return None
    try:
        from torch.distributed import GroupMember, ProcessGroup
    except ImportError:  # pragma: no cover - torch built without distributed
        GroupMember, ProcessGroup = None, ()
    if not isinstance(group, ProcessGroup) and not (
            # new_group()'s value on a process outside the group it made
            GroupMember is not None and type(group) is int
            and group == getattr(GroupMember, "NON_GROUP_MEMBER", None)):
        raise TypeError(f"{who}: the process group must be None (the default group) or a "
                        f"torch.distributed ProcessGroup, got {type(group).__name__} "
                        f"({group!r})")
    return group


class GroupRef:
    """A process group held by a module, shared (not copied) by ``copy.deepcopy``: a
    ``ProcessGroup`` cannot be copied or pickled, and a copy of the model (``quantize(...,
    inplace=False)``) runs in the same processes. Pickling one (``torch.save(model)``) raises
    a TypeError saying to save the ``state_dict`` instead."""
    __slots__ = ("group",)

    def __init__(self, group):
        self.group = group

    def __deepcopy__(self, memo):
        return self

    def __copy__(self):
        return self

    def __reduce__(self):
        if self.group is None:  # the default group: nothing process-specific to keep
            return (GroupRef, (None,))
        raise TypeError("a module holding an explicit torch.distributed process group cannot "
                        "be pickled; save model.state_dict() instead")


def convert_sync_batchnorm(model: torch.nn.Module, process_group=None) -> torch.nn.Module:
    """Make every fused QAT BatchNorm (``ConvBn*`` / ``LinearBn*`` of ``gpuquant.nn.qat``)
    under ``model`` compute its training batch statistics over all processes of
    ``process_group`` (default: the whole world), as ``torch.nn.SyncBatchNorm`` does; returns
    ``model`` (changed in place).

    Works on CPU (gloo) and GPU (NCCL). ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``
    has the same effect on the fused modules but DDP refuses SyncBatchNorm in CPU modules;
    this one marks the fused modules' ``bn`` instead of replacing it, and leaves any other
    BatchNorm alone (convert those with torch's function). Outside torch.distributed, or
    in a group of one, the statistics stay local (bit-identical to no conversion).

    Args:
        model: a QAT model (after ``quantize_qat``).
        process_group: a torch.distributed process group, or None for the default one.

    Raises:
        TypeError: ``model`` is not a module; ``process_group`` not None or a process group.
        ValueError: ``model`` has no fused QAT BatchNorm module.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_group(process_group, "convert_sync_batchnorm")
    mods = _fused_bn_modules(unwrap(model))
    if not mods:
        raise ValueError("convert_sync_batchnorm: no fused QAT BatchNorm module (gpuquant.nn.qat "
                         "ConvBn* / LinearBn*) in the model; call it after quantize_qat")
    for _, m in mods:
        m.bn.gpuquant_sync_stats = True
        m.bn.gpuquant_sync_group = GroupRef(process_group)
    return model


def _sync_group(bn):
    """The process group to reduce ``bn``'s batch statistics over, or None for local ones."""
    if isinstance(bn, torch.nn.SyncBatchNorm):
        group = bn.process_group
    elif getattr(bn, "__dict__", {}).get("gpuquant_sync_stats", False):  # plain attributes
        ref = bn.__dict__.get("gpuquant_sync_group")  # (no Module.__getattr__ miss a call)
        group = ref.group if isinstance(ref, GroupRef) else ref
    else:
        return None
    if not _initialized():
        return None
    group = group if group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def syncs_batch_stats(bn) -> bool:
    """Whether a fused QAT module with BatchNorm ``bn`` normalises over the global batch
    (a synchronised BatchNorm under torch.distributed with more than one process)."""
    return _sync_group(bn) is not None


class _AllReduceSum(torch.autograd.Function):
    """Differentiable SUM all-reduce: the gradient of every input is the sum of the output
    gradients of all processes (what ``torch.distributed.nn.functional.all_reduce`` does;
    written out because that function is deprecated in recent torch)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x

    @staticmethod
    def backward(ctx, dy):
        return _AllReduceSum.apply(dy, ctx.group), None


def batch_mean_var(y: torch.Tensor, dims: Sequence[int], bn: torch.nn.Module):
    """Batch mean and biased variance of ``y`` over ``dims`` for a fused QAT BatchNorm, and
    the number of values per channel they cover.

    When ``bn`` was marked by :func:`convert_sync_batchnorm` (or is a
    ``torch.nn.SyncBatchNorm``) and torch.distributed runs with more than one process in its
    group, the statistics are those of the global batch: two differentiable
    all-reduces (SUM, differentiable), the per-channel sums with
    the element count, then the squared deviations from the global mean (two passes, as
    accurate as the local ``var``). Gradients flow through them as through SyncBatchNorm's.
    Otherwise ``y.mean(dims)``, ``y.var(dims, unbiased=False)`` exactly (so a single process
    is bit-identical with or without the conversion).

    Args:
        y: the float convolution / linear output, channels along dim 1 (or the last dim for
            2-D input).
        dims: the reduced dimensions (all but the channel one).
        bn: the module's ``bn`` (``BatchNorm*d`` or ``SyncBatchNorm``).

    Returns:
        ``(mean, var, n)``: ``mean`` / ``var`` of shape ``(C,)`` in ``y.dtype``; ``n`` the
        count per channel (an int locally, a 0-d float32 tensor when synchronised: no host
        read).
    """
    dims = tuple(dims)
    n_local = 1
    for d in dims:
        n_local *= y.shape[d]
    group = _sync_group(bn)
    if group is None:
        return y.mean(dim=dims), y.var(dim=dims, unbiased=False), n_local
    yf = y.float()
    count = torch.full((1,), float(n_local), dtype=torch.float32, device=y.device)
    sums = _AllReduceSum.apply(torch.cat([yf.sum(dim=dims), count]), group)
    n = sums[-1]
    mean = sums[:-1] / n
    shape = [1] * y.dim()
    shape[[d for d in range(y.dim()) if d not in dims][0]] = -1
    dev = yf - mean.reshape(shape)
    var = _AllReduceSum.apply((dev * dev).sum(dim=dims), group) / n
    return mean.to(y.dtype), var.to(y.dtype), n.detach()


# --------------------------------------------------------------------------- DDP readiness
def check_ready_for_ddp(model: torch.nn.Module) -> None:
    """Raise unless every lazily-created piece of QAT state has its final shape and value, i.e.
    the model ran one forward pass: then wrapping it in ``DistributedDataParallel`` broadcasts
    rank 0's state to every process and DDP's gradient buckets see the final parameter
    shapes. (Wrapping earlier makes LSQ / TQT scales initialise per process after the
    broadcast, from each process's own data, and per-channel ones change shape under DDP.)

    Raises:
        TypeError: not a module.
        ValueError: names the modules still waiting for their first forward pass.
    """
    from .quantization.fake_quant import _LearnedBase
    from .quantization.observer import Observer
    model = unwrap(model)
    waiting: List[str] = []
    # a disabled module is still lazy: enabling it after the wrap (fake quant off for the
    # calibration / warm-up steps, on later) sizes and initialises it per process then, and a
    # per-channel LSQ / TQT parameter changing shape under DDP fails the first backward
    for name, m in model.named_modules():
        if isinstance(m, _LearnedBase) and not bool(m.initialized):
            waiting.append(f"{name} ({type(m).__name__}: scale not initialised"
                           f"{'' if m.enabled else '; it is disabled: enable it for the pass or call set_qparams'})")
        elif isinstance(m, Observer) and getattr(m, "axis", None) is not None:
            mv = getattr(m, "min_val", None)
            if isinstance(mv, torch.Tensor) and mv.numel() == 0:
                waiting.append(f"{name} ({type(m).__name__}: per-channel state not sized)")
    if waiting:
        raise ValueError("run one forward pass (e.g. a calibration batch) before wrapping the "
                         "QAT model in DistributedDataParallel; still lazy: "
                         + ", ".join(waiting[:8]) + (" ..." if len(waiting) > 8 else ""))


# --------------------------------------------------------------------------- checkpoints
def _rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # the current device's generator
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())  # map_location may have moved it
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


def save_checkpoint(path, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    step: Optional[int] = None, extra: Optional[dict] = None, group=None) -> None:
    """Write a QAT checkpoint: model state (observers, switches, learned scales included),
    optimizer state, ``step``, ``extra`` and the RNG states (torch CPU, CUDA of the current
    device, Python, NumPy) of *every* process.

    Distributed: a collective, every process of ``group`` calls it; the RNG states are
    gathered to rank 0, which alone writes the file (atomically: a temporary file, then
    rename) and all processes return after it is written. Model and optimizer state are
    rank 0's (DDP keeps them identical). Not for FSDP-sharded models (see DISTRIBUTED.md).
    When rank 0 cannot write the file, every process raises (rank 0 the original error, the
    others a RuntimeError quoting it), so the processes stay in step.

    Args:
        path: file to write (str or os.PathLike).
        model: the QAT model, plain or DDP-wrapped.
        optimizer: saved when given.
        step: the number of steps done (returned by :func:`load_checkpoint`).
        extra: any picklable dict (scheduler, sampler epoch, ...).
        group: process group (default group).

    Raises:
        TypeError: bad argument types.
        NotImplementedError: an FSDP2-sharded model (use torch.distributed.checkpoint).
        RuntimeError / OSError: rank 0 could not write the file (on the other processes: a
            RuntimeError naming the file and rank 0's error).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got "
                        f"{type(optimizer).__name__}")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
        raise TypeError(f"step must be an int or None, got {type(step).__name__}")
    if extra is not None and not isinstance(extra, dict):
        raise TypeError(f"extra must be a dict or None, got {type(extra).__name__}")
    check_group(group, "save_checkpoint")
    module = unwrap(model)
    if any(type(p).__name__ == "DTensor" for p in module.parameters()):
        raise NotImplementedError("save_checkpoint: the model's parameters are sharded "
                                  "(FSDP2 fully_shard DTensors); save it with "
                                  "torch.distributed.checkpoint (DCP) instead, plus the RNG "
                                  "states (docs/DISTRIBUTED.md)")
    rngs = [_rng_state()]
    if world_size(group) > 1:
        rngs = [None] * world_size(group)
        dist.all_gather_object(rngs, _rng_state(), group=group)
    distributed = world_size(group) > 1
    error = None
    if rank(group) == 0:
        ckpt = {"format": _CHECKPOINT_FORMAT, "model": module.state_dict(),
                "optimizer": optimizer.state_dict() if optimizer is not None else None,
                "step": step, "extra": extra, "rng": rngs, "world_size": len(rngs)}
        tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
        try:
            torch.save(ckpt, tmp)
            os.replace(tmp, path)
        except Exception as e:  # (a missing folder, a full disk, no permission)
            if os.path.exists(tmp):
                os.remove(tmp)
            if not distributed:
                raise
            error = e
    if distributed:
        # rank 0's outcome reaches every process (and, as a barrier would, they return only
        # after the file is written): a failed write raises everywhere at once, instead of
        # the others waiting in a barrier rank 0 never reaches until the collective timeout
        status = [None if error is None else f"{type(error).__name__}: {error}"]
        src = 0 if group is None else dist.get_global_rank(group, 0)
        dist.broadcast_object_list(status, src=src, group=group)
        if error is not None:
            raise error
        if status[0] is not None:
            raise RuntimeError(f"save_checkpoint: rank 0 of the group could not write "
                               f"{os.fspath(path)!r} ({status[0]}); no checkpoint was written")


def load_checkpoint(path, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    restore_rng: bool = True, map_location="cpu", strict: bool = True,
                    group=None) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` into ``model`` (and
    ``optimizer``), and restore this process's RNG states.

    Every process reads the file (a shared file system, or a copy on each node). Load
    *before* wrapping in DDP (or into the same shapes afterwards); build the optimizer over
    the model's parameters first: per-channel parameters take their shapes from the file.

    Args:
        path: the file.
        model: the QAT model built as for the run that saved (plain or DDP-wrapped).
        optimizer: its state is loaded when given (the file must hold one).
        restore_rng: restore this process's RNG states (needs the same world size, and
            this process in ``group``).
        map_location: as ``torch.load`` (e.g. ``"cpu"`` or ``f"cuda:{local_rank}"``).
        strict: as ``load_state_dict``.
        group: process group (default group).

    Returns:
        The checkpoint dict (``step``, ``extra``, ...).

    Raises:
        TypeError: arguments of the wrong type (checked before anything is read or loaded).
        ValueError: not a gpuquant checkpoint, no optimizer state in it, or, with
            ``restore_rng``, a different world size or a process outside ``group`` (the
            model and optimizer state are loaded before that check).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"load_checkpoint: optimizer must be a torch.optim.Optimizer or None, "
                        f"got {type(optimizer).__name__}")
    for v, what in ((restore_rng, "restore_rng"), (strict, "strict")):
        if not isinstance(v, int):  # a bool (or 0 / 1, as torch's load_state_dict takes)
            raise TypeError(f"load_checkpoint: {what} must be a bool, got "
                            f"{type(v).__name__} ({v!r})")
    check_group(group, "load_checkpoint")
    # weights_only=False: the RNG states are numpy / Python objects; load only files you trust
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(ckpt, dict) or ckpt.get("format") != _CHECKPOINT_FORMAT:
        raise ValueError(f"{os.fspath(path)!r} is not a gpuquant QAT checkpoint (written by "
                         f"gpuquant.distributed.save_checkpoint)")
    unwrap(model).load_state_dict(ckpt["model"], strict=strict)
    if optimizer is not None:
        if ckpt["optimizer"] is None:
            raise ValueError(f"{os.fspath(path)!r} holds no optimizer state (saved without one)")
        optimizer.load_state_dict(ckpt["optimizer"])
    if restore_rng:
        ws, r = world_size(group), rank(group)
        if r < 0:  # torch's rank (and size) of a group this process is not in: -1
            raise ValueError(f"this process is not in the process group passed to "
                             f"load_checkpoint: the checkpoint holds the RNG states of that "
                             f"group's {ckpt['world_size']} processes, none of them this "
                             f"one's; pass restore_rng=False (its RNG states are then left "
                             f"as they are)")
        if ckpt["world_size"] != ws:
            raise ValueError(f"checkpoint was written by {ckpt['world_size']} processes, this "
                             f"run has {ws}: RNG states cannot be restored one-to-one; pass "
                             f"restore_rng=False")
        _set_rng_state(ckpt["rng"][r])
    return ckpt
