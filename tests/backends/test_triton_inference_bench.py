"""The gemm / conv / models bench suites (GPU suites): case generation checked on the CPU,
and each suite's providers run end to end through the harness on tiny CPU cases (Triton
through the interpreter), their exact_vs_numpy checks included."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from _triton_inference_util import TRITON  # noqa: F401  (skips without the triton backend)
from gpuquant.bench.harness import ProviderUnavailable, RunConfig, run_case
from gpuquant.bench.suites import load_suite
from gpuquant.bench.suites import conv as conv_suite
from gpuquant.bench.suites import gemm as gemm_suite
from gpuquant.bench.suites import models as models_suite

TINY = RunConfig(budget_s=0.001, min_reps=1, max_reps=1, rounds=1, max_input_sets=1,
                 input_bytes=2 ** 26, rotate_bytes=2 ** 26)


def _rows(case):
    res = run_case("t", case, "cpu", TINY)
    assert not res.errors, res.errors
    return {r["provider"]: r for r in res.rows}, res.unavailable


@pytest.mark.parametrize("name,baseline", [("gemm", "torch-int-mm"), ("conv", "torch-bf16"),
                                           ("models", "torch-bf16")])
def test_suites_registered_for_the_gpu(name, baseline):
    s = load_suite(name)
    assert s.device == "cuda" and s.needs_gpu and s.baseline == baseline


def test_gemm_case_generation():
    cases = gemm_suite._cases(False, "cuda")  # no tensor is made until inputs() is called
    shapes = {(c.params["m"], c.params["n"], c.params["k"]) for c in cases}
    assert {(1, 4096, 4096), (16, 4096, 4096), (8192, 8192, 8192)} <= shapes
    assert any(n % 8 or k % 8 for _, n, k in shapes)
    assert min(m for m, _, _ in shapes) == 1 and max(max(s) for s in shapes) >= 8192
    for c in cases:  # (m >= 128: the sm_90 Gluon main loop's bare row too)
        assert set(c.providers) == {"gpuquant-triton", "gpuquant-triton-bare", "torch-int-mm",
                                    "torch-bf16", "gpuquant-cupy-dp4a", "gpuquant-cupy-mma75",
                                    "gpuquant-cupy-mma80", "gpuquant-cupy-sm90",
                                    "gpuquant-cupy-wgmma"} | \
            ({"gpuquant-triton-gluon-bare"} if c.params["m"] >= 128 else set())
    from gpuquant.backends.triton import gemm_sm90
    assert gemm_suite.GLUON_MIN_M == gemm_sm90.MIN_M
    quick = gemm_suite._cases(True, "cuda")
    assert 0 < len(quick) < len(cases)
    cls = gemm_suite.shape_classes()
    assert cls["small_m"] and cls["unaligned"] and cls["large"]
    assert cases[0].throughput({"m": 1000, "n": 1000, "k": 500}, 1.0) == (1.0, "TOPS")


def test_gemm_providers_run_and_check():
    rows, unavailable = _rows(gemm_suite.make_case(5, 20, 37, "cpu"))
    assert rows["gpuquant-triton"]["exact_vs_numpy"] is True
    assert rows["gpuquant-triton-bare"]["exact_vs_numpy"] is True
    assert rows["torch-bf16"]["exact_vs_numpy"] is None
    assert "torch-int-mm" in unavailable and "m=5" in unavailable["torch-int-mm"]
    rows, unavailable = _rows(gemm_suite.make_case(24, 16, 64, "cpu"))
    assert rows["gpuquant-triton"]["exact_vs_numpy"] is True
    rows, unavailable = _rows(gemm_suite.make_case(128, 16, 32, "cpu"))  # off sm_90: why
    assert "sm_90" in unavailable["gpuquant-triton-gluon-bare"]
    if "torch-int-mm" in rows:  # torch._int_mm on CPU where this torch has it
        assert rows["torch-int-mm"]["exact_vs_numpy"] is True
    # a wrong output is caught by the check (sampled rows)
    inp = gemm_suite.make_inputs(9, 8, 40, "cpu")(0)
    out = gemm_suite._triton_requant(inp)()
    assert gemm_suite._check_requant(inp, out)
    out[-1, 0] += 1
    assert not gemm_suite._check_requant(inp, out)
    assert not gemm_suite._check_requant(inp, out[:-1])            # a row missing
    assert not gemm_suite._check_requant(inp, out.int())           # int32, same values
    acc = inp["x"].long() @ inp["w"].long().t() + inp["bias"].long()
    assert gemm_suite._check_bare(inp, acc.int()) and not gemm_suite._check_bare(inp, acc)


def test_conv_layers_are_resnet50():
    every = conv_suite.resnet50_convs()
    distinct = conv_suite.distinct_convs()
    assert len(every) == 53 and len(distinct) == 23
    assert abs(sum(s.ops(1) for s in every) / 2 - 4.087e9) < 1e7  # ResNet-50's 4.09 GMACs
    assert sum(conv_suite.layer_counts().values()) == 53
    cases = conv_suite._cases(False, "cuda")
    assert [c.params["layer"] for c in cases] == [s.name for s in distinct] + ["all"]
    assert all(c.params["model"] == "resnet50" and c.params["batch"] == 64 for c in cases)
    quick = conv_suite._cases(True, "cuda")
    assert [c.params["layer"] for c in quick][-1] == "all" and len(quick) == 5


def test_conv_shapes_match_the_gpuquant_resnet50():
    """The suite's layer list equals the convolutions gpuquant.models.resnet50 runs (traced
    at 64x64 to keep it cheap)."""
    models = pytest.importorskip("gpuquant.models")
    model = models.resnet50(num_classes=10).eval()
    seen = []
    hooks = [m.register_forward_hook(
        lambda mod, inp, out: seen.append(conv_suite.ConvSpec(
            mod.in_channels, inp[0].shape[-1], mod.out_channels, mod.kernel_size[0],
            mod.stride[0], mod.padding[0])))
        for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    for h in hooks:
        h.remove()
    # the same convolutions (the network runs a block's downsample first)
    assert Counter(seen) == Counter(conv_suite.resnet50_convs(64))


def test_conv_providers_run_and_check():
    specs = [conv_suite.ConvSpec(8, 9, 12, 3, 2, 1), conv_suite.ConvSpec(3, 11, 8, 7, 2, 3),
             conv_suite.ConvSpec(16, 5, 24, 1, 1, 0)]
    rows, unavailable = _rows(conv_suite.make_case("all", specs, 2, "cpu"))
    assert rows["gpuquant-triton"]["exact_vs_numpy"] is True
    assert rows["torch-bf16"]["exact_vs_numpy"] is None
    assert rows["gpuquant-triton"]["unit"] == "TOPS"
    # the graph rows (the -graph rows are read against torch-bf16-graph): GPU only
    assert {k: v for k, v in unavailable.items() if "cupy" not in k} == {
        "gpuquant-triton-graph": "CUDA graphs need a CUDA device",
        "gpuquant-triton-gluon-graph": "CUDA graphs need a CUDA device",
        "torch-bf16-graph": "CUDA graphs need a CUDA device"}
    with pytest.raises(ProviderUnavailable, match="sm_90"):  # the Gluon main loop's: sm_90
        conv_suite._triton_gluon(conv_suite.make_inputs(specs, 2, "cpu")(0))


def test_conv_check_sees_the_last_image_dtype_and_shape():
    """The conv check compares every layer's first and last image with the NumPy backend, and
    the whole output's dtype and shape: a wrong value in the last image is caught."""
    from gpuquant import backends
    specs = [conv_suite.ConvSpec(8, 9, 12, 3, 2, 1), conv_suite.ConvSpec(16, 5, 24, 1, 1, 0)]
    torch.manual_seed(0)
    layers = conv_suite.make_inputs(specs, 3, "cpu")(0)
    ref = backends.get_backend("numpy").OPS["conv2d"]
    outs = [ref(L["x"], L["zp"], L["w"], L["bias"], (L["spec"].stride,) * 2,
                (L["spec"].pad,) * 2, (1, 1), 1, L["rq"]) for L in layers]
    assert conv_suite._check(layers, outs)
    bad = [y.clone() for y in outs]
    bad[-1][-1, -1, -1, -1] += 1                                   # last image, last tile
    assert not conv_suite._check(layers, bad)
    assert not conv_suite._check(layers, [y.int() for y in outs])  # equal values, int32
    assert not conv_suite._check(layers, [y[:2] for y in outs])    # the last image missing
    assert not conv_suite._check(layers, outs[:1])                 # a layer missing


def test_models_case_generation_and_providers(monkeypatch):
    cases = models_suite._cases(False, "cuda")
    assert {(c.params["model"], c.params["batch"]) for c in cases} == {
        (m, b) for m in ("resnet50", "mobilenet_v2") for b in (1, 64, 256)}
    assert set(cases[0].providers) == {"gpuquant-triton", "torch-bf16", "torch-bf16-compile",
                                       "gpuquant-triton-graph", "torch-bf16-graph",
                                       "torch-bf16-bnfold", "torch-bf16-bnfold-graph"}
    # the providers end to end on the digits network (8x8 images) on the CPU
    pytest.importorskip("gpuquant.models")
    monkeypatch.setitem(models_suite.MODELS, "digits_net", (1, 8))
    case = models_suite.make_case("digits_net", 3, "cpu")
    del case.providers["torch-bf16-compile"]  # inductor's C++ build: minutes on this CPU
    rows, unavailable = _rows(case)
    assert rows["gpuquant-triton"]["exact_vs_numpy"] is True
    assert rows["gpuquant-triton"]["unit"] == "images/s"
    assert "torch-bf16" in rows and "torch-bf16-bnfold" in rows
    # the check sees the last image and the dtype
    check = case.providers["gpuquant-triton"].check
    inp = case.inputs(0)
    out = case.providers["gpuquant-triton"].setup(inp)()
    assert check(inp, out) and out.shape[0] == 3
    bad = out.clone()
    bad[-1, -1] += 1
    assert not check(inp, bad) and not check(inp, out.double())
    # CUDA graphs: unavailable on the CPU, said so (their capture runs in the gpu test below)
    assert unavailable == {"gpuquant-triton-graph": "CUDA graphs need a CUDA device",
                           "torch-bf16-graph": "CUDA graphs need a CUDA device",
                           "torch-bf16-bnfold-graph": "CUDA graphs need a CUDA device"}


def test_models_bnfold_rows_fold_every_conv_batch_norm():
    """torch-bf16-bnfold's network: no BatchNorm left in a Conv+BN module, the same float
    function (float32, to rounding) as the network it came from."""
    import copy
    M = pytest.importorskip("gpuquant.models")
    from gpuquant.nn.conv import ConvBn2d
    torch.manual_seed(0)
    for name in ("resnet18", "mobilenet_v2"):
        net = getattr(M, name)(num_classes=10)
        x = torch.randn(2, 3, 32, 32)
        net.train()(x)  # BatchNorm statistics away from their initial values
        net.eval()
        want = net(x)
        folded = models_suite.fold_batch_norms(copy.deepcopy(net))
        convbns = [m for m in folded.modules() if isinstance(m, ConvBn2d)]
        assert convbns and all(isinstance(m.bn, torch.nn.Identity) for m in convbns)
        torch.testing.assert_close(folded(x), want, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_models_graph_providers_on_the_gpu(monkeypatch):
    """The CUDA-graph providers capture the fused int8 network (no host sync inside) and
    replay it with the eager network's bytes."""
    pytest.importorskip("gpuquant.models")
    monkeypatch.setitem(models_suite.MODELS, "digits_net", (1, 8))
    case = models_suite.make_case("digits_net", 3, "cuda")
    del case.providers["torch-bf16-compile"]
    res = run_case("t", case, "cuda", TINY)
    assert not res.errors and not res.unavailable, (res.errors, res.unavailable)
    rows = {r["provider"]: r for r in res.rows}
    assert rows["gpuquant-triton-graph"]["exact_vs_numpy"] is True
    assert rows["torch-bf16-graph"]["median_ms"] > 0


def test_models_compile_row_compiles_the_network(monkeypatch):
    """``torch-bf16-compile`` compiles the float network: gpuquant.models' forwards run
    eagerly under torch.compile (for their QAT / int8 forms), so compiling the float copy as
    it was gave Dynamo no graph at all and the row timed the eager network."""
    pytest.importorskip("gpuquant.models")
    monkeypatch.setitem(models_suite.MODELS, "digits_net", (1, 8))
    monkeypatch.setattr(models_suite, "_BUILT", {})  # (no compiled model left for others)
    real = torch.compile
    ops = []

    def backend(gm, example_inputs):  # counts the graphs' calls; runs them as traced
        ops.append(sum(n.op in ("call_function", "call_module", "call_method")
                       for n in gm.graph.nodes))
        return gm.forward

    monkeypatch.setattr(torch, "compile", lambda model, **kw: real(model, backend=backend, **kw))
    torch._dynamo.reset()
    try:
        case = models_suite.make_case("digits_net", 3, "cpu")
        inp = case.inputs(0)
        y = case.providers["torch-bf16-compile"].setup(inp)()
        want = case.providers["torch-bf16"].setup(inp)()
    finally:
        torch._dynamo.reset()
    # the convolutions, batch norms, pool and linears were traced (not one opaque call)
    assert ops and sum(ops) >= 8, ops
    assert y.dtype == torch.bfloat16 and torch.equal(y, want)
    # the eager bf16 network the other rows use keeps its own forwards
    eager = models_suite._bf16_model("digits_net", 1, 8, "cpu", False)
    assert "forward" not in vars(eager)


def test_models_compile_row_is_static_for_every_batch(monkeypatch):
    """The compiled network serves every batch of a model: each batch gets a graph of its
    own static shape, not (after the first) one with a symbolic batch size, which Dynamo's
    automatic dynamic shapes made for every later batch."""
    pytest.importorskip("gpuquant.models")
    monkeypatch.setitem(models_suite.MODELS, "digits_net", (1, 8))
    monkeypatch.setattr(models_suite, "_BUILT", {})
    real = torch.compile
    symbolic = []

    def backend(gm, example_inputs):
        symbolic.append(any(isinstance(e, torch.SymInt) for e in example_inputs) or any(
            isinstance(n.meta.get("example_value"), torch.SymInt)
            for n in gm.graph.nodes if n.op == "placeholder"))
        return gm.forward

    monkeypatch.setattr(torch, "compile", lambda model, **kw: real(model, backend=backend, **kw))
    torch._dynamo.reset()
    try:
        for batch in (1, 3, 5):
            case = models_suite.make_case("digits_net", batch, "cpu")
            inp = case.inputs(0)
            assert case.providers["torch-bf16-compile"].setup(inp)().shape[0] == batch
    finally:
        torch._dynamo.reset()
    assert len(symbolic) >= 3 and not any(symbolic), symbolic
