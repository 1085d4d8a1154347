"""save_checkpoint under torch.distributed when rank 0 cannot write the file: every process
raises at once (rank 0 the original error, the others a RuntimeError naming the file), and
the processes stay in step for their next collective, instead of the others waiting in a
barrier rank 0 never reaches until the collective timeout."""
from __future__ import annotations

import os
import time

import pytest
import torch

from gpuquant import distributed as gdist

import dist_launch


def _save_into_missing_folder(rank, world, folder, explicit_group):
    import torch.distributed as dist
    # an explicit group of global ranks 1 and 2: its rank 0 (the writer) is global rank 1
    group = dist.new_group([1, 2]) if explicit_group else None
    if explicit_group and rank == 0:
        return None
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    model = torch.nn.Linear(3, 2)
    path = os.path.join(folder, "no_such_folder", "ckpt.pt")
    t0 = time.monotonic()
    try:
        gdist.save_checkpoint(path, model, step=1, group=group)
        outcome = ("returned", "")
    except Exception as e:
        outcome = (type(e).__name__, str(e))
    waited = time.monotonic() - t0
    x = torch.tensor([float(gdist.rank(group) + 1)])
    dist.all_reduce(x, group=group)  # the collectives are still paired up
    # and a good path still works afterwards
    good = os.path.join(folder, "ckpt.pt")
    gdist.save_checkpoint(good, model, step=2, group=group)
    return outcome, waited, float(x), os.path.isfile(good)


@pytest.mark.parametrize("explicit_group", [False, True])
def test_failed_write_on_rank_0_raises_on_every_rank(tmp_path, explicit_group):
    results = dist_launch.run(_save_into_missing_folder, 3 if explicit_group else 2,
                              (str(tmp_path), explicit_group))
    if explicit_group:  # the group's rank 0 (the writer) is global rank 1
        results = results[1:]
    (kind0, msg0), _, sum0, ok0 = results[0]
    (kind1, msg1), waited1, sum1, ok1 = results[1]
    assert kind0 != "returned" and "no_such_folder" in msg0
    assert kind1 == "RuntimeError" and "could not write" in msg1 and "no_such_folder" in msg1
    assert waited1 < dist_launch.COLLECTIVE_TIMEOUT_S / 3
    assert sum0 == sum1 == 3.0
    assert ok0 and ok1
    assert not any(n.startswith("ckpt.pt.tmp") for n in os.listdir(tmp_path))
