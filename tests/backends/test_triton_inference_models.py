"""Whole quantized networks give the same bytes on the Triton backend as on the NumPy
oracle: every module's output (int8 activations on the way, float logits at the end)
compared with torch.equal. On CPU the Triton kernels run through the interpreter (small
images); on a GPU the Triton run is on the device."""
from __future__ import annotations

import pytest
import torch

from _triton_inference_util import DEV, assert_warm_forward_never_syncs, run_capturing
from gpuquant.backends import available, use

if "numpy" not in available():
    pytest.skip("the NumPy oracle backend is unavailable here", allow_module_level=True)

M = pytest.importorskip("gpuquant.models")
from gpuquant.nn.quantized import QuantizedModule  # noqa: E402
from gpuquant.quantization import (disable_observer, fuse_epilogues, quantize,  # noqa: E402
                                   quantize_qat)


@pytest.fixture(autouse=True)
def _fast_interpreter(monkeypatch, one_thread):
    """One torch thread (nothing to gain on small images), and the interpreter's int32
    overflow sanitizer off for these whole-network runs: it re-does every integer add in
    int64 and asserts, half of the interpreted time; the op-level tests keep it on."""
    try:
        import functools

        from triton.runtime import interpreter
        monkeypatch.setattr(interpreter, "InterpreterOptions", functools.partial(
            interpreter.InterpreterOptions, sanitize_overflow=False))
    except (ImportError, AttributeError):  # another Triton: run with its defaults
        pass


def _int8(name, in_ch, size):
    torch.manual_seed(0)
    model = M.settle_bn(getattr(M, name)(num_classes=10),
                        torch.randn(4, in_ch, size, size)).eval()
    qat = quantize_qat(model).eval()
    with torch.no_grad():
        qat(torch.randn(4, in_ch, size, size))  # calibration pass (observers record)
    disable_observer(qat)
    return quantize(qat).eval()


@pytest.mark.parametrize("name,in_ch,size", [("digits_net", 1, 8), ("resnet18", 3, 32),
                                             ("mobilenet_v2", 3, 32)])
def test_network_bytes_equal_numpy(name, in_ch, size):
    model = _int8(name, in_ch, size)
    x = torch.randn(2, in_ch, size, size)
    with use("numpy"):
        y_np, outs_np = run_capturing(model, x)
    model.to(DEV)
    with use("triton"):
        y_tr, outs_tr = run_capturing(model, x.to(DEV))
    assert outs_np.keys() == outs_tr.keys() and len(outs_np) > 5
    ints = 0
    for k in outs_np:
        a, b = outs_tr[k], outs_np[k]
        assert a.dtype == b.dtype and a.shape == b.shape, k
        assert torch.equal(a, b), f"{name}: module {k} differs in {int((a != b).sum())} places"
        ints += not a.dtype.is_floating_point
    assert ints >= 4
    assert y_np.dtype == torch.float32 and torch.equal(y_tr, y_np)
    assert y_np.abs().max() > 0


def _counting_fused_ops(monkeypatch):
    """Count the calls of the Triton backend's fused kernels (conv2d_add, ...)."""
    from gpuquant.backends import get_backend
    ops = get_backend("triton").OPS
    calls = {}
    for name in ("conv2d_add", "linear_add", "conv2d_dequant", "linear_dequant"):
        def counted(*a, _fn=ops[name], _name=name, **kw):
            calls[_name] = calls.get(_name, 0) + 1
            return _fn(*a, **kw)
        monkeypatch.setitem(ops, name, counted)
    return calls


def _run_fused(model, x, backend):
    outs, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, QuantizedModule):
            hooks.append(m.register_forward_hook(
                lambda mod, inp, out, name=name: outs.__setitem__(name, out.detach().cpu())))
    with torch.no_grad(), use(backend):
        y = model(x)
    for h in hooks:
        h.remove()
    return y.cpu(), outs


@pytest.mark.parametrize("name,in_ch,size,fused_calls", [
    ("digits_net", 1, 8, {"conv2d_add": 1, "linear_dequant": 1}),
    ("resnet18", 3, 32, {"conv2d_add": 8, "linear_dequant": 1})])
def test_fused_network_runs_fused_kernels_and_equals_numpy(name, in_ch, size, fused_calls,
                                                           monkeypatch):
    """fuse_epilogues: the residual adds and the last layer's dequantization run in the
    Triton GEMM / conv epilogue, every module's output still byte-equal to NumPy's."""
    fused = fuse_epilogues(_int8(name, in_ch, size))
    x = torch.randn(2, in_ch, size, size)
    y_np, outs_np = _run_fused(fused, x, "numpy")
    calls = _counting_fused_ops(monkeypatch)
    fused.to(DEV)
    y_tr, outs_tr = _run_fused(fused, x.to(DEV), "triton")
    assert calls == fused_calls
    assert outs_np.keys() == outs_tr.keys()
    for k in outs_np:
        assert torch.equal(outs_tr[k], outs_np[k]), f"{name}: module {k} differs"
    assert y_np.dtype == torch.float32 and torch.equal(y_tr, y_np)


def test_fusion_cases_bytes_equal_numpy(monkeypatch):
    """Conv as the add's second operand, depthwise conv + add, linear + add, uint8
    activations with nonzero zero points: Triton's fused kernels == NumPy's compositions."""
    from tests.nn.nn_helpers import FusionBlocks, convert_calibrated
    torch.manual_seed(0)
    x = torch.randn(4, 3, 9, 7)
    fused = fuse_epilogues(convert_calibrated(FusionBlocks(), x, "uint8"))
    xs = torch.randn(3, 3, 9, 7) * 1.5
    y_np, outs_np = _run_fused(fused, xs, "numpy")
    calls = _counting_fused_ops(monkeypatch)
    fused.to(DEV)
    y_tr, outs_tr = _run_fused(fused, xs.to(DEV), "triton")
    assert calls == {"conv2d_add": 2, "linear_add": 1, "linear_dequant": 1}
    for k in outs_np:
        assert torch.equal(outs_tr[k], outs_np[k]), k
    assert torch.equal(y_tr, y_np)


@pytest.mark.gpu
@pytest.mark.parametrize("name,in_ch,size", [("resnet18", 3, 32), ("mobilenet_v2", 3, 32)])
def test_warm_network_forward_never_syncs_on_the_gpu(name, in_ch, size):
    """After one warm-up call (autotuning and every memo happen there), a fused int8
    network's forward on CUDA reads nothing back to the host: a read would stall the
    launch queue every call and make the network impossible to capture in a CUDA graph.
    The sync debug mode raises at the first read, with its traceback."""
    assert_warm_forward_never_syncs(fuse_epilogues(_int8(name, in_ch, size)).cuda(),
                                    torch.randn(2, in_ch, size, size, device="cuda"))
