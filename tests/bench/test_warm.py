"""The background compile of the GPU suites' Triton kernels (gpuquant.bench.warm): workers
build real sm_90 cubins on the CPU into Triton's cache, keyed so that the same launch in
another process finds them; the lease runner starts it and reports it."""
import os
import tarfile

import pytest

from gpuquant.bench import lease, warm
from tests.compiled import run_compiled


def _cubins(cache):
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(cache) for f in fs
                  if f.endswith(".cubin"))


def _warm(cache, *args, **env):
    return run_compiled(["-m", "gpuquant.bench.warm", *args], cache, timeout=600, **env)


def test_warm_builds_cubins_that_a_second_process_finds_after_a_move(tmp_path):
    """The prebuilt-cache path (gpuquant.bench.tcache): cubins compiled under another Triton
    build's key (a stand-in wheel's), packed, unpacked into another directory, are every
    one found by a second process computing that key: nothing compiled again."""
    from gpuquant.bench import tcache
    from tests.bench.test_tcache import _wheel
    key = tcache.triton_key_for_wheel(_wheel(tmp_path / "t.whl"))
    cache = tmp_path / "cache"
    first = _warm(cache, "--suites", "fake_quant", "--jobs", "2", **{tcache.KEY_ENV: key})
    assert first.returncode == 0, first.stdout + first.stderr
    assert "0 failures" in first.stdout and "warm: done" in first.stdout
    built = _cubins(cache)
    assert len(built) >= 5 and all(os.path.getsize(p) > 1000 for p in built)
    archive = str(tmp_path / "c.tar.gz")
    assert tcache.pack(str(cache), archive, key)["kernels"] == tcache.count_kernels(str(cache))
    moved = tmp_path / "moved"
    n, _ = tcache.unpack(archive, str(moved), key=key)
    assert n == len(built)
    stamp = {p: os.path.getmtime(p) for p in _cubins(moved)}
    again = _warm(moved, "--suites", "fake_quant", "--jobs", "1", **{tcache.KEY_ENV: key})
    assert again.returncode == 0, again.stdout + again.stderr
    # every kernel was a cache hit: no new binary, none rewritten
    assert _cubins(moved) == sorted(stamp) and tcache.count_kernels(str(moved)) == n
    assert all(os.path.getmtime(p) == t for p, t in stamp.items())


def test_warm_lists_quick_cases_and_rejects_bad_arguments(capsys):
    items = warm.work_list(["gemm"])
    assert items and {s for s, _ in items} == {"gemm"}
    assert [i for _, i in items] == list(range(len(items)))
    with pytest.raises(SystemExit) as e:
        warm.main(["--jobs", "0"])
    assert e.value.code == 2 and "--jobs must be >= 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown suite"):
        warm.work_list(["no_such_suite"])


def test_weight_only_tiles_cover_the_probe_and_the_gpu_test():
    """The weight-only forced configs the prebuilt cache holds: every config the autotuner
    may pick, at each launch of the GPU probe (decode: 16-row and GEMV tiles at three
    splits; prefill: the large tiles, plain and transposed) and of the every-tile GPU test
    (bf16 and float32)."""
    from gpuquant.backends.triton import dynamic as D
    forms = D.weight_only_forms()
    assert len(forms) == len(D._WO_TILES) + len(D._WO_W_A_TILES) + len(D._WO_GEMV_TILES)
    launches = warm._weight_only_launches()
    assert [i for _, i in warm.work_list([warm.WEIGHT_ONLY_TILES])] == \
        list(range(len(launches)))
    for t, w in forms:
        for dt in ("bfloat16", "float32"):
            for m, k, s in warm.weight_only_test_shapes(t):
                assert (m, warm.WO_TEST_N, k, s, t, w, dt) in launches
    for n, k in warm.WO_PROBE_SHAPES:
        dec = warm.weight_only_probe_launches("decode", n, k, 132)
        split0 = D.weight_only_split_k(1, n, k, 132)
        assert {s for _, s, _, _ in dec} == {max(1, split0 // 2), split0, split0 * 2}
        assert {t for _, _, t, _ in dec} == {t for t, _ in forms if t[0] in (1, 16)}
        pre = warm.weight_only_probe_launches("prefill", n, k, 132)
        assert {w for _, _, _, w in pre} == {False, True}
        for m, s, t, w in dec + pre:
            assert (m, n, k, s, t, w, "bfloat16") in launches
    with pytest.raises(ValueError, match="part must be"):
        warm.weight_only_probe_launches("both", 4096, 4096, 132)


def test_warm_compiles_a_weight_only_tile(tmp_path):
    """A weight_only_tiles item, compiled by a warm worker: a real sm_90 cubin of the
    weight-only kernel in Triton's cache."""
    cache = tmp_path / "cache"
    proc = _warm(cache, "--worker", f"{warm.WEIGHT_ONLY_TILES}:0")
    assert proc.returncode == 0 and "1/1 cases, 0 failures" in proc.stdout, \
        proc.stdout + proc.stderr[-3000:]
    assert any("_linear_weight_only_kernel" in os.path.basename(p) for p in _cubins(cache))


def test_lease_starts_the_warm_up_and_reports_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "out"
    lease.main(["--out", str(out), "--budget", "200", "--stages", "tests,fake_quant",
                "--warm-jobs", "1",
                "--pytest-args", "-q tests/test_qparams.py -p no:cacheprovider -k dtype"])
    text = (out / "summary.md").read_text()
    assert "| warm (background) |" in text
    with tarfile.open(out / "lease.tar.gz") as tar:
        assert any(n.endswith("lease-logs/warm.log") for n in tar.getnames())
    assert lease._parse(["--out", "x", "--warm-jobs", "0"]).warm_jobs == 0


def test_shape_conv_stands_in_for_conv2d_forward_and_backward():
    """The qat_step warm-up replaces F.conv2d by its output's shape, dtype (bf16 under CPU
    autocast, as the real op) and channels_last layout, with a backward of the inputs'
    shapes; F.conv2d is restored after."""
    import torch
    import torch.nn.functional as F
    real = F.conv2d
    x = torch.randn(2, 8, 15, 11).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    w = torch.randn(6, 4, 3, 3, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    want = real(x, w, b, 2, 1, 1, 2)
    with warm._ShapeConv():
        y = F.conv2d(x, w, b, stride=2, padding=1, dilation=1, groups=2)
        assert y.shape == want.shape and y.dtype == x.dtype
        assert y.is_contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert F.conv2d(x, w, None, (1, 2), (0, 1), 2).dtype == torch.bfloat16
        y.sum().backward()
    assert F.conv2d is real
    assert x.grad.shape == x.shape and w.grad.shape == w.shape and b.grad.shape == b.shape
    assert warm._warmed("qat_step", "gpuquant-qat") and not warm._warmed("qat_step", "float")
    assert not warm._warmed("conv", "gpuquant-triton-graph")


def test_gluon_tiles_cover_the_probe_and_the_gpu_tests():
    """The sm_90 Gluon GEMM's forced configs the prebuilt cache holds: every config at each
    launch of the Gluon probe (bare int32 GEMM at its shapes; the W8A8 GEMM at m = 2048,
    which the probe tunes in full) and of the every-config and tuned-path GPU tests."""
    from gpuquant.backends.triton import gemm_sm90 as S
    launches = warm._gluon_launches()
    assert [i for _, i in warm.work_list([warm.GLUON_TILES])] == list(range(len(launches)))
    configs = set(range(len(S.CONFIGS)))
    for part, shapes in (("int32", warm.GLUON_PROBE_SHAPES), ("test", warm.GLUON_TEST_SHAPES),
                         ("w8a8", [s for s in warm.GLUON_PROBE_SHAPES if s[0] == 2048]
                          + [warm.GLUON_TUNED_SHAPE])):
        for shape in shapes:
            assert {c for p, c, *s in launches if p == part and tuple(s) == shape} == configs
    assert any(m % 16 and n % 16 for m, n, _ in warm.GLUON_PROBE_SHAPES)  # a ragged one
    assert len(warm.gluon_test_calls(*warm.GLUON_TEST_SHAPES[0])) == 13
    # the Gluon conv's test: every config on each layer whose channels its block divides
    from gpuquant.backends.triton import conv_sm90 as C
    conv = {(c, i) for p, c, i, *_ in launches if p == "conv"}
    assert conv == {(c, i) for c, cfg in enumerate(C.CONFIGS)
                    for i, layer in enumerate(warm.GLUON_CONV_TEST_LAYERS)
                    if layer[1] % cfg[2] == 0}
    assert {c for c, _ in conv} == set(range(len(C.CONFIGS)))
    assert len(warm.gluon_conv_test_calls(warm.GLUON_CONV_TEST_LAYERS[0])) == 6


_GLUON_PROBE_CALL = r"""
import torch
from gpuquant import backends
from gpuquant.backends.triton import gemm_sm90 as S
from gpuquant.backends.triton.standin import standin_cuda
with standin_cuda(cubin=True), backends.use("triton"), S.use(True, config=S.CONFIGS[0]):
    m, n, k = 333, 520, 1040  # as the probe calls it, with its random values
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    b = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    backends.get_backend("triton").OPS["linear_int32"](a, 0, b, torch.zeros(n, dtype=torch.int32))
"""


@pytest.mark.skipif(not __import__("gpuquant.backends.triton.gemm_sm90",
                                   fromlist=["AVAILABLE"]).AVAILABLE,
                    reason="this Triton has no Gluon Hopper dialect")
def test_a_warmed_gluon_tile_is_what_the_probe_finds(tmp_path):
    """One :data:`GLUON_TILES` item (the probe's ragged bare GEMM on config 0) warmed in one
    process; the probe's own call in another compiles nothing new."""
    idx = warm._gluon_launches().index(("int32", 0, 333, 520, 1040))
    cache = tmp_path / "cache"
    script = ("from gpuquant.bench import warm\n"
              f"print(warm._warm_cases([(warm.GLUON_TILES, {idx})]))")
    first = run_compiled(["-c", script], cache, timeout=600)
    assert first.returncode == 0 and "(1, 0)" in first.stdout, first.stderr[-3000:]
    built = _cubins(cache)
    assert any("_qgemm_sm90_kernel" in p for p in built), built
    stamp = {p: os.path.getmtime(p) for p in built}
    again = run_compiled(["-c", _GLUON_PROBE_CALL], cache, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _cubins(cache) == sorted(stamp)
    assert all(os.path.getmtime(p) == t for p, t in stamp.items())


def test_graph_rows_without_an_eager_twin_are_warmed_through_their_eager_function():
    """A CUDA-graph row is warmed only where the case has no eager twin (the conv suite's
    Gluon row), through the eager function its setup carries; other rows as before."""
    from gpuquant.bench.harness import Provider
    from gpuquant.bench.suites import conv
    case = conv.make_case("all", conv.resnet50_convs()[:2], 1, "cpu")
    got = {name: warm._warm_setup("conv", name, case.providers) for name in case.providers}
    assert got["gpuquant-triton-gluon-graph"] is conv._triton_gluon
    assert got["gpuquant-triton"] is case.providers["gpuquant-triton"].setup
    assert got["gpuquant-triton-graph"] is None  # its eager twin compiles the same kernels
    assert got["torch-bf16"] is None and got["torch-bf16-graph"] is None
    bare = {"gpuquant-triton-x-graph": Provider(lambda inp: None)}  # no .eager: not warmed
    assert warm._warm_setup("conv", "gpuquant-triton-x-graph", bare) is None


_GLUON_ROWS_ON_THE_STANDIN = r"""
import json, torch
from gpuquant.backends.triton import gemm_sm90 as S
from gpuquant.backends.triton.standin import standin_cuda
out = {"cpu": S.unavailable(torch.device("cpu")) is None}
with standin_cuda():
    out["standin"] = S.unavailable(torch.device("cpu"))
print("JSON" + json.dumps(out))
"""


@pytest.mark.skipif(not __import__("gpuquant.backends.triton.gemm_sm90",
                                   fromlist=["AVAILABLE"]).AVAILABLE,
                    reason="this Triton has no Gluon Hopper dialect")
def test_the_gluon_rows_are_available_on_the_standin(tmp_path):
    """The suites' Gluon rows run on the stand-in driver (sm_90 on CPU tensors), so the
    warm-up compiles them; off it, a CPU device has no Gluon path."""
    from tests.compiled import run_json
    assert run_json(_GLUON_ROWS_ON_THE_STANDIN, tmp_path / "c", timeout=300) == \
        {"cpu": False, "standin": None}
