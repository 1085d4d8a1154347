"""Shared helpers of the drop-in tests: the int8 backend, weight copy by position, one QAT
step (BN settling: gpuquant.models.settle_bn; per-module int8-vs-QAT check:
tests/int8_vs_qat.py)."""
import torch
import torch.nn.functional as F

import gpuquant.backends as backends

INT8_BACKEND = "numpy" if "numpy" in backends.available() else "reference"


def copy_by_position(src, dst):
    """dst's parameters and buffers := src's, pairing state_dict entries by position (the
    names differ: conv1/bn1 vs conv_bn_relu1.conv/.bn); shapes must agree."""
    s, d = src.state_dict(), dst.state_dict()
    assert len(s) == len(d)
    with torch.no_grad():
        for (ks, vs), (kd, vd) in zip(s.items(), d.items()):
            assert vs.shape == vd.shape and vs.dtype == vd.dtype, (ks, kd)
            vd.copy_(vs)


def qat_step(model, x, target, seed):
    torch.manual_seed(seed)  # same dropout mask for both models
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    y = model(x)
    loss = F.cross_entropy(y, target)
    loss.backward()
    # batch 2 at 1x1 spatial size makes batch-statistics gradients huge: clip
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return y.detach(), loss.detach()


def int8_against_qat(qat, x, bound: float = 0.05):
    """Observers off, then ``quantize`` of a copy of ``qat``: every int8 module within one
    step of its QAT module on the QAT inputs (tests/int8_vs_qat.py), the int8 output (on
    INT8_BACKEND) within ``bound`` of QAT's, relative L2. Returns (int8 model, the QAT
    capture: name -> (inputs, output))."""
    import copy

    from gpuquant.quantization import disable_observer, quantize
    from tests.int8_vs_qat import capture, check_modules
    y_qat, cap = capture(qat, x)
    disable_observer(qat)
    qat_modules = dict(qat.named_modules())
    int8 = quantize(copy.deepcopy(qat))
    with backends.use(INT8_BACKEND), torch.no_grad():
        y8 = int8(x)
    check_modules(qat_modules, int8, cap, INT8_BACKEND)
    assert float((y8 - y_qat).norm() / y_qat.norm()) <= bound
    return int8, cap
