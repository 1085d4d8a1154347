import math

import pytest
import torch

import gpuquant
from gpuquant import QParams


@pytest.mark.parametrize("dtype", [gpuquant.qint8, gpuquant.qint8_narrow, gpuquant.quint8,
                                   gpuquant.qint4, gpuquant.quint4, gpuquant.qint32])
def test_dtype_ranges_and_storage(dtype):
    assert dtype.qmin < dtype.qmax
    info = torch.iinfo(dtype.storage)
    assert info.min <= dtype.qmin and dtype.qmax <= info.max


def test_dtype_values():
    assert (gpuquant.qint8.qmin, gpuquant.qint8.qmax) == (-128, 127)
    assert (gpuquant.qint8_narrow.qmin, gpuquant.qint8_narrow.qmax) == (-127, 127)
    assert (gpuquant.quint8.qmin, gpuquant.quint8.qmax) == (0, 255)
    assert (gpuquant.qint4.qmin, gpuquant.qint4.qmax) == (-8, 7)
    assert (gpuquant.quint4.qmin, gpuquant.quint4.qmax) == (0, 15)


@pytest.mark.parametrize("scale", [0.0, -1.0, math.nan, math.inf, -math.inf])
def test_bad_scale(scale):
    with pytest.raises(ValueError, match="scale"):
        QParams(gpuquant.qint8, scale, 0)


def test_scale_needs_a_finite_float32_reciprocal():
    """Below ~2.94e-39 the float32 inv_scale is inf (and fake_quant made 0.0 NaN)."""
    from gpuquant.qparams import _MIN_SCALE
    assert math.isfinite(float(1.0 / torch.tensor(_MIN_SCALE)))
    assert not math.isfinite(float(1.0 / torch.tensor(2.0 ** -128)))
    QParams(gpuquant.qint8, _MIN_SCALE, 0)
    for s in (2.0 ** -128, 2e-39, 1e-45):
        with pytest.raises(ValueError, match="finite float32 reciprocal"):
            QParams(gpuquant.qint8, s, 0)


def test_bad_per_channel_scale_names_value():
    s = torch.tensor([0.1, 0.0, 0.2])
    with pytest.raises(ValueError, match=r"0\.0"):
        QParams(gpuquant.qint8, s, torch.zeros(3, dtype=torch.int32), axis=0)


@pytest.mark.parametrize("dtype,zp", [(gpuquant.qint8, 128), (gpuquant.qint8, -129),
                                      (gpuquant.quint8, -1), (gpuquant.quint4, 16),
                                      (gpuquant.qint8_narrow, -128)])
def test_zero_point_out_of_range(dtype, zp):
    with pytest.raises(ValueError, match="zero_point"):
        QParams(dtype, 0.1, zp)


def test_shape_mismatch_and_axis():
    with pytest.raises(ValueError, match="shape"):
        QParams(gpuquant.qint8, torch.ones(3), torch.zeros(4, dtype=torch.int32), axis=0)
    with pytest.raises(ValueError, match="single scale"):
        QParams(gpuquant.qint8, torch.ones(3), 0)
    qp = QParams(gpuquant.qint8, torch.ones(3), 0, axis=5)
    with pytest.raises(ValueError, match="axis 5 out of range"):
        qp.check_tensor(torch.zeros(2, 3))
    qp = QParams(gpuquant.qint8, torch.ones(3), 0, axis=1)
    with pytest.raises(ValueError, match="channels"):
        qp.check_tensor(torch.zeros(2, 4))


def test_wrong_types():
    with pytest.raises(TypeError):
        QParams(gpuquant.qint8, "0.1", 0)
    with pytest.raises(ValueError, match="unknown quantized dtype"):
        QParams("int7", 0.1, 0)
    with pytest.raises(TypeError):
        QParams(torch.int8, 0.1, 0)
    with pytest.raises(TypeError):
        QParams(gpuquant.qint8, 0.1, 0, axis=1.0)


def test_roundtrip_state():
    qp = QParams(gpuquant.quint8, torch.rand(5) + 0.1, torch.randint(0, 255, (5,), dtype=torch.int32), axis=-1)
    assert QParams.from_state(qp.state()) == qp


@pytest.mark.parametrize("zp", [torch.tensor(2 ** 32 + 5), torch.tensor([2 ** 32 + 1, 3]),
                                torch.tensor(-2 ** 32 + 2), 2 ** 40, -2 ** 40, 2.0 ** 40,
                                2 ** 70])
def test_zero_point_checked_before_the_int32_conversion(zp):
    """A wide integer would wrap into range when cast to int32 (2^32 + 5 -> 5): refused with
    the dtype's range, for tensors and Python numbers alike."""
    per_channel = isinstance(zp, torch.Tensor) and zp.dim() == 1
    scale = torch.ones(2) if per_channel else 0.1
    with pytest.raises(ValueError, match=r"zero_point \[.*\] outside the range of qint8: "
                                         r"\[-128, 127\]"):
        QParams(gpuquant.qint8, scale, zp, axis=0 if per_channel else None)


def test_zero_point_of_any_integer_dtype_in_range_is_accepted():
    assert int(QParams(gpuquant.qint8, 0.1, torch.tensor(7, dtype=torch.uint8)).zero_point) == 7
    assert int(QParams(gpuquant.qint8, 0.1, torch.tensor(-128)).zero_point) == -128
    qp = QParams(gpuquant.qint32, 0.1, torch.tensor(2 ** 31 - 1))
    assert qp.zero_point.dtype == torch.int32 and int(qp.zero_point) == 2 ** 31 - 1


def test_numpy_scalars_are_numbers_like_python_ones():
    """The contract's scalar scale (float32) and zero point: a NumPy float32 / int scalar
    (what a scale computed with NumPy is, and what gpuquant.runtime works in) is as good as
    a Python number. np.float64 (a float subclass) was accepted but np.float32, np.int32 and
    np.int64 raised TypeError "must be a number or a tensor"."""
    np = pytest.importorskip("numpy")
    want = QParams(gpuquant.quint8, float(np.float32(0.05)), 3)
    for s in (np.float32(0.05), np.float64(np.float32(0.05))):
        for z in (np.int32(3), np.int64(3), np.uint8(3), 3):
            assert QParams(gpuquant.quint8, s, z) == want
    assert QParams(gpuquant.qint8, np.float16(0.5), np.int8(-2)) == QParams(gpuquant.qint8, 0.5, -2)
    with pytest.raises(ValueError, match=r"zero_point \[300\] outside the range of qint8"):
        QParams(gpuquant.qint8, np.float32(0.1), np.int64(300))
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
        QParams(gpuquant.qint8, np.float32(0.0), 0)
    with pytest.raises(ValueError, match="zero_point must be an integer"):
        QParams(gpuquant.qint8, 0.1, np.float32(1.5))
    with pytest.raises(TypeError):
        QParams(gpuquant.qint8, np.bool_(True), 0)
    with pytest.raises(TypeError):
        QParams(gpuquant.qint8, 0.1, np.bool_(False))


def test_qparams_own_copies_of_the_tensors_they_were_given():
    s = torch.rand(3) + 0.05
    z = torch.randint(-5, 5, (3,), dtype=torch.int32)
    qp = QParams(gpuquant.qint8, s, z, axis=0)
    want_s, want_z = s.clone(), z.clone()
    s.zero_()  # changed after validation: must not reach the qparams
    z.fill_(1000)
    assert torch.equal(qp.scale, want_s) and torch.equal(qp.zero_point, want_z)


@pytest.mark.parametrize("dtype", [gpuquant.qint8, gpuquant.quint8, gpuquant.qint4,
                                   gpuquant.qint32])
def test_scale_whose_range_overflows_float32_is_refused(dtype):
    from gpuquant.qparams import _max_scale
    top = _max_scale(dtype)
    span = torch.tensor(float(dtype.qmax - dtype.qmin))
    assert torch.isfinite(torch.tensor(top) * span)  # the bound itself is accepted
    QParams(dtype, top, 0 if dtype.qmin < 0 else dtype.qmin)
    over = float(torch.nextafter(torch.tensor(top), torch.tensor(math.inf)))
    big = float(torch.empty(()).uniform_(over, 3e38))
    for v in (over, big):
        with pytest.raises(ValueError, match=f"{dtype.name}'s range times it finite"):
            QParams(dtype, v, 0 if dtype.qmin < 0 else dtype.qmin)


def test_from_state_and_to_name_what_is_wrong():
    with pytest.raises(ValueError, match=r"lacks \['zero_point', 'axis'\]"):
        QParams.from_state({"dtype": "qint8", "scale": 0.1})
    with pytest.raises(TypeError, match="needs a dict"):
        QParams.from_state([("dtype", "qint8")])
    qp = QParams(gpuquant.qint8, 0.1)
    with pytest.raises(ValueError, match="QParams.to: not a device: 'foo'"):
        qp.to("foo")
    with pytest.raises(TypeError, match="device must be a torch.device or a device string"):
        qp.to(3.5)
    assert qp.to("cpu") == qp and qp.to(torch.device("cpu")) == qp


def test_per_channel_qparams_on_a_0d_tensor_say_it_has_no_channel_axis():
    qp = QParams(gpuquant.qint8, torch.rand(1) + 0.1, 0, axis=0)
    with pytest.raises(ValueError, match="need a tensor with a channel axis, got a 0-d tensor"):
        qp.check_tensor(torch.tensor(1.0))
