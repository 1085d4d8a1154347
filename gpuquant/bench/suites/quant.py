"""Suite ``quant``: quantize, dequantize and fake_quant (forward, forward + backward).

Providers: ``torch`` (the baseline: ``torch.fake_quantize_per_tensor_affine`` /
``..._per_channel_affine`` for fake_quant; for quantize and dequantize, which PyTorch offers
only through its deprecated quantized tensors, the eager expression a user writes:
``clamp(round(x * inv_scale) + zp, qmin, qmax).to(int8)`` and ``(q - zp) * scale``) and
``gpuquant-<backend>``: ``gpuquant.functional`` under ``gpuquant.backends.use(backend)``
for every backend available here that computes on this device and implements the op (the
Triton interpreter on the CPU is left out: it checks kernels, it is not meant to be fast).

Runs on the GPU when there is one, else on the CPU. Per-tensor cases use ``quint8``
(activations, zero point near 128), per-channel cases ``qint8`` along axis 0 of a
``(64, numel / 64)`` tensor (weights, zero point 0); inputs are ``randn * 3 * scale``-ish so
about 1% clamps. Throughput in GB/s counts the minimal bytes moved per element:
quantize 4 + 1, dequantize 1 + 4, fake_quant forward 4 + 4, forward + backward
4 + 4 + 4 + 4 + 4 (x, y; grad_y, x again, grad_x).

``exact_vs_numpy``: each provider's output on input set 0 against the contract formula in
NumPy (float32 ``x * (1 / scale)``, ``np.rint``, clip; ``(q - zp) * scale``; for backward,
``grad_y`` where the unclamped value is in range, else 0).
"""
from __future__ import annotations

import numpy as np
import torch

from ... import backends
from ...backends import registry
from ...dtypes import qint8, quint8
from ...functional import dequantize, fake_quant, quantize
from ...qparams import QParams
from ..harness import Case, Provider, Suite

_CHANNELS = 64
_OPS = (("quantize", "fwd", 5), ("dequantize", "fwd", 5), ("fake_quant", "fwd", 8),
        ("fake_quant", "fwd+bwd", 20))


# ---------------------------------------------------------------------------------- oracle
def _np_bcast(v: np.ndarray, axis, ndim):
    if axis is None:
        return v
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def _np_quant(x, scale, zp, qmin, qmax, axis):
    inv = _np_bcast((np.float32(1.0) / scale.astype(np.float32)).astype(np.float32), axis, x.ndim)
    r = np.rint(x * inv) + _np_bcast(zp, axis, x.ndim).astype(np.float32)
    return r, np.clip(r, qmin, qmax)


def _np_dequant(q, scale, zp, axis):
    return ((q.astype(np.int32) - _np_bcast(zp, axis, q.ndim)).astype(np.float32)
            * _np_bcast(scale.astype(np.float32), axis, q.ndim))


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


# ---------------------------------------------------------------------------------- cases
def _make_inputs(op, mode, granularity, numel, device):
    def inputs(i):
        if granularity == "per_tensor":
            dt = quint8
            scale = torch.tensor(0.02 + 0.01 * torch.rand(()).item(), dtype=torch.float32)
            zp = torch.randint(120, 136, (), dtype=torch.int32)
            shape, axis = (numel,), None
        else:
            dt = qint8
            scale = (torch.rand(_CHANNELS) * 0.02 + 0.005).float()
            zp = torch.zeros(_CHANNELS, dtype=torch.int32)
            shape, axis = (_CHANNELS, numel // _CHANNELS), 0
        QParams(dt, scale, zp, axis=axis)  # (validated here, on the CPU)
        s = _bcast_t(scale, axis, len(shape))
        x = (torch.randn(shape) * 50 * s).to(device)  # ~1% clamp
        scale_d, zp_d = scale.to(device), zp.to(device)
        # the qparams on x's device, the very tensors the torch provider reads: CPU ones made
        # every gpuquant call on a GPU copy them over first (two pageable host-to-device
        # copies, a host sync, inside the timed call) where torch's call copied nothing
        qp = QParams.trusted(dt, scale_d, zp_d, axis)
        inp = {"x": x, "qp": qp, "axis": axis, "scale": scale_d, "zp": zp_d}
        if op == "dequantize":
            inp["q"] = torch.randint(dt.qmin, dt.qmax + 1, shape, dtype=dt.storage).to(device)
        if mode == "fwd+bwd":
            inp["g"] = torch.randn(shape).to(device)
        return inp
    return inputs


def _bcast_t(t, axis, ndim):
    if axis is None:
        return t
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


def _torch_provider(op, mode):
    def setup(inp):
        x, qp, axis, s, zp = inp["x"], inp["qp"], inp["axis"], inp["scale"], inp["zp"]
        d = qp.dtype
        if op == "quantize":
            inv = _bcast_t(1.0 / s, axis, x.dim())
            zpf = _bcast_t(zp, axis, x.dim()).float()
            return lambda: torch.clamp(torch.round(x * inv) + zpf, d.qmin, d.qmax).to(d.storage)
        if op == "dequantize":
            q = inp["q"]
            zpb, sb = _bcast_t(zp, axis, q.dim()), _bcast_t(s, axis, q.dim())
            return lambda: (q.to(torch.int32) - zpb).to(torch.float32) * sb
        if axis is None:
            sf, zi = float(s), int(zp)

            def fq(t):
                return torch.fake_quantize_per_tensor_affine(t, sf, zi, d.qmin, d.qmax)
        else:
            def fq(t):
                return torch.fake_quantize_per_channel_affine(t, s, zp, axis, d.qmin, d.qmax)
        return _fq_runner(fq, x, mode, inp.get("g"))
    return Provider(setup, check=_check(op, mode))


def _fq_runner(fq, x, mode, g):
    if mode == "fwd":
        return lambda: fq(x)
    xg = x.detach().clone().requires_grad_(True)

    def run():
        xg.grad = None
        y = fq(xg)
        y.backward(g)
        return y.detach(), xg.grad
    return run


def _gpuquant_provider(backend, op, mode):
    def setup(inp):
        x, qp = inp["x"], inp["qp"]
        if op == "quantize":
            def call():
                with backends.use(backend):
                    return quantize(x, qp)
            return call
        if op == "dequantize":
            q = inp["q"]

            def call():
                with backends.use(backend):
                    return dequantize(q, qp)
            return call

        def fq(t):
            with backends.use(backend):
                return fake_quant(t, qp)
        return _fq_runner(fq, x, mode, inp.get("g"))
    return Provider(setup, check=_check(op, mode))


def _same(got, dtype: torch.dtype, want: np.ndarray) -> bool:
    """``got`` is a tensor of ``dtype`` equal to ``want`` (``np.array_equal`` alone compares
    values across dtypes: a float64 output equalled its float32 oracle)."""
    return (isinstance(got, torch.Tensor) and got.dtype == dtype
            and bool(np.array_equal(_np(got), want)))


def _check(op, mode):
    def check(inp, out):
        qp, axis = inp["qp"], inp["axis"]
        s, zp, d = _np(inp["scale"]), _np(inp["zp"]), qp.dtype
        if op == "dequantize":  # float32 (contract section 1)
            return _same(out, torch.float32, _np_dequant(_np(inp["q"]), s, zp, axis))
        r, q = _np_quant(_np(inp["x"]), s, zp, d.qmin, d.qmax, axis)
        if op == "quantize":
            return _same(out, d.storage, q.astype(np.int64))
        want_y = _np_dequant(q.astype(np.int32), s, zp, axis)
        xdt = inp["x"].dtype  # fake_quant returns x's dtype, its gradient too
        if mode == "fwd":
            return _same(out, xdt, want_y)
        if not (isinstance(out, tuple) and len(out) == 2):
            return False
        y, gx = out
        want_g = np.where((r >= d.qmin) & (r <= d.qmax), _np(inp["g"]), np.float32(0))
        return _same(y, xdt, want_y) and _same(gx, xdt, want_g)
    return check


def _backends_for(device: str, op: str):
    names = []
    for name in backends.available():
        mod = registry.get_backend(name)
        pri = mod.PRIORITY.get(device, -1) if isinstance(mod.PRIORITY, dict) else mod.PRIORITY
        if device in mod.DEVICES and op in mod.OPS and pri >= 0:
            names.append(name)
    return names


def _cases(quick: bool, device: str):
    if device == "cuda":
        sizes = [2 ** 20, 2 ** 24] if quick else [2 ** 18, 2 ** 20, 2 ** 22, 2 ** 24, 2 ** 26]
    else:
        sizes = [2 ** 16, 2 ** 20] if quick else [2 ** 16, 2 ** 18, 2 ** 20, 2 ** 22, 2 ** 24]
    cases = []
    for op, mode, bytes_per in _OPS:
        for granularity in ("per_tensor", "per_channel"):
            for numel in sizes:
                params = {"op": op, "mode": mode, "granularity": granularity,
                          "qdtype": "quint8" if granularity == "per_tensor" else "qint8",
                          "dtype": "float32", "numel": numel}
                providers = {"torch": _torch_provider(op, mode)}
                for b in _backends_for(device, op):
                    providers[f"gpuquant-{b}"] = _gpuquant_provider(b, op, mode)
                cases.append(Case(
                    params=params, inputs=_make_inputs(op, mode, granularity, numel, device),
                    providers=providers,
                    throughput=lambda p, ms, b=bytes_per: (b * p["numel"] / (ms * 1e-3) / 1e9,
                                                           "GB/s")))
    return cases


SUITE = Suite(name="quant", baseline="torch", cases=_cases, device="any", x_param="numel",
              description="quantize / dequantize / fake_quant (fwd, fwd+bwd) vs torch, GB/s")
