"""``gpuquant demo``: the README's targets on scikit-learn's digits."""
import json

import pytest

pytest.importorskip("sklearn")


def test_demo_meets_targets(tmp_path, capsys):
    from gpuquant.cli import main
    assert main(["demo", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "QAT vs int8 top-1 agreement" in printed and "epoch" in printed  # table, progress
    r = json.loads((tmp_path / "demo.json").read_text())
    for k in ("float_acc", "ptq_int8_acc", "qat_acc", "qat_int8_acc", "agreement"):
        assert 0.0 <= r[k] <= 1.0, k
    assert isinstance(r["backend"], str) and r["backend"]
    assert r["float_acc"] >= 0.95
    assert r["float_acc"] - r["ptq_int8_acc"] <= 0.01      # PTQ within 1 point
    assert r["float_acc"] - r["qat_int8_acc"] <= 0.005     # QAT within 0.5 point
    assert r["agreement"] >= 0.99
    assert r["model_bytes_int8"] * 3 < r["model_bytes_float"]
    assert r["fused_pairs"] == 2 and r["fused_identical"] is True  # conv + add, fc + dequant
    assert "int8, epilogues fused" in printed
    # deployment: ONNX export run by gpuquant.runtime (bit-exact) and onnxruntime
    assert (tmp_path / "digits_int8.onnx").is_file()
    assert r["runtime_exact"] is True and abs(r["runtime_acc"] - r["qat_int8_acc"]) < 1e-6
    assert "gpuquant.runtime accuracy" in printed and "onnxruntime int8 accuracy" in printed
    if r["onnxruntime_acc"] is not None:
        assert abs(r["onnxruntime_acc"] - r["qat_int8_acc"]) <= 0.005


@pytest.mark.parametrize("bad", ["", "afile", "afile/sub"])
def test_demo_bad_out_is_a_usage_error_up_front(tmp_path, capsys, monkeypatch, bad):
    """A bad --out exits with argparse's code 2 before any training."""
    from gpuquant import cli, demo
    (tmp_path / "afile").write_text("")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(demo, "_run", lambda *a, **k: pytest.fail("the demo ran"))
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--out", bad])
    assert e.value.code == 2
    assert "argument --out" in capsys.readouterr().err
    with pytest.raises(ValueError, match="out"):
        demo.run_demo(out=bad)
    with pytest.raises(TypeError, match="out"):
        demo.run_demo(out=3)


def test_demo_out_new_nested_folder_is_accepted(tmp_path):
    from gpuquant.demo import out_problem
    assert out_problem(str(tmp_path / "a" / "b")) is None
    assert out_problem(tmp_path) is None
