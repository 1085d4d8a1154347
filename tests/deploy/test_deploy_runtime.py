"""gpuquant.runtime: exported models executed with NumPy only equal gpuquant's int8 output byte
for byte; checked in a subprocess where importing torch fails."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from gpuquant.export import to_onnx

from conftest import int8_forward

pytest.importorskip("onnx")
REPO = Path(__file__).resolve().parents[2]

_CHECK = textwrap.dedent("""
    import sys

    class _NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError(f"import of {name} blocked by the test")

    sys.meta_path.insert(0, _NoTorch())
    import numpy as np
    import gpuquant.runtime as rt

    for name in sys.argv[1:]:
        sess = rt.load(name + ".onnx")
        for i in range(2):
            x = np.load(f"{name}.x{i}.npy")
            want = np.load(f"{name}.y{i}.npy")
            got = sess.run(x)
            assert got.dtype == want.dtype and got.shape == want.shape, (name, got.shape)
            assert got.tobytes() == want.tobytes(), (name, i, int((got != want).sum()))
    loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
    assert not loaded, loaded
    print("RUNTIME-OK", len(sys.argv) - 1)
""")


def test_runtime_bit_exact_without_torch(zoo_int8, zoo_uint8, resnet18_int8, mobilenet_int8,
                                         digits, tmp_path):
    qd, x_te, _ = digits
    cases = {"zoo_int8": (zoo_int8, [torch.randn(3, 3, 13, 11), torch.randn(1, 3, 9, 16)]),
             "zoo_uint8": (zoo_uint8, [torch.randn(5, 3, 13, 11), torch.randn(2, 3, 7, 7)]),
             "resnet18": (resnet18_int8, [torch.randn(1, 3, 32, 32), torch.randn(2, 3, 33, 35)]),
             "mobilenet_v2": (mobilenet_int8, [torch.randn(2, 3, 32, 32),
                                               torch.randn(1, 3, 40, 24)]),
             "digits": (qd, [x_te, x_te[:7]])}
    for name, (model, xs) in cases.items():
        base = tmp_path / name
        to_onnx(model, xs[0], f"{base}.onnx")
        for i, x in enumerate(xs):
            np.save(f"{base}.x{i}.npy", x.numpy())
            np.save(f"{base}.y{i}.npy", int8_forward(model, x))
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", _CHECK, *cases], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "RUNTIME-OK 5" in r.stdout, r.stdout + r.stderr


def test_runtime_in_process_matches_and_keeps_int_semantics(zoo_uint8, tmp_path):
    import gpuquant.runtime as rt
    path = tmp_path / "z.onnx"
    to_onnx(zoo_uint8, torch.randn(2, 3, 13, 11), path)
    sess = rt.load(path)
    assert sess.input_names == ["input"] and sess.output_names == ["output"]
    x = torch.randn(4, 3, 13, 11)
    # float64 input is converted to float32 first, as gpuquant's QuantStub sees float32
    got = sess.run(x.numpy().astype(np.float64))
    assert got.tobytes() == int8_forward(zoo_uint8, x).tobytes()
    assert sess.run({"input": x.numpy()}).tobytes() == got.tobytes()


def test_runtime_errors(zoo_int8, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    import gpuquant.runtime as rt
    with pytest.raises(FileNotFoundError):
        rt.load(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(ValueError, match="junk.onnx"):
        rt.load(junk)
    with pytest.raises(TypeError, match="path"):
        rt.load(42)
    g = helper.make_graph([helper.make_node("Sigmoid", ["x"], ["y"], name="sig")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    plain = tmp_path / "plain.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(plain))
    with pytest.raises(rt.RuntimeFormatError, match="'sig' \\(Sigmoid\\).*not supported"):
        rt.load(plain)
    path = tmp_path / "z.onnx"
    to_onnx(zoo_int8, torch.randn(1, 3, 8, 8), path)
    sess = rt.load(path)
    with pytest.raises(TypeError, match="float array"):
        sess.run(np.zeros((1, 3, 8, 8), np.int8))
    with pytest.raises(TypeError, match="numpy.ndarray"):
        sess.run(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"must have shape \['N', 3, 8, 8\].*got \[1, 4, 8, 8\]"):
        sess.run(np.zeros((1, 4, 8, 8), np.float32))
    with pytest.raises(ValueError, match="must have shape"):
        sess.run(np.zeros((3, 8, 8), np.float32))
    with pytest.raises(ValueError, match="expects inputs"):
        sess.run(np.zeros((1, 3, 8, 8), np.float32), np.zeros(3, np.float32))


def test_int8_output_without_dequant_stub(zoo_uint8, tmp_path):
    """A model ending on a quantized module exports an int8 / uint8 graph output."""
    import gpuquant.runtime as rt
    seq = torch.nn.Sequential(zoo_uint8.quant, zoo_uint8.c1, zoo_uint8.c2).eval()
    x = torch.randn(2, 3, 6, 9)
    with torch.no_grad():
        from gpuquant import backends
        with backends.use("numpy"):
            want = seq(x)
    path = tmp_path / "q.onnx"
    proto = to_onnx(seq, x, path)
    assert proto.graph.output[0].type.tensor_type.elem_type == 2  # UINT8
    got = rt.load(path).run(x.numpy())
    assert got.dtype == np.uint8 and got.shape == tuple(want.shape)
    assert got.tobytes() == want.numpy().tobytes()


def test_runtime_nan_and_empty_batch_match_the_int8_model(zoo_int8, tmp_path):
    """NaN input raises the int8 model's ValueError (it has no quantized value); an empty
    batch gives the model's empty output (through conv, pools, flatten, linear)."""
    import gpuquant.runtime as rt
    path = tmp_path / "z.onnx"
    to_onnx(zoo_int8, torch.randn(2, 3, 13, 11), path)
    sess = rt.load(path)
    x = torch.randn(3, 3, 13, 11)
    x[1, 2, int(torch.randint(0, 13, ())), int(torch.randint(0, 11, ()))] = float("nan")
    with pytest.raises(ValueError, match="quantize: x contains NaN") as want:
        int8_forward(zoo_int8, x)
    with pytest.raises(ValueError, match="quantize: x contains NaN") as got:
        sess.run(x.numpy())
    assert str(got.value) == str(want.value)
    empty = torch.randn(0, 3, 13, 11)
    want = int8_forward(zoo_int8, empty)
    got = sess.run(empty.numpy())
    assert want.shape[0] == 0 and got.shape == want.shape and got.dtype == want.dtype
    # and a batch after the empty one is still exact
    assert sess.run(x[:1].numpy()).tobytes() == int8_forward(zoo_int8, x[:1]).tobytes()
