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
    results = {}
    for name in CPU_BACKENDS:
        with backends.use(name):
            results[name] = [
                GF.conv2d(x, zp, w, b, 2, 1, 1, 2, rq10),
                GF.conv2d(x, zp, w_dw, None, 1, 2, 2, 6, rq6),
                GF.linear(xl, zp, wl, None, rq17),
                GF.add(a2, b2, addp),
                GF.mul(a2, zp, b2[:, :, :1, :1], zp, rq),
                GF.concat([a2, b2], [zp, zp], [None, rq], 1, gpuquant.qint8 if xdtype == torch.int8
                          else gpuquant.quint8),
                GF.max_pool2d(x, 3, 2, 1),
                GF.avg_pool2d(x, zp, 3, 2, 1, True, False),
                GF.adaptive_avg_pool2d(x, zp, (2, 3)),
            ]
    ref = results["reference"]
    for name, outs in results.items():
        for i, (o, r) in enumerate(zip(outs, ref)):
            assert o.dtype == r.dtype and torch.equal(o, r), (name, i)


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
