"""QConfig: factories only (instances rejected, naming the field); every preset builds its
modules and runs a weight and an activation through apply_fake_quant_with_observer; the
package exports the contract's names."""
from functools import partial

import pytest
import torch

import gpuquant
import gpuquant.quantization as gq
from gpuquant import QParams
from gpuquant.quantization import (QConfig, FakeQuantize, MinMaxObserver, PassiveObserver,
                                   apply_fake_quant_with_observer)

PRESETS = ["min_max_fakequant_qconfig", "ema_fakequant_qconfig", "sync_ema_fakequant_qconfig",
           "ema_lowbit_fakequant_qconfig", "calibration_qconfig", "tqt_qconfig", "lsq_qconfig",
           "passive_qconfig"]
CONTRACT_NAMES = PRESETS + ["QConfig", "Observer", "MinMaxObserver",
                            "ExponentialMovingAverageObserver", "HistogramObserver",
                            "PassiveObserver", "SyncMinMaxObserver",
                            "SyncExponentialMovingAverageObserver", "FakeQuantize", "LSQ", "TQT"]


def test_package_exports_contract_names():
    for name in CONTRACT_NAMES:
        assert hasattr(gq, name), name
        assert name in gq.__all__, name


@pytest.mark.parametrize("field", ["weight_observer", "act_observer", "weight_fake_quant",
                                   "act_fake_quant"])
def test_qconfig_rejects_instances_naming_the_field(field):
    instance = MinMaxObserver() if "observer" in field else FakeQuantize()
    with pytest.raises(TypeError, match=f"QConfig.{field} must be a factory"):
        QConfig(**{field: instance})
    with pytest.raises(TypeError, match=f"QConfig.{field}"):
        QConfig(**{field: 3})


@pytest.mark.parametrize("value, match", [("ema", "act_observer must be a factory .* str"),
                                          (MinMaxObserver(), "act_observer must be a factory")])
def test_qconfig_replace_is_checked_too(value, match):
    """``preset._replace(field=...)`` (namedtuple's way to tweak a preset) skipped the checks:
    a string failed later with "'str' object is not callable", naming no field."""
    with pytest.raises(TypeError, match=match):
        gq.ema_fakequant_qconfig._replace(act_observer=value)
    qc = gq.ema_fakequant_qconfig._replace(act_observer=MinMaxObserver)
    assert isinstance(qc, QConfig) and qc.act_observer is MinMaxObserver
    assert qc.weight_observer is gq.ema_fakequant_qconfig.weight_observer


def test_qconfig_accepts_classes_partials_and_none():
    qc = QConfig(weight_observer=partial(MinMaxObserver, axis=0), act_observer=MinMaxObserver,
                 weight_fake_quant=None, act_fake_quant=FakeQuantize)
    assert qc.weight_fake_quant is None and qc.act_observer is MinMaxObserver
    assert qc._fields == ("weight_observer", "act_observer", "weight_fake_quant", "act_fake_quant")
    a, b = qc.weight_observer(), qc.weight_observer()
    assert a is not b  # every module gets its own


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_builds_and_runs(name):
    qc = getattr(gq, name)
    assert isinstance(qc, QConfig)
    w = torch.randn(8, 4, 3, 3, requires_grad=True)
    a = torch.randn(2, 4, 5, 5).relu()
    w_obs, a_obs = qc.weight_observer(), qc.act_observer()
    w_fq = qc.weight_fake_quant() if qc.weight_fake_quant else None
    a_fq = qc.act_fake_quant() if qc.act_fake_quant else None
    # weight observers are per-channel along the output-channel axis 0
    assert w_obs.axis == 0
    if isinstance(w_obs, PassiveObserver):
        w_obs.set_qparams(QParams(w_obs.dtype, torch.full((8,), 0.02), 0, axis=0))
        a_obs.set_qparams(QParams(a_obs.dtype, 0.05, 0))
    for _ in range(2):
        wq = apply_fake_quant_with_observer(w, w_fq, w_obs)
        aq = apply_fake_quant_with_observer(a, a_fq, a_obs)
    assert wq.shape == w.shape and aq.shape == a.shape
    (wq.sum() + aq.sum()).backward()
    assert w.grad is not None
    for obs, fq in ((w_obs, w_fq), (a_obs, a_fq)):
        qp = (fq.get_qparams() if fq is not None else None) or obs.get_qparams()
        # valid by the public checks (positive finite scale, zero point in range)
        QParams(qp.dtype, qp.scale, qp.zero_point, qp.axis)
        if fq is not None:
            assert fq.dtype == obs.dtype
    if qc.weight_fake_quant is None:  # calibration: the float values pass through
        assert wq is w and aq is a
    else:
        assert not torch.equal(wq, w)


def test_weight_observer_axis_can_be_overridden():
    for name in PRESETS:
        obs = getattr(gq, name).weight_observer(axis=1)  # e.g. ConvTranspose (in, out, kh, kw)
        assert obs.axis == 1


def test_lowbit_preset_is_four_bit():
    qc = gq.ema_lowbit_fakequant_qconfig
    assert qc.weight_observer().dtype is gpuquant.qint4
    assert qc.act_observer().dtype is gpuquant.quint4


@pytest.mark.parametrize("name", PRESETS)
def test_without_host_reads_turns_the_observers_finite_check_off(name):
    """Every preset's observers built from ``without_host_reads()`` skip the non-finite
    check (the one host read a step makes) and keep every other argument; a NaN batch is
    then dropped, not raised; fake quants and None fields stay as they were."""
    qc = getattr(gq, name)
    off = qc.without_host_reads()
    assert isinstance(off, QConfig)
    assert (off.weight_fake_quant, off.act_fake_quant) == (qc.weight_fake_quant,
                                                           qc.act_fake_quant)
    for field in ("weight_observer", "act_observer"):
        before, after = getattr(qc, field), getattr(off, field)
        if before is None:
            assert after is None
            continue
        a, b = before(), after()
        assert a.check_finite and not b.check_finite
        assert (type(a), a.dtype, a.symmetric, a.axis) == (type(b), b.dtype, b.symmetric,
                                                            b.axis)
    if isinstance(off.act_observer(), PassiveObserver):
        return  # reads no data
    nan = torch.tensor([1.0, float("nan")])
    off.act_observer()(nan)  # dropped
    with pytest.raises(ValueError):
        qc.act_observer()(nan)


def test_without_host_reads_refuses_an_observer_without_the_argument():
    class Plain(torch.nn.Module):
        def __init__(self, dtype=None):
            super().__init__()

    with pytest.raises(TypeError, match="act_observer .* takes no check_finite"):
        QConfig(act_observer=Plain).without_host_reads()
