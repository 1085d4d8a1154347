"""Reference networks: torchvision's parameter counts (hard-coded: torchvision is not a
dependency), and float / QAT / int8 forms build and run (small images for speed)."""
import pytest
import torch

import gpuquant.models as M
import gpuquant.nn.qat as qat_nn
import gpuquant.nn.quantized as qnn
from gpuquant.functional import quantize as quantize_t
from gpuquant.nn.qat import QATModule
from gpuquant.quantization import disable_observer, quantize, quantize_qat

# torchvision.models.{resnet18,resnet50,mobilenet_v2}(num_classes=1000) parameter counts
TORCHVISION_PARAMS = {"resnet18": 11_689_512, "resnet50": 25_557_032,
                      "mobilenet_v2": 3_504_872}


@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAMS))
def test_parameter_counts_match_torchvision(name):
    model = getattr(M, name)()
    assert sum(p.numel() for p in model.parameters()) == TORCHVISION_PARAMS[name]


@pytest.fixture(autouse=True)
def _one_thread():
    """These small-image passes gain nothing from threads; on a loaded 2-core machine two
    threads per process made them several times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _settle_bn(model, x):
    """Fresh networks have vanishing activations in eval mode; one training-mode pass with
    momentum 1 sets BatchNorm's running statistics to real ones."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = 1.0
    with torch.no_grad():
        model.train()(x)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.1
    return model.eval()


def _capture(qat, x):
    """Inputs and outputs of every QAT module (except the stubs) on one eval pass."""
    cap, hooks = {}, []
    for name, m in qat.named_modules():
        if isinstance(m, QATModule) and not isinstance(m, (qat_nn.QuantStub, qat_nn.DequantStub)):
            hooks.append(m.register_forward_hook(
                lambda mod, inp, out, name=name: cap.__setitem__(name, (inp, out))))
    with torch.no_grad():
        y = qat(x)
    for h in hooks:
        h.remove()
    return y, cap


@pytest.mark.parametrize("name,size", [("resnet18", 32), ("resnet50", 32),
                                       ("mobilenet_v2", 32), ("digits_net", 8)])
def test_three_forms_run(name, size):
    """Float, QAT and int8 run; in place in the network, every int8 module given the QAT
    module's (quantized) input reproduces its output within 1 step, identical on >= 99%
    overall. (End to end, a randomly initialised deep network amplifies those single steps
    chaotically, so the whole-network outputs are only checked for shape and sanity.)"""
    torch.manual_seed(0)
    in_ch = 1 if name == "digits_net" else 3
    x = torch.randn(1, in_ch, size, size)
    model = _settle_bn(getattr(M, name)(num_classes=10), torch.randn(3, in_ch, size, size))
    with torch.no_grad():
        y_float = model(x)
    qat = quantize_qat(model).eval()  # in place: big models, no copies
    # one eval pass: the observers record it and fake-quantize with what they recorded
    y_qat, cap = _capture(qat, x)
    disable_observer(qat)
    qat_modules = dict(qat.named_modules())
    int8 = quantize(qat)
    y8 = int8(x)
    for y in (y_float, y_qat, y8):
        assert y.shape == (1, 10) and y.dtype == torch.float32 and torch.isfinite(y).all()
    assert float(y_qat.abs().max()) > 0  # not collapsed to zero
    assert int8.quant(x).dtype == torch.int8
    assert any(isinstance(m, qnn.Elemwise) for m in int8.modules())
    int8_modules = dict(int8.named_modules())
    same = total = 0
    for mod_name, (inp, out) in cap.items():
        q = qat_modules[mod_name]
        in_qps = q.input_qparams(mod_name)
        out_qp = q.get_activation_qparams() if q.with_act else in_qps[0]
        xs = [quantize_t(t, qp) for t, qp in zip(inp, in_qps)]
        xs = [t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t for t in xs]
        got = int8_modules[mod_name](*xs).to(torch.int32)
        want = quantize_t(out, out_qp).to(torch.int32)
        d = (got - want).abs()
        assert int(d.max()) <= 1, mod_name
        same += int((d == 0).sum())
        total += d.numel()
    assert same / total >= 0.99
