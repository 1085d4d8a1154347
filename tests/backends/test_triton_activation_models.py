"""A network of every ``Activation`` kind and nearest ``Upsample`` resizes: the Triton backend
gives the NumPy oracle's bytes module by module (interpreter on CPU, the device on a GPU);
on a GPU, QAT trained on CUDA agrees with the int8 tables (CUDA's float functions against
the CPU-built tables) and a warm int8 forward reads nothing back to the host."""
from __future__ import annotations

import pytest
import torch

import gpuquant.nn as gnn
from _triton_inference_util import DEV, assert_warm_forward_never_syncs, run_capturing
from gpuquant.backends import available, use
from gpuquant.nn.activation import ACTIVATION_KINDS
from gpuquant.quantization import quantize, quantize_qat

if "numpy" not in available():
    pytest.skip("the NumPy oracle backend is unavailable here", allow_module_level=True)


class _Net(gnn.Module):
    """conv -> every activation kind in turn (1x1 convs between), a stride-2 conv upsampled
    back (nearest, then nearest-exact to a fixed size) and concatenated."""

    def __init__(self):
        super().__init__()
        self.q = gnn.QuantStub()
        self.stem = gnn.ConvBn2d(3, 16, 3, padding=1)
        self.acts = torch.nn.ModuleList(
            gnn.Activation(k, 0.1) for k in ACTIVATION_KINDS)
        self.mix = torch.nn.ModuleList(gnn.Conv2d(16, 16, 1) for _ in ACTIVATION_KINDS[1:])
        self.down = gnn.ConvBnRelu2d(16, 16, 3, stride=2, padding=1)
        self.up = gnn.Upsample(scale_factor=2)
        self.cat = gnn.Concat()
        self.up2 = gnn.Upsample(size=(7, 9), mode="nearest-exact")
        self.dq = gnn.DequantStub()

    def forward(self, x):
        y = self.stem(self.q(x))
        for i, act in enumerate(self.acts):
            y = act(y) if i == 0 else act(self.mix[i - 1](y))
        y = self.cat([y, self.up(self.down(y))], 1)
        return self.dq(self.up2(y))


def _qat(device, steps=3):
    torch.manual_seed(0)
    qat = quantize_qat(_Net()).to(device)
    opt = torch.optim.SGD(qat.parameters(), lr=0.01)
    for _ in range(steps):
        loss = qat(torch.randn(4, 3, 12, 12, device=device)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return qat.eval()


def test_network_bytes_equal_numpy(one_thread):
    int8 = quantize(_qat("cpu", steps=2))
    x = torch.randn(2, 3, 12, 12)
    with use("numpy"):
        y_np, outs_np = run_capturing(int8, x)
    int8.to(DEV)
    with use("triton"):
        y_tr, outs_tr = run_capturing(int8, x.to(DEV))
    assert set(outs_np) == set(outs_tr)
    for k in outs_np:
        assert torch.equal(outs_tr[k], outs_np[k]), k
    assert torch.equal(y_tr, y_np)


@pytest.mark.gpu
def test_qat_on_cuda_agrees_with_the_tables():
    """QAT on CUDA (torch's CUDA f, the Triton fake quants), tables built on the CPU at
    conversion: every Activation's int8 output within one step of its QAT output, given
    the QAT input's codes; the share identical is printed (docs/NUMERICS.md)."""
    from gpuquant.functional import quantize as quantize_t
    qat = _qat("cuda")
    cap, hooks = {}, []
    for name, m in qat.named_modules():
        if isinstance(m, gnn.qat.Activation):
            hooks.append(m.register_forward_hook(
                lambda mod, inp, out, name=name: cap.__setitem__(name, (inp[0], out))))
    with torch.no_grad():
        qat(torch.randn(8, 3, 12, 12, device="cuda") * 2)
    for h in hooks:
        h.remove()
    int8 = quantize(qat)
    same = total = 0
    for name, (inp, out) in cap.items():
        q = qat.get_submodule(name)
        x_q = quantize_t(inp, q.input_qparams(name)[0])
        with use("triton"):
            got = int8.get_submodule(name)(x_q).to(torch.int32)
        want = quantize_t(out, q.get_activation_qparams()).to(torch.int32)
        d = (got - want).abs()
        assert int(d.max()) <= 1, name
        same += int((d == 0).sum())
        total += d.numel()
        print(f"{name} ({q.kind}): {float((d == 0).float().mean()):.6f} identical")
    assert same / total >= 0.99


@pytest.mark.gpu
def test_warm_forward_never_syncs_on_the_gpu():
    """The tables and the resize index tables are built once per device; after the warm-up
    call the forward reads nothing back to the host and captures in a CUDA graph."""
    assert_warm_forward_never_syncs(quantize(_qat("cpu", steps=1)).cuda(),
                                    torch.randn(2, 3, 12, 12, device="cuda"))
