"""The sm_90 Gluon main loop of the int8 GEMM (backends/triton/gemm_sm90.py).

Gluon kernels have no interpreter, so on the CPU: every config compiles for sm_90 (Triton
3.6 and 3.9) with the asynchronous int8 wgmma, TMA copies and one group kept in flight,
without spills or float contraction; the rules that route a GEMM to it; and, on the
stand-in CUDA driver, that the int8 Linear and the W8A8 Linear launch it exactly when they
should, with the grid their tile needs. On an H100 / H200 (``gpu`` marker): each config,
forced, gives the NumPy oracle's bytes for every epilogue form it takes."""
from __future__ import annotations

import pytest
import torch
import triton

from _triton_inference_util import check_calls, sm90
from gpuquant.backends.triton import gemm_sm90
from tests.compiled import run_json


pytestmark = pytest.mark.skipif(not gemm_sm90.AVAILABLE,
                                reason="this Triton has no Gluon Hopper dialect")

_COMPILE_SCRIPT = r"""
import json, os, tempfile
from gpuquant.backends.triton import gemm_sm90 as S
from gpuquant.backends.triton.inspect_ptx import (FLOAT_HAZARD_RE, compile_gluon,
                                                  cubin_resources, wgmma_facts)
out = {}
jobs = [(c, "int32") for c in S.CONFIGS] + [(S.CONFIGS[1], f) for f in S.EPILOGUE_FORMS
                                            if f != "int32"]
for cfg, form in jobs:
    sig, const = S.signature(cfg, form)
    k = compile_gluon(S._qgemm_sm90_kernel, sig, const, 90, cfg[3])
    ptx = k.asm["ptx"]
    out[f"{cfg} {form}"] = {**wgmma_facts(ptx), "shared": k.metadata.shared,
                            "hazards": FLOAT_HAZARD_RE.findall(ptx)}
# spills, through ptxas: the largest epilogues on a one-warpgroup and a two-warpgroup tile
for i, form in [(0, "folded"), (0, "residual")] + [
        (1, f) for f in ("relu_folded", "scaled_bf16", "folded", "general", "residual")]:
    cfg = S.CONFIGS[i]
    sig, const = S.signature(cfg, form)
    k = compile_gluon(S._qgemm_sm90_kernel, sig, const, 90, cfg[3], cubin=True)
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "k.cubin")
        open(p, "wb").write(k.asm["cubin"])
        out[f"res {cfg} {form} split {const['EPI_SPLIT']}"] = \
            cubin_resources(p)["_qgemm_sm90_kernel"]
print("JSON" + json.dumps(out))
"""


def test_every_config_compiles_to_async_int8_wgmma_for_sm90(tmp_path):
    out = run_json(_COMPILE_SCRIPT, tmp_path / "cache", timeout=600)
    from gpuquant.backends.triton import gemm_sm90 as S
    assert len([k for k in out if not k.startswith("res")]) == \
        len(S.CONFIGS) + len(S.EPILOGUE_FORMS) - 1
    assert sum(k.startswith("res") and k.endswith("split 2") for k in out) == 5
    for what, f in out.items():
        if what.startswith("res"):
            # no spills with Triton 3.6's ptxas (12.8), the GPU machines'; 3.9's (12.9) spills
            # a few epilogues 8-168 bytes a thread (the scaled form of the 128 x 256 tiles,
            # the general and residual ones split): the epilogue only, once a tile
            limit = 0 if triton.__version__.startswith("3.6.") else 256
            assert f["LOCAL"] == 0 and f["STACK"] <= limit, (what, f)
            continue
        assert f["mma"] and all(m.endswith(".s32.s8.s8") for m in f["mma"]), (what, f)
        assert 1 in f["waits"], (what, f)  # one wgmma group in flight in the loop
        assert f["tma"], (what, f)
        assert f["shared"] <= 232448, (what, f)  # sm_90's 227 KiB a block
        assert not f["hazards"], (what, f)  # the scaled epilogue's rounding steps stay apart


def test_routing_rules(monkeypatch):
    """Which GEMMs take the Gluon path: on, sm_90, int8 rows 16-byte aligned, at least
    MIN_M rows, K a multiple of 16 (any epilogue: the ones that spill whole run split); the
    switch's errors."""
    from gpuquant.backends.triton import gemm_sm90 as S
    x = torch.zeros(256, 1024, dtype=torch.int8)
    w = torch.zeros(192, 1024, dtype=torch.int8)
    monkeypatch.delenv(S.ENV, raising=False)
    assert not S.enabled() and not S.applies("sm90", x, w)  # off by default
    monkeypatch.setenv(S.ENV, "gluon")
    assert S.enabled() and S.applies("sm90", x, w)
    for fam in ("interpret", "sm80", "sm89", "generic"):
        assert not S.applies(fam, x, w)
    assert not S.applies("sm90", x.to(torch.uint8), w)  # uint8: the Triton kernel's xor
    assert not S.applies("sm90", x[:S.MIN_M - 1], w)
    assert not S.applies("sm90", x[:, :1000], w[:, :1000])  # K % 16 (align_k pads first)
    assert not S.applies("sm90", x.t().contiguous().t(), w)  # columns not contiguous
    shifted = torch.zeros(256 * 1024 + 8, dtype=torch.int8)[8:].view(256, 1024)
    assert not S.applies("sm90", shifted, w)  # rows not 16-byte aligned
    # the split epilogue: the requantizations that spill whole (folded without a ReLU,
    # general, any residual add), not the others
    for out_mode, rq_mode, has_res, split in ((0, 2, False, 2), (0, 0, False, 2),
                                              (1, 2, False, 2), (0, 3, True, 2),
                                              (0, 3, False, 1), (0, 1, False, 1),
                                              (1, 3, False, 1), (2, 1, False, 1),
                                              (3, 0, True, 1)):
        assert S.epi_split(out_mode, rq_mode, has_res) == split
    with S.use(False):
        assert not S.applies("sm90", x, w)
        with S.use(True, config=S.CONFIGS[2]):
            assert S.applies("sm90", x, w)
        assert not S.enabled()
    assert S.enabled()
    monkeypatch.setenv(S.ENV, "cutlass")
    with pytest.raises(ValueError, match="GPUQUANT_SM90_GEMM must be"):
        S.enabled()
    monkeypatch.setenv(S.ENV, "triton")
    assert not S.enabled()
    with pytest.raises(TypeError, match="takes a bool"):
        with S.use("yes"):
            pass
    with pytest.raises(ValueError, match="config must be one of"):
        with S.use(True, config=(64, 64, 64, 4, 2)):
            pass


_STANDIN_SCRIPT = r"""
import json, sys
sys.path.insert(0, "tests/backends")
import torch
from gpuquant import backends, qint8
from gpuquant.backends.triton import gemm_sm90 as S
from gpuquant.backends.triton.standin import standin_cuda
from gpuquant.functional.requant import make_add_params
out = {}
with standin_cuda() as fk, backends.use("triton"):
    from _triton_inference_util import rand_act, rand_requant, rand_weight
    ops = backends.get_backend("triton").OPS
    x, w = rand_act((300, 1040), torch.int8), rand_weight((200, 1040))
    relu = rand_requant(200, qint8, "relu", k=1040)
    plain = rand_requant(200, qint8, "none", k=1040)
    res = rand_act((300, 200), torch.int8)
    p = make_add_params(0.04, relu.zero_point, 0.05, 3, 0.06, -2, qint8)
    xs, ws, fb = torch.rand(300) + 0.01, torch.rand(200) + 0.01, torch.randn(200)

    def run(name, fn):
        fk.launches.clear()
        fn()
        out[name] = [[k, list(g), [a.shape for a in args if hasattr(a, "shape")]]
                     for k, g, args in fk.launches if "gemm" in k]
    for on, cfg in ((False, None), (True, S.CONFIGS[1]), (True, None)):
        with S.use(on, config=cfg):
            tag = f"{on} {cfg is not None}"
            run("linear relu " + tag, lambda: ops["linear"](x, 0, w, None, relu))
            run("linear none " + tag, lambda: ops["linear"](x, 0, w, None, plain))
            run("linear int32 " + tag, lambda: ops["linear_int32"](x, 0, w, None))
            run("linear_add " + tag, lambda: ops["linear_add"](x, 0, w, None, relu, res, p))
            run("dynamic " + tag, lambda: ops["linear_dynamic"](x, xs, w, ws, fb,
                                                                torch.bfloat16))
            run("dynamic m=16 " + tag, lambda: ops["linear_dynamic"](x[:16], xs[:16], w, ws,
                                                                     None, torch.float16))
    S.STANDIN_COMPILES_ALL = True  # as the warm-up sets it: the quick candidates compiled
    with S.use(True):
        run("warm-up", lambda: ops["linear_dynamic"](x, xs, w, ws, None, torch.float32))
print("JSON" + json.dumps(out, default=str))
"""


def test_the_int8_linears_launch_it_when_they_should(tmp_path):
    """On the stand-in CUDA driver (sm_90, CPU tensors standing for device ones): switched
    off, every GEMM is the Triton kernel; on, the int8 Linears (requantized with and
    without a ReLU, with a fused residual add, int32) and the W8A8 Linear launch the Gluon
    kernel, once (nothing to time there), one program per tile of the 300 x 200 output
    (128 x 256 for the forced two-warpgroup config: 3; the default 128 x 128: 6), while a
    16-row W8A8 problem keeps the Triton kernel. Under the warm-up's switch an untuned
    problem launches (compiles) each config quick tuning would time, then the default."""
    out = run_json(_STANDIN_SCRIPT, tmp_path / "cache", timeout=600,
                   GPUQUANT_TRITON_TUNE="quick")
    warm = out.pop("warm-up")  # configs 0, 1, 2 (quick tuning's), then the launch (0)
    assert [g for _, g, _ in warm] == [[6, 1, 1], [3, 1, 1], [4, 1, 1], [6, 1, 1]], warm
    assert len(out) == 18
    for name, launches in out.items():
        kernel, grid, shapes = launches[-1]  # (the Triton kernel's autotuner launches first)
        gluon = name.split()[-2] == "True" and not name.startswith("dynamic m=16")
        assert kernel == ("_qgemm_sm90_kernel" if gluon else "_qgemm_kernel"), name
        if gluon:
            assert len(launches) == 1, (name, launches)  # no timing on the stand-in
            assert grid == ([3, 1, 1] if name.endswith("True True") else [6, 1, 1]), name


# --------------------------------------------------------------------------- on the GPU
def test_the_gpu_tests_checks_on_the_cpu():
    """The every-config GPU test's calls and comparisons (below), run here on the Triton
    kernel through the interpreter at a small shape (Gluon has no interpreter): the oracle
    of every op exists and agrees, so the GPU run can only fail on the Gluon kernel."""
    from gpuquant import backends
    from gpuquant.bench import warm
    if "triton" not in backends.available() or torch.cuda.is_available():
        pytest.skip("runs the triton backend through the interpreter (TRITON_INTERPRET=1)")
    calls = warm.gluon_test_calls(37, 24, 80)
    assert len(calls) == 13 and len({n for n, _, _ in calls}) == 13
    check_calls(calls, "interpreter 37x24x80")


@pytest.mark.gpu
@pytest.mark.skipif(not sm90(), reason="needs an sm_90 GPU (H100 / H200)")
@pytest.mark.parametrize("config", range(6))
def test_each_config_gives_the_oracles_bytes_on_the_gpu(config):
    """Each config forced: the int8 Linear with a ReLU requantization (whole epilogue),
    without one and with negative rshifts (the folded and general forms, split epilogue),
    with a fused residual add, its dequantized (float) and bare int32 forms, and the W8A8
    Linear in bf16 / fp16 / fp32 with and without bias (:func:`gpuquant.bench.warm.
    gluon_test_calls`: the prebuilt cache holds these kernels), against the NumPy oracle
    byte for byte, on a ragged shape (M, N and the K tail past every tile) and a deep one;
    the Gluon kernel ran for each."""
    from gpuquant.backends.triton import gemm_sm90 as S
    from gpuquant.bench import warm
    cfg = S.CONFIGS[config]
    for m, n, k in warm.GLUON_TEST_SHAPES:
        calls = warm.gluon_test_calls(m, n, k)
        before = S.STATS["launches"]
        with S.use(True, config=cfg):
            check_calls(calls, f"{cfg} {m}x{n}x{k}")
        assert S.STATS["launches"] == before + len(calls), (cfg, S.STATS["launches"] - before)


@pytest.mark.gpu
@pytest.mark.skipif(not sm90(), reason="needs an sm_90 GPU (H100 / H200)")
def test_the_tuned_path_on_the_gpu():
    """Switched on without a forced config: the first call times the configs on its own
    tensors and keeps the fastest (one entry a problem); the output is the oracle's."""
    from gpuquant import backends
    from gpuquant.backends.triton import gemm_sm90 as S
    from gpuquant.bench.warm import GLUON_TUNED_SHAPE
    torch.manual_seed(7)
    m, n, k = GLUON_TUNED_SHAPE
    x = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    xs, ws = torch.rand(m) * 0.1 + 0.01, torch.rand(n) * 0.1 + 0.01
    want = backends.get_backend("numpy").OPS["linear_dynamic"](x, xs, w, ws, None,
                                                               torch.bfloat16)
    tri = backends.get_backend("triton").OPS["linear_dynamic"]
    before = len(S._TUNED["sm90"].cache)
    with S.use(True):
        got = tri(x.cuda(), xs.cuda(), w.cuda(), ws.cuda(), None, torch.bfloat16)
        again = tri(x.cuda(), xs.cuda(), w.cuda(), ws.cuda(), None, torch.bfloat16)
    assert len(S._TUNED["sm90"].cache) == before + 1
    assert torch.equal(got.cpu(), want) and torch.equal(again, got)
