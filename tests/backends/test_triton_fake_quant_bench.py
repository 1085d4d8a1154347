"""The fake_quant and qat_step benchmark suites (GPU-only suites): their case generation,
and every provider run end to end on the CPU at tiny sizes (the Triton kernels through the
interpreter), so the GPU run is one command that works."""
import pytest
import torch

from gpuquant.bench import suites as registry
from gpuquant.bench.harness import RunConfig, run_case
from gpuquant.bench.suites import fake_quant as fq_suite
from gpuquant.bench.suites import qat_step as qat_suite

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TINY = RunConfig(budget_s=0.001, min_reps=1, max_reps=1, rounds=1, max_input_sets=1)


def test_fake_quant_suite_cases():
    full = fq_suite.case_params(False)
    quick = fq_suite.case_params(True)
    assert {p["numel"] for p in full} == {2 ** k for k in (20, 22, 24, 26, 28)}
    assert {p["numel"] for p in quick} == {2 ** 20, 2 ** 24}
    assert {(p["mode"], p["granularity"], p["dtype"]) for p in full} == {
        (m, g, d) for m in ("fwd", "bwd", "fwd+bwd") for g in ("per_tensor", "per_channel")
        for d in ("float32", "bfloat16")} | {("observe", "per_tensor", d)
                                             for d in ("float32", "bfloat16")}
    assert len(full) == (3 * 2 + 1) * 2 * 5
    for n in (2 ** 20, 2 ** 28):
        shape = fq_suite.activation_shape(n)
        assert shape[1] == 64 and shape[2] == shape[3] == 32 and torch.Size(shape).numel() == n
    assert fq_suite.bytes_per_element({"mode": "fwd+bwd", "dtype": "bfloat16"}) == 8
    assert fq_suite.bytes_per_element({"mode": "bwd", "dtype": "float32"}) == 8
    assert fq_suite.bytes_per_element({"mode": "observe", "dtype": "bfloat16"}) == 6
    with pytest.raises(ValueError, match="power of 4"):
        fq_suite.activation_shape(64 * 8)
    cases = fq_suite.build_cases(full, "cpu")  # builds no tensors
    for c in cases:  # torch-fused where it applies (observe: with its observer on)
        fused = c.params["granularity"] == "per_tensor" and c.params["dtype"] == "float32"
        assert set(c.providers) == {"torch", "gpuquant-triton", "copy"} | (
            {"torch-fused"} if fused else set())
    suite = registry.load_suite("fake_quant")
    assert suite.device == "cuda" and suite.baseline == "torch"


def test_fake_quant_suite_providers_run_and_agree():
    params = fq_suite.case_params(True, sizes=[64 * 64], dtypes=["float32", "bfloat16"])
    for case in fq_suite.build_cases(params, DEV):
        res = run_case("fake_quant", case, DEV, TINY)
        assert not res.errors and not res.unavailable, (res.errors, res.unavailable)
        by = {r["provider"]: r for r in res.rows}
        for name in ("torch", "gpuquant-triton") + (("torch-fused",) if "torch-fused" in
                                                    case.providers else ()):
            assert by[name]["exact_vs_numpy"] is True, (case.name, name)
        assert by["copy"]["exact_vs_numpy"] is None
        assert all(r["unit"] == "GB/s" and r["throughput"] > 0 for r in res.rows)


def test_fake_quant_observe_mode_checks_the_observer_qparams():
    """observe mode: each provider's y is checked with the qparams its observer holds after
    the call; y made with other qparams (the observer's state before the batch, or a
    shifted zero point) is caught."""
    (p,) = [q for q in fq_suite.case_params(True, sizes=[64 * 64], dtypes=["float32"])
            if q["mode"] == "observe"]
    torch.manual_seed(1)
    inp = fq_suite._make_inputs(p, "cpu")(0)
    for setup in (fq_suite._observe_triton_setup, fq_suite._observe_torch_setup,
                  fq_suite._observe_fused_setup):
        out = setup(inp)()
        assert fq_suite._check_observed(inp, out), setup.__name__
        setup(inp)()  # a fresh observer, its qparams recorded again
        qp = fq_suite._OBSERVED[id(inp)]()
        shifted = lambda: (qp[0], qp[1] + 1)  # noqa: E731
        fq_suite._OBSERVED[id(inp)] = shifted
        assert not fq_suite._check_observed(inp, out), setup.__name__


def test_fake_quant_check_sees_the_last_image_dtype_and_shape():
    """check_output compares images spread over the batch, the last included, and the whole
    output's dtype and shape: a wrong value in the last image is caught, and so is a float32
    output for a bfloat16 input."""
    for p in fq_suite.case_params(True, sizes=[64 * 1024 * 4], dtypes=["bfloat16"]):
        if p["mode"] == "observe":  # its check: the test above
            continue
        torch.manual_seed(0)
        inp = fq_suite._make_inputs(p, "cpu")(0)
        assert inp["x"].shape[0] == 4
        out = fq_suite._torch_setup(inp)()
        assert fq_suite.check_output(inp, out), p
        outs = list(out) if isinstance(out, tuple) else [out]
        for k in range(len(outs)):
            bad = [t.detach().clone() for t in outs]
            bad[k][-1, -1, -1, -1] += 1                             # last image, last element
            assert not fq_suite.check_output(inp, tuple(bad) if len(bad) > 1 else bad[0]), p
            wrong = [t.detach().float() if j == k else t for j, t in enumerate(outs)]
            assert not fq_suite.check_output(inp, tuple(wrong) if len(wrong) > 1 else wrong[0])
            short = [t[:3] if j == k else t for j, t in enumerate(outs)]
            assert not fq_suite.check_output(inp, tuple(short) if len(short) > 1 else short[0])


def test_qat_step_suite_cases():
    ps = qat_suite.case_params(False)
    assert [p["model"] for p in ps] == ["resnet50", "mobilenet_v2"]
    assert all(p["batch"] == 64 and p["resolution"] == 224 and p["dtype"] == "bfloat16"
               and p["memory_format"] == "channels_last" for p in ps)
    cases = qat_suite.build_cases(ps, "cpu")
    assert all(set(c.providers) == {"float", "float-graph", "gpuquant-qat",
                                    "gpuquant-qat-graph", "gpuquant-qat-exact",
                                    "gpuquant-qat-bn-frozen", "torch-ao-qat"} for c in cases)
    qc = qat_suite.qat_qconfig()
    assert qc.act_observer().check_finite is False and qc.weight_observer().axis == 0
    suite = registry.load_suite("qat_step")
    assert suite.device == "cuda" and suite.baseline == "float"


def test_qat_step_providers_run():
    # one step a provider (the harness loop itself is tested in tests/bench); bf16 autocast
    # is very slow on CPUs without bf16 units, so the CPU check runs float32
    params = qat_suite.case_params(True, models=("resnet18",), batch=2, resolution=32,
                                   dtype="float32")
    (case,) = qat_suite.build_cases(params, DEV)
    inp = case.inputs(0)
    losses = {}
    for name, prov in case.providers.items():
        try:
            step = prov.setup(inp)
        except qat_suite.ProviderUnavailable as e:
            assert (name == "torch-ao-qat" and "torchvision" in str(e)) or \
                (name.endswith("-graph") and DEV == "cpu" and "CUDA graphs" in str(e))
            continue
        losses[name] = step()
    assert {"float", "gpuquant-qat", "gpuquant-qat-exact", "gpuquant-qat-bn-frozen"} <= set(losses)
    assert all(bool(torch.isfinite(v)) for v in losses.values())
    from gpuquant.nn.qat.conv import BnFoldedModule
    frozen = case.providers["gpuquant-qat-bn-frozen"].setup.cache["model"]
    folded = [m for m in frozen.modules() if isinstance(m, BnFoldedModule)]
    assert folded and all(m.bn_frozen for m in folded)
    exact = case.providers["gpuquant-qat-exact"].setup.cache["model"]
    assert all(m.bn_fold == "exact" for m in exact.modules() if isinstance(m, BnFoldedModule))
    # the QAT provider really trains a QAT model: its observers recorded the step
    from gpuquant.quantization import ExponentialMovingAverageObserver
    model = case.providers["gpuquant-qat"].setup.cache["model"]
    obs = [m for m in model.modules() if isinstance(m, ExponentialMovingAverageObserver)]
    assert obs and all(o.has_observed for o in obs)


@pytest.mark.gpu
def test_qat_step_graph_providers_on_the_gpu():
    """The CUDA-graph QAT step captures (no host read in forward or backward) and its
    replays really train: the loss stays finite, the weights move, and the observers keep
    recording (their buffers change from replay to replay)."""
    params = qat_suite.case_params(True, models=("resnet18",), batch=4, resolution=32)
    (case,) = qat_suite.build_cases(params, "cuda")
    inp = case.inputs(0)
    step = case.providers["gpuquant-qat-graph"].setup(inp)
    model = case.providers["gpuquant-qat-graph"].setup.cache["model"]
    from gpuquant.quantization import ExponentialMovingAverageObserver
    obs = [m for m in model.modules() if isinstance(m, ExponentialMovingAverageObserver)]
    w0 = next(model.parameters()).detach().clone()
    mins = [o.min_val.clone() for o in obs]
    losses = [step() for _ in range(3)]
    torch.cuda.synchronize()
    assert all(bool(torch.isfinite(v)) for v in losses)
    assert not torch.equal(next(model.parameters()).detach(), w0)
    assert any(not torch.equal(o.min_val, m) for o, m in zip(obs, mins))
    assert bool(torch.isfinite(case.providers["float-graph"].setup(inp)()))
