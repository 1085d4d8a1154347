"""GPUQUANT_TRITON_TUNE: every autotune config by default, three of those that fit the
problem with "quick" (what the GPU-lease runner sets), an error for anything else."""
import pytest

pytest.importorskip("triton")

from gpuquant.backends.triton import common, conv, depthwise, gemm  # noqa: E402


@pytest.mark.parametrize("family", ["sm80", "sm89", "sm90"])
def test_quick_tuning_keeps_two_large_and_the_small_tile_of_those_that_fit(family, monkeypatch):
    """Quick tuning picks among the tiles that fit the problem (after the shape pruning):
    a 64-channel layer gets three tiles 64 wide, not the one small tile of a fixed list."""
    monkeypatch.delenv("GPUQUANT_TRITON_TUNE", raising=False)
    cfgs = [c for c in gemm.gemm_configs(family) if c.kwargs["EPI_SPLIT"] == 1]
    conv_cfgs = [c for c in conv.conv_configs(family) if not c.kwargs["PIPE_TAPS"]]
    big = {"M": 8192, "N": 8192}
    narrow = {"M": 200704, "N": 64}
    assert len(gemm.prune_configs(cfgs, big)) == len(cfgs)  # full: every config
    monkeypatch.setenv("GPUQUANT_TRITON_TUNE", "quick")
    area = lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"]  # noqa: E731
    for configs in (cfgs, conv_cfgs):
        quick = gemm.prune_configs(configs, big)
        areas = sorted((area(c) for c in configs), reverse=True)
        assert [area(c) for c in quick] == [areas[0], areas[1], areas[-1]]
        # resnet50's 256-channel 3x3 at 14x14, batch 64: the largest tiles would give 98
        # programs on 132 multiprocessors; the first tile to fill a wave and its larger
        # neighbour are tried instead (and the smallest)
        mid = gemm.prune_configs(configs, {"M": 64 * 14 * 14, "N": 256})
        def progs(c):
            return -(-12544 // c.kwargs["BLOCK_M"]) * -(-256 // c.kwargs["BLOCK_N"])
        wave = [c for c in configs if progs(c) >= common.sm_count()]
        assert len(mid) == 3 and max(area(c) for c in wave) in {area(c) for c in mid}
        q64 = gemm.prune_configs(configs, narrow)
        fits = [c for c in configs if c.kwargs["BLOCK_N"] <= 64]
        assert len(q64) == min(3, len(fits)) and all(c.kwargs["BLOCK_N"] <= 64 for c in q64)
        assert max(area(c) for c in q64) == max(area(c) for c in fits)
    assert len(depthwise.depthwise_configs(family)) == 3
    assert len(gemm.gemm_configs("interpret")) == 1  # the interpreter's one tile either way


def test_quick_subset_adds_one_config_of_each_kind_it_lacks(monkeypatch):
    """``also``: one predicate or a tuple of them; quick adds the largest config of each
    kind that none of its picks has, and nothing for a kind already picked."""
    monkeypatch.setenv("GPUQUANT_TRITON_TUNE", "quick")
    configs = [10, 9, 8, 7, 6, 5, 4, 3, 2, 1]  # area = the value: 10 and 9 picked, and 1
    assert common.tune_subset(configs, area=lambda c: c) == [10, 9, 1]
    assert common.tune_subset(configs, area=lambda c: c, also=lambda c: c == 5) == \
        [10, 9, 5, 1]
    odd, small = (lambda c: c % 2 == 1 and 3 < c < 9), (lambda c: c < 4)  # 1 is small
    assert common.tune_subset(configs, area=lambda c: c, also=(odd, small)) == [10, 9, 7, 1]
    assert common.tune_subset(configs, area=lambda c: c, also=(lambda c: c == 6,
                                                               lambda c: c == 4)) == \
        [10, 9, 6, 4, 1]
    monkeypatch.setenv("GPUQUANT_TRITON_TUNE", "full")
    assert common.tune_subset(configs, also=(odd,)) == configs


def test_bad_tune_mode_is_refused(monkeypatch):
    monkeypatch.setenv("GPUQUANT_TRITON_TUNE", "fastest")
    with pytest.raises(ValueError, match=r"GPUQUANT_TRITON_TUNE must be one of \('full', 'quick'\), "
                                         r"got 'fastest'"):
        common.tune_subset([1, 2, 3, 4])


@pytest.mark.parametrize("cc,family", [((8, 0), "sm80"), ((8, 6), "sm89"), ((8, 9), "sm89"),
                                       ((9, 0), "sm90"), ((7, 5), "generic"),
                                       ((12, 0), "generic")])
def test_arch_family_from_capability_cached_per_device(cc, family, monkeypatch):
    import torch
    monkeypatch.setattr(common, "INTERPRET", False)
    monkeypatch.setattr(common, "_FAMILY", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: cc)
    assert common.arch_family(torch.device("cuda", 0)) == family
    # read once per device: a later capability change is not seen for cuda:0 ...
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    assert common.arch_family(torch.device("cuda", 0)) == family
    # ... while "the current device" (no index) is asked every time
    assert common.arch_family(torch.device("cuda")) == "sm90"
    assert common.arch_family(torch.device("cpu")) == "interpret"


@pytest.fixture(params=["full", "quick"])
def tune_mode(request, monkeypatch):
    """GPUQUANT_TRITON_TUNE unset (every config) or "quick"."""
    if request.param == "quick":
        monkeypatch.setenv("GPUQUANT_TRITON_TUNE", "quick")
    else:
        monkeypatch.delenv("GPUQUANT_TRITON_TUNE", raising=False)
    return request.param


def test_conv_tunes_both_tap_loop_forms_where_they_differ(tune_mode):
    """Every conv tile comes in both tap-loop forms, the pipelined one also with its tiles
    copied through L1 (and the big ones with a split epilogue too); a layer with a tap
    loop (3x3) times the three forms of each tile the GEMM's pruning keeps, a 1x1 / flat-K
    layer only the unrolled one (there the forms are the same loop); int8 / float outputs
    add the split-epilogue twins, the bare int32 not."""
    cfgs = conv.conv_configs("sm90")
    whole = [c for c in cfgs if c.kwargs["EPI_SPLIT"] == 1]
    assert len(whole) == 3 * len(conv._CONV_TILES["sm90"])
    assert all(c.kwargs["PIPE_TAPS"] for c in cfgs if c.kwargs["L1_CACHE"])
    assert all(gemm._acc_per_thread(c) >= 128 for c in cfgs if c.kwargs["EPI_SPLIT"] == 2)
    shape = {"M": 64 * 56 * 56, "N": 256}
    tiles = gemm.prune_configs([c for c in whole if not c.kwargs["PIPE_TAPS"]], shape)

    def key(c):
        return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages)

    def form(c):
        return c.kwargs["PIPE_TAPS"], c.kwargs["L1_CACHE"]
    forms = [(False, False), (True, False), (True, True)]
    both = conv.prune_conv_configs(cfgs, shape, KH=3, KW=3, FLAT_K=False, OUT_MODE=2)
    assert sorted((key(c), form(c)) for c in both) == \
        sorted((key(c), f) for c in tiles for f in forms)
    assert all(c.kwargs["EPI_SPLIT"] == 1 for c in both)
    quant = conv.prune_conv_configs(cfgs, shape, KH=3, KW=3, FLAT_K=False, OUT_MODE=0)
    assert quant[:len(both)] == both
    split = quant[len(both):]
    assert sorted((key(c), form(c)) for c in split) == \
        sorted((key(c), form(c)) for c in both if gemm._acc_per_thread(c) >= 128)
    assert split and all(c.kwargs["EPI_SPLIT"] == 2 for c in split)
    for one in (dict(KH=1, KW=1, FLAT_K=False), dict(KH=7, KW=7, FLAT_K=True)):
        kept = conv.prune_conv_configs(cfgs, shape, OUT_MODE=2, **one)
        assert [key(c) for c in kept] == [key(c) for c in tiles]
        assert not any(c.kwargs["PIPE_TAPS"] or c.kwargs["L1_CACHE"] for c in kept)


@pytest.mark.parametrize("family", ["sm80", "sm89", "sm90"])
def test_gemm_configs_fitted_to_a_short_reduction(family):
    """A 64-long K (ResNet's 1x1 convolutions) gets no K tile wider than 64 and no more than
    2 stages (one K tile); K = 160 (the im2col'd stem) at most 256 wide; a long K keeps
    every config as it is."""
    cfgs = gemm.gemm_configs(family)
    assert gemm.fit_k(cfgs, 4096) == cfgs
    k64 = gemm.fit_k(cfgs, 64)
    assert all(c.kwargs["BLOCK_K"] == 64 and c.num_stages == 2 for c in k64)
    assert len({(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.kwargs["EPI_SPLIT"])
                for c in k64}) == len(k64)  # tiles that became equal are tried once
    for c in gemm.fit_k(cfgs, 160):
        bk = c.kwargs["BLOCK_K"]
        assert bk <= 256 and c.num_stages <= max(2, -(-160 // bk) + 1)
    assert all(c.kwargs["BLOCK_K"] == 32 for c in gemm.fit_k(cfgs, 9))
    # the autotuner's prune: fitted, then the shape pruning
    kept = gemm.prune_gemm_configs(cfgs, {"M": 200704, "N": 256, "K": 64})
    assert kept and all(c.kwargs["BLOCK_K"] == 64 for c in kept)


def test_gemm_tunes_the_split_epilogue_for_requantizing_outputs(tune_mode):
    """Tiles with >= 128 accumulators a thread also come with the requantizing epilogue in
    two column halves; int8 / float outputs time both forms of each tile kept, the bare
    int32 and the scaled (W8A8) outputs only the whole-tile form."""
    cfgs = gemm.gemm_configs("sm90")
    split = [c for c in cfgs if c.kwargs["EPI_SPLIT"] == 2]
    assert {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) for c in split} == \
        {(128, 256, 8), (256, 128, 8), (128, 128, 4)}  # >= 128 accumulators a thread
    shape = {"M": 8192, "N": 8192, "K": 8192}
    whole = gemm.prune_gemm_configs(cfgs, shape, OUT_MODE=2)
    assert whole and all(c.kwargs["EPI_SPLIT"] == 1 for c in whole)
    assert gemm.prune_gemm_configs(cfgs, shape, OUT_MODE=3) == whole
    for mode in (0, 1):
        both = gemm.prune_gemm_configs(cfgs, shape, OUT_MODE=mode)
        assert both[:len(whole)] == whole
        twins = both[len(whole):]
        assert twins and all(c.kwargs["EPI_SPLIT"] == 2 for c in twins)
        assert {gemm._tile_key(c) for c in twins} <= {gemm._tile_key(c) for c in whole}


def test_quick_tuning_on_sm90_also_tries_a_two_cta_gemm_tile(monkeypatch):
    """Triton keeps no int8 wgmma in flight across K steps (its pipeliner wants a float32
    accumulator), so on sm_90 a one-warpgroup tile that runs two CTAs a multiprocessor is
    timed next to the large 8-warp tiles; other families and the conv kernel are unchanged."""
    monkeypatch.setenv("GPUQUANT_TRITON_TUNE", "quick")
    big = {"M": 8192, "N": 8192, "K": 8192}
    for family in ("sm90", "sm80"):
        cfgs = gemm.gemm_configs(family)
        kept = gemm.prune_gemm_configs(cfgs, big, family=family, OUT_MODE=2)
        two = [c for c in kept if gemm.two_ctas_sm90(c)]
        if family == "sm90":
            assert [gemm._tile_key(c) for c in two] == [(128, 128, 128, 8, 4, 3)]
            assert len(kept) == 4
        else:
            assert two == [] and len(kept) == 3
    # a problem whose picks already hold one (a 64-wide N): nothing added
    narrow = gemm.prune_gemm_configs(gemm.gemm_configs("sm90"), {"M": 200704, "N": 64, "K": 512},
                                     family="sm90", OUT_MODE=2)
    assert len([c for c in narrow if not c.kwargs.get("PERSISTENT")]) == 3  # (+ persistent)
    # the conv kernel, a 256-channel 3x3 layer at 56x56, batch 64: one more tile, 4 warps
    cfgs = conv.conv_configs("sm90")
    args = {"M": 64 * 56 * 56, "N": 256, "K": 9 * 256}
    plain = conv.prune_conv_configs(cfgs, args, KH=3, KW=3, OUT_MODE=2)
    sm90 = conv.prune_conv_configs(cfgs, args, family="sm90", KH=3, KW=3, OUT_MODE=2)
    added = [c for c in sm90 if c not in plain]
    # in the three tap-loop forms
    assert len(added) == 3 and all(gemm.two_ctas_sm90(c) for c in added)
    assert not any(gemm.two_ctas_sm90(c) for c in plain)


def test_quick_tuning_of_a_residual_epilogue_also_tries_a_register_light_tile(monkeypatch):
    """The fused residual add's epilogue spills on the large tiles quick tuning picks first
    (ptxas, sm_90); with HAS_RES quick tuning also times the largest tile of at most 64
    accumulators a thread (GEMM and conv), in both tap-loop forms for a 3x3 conv."""
    monkeypatch.setenv("GPUQUANT_TRITON_TUNE", "quick")
    shape = {"M": 12544, "N": 1024, "K": 256}  # resnet50 batch 64, layer3's residual 1x1

    def light(c):  # (the persistent twin of a short reduction is another matter)
        return gemm._acc_per_thread(c) <= 64 and gemm._tile_area(c) >= 64 * 64 \
            and not c.kwargs.get("PERSISTENT")
    cfgs = gemm.gemm_configs("sm90")
    plain = gemm.prune_gemm_configs(cfgs, shape, family="sm90", OUT_MODE=0, HAS_RES=False)
    res = gemm.prune_gemm_configs(cfgs, shape, family="sm90", OUT_MODE=0, HAS_RES=True)
    assert not any(light(c) for c in plain)
    added = [c for c in res if c not in plain]
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) for c in added] == \
        [(128, 128, 8)]
    assert all(c.kwargs["BLOCK_K"] <= 256 for c in added)  # fitted to K like the rest
    ccfgs = conv.conv_configs("sm90")
    cshape = {"M": 64 * 28 * 28, "N": 128, "K": 1152}
    cres = conv.prune_conv_configs(ccfgs, cshape, family="sm90", KH=3, KW=3, FLAT_K=False,
                                   OUT_MODE=0, HAS_RES=True)
    lights = [c for c in cres if light(c)]
    assert {c.kwargs["PIPE_TAPS"] for c in lights} == {False, True}
    monkeypatch.setenv("GPUQUANT_TRITON_TUNE", "full")  # full tuning: every config as before
    assert gemm.prune_gemm_configs(cfgs, shape, family="sm90", OUT_MODE=0, HAS_RES=True) == \
        gemm.prune_gemm_configs(cfgs, shape, family="sm90", OUT_MODE=0, HAS_RES=False)


_KEY_SCRIPT = r"""
import json
import torch
from triton.runtime.autotuner import Autotuner
from gpuquant.backends.triton import conv, depthwise, dynamic, gemm
from gpuquant.backends.triton.standin import standin_cuda
from gpuquant.dtypes import qint8
from gpuquant.functional.requant import make_add_params, make_requant
Autotuner._bench = lambda self, *a, config=None, **k: [1.0, 1.0, 1.0]  # no timing compiles
torch.manual_seed(0)
CL = torch.channels_last
def rq(n, out_scale):
    return make_requant(0.02, torch.rand(n, dtype=torch.float64) * 0.01 + 0.001, out_scale, 0,
                        qint8)
x = torch.randint(-128, 128, (1, 64, 4, 8), dtype=torch.int8).contiguous(memory_format=CL)
w1 = torch.randint(-127, 128, (64, 64, 1, 1), dtype=torch.int8)
w3 = torch.randint(-127, 128, (64, 64, 3, 3), dtype=torch.int8)
wd = torch.randint(-127, 128, (64, 1, 3, 3), dtype=torch.int8)
res = torch.randint(-128, 128, (1, 64, 4, 8), dtype=torch.int8).contiguous(memory_format=CL)
add = make_add_params(0.5, 0, 0.5, 0, 0.5, 0, qint8)
out = {}
with standin_cuda():
    for name, wt, groups, table in (("gemm", w1, 1, gemm), ("conv", w3, 1, conv),
                                    ("depthwise", wd, 64, depthwise)):
        pad = (0, 0) if wt.shape[-1] == 1 else (1, 1)
        def call(zp=0, residual=None, scale=0.5):
            conv.qconv2d(x, zp, wt, None, (1, 1), pad, (1, 1), groups, rq(64, scale),
                         residual=residual, add_params=add if residual is not None else None)
        call()
        call(residual=res)
        call(scale=1e-6)  # an output scale this small needs the saturating left shift
        if name == "conv":
            call(zp=3)
        out[name] = [list(map(str, k)) for k in table._TUNED["sm90"].cache]
    xb, wq = torch.randn(1, 256), torch.randint(-127, 128, (64, 256), dtype=torch.int8)
    for bias in (None, torch.randn(64)):  # the weight-only GEMM, with and without a bias
        dynamic.linear_weight_only(xb, wq, torch.rand(64), bias, split_k=1)
    out["weight_only"] = [list(map(str, k)) for k in dynamic._WO_KERNELS[False].cache]
print("JSON" + json.dumps(out))
"""


def test_autotune_key_holds_the_epilogue_and_the_zero_point(tmp_path):
    """The same shape with and without a fused residual add (or the saturating left shift,
    or, for the conv's A loader, a nonzero zero point; the weight-only GEMM's bias) is
    tuned separately: those compile to
    different register budgets (the residual add spills 303 registers a thread on the
    256x128 tile that is spill-free without it), so one shape's choice must not serve the
    other (resnet50's layer1 downsample and its first residual conv share M, N, K)."""
    from tests.compiled import run_json
    keys = run_json(_KEY_SCRIPT, tmp_path / "triton_cache", GPUQUANT_TRITON_TUNE="quick",
                    timeout=600)
    for name, want in (("gemm", 3), ("conv", 4), ("depthwise", 3), ("weight_only", 2)):
        assert len(keys[name]) == want, (name, keys[name])
        assert len({tuple(k) for k in keys[name]}) == want


def test_short_reductions_also_time_a_persistent_tile(monkeypatch):
    """A GEMM with a short K and many tiles (resnet50's 1x1 convolutions at batch 64) also
    times the persistent form of its largest light 4-warp tile, launched with at most
    PERSISTENT_CTAS programs a multiprocessor; long reductions and small problems do not."""
    monkeypatch.setenv("GPUQUANT_TRITON_TUNE", "quick")
    for family in ("sm90", "sm80"):
        cfgs = gemm.gemm_configs(family)
        for shape in ({"M": 200704, "N": 64, "K": 256}, {"M": 12544, "N": 1024, "K": 256},
                      {"M": 200704, "N": 256, "K": 64}):
            kept = gemm.prune_gemm_configs(cfgs, shape, family=family, OUT_MODE=0)
            pers = [c for c in kept if c.kwargs.get("PERSISTENT")]
            assert len(pers) == 1, (family, shape)
            c = pers[0]
            assert c.kwargs["PERSISTENT"] == gemm.PERSISTENT_CTAS and c.num_warps == 4
            assert gemm._acc_per_thread(c) <= 64 and c.kwargs["BLOCK_K"] <= shape["K"]
            grid = gemm.gemm_grid(shape["M"], shape["N"])
            tiles = gemm._programs(c, shape["M"], shape["N"])
            assert grid({**c.kwargs}) == (min(tiles, gemm.PERSISTENT_CTAS * 132),)
            assert grid({**c.kwargs, "PERSISTENT": 0}) == (tiles,)
        for shape in ({"M": 2048, "N": 4096, "K": 4096}, {"M": 64, "N": 256, "K": 256}):
            kept = gemm.prune_gemm_configs(cfgs, shape, family=family, OUT_MODE=0)
            assert not any(c.kwargs.get("PERSISTENT") for c in kept), (family, shape)
