"""Nearest-neighbour ``Upsample``: the source index formula against torch's float
``interpolate``, the integer op on every backend, its arguments, and the module through
float -> QAT -> int8 (copies of codes: bit for bit)."""
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gpuquant.backends as backends
import gpuquant.nn as gnn
from gpuquant.backends.numpy.pool import nearest_source_index
from gpuquant.functional import upsample_nearest2d
from gpuquant.quantization import (disable_fake_quant, disable_observer, quantize,
                                   quantize_qat)

from tests.nn.nn_helpers import QCONFIGS

CL = torch.channels_last
BACKENDS = [b for b in ("reference", "numpy", "triton") if b in backends.available()]


def _cpu_shortcut(h, w, oh, ow, mode, kw):
    """Whether torch's CPU kernel may copy / halve instead of its formula here (``nearest``,
    an output of once or twice the input along a dimension, a factor not exactly 1 or 2):
    gpuquant's definition is the formula (nearest_source_index's docstring)."""
    sf = kw.get("scale_factor")
    if mode != "nearest" or sf is None or kw.get("recompute_scale_factor"):
        return False
    sh, sw = sf if isinstance(sf, tuple) else (sf, sf)
    return any(o in (n, 2 * n) and float(np.float32(1.0 / s)) not in (1.0, 0.5)
               for n, o, s in ((h, oh, sh), (w, ow, sw)))


def _case(rng, top=33):
    """Random sizes and arguments, awkward ratios included."""
    h, w = rng.randint(1, top), rng.randint(1, top)
    mode = rng.choice(["nearest", "nearest-exact"])
    if rng.random() < 0.5:
        sf = rng.choice([2, 2.0, 3, 0.5, 1.5, 0.3, 1 / 3, 2.5, 0.999, 1.001, 7.3,
                         (2, 0.75), (1.25, 3), 1.0001, 2.0168])
        kw = {"scale_factor": sf, "recompute_scale_factor": rng.choice([None, True])}
        sh, sw = sf if isinstance(sf, tuple) else (sf, sf)
        if int(np.floor(h * sh)) < 1 or int(np.floor(w * sw)) < 1:
            kw = {"size": (h, w)}
    else:
        kw = {"size": (rng.randint(1, 50), rng.randint(1, 50))}
    return h, w, mode, kw


def test_source_index_is_torchs():
    """2000 random resizes, inputs up to 150 wide: every output pixel reads the input pixel
    torch's float interpolate reads, except where torch's CPU kernel takes its copy / halve
    shortcut instead of its formula (counted: they occur)."""
    rng = random.Random(7)
    shortcuts = 0
    for _ in range(2000):
        h, w, mode, kw = _case(rng, top=150)
        x = torch.arange(h * w, dtype=torch.float32).reshape(1, 1, h, w)
        y = F.interpolate(x, mode=mode, **kw)[0, 0].numpy().astype(np.int64)
        oh, ow = y.shape
        if _cpu_shortcut(h, w, oh, ow, mode, kw):
            shortcuts += 1
            continue
        sf = kw.get("scale_factor")
        sh, sw = (None, None) if sf is None or kw.get("recompute_scale_factor") else \
            (sf if isinstance(sf, tuple) else (sf, sf))
        ih = nearest_source_index(h, oh, sh, mode == "nearest-exact")
        iw = nearest_source_index(w, ow, sw, mode == "nearest-exact")
        assert np.array_equal(y, ih[:, None] * w + iw[None, :]), (h, w, mode, kw)
    assert shortcuts > 20


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8])
def test_every_backend_gives_torchs_pixels(dtype):
    rng = random.Random(11 + (dtype == torch.uint8))
    g = torch.Generator().manual_seed(3)
    lo, hi = (-128, 128) if dtype == torch.int8 else (0, 256)
    for i in range(40):
        h, w, mode, kw = _case(rng)
        x = torch.randint(lo, hi, (2, rng.randint(1, 40), h, w), dtype=dtype, generator=g)
        if i % 3 == 0:
            x = x.contiguous(memory_format=CL)
        elif i % 3 == 1:
            x = torch.randint(lo, hi, (2, x.shape[1] * 2, h, w + 1), dtype=dtype,
                              generator=g)[:, ::2, :, 1:]  # strided
        want = F.interpolate(x.float(), mode=mode, **kw)
        if _cpu_shortcut(h, w, *want.shape[2:], mode, kw):
            continue
        for b in BACKENDS:
            with backends.use(b):
                y = upsample_nearest2d(x, mode=mode, **kw)
            assert y.dtype == dtype and y.is_contiguous(memory_format=CL), b
            assert torch.equal(y.float(), want), (b, x.shape, mode, kw)
    for b in BACKENDS:  # an empty batch
        with backends.use(b):
            y = upsample_nearest2d(torch.zeros(0, 3, 4, 5, dtype=dtype), scale_factor=2)
        assert y.shape == (0, 3, 8, 10), b


def test_refuses_bad_arguments():
    x = torch.zeros(1, 2, 4, 4, dtype=torch.int8)
    with pytest.raises(ValueError, match="exactly one of size and scale_factor"):
        upsample_nearest2d(x)
    with pytest.raises(ValueError, match="exactly one of size and scale_factor"):
        upsample_nearest2d(x, size=3, scale_factor=2)
    with pytest.raises(ValueError, match="mode must be one of"):
        upsample_nearest2d(x, scale_factor=2, mode="bilinear")
    with pytest.raises(ValueError, match="finite and > 0"):
        upsample_nearest2d(x, scale_factor=0.0)
    with pytest.raises(ValueError, match="finite and > 0"):
        upsample_nearest2d(x, scale_factor=float("inf"))
    with pytest.raises(TypeError, match="float or a pair of floats"):
        upsample_nearest2d(x, scale_factor="2")
    with pytest.raises(ValueError, match=r"output size \(0, 0\)"):
        upsample_nearest2d(x, scale_factor=0.2)
    with pytest.raises(ValueError, match="size must be >= 1"):
        upsample_nearest2d(x, size=(0, 3))
    with pytest.raises(TypeError, match="int8 or uint8"):
        upsample_nearest2d(x.float(), scale_factor=2)
    with pytest.raises(ValueError, match="4-D"):
        upsample_nearest2d(x[0], scale_factor=2)
    with pytest.raises(TypeError, match="recompute_scale_factor must be None or a bool"):
        upsample_nearest2d(x, scale_factor=2, recompute_scale_factor=1)
    for b in BACKENDS:  # no pixels to copy (a size= resize read index -1: Triton crashed)
        with backends.use(b), pytest.raises(ValueError, match=r"\(0, 3\) has no pixels"):
            upsample_nearest2d(torch.zeros(1, 2, 0, 3, dtype=torch.int8), size=(4, 4))
    with pytest.raises(ValueError, match="not meaningful with an explicit size"):
        upsample_nearest2d(x, size=4, recompute_scale_factor=True)
    with pytest.raises(ValueError, match="not meaningful with an explicit size"):
        gnn.Upsample(size=4, recompute_scale_factor=True)
    with pytest.raises(ValueError, match="mode must be one of"):
        gnn.quantized.Upsample(scale_factor=2, mode="bilinear")
    with pytest.raises(ValueError, match="exactly one of size and scale_factor"):
        gnn.quantized.Upsample()
    with pytest.raises(TypeError, match=r"missing \['stride', 'padding'"):
        gnn.quantized.MaxPool2d(kernel_size=2)
    with pytest.raises(ValueError, match="mode must be one of"):
        gnn.Upsample(scale_factor=2, mode="bilinear")
    with pytest.raises(ValueError, match="align_corners"):
        gnn.Upsample(scale_factor=2, align_corners=False)
    with pytest.raises(ValueError, match="exactly one of size and scale_factor"):
        gnn.Upsample()
    with pytest.raises(ValueError, match="finite and > 0"):
        gnn.Upsample(scale_factor=-2)


class _Fpn(gnn.Module):
    """A feature-pyramid step: a strided conv, upsampled back and concatenated with the
    input's features, then resized to a fixed size."""

    def __init__(self, mode):
        super().__init__()
        self.q = gnn.QuantStub()
        self.c0 = gnn.ConvBnRelu2d(3, 6, 3, padding=1)
        self.c1 = gnn.ConvBnRelu2d(6, 6, 3, stride=2, padding=1)
        self.up = gnn.Upsample(scale_factor=2, mode=mode)
        self.cat = gnn.Concat()
        self.up2 = gnn.Upsample(size=(7, 5), mode=mode)
        self.dq = gnn.DequantStub()

    def forward(self, x):
        a = self.c0(self.q(x))
        return self.dq(self.up2(self.cat([a, self.up(self.c1(a))], 1)))


@pytest.mark.parametrize("mode", ["nearest", "nearest-exact"])
@pytest.mark.parametrize("qc", ["int8", "uint8"])
def test_module_float_qat_int8(mode, qc):
    torch.manual_seed(0)
    model = _Fpn(mode)
    x = torch.randn(2, 3, 10, 12)
    float_out = model.eval()(x)
    off = quantize_qat(model, QCONFIGS[qc], inplace=False).eval()
    disable_fake_quant(off)
    disable_observer(off)
    with torch.no_grad():
        # fake quant off: the float model (to float32 rounding: the eval-mode conv runs
        # with the BatchNorm folded into its weights)
        assert torch.allclose(off(x), float_out, rtol=1e-5, atol=1e-6)
    qat = quantize_qat(model, QCONFIGS[qc], inplace=False).train()
    opt = torch.optim.SGD(qat.parameters(), lr=0.01)
    for _ in range(3):
        loss = qat(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    qat.eval()
    with torch.no_grad():
        y_qat = qat(x)
        # the QAT Upsample passes its producer's qparams: the int8 resize is a copy, so the
        # concat's input from it carries the conv's qparams
        assert qat.up.input_qparams("up")[0].scale == qat.c1.get_activation_qparams().scale
    int8 = quantize(qat, inplace=False)
    outs = {}
    for b in BACKENDS:
        with backends.use(b):
            outs[b] = int8(x)
    for b in BACKENDS:
        assert torch.equal(outs[b], outs[BACKENDS[0]]), b
    scale = float(qat.cat.get_activation_qparams().scale)
    d = ((outs[BACKENDS[0]] - y_qat) / scale).round().abs()
    assert float(d.max()) <= 1 and float((d == 0).float().mean()) >= 0.97
    assert y_qat.shape == float_out.shape == (2, 12, 7, 5)


@pytest.mark.parametrize("kw", [{"scale_factor": 2}, {"scale_factor": 1.0001},
                                {"scale_factor": (2.1, 0.7)}, {"size": (9, 4)},
                                {"scale_factor": 1.5, "mode": "nearest-exact"}])
def test_qat_upsample_picks_the_int8_pixels(kw):
    """The QAT module indexes with the int8 op's tables (the same pixels on every device):
    torch's interpolate where its CPU kernel runs its formula, values and gradients (to
    float32 rounding: the copies' gradients summed in another order); where torch's CPU
    kernel copies or halves instead (1.0001; 2.1 from 5 to 10 rows) gpuquant's formula,
    which reads pixel 0 twice at 1.0001."""
    from gpuquant.nn.qat import Upsample as QATUpsample
    torch.manual_seed(5)
    x = torch.randn(2, 3, 5, 6)
    m = QATUpsample.from_float_module(gnn.Upsample(**kw))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = m._pool(xa)
    yb = F.interpolate(xb, **kw)
    if _cpu_shortcut(5, 6, *yb.shape[2:], kw.get("mode", "nearest"), kw):
        sf = kw["scale_factor"]
        sh, sw = sf if isinstance(sf, tuple) else (sf, sf)
        ih = torch.from_numpy(nearest_source_index(5, yb.shape[2], sh, False))
        iw = torch.from_numpy(nearest_source_index(6, yb.shape[3], sw, False))
        if sf == 1.0001:
            assert iw.tolist() == [0, 0, 1, 2, 3, 4]
        yb = xb[:, :, ih[:, None], iw[None, :]]
    assert torch.equal(ya, yb)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    assert torch.allclose(xa.grad, xb.grad, rtol=1e-6, atol=1e-6)
    xc = x.contiguous(memory_format=CL)
    assert m._pool(xc).is_contiguous(memory_format=CL)


def test_index_tables_survive_inference_mode_and_the_cache():
    """A first call inside torch.inference_mode made the cached index tables inference
    tensors, and the QAT module's indexing could not save them for backward; the int8 module
    holds its own tables, which 300 other sizes through the functional op (a 256-entry
    cache) do not free."""
    torch.manual_seed(0)
    model = _Fpn("nearest")
    qat = quantize_qat(model, inplace=False)
    x = torch.randn(2, 3, 14, 10)  # sizes no other test uses: the cache starts cold
    with torch.inference_mode():
        qat.eval()(x)
    qat.train()
    qat(x).square().mean().backward()
    assert qat.c0.conv.weight.grad is not None
    int8 = quantize(qat.eval(), inplace=False)
    y = int8(x)
    held = [v for k, v in int8.up._cache.items() if k[0][0] == "indices"]
    assert len(held) == 1
    for n in range(300):
        upsample_nearest2d(torch.zeros(1, 1, 1, n + 1, dtype=torch.int8), scale_factor=2)
    assert [v for k, v in int8.up._cache.items() if k[0][0] == "indices"][0][2] is held[0][2]
    assert torch.equal(int8(x), y)
