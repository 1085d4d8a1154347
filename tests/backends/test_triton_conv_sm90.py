"""The sm_90 Gluon main loop of the int8 implicit-GEMM convolution
(backends/triton/conv_sm90.py).

Gluon kernels have no interpreter, so on the CPU: every config compiles for sm_90 (Triton
3.6 and 3.9) with the asynchronous int8 wgmma, one group kept in flight, 16-byte cp.async
gathers of the activation tile, TMA for the weight, without float contraction and (but the
fused residual add's epilogue, which ptxas puts partly on the stack) without spills; on the
stand-in CUDA driver, the int8 conv launches it exactly when it should, with one program a
tile; the GPU test's calls and checks run through the interpreter on the Triton kernel. On
an H100 / H200 (``gpu`` marker): each config, forced, gives the NumPy oracle's bytes for
every epilogue form on five layer geometries."""
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
import json, os, re, tempfile
from gpuquant.backends.triton import conv_sm90 as C
from gpuquant.backends.triton.inspect_ptx import (FLOAT_HAZARD_RE, compile_gluon,
                                                  cubin_resources, wgmma_facts)
out = {}
jobs = [(c, "relu_folded", 3) for c in C.CONFIGS] + [
    (C.CONFIGS[0], f, 3) for f in ("folded", "general", "residual", "float", "int32")] + [
    (C.CONFIGS[1], "folded", 1), (C.CONFIGS[0], "relu_folded", 5)]
for cfg, form, k in jobs:
    sig, const = C.signature(cfg, form, k, k)
    kern = compile_gluon(C._qconv_sm90_kernel, sig, const, 90, cfg[3], cubin=True)
    ptx = kern.asm["ptx"]
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "k.cubin")
        open(p, "wb").write(kern.asm["cubin"])
        res = cubin_resources(p)["_qconv_sm90_kernel"]
    out[f"{cfg} {form} {k}x{k}"] = {
        **wgmma_facts(ptx), "shared": kern.metadata.shared, "res": res,
        "hazards": FLOAT_HAZARD_RE.findall(ptx),
        "cp_async": sorted(set(re.findall(r"cp\.async\.c[ag]\.shared\.global \[[^]]*\], "
                                          r"\[[^]]*\], (\w+)", ptx))),
        "fence": "fence.proxy.async.shared::cta" in ptx}
print("JSON" + json.dumps(out))
"""


def test_every_config_compiles_to_async_int8_wgmma_for_sm90(tmp_path):
    out = run_json(_COMPILE_SCRIPT, tmp_path / "cache", timeout=900)
    from gpuquant.backends.triton import conv_sm90 as C
    assert len(out) == len(C.CONFIGS) + 7
    for what, f in out.items():
        assert f["mma"] and all(m.endswith(".s32.s8.s8") for m in f["mma"]), (what, f)
        assert 1 in f["waits"], (what, f)  # one wgmma group in flight in the loop
        assert f["tma"] and f["fence"], (what, f)  # the weight by TMA; the proxy fence
        assert f["cp_async"] == ["0x10"], (what, f)  # whole 16-byte gathers only
        assert f["shared"] <= 232448, (what, f)  # sm_90's 227 KiB a block
        assert not f["hazards"], (what, f)
        assert f["res"]["LOCAL"] == 0, (what, f)
        # the fused residual add's epilogue keeps up to ~140 bytes a thread on the stack
        # (both ptxas versions); the others none with Triton 3.6's (the GPU machines')
        limit = 160 if "residual" in what or not triton.__version__.startswith("3.6.") \
            else 0
        assert f["res"]["STACK"] <= limit, (what, f)


_STANDIN_SCRIPT = r"""
import json, sys
import torch
from gpuquant import backends, qint8
from gpuquant.backends.triton import conv_sm90 as C, gemm_sm90 as S
from gpuquant.backends.triton.standin import standin_cuda
from gpuquant.functional.requant import make_requant
out = {}
with standin_cuda() as fk, backends.use("triton"):
    conv = backends.get_backend("triton").OPS["conv2d"]
    cl = torch.channels_last

    def run(name, x, w, zp=0, stride=1, pad=1, groups=1, on=True, cfg=None):
        rq = make_requant(0.02, torch.rand(w.shape[0]).double() + 0.1, 40.0, 0, qint8, "relu")
        fk.launches.clear()
        with S.use(on), C.force(cfg):
            conv(x.contiguous(memory_format=cl), zp, w, None, (stride,) * 2, (pad,) * 2,
                 (1, 1), groups, rq)
        out[name] = [[k, list(g)] for k, g, _ in fk.launches if "conv" in k or "gemm" in k]
    x = torch.zeros(2, 64, 14, 14, dtype=torch.int8)  # M = 392 output pixels
    w3 = torch.zeros(96, 64, 3, 3, dtype=torch.int8)
    run("3x3", x, w3)
    run("3x3 forced 128x256", x, w3, cfg=C.CONFIGS[1])
    run("3x3 off", x, w3, on=False)
    # M = 100 (the Triton kernel's specialization of M = 392: no second compile)
    run("3x3 small", torch.zeros(1, 64, 10, 10, dtype=torch.int8), w3)
    run("1x1 stride 2", torch.zeros(2, 64, 16, 16, dtype=torch.int8),
        torch.zeros(40, 64, 1, 1, dtype=torch.int8), stride=2, pad=0)
    # the other refusals are applies()'s (test_routing_rules): no more Triton compiles here
    try:
        run("forced 128-channel block on 64", x, w3, cfg=C.CONFIGS[3])
    except ValueError as e:
        out["forced error"] = str(e)
print("JSON" + json.dumps(out))
"""


def test_the_int8_conv_launches_it_when_it_should(tmp_path):
    """On the stand-in CUDA driver (sm_90, CPU tensors standing for device ones): switched
    on, a 3x3 and a strided 1x1 int8 convolution with zero point 0 and channels a multiple
    of 64 launch the Gluon kernel, once (nothing to time there), one program a tile; off,
    or with fewer than MIN_M output pixels, the Triton kernel; a forced config whose
    channel block does not divide the layer's is refused."""
    out = run_json(_STANDIN_SCRIPT, tmp_path / "cache", timeout=900,
                   GPUQUANT_TRITON_TUNE="quick")
    assert "needs channels a multiple of 128, got 64" in out.pop("forced error")
    assert len(out) == 5
    for name, launches in out.items():
        if name in ("3x3", "3x3 forced 128x256", "1x1 stride 2"):
            assert [k for k, _ in launches] == ["_qconv_sm90_kernel"], (name, launches)
        else:
            assert launches[-1][0] == "_qconv_kernel", (name, launches)
    # one program a BLOCK_M x BLOCK_N tile: 392 pixels x 96 channels on 128 x 128 -> 4,
    # on 128 x 256 -> 4; 128 pixels x 40 channels -> 1
    assert out["3x3"][-1][1] == [4, 1, 1] and out["3x3 forced 128x256"][-1][1] == [4, 1, 1]
    assert out["1x1 stride 2"][-1][1] == [1, 1, 1]


def test_routing_rules(monkeypatch):
    """Which convolutions take the Gluon path: on, sm_90, int8 channels_last input with zero
    point 0 (the copies' zero fill is the padding), groups 1, channels a multiple of 64,
    16-byte aligned; the forced config's errors."""
    from gpuquant.backends.triton import conv_sm90 as C
    cl = torch.channels_last
    x = torch.zeros(2, 64, 14, 14, dtype=torch.int8).contiguous(memory_format=cl)
    w = torch.zeros(96, 64, 3, 3, dtype=torch.int8)
    monkeypatch.delenv(gemm_sm90.ENV, raising=False)
    assert not C.applies("sm90", x, w, 0, 1)  # off by default
    with gemm_sm90.use(True):
        assert C.applies("sm90", x, w, 0, 1)
        for fam in ("interpret", "sm80", "sm89", "generic"):
            assert not C.applies(fam, x, w, 0, 1)
        assert not C.applies("sm90", x, w, 3, 1)  # a zero point: padding is not zero
        assert not C.applies("sm90", x.view(torch.uint8), w, 128, 1)
        x128 = torch.zeros(2, 128, 14, 14, dtype=torch.int8).contiguous(memory_format=cl)
        assert not C.applies("sm90", x128, w, 0, 2)  # groups
        assert C.applies("sm90", x128, torch.zeros(8, 128, 1, 1, dtype=torch.int8), 0, 1)
        x96 = torch.zeros(2, 96, 14, 14, dtype=torch.int8).contiguous(memory_format=cl)
        assert not C.applies("sm90", x96, w, 0, 1)  # channels % 64
        assert not C.applies("sm90", x.contiguous(), w, 0, 1)  # not channels_last
    with pytest.raises(ValueError, match="config must be one of"):
        with C.force((64, 64, 64, 4, 2)):
            pass


# --------------------------------------------------------------------------- on the GPU
def test_the_gpu_tests_checks_on_the_cpu():
    """The Gluon conv's GPU test's calls and comparisons (below), run here on the Triton
    kernel through the interpreter on the first layer (Gluon has no interpreter): the oracle
    of every op exists and agrees, so the GPU run can only fail on the Gluon kernel."""
    from gpuquant import backends
    from gpuquant.bench import warm
    if "triton" not in backends.available() or torch.cuda.is_available():
        pytest.skip("runs the triton backend through the interpreter (TRITON_INTERPRET=1)")
    calls = warm.gluon_conv_test_calls(warm.GLUON_CONV_TEST_LAYERS[0])
    assert len(calls) == 6 and len({n for n, _, _ in calls}) == 6
    check_calls(calls, "interpreter")


@pytest.mark.gpu
@pytest.mark.skipif(not sm90(), reason="needs an sm_90 GPU (H100 / H200)")
@pytest.mark.parametrize("config", range(5))
def test_each_config_gives_the_oracles_bytes_on_the_gpu(config):
    """Each config forced, on every test layer whose channels its block divides (3x3,
    strided 3x3 at 128 channels, strided 1x1, dilated 3x3, 5x5 on a non-square image;
    ragged pixels and output channels): the int8 conv with a ReLU requantization, without
    one, with negative rshifts, with a fused residual add, dequantized and bare int32, against
    the NumPy oracle byte for byte (:func:`gpuquant.bench.warm.gluon_conv_test_calls`: the
    prebuilt cache holds these kernels); the Gluon kernel ran for each."""
    from gpuquant.backends.triton import conv_sm90 as C
    from gpuquant.backends.triton import gemm_sm90 as S
    from gpuquant.bench import warm
    cfg = C.CONFIGS[config]
    layers = [L for L in warm.GLUON_CONV_TEST_LAYERS if L[1] % cfg[2] == 0]
    assert layers
    for layer in layers:
        calls = warm.gluon_conv_test_calls(layer)
        before = S.STATS["launches"]
        with S.use(True), C.force(cfg):
            check_calls(calls, f"{cfg} {layer}")
        assert S.STATS["launches"] == before + len(calls), (cfg, layer)


@pytest.mark.gpu
@pytest.mark.skipif(not sm90(), reason="needs an sm_90 GPU (H100 / H200)")
def test_the_tuned_conv_on_the_gpu():
    """Switched on without a forced config: the first call times the configs whose channel
    block divides the layer's and keeps the fastest; the bytes are the oracle's."""
    from gpuquant.backends.triton import conv_sm90 as C
    from gpuquant.backends.triton import gemm_sm90 as S
    from gpuquant.bench import warm
    layer = warm.GLUON_CONV_TEST_LAYERS[1]
    before = len(S._TUNED["sm90-conv"].cache)
    with S.use(True):
        check_calls(warm.gluon_conv_test_calls(layer, seed=1)[:1], f"tuned {layer}")
    assert len(S._TUNED["sm90-conv"].cache) == before + 1
    assert all(c in C.CONFIGS for c in S._TUNED["sm90-conv"].cache.values())
