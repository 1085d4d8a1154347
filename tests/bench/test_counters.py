"""The Nsight Compute driver's CPU side: ncu's CSV rows to kernels, kernels to the calls
that launched them, the table; the refusals without a GPU or an ncu. (Its profiled run
needs a GPU with readable counters: the lease's ``counters`` stage.)"""
import csv
import io
import os

import pytest

from gpuquant.bench import counters as K

HEADER = ["ID", "Process ID", "Process Name", "Host Name", "Kernel Name", "Context", "Stream",
          "Block Size", "Grid Size", "Device", "CC", "Section Name", "Metric Name",
          "Metric Unit", "Metric Value"]


def _csv(kernels):
    """ncu-like --csv text: messages first, then one row per (launch, metric)."""
    buf = io.StringIO()
    w = csv.writer(buf, quoting=csv.QUOTE_ALL, lineterminator="\n")
    w.writerow(HEADER)
    for i, (name, metrics) in enumerate(kernels):
        for metric, (unit, value) in metrics.items():
            w.writerow([i, 1, "python", "h", name, 1, 7, "(128, 1, 1)", "(1568, 1, 1)", 0,
                        "9.0", "GPU Speed Of Light Throughput", metric, unit, value])
    return "==PROF== Connected to process 1\n[counters] c64: chosen ...\n" + buf.getvalue()


def _metrics(us, l2_bytes, stall_wait):
    return {"Duration": ("usecond", f"{us}"), "L2 Cache Throughput": ("%", "61.5"),
            "lts__t_bytes.sum": ("byte", f"{l2_bytes:,}"),
            "smsp__average_warps_issue_stalled_wait_per_issue_active.ratio": ("", stall_wait),
            "smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio": ("", "0.5")}


OURS = {"_qconv_kernel", "_qgemm_kernel", "_im2col_kernel"}


def test_csv_to_launches_to_calls_to_table():
    kernels = [("_im2col_kernel", _metrics(10, 1000, "1")),
               ("_qgemm_kernel", _metrics(20, 2e6, "2")),
               ("sm90_xmma_fprop_implicit_gemm_bf16(int)", _metrics(30, 3e6, "3")),
               ("_qconv_kernel", _metrics(45.2, 173e6, "4")),
               ("vectorized_elementwise_kernel<...>", _metrics(1, 8, "0")),
               ("_qconv_kernel", _metrics(40.1, 71e6, "5")),
               ("cudnn::implicit_convolve", _metrics(41.6, 200e6, "6"))]
    launches = K.parse_csv(_csv(kernels))
    assert [k["kernel"] for k in launches] == [n for n, _ in kernels]
    assert launches[3]["Duration"] == ("45.2", "usecond")
    calls = [{"label": "stem gpuquant-triton", "ours": True},
             {"label": "stem torch-bf16", "ours": False},
             {"label": "c64 gpuquant-triton", "ours": True},
             {"label": "separator", "ours": False},
             {"label": "c64 gpuquant-triton L1_CACHE=True", "ours": True},
             {"label": "c64 torch-bf16", "ours": False}]
    groups = K.group_kernels(launches, calls, OURS)
    assert [len(run) for _, run in groups] == [2, 1, 1, 1, 1, 1]
    lines = K.summarize(groups)
    table = "\n".join(lines)
    assert "separator" not in table and "vectorized" not in table
    assert lines[0].split()[:4] == ["call", "kernel", "us", "L2%"]
    row = next(ln for ln in lines if ln.startswith("c64 gpuquant-triton L1_CACHE=True"))
    assert "40.1" in row and "71" in row  # us; L2 bytes in MB
    assert "c64 gpuquant-triton / _qconv_kernel: wait 4.00, barrier 0.50" in table
    # a call that launched nothing of its kind, or an extra run: refused, not misattributed
    with pytest.raises(ValueError, match="runs of kernels for"):
        K.group_kernels(launches, calls[:-1], OURS)
    with pytest.raises(ValueError, match="runs of kernels for"):
        K.group_kernels(launches[1:], [dict(calls[0], ours=False)] + calls[1:], OURS)


def test_one_metric_name_in_two_sections_and_base_units():
    """ncu 2025 with --print-units base: durations in "ns"; "Memory Throughput" is both a %
    (SpeedOfLight) and a byte/s figure (MemoryWorkloadAnalysis), in either order: the plain
    name keeps the percentage (the table's mem% column once showed 5.7e+11)."""
    buf = io.StringIO()
    w = csv.writer(buf, quoting=csv.QUOTE_ALL, lineterminator="\n")
    w.writerow(HEADER)
    for i, rows in enumerate([[("Memory Throughput", "byte/s", "571,087,452,471.48"),
                               ("Memory Throughput", "%", "28.73")],
                              [("Memory Throughput", "%", "39.32"),
                               ("Memory Throughput", "byte/s", "1.2e12")]]):
        for metric, unit, value in rows + [("Duration", "ns", "50,496")]:
            w.writerow([i, 1, "python", "h", "_qconv_kernel", 1, 7, "(128, 1, 1)",
                        "(1568, 1, 1)", 0, "9.0", "section", metric, unit, value])
    launches = K.parse_csv(buf.getvalue())
    assert [k["Memory Throughput"] for k in launches] == [("28.73", "%"), ("39.32", "%")]
    assert launches[0]["Memory Throughput [byte/s]"] == ("571,087,452,471.48", "byte/s")
    assert K._number(launches[0]["Duration"]) == pytest.approx(50.496)
    groups = K.group_kernels(launches[:1], [{"label": "c64", "ours": True}], OURS)
    row = K.summarize(groups)[1].split()
    assert row[2:4] == ["50.5", "28.73"]  # us, mem%


def test_parse_csv_without_rows():
    assert K.parse_csv("==PROF== no kernels were profiled\n") == []


def test_our_kernel_names_are_the_jitted_functions():
    names = K.triton_kernel_names()
    assert {"_qconv_kernel", "_qgemm_kernel", "_im2col_kernel"} <= names
    assert not any(n.startswith("sm90_") for n in names)


def test_ncu_command_profiles_only_the_marked_ranges(tmp_path):
    cmd = K.ncu_command("/x/ncu", str(tmp_path), ["c64-o64-k3-s1-h56"], ["lts__t_bytes.sum"])
    assert cmd[0] == "/x/ncu"
    assert cmd[cmd.index("--profile-from-start") + 1] == "off"
    assert cmd[cmd.index("--clock-control") + 1] == "none"
    assert cmd[cmd.index("--print-units") + 1] == "base"  # (ns, bytes: what _number scales)
    assert cmd[cmd.index("--metrics") + 1] == "lts__t_bytes.sum"
    assert cmd[-5:] == ["--inner", "--out", str(tmp_path), "--layers", "c64-o64-k3-s1-h56"]
    assert "--metrics" not in K.ncu_command("/x/ncu", str(tmp_path), ["a"], [])


def test_refusals(tmp_path, monkeypatch):
    with pytest.raises(SystemExit):
        K.main(["--out", str(tmp_path), "--layers", "c1-o1-k9-s1-h1"])
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert K.main(["--out", str(tmp_path)]) == 1
    assert "needs a CUDA GPU" in (tmp_path / "counters.txt").read_text()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert K.find_ncu(str(tmp_path / "nope")) is None
    assert K.main(["--out", str(tmp_path), "--ncu", str(tmp_path / "nope")]) == 1
    assert "no ncu found" in (tmp_path / "counters.txt").read_text()


def test_the_other_copy_form_of_a_chosen_config():
    """The variant profiled next to the autotuner's choice: same tile, pipelined taps,
    L1_CACHE flipped; none for a 1x1 layer (no tap loop)."""
    from gpuquant.backends.triton import conv
    for cfg in conv.conv_configs("sm90"):
        other = K.other_copy_form(cfg, 3)
        assert other.kwargs == {**cfg.kwargs, "PIPE_TAPS": True,
                                "L1_CACHE": not cfg.kwargs["L1_CACHE"]}
        assert (other.num_warps, other.num_stages) == (cfg.num_warps, cfg.num_stages)
        assert K.other_copy_form(cfg, 1) is None
        # every variant is a config the autotuner knows (so the prebuilt cache has it)
        assert any(c.kwargs == other.kwargs and c.num_warps == other.num_warps
                   and c.num_stages == other.num_stages for c in conv.conv_configs("sm90"))


_PROFILED_SCRIPT = r"""
import json
from gpuquant import backends
from gpuquant.backends.triton import conv
from gpuquant.backends.triton.standin import standin_cuda
from gpuquant.bench import counters as K
conv._CONV_TILES["sm90"] = [(64, 64, 64, 8, 4, 2)]  # one tile: three loop forms to compile
conv._TUNED.clear()
events = []
with standin_cuda() as fk, backends.use("triton"):
    kern = conv._conv_kernel("sm90")

    class Profiler:  # what each profiled window holds: the config in force, our launches
        def start(self):
            cfg = kern.best_config.kwargs if kern.best_config is not None else {}
            events.append({"L1_CACHE": cfg.get("L1_CACHE"), "PIPE_TAPS": cfg.get("PIPE_TAPS"),
                           "at": len(fk.launches)})

        def stop(self):
            events[-1]["ours"] = sum(k == "_qconv_kernel" for k, _, _ in
                                     fk.launches[events[-1]["at"]:])
    calls = K.profile_calls(["c64-o64-k3-s1-h56"], device="cpu", batch=1,
                            profiler=Profiler(), sync=lambda: None)
    cached = [dict(c.kwargs) for c in kern.cache.values()]
print("JSON" + json.dumps({"calls": calls, "events": events, "cached": cached}))
"""


def test_profiled_calls_force_each_variant(tmp_path):
    """The profiled process on the stand-in CUDA driver (no GPU; a 3x3 layer, one tile,
    batch 1): a profiled window each for the autotuner's choice, the same tile with
    L1_CACHE flipped (with a separator between the two), and cuDNN's stand-in; each of
    ours launches the conv kernel once with the config said; the choice is back in the
    autotuner's cache afterwards."""
    from tests.compiled import run_json
    out = run_json(_PROFILED_SCRIPT, tmp_path / "triton_cache", GPUQUANT_TRITON_TUNE="quick")
    calls, events = out["calls"], out["events"]
    name = "c64-o64-k3-s1-h56"
    assert calls == [{"label": f"{name} gpuquant-triton", "ours": True},
                     {"label": "separator", "ours": False},
                     {"label": f"{name} gpuquant-triton L1_CACHE=True", "ours": True},
                     {"label": f"{name} torch-bf16", "ours": False}]
    assert len(events) == 4
    # the stand-in times every config alike: the autotuner keeps the first (taps unrolled)
    assert (events[0]["PIPE_TAPS"], events[0]["L1_CACHE"]) == (False, False)
    assert (events[2]["PIPE_TAPS"], events[2]["L1_CACHE"]) == (True, True)
    assert [e["ours"] for e in events] == [1, 0, 1, 0]
    assert [(c["PIPE_TAPS"], c["L1_CACHE"]) for c in out["cached"]] == [(False, False)]


def test_driver_end_to_end_with_a_stand_in_ncu(tmp_path, monkeypatch):
    """main() with an ncu stand-in (a script that answers --query-metrics and, instead of
    profiling, writes the CSV and the calls file the real run would): the metrics asked
    for are those the ncu lists, and counters.txt holds the table."""
    import json
    import stat
    import sys

    import torch
    rows = _csv([("_qconv_kernel", _metrics(45.2, 173e6, "4")),
                 ("sm90_xmma_fprop", _metrics(41.6, 200e6, "1"))])
    calls = [{"label": "c64 gpuquant-triton", "ours": True},
             {"label": "c64 torch-bf16", "ours": False}]
    (tmp_path / "rows.csv").write_text(rows)
    (tmp_path / "calls.json").write_text(json.dumps(calls))
    fake = tmp_path / "ncu"
    fake.write_text(f"""#!{sys.executable}
import shutil, sys
args = sys.argv[1:]
if args == ["--query-metrics"]:
    print("Device GH100\\nlts__t_bytes  bytes through L2\\ndram__bytes_read  bytes read")
    sys.exit(0)
open({str(tmp_path / "args.txt")!r}, "w").write("\\n".join(args))
shutil.copy({str(tmp_path / "rows.csv")!r}, args[args.index("--log-file") + 1])
out = args[args.index("--out") + 1]
shutil.copy({str(tmp_path / "calls.json")!r}, out + "/counters-calls.json")
""")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    out = tmp_path / "out"
    assert K.main(["--out", str(out), "--ncu", str(fake), "--layers",
                   "c64-o64-k3-s1-h56"]) == 0
    args = (tmp_path / "args.txt").read_text().splitlines()
    assert args[args.index("--metrics") + 1] == "lts__t_bytes.sum,dram__bytes_read.sum"
    assert args[-6:] == ["gpuquant.bench.counters", "--inner", "--out", str(out), "--layers",
                         "c64-o64-k3-s1-h56"]
    text = (out / "counters.txt").read_text()
    assert "2 kernels" in text and "c64 gpuquant-triton" in text and "45.2" in text
    # --reread: the table again from the files the run left, no ncu, no GPU
    (out / "counters.txt").unlink()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert K.main(["--out", str(out), "--reread"]) == 0
    again = (out / "counters.txt").read_text()
    assert "reread" in again and again.split("\n\n", 1)[1] == text.split("\n\n", 1)[1]
    (out / "counters-calls.json").unlink()
    assert K.main(["--out", str(out), "--reread"]) == 1
    assert (out / "counters.txt").read_text() == again  # a failed reread keeps the table
