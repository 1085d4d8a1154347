"""Reference networks: torchvision's parameter counts (hard-coded: torchvision is not a
dependency), and float / QAT / int8 forms build and run (small images for speed)."""
import pytest
import torch

import gpuquant.models as M
import gpuquant.nn.quantized as qnn
from gpuquant.quantization import disable_observer, quantize, quantize_qat
from tests.int8_vs_qat import capture, check_modules

pytestmark = pytest.mark.usefixtures("one_thread")  # small images: threads only cost

# torchvision.models.{resnet18,resnet50,mobilenet_v2,mobilenet_v3_*}(num_classes=1000)
# parameter counts
TORCHVISION_PARAMS = {"resnet18": 11_689_512, "resnet50": 25_557_032,
                      "mobilenet_v2": 3_504_872, "mobilenet_v3_large": 5_483_032,
                      "mobilenet_v3_small": 2_542_856}


@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAMS))
def test_parameter_counts_match_torchvision(name):
    model = getattr(M, name)()
    assert sum(p.numel() for p in model.parameters()) == TORCHVISION_PARAMS[name]


@pytest.mark.parametrize("name,size", [("resnet18", 32), ("resnet50", 32),
                                       ("mobilenet_v2", 32), ("mobilenet_v3_large", 32),
                                       ("mobilenet_v3_small", 32), ("digits_net", 8)])
def test_three_forms_run(name, size):
    """Float, QAT and int8 run; in place in the network, every int8 module given the QAT
    module's (quantized) input reproduces its output within 1 step, identical on >= 99%
    overall. (End to end, a randomly initialised deep network amplifies those single steps
    chaotically, so the whole-network outputs are only checked for shape and sanity.)"""
    torch.manual_seed(0)
    in_ch = 1 if name == "digits_net" else 3
    x = torch.randn(1, in_ch, size, size)
    model = M.settle_bn(getattr(M, name)(num_classes=10),
                        torch.randn(3, in_ch, size, size)).eval()
    with torch.no_grad():
        y_float = model(x)
    qat = quantize_qat(model).eval()  # in place: big models, no copies
    # one eval pass: the observers record it and fake-quantize with what they recorded
    y_qat, cap = capture(qat, x)
    disable_observer(qat)
    qat_modules = dict(qat.named_modules())
    int8 = quantize(qat)
    y8 = int8(x)
    for y in (y_float, y_qat, y8):
        assert y.shape == (1, 10) and y.dtype == torch.float32 and torch.isfinite(y).all()
    assert float(y_qat.abs().max()) > 0  # not collapsed to zero
    assert int8.quant(x).dtype == torch.int8
    assert any(isinstance(m, qnn.Elemwise) for m in int8.modules())
    check_modules(qat_modules, int8, cap)


def test_narrow_resnet_has_the_same_layers():
    """``width``: the same modules and output shape with fewer channels (the stand-in host
    timing builds resnet50 at width 8); a bad width is refused."""
    wide, narrow = M.resnet50(num_classes=10), M.resnet50(num_classes=10, width=8)
    kinds = [type(m).__name__ for m in wide.modules()]
    assert kinds == [type(m).__name__ for m in narrow.modules()]
    assert narrow.fc.in_features == 256 and narrow.conv_bn_relu1.conv.out_channels == 8
    assert narrow.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    with pytest.raises(ValueError, match="width must be an int >= 1, got 0"):
        M.resnet50(width=0)
    for bad in (2.5, True, "8"):
        with pytest.raises(TypeError, match="width must be an int >= 1"):
            M.resnet50(width=bad)


@pytest.mark.parametrize("build,kw,err", [
    (M.mobilenet_v2, {"width_mult": 0}, ValueError),
    (M.mobilenet_v2, {"width_mult": -1.0}, ValueError),
    (M.mobilenet_v2, {"width_mult": float("nan")}, ValueError),
    (M.mobilenet_v2, {"width_mult": float("inf")}, ValueError),
    (M.mobilenet_v2, {"width_mult": "1"}, TypeError),
    (M.mobilenet_v2, {"width_mult": True}, TypeError),
    (M.mobilenet_v2, {"num_classes": 0}, ValueError),
    (M.resnet18, {"num_classes": -1}, ValueError),
    (M.resnet50, {"num_classes": 2.0}, TypeError),
    (M.digits_net, {"num_classes": 0}, ValueError),
    (M.digits_net, {"num_classes": True}, TypeError),
    (M.digits_net, {"width": 1}, ValueError),
    (M.digits_net, {"width": 8.0}, TypeError),
    (M.resnet18, {"zero_init_residual": "no"}, TypeError),
    (M.mobilenet_v2, {"dropout": True}, TypeError),
    (M.mobilenet_v2, {"dropout": float("nan")}, ValueError),
    (M.mobilenet_v2, {"dropout": 1.5}, ValueError),
])
def test_builders_validate_arguments(build, kw, err):
    name = next(iter(kw))
    with pytest.raises(err, match=name):
        build(**kw)


def test_builders_accept_valid_arguments():
    import numpy as np
    assert M.mobilenet_v2(num_classes=np.int64(3), width_mult=0.25).classifier[1].out_features == 3
    assert M.digits_net(num_classes=4, width=2).fc2.out_features == 4
    assert M.resnet18(num_classes=3, width=np.int64(8)).conv_bn_relu1.conv.out_channels == 8
    assert M.resnet18(num_classes=1, width=8).fc.out_features == 1


def test_resnet_settle_bn_and_runtime_session_refuse_wrong_kinds():
    from gpuquant.models.resnet import BasicBlock, ResNet
    from gpuquant.runtime.session import Session
    with pytest.raises(TypeError, match="block must be a block class"):
        ResNet("basic", [2, 2, 2, 2])
    with pytest.raises(ValueError, match="layers must be 4 block counts"):
        ResNet(BasicBlock, [2, 2, 2])
    with pytest.raises(ValueError, match="layers must be an int >= 1, got 0"):
        ResNet(BasicBlock, [2, 0, 2, 2])  # (a stage of 0 blocks would build 1)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        M.settle_bn("net", torch.zeros(2, 3, 32, 32))
    with pytest.raises(TypeError, match="x must be a tensor"):
        M.settle_bn(M.digits_net(), [[0.0]])
    with pytest.raises(TypeError, match="onnx.ModelProto"):
        Session({"graph": None})
