"""gpuquant.save / gpuquant.load: exact round trips, rebuild paths, clear errors on bad files."""
import json
import struct

import pytest
import torch

import gpuquant
import gpuquant.nn as gnn
from gpuquant import backends
from gpuquant.models import digits_net

from conftest import int8_forward
from deploy_helpers import ZooNet, calibrated


def _equal_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if isinstance(sa[k], torch.Tensor):
            assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k].cpu(), sb[k].cpu()), k
        else:
            assert sa[k] == sb[k], k


@pytest.mark.parametrize("which", ["zoo_int8", "zoo_uint8"])
def test_round_trip_with_skeleton_exact(which, request, tmp_path):
    qm = request.getfixturevalue(which)
    path = tmp_path / "zoo.safetensors"
    gpuquant.save(qm, path)
    loaded = gpuquant.load(path, model=ZooNet())
    _equal_state(qm, loaded)
    assert not loaded.training
    x = torch.randn(3, 3, 9, 17)
    assert int8_forward(loaded, x).tobytes() == int8_forward(qm, x).tobytes()
    # the header is JSON (no pickle): the tree names the quantized classes and arguments
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    desc = json.loads(json.loads(data[8:8 + n])["__metadata__"]["gpuquant"])
    by_path = {e["path"]: e for e in desc["tree"]}
    assert by_path["c2"]["quantized"] == "ConvRelu62d" and by_path["c2"]["args"]["groups"] == 6
    assert by_path["cat"]["args"]["num_inputs"] == 3


def test_round_trip_by_builder_and_map_location(tmp_path):
    from deploy_helpers import calibrated
    from gpuquant import backends
    with backends.use("reference"):
        qm = calibrated(digits_net(num_classes=7, width=16), (8, 1, 8, 8))
    path = tmp_path / "digits.safetensors"
    gpuquant.save(qm, path, arch="digits_net", arch_kwargs={"num_classes": 7, "width": 16})
    loaded = gpuquant.load(path, map_location="cpu")
    _equal_state(qm, loaded)
    assert type(loaded).__name__ == "DigitsNet"
    x = torch.randn(5, 1, 8, 8)
    assert int8_forward(loaded, x).tobytes() == int8_forward(qm, x).tobytes()


def test_round_trip_container_only_model(zoo_int8, tmp_path):
    """Quantized modules in a Sequential rebuild from the file alone."""
    seq = torch.nn.Sequential(zoo_int8.quant, zoo_int8.c1, zoo_int8.c2, torch.nn.Identity(),
                              zoo_int8.mp, torch.nn.Dropout(0.25), zoo_int8.dequant).eval()
    gpuquant.save(seq, tmp_path / "seq.safetensors")
    loaded = gpuquant.load(tmp_path / "seq.safetensors")
    assert isinstance(loaded, torch.nn.Sequential) and loaded[5].p == 0.25
    x = torch.randn(2, 3, 7, 5)
    assert int8_forward(loaded, x).tobytes() == int8_forward(seq, x).tobytes()


@pytest.mark.gpu
def test_load_onto_gpu_matches_cpu(zoo_int8, tmp_path):
    gpuquant.save(zoo_int8, tmp_path / "z.safetensors")
    loaded = gpuquant.load(tmp_path / "z.safetensors", model=ZooNet(), map_location="cuda")
    assert loaded.c1.weight.is_cuda
    x = torch.randn(2, 3, 13, 11)
    with torch.no_grad():
        assert torch.equal(loaded(x.cuda()).cpu(), zoo_int8(x))


@pytest.fixture
def saved(zoo_int8, tmp_path):
    path = tmp_path / "z.safetensors"
    gpuquant.save(zoo_int8, path)
    return path, path.read_bytes()


@pytest.mark.parametrize("cut", [0, 5, 8, 40, -1, -7, -300])
def test_truncated_file_is_refused(saved, tmp_path, cut):
    path, data = saved
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[:cut])
    with pytest.raises(ValueError, match="bad.safetensors"):
        gpuquant.load(bad, model=ZooNet())


@pytest.mark.parametrize("where", ["data_first", "data_last", "data_mid", "header_json"])
def test_corrupted_byte_is_refused(saved, tmp_path, where):
    path, data = saved
    (n,) = struct.unpack("<Q", data[:8])
    pos = {"data_first": 8 + n, "data_last": len(data) - 1, "data_mid": (8 + n + len(data)) // 2,
           "header_json": data.index(b"kernel_size") + 20}[where]
    b = bytearray(data)
    b[pos] ^= 0x04  # one flipped bit
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(b))
    with pytest.raises(ValueError, match=r"bad\.safetensors.*(checksum|description|safetensors)"):
        gpuquant.load(bad, model=ZooNet())


def test_foreign_and_mismatched_files(saved, tmp_path, zoo_int8):
    from safetensors.torch import save_file
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.ones(3)}, str(plain))
    with pytest.raises(ValueError, match="plain.safetensors.*gpuquant description"):
        gpuquant.load(plain)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ValueError, match="junk.bin"):
        gpuquant.load(junk)
    path, _ = saved
    with pytest.raises(ValueError, match="code is not in the file.*model="):
        gpuquant.load(path)
    with pytest.raises(ValueError, match="does not fit|no module|holds a ZooNet"):
        gpuquant.load(path, model=digits_net())
    with pytest.raises(FileNotFoundError):
        gpuquant.load(tmp_path / "missing.safetensors")


def test_bad_arguments(zoo_int8, tmp_path):
    with pytest.raises(TypeError, match="torch.nn.Module"):
        gpuquant.save("not a model", tmp_path / "x")
    with pytest.raises(ValueError, match="builder function of gpuquant.models.*'resnet18'"):
        gpuquant.save(zoo_int8, tmp_path / "x", arch="os.system")
    with pytest.raises(TypeError, match="skeleton"):
        gpuquant.load(tmp_path / "x", model="nope")
    with pytest.raises(ValueError, match="arch_kwargs given without arch"):
        gpuquant.save(zoo_int8, tmp_path / "x", arch_kwargs={"num_classes": 3})


class _DynamicNet(torch.nn.Module):
    """A transformer-ish float model for the quantize_dynamic round trips: a batch_first
    encoder (MultiheadAttention + feed-forward), a SmoothQuant'ed Linear and a head."""

    def __init__(self):
        super().__init__()
        from gpuquant.quantization.smoothquant import SmoothedLinear
        self.encoder = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(
            16, 2, 32, dropout=0.0, batch_first=True), 2)
        self.smoothed = SmoothedLinear(16, 16)
        self.head = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(),
                                        torch.nn.Linear(8, 3))

    def forward(self, x, pad=None):
        return self.head(self.smoothed(self.encoder(x, src_key_padding_mask=pad)))


def _dynamic_net():
    net = _DynamicNet()
    with torch.no_grad():
        net.smoothed.input_smoothing.uniform_(0.5, 2.0)
    return net.eval()


@pytest.mark.parametrize("mode", ["dynamic", "weight_only", "static"])
def test_round_trip_quantize_dynamic_model_with_float_skeleton(mode, tmp_path):
    """quantize_dynamic / quantize_static_linear models load into a fresh float model of the
    architecture (the skeleton convention of static models): same state, same bytes out,
    and the loaded encoder kept off torch's nested-tensor fast path."""
    from gpuquant.nn.quantized.linear_dynamic import DynamicMultiheadAttention
    from gpuquant.quantization import calibrate_linear_inputs, quantize_dynamic
    from gpuquant.quantization.smoothquant import quantize_static_linear
    torch.manual_seed(5)
    x = torch.randn(2, 6, 16)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 4:] = True
    net = _dynamic_net()
    if mode == "static":
        qm = quantize_static_linear(net, calibrate_linear_inputs(net, [(x,)]))
    else:
        qm = quantize_dynamic(net, weight_only=mode == "weight_only")
    path = tmp_path / "dyn.safetensors"
    gpuquant.save(qm, path)
    loaded = gpuquant.load(path, model=_dynamic_net())
    _equal_state(qm, loaded)
    assert [type(m) for m in loaded.modules()] == [type(m) for m in qm.modules()]
    assert loaded.smoothed.input_smoothing is not None
    if mode != "static":
        assert isinstance(loaded.encoder.layers[0].self_attn, DynamicMultiheadAttention)
    assert not loaded.encoder.use_nested_tensor
    with torch.no_grad():
        for args in ((x,), (x, pad)):
            assert torch.equal(loaded(*args), qm(*args))


def test_round_trip_dynamic_modules_container_only(tmp_path):
    """Dynamic modules in a Sequential rebuild from the file alone, dtypes included."""
    from gpuquant.nn.quantized.linear_dynamic import (DynamicLinear, StaticActLinear,
                                                      WeightOnlyLinear)
    torch.manual_seed(6)
    seq = torch.nn.Sequential(
        DynamicLinear.from_float_module(torch.nn.Linear(12, 9), gpuquant.qint8_narrow,
                                        gpuquant.qint8),
        WeightOnlyLinear.from_float_module(torch.nn.Linear(9, 7, bias=False)),
        StaticActLinear.from_float_module(torch.nn.Linear(7, 5), act_absmax=2.5)).eval()
    gpuquant.save(seq, tmp_path / "seq.safetensors")
    loaded = gpuquant.load(tmp_path / "seq.safetensors")
    _equal_state(seq, loaded)
    assert loaded[0].act_dtype is gpuquant.qint8_narrow and loaded[0].weight_dtype is gpuquant.qint8
    assert loaded[1].bias is None and float(loaded[2].act_scale) == float(seq[2].act_scale)
    x = torch.randn(3, 4, 12)
    with torch.no_grad():
        assert torch.equal(loaded(x), seq(x))


def test_save_refuses_qat_and_float_models(tmp_path):
    """A QAT model (``quantize`` forgotten) or a float one has no int8 saved form: refused at
    save, naming the module, instead of a file that fails at load."""
    import gpuquant.nn as gnn
    from gpuquant.quantization import quantize_qat

    class Net(gnn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.c, self.dq = gnn.QuantStub(), gnn.Conv2d(3, 4, 3), gnn.DequantStub()

        def forward(self, x):
            return self.dq(self.c(self.q(x)))
    qat = quantize_qat(Net())
    qat(torch.randn(2, 3, 6, 6))
    with pytest.raises(ValueError, match="module 'q' is a QAT module .*quantize\\(model\\)"):
        gpuquant.save(qat, tmp_path / "qat.safetensors")
    with pytest.raises(ValueError, match="Net holds no quantized module"):
        gpuquant.save(Net(), tmp_path / "float.safetensors")
    assert not (tmp_path / "qat.safetensors").exists()


def test_shared_module_round_trip(tmp_path):
    """A module under two names (tied / shared layers: quantize_dynamic keeps the tie)
    saves once with an alias and loads shared again, into a skeleton or from the file
    alone (the load failed on the second name's keys; found by review)."""
    from gpuquant.quantization import quantize_dynamic

    def build():
        shared = torch.nn.Linear(8, 8)
        return torch.nn.Sequential(shared, torch.nn.ReLU(), shared).eval()
    torch.manual_seed(7)
    x = torch.randn(3, 8)
    qm = quantize_dynamic(build())
    assert qm[0] is qm[2]
    path = tmp_path / "tied.safetensors"
    gpuquant.save(qm, path)
    loaded = gpuquant.load(path, model=build())
    assert loaded[0] is loaded[2] and type(loaded[0]) is type(qm[0])
    lin = torch.nn.Linear(8, 8)
    bare = quantize_dynamic(torch.nn.Sequential(lin, torch.nn.Sequential(lin)).eval())
    gpuquant.save(bare, path)
    alone = gpuquant.load(path)
    assert alone[0] is alone[1][0]
    with torch.no_grad():
        assert torch.equal(loaded(x), qm(x)) and torch.equal(alone(x), bare(x))


def test_malformed_data_offsets_is_refused(saved, tmp_path):
    """A header whose data_offsets is not two integers (one byte: [a,b] -> [a.b], still
    JSON) is refused naming the file (it raised IndexError)."""
    path, data = saved
    i = data.index(b'"data_offsets":[') + len(b'"data_offsets":[')
    j = data.index(b",", i)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[:j] + b"." + data[j + 1:])
    with pytest.raises(ValueError, match=r"bad\.safetensors.*data_offsets"):
        gpuquant.load(bad, model=ZooNet())


class _Island(gnn.Module):
    """An int8 conv, a float activation island between stubs, an int8 conv."""

    def __init__(self, act=torch.nn.GELU):
        super().__init__()
        self.quant, self.c1, self.dq1 = gnn.QuantStub(), gnn.Conv2d(3, 8, 3, padding=1), \
            gnn.DequantStub()
        self.act, self.q2, self.c2, self.dq = act(), gnn.QuantStub(), gnn.Conv2d(8, 4, 1), \
            gnn.DequantStub()

    def forward(self, x):
        x = self.dq1(self.c1(self.quant(x)))
        return self.dq(self.c2(self.q2(self.act(x))))


def test_skeleton_with_another_float_module_class_is_refused(tmp_path):
    """The file records every module's class, but a skeleton's own modules were never
    compared with it: a float GELU island loaded into a ReLU skeleton, silently computing
    other numbers. Classes compare by qualified name (__main__.Net fits mymodels.Net)."""
    with backends.use("reference"):
        qm = calibrated(_Island(), (4, 3, 8, 8), batches=1)
    path = tmp_path / "island.safetensors"
    gpuquant.save(qm, path)
    skeleton = _Island(torch.nn.ReLU)
    with pytest.raises(ValueError, match=r"module 'act' is a torch.nn.modules.activation.ReLU "
                                         r"in the model given but a torch.nn.modules.activation"
                                         r".GELU in the saved model"):
        gpuquant.load(path, model=skeleton)
    assert type(skeleton.c1) is gnn.Conv2d  # left as it was
    loaded = gpuquant.load(path, model=_Island())
    x = torch.randn(2, 3, 8, 8)
    with backends.use("numpy"), torch.no_grad():
        assert torch.equal(loaded(x), qm(x))


class _Two(torch.nn.Module):
    def __init__(self, swap=False):
        super().__init__()
        self.c1, self.c2, self.pool = torch.nn.Conv2d(3, 3, 3, padding=1), \
            torch.nn.Conv2d(3, 3, 1), torch.nn.MaxPool2d(2)
        self.swap = swap

    def forward(self, x):
        a, b = (self.c2, self.c1) if self.swap else (self.c1, self.c2)
        return self.pool(b(torch.relu(a(x))))


def test_dropin_skeleton_tracing_another_graph_is_refused(tmp_path):
    """A drop-in file grafted into a skeleton traced otherwise loaded silently: with a
    disable_quantize() the saved model had and the skeleton not, the file's extra stubs were
    added but never called and the skeleton's final stub took the file's scale (outputs 0.96
    off at 0.70). The skeleton must hold a module at every quantized path (the audit's case),
    and its graph must call the saved model's modules in the saved order (here)."""
    import warnings
    from gpuquant.quantization import (disable_quantize, ema_fakequant_qconfig, prepare_plain,
                                       quantize, quantize_qat)
    ex = torch.randn(2, 3, 8, 8)
    m = _Two()
    disable_quantize(m.pool)
    with backends.use("reference"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qat = quantize_qat(m, ema_fakequant_qconfig, example_inputs=(ex,))
        qat(ex)
        q = quantize(qat.eval())
    path = tmp_path / "dropin.safetensors"
    gpuquant.save(q, path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        undisabled = prepare_plain(_Two(), (ex,))
        swapped = _Two(swap=True)
        disable_quantize(swapped.pool)
        swapped = prepare_plain(swapped, (ex,))
        same = _Two()
        disable_quantize(same.pool)
        same = prepare_plain(same, (ex,))
    with pytest.raises(ValueError, match=r"its call 3 is 'pool', the saved model's 'dequant' "
                                         r".*same disable_quantize"):
        gpuquant.load(path, model=undisabled)
    with pytest.raises(ValueError, match=r"calls other modules than the saved one: its call 1 "
                                         r"is 'c2', the saved model's 'c1'"):
        gpuquant.load(path, model=swapped)
    loaded = gpuquant.load(path, model=same)
    with backends.use("numpy"), torch.no_grad():
        assert torch.equal(loaded(ex), q(ex))


class _ConvBn(torch.nn.Module):
    def __init__(self, pool="mean"):
        super().__init__()
        self.c, self.bn, self.fc = torch.nn.Conv2d(3, 8, 3, padding=1), \
            torch.nn.BatchNorm2d(8), torch.nn.Linear(8, 4)
        self.pool = pool

    def forward(self, x):
        y = torch.relu(self.bn(self.c(x)))
        return self.fc(y.mean((2, 3)) if self.pool == "mean" else y.amax((2, 3)))


def test_dropin_with_fused_batchnorm_round_trip(tmp_path, monkeypatch):
    """The int8 drop-in model no longer holds the fused BatchNorm at its own name (quantize
    drops the names its graph does not use); prepare_plain's skeleton still does, and load
    drops it the same way (else: 'Missing key(s) bn.weight ...'). A failed load puts it
    back."""
    import warnings
    from gpuquant.models import settle_bn
    from gpuquant.quantization import prepare_plain, quantize, quantize_qat
    x = torch.randn(4, 3, 6, 6)
    with backends.use("reference"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qat = quantize_qat(settle_bn(_ConvBn(), x), example_inputs=(x,))
        qat(x)
        q = quantize(qat.eval())
    assert not hasattr(q, "bn")
    path = tmp_path / "convbn.safetensors"
    gpuquant.save(q, path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        skeleton, wrong = prepare_plain(_ConvBn(), (x,)), prepare_plain(_ConvBn("amax"), (x,))
    loaded = gpuquant.load(path, model=skeleton)
    assert not hasattr(loaded, "bn")
    with backends.use("numpy"), torch.no_grad():
        assert torch.equal(loaded(x), q(x))
    with pytest.raises(ValueError, match="has no module at 'mean'"):
        gpuquant.load(path, model=wrong)  # (a float amax between stubs)
    from gpuquant import serialization

    def fail(*args):  # a failure after the unused names were dropped
        assert not hasattr(again, "bn")
        raise ValueError("refused after the drop")
    monkeypatch.setattr(serialization, "_check_fit", fail)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = prepare_plain(_ConvBn(), (x,))
    with pytest.raises(ValueError, match="refused after the drop"):
        gpuquant.load(path, model=again)
    assert type(again.bn) is torch.nn.BatchNorm2d and again.c.bn is again.bn
