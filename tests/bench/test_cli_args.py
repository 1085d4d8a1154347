"""``gpuquant bench`` arguments refused before anything is measured, and the recorded
command line."""
import shlex

import pytest

from gpuquant import cli


def test_bad_out_is_a_usage_error(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    for out in (str(f), str(f / "sub"), ""):
        with pytest.raises(SystemExit) as e:
            cli.main(["bench", "quant", "--quick", "--out", out])
        assert e.value.code == 2
    assert "argument --out" in capsys.readouterr().err


def test_where_matching_nothing_and_unknown_skips_are_refused(tmp_path, capsys):
    out = tmp_path / "res"
    out.mkdir()
    (out / "quant.json").write_text("{}")
    assert cli.main(["bench", "quant", "--quick", "--out", str(out),
                     "--where", "op=quantise"]) == 2
    assert "no case of suite 'quant' matches" in capsys.readouterr().err
    assert (out / "quant.json").read_text() == "{}"  # untouched
    assert cli.main(["bench", "quant", "--quick", "--out", str(out),
                     "--skip", "gpuquant-nmpy"]) == 2
    assert "no suite run here has a provider 'gpuquant-nmpy'" in capsys.readouterr().err


def test_recorded_command_is_shell_quoted(monkeypatch, tmp_path):
    seen = {}
    import gpuquant.bench as bench
    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: seen.update(k) or 0)
    argv = ["bench", "quant", "--out", str(tmp_path), "--where", "qdtype=quint8|qint8"]
    assert cli.main(argv) == 0
    assert shlex.split(seen["command"]) == ["gpuquant"] + argv


def test_recorded_command_is_the_exact_python_m_command_line(monkeypatch, tmp_path):
    """Contract section 3: "command" is the exact command line. Run as ``python -m
    gpuquant bench ...`` (``python -m gpuquant ... too``), it was recorded as ``gpuquant
    bench ...``, a command that was not run (and may not be on the PATH)."""
    import os
    import sys
    seen = {}
    import gpuquant.bench as bench
    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: seen.update(k) or 0)
    args = ["bench", "quant", "--quick", "--out", str(tmp_path / "a b")]
    main_py = os.path.join(os.path.dirname(cli.__file__), "__main__.py")
    monkeypatch.setattr(sys, "argv", [main_py] + args)
    monkeypatch.setattr(sys, "orig_argv", ["python3", "-X", "utf8", "-m", "gpuquant"] + args)
    assert cli.main() == 0
    assert shlex.split(seen["command"]) == ["python3", "-X", "utf8", "-m", "gpuquant"] + args
    # the console script: what was typed is ``gpuquant ...``
    monkeypatch.setattr(sys, "argv", ["/venv/bin/gpuquant"] + args)
    monkeypatch.setattr(sys, "orig_argv", ["/venv/bin/python", "/venv/bin/gpuquant"] + args)
    assert cli.main() == 0
    assert shlex.split(seen["command"]) == ["gpuquant"] + args


def test_where_is_checked_for_every_suite_before_any_runs(tmp_path, capsys, monkeypatch):
    """A --where the second suite cannot apply is refused before the first suite (or the
    ceilings) is measured."""
    import gpuquant.bench as bench
    measured = []
    monkeypatch.setattr("gpuquant.bench.ceilings.measure_ceilings",
                        lambda *a, **k: measured.append(a) or {})
    rc = bench.run_bench(["quant", "cpu"], quick=True, out=str(tmp_path / "r"),
                         where="op=linear,m=1")
    assert rc == 2 and not measured and not (tmp_path / "r").exists()
    assert "suite 'quant' has no param" in capsys.readouterr().err


def test_gpu_suite_named_without_a_gpu_exits_3(tmp_path, capsys):
    """Named explicitly, a GPU suite that cannot run here is not a clean success."""
    import gpuquant.bench as bench
    assert bench.run_bench(["gemm"], quick=True, out=str(tmp_path / "g"),
                           cuda_available=False) == 3
    assert "every suite named needs a CUDA GPU" in capsys.readouterr().out


def test_out_that_cannot_be_written_is_refused_even_as_root(tmp_path):
    """os.access says yes to root on /proc; the check tries to write instead, and leaves
    nothing behind where it succeeds."""
    import os

    from gpuquant._paths import out_problem
    assert "cannot be written" in out_problem("/proc/gpuquant-out")
    new = tmp_path / "a" / "b"
    assert out_problem(str(new)) is None and not (tmp_path / "a").exists()
    assert out_problem(str(tmp_path)) is None and os.listdir(tmp_path) == []


def test_repeated_where_and_skip_all_apply(monkeypatch, tmp_path):
    """A second --where / --skip replaced the first (4 cases ran for 1, a skipped provider
    was measured: found by an audit); every one applies now."""
    seen = {}
    import gpuquant.bench as bench
    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: seen.update(k) or 0)
    assert cli.main(["bench", "quant", "--out", str(tmp_path), "--where", "numel=65536",
                     "--where", "op=quantize", "--skip", "gpuquant-numpy", "--skip",
                     "gpuquant-reference"]) == 0
    assert seen["where"] == "numel=65536,op=quantize"
    assert seen["skip"] == "gpuquant-numpy,gpuquant-reference"


def _exit_code(main, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code


def test_bench_tools_refuse_bad_arguments_before_working(tmp_path, capsys):
    """Tracebacks (counters' --out, warm's unknown suite) or a late failure (profile's
    --model after the lease time is spent) where argparse's exit 2 was due (found by an
    audit); the baseline named in --skip was ignored silently."""
    from gpuquant.bench import counters, lease, profile, warm
    f = tmp_path / "afile"
    f.write_text("x")
    assert _exit_code(counters.main, ["--out", str(f)]) == 2
    assert "argument --out" in capsys.readouterr().err
    assert _exit_code(profile.main, ["--out", str(tmp_path / "p"), "--model", "nosuch"]) == 2
    assert "--model: unknown 'nosuch'" in capsys.readouterr().err
    for args, msg in ((["--suites", "nosuch"], "--suites: unknown suite 'nosuch'"),
                      (["--suites", ","], "--suites: no suite named"),
                      (["--budget", "-1"], "--budget must be > 0")):
        assert _exit_code(warm.main, args + ["--jobs", "1"]) == 2, args
        assert msg in capsys.readouterr().err
    assert _exit_code(lease.main, ["--out", str(tmp_path / "l"), "--stages", "gemm",
                                   "--where", "tests:m=1"]) == 2
    assert "'tests' is not a benchmark suite" in capsys.readouterr().err
    assert cli.main(["bench", "quant", "--quick", "--out", str(tmp_path / "b"), "--skip",
                     "torch"]) == 2
    assert "'torch' is suite 'quant''s baseline, always measured" in capsys.readouterr().err


def test_results_files_checked_strictly(tmp_path):
    """exact_vs_numpy 1 / 0.0 passed (1 in (True, False, None) is true in Python) and
    showed as NO; a non-string triton version passed; bad JSON was not named."""
    import json
    from gpuquant.bench import report
    from tests.bench.test_harness import _sample_doc
    doc = _sample_doc("GPU", 2.0, 1.0)
    report.validate_doc(doc)
    for edit, msg in ((lambda d: d["rows"][1].update(exact_vs_numpy=1), "exact_vs_numpy"),
                      (lambda d: d.update(triton=3.6), "'triton' must be a string or null")):
        bad = json.loads(json.dumps(doc))
        edit(bad)
        with pytest.raises(ValueError, match=msg):
            report.validate_doc(bad)
    p = tmp_path / "quant.json"
    p.write_text("{bad")
    with pytest.raises(ValueError, match=r"quant.json: not JSON"):
        report.load_json(str(p))
