"""The GPU-lease runner (gpuquant.bench.lease) on the CPU: stage planning under a budget,
the deadline kill, the archive and summary, skipped GPU suites, bad arguments; and the
bench's per-case partial results it relies on."""
import json
import sys
import tarfile

import pytest

from gpuquant.bench import lease, run_bench

from tests.bench.test_harness import fake_suite, fast  # noqa: F401 - fixtures


def test_plan_caps_shares_the_budget():
    assert lease.plan_caps("tests", 1000) == lease.STAGE_CAP["tests"]
    assert lease.plan_caps("linear_dynamic", 1000) == lease.DEFAULT_CAP
    assert lease.plan_caps("gemm", 60) == 60 - lease.PACK_RESERVE_S
    assert lease.plan_caps("gemm", lease.MIN_STAGE_S + lease.PACK_RESERVE_S - 1) is None


def test_stage_killed_at_its_deadline(tmp_path):
    log = tmp_path / "s.log"
    status, rc, secs = lease._run_stage(
        [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
        str(log), 1.5, {"PATH": "/usr/bin:/bin"})
    assert status == "timed out at 2 s" and rc is None and secs < 10
    assert "started" in log.read_text()


def test_lease_runs_stages_and_packs_results(tmp_path, capsys):
    out = tmp_path / "out"
    rc = lease.main(["--out", str(out), "--budget", "120", "--stages", "tests,gemm",
                     "--pytest-args", "-q tests/test_qparams.py -p no:cacheprovider -k dtype"])
    text = (out / "summary.md").read_text()
    assert "| tests | passed |" in text
    gpu = "skipped: needs a CUDA GPU" in text  # on a GPU machine gemm runs instead
    assert rc == (1 if gpu else 0)
    with tarfile.open(out / "lease.tar.gz") as tar:
        names = tar.getnames()
    slug = next(n.split("/")[1] for n in names if n.count("/") == 1)
    for f in ("lease-env.txt", "lease-summary.md", "lease-logs/tests.log", "lease-logs/gemm.log"):
        assert f"results/{slug}/{f}" in names
    assert capsys.readouterr().out.rstrip().endswith("```")  # the summary is printed last


def test_bench_summary_reads_only_suite_results(tmp_path):
    """The results folder also holds JSON that is no suite's results (the counters stage's
    counters-calls.json is a list): the summary leaves it out instead of failing (a lease
    lost every file to this once: the archive is written after the summary)."""
    (tmp_path / "counters-calls.json").write_text(json.dumps([{"label": "x", "ours": True}]))
    (tmp_path / "broken.json").write_text("{")
    (tmp_path / "norows.json").write_text(json.dumps({"suite": "gemm", "rows": "?"}))
    assert lease._bench_summary(str(tmp_path)) == []


def test_lease_archive_is_written_when_the_summary_fails(tmp_path, monkeypatch):
    def broken(results_dir):
        raise RuntimeError("summary bug")
    monkeypatch.setattr(lease, "_bench_summary", broken)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="summary bug"):
        lease.main(["--out", str(out), "--budget", "60", "--stages", "tests",
                    "--pytest-args", "-q tests/test_qparams.py -p no:cacheprovider -k dtype"])
    with tarfile.open(out / "lease.tar.gz") as tar:
        assert any(n.endswith("lease-logs/tests.log") for n in tar.getnames())


def test_lease_skips_stages_without_time(tmp_path):
    out = tmp_path / "out"
    rc = lease.main(["--out", str(out), "--budget", "5", "--stages", "tests,models"])
    text = (out / "summary.md").read_text()
    assert "| tests | skipped: no time left |" in text and "| models | skipped" in text
    assert rc == 1


def test_lease_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        lease.main(["--out", "x", "--stages", "tests,no_such_suite"])
    assert e.value.code == 2 and "unknown stage(s) ['no_such_suite']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        lease.main(["--out", "x", "--budget", "0"])


def test_save_each_case_keeps_partial_rows(fast, fake_suite, tmp_path, monkeypatch):  # noqa: F811
    name = fake_suite("toy_partial")
    out = tmp_path / "res"
    assert run_bench([name], quick=True, out=str(out), command="c", save_each_case=True) == 0
    assert (out / f"{name}.json").exists() and not (out / f"{name}.partial.json").exists()
    # a run that dies before the suite's files are written leaves the measured cases
    from gpuquant.bench import report

    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(report, "write_all", boom)
    with pytest.raises(KeyboardInterrupt):
        run_bench([name], quick=True, out=str(tmp_path / "cut"), command="c",
                  save_each_case=True)
    doc = json.loads((tmp_path / "cut" / f"{name}.partial.json").read_text())
    assert doc["partial"] is True and len(doc["rows"]) == 4 and doc["suite"] == name


def test_lease_survives_a_broken_device_query(tmp_path, monkeypatch):
    """A GPU that torch sees but cannot describe still gets its archive (and says why)."""
    import torch

    def broken(_i):
        raise RuntimeError("CUDA error: unknown error")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", broken)
    out = tmp_path / "out"
    lease.main(["--out", str(out), "--budget", "60", "--stages", "tests",
                "--pytest-args", "-q tests/test_qparams.py -p no:cacheprovider -k dtype"])
    with tarfile.open(out / "lease.tar.gz") as tar:
        env = tar.extractfile("results/unknown-device/lease-env.txt").read().decode()
    assert "device query failed: RuntimeError: CUDA error: unknown error" in env


def test_lease_per_stage_where_skip_cap(tmp_path, monkeypatch):
    """--where / --skip reach the suite's command line, --cap replaces the stage's cap, and
    the profile stage runs the profiler module (which refuses without a GPU)."""
    seen = []

    def fake_run(cmd, log_path, deadline, env):
        seen.append((list(cmd), deadline))
        with open(log_path, "w") as f:
            f.write("ok\n")
        return "passed", 0, 0.0
    monkeypatch.setattr(lease, "_run_stage", fake_run)
    rc = lease.main(["--out", str(tmp_path / "o"), "--budget", "500", "--stages",
                     "models,profile", "--where", "models:model=resnet50,batch=64",
                     "--skip", "models:torch-bf16-compile", "--cap", "models=77",
                     "--profile-args", "--what qat_step --batch 8"])
    assert rc == 0
    (models_cmd, models_cap), (prof_cmd, prof_cap) = seen
    assert models_cap == 77
    i = models_cmd.index("--where")
    assert models_cmd[i + 1] == "model=resnet50,batch=64"
    assert models_cmd[models_cmd.index("--skip") + 1] == "torch-bf16-compile"
    assert prof_cmd[1:4] == ["-m", "gpuquant.bench.profile", "--out"]
    assert prof_cmd[-4:] == ["--what", "qat_step", "--batch", "8"]
    assert prof_cap == lease.STAGE_CAP["profile"]
    # the counters stage runs the ncu driver with its own arguments
    seen.clear()
    lease.main(["--out", str(tmp_path / "oc"), "--budget", "500", "--stages", "counters",
                "--counters-args", "--layers c64-o64-k3-s1-h56"])
    (cnt_cmd, cnt_cap), = seen
    assert cnt_cmd[1:4] == ["-m", "gpuquant.bench.counters", "--out"]
    assert cnt_cmd[-2:] == ["--layers", "c64-o64-k3-s1-h56"]
    assert cnt_cap == lease.STAGE_CAP["counters"]
    # by default the models stage leaves out torch.compile; "models:" keeps every provider
    seen.clear()
    lease.main(["--out", str(tmp_path / "o2"), "--budget", "500", "--stages", "models"])
    cmd = seen[0][0]
    assert cmd[cmd.index("--skip") + 1] == "torch-bf16-compile"
    seen.clear()
    lease.main(["--out", str(tmp_path / "o3"), "--budget", "500", "--stages", "models",
                "--skip", "models:"])
    assert "--skip" not in seen[0][0]


@pytest.mark.parametrize("args,msg", [
    (["--where", "nosuch:a=1"], "--where: expected STAGE:VALUE"),
    (["--skip", "models"], "--skip: expected STAGE:VALUE"),
    (["--cap", "models=abc"], "--cap: seconds must be a number"),
    (["--cap", "models=-1"], "--cap: seconds must be positive"),
])
def test_lease_rejects_bad_per_stage_arguments(args, msg, capsys):
    with pytest.raises(SystemExit) as e:
        lease.main(["--out", "x"] + args)
    assert e.value.code == 2 and msg in capsys.readouterr().err


@pytest.mark.parametrize("args,msg", [
    (["--where", "gemm:m"], "gemm: --where: expected NAME=VALUE"),
    (["--where", "gemm:model=resnet50"], "gemm: --where: suite 'gemm' has no param 'model'"),
    (["--skip", "conv:gpuquant-trtion"], "conv: --skip: no suite run here has a provider"),
])
def test_lease_checks_a_suites_where_and_skip_before_any_stage_runs(args, msg, tmp_path,
                                                                    monkeypatch, capsys):
    """A --where / --skip the suite's gpuquant bench would refuse (exit 2) is refused when
    the lease starts, not when its stage comes up after the tests and the other suites."""
    ran = []
    monkeypatch.setattr(lease, "_run_stage", lambda *a, **k: ran.append(a) or ("passed", 0, 0.0))
    with pytest.raises(SystemExit) as e:
        lease.main(["--out", str(tmp_path / "o"), "--budget", "500"] + args)
    assert e.value.code == 2 and msg in capsys.readouterr().err and not ran


def test_profile_refuses_without_a_gpu_and_bad_arguments(tmp_path, capsys):
    from gpuquant.bench import profile
    if not __import__("torch").cuda.is_available():
        assert profile.main(["--out", str(tmp_path)]) == 1
        assert "needs a CUDA GPU" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        profile.main(["--out", str(tmp_path), "--what", "nope"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        profile.main(["--out", str(tmp_path), "--batch", "0"])


def test_profile_linear_prefill_steps_are_the_suites_calls():
    """``--what linear_prefill``: the linear_dynamic suite's W8A8, weight-only and bf16 calls
    at each (n, k), as the suite sets them up (run here small, through the interpreter;
    their outputs are the suite's own checks' business)."""
    import torch

    from gpuquant import backends
    from gpuquant.bench import profile
    assert "linear_prefill" in profile.WHATS and "linear_prefill" in profile._TIMELINES
    steps = list(profile._linear_steps("resnet50", 64, device="cpu", nk=((40, 48),), m=5))
    assert [t for t, _ in steps] == [f"linear_prefill {p} m=5 n=40 k=48" for p in
                                     ("gpuquant-triton", "gpuquant-triton-w8", "torch-bf16")]
    if "triton" not in backends.available():
        pytest.skip("triton backend unavailable here")
    outs = [step() for _, step in steps]
    assert all(o.shape == (5, 40) and o.dtype == torch.bfloat16 for o in outs)


def test_device_summary_counts_each_device_activity_once():
    import torch

    from gpuquant.bench.profile import device_summary

    class Ev:
        def __init__(self, dev, start, end):
            self.device_type = dev
            self.time_range = type("R", (), {"start": start, "end": end})()
    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    events = [Ev(cpu, 0, 50), Ev(cuda, 10, 17), Ev(cpu, 60, 90), Ev(cuda, 70, 75),
              Ev(cuda, 100, 107), Ev(cuda, 110, 115)]
    assert device_summary(events, steps=2) == (12.0, 2.0)


def test_timeline_lists_the_first_steps_kernels_in_start_order():
    import torch

    from gpuquant.bench.profile import timeline

    class Ev:
        def __init__(self, dev, start, end, name):
            self.device_type, self.name = dev, name
            self.time_range = type("R", (), {"start": start, "end": end})()
    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    events = [Ev(cuda, 70, 75, "b"), Ev(cpu, 0, 50, "host"), Ev(cuda, 10, 17, "a"),
              Ev(cuda, 110, 112, "b"), Ev(cuda, 100, 107, "a")]
    lines = timeline(events, steps=2)
    assert [ln.split() for ln in lines] == [["0", "7.0", "us", "a"], ["1", "5.0", "us", "b"]]


@pytest.mark.gpu
def test_profile_step_reports_on_the_gpu():
    import torch

    from gpuquant.bench.profile import profile_step
    a = torch.randn(256, 256, device="cuda")
    lines = profile_step("mm", lambda: a @ a @ a, kernels=True)
    text = "\n".join(lines)
    assert "every kernel of one step, in order" in text
    assert lines[0] == "## mm"
    # two matmuls: at least two kernels (cuBLAS may add its own, e.g. a split-K reduction)
    launches = float(next(ln for ln in lines if ln.startswith("kernel launches")).split()[-1])
    assert launches >= 2 and launches == int(launches)
    assert "top 25 by GPU time" in text


def _wheel(folder, name, version, init):
    """A minimal wheel (zip) holding package ``name`` with ``__init__.py`` = ``init``."""
    import zipfile
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}/__init__.py", init)
        z.writestr(f"{name}-{version}.dist-info/METADATA", f"Name: {name}\nVersion: {version}\n")
    return path


def test_carried_wheels_import_checked_in_a_child(tmp_path):
    """A carried wheel goes on PYTHONPATH only when a child process imports it: one that
    aborts its interpreter (as a torchao built for another torch does) is reported, not
    used; an installed package is left alone; a bad file name is named."""
    import os

    from gpuquant.bench import wheels
    d = tmp_path / "w"
    d.mkdir()
    ok = _wheel(d, "gqfake_ok", "1.2", "__version__ = '1.2'\n")
    bad = _wheel(d, "gqfake_bad", "0.1", "import os\nos.abort()\n")
    have = _wheel(d, "json", "9.9", "")  # the standard library's json is importable
    junk = d / "junk.whl"
    junk.write_bytes(b"")
    env = dict(os.environ, PYTHONPATH="")
    c = wheels.Carried([str(ok), str(bad), str(have), str(junk)], str(tmp_path / "site"), env)
    paths, line = c.result()
    assert paths == [str(tmp_path / "site" / "gqfake_ok")]
    assert "gqfake_ok 1.2 from the carried wheel" in line
    assert "gqfake_bad 0.1: carried wheel does not import here" in line
    assert "already installed (carried 9.9 not used)" in line.split("json ")[1]
    assert "not a wheel file name" in line and "'junk.whl'" in line
    assert c.result() == (paths, line)  # once
    assert wheels.wheel_package("torchao-0.17.0-cp310-abi3-manylinux_2_28_x86_64.whl") == \
        ("torchao", "0.17.0")


def test_lease_puts_carried_wheels_on_the_suites_path(tmp_path, monkeypatch):
    """--wheels DIR: the linear_dynamic stage (and those after it) see the carried package
    on PYTHONPATH, the stages before it do not; the summary names what was carried."""
    seen = {}

    def fake_run(cmd, log_path, deadline, env):
        seen[cmd[cmd.index("bench") + 1] if "bench" in cmd else cmd[2]] = env["PYTHONPATH"]
        with open(log_path, "w") as f:
            f.write("ok\n")
        return "passed", 0, 0.0
    monkeypatch.setattr(lease, "_run_stage", fake_run)
    d = tmp_path / "w"
    d.mkdir()
    _wheel(d, "gqfake_ok", "1.2", "__version__ = '1.2'\n")
    out = tmp_path / "o"
    assert lease.main(["--out", str(out), "--budget", "500", "--stages",
                       "gemm,linear_dynamic,conv", "--wheels", str(d)]) == 0
    assert "gqfake_ok" not in seen["gemm"]
    assert "gqfake_ok" in seen["linear_dynamic"] and "gqfake_ok" in seen["conv"]
    assert "carried packages: gqfake_ok 1.2 from the carried wheel" in \
        (out / "summary.md").read_text()
    with pytest.raises(SystemExit):
        lease.main(["--out", str(out), "--wheels", str(tmp_path / "nope")])


def test_damaged_carried_files_are_lines_not_crashes(tmp_path):
    """A truncated Triton-cache archive or a wheel whose compressed data is damaged (both
    optional) become a line of the summary; the run goes on."""
    import gzip
    import zipfile

    from gpuquant.bench import wheels
    arc = tmp_path / "cache.tar.gz"
    arc.write_bytes(gzip.compress(b"x" * 100000)[:200])  # truncated gzip: EOFError inside
    n, line = lease._unpack_triton_cache(str(arc), str(tmp_path / "tc"))
    assert n == 0 and "cache.tar.gz" in line
    whl = tmp_path / "gqbad-1.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("gqbad/__init__.py", "x = 1\n" * 2000)
    data = bytearray(whl.read_bytes())
    start = data.index(b"gqbad/__init__.py") + len("gqbad/__init__.py")
    for i in range(start + 10, start + 60):
        data[i] ^= 0x5A
    whl.write_bytes(bytes(data))
    _, note = wheels.Carried([str(whl)], str(tmp_path / "site"), {}).result()
    assert "gqbad 1.0: cannot unzip" in note


def test_stage_children_are_killed_when_the_stage_ends(tmp_path):
    """A stage that exits leaving a child (a stray worker) does not keep it running."""
    import os
    import time
    log = tmp_path / "s.log"
    code = ("import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', "
            "'import time; time.sleep(300)']); print(p.pid, flush=True)")
    status, rc, _ = lease._run_stage([sys.executable, "-c", code], str(log), 30,
                                     dict(os.environ))
    assert status == "passed" and rc == 0
    pid = int(log.read_text().split()[-1])
    time.sleep(0.3)
    state = open(f"/proc/{pid}/stat").read().split()[2] if os.path.exists(f"/proc/{pid}") \
        else "gone"
    assert state in ("Z", "X", "gone")  # killed (a zombie until init reaps it)


def test_stage_arguments_keep_their_quoting(tmp_path, monkeypatch):
    seen = []

    def fake_run(cmd, log_path, deadline, env):
        seen.append(list(cmd))
        with open(log_path, "w") as f:
            f.write("ok\n")
        return "passed", 0, 0.0
    monkeypatch.setattr(lease, "_run_stage", fake_run)
    lease.main(["--out", str(tmp_path / "o"), "--budget", "500", "--stages", "tests",
                "--pytest-args", '-q -k "dtype and not nothing" tests/test_qparams.py',
                "--triton-cache", "none", "--wheels", "none"])
    assert seen[0][-3:] == ["-k", "dtype and not nothing", "tests/test_qparams.py"]


def test_sigterm_still_writes_the_summary_and_archive(tmp_path):
    """An outer timeout's SIGTERM stops the running stage and the run still leaves
    summary.md and lease.tar.gz with what it has."""
    import signal
    import subprocess
    import time
    test = tmp_path / "test_sleep.py"
    test.write_text("import time\n\ndef test_sleep():\n    time.sleep(120)\n")
    import os
    out, work = tmp_path / "out", tmp_path / "work"
    work.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "gpuquant.bench.lease", "--out", str(out),
                             "--budget", "200", "--stages", "tests", "--triton-cache", "none",
                             "--wheels", "none", "--pytest-args",
                             f"-q -p no:cacheprovider {test}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, TMPDIR=str(work)))
    deadline = time.monotonic() + 120
    while not list(work.rglob("tests.log")) and time.monotonic() < deadline:
        time.sleep(0.2)  # the stage has started once its log exists
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    text = (out / "summary.md").read_text()
    assert "stopped by SIGTERM" in text and (out / "lease.tar.gz").exists()
