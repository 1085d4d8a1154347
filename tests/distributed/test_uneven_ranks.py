"""Distributed QAT with uneven local batches (gloo, 2 CPU processes): an empty local batch
still joins the synced observers' all-reduce; a local batch of 1 trains under a synchronised
BatchNorm; bad process groups are refused up front."""
from __future__ import annotations

import pytest
import torch

import gpuquant
from gpuquant import distributed as gdist
from gpuquant import nn as gnn
from gpuquant.quantization import (SyncExponentialMovingAverageObserver, SyncMinMaxObserver,
                                   quantize_qat, sync_ema_fakequant_qconfig)
from tests.distributed.dist_launch import run


def _empty_worker(rank, world):
    obs = SyncExponentialMovingAverageObserver(0.9, axis=None)
    pc = SyncMinMaxObserver(axis=1)
    batches = [torch.tensor([-5.0, 5.0]), torch.tensor([-2.0, 2.0])]
    for step, b in enumerate(batches):
        x = torch.empty(0) if (rank == 1 and step == 0) else b * (rank + 1)
        obs(x)
        pc(x.reshape(-1, 1).expand(-1, 3) if x.numel() else torch.empty(0, 3))
    return [obs.min_val.item(), obs.max_val.item(), pc.min_val.tolist(), pc.max_val.tolist()]


def test_empty_local_batch_joins_the_all_reduce():
    """Rank 1's first batch is empty: both ranks record the global batches, in step."""
    r0, r1 = run(_empty_worker, 2)
    assert r0 == r1
    # step 0: rank 0's [-5, 5] alone; step 1: [-2, 2] and [-4, 4] -> [-4, 4]; EMA 0.9
    assert r0[0] == pytest.approx(-5 + 0.1 * (-4 + 5)) and r0[1] == pytest.approx(4.9)
    assert r0[2] == [-5.0] * 3 and r0[3] == [5.0] * 3  # min / max over both steps


def _batch_one_worker(rank, world):
    torch.manual_seed(0)
    m = quantize_qat(gnn.LinearBnRelu1d(8, 4), sync_ema_fakequant_qconfig).train()
    gdist.convert_sync_batchnorm(m)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(5, 8, generator=g)
    local = x[:4] if rank == 0 else x[4:]
    m(local).sum().backward()
    return m.bn.running_mean.tolist()


def test_local_batch_of_one_under_synchronised_batchnorm():
    r0, r1 = run(_batch_one_worker, 2)
    assert r0 == r1


def test_bad_process_groups_are_refused():
    m = quantize_qat(gnn.LinearBn1d(8, 4), sync_ema_fakequant_qconfig)
    with pytest.raises(TypeError, match="process group must be None"):
        gdist.convert_sync_batchnorm(m, process_group="world")
    with pytest.raises(TypeError, match="SyncMinMaxObserver: the process group"):
        SyncMinMaxObserver(group=3)
    with pytest.raises(TypeError, match="SyncExponentialMovingAverageObserver"):
        SyncExponentialMovingAverageObserver(group=object())


def _tiny_global_batch_worker(rank, world):
    torch.manual_seed(0)
    out = []
    for momentum in (0.1, None):
        m = quantize_qat(gnn.ConvBnRelu2d(2, 3, 1), sync_ema_fakequant_qconfig)
        m.bn.momentum = momentum
        m = gdist.convert_sync_batchnorm(m).train()
        with torch.no_grad():
            m(torch.randn(4, 2, 3, 3))  # a healthy step
        before = (m.bn.running_mean.clone(), m.bn.running_var.clone(),
                  int(m.bn.num_batches_tracked))
        with torch.no_grad():
            m(torch.randn([1, 0][rank], 2, 1, 1))  # global batch: 1 value per channel
            m(torch.randn(0, 2, 1, 1))             # global batch: none
        after = (m.bn.running_mean, m.bn.running_var, int(m.bn.num_batches_tracked))
        out.append(torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
                   and before[2] == after[2] == 1)
    return out


def test_global_batch_of_one_value_leaves_running_statistics_unchanged():
    """A synchronised step whose global batch has < 2 values per channel (no rank can see
    it locally) leaves running mean / var and num_batches_tracked as they were, on every
    rank (they became NaN: 0 * inf, 0 / 0), without a host read."""
    assert run(_tiny_global_batch_worker, 2) == [[True, True], [True, True]]


def _explicit_group_worker(rank, world):
    import copy
    import functools
    import io

    import torch.distributed as dist

    from gpuquant.models import digits_net
    from gpuquant.quantization import QConfig, disable_observer, quantize
    g = dist.new_group([0, 1])
    base = sync_ema_fakequant_qconfig
    qc = QConfig(weight_observer=base.weight_observer, weight_fake_quant=base.weight_fake_quant,
                 act_observer=functools.partial(SyncExponentialMovingAverageObserver, 0.9,
                                                group=g),
                 act_fake_quant=base.act_fake_quant)
    m = gdist.convert_sync_batchnorm(quantize_qat(digits_net(), qc), process_group=g)
    with torch.no_grad():
        m(torch.randn(4, 1, 8, 8))
    twin = copy.deepcopy(m)  # shares the group: it still all-reduces over it
    with torch.no_grad():
        twin(torch.randn(4, 1, 8, 8) * (rank + 1))
    same_group = all(o.group is g for o in twin.modules()
                     if isinstance(o, SyncExponentialMovingAverageObserver))
    disable_observer(m)
    q = quantize(m.eval(), inplace=False)  # the documented conversion step
    try:
        torch.save(m, io.BytesIO())
        saved = "saved"
    except TypeError as e:
        saved = str(e)
    return same_group, type(q).__name__, twin.fc2.act_observer.max_val.item(), saved


def test_models_with_an_explicit_process_group_copy_and_convert():
    """quantize(..., inplace=False) and deepcopy of a model whose synced observers and
    BatchNorms hold an explicit process group (a ProcessGroup cannot be copied): the copy
    shares the group; pickling the whole module says to save its state_dict."""
    r0, r1 = run(_explicit_group_worker, 2)
    assert r0[0] and r1[0] and r0[1] == r1[1] == "DigitsNet"
    assert r0[2] == r1[2]  # the copies all-reduced together
    assert "save model.state_dict() instead" in r0[3]
