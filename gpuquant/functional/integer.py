"""Integer ops of the quantized modules: input validation, then dispatch to a backend.

``check_accumulator_range`` (top of the file) is shared by every backend's front-end: the
contract accumulates ``sum((x - zp_x) * w) + bias`` exactly in int32, so shapes whose worst
case could leave the int32 range are refused before any backend runs.
"""
from __future__ import annotations

import functools
import math
import struct as _struct
import weakref

import torch

from .._compile import eager_under_compile
from .._tensors import version
from ..qparams import _MIN_SCALE

__all__ = ["check_accumulator_range"]

_INT32_LIMIT = 2 ** 31
_RANGE_OF = {torch.int8: (-128, 127), torch.uint8: (0, 255)}


def _abs_max(v, what: str, op: str) -> int:
    if isinstance(v, torch.Tensor):
        if v.dtype.is_floating_point or v.dtype.is_complex or v.dtype == torch.bool:
            raise TypeError(f"{op}: {what} must be an integer tensor, got {v.dtype}")
        if v.numel() == 0:
            return 0
        # int8 abs(-128) wraps: take the extremes in Python ints
        return max(abs(int(v.min().item())), abs(int(v.max().item())))
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{op}: {what} must be an int or an integer tensor, got "
                        f"{type(v).__name__} ({v!r})")
    return abs(v)


_BIAS_MAX = {}  # id(bias tensor) -> (weakref, (data_ptr, version, shape, dtype), max |bias|)


def _bias_abs_max(b, op: str) -> int:
    """:func:`_abs_max` of a bias, cached per tensor (identity, storage and in-place version
    counter): a constant bias is scanned once, not on every call (a reduction and a host sync
    that cost ~10 us, as much as a small layer's whole GEMV)."""
    if not isinstance(b, torch.Tensor) or b.dtype.is_floating_point or b.dtype == torch.bool:
        return _abs_max(b, "bias", op)
    ver = version(b)
    if ver < 0:  # an inference tensor has no version counter: no caching
        return _abs_max(b, "bias", op)
    sig = (b.data_ptr(), ver, b.shape, b.dtype)
    hit = _BIAS_MAX.get(id(b))
    if hit is not None and hit[0]() is b and hit[1] == sig:
        return hit[2]
    v = _abs_max(b, "bias", op)
    if len(_BIAS_MAX) >= 1024:
        _BIAS_MAX.clear()
    key = id(b)
    _BIAS_MAX[key] = (weakref.ref(b, lambda _r, k=key: _BIAS_MAX.pop(k, None)), sig, v)
    return v


def check_accumulator_range(k, x_range, x_zero_point, w_absmax=128, bias_absmax=0,
                            op: str = "op") -> int:
    """Refuse shapes whose int32 accumulator could overflow.

    The worst case of ``sum_{i<k} (x_i - zp_x) * w_i + bias`` is
    ``k * max|x - zp_x| * max|w| + max|bias|``, with ``max|x - zp_x|`` taken over the whole
    input range (so the check depends on shapes and parameters, never on the data).

    Args:
        k: number of products summed into one output (``C_in / groups * kh * kw`` for a
            convolution, ``in_features`` for a linear).
        x_range: the input's integer range: ``torch.int8`` / ``torch.uint8``, a
            ``gpuquant.QuantDtype``, or a ``(qmin, qmax)`` pair.
        x_zero_point: the input's zero point (int or 0-d integer tensor).
        w_absmax: largest ``|w|``: an int (default 128, any int8 weight) or the weight
            tensor itself (its absolute maximum is used).
        bias_absmax: largest ``|bias|``: an int, or the int32 bias tensor (None counts 0).
        op: the op's name, used in error messages.

    Returns:
        An upper bound of the accumulator's magnitude (an int below 2^31); an int8 / uint8
        weight tensor is only scanned when its dtype's bound would not fit.

    Raises:
        TypeError: an argument of the wrong type.
        ValueError: ``k`` < 1, or the worst case reaches 2^31 (the message gives the bound
            and the largest ``k`` that would fit).

    Example:
        >>> check_accumulator_range(3 * 3 * 64, torch.uint8, 128, 127)   # -> 9_363_456
    """
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{op}: k (the reduction length) must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"{op}: k (the reduction length) must be >= 1, got {k}")
    if isinstance(x_range, torch.dtype):
        if x_range not in _RANGE_OF:
            raise TypeError(f"{op}: input dtype must be torch.int8 or torch.uint8, got {x_range}")
        lo, hi = _RANGE_OF[x_range]
    elif hasattr(x_range, "qmin") and hasattr(x_range, "qmax"):
        lo, hi = int(x_range.qmin), int(x_range.qmax)
    else:
        try:
            lo, hi = (int(v) for v in x_range)
        except (TypeError, ValueError):
            raise TypeError(f"{op}: x_range must be a torch dtype, a QuantDtype or a (qmin, qmax) "
                            f"pair, got {x_range!r}") from None
    zp = int(x_zero_point.item()) if isinstance(x_zero_point, torch.Tensor) else x_zero_point
    if isinstance(zp, bool) or not isinstance(zp, int):
        raise TypeError(f"{op}: x_zero_point must be an int, got {type(zp).__name__}")
    x_max = max(abs(lo - zp), abs(hi - zp))
    b_max = 0 if bias_absmax is None else _bias_abs_max(bias_absmax, op)
    if isinstance(w_absmax, torch.Tensor) and w_absmax.dtype in _RANGE_OF:
        # an int8 / uint8 weight within the bound of its dtype needs no scan of its values
        lo_w, hi_w = _RANGE_OF[w_absmax.dtype]
        if k * x_max * max(-lo_w, hi_w) + b_max < _INT32_LIMIT:
            return k * x_max * max(-lo_w, hi_w) + b_max
    w_max = _abs_max(w_absmax, "w", op)
    worst = k * x_max * w_max + b_max
    if worst >= _INT32_LIMIT:
        per_k = x_max * w_max
        k_fit = (_INT32_LIMIT - 1 - b_max) // per_k if per_k else k
        raise ValueError(
            f"{op}: the int32 accumulator could overflow: k={k} products of |x - zp| <= {x_max} "
            f"and |w| <= {w_max}, plus |bias| <= {b_max}, reach {worst} >= 2^31; at most "
            f"k={k_fit} fits (split the reduction, or narrow the input / weight range)")
    return worst


# =========================================================================== front-end ops
# The integer ops of the quantized modules (gpuquant.nn.quantized): check dtypes, devices
# and shapes, then call the current backend's op (signatures in gpuquant.backends.reference).
from ..backends.fused import compose  # noqa: E402
from ..backends.registry import fused_op, get_op  # noqa: E402
from ..dtypes import QuantDtype  # noqa: E402
from .requant import AddParams, Requant, _int_arg  # noqa: E402

__all__ += ["conv2d", "linear", "add", "mul", "lookup", "concat", "max_pool2d", "avg_pool2d",
            "adaptive_avg_pool2d", "upsample_nearest2d", "conv2d_add", "linear_add",
            "conv2d_dequant", "linear_dequant", "layer_checks", "layer_checked"]

_ACT_DTYPES = (torch.int8, torch.uint8)
_GEOMETRY_MAX = 2 ** 31 - 1  # kernel sizes, strides, paddings, dilations, output sizes


def _check_act(x, op: str, what: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _ACT_DTYPES:
        raise TypeError(f"{op}: {what} must be an int8 or uint8 quantized activation, got "
                        f"{x.dtype} (quantize float inputs first, e.g. with a QuantStub)")


def _check_zp(zp, dtype: torch.dtype, op: str, what: str = "zero point") -> int:
    if isinstance(zp, torch.Tensor):
        if zp.numel() != 1 or zp.dtype.is_floating_point or zp.dtype == torch.bool:
            raise TypeError(f"{op}: {what} must be an int or a one-element integer tensor, got "
                            f"{zp.dtype} of shape {tuple(zp.shape)}")
        zp = int(zp.item())
    if isinstance(zp, bool) or not isinstance(zp, int):
        raise TypeError(f"{op}: {what} must be an int, got {type(zp).__name__} ({zp!r})")
    lo, hi = _RANGE_OF[dtype]
    if not lo <= zp <= hi:
        raise ValueError(f"{op}: {what} {zp} is outside the {dtype} range [{lo}, {hi}]")
    return zp


def _check_rq(rq, op: str, channels=None) -> None:
    if not isinstance(rq, Requant):
        raise TypeError(f"{op}: rq must be a gpuquant.functional.Requant, got {type(rq).__name__}")
    if rq.per_channel and channels is not None and rq.multiplier.numel() != channels:
        raise ValueError(f"{op}: per-channel Requant has {rq.multiplier.numel()} multipliers for "
                         f"{channels} output channels")
    if rq.per_channel and channels is None:
        raise ValueError(f"{op}: needs a per-tensor Requant, got {rq.multiplier.numel()} "
                         f"multipliers")


def _same_device(op: str, *ts) -> None:
    for t in ts:  # the common all-CPU case without device objects (0.76 -> 0.35 us)
        if t is not None and not (isinstance(t, torch.Tensor) and t.is_cpu):
            break
    else:
        return
    first = ts[0].device if isinstance(ts[0], torch.Tensor) else None
    if first is not None and all(t is None or (isinstance(t, torch.Tensor) and t.device == first)
                                 for t in ts[1:]):
        return
    devs = {t.device for t in ts if isinstance(t, torch.Tensor)}
    if len(devs) > 1:
        raise ValueError(f"{op}: tensors on different devices: {sorted(map(str, devs))}")


def _pair(v, what: str, op: str, allow_zero: bool = False) -> tuple:
    if type(v) is tuple and len(v) == 2 and type(v[0]) is int and type(v[1]) is int \
            and min(v) >= (0 if allow_zero else 1) and max(v) <= _GEOMETRY_MAX:
        return v  # the modules' own (validated) pairs: the common case, no further checks
    t = tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    if len(t) != 2 or any(isinstance(a, bool) or not isinstance(a, int) for a in t):
        raise TypeError(f"{op}: {what} must be an int or a pair of ints, got {v!r}")
    if any(a < (0 if allow_zero else 1) for a in t):
        raise ValueError(f"{op}: {what} must be >= {0 if allow_zero else 1}, got {v!r}")
    if any(a > _GEOMETRY_MAX for a in t):
        # (torch's pools take C ints; past them the backends parted: torch's RuntimeError,
        # a result from NumPy, an int64 / int32 mix-up in a Triton kernel)
        raise ValueError(f"{op}: {what} must be at most 2^31 - 1, got {v!r}")
    return t


_NCHW_OR_CHW = "4-D (N, C, H, W) or 3-D unbatched (C, H, W)"  # conv2d's and the pools' x


def _check_nchw(x, op: str, allowed: str = "4-D (N, C, H, W)") -> None:
    _check_act(x, op)
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be {allowed}, got shape {tuple(x.shape)}")


def _check_weight(weight, ndim: int, op: str) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dtype != torch.int8 or weight.dim() != ndim:
        # a wrong kind or dtype is a TypeError, an int8 weight of the wrong rank a ValueError
        # (the documented split: TypeError for dtypes, ValueError for shapes)
        kind = ValueError if isinstance(weight, torch.Tensor) and weight.dtype == torch.int8 \
            else TypeError
        raise kind(f"{op}: weight must be a {ndim}-D int8 tensor, got "
                   f"{getattr(weight, 'dtype', type(weight).__name__)} of shape "
                   f"{tuple(getattr(weight, 'shape', ()))}")
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"{op}: weight must have at least one output and one input channel, "
                         f"got shape {tuple(weight.shape)}")


def _check_bias(bias, o: int, op: str) -> None:
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.dtype != torch.int32 or bias.shape != (o,):
            # an int32 bias of the wrong shape is a ValueError, anything else a TypeError
            kind = ValueError if isinstance(bias, torch.Tensor) and bias.dtype == torch.int32 \
                else TypeError
            raise kind(f"{op}: bias must be None or int32 of shape ({o},), got "
                       f"{getattr(bias, 'dtype', type(bias).__name__)} "
                       f"{tuple(getattr(bias, 'shape', ()))}")


def _pool_window(x, kernel_size, stride, padding, op: str, dilation=(1, 1),
                 ceil_mode: bool = False):
    """(kernel, stride, padding) pairs of a pooling of ``x``; stride None / empty means the
    kernel size. Refuses, as torch's pooling does, a window that leaves no output: the
    padded input smaller than the dilated kernel (by more than ``stride - 1`` in ceil_mode,
    where a last window may reach past the padding)."""
    k = _pair(kernel_size, "kernel_size", op)
    s = k if stride is None or stride == [] or stride == () else _pair(stride, "stride", op)
    p = _pair(padding, "padding", op, allow_zero=True)
    if p[0] * 2 > k[0] or p[1] * 2 > k[1]:
        raise ValueError(f"{op}: padding {p} must be at most half the kernel size {k}")
    if x.shape[1] == 0:  # (as torch's max / average pools: only the batch may be empty)
        raise ValueError(f"{op}: x has no channels (shape {tuple(x.shape)}); only the batch "
                         f"dimension may be empty")
    size = tuple(x.shape[2:])
    eff = tuple(d * (kk - 1) + 1 for d, kk in zip(dilation, k))
    slack = tuple(st - 1 for st in s) if ceil_mode else (0, 0)
    if any(n == 0 or n + 2 * pp + sl < e for n, pp, sl, e in zip(size, p, slack, eff)):
        raise ValueError(f"{op}: padded input {size} + 2*{p} is smaller than the "
                         f"{'dilated ' if eff != k else ''}kernel {eff}"
                         f"{' (by more than stride - 1 in ceil_mode)' if ceil_mode else ''}: "
                         f"no output")
    return k, s, p


def _clamp_range(dtype: torch.dtype, qmin, qmax, op: str):
    """The output clamp: the storage dtype's range where qmin / qmax are None.

    Raises:
        ValueError: unless ``lo <= qmin <= qmax <= hi`` (``[lo, hi]`` the dtype's range).
    """
    lo, hi = _RANGE_OF[dtype]
    qmin = lo if qmin is None else _int_arg(qmin, f"{op}: qmin")
    qmax = hi if qmax is None else _int_arg(qmax, f"{op}: qmax")
    if not lo <= qmin <= qmax <= hi:
        raise ValueError(f"{op}: the output clamp [qmin, qmax] = [{qmin}, {qmax}] must be a "
                         f"non-empty range inside the {dtype} range [{lo}, {hi}]")
    return qmin, qmax


def _conv_args(op, x, x_zero_point, weight, bias, stride, padding, dilation, groups, rq,
               w_absmax, bias_absmax):
    """Checks of :func:`conv2d` (shared by the fused forms); returns the zero point, the
    stride, padding and dilation pairs and the output shape ``(N, O, Ho, Wo)``."""
    _check_nchw(x, op, _NCHW_OR_CHW)
    zp = _check_zp(x_zero_point, x.dtype, op)
    _check_weight(weight, 4, op)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"{op}: groups must be a positive int, got {groups!r}")
    o, cg, kh, kw = weight.shape
    if x.shape[1] != cg * groups or o % groups:
        raise ValueError(f"{op}: x has {x.shape[1]} channels, weight {tuple(weight.shape)} with "
                         f"groups={groups} expects {cg * groups} (and O divisible by groups)")
    _check_bias(bias, o, op)
    _check_rq(rq, op, o)
    _same_device(op, x, weight, bias)
    stride = _pair(stride, "stride", op)
    padding = _pair(padding, "padding", op, allow_zero=True)
    dilation = _pair(dilation, "dilation", op)
    eff_h, eff_w = dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1
    # an empty plane is refused however it is padded (as torch, the pools and the runtime do)
    if 0 in x.shape[2:] or x.shape[2] + 2 * padding[0] < eff_h or \
            x.shape[3] + 2 * padding[1] < eff_w:
        raise ValueError(f"{op}: padded input {tuple(x.shape[2:])} + 2*{padding} is smaller than "
                         f"the dilated kernel ({eff_h}, {eff_w}) or empty: no output")
    check_accumulator_range(cg * kh * kw, x.dtype, zp,
                            weight if w_absmax is None else w_absmax,
                            bias if bias_absmax is None else bias_absmax, op=op)
    ho = (x.shape[2] + 2 * padding[0] - eff_h) // stride[0] + 1
    wo = (x.shape[3] + 2 * padding[1] - eff_w) // stride[1] + 1
    return zp, stride, padding, dilation, (x.shape[0], o, ho, wo)


@eager_under_compile
def conv2d(x, x_zero_point, weight, bias, stride=1, padding=0, dilation=1, groups=1, rq=None,
           *, w_absmax=None, bias_absmax=None):
    """Integer 2-D convolution: ``requant(sum((x - zp_x) * w) + bias)``.

    Args:
        x: int8 / uint8 ``(N, C, H, W)`` (channels_last memory preferred), or unbatched
            ``(C, H, W)``, run as a batch of 1 (as ``torch.nn.functional.conv2d`` does).
        x_zero_point: the input's zero point (int).
        weight: int8 ``(O, C / groups, kh, kw)`` (symmetric, zero point 0).
        bias: int32 ``(O,)`` or None, in units of ``s_x * s_w[o]``.
        stride, padding, dilation: ints or pairs, as ``torch.nn.functional.conv2d``.
        groups: int dividing C and O.
        rq: :class:`Requant` (per output channel or per tensor).
        w_absmax, bias_absmax: ``max |weight|`` and ``max |bias|`` if the caller knows them
            (modules compute them once; saves a reduction and a host sync per call);
            default: read from the tensors.

    Returns:
        ``(N, O, Ho, Wo)`` tensor of ``rq.dtype.storage`` in channels_last memory
        (``(O, Ho, Wo)``, that batch of 1 without its batch dimension, for a 3-D ``x``).

    Raises:
        TypeError: wrong dtypes or argument types.
        ValueError: shape, group or device mismatch; an accumulator that could overflow int32.
    """
    return layer_checked("conv2d", "", x, layer_checks(
        "conv2d", "", x, x_zero_point, weight, bias, rq, (stride, padding, dilation, groups),
        w_absmax=w_absmax, bias_absmax=bias_absmax))


def layer_checks(base: str, epilogue: str, x, x_zero_point, weight, bias, rq,
                 conv_args=None, *, w_absmax=None, bias_absmax=None):
    """The checks :func:`conv2d` / :func:`linear` (``base``) and their fused forms
    (``epilogue`` "" / "add" / "dequant") make of ``x`` and the layer, raising what they
    raise (not of the fused forms' extra operands); ``conv_args`` = (stride, padding,
    dilation, groups) for conv2d. Returns the ``checked`` value :func:`layer_checked`
    takes: the op's arguments after ``x`` and the output shape."""
    op = base + ("_" + epilogue if epilogue else "")
    if _unbatched(base, x):
        x = x.unsqueeze(0)
    if base == "conv2d":
        stride, padding, dilation, groups = conv_args
        zp, stride, padding, dilation, shape = _conv_args(
            op, x, x_zero_point, weight, bias, stride, padding, dilation, groups, rq,
            w_absmax, bias_absmax)
        return (zp, weight, bias, stride, padding, dilation, groups, rq), shape
    zp, shape = _linear_args(op, x, x_zero_point, weight, bias, rq, w_absmax, bias_absmax)
    return (zp, weight, bias, rq), shape


def layer_checked(base: str, epilogue: str, x, checked, *extra):
    """Run ``base`` ("conv2d" / "linear") or its fused form ``epilogue`` ("add": ``extra``
    residual, add params; "dequant": ``extra`` scale; both checked here) on ``x`` after
    :func:`layer_checks` gave ``checked`` for an input of ``x``'s shape, dtype and device.
    A quantized module keeps ``checked`` per input shape (its weights are constants), so
    a call costs the host only the dispatch."""
    if _unbatched(base, x):
        return _unbatched_conv(epilogue, x, checked, extra)
    args, shape = checked
    args = (x,) + args
    if not epilogue:
        return get_op(base, x)(*args)
    op = base + "_" + epilogue
    if epilogue == "add":
        residual, add_params = extra
        storage = args[-1].dtype.storage
        if storage not in (torch.int8, torch.uint8):  # the add takes 8-bit operands
            raise ValueError(f"{op}: the {base}'s output (rq.dtype {args[-1].dtype.name}) "
                             f"must be 8-bit (qint8, quint8 or their narrow forms) to add "
                             f"a residual to it")
        _check_add_params(op, storage, residual, add_params)
        _same_device(op, x, residual)
        return _compose_or_fused(op, base, x, _same_shape(op, shape, residual.shape),
                                 args + (residual, add_params))
    if epilogue != "dequant":
        raise ValueError(f"{op}: unknown epilogue {epilogue!r}; allowed: '', 'add', 'dequant'")
    (scale,) = extra
    _check_scale(op, scale)
    return _compose_or_fused(op, base, x, True, args + (scale,))


def _unbatched(base: str, x) -> bool:
    """Whether ``x`` is an unbatched ``(C, H, W)`` input of conv2d (or a fused form)."""
    return base == "conv2d" and isinstance(x, torch.Tensor) and x.dim() == 3


def _unbatched_conv(epilogue: str, x, checked, extra):
    """:func:`layer_checked` of conv2d on an unbatched ``(C, H, W)`` ``x``, as torch's conv2d
    runs one: the batch of 1 ``x[None]`` (the same bytes), its output without the batch
    dimension. A residual of at most 3 dimensions is given one too; a 4-D residual
    broadcasts the output to its own batch, which is kept (as torch's add of the two)."""
    squeeze = True
    if epilogue == "add" and extra and isinstance(extra[0], torch.Tensor):
        squeeze = extra[0].dim() <= 3
        if squeeze:
            extra = (extra[0].unsqueeze(0),) + tuple(extra[1:])
    y = layer_checked("conv2d", epilogue, x.unsqueeze(0), checked, *extra)
    return y.squeeze(0) if squeeze else y


def _linear_args(op, x, x_zero_point, weight, bias, rq, w_absmax, bias_absmax):
    """Checks of :func:`linear` (shared by the fused forms); returns the zero point and the
    output shape."""
    _check_act(x, op)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least one dimension")
    zp = _check_zp(x_zero_point, x.dtype, op)
    _check_weight(weight, 2, op)
    o, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"{op}: x has {x.shape[-1]} features in its last dimension, weight "
                         f"{tuple(weight.shape)} expects {k}")
    _check_bias(bias, o, op)
    _check_rq(rq, op, o)
    _same_device(op, x, weight, bias)
    check_accumulator_range(k, x.dtype, zp, weight if w_absmax is None else w_absmax,
                            bias if bias_absmax is None else bias_absmax, op=op)
    return zp, (*x.shape[:-1], o)


@eager_under_compile
def linear(x, x_zero_point, weight, bias, rq, *, w_absmax=None, bias_absmax=None):
    """Integer fully connected layer on the last dimension: ``requant(sum((x - zp_x) * w) + bias)``.

    Args:
        x: int8 / uint8 ``(..., K)``; weight: int8 ``(O, K)``; bias: int32 ``(O,)`` or None;
        rq: :class:`Requant` (per output feature or per tensor); w_absmax, bias_absmax: as
        :func:`conv2d`.

    Returns:
        ``(..., O)`` of ``rq.dtype.storage``.

    Raises:
        TypeError, ValueError: as :func:`conv2d`.
    """
    return layer_checked("linear", "", x, layer_checks(
        "linear", "", x, x_zero_point, weight, bias, rq, w_absmax=w_absmax,
        bias_absmax=bias_absmax))


@eager_under_compile
def add(a, b, params):
    """Integer addition with TFLite's reference semantics (shapes broadcast).

    Args:
        a, b: int8 / uint8 tensors; params: :class:`AddParams` (``make_add_params``).

    Raises:
        TypeError: wrong dtypes; ValueError: shapes that do not broadcast, device mismatch.
    """
    op = "add"
    _check_act(a, op, "a")
    _check_act(b, op, "b")
    if not isinstance(params, AddParams):
        raise TypeError(f"{op}: params must be a gpuquant.functional.AddParams, got "
                        f"{type(params).__name__}")
    _check_zp(params.a_zero_point, a.dtype, op, "a's zero point")
    _check_zp(params.b_zero_point, b.dtype, op, "b's zero point")
    _broadcast(op, a, b)
    return get_op("add", a)(a, b, params)


def _check_add_params(op, a_dtype, b, params) -> None:
    """The checks :func:`add` makes, for a first operand of dtype ``a_dtype`` (the fused
    forms' conv / linear output) and a second operand ``b``."""
    _check_act(b, op, "residual")
    if not isinstance(params, AddParams):
        raise TypeError(f"{op}: add_params must be a gpuquant.functional.AddParams, got "
                        f"{type(params).__name__}")
    _check_zp(params.a_zero_point, a_dtype, op, "add_params' first-operand zero point")
    _check_zp(params.b_zero_point, b.dtype, op, "add_params' residual zero point")


def _compose_or_fused(name, base, x, same_shape, args):
    """Run the fused op ``name`` of the backend that runs ``base`` when it has one and
    ``same_shape`` holds (fused kernels take an operand of the output's own shape), else the
    composition of the base ops (same bytes: :mod:`gpuquant.backends.fused`)."""
    fn = fused_op(name, base, x) if same_shape else None
    if fn is None:
        fn = _composed(x)[name]
    return fn(*args)


class _OpsOn:
    """``ops[name]`` = the op :func:`get_op` picks for ``device`` (for compositions)."""

    def __init__(self, device):
        self.device = device

    def __getitem__(self, name):
        return get_op(name, self.device)


def _composed(x) -> dict:
    return compose(_OpsOn(x))


@eager_under_compile
def conv2d_add(x, x_zero_point, weight, bias, stride, padding, dilation, groups, rq, residual,
               add_params, *, w_absmax=None, bias_absmax=None):
    """``add(conv2d(x, ...), residual, add_params)`` in one pass where the backend has the
    fused kernel (a residual block's add in the conv's epilogue): same bytes either way.

    Args:
        x ... rq, w_absmax, bias_absmax: as :func:`conv2d`.
        residual: int8 / uint8 tensor broadcastable to the conv's output (the add's second
            operand; the conv output is its first).
        add_params: :class:`AddParams` of that add (``make_add_params``).

    Raises:
        TypeError, ValueError: as :func:`conv2d` and :func:`add`.
    """
    return layer_checked("conv2d", "add", x, layer_checks(
        "conv2d", "add", x, x_zero_point, weight, bias, rq, (stride, padding, dilation, groups),
        w_absmax=w_absmax, bias_absmax=bias_absmax), residual, add_params)


@eager_under_compile
def linear_add(x, x_zero_point, weight, bias, rq, residual, add_params, *, w_absmax=None,
               bias_absmax=None):
    """``add(linear(x, ...), residual, add_params)``, fused where the backend can (see
    :func:`conv2d_add`; arguments as :func:`linear` plus ``residual``, ``add_params``)."""
    return layer_checked("linear", "add", x, layer_checks(
        "linear", "add", x, x_zero_point, weight, bias, rq, w_absmax=w_absmax,
        bias_absmax=bias_absmax), residual, add_params)


def _check_scale(op, scale) -> None:
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1 or not scale.dtype.is_floating_point:
            raise TypeError(f"{op}: scale must be a float or a one-element float tensor, got "
                            f"{scale.dtype} of shape {tuple(scale.shape)}")
        if scale.device.type != "cpu":  # no host sync per call: checked where it is made
            return
        v = float(scale.detach().reshape(()))
    elif isinstance(scale, (int, float)) and not isinstance(scale, bool):
        v = float(scale)
    else:
        raise TypeError(f"{op}: scale must be a float, got {type(scale).__name__}")
    # used in float32 (as QParams' scales): the float32 value and its reciprocal must be
    # finite and > 0 (1e300 would make inf, 1e-300 zero)
    try:
        s32 = _struct.unpack("f", _struct.pack("f", v))[0] if v == v else -1.0
    except OverflowError:
        s32 = float("inf")
    if not (_MIN_SCALE <= s32 < float("inf")):
        raise ValueError(f"{op}: scale must be positive and finite in float32 with a finite "
                         f"float32 reciprocal (about 2.94e-39 to 3.4e38), got {v}")


@eager_under_compile
def conv2d_dequant(x, x_zero_point, weight, bias, stride, padding, dilation, groups, rq, scale,
                   *, w_absmax=None, bias_absmax=None):
    """``dequantize(conv2d(x, ...))`` as float32 ``(y - rq.zero_point) * scale`` (a network's
    last layer), fused where the backend can; arguments as :func:`conv2d` plus the output
    ``scale`` (a float or a one-element tensor)."""
    return layer_checked("conv2d", "dequant", x, layer_checks(
        "conv2d", "dequant", x, x_zero_point, weight, bias, rq,
        (stride, padding, dilation, groups), w_absmax=w_absmax, bias_absmax=bias_absmax), scale)


@eager_under_compile
def linear_dequant(x, x_zero_point, weight, bias, rq, scale, *, w_absmax=None, bias_absmax=None):
    """``dequantize(linear(x, ...))`` as float32, fused where the backend can (see
    :func:`conv2d_dequant`)."""
    return layer_checked("linear", "dequant", x, layer_checks(
        "linear", "dequant", x, x_zero_point, weight, bias, rq, w_absmax=w_absmax,
        bias_absmax=bias_absmax), scale)


def _broadcast_shape(op, a_shape, b_shape, what: str = "shapes") -> tuple:
    """The broadcast of two shapes, or ValueError naming them. ``torch.broadcast_shapes``
    costs ~20 us a call: asked only when the shapes differ (not for a residual block's add)."""
    a_shape, b_shape = tuple(a_shape), tuple(b_shape)
    if a_shape == b_shape:
        return a_shape
    try:
        return tuple(torch.broadcast_shapes(a_shape, b_shape))
    except RuntimeError:
        raise ValueError(f"{op}: {what} {a_shape} and {b_shape} do not broadcast") from None


def _broadcast(op, a, b):
    _same_device(op, a, b)
    return _broadcast_shape(op, a.shape, b.shape)


def _same_shape(op, out_shape, res_shape) -> bool:
    """Whether the residual has the output's own shape (what the fused kernels take); else
    it must broadcast with it (the composition handles that), or ValueError."""
    return _broadcast_shape(op, out_shape, res_shape, "output and residual shapes") == \
        tuple(out_shape) == tuple(res_shape)


@eager_under_compile
def mul(a, a_zero_point, b, b_zero_point, rq):
    """Integer multiplication (TFLite ``Mul``): ``requant((a - zp_a) * (b - zp_b))``.

    Raises:
        TypeError, ValueError: as :func:`add`.
    """
    op = "mul"
    _check_act(a, op, "a")
    _check_act(b, op, "b")
    za = _check_zp(a_zero_point, a.dtype, op, "a's zero point")
    zb = _check_zp(b_zero_point, b.dtype, op, "b's zero point")
    _check_rq(rq, op)
    _broadcast(op, a, b)
    return get_op("mul", a)(a, za, b, zb, rq)


@eager_under_compile
def lookup(x, table):
    """Map every code of ``x`` through ``table``: ``y[i] = table[x[i] - storage_min]`` (the
    int8 form of a pointwise function: :class:`gpuquant.nn.quantized.Activation`).

    Args:
        x: int8 / uint8 quantized activation (any shape and layout; a 4-D one comes back
            channels_last, as the other integer ops return activations).
        table: a 1-D int8 / uint8 tensor of 256 entries on ``x``'s device, one per storage
            value of ``x`` (int8: entry ``q + 128``; uint8: entry ``q``), so that no code
            can index outside it.

    Returns:
        A tensor of ``x``'s shape and ``table``'s dtype.

    Raises:
        TypeError: ``x`` or ``table`` not an int8 / uint8 tensor.
        ValueError: ``table`` not 1-D with 256 entries, or on another device than ``x``.
    """
    op = "lookup"
    _check_act(x, op, "x")
    if not isinstance(table, torch.Tensor) or table.dtype not in _ACT_DTYPES:
        raise TypeError(f"{op}: table must be an int8 or uint8 tensor of the 256 output codes, "
                        f"got {getattr(table, 'dtype', type(table).__name__)}")
    if table.dim() != 1 or table.shape[0] != 256:
        raise ValueError(f"{op}: table must be 1-D with 256 entries (one per storage value of "
                         f"x), got shape {tuple(table.shape)}")
    _same_device(op, x, table)
    return get_op("lookup", x)(x, table)


@eager_under_compile
def concat(xs, zero_points, rqs, dim, out_dtype):
    """Concatenate quantized tensors into one output's qparams.

    Args:
        xs: int8 / uint8 tensors, same shape except along ``dim``.
        zero_points: their zero points.
        rqs: per input a per-tensor :class:`Requant` to the output's qparams, or None to copy
            (the input already has the output's qparams).
        dim: concatenation dimension.
        out_dtype: the output's :class:`gpuquant.QuantDtype`.

    Raises:
        TypeError, ValueError: wrong dtypes, lengths, shapes or devices.
    """
    op = "concat"
    xs = list(xs)
    if not xs:
        raise ValueError(f"{op}: needs at least one tensor")
    if not isinstance(out_dtype, QuantDtype):
        raise TypeError(f"{op}: out_dtype must be a gpuquant.QuantDtype, got {out_dtype!r}")
    if len(zero_points) != len(xs) or len(rqs) != len(xs):
        raise ValueError(f"{op}: {len(xs)} tensors but {len(zero_points)} zero points and "
                         f"{len(rqs)} requants")
    zps = []
    for i, (x, zp, rq) in enumerate(zip(xs, zero_points, rqs)):
        _check_act(x, op, f"xs[{i}]")
        zps.append(_check_zp(zp, x.dtype, op, f"xs[{i}]'s zero point"))
        if rq is None:
            if x.dtype != out_dtype.storage:
                raise TypeError(f"{op}: xs[{i}] is {x.dtype} and copied as is, but the output is "
                                f"{out_dtype.storage}")
        else:
            _check_rq(rq, op)
            if rq.dtype.storage != out_dtype.storage or rq.per_channel:
                raise ValueError(f"{op}: rqs[{i}] must be a per-tensor requantization to the "
                                 f"output dtype {out_dtype.name}, got "
                                 f"{'a per-channel one to ' if rq.per_channel else ''}"
                                 f"{rq.dtype.name}")
    if out_dtype.storage not in (torch.int8, torch.uint8):
        raise ValueError(f"{op}: out_dtype must be an 8-bit dtype, got {out_dtype.name}")
    _same_device(op, *xs)
    nd = xs[0].dim()
    if isinstance(dim, bool) or not isinstance(dim, int) or not -nd <= dim < nd:
        raise ValueError(f"{op}: dim must be an int in [{-nd}, {nd - 1}], got {dim!r}")
    d = dim % nd
    for i, x in enumerate(xs):
        if x.dim() != nd or any(x.shape[j] != xs[0].shape[j] for j in range(nd) if j != d):
            raise ValueError(f"{op}: xs[{i}] has shape {tuple(x.shape)}, incompatible with "
                             f"{tuple(xs[0].shape)} outside dim {d}")
    return get_op("concat", xs[0])(xs, zps, list(rqs), d, out_dtype.storage)


def _takes_unbatched(fn):
    """``fn`` (a pool of a 4-D ``x``) taking an unbatched ``(C, H, W)`` ``x`` too, as torch's
    pools and the QAT modules do: run as the batch of 1 ``x[None]`` (the same bytes), the
    output without its batch dimension."""
    @functools.wraps(fn)
    def pool(x, *args, **kwargs):
        if isinstance(x, torch.Tensor) and x.dim() == 3:
            return fn(x.unsqueeze(0), *args, **kwargs).squeeze(0)
        return fn(x, *args, **kwargs)
    return pool


@eager_under_compile
@_takes_unbatched
def max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
    """Max pooling on the integers (the output keeps the input's qparams). A window that
    lies entirely in the padding (possible with dilation or ceil_mode) gives the storage
    dtype's minimum (-128 / 0): the max of nothing is -inf, clamped to the representable
    range (docs/NUMERICS.md). An unbatched ``(C, H, W)`` ``x`` runs as a batch of 1.

    Raises:
        TypeError: not an int8 / uint8 tensor; ValueError: bad window arguments, or a
        (dilated) window larger than the padded input (no output).
    """
    op = "max_pool2d"
    _check_nchw(x, op, _NCHW_OR_CHW)
    d = _pair(dilation, "dilation", op)
    k, s, p = _pool_window(x, kernel_size, stride, padding, op, d, bool(ceil_mode))
    return get_op("max_pool2d", x)(x, k, s, p, d, bool(ceil_mode))


@eager_under_compile
@_takes_unbatched
def avg_pool2d(x, zero_point, kernel_size, stride=None, padding=0, ceil_mode=False,
               count_include_pad=True, divisor_override=None, qmin=None, qmax=None):
    """Integer average pooling (TFLite rounding; PyTorch's divisor rules).

    Args:
        x: int8 / uint8 ``(N, C, H, W)`` or unbatched ``(C, H, W)`` (run as a batch of 1);
        zero_point: its zero point; the window arguments as
        ``torch.nn.functional.avg_pool2d``; qmin, qmax: the output clamp (default: the
        storage dtype's range).

    Raises:
        TypeError, ValueError: as :func:`max_pool2d`; ValueError also for a zero point
        outside the dtype's range or a clamp not with ``lo <= qmin <= qmax <= hi``.
    """
    op = "avg_pool2d"
    _check_nchw(x, op, _NCHW_OR_CHW)
    zp = _check_zp(zero_point, x.dtype, op)
    k, s, p = _pool_window(x, kernel_size, stride, padding, op, ceil_mode=bool(ceil_mode))
    if divisor_override is not None and (not isinstance(divisor_override, int)
                                         or isinstance(divisor_override, bool)
                                         or not 1 <= divisor_override < 2 ** 63):
        # (an int64, as torch's: Triton read 2^63 as a negative divisor, 127 everywhere)
        raise ValueError(f"{op}: divisor_override must be None or a positive int below 2^63, "
                         f"got {divisor_override!r}")
    qmin, qmax = _clamp_range(x.dtype, qmin, qmax, op)
    return get_op("avg_pool2d", x)(x, zp, k, s, p, bool(ceil_mode), bool(count_include_pad),
                                   divisor_override, qmin, qmax)


@eager_under_compile
@_takes_unbatched
def adaptive_avg_pool2d(x, zero_point, output_size, qmin=None, qmax=None):
    """Integer adaptive average pooling (PyTorch's windows, TFLite rounding).

    Args:
        x: int8 / uint8 ``(N, C, H, W)`` or unbatched ``(C, H, W)``; zero_point: its zero
        point; output_size: int or pair (None entries keep the input size); qmin, qmax:
        the output clamp.

    Raises:
        TypeError, ValueError: as :func:`avg_pool2d`.
    """
    op = "adaptive_avg_pool2d"
    _check_nchw(x, op, _NCHW_OR_CHW)
    zp = _check_zp(zero_point, x.dtype, op)
    if isinstance(output_size, (tuple, list)):
        if len(output_size) != 2:
            raise ValueError(f"{op}: output_size must be an int or a pair, got {output_size!r}")
        oh, ow = output_size
    else:
        oh = ow = output_size
    size = (x.shape[2] if oh is None else oh, x.shape[3] if ow is None else ow)
    size = _pair(size, "output_size", op)
    if x.shape[2] == 0 or x.shape[3] == 0:  # (as torch: no window to average)
        raise ValueError(f"{op}: input spatial size must be non-empty, got shape "
                         f"{tuple(x.shape)}")
    qmin, qmax = _clamp_range(x.dtype, qmin, qmax, op)
    return get_op("adaptive_avg_pool2d", x)(x, zp, size, qmin, qmax)


_NEAREST_MODES = ("nearest", "nearest-exact")


def upsample_args(op: str, size, scale_factor):
    """``(size, scale_factor)`` of a resize as pairs (the other None), validated: exactly one
    given; ``size`` an int or a pair of ints >= 1, ``scale_factor`` a float or a pair of
    finite floats > 0.

    Raises:
        TypeError, ValueError: naming the bad value."""
    if (size is None) == (scale_factor is None):
        raise ValueError(f"{op}: give exactly one of size and scale_factor, got size={size!r}, "
                         f"scale_factor={scale_factor!r}")
    if size is not None:
        return _pair(size, "size", op), None
    sf = tuple(scale_factor) if isinstance(scale_factor, (tuple, list)) else \
        (scale_factor, scale_factor)
    if len(sf) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in sf):
        raise TypeError(f"{op}: scale_factor must be a float or a pair of floats, got "
                        f"{scale_factor!r}")
    if any(not math.isfinite(v) or v <= 0 for v in sf):
        raise ValueError(f"{op}: scale_factor must be finite and > 0, got {scale_factor!r}")
    return None, tuple(float(v) for v in sf)


def upsample_output_size(op: str, in_hw, size, scale_factor):
    """The output ``(H, W)`` of a resize of ``in_hw`` as ``torch.nn.functional.interpolate``
    computes it (``size``, or ``floor(in * scale_factor)`` in float64) and the scale factors
    its index formula uses (``(None, None)`` where the size decides); arguments as
    :func:`upsample_args`.

    Raises:
        TypeError, ValueError: bad arguments, an input without pixels (as torch's resize
            refuses it: there is no pixel to copy), or an output size below 1."""
    size, sf = upsample_args(op, size, scale_factor)
    if min(int(v) for v in in_hw) < 1:
        raise ValueError(f"{op}: input spatial size {tuple(int(v) for v in in_hw)} has no "
                         f"pixels to resize (H and W must be >= 1)")
    if size is not None:
        return size, (None, None)
    out = tuple(int(math.floor(float(n) * v)) for n, v in zip(in_hw, sf))
    if min(out) < 1 or max(out) > _GEOMETRY_MAX:
        raise ValueError(f"{op}: scale_factor {scale_factor!r} gives an output size {out} "
                         f"from {tuple(int(v) for v in in_hw)}; it must be between 1 and "
                         f"2^31 - 1")
    return out, sf


def check_nearest(op: str, size, scale_factor, mode, recompute_scale_factor) -> None:
    """The arguments of a nearest-neighbour resize (:func:`upsample_nearest2d`, the
    ``Upsample`` modules), validated as :func:`upsample_args` plus ``mode`` one of
    ``"nearest"`` / ``"nearest-exact"`` and ``recompute_scale_factor`` None or a bool.

    Raises:
        TypeError, ValueError: naming the bad value."""
    if mode not in _NEAREST_MODES:
        raise ValueError(f"{op}: mode must be one of {_NEAREST_MODES} (the int8 form copies "
                         f"codes; interpolating modes would need rounding), got {mode!r}")
    if recompute_scale_factor is not None and not isinstance(recompute_scale_factor, bool):
        raise TypeError(f"{op}: recompute_scale_factor must be None or a bool, got "
                        f"{recompute_scale_factor!r}")
    if recompute_scale_factor and size is not None:  # (torch's interpolate refuses it)
        raise ValueError(f"{op}: recompute_scale_factor=True is not meaningful with an "
                         f"explicit size ({size!r}); give scale_factor instead")
    upsample_args(op, size, scale_factor)


@functools.lru_cache(maxsize=256)
def _nearest_index(in_size: int, out_size: int, scale, exact: bool, device: str):
    from ..backends.numpy.pool import nearest_source_index
    # (a normal tensor even when first asked for inside torch.inference_mode: the QAT
    # module's indexing saves it for backward)
    with torch.inference_mode(False):
        return torch.from_numpy(nearest_source_index(in_size, out_size, scale,
                                                     exact)).to(device)


@eager_under_compile
def upsample_nearest2d(x, size=None, scale_factor=None, mode: str = "nearest",
                       recompute_scale_factor=None):
    """Nearest-neighbour resize of a quantized ``(N, C, H, W)`` activation, the arguments and
    the output's pixels as ``torch.nn.functional.interpolate(x, size, scale_factor, mode,
    recompute_scale_factor=...)`` gives them for a float tensor (``mode`` ``"nearest"`` or
    ``"nearest-exact"``); the output keeps the input's qparams (a copy of its codes),
    channels_last.

    Raises:
        TypeError: ``x`` not an int8 / uint8 tensor, bad argument types.
        ValueError: ``x`` not 4-D, another mode, both or neither of size and scale_factor,
            or an output size below 1.
    """
    op = "upsample_nearest2d"
    _check_nchw(x, op)
    ih, iw = nearest_indices(op, x, size, scale_factor, mode, recompute_scale_factor)
    return get_op("gather_hw", x)(x, ih, iw)


def gather_nearest(x, indices):
    """:func:`upsample_nearest2d` with the source indices given (``indices``: the pair
    :func:`nearest_indices` returned for this ``x``'s size, which the int8 ``Upsample``
    holds per input size: its CUDA graphs keep reading them)."""
    _check_nchw(x, "upsample_nearest2d")
    return get_op("gather_hw", x)(x, *indices)


def nearest_indices(op: str, x, size, scale_factor, mode, recompute_scale_factor):
    """The row and column source indices (int64 tensors on ``x``'s device) of a nearest
    resize of the 4-D ``x`` (:func:`upsample_nearest2d`'s arguments, checked): what the int8
    op gathers and what the QAT ``Upsample`` indexes, so the two pick the same pixels on
    every device (torch's own CPU kernel sometimes copies or halves instead of its formula:
    :func:`~gpuquant.backends.numpy.pool.nearest_source_index`). Cached for the 256 most
    recent sizes; the modules hold theirs (a table evicted here stays alive there)."""
    check_nearest(op, size, scale_factor, mode, recompute_scale_factor)
    (oh, ow), (sh, sw) = upsample_output_size(op, x.shape[2:], size, scale_factor)
    if recompute_scale_factor:
        sh = sw = None
    exact = mode == "nearest-exact"
    dev = str(x.device)
    return (_nearest_index(int(x.shape[2]), oh, sh, exact, dev),
            _nearest_index(int(x.shape[3]), ow, sw, exact, dev))
