"""QAT and int8 models, and gpuquant's functional ops, under ``torch.compile``: gpuquant's
modules and ops run eagerly at graph breaks (gpuquant/_compile.py), so a compiled model
trains and infers bit-identically to the eager one. (Before: Dynamo stopped with an
internal error inside a QAT model's fake quantizer.)"""
import copy
import inspect
import logging

import pytest
import torch
import torch.nn as nn

import gpuquant
import gpuquant.functional as GF
from gpuquant import QParams, backends, qint8, quint8
from gpuquant._compile import eager_under_compile
from gpuquant.quantization import (ema_fakequant_qconfig, lsq_qconfig, quantize, quantize_qat)

pytestmark = pytest.mark.usefixtures("one_thread")


class _Plain(nn.Module):
    """A plain torch.nn model (drop-in path): conv-bn-relu, a residual add, a linear head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)) + y)
        return self.fc(y.mean((2, 3)))


def _no_recompile_storm(caplog):
    """Dynamo logs a warning when it recompiles one code object past its limit (it did once
    per module instance when the eager wrapper's own frame was compiled)."""
    text = caplog.text
    assert "recompile_limit" not in text and "cache_size_limit" not in text, text[-2000:]


@pytest.mark.parametrize("qconfig", [ema_fakequant_qconfig, lsq_qconfig], ids=["ema", "lsq"])
def test_qat_training_steps_equal_eager(qconfig, caplog):
    """Three SGD steps of a drop-in QAT model, compiled and eager from the same start:
    losses, gradients, observer / LSQ state and weights bit-identical."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    qat = quantize_qat(_Plain(), qconfig, example_inputs=(x[:1],))
    qat(x)  # state sized (LSQ initialises from the first batch)
    twin = copy.deepcopy(qat)
    compiled = torch.compile(twin, backend="aot_eager")
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (qat, twin)]
    caplog.set_level(logging.WARNING)
    for step in range(3):
        xs = torch.randn(4, 3, 8, 8)
        losses = []
        for fn, opt in zip((qat, compiled), opts):
            opt.zero_grad()
            loss = fn(xs).square().mean()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        assert torch.equal(losses[0], losses[1]), step
    for (n, a), (_, b) in zip(qat.state_dict().items(), twin.state_dict().items()):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, n
    _no_recompile_storm(caplog)


def test_inductor_qat_forward_and_int8_model():
    """The default backend (Inductor): a QAT model's training forward and the converted
    int8 model (NumPy backend, which refuses to be traced) equal their eager results."""
    torch.manual_seed(1)
    net = gpuquant.models.digits_net()
    x = torch.randn(3, 1, 8, 8)
    qat = quantize_qat(net, ema_fakequant_qconfig)
    qat(x)
    twin = copy.deepcopy(qat)
    y_eager = qat(x)
    y_comp = torch.compile(twin)(x)
    assert torch.equal(y_eager, y_comp)
    q = quantize(qat.eval())
    with backends.use("numpy"):
        assert torch.equal(q(x), torch.compile(q)(x))


def test_functional_ops_inside_a_compiled_function():
    """quantize / dequantize / integer linear (NumPy backend, whose ops refuse to be traced)
    and fake_quant (reference backend, Inductor) called inside the user's compiled functions
    run eagerly: results exact."""
    torch.manual_seed(2)
    qp_x, qp_w = QParams(quint8, 0.04, 128), QParams(qint8, 0.01, 0)
    x, w = torch.randn(5, 16), torch.randn(7, 16)
    rq = GF.make_requant(0.04, 0.01, 0.1, 3, quint8)

    def f(t):
        xq = GF.quantize(t * 2, qp_x)
        y = GF.linear(xq, 128, GF.quantize(w, qp_w), None, rq)
        return GF.dequantize(xq, qp_x) + 1, y

    def g(t):
        return GF.fake_quant(t * 2, qp_x) * 3

    with backends.use("numpy"):
        want = f(x)
        got = torch.compile(f, backend="aot_eager")(x)
    want, got = want + (g(x),), got + (torch.compile(g)(x),)
    for a, b in zip(want, got):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_eager_wrapper_keeps_signature_and_defaults():
    """The wrapper has the forward's own signature (torch.fx reads it to make placeholders;
    defaults and keyword-only arguments pass through unchanged)."""
    def fwd(self, x, y=3, *rest, scale=2.0, **kw):
        return x, y, rest, scale, kw

    w = eager_under_compile(fwd)
    assert inspect.signature(w) == inspect.signature(fwd)
    assert w(None, 1) == (1, 3, (), 2.0, {})
    assert w(None, 1, 2, 5, 6, scale=4.0, extra=1) == (1, 2, (5, 6), 4.0, {"extra": 1})
    assert eager_under_compile(w) is w and w._torchdynamo_disable


def test_gpuquant_models_train_eval_and_batch_changes_without_recompile_storm(caplog):
    """A train / eval loop over a compiled gpuquant resnet18 with a batch-size change and
    outputs kept alive: the blocks' forwards (only gpuquant modules inside) and
    keep_producer run eagerly, so Dynamo neither recompiles per block shape nor guards on
    the producer table's size (both hit its recompile limit; found by review)."""
    torch.manual_seed(4)
    qat = quantize_qat(gpuquant.models.resnet18(num_classes=10), ema_fakequant_qconfig)
    qat(torch.randn(4, 3, 32, 32))
    compiled = torch.compile(qat, backend="aot_eager")
    opt = torch.optim.SGD(qat.parameters(), lr=0.01)
    caplog.set_level(logging.WARNING)
    for _ in range(2):
        qat.train()
        for b in (4, 5):
            opt.zero_grad()
            compiled(torch.randn(b, 3, 32, 32)).square().mean().backward()
            opt.step()
        qat.eval()
        with torch.no_grad():
            kept = [compiled(torch.randn(4, 3, 32, 32)) for _ in range(10)]
    assert len(kept) == 10
    _no_recompile_storm(caplog)


def test_wrapper_names_never_shadow_a_parameter():
    """A user subclass whose forward has a parameter named like the wrapper's own helpers
    (_fwd, _active, _slow, _d) still runs (it got None as the forward to call)."""
    net = quantize_qat(nn.Sequential(gpuquant.nn.QuantStub(), gpuquant.nn.Linear(4, 3),
                                     gpuquant.nn.DequantStub()))

    class MyLinear(type(net[1])):
        def forward(self, x, _fwd=None, _active=1, _slow=2, _d=3):
            return super().forward(x)
    net[1].__class__ = MyLinear
    assert net(torch.randn(2, 4)).shape == (2, 3)


def test_forwards_from_mixins_are_wrapped_too():
    """A forward a mixin brings (the Sync observers' _SyncMixin, ahead of the observer in
    the MRO) is wrapped like one a class defines (it was traced by Dynamo)."""
    from gpuquant.quantization import SyncExponentialMovingAverageObserver, SyncMinMaxObserver
    from gpuquant.quantization.observer import _SyncMixin
    for cls in (SyncMinMaxObserver, SyncExponentialMovingAverageObserver):
        assert cls.forward._gq_eager and cls.forward.__wrapped__ is _SyncMixin.forward


def test_jit_script_and_int8_trace_are_refused_naming_what_works():
    """TorchScript failed deep in its compiler ('undefined value _FLOAT_DTYPES', 'Cannot
    create dict for key type'), and tracing an int8 model advised tracing under the
    reference backend, where it failed too ('k must be an int, got Tensor'). Both refuse
    up front now, naming the module and what works; tracing a QAT model still works."""
    import gpuquant.nn as gnn
    torch.manual_seed(0)
    model = nn.Sequential(gnn.QuantStub(), gnn.ConvBnRelu2d(3, 4, 3), gnn.DequantStub())
    qat = quantize_qat(model)
    x = torch.randn(2, 3, 8, 8)
    qat(x)
    with pytest.raises(NotImplementedError, match=r"torch.jit.script: \w+ \(gpuquant\) cannot "
                                                  r"be scripted.*torch.compile"):
        torch.jit.script(qat)
    from gpuquant.quantization import disable_observer
    disable_observer(qat.eval())
    traced = torch.jit.trace(copy.deepcopy(qat), (x,), check_trace=False)
    x2 = torch.randn(2, 3, 8, 8)
    assert torch.equal(traced(x2), qat(x2))
    int8 = quantize(qat.eval(), inplace=False)
    with pytest.raises(NotImplementedError, match="torch.jit.script"):
        torch.jit.script(int8)
    for be in ("reference", "numpy"):
        with backends.use(be), pytest.raises(NotImplementedError,
                                             match="cannot be recorded by torch.jit.trace"):
            torch.jit.trace(int8, (x,), check_trace=False)
