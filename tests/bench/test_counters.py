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
