"""Shared helpers of the drop-in tests: BN settling, weight copy by position, one QAT step,
per-module int8-vs-QAT check."""
import torch
import torch.nn.functional as F

import gpuquant.backends as backends
import gpuquant.nn.qat as qat_nn
from gpuquant.functional import quantize as quantize_t
from gpuquant.nn.qat import QATModule

INT8_BACKEND = "numpy" if "numpy" in backends.available() else "reference"


def settle_bn(model, x):
    """One training pass with momentum 1: BatchNorm running statistics of real activations
    (fresh networks otherwise blow up in eval mode)."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.momentum = 1.0
    with torch.no_grad():
        model.train()(x)
    for m in bns:
        m.momentum = 0.1
    return model


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


def capture(qat, x):
    """Inputs and outputs of every QAT module (stubs aside) on one eval pass."""
    cap, hooks = {}, []
    for name, m in qat.named_modules():
        if isinstance(m, QATModule) and not isinstance(m, (qat_nn.QuantStub,
                                                           qat_nn.DequantStub)):
            hooks.append(m.register_forward_hook(
                lambda mod, inp, out, name=name: cap.__setitem__(name, (inp, out))))
    with torch.no_grad():
        y = qat.eval()(x)
    for h in hooks:
        h.remove()
    return y, cap


def check_modules(qat_modules, int8, cap):
    """Each int8 module given its QAT module's quantized inputs: within 1 step of the QAT
    output, identical on >= 99% of the elements overall."""
    int8_modules = dict(int8.named_modules())
    same = total = 0
    for name, (inp, out) in cap.items():
        q = qat_modules[name]
        in_qps = q.input_qparams(name)
        out_qp = q.get_activation_qparams() if q.with_act else in_qps[0]
        concat = isinstance(q, qat_nn.Concat)  # forward(tensors, dim)
        xs = [quantize_t(t, qp) for t, qp in zip(inp[0] if concat else inp, in_qps)]
        xs = [t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t for t in xs]
        with backends.use(INT8_BACKEND):
            got = int8_modules[name](xs, *inp[1:]) if concat else int8_modules[name](*xs)
        got = got.to(torch.int32)
        d = (got - quantize_t(out, out_qp).to(torch.int32)).abs()
        assert int(d.max()) <= 1, name
        same += int((d == 0).sum())
        total += d.numel()
    assert same / total >= 0.99
