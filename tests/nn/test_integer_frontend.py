"""gpuquant.functional integer front-end: validation (clear errors) and dispatch (every
available CPU backend gives the same bytes through the front-end)."""
import pytest
import torch

import gpuquant
import gpuquant.functional as GF
from gpuquant import backends

CPU_BACKENDS = [b for b in backends.available()
                if "cpu" in backends.get_backend(b).DEVICES and b != "triton"]


def _rq(c=None, out_dtype=gpuquant.qint8, act="none"):
    w_scale = torch.rand(c) * 0.01 + 0.002 if c else 0.01
    return GF.make_requant(0.05, w_scale, 0.3, 3 if out_dtype.signed else 120, out_dtype, act)


def _x(shape, dtype=torch.int8):
    lo, hi = (-128, 128) if dtype == torch.int8 else (0, 256)
    t = torch.randint(lo, hi, shape, dtype=dtype)
    return t.contiguous(memory_format=torch.channels_last) if len(shape) == 4 else t


def _w(shape):
    return torch.randint(-127, 128, shape, dtype=torch.int8)


@pytest.mark.parametrize("xdtype", [torch.int8, torch.uint8])
def test_ops_agree_across_backends(xdtype):
    zp = -5 if xdtype == torch.int8 else 131
    x = _x((2, 6, 11, 7), xdtype)
    w = _w((10, 3, 3, 3))
    b = torch.randint(-5000, 5000, (10,), dtype=torch.int32)
    xl = _x((3, 5, 33), xdtype)
    wl = _w((17, 33))
    a2, b2 = _x((2, 4, 7, 9), xdtype), _x((2, 4, 7, 9), xdtype)
    addp = GF.make_add_params(0.05, zp, 0.08, zp, 0.1, 2, gpuquant.qint8, "relu")
    w_dw = _w((6, 1, 3, 3))
    rq10, rq6, rq17, rq = _rq(10), _rq(6, gpuquant.quint8, "relu6"), _rq(17), _rq()
    rq_u8 = _rq(out_dtype=gpuquant.quint8)
    results = {}
    for name in CPU_BACKENDS:
        with backends.use(name):
            results[name] = [
                GF.conv2d(x, zp, w, b, 2, 1, 1, 2, rq10),
                GF.conv2d(x, zp, w_dw, None, 1, 2, 2, 6, rq6),
                GF.linear(xl, zp, wl, None, rq17),
                GF.add(a2, b2, addp),
                GF.mul(a2, zp, b2[:, :, :1, :1], zp, rq),
                GF.concat([a2, b2], [zp, zp], [None, rq if xdtype == torch.int8 else rq_u8], 1,
                          gpuquant.qint8 if xdtype == torch.int8 else gpuquant.quint8),
                GF.max_pool2d(x, 3, 2, 1),
                GF.avg_pool2d(x, zp, 3, 2, 1, True, False),
                GF.adaptive_avg_pool2d(x, zp, (2, 3)),
            ]
    ref = results["reference"]
    for name, outs in results.items():
        for i, (o, r) in enumerate(zip(outs, ref)):
            assert o.dtype == r.dtype and torch.equal(o, r), (name, i)


@pytest.mark.parametrize("shape", [(), (1,), (3, 1)])
def test_elementwise_ops_keep_low_rank_shapes(shape):
    """add / mul of 0-d and small tensors: every backend (the Triton interpreter too) gives
    the same bytes in the input's shape (NumPy scalars and 1-d copies are not)."""
    a, b = _x(shape), _x(shape)
    addp = GF.make_add_params(0.1, 3, 0.3, 7, 0.2, 1, gpuquant.qint8)
    rq = _rq()
    results = {}
    for name in CPU_BACKENDS + ["triton"]:
        with backends.use(name):
            results[name] = [GF.add(a, b, addp), GF.mul(a, 3, b, 7, rq)]
    for name, outs in results.items():
        for o, r in zip(outs, results["reference"]):
            assert o.shape == shape and o.dtype == r.dtype and torch.equal(o, r), name


def test_int32_outputs_agree_across_backends():
    """Requantization to qint32 (a range float32 cannot bound: the NumPy backend takes its
    exact int64 path; it used to loop forever sizing its float32 threshold)."""
    x, w = _x((3, 40)), _w((6, 40))
    b = torch.randint(-2 ** 20, 2 ** 20, (6,), dtype=torch.int32)
    xc, wc = _x((2, 5, 6, 7)), _w((4, 5, 3, 3))
    rqs = [GF.make_requant(0.05, torch.rand(6) * 0.01 + 1e-3, 1e-5, -77, gpuquant.qint32),
           GF.make_requant(0.05, 0.01, 1e-4, 12345, gpuquant.qint32)]
    rq4 = GF.make_requant(0.05, torch.rand(4) * 0.01 + 1e-3, 1e-5, 0, gpuquant.qint32)
    results = {}
    for name in CPU_BACKENDS + ["triton"]:
        with backends.use(name):
            results[name] = [GF.linear(x, 3, w, b, rqs[0]), GF.linear(x, 3, w, None, rqs[1]),
                             GF.conv2d(xc, -2, wc, None, 1, 1, 1, 1, rq4),
                             GF.mul(xc, 3, xc, -4, rqs[1])]
    for name, outs in results.items():
        for i, (o, r) in enumerate(zip(outs, results["reference"])):
            assert o.dtype == torch.int32 and torch.equal(o, r), (name, i)
    assert results["reference"][0].abs().max() > 2 ** 16  # beyond any 8/16-bit range


def test_conv2d_validation():
    x, w, rq = _x((1, 4, 5, 5)), _w((6, 4, 3, 3)), _rq(6)
    with pytest.raises(TypeError, match="int8 or uint8"):
        GF.conv2d(x.float(), 0, w, None, rq=rq)
    with pytest.raises(TypeError, match="weight"):
        GF.conv2d(x, 0, w.float(), None, rq=rq)
    with pytest.raises(ValueError, match="channels"):
        GF.conv2d(x, 0, _w((6, 3, 3, 3)), None, rq=rq)
    with pytest.raises(TypeError, match="bias"):
        GF.conv2d(x, 0, w, torch.zeros(6), rq=rq)
    with pytest.raises(ValueError, match="multipliers"):
        GF.conv2d(x, 0, w, None, rq=_rq(5))
    with pytest.raises(ValueError, match="zero point"):
        GF.conv2d(x, 300, w, None, rq=rq)
    with pytest.raises(ValueError, match="stride"):
        GF.conv2d(x, 0, w, None, stride=0, rq=rq)
    with pytest.raises(ValueError, match="smaller"):
        GF.conv2d(x, 0, _w((6, 4, 7, 7)), None, rq=rq)
    with pytest.raises(ValueError, match="devices"):
        GF.conv2d(x, 0, w.to("meta"), None, rq=rq)
    with pytest.raises(ValueError, match="overflow"):
        GF.conv2d(_x((1, 40000, 3, 3), torch.uint8), 0, _w((1, 40000, 3, 3)), None, rq=_rq(1))


def test_other_ops_validation():
    a = _x((2, 3, 4, 4))
    with pytest.raises(ValueError, match="broadcast"):
        GF.add(a, _x((2, 3, 5, 4)), GF.make_add_params(0.1, 0, 0.1, 0, 0.1, 0, gpuquant.qint8))
    with pytest.raises(TypeError, match="AddParams"):
        GF.add(a, a, _rq())
    with pytest.raises(ValueError, match="per-tensor"):
        GF.mul(a, 0, a, 0, _rq(3))
    with pytest.raises(ValueError, match="features"):
        GF.linear(_x((3, 8)), 0, _w((4, 9)), None, _rq(4))
    with pytest.raises(ValueError, match="incompatible"):
        GF.concat([a, _x((2, 3, 5, 4))], [0, 0], [None, None], 1, gpuquant.qint8)
    with pytest.raises(TypeError, match="copied as is"):
        GF.concat([a, _x((2, 3, 4, 4), torch.uint8)], [0, 0], [None, None], 1, gpuquant.qint8)
    with pytest.raises(ValueError, match="4-D"):
        GF.max_pool2d(_x((3, 4)), 2)
    with pytest.raises(ValueError, match="padding"):
        GF.avg_pool2d(a, 0, 2, 2, 2)


def test_weight_and_bias_of_the_wrong_shape_are_value_errors():
    """conv2d / linear document ``TypeError`` for wrong dtypes and ``ValueError`` for shape
    mismatches (as for ``x``: "x must be 4-D" is a ValueError); a weight of the right dtype
    but the wrong rank, or an int32 bias of the wrong length, raised TypeError."""
    x, w, rq = _x((1, 4, 5, 5)), _w((6, 4, 3, 3)), _rq(6)
    with pytest.raises(ValueError, match=r"bias must be None or int32 of shape \(6,\), got "
                                         r"torch.int32 \(5,\)"):
        GF.conv2d(x, 0, w, torch.zeros(5, dtype=torch.int32), rq=rq)
    with pytest.raises(ValueError, match="bias must be None or int32 of shape"):
        GF.conv2d(x, 0, w, torch.zeros(1, 6, dtype=torch.int32), rq=rq)
    with pytest.raises(ValueError, match="weight must be a 4-D int8 tensor, got torch.int8 "
                                         "of shape"):
        GF.conv2d(x, 0, w[:, :, 0], None, rq=rq)
    with pytest.raises(ValueError, match="weight must be a 2-D int8"):
        GF.linear(_x((3, 8)), 0, _w((4, 8, 1)), None, _rq(4))
    with pytest.raises(ValueError, match="bias must be None or int32 of shape"):
        GF.linear(_x((3, 8)), 0, _w((4, 8)), torch.zeros(3, dtype=torch.int32), _rq(4))
    # wrong dtypes stay TypeErrors
    with pytest.raises(TypeError, match="bias"):
        GF.linear(_x((3, 8)), 0, _w((4, 8)), torch.zeros(4, dtype=torch.int64), _rq(4))
    with pytest.raises(TypeError, match="weight"):
        GF.linear(_x((3, 8)), 0, _w((4, 8)).to(torch.int16), None, _rq(4))


def test_requant_built_by_hand_is_checked():
    i32 = lambda v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    R = GF.Requant
    R(i32(2 ** 30), i32(5), 0, -128, 127, gpuquant.qint8)  # valid
    R(i32([2 ** 30, 0]), i32([-30, 31]), 0, -128, 127, gpuquant.qint8)  # the range's ends
    for args, err, msg in [
        ((i32(2 ** 30), i32(40), 0, -128, 127), ValueError, "shifts in"),
        ((i32(2 ** 30), i32(-31), 0, -128, 127), ValueError, "shifts in"),
        ((i32(-5), i32(3), 0, -128, 127), ValueError, r"multipliers must be in \[0, 2\^31\)"),
        ((torch.tensor(2 ** 33), i32(3), 0, -128, 127), TypeError, "multiplier must be an int32"),
        ((2 ** 30, i32(3), 0, -128, 127), TypeError, "multiplier must be an int32 tensor"),
        ((i32([[2 ** 30]] * 6), i32([[3]] * 6), 0, -128, 127), ValueError, r"shape \(\) or \(C,\)"),
        ((i32([2 ** 30] * 6), i32([3] * 5), 0, -128, 127), ValueError, "shapes differ"),
        ((i32(2 ** 30), i32(3), 1.5, -128, 127), TypeError, "zero_point must be an int"),
        ((i32(2 ** 30), i32(3), True, -128, 127), TypeError, "zero_point must be an int"),
        ((i32(2 ** 30), i32(3), 0, -128.0, 127), TypeError, "qmin must be an int"),
    ]:
        with pytest.raises(err, match=msg):
            R(*args, gpuquant.qint8)
    with pytest.raises(TypeError, match="dtype must be a gpuquant QuantDtype"):
        R(i32(2 ** 30), i32(3), 0, -128, 127, torch.int8)


def test_concat_requants_must_target_the_output_dtype():
    a, b = _x((1, 2, 3, 3)), _x((1, 2, 3, 3))
    rq8, rqu8 = _rq(), _rq(out_dtype=gpuquant.quint8)
    with pytest.raises(ValueError, match=r"rqs\[1\] must be a per-tensor requantization to the "
                                         r"output dtype qint8, got quint8"):
        GF.concat([a, b], [0, 0], [rq8, rqu8], 1, gpuquant.qint8)
    with pytest.raises(ValueError, match="per-tensor"):
        GF.concat([a, b], [0, 0], [_rq(2), None], 1, gpuquant.qint8)
    with pytest.raises(ValueError, match="out_dtype must be an 8-bit dtype, got qint32"):
        GF.concat([a, b], [0, 0],
                  [GF.make_requant(0.1, 1.0, 0.1, 0, gpuquant.qint32)] * 2, 1, gpuquant.qint32)


def test_adaptive_avg_pool_refuses_empty_planes_and_bad_sizes():
    for name in CPU_BACKENDS + ["triton"]:
        with backends.use(name):
            with pytest.raises(ValueError, match="spatial size must be non-empty"):
                GF.adaptive_avg_pool2d(_x((1, 2, 0, 5)), 0, 2)
            with pytest.raises(ValueError, match="output_size must be an int or a pair"):
                GF.adaptive_avg_pool2d(_x((1, 2, 4, 5)), 0, (2,))


def test_conv2d_refuses_empty_planes_on_every_backend():
    # an empty H or W with padding: the NumPy backend made a (1, 6, 2, 7) output of bias
    # only, the reference raised torch's RuntimeError; an empty batch stays allowed
    w, b, rq = _w((6, 4, 1, 1)), torch.full((6,), 5000, dtype=torch.int32), _rq(6)
    for name in CPU_BACKENDS + ["triton"]:
        with backends.use(name):
            for shape in [(1, 4, 0, 5), (1, 4, 5, 0)]:
                with pytest.raises(ValueError, match="padded input .* is smaller than the"):
                    GF.conv2d(_x(shape), 0, w, b, 1, 1, 1, 1, rq)
            assert GF.conv2d(_x((0, 4, 3, 3)), 0, w, b, 1, 1, 1, 1, rq).shape == (0, 6, 5, 5)


def test_parameter_builders_refuse_what_they_would_truncate():
    with pytest.raises(ValueError, match="a_scale must be a finite float > 0"):
        GF.make_add_params(0.0, 0, 0.0, 0, 0.3, 0, gpuquant.qint8)
    with pytest.raises(ValueError, match="out_zero_point must be an integer, got 1.7"):
        GF.make_requant(0.1, 0.1, 0.1, 1.7, gpuquant.qint8)
    with pytest.raises(ValueError, match="b_zp must be an integer, got -0.9"):
        GF.make_add_params(0.1, 1, 0.2, -0.9, 0.3, 2, gpuquant.qint8)
    with pytest.raises(TypeError, match="out_zp must be an int"):
        GF.make_add_params(0.1, 1, 0.2, 0, 0.3, True, gpuquant.qint8)
    p = GF.make_add_params(0.1, 3.0, 0.2, torch.tensor(-4), 0.3, 2, gpuquant.qint8)
    assert (p.a_zero_point, p.b_zero_point, p.out.zero_point) == (3, -4, 2)
    with pytest.raises(TypeError):
        gpuquant.QParams(gpuquant.qint8, 0.1, torch.tensor(True))
    with pytest.raises(TypeError, match="zero point must be an int or a one-element integer"):
        GF.linear(_x((1, 4)), torch.tensor(True), _w((2, 4)), None, _rq())


def test_layers_refuse_weights_without_channels():
    for name in CPU_BACKENDS + ["triton"]:
        with backends.use(name):
            with pytest.raises(ValueError, match="at least one output and one input channel"):
                GF.conv2d(_x((1, 3, 4, 4)), 0, _w((0, 3, 1, 1)), None, 1, 0, 1, 1, _rq())
            with pytest.raises(ValueError, match="at least one output and one input channel"):
                GF.linear(_x((2, 0)), 0, _w((3, 0)), None, _rq())
