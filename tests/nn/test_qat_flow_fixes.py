"""QAT flow details found by probing: a BatchNorm put in eval mode inside a training model,
the library's own models converted after channels_last or training-only passes, and a QAT
state_dict offered to an int8 model."""
import copy

import pytest
import torch

import gpuquant
import gpuquant.nn as gnn
from gpuquant.quantization import ema_fakequant_qconfig, quantize, quantize_qat


@pytest.mark.parametrize("factory,shape", [
    (lambda: gnn.ConvBnRelu2d(3, 6, 3, padding=1), (4, 3, 5, 5)),
    (lambda: gnn.LinearBn1d(5, 6), (8, 5)),
])
def test_bn_in_eval_mode_inside_a_training_model_uses_running_stats(factory, shape):
    torch.manual_seed(0)
    f = factory().train()
    with torch.no_grad():
        f.bn.running_mean.uniform_(-1, 1)
        f.bn.running_var.uniform_(0.5, 2)
    q = quantize_qat(copy.deepcopy(f), ema_fakequant_qconfig).train()
    q.apply(gpuquant.quantization.disable_fake_quant)
    q.apply(gpuquant.quantization.disable_observer)
    f.bn.eval()
    q.bn.eval()
    rm = q.bn.running_mean.clone()
    x = torch.randn(shape)
    y, yf = q(x), f(x)
    assert torch.equal(q.bn.running_mean, rm)  # not updated
    torch.testing.assert_close(y, yf, rtol=1e-5, atol=1e-5)  # the float model's numbers
    y.sum().backward()  # still trains the weights
    weight = q.conv.weight if hasattr(q, "conv") else q.linear.weight
    assert weight.grad is not None


def _train(model, x, steps=2):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()


def test_digits_net_trained_channels_last_converts():
    torch.manual_seed(0)
    q = quantize_qat(gpuquant.models.digits_net(), ema_fakequant_qconfig).train()
    q = q.to(memory_format=torch.channels_last)
    x = torch.randn(16, 1, 8, 8).contiguous(memory_format=torch.channels_last)
    _train(q, x)
    qm = quantize(q.eval())
    assert qm(x).shape == (16, 10)


def test_mobilenet_trained_in_training_mode_only_converts():
    torch.manual_seed(0)
    m = gpuquant.models.mobilenet_v2(num_classes=5, width_mult=0.25)
    q = quantize_qat(m, ema_fakequant_qconfig).train()
    x = torch.randn(2, 3, 32, 32)
    _train(q, x, steps=1)  # no eval pass: the classifier's input came through dropout
    qm = quantize(q.eval())
    assert qm(x).shape == (2, 5)


def test_qat_state_dict_into_an_int8_model_is_named():
    torch.manual_seed(0)
    q = quantize_qat(gpuquant.models.digits_net(), ema_fakequant_qconfig)
    q(torch.randn(4, 1, 8, 8))
    sd = q.state_dict()
    qm = quantize(copy.deepcopy(q).eval())
    with pytest.raises(ValueError, match="is not a quantized module's.*QAT model's state_dict"):
        qm.load_state_dict(sd)


class _Forgot(gnn.Module):
    """A float multiply between two QAT convs (the second conv's input is not quantized)."""

    def __init__(self):
        super().__init__()
        self.q, self.c1, self.c2 = gnn.QuantStub(), gnn.ConvRelu2d(3, 4, 3), gnn.Conv2d(4, 4, 3)
        self.dq = gnn.DequantStub()

    def forward(self, x):
        return self.dq(self.c2(self.c1(self.q(x)) * 0.5))


def test_failed_quantize_leaves_the_qat_model_unchanged():
    """quantize swapped modules while walking the tree: an error at the second conv left the
    stub and the first conv int8 (the QAT model untrainable, not convertible once fixed).
    Now nothing is swapped unless every module converts (found by review)."""
    torch.manual_seed(1)
    m = quantize_qat(_Forgot(), ema_fakequant_qconfig)
    m(torch.randn(2, 3, 8, 8))
    before = {n: type(c) for n, c in m.named_modules()}
    with pytest.raises(ValueError, match="module 'c2'.*not produced by a quantized module"):
        quantize(m)
    assert {n: type(c) for n, c in m.named_modules()} == before
    m.train()
    m(torch.randn(2, 3, 8, 8)).sum().backward()  # still trains


@pytest.mark.parametrize("make", [lambda: gnn.ConvBnRelu2d(4, 6, 2, padding="same"),
                                  lambda: gnn.Conv2d(4, 6, (3, 2), padding="same", dilation=3),
                                  lambda: gnn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect")])
def test_padding_without_int8_form_refused_before_training(make):
    """An asymmetric padding='same' (even dilated kernel extent) passed quantize_qat and the
    whole training, then failed at quantize with a NotImplementedError naming no module;
    refused by quantize_qat now, like padding_mode (found by review)."""
    net = torch.nn.Sequential(gnn.QuantStub(), make(), gnn.DequantStub())
    with pytest.raises(ValueError, match="quantize_qat: module '1'.*(asymmetrically|padding_mode)"):
        quantize_qat(net, ema_fakequant_qconfig)


class _Fc(gnn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.fc, self.dq = gnn.QuantStub(), gnn.Linear(4, 1), gnn.DequantStub()

    def forward(self, x):
        return self.dq(self.fc(self.q(x)))


def test_qat_models_the_int32_bias_grid():
    """Two inputs that cancel give an output range far narrower than s_x * s_w: the bias's
    int32 unit is ~9 output steps. QAT added the float bias, so the int8 output was 5 steps
    from QAT's; QAT now puts the bias on its int32 grid (MegEngine's apply_quant_bias), so
    they agree within one step; the bias keeps a straight-through gradient (found by
    review)."""
    torch.manual_seed(0)
    u = (torch.rand(256, 1) * 2 - 1) * 0.9
    x = torch.cat([u, -u, (torch.rand(256, 1) * 2 - 1) * 0.01, torch.ones(256, 1)], 1)
    m = _Fc()
    with torch.no_grad():
        m.fc.weight.copy_(torch.tensor([[30.0, 30.0, 1.0, 0.0]]))
        m.fc.bias.fill_(0.0195)
    m = quantize_qat(m, ema_fakequant_qconfig)
    m(x)
    m.eval()
    gpuquant.quantization.disable_observer(m)
    unit = float(m.q.get_activation_qparams().scale * m.fc.get_weight_qparams().scale)
    s_y = float(m.fc.get_activation_qparams().scale)
    assert unit > 8 * s_y  # the case: the bias's grid far coarser than the output's
    g = torch.autograd.grad(m(x).sum(), m.fc.bias)[0]
    m.fc.bias.requires_grad_(False)
    with torch.no_grad():
        int8 = quantize(m, inplace=False)
        assert float(((int8(x) - m(x)).abs() / s_y).max()) <= 1 + 1e-4
    assert g.shape == (1,) and float(g) > 0  # straight through: rounding passes the gradient


def test_weight_quantizers_the_int8_layers_cannot_take_are_refused_before_training():
    """Weight quantizers along the input axis, asymmetric or unsigned: quantize_qat accepted
    them and QAT trained, and quantize() refused them only after the training run (found by
    an audit). They are refused at quantize_qat now, as per-channel activation quantizers
    are. One set on a module by hand still trains: the bias grid, defined only for
    output-channel scales, leaves such a bias alone (it raised a broadcast error in the QAT
    forward; found by review), and conversion refuses it."""
    from functools import partial
    from gpuquant import qint8, qint8_narrow, quint8
    from gpuquant.quantization import FakeQuantize, MinMaxObserver
    base = ema_fakequant_qconfig

    def net():
        return torch.nn.Sequential(gnn.QuantStub(), gnn.Linear(6, 4), gnn.DequantStub())

    for qc, msg in (
            (base._replace(weight_observer=partial(MinMaxObserver, dtype=qint8_narrow, axis=1)),
             r"weight observer is per channel along axis 1 \(int8 layers take per-tensor or "
             r"per-output-channel weights: axis 0\)"),
            (base._replace(weight_observer=partial(MinMaxObserver, dtype=qint8, axis=0,
                                                   symmetric=False)),
             r"weight observer is asymmetric"),
            (base._replace(weight_observer=partial(MinMaxObserver, dtype=quint8, axis=0),
                           weight_fake_quant=partial(FakeQuantize, dtype=quint8)),
             r"weight observer is dtype quint8 \(int8 layers take signed int8-storage")):
        with pytest.raises(ValueError, match=rf"quantize_qat: module '1' \(Linear\): Linear: "
                                             rf"the qconfig's {msg}"):
            quantize_qat(net(), qc)
    m = quantize_qat(net(), base)
    m[1].weight_observer = MinMaxObserver(dtype=qint8_narrow, axis=1)
    m(torch.randn(3, 6))
    assert m.eval()(torch.randn(3, 6)).shape == (3, 4)
    with pytest.raises(ValueError, match="axis 0"):
        quantize(m)


class _DropoutHead(gnn.Module):
    """A hand-built network with torch.nn pass-through modules between QAT layers: a
    Flatten (a copy for a channels_last activation) and a Dropout (a new tensor in training
    mode)."""

    def __init__(self):
        super().__init__()
        self.q, self.c = gnn.QuantStub(), gnn.ConvBnRelu2d(3, 4, 3, padding=1)
        self.flat, self.drop = torch.nn.Flatten(), torch.nn.Dropout(0.5)
        self.fc, self.dq = gnn.Linear(4 * 4 * 4, 5), gnn.DequantStub()

    def forward(self, x):
        return self.dq(self.fc(self.drop(self.flat(self.c(self.q(x))))))


@pytest.mark.parametrize("channels_last", [False, True])
def test_hand_built_model_with_dropout_and_flatten_converts_after_training_only(
        channels_last):
    """Found by review: the Linear after an nn.Dropout (or an nn.Flatten of a channels_last
    activation) recorded no producer in training mode, so a model trained without an eval
    pass failed to convert ("not produced by a quantized module: put a QuantStub before
    it"). quantize_qat now hooks the pass-through modules as the drop-in flow does."""
    torch.manual_seed(0)
    q = quantize_qat(_DropoutHead(), ema_fakequant_qconfig).train()
    x = torch.randn(8, 3, 4, 4)
    if channels_last:
        q = q.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    _train(q, x)
    gpuquant.quantization.disable_observer(q)
    qm = quantize(copy.deepcopy(q).eval())
    y, yq = q.eval()(x), qm(x)
    step = q.fc.get_activation_qparams().scale
    assert (y - yq).abs().max() <= step * 1.001
    assert not qm.drop._forward_hooks  # the int8 model carries no hook (fuse_epilogues)
    copy.deepcopy(q)(x)  # the hook copies and pickles with the model
    import pickle
    pickle.loads(pickle.dumps(q))(x)
    q = quantize_qat(q, ema_fakequant_qconfig)  # a second call adds no second hook
    assert len(q.drop._forward_hooks) == 1


@pytest.mark.parametrize("qconfig", ["ema", "lsq", "tqt", "calibration"])
def test_first_pass_under_inference_mode_leaves_a_trainable_model(qconfig):
    """Found by review: the state sized or initialised on the first pass (per-channel
    observer ranges, LSQ / TQT scales) was created as inference tensors when that pass ran
    under torch.inference_mode() (a calibration loop), and every training step after it
    failed ("Inplace update to inference tensor outside InferenceMode", "Inference tensors
    cannot be saved for backward")."""
    from gpuquant.quantization import (calibration_qconfig, lsq_qconfig, quantize_qat,
                                       tqt_qconfig)
    qc = {"ema": ema_fakequant_qconfig, "lsq": lsq_qconfig, "tqt": tqt_qconfig,
          "calibration": calibration_qconfig}[qconfig]
    torch.manual_seed(0)
    q = quantize_qat(gpuquant.models.digits_net(), qc)
    x = torch.randn(8, 1, 8, 8)
    with torch.inference_mode():
        q.eval()(x)
    assert not any(t.is_inference() for t in list(q.parameters()) + list(q.buffers()))
    _train(q.train(), x)
    assert quantize(q.eval())(x).shape == (8, 10)


class _InPlaceBetween(torch.nn.Module):
    """Model code that changes a quantized module's output in place: the int8 model runs
    the same torch op on the integers."""

    def __init__(self, op):
        super().__init__()
        self.q, self.c = gnn.QuantStub(), gnn.Conv2d(3, 4, 3, padding=1)
        self.c2, self.dq, self.op = gnn.Conv2d(4, 4, 1), gnn.DequantStub(), op

    def forward(self, x):
        y = self.c(self.q(x))
        self.op(y)
        return self.dq(self.c2(y))


@pytest.mark.parametrize("op", [lambda y: torch.nn.functional.relu(y, inplace=True),
                                lambda y: y.mul_(2), lambda y: y[:, 0].zero_()],
                         ids=["relu_inplace", "mul_", "slice_zero_"])
@pytest.mark.parametrize("asymmetric", [False, True])
def test_quantized_output_changed_in_place_is_refused(op, asymmetric):
    """Found by review: an in-place float op on a quantized module's output kept the storage
    and so the producer tag: the consumer converted, and the int8 model applied the op to
    the integers (relu on uint8 with a zero point: a no-op; y.mul_(2): int8 products, not
    the real ones): 7-14% off the QAT output, silently. The consumer now counts as fed by a
    float op (a clear error at quantize)."""
    from functools import partial
    from gpuquant.quantization import ExponentialMovingAverageObserver, FakeQuantize, QConfig
    qc = ema_fakequant_qconfig
    if asymmetric:
        qc = qc._replace(
            act_observer=partial(ExponentialMovingAverageObserver, dtype=gpuquant.quint8,
                                 symmetric=False),
            act_fake_quant=partial(FakeQuantize, dtype=gpuquant.quint8))
    assert isinstance(qc, QConfig)
    torch.manual_seed(0)
    q = quantize_qat(_InPlaceBetween(op), qc)
    x = torch.randn(2, 3, 6, 6)
    _train(q, x)
    with pytest.raises(ValueError, match="input 0 of module 'c2'.*changed it in place"):
        quantize(q.eval())
    # an in-place training-mode dropout stays a pass-through (nn.Dropout's hook)
    q = quantize_qat(_InPlaceBetween(torch.nn.Dropout(0.5, inplace=True)), qc)
    _train(q.train(), x)
    gpuquant.quantization.disable_observer(q)
    qm = quantize(copy.deepcopy(q).eval())
    assert (q.eval()(x) - qm(x)).abs().max() <= q.c2.get_activation_qparams().scale * 1.001


def _qat_state(m):
    """Every tensor of a QAT module's state (observers, fake quants, BatchNorm statistics),
    cloned."""
    return {k: v.clone() for k, v in m.state_dict().items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("bn_fold", ["single", "exact", "frozen"])
@pytest.mark.parametrize("factory,good,bad,what", [
    (lambda: gnn.ConvBnRelu2d(3, 8, 3), (4, 3, 6, 7), (1, 4, 6, 7),
     r"ConvBnRelu2d: x of shape \(1, 4, 6, 7\) has 4 channels, expected 3 \(the layer's "
     r"in_channels\)"),
    (lambda: gnn.ConvRelu62d(3, 8, 3), (2, 3, 6, 7), (2, 5, 6, 7),
     r"ConvRelu62d: x of shape \(2, 5, 6, 7\) has 5 channels, expected 3"),
    (lambda: gnn.Conv2d(6, 4, 1, groups=2), (6, 5, 5), (2, 6, 5),
     r"Conv2d: x of shape \(2, 6, 5\) has 2 channels, expected 6"),  # unbatched (C, H, W)
    (lambda: gnn.LinearBnRelu1d(5, 6), (4, 5), (4, 7),
     r"LinearBnRelu1d: x of shape \(4, 7\) has 7 features, expected 5 \(the layer's "
     r"in_features\)"),
    (lambda: gnn.LinearRelu(5, 6), (2, 3, 5), (2, 3, 4),
     r"LinearRelu: x of shape \(2, 3, 4\) has 4 features in its last dimension, expected 5"),
])
def test_qat_layers_refuse_a_wrong_input_size_before_touching_state(factory, good, bad, what,
                                                                     bn_fold):
    """A channel / feature count the layer cannot take: the int8 layer raised a ValueError
    naming it, the QAT layer let torch's RuntimeError through ('Given groups=1, weight of
    size [8, 3, 3, 3], expected input[1, 4, 8, 8] to have 3 channels'), after its observers
    had seen the batch. Now a ValueError naming the module, the shape and the expected
    count, and the refused batch leaves every observer and BatchNorm statistic as it was."""
    q = quantize_qat(factory(), ema_fakequant_qconfig).train()
    if hasattr(q, "bn"):
        q.set_bn_fold("exact" if bn_fold == "exact" else "single")
        q.freeze_bn_stats(bn_fold == "frozen")
    q(torch.randn(good))
    before = _qat_state(q)
    with pytest.raises(ValueError, match=what):
        q(torch.randn(bad))
    after = _qat_state(q)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), \
        [k for k in before if not torch.equal(before[k], after[k])]
    q(torch.randn(good))  # still trains


@pytest.mark.parametrize("factory,bad,what", [
    (lambda: gnn.MaxPool2d(2), (1, 6, 1, 1),
     r"MaxPool2d: padded input \(1, 1\) \+ 2\*\(0, 0\) is smaller than the kernel \(2, 2\): "
     r"no output"),
    (lambda: gnn.MaxPool2d(3, dilation=2, padding=1), (2, 3, 1, 5),
     r"MaxPool2d: padded input \(1, 5\) \+ 2\*\(1, 1\) is smaller than the dilated kernel "
     r"\(5, 5\)"),
    (lambda: gnn.MaxPool2d(3, stride=2, ceil_mode=True), (3, 1, 4),
     r"MaxPool2d: padded input \(1, 4\) .* kernel \(3, 3\) \(by more than stride - 1 in "
     r"ceil_mode\)"),
    (lambda: gnn.AvgPool2d(3, padding=1), (2, 3, 0, 4),
     r"AvgPool2d: padded input \(0, 4\) \+ 2\*\(1, 1\) is smaller than the kernel"),
    (lambda: gnn.AvgPool2d(2), (2, 0, 4, 4), r"AvgPool2d: x has no channels"),
    (lambda: gnn.AdaptiveAvgPool2d(1), (2, 3, 0, 4),
     r"AdaptiveAvgPool2d: input spatial size must be non-empty, got shape \(2, 3, 0, 4\)"),
    (lambda: gnn.MaxPool2d(2), (3, 4),
     r"MaxPool2d: x must be 4-D \(N, C, H, W\) or 3-D unbatched \(C, H, W\), got shape "
     r"\(3, 4\)"),
])
def test_qat_pools_refuse_what_the_int8_pools_refuse(factory, bad, what):
    """A window that leaves no output: the int8 pool raised 'max_pool2d: padded input (1, 1)
    + 2*(0, 0) is smaller than the kernel (2, 2)', the QAT pool let torch's RuntimeError
    ('Calculated output size: (6x0x0)') through (and an empty plane under an adaptive pool
    gave NaN). Now the same rule and wording, naming the module; inputs that leave an
    output still run."""
    q = quantize_qat(torch.nn.Sequential(gnn.QuantStub(), factory()), ema_fakequant_qconfig)
    q(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match=what):
        q[1](torch.randn(bad))
    q[1](q[0](torch.randn(1, 3, 3, 4)))  # inputs with an output still run
    assert q[1](q[0](torch.randn(3, 3, 4))).dim() == 3  # unbatched


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_refused_while_state_updates(reentrant):
    """torch.utils.checkpoint over a QAT block recomputed its forward during backward with
    the state the first forward had updated (the EMA range, the running variance the fold
    uses): other gradients (2.7% off, 20% with observers off), BatchNorm statistics and
    observer ranges updated twice, no error. Refused now, naming what updates; once the
    observers are off and BatchNorm frozen the recomputation is exact and allowed."""
    import copy
    from torch.utils.checkpoint import checkpoint
    from gpuquant.quantization import disable_observer, ema_fakequant_qconfig, freeze_bn_stats
    torch.manual_seed(0)
    net = torch.nn.Sequential(gnn.QuantStub(), gnn.ConvBnRelu2d(3, 8, 3, padding=1, bias=False),
                              gnn.DequantStub())
    qat = quantize_qat(net, ema_fakequant_qconfig)
    qat(torch.randn(4, 3, 8, 8))
    x = (torch.randn(4, 3, 8, 8) * 3).requires_grad_()  # (reentrant: an input needs grad)

    def checkpointed(m):
        return m[2](checkpoint(m[1], m[0](x), use_reentrant=reentrant))

    with pytest.raises(RuntimeError, match=r"ConvBnRelu2d: a forward ran during "
                                           r"backward .*\(observer 'weight_observer', observer "
                                           r"'act_observer', BatchNorm statistics\)"):
        checkpointed(copy.deepcopy(qat)).sum().backward()
    calib = copy.deepcopy(qat).eval()  # observers record in eval mode too (calibration)
    with pytest.raises(RuntimeError, match=r"\(observer 'weight_observer', observer "
                                           r"'act_observer'\): "):
        checkpointed(calib).sum().backward()
    disable_observer(qat)
    freeze_bn_stats(qat)
    ck = copy.deepcopy(qat)
    qat(x).square().mean().backward()
    checkpointed(ck).square().mean().backward()
    assert torch.equal(qat[1].conv.weight.grad, ck[1].conv.weight.grad)


@pytest.mark.parametrize("make,shape", [
    (lambda: gnn.ConvBnRelu2d(1, 4, 3, padding=1, bias=False), (0, 1, 8, 8)),
    (lambda: gnn.LinearBn1d(5, 3), (0, 5)),
])
def test_empty_batch_in_training_passes_through_batchnorm_folded_layers(make, shape):
    """The float layer (torch's BatchNorm) returns an empty batch empty in training, its
    statistics untouched; the QAT one raised 'expected more than 1 value per channel' (for
    0 values). It now returns it empty too, touching no state (observers included), every
    parameter with a zero gradient (a first version left BatchNorm's out of the graph:
    found by review)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(gnn.QuantStub(), make(), gnn.DequantStub())
    want = tuple(net.train()(torch.randn(*shape)).shape)
    qat = quantize_qat(net, ema_fakequant_qconfig)
    qat(torch.randn(4, *shape[1:]))
    before = copy.deepcopy(qat.state_dict())
    x = torch.randn(*shape, requires_grad=True)
    y = qat(x)
    assert tuple(y.shape) == want
    y.sum().backward()
    after = qat.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if torch.is_tensor(v))
    # every parameter a zero gradient, as torch's layers give (DDP expects each one)
    grads = {n: p.grad for n, p in qat.named_parameters()}
    assert grads and all(g is not None and not g.any() for g in grads.values()), grads
