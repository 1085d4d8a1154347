"""Fused observer + fake-quant (triton op observe_fake_quant) against the unfused definition
(observer(x), then FakeQuantize with observer.get_qparams()): the observer's buffers, its
qparams and the output are bit-identical, batch after batch."""
import copy

import pytest
import torch

import gpuquant
import gpuquant.backends as backends
from gpuquant.backends.triton import observer as tobs
from gpuquant.quantization import fake_quant as qfq
from gpuquant.quantization import observer as qobs

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered")  # inf - inf, discarded


@pytest.fixture(autouse=True)
def _on_triton():
    """The triton backend explicitly: on CPU the fused QAT ops run the interpreter only then."""
    with backends.use("triton"):
        yield

OBSERVERS = [
    (qobs.MinMaxObserver, {}),
    (qobs.ExponentialMovingAverageObserver, {"momentum": 0.9}),
    (qobs.SyncExponentialMovingAverageObserver, {"momentum": 0.7}),
]
LAYOUTS = [
    ((5, 33), None, None),
    ((3, 13, 4, 5), 1, torch.channels_last),
    ((9, 4, 3, 3), 0, None),
    ((4, 6, 7), -1, None),
    ((9, 4, 3, 3), 0, torch.channels_last),
    ((3, 5, 4, 2), 1, None),                   # NCHW contiguous: rows = (n, hw) pairs
]


def definition(x, fake_quant, observer, relu=False):
    """The unfused definition: apply_fake_quant_with_observer on the reference backend (on
    the triton backend it would take the fused op itself)."""
    with backends.use("reference"):
        return qfq.apply_fake_quant_with_observer(x, fake_quant, observer, relu=relu)


def assert_same_with_nans(y, yr):
    """Equal values, NaN exactly where the other has NaN."""
    assert torch.equal(y.isnan(), yr.isnan())
    assert torch.equal(torch.nan_to_num(y), torch.nan_to_num(yr))


def check_step(x, fused, ref, fq, relu=False, **kw):
    """One batch through the fused op and through the definition: the same output bits
    (NaN where NaN), the same observer state, the same input gradient."""
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = tobs.observe_fake_quant(xa, fused, fq, relu=relu, **kw)
    yr = definition(xb, fq, ref, relu=relu)
    assert y is not None and y.dtype == x.dtype
    assert_same_with_nans(y, yr)
    assert_same_state(fused, ref)
    g = torch.randn_like(x)
    y.backward(g)
    yr.backward(g)
    assert torch.equal(torch.nan_to_num(xa.grad), torch.nan_to_num(xb.grad))


def assert_same_state(a, b):
    for name in ("min_val", "max_val", "nonfinite_batches"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    qa, qb = a.get_qparams(), b.get_qparams()
    assert torch.equal(qa.scale, qb.scale) and torch.equal(qa.zero_point, qb.zero_point)
    assert qa.scale.dtype == torch.float32 and qa.zero_point.dtype == torch.int32


MM, EMA, SEMA = OBSERVERS
CASES = [  # observer, layout, (dtype, symmetric), check_finite: each piece in several cases
    (MM, LAYOUTS[0], (gpuquant.qint8, True), False),
    (MM, LAYOUTS[1], (gpuquant.quint8, False), True),
    (MM, LAYOUTS[2], (gpuquant.qint4, False), False),
    (MM, LAYOUTS[3], (gpuquant.quint4, True), False),
    (MM, LAYOUTS[4], (gpuquant.qint8_narrow, True), False),
    (EMA, LAYOUTS[0], (gpuquant.quint8, False), True),
    (EMA, LAYOUTS[1], (gpuquant.qint8, True), False),
    (EMA, LAYOUTS[2], (gpuquant.quint4, True), False),
    (EMA, LAYOUTS[3], (gpuquant.qint8_narrow, False), True),
    (SEMA, LAYOUTS[1], (gpuquant.quint8, False), False),
    (EMA, LAYOUTS[5], (gpuquant.quint8, False), False),
    (SEMA, LAYOUTS[2], (gpuquant.qint8, True), True),
]


@pytest.mark.parametrize("obs,layout,dsym,check_finite", CASES,
                         ids=[f"{c[0][0].__name__}-{c[1][1]}-{c[2][0].name}-{c[2][1]}-{c[3]}"
                              for c in CASES])
@pytest.mark.parametrize("relu", [False, True])
def test_fused_matches_unfused(obs, layout, dsym, check_finite, relu):
    """... with relu=True: ReLU folded into the fused op against torch.relu, then the
    definition (output, observer state and the gradient through both)."""
    (cls, kw), (shape, axis, fmt), (d, sym) = obs, layout, dsym
    fused = cls(dtype=d, symmetric=sym, axis=axis, check_finite=check_finite, **kw).to(DEV)
    ref, fq = copy.deepcopy(fused), qfq.FakeQuantize(d)
    for it in range(3):
        x = torch.randn(shape, device=DEV) * (1 + it) + 0.4 * it
        x.view(-1)[::7] = 0.0  # ReLU's edge: x == 0 passes no gradient
        if fmt is not None:
            x = x.contiguous(memory_format=fmt)
        check_step(x, fused, ref, fq, relu=relu, programs=3, tile=64)


@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16])
def test_half_inputs(dt):
    d = gpuquant.quint8
    fused = qobs.ExponentialMovingAverageObserver(0.8, d, symmetric=False, axis=1,
                                                  check_finite=False).to(DEV)
    ref, fq = copy.deepcopy(fused), qfq.FakeQuantize(d)
    for it in range(2):
        x = (torch.randn(2, 5, 3, 4, device=DEV) * 3).to(dt).contiguous(memory_format=torch.channels_last)
        y = tobs.observe_fake_quant(x, fused, fq, programs=2, tile=32)
        yr = definition(x, fq, ref)
        assert y.dtype == dt and torch.equal(y, yr)
        assert_same_state(fused, ref)


@pytest.mark.parametrize("axis", [None, 1])
def test_fused_relu_edges(axis):
    """-0.0, 0.0, the smallest negatives, NaN (passed through as torch.relu does: NaN out,
    the batch dropped by the observer), all-negative channels: output bits and gradient
    equal to torch.relu then the definition."""
    d = gpuquant.quint8
    fused = qobs.ExponentialMovingAverageObserver(0.9, d, symmetric=False, axis=axis,
                                                  check_finite=False).to(DEV)
    ref, fq = copy.deepcopy(fused), qfq.FakeQuantize(d)
    for it in range(3):
        x = torch.randn(4, 3, 5, device=DEV)
        x[0, 0, :4] = torch.tensor([-0.0, 0.0, -1e-45, 1e-45])
        x[:, 2] = -x[:, 2].abs() - 0.1  # channel 2 entirely negative
        if it == 1:
            x[1, 1, 1] = float("nan")
        check_step(x, fused, ref, fq, relu=True, programs=2, tile=32)


@pytest.mark.parametrize("cls,kw", [(qobs.MinMaxObserver, {}),
                                     (qobs.ExponentialMovingAverageObserver, {"momentum": 0.8})])
@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("relu", [False, True])
def test_per_tensor_two_launch_path(monkeypatch, cls, kw, dt, relu):
    """Per-tensor observers without host hooks take the two-launch path (partials with a
    state snapshot, then update + fake quant in one kernel): bit-identical to the definition
    batch after batch, a NaN batch counted and skipped, gradients equal."""
    calls = []
    orig = tobs._ObserveTwoLaunch.apply
    monkeypatch.setattr(tobs._ObserveTwoLaunch, "apply",
                        lambda *a: calls.append(1) or orig(*a))
    d = gpuquant.quint8 if relu else gpuquant.qint8
    fused = cls(dtype=d, symmetric=not relu, check_finite=False, **kw).to(DEV)
    ref, fq = copy.deepcopy(fused), qfq.FakeQuantize(d)
    for it in range(4):
        x = (torch.randn(3, 5, 7, 11, device=DEV) * (1 + it) - 0.3 * it).to(dt)
        if it == 2:
            x[0, 1, 2, 3] = float("nan")
        check_step(x, fused, ref, fq, relu=relu, programs=5, tile=64)
    assert len(calls) == 4 and int(fused.nonfinite_batches) == 1


@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("fmt", [None, torch.channels_last])
def test_fused_add_observe_fake_quant(dt, relu, fmt):
    """addend: fake_quant(observer(act(a + b))) without the sum written out (QAT Elemwise
    add / add_relu): the output bytes, the observer state and both inputs' gradients equal
    the definition's (torch's add, then observe + fake quant), batch after batch, a NaN
    batch counted and skipped."""
    fused = qobs.ExponentialMovingAverageObserver(0.8, gpuquant.qint8, symmetric=True,
                                                  check_finite=False).to(DEV)
    ref, fq = copy.deepcopy(fused), qfq.FakeQuantize(gpuquant.qint8)
    for it in range(3):
        a = (torch.randn(2, 6, 5, 7, device=DEV) * (1 + it)).to(dt)
        b = (torch.randn(2, 6, 5, 7, device=DEV) - 0.2 * it).to(dt)
        if fmt is not None:
            a, b = a.contiguous(memory_format=fmt), b.contiguous(memory_format=fmt)
        if it == 1:
            b[1, 2, 3, 4] = float("nan")
        a1, b1 = a.clone().requires_grad_(), b.clone().requires_grad_()
        a2, b2 = a.clone().requires_grad_(), b.clone().requires_grad_()
        y = tobs.observe_fake_quant(a1, fused, fq, relu=relu, addend=b1, programs=3, tile=64)
        with backends.use("reference"):
            yr = qfq.apply_fake_quant_with_observer(a2, fq, ref, relu=relu, addend=b2)
        assert y is not None and y.dtype == dt and y.stride() == a.stride()
        assert_same_with_nans(y, yr)
        assert_same_state(fused, ref)
        g = torch.randn_like(a)
        y.backward(g)
        yr.backward(g)
        for u, v in ((a1, a2), (b1, b2)):
            assert torch.equal(torch.nan_to_num(u.grad), torch.nan_to_num(v.grad))
    assert int(fused.nonfinite_batches) == 1


def test_fused_add_declines_what_it_does_not_take():
    obs = qobs.MinMaxObserver(gpuquant.qint8, check_finite=False).to(DEV)
    fq = qfq.FakeQuantize(gpuquant.qint8)
    a = torch.randn(2, 3, 4, 5, device=DEV)
    for b in (torch.randn(1, 3, 4, 5, device=DEV),  # broadcast
              a.contiguous(memory_format=torch.channels_last).clone(),  # other strides
              a.double()):
        assert tobs.observe_fake_quant(a, obs, fq, addend=b) is None
    per_channel = qobs.MinMaxObserver(gpuquant.qint8, axis=1, check_finite=False).to(DEV)
    assert tobs.observe_fake_quant(a, per_channel, fq, addend=a.clone()) is None
    assert tobs.observe_fake_quant(a, obs, fq, addend=a.clone()) is not None


@pytest.mark.parametrize("cls,kw", [(qobs.MinMaxObserver, {}),
                                     (qobs.ExponentialMovingAverageObserver, {"momentum": 0.7})])
@pytest.mark.parametrize("shape,fmt", [((9, 4, 3, 3), None), ((9, 4, 3, 3), "cl"),
                                       ((7, 13), None), ((5, 1, 1, 1), None)])
def test_per_channel_two_launch_path(monkeypatch, cls, kw, shape, fmt):
    """Per-channel observers of weights (channels outermost) take the two-launch path too:
    the qparams computed per element from the partials and the state snapshot, the state
    written by each channel's first element. Bit-identical to the definition, a NaN in one
    channel counted once and that channel's state kept."""
    calls = []
    orig = tobs._ObserveTwoLaunch.apply
    monkeypatch.setattr(tobs._ObserveTwoLaunch, "apply",
                        lambda *a: calls.append(a[2]) or orig(*a))
    d = gpuquant.qint8_narrow
    fused = cls(dtype=d, symmetric=True, axis=0, check_finite=False, **kw).to(DEV)
    ref, fq = copy.deepcopy(fused), qfq.FakeQuantize(d)
    for it in range(4):
        w = torch.randn(shape, device=DEV) * torch.rand(shape[0], *([1] * (len(shape) - 1)),
                                                       device=DEV) * (1 + it)
        if fmt == "cl":
            w = w.contiguous(memory_format=torch.channels_last)
        if it == 2:
            w[(1,) + (0,) * (len(shape) - 2) + (min(1, shape[-1] - 1),)] = float("nan")
        check_step(w, fused, ref, fq, programs=3, tile=64)
    assert calls == [0] * 4 and int(fused.nonfinite_batches) == 1  # the first batch too


@pytest.mark.parametrize("cls,kw", [(qobs.MinMaxObserver, {}),
                                     (qobs.ExponentialMovingAverageObserver, {"momentum": 0.7})])
@pytest.mark.parametrize("shape,fmt,sym", [((9, 4, 3, 3), None, True), ((9, 4, 3, 3), "cl", False),
                                           ((7, 1500), None, True), ((5, 1, 1, 1), None, False)])
def test_per_channel_weights_in_one_launch(monkeypatch, cls, kw, shape, fmt, sym):
    """Float32 weights per output channel (rows contiguous) take one launch a direction
    (gpuquant.backends.triton.bn_fold.observe_rows_fake_quant: a program a channel, min /
    max, state update, fake quant; the backward recomputes the mask): bit-identical output,
    state and gradient to the definition, batch after batch, a NaN row counted once."""
    from gpuquant.backends.triton import bn_fold
    calls = []
    orig = bn_fold._ObserveRows.apply
    monkeypatch.setattr(bn_fold._ObserveRows, "apply", lambda *a: calls.append(1) or orig(*a))
    d = gpuquant.qint8_narrow if sym else gpuquant.quint8
    fused = cls(dtype=d, symmetric=sym, axis=0, check_finite=False, **kw).to(DEV)
    ref, fq = copy.deepcopy(fused), qfq.FakeQuantize(d)
    for it in range(4):
        w = torch.randn(shape, device=DEV) * torch.rand(shape[0], *([1] * (len(shape) - 1)),
                                                       device=DEV) * (1 + it) + 0.1 * it
        if fmt == "cl":
            w = w.contiguous(memory_format=torch.channels_last)
        if it == 2:
            w[(1,) + (0,) * (len(shape) - 1)] = float("nan")
        check_step(w, fused, ref, fq)
    assert len(calls) == 4 and int(fused.nonfinite_batches) == 1  # the first batch too


def test_nonfinite_batches_dropped_on_device():
    d = gpuquant.qint8
    for axis in (None, 0):
        fused = qobs.ExponentialMovingAverageObserver(0.9, d, axis=axis, check_finite=False).to(DEV)
        ref, fq = copy.deepcopy(fused), qfq.FakeQuantize(d)
        xs = [torch.randn(4, 9, device=DEV) for _ in range(3)]
        xs[1][2, 3] = float("nan")
        xs[2][1, 1] = float("inf")
        for x in xs:
            y = tobs.observe_fake_quant(x, fused, fq)
            yr = definition(x, fq, ref)
            assert_same_with_nans(y, yr)
            assert_same_state(fused, ref)
        assert int(fused.nonfinite_batches) == 2


@pytest.mark.parametrize("cls,kw", OBSERVERS[:2])
@pytest.mark.parametrize("axis,shape", [(None, (4, 9)), (0, (4, 9)), (1, (3, 4, 5, 6)),
                                        (None, (5, 2048 * 3))])
def test_ranges_past_float32_dropped_on_device_as_the_definition(cls, kw, axis, shape):
    """check_finite=False, affine: a finite batch whose range would leave no finite float32
    scale (max - min past 3.4e38) is dropped and counted by the kernels, as the observer's
    definition drops it (no NaN output, the state kept)."""
    d = gpuquant.quint8
    fused = cls(**kw, dtype=d, symmetric=False, axis=axis, check_finite=False).to(DEV)
    ref, fq = copy.deepcopy(fused), qfq.FakeQuantize(d)
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(shape, generator=g).to(DEV) for _ in range(4)]
    xs[1] = xs[1] * 2e38  # wider than float32 in every channel
    xs[1].view(-1)[0] = -3e38
    for x in xs:
        y = tobs.observe_fake_quant(x, fused, fq)
        yr = definition(x, fq, ref)
        assert_same_with_nans(y, yr)
        assert_same_state(fused, ref)
        assert not bool(torch.isnan(y).any())
    assert int(fused.nonfinite_batches) == int(ref.nonfinite_batches) >= 1


def test_check_finite_raises_and_keeps_state():
    d = gpuquant.qint8
    obs = qobs.MinMaxObserver(d, axis=None).to(DEV)  # check_finite=True: the one host read
    fq = qfq.FakeQuantize(d)
    tobs.observe_fake_quant(torch.randn(3, 4, device=DEV), obs, fq)
    before = (obs.min_val.clone(), obs.max_val.clone())
    bad = torch.randn(3, 4, device=DEV)
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        tobs.observe_fake_quant(bad, obs, fq)
    assert torch.equal(obs.min_val, before[0]) and torch.equal(obs.max_val, before[1])


def test_refused_first_per_channel_batch_leaves_the_state_unsized():
    """A first per-channel batch refused for NaN leaves the state as it was (empty), so a
    next batch of another channel count is taken, as on the reference backend."""
    d = gpuquant.qint8
    obs = qobs.MinMaxObserver(d, axis=1).to(DEV)
    fq = qfq.FakeQuantize(d)
    bad = torch.randn(2, 4, 3, device=DEV)
    bad[0, 1, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        tobs.observe_fake_quant(bad, obs, fq)
    assert obs.min_val.numel() == 0 and obs.max_val.numel() == 0
    good = torch.randn(2, 3, 3, device=DEV)
    tobs.observe_fake_quant(good, obs, fq)
    assert torch.equal(obs.min_val, good.amin(dim=(0, 2)))


def test_unsupported_pairs_return_none():
    d = gpuquant.qint8
    x = torch.randn(3, 4, device=DEV)
    obs = qobs.MinMaxObserver(d).to(DEV)
    assert tobs.observe_fake_quant(x, obs, qfq.FakeQuantize(gpuquant.quint8)) is None
    assert tobs.observe_fake_quant(x, qobs.HistogramObserver(d), qfq.FakeQuantize(d)) is None
    assert tobs.observe_fake_quant(x, obs, qfq.LSQ(d)) is None
    assert tobs.observe_fake_quant(x, obs, qfq.FakeQuantize(d).disable()) is None
    assert tobs.observe_fake_quant(x, copy.deepcopy(obs).disable(), qfq.FakeQuantize(d)) is None
    assert tobs.observe_fake_quant(x, None, qfq.FakeQuantize(d)) is None
    assert not obs.has_observed  # nothing recorded by a refused call


def test_channel_count_mismatch_raises():
    d = gpuquant.qint8
    obs = qobs.MinMaxObserver(d, axis=0, check_finite=False).to(DEV)
    fq = qfq.FakeQuantize(d)
    tobs.observe_fake_quant(torch.randn(5, 3, device=DEV), obs, fq)
    with pytest.raises(ValueError, match="channels"):
        tobs.observe_fake_quant(torch.randn(6, 3, device=DEV), obs, fq)


def test_registered_as_backend_op():
    with backends.use("triton"):
        assert backends.find_op("observe_fake_quant", torch.empty(1, device=DEV)) is \
            tobs.observe_fake_quant


@pytest.mark.skipif(DEV != "cpu", reason="the interpreter question only arises on CPU")
def test_cpu_auto_selection_never_picks_the_interpreter():
    obs, fq = qobs.MinMaxObserver(gpuquant.qint8, check_finite=False), qfq.FakeQuantize(gpuquant.qint8)
    with backends.use("reference"):
        assert tobs.observe_fake_quant(torch.randn(4), obs, fq) is None
    assert not obs.has_observed


def test_apply_fake_quant_with_observer_takes_the_fused_path(monkeypatch):
    import gpuquant.backends.triton as tb
    calls = []

    def spy(x, observer, fake_quant, relu=False):
        y = tobs.observe_fake_quant(x, observer, fake_quant, relu=relu)
        calls.append(y is not None)
        return y
    monkeypatch.setitem(tb.OPS, "observe_fake_quant", spy)
    d = gpuquant.qint8
    obs = qobs.ExponentialMovingAverageObserver(0.9, d, check_finite=False).to(DEV)
    ref, fq = copy.deepcopy(obs), qfq.FakeQuantize(d)
    x = torch.randn(6, 7, device=DEV)
    y = qfq.apply_fake_quant_with_observer(x, fq, obs)
    with backends.use("reference"):
        yr = qfq.apply_fake_quant_with_observer(x, fq, ref)
    assert calls == [True]
    assert torch.equal(y, yr)
    assert_same_state(obs, ref)


@pytest.mark.parametrize("bn_act", [False, True], ids=["bn_composite", "bn_act_fused"])
def test_qat_network_on_triton_equals_reference(monkeypatch, bn_act):
    """A small QAT network (conv+bn+relu, conv+bn, add_relu, linear; fused observers on every
    weight and activation) trained two steps on the triton backend and on the reference
    backend. With batch norm normalised by PyTorch (bn_act off): the same outputs bit for
    bit, and the same gradients to float32 rounding (the fused BN fold,
    gpuquant.backends.triton.bn_fold, orders the per-channel gradient arithmetic differently
    from autograd; every other gradient is bit-identical). With the fused batch norm +
    fake quant (gpuquant.backends.triton.bn_act: its own normalisation, one ulp from
    F.batch_norm's): outputs and gradients to float32 rounding, with affine activations
    (a symmetric qint8 range puts the batch maximum on a rounding tie, where one ulp flips
    the value and the gradient of that element)."""
    import gpuquant.backends.triton as tb
    import gpuquant.nn as gnn
    from gpuquant.bench.suites.qat_step import qat_qconfig
    from gpuquant.quantization import quantize_qat
    from functools import partial
    qconfig = qat_qconfig()
    if bn_act:
        qconfig = qconfig._replace(
            act_observer=partial(qobs.ExponentialMovingAverageObserver, momentum=0.9,
                                 dtype=gpuquant.quint8, symmetric=False, check_finite=False),
            act_fake_quant=partial(qfq.FakeQuantize, dtype=gpuquant.quint8))
    else:  # batch norm by PyTorch: neither fused op that computes its own statistics
        monkeypatch.delitem(tb.OPS, "bn_normalize_observe_fake_quant")
        monkeypatch.delitem(tb.OPS, "conv_bn_act_train")

    class Net(gnn.Module):
        def __init__(self):
            super().__init__()
            self.quant = gnn.QuantStub()
            self.c1 = gnn.ConvBnRelu2d(3, 8, 3, 1, 1, bias=False)
            self.c2 = gnn.ConvBn2d(8, 8, 3, 1, 1, bias=False)
            self.add = gnn.Elemwise("add_relu")
            self.pool = gnn.AdaptiveAvgPool2d((1, 1))
            self.fc = gnn.Linear(8, 5)
            self.dq = gnn.DequantStub()

        def forward(self, x):
            y = self.c1(self.quant(x))
            y = self.add(self.c2(y), y)
            return self.dq(self.fc(self.pool(y).flatten(1)))

    model = quantize_qat(Net(), qconfig).to(DEV)
    twin = copy.deepcopy(model)
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 3, 6, 6, device=DEV).contiguous(memory_format=fmt)
        outs = []
        for mod, be in ((model, "triton"), (twin, "reference")):
            with backends.use(be):
                for _ in range(2):
                    mod.zero_grad()
                    y = mod(x)
                    y.square().sum().backward()
            outs.append((y.detach(), [p.grad.clone() for p in mod.parameters()]))
        (y, gs), (yr, gsr) = outs
        if bn_act:
            torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(y, yr)
        names = [n for n, _ in model.named_parameters()]
        for n, a, b in zip(names, gs, gsr):
            if bn_act:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=n)
            elif n.startswith(("c1.", "c2.")):  # the BN-folded layers
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
            else:  # the Linear
                assert torch.equal(a, b), n


@pytest.mark.parametrize("dtype,sym", [(gpuquant.qint8, True), (gpuquant.quint8, False)])
def test_compiled_kernels_divide_as_torch_does_on_cuda(monkeypatch, dtype, sym):
    """torch.ao divides the range by a Python float: on CUDA PyTorch computes that as a
    multiplication by the float32 reciprocal (up to one ulp off a division). The compiled
    kernels (GPU) do the same (``_RECIP_DIV``); the interpreter divides, as torch on the CPU.
    Here the GPU branch runs under the interpreter against that CUDA arithmetic."""
    import triton.language as tl
    monkeypatch.setattr(tobs, "_RECIP_DIV", tl.constexpr(True))
    g = torch.Generator().manual_seed(8)
    differs = 0
    for _ in range(40):
        x = torch.randn(257, generator=g) * torch.rand(1, generator=g) * 10 + 0.3
        obs = qobs.MinMaxObserver(dtype, symmetric=sym, check_finite=False)
        scale, zp, inv = tobs.observer_step(x, obs, None)
        mn, mx = x.min().clamp(max=0), x.max().clamp(min=0)
        if sym:
            b = torch.tensor(float(dtype.qmax - dtype.qmin) / 2)
            num = torch.maximum(-mn, mx)
        else:
            b = torch.tensor(float(dtype.qmax - dtype.qmin))
            num = mx - mn
        cuda_like = torch.clamp(num * (1.0 / b), min=torch.finfo(torch.float32).eps)
        assert torch.equal(scale.reshape(()), cuda_like), (scale, cuda_like)
        differs += int(not torch.equal(cuda_like, torch.clamp(num / b, min=1.1920929e-07)))
    assert differs > 0  # the two divisions do differ on some of these batches


@pytest.mark.parametrize("axis", [-1, 2])
def test_output_keeps_the_input_layout_where_a_copy_ran(axis):
    """Per channel along an axis the kernels cannot take in place (channels_last, last /
    height axis: a contiguous copy runs): the output comes back in x's strides, as the
    reference's, with the same values."""
    x = torch.randn(2, 4, 3, 5, device=DEV).contiguous(memory_format=torch.channels_last)
    outs = {}
    for be in ("reference", "triton"):
        with backends.use(be):
            obs = qobs.MinMaxObserver(gpuquant.qint8, axis=axis, check_finite=False).to(DEV)
            outs[be] = qfq.apply_fake_quant_with_observer(x, qfq.FakeQuantize(gpuquant.qint8),
                                                          obs)
    assert outs["triton"].stride() == outs["reference"].stride() == x.stride()
    assert torch.equal(outs["triton"], outs["reference"])


def assert_same_state_with_nans(a, b):
    """:func:`assert_same_state` for states that hold NaN (NaN where the other has NaN)."""
    for name in ("min_val", "max_val"):
        assert_same_with_nans(getattr(a, name), getattr(b, name))
    assert torch.equal(a.nonfinite_batches, b.nonfinite_batches)
    qa, qb = a.get_qparams(), b.get_qparams()
    assert_same_with_nans(qa.scale, qb.scale)
    assert torch.equal(qa.zero_point, qb.zero_point)


@pytest.mark.parametrize("cls,kw", OBSERVERS[:2])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("shape,axis", [((4, 9), None), ((9, 4, 3, 3), 0), ((3, 5, 4, 2), 1)])
def test_nan_state_as_the_definition(cls, kw, sym, shape, axis):
    """A NaN in the state (a loaded state_dict: load_state_dict takes a non-finite range as
    unobserved) through every fused path (per tensor: two launches; float32 weights per
    output channel: one; other axes: observer_step): MinMax keeps it NaN as the
    definition's torch.min / torch.max do (every batch dropped and counted, a NaN scale, NaN
    outputs), the moving average starts afresh from the next batch (its isfinite test).
    On the GPU the plain min.f32 / max.f32 dropped the NaN: a fresh MinMax range and, before
    that, a scale of eps (the PTX check is in test_triton_ptx_fake_quant.py)."""
    d = gpuquant.qint8 if sym else gpuquant.quint8
    fused = cls(dtype=d, symmetric=sym, axis=axis, check_finite=False, **kw).to(DEV)
    fused(torch.randn(shape, device=DEV))  # size and set the state
    state = fused.state_dict()
    state["min_val"].view(-1)[-1] = float("nan")
    state["max_val"].view(-1)[-1] = float("nan")
    fused.load_state_dict(state)
    ref, fq = copy.deepcopy(fused), qfq.FakeQuantize(d)
    for it in range(3):
        x = torch.randn(shape, device=DEV) * (1 + it)
        y = tobs.observe_fake_quant(x, fused, fq, programs=3, tile=64)
        yr = definition(x, fq, ref)
        assert y is not None
        assert_same_with_nans(y, yr)
        assert_same_state_with_nans(fused, ref)
    kept = bool(fused.min_val.isnan().any())
    assert kept == (cls is qobs.MinMaxObserver)
    assert int(fused.nonfinite_batches) == (3 if kept else 0)
