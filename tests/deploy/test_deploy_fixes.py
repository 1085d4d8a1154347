"""Regression tests of deployment fixes: AveragePool ceil_mode export, failed load leaves the
skeleton untouched, runtime size checks, flatten(start_dim) export, save/load argument and
file checks, to_onnx argument checks, graphs valid at the example's spatial size only."""
import numpy as np
import pytest
import torch

import gpuquant.nn as gnn
from gpuquant import backends
from gpuquant.export import to_onnx
from gpuquant.export.ort import session as ort_session

from conftest import int8_forward
from deploy_helpers import calibrated

onnx = pytest.importorskip("onnx")
import gpuquant.runtime as rt  # noqa: E402


def _int8(model, shape, lo=0.0):
    torch.manual_seed(0)
    with backends.use("reference"):
        return calibrated(model, shape, batches=2)


def _ort(path, x):
    pytest.importorskip("onnxruntime")
    sess = ort_session(path)  # fused int8 kernels off where they saturate (no VNNI)
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _attrs(node):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _fixed_size_warning(expected=True):
    """to_onnx's warning that the graph holds for the example's spatial size only."""
    import contextlib
    return pytest.warns(UserWarning, match="valid only at input spatial size") if expected \
        else contextlib.nullcontext()


class _Pool(gnn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.quant = gnn.QuantStub()
        self.pool = gnn.AvgPool2d(**kw)
        self.dq = gnn.DequantStub()

    def forward(self, x):
        return self.dq(self.pool(self.quant(x)))


# ------------------------------------------------------------ AvgPool2d(ceil_mode=True)
@pytest.mark.parametrize("kw,hw", [
    (dict(kernel_size=2, stride=2, ceil_mode=True), (3, 3)),            # partial last window
    (dict(kernel_size=3, stride=2, ceil_mode=True), (6, 5)),
    (dict(kernel_size=2, stride=2, ceil_mode=True, count_include_pad=False), (5, 3)),
    (dict(kernel_size=3, stride=2, padding=1, ceil_mode=True), (5, 5)),  # no partial window
])
def test_avgpool_ceil_mode_export_matches_gpuquant(kw, hw, tmp_path):
    m = _int8(_Pool(**kw), (4, 2) + hw)
    x = torch.randn(2, 2, *hw)
    path = tmp_path / "pool.onnx"
    with _fixed_size_warning(kw.get("padding", 0)):  # padded: windows depend on the size
        proto = to_onnx(m, x, path)
    pool = next(n for n in proto.graph.node if n.op_type == "AveragePool")
    a = _attrs(pool)
    assert a["ceil_mode"] == 1
    if kw.get("padding", 0) == 0:   # PyTorch's divisor is count_include_pad=0's there
        assert a["count_include_pad"] == 0
    else:
        assert a["count_include_pad"] == 1
    want = int8_forward(m, x)
    got_rt = rt.load(path).run(x.numpy())
    assert got_rt.tobytes() == want.tobytes()
    got = _ort(path, x.numpy())
    assert got.shape == want.shape
    assert np.abs(got - want).max() / m.dq.input_scale.item() <= 1 + 1e-3


@pytest.mark.parametrize("make,hw", [
    # PyTorch drops the last window (it would start in the right padding) in both
    # dimensions, where ONNX's ceil mode keeps it: floor mode gives PyTorch's windows
    (lambda: gnn.MaxPool2d(2, 2, 1, ceil_mode=True), (11, 11)),
    (lambda: gnn.AvgPool2d(2, 2, 1, ceil_mode=True), (11, 9)),
    (lambda: gnn.AvgPool2d(2, 2, 1, ceil_mode=True, count_include_pad=False), (7, 11)),
])
def test_pool_ceil_mode_dropped_last_window_exports(make, hw, tmp_path):
    """ceil_mode pools whose last window PyTorch drops: exported in floor mode (same
    windows and divisors; onnx's shape inference agrees on the size), the runtime's bytes
    equal gpuquant's, onnxruntime within one step."""
    m = _int8(_One(make()), (4, 2) + hw)
    x = torch.randn(2, 2, *hw)
    path = tmp_path / "pool.onnx"
    with _fixed_size_warning():
        proto = to_onnx(m, x, path)
    pool = next(n for n in proto.graph.node if n.op_type in ("MaxPool", "AveragePool"))
    assert _attrs(pool)["ceil_mode"] == 0
    want = int8_forward(m, x)
    assert rt.load(path).run(x.numpy()).tobytes() == want.tobytes()
    got = _ort(path, x.numpy())
    assert got.shape == want.shape
    assert np.abs(got - want).max() / m.dq.input_scale.item() <= 1 + 1e-3


def test_pool_ceil_mode_dropped_in_one_dimension_only_refused():
    # kernel 2 drops H's last window at 11, kernel 3 keeps a partial one in W at 6: no
    # single ONNX ceil_mode says both
    m = _int8(_One(gnn.MaxPool2d((2, 3), 2, 1, ceil_mode=True)), (2, 1, 11, 6))
    with pytest.raises(NotImplementedError, match="partial last window in one dimension"):
        to_onnx(m, torch.randn(1, 1, 11, 6))


def test_avgpool_ceil_count_include_pad_past_padding_refused():
    # 3 windows, the last from 3 to 6 > 4 + 1: past the padded input, where onnxruntime's
    # QLinearAveragePool and PyTorch disagree on the divisor
    m = _int8(_Pool(kernel_size=3, stride=2, padding=1, ceil_mode=True), (2, 1, 4, 4))
    with pytest.raises(NotImplementedError, match="count_include_pad=True"):
        to_onnx(m, torch.randn(1, 1, 4, 4))
    # the same pool without count_include_pad exports
    m = _int8(_Pool(kernel_size=3, stride=2, padding=1, ceil_mode=True,
                    count_include_pad=False), (2, 1, 4, 4))
    with _fixed_size_warning():
        to_onnx(m, torch.randn(1, 1, 4, 4))


# ------------------------------------------------------------ save / load
import gpuquant  # noqa: E402
from gpuquant.serialization import _digest  # noqa: E402


class _Small(gnn.Module):
    def __init__(self, head=False):
        super().__init__()
        self.quant, self.conv, self.dq = gnn.QuantStub(), gnn.ConvRelu2d(3, 4, 3), gnn.DequantStub()
        self.head = torch.nn.Linear(6, 2) if head else None

    def forward(self, x):
        y = self.dq(self.conv(self.quant(x)))
        return self.head(y) if self.head is not None else y


@pytest.fixture(scope="module")
def small_int8():
    return _int8(_Small(), (2, 3, 8, 8))


def _snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items()}, \
        {n: type(s) for n, s in m.named_modules()}


@pytest.mark.parametrize("how", ["missing keys", "wrong shape", "bad extra state"])
def test_failed_load_leaves_skeleton_untouched(small_int8, tmp_path, how):
    path = tmp_path / "m.safetensors"
    gpuquant.save(small_int8, path)
    if how == "wrong shape":   # "keep" fits (torch would copy it before refusing "extra")
        _rewrite(path, lambda d: None, {"keep": torch.zeros(3), "extra": torch.zeros(2)})
    if how == "bad extra state":   # a checksummed file whose extra state is not a dict
        _rewrite(path, lambda d: d["extra_state"].update(
            {k: 5 for k in list(d["extra_state"])[-1:]}))
    mine = _Small(head=how == "missing keys").eval()
    if how == "wrong shape":
        mine.register_buffer("keep", torch.ones(3))
        mine.register_buffer("extra", torch.ones(3))
    state, kinds = _snapshot(mine)
    x = torch.randn(1, 3, 8, 8)
    before = mine(x)
    with pytest.raises(ValueError, match="m.safetensors"):
        gpuquant.load(path, model=mine)
    state2, kinds2 = _snapshot(mine)
    assert kinds2 == kinds and state2.keys() == state.keys()
    assert all(torch.equal(state[k], state2[k]) for k in state)
    assert torch.equal(mine(x), before)
    # a successful load still changes the skeleton in place and returns it
    good = _Small().eval()
    assert gpuquant.load(_saved(small_int8, tmp_path), model=good) is good
    assert type(good.conv).__module__.startswith("gpuquant.nn.quantized")


def _saved(m, tmp_path):
    p = tmp_path / "ok.safetensors"
    gpuquant.save(m, p)
    return p


def _rewrite(path, edit, more_tensors=None):
    """Edit a saved file's description (and add tensors), write it back with a valid
    checksum."""
    import json
    import struct
    from safetensors.torch import load as st_load, save as st_save
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    desc = json.loads(json.loads(data[8:8 + n])["__metadata__"]["gpuquant"])
    tensors = st_load(data)
    tensors.update(more_tensors or {})
    edit(desc)
    text = json.dumps(desc, sort_keys=True)
    path.write_bytes(st_save(tensors, metadata={"gpuquant": text,
                                                "gpuquant_sha256": _digest(text, tensors)}))


@pytest.mark.parametrize("edit", [
    lambda d: d.pop("tree"),
    lambda d: d.update(tree=5),
    lambda d: d["tree"][2]["args"].update(bogus=1),
    lambda d: d["tree"][2]["args"].update(out_features=-1),
    lambda d: d.update(tree=d["tree"][1:]),
    lambda d: d["extra_state"].update({"1._extra_state": 5}),
    lambda d: d.update(extra_state=[1]),
    lambda d: d.update(builder={"kwargs": {}}),
], ids=["no tree", "tree not a list", "unknown arg", "negative size", "no root",
        "extra state int", "extra state list", "builder without arch"])
def test_malformed_checksummed_file_is_value_error(tmp_path, edit):
    torch.manual_seed(0)
    with backends.use("reference"):
        qm = calibrated(torch.nn.Sequential(gnn.QuantStub(), gnn.Linear(4, 3),
                                            gnn.DequantStub()), (4, 4), batches=1)
    path = tmp_path / "m.safetensors"
    gpuquant.save(qm, path)
    _rewrite(path, edit)
    with pytest.raises(ValueError, match=r"m\.safetensors"):
        gpuquant.load(path)


def test_bad_map_location(small_int8, tmp_path):
    path = _saved(small_int8, tmp_path)
    with pytest.raises(ValueError, match="map_location 'gpu'"):
        gpuquant.load(path, map_location="gpu")
    with pytest.raises(ValueError, match="map_location"):
        gpuquant.load(path, map_location="cuda:x")
    with pytest.raises(TypeError, match="map_location"):
        gpuquant.load(path, map_location=1.5)
    if not torch.cuda.is_available():
        mine = _Small().eval()
        with pytest.raises(ValueError, match="not available"):
            gpuquant.load(path, model=mine, map_location="cuda")
        assert not type(mine.conv).__module__.startswith("gpuquant.nn.quantized")
    assert gpuquant.load(path, model=_Small(), map_location=torch.device("cpu")) is not None


def test_save_arch_only_builders(small_int8, tmp_path):
    with pytest.raises(ValueError, match=r"got 'settle_bn'; allowed: \['resnet18', 'resnet50', "
                                         r"'mobilenet_v2', 'mobilenet_v3_large', "
                                         r"'mobilenet_v3_small', 'digits_net'\]$"):
        gpuquant.save(small_int8, tmp_path / "x", arch="settle_bn")
    for bad in ("ResNet", "MobileNetV2", "nope", 3):
        with pytest.raises(ValueError, match="builder function"):
            gpuquant.save(small_int8, tmp_path / "x", arch=bad)
    assert not (tmp_path / "x").exists()


def test_save_load_without_safetensors_hint(small_int8, tmp_path, monkeypatch):
    import builtins
    path = _saved(small_int8, tmp_path)
    real = builtins.__import__

    def no_safetensors(name, *a, **k):
        if name == "safetensors" or name.startswith("safetensors."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_safetensors)
    with pytest.raises(ImportError, match=r"safetensors.*pip install"):
        gpuquant.save(small_int8, tmp_path / "y.safetensors")
    with pytest.raises(ImportError, match=r"safetensors.*pip install"):
        gpuquant.load(path)


# ------------------------------------------------------------ runtime: inputs too small
class _One(gnn.Module):
    def __init__(self, layer):
        super().__init__()
        self.quant, self.layer, self.dq = gnn.QuantStub(), layer, gnn.DequantStub()

    def forward(self, x):
        return self.dq(self.layer(self.quant(x)))


@pytest.mark.parametrize("layer,op", [
    (lambda: gnn.AvgPool2d(2), "avg_pool2d"),
    (lambda: gnn.MaxPool2d(3), "max_pool2d"),
    (lambda: gnn.MaxPool2d(3, 2, ceil_mode=True), "max_pool2d"),
    (lambda: gnn.Conv2d(1, 2, 3), "conv2d"),
    (lambda: gnn.Conv2d(1, 2, 3, dilation=2, padding=1), "conv2d"),
])
@pytest.mark.parametrize("hw", [(1, 6), (6, 0)])
def test_runtime_refuses_input_smaller_than_window(layer, op, hw, tmp_path):
    m = _int8(_One(layer()), (2, 1, 6, 6))
    path = tmp_path / "m.onnx"
    to_onnx(m, torch.randn(1, 1, 6, 6), path)
    sess = rt.load(path)
    x = torch.randn(1, 1, *hw)
    with pytest.raises(ValueError, match=f"{op}: padded input"):
        int8_forward(m, x)
    with pytest.raises(ValueError, match=rf"node '.*'.*{op}: padded input \({hw[0]}, {hw[1]}\)"):
        sess.run(x.numpy())
    # a large enough input still runs, byte for byte as the int8 model
    x = torch.randn(2, 1, 5, 7)
    assert sess.run(x.numpy()).tobytes() == int8_forward(m, x).tobytes()


def test_runtime_refuses_empty_input_to_global_pool(tmp_path):
    m = _int8(_One(gnn.AdaptiveAvgPool2d(1)), (2, 1, 6, 6))
    path = tmp_path / "m.onnx"
    to_onnx(m, torch.randn(1, 1, 6, 6), path)
    with pytest.raises(ValueError, match="adaptive_avg_pool2d"):
        rt.load(path).run(np.zeros((1, 1, 0, 4), np.float32))


# ------------------------------------------------------------ flatten(start_dim) export
class _Flat(gnn.Module):
    def __init__(self, f):
        super().__init__()
        self.f = f
        self.quant, self.conv, self.dq = gnn.QuantStub(), gnn.Conv2d(3, 4, 1), gnn.DequantStub()

    def forward(self, x):
        return self.dq(self.f(self.conv(self.quant(x))))


@pytest.mark.parametrize("f,op", [
    (lambda x: torch.flatten(x, 1), "Flatten"),
    (lambda x: torch.flatten(x, 2), "Reshape"),
    (lambda x: torch.flatten(x, -2), "Reshape"),
    (lambda x: torch.flatten(x), "Reshape"),
    (lambda x: x.flatten(1, 2), "Reshape"),
    (torch.nn.Flatten(2), "Reshape"),
    (torch.nn.Flatten(0), "Reshape"),
    (lambda x: x.reshape(-1, 5), "Reshape"),
], ids=["flatten1", "flatten2", "flatten-2", "flatten0", "flatten1_2", "Flatten(2)",
        "Flatten(0)", "reshape-1_5"])
def test_flatten_start_dim_export(f, op, tmp_path):
    m = _int8(_Flat(f), (2, 3, 4, 5))
    path = tmp_path / "m.onnx"
    proto = to_onnx(m, torch.randn(3, 3, 4, 5), path)
    assert op in [n.op_type for n in proto.graph.node]
    sess = rt.load(path)
    for batch in (3, 2, 0):   # dynamic batch, the empty batch included
        x = torch.randn(batch, 3, 4, 5)
        want = int8_forward(m, x)
        got = sess.run(x.numpy())
        assert got.shape == want.shape and got.tobytes() == want.tobytes()
    x = torch.randn(2, 3, 4, 5)
    want = int8_forward(m, x)
    got = _ort(path, x.numpy())
    assert got.shape == want.shape
    assert np.abs(got - want).max() / m.dq.input_scale.item() <= 1 + 1e-3


# ------------------------------------------------------------ to_onnx arguments
def test_to_onnx_opset_and_path_checked(small_int8, tmp_path, monkeypatch):
    x = torch.randn(1, 3, 8, 8)
    newest = onnx.defs.onnx_opset_version()
    for bad in (99, newest + 1, 12, 13.0, True):
        with pytest.raises(ValueError, match=rf"opset must be an int from 13 .* to {newest}"):
            to_onnx(small_int8, x, opset=bad)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TypeError, match="path must be None, a str or an os.PathLike"):
        to_onnx(small_int8, x, path=5)
    assert not (tmp_path / "5").exists()
    to_onnx(small_int8, x, path=tmp_path / "ok.onnx")   # os.PathLike and str still work
    to_onnx(small_int8, x, path=str(tmp_path / "ok2.onnx"))
    assert (tmp_path / "ok.onnx").is_file() and (tmp_path / "ok2.onnx").is_file()


def test_to_onnx_dynamic_model_says_dynamic():
    from gpuquant.quantization import quantize_dynamic
    m = quantize_dynamic(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()).eval())
    with pytest.raises(ValueError, match=r"dynamic / weight-only.*0 \(DynamicLinear\).*no QDQ"):
        to_onnx(m, torch.randn(2, 4))
    with pytest.raises(ValueError, match="holds no gpuquant.nn.quantized module"):
        to_onnx(torch.nn.Sequential(torch.nn.Linear(4, 3)).eval(), torch.randn(2, 4))


def test_load_into_a_skeleton_of_another_float_dtype_is_refused(tmp_path):
    """A model cast (.half()) before saving, loaded into a float32 skeleton: the float parts
    would be cast back and the first call crash; refused by name, the skeleton kept."""
    import torch
    import gpuquant
    from gpuquant.quantization import quantize_dynamic
    torch.manual_seed(0)

    def make():
        return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    q = quantize_dynamic(make(), filter_fn=lambda m, n: n == "0", inplace=False).half()
    path = tmp_path / "m.safetensors"
    gpuquant.save(q, str(path))
    skel = make()
    before = type(skel[0])
    with pytest.raises(ValueError, match=r"'1.weight' as torch.float16 but the model given has "
                                         r"it as torch.float32"):
        gpuquant.load(str(path), model=skel)
    assert type(skel[0]) is before  # put back
    out = gpuquant.load(str(path), model=make().half())
    x = torch.randn(3, 8).half()
    with torch.no_grad():
        assert torch.equal(out(x), q(x))


# ------------------------------------------------------------ graphs for one spatial size
def _meta(proto):
    return {p.key: p.value for p in proto.metadata_props}


@pytest.mark.parametrize("make,hw,other", [
    (lambda: gnn.AdaptiveAvgPool2d((2, 2)), (8, 6), (6, 6)),            # a fixed kernel
    (lambda: gnn.MaxPool2d(3, 3, padding=1, ceil_mode=True), (5, 5), (6, 5)),
    (lambda: gnn.AvgPool2d(3, 3, padding=1, ceil_mode=True), (5, 7), (12, 7)),
], ids=["adaptive2x2", "maxpool_ceil", "avgpool_ceil"])
def test_size_dependent_pool_graph_holds_for_the_example_size_only(make, hw, other, tmp_path):
    """A pool whose ONNX node is right for the example's spatial size only: to_onnx warns
    naming the node and records the size in the metadata; the runtime refuses another size
    (it ran it with the example's windows: other numbers, found by review)."""
    import copy
    m = _int8(_One(make()), (4, 2) + hw)
    x = torch.randn(2, 2, *hw)
    path = tmp_path / "m.onnx"
    with pytest.warns(UserWarning, match=rf"valid only at input spatial size {hw[0]}x{hw[1]} "
                                         rf".*node 'layer_\w+' \(module 'layer'"):
        proto = to_onnx(m, x, path)
    meta = _meta(proto)
    assert meta["gpuquant.fixed_input_hw"] == f"{hw[0]},{hw[1]}"
    node = meta["gpuquant.size_dependent_nodes"]
    assert node in {n.name for n in proto.graph.node}
    sess = rt.load(path)
    assert sess.fixed_input_hw == {"input": hw}
    assert sess.run(x.numpy()).tobytes() == int8_forward(m, x).tobytes()
    y = torch.randn(1, 2, *other)
    want = int8_forward(m, y)  # the int8 model runs any size
    with pytest.raises(ValueError, match=rf"'input' of spatial size {other[0]}x{other[1]}: "
                                         rf"this graph holds only for {hw[0]}x{hw[1]}.*'{node}'"):
        sess.run(y.numpy())
    with pytest.raises(ValueError, match=rf"spatial size {hw[0]}x{hw[1]} only\), got") as e:
        sess.run(np.zeros((1, 3) + hw, np.float32))
    assert "any spatial size" not in str(e.value)
    # what the refusal prevents: the graph's windows at that size are not the model's
    unchecked = copy.deepcopy(proto)
    unchecked.ClearField("metadata_props")
    onnx.helper.set_model_props(unchecked, {"gpuquant.format": "qdq-v1"})
    got = rt.load(unchecked).run(y.numpy())
    assert got.shape != want.shape or got.tobytes() != want.tobytes()


@pytest.mark.parametrize("make", [
    lambda: gnn.AdaptiveAvgPool2d(1),                         # global
    lambda: gnn.MaxPool2d(3, 2, ceil_mode=True),              # no padding, stride <= kernel
    lambda: gnn.AvgPool2d(2, 2, ceil_mode=True),
    lambda: gnn.MaxPool2d(3, 1, padding=1, ceil_mode=True),   # stride 1
    lambda: gnn.AvgPool2d((3, 2), (1, 2), padding=(1, 0), ceil_mode=True),
], ids=["global", "maxpool_ceil_nopad", "avgpool_ceil_nopad", "maxpool_ceil_stride1",
        "avgpool_ceil_mixed"])
def test_size_independent_pool_graph_runs_any_size(make, tmp_path):
    """Global pools and ceil_mode pools whose windows do not depend on the size: no warning,
    no fixed size, any spatial size runs byte for byte as the int8 model."""
    import warnings
    m = _int8(_One(make()), (4, 2, 7, 6))
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        proto = to_onnx(m, torch.randn(1, 2, 7, 6), path)
    assert not [w for w in caught if "valid only" in str(w.message)]
    assert "gpuquant.fixed_input_hw" not in _meta(proto)
    sess = rt.load(path)
    assert sess.fixed_input_hw == {}
    for hw in [(7, 6), (9, 11), (4, 5)]:
        x = torch.randn(2, 2, *hw)
        assert sess.run(x.numpy()).tobytes() == int8_forward(m, x).tobytes(), hw
    with pytest.raises(ValueError, match=r"any spatial size\), got"):
        sess.run(np.zeros((1, 3, 7, 6), np.float32))


def _declared(vi):
    return [d.dim_param if d.HasField("dim_param") else
            d.dim_value if d.HasField("dim_value") else None
            for d in vi.type.tensor_type.shape.dim]


def test_size_independent_graph_declares_free_spatial_size(tmp_path):
    """A graph that holds at any spatial size declares H and W symbolic (its 4-D outputs'
    unknown): it had the example's 7x6 as fixed dims, so onnxruntime refused every other
    size the README promises (found by review); a size-dependent graph keeps them fixed."""
    m = _int8(_One(gnn.Conv2d(2, 3, 3, padding=1)), (4, 2, 7, 6))
    path = tmp_path / "m.onnx"
    proto = to_onnx(m, torch.randn(1, 2, 7, 6), path)
    assert _declared(proto.graph.input[0]) == ["N", 2, "H", "W"]
    assert _declared(proto.graph.output[0]) == ["N", 3, None, None]
    x = torch.randn(2, 2, 9, 11)
    want = int8_forward(m, x)
    assert rt.load(path).run(x.numpy()).tobytes() == want.tobytes()
    got = _ort(path, x.numpy())  # within one output step (onnxruntime requantizes in float)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= float(m.layer.output_scale) * 1.001
    with _fixed_size_warning():
        fixed = to_onnx(_int8(_One(gnn.AdaptiveAvgPool2d((2, 2))), (4, 2, 8, 6)),
                        torch.randn(1, 2, 8, 6))
    assert _declared(fixed.graph.input[0]) == ["N", 2, 8, 6]


class _CatPool(gnn.Module):
    def __init__(self):
        super().__init__()
        self.qa, self.qb, self.cat = gnn.QuantStub(), gnn.QuantStub(), gnn.Concat()
        self.pool, self.dq = gnn.AdaptiveAvgPool2d((3, 1)), gnn.DequantStub()

    def forward(self, a, b):
        return self.dq(self.pool(self.cat([self.qa(a), self.qb(b)], 1)))


def test_size_dependent_graph_with_two_inputs(tmp_path):
    """Two 4-D inputs: the metadata gives each one's size; the runtime names the input."""
    from gpuquant.quantization import calibration_qconfig, quantize, quantize_qat
    torch.manual_seed(0)
    with backends.use("reference"):
        q = quantize_qat(_CatPool().eval(), calibration_qconfig)
        with torch.no_grad():
            q(torch.randn(2, 2, 6, 4), torch.randn(2, 1, 6, 4))
        m = quantize(q)
    xs = (torch.randn(2, 2, 6, 4), torch.randn(2, 1, 6, 4))
    with pytest.warns(UserWarning, match="valid only at input spatial size 6x4 and 6x4"):
        proto = to_onnx(m, xs)
    assert _meta(proto)["gpuquant.fixed_input_hw"] == "6,4;6,4"
    sess = rt.load(proto)
    assert sess.fixed_input_hw == {"input_0": (6, 4), "input_1": (6, 4)}
    with backends.use("numpy"), torch.no_grad():
        want = m(*xs).numpy()
    assert sess.run(*[x.numpy() for x in xs]).tobytes() == want.tobytes()
    with pytest.raises(ValueError, match="'input_1' of spatial size 9x4: .* only for 6x4"):
        sess.run(xs[0].numpy(), torch.randn(2, 1, 9, 4).numpy())
    onnx.helper.set_model_props(proto, {"gpuquant.format": "qdq-v1",
                                        "gpuquant.fixed_input_hw": "6,4"})
    with pytest.raises(rt.RuntimeFormatError, match=r"'H,W' .* for each of the 2 4-D inputs"):
        rt.load(proto)


class _Tokens(gnn.Module):
    """A conv, then its output reshaped as ``how`` says (tokens of the feature map)."""

    def __init__(self, how):
        super().__init__()
        self.q, self.c, self.dq, self.how = gnn.QuantStub(), gnn.Conv2d(2, 4, 3, padding=1), \
            gnn.DequantStub(), how

    def forward(self, x):
        y = self.c(self.q(x))
        if self.how == "size_reads":
            y = y.reshape(y.size(0), y.size(1), -1)
        elif self.how == "shape_reads":
            y = y.view((y.shape[0], 4, -1))
        elif self.how == "size_unpack":
            n, c, h, w = y.size()
            y = y.reshape(n, c, -1)
        elif self.how == "channels_first":  # (C, N * H * W): C read at position 0
            y = y.reshape(y.size(1), -1)
        elif self.how == "computed":
            y = y.reshape(y.size(0), y.size(2) * y.size(3), -1)
        else:
            y = torch.flatten(y, 1, 2)
        return self.dq(y)


@pytest.mark.parametrize("how", ["size_reads", "shape_reads", "size_unpack",
                                 "channels_first"])
def test_reshape_from_size_reads_runs_any_spatial_size(how, tmp_path):
    """y.reshape(y.size(0), y.size(1), -1) was written as Reshape [0, 4, H*W of the
    example] with the input declared of free size and no warning: the runtime and
    onnxruntime failed at other sizes. A size read at its own position is 0 (copy) now, a
    literal stays, a read of the channels is their number (y.reshape(y.size(1), -1) had
    copied the batch where the example's batch equalled C: found by review), and the
    n, c, h, w = y.size() idiom reads as sizes; the outputs' non-batch sizes are declared
    unknown."""
    import warnings
    m = _int8(_Tokens(how), (4, 2, 7, 6))
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # (batch 4 = C for channels_first: the old rule copied the batch there)
        proto = to_onnx(m, torch.randn(4 if how == "channels_first" else 1, 2, 7, 6), path)
    assert "gpuquant.fixed_input_hw" not in _meta(proto)
    if how != "channels_first":
        assert _declared(proto.graph.output[0]) == ["N", None, None]
    for hw in [(7, 6), (5, 9)]:
        x = torch.randn(2, 2, *hw)
        want = int8_forward(m, x)
        assert want.shape == ((4, 2 * hw[0] * hw[1]) if how == "channels_first" else
                              (2, 4, hw[0] * hw[1]))
        assert rt.load(path).run(x.numpy()).tobytes() == want.tobytes(), hw
        got = _ort(path, x.numpy())
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= float(m.c.output_scale) * 1.001


@pytest.mark.parametrize("how,why", [
    ("computed", r"a reshape to sizes computed from the example \(dim 1 = 42\)"),
    ("flatten12", r"flatten\(1, 2\) keeps the example's trailing sizes \[6\]"),
])
def test_reshape_to_sizes_computed_from_the_example_is_size_dependent(how, why, tmp_path):
    """Sizes that are not a plain size read at their own position (arithmetic on sizes, a
    flatten's trailing dimensions) hold at the example's size only: warned, recorded, and
    the runtime refuses other sizes, where the graph had carried them silently."""
    m = _int8(_Tokens(how), (4, 2, 7, 6))
    path = tmp_path / "m.onnx"
    with pytest.warns(UserWarning, match=rf"valid only at input spatial size 7x6.*{why}"):
        proto = to_onnx(m, torch.randn(1, 2, 7, 6), path)
    assert _meta(proto)["gpuquant.fixed_input_hw"] == "7,6"
    x = torch.randn(2, 2, 7, 6)
    sess = rt.load(path)
    assert sess.run(x.numpy()).tobytes() == int8_forward(m, x).tobytes()
    with pytest.raises(ValueError, match=r"this graph holds only for 7x6"):
        sess.run(np.zeros((1, 2, 5, 6), np.float32))


class _Temp(gnn.Module):
    def __init__(self, use=False):
        super().__init__()
        self.q, self.c, self.dq, self.use = gnn.QuantStub(), gnn.Conv2d(2, 3, 1), \
            gnn.DequantStub(), use

    def forward(self, x, temperature: float = 1.0):
        y = self.dq(self.c(self.q(x)))
        return y / temperature if self.use else y


def test_to_onnx_example_inputs_against_forwards_parameters(tmp_path):
    """A defaulted non-tensor parameter was refused as 'takes more inputs than example_input
    gives'; surplus example tensors became a dangling graph input (and renamed the real one
    input_0). Now an unused defaulted parameter is left to its default, a used one is
    refused naming it, and surplus examples are refused."""
    x = torch.randn(1, 2, 4, 4)
    m = _int8(_Temp(), (4, 2, 4, 4))
    proto = to_onnx(m, x)
    assert [i.name for i in proto.graph.input] == ["input"]
    with pytest.raises(ValueError, match=r"example_input gives 3 inputs but _Temp.forward takes "
                                         r"2 \(x, temperature\)"):
        to_onnx(m, (x, x, x))
    with pytest.raises(TypeError, match=r"example_input\[1\] must be a float tensor .*got a "
                                        r"builtins.float \(leave out parameters that are not"):
        to_onnx(m, (x, 1.0))
    used = _int8(_Temp(use=True), (4, 2, 4, 4))
    with pytest.raises(ValueError, match=r"parameter 'temperature' \(default 1.0\) is used"):
        to_onnx(used, x)


def test_compiled_model_saves_and_exports_as_the_model_it_wraps(small_int8, tmp_path):
    """torch.compile(int8_model) saved as an OptimizedModule with '_orig_mod.' paths (it
    loaded into no skeleton of the architecture) and to_onnx blamed data-dependent control
    flow: both now describe the wrapped model."""
    import gpuquant
    compiled = torch.compile(small_int8)
    path = tmp_path / "m.safetensors"
    gpuquant.save(compiled, path)
    loaded = gpuquant.load(path, model=_Small())
    assert loaded.state_dict().keys() == small_int8.state_dict().keys()
    x = torch.randn(2, 3, 8, 8)
    assert int8_forward(loaded, x).tobytes() == int8_forward(small_int8, x).tobytes()
    assert to_onnx(compiled, x).SerializeToString() == to_onnx(small_int8, x).SerializeToString()


def test_load_names_directories_and_foreign_files(small_int8, tmp_path):
    import gpuquant
    with pytest.raises(IsADirectoryError, match="is a directory, not a model file"):
        gpuquant.load(tmp_path)
    with pytest.raises(IsADirectoryError, match="is a directory, not an ONNX file"):
        rt.load(tmp_path)
    torch.save(small_int8.state_dict(), tmp_path / "m.pt")
    with pytest.raises(ValueError, match=r"m.pt.*a zip archive \(a torch.save file\?\)"):
        gpuquant.load(tmp_path / "m.pt")
    to_onnx(small_int8, torch.randn(1, 3, 8, 8), tmp_path / "m.onnx")
    with pytest.raises(ValueError, match=r"m.onnx.*not a safetensors file .*an ONNX file\?"):
        gpuquant.load(tmp_path / "m.onnx")


def test_save_checks_arch_builds_the_model(tmp_path):
    """save(arch=...) checked the name only: a Sequential saved with arch='resnet18', or
    arch_kwargs the builder does not take, wrote a file that failed at load."""
    import gpuquant
    from gpuquant.models import digits_net
    seq = _int8(torch.nn.Sequential(gnn.QuantStub(), gnn.Conv2d(3, 4, 1), gnn.DequantStub()),
                (2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"arch='resnet18' builds a ResNet, but the model is a "
                                         r"Sequential"):
        gpuquant.save(seq, tmp_path / "a.safetensors", arch="resnet18")
    with pytest.raises(ValueError, match=r"arch='digits_net' does not build with arch_kwargs="
                                         r"\{'nope': 1\} \(TypeError"):
        gpuquant.save(seq, tmp_path / "b.safetensors", arch="digits_net", arch_kwargs={"nope": 1})
    assert not (tmp_path / "a.safetensors").exists()
    net = _int8(digits_net(), (4, 1, 8, 8))
    gpuquant.save(net, tmp_path / "d.safetensors", arch="digits_net")
    assert type(gpuquant.load(tmp_path / "d.safetensors")).__name__ == "DigitsNet"
