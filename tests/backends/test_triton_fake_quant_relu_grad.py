"""The gradient of the fused observe + fake quant with ReLU folded in (triton op
``observe_fake_quant(..., relu=True)``, its bit mask carrying ReLU's gradient) against the
definition on the reference backend (``torch.relu``, the observer, the fake quant; backward:
the fake quant's ``grad * mask``, then ReLU's ``threshold_backward``), compared on the bits.

Where ReLU is dead (``x <= 0``) the definition gives ``+0.0`` whatever the upstream gradient
is (negative, +-inf, NaN): so must the fused op. The one documented difference (module
docstring of gpuquant/backends/triton/fake_quant.py): where the fake quant clamps high or
the input is NaN the definition gives ``grad * 0`` (``-0.0`` / NaN), the fused op ``+0.0``.
"""
import copy

import pytest
import torch

import gpuquant
import gpuquant.backends as backends
from gpuquant.backends.triton import observer as tobs
from gpuquant.quantization import fake_quant as qfq
from gpuquant.quantization import observer as qobs

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered")  # inf * 0, NaN
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
_INT = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


@pytest.fixture(autouse=True)
def _on_triton():
    """The triton backend explicitly: on CPU the fused QAT ops run the interpreter only then."""
    with backends.use("triton"):
        yield


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(_INT[t.dtype])


def upstream(shape, dead: torch.Tensor, dt, gen) -> torch.Tensor:
    """Random gradient (about half negative); at the ReLU-dead positions cycling through
    +inf, -inf, NaN, a negative number, -0.0 and a positive number."""
    g = torch.randn(shape, generator=gen) * 3
    special = torch.tensor([float("inf"), float("-inf"), float("nan"), -2.5, -0.0, 1.5])
    idx = dead.nonzero(as_tuple=True)
    g[idx] = special[torch.arange(idx[0].numel()) % special.numel()]
    return g.to(dt).to(DEV)


def run_both(x, obs, fq, g, addend=None, **kw):
    """(fused grads, reference grads, fused y, reference y) for x (and addend)."""
    ref = copy.deepcopy(obs)
    ins_f = [x.clone().requires_grad_()] + ([addend.clone().requires_grad_()] if addend is not None
                                            else [])
    ins_r = [t.detach().clone().requires_grad_() for t in ins_f]
    more = {} if addend is None else {"addend": ins_f[1]}
    y = tobs.observe_fake_quant(ins_f[0], obs, fq, relu=True, **more, **kw)
    assert y is not None, "the fused op declined this case"
    with backends.use("reference"):
        yr = qfq.apply_fake_quant_with_observer(ins_r[0], fq, ref, relu=True,
                                                addend=ins_r[1] if addend is not None else None)
    y.backward(g)
    yr.backward(g)
    return [t.grad for t in ins_f], [t.grad for t in ins_r], y, yr


# (observer factory, shape, memory format): per tensor without host hooks (two launches),
# per tensor with check_finite (observer step + FakeQuantFunction), per channel channels_last
# with 16 channels (the C_INNER tile) and 13 (general), per channel channels outermost.
CASES = {
    "per_tensor_two_launch": (lambda: qobs.MinMaxObserver(gpuquant.quint8, symmetric=False,
                                                          check_finite=False),
                              (3, 5, 7, 11), None),
    "per_tensor_check_finite": (lambda: qobs.MinMaxObserver(gpuquant.quint8, symmetric=False,
                                                            check_finite=True),
                                (4, 6, 9), None),
    "per_channel_cl16": (lambda: qobs.MinMaxObserver(gpuquant.quint8, symmetric=False, axis=1,
                                                     check_finite=False),
                         (2, 16, 5, 3), torch.channels_last),
    "per_channel_cl13": (lambda: qobs.MinMaxObserver(gpuquant.quint8, symmetric=False, axis=1,
                                                     check_finite=True),
                         (2, 13, 4, 3), torch.channels_last),
    "per_channel_outer": (lambda: qobs.MinMaxObserver(gpuquant.quint8, symmetric=False, axis=0,
                                                      check_finite=False),
                          (6, 4, 3, 3), None),
}


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_relu_fused_backward_bits_equal_reference(case, dt):
    """Random inputs with negatives (and exact zeros), upstream gradients with negative
    values, +-inf and NaN at the ReLU-dead positions: grad_x has the definition's bits."""
    make, shape, fmt = CASES[case]
    gen = torch.Generator().manual_seed(10 * list(CASES).index(case) + DTYPES.index(dt))
    obs, fq = make().to(DEV), qfq.FakeQuantize(gpuquant.quint8)
    for it in range(2):
        x = torch.randn(shape, generator=gen) * (1 + it) - 0.2
        x.view(-1)[::9] = 0.0
        x.view(-1)[1::9] = -0.0
        x = x.to(dt).to(DEV)
        if fmt is not None:
            x = x.contiguous(memory_format=fmt)
        dead = ~(x > 0)
        assert dead.any() and (~dead).any()
        g = upstream(shape, dead.cpu(), dt, gen)
        (gx,), (gr,), y, yr = run_both(x, obs, fq, g)
        assert torch.equal(bits(y), bits(yr))
        assert gx.dtype == dt and gx.stride() == x.stride()
        assert torch.equal(bits(gx), bits(gr)), case
        # the dead positions are +0.0 (not -0.0, not NaN), whatever g was there
        assert torch.equal(bits(gx)[dead], torch.zeros_like(bits(gx)[dead]))


@pytest.mark.parametrize("dt", DTYPES)
def test_relu_fused_add_backward_bits_equal_reference(dt):
    """The fused add + ReLU (QAT ``Elemwise("add_relu")``): both inputs' gradients have the
    definition's bits, ReLU dead where the sum (rounded to the dtype) is <= 0."""
    gen = torch.Generator().manual_seed(7 + DTYPES.index(dt))
    obs = qobs.ExponentialMovingAverageObserver(0.8, gpuquant.quint8, symmetric=False,
                                                check_finite=False).to(DEV)
    fq = qfq.FakeQuantize(gpuquant.quint8)
    shape = (2, 6, 5, 7)
    # MinMax-like first batch, then a narrower one: the moving average keeps the range
    # covering it (no clamp high, see the other test for that)
    for it, k in enumerate((2.0, 1.0)):
        a = (torch.randn(shape, generator=gen) * k).to(dt).to(DEV)
        b = (torch.randn(shape, generator=gen) * k - 0.2).to(dt).to(DEV)
        dead = ~((a + b) > 0)
        g = upstream(shape, dead.cpu(), dt, gen)
        gf, gr, y, yr = run_both(a, obs, fq, g, addend=b)
        assert torch.equal(bits(y), bits(yr))
        for u, v in zip(gf, gr):
            assert torch.equal(bits(u), bits(v))
            assert torch.equal(bits(u)[dead], torch.zeros_like(bits(u)[dead]))


@pytest.mark.parametrize("dt", DTYPES)
def test_relu_fused_documented_difference_clamped_high(dt):
    """What the module docstring documents: at positions the fake quant clamps high (a
    moving-average range lagging a larger batch) and at NaN inputs, the definition gives
    ``grad * 0`` (-0.0 for negative grad, NaN for +-inf / NaN grad) while the fused op gives
    +0.0; equal as numbers for finite grad. Everywhere else the bits are the definition's."""
    gen = torch.Generator().manual_seed(11 + DTYPES.index(dt))
    obs = qobs.ExponentialMovingAverageObserver(0.9, gpuquant.quint8, symmetric=False,
                                                check_finite=False).to(DEV)
    fq = qfq.FakeQuantize(gpuquant.quint8)
    shape = (4, 8, 9)
    for it, k in enumerate((1.0, 8.0)):
        x = torch.randn(shape, generator=gen) * k
        if it == 1:
            x[0, 0, :3] = float("nan")  # NaN inputs (the observer then drops the batch)
        x = x.to(dt).to(DEV)
        # where the fake quant's own mask is false (NaN, above the range): the definition's
        # gradient of ones is 0 there although ReLU passes
        with backends.use("reference"):
            xp = x.clone().requires_grad_()
            qfq.apply_fake_quant_with_observer(xp, fq, copy.deepcopy(obs), relu=True) \
                .backward(torch.ones_like(x))
        off = ((x > 0) | x.isnan()) & (xp.grad == 0)
        dead = ~(x > 0) & ~x.isnan()
        if it == 1:
            assert int(off.sum()) > 6 and off[0, 0, :3].all()
        g = upstream(shape, (dead | off).cpu(), dt, gen)  # +-inf, NaN, negatives at both
        (gx,), (gr,), _, _ = run_both(x, obs, fq, g)
        same = ~off
        assert torch.equal(bits(gx)[same], bits(gr)[same])
        assert torch.equal(bits(gx)[off], torch.zeros_like(bits(gx)[off]))  # fused: +0.0
        # the definition: g * 0 there (-0.0 for negative g, NaN for non-finite g)
        gd = g[off].float()
        assert torch.equal(gr[off].float().isnan(), ~gd.isfinite())
        fin = gd.isfinite()
        assert torch.equal(gr[off].float()[fin].signbit(), gd[fin].signbit())
        assert (gr[off].float()[fin] == 0).all()
