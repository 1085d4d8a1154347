"""QuantizedModule: the base of the integer (inference-only) modules.

Quantized activations between modules are plain int8 / uint8 tensors (channels_last for
4-D); each quantized module stores, from conversion, the qparams of its inputs and of its
output as buffers (``<name>_scale``, ``<name>_zero_point``; the dtype names in the module's
extra state), so ``state_dict`` round-trips exactly. Fixed-point requantization parameters
are derived from those buffers once (cached per device, rebuilt when a buffer they are built
from is edited in place or replaced, and after ``load_state_dict``). The qparam scales stay
float32 under floating casts (``.half()``, ``.to(torch.bfloat16)``): they define the integer
arithmetic, not the dtype of the model's float inputs.
"""
from __future__ import annotations

import operator
import warnings
from typing import Dict, Optional

import torch
import torch.fx

from ... import functional as GF
from ...functional import integer as _integer
from ..._tensors import keep_dtype_of, version as _version
from ...dtypes import get_dtype, qint32
from ...qparams import QParams
from ..._compile import EagerUnderCompile
from ..module import Module

__all__ = ["QuantizedModule", "WeightedModule", "QuantizedTracer", "placeholder_qparams",
           "quantize_weight_bias"]


def placeholder_qparams(dtype) -> QParams:
    """Scale 1 and a mid-range zero point: what an empty module holds until
    ``from_qat_module`` or ``load_state_dict`` sets the real qparams."""
    d = get_dtype(dtype)
    return QParams(d, 1.0, 0 if d.signed else (d.qmin + d.qmax + 1) // 2)


_VERSION_OF = operator.attrgetter("_version")


class QuantizedModule(EagerUnderCompile, Module):
    """Base of ``gpuquant.nn.quantized``: inference only (``train(True)`` raises)."""

    def __init__(self):
        super().__init__()
        self.training = False
        self._dtypes: Dict[str, str] = {}
        self._cache: dict = {}

    # ------------------------------------------------------------------ mode
    def train(self, mode: bool = True):
        if mode:
            raise RuntimeError(f"{type(self).__name__} is a quantized (int8, inference-only) "
                               f"module and cannot be put in training mode; train the QAT model "
                               f"(gpuquant.quantization.quantize_qat) and convert it again")
        return super().train(False)

    def _check_mode(self) -> None:
        if torch.jit.is_tracing():
            raise NotImplementedError(
                f"{type(self).__name__}: gpuquant's int8 modules cannot be recorded by "
                f"torch.jit.trace (their integer ops check sizes and values on the host, and "
                f"the NumPy backend computes outside torch); to deploy, use "
                f"gpuquant.export.to_onnx or gpuquant.save / gpuquant.load; for speed on the "
                f"GPU, torch.compile (the int8 modules run eagerly inside it)")
        if self.training:
            raise RuntimeError(f"{type(self).__name__} is a quantized (inference-only) module but "
                               f"its training flag is set; call .eval()")

    # ------------------------------------------------------------------ qparams as buffers
    def _set_qparams(self, name: str, qp: QParams) -> None:
        """Hold ``qp`` as the buffers ``{name}_scale`` / ``{name}_zero_point``. Validated here
        as :class:`~gpuquant.QParams` validates (scale finite, > 0, with a finite float32
        reciprocal; zero point in range): learned fake quants and observers hand theirs over
        unvalidated (``QParams.trusted``: no host read while training), and a TQT threshold
        trained below float32's range would otherwise fail at the int8 model's first call.

        Raises:
            ValueError: naming ``name`` (``input``, ``output``, ...) and QParams' reason.
        """
        try:
            QParams(qp.dtype, qp.scale, qp.zero_point, axis=qp.axis)
        except ValueError as e:
            raise ValueError(f"its {name} qparams: {e}") from None
        self._dtypes[name] = qp.dtype.name
        scale = qp.scale.detach().to(torch.float32).clone()
        zp = qp.zero_point.detach().to(torch.int32).clone()
        for suffix, t in (("scale", scale), ("zero_point", zp)):
            key = f"{name}_{suffix}"
            if key in self._buffers:
                self._buffers[key] = t.to(self._buffers[key].device) \
                    if self._buffers[key] is not None else t
            else:
                self.register_buffer(key, t)
        self._cache.clear()

    def _qparams(self, name: str) -> QParams:
        scale = getattr(self, f"{name}_scale")
        zp = getattr(self, f"{name}_zero_point")
        return QParams(self._dtypes[name], scale, zp, axis=0 if scale.dim() == 1 else None)

    def _cached(self, key, device, build, deps=None):
        """``build()`` (moved to ``device``), cached per ``key`` and device while the tensors
        it is built from, ``deps``, are the same objects at the same version: an in-place
        edit or a newly assigned tensor rebuilds it. Default ``deps``: the module's buffers
        and its submodules' (a fused module reads its parts' qparams)."""
        if deps is None:
            deps = [*self._buffers.values()]
            for m in self._modules.values():
                if m is not None:
                    deps += m._buffers.values()
        deps = tuple(deps)
        try:  # C-level loops: this runs on every module call
            stamp = tuple(map(id, deps)) + tuple(map(_VERSION_OF, deps))
        except (AttributeError, RuntimeError):  # a None bias, inference tensors
            stamp = tuple([(id(t), _version(t)) for t in deps if t is not None])
        k = (key, device)
        hit = self._cache.get(k)
        if hit is not None and hit[0] == stamp:
            return hit[2]
        v = build()
        if hasattr(v, "to"):
            v = v.to(device)
        self._cache[k] = (stamp, deps, v)  # deps held so that their ids stay unique
        return v

    def _zp(self, name: str, device) -> int:
        """The zero point ``name`` as a Python int (read from the buffer once: no host sync
        per call)."""
        return self._cached(("zp", name), device, lambda: int(getattr(self, f"{name}_zero_point")))

    def _bounds(self, device) -> dict:
        """``max |weight|`` and ``max |bias|`` as ints for the accumulator-range check (read
        once per version of the two tensors: an in-place edit is read again)."""
        b = getattr(self, "bias", None)

        def build():
            w = self.weight.to(torch.int32)  # int8 abs(-128) would wrap
            return {"w_absmax": int(w.abs().max()) if w.numel() else 0,
                    "bias_absmax": int(b.to(torch.int64).abs().max())
                    if b is not None and b.numel() else 0}
        return dict(self._cached("bounds", device, build, (self.weight, b)))

    def get_extra_state(self):
        return {"dtypes": dict(self._dtypes)}

    def set_extra_state(self, state) -> None:
        if not isinstance(state, dict) or not isinstance(state.get("dtypes"), dict):
            keys = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"{type(self).__name__}: the state_dict's extra state ({keys}) is "
                             f"not a quantized module's (it holds 'dtypes'); a QAT model's "
                             f"state_dict loads into the QAT model, then quantize() converts it")
        self._dtypes = {k: get_dtype(v).name for k, v in state["dtypes"].items()}
        self._cache.clear()

    def _load_from_state_dict(self, *args, **kwargs):
        self._cache.clear()
        out = super()._load_from_state_dict(*args, **kwargs)
        # an inference tensor (made under torch.inference_mode) has no version counter, and
        # the backends' caches (packed weights, column sums) key it on identity and storage:
        # loaded in place it would keep the old weights' packs; new storage voids them
        for name, t in self._buffers.items():
            if t is not None and t.is_inference():
                with torch.inference_mode():
                    self._buffers[name] = t.clone()
        return out

    def _apply(self, fn, *args, **kwargs):
        # the qparam scales keep their float32 dtype under floating casts (.half(),
        # .to(torch.bfloat16)) and follow device moves
        self._cache.clear()
        scales = [self._buffers.get(f"{name}_scale") for name in self._dtypes]
        return super()._apply(keep_dtype_of(fn, scales), *args, **kwargs)

    # ------------------------------------------------------------------ input checks
    def _check_input(self, x, name: str = "input", device: Optional[torch.device] = None):
        """x must be the int8 / uint8 storage of the stored input dtype, on ``device``."""
        self._check_mode()
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{type(self).__name__}: input must be a torch.Tensor, got "
                            f"{type(x).__name__}")
        dt = get_dtype(self._dtypes[name])
        if x.dtype != dt.storage:
            hint = (" (float input: put a gpuquant.nn.QuantStub first)"
                    if x.dtype.is_floating_point else "")
            raise TypeError(f"{type(self).__name__}: expects a {dt.name} activation stored as "
                            f"{dt.storage}, got {x.dtype}{hint}")
        if device is not None and x.device != device:
            raise ValueError(f"{type(self).__name__}: input is on device {x.device} but the "
                             f"module's weights are on {device}; move one of them")

    @staticmethod
    def _as_layout(y: torch.Tensor) -> torch.Tensor:
        return y.contiguous(memory_format=torch.channels_last) if y.dim() == 4 else y

    @classmethod
    def from_qat_module(cls, qat_module, name: str = ""):
        raise NotImplementedError


def quantize_weight_bias(qat_module, name: str):
    """(int8 weight, int32 bias or None, weight QParams (per output channel), input QParams,
    output QParams) of a QAT conv / linear, BN folded with its running statistics.

    ``b_q = rne(b / (s_x * s_w[c]))`` computed in float64.

    Raises:
        ValueError: qparams of the wrong kind (per-channel activations, asymmetric weights,
            a 16/32-bit activation dtype) or a bias outside int32.
    """
    who = converted_name(qat_module, name)
    in_qp = qat_module.input_qparams(name)[0]
    out_qp = qat_module.get_activation_qparams()
    w_qp = qat_module.get_weight_qparams()
    for what, qp in (("input", in_qp), ("output", out_qp)):
        if qp.per_channel:
            raise ValueError(f"{who}: {what} activations must be quantized per tensor, got "
                             f"per-channel qparams")
        if qp.dtype.storage not in (torch.int8, torch.uint8):
            raise ValueError(f"{who}: {what} dtype {qp.dtype.name} is not an 8-bit activation "
                             f"dtype (int8 / uint8 storage)")
    if w_qp.dtype.storage != torch.int8 or bool((w_qp.zero_point != 0).any()):
        raise ValueError(f"{who}: weights must be symmetric signed (int8 storage, zero point 0), "
                         f"got {w_qp}")
    with torch.no_grad():
        w, b = qat_module.folded_weight_bias()
        w = w.detach().float()
        o = w.shape[0]
        if w_qp.per_channel:
            if w_qp.resolve_axis(w.dim()) != 0:
                raise ValueError(f"{who}: per-channel weight qparams must be along the output "
                                 f"channel (axis 0), got axis {w_qp.axis}")
        else:
            w_qp = QParams(w_qp.dtype, w_qp.scale.reshape(1).expand(o).clone(),
                           torch.zeros(o, dtype=torch.int32), axis=0)
        k = 1
        for d in w.shape[1:]:
            k *= int(d)
        if b is not None:
            w_qp = _bias_fitting_weight_scale(w_qp, b, in_qp, k, who)
        w_qp = QParams(w_qp.dtype, w_qp.scale.to(w.device), w_qp.zero_point.to(w.device), 0)
        w_q = GF.quantize(w, w_qp)
        b_q = None
        if b is not None:
            r = torch.round(b.detach().double().cpu() / _bias_unit(in_qp, w_qp))
            if bool((r.abs() > qint32.qmax).any()):
                raise ValueError(f"{who}: the bias does not fit int32 in units of s_x * s_w "
                                 f"(max |b / (s_x s_w)| = {float(r.abs().max()):.3g})")
            b_q = r.to(torch.int32).to(w.device)
        # the int32 accumulator's worst case is known here (shape, input range, weights,
        # bias): refused at conversion, not at the first inference. The input range is its
        # storage's (uint8 for quint4), the one the integer op checks on every call
        _integer.check_accumulator_range(k, in_qp.dtype.storage,
                                         int(in_qp.zero_point.reshape(-1)[0]),
                                         w_q, 0 if b_q is None else b_q, op=who)
    return w_q, b_q, w_qp, in_qp, out_qp


def converted_name(qat_module, name: str = "") -> str:
    """How conversion errors name a module: ``module 'name' (Class)``, or the class."""
    return f"module {name!r} ({type(qat_module).__name__})" if name else type(qat_module).__name__


def _bias_unit(in_qp: QParams, w_qp: QParams) -> torch.Tensor:
    """``s_x * s_w[c]`` in float64 (CPU): the bias's int32 unit per output channel."""
    return in_qp.scale.double().cpu() * w_qp.scale.double().cpu()


def _bias_fitting_weight_scale(w_qp: QParams, b: torch.Tensor, in_qp: QParams, k: int,
                               who: str) -> QParams:
    """``w_qp``, with the scale of each output channel whose bias would not fit the int32
    accumulator in units of ``s_x * s_w[c]`` raised until it does (a warning names them).

    That happens where the input's range was degenerate (an input that was always zero
    leaves ``s_x`` at float32's eps, 1.2e-7, and ``b / (s_x s_w)`` past 2^31 for any bias
    above ~2 ``max |w|``). Raising ``s_w[c]`` to ``|b| / (s_x L)``, L the room the worst-case
    accumulator leaves the bias (:func:`.integer.check_accumulator_range`), keeps the bias
    exact to half a unit and coarsens that channel's weights, whose products with inputs
    of at most ``max |x - zp| s_x`` change the output by at most ``k max|x - zp| s_x s_w[c]
    / 2 = k max|x - zp| |b| / (2 L)`` (~4e-5 ``|b|`` at k = 1000): far below the one output
    step the contract allows between the QAT and the int8 module."""
    b_abs = b.detach().double().cpu().abs()
    bad = b_abs / _bias_unit(in_qp, w_qp) > qint32.qmax - 0.5
    if not bool(bad.any()):
        return w_qp
    zp = int(in_qp.zero_point.reshape(-1)[0])
    # the storage's range (uint8 for quint4): the integer op checks the accumulator with it
    info = torch.iinfo(in_qp.dtype.storage)
    x_room = max(abs(info.min - zp), abs(info.max - zp))
    w_max = max(abs(w_qp.dtype.qmin), abs(w_qp.dtype.qmax))
    room = qint32.qmax - k * x_room * w_max - 1
    if room < 2 ** 24:  # no useful room: the accumulator check will name the shape
        return w_qp
    s_x = float(in_qp.scale.double().reshape(-1)[0])
    want = b_abs / (s_x * room)
    scale = w_qp.scale.detach().double().cpu().clone()
    raised = torch.where(bad, torch.maximum(scale, want), scale).float()
    # float32 rounding of the raised scales: up, so that the bias fits
    low = raised.double() < torch.where(bad, want, scale)
    raised = torch.where(low, torch.nextafter(raised, torch.tensor(float("inf"))), raised)
    chans = torch.nonzero(bad).reshape(-1).tolist()
    warnings.warn(f"{who}: the bias of output channel(s) {chans[:8]}"
                  f"{'...' if len(chans) > 8 else ''} does not fit int32 in units of s_x * s_w "
                  f"(input scale s_x = {s_x:.3g}: a degenerate input range?); their weight scale "
                  f"is raised so that it does (the weights' share of those outputs was below "
                  f"{k * x_room / (2 * room):.1e} of the bias)", stacklevel=3)
    return QParams(w_qp.dtype, raised.to(w_qp.scale.device), w_qp.zero_point, w_qp.axis)


class WeightedModule(QuantizedModule):
    """Base of the integer ``Conv2d`` and ``Linear``: an int8 weight (symmetric, per output
    channel), an int32 bias, and one fixed-point requantization from ``s_x * s_w[c]`` to the
    output's qparams with ``activation`` fused into the clamp."""

    activation = "none"

    def __init__(self, weight_shape, bias, input_dtype, output_dtype, weight_dtype):
        super().__init__()
        out = weight_shape[0]
        self.register_buffer("weight", torch.zeros(*weight_shape, dtype=torch.int8))
        self.register_buffer("bias", torch.zeros(out, dtype=torch.int32) if bias else None)
        self._set_qparams("weight", QParams(weight_dtype, torch.ones(out),
                                            torch.zeros(out, dtype=torch.int32), 0))
        for name, dt in (("input", input_dtype), ("output", output_dtype)):
            self._set_qparams(name, placeholder_qparams(dt))

    def _load_converted(self, w_q, b_q, w_qp, in_qp, out_qp, who: str = "") -> "WeightedModule":
        """Take :func:`quantize_weight_bias`'s results (on the weight's device); returns self.
        The requantization is built here, so that scales it cannot take (a multiplier past
        2^30) fail the conversion naming the module, not its first call.

        Raises:
            ValueError: :func:`gpuquant.functional.make_requant`'s, prefixed with ``who``."""
        self.to(w_q.device)
        self.weight = w_q
        if b_q is not None:
            self.bias = b_q
        self._set_qparams("weight", w_qp)
        self._set_qparams("input", in_qp)
        self._set_qparams("output", out_qp)
        try:
            self.requant(w_q.device)
        except ValueError as e:
            raise ValueError(f"{who or type(self).__name__}: {e}") from None
        return self

    def _run_layer(self, base: str, x, epilogue: str, extra: tuple, conv_args=None):
        """The integer op ``base`` ("conv2d" / "linear") of ``x``, or its fused form
        (``epilogue`` "add" / "dequant" with ``extra``), through
        :func:`gpuquant.functional.integer.layer_checked`.

        The functional op's checks of ``x`` against the layer (shape, channels, zero point,
        the accumulator range) and the requantization parameters are built once per input
        shape and dtype, and again when one of the layer's buffers (weight, bias, scales,
        zero points) is assigned anew or edited in place (:meth:`_cached`). ``extra`` is
        checked every call."""
        w, b = self.weight, self.bias
        self._check_input(x, "input", w.device)

        def build():
            return _integer.layer_checks(base, epilogue, x, self._zp("input", x.device), w, b,
                                         self.requant(x.device), conv_args,
                                         **self._bounds(x.device))
        # (the layer's arguments and activation in the key: a module edited after its first
        # call, m.padding = ..., is checked and run with its new geometry)
        key_args = None if conv_args is None else tuple(
            tuple(a) if isinstance(a, list) else a for a in conv_args)  # (hashable)
        checked = self._cached(("checked", epilogue, x.shape, x.dtype, key_args,
                                self.activation), x.device, build)
        return _integer.layer_checked(base, epilogue, x, checked, *extra)

    def requant(self, device):
        """The fixed-point requantization parameters on ``device`` (cached)."""
        def build():
            out = self._qparams("output")
            return GF.make_requant(self.input_scale, self.weight_scale, float(out.scale),
                                   int(out.zero_point), out.dtype, self.activation)
        return self._cached(("rq", self.activation), device, build)


class QuantizedTracer(torch.fx.Tracer):
    """``torch.fx`` tracer for converted models (export, epilogue fusion): quantized modules
    and every module without children are leaves (so an unsupported layer shows up as one
    call); containers are traced through."""

    def is_leaf_module(self, m, qualname):
        if isinstance(m, QuantizedModule) or next(m.children(), None) is None:
            return True
        return super().is_leaf_module(m, qualname)
