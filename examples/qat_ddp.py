"""Distributed quantization-aware training with torchrun: gpuquant's digits network on
scikit-learn's 8x8 digits, DistributedDataParallel, synced observers and BatchNorm,
checkpoint / resume, int8 conversion at the end.

One machine, 4 GPUs (NCCL)::

    torchrun --standalone --nproc-per-node 4 examples/qat_ddp.py --epochs 8 --ckpt /tmp/qat.pt

Two machines with 8 GPUs each (run on both; node 0's address as the rendezvous)::

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \\
        --rdzv-endpoint node0.example.com:29500 --rdzv-id qat-digits \\
        examples/qat_ddp.py --epochs 8 --ckpt /shared/qat.pt

CPU only (gloo), e.g. to try it on a laptop::

    torchrun --standalone --nproc-per-node 2 examples/qat_ddp.py --epochs 3

Resume after an interruption: run the same command with ``--resume`` (same number of
processes: every process's RNG state is restored). Without torchrun it runs as one process.
Docs: docs/DISTRIBUTED.md.
"""
from __future__ import annotations

import argparse
import datetime
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import gpuquant
from gpuquant import distributed as gdist
from gpuquant.demo import load_digits_data
from gpuquant.models import digits_net
from gpuquant.quantization import (disable_observer, lsq_qconfig, quantize, quantize_qat,
                                   sync_ema_fakequant_qconfig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--qconfig", choices=["sync_ema", "lsq"], default="sync_ema")
    p.add_argument("--freeze-at", type=int, default=None,
                   help="epoch from which BN statistics and activation ranges are frozen "
                        "(default: the last epoch)")
    p.add_argument("--ckpt", default=None, help="checkpoint file, written after every epoch")
    p.add_argument("--resume", action="store_true", help="continue from --ckpt")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.resume and not args.ckpt:
        p.error("--resume needs --ckpt (the checkpoint file the interrupted run wrote)")
    return args


def setup():
    """Join the process group torchrun describes (env RANK / WORLD_SIZE / LOCAL_RANK);
    a single process without torchrun. Returns (device, whether this call created the
    group)."""
    if dist.is_available() and dist.is_initialized():  # called from a launcher of its own
        return torch.device("cpu") if dist.get_backend() == "gloo" else \
            torch.device("cuda", torch.cuda.current_device()), False
    if "RANK" in os.environ:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
        return (torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu"),
                True)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu"), False


def log(*a):
    if gdist.rank() == 0:
        print(*a, flush=True)


@torch.no_grad()
def accuracy(model, x, y, bs=512):
    model.eval()
    hits = sum(int((model(x[i:i + bs]).argmax(1) == y[i:i + bs]).sum())
               for i in range(0, len(y), bs))
    return hits / len(y)


def freeze(model):
    """The usual end of QAT: BatchNorm statistics and activation ranges fixed."""
    for m in model.modules():
        if hasattr(m, "freeze_bn_stats"):
            m.freeze_bn_stats()
    disable_observer(model)


def main(argv=None):
    args = parse_args(argv)
    device, own_group = setup()
    world, rank = gdist.world_size(), gdist.rank()
    # same initial weights everywhere (DDP also broadcasts rank 0's), different data order
    torch.manual_seed(args.seed)
    x_tr, y_tr, x_te, y_te = load_digits_data()
    train = TensorDataset(x_tr, y_tr)
    sampler = DistributedSampler(train, world, rank, shuffle=True, seed=args.seed) \
        if world > 1 else None
    loader = DataLoader(train, batch_size=args.batch_size, sampler=sampler,
                        shuffle=sampler is None, drop_last=True)  # no 1-sample BN batches

    # 1. float model -> QAT model; synced BatchNorm statistics in the fused ConvBn modules
    qconfig = sync_ema_fakequant_qconfig if args.qconfig == "sync_ema" else lsq_qconfig
    model = quantize_qat(digits_net(), qconfig)
    model = gdist.convert_sync_batchnorm(model).to(device).train()
    # Adam creates its state at the first step, after the shapes are final (below)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)

    start_epoch, step = 0, 0
    if args.resume:
        # 2a. resume: model (observers, switches, learned scales), optimizer, RNG states
        ck = gdist.load_checkpoint(args.ckpt, model, optimizer, map_location=device)
        start_epoch, step = ck["extra"]["epoch"] + 1, ck["step"]
        log(f"resumed from {args.ckpt} after epoch {ck['extra']['epoch']}")
    else:
        # 2b. one calibration batch before DDP: sizes per-channel observer state and
        # initialises LSQ scales; DDP then broadcasts rank 0's state to everyone
        xb, _ = next(iter(loader))
        with torch.no_grad():
            model(xb.to(device))
    gdist.check_ready_for_ddp(model)
    net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else model

    freeze_at = args.epochs - 1 if args.freeze_at is None else args.freeze_at
    for epoch in range(start_epoch, args.epochs):
        if epoch == freeze_at:
            freeze(model)
        if sampler is not None:
            sampler.set_epoch(epoch)
        model.train()
        t0, total, n = time.time(), 0.0, 0
        for xb, yb in loader:
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            loss = F.cross_entropy(net(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach() * len(yb)
            n += len(yb)
            step += 1
        if world > 1:
            stats = torch.stack([total, torch.tensor(float(n), device=device)])
            dist.all_reduce(stats)
            total, n = stats[0], stats[1]
        act = model.conv2.get_activation_qparams()
        log(f"epoch {epoch}: loss {float(total / n):.4f}  conv2 act scale {float(act.scale):.5f} "
            f"(the same in all {world} processes)  {time.time() - t0:.1f}s")
        if args.ckpt:
            gdist.save_checkpoint(args.ckpt, net, optimizer, step=step, extra={"epoch": epoch})

    # 3. evaluate the QAT model and its int8 conversion (every rank holds the same model).
    # Sync observers are collectives (they record in eval mode too): a forward pass on one
    # rank alone would wait for the others forever, so switch them off first.
    disable_observer(model)
    result = None
    if rank == 0:
        x_te, y_te = x_te.to(device), y_te.to(device)
        qat_acc = accuracy(model, x_te, y_te)
        int8 = quantize(model.cpu(), inplace=False)
        int8_acc = accuracy(int8, x_te.cpu(), y_te.cpu())
        print(f"QAT top-1 {qat_acc:.4f}   int8 top-1 {int8_acc:.4f}   ({world} processes, "
              f"gpuquant {gpuquant.__version__})", flush=True)
        result = {"qat_top1": qat_acc, "int8_top1": int8_acc, "world_size": world}
    if world > 1:
        dist.barrier()
    if own_group:
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
