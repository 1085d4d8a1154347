"""The transformer QAT's row fake quant (per-token activations, per-output-channel weights) as
one Triton launch (op ``fake_quant_rows``, the interpreter on CPU) against its definition
(torch ops and the reference fake quant): bit for bit forward and backward, on every float
dtype, one-block and long rows, rows of zeros, NaN, inf and exact ties."""
import pytest
import torch

import gpuquant
from gpuquant import backends
from gpuquant.backends.triton import dynamic as D
from gpuquant.nn.qat.linear_dynamic import (DynamicLinear, fake_quant_per_token,
                                            fake_quant_weight_per_channel)

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns, NaNs at the same places (their payloads aside)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    nan = a.isnan()
    iv = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
    return torch.equal(nan, b.isnan()) and torch.equal(
        a.masked_fill(nan, 0).contiguous().view(iv[a.dtype]),
        b.masked_fill(nan, 0).contiguous().view(iv[b.dtype]))


def rows(m: int, k: int, dtype) -> torch.Tensor:
    """Random rows of very different magnitudes, plus: zeros, a NaN, +inf, -inf, subnormal
    values only, and a row whose values are exact ties once scaled (absmax 127: scale 1)."""
    x = torch.randn(m, k) * torch.logspace(-3, 3, m)[:, None]
    x[1] = 0.0
    x[2, k // 2] = float("nan")
    x[3, 0] = float("inf")
    x[4, k - 1] = -float("inf")
    x[5] = torch.randn(k) * 1e-39
    x[6] = torch.arange(k) % 64 - 31.5
    x[6, 0] = 127.0
    return x.to(dtype).to(DEV)


def run(fn, x, backend):
    """(y, grad of x) with the upstream gradient a fixed function of y's shape."""
    xx = x.detach().clone().requires_grad_()
    with backends.use(backend):
        y = fn(xx)
        gen = torch.Generator().manual_seed(y.numel())
        y.backward(torch.randn(y.shape, generator=gen).to(DEV))
    return y.detach(), xx.grad


@pytest.fixture
def calls(monkeypatch):
    """How many times the one-launch op ran (so a test sees it was not declined)."""
    n = [0]
    real = D._FakeQuantRows.apply

    def spy(*a):
        n[0] += 1
        return real(*a)
    monkeypatch.setattr(D._FakeQuantRows, "apply", spy)
    return n


def check_per_token(dtype, k):
    torch.manual_seed(k)
    x = rows(9, k, dtype).reshape(3, 3, k)
    for d in (gpuquant.qint8, gpuquant.qint8_narrow):
        y, gx = run(lambda t: fake_quant_per_token(t, d), x, "triton")
        yr, gxr = run(lambda t: fake_quant_per_token(t, d), x, "reference")
        assert y.dtype == torch.float32 and gx.dtype == dtype
        assert same(y, yr) and same(gx, gxr), (dtype, k, d.name)
    assert y[0, 2].isnan().all() and not y[0, 1].any()  # the NaN row, the zero row
    assert y[1, 0].isnan().all() and y[1, 1].isnan().all()  # the rows holding +inf, -inf


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [8, 200, 16392])  # 16392: past one block, a ragged last one
def test_per_token_equals_the_definition(dtype, k, calls):
    check_per_token(dtype, k)
    assert calls[0] == 2


@pytest.mark.gpu
def test_rows_on_the_gpu():
    """The same on the device, compiled: there the row maximum drops NaN (the kernel counts
    NaNs apart), max / min are the GPU's, rounding is cvt.rni."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for k in (8, 200, 4096, 16392):
            check_per_token(dtype, k)


@pytest.mark.parametrize("d", [gpuquant.qint8_narrow, gpuquant.qint8])  # divisor 127, 127.5
def test_weight_per_channel_equals_the_definition(d, calls):
    w = rows(16, 64, torch.float32)
    y, gw = run(lambda t: fake_quant_weight_per_channel(t, d), w, "triton")
    yr, gwr = run(lambda t: fake_quant_weight_per_channel(t, d), w, "reference")
    assert same(y, yr) and same(gw, gwr)
    assert calls[0] == 1


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_declined_cases_take_the_definition(calls):
    """K not a multiple of 8 (the rows' mask bits would share bytes), columns not contiguous,
    and a CPU tensor without use("triton") all give the definition's result."""
    # (finite rows: with an inf in a row the definition makes every output NaN, which the
    # one-launch op does; the composed fake quant leaves +-inf -> qmin * inf at the
    # infinities themselves, as its kernel's clamp drops the NaN of inf * 0)
    x = torch.randn(8, 36, device=DEV) * 10
    with backends.use("triton"):
        a = fake_quant_per_token(x)
        b = fake_quant_per_token(rows(8, 64, torch.float32).t())
    assert calls[0] == 0
    with backends.use("reference"):
        assert same(a, fake_quant_per_token(x))
    assert b.shape == (64, 8)
    assert D.fake_quant_rows(torch.ones(2, 8, dtype=torch.int32), 127.0, -128, 127, 1e-8) \
        is None
    if DEV == "cpu":
        assert D.fake_quant_rows(torch.ones(2, 8), 127.0, -128, 127, 1e-8) is None  # no use()


def test_dynamic_linear_trains_the_same_on_both_paths(calls):
    """A DynamicLinear step (activation and weight fake quant) gives the same output and
    gradients through the one-launch op as through the definition."""
    torch.manual_seed(0)
    lin = DynamicLinear(64, 24).to(DEV)
    x = torch.randn(5, 64, device=DEV)
    out = {}
    for b in ("triton", "reference"):
        lin.zero_grad()
        xx = x.clone().requires_grad_()
        with backends.use(b):
            y = lin(xx)
            y.square().sum().backward()
        out[b] = (y.detach(), xx.grad, lin.weight.grad.clone(), lin.bias.grad.clone())
    for a, r in zip(out["triton"], out["reference"]):
        assert same(a, r)
    assert calls[0] == 2  # the activation's and the weight's
