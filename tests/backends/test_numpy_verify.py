"""gpuquant.backends.verify and GPUQUANT_VERIFY=1 find a planted one-byte difference."""
import pytest
import torch

import gpuquant.backends as backends
from gpuquant.backends import registry
from gpuquant.backends.verify import VerifyError
from gpuquant.dtypes import quint8
from gpuquant.functional.requant import make_requant


@pytest.fixture
def faulty():
    backends.register("faulty", "tests.backends.faulty_backend")
    yield "faulty"
    registry.unregister("faulty")  # leave the registry as other tests expect it


class QConv(torch.nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.register_buffer("w", torch.randint(-127, 128, (cout, cin, 3, 3), dtype=torch.int8))
        self.register_buffer("b", torch.randint(-2000, 2000, (cout,), dtype=torch.int32))
        self.rq = make_requant(0.05, torch.rand(cout) * 0.01 + 0.002, 0.1, 3, quint8, "relu")
        self.stride = stride

    def forward(self, x):
        return backends.get_op("conv2d", x)(x, 3, self.w, self.b, self.stride, 1, 1, 1, self.rq)


class QPool(torch.nn.Module):
    def forward(self, x):
        return backends.get_op("max_pool2d", x)(x, (2, 2), (2, 2), (0, 0), (1, 1), False)


class QLinear(torch.nn.Module):
    def __init__(self, k, n):
        super().__init__()
        self.register_buffer("w", torch.randint(-127, 128, (n, k), dtype=torch.int8))
        self.rq = make_requant(0.1, torch.rand(n) * 0.01 + 0.001, 0.2, 3, quint8)

    def forward(self, x):
        return backends.get_op("linear", x)(x.flatten(1), 3, self.w, None, self.rq)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = QConv(3, 8)
        self.block = torch.nn.Sequential(QConv(8, 8), QPool())
        self.fc = QLinear(8 * 3 * 3, 5)

    def forward(self, x):
        return self.fc(self.block(self.conv1(x)))


def _input():
    x = torch.randint(0, 256, (2, 3, 6, 6), dtype=torch.int32).to(torch.uint8)
    return x.contiguous(memory_format=torch.channels_last)


def test_verify_clean_backend_reports_ok():
    net, x = Net(), _input()
    report = backends.verify(net, x, backend="reference")
    assert report.ok and report.first_mismatch is None
    assert [m.name for m in report.modules] == ["conv1", "block.0", "block.1", "fc", "(output)"]
    assert report.modules[0].shape == (2, 8, 6, 6) and report.modules[0].dtype == "uint8"
    assert "all 5 module outputs identical" in str(report)


def test_verify_names_the_module_with_the_planted_byte(faulty):
    net, x = Net(), _input()
    report = backends.verify(net, x, backend=faulty)
    assert not report.ok
    first = report.first_mismatch
    assert first.name == "conv1" and first.kind == "QConv" and first.shape == (2, 8, 6, 6)
    assert first.max_abs_diff == 1.0
    text = str(report)
    assert "first: 'conv1'" in text and "DIFF max |d| = 1" in text
    # with the current backend chosen by use(...)
    with backends.use(faulty):
        assert backends.verify(net, x).first_mismatch.name == "conv1"


def test_env_var_checks_every_op(faulty, monkeypatch):
    net, x = Net(), _input()
    monkeypatch.setenv("GPUQUANT_VERIFY", "1")
    with backends.use("reference"):
        net(x)  # a correct backend passes the per-op check
    with backends.use(faulty):
        with pytest.raises(VerifyError, match="op 'conv2d' on backend 'faulty' differs.*max \\|diff\\| 1"):
            net(x)
    monkeypatch.setenv("GPUQUANT_VERIFY", "0")
    with backends.use(faulty):
        net(x)  # off: no check, no error


def test_env_var_checks_fused_ops(faulty, monkeypatch):
    """A backend's fused kernel (conv2d_add) is checked against the NumPy backend's
    composition of conv2d and add."""
    import gpuquant.functional as GF
    x = _input()
    w = torch.randint(-127, 128, (4, 3, 3, 3), dtype=torch.int8)
    rq = make_requant(0.05, torch.rand(4) * 0.01 + 0.002, 0.1, 3, quint8)
    p = GF.make_add_params(0.1, 3, 0.2, 0, 0.25, 1, quint8, "relu")
    res = torch.randint(0, 256, (2, 4, 6, 6), dtype=torch.int32).to(torch.uint8)
    args = (x, 3, w, None, 1, 1, 1, 1, rq, res, p)
    monkeypatch.setenv("GPUQUANT_VERIFY", "1")
    with backends.use("reference"):
        want = GF.conv2d_add(*args)  # composed there: no fused kernel to check
    with backends.use(faulty):
        with pytest.raises(VerifyError, match="op 'conv2d_add' on backend 'faulty' differs"):
            GF.conv2d_add(*args)
    monkeypatch.setenv("GPUQUANT_VERIFY", "0")
    with backends.use(faulty):
        got = GF.conv2d_add(*args)
    assert (got != want).sum() == 1


def test_verify_rejects_non_modules():
    with pytest.raises(TypeError, match="nn.Module"):
        backends.verify(lambda x: x, torch.zeros(1))
    with pytest.raises(ValueError, match="unknown backend"):
        backends.verify(Net(), _input(), backend="nope")


def _quantized(model, *calib):
    from gpuquant.quantization import quantize, quantize_qat
    model.eval()
    quantize_qat(model)
    model.train()
    with torch.no_grad():
        for x in calib:
            model(x)
    model.eval()
    return quantize(model)


@pytest.mark.parametrize("name", ["digits", "resnet18"])
def test_quantized_networks_identical_on_numpy_and_reference(name):
    """Real converted networks: every module's bytes agree between numpy and reference."""
    from gpuquant.models import digits_net, resnet18
    if name == "digits":
        model, shape = digits_net(), (3, 1, 8, 8)
    else:
        model, shape = resnet18(num_classes=10), (1, 3, 8, 8)
    calib = (2,) + shape[1:]  # BatchNorm in training mode needs two values per channel
    model = _quantized(model, torch.randn(*calib) * 2, torch.randn(*calib))
    report = backends.verify(model, torch.randn(*shape), backend="reference")
    assert report.ok, str(report)
    assert len(report.modules) >= (10 if name == "digits" else 30)


def test_weight_only_linears_are_compared_to_float_rounding(monkeypatch):
    """Weight-only Linears accumulate in float (not bit-exact across backends): verify and
    GPUQUANT_VERIFY compare their float outputs (and those after them) within float32
    rounding of the K-term sum, and still catch a wrong result."""
    from gpuquant.backends import reference_dynamic
    from gpuquant.quantization.dynamic import quantize_dynamic
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(512, 64), torch.nn.GELU(), torch.nn.LayerNorm(64))
    m = quantize_dynamic(net.eval(), weight_only=True)
    x = torch.randn(8, 512)
    assert backends.verify(m, x, backend="reference").ok
    monkeypatch.setenv("GPUQUANT_VERIFY", "1")
    with backends.use("reference"):
        m(x)
    real = reference_dynamic.linear_weight_only
    monkeypatch.setitem(backends.get_backend("reference").OPS, "linear_weight_only",
                        lambda *a: real(*a) * 1.001)  # a 0.1% error: caught
    fresh = quantize_dynamic(net.eval(), weight_only=True, inplace=False)  # (no memoised op)
    with backends.use("reference"), pytest.raises(VerifyError, match="linear_weight_only"):
        fresh(x)


def test_float_outputs_are_compared_by_their_bits():
    """-0.0 against +0.0 is a byte difference (NUMERICS.md keeps the sign of zero)."""
    from gpuquant.backends.verify import _compare
    assert _compare(torch.tensor([0.0, float("nan")]), torch.tensor([0.0, float("nan")]))[0]
    assert not _compare(torch.tensor([-0.0]), torch.tensor([0.0]))[0]
    assert not _compare(torch.tensor([-0.0], dtype=torch.bfloat16),
                        torch.tensor([0.0], dtype=torch.bfloat16))[0]


@pytest.mark.parametrize("value,on", [("1", True), ("on", True), ("", False), ("off", False),
                                      ("0", False)])
def test_verify_env_values(monkeypatch, value, on):
    monkeypatch.setenv("GPUQUANT_VERIFY", value)
    assert registry.verifying() is on


def test_verify_env_rejects_other_values(monkeypatch):
    monkeypatch.setenv("GPUQUANT_VERIFY", "disable")
    with pytest.raises(ValueError, match="GPUQUANT_VERIFY='disable'"):
        registry.verifying()
