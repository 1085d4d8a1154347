"""The ``linear_dynamic`` bench suite: its case grid, and its providers and exactness check
run end to end on a tiny case on the CPU (Triton kernels through the interpreter)."""
from gpuquant.bench import harness
from gpuquant.bench.suites import load_suite
from gpuquant.bench.suites import linear_dynamic as ld


def test_case_grid():
    suite = load_suite("linear_dynamic")
    assert suite.device == "cuda" and suite.baseline == "torch-bf16"
    cases = suite.cases(False, "cuda")  # inputs are built lazily: nothing is allocated here
    grid = {(c.params["m"], c.params["n"], c.params["k"]) for c in cases}
    assert {m for m, _, _ in grid} == {1, 16, 128, 2048}
    assert {n for _, n, _ in grid} | {k for _, _, k in grid} == {4096, 11008, 14336}
    assert len(grid) == 20
    eager = {"torch-bf16", "gpuquant-triton", "gpuquant-triton-w8", "torchao", "torchao-w8"}
    graphs = {"torch-bf16-graph", "gpuquant-triton-graph", "gpuquant-triton-w8-graph",
              "torchao-graph", "torchao-w8-graph"}
    for c in cases:  # decode rows (m <= 16) also replay CUDA graphs; m >= 128 the Gluon GEMM
        m = c.params["m"]
        want = eager | (graphs if m <= 16 else set()) | \
            ({"gpuquant-triton-gluon"} if m >= 128 else set())
        assert set(c.providers) == want, c.params
    from gpuquant.backends.triton import gemm_sm90
    assert ld.GLUON_MIN_M == gemm_sm90.MIN_M


def test_gluon_provider_unavailable_off_sm90():
    """Off an sm_90 GPU the Gluon W8A8 row reports why it did not run."""
    case = harness.Case(params={"m": 128, "n": 8, "k": 16, "dtype": "bfloat16"},
                        inputs=ld._make_inputs(128, 8, 16, "cpu"),
                        providers={"gpuquant-triton-gluon": ld._gpuquant(False, gluon=True)},
                        throughput=lambda p, ms: (2 * p["m"] * p["n"] * p["k"] / ms / 1e9,
                                                  "TOPS"))
    cfg = harness.RunConfig(budget_s=0.01, min_reps=1, max_reps=2, rounds=1, max_input_sets=1)
    res = harness.run_case("linear_dynamic", case, "cpu", cfg)
    assert not res.errors, res.errors
    assert "gpuquant-triton-gluon" in res.unavailable


def test_graph_providers_unavailable_off_cuda():
    case = harness.Case(params={"m": 1, "n": 8, "k": 16, "dtype": "bfloat16"},
                        inputs=ld._make_inputs(1, 8, 16, "cpu"),
                        providers={"torch-bf16": ld._torch_bf16(),
                                   "torch-bf16-graph": ld._graphed(ld._torch_bf16())},
                        throughput=lambda p, ms: (2 * p["m"] * p["n"] * p["k"] / ms / 1e9, "TOPS"))
    cfg = harness.RunConfig(budget_s=0.01, min_reps=1, max_reps=2, rounds=1, max_input_sets=1)
    res = harness.run_case("linear_dynamic", case, "cpu", cfg)
    assert not res.errors, res.errors
    assert "torch-bf16-graph" in res.unavailable
    assert {r["provider"] for r in res.rows} == {"torch-bf16"}


def test_foreign_capture_failure_is_unavailable(monkeypatch):
    """torchao's call failing to capture makes its graph row unavailable (with the reason);
    ours failing to capture is an error of the run."""
    import types

    import pytest

    def broken(fn, warmup):
        raise RuntimeError("operation not permitted when stream is capturing\nmore")
    monkeypatch.setattr(ld, "cuda_graph_of", broken)
    inp = {"x": types.SimpleNamespace(device=types.SimpleNamespace(type="cuda"))}
    prov = harness.Provider(lambda inp: (lambda: None))
    with pytest.raises(harness.ProviderUnavailable,
                       match="does not capture in a CUDA graph \\(operation not permitted"):
        ld._graphed(prov, foreign=True).setup(inp)
    with pytest.raises(RuntimeError, match="operation not permitted"):
        ld._graphed(prov).setup(inp)


def test_tiny_case_runs_and_checks_on_cpu():
    case = harness.Case(params={"m": 3, "n": 20, "k": 40, "dtype": "bfloat16"},
                        inputs=ld._make_inputs(3, 20, 40, "cpu"),
                        providers={"torch-bf16": ld._torch_bf16(),
                                   "gpuquant-triton": ld._gpuquant(False),
                                   "gpuquant-triton-w8": ld._gpuquant(True),
                                   "torchao": ld._torchao(False)},
                        throughput=lambda p, ms: (2 * p["m"] * p["n"] * p["k"] / ms / 1e9, "TOPS"))
    cfg = harness.RunConfig(budget_s=0.01, min_reps=1, max_reps=2, rounds=1, max_input_sets=1)
    res = harness.run_case("linear_dynamic", case, "cpu", cfg)
    rows = {r["provider"]: r for r in res.rows}
    assert not res.errors, res.errors
    assert rows["gpuquant-triton"]["exact_vs_numpy"] is True
    assert rows["gpuquant-triton-w8"]["exact_vs_numpy"] is None
    assert rows["torch-bf16"]["unit"] == "TFLOPS"  # its fraction: of the bf16 ceiling
    assert rows["gpuquant-triton"]["unit"] == "TOPS"
    try:
        import torchao  # noqa: F401
    except ImportError:
        assert "torchao" in res.unavailable
    # the check is real: one wrong element is caught
    inp = case.inputs(0)
    prov = case.providers["gpuquant-triton"]
    out = prov.setup(inp)()
    assert prov.check(inp, out) is True
    bad = out.clone()
    bad[1, 7] = bad[1, 7] * 2 + 1  # never equal to itself
    assert prov.check(inp, bad) is False
