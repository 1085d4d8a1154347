"""Helpers shared by the Triton inference tests: device, oracles, random params, poison."""
from __future__ import annotations

import pytest
import torch

from gpuquant.backends import available, get_backend
from gpuquant.functional.requant import make_requant

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"  # the triton backend runs on CPU through the interpreter

if "triton" not in available():
    pytest.skip("triton backend unavailable here", allow_module_level=True)

TRITON = get_backend("triton").OPS
# The NumPy backend is the oracle; the reference backend defines the same bytes.
ORACLES = [(n, get_backend(n).OPS) for n in ("numpy", "reference") if n in available()]


def oracle_ids():
    return [n for n, _ in ORACLES]


def rand_act(shape, dtype, zp=None, spread=None):
    """Random int8 / uint8 activations (around ``zp`` within ``spread`` when given)."""
    lo, hi = (-128, 127) if dtype == torch.int8 else (0, 255)
    if spread is not None:
        lo, hi = max(lo, zp - spread), min(hi, zp + spread)
    return torch.randint(lo, hi + 1, shape, dtype=torch.int16).to(dtype)


def rand_weight(shape, absmax=127):
    return torch.randint(-absmax, absmax + 1, shape, dtype=torch.int8)


def rand_requant(channels, out_dtype, activation="none", k=64, big=False):
    """Per-channel Requant whose outputs spread over the range for an accumulator of ``k``
    random int8 products; ``big``: some channels get multipliers >= 1 (negative rshift)."""
    w_scale = torch.rand(channels, dtype=torch.float64) * 0.9 + 0.1
    if big:
        w_scale[::2] *= 2.0 ** torch.randint(3, 9, (len(w_scale[::2]),)).double()
    x_scale = 0.02
    target = 1.0 / (60.0 * k ** 0.5)  # ~ +-60 output steps for a random accumulator
    out_scale = x_scale * float(w_scale.median()) / target
    zp = 0 if out_dtype.qmin < 0 else 128
    if out_dtype.qmin < 0:
        zp = int(torch.randint(-10, 11, ()))
    return make_requant(x_scale, w_scale, out_scale, zp, out_dtype, activation)


_POISON = {torch.int8: -91, torch.uint8: 0xA5, torch.int32: -0x5A5A5A5B,
           torch.int64: -0x5A5A5A5A5A5A5A5B}


@pytest.fixture
def poison(monkeypatch):
    """Outputs allocated by the ops start as poison (NaN, 0xA5...), so unwritten elements
    show up in the exact comparisons."""
    real_empty, real_like = torch.empty, torch.empty_like

    def fill(t):
        if t.dtype.is_floating_point:
            t.fill_(float("nan"))
        elif t.dtype in _POISON:
            t.fill_(_POISON[t.dtype])
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(real_like(*a, **k)))
    yield


def cpu(v):
    if isinstance(v, torch.Tensor):
        return v.cpu()
    if isinstance(v, (list, tuple)):
        return type(v)(cpu(t) for t in v)
    return v


def dev(v):
    if isinstance(v, torch.Tensor):
        return v.to(DEV)
    if isinstance(v, (list, tuple)):
        return type(v)(dev(t) for t in v)
    return v


def check_op(op, args, what):
    """Triton's ``op`` on ``args`` (moved to the device) == every oracle's on the CPU, byte for
    byte; returns Triton's output."""
    got = TRITON[op](*dev(args))
    for name, ops in ORACLES:
        assert_same(got, ops[op](*cpu(args)), f"{what} vs {name}")
    return got


def check_linear_add_and_dequant(x, zp, w, b, rq, res, p, scale, what):
    """Triton's fused ``linear_add`` (residual ``res`` with AddParams ``p``) and
    ``linear_dequant`` (``scale``) == each oracle's linear followed by its add / dequantize,
    byte for byte."""
    got_add = TRITON["linear_add"](*dev((x, zp, w, b, rq, res)), p)
    got_deq = TRITON["linear_dequant"](*dev((x, zp, w, b, rq)), scale)
    for name, ops in ORACLES:
        y = ops["linear"](x, zp, w, b, rq)
        assert_same(got_add, ops["add"](y, res, p), f"{what} linear_add vs {name}")
        want = ops["dequantize"](y, scale, torch.tensor(rq.zero_point, dtype=torch.int32), None)
        assert_same(got_deq, want, f"{what} linear_dequant vs {name}")


def assert_same(got: torch.Tensor, want: torch.Tensor, what: str):
    got = got.cpu()
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if not torch.equal(got, want):
        if got.dtype.is_floating_point:
            bad = (got != want) & ~(torch.isnan(got) & torch.isnan(want))
        else:
            bad = got != want
        idx = bad.nonzero()[:5].tolist()
        raise AssertionError(f"{what}: {int(bad.sum())} of {got.numel()} elements differ, "
                             f"first at {idx}: got {[got[tuple(i)].item() for i in idx]}, "
                             f"want {[want[tuple(i)].item() for i in idx]}")


def sm90() -> bool:
    """An H100 / H200 here (the Gluon kernels' GPU tests)."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


def check_calls(calls, what):
    """Each ``(name, op, args)`` (:func:`gpuquant.bench.warm.gluon_test_calls` /
    ``gluon_conv_test_calls``) on the triton backend, on the device where there is one ==
    the NumPy oracle, byte for byte; the bare int32 ops (no oracle op) == the exact
    product / convolution in float64 (exact: |sums| < 2^53) plus bias."""
    numpy_ops = get_backend("numpy").OPS
    for name, op, args in calls:
        got = TRITON[op](*dev(args))
        if op == "linear_int32":
            x, zp, w, b = args
            want = ((x.long() - zp) @ w.long().t() + b.long()).int()
        elif op == "conv2d_int32":
            x, zp, w, b, st, pad, dil, groups = args
            want = torch.nn.functional.conv2d(x.double() - zp, w.double(), b.double(), st, pad,
                                              dil, groups).round().to(torch.int32)
            want = want.contiguous(memory_format=torch.channels_last)
        else:
            want = numpy_ops[op](*args)
        assert_same(got, want, f"{what} {name}")



def assert_warm_forward_never_syncs(model, x):
    """After one warm-up call (autotuning and every memo happen there), the int8 ``model``'s
    forward on CUDA reads nothing back to the host (the sync debug mode raises at the first
    read, with its traceback: a read would stall the launch queue every call) and captures
    in a CUDA graph whose replay gives the eager bytes."""
    from gpuquant.backends import use
    with torch.no_grad(), use("triton"):
        model(x)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            y = model(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            yg = model(x)
        g.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, yg)


def run_capturing(model, x):
    """``model(x)`` without gradients, and every leaf module's output (on the CPU) by name."""
    outs, hooks = {}, []
    for name, m in model.named_modules():
        if name and not list(m.children()):
            hooks.append(m.register_forward_hook(
                lambda mod, inp, out, name=name: outs.__setitem__(name, out.detach().cpu())))
    with torch.no_grad():
        y = model(x)
    for h in hooks:
        h.remove()
    return y.cpu(), outs
