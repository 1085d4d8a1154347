"""Suite ``cpu``: int8 inference on the CPU: the NumPy backend against float32 and fbgemm.

Cases: linear ``(m, k, n)`` in (1, 768, 768), (64, 1024, 1024), (512, 4096, 1024); every
distinct convolution of ResNet-18 at 224x224 (params ``layer``, ``cin``, ``cout``, ``k``,
``stride``, ``h``, ``batch``) at batch 1 and 8; and ``layer=all``: the network's 20
convolutions in a row (each with its own weights), the total the issue's target is about.
``--quick`` runs batch 1 only, five of the layers and the total.

Providers (the timed call computes one layer, input ready in the provider's own format):

* ``numpy-float32`` (baseline): the same layer in float32 with NumPy: ``x @ w.T + b``;
  convolution as NHWC im2col (``np.pad`` + ``sliding_window_view``) and one matmul + bias;
* ``gpuquant-numpy``: ``gpuquant.functional.integer`` conv2d / linear (validated front-end)
  on the ``numpy`` backend (the CPU default, else chosen with ``backends.use``): uint8
  activations in channels_last memory, int8 per-channel weights, int32 bias, fixed-point
  requantization with a fused ReLU, uint8 out;
* ``torch-fbgemm``: PyTorch's own int8 CPU kernels (``torch.ao.nn.quantized`` Linear /
  Conv2d, the x86 / fbgemm engine, prepacked weights, NHWC quint8 input). Only this
  benchmark uses PyTorch's deprecated quantized tensors, as the comparison; the library
  never does;
* ``torch-float32``: ``torch.nn.functional`` linear / conv2d in float32 (oneDNN).

Data are realistic rather than uniform: post-ReLU Gaussian activations quantized to uint8
(the first layer's image input with zero point 114), He-initialised weights quantized per
output channel (narrow int8), the output scale from the float layer's own range. Throughput
``2 * MACs`` per second in TOPS for every provider. ``exact_vs_numpy``: for
``gpuquant-numpy``, its output on input set 0 against the ``reference`` backend (plain
torch, int64 arithmetic), layer cases only; None for the float and fbgemm paths (their
rounding differs by design).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from numpy.lib.stride_tricks import sliding_window_view

from ... import backends
from ...dtypes import qint8_narrow, quint8
from ...functional import integer as qf
from ...functional.requant import make_requant
from ..harness import Case, Provider, ProviderUnavailable, Suite, exact

LINEAR_SHAPES = ((1, 768, 768), (64, 1024, 1024), (512, 4096, 1024))

# ResNet-18's distinct convolutions at 224x224: (name, cin, cout, k, stride, h, count)
RESNET18_CONVS = (
    ("conv1", 3, 64, 7, 2, 224, 1),
    ("layer1.3x3", 64, 64, 3, 1, 56, 4),
    ("layer2.0.conv1", 64, 128, 3, 2, 56, 1),
    ("layer2.0.downsample", 64, 128, 1, 2, 56, 1),
    ("layer2.3x3", 128, 128, 3, 1, 28, 3),
    ("layer3.0.conv1", 128, 256, 3, 2, 28, 1),
    ("layer3.0.downsample", 128, 256, 1, 2, 28, 1),
    ("layer3.3x3", 256, 256, 3, 1, 14, 3),
    ("layer4.0.conv1", 256, 512, 3, 2, 14, 1),
    ("layer4.0.downsample", 256, 512, 1, 2, 14, 1),
    ("layer4.3x3", 512, 512, 3, 1, 7, 3),
)


# --quick: one layer of each kind (first layer, 3x3 at three sizes, strided 1x1), plus the total
_QUICK_LAYERS = ("conv1", "layer1.3x3", "layer2.0.downsample", "layer3.3x3", "layer4.3x3")


# ---------------------------------------------------------------------------------- data
def _quant_act(xf: torch.Tensor, zp: int = 0):
    scale = float(xf.abs().max()) / (255 - zp) if zp else float(xf.max()) / 255
    q = torch.clamp(torch.round(xf / scale) + zp, 0, 255).to(torch.uint8)
    return q, max(scale, 1e-8)


def _layer(cin, cout, k, stride, h, batch, first):
    """One conv layer's float and int8 data (NCHW float, channels_last uint8)."""
    if first:  # a normalised image
        xf = torch.randn(batch, cin, h, h)
        zp = 114
    else:
        xf = torch.relu(torch.randn(batch, cin, h, h))
        zp = 0
    xq, sx = _quant_act(xf, zp)
    xdq = (xq.float() - zp) * sx
    fan_in = cin * k * k
    wf = torch.randn(cout, cin, k, k) * math.sqrt(2.0 / fan_in)
    sw = wf.abs().amax(dim=(1, 2, 3)) / 127
    wq = torch.clamp(torch.round(wf / sw.reshape(-1, 1, 1, 1)), -127, 127).to(torch.int8)
    bf = torch.randn(cout) * 0.1
    bq = torch.round(bf / (sx * sw)).to(torch.int32)
    pad = k // 2
    yf = F.relu(F.conv2d(xdq, wq.float() * sw.reshape(-1, 1, 1, 1), bf, stride, pad))
    sy = max(float(yf.max()) / 255, 1e-8)
    rq = make_requant(sx, sw, sy, 0, quint8, "relu")
    return {"xq": xq.contiguous(memory_format=torch.channels_last), "zp": zp, "sx": sx,
            "wq": wq, "sw": sw, "bq": bq, "bf": bf, "rq": rq, "sy": sy,
            "xf": xdq, "wf": wq.float() * sw.reshape(-1, 1, 1, 1), "stride": stride, "pad": pad}


def _linear(m, k, n):
    xf = torch.relu(torch.randn(m, k))
    xq, sx = _quant_act(xf)
    xdq = xq.float() * sx
    wf = torch.randn(n, k) * math.sqrt(2.0 / k)
    sw = wf.abs().amax(dim=1) / 127
    wq = torch.clamp(torch.round(wf / sw[:, None]), -127, 127).to(torch.int8)
    bf = torch.randn(n) * 0.1
    bq = torch.round(bf / (sx * sw)).to(torch.int32)
    yf = F.relu(F.linear(xdq, wq.float() * sw[:, None], bf))
    sy = max(float(yf.max()) / 255, 1e-8)
    return {"xq": xq, "zp": 0, "sx": sx, "wq": wq, "sw": sw, "bq": bq, "bf": bf, "sy": sy,
            "rq": make_requant(sx, sw, sy, 0, quint8, "relu"), "xf": xdq,
            "wf": wq.float() * sw[:, None]}


# ---------------------------------------------------------------------------------- float32 NumPy
def _np_conv_f32(x_nhwc, w_khwco, b, stride, pad):
    n, h, w, c = x_nhwc.shape
    kh, kw, _, o = w_khwco.shape
    xp = np.pad(x_nhwc, ((0, 0), (pad, pad), (pad, pad), (0, 0))) if pad else x_nhwc
    win = sliding_window_view(xp, (kh, kw), axis=(1, 2))[:, ::stride, ::stride]
    ho, wo = win.shape[1:3]
    cols = win.transpose(0, 1, 2, 4, 5, 3).reshape(n * ho * wo, kh * kw * c)
    y = cols @ w_khwco.reshape(kh * kw * c, o)
    y += b
    return y.reshape(n, ho, wo, o)


# ---------------------------------------------------------------------------------- providers
def _on_numpy(fn):
    """``fn`` run on the numpy backend the way a user's CPU call runs: as is where numpy is
    already the backend of CPU tensors (the default), else inside ``backends.use("numpy")``."""
    if "numpy" not in backends.available():
        raise ProviderUnavailable("the numpy backend is not available")
    if backends.current() is None and backends.auto_backend("cpu") == "numpy":
        return fn

    def run():
        with backends.use("numpy"):
            return fn()
    return run


def _conv_providers():
    def numpy_f32(inp):
        layers = inp["layers"]
        prepared = [(d["xf"].permute(0, 2, 3, 1).contiguous().numpy(),
                     d["wf"].permute(2, 3, 1, 0).contiguous().numpy(), d["bf"].numpy(),
                     d["stride"], d["pad"]) for d in layers]
        return lambda: [_np_conv_f32(*a) for a in prepared]

    def gq_numpy(inp):
        layers = inp["layers"]
        return _on_numpy(lambda: [qf.conv2d(d["xq"], d["zp"], d["wq"], d["bq"], d["stride"],
                                            d["pad"], 1, 1, d["rq"]) for d in layers])

    def gq_check(inp, out):
        if len(inp["layers"]) != 1:
            return None
        d = inp["layers"][0]
        with backends.use("reference"):
            want = qf.conv2d(d["xq"], d["zp"], d["wq"], d["bq"], d["stride"], d["pad"], 1, 1, d["rq"])
        return exact(out[0], want)

    def torch_f32(inp):
        prepared = [(d["xf"], d["wf"], d["bf"], d["stride"], d["pad"]) for d in inp["layers"]]

        def run():
            with torch.no_grad():
                return [F.conv2d(x, w, b, s, p) for x, w, b, s, p in prepared]
        return run

    def fbgemm(inp):
        mods = []
        for d in inp["layers"]:
            o, c, k, _ = d["wq"].shape
            mod = _fbgemm_conv(c, o, k, d)
            xq = torch.quantize_per_tensor(d["xf"], d["sx"], d["zp"], torch.quint8)
            mods.append((mod, xq.contiguous(memory_format=torch.channels_last)))

        def run():
            with torch.no_grad():
                return [m(x) for m, x in mods]
        return run

    return {"numpy-float32": Provider(numpy_f32), "gpuquant-numpy": Provider(gq_numpy, gq_check),
            "torch-fbgemm": Provider(fbgemm), "torch-float32": Provider(torch_f32)}


def _fbgemm_engine():
    engines = torch.backends.quantized.supported_engines
    for e in ("x86", "fbgemm"):
        if e in engines:
            return e
    raise ProviderUnavailable(f"no x86 / fbgemm quantized engine in this torch ({engines})")


def _fbgemm_conv(c, o, k, d):
    try:
        import torch.ao.nn.quantized as nnq
    except ImportError as e:
        raise ProviderUnavailable(f"torch.ao.nn.quantized is unavailable ({e})") from None
    torch.backends.quantized.engine = _fbgemm_engine()
    mod = nnq.Conv2d(c, o, k, stride=d["stride"], padding=d["pad"])
    qw = torch.quantize_per_channel(d["wf"], d["sw"].double(), torch.zeros(o, dtype=torch.long), 0,
                                    torch.qint8)
    mod.set_weight_bias(qw, d["bf"])
    mod.scale, mod.zero_point = d["sy"], 0
    return mod


def _linear_providers():
    def numpy_f32(inp):
        x, wt, b = inp["xf"].numpy(), inp["wf"].numpy().T.copy(), inp["bf"].numpy()

        def run():
            y = x @ wt
            y += b
            return y
        return run

    def gq_numpy(inp):
        x, w, b, rq = inp["xq"], inp["wq"], inp["bq"], inp["rq"]
        return _on_numpy(lambda: qf.linear(x, 0, w, b, rq))

    def gq_check(inp, out):
        with backends.use("reference"):
            want = qf.linear(inp["xq"], 0, inp["wq"], inp["bq"], inp["rq"])
        return exact(out, want)

    def torch_f32(inp):
        x, w, b = inp["xf"], inp["wf"], inp["bf"]

        def run():
            with torch.no_grad():
                return F.linear(x, w, b)
        return run

    def fbgemm(inp):
        try:
            import torch.ao.nn.quantized as nnq
        except ImportError as e:
            raise ProviderUnavailable(f"torch.ao.nn.quantized is unavailable ({e})") from None
        torch.backends.quantized.engine = _fbgemm_engine()
        n, k = inp["wq"].shape
        mod = nnq.Linear(k, n)
        qw = torch.quantize_per_channel(inp["wf"], inp["sw"].double(),
                                        torch.zeros(n, dtype=torch.long), 0, torch.qint8)
        mod.set_weight_bias(qw, inp["bf"])
        mod.scale, mod.zero_point = inp["sy"], 0
        xq = torch.quantize_per_tensor(inp["xf"], inp["sx"], 0, torch.quint8)

        def run():
            with torch.no_grad():
                return mod(xq)
        return run

    return {"numpy-float32": Provider(numpy_f32), "gpuquant-numpy": Provider(gq_numpy, gq_check),
            "torch-fbgemm": Provider(fbgemm), "torch-float32": Provider(torch_f32)}


# ---------------------------------------------------------------------------------- cases
def _ops(params, ms):
    return (2 * params["macs"] / (ms * 1e-3) / 1e12, "TOPS")


def _conv_macs(cin, cout, k, stride, h, batch):
    ho = (h + 2 * (k // 2) - k) // stride + 1
    return batch * ho * ho * cout * cin * k * k


def _cases(quick: bool, device: str):
    cases = []
    for m, k, n in LINEAR_SHAPES:
        cases.append(Case(params={"op": "linear", "m": m, "k": k, "n": n, "macs": m * k * n},
                          inputs=lambda i, m=m, k=k, n=n: _linear(m, k, n),
                          providers=_linear_providers(), throughput=_ops,
                          name=f"linear m={m} k={k} n={n}"))
    for batch in ((1,) if quick else (1, 8)):
        for name, cin, cout, k, s, h, _count in RESNET18_CONVS:
            if quick and name not in _QUICK_LAYERS:
                continue
            args = (cin, cout, k, s, h, batch)
            cases.append(Case(
                params={"op": "conv", "layer": name, "cin": cin, "cout": cout, "k": k,
                        "stride": s, "h": h, "batch": batch, "macs": _conv_macs(*args)},
                inputs=lambda i, a=args: {"layers": [_layer(*a, first=a[0] == 3)]},
                providers=_conv_providers(), throughput=_ops,
                name=f"conv {name} {cin}->{cout} k{k}/{s} @{h} b{batch}"))
        total = sum(_conv_macs(c, o, k, s, h, batch) * cnt for _, c, o, k, s, h, cnt in RESNET18_CONVS)

        def all_inputs(i, batch=batch):
            return {"layers": [_layer(c, o, k, s, h, batch, first=c == 3)
                               for _, c, o, k, s, h, cnt in RESNET18_CONVS for _ in range(cnt)]}
        cases.append(Case(
            params={"op": "conv", "layer": "all", "cin": 0, "cout": 0, "k": 0, "stride": 0,
                    "h": 224, "batch": batch, "macs": total},
            inputs=all_inputs, providers=_conv_providers(), throughput=_ops,
            name=f"conv all 20 resnet18 convs b{batch}"))
    return cases


SUITE = Suite(name="cpu", baseline="numpy-float32", cases=_cases, device="cpu", x_param="macs",
              description="int8 inference on the CPU: NumPy backend vs NumPy float32, fbgemm and "
                          "torch float32 (linear, ResNet-18 convs), 2*MACs TOPS")
