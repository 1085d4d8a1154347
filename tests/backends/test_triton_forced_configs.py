"""Every form the GPU autotuner may pick gives the oracle's bytes on the GPU.

On the GPU the autotuner runs the form it timed fastest, so a test of an op checks one form
per shape; the interpreter runs each form (``INTERPRET_*`` flags) but compiles none. Here
each form is forced on the device (the autotuner offered only that config,
:func:`forced`): the conv kernel's tap-loop forms (taps unrolled, pipelined, pipelined with
its tiles copied through L1) and split epilogue, the GEMM's persistent tile loop with few
programs for many tiles, in every output mode. The forcing itself is checked on the CPU
with the stand-in CUDA driver (the config in force, the persistent grid)."""
from __future__ import annotations

import contextlib

import pytest
import torch

from _triton_inference_util import (check_linear_add_and_dequant, check_op, cpu, dev,
                                    rand_act, rand_requant, rand_weight)
from gpuquant import qint8, quint8
from gpuquant.functional.requant import make_add_params

CL = torch.channels_last


@contextlib.contextmanager
def forced(module, config, programs_per_sm=None):
    """Within: ``module``'s (``gemm`` or ``conv``) autotuned kernel offers only ``config``
    (built anew for the block, the launch plans cleared around it); with
    ``programs_per_sm`` the GEMM's persistent grid is sized for that many
    multiprocessors."""
    from gpuquant.backends.triton import launch
    prune = "prune_gemm_configs" if module.__name__.endswith("gemm") else "prune_conv_configs"
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(module, "_TUNED", {})
        mp.setattr(module, prune, lambda configs, named_args, family=None, **kw: [config])
        if programs_per_sm is not None:
            from gpuquant.backends.triton import gemm
            mp.setattr(gemm, "sm_count", lambda *a: programs_per_sm)
        launch.clear_plans()
        yield
    finally:
        mp.undo()
        launch.clear_plans()


def _config(**kw):
    import triton
    nw, ns = kw.pop("num_warps"), kw.pop("num_stages")
    return triton.Config({"GROUP_M": 8, **kw}, num_warps=nw, num_stages=ns)


CONV_FORMS = {  # (tile, PIPE_TAPS, L1_CACHE, EPI_SPLIT)
    "unrolled": dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4,
                     PIPE_TAPS=False, L1_CACHE=False, EPI_SPLIT=1),
    "pipelined": dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4,
                      PIPE_TAPS=True, L1_CACHE=False, EPI_SPLIT=1),
    "pipelined_l1": dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4,
                         PIPE_TAPS=True, L1_CACHE=True, EPI_SPLIT=1),
    "pipelined_l1_split": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=4,
                               num_stages=3, PIPE_TAPS=True, L1_CACHE=True, EPI_SPLIT=2),
}


@pytest.mark.gpu
@pytest.mark.parametrize("form", list(CONV_FORMS))
def test_conv_forms_on_the_gpu(form):
    from gpuquant.backends.triton import conv
    torch.manual_seed(1)
    x = rand_act((3, 96, 15, 13), torch.int8).contiguous(memory_format=CL)  # 2 channel blocks
    w = rand_weight((80, 96, 3, 3))
    b = torch.randint(-5000, 5000, (80,), dtype=torch.int32)
    rq = rand_requant(80, quint8, "relu", k=96 * 9, big=True)
    with forced(conv, _config(**CONV_FORMS[form])):
        for stride, pad, zp in (((1, 1), (1, 1), 0), ((2, 1), (1, 2), 5)):
            check_op("conv2d", (x, zp, w, b, stride, pad, (1, 1), 1, rq),
                     f"conv {form} stride={stride} zp={zp}")


@pytest.mark.gpu
@pytest.mark.parametrize("persistent", [0, 2])
def test_gemm_tile_loops_on_the_gpu(persistent):
    """One program a tile, and the persistent loop with 2 x 3 programs for 8 x 4 tiles."""
    from gpuquant.backends import get_backend
    from gpuquant.backends.triton import gemm
    torch.manual_seed(2)
    m, k, n = 1000, 256, 200
    x = rand_act((m, k), torch.int8)
    w = rand_weight((n, k))
    b = torch.randint(-999, 999, (n,), dtype=torch.int32)
    rq = rand_requant(n, qint8, "relu6", k=k, big=True)
    res = rand_act((m, n), torch.int8)
    p = make_add_params(0.04, rq.zero_point, 0.05, 3, 0.06, -2, qint8)
    cfg = _config(BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3,
                  EPI_SPLIT=1, PERSISTENT=persistent)
    with forced(gemm, cfg, programs_per_sm=3):
        check_op("linear", (x, -3, w, b, rq), f"gemm persistent={persistent}")
        check_linear_add_and_dequant(x, -3, w, b, rq, res, p, torch.tensor(0.03),
                                     f"gemm persistent={persistent}")
        xs = torch.rand(m) * 0.1 + 0.01
        ws = torch.rand(n) * 0.1 + 0.01
        fb = torch.randn(n)
        got_dyn = get_backend("triton").OPS["linear_dynamic"](*dev((x, xs, w, ws, fb)),
                                                              torch.bfloat16)
    want_dyn = get_backend("numpy").OPS["linear_dynamic"](x, xs, w, ws, fb, torch.bfloat16)
    assert torch.equal(cpu(got_dyn), want_dyn)


_STANDIN_SCRIPT = r"""
import json, sys
sys.path.insert(0, "tests/backends")
import torch
from gpuquant import backends, qint8
from gpuquant.backends.triton import conv, gemm
from gpuquant.backends.triton.standin import standin_cuda
out = {}
with standin_cuda() as fk, backends.use("triton"):
    # (imported here: the test helpers need the triton backend, which loads here without a
    # GPU only inside the stand-in)
    from test_triton_forced_configs import CONV_FORMS, _config, forced
    from _triton_inference_util import rand_act, rand_requant, rand_weight
    ops = backends.get_backend("triton").OPS
    x = rand_act((1, 96, 9, 9), torch.int8).contiguous(memory_format=torch.channels_last)
    w = rand_weight((64, 96, 3, 3))
    rq = rand_requant(64, qint8, k=96 * 9)
    for form in ("unrolled", "pipelined_l1_split"):  # (each a 3x3 compile: two suffice)
        with forced(conv, _config(**CONV_FORMS[form])):
            ops["conv2d"](x, 0, w, None, (1, 1), (1, 1), (1, 1), 1, rq)
            cfg = conv._conv_kernel("sm90").best_config.kwargs
            out[form] = [cfg["PIPE_TAPS"], cfg["L1_CACHE"], cfg["EPI_SPLIT"]]
    xg, wg = rand_act((1000, 256), torch.int8), rand_weight((200, 256))
    rg = rand_requant(200, qint8, k=256)
    for pers in (0, 2):
        cfg = _config(BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3,
                      EPI_SPLIT=1, PERSISTENT=pers)
        with forced(gemm, cfg, programs_per_sm=3):
            fk.launches.clear()
            ops["linear"](xg, 0, wg, None, rg)
            out[f"gemm{pers}"] = [g for k, g, _ in fk.launches if k == "_qgemm_kernel"]
    # the real prune is back afterwards
    out["restored"] = gemm.prune_gemm_configs.__name__
print("JSON" + json.dumps(out))
"""


def test_forcing_on_the_stand_in_driver(tmp_path):
    """The forcing the GPU tests rely on, on the CPU: the conv config in force is the one
    offered; the persistent GEMM launches PERSISTENT x SMs programs (6 for 32 tiles), the
    one-a-tile GEMM a program a tile; the real pruning is back afterwards."""
    from tests.compiled import run_json
    out = run_json(_STANDIN_SCRIPT, tmp_path / "triton_cache")
    assert out["unrolled"] == [False, False, 1]
    assert out["pipelined_l1_split"] == [True, True, 2]
    assert out["gemm0"][-1] == [32, 1, 1] and out["gemm2"][-1] == [6, 1, 1]
    assert out["restored"] == "prune_gemm_configs"
