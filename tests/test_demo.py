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


@pytest.mark.parametrize("bad", ["", "afile", "afile/sub", "d", "e"])
def test_demo_bad_out_is_a_usage_error_up_front(tmp_path, capsys, monkeypatch, bad):
    """A bad --out exits with argparse's code 2 before any training: also a folder where a
    file the demo writes is a folder (it failed after the training)."""
    from gpuquant import cli, demo
    (tmp_path / "afile").write_text("")
    (tmp_path / "d" / "demo.json").mkdir(parents=True)
    (tmp_path / "e" / "digits_int8.onnx").mkdir(parents=True)
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


@pytest.mark.parametrize("kw,err,msg", [
    ({"float_epochs": 0}, ValueError, "run_demo: float_epochs must be an int >= 1, got 0"),
    ({"qat_epochs": -3}, ValueError, "run_demo: qat_epochs must be an int >= 1, got -3"),
    ({"float_epochs": 1.5}, TypeError, "run_demo: float_epochs must be an int >= 1, got float 1.5"),
    ({"quiet": "no"}, TypeError, "quiet must be a bool"),
])
def test_demo_arguments_are_checked_up_front(kw, err, msg):
    from gpuquant.demo import run_demo
    with pytest.raises(err, match=msg):
        run_demo(**kw)


def test_demo_qat_evaluation_does_not_calibrate_on_the_test_set(monkeypatch):
    """The QAT model's test-set evaluation runs with its observers off: the ranges converted
    to int8 are the training data's (observers record in eval mode too)."""
    from gpuquant import demo
    seen = []
    real = demo._predict

    def spy(model, x):
        from gpuquant.quantization.observer import Observer
        seen.append([m.enabled for m in model.modules() if isinstance(m, Observer)])
        return real(model, x)
    monkeypatch.setattr(demo, "_predict", spy)
    demo.run_demo(float_epochs=1, qat_epochs=1, quiet=True)
    qat_calls = [s for s in seen if s]  # the QAT model's call (the int8 ones have none)
    assert qat_calls and not any(any(s) for s in qat_calls)
