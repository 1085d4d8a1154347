"""Bad input to the quantization API: observers whose range overflows float32, learned
quantizers whose initial scale would be inf, the learned fake-quant functions on every
backend, and the argument checks of qparams_from_min_max, apply_fake_quant_with_observer,
smooth_quant and quantize_static_linear. Each refusal is a TypeError / ValueError naming the
value; nothing returns inf / NaN scales; valid input gives the same results as before."""
import copy
import math

import pytest
import torch

import gpuquant
from gpuquant import QParams
from gpuquant import backends as B
from gpuquant.quantization import (LSQ, TQT, ExponentialMovingAverageObserver, FakeQuantize,
                                   HistogramObserver, MinMaxObserver,
                                   apply_fake_quant_with_observer, lsq_fake_quant,
                                   qparams_from_min_max, quantize_static_linear,
                                   smooth_quant, tqt_fake_quant)
from gpuquant.quantization.smoothquant import smoothing_factors

F32_MAX = torch.finfo(torch.float32).max
BACKENDS = [b for b in ("reference", "triton") if b in B.available()]


def _wide(n=64):
    """Finite float32 data whose range max - min overflows float32 (both ends beyond
    +-1.7e38), random each run."""
    x = torch.empty(n).uniform_(-1.0, 1.0) * 1e38
    i, j = torch.randperm(n)[:2].tolist()
    x[i] = -float(torch.empty(()).uniform_(1.75e38, 3.4e38))
    x[j] = float(torch.empty(()).uniform_(1.75e38, 3.4e38))
    assert bool(torch.isfinite(x).all()) and math.isinf(float(x.max() - x.min()))
    return x


def _state(obs):
    return {k: v.clone() for k, v in obs.state_dict().items() if isinstance(v, torch.Tensor)}


def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- 1: observer range
def _ema0(**kw):
    """A moving average that takes each batch's range whole (momentum 0): a wide batch after
    a narrow one leaves a wide range (with momentum 0.9 the average stays narrow)."""
    return ExponentialMovingAverageObserver(0.0, **kw)


_ema0.__name__ = "ExponentialMovingAverageObserver"
OBSERVERS = [MinMaxObserver, _ema0, HistogramObserver]


@pytest.mark.parametrize("cls", OBSERVERS, ids=["minmax", "ema", "histogram"])
def test_affine_observer_refuses_a_range_wider_than_float32_and_keeps_its_state(cls):
    obs = cls(dtype=gpuquant.quint8, symmetric=False)
    first = torch.randn(100)
    obs(first)
    before, qp_before = _state(obs), obs.get_qparams()
    with pytest.raises(ValueError, match=rf"{cls.__name__}: the range .* gives no finite float32 "
                                         rf"scale: .*overflows float32"):
        obs(_wide())
    assert _same_state(_state(obs), before)
    assert obs.get_qparams() == qp_before
    # a valid batch after the refusal is recorded as if the bad one never came
    ref = cls(dtype=gpuquant.quint8, symmetric=False)
    nxt = torch.randn(50) * 3
    ref(first), ref(nxt), obs(nxt)
    assert _same_state(_state(obs), _state(ref))
    qp = obs.get_qparams()
    QParams(qp.dtype, qp.scale, qp.zero_point)  # valid by QParams' own rule


@pytest.mark.parametrize("cls", OBSERVERS, ids=["minmax", "ema", "histogram"])
def test_first_batch_too_wide_leaves_the_observer_empty(cls):
    obs = cls(dtype=gpuquant.qint8, symmetric=False)
    with pytest.raises(ValueError, match="overflows float32"):
        obs(_wide())
    assert not obs.has_observed
    with pytest.raises(ValueError, match="has not observed any data"):
        obs.get_qparams()


def test_symmetric_observer_takes_wide_data_within_float32_exactly_as_torch_ao():
    """Ends up to +-1.7e38 (max - min overflows float32): max(-min, max) / 127.5 and the
    quantized range 255 * scale are finite, so the symmetric observer takes it, as torch.ao."""
    x = torch.empty(64).uniform_(-1.0, 1.0) * 1e38
    x[:2] = torch.tensor([-1.7e38, float(torch.empty(()).uniform_(1.5e38, 1.7e38))])
    ours = MinMaxObserver(dtype=gpuquant.qint8, symmetric=True)
    ours(x)
    ref = torch.ao.quantization.MinMaxObserver(dtype=torch.qint8,
                                               qscheme=torch.per_tensor_symmetric)
    ref(x)
    s, z = ref.calculate_qparams()
    qp = ours.get_qparams()
    assert torch.equal(qp.scale.reshape(1), s) and torch.equal(qp.zero_point.reshape(1), z.int())
    QParams(qp.dtype, qp.scale, qp.zero_point)  # valid by QParams' own rule


@pytest.mark.parametrize("backend", BACKENDS)
def test_symmetric_observer_refuses_magnitudes_past_half_of_float32(backend):
    """A magnitude past 1.7e38: torch.ao's scale (2.67e36 at 3.4e38) has a quantized range
    255 * scale past float32, which QParams itself refuses (quantize() failed later), and
    fake-quant mapped the finite -amax to -128 * scale = -Inf. Refused now, the state kept,
    on the fused Triton path as in the definition (dropped and counted without the check)."""
    big = float(torch.empty(()).uniform_(1.75e38, 3.4e38))
    x = torch.tensor([1.0, -big, 0.5])
    with B.use(backend):
        obs = MinMaxObserver(dtype=gpuquant.qint8, symmetric=True)
        obs(torch.tensor([2.0, -1.0]))
        before = _state(obs)
        with pytest.raises(ValueError, match=r"MinMaxObserver: the range .* its magnitude "
                                             r"max\(-min, max\) is past 1.7e38"):
            obs(x)
        assert _same_state(_state(obs), before)
        with pytest.raises(ValueError, match="min > max"):
            qparams_from_min_max(torch.tensor(1.0), torch.tensor(-1.0), gpuquant.qint8, True)


def test_minmax_refuses_when_two_fine_batches_together_overflow():
    obs = MinMaxObserver(dtype=gpuquant.quint8, symmetric=False)
    lo = float(torch.empty(()).uniform_(1.75e38, 3.4e38))
    hi = float(torch.empty(()).uniform_(1.75e38, 3.4e38))
    obs(torch.tensor([-lo, 0.0]))
    with pytest.raises(ValueError, match="MinMaxObserver: the range .*overflows float32"):
        obs(torch.tensor([0.0, hi]))
    assert float(obs.max_val) == 0.0 and float(obs.min_val) == float(torch.tensor(-lo))


def test_ema_refuses_a_moving_average_that_overflows():
    """min + c * (batch_min - min) overflows for min = 3e38, batch_min = -3e38 (torch.ao's
    formula): refused. (Affine here: a symmetric observer refuses the first batch already,
    its magnitude being past 1.7e38.)"""
    obs = ExponentialMovingAverageObserver(0.5, dtype=gpuquant.quint8, symmetric=False)
    obs(torch.tensor([3e38, 3.2e38]))
    before = _state(obs)
    with pytest.raises(ValueError, match=r"ExponentialMovingAverageObserver: the range .*not "
                                         r"finite"):
        obs(torch.tensor([-3e38, -2.9e38]))
    assert _same_state(_state(obs), before)


def test_per_channel_overflow_names_the_channel_and_check_finite_false_drops_it():
    C = 5
    x = torch.randn(C, 16)
    bad = int(torch.randint(C, ()))
    x[bad] = _wide(16)
    obs = MinMaxObserver(dtype=gpuquant.quint8, symmetric=False, axis=0)
    with pytest.raises(ValueError, match=rf"channel {bad}; 1 channel\(s\)"):
        obs(x)
    assert obs.min_val.numel() == 0 and not obs.has_observed  # the state was never sized
    # check_finite=False: that channel is dropped on the device and counted; the rest recorded
    quiet = MinMaxObserver(dtype=gpuquant.quint8, symmetric=False, axis=0, check_finite=False)
    quiet(x)
    keep = torch.arange(C) != bad
    assert torch.equal(quiet.min_val[keep], x[keep].amin(1))
    assert torch.equal(quiet.max_val[keep], x[keep].amax(1))
    assert math.isinf(float(quiet.min_val[bad])) and int(quiet.nonfinite_batches) == 1


def test_check_finite_false_drops_a_too_wide_per_tensor_batch():
    obs = _ema0(dtype=gpuquant.quint8, symmetric=False, check_finite=False)
    x = torch.randn(30)
    obs(x)
    before = obs.get_qparams()
    obs(_wide())
    assert int(obs.nonfinite_batches) == 1 and obs.get_qparams() == before


@pytest.mark.parametrize("cls", [MinMaxObserver, HistogramObserver])
def test_loading_a_state_dict_with_a_too_wide_range_is_refused(cls):
    src = cls(dtype=gpuquant.quint8, symmetric=False)
    src(torch.randn(10))
    sd = src.state_dict()
    for k in ("min_val", "hist_lo"):
        if k in sd:
            sd[k] = torch.tensor(-3e38)
    for k in ("max_val", "hist_hi"):
        if k in sd:
            sd[k] = torch.tensor(3e38)
    dst = cls(dtype=gpuquant.quint8, symmetric=False)
    dst(torch.randn(12) * 3)
    before, state = dst.get_qparams(), _state(dst)
    with pytest.raises(ValueError, match="refusing to load it"):
        dst.load_state_dict(sd)
    # refused before anything was copied: the observer is as it was
    assert dst.get_qparams() == before
    assert _same_state(state, _state(dst))


@pytest.mark.parametrize("cls", [MinMaxObserver, HistogramObserver])
def test_loading_a_state_dict_with_min_above_max_is_refused(cls):
    src = cls()
    src(torch.randn(10))
    sd = src.state_dict()
    lo, hi = ("hist_lo", "hist_hi") if "hist_lo" in sd else ("min_val", "max_val")
    v = float(torch.rand(()) * 5 + 0.5)
    sd[lo], sd[hi] = torch.tensor(v), torch.tensor(-v)  # min > max: no data gives it
    dst = cls()
    dst(torch.randn(9))
    before = dst.get_qparams()
    with pytest.raises(ValueError, match="min > max"):
        dst.load_state_dict(sd)
    assert dst.get_qparams() == before
    cls().load_state_dict(cls().state_dict())  # a fresh (unobserved) state loads


def test_loading_a_per_channel_state_with_one_channel_inverted_is_refused():
    src = MinMaxObserver(axis=0)
    src(torch.randn(5, 7))
    sd = src.state_dict()
    c = int(torch.randint(0, 5, ()))
    sd["max_val"][c] = sd["min_val"][c] - 1.0
    with pytest.raises(ValueError, match=f"channel {c}; 1 channel"):
        MinMaxObserver(axis=0).load_state_dict(sd)


def test_loading_invalid_passive_qparams_is_refused_and_keeps_the_old_ones():
    from gpuquant.quantization import PassiveObserver
    src = PassiveObserver()
    src.set_qparams(QParams(gpuquant.qint8, 0.1))
    sd = src.state_dict()
    sd["scale"] = -torch.rand(()) - 0.01
    dst = PassiveObserver()
    qp = QParams(gpuquant.qint8, float(torch.rand(()) + 0.1), 1)
    dst.set_qparams(qp)
    with pytest.raises(ValueError, match="the state's qparams are invalid"):
        dst.load_state_dict(sd)
    assert dst.get_qparams() == qp


@pytest.mark.parametrize("make, name, bad", [
    (lambda: LSQ(), "scale", float("nan")),
    (lambda: LSQ(symmetric=False), "zero_point", float("inf")),
    (lambda: TQT(), "log2_t", 200.0),
    (lambda: TQT(), "log2_t", float("nan")),
])
def test_loading_learned_values_forward_cannot_use_is_refused(make, name, bad):
    src = make()
    src(torch.randn(16))
    sd = src.state_dict()
    sd[name] = torch.tensor(bad)
    dst = make()
    dst(torch.randn(16) * 2)
    state = _state(dst)
    with pytest.raises(ValueError, match=f"the state's {name} .*refusing to load it"):
        dst.load_state_dict(sd)
    assert _same_state(state, _state(dst))
    make().load_state_dict(make().state_dict())  # uninitialised: nothing to check


# --------------------------------------------------------------------------- qparams_from_min_max
def test_qparams_from_min_max_takes_dtype_names_and_checks_its_arguments():
    lo, hi = -torch.rand(7) * 10, torch.rand(7) * 10
    for name, d in (("qint8", gpuquant.qint8), ("quint8", gpuquant.quint8)):
        for sym in (True, False):
            a = qparams_from_min_max(lo, hi, name, sym)
            b = qparams_from_min_max(lo, hi, d, sym)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # the same numbers as an observer
    obs = MinMaxObserver(dtype=gpuquant.quint8, symmetric=False, axis=0)
    obs(torch.stack([lo, hi], 1))
    s, z = qparams_from_min_max(lo, hi, "quint8", False)
    assert torch.equal(obs.get_qparams().scale, s) and torch.equal(obs.get_qparams().zero_point, z)
    with pytest.raises(ValueError, match="unknown quantized dtype 'qint9'"):
        qparams_from_min_max(lo, hi, "qint9", True)
    with pytest.raises(TypeError, match="dtype must be a gpuquant.QuantDtype"):
        qparams_from_min_max(lo, hi, 8, True)
    with pytest.raises(TypeError, match="min_val must be a float32 tensor"):
        qparams_from_min_max(-1.0, hi, "qint8", True)
    with pytest.raises(TypeError, match="symmetric must be a bool"):
        qparams_from_min_max(lo, hi, "qint8", "yes")
    with pytest.raises(ValueError, match="same shape"):
        qparams_from_min_max(lo, hi[:3], "qint8", True)
    with pytest.raises(ValueError, match=r"overflows float32"):
        qparams_from_min_max(torch.tensor(-3e38), torch.tensor(3e38), "quint8", False)
    with pytest.raises(ValueError, match=r"not finite"):
        qparams_from_min_max(torch.tensor(float("nan")), torch.tensor(1.0), "quint8", False)


# --------------------------------------------------------------------------- 2: learned init
@pytest.fixture(params=BACKENDS)
def backend(request):
    with B.use(request.param):
        yield request.param


def test_lsq_data_init_refuses_an_overflowing_scale_and_stays_uninitialised(backend):
    v = float(torch.empty(()).uniform_(1.0e38, 3.4e38))
    fq = LSQ(init="data")
    with pytest.raises(ValueError, match=r"LSQ: initialising scale from the data .* got \[inf\]"):
        fq(torch.full((4,), v))
    assert fq.get_qparams() is None and not bool(fq.initialized)
    x = torch.randn(32)
    fq(x)
    want = torch.clamp(2.0 * x.abs().mean() / math.sqrt(127), min=torch.finfo(torch.float32).eps)
    assert torch.equal(fq.scale.detach(), want)


def test_tqt_refuses_thresholds_above_2_pow_127(backend):
    big = float(torch.empty(()).uniform_(2.0 ** 127 * 1.01, 3.4e38))
    fq = TQT(init="data")
    with pytest.raises(ValueError, match=r"TQT: initialising log2_t from the data .*\[inf\]"):
        fq(torch.tensor([big, -1.0]))
    assert fq.get_qparams() is None
    # from valid qparams (255 scale finite) whose threshold 255 scale is past 2**127
    s = float(torch.empty(()).uniform_(2.0 ** 127 / 255 * 1.01, 1.33e36))
    fq = TQT(gpuquant.quint8)
    with pytest.raises(ValueError, match=r"TQT: initialising log2_t from the qparams"):
        fq(torch.rand(8), QParams(gpuquant.quint8, s, 0))
    assert fq.get_qparams() is None
    # the largest threshold that works: 2**127 gives the scale 2**120
    fq = TQT(init="data")
    y = fq(torch.tensor([2.0 ** 127, 2.0 ** 121, -3.0]))
    assert float(fq.get_qparams().scale) == 2.0 ** 120
    assert y.tolist() == [127 * 2.0 ** 120, 2.0 ** 121, 0.0]


# --------------------------------------------------------------------------- 3: learned functions
_X = torch.randn(3, 4)
_BAD_CALLS = {
    "lsq python-float scale": (TypeError, "lsq_fake_quant: scale must be a float tensor",
                               lambda: lsq_fake_quant(_X, 0.1, 0.0, -128, 127, None, 1.0)),
    "lsq int scale": (TypeError, "scale must be a float tensor", lambda: lsq_fake_quant(
        _X, torch.tensor(1), torch.tensor(0.0), -128, 127, None, 1.0)),
    "lsq axis 5": (ValueError, r"axis 5 out of range for 2-d x; allowed \[-2, 1\]", lambda:
                   lsq_fake_quant(_X, torch.ones(4), torch.zeros(4), -128, 127, 5, 1.0)),
    "lsq axis -3": (ValueError, r"axis -3 out of range", lambda:
                    lsq_fake_quant(_X, torch.ones(4), torch.zeros(4), -128, 127, -3, 1.0)),
    "lsq axis float": (TypeError, "axis must be None or an int", lambda:
                       lsq_fake_quant(_X, torch.ones(4), torch.zeros(4), -128, 127, 1.0, 1.0)),
    "lsq 5 scales for 4 channels": (ValueError, r"scale must have 4 value\(s\)", lambda:
                                    lsq_fake_quant(_X, torch.ones(5), torch.zeros(5), -128,
                                                   127, 1, 1.0)),
    "lsq zero_point shape": (ValueError, r"zero_point must have 1 value\(s\)", lambda:
                             lsq_fake_quant(_X, torch.tensor(0.1), torch.zeros(2), -128, 127,
                                            None, 1.0)),
    "lsq qmin > qmax": (ValueError, "need qmin <= qmax, got 127, -128", lambda: lsq_fake_quant(
        _X, torch.tensor(0.1), torch.tensor(0.0), 127, -128, None, 1.0)),
    "lsq float qmin": (TypeError, "qmin must be an int", lambda: lsq_fake_quant(
        _X, torch.tensor(0.1), torch.tensor(0.0), -128.0, 127, None, 1.0)),
    "lsq int32 x": (TypeError, "x must be a float32/float16/bfloat16 tensor", lambda:
                    lsq_fake_quant(torch.ones(3, dtype=torch.int32), torch.tensor(0.1),
                                   torch.tensor(0.0), -128, 127, None, 1.0)),
    "lsq scale 0": (ValueError, r"scale must be finite and > 0 .* got \[0.0\]", lambda:
                    lsq_fake_quant(_X, torch.tensor(0.0), torch.tensor(0.0), -128, 127, None,
                                   1.0)),
    "lsq scale -0.1": (ValueError, r"scale must be finite and > 0", lambda: lsq_fake_quant(
        _X, torch.tensor(-0.1), torch.tensor(0.0), -128, 127, None, 1.0)),
    "lsq scale inf": (ValueError, r"got \[inf\]", lambda: lsq_fake_quant(
        _X, torch.tensor(math.inf), torch.tensor(0.0), -128, 127, None, 1.0)),
    "lsq scale 1e-39": (ValueError, r"finite float32 reciprocal", lambda: lsq_fake_quant(
        _X, torch.tensor(1e-39), torch.tensor(0.0), -128, 127, None, 1.0)),
    "lsq nan scale per channel": (ValueError, r"got \[nan\] \(at 1 position", lambda:
                                  lsq_fake_quant(_X, torch.tensor([0.1, 0.1, math.nan, 0.1]),
                                                 torch.zeros(4), -128, 127, 1, 1.0)),
    "lsq nan zero_point": (ValueError, r"zero_point must be finite", lambda: lsq_fake_quant(
        _X, torch.tensor(0.1), torch.tensor(math.nan), -128, 127, None, 1.0)),
    "lsq grad_factor str": (TypeError, "grad_factor must be a float", lambda: lsq_fake_quant(
        _X, torch.tensor(0.1), torch.tensor(0.0), -128, 127, None, "1")),
    "lsq grad_factor nan": (ValueError, "grad_factor must be finite", lambda: lsq_fake_quant(
        _X, torch.tensor(0.1), torch.tensor(0.0), -128, 127, None, math.nan)),
    "tqt python-float log2_t": (TypeError, "tqt_fake_quant: log2_t must be a float tensor",
                                lambda: tqt_fake_quant(_X, 0.0, -128, 127, None)),
    "tqt axis 5": (ValueError, r"axis 5 out of range for 2-d x",
                   lambda: tqt_fake_quant(_X, torch.zeros(4), -128, 127, 5)),
    "tqt int32 x": (TypeError, "x must be a float32/float16/bfloat16", lambda: tqt_fake_quant(
        torch.ones(3, dtype=torch.int32), torch.tensor(0.0), -128, 127, None)),
    "tqt qmin > qmax": (ValueError, "need qmin <= qmax", lambda: tqt_fake_quant(
        _X, torch.tensor(0.0), 7, -8, None)),
    "tqt log2_t 200": (ValueError, r"log2_t \[200.0\] gives a scale .* got \[inf\]",
                       lambda: tqt_fake_quant(_X, torch.tensor(200.0), -128, 127, None)),
    "tqt log2_t -200": (ValueError, r"log2_t \[-200.0\] gives a scale .* got \[0.0\]",
                        lambda: tqt_fake_quant(_X, torch.tensor(-200.0), -128, 127, None)),
    "tqt log2_t nan": (ValueError, r"log2_t \[nan\]",
                       lambda: tqt_fake_quant(_X, torch.tensor(math.nan), -128, 127, None)),
}


@pytest.mark.parametrize("case", list(_BAD_CALLS))
def test_learned_functions_refuse_the_same_inputs_on_every_backend(case):
    exc, msg, call = _BAD_CALLS[case]
    seen = []
    for be in BACKENDS:
        with B.use(be):
            with pytest.raises(exc, match=msg) as info:
                call()
            seen.append(str(info.value))
    assert len(set(seen)) == 1, seen  # the same message everywhere


@pytest.mark.parametrize("axis", [None, 0, 1, -1, -2])
def test_learned_functions_on_valid_input_agree_with_torch(backend, axis):
    x = torch.randn(6, 5) * 3
    n = 1 if axis is None else x.shape[axis]
    scale = torch.rand(n) * 0.05 + 0.01
    zp = torch.randint(-20, 20, (n,)).float()
    if axis is None:
        scale, zp = scale.reshape(()), zp.reshape(())
        want = torch.fake_quantize_per_tensor_affine(x, float(scale), int(zp), -128, 127)
    else:
        want = torch.fake_quantize_per_channel_affine(x, scale, zp.int(), axis % 2, -128, 127)
    assert torch.equal(lsq_fake_quant(x, scale, zp, -128, 127, axis, 0.5), want)
    log2_t = torch.randn(n).reshape(scale.shape)
    s = torch.exp2(torch.ceil(log2_t)) / 128
    if axis is None:
        want = torch.fake_quantize_per_tensor_affine(x, float(s), 0, -128, 127)
    else:
        want = torch.fake_quantize_per_channel_affine(x, s, torch.zeros(n, dtype=torch.int32),
                                                      axis % 2, -128, 127)
    assert torch.equal(tqt_fake_quant(x, log2_t, -128, 127, axis), want)


# --------------------------------------------------------------------------- 4: QAT hook
def test_apply_fake_quant_with_observer_checks_its_arguments():
    x = torch.randn(3, 4)
    with pytest.raises(TypeError, match="fake_quant must be None or a fake-quant module.*str"):
        apply_fake_quant_with_observer(x, "fq", MinMaxObserver())
    with pytest.raises(TypeError, match="observer must be None or an observer module.*int"):
        apply_fake_quant_with_observer(x, FakeQuantize(), 3)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        apply_fake_quant_with_observer([1.0], FakeQuantize(), MinMaxObserver())
    obs = MinMaxObserver()
    with pytest.raises(ValueError, match=r"addend of shape \(5,\) does not broadcast with x of "
                                         r"shape \(3, 4\)"):
        apply_fake_quant_with_observer(x, FakeQuantize(), obs, addend=torch.ones(5))
    with pytest.raises(TypeError, match="addend must be None or a torch.Tensor"):
        apply_fake_quant_with_observer(x, FakeQuantize(), obs, addend=[1.0] * 4)
    assert not obs.has_observed  # refused before recording anything
    # valid addends (same shape, broadcast) give the definition
    for a in (torch.randn(3, 4), torch.randn(4)):
        o1, o2 = MinMaxObserver(), MinMaxObserver()
        y = apply_fake_quant_with_observer(x, FakeQuantize(), o1, relu=True, addend=a)
        o2(torch.relu(x + a))
        assert torch.equal(y, gpuquant.functional.fake_quant(torch.relu(x + a), o2.get_qparams()))


# --------------------------------------------------------------------------- 4: smoothquant
def _net():
    return torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))


@pytest.mark.parametrize("bad,exc,msg", [
    (torch.full((8,), -1.0), ValueError, r"act_absmax\['0'\] must be finite and >= 0.*-1.0"),
    (torch.full((8,), math.nan), ValueError, r"act_absmax\['0'\] must be finite and >= 0.*nan"),
    (torch.full((8,), math.inf), ValueError, r"must be finite and >= 0.*inf"),
    ([1.0] * 8, TypeError, r"act_absmax\['0'\] must be a float tensor"),
    (torch.ones(8, dtype=torch.int64), TypeError, "must be a float tensor"),
    (torch.ones(5), ValueError, r"act_absmax\['0'\] must have shape \(8,\).*\(5,\)"),
    (torch.ones(0), ValueError, r"must have shape \(8,\).*\(0,\)"),
    (torch.ones(1, 8), ValueError, r"must have shape \(8,\)"),
], ids=["negative", "nan", "inf", "list", "int", "shape5", "empty", "2d"])
@pytest.mark.parametrize("fn", ["smooth_quant", "quantize_static_linear"])
def test_smoothquant_functions_check_the_calibration_data(fn, bad, exc, msg):
    net = _net()
    before = copy.deepcopy(net.state_dict())
    good = torch.rand(4) + 0.1  # the second Linear's entry, valid: checked first, not changed
    call = smooth_quant if fn == "smooth_quant" else quantize_static_linear
    with pytest.raises(exc, match=f"{fn}: .*" + msg):
        call(net, {"2": good, "0": bad})
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert type(net[0]) is torch.nn.Linear and type(net[2]) is torch.nn.Linear


@pytest.mark.parametrize("fn", ["smooth_quant", "quantize_static_linear"])
def test_smoothquant_functions_refuse_names_that_are_no_linear(fn):
    net = _net()
    before = copy.deepcopy(net.state_dict())
    call = smooth_quant if fn == "smooth_quant" else quantize_static_linear
    for key in ("zz", "1", "layer0"):  # nothing, the ReLU, a misspelling
        with pytest.raises(ValueError, match=fr"{fn}: act_absmax names \['{key}'\], which is "
                                             fr"not a Linear of the model; its Linears: "
                                             fr"\['0', '2'\]"):
            call(net, {"0": torch.rand(8) + 0.1, key: torch.rand(8) + 0.1})
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert type(net[0]) is torch.nn.Linear and type(net[2]) is torch.nn.Linear


def test_calibration_data_of_numpy_rows_is_refused_by_name():
    import numpy as np
    from gpuquant.quantization.smoothquant import calibrate_linear_inputs
    with pytest.raises(TypeError, match="batch 0 of data is a numpy.ndarray; each batch must "
                                        "be a tensor or a tuple"):
        calibrate_linear_inputs(_net(), np.ones((2, 8), np.float32))


def test_smoothquant_functions_refuse_a_non_dict_and_smoothing_factors_checks_too():
    with pytest.raises(TypeError, match="smooth_quant: act_absmax must be a dict"):
        smooth_quant(_net(), [torch.ones(8)])
    with pytest.raises(TypeError, match="quantize_static_linear: act_absmax must be a dict"):
        quantize_static_linear(_net(), torch.ones(8))
    w = torch.randn(4, 8)
    with pytest.raises(ValueError, match="smoothing_factors: act_absmax must be finite"):
        smoothing_factors(torch.full((8,), math.nan), [w])
    with pytest.raises(ValueError, match=r"smoothing_factors: act_absmax must have shape \(K,\)"):
        smoothing_factors(torch.tensor(1.0), [w])
    # valid data: unchanged formula (zero channels get 1)
    a = torch.rand(8) * 4
    a[3] = 0.0
    s = smoothing_factors(a, [w], 0.5)
    want = a.sqrt() / w.abs().amax(0).sqrt()
    want[3] = 1.0
    assert torch.equal(s, want.clamp(1e-5, 1e5))


@pytest.mark.parametrize("make,arg", [
    (lambda: MinMaxObserver(check_finite="no"), "check_finite"),
    (lambda: LSQ(grad_scaling="no"), "grad_scaling"),
    (lambda: LSQ(symmetric=1), "symmetric"),
])
def test_flags_must_be_bools(make, arg):
    """A flag given as "no" or 1 is refused (bool() would read "no" as True)."""
    with pytest.raises(TypeError, match=f"{arg} must be a bool"):
        make()


_DTYPE_USERS = [MinMaxObserver, ExponentialMovingAverageObserver, HistogramObserver,
                gpuquant.quantization.PassiveObserver, gpuquant.quantization.SyncMinMaxObserver,
                gpuquant.quantization.SyncExponentialMovingAverageObserver, FakeQuantize, LSQ,
                TQT]


@pytest.mark.parametrize("cls", _DTYPE_USERS, ids=lambda c: c.__name__)
def test_observers_and_fake_quants_refuse_qint32(cls):
    """qint32 is the bias's dtype (quantized at conversion, never observed): an observer or
    fake quant of it trained a model quantize() refused only afterwards. Refused at
    construction, naming the dtype and the allowed ones; the others are taken."""
    with pytest.raises(ValueError, match=rf"{cls.__name__}: dtype qint32 is not an activation "
                                         r"or weight dtype .*allowed: \['qint8', "
                                         r"'qint8_narrow', 'quint8', 'qint4', 'quint4'\]"):
        cls(dtype=gpuquant.qint32)
    with pytest.raises(ValueError, match="dtype qint32"):
        cls(dtype="qint32")
    for d in gpuquant.dtypes.OBSERVED_DTYPES:
        assert cls(dtype=d).dtype is d
    # the functional ops keep taking qint32 qparams (the bias grid, int32 outputs)
    qp = QParams(gpuquant.qint32, 0.5, 12345)
    x = torch.randn(9) * 100
    assert torch.equal(gpuquant.functional.fake_quant(x, qp), torch.round(x / 0.5) * 0.5)


def test_freeze_bn_stats_flag_must_be_a_bool():
    import gpuquant.nn as gnn
    from gpuquant.quantization import quantize_qat
    m = quantize_qat(gnn.ConvBn2d(3, 4, 3))
    with pytest.raises(TypeError, match="freeze must be a bool"):
        m.freeze_bn_stats("no")
    assert m.freeze_bn_stats().bn_frozen is True and m.freeze_bn_stats(False).bn_frozen is False


def test_tqt_fake_quant_names_a_negative_qmax(backend):
    qmax = -int(torch.randint(1, 9, ()))
    with pytest.raises(ValueError, match=f"qmax must be >= 0 .*got qmax={qmax}"):
        tqt_fake_quant(torch.randn(5), torch.tensor(1.0), qmax - 4, qmax, None)
