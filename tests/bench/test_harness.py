"""The benchmark harness itself, on the CPU: timing stats, interleaving, input rotation,
pairing, ratios, the results format, the GPU skip, errors, report files, the README table."""
import json
import os
import textwrap
import time
import weakref

import numpy as np
import pytest
import torch

from gpuquant.bench import Case, Provider, ProviderUnavailable, run_bench
from gpuquant.bench import ceilings as ceil_mod
from gpuquant.bench import harness, readme_table, report
from gpuquant.bench import suites as registry
from gpuquant.bench.harness import (HEADER_FIELDS, ROW_FIELDS, RunConfig, device_slug,
                                    pair_rows, percentile, run_case)

FAKE_CEILINGS = {"bandwidth": {"value": 100.0, "unit": "GB/s", "what": "test"},
                 "float": {"value": 2.0, "unit": "TFLOPS", "what": "test"},
                 "int8": {"value": 500.0, "unit": "GOPS", "what": "test"}}

FAKE_SUITE_SRC = '''
import torch
from gpuquant.bench import Case, Provider, Suite

def _cases(quick, device):
    out = []
    for n in (1000, 33000):
        def inputs(i, n=n):
            return torch.randn(n)
        out.append(Case(
            params={{"op": "sum", "numel": n}},
            inputs=inputs,
            providers={{"base": lambda x: (lambda: x.sum()),
                        "ours": Provider(lambda x: (lambda: x.cumsum(0)[-1]),
                                         check=lambda x, y: {check})}},
            throughput=lambda p, ms: (4 * p["numel"] / (ms * 1e-3) / 1e9, "GB/s")))
    return out

SUITE = Suite(name="{name}", baseline="base", cases=_cases, device="{device}")
'''


@pytest.fixture
def fast(monkeypatch):
    """Tiny time budgets and fixed ceilings so run_bench-level tests take well under a second."""
    monkeypatch.setattr(RunConfig, "for_run", classmethod(
        lambda cls, quick, device: cls(budget_s=0.01, min_reps=5, max_input_sets=3)))
    monkeypatch.setattr(ceil_mod, "measure_ceilings", lambda device, quick=False: FAKE_CEILINGS)


@pytest.fixture
def fake_suite(tmp_path, monkeypatch):
    """Write suite modules into tmp_path and register them; unregister afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    names = []

    def make(name, device="cpu", check="True", src=None):
        mod = f"_gq_bench_{name}"
        (tmp_path / f"{mod}.py").write_text(
            src if src is not None else FAKE_SUITE_SRC.format(name=name, device=device, check=check))
        registry.register_suite(name, mod, device)
        names.append(name)
        return name
    yield make
    for n in names:
        registry.unregister_suite(n)


# ---------------------------------------------------------------------------------- stats
def test_percentile_matches_numpy():
    vals = list(np.random.rand(37) * 10)
    for q in (0.0, 0.2, 0.5, 0.8, 1.0):
        assert percentile(vals, q) == pytest.approx(float(np.percentile(vals, 100 * q)), rel=1e-12)
    with pytest.raises(ValueError):
        percentile([], 0.5)
    with pytest.raises(ValueError):
        percentile([1.0], 1.5)


# ---------------------------------------------------------------------------------- run_case
def _counting_case(log):
    def make(name, delay_iters):
        def setup(inp):
            def run():
                log.append((name, inp["id"]))
                return inp["x"].sum()
            return run
        return setup

    return Case(params={"n": 7, "kind": "toy"},
                inputs=lambda i: {"id": i, "x": torch.randn(7)},
                providers={"a": make("a", 0), "b": make("b", 0), "c": make("c", 0)},
                throughput=lambda p, ms: (p["n"] / ms, "items/ms"))


def test_run_case_interleaves_providers_and_rotates_inputs():
    log = []
    cfg = RunConfig(budget_s=0.002, min_reps=20, max_reps=20, rounds=4, max_input_sets=5)
    res = run_case("toy", _counting_case(log), "cpu", cfg)
    assert [r["provider"] for r in res.rows] == ["a", "b", "c"]
    # warm-up: every provider once per input set (5 sets were built), untimed;
    # then 3 warm calls (sets 1..3) give the provider's repeat estimate
    assert log[:24] == [(p, i) for p in "abc" for i in (0, 1, 2, 3, 4, 1, 2, 3)]
    timed = log[24:]
    assert len(timed) == 60
    # 4 rounds of 5 calls per provider, the provider order rotating each round
    blocks = [timed[k:k + 5] for k in range(0, 60, 5)]
    owners = [{p for p, _ in b} for b in blocks]
    assert all(len(o) == 1 for o in owners)
    assert [o.pop() for o in owners] == list("abc" + "bca" + "cab" + "abc")
    for p in "abc":
        assert {i for q, i in timed if q == p} == set(range(5))   # every set used


def test_repeat_estimate_ignores_first_calls():
    """A provider that packs its weights on its first call on each set (slow once, then fast)
    gets as many repeats as an eager one: the estimate comes from warm calls only."""
    seen, counts = set(), {"lazy": 0, "eager": 0}

    def lazy(x):
        def run():
            if id(x) not in seen:
                seen.add(id(x))
                time.sleep(0.02)
            counts["lazy"] += 1
            return x
        return run

    def eager(x):
        def run():
            counts["eager"] += 1
            return x
        return run

    case = Case(params={"n": 4}, inputs=lambda i: torch.zeros(4),
                providers={"lazy": lazy, "eager": eager},
                throughput=lambda p, ms: (1.0, "x"))
    run_case("toy", case, "cpu", RunConfig(budget_s=0.01, min_reps=2, max_reps=40, rounds=2,
                                           max_input_sets=4))
    assert counts["lazy"] == counts["eager"] == 4 + 3 + 40


def test_input_sets_are_distinct_and_reproducible():
    made = []
    case = Case(params={"n": 123}, inputs=lambda i: made.append(torch.randn(123)) or made[-1],
                providers={"p": lambda x: (lambda: x + 1)},
                throughput=lambda p, ms: (1.0 / ms, "1/ms"))
    cfg = RunConfig(budget_s=0.001, min_reps=5, max_reps=5, max_input_sets=4)
    run_case("toy", case, "cpu", cfg)
    first = [t.clone() for t in made[:4]]
    assert len(first) == 4
    assert all(not torch.equal(first[i], first[j]) for i in range(4) for j in range(i + 1, 4))
    made.clear()
    run_case("toy", case, "cpu", cfg)
    assert all(torch.equal(a, b) for a, b in zip(first, made[:4]))


def test_input_rotation_respects_memory_budget():
    case = Case(params={"n": 1 << 18}, inputs=lambda i: torch.randn(1 << 18),  # 1 MiB a set
                providers={"p": lambda x: (lambda: x)}, throughput=lambda p, ms: (1.0, "x"))
    cfg = RunConfig(max_input_sets=8, input_bytes=3 << 20, rotate_bytes=64 << 20)
    assert len(harness._build_input_sets(case, cfg)) == 3
    cfg = RunConfig(max_input_sets=8, input_bytes=64 << 20, rotate_bytes=2 << 20)
    assert len(harness._build_input_sets(case, cfg)) == 2
    # a module in an input set counts its parameters and buffers (linear_dynamic's sets
    # hold their weights in an nn.Linear: they counted 0 bytes, so a case kept up to
    # max_input_sets of them whatever the caps said)
    lin = torch.nn.Linear(256, 1024)  # 1 MiB of weight, 4 KiB of bias
    bn = torch.nn.BatchNorm1d(8)      # buffers too
    assert harness._nbytes({"lin": lin, "x": torch.zeros(4)}) == (256 * 1024 + 1024 + 4) * 4
    assert harness._nbytes(bn) == sum(t.numel() * t.element_size()
                                      for t in (*bn.parameters(), *bn.buffers()))
    case = Case(params={"n": 2}, inputs=lambda i: {"lin": torch.nn.Linear(256, 1024)},
                providers={"p": lambda x: (lambda: x)}, throughput=lambda p, ms: (1.0, "x"))
    cfg = RunConfig(max_input_sets=8, input_bytes=64 << 20, rotate_bytes=2 << 20)
    assert len(harness._build_input_sets(case, cfg)) == 2


def test_run_case_rows_stats_check_unavailable_and_errors():
    def slow_setup(x):
        def run():
            s = 0
            for _ in range(2000):
                s += 1
            return x
        return run

    def unavailable(x):
        raise ProviderUnavailable("needs cupy")

    def broken(x):
        return lambda: x.reshape(5)   # 7 elements: raises at warm-up

    case = Case(params={"n": 7},
                inputs=lambda i: torch.randn(7),
                providers={"slow": Provider(slow_setup, check=lambda x, y: torch.equal(x, y)),
                           "fast": Provider(lambda x: (lambda: x), check=lambda x, y: None),
                           "wrong": Provider(lambda x: (lambda: x + 1),
                                             check=lambda x, y: bool(torch.equal(x, y))),
                           "cupy": unavailable, "broken": broken},
                throughput=lambda p, ms: (p["n"] / (ms * 1e-3), "items/s"))
    res = run_case("toy", case, "cpu", RunConfig(budget_s=0.01, max_input_sets=2))
    by = {r["provider"]: r for r in res.rows}
    assert set(by) == {"slow", "fast", "wrong"}
    assert res.unavailable == {"cupy": "needs cupy"}
    assert list(res.errors) == ["broken"] and "RuntimeError" in res.errors["broken"]
    for r in res.rows:
        assert tuple(r) == ROW_FIELDS
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["throughput"] == pytest.approx(7 / (r["median_ms"] * 1e-3))
        assert r["case"] == "n=7" and r["params"] == {"n": 7} and r["suite"] == "toy"
    assert [by[p]["exact_vs_numpy"] for p in ("slow", "fast", "wrong")] == [True, None, False]
    assert by["slow"]["median_ms"] > by["fast"]["median_ms"]


def test_case_validation():
    ok = dict(inputs=lambda i: None, providers={"p": lambda x: (lambda: 0)},
              throughput=lambda p, ms: (1.0, "x"))
    with pytest.raises(TypeError, match="params"):
        Case(params={"shape": (1, 2)}, **ok)
    with pytest.raises(TypeError, match="params"):
        Case(params={}, **ok)
    with pytest.raises(ValueError, match="no providers"):
        Case(params={"n": 1}, inputs=ok["inputs"], providers={}, throughput=ok["throughput"])
    with pytest.raises(ValueError, match="device"):
        harness.Suite(name="x", baseline="p", cases=lambda q, d: [], device="tpu")


# ---------------------------------------------------------------------------------- pairing, ratios
def _row(provider, params, ms, thr=1.0, unit="GB/s", case=None, suite="s", exact=None):
    return {"suite": suite, "case": case or provider, "provider": provider, "params": params,
            "median_ms": ms, "p20_ms": ms * 0.9, "p80_ms": ms * 1.1, "throughput": thr,
            "unit": unit, "exact_vs_numpy": exact}


def test_pair_rows_by_equal_params():
    rows = [_row("torch", {"m": 64, "n": 33}, 2.0, case="label one"),
            _row("ours", {"n": 33, "m": 64}, 1.0, case="another label"),   # key order differs
            _row("torch", {"m": 64, "n": 7}, 3.0),
            _row("ours", {"m": 64, "n": 7}, 1.5),
            _row("ours", {"m": 64, "n": 123}, 1.5),                        # no baseline row
            _row("ours", {"m": 64, "n": 7}, 9.0, suite="other")]           # other suite
    groups = pair_rows(rows)
    assert [p for p, _ in groups] == [{"m": 64, "n": 33}, {"m": 64, "n": 7}, {"m": 64, "n": 123},
                                      {"m": 64, "n": 7}]
    assert {k: v["median_ms"] for k, v in groups[0][1].items()} == {"torch": 2.0, "ours": 1.0}
    assert set(groups[2][1]) == {"ours"}
    assert groups[3][1]["ours"]["suite"] == "other"
    with pytest.raises(ValueError, match="two rows"):
        pair_rows(rows + [_row("torch", {"m": 64, "n": 7}, 3.0)])


def test_ratio_and_ceiling_arithmetic():
    assert report.speedup(2.0, 0.5) == 4.0          # 4x faster than the baseline
    assert report.speedup(1.0, 4.0) == 0.25
    assert report.speedup(None, 1.0) is None and report.speedup(1.0, 0.0) is None
    assert report.geomean([4.0, 0.25, 1.0]) == pytest.approx(1.0)
    f = ceil_mod.fraction_of_ceiling
    assert f(50.0, "GB/s", FAKE_CEILINGS) == pytest.approx(0.5)
    assert f(0.25, "TB/s", FAKE_CEILINGS) == pytest.approx(2.5)      # unit scaling
    assert f(0.1, "TOPS", FAKE_CEILINGS) == pytest.approx(0.2)       # vs 500 GOPS
    assert f(1.0, "TFLOPS", FAKE_CEILINGS) == pytest.approx(0.5)
    assert f(100.0, "images/s", FAKE_CEILINGS) is None
    assert f(1.0, "GB/s", None) is None

    doc = {"baseline": "torch", "ceilings": FAKE_CEILINGS,
           "rows": [_row("ours", {"n": 1}, 0.5, thr=80.0), _row("torch", {"n": 1}, 2.0, thr=20.0),
                    _row("ours", {"n": 2}, 1.0, thr=10.0, unit="images/s")]}
    (p1, rows1), (p2, rows2) = report.annotate(doc)
    assert [r["provider"] for r in rows1] == ["torch", "ours"]        # baseline first
    assert [r["ratio"] for r in rows1] == [1.0, 4.0]
    assert [r["fraction"] for r in rows1] == [pytest.approx(0.2), pytest.approx(0.8)]
    assert rows2[0]["ratio"] is None and rows2[0]["fraction"] is None


# ---------------------------------------------------------------------------------- run_bench
def test_run_bench_writes_json_md_png(fast, fake_suite, tmp_path, capsys):
    name = fake_suite("toy_cpu")
    out = tmp_path / "out"
    assert run_bench([name], quick=True, out=str(out), command="gpuquant bench toy_cpu") == 0
    doc = json.loads((out / f"{name}.json").read_text())
    assert list(doc)[:len(HEADER_FIELDS)] == list(HEADER_FIELDS)
    assert doc["command"] == "gpuquant bench toy_cpu" and doc["cupy"] is None
    assert doc["torch"] == torch.__version__ and doc["date"][:2] == "20" and "T" in doc["date"]
    assert doc["device"] == harness.device_name("cpu")
    assert doc["suite"] == name and doc["baseline"] == "base" and doc["ceilings"] == FAKE_CEILINGS
    assert len(doc["rows"]) == 4
    for row in doc["rows"]:
        assert list(row) == list(ROW_FIELDS)
        assert row["unit"] == "GB/s" and row["throughput"] > 0
    report.validate_doc(doc)
    assert {r["provider"]: r["exact_vs_numpy"] for r in doc["rows"]} == {"base": None, "ours": True}
    md = (out / f"{name}.md").read_text()
    assert "| op | numel | provider |" in md and "`ours`" in md and "vs base" in md
    assert "1.00x" in md and "of ceiling" in md
    png = (out / f"{name}.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    log = capsys.readouterr().out
    assert f"[{name} 1/2]" in log and f"[{name} 2/2]" in log and "summary" in log
    assert "exact 2/2" in log


def test_run_bench_inexact_output_fails(fast, fake_suite, tmp_path, capsys):
    name = fake_suite("toy_wrong", check="False")
    assert run_bench([name], quick=True, out=str(tmp_path), command="c") == 1
    assert "differs from the NumPy oracle" in capsys.readouterr().out
    doc = json.loads((tmp_path / f"{name}.json").read_text())
    assert {r["exact_vs_numpy"] for r in doc["rows"] if r["provider"] == "ours"} == {False}


def test_gpu_suite_skipped_without_cuda(fast, fake_suite, tmp_path, capsys):
    # the module would fail to import: a GPU suite is not even imported on the CPU
    name = fake_suite("toy_gpu", device="cuda", src="raise RuntimeError('imported on CPU')\n")
    cpu = fake_suite("toy_cpu2")
    rc = run_bench([name, cpu], quick=True, out=str(tmp_path), command="c", cuda_available=False)
    assert rc == 0
    assert f"suite {name} needs a CUDA GPU: skipped" in capsys.readouterr().out
    assert not (tmp_path / f"{name}.json").exists() and (tmp_path / f"{cpu}.json").exists()


def test_any_device_suite_runs_on_cpu_without_cuda(fake_suite):
    assert registry.suite_device("quant") == "any"
    s = registry.load_suite("quant")
    assert s.run_device(False) == "cpu" and s.run_device(True) == "cuda"
    assert harness.Suite("g", "b", lambda q, d: [], device="cuda").run_device(False) is None


def test_unknown_suite_is_an_error_listing_suites(capsys, tmp_path):
    assert run_bench(["no_such_suite"], out=str(tmp_path), command="c") == 2
    err = capsys.readouterr().err
    assert "unknown suite 'no_such_suite'" in err and "quant" in err
    with pytest.raises(ValueError, match="unknown suite"):
        registry.load_suite("no_such_suite")
    assert not list(tmp_path.iterdir())


def test_unwritten_suite_not_listed_but_broken_one_raises(fake_suite, tmp_path, capsys):
    registry.register_suite("ghost", "gpuquant.bench.suites._never_written", "cpu")
    try:
        assert "ghost" in registry.registered() and "ghost" not in registry.written()
        assert run_bench(["ghost"], out=str(tmp_path), command="c") == 2
        assert "not written yet" in capsys.readouterr().err
    finally:
        registry.unregister_suite("ghost")
    name = fake_suite("toy_broken", src="import _gq_no_such_dependency_xyz\n")
    assert name in registry.written()
    with pytest.raises(ModuleNotFoundError, match="_gq_no_such_dependency_xyz"):
        registry.load_suite(name)


def test_suite_module_must_match_registry(fake_suite):
    name = fake_suite("toy_mismatch", device="any",
                      src=FAKE_SUITE_SRC.format(name="toy_mismatch", device="cpu", check="True"))
    with pytest.raises(ValueError, match="registry says"):
        registry.load_suite(name)


def test_device_slug():
    assert device_slug("cpu", machine="x86_64") == "cpu-x86"
    assert device_slug("cpu", machine="AMD64") == "cpu-x86"
    assert device_slug("cpu", machine="aarch64") == "cpu-arm"
    assert device_slug("cpu", machine="ppc64le") == "cpu-ppc64le"
    assert device_slug("cuda", name="NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert device_slug("cuda", name="NVIDIA A100-SXM4-40GB") == "nvidia-a100-sxm4-40gb"
    with pytest.raises(ValueError):
        device_slug("tpu")
    if not torch.cuda.is_available():  # (torch's AssertionError had come out)
        with pytest.raises(ValueError, match="no CUDA device here; pass name="):
            device_slug("cuda")


def test_validate_doc_rejects_bad_documents():
    good = {k: "x" for k in HEADER_FIELDS}
    good["date"] = "2026-11-26T12:00:00+00:00"
    good["rows"] = [_row("a", {"n": 1}, 1.0)]
    report.validate_doc(good)
    import json  # any key order is a valid JSON object
    report.validate_doc(json.loads(json.dumps(good, sort_keys=True)))
    for bad in ({k: v for k, v in good.items() if k != "date"},
                dict(good, date="last tuesday"), dict(good, device=None),
                dict(good, rows=[dict(_row("a", {"n": 1}, 1.0), provider=None)]),
                dict(good, rows=[dict(_row("a", {"n": {"nested": [1]}}, 1.0))]),
                dict(good, rows=[dict(_row("a", {"n": float("nan")}, 1.0))]),
                dict(good, rows=[dict(_row("a", {"n": 1}, 1.0), median_ms=-1.0, p20_ms=-2.0)]),
                dict(good, rows=[dict(_row("a", {"n": 1}, 1.0), extra=1)]),
                dict(good, rows=[dict(_row("a", {"n": 1}, 1.0), median_ms=float("nan"))]),
                dict(good, rows=[dict(_row("a", {"n": 1}, 1.0), p20_ms=5.0)]),
                dict(good, rows=[dict(_row("a", {"n": 1}, 1.0), exact_vs_numpy="yes")])):
        with pytest.raises(ValueError):
            report.validate_doc(bad)


# ---------------------------------------------------------------------------------- README table
def _sample_doc(device, baseline_ms, ours_ms):
    doc = {"device": device, "torch": "2.11.0", "triton": "3.6.0", "cupy": None,
           "gpuquant": "0.1.0", "date": "2026-11-25T12:00:00+00:00",
           "command": "gpuquant bench quant --quick", "suite": "quant", "baseline": "torch",
           "quick": True, "ceilings": FAKE_CEILINGS,
           "rows": [_row("torch", {"numel": 1024}, baseline_ms, thr=25.0, suite="quant"),
                    _row("gpuquant-numpy", {"numel": 1024}, ours_ms, thr=75.0, suite="quant",
                         exact=True)]}
    return doc


def test_readme_table_from_results_dir(tmp_path):
    res = tmp_path / "bench" / "results"
    for slug, dev, b, o in (("cpu-x86", "AMD EPYC", 3.0, 1.0),
                            ("nvidia-h100-80gb-hbm3", "NVIDIA H100 80GB HBM3", 1.0, 0.25),
                            ("local", "scratch", 1.0, 1.0)):
        (res / slug).mkdir(parents=True)
        report.write_json(_sample_doc(dev, b, o), str(res / slug / "quant.json"))
    report.write_png(_sample_doc("AMD EPYC", 3.0, 1.0), str(res / "cpu-x86" / "quant.png"))
    (res / "cpu-x86" / "counters-calls.json").write_text("[]")  # no suite's: left out
    readme = tmp_path / "README.md"
    readme.write_text(textwrap.dedent(f"""\
        # project
        intro
        ## Benchmarks
        {readme_table.START}
        stale numbers
        {readme_table.END}
        ## After
        kept
        """))
    assert readme_table.main(["--results", str(res), "--write", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# project\nintro\n## Benchmarks\n") and text.endswith("## After\nkept\n")
    assert "stale numbers" not in text and "scratch" not in text     # `local` left out
    block = text[text.index(readme_table.START):text.index(readme_table.END)]
    assert block.index("### `cpu-x86`") < block.index("### `nvidia-h100-80gb-hbm3`")
    assert "#### `quant` on AMD EPYC" in block and "#### `quant` on NVIDIA H100 80GB HBM3" in block
    assert "`gpuquant bench quant --quick`" in block and "2026-11-25T12:00:00+00:00" in block
    assert "3.00x" in block and "4.00x" in block and "75%" in block and "| yes |" in block
    assert "](bench/results/cpu-x86/quant.png)" in block
    # idempotent: a second run gives the same file
    assert readme_table.main(["--results", str(res), "--write", str(readme)]) == 0
    assert readme.read_text() == text
    with pytest.raises(ValueError, match="exactly one"):
        readme_table.replace_block("no markers", "x")
    (tmp_path / "bad.md").write_text(readme_table.END + "\n" + readme_table.START + "\n")
    assert readme_table.main(["--results", str(res), "--write", str(tmp_path / "bad.md")]) == 2


# ---------------------------------------------------------------------------------- quant suite, ceilings
def test_quant_suite_checks_are_real():
    """The quant suite's exact_vs_numpy checks pass on correct outputs and catch one wrong
    element, for every op / mode / granularity (one small case each)."""
    cases = {}
    for c in registry.load_suite("quant").cases(True, "cpu"):
        cases.setdefault((c.params["op"], c.params["mode"], c.params["granularity"]), c)
    assert len(cases) == 8
    for key, case in cases.items():
        assert case.params["numel"] == 65536 and "torch" in case.providers
        assert "gpuquant-reference" in case.providers
        torch.manual_seed(0)
        inp = case.inputs(0)
        for name in ("torch", "gpuquant-reference"):   # other backends: their own tests
            prov = case.providers[name]
            out = prov.setup(inp)()
            assert prov.check(inp, out) is True, (key, name)
        bad = out[0].clone() if isinstance(out, tuple) else out.clone()
        flat = bad.view(-1)
        flat[123] = flat[123] + (1 if not bad.is_floating_point() else 0.5)
        assert prov.check(inp, (bad, out[1]) if isinstance(out, tuple) else bad) is False, key


def test_cpu_ceilings_measured():
    c = ceil_mod.measure_ceilings("cpu", quick=True)
    assert c["bandwidth"]["unit"] == "GB/s" and c["bandwidth"]["value"] > 0.1
    assert c["float"]["unit"] == "GFLOPS" and c["float"]["value"] > 0.1
    assert c["int8"]["value"] == c["float"]["value"]
    with pytest.raises(ValueError):
        ceil_mod.measure_ceilings("tpu")


# ---------------------------------------------------------------------------------- GPU path
class _FakeEvent:
    """Stands in for torch.cuda.Event: records a virtual clock advanced by the timed calls."""
    clock = [0.0]

    def record(self):
        self.t = self.clock[0]

    def elapsed_time(self, other):
        return other.t - self.t


def test_cuda_timer_bookkeeping_with_fake_events():
    """The CUDA-event timer's logic on the CPU: flush before every call, times resolved only
    at sync, each into its own provider's sink, in call order."""
    flushes, syncs = [], []
    timer = harness._CudaTimer(event=_FakeEvent, synchronize=lambda: syncs.append(1),
                               flush=lambda: flushes.append(1))

    def work(ms):
        def fn():
            _FakeEvent.clock[0] += ms
        return fn

    a, b = harness.Timing(), harness.Timing()
    for ms in (1.0, 2.0, 3.0):
        timer.time_call(work(ms), a)
        timer.time_call(work(10 * ms), b)
    assert a.times_ms == [] and len(flushes) == 6
    timer.sync()
    assert a.times_ms == [1.0, 2.0, 3.0] and b.times_ms == [10.0, 20.0, 30.0] and syncs == [1]
    timer.sync()
    assert a.times_ms == [1.0, 2.0, 3.0]   # nothing resolved twice


def test_cuda_timer_head_start_comes_before_the_flush():
    """Suite.gpu_head_start_ms: the GPU-side wait is enqueued before each timed call's flush
    (so the queue is busy while the host submits the call); checked values."""
    order = []
    timer = harness._CudaTimer(event=_FakeEvent, synchronize=lambda: None,
                               flush=lambda: order.append("flush"),
                               head_start=lambda: order.append("wait"))
    for _ in range(2):
        timer.time_call(lambda: order.append("call"), harness.Timing())
    assert order == ["wait", "flush", "call"] * 2
    assert harness.make_timer("cpu", 0.3) is not None  # no GPU: plain wall-clock timer
    for bad in (-1, 11, True, "0.3"):
        with pytest.raises(ValueError, match="gpu_head_start_ms"):
            harness.Suite(name="s", baseline="b", cases=lambda q, d: [],
                          gpu_head_start_ms=bad)
    from gpuquant.bench.suites.fake_quant import SUITE
    assert SUITE.gpu_head_start_ms == 0.3


@pytest.mark.gpu
def test_quant_suite_and_ceilings_on_gpu(tmp_path):
    assert run_bench(["quant"], quick=True, out=str(tmp_path), command="test") == 0
    doc = report.load_json(str(tmp_path / "quant.json"))
    assert doc["device"] == torch.cuda.get_device_name()
    assert set(doc["ceilings"]) == {"bandwidth", "int8", "float"}
    assert doc["ceilings"]["int8"]["unit"] == "TOPS" and doc["ceilings"]["int8"]["value"] > 1
    assert all(r["exact_vs_numpy"] for r in doc["rows"])
    assert {r["provider"] for r in doc["rows"]} >= {"torch", "gpuquant-reference"}


def test_markdown_flags_noisy_rows():
    doc = _sample_doc("AMD EPYC", 2.0, 1.0)
    assert "†" not in report.render_markdown(doc)
    doc["rows"][1].update(p20_ms=0.5, median_ms=0.7, p80_ms=0.8)   # 1.6 x spread
    md = report.render_markdown(doc)
    assert "0.7 [0.5, 0.8] †" in md and "the machine was busy" in md


def test_run_bench_where_and_skip_select_cases_and_providers(fast, fake_suite, tmp_path, capsys):
    name = fake_suite("toy_where")
    out = tmp_path / "out"
    assert run_bench([name], quick=True, out=str(out), command="c", where="numel=33000",
                     skip="ours") == 0
    doc = json.loads((out / f"{name}.json").read_text())
    # one case left; "ours" skipped
    assert [(r["params"]["numel"], r["provider"]) for r in doc["rows"]] == [(33000, "base")]
    capsys.readouterr()
    # the baseline is never skipped: naming it is refused (it had been ignored silently)
    assert run_bench([name], quick=True, out=str(out), command="c", skip="ours,base") == 2
    assert "'base' is suite 'toy_where''s baseline, always measured" in capsys.readouterr().err
    assert run_bench([name], quick=True, out=str(out), command="c",
                     where="numel=1000|33000,op=sum") == 0
    assert len(json.loads((out / f"{name}.json").read_text())["rows"]) == 4
    capsys.readouterr()
    assert run_bench([name], quick=True, out=str(out), command="c", where="batch=64") == 2
    assert "has no param 'batch'" in capsys.readouterr().err
    assert run_bench([name], quick=True, out=str(out), command="c", where="numel") == 2
    assert "expected NAME=VALUE" in capsys.readouterr().err


def test_run_case_times_with_the_garbage_collector_off():
    """The timed calls run with gc disabled (as timeit does); its state is restored."""
    import gc
    seen = []

    def prov(x):
        return lambda: seen.append(gc.isenabled()) or x.sum()
    case = Case(params={"n": 8}, inputs=lambda i: torch.randn(8),
                providers={"base": prov, "other": prov},
                throughput=lambda p, ms: (1.0 / ms, "1/ms"))
    assert gc.isenabled()
    harness.run_case("t", case, "cpu", RunConfig(budget_s=0.01, min_reps=5, max_input_sets=2))
    assert gc.isenabled() and seen and seen[-1] is False


# ---------------------------------------------------------------------------------- failures
def _raising_after(calls, exc=RuntimeError("boom")):
    """A provider whose calls succeed ``calls`` times, then raise ``exc``."""
    count = {"n": 0}

    def setup(x):
        def run():
            count["n"] += 1
            if count["n"] > calls:
                raise exc
            return x
        return run
    return setup


def test_provider_raising_mid_timing_is_dropped_others_keep_rows():
    calls = {"good": 0}

    def good(x):
        return lambda: calls.__setitem__("good", calls["good"] + 1) or x
    # 2 input sets: 2 warm-up + 2 estimate calls, then the 7th call (in the timed rounds) raises
    case = Case(params={"n": 4}, inputs=lambda i: torch.zeros(4),
                providers={"bad": _raising_after(6), "good": good},
                throughput=lambda p, ms: (1.0, "x"))
    cfg = RunConfig(budget_s=0.001, min_reps=20, max_reps=20, rounds=5, max_input_sets=2)
    res = run_case("s", case, "cpu", cfg)
    assert [r["provider"] for r in res.rows] == ["good"]
    assert res.errors == {"bad": "RuntimeError: boom"}
    assert calls["good"] == 2 + 2 + 20          # every round ran without the dropped provider


def test_out_of_memory_frees_the_cache(monkeypatch):
    """A CUDA out-of-memory error: recorded like any error, and the allocator's cache given
    back (torch.cuda.empty_cache) before the next provider runs; the frames of the failed
    call are cleared, so what they held is freed."""
    freed, held = [], []   # freed: at each empty_cache, whether the hog's tensor was gone
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: freed.append(held[0]() is None))

    def hog(x):
        def run():
            big = torch.empty(1000)
            held.append(weakref.ref(big))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return run
    case = Case(params={"n": 4}, inputs=lambda i: torch.zeros(4),
                providers={"hog": hog, "ok": lambda x: (lambda: x),
                           "late": Provider(_raising_after(
                               3, torch.cuda.OutOfMemoryError("out of memory, timed")))},
                throughput=lambda p, ms: (1.0, "x"))
    res = run_case("s", case, "cpu", RunConfig(budget_s=0.001, min_reps=5, max_input_sets=1))
    assert [r["provider"] for r in res.rows] == ["ok"]
    assert set(res.errors) == {"hog", "late"} and "OutOfMemoryError" in res.errors["late"]
    assert freed == [True, True]


FAILING_SUITE_SRC = '''
import torch
from gpuquant.bench import Case, Provider, ProviderUnavailable, Suite

CALLS = {{}}

def _cases(quick, device):
    {cases_raise}
    out = []
    for n in (1000, 2000, 3000):
        def inputs(i, n=n):
            if n == 2000:
                raise MemoryError("no room for the inputs")
            return torch.randn(n)

        def flaky(x):
            def run():
                CALLS["flaky"] = CALLS.get("flaky", 0) + 1
                if CALLS["flaky"] > 12:
                    raise RuntimeError("flaky died mid-timing")
                return x.sum()
            return run

        def missing(x):
            raise ProviderUnavailable("needs a gizmo")

        def counted(x, n=n):
            def run():
                CALLS[n] = CALLS.get(n, 0) + 1
                return x.sum()
            return run
        out.append(Case(
            params={{"op": "sum", "numel": n}}, inputs=inputs,
            providers={{"base": counted, "flaky": flaky, "gizmo": missing}},
            throughput=lambda p, ms: (4 * p["numel"] / (ms * 1e-3) / 1e9, "GB/s")))
    return out

SUITE = Suite(name="{name}", baseline="base", cases=_cases, device="cpu", min_reps={min_reps})
'''


def _failing_suite(fake_suite, name, cases_raise=False, min_reps=None):
    return fake_suite(name, src=FAILING_SUITE_SRC.format(
        name=name, min_reps=min_reps,
        cases_raise="raise RuntimeError('the suite itself is broken')" if cases_raise else ""))


def test_run_bench_records_failures_and_goes_on(fast, fake_suite, tmp_path, capsys,
                                                monkeypatch):
    """A provider dying mid-timing, a case whose inputs fail and a suite that fails as a
    whole are all recorded (exit 1); the other providers, cases and suites still run, and
    the JSON and markdown keep the errors, the unavailable providers and the tuning mode."""
    monkeypatch.setenv("GPUQUANT_TRITON_TUNE", "quick")
    broken = _failing_suite(fake_suite, "toy_broken_whole", cases_raise=True)
    name = _failing_suite(fake_suite, "toy_failing")
    out = tmp_path / "out"
    rc = run_bench([broken, name], quick=True, out=str(out), command="c", save_each_case=True)
    assert rc == 1
    log = capsys.readouterr().out
    assert not (out / f"{broken}.json").exists()
    doc = json.loads((out / f"{name}.json").read_text())
    report.validate_doc(doc)
    assert not (out / f"{name}.partial.json").exists()
    # case 1: flaky's 13th call raises in the timed rounds (6 untimed calls before them), the
    # baseline keeps its row; case 2: its inputs fail, no rows; case 3 runs (flaky fails
    # again, in its warm-up)
    by_case = {}
    for r in doc["rows"]:
        by_case.setdefault(r["params"]["numel"], set()).add(r["provider"])
    assert by_case == {1000: {"base"}, 3000: {"base"}}
    assert doc["errors"] == [
        f"{name} [op=sum numel=1000] flaky: RuntimeError: flaky died mid-timing",
        f"{name} [op=sum numel=2000]: MemoryError: no room for the inputs",
        f"{name} [op=sum numel=3000] flaky: RuntimeError: flaky died mid-timing"]
    assert doc["unavailable"] == {"gizmo": "needs a gizmo"}
    try:
        import triton  # noqa: F401
        assert doc["triton_tune"] == "quick"
    except ImportError:
        assert doc["triton_tune"] is None
    md = (out / f"{name}.md").read_text()
    assert "Unavailable here" in md and "`gizmo`: needs a gizmo" in md
    assert "Errors:" in md and "no room for the inputs" in md
    # the summary lists every problem, the broken suite's included
    problems = log[log.index("problem(s):"):]
    assert f"{broken}: RuntimeError: the suite itself is broken" in problems
    assert "no room for the inputs" in problems and "flaky died" in problems


def test_suite_min_reps_honoured(fast, fake_suite, tmp_path):
    from gpuquant.bench.suites import load_suite
    name = _failing_suite(fake_suite, "toy_min_reps", min_reps=40)
    run_bench([name], quick=True, out=str(tmp_path), command="c")
    mod = __import__(f"_gq_bench_{name}")
    # 3 input sets: 3 warm-up + 3 estimate calls, then the timed ones
    assert mod.CALLS[1000] - 6 >= 40 and mod.CALLS[3000] - 6 >= 40
    assert RunConfig.for_run(True, "cpu").min_reps == 5       # the harness's default
    for suite, at_least in (("qat_step", 15), ("models", 15), ("conv", 10)):
        assert load_suite(suite).run_config(True, "cpu").min_reps >= at_least, suite
    with pytest.raises(ValueError, match="min_reps"):
        harness.Suite("x", "p", lambda q, d: [], min_reps=0)


def test_exact_checks_dtype_shape_and_sampled_rows():
    a = torch.arange(12, dtype=torch.int8).reshape(4, 3)
    assert harness.exact(a, a.clone()) and not harness.exact(a.int(), a)   # dtype
    assert not harness.exact(a.reshape(3, 4), a) and not harness.exact(None, a)
    rows = harness.sample_rows(4)
    assert rows.tolist() == [0, 1, 2, 3] and harness.sample_rows(100, 2).tolist() == [0, 99]
    assert harness.sample_rows(1000).tolist()[-1] == 999 and len(harness.sample_rows(1000)) == 8
    assert harness.exact_rows(a, a[[0, 3]], torch.tensor([0, 3]), 4)
    assert not harness.exact_rows(a[:3], a[[0, 2]], torch.tensor([0, 2]), 4)  # rows missing
    bad = a.clone()
    bad[3, 2] += 1
    assert not harness.exact_rows(bad, a[[0, 3]], torch.tensor([0, 3]), 4)


def test_summary_keeps_ratios_against_different_providers_apart():
    """A -graph provider is compared graph against graph where that row exists, else with
    the eager baseline: the summary gives one line per comparison, not one mean."""
    doc = {"device": "cpu", "torch": "2", "triton": None, "cupy": None, "gpuquant": "0",
           "date": "2026-01-01T00:00:00+00:00", "command": "x", "suite": "s",
           "baseline": "torch",
           "rows": [_row("torch", {"n": 1}, 10.0), _row("torch-graph", {"n": 1}, 1.0),
                    _row("gpuquant-triton-graph", {"n": 1}, 1.0), _row("torch", {"n": 2}, 10.0),
                    _row("gpuquant-triton-graph", {"n": 2}, 1.0)]}
    lines = [ln for ln in report.summary_lines([doc]) if "gpuquant-triton-graph" in ln]
    assert len(lines) == 2
    assert any("1.00x vs torch-graph" in ln for ln in lines)
    assert any("10.00x vs torch " in ln for ln in lines)


def test_geomean_refuses_values_that_are_no_ratio():
    assert report.geomean([None, 4.0, 1.0]) == 2.0 and report.geomean([None]) is None
    for bad in ([0.0, 4.0], [-1.0], [float("nan")], [float("inf")], ["a"]):
        with pytest.raises(ValueError, match="geomean: values must be finite numbers > 0"):
            report.geomean(bad)


def test_run_config_checks_its_knobs():
    from gpuquant.bench.harness import RunConfig
    for kw in ({"max_input_sets": 0}, {"min_reps": 0}, {"min_reps": 10, "max_reps": 3},
               {"budget_s": -1.0}):
        with pytest.raises(ValueError, match="RunConfig"):
            RunConfig(**kw)


def test_head_start_counts_toward_the_repeat_budget():
    """Suite.gpu_head_start_ms: the GPU-side wait before every timed call is device time
    the events leave out; the repeat count must still fill the budget with it included.
    (A 10 us call with fake_quant's 0.3 ms head start ran 5000 times: 1.55 s of GPU time
    for a 0.1 s quick budget, per provider and case: the fake_quant stage would have run
    ~4x its lease cap.)"""
    _FakeEvent.clock[0] = 0.0

    def sleep():
        _FakeEvent.clock[0] += 0.3   # GPU time of the head start (before the start event)

    timer = harness._CudaTimer(event=_FakeEvent, synchronize=lambda: None, flush=lambda: None,
                               head_start=sleep)
    timer.head_start_ms = 0.3   # what make_timer(..., 0.3) gives it

    def prov(x):
        def call():
            _FakeEvent.clock[0] += 0.01
        return call
    case = Case(params={"n": 1}, inputs=lambda i: torch.zeros(1), providers={"a": prov},
                throughput=lambda p, ms: (1.0 / ms, "GB/s"))
    cfg = RunConfig(budget_s=0.1, min_reps=5, max_reps=5000, max_input_sets=1)
    t0 = _FakeEvent.clock[0]
    res = run_case("s", case, "cpu", cfg, timer=timer)
    assert res.rows and res.rows[0]["median_ms"] == pytest.approx(0.01)  # the wait untimed
    gpu_ms = _FakeEvent.clock[0] - t0
    assert gpu_ms <= 1.2 * cfg.budget_s * 1e3, gpu_ms   # ~0.1 s, not 1.55 s
    assert harness._CpuTimer.head_start_ms == 0.0


def test_qat_step_gpuquant_rows_refuse_a_fallback_backend(monkeypatch):
    """qat_step's gpuquant-qat* rows on CUDA tensors are the triton backend's; where it
    cannot run (an import error under another Triton, TRITON_INTERPRET set) the QAT
    modules' automatic backend choice would run the reference backend's fake quant under
    the same row name: the provider is unavailable instead, saying why. The float rows and
    the CPU runs (explicit backends, the stand-in timing) are untouched."""
    from types import SimpleNamespace

    from gpuquant import backends
    from gpuquant.bench.suites import qat_step as Q
    params = Q.case_params(True, models=("resnet18",))[0]
    built = []
    monkeypatch.setitem(Q.BUILDERS, "gpuquant-qat",
                        lambda name, dev: built.append(dev) or torch.nn.Linear(1, 1))
    monkeypatch.setattr(backends, "available", lambda: ["reference", "numpy", "cupy"])
    cuda_inp = {"x": SimpleNamespace(device=torch.device("cuda")), "target": None}
    for kind in ("gpuquant-qat", "gpuquant-qat-graph"):
        with pytest.raises(ProviderUnavailable, match="triton"):
            Q._provider(kind, params, {}).setup(cuda_inp)
    assert built == []   # refused before any model was built or moved
    monkeypatch.setattr(backends, "available", lambda: ["reference", "numpy", "triton"])
    monkeypatch.setattr(backends, "current", lambda: "reference")
    with pytest.raises(ProviderUnavailable, match="'reference'"):
        Q._provider("gpuquant-qat", params, {}).setup(cuda_inp)
    # CPU tensors: unchanged (the CPU test of the suite, the stand-in's host timing)
    cpu_inp = {"x": torch.zeros(1, 3, 4, 4), "target": torch.zeros(1, dtype=torch.long)}
    Q._provider("gpuquant-qat", params, {}).setup(cpu_inp)
    assert built == [torch.device("cpu")]


def test_linear_dynamic_weight_only_rows_are_compared_with_the_float_ceiling():
    """The weight-only rows (gpuquant-triton-w8, torchao-w8, and their -graph twins) run
    bf16 x bf16 MMAs (the int8 weights converted before the dot): their "of ceiling" is a
    fraction of the bf16 peak (TFLOPS), as torch-bf16's, not of the int8 peak (the H200's
    m=2048 w8 rows read 39-43% of the int8 peak, ~50% of the bf16 one). W8A8 rows: TOPS."""
    from gpuquant.bench.suites import linear_dynamic as L
    cases = L._cases(True, "cpu")   # builds no tensors
    ceilings = {"int8": {"value": 1000.0, "unit": "TOPS", "what": "t"},
                "float": {"value": 500.0, "unit": "TFLOPS", "what": "t"}}
    seen = set()
    for c in cases:
        for name, prov in c.providers.items():
            unit = prov.unit or c.throughput(c.params, 1.0)[1]
            want = "TFLOPS" if name.startswith("torch-bf16") or "-w8" in name else "TOPS"
            assert unit == want, (c.name, name, unit)
            seen.add(name)
    assert {"gpuquant-triton-w8", "gpuquant-triton-w8-graph", "torchao-w8",
            "torchao-w8-graph", "gpuquant-triton", "torchao-graph"} <= seen
    from gpuquant.bench.ceilings import fraction_of_ceiling
    assert fraction_of_ceiling(250.0, "TFLOPS", ceilings) == 0.5


def test_results_file_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """run_bench rewrites <suite>.partial.json after every case and the lease kills a stage
    at its deadline (SIGTERM: no cleanup): a kill during the rewrite must leave the previous
    file, not a truncated one (which lost every row so far and broke readme_table)."""
    path = str(tmp_path / "fake_quant.partial.json")
    first = _sample_doc("AMD EPYC", 2.0, 1.0)
    report.write_json(first, path)
    real_dump = json.dump

    def killed_mid_write(doc, f, **kw):
        text = json.dumps(doc, **kw)
        f.write(text[: len(text) // 2])
        f.flush()
        raise KeyboardInterrupt  # stands in for the SIGTERM that ends the process
    monkeypatch.setattr(json, "dump", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        report.write_json(_sample_doc("AMD EPYC", 3.0, 1.0), path)
    monkeypatch.setattr(json, "dump", real_dump)
    assert report.load_json(path)["rows"] == first["rows"]
    assert [f for f in os.listdir(tmp_path) if f.endswith(".json")] == ["fake_quant.partial.json"]


def test_quant_suite_qparams_live_on_the_inputs_device():
    """The gpuquant providers' QParams hold the same device tensors the torch provider reads:
    CPU qparams made every timed gpuquant call on a GPU copy scale and zero point over first
    (a host sync in the timed window) while torch's call copied nothing. ("meta" stands in
    for a GPU here: any device other than the CPU shows it.)"""
    from gpuquant.bench.suites import quant
    for op, mode, _ in quant._OPS:
        for granularity in ("per_tensor", "per_channel"):
            torch.manual_seed(0)
            inp = quant._make_inputs(op, mode, granularity, 4096, "meta")(0)
            assert inp["x"].device.type == "meta"
            assert inp["qp"].scale is inp["scale"] and inp["qp"].zero_point is inp["zp"]
            assert inp["qp"].scale.device.type == "meta", (op, mode, granularity)
    # on the CPU the suite's qparams are still what QParams validates and checks pass with
    torch.manual_seed(0)
    inp = quant._make_inputs("fake_quant", "fwd", "per_channel", 4096, "cpu")(0)
    from gpuquant import QParams
    assert inp["qp"] == QParams(inp["qp"].dtype, inp["scale"], inp["zp"], axis=0)


def test_quant_suite_checks_see_the_output_dtype():
    """An output of the right values in another dtype (float64 for a float32 dequantize or
    fake_quant, int32 for an int8 quantize) is not exact: NumPy's array_equal alone let it
    pass."""
    from gpuquant.bench.suites import quant
    for op, mode, _ in quant._OPS:
        for granularity in ("per_tensor", "per_channel"):
            torch.manual_seed(0)
            inp = quant._make_inputs(op, mode, granularity, 4096, "cpu")(0)
            prov = quant._torch_provider(op, mode)
            out = prov.setup(inp)()
            assert prov.check(inp, out) is True, (op, mode, granularity)

            def other(t):
                return t.double() if t.is_floating_point() else t.to(torch.int32)
            bad = tuple(other(o) for o in out) if isinstance(out, tuple) else other(out)
            assert prov.check(inp, bad) is False, (op, mode, granularity)
            if isinstance(out, tuple):  # only the gradient in another dtype
                assert prov.check(inp, (out[0], other(out[1]))) is False
