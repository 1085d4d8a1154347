"""Shared by tests/models and tests/dropin: every int8 module of a converted network checked
against its QAT module, in place in the network."""
import contextlib

import torch

import gpuquant.backends as backends
import gpuquant.nn.qat as qat_nn
from gpuquant.functional import quantize as quantize_t
from gpuquant.nn.qat import QATModule


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


def check_modules(qat_modules, int8, cap, backend=None):
    """Each int8 module given its QAT module's quantized inputs (from :func:`capture`): within
    1 step of the QAT output, identical on >= 99% of the elements overall. ``backend``: run
    the int8 modules on that backend (default: the current selection)."""
    int8_modules = dict(int8.named_modules())
    same = total = 0
    for name, (inp, out) in cap.items():
        q = qat_modules[name]
        in_qps = q.input_qparams(name)
        out_qp = q.get_activation_qparams() if q.with_act else in_qps[0]
        concat = isinstance(q, qat_nn.Concat)  # forward(tensors, dim)
        xs = [quantize_t(t, qp) for t, qp in zip(inp[0] if concat else inp, in_qps)]
        xs = [t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t for t in xs]
        with backends.use(backend) if backend is not None else contextlib.nullcontext():
            got = int8_modules[name](xs, *inp[1:]) if concat else int8_modules[name](*xs)
        got = got.to(torch.int32)
        d = (got - quantize_t(out, out_qp).to(torch.int32)).abs()
        assert int(d.max()) <= 1, name
        same += int((d == 0).sum())
        total += d.numel()
    assert same / total >= 0.99
