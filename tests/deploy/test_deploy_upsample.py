"""Deployment of the nearest ``Upsample``: to_onnx writes a factor whose float32 Resize is
torch's at every size as ``Resize(mode="nearest")`` between DequantizeLinear and
QuantizeLinear with the module's arguments in the metadata (any spatial size), any other
resize as two ``Gather`` nodes with torch's row / column indices at the example's size
(warned, recorded, refused by the runtime elsewhere); gpuquant.runtime and onnxruntime give
the torch int8 model's bytes where the graph holds; gpuquant.save / load round-trips the
module exactly."""
import copy
import json
import warnings
from functools import partial

import numpy as np
import pytest
import torch

import gpuquant
import gpuquant.nn as gnn
from gpuquant import backends
from gpuquant.backends.numpy.pool import nearest_source_index
from gpuquant.export import to_onnx
from gpuquant.export.onnx import _resize_size_free
from gpuquant.quantization import ema_fakequant_qconfig, quantize, quantize_qat

from conftest import int8_forward
from tests.nn.nn_helpers import uint8_qconfig as uint8_qat_qconfig  # asymmetric quint8
from deploy_helpers import runtime_bytes

onnx = pytest.importorskip("onnx")
from onnx import numpy_helper  # noqa: E402


RESIZE_KEY = "gpuquant.nearest_resize"


def _edited(proto, fn):
    """A copy of ``proto`` changed by ``fn``."""
    bad = copy.deepcopy(proto)
    fn(bad)
    return bad


class UpNet(gnn.Module):
    """QuantStub -> ConvBnRelu2d -> ConvBnRelu2d(stride 2) -> Upsample(up) -> Concat with the
    earlier features -> Upsample(up2) -> DequantStub."""

    def __init__(self, up=None, up2=None):
        super().__init__()
        self.quant = gnn.QuantStub()
        self.c0 = gnn.ConvBnRelu2d(3, 4, 3, padding=1)
        self.c1 = gnn.ConvBnRelu2d(4, 5, 3, stride=2, padding=1)
        self.up = gnn.Upsample(**(up or {"scale_factor": 2}))
        self.cat = gnn.Concat()
        self.up2 = gnn.Upsample(**(up2 or {"scale_factor": 3, "mode": "nearest-exact"}))
        self.dequant = gnn.DequantStub()

    def forward(self, x):
        a = self.c0(self.quant(x))
        return self.dequant(self.up2(self.cat([a, self.up(self.c1(a))], 1)))


class ResizeOnly(gnn.Module):
    """QuantStub -> Upsample -> DequantStub: a copy of codes, so every consumer that picks
    the same pixels gives the same bytes."""

    def __init__(self, **kw):
        super().__init__()
        self.quant, self.up, self.dequant = gnn.QuantStub(), gnn.Upsample(**kw), \
            gnn.DequantStub()

    def forward(self, x):
        return self.dequant(self.up(self.quant(x)))


def qat_int8(model, shape, qconfig=ema_fakequant_qconfig, steps=3, seed=0):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    with backends.use("reference"):
        q = quantize_qat(model.train(), qconfig)
        params = list(q.parameters())
        opt = torch.optim.SGD(params, lr=1e-2) if params else None
        for _ in range(steps):
            loss = q(torch.randn(*shape, generator=g) * 2).square().mean()
            if opt is not None:
                opt.zero_grad()
                loss.backward()
                opt.step()
        return quantize(q.eval())


def _resizes(proto):
    return [n for n in proto.graph.node if n.op_type == "Resize"]


def _gathers(proto):
    return [n for n in proto.graph.node if n.op_type == "Gather"]


def _meta(proto):
    return {p.key: p.value for p in proto.metadata_props}


def _code_input(model, shape, seed=0):
    """A float input whose every value is a dequantized code of the QuantStub (so any
    QuantizeLinear rounds it the same way)."""
    s = np.float32(model.quant.output_scale.item())
    zp = int(model.quant.output_zero_point.item())
    lo = -128 if model.quant._dtypes["output"] == "qint8" else 0
    codes = np.random.default_rng(seed).integers(lo, lo + 256, size=shape)
    return torch.from_numpy(((codes - zp).astype(np.float32) * s))


def _ort(proto, x):
    ort = pytest.importorskip("onnxruntime")
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    outs = []
    for so in (ort.SessionOptions(), plain):  # onnxruntime's QDQ rewrites, and the plain graph
        sess = ort.InferenceSession(proto.SerializeToString(), so,
                                    providers=["CPUExecutionProvider"])
        outs.append(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    return outs


@pytest.mark.parametrize("qc", ["int8", "uint8"])
def test_fpn_exports_size_free_and_runtime_bit_exact(qc):
    """Integer factors (2 nearest, 3 nearest-exact): Resize with those scales and the torch
    modes' attributes, no size-dependent metadata; the runtime gives the int8 model's bytes at
    other batch and spatial sizes (odd ones included) and an empty batch."""
    qm = qat_int8(UpNet(), (4, 3, 8, 10), ema_fakequant_qconfig if qc == "int8"
                  else uint8_qat_qconfig)
    with backends.use("numpy"):
        proto = to_onnx(qm, torch.randn(2, 3, 8, 10))
    onnx.checker.check_model(proto, full_check=True)
    assert _ops_between_qdq(proto)
    meta = _meta(proto)
    assert "gpuquant.fixed_input_hw" not in meta
    args = json.loads(meta[RESIZE_KEY])
    r1, r2 = _resizes(proto)
    assert args[r1.name] == {"size": None, "scale_factor": [2.0, 2.0], "mode": "nearest",
                             "recompute_scale_factor": None}
    assert args[r2.name]["mode"] == "nearest-exact"
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in r2.attribute}
    assert attrs == {"mode": b"nearest", "coordinate_transformation_mode": b"half_pixel",
                     "nearest_mode": b"round_prefer_ceil"}
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    assert inits[r2.input[2]].tolist() == [1, 1, 3, 3]
    # (odd sizes: the stride-2 conv rounds up, so the concat needs even ones)
    runtime_bytes(qm, proto, [torch.randn(3, 3, 8, 10) * 2, torch.randn(1, 3, 6, 4),
                               torch.randn(2, 3, 16, 2), torch.randn(0, 3, 8, 10)])


def _ops_between_qdq(proto):
    """Every Resize reads a DequantizeLinear and feeds one QuantizeLinear at its qparams."""
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    consumers = {}
    for n in proto.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    for r in _resizes(proto):
        dq = producer[r.input[0]]
        (q,) = consumers[r.output[0]]
        assert dq.op_type == "DequantizeLinear" and q.op_type == "QuantizeLinear"
        assert [inits[i].tobytes() for i in dq.input[1:]] == \
            [inits[i].tobytes() for i in q.input[1:]]
    return bool(_resizes(proto))


@pytest.mark.parametrize("kw", [
    {"scale_factor": 2}, {"scale_factor": 3}, {"scale_factor": (4, 1)},
    {"scale_factor": 2, "mode": "nearest-exact"}, {"scale_factor": 5, "mode": "nearest-exact"},
    {"scale_factor": 0.5}, {"scale_factor": 0.5, "mode": "nearest-exact"},
    {"scale_factor": 1.5}, {"scale_factor": 2.5, "mode": "nearest-exact"},
], ids=str)
def test_size_free_factors_onnxruntime_exact_at_many_sizes(kw):
    """Where the exporter writes a size-free graph, onnxruntime (1.32: float32 Resize) reads
    torch's pixels at every spatial size tried (1 to 40 each way, odd ones included), with
    and without its graph optimizations; the runtime too."""
    mode = kw.get("mode", "nearest")
    sf = kw["scale_factor"]
    for f in (sf if isinstance(sf, tuple) else (sf, sf)):
        assert _resize_size_free(float(f), mode == "nearest-exact")
    qm = qat_int8(ResizeOnly(**kw), (2, 3, 8, 8))
    proto = to_onnx(qm, torch.randn(1, 3, 8, 8))
    assert "gpuquant.fixed_input_hw" not in _meta(proto)
    import gpuquant.runtime as rt
    sess = rt.load(proto)
    for h in range(1, 41, 3):
        for w in (1, 2, 7, 12, 33):
            x = _code_input(qm, (1, 3, h, w), seed=h * 100 + w)
            if min(int(h * (sf[0] if isinstance(sf, tuple) else sf)),
                   int(w * (sf[1] if isinstance(sf, tuple) else sf))) < 1:
                continue
            want = int8_forward(qm, x)
            assert sess.run(x.numpy()).tobytes() == want.tobytes(), (h, w)
            for got in _ort(proto, x):
                assert got.shape == want.shape and got.tobytes() == want.tobytes(), (h, w)


@pytest.mark.parametrize("kw,shape", [
    ({"size": (7, 5)}, (2, 3, 8, 10)),
    ({"size": (13, 3), "mode": "nearest-exact"}, (1, 3, 9, 7)),
    ({"scale_factor": 0.3}, (1, 3, 33, 37)),
    ({"scale_factor": 1.001}, (1, 3, 12, 7)),
    ({"scale_factor": 1.7, "recompute_scale_factor": True, "mode": "nearest-exact"},
     (1, 3, 11, 6)),
    ({"scale_factor": (7.3, 0.7)}, (1, 3, 5, 39)),
    ({"scale_factor": (2, 0.3)}, (1, 3, 5, 37)),  # one dimension size-free, not the other
    # no ONNX Resize scale reads torch's pixels here (floor(o / s) for one s cannot follow
    # torch's float32 rounding of o * (1 / s)): the Gather form is exact all the same
    ({"scale_factor": 0.3}, (1, 3, 40, 37)),
    ({"size": (5, 184)}, (1, 3, 6, 10)),
], ids=str)
def test_size_dependent_resize_warns_and_holds_at_the_example(kw, shape):
    """A size, a recomputed scale factor or a factor whose float32 Resize differs from torch
    at some size: two Gathers (rows, then columns) with torch's indices at the example's
    size, between DequantizeLinear and QuantizeLinear at the input's qparams, no Resize and
    no Resize metadata; one warning naming the nodes, the metadata, the runtime and
    onnxruntime give torch's bytes there and the runtime refuses other sizes."""
    qm = qat_int8(ResizeOnly(**kw), shape)
    with pytest.warns(UserWarning, match=r"valid only at input spatial size .*node "
                                         r"'up_rows_Gather' \(module 'up' \(Upsample\)"):
        proto = to_onnx(qm, torch.randn(*shape))
    meta = _meta(proto)
    assert meta["gpuquant.fixed_input_hw"] == f"{shape[2]},{shape[3]}"
    assert meta["gpuquant.size_dependent_nodes"] == "up_rows_Gather,up_cols_Gather"
    assert RESIZE_KEY not in meta and not _resizes(proto)
    _gathers_between_qdq(proto, qm, shape)
    x = _code_input(qm, (3,) + shape[1:])
    want = int8_forward(qm, x)
    import gpuquant.runtime as rt
    sess = rt.load(proto)
    assert sess.run(x.numpy()).tobytes() == want.tobytes()
    for got in _ort(proto, x):
        assert got.shape == want.shape and got.tobytes() == want.tobytes()
    with pytest.raises(ValueError, match="holds only for"):
        sess.run(np.zeros(shape[:2] + (shape[2] + 1, shape[3]), np.float32))


def _gathers_between_qdq(proto, qm, shape):
    """The size-dependent form: DequantizeLinear -> Gather(axis 2, torch's rows) ->
    Gather(axis 3, torch's columns) -> QuantizeLinear at the DequantizeLinear's qparams,
    the indices int64 initializers."""
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    consumers = {}
    for n in proto.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    rows, cols = _gathers(proto)
    dq, (q,) = producer[rows.input[0]], consumers[cols.output[0]]
    assert consumers[rows.output[0]] == [cols] and cols.input[0] == rows.output[0]
    assert dq.op_type == "DequantizeLinear" and q.op_type == "QuantizeLinear"
    assert [inits[i].tobytes() for i in dq.input[1:]] == \
        [inits[i].tobytes() for i in q.input[1:]]
    axes = [onnx.helper.get_attribute_value(g.attribute[0]) for g in (rows, cols)]
    assert axes == [2, 3]
    up = qm.up
    exact = up.mode == "nearest-exact"
    sf = up.scale_factor
    sf = None if sf is None else (sf if isinstance(sf, tuple) else (sf, sf))
    factor = sf is not None and not up.recompute_scale_factor
    for d, g in enumerate((rows, cols)):
        idx = inits[g.input[1]]
        n = shape[2 + d]
        out = (up.size if isinstance(up.size, tuple) else (up.size, up.size))[d] \
            if up.size is not None else int(np.floor(n * float(sf[d])))
        assert idx.dtype == np.int64
        assert idx.tolist() == nearest_source_index(n, out, sf[d] if factor else None,
                                                    exact).tolist()


def test_random_resizes_export_and_match_torch_in_both_consumers():
    """100 random size= / scale_factor resizes (modes, recomputed factors, ratios that no
    Resize scale follows): every one exports (no refusal), and the runtime and onnxruntime
    (with and without its graph optimizations) give torch's int8 bytes at the example's
    size."""
    import gpuquant.runtime as rt
    rng = np.random.default_rng(7)
    factors = [0.3, 0.7, 1.001, 0.999, 7.3, 1 / 3, 1.25, 2.2, 2.0, 3.0, 0.5]
    kinds, checked = set(), 0
    for case in range(100):
        shape = (2, 2, int(rng.integers(1, 60)), int(rng.integers(1, 60)))
        mode = ["nearest", "nearest-exact"][int(rng.integers(2))]
        if rng.random() < 0.5:
            kw = {"size": (int(rng.integers(1, 80)), int(rng.integers(1, 80)))}
        else:
            sf = tuple(float(rng.choice(factors)) for _ in range(2))
            if min(np.floor(n * f) for n, f in zip(shape[2:], sf)) < 1:
                continue
            kw = {"scale_factor": sf, "recompute_scale_factor": bool(rng.random() < 0.2)}
        qm = qat_int8(ResizeOnly(mode=mode, **kw), shape, steps=1, seed=case)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            proto = to_onnx(qm, torch.randn(*shape))
        kinds.add("gather" if _gathers(proto) else "resize")
        x = _code_input(qm, shape, seed=case)
        want = int8_forward(qm, x)
        assert rt.load(proto).run(x.numpy()).tobytes() == want.tobytes(), (case, kw, shape)
        for got in _ort(proto, x):
            assert got.shape == want.shape and got.tobytes() == want.tobytes(), \
                (case, kw, shape)
        checked += 1
    assert checked > 90 and kinds == {"gather", "resize"}


def test_runtime_refuses_resizes_not_in_gpuquants_form():
    import gpuquant.runtime as rt
    qm = qat_int8(ResizeOnly(scale_factor=2), (2, 3, 6, 6))
    x = torch.randn(1, 3, 6, 6)
    proto = to_onnx(qm, x)
    assert rt.load(proto).run(x.numpy()).tobytes() == int8_forward(qm, x).tobytes()

    edited = partial(_edited, proto)

    def drop_meta(p):
        keep = [e for e in p.metadata_props if e.key != RESIZE_KEY]
        del p.metadata_props[:]
        p.metadata_props.extend(keep)

    def set_attr(name, value):
        def fn(p):
            r = _resizes(p)[0]
            for a in r.attribute:
                if a.name == name:
                    a.CopyFrom(onnx.helper.make_attribute(name, value))
        return fn

    def scale(p):
        for t in p.graph.initializer:
            if t.name == _resizes(p)[0].input[2]:
                t.CopyFrom(numpy_helper.from_array(np.array([1, 1, 3, 2], np.float32), t.name))

    def rename(p):  # as a graph optimiser may: the metadata is keyed by the node's name
        _resizes(p)[0].name = "renamed_resize"

    name = _resizes(proto)[0].name
    with pytest.raises(rt.RuntimeFormatError, match=rf"node '{name}' \(Resize\): no entry in "
                                                    rf"the metadata 'gpuquant.nearest_resize'"):
        rt.load(edited(drop_meta))
    with pytest.raises(rt.RuntimeFormatError,
                       match=rf"node 'renamed_resize' \(Resize\): no entry in the metadata "
                             rf"'gpuquant.nearest_resize' for this node \(entries: "
                             rf"\['{name}'\];.*renames nodes"):
        rt.load(edited(rename))
    with pytest.raises(rt.RuntimeFormatError, match="coordinate_transformation_mode"):
        rt.load(edited(set_attr("coordinate_transformation_mode", "half_pixel")))
    with pytest.raises(rt.RuntimeFormatError, match="nearest_mode"):
        rt.load(edited(set_attr("nearest_mode", "round_prefer_floor")))
    with pytest.raises(rt.RuntimeFormatError, match=r"only float32\(scale_factor\)"):
        rt.load(edited(scale))


def test_runtime_refuses_gathers_not_in_gpuquants_form():
    """The resize's Gather pair is matched strictly (constant 1-D int64 / int32 indices in
    range, axes 2 then 3, on a DequantizeLinear'd activation, requantized with its qparams,
    named in the size-dependent metadata); anything else is a RuntimeFormatError naming the
    node, and a graph with both gpuquant Gather forms (an Activation's lookup and a resize)
    runs exactly."""
    import gpuquant.runtime as rt
    shape = (1, 3, 6, 10)
    qm = qat_int8(ResizeOnly(size=(5, 7)), shape)
    with pytest.warns(UserWarning):
        proto = to_onnx(qm, torch.randn(*shape))
    x = _code_input(qm, shape)
    assert rt.load(proto).run(x.numpy()).tobytes() == int8_forward(qm, x).tobytes()

    edited = partial(_edited, proto)

    def gather(p, i):
        return _gathers(p)[i]

    def index(p, i, arr):
        for t in p.graph.initializer:
            if t.name == gather(p, i).input[1]:
                t.CopyFrom(numpy_helper.from_array(arr, t.name))

    def axis(i, v):
        def fn(p):
            gather(p, i).attribute[0].CopyFrom(onnx.helper.make_attribute("axis", v))
        return fn

    def swap_axes(p):
        axis(0, 3)(p)
        axis(1, 2)(p)

    def drop_nodes_meta(p):
        for e in p.metadata_props:
            if e.key == "gpuquant.size_dependent_nodes":
                e.value = "up_rows_Gather"

    def requant(p):  # the output QuantizeLinear at another scale
        q = [n for n in p.graph.node if n.op_type == "QuantizeLinear"][-1]
        for t in p.graph.initializer:
            if t.name == q.input[1]:
                t.CopyFrom(numpy_helper.from_array(
                    numpy_helper.to_array(t) * np.float32(2), t.name))

    def one_gather(p):  # the column Gather dropped: the row Gather feeds the Q
        rows, cols = _gathers(p)
        for n in p.graph.node:
            for k, i in enumerate(n.input):
                if i == cols.output[0]:
                    n.input[k] = rows.output[0]
        p.graph.node.remove(cols)

    def rank2(p):
        index(p, 0, np.zeros((5, 1), np.int64))

    cases = [
        (lambda p: index(p, 0, np.arange(5, dtype=np.float32)), r"'up_rows_Gather'.*float32"),
        (lambda p: index(p, 1, np.array([0, 1, -1, 2, 3, 4, 5], np.int64)),
         r"'up_cols_Gather'.*from -1 to 5"),
        (rank2, r"'up_rows_Gather'.*shape \[5, 1\]"),
        (axis(0, -2), r"'up_rows_Gather'.*axis -2"),
        (axis(1, 1), r"'up_rows_Gather'.*one Gather over columns"),
        (swap_axes, r"'up_rows_Gather'.*axis 3"),
        (one_gather, r"'up_rows_Gather'.*one Gather over columns"),
        (drop_nodes_meta, r"'up_rows_Gather'.*\['up_cols_Gather'\].*does not name them"),
        (requant, r"'up_cols_Gather'.*keep its input's qparams"),
    ]
    for fn, match in cases:
        with pytest.raises(rt.RuntimeFormatError, match=match):
            rt.load(edited(fn))
    # int32 indices are the same gather
    rows = numpy_helper.to_array([t for t in proto.graph.initializer
                                  if t.name == gather(proto, 0).input[1]][0])
    ok = edited(lambda p: index(p, 0, rows.astype(np.int32)))
    assert rt.load(ok).run(x.numpy()).tobytes() == int8_forward(qm, x).tobytes()
    # indices past the input (a hand-edited table): refused when run, naming the node
    big = edited(lambda p: index(p, 0, np.full(5, 6, np.int64)))
    with pytest.raises(ValueError, match=r"'up_rows_Gather'.*row indices up to 6"):
        rt.load(big).run(x.numpy())

    class ActUp(ResizeOnly):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.act = gnn.Activation("sigmoid")

        def forward(self, x):
            return self.dequant(self.up(self.act(self.quant(x))))

    qa = qat_int8(ActUp(scale_factor=0.3), (2, 3, 40, 37))
    with pytest.warns(UserWarning):
        pa = to_onnx(qa, torch.randn(1, 3, 40, 37))
    assert len(_gathers(pa)) == 3
    xa = _code_input(qa, (2, 3, 40, 37))
    want = int8_forward(qa, xa)
    assert rt.load(pa).run(xa.numpy()).tobytes() == want.tobytes()


@pytest.mark.parametrize("qc", ["int8", "uint8"])
def test_save_load_round_trip_exact(qc, tmp_path):
    qconfig = ema_fakequant_qconfig if qc == "int8" else uint8_qat_qconfig
    up = {"scale_factor": (2, 2.0)}
    up2 = {"size": (9, 11), "mode": "nearest-exact"}
    qm = qat_int8(UpNet(up, up2), (4, 3, 8, 10), qconfig)
    path = tmp_path / "up.safetensors"
    gpuquant.save(qm, path)
    loaded = gpuquant.load(path, model=UpNet())  # the arguments come from the file
    for a, b in ((qm.up, loaded.up), (qm.up2, loaded.up2)):
        assert (b.size, b.scale_factor, b.mode, b.recompute_scale_factor) == \
            (a.size, a.scale_factor, a.mode, a.recompute_scale_factor)
        assert b._dtypes == a._dtypes
        assert torch.equal(b.input_scale, a.input_scale)
        assert torch.equal(b.input_zero_point, a.input_zero_point)
    x = torch.randn(3, 3, 8, 10)
    assert int8_forward(loaded, x).tobytes() == int8_forward(qm, x).tobytes()
    with pytest.warns(UserWarning):
        pa = to_onnx(qm, x)
    with pytest.warns(UserWarning):
        pb = to_onnx(loaded, x)
    assert pa.SerializeToString() == pb.SerializeToString()
    runtime_bytes(loaded, pb, [x, torch.randn(1, 3, 8, 10)])
