"""examples/qat_ddp.py (the script of the torchrun example in docs/DISTRIBUTED.md) in 2 gloo
processes: it trains, converts to int8, and an interrupted run resumed from its checkpoint
ends bit-identical to an uninterrupted one."""
from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch

from tests.distributed.dist_launch import run

pytest.importorskip("sklearn")  # the digits data set

_PATH = pathlib.Path(__file__).resolve().parents[2] / "examples" / "qat_ddp.py"


def _example():
    spec = importlib.util.spec_from_file_location("qat_ddp_example", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _main(rank, world, argv):
    return _example().main(argv)


def test_example_trains_converts_and_resumes_bit_identically(tmp_path):
    full, part = str(tmp_path / "full.pt"), str(tmp_path / "part.pt")
    common = ["--freeze-at", "1", "--batch-size", "64"]
    res = run(_main, 2, args=(["--epochs", "2", "--ckpt", full] + common,))
    assert res[1] is None and res[0]["world_size"] == 2
    assert res[0]["qat_top1"] > 0.5 and abs(res[0]["int8_top1"] - res[0]["qat_top1"]) < 0.05
    run(_main, 2, args=(["--epochs", "1", "--ckpt", part] + common,))            # interrupted
    run(_main, 2, args=(["--epochs", "2", "--ckpt", part, "--resume"] + common,))  # resumed
    a, b = (torch.load(p, weights_only=False) for p in (full, part))
    assert a["step"] == b["step"] and a["extra"] == b["extra"] == {"epoch": 1}
    for k, v in a["model"].items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, b["model"][k]), k
        else:
            assert v == b["model"][k], k  # switches (extra state)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_example_resume_without_a_checkpoint_is_a_usage_error(capsys):
    """docs/DISTRIBUTED.md: 'run the same command with --resume'; the CPU command has no
    --ckpt, so that must say what is missing, not fail in load_checkpoint(None)."""
    with pytest.raises(SystemExit) as e:
        _example().parse_args(["--epochs", "3", "--resume"])
    assert e.value.code == 2 and "--resume needs --ckpt" in capsys.readouterr().err
