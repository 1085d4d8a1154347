"""gpuquant.runtime: exported models executed with NumPy only equal gpuquant's int8 output byte
for byte; checked in a subprocess where importing torch fails."""

import numpy as np
import pytest
import torch

import gpuquant.nn as gnn
from gpuquant.export import to_onnx

from conftest import int8_forward
from deploy_helpers import run_without_torch

pytest.importorskip("onnx")

_CHECK = """
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
"""


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
    r = run_without_torch(_CHECK, tmp_path, *cases)
    assert r.returncode == 0 and "RUNTIME-OK 5" in r.stdout, r.stdout + r.stderr


def test_runtime_in_process_matches_and_keeps_int_semantics(zoo_uint8, tmp_path):
    import gpuquant.runtime as rt
    path = tmp_path / "z.onnx"
    to_onnx(zoo_uint8, torch.randn(2, 3, 13, 11), path)
    sess = rt.load(path)
    assert sess.input_names == ["input"] and sess.output_names == ["output"]
    x = torch.randn(4, 3, 13, 11)
    got = sess.run(x.numpy())
    assert got.tobytes() == int8_forward(zoo_uint8, x).tobytes()
    assert sess.run({"input": x.numpy()}).tobytes() == got.tobytes()


def test_runtime_takes_the_float_dtypes_the_torch_model_takes(zoo_int8, tmp_path):
    """float64 input: the torch int8 model (and to_onnx) raise 'quantize: x must be float32,
    float16 or bfloat16, got torch.float64', the runtime converted it to float32 without a
    word and ran. It now raises a TypeError naming the input, its dtype and the allowed
    ones. float16, which the torch model takes (quantizing it in float32), runs and gives
    its bytes."""
    import gpuquant.runtime as rt
    path = tmp_path / "z.onnx"
    to_onnx(zoo_int8, torch.randn(2, 3, 8, 8), path)
    sess = rt.load(path)
    x = torch.randn(3, 3, 8, 9)
    with pytest.raises(TypeError, match=r"float32, float16 or bfloat16, got torch.float64"):
        zoo_int8(x.double())
    with pytest.raises(TypeError, match=r"input 'input' must be a float32 or float16 array "
                                        r"\(as the torch int8 model takes it\), got float64; "
                                        r"convert with x.astype\(numpy.float32\)"):
        sess.run(x.numpy().astype(np.float64))
    with pytest.raises(TypeError, match=r"input 'input' must be a float32 .*got float64"):
        sess.run({"input": x.numpy().astype(np.float64)})
    h = x.half()
    assert sess.run(h.numpy()).tobytes() == int8_forward(zoo_int8, h).tobytes()
    assert sess.run(x.numpy()).tobytes() == int8_forward(zoo_int8, x).tobytes()


def test_runtime_refuses_batch_other_than_a_fixed_one(zoo_int8, tmp_path):
    """A graph exported with dynamic_batch=False declares its batch: the runtime ran any
    batch (onnxruntime refuses one), so a file meant for batch 2 silently ran others (found
    by review); a dynamic-batch graph still runs any batch."""
    import gpuquant.runtime as rt
    path = tmp_path / "b2.onnx"
    to_onnx(zoo_int8, torch.randn(2, 3, 8, 8), path, dynamic_batch=False)
    sess = rt.load(path)
    x = torch.randn(2, 3, 8, 8)
    assert sess.run(x.numpy()).tobytes() == int8_forward(zoo_int8, x).tobytes()
    for n in (1, 3):
        with pytest.raises(ValueError, match=r"must have shape \[2, 3, 'H', 'W'\] \(batch 2 "
                                             r"only, any spatial size\), got \[%d," % n):
            sess.run(np.zeros((n, 3, 8, 8), np.float32))
    dyn = tmp_path / "bn.onnx"
    to_onnx(zoo_int8, torch.randn(2, 3, 8, 8), dyn)
    assert rt.load(dyn).run(np.zeros((3, 3, 8, 8), np.float32)).shape[0] == 3


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
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(model, str(plain))
    with pytest.raises(rt.RuntimeFormatError, match="not a graph written by .*to_onnx"):
        rt.load(plain)
    helper.set_model_props(model, {"gpuquant.format": "qdq-v1"})
    onnx.save(model, str(plain))
    with pytest.raises(rt.RuntimeFormatError, match="'sig' \\(Sigmoid\\).*not supported"):
        rt.load(plain)
    path = tmp_path / "z.onnx"
    to_onnx(zoo_int8, torch.randn(1, 3, 8, 8), path)
    sess = rt.load(path)
    with pytest.raises(TypeError, match=r"input 'input' must be a float32 or float16 array "
                                        r".*got int8$"):
        sess.run(np.zeros((1, 3, 8, 8), np.int8))
    with pytest.raises(TypeError, match="numpy.ndarray"):
        sess.run(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError,
                       match=r"must have shape \['N', 3, 'H', 'W'\].*got \[1, 4, 8, 8\]"):
        sess.run(np.zeros((1, 4, 8, 8), np.float32))
    with pytest.raises(ValueError, match="must have shape"):
        sess.run(np.zeros((3, 8, 8), np.float32))
    with pytest.raises(ValueError, match="expects inputs"):
        sess.run(np.zeros((1, 3, 8, 8), np.float32), np.zeros(3, np.float32))

    # a dict and positional arrays: the positional ones were dropped without a word
    a = np.random.rand(1, 3, 8, 8).astype(np.float32)
    assert np.array_equal(sess.run({"input": a}), sess.run(a))
    with pytest.raises(TypeError, match=r"z\.onnx: run takes the inputs as one dict name -> "
                                        r"array or as positional arrays, not both: got a dict "
                                        r"of \['input'\] and 1 more positional argument"):
        sess.run({"input": a}, a)


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


class _ConvPool(gnn.Module):
    def __init__(self):
        super().__init__()
        self.quant, self.conv = gnn.QuantStub(), gnn.ConvRelu2d(3, 5, 3, padding=1)
        self.pool, self.dq = gnn.MaxPool2d(2), gnn.DequantStub()

    def forward(self, x):
        return self.dq(self.pool(self.conv(self.quant(x))))


def _set_init(proto, suffix, edit):
    from onnx import numpy_helper
    t = next(t for t in proto.graph.initializer if t.name.endswith(suffix))
    t.CopyFrom(numpy_helper.from_array(edit(numpy_helper.to_array(t)), t.name))


def _set_attr(proto, op, name, value):
    """Set attribute ``name`` of the first node ``op`` (an op type or a node name's end);
    auto_pad replaces the explicit pads."""
    import onnx
    n = next(n for n in proto.graph.node if op in (n.op_type, n.name[-len(op):]))
    keep = [a for a in n.attribute if a.name not in (name, "pads" if name == "auto_pad" else "")]
    del n.attribute[:]
    n.attribute.extend(keep + [onnx.helper.make_attribute(name, value)])


def _drop_q_zero_point(proto):
    q = next(n for n in proto.graph.node if n.op_type == "QuantizeLinear")
    del q.input[2]


_NOT_GPUQUANT_FORM = {
    "weight zero point 5": (lambda p: _set_init(p, "weight_zero_point",
                                                lambda a: np.full_like(a, 5)),
                            r"weight_dq.*weight zero point of 'conv_conv.*\[5, 5, 5, 5, \.\.\.\]"
                            r".*zero point 0"),
    "bias scale doubled": (lambda p: _set_init(p, "bias_scale", lambda a: a * 2),
                           r"bias_dq.*bias of 'conv_conv.*at scale float32\(s_x\) \* s_w"),
    "uint8 weight": (lambda p: (_set_init(p, "conv_weight", lambda a: (a.astype(np.int16) + 128)
                                          .astype(np.uint8)),
                                _set_init(p, "weight_zero_point",
                                          lambda a: np.full(a.shape, 128, np.uint8))),
                     r"weight_dq.*weight of 'conv_conv.*is uint8.*stores int8 weights"),
    "weight axis 1": (lambda p: _set_attr(p, "weight_dq_DequantizeLinear", "axis", 1),
                      r"weight_dq.*weight scale of 'conv_conv.*axis 1\).*axis 0"),
    "conv auto_pad": (lambda p: _set_attr(p, "Conv", "auto_pad", "SAME_UPPER"),
                      r"'conv_conv_Conv' \(Conv\): auto_pad='SAME_UPPER'.*NOTSET"),
    "pool auto_pad": (lambda p: _set_attr(p, "MaxPool", "auto_pad", "SAME_LOWER"),
                      r"\(MaxPool\): auto_pad='SAME_LOWER'"),
    "QuantizeLinear without zero point": (_drop_q_zero_point,
                                          r"\(QuantizeLinear\): QuantizeLinear without a zero "
                                          r"point"),
    "no format metadata": (lambda p: p.ClearField("metadata_props"),
                           r"not a graph written by gpuquant.export.to_onnx \(no "
                           r"'gpuquant.format' metadata"),
}


@pytest.fixture(scope="module")
def conv_pool_int8():
    from deploy_helpers import calibrated
    from gpuquant import backends
    torch.manual_seed(5)
    with backends.use("reference"):
        return calibrated(_ConvPool(), (3, 3, 8, 7), batches=2)


@pytest.mark.parametrize("edit", sorted(_NOT_GPUQUANT_FORM))
def test_runtime_refuses_qdq_graphs_not_in_gpuquants_form(conv_pool_int8, edit):
    """A QDQ graph that is not gpuquant's (other weight zero points / dtype / axis, another
    bias scale, auto_pad, a QuantizeLinear without its zero point, no gpuquant.format
    metadata) is refused naming the node, not run with other numbers (found by review)."""
    import copy

    import gpuquant.runtime as rt
    x = torch.randn(2, 3, 8, 7)
    proto = to_onnx(conv_pool_int8, x)
    # gpuquant's own export loads and runs byte for byte
    assert rt.load(proto).run(x.numpy()).tobytes() == int8_forward(conv_pool_int8, x).tobytes()
    change, match = _NOT_GPUQUANT_FORM[edit]
    bad = copy.deepcopy(proto)
    change(bad)
    with pytest.raises(rt.RuntimeFormatError, match=match):
        rt.load(bad)


def test_runtime_refuses_onnxruntime_quantized_model(tmp_path):
    """onnxruntime's quantize_static QDQ model (uint8 weights with zero points) is refused:
    without gpuquant's metadata, and with it forged, by its weights (found by review)."""
    pytest.importorskip("onnxruntime.quantization")
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)

    import gpuquant.runtime as rt
    rng = np.random.default_rng()
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(4).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
         helper.make_node("Relu", ["c"], ["y"], name="relu")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 6, 5])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(bias, "b")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "float.onnx"))

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": rng.standard_normal((2, 3, 6, 5)).astype(np.float32)}
                            for _ in range(3)])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(tmp_path / "float.onnx"), str(tmp_path / "q.onnx"), Batches(),
                    quant_format=QuantFormat.QDQ, weight_type=QuantType.QUInt8,
                    activation_type=QuantType.QUInt8, per_channel=False)
    with pytest.raises(rt.RuntimeFormatError, match="not a graph written by gpuquant"):
        rt.load(tmp_path / "q.onnx")
    forged = onnx.load(str(tmp_path / "q.onnx"))
    helper.set_model_props(forged, {"gpuquant.format": "qdq-v1"})
    with pytest.raises(rt.RuntimeFormatError, match=r"weight of 'conv' is uint8.*int8 weights"):
        rt.load(forged)
