"""Suite ``fake_quant``: the Triton fused fake-quant + STE kernels against PyTorch's ops and
the bandwidth ceiling (GPU only).

Params: ``mode`` (``fwd``: the training forward, writing ``y`` and what the backward keeps;
``bwd``: the backward alone, the graph built untimed; ``fwd+bwd``; ``observe``: per tensor,
the QAT activation step: a moving-average observer records ``x``, then the training forward
with its new qparams), ``granularity``
(``per_tensor``: quint8, zero point near 128; ``per_channel``: qint8, zero point 0, along the
channel axis), ``dtype`` (float32, bfloat16), ``numel`` (2^20 ... 2^28; ``--quick``: 2^20,
2^24). The input is an activation as a QAT network sees it: ``(N, 64, H, W)`` in
channels_last memory (the channel axis is the innermost one), ``randn * 50 * scale`` so
about 1% of the values clamp.

Providers (all on the same tensors, interleaved):

* ``gpuquant-triton``: ``gpuquant.backends.triton.fake_quant.fake_quant`` (the op the QAT
  modules run on CUDA tensors);
* ``torch``: ``torch.fake_quantize_per_tensor_affine`` (tensor qparams, no host sync) /
  ``torch.fake_quantize_per_channel_affine``; the baseline;
* ``torch-fused``: ``torch.fused_moving_avg_obs_fake_quant`` with the observer off (so it
  does the same work), per-tensor float32 only (where it applies);
* ``copy``: ``Tensor.copy_`` moving the bytes the op must move at minimum (fwd: read x,
  write y; bwd: read grad, write grad_x; fwd+bwd: both; observe: ``x.amax()`` then the
  copy, x read twice: the qparams of a batch depend on all of it): the achievable-bandwidth
  ceiling, measured in the same run.

``observe`` mode (quint8, affine, momentum 0.9, on a fresh observer each input set):
``gpuquant-triton`` is :func:`gpuquant.backends.triton.observer.observe_fake_quant` (the
two-launch path the QAT modules take, no host sync); ``torch`` PyTorch's eager QAT module,
``torch.ao.quantization.FakeQuantize`` with its ``MovingAverageMinMaxObserver``;
``torch-fused`` ``torch.fused_moving_avg_obs_fake_quant`` with the observer on (float32).
Their ``exact_vs_numpy``: ``y`` against the formula with the qparams the provider's
observer holds after that call (what the observer computed is the observer tests' subject).

Throughput: GB/s of those minimal bytes (2E an element for fwd and bwd, 4E for fwd+bwd, 3E
for observe, E = 4 or 2 bytes). Targets (issue 5), at numel >= 2^24: ``gpuquant-triton`` at least 2x
faster than ``torch`` per-channel fwd+bwd; its time within 1 / 0.85 of ``copy``'s; per-channel
no more than 1.1x per-tensor.

``exact_vs_numpy``: the provider's output on input set 0 against the contract formula in
NumPy (float32 ``x * (1 / scale)``, ``np.rint``, clip; the STE gradient): dtype and shape
of the whole output, values of 8 images spread over the batch, the first and the last
included (the whole tensor in NumPy would cost ~1 s a provider at 2^24).

Run on a GPU: ``gpuquant bench fake_quant --out bench/results/<device-slug>``.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Dict, List

import numpy as np
import torch

from ...dtypes import qint8, quint8
from ..harness import Case, Provider, ProviderUnavailable, Suite, exact_rows, sample_rows

CHANNELS = 64
MODES = ("fwd", "bwd", "fwd+bwd", "observe")
GRANULARITIES = ("per_tensor", "per_channel")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SIZES = [2 ** 20, 2 ** 22, 2 ** 24, 2 ** 26, 2 ** 28]
QUICK_SIZES = [2 ** 20, 2 ** 24]


def activation_shape(numel: int, channels: int = CHANNELS):
    """(N, C, H, W) with H = W, at most 32x32, holding ``numel`` elements (a power of 4 times
    ``channels``)."""
    per = numel // channels
    if per * channels != numel or per < 1:
        raise ValueError(f"numel {numel} must be a multiple of {channels}")
    hw = min(1024, per)
    side = math.isqrt(hw)
    if side * side != hw or per % hw:
        raise ValueError(f"numel {numel} / {channels} must be a power of 4 (got {per})")
    return (per // hw, channels, side, side)


def case_params(quick: bool, sizes=None, dtypes=None) -> List[Dict]:
    """The params of every case, in run order."""
    sizes = sizes or (QUICK_SIZES if quick else SIZES)
    dtypes = dtypes or list(DTYPES)
    return [{"mode": m, "granularity": g, "dtype": dt, "numel": n}
            for m in MODES for g in GRANULARITIES for dt in dtypes for n in sizes
            if not (m == "observe" and g == "per_channel")]


def bytes_per_element(params) -> int:
    e = torch.finfo(DTYPES[params["dtype"]]).bits // 8
    return {"fwd+bwd": 4, "observe": 3}.get(params["mode"], 2) * e


def _throughput(params, ms):
    return bytes_per_element(params) * params["numel"] / (ms * 1e-3) / 1e9, "GB/s"


# ---------------------------------------------------------------------------------- inputs
def _make_inputs(params, device):
    def inputs(i):
        shape = activation_shape(params["numel"])
        if params["granularity"] == "per_tensor":
            d, axis = quint8, None
            scale = torch.tensor(0.02 + 0.01 * float(torch.rand(())), dtype=torch.float32)
            zp = torch.randint(120, 136, (), dtype=torch.int32)
            sb = scale
        else:
            d, axis = qint8, 1
            scale = (torch.rand(CHANNELS) * 0.02 + 0.005).float()
            zp = torch.zeros(CHANNELS, dtype=torch.int32)
            sb = scale.reshape(1, -1, 1, 1)
        x = torch.randn(shape, device=device) * (50 * sb.to(device))
        x = x.to(DTYPES[params["dtype"]]).contiguous(memory_format=torch.channels_last)
        g = torch.randn(shape, device=device).to(x.dtype).contiguous(
            memory_format=torch.channels_last)
        return {"x": x, "g": g, "scale": scale.to(device), "zp": zp.to(device), "axis": axis,
                "qmin": d.qmin, "qmax": d.qmax, "mode": params["mode"]}
    return inputs


def _runner(fq, inp):
    """The timed callable for ``fq(t) -> y`` in the input's mode."""
    x, g, mode = inp["x"], inp["g"], inp["mode"]
    xg = x.detach().clone().requires_grad_(True)
    if mode in ("fwd", "observe"):
        return lambda: fq(xg)  # the training forward (keeps what the backward needs)
    if mode == "bwd":
        y = fq(xg)
        return lambda: torch.autograd.grad(y, xg, g, retain_graph=True)[0]

    def run():
        y = fq(xg)
        (gx,) = torch.autograd.grad(y, xg, g)
        return y.detach(), gx
    return run


# ---------------------------------------------------------------------------------- oracle
def _np_reference(inp, rows):
    """(y, grad_x) of the images ``rows`` by the contract formula in NumPy (float32)."""
    x = inp["x"][rows.to(inp["x"].device)].float().cpu().numpy()
    g = inp["g"][rows.to(inp["g"].device)].float().cpu().numpy()
    s = inp["scale"].cpu().numpy().astype(np.float32)
    zp = inp["zp"].cpu().numpy()
    if inp["axis"] is not None:
        s, zp = s.reshape(1, -1, 1, 1), zp.reshape(1, -1, 1, 1)
    inv = (np.float32(1.0) / s).astype(np.float32)
    r = np.rint(x * inv) + zp.astype(np.float32)
    q = np.clip(r, inp["qmin"], inp["qmax"])
    y = ((q - zp.astype(np.float32)) * s).astype(np.float32)
    gx = np.where((r >= inp["qmin"]) & (r <= inp["qmax"]), g, np.float32(0))
    dt = inp["x"].dtype
    return (torch.from_numpy(y).to(dt), torch.from_numpy(gx.astype(np.float32)).to(dt))


def check_output(inp, out) -> bool:
    """``out`` (y, grad_x or both, as the mode returns) against :func:`_np_reference` on
    sampled images (dtype and shape: the input's)."""
    n = inp["x"].shape[0]
    rows = sample_rows(n)
    y_ref, gx_ref = _np_reference(inp, rows)
    mode = inp["mode"]
    if mode == "fwd+bwd" and not (isinstance(out, tuple) and len(out) == 2):
        return False
    pairs = {"fwd": [(out, y_ref)], "observe": [(out, y_ref)], "bwd": [(out, gx_ref)],
             "fwd+bwd": list(zip(out, (y_ref, gx_ref)))}[mode]
    return all(exact_rows(got, want, rows, n) for got, want in pairs)


# ---------------------------------------------------------------------------------- providers
def _triton_setup(inp):
    try:
        from ...backends import registry
        from ...backends.triton.fake_quant import fake_quant as tfq
        registry.get_backend("triton")
    except (ImportError, ValueError) as e:
        raise ProviderUnavailable(f"triton backend not available here: {e}")
    if inp["x"].device.type not in registry.get_backend("triton").DEVICES:
        raise ProviderUnavailable(f"triton backend does not compute on {inp['x'].device.type}")
    s, zp, axis, lo, hi = inp["scale"], inp["zp"], inp["axis"], inp["qmin"], inp["qmax"]
    return _runner(lambda t: tfq(t, s, zp, lo, hi, axis), inp)


def _torch_setup(inp):
    s, zp, axis, lo, hi = inp["scale"], inp["zp"], inp["axis"], inp["qmin"], inp["qmax"]
    if axis is None:
        return _runner(lambda t: torch.fake_quantize_per_tensor_affine(t, s, zp, lo, hi), inp)
    return _runner(lambda t: torch.fake_quantize_per_channel_affine(t, s, zp, axis, lo, hi), inp)


_FUSED_QPARAMS: Dict[int, tuple] = {}  # id(inputs) -> the qparams torch-fused computed


def _torch_fused_setup(inp):
    dev = inp["x"].device
    off = torch.zeros(1, dtype=torch.long, device=dev)
    on = torch.ones(1, dtype=torch.long, device=dev)
    # the op always recomputes scale / zero point from the running range (the observer flag
    # only stops the range update): give it the batch range, as a trained observer would have
    xf = inp["x"].float()
    rmin, rmax = xf.min().reshape(1), xf.max().reshape(1)
    s = inp["scale"].reshape(1).clone()
    zp = inp["zp"].reshape(1).clone()
    lo, hi = inp["qmin"], inp["qmax"]

    def fq(t):  # observer off: fake_quant with tensor qparams, plus the qparams computation
        return torch.fused_moving_avg_obs_fake_quant(t, off, on, rmin, rmax, s, zp, 0.01, lo,
                                                     hi, 0, False, False)
    fq(inp["x"].detach())
    _FUSED_QPARAMS[id(inp)] = (s.reshape(()).clone(), zp.reshape(()).clone())
    return _runner(fq, inp)


def _check_fused(inp, out) -> bool:
    s, zp = _FUSED_QPARAMS.pop(id(inp))
    return check_output(dict(inp, scale=s, zp=zp), out)


_OBSERVED: Dict[int, Callable[[], tuple]] = {}  # id(inputs) -> the provider's qparams now


def _check_observed(inp, out) -> bool:
    """``observe`` mode: ``out`` against the formula with the qparams the provider's observer
    holds after the call that gave it."""
    s, zp = _OBSERVED.pop(id(inp))()
    if not (bool(torch.isfinite(s).all()) and float(s) > 0):
        return False
    return check_output(dict(inp, scale=s.reshape(()).float(), zp=zp.reshape(()).int()), out)


def _observe_triton_setup(inp):
    try:
        from ...backends import registry
        from ...backends.triton.observer import observe_fake_quant
        registry.get_backend("triton")
    except (ImportError, ValueError) as e:
        raise ProviderUnavailable(f"triton backend not available here: {e}")
    from ... import backends
    from ...quantization import ExponentialMovingAverageObserver, FakeQuantize
    dev = inp["x"].device
    obs = ExponentialMovingAverageObserver(0.9, quint8, symmetric=False,
                                           check_finite=False).to(dev)
    fqm = FakeQuantize(quint8).to(dev)

    def fq(t):  # on CPU tensors (the interpreter) only when the backend is chosen
        with backends.use("triton") if dev.type == "cpu" else contextlib.nullcontext():
            y = observe_fake_quant(t, obs, fqm)
        if y is None:
            raise ProviderUnavailable("observe_fake_quant does not take this observer pair")
        return y
    _OBSERVED[id(inp)] = lambda: (obs.get_qparams().scale, obs.get_qparams().zero_point)
    return _runner(fq, inp)


def _observe_torch_setup(inp):
    from torch.ao.quantization import FakeQuantize as TorchFakeQuantize
    from torch.ao.quantization import MovingAverageMinMaxObserver
    m = TorchFakeQuantize(observer=MovingAverageMinMaxObserver, quant_min=quint8.qmin,
                          quant_max=quint8.qmax, dtype=torch.quint8, averaging_constant=0.1,
                          qscheme=torch.per_tensor_affine).to(inp["x"].device)
    try:
        m(inp["x"].detach().clone())
    except RuntimeError as e:  # e.g. a dtype its kernels do not take
        raise ProviderUnavailable(f"torch.ao FakeQuantize: {e}")
    m.activation_post_process.reset_min_max_vals()
    _OBSERVED[id(inp)] = lambda: (m.scale, m.zero_point)
    return _runner(m, inp)


def _observe_fused_setup(inp):
    dev = inp["x"].device
    on = torch.ones(1, dtype=torch.long, device=dev)
    rmin = torch.full((1,), float("inf"), device=dev)
    rmax = torch.full((1,), float("-inf"), device=dev)
    s = torch.ones(1, device=dev)
    zp = torch.zeros(1, dtype=torch.int32, device=dev)
    lo, hi = quint8.qmin, quint8.qmax

    def fq(t):
        return torch.fused_moving_avg_obs_fake_quant(t, on, on, rmin, rmax, s, zp, 0.1, lo, hi,
                                                     0, False, False)
    _OBSERVED[id(inp)] = lambda: (s, zp)
    return _runner(fq, inp)


def _copy_setup(inp):
    x, g, mode = inp["x"], inp["g"], inp["mode"]
    y, gx = torch.empty_like(x), torch.empty_like(g)
    if mode == "observe":
        def observe_bytes():
            x.amax()
            return y.copy_(x)
        return observe_bytes
    if mode == "fwd":
        return lambda: y.copy_(x)
    if mode == "bwd":
        return lambda: gx.copy_(g)

    def both():
        y.copy_(x)
        gx.copy_(g)
        return y, gx
    return both


def build_cases(params_list, device) -> List[Case]:
    cases = []
    for p in params_list:
        if p["mode"] == "observe":
            providers = {
                "torch": Provider(_observe_torch_setup, check=_check_observed),
                "gpuquant-triton": Provider(_observe_triton_setup, check=_check_observed),
                "copy": Provider(_copy_setup),
            }
            if p["dtype"] == "float32":
                providers["torch-fused"] = Provider(_observe_fused_setup, check=_check_observed)
        else:
            providers = {
                "torch": Provider(_torch_setup, check=check_output),
                "gpuquant-triton": Provider(_triton_setup, check=check_output),
                "copy": Provider(_copy_setup),
            }
            if p["granularity"] == "per_tensor" and p["dtype"] == "float32":
                providers["torch-fused"] = Provider(_torch_fused_setup, check=_check_fused)
        cases.append(Case(params=dict(p), inputs=_make_inputs(p, device), providers=providers,
                          throughput=_throughput))
    return cases


def _cases(quick: bool, device: str) -> List[Case]:
    return build_cases(case_params(quick), device)


# 0.3 ms of GPU-side head start a timed call: PyTorch's per-channel op synchronises the host,
# and the call after it (ours, on the H100 and H200) was timed on its ~0.2 ms of host
# submission instead of its kernels (bench/README.md NOTES, H200 lease at a00ac9e)
SUITE = Suite(name="fake_quant", baseline="torch", cases=_cases, device="cuda", x_param="numel",
              description="fused fake-quant + STE (Triton) vs torch.fake_quantize_* and a copy",
              gpu_head_start_ms=0.3)
