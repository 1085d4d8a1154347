"""Deployment of ``Activation(kind)`` (the int8 table lookup): to_onnx writes it as a Gather of
the int8 / uint8 table indexed by the input's codes (QDQ style, every zero point it adds 0:
the index is the code itself, an int8 input's table stored rotated so that negative codes
count from its back), gpuquant.runtime and onnxruntime give the torch int8 model's bytes,
gpuquant.save / load round-trip it exactly; the exporter's and the runtime's rules name what
they refuse."""
import copy

import numpy as np
import pytest
import torch

import gpuquant
import gpuquant.nn as gnn
from gpuquant import backends
from gpuquant.export import to_onnx
from gpuquant.nn.activation import ACTIVATION_KINDS
from gpuquant.quantization import (ema_fakequant_qconfig, ema_lowbit_fakequant_qconfig,
                                   quantize, quantize_qat)

from conftest import int8_forward
from tests.nn.nn_helpers import uint8_qconfig as uint8_qat_qconfig  # asymmetric quint8
from deploy_helpers import run_without_torch, runtime_bytes

onnx = pytest.importorskip("onnx")
from onnx import numpy_helper  # noqa: E402




class ActNet(gnn.Module):
    """QuantStub -> ConvBn2d -> Activation(k1) -> Conv2d -> Activation(k2) -> DequantStub."""

    def __init__(self, k1="silu", k2="gelu", slope=0.01):
        super().__init__()
        self.quant = gnn.QuantStub()
        self.conv1 = gnn.ConvBn2d(3, 6, 3, padding=1)
        self.act1 = gnn.Activation(k1, negative_slope=slope)
        self.conv2 = gnn.Conv2d(6, 5, 1)
        self.act2 = gnn.Activation(k2, negative_slope=slope)
        self.dequant = gnn.DequantStub()

    def forward(self, x):
        return self.dequant(self.act2(self.conv2(self.act1(self.conv1(self.quant(x))))))


class LinearActNet(gnn.Module):
    """2-D activations: QuantStub -> Linear -> Activation -> Linear -> DequantStub."""

    def __init__(self, kind="tanh"):
        super().__init__()
        self.quant, self.fc1 = gnn.QuantStub(), gnn.Linear(7, 9)
        self.act, self.fc2 = gnn.Activation(kind), gnn.Linear(9, 4)
        self.dequant = gnn.DequantStub()

    def forward(self, x):
        return self.dequant(self.fc2(self.act(self.fc1(self.quant(x)))))


class LookupNet(gnn.Module):
    """QuantStub -> Activation(k1) -> Activation(k2) -> DequantStub: only lookups, so every
    consumer that follows the ONNX spec gives exactly gpuquant's bytes."""

    def __init__(self, k1, k2):
        super().__init__()
        self.quant, self.act1, self.act2 = gnn.QuantStub(), gnn.Activation(k1), \
            gnn.Activation(k2)
        self.dequant = gnn.DequantStub()

    def forward(self, x):
        return self.dequant(self.act2(self.act1(self.quant(x))))


def qat_int8(model, shape, qconfig=ema_fakequant_qconfig, steps=3, seed=0):
    """quantize_qat, a few SGD steps of QAT (reference backend), quantize -> the int8 model."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    with backends.use("reference"):
        q = quantize_qat(model.train(), qconfig)
        params = list(q.parameters())
        opt = torch.optim.SGD(params, lr=1e-2) if params else None  # (LookupNet: none)
        for _ in range(steps):
            x = torch.randn(*shape, generator=g) * 2
            loss = q(x).square().mean()
            if opt is not None:
                opt.zero_grad()
                loss.backward()
                opt.step()
        return quantize(q.eval())


def _other(kind):
    """The next kind, so that each kind appears as both the first and the second activation."""
    return ACTIVATION_KINDS[(ACTIVATION_KINDS.index(kind) + 1) % len(ACTIVATION_KINDS)]


def _acts(model):
    return [m for m in model.modules() if isinstance(m, gpuquant.nn.quantized.Activation)]


def _lookup_order(table, in_dtype):
    """The table as the graph stores it: rotated by 128 for an int8 input (entry i for code
    i, then i - 256 from 128 on: ONNX Gather reads code c at c mod 256), as is for uint8."""
    return np.roll(table, -128) if in_dtype == "qint8" else table


def _check_gather_form(proto, model):
    """Each Activation is a Gather of its table (through DequantizeLinear; rotated for an int8
    input) indexed by Cast(DequantizeLinear(x, 1, 0)): every zero point the lookup adds is 0
    (TensorRT takes no other), and no float activation function is in the graph."""
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    consumers = {}
    for n in proto.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    ops = {n.op_type for n in proto.graph.node}
    assert not ops & {"Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Softplus",
                      "LeakyRelu", "Gelu", "Mish"}, ops
    gathers = [n for n in proto.graph.node if n.op_type == "Gather"]
    acts = _acts(model)
    assert len(gathers) == len(acts)
    for gather, m in zip(gathers, acts):
        table_dq, cast = producer[gather.input[0]], producer[gather.input[1]]
        table, ts, tz = (inits[i] for i in table_dq.input)
        want = _lookup_order(m.table("cpu").numpy(), m._dtypes["input"])
        assert table.tobytes() == want.tobytes() and table.shape == (256,)
        assert ts == np.float32(m.output_scale.item()) and tz == m.output_zero_point.item()
        assert cast.op_type == "Cast" and cast.attribute[0].i in (onnx.TensorProto.INT32,
                                                                   onnx.TensorProto.INT64)
        idx_dq = producer[cast.input[0]]
        assert idx_dq.op_type == "DequantizeLinear" and len(idx_dq.input) == 3
        one, zero = (inits[i] for i in idx_dq.input[1:])
        in_np = np.int8 if m._dtypes["input"] == "qint8" else np.uint8
        assert one.dtype == np.float32 and one == 1.0
        assert zero.dtype == in_np and zero.shape == () and zero == 0  # the code itself
        (q,) = consumers[gather.output[0]]
        assert q.op_type == "QuantizeLinear" and [inits[i] for i in q.input[1:]] == [ts, tz]
        if m._dtypes["output"] == "qint8":  # the symmetric qconfigs: the table's zero point 0
            assert tz == 0


def _qdq_zero_points(proto):
    """{Q / DQ node name: its zero point} of the whole graph."""
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    return {n.name: inits[n.input[2]] for n in proto.graph.node
            if n.op_type in ("QuantizeLinear", "DequantizeLinear")}


@pytest.mark.parametrize("kind", ACTIVATION_KINDS)
def test_export_and_runtime_bit_exact_every_kind(kind, tmp_path):
    """Each kind (first and second activation of the net, qint8): the exported graph is the
    Gather form with gpuquant's tables, and gpuquant.runtime gives the int8 model's bytes on
    fresh inputs, at other batch and spatial sizes than the example's."""
    slope = 0.2 if "leaky_relu" in (kind, _other(kind)) else 0.01
    qm = qat_int8(ActNet(kind, _other(kind), slope), (4, 3, 9, 8))
    assert [m.kind for m in _acts(qm)] == [kind, _other(kind)]
    path = tmp_path / f"{kind}.onnx"
    proto = to_onnx(qm, torch.randn(2, 3, 9, 8), path)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    _check_gather_form(proto, qm)
    # symmetric int8 qconfig: every Q / DQ zero point of the graph is 0, as TensorRT requires
    # (the lookups' index DequantizeLinear included)
    zps = _qdq_zero_points(proto)
    assert sum("index_dq" in k for k in zps) == 2
    assert all(not z.any() for z in zps.values()), \
        {k: z for k, z in zps.items() if z.any()}
    runtime_bytes(qm, path, [torch.randn(3, 3, 9, 8) * 2, torch.randn(1, 3, 12, 5),
                              torch.randn(0, 3, 9, 8)])


@pytest.mark.parametrize("case", ["uint8", "uint8_in_int8_out", "int8_2d"])
def test_uint8_and_2d_activation_bit_exact(case, tmp_path):
    """uint8 input codes (storage minimum 0: no shift), a uint8 -> int8 table, and 2-D
    activations (after a Linear): runtime bytes == the int8 model's."""
    if case == "int8_2d":
        qm, shape = qat_int8(LinearActNet("hardswish"), (16, 7)), (5, 7)
    else:
        model = ActNet("sigmoid", "softplus")
        if case == "uint8_in_int8_out":
            model.act1.qconfig = ema_fakequant_qconfig  # its output qint8, its input quint8
        qm = qat_int8(model, (4, 3, 9, 8), uint8_qat_qconfig)
        d = qm.act1._dtypes
        assert d["input"] == "quint8"
        assert d["output"] == ("qint8" if case == "uint8_in_int8_out" else "quint8")
        shape = (3, 3, 9, 8)
    path = tmp_path / f"{case}.onnx"
    proto = to_onnx(qm, torch.randn(*shape), path)
    _check_gather_form(proto, qm)
    runtime_bytes(qm, path, [torch.randn(*shape) * 3, torch.randn(1, *shape[1:])])


def _code_inputs(model, shape):
    """Float inputs that the QuantStub maps to every code of its dtype (each exactly a
    dequantized code, so any QuantizeLinear rounds them the same way), shuffled."""
    s = np.float32(model.quant.output_scale.item())
    zp = int(model.quant.output_zero_point.item())
    lo = -128 if model.quant._dtypes["output"] == "qint8" else 0
    n = int(np.prod(shape))
    codes = np.resize(np.arange(lo, lo + 256), n)
    codes = np.random.default_rng().permutation(codes)
    x = ((codes - zp).astype(np.float32) * s).reshape(shape)
    with backends.use("numpy"), torch.no_grad():
        q = model.quant(torch.from_numpy(x))
    assert np.array_equal(q.numpy().reshape(-1), codes.reshape(-1))  # every code reached
    return torch.from_numpy(x)


@pytest.mark.parametrize("kinds,qconfig,shape", [
    (("gelu", "mish"), ema_fakequant_qconfig, (2, 4, 8, 8)),
    (("silu", "tanh"), uint8_qat_qconfig, (2, 4, 8, 8)),
    (("elu", "hardsigmoid"), ema_fakequant_qconfig, (2, 256)),
    (("leaky_relu", "gelu_tanh"), uint8_qat_qconfig, (3, 256)),
], ids=["int8", "uint8", "int8_2d", "uint8_2d"])
def test_onnxruntime_lookup_byte_exact(kinds, qconfig, shape, tmp_path):
    """onnxruntime runs the Gather form with gpuquant's bytes: on every input code, two
    chained lookups give exactly the int8 model's output (the Gather of the stored table is
    exact, unlike a float requantization)."""
    qm = qat_int8(LookupNet(*kinds), shape, qconfig)
    path = tmp_path / "lookup.onnx"
    to_onnx(qm, torch.randn(*shape), path)
    x = _code_inputs(qm, shape)
    want = int8_forward(qm, x)
    import gpuquant.runtime as rt
    assert rt.load(path).run(x.numpy()).tobytes() == want.tobytes()
    ort = pytest.importorskip("onnxruntime")
    from gpuquant.export.ort import session as ort_session
    plain = ort.SessionOptions()  # no graph optimization: the nodes as written
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    # ort_session: onnxruntime's defaults (its QDQ rewrites included, where the CPU has VNNI)
    for sess in (ort_session(path), ort.InferenceSession(str(path), plain,
                                                        providers=["CPUExecutionProvider"])):
        got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        assert got.dtype == want.dtype and got.tobytes() == want.tobytes(), \
            int((got != want).sum())


_CHECK = """
    got = rt.load("act.onnx").run(np.load("x.npy"))
    want = np.load("y.npy")
    assert got.dtype == want.dtype and got.tobytes() == want.tobytes()
    assert not [m for m in sys.modules if m == "torch" or m.startswith("torch.")]
    print("RUNTIME-OK")
"""


def test_runtime_runs_activation_without_torch(tmp_path):
    qm = qat_int8(ActNet("mish", "hardswish"), (4, 3, 9, 8), uint8_qat_qconfig)
    to_onnx(qm, torch.randn(2, 3, 9, 8), tmp_path / "act.onnx")
    x = torch.randn(3, 3, 10, 7)
    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "y.npy", int8_forward(qm, x))
    r = run_without_torch(_CHECK, tmp_path)
    assert r.returncode == 0 and "RUNTIME-OK" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("qconfig", ["int8", "uint8"])
def test_save_load_round_trip_exact(qconfig, tmp_path):
    """gpuquant.save / load: kind, negative_slope, dtypes and qparams come back, so the
    tables and the outputs are the same bytes."""
    qc = ema_fakequant_qconfig if qconfig == "int8" else uint8_qat_qconfig
    qm = qat_int8(ActNet("leaky_relu", "gelu_tanh", slope=0.3), (4, 3, 9, 8), qc)
    path = tmp_path / "act.safetensors"
    gpuquant.save(qm, path)
    loaded = gpuquant.load(path, model=ActNet("silu", "silu"))  # the kinds come from the file
    assert not loaded.training
    sa, sb = qm.state_dict(), loaded.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if isinstance(sa[k], torch.Tensor):
            assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
        else:
            assert sa[k] == sb[k], k
    for a, b in zip(_acts(qm), _acts(loaded)):
        assert (b.kind, b.negative_slope, b._dtypes) == (a.kind, a.negative_slope, a._dtypes)
        ta, tb = a.table("cpu"), b.table("cpu")
        assert ta.dtype == tb.dtype and torch.equal(ta, tb)
    assert _acts(loaded)[0].negative_slope == 0.3
    x = torch.randn(3, 3, 11, 6)
    assert int8_forward(loaded, x).tobytes() == int8_forward(qm, x).tobytes()
    # and the reloaded model exports to the same graph
    assert to_onnx(loaded, x).SerializeToString() == to_onnx(qm, x).SerializeToString()


def test_export_refuses_what_it_cannot_write_exactly():
    """An Activation with a 4-bit output (ONNX QuantizeLinear clamps to the full 8-bit
    range) is refused naming the module. (A 4-bit input is refused at its producer; a float
    tensor into an Activation cannot reach the exporter: quantize refuses it.)"""
    model = ActNet("silu", "tanh")
    model.act2.qconfig = ema_lowbit_fakequant_qconfig
    qm = qat_int8(model, (4, 3, 9, 8))
    assert qm.act2._dtypes["output"] not in ("qint8", "quint8")
    with pytest.raises(NotImplementedError, match=r"module 'act2' \(Activation\) uses "
                                                  r"activation dtype q(u)?int4"):
        to_onnx(qm, torch.randn(2, 3, 9, 8))


def _edit(proto, op, fn):
    n = next(n for n in proto.graph.node if n.op_type == op)
    fn(n, proto)


def _set_init(proto, name_part, fn):
    for t in proto.graph.initializer:
        if name_part in t.name:
            t.CopyFrom(numpy_helper.from_array(fn(numpy_helper.to_array(t)), t.name))
            return
    raise AssertionError(name_part)


def _set_gather_axis(n, proto):
    del n.attribute[:]
    n.attribute.extend([onnx.helper.make_attribute("axis", 1)])


def _cast_to_float(n, proto):
    del n.attribute[:]
    n.attribute.extend([onnx.helper.make_attribute("to", onnx.TensorProto.FLOAT)])


def _drop_index_zero_point(proto):
    n = next(n for n in proto.graph.node if n.name.endswith("index_dq_DequantizeLinear"))
    del n.input[2:]  # ONNX's default: uint8 0, not the int8 input's dtype


_INDEX = r"node 'act1_index_Cast' \(Cast\): the index must be DequantizeLinear\(x, scale 1, " \
         r"zero point 0 of x's int8 / uint8 dtype\)"
_NOT_GPUQUANT_FORM = {
    # the index zero point the earlier form had (storage_min: -128), table rotated or not
    "index zero point -128": (
        lambda p: _set_init(p, "act1_index_zero_point", lambda a: np.full_like(a, -128)),
        _INDEX + r".*got scale 1.0, zero point -128 \(int8\) of a int8 tensor"),
    "old form (zero point -128, table not rotated)": (
        lambda p: (_set_init(p, "act1_index_zero_point", lambda a: np.full_like(a, -128)),
                   _set_init(p, "act1_table", lambda a: np.roll(a, 128))),
        _INDEX + r".*zero point -128"),
    "index zero point 1": (
        lambda p: _set_init(p, "act1_index_zero_point", lambda a: np.ones_like(a)),
        _INDEX + r".*zero point 1 \(int8\)"),
    "index zero point dropped": (_drop_index_zero_point, _INDEX + r".*zero point 0 \(None\)"),
    "index scale 2": (lambda p: _set_init(p, "act1_index_scale", lambda a: a * 2),
                      _INDEX + r".*got scale 2.0, zero point 0 \(int8\)"),
    "table scale doubled": (lambda p: _set_init(p, "table_scale", lambda a: a * 2),
                            r"\(Gather\): the table .* must be dequantized with its "
                            r"QuantizeLinear's qparams"),
    "short table": (lambda p: _set_init(p, "act1_table", lambda a: a[:255].copy()),
                    r"a lookup table must be 256 int8 / uint8 entries"),
    "long table": (lambda p: _set_init(p, "act1_table", lambda a: np.concatenate([a, a])),
                   r"a lookup table must be 256 int8 / uint8 entries .*, got int8 of "
                   r"shape \[512\]"),
    "gather axis 1": (lambda p: _edit(p, "Gather", _set_gather_axis), r"\(Gather\): axis 1"),
    "cast to float": (lambda p: _edit(p, "Cast", _cast_to_float),
                      r"indices .* are not a Cast to int32 / int64"),
}


@pytest.fixture(scope="module")
def act_int8():
    return qat_int8(ActNet("gelu", "silu"), (4, 3, 9, 8))


@pytest.mark.parametrize("edit", sorted(_NOT_GPUQUANT_FORM))
def test_runtime_refuses_lookups_not_in_gpuquants_form(act_int8, edit):
    """A Gather lookup in another form (an index zero point other than 0, the earlier
    storage_min form included, or another scale; a table at other qparams than its
    QuantizeLinear's, a table of other than 256 entries, another axis, a float index) is
    refused naming the node, not run with other numbers."""
    import gpuquant.runtime as rt
    x = torch.randn(2, 3, 9, 8)
    proto = to_onnx(act_int8, x)
    assert rt.load(proto).run(x.numpy()).tobytes() == int8_forward(act_int8, x).tobytes()
    change, match = _NOT_GPUQUANT_FORM[edit]
    bad = copy.deepcopy(proto)
    change(bad)
    with pytest.raises(rt.RuntimeFormatError, match=match):
        rt.load(bad)


def test_runtime_refuses_uint8_index_zero_point_other_than_0():
    """uint8 input codes: the index is DequantizeLinear(x, 1, uint8 0) too; another zero
    point (a shift the table would have to follow) is refused naming the Cast."""
    import gpuquant.runtime as rt
    qm = qat_int8(LookupNet("silu", "tanh"), (2, 4, 8, 8), uint8_qat_qconfig)
    assert qm.act1._dtypes["input"] == "quint8"
    x = torch.randn(2, 4, 8, 8)
    proto = to_onnx(qm, x)
    assert rt.load(proto).run(x.numpy()).tobytes() == int8_forward(qm, x).tobytes()
    for zp in (1, 128, 255):
        bad = copy.deepcopy(proto)
        _set_init(bad, "act1_index_zero_point", lambda a: np.full_like(a, zp))
        with pytest.raises(rt.RuntimeFormatError,
                           match=_INDEX + rf".*zero point {zp} \(uint8\) of a uint8 tensor"):
            rt.load(bad)



@pytest.mark.parametrize("qconfig", ["int8", "uint8"])
def test_stored_table_read_at_code_mod_256(qconfig, tmp_path):
    """The stored table read as ONNX Gather reads it (a negative index counts from the back)
    at each code gives gpuquant's table: ``stored[c mod 256] == table[c - storage_min]`` for
    every code c. And the runtime reads any stored table that way, as onnxruntime does: with
    act1's table replaced (by random bytes, and by the table in gpuquant's own, unrotated
    order), both give the same bytes on every code; the unrotated table is not gpuquant's
    lookup for an int8 input."""
    import gpuquant.runtime as rt
    qc = ema_fakequant_qconfig if qconfig == "int8" else uint8_qat_qconfig
    shape = (2, 256)
    qm = qat_int8(LookupNet("gelu", "silu"), shape, qc)
    proto = to_onnx(qm, torch.randn(*shape))
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for m, name in zip(_acts(qm), ("act1", "act2")):
        lo = -128 if m._dtypes["input"] == "qint8" else 0
        codes = np.arange(lo, lo + 256)
        stored, table = inits[f"{name}_table"], m.table("cpu").numpy()
        assert (lo < 0) == (qconfig == "int8") and stored.dtype == table.dtype
        assert np.take(stored, codes).tobytes() == table.tobytes()  # numpy: negatives too
        assert np.take(stored, codes % 256).tobytes() == table.tobytes()
    x = _code_inputs(qm, shape)
    want = int8_forward(qm, x)
    ort = pytest.importorskip("onnxruntime")
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    t1 = inits["act1_table"]
    rng = np.random.default_rng(0)
    for new in (rng.integers(0, 256, 256).astype(np.uint8).view(t1.dtype),
                np.roll(t1, 128) if qconfig == "int8" else None):
        if new is None:
            continue
        bad = copy.deepcopy(proto)
        _set_init(bad, "act1_table", lambda a: new)
        got = rt.load(bad).run(x.numpy())
        for so in (ort.SessionOptions(), plain):
            sess = ort.InferenceSession(bad.SerializeToString(), so,
                                        providers=["CPUExecutionProvider"])
            ort_y = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
            assert ort_y.dtype == got.dtype and ort_y.tobytes() == got.tobytes()
        assert got.tobytes() != want.tobytes()
