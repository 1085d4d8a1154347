"""Execution of gpuquant's QDQ ONNX files with the contract's integer semantics, NumPy only.

At load time the graph is matched into integer steps: a ``DequantizeLinear`` of an
activation is a view (no float tensor is made); ``Conv`` / ``Gemm`` / ``Add`` / ``Mul`` /
``Concat`` / pools whose inputs are such views and whose output (through an optional
``Relu`` or ``Clip(0, 6)``) feeds one ``QuantizeLinear`` become one integer op writing that
int8 / uint8 tensor. Fixed-point multipliers come from the stored float32 scales through
:mod:`gpuquant.multipliers`, exactly as the quantized modules derive theirs, and the ops are
the NumPy backend's torch-free kernels, so outputs equal gpuquant's byte for byte. A
quantized ``Activation`` (exported as ``Gather`` of a ``DequantizeLinear``'d 256-entry int8 /
uint8 table, indexed by ``Cast(DequantizeLinear(x, 1, 0))``, the code itself, negative
codes of an int8 input counting from the back of a table stored rotated by 128, then
``QuantizeLinear`` to the table's qparams) becomes one gather of the integer table (un-rotated
at load) by the input's codes. A nearest ``Resize`` (a quantized ``Upsample``) copies the
input's codes, reading the pixels the torch module reads: its arguments come from the
``gpuquant.nearest_resize`` metadata, keyed by the Resize node's name (a graph whose nodes an
optimiser renamed is refused: no metadata entry for the node), and its indices from the NumPy
backend's ``nearest_source_index`` (torch's formula), never from ONNX's; a graph whose Resize
would give another output size than them is refused. The
exporter's other form of it (torch's pixels at the example's size only: two ``Gather``
nodes, axis 2 then 3, with constant index tables, between DequantizeLinear and
QuantizeLinear with the same qparams) gathers the codes by those indices: no Resize
metadata, only the size-dependent one (``gpuquant.fixed_input_hw``, and both nodes named in
``gpuquant.size_dependent_nodes``).

The integer steps read only what gpuquant's form holds (int8 weights with zero point 0, an
int32 bias in units of ``s_x * s_w``, explicit pads), so anything else is refused at load
with :class:`RuntimeFormatError` naming the node, as is a model without to_onnx's
``gpuquant.format`` metadata (another quantizer's QDQ graph), rather than run with other
numbers.

Activations are held in their logical (NCHW) shape; 4-D ones are views of NHWC memory, the
layout the kernels use (as torch's channels_last).
"""
from __future__ import annotations

import json
import math
from typing import Dict, List

import numpy as np

from ..backends.numpy import conv as _conv
from ..backends.numpy import elementwise as _ew
from ..backends.numpy import gemm as _gemm
from ..backends.numpy import pool as _pool
from ..backends.numpy.fixed_point import Params
from ..multipliers import (activation_bounds, add_multipliers, quantize_multiplier_one,
                           single_rounding_multiplier)

__all__ = ["Session", "RuntimeFormatError"]

_RANGE = {np.dtype(np.int8): (-128, 127), np.dtype(np.uint8): (0, 255)}
# the metadata to_onnx writes: the format; where a node holds only for the export example's
# spatial size, that size ("H,W" for each 4-D input in order, ";" between) and the nodes
FORMAT_KEY, FORMAT = "gpuquant.format", "qdq-v1"
FIXED_HW_KEY, FIXED_NODES_KEY = "gpuquant.fixed_input_hw", "gpuquant.size_dependent_nodes"
# Resize node name -> the torch Upsample's arguments (JSON: size, scale_factor, mode,
# recompute_scale_factor)
RESIZE_KEY = "gpuquant.nearest_resize"
# torch's nearest modes as ONNX Resize (coordinate_transformation_mode, nearest_mode), the
# one table the exporter writes and this runtime checks: "nearest" reads floor(o * in / out)
# (asymmetric, floor); "nearest-exact" floor((o + 0.5) * in / out), which is
# round_prefer_ceil((o + 0.5) * in / out - 0.5) (half_pixel; not pytorch_half_pixel, which
# reads pixel 0 for an output of size 1 where torch reads the middle one)
RESIZE_FORMS = {"nearest": ("asymmetric", "floor"),
                "nearest-exact": ("half_pixel", "round_prefer_ceil")}
_SIZE_MAX = 2 ** 31 - 1
_NHWC_AXIS = {0: 0, 1: 3, 2: 1, 3: 2}
_ONNX_INT32, _ONNX_INT64 = 6, 7  # onnx.TensorProto.INT32 / INT64


class RuntimeFormatError(ValueError):
    """The ONNX graph is not in the QDQ form gpuquant exports (names the node), or the model
    was not written by :func:`gpuquant.export.to_onnx` (no ``gpuquant.format`` metadata)."""


def _head(a, n: int = 4) -> str:
    """The first ``n`` values of an array, for messages."""
    v = np.asarray(a).reshape(-1)
    return str(v[:n].tolist())[:-1] + (", ...]" if v.size > n else "]")


def _nhwc(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1))


def _nchw(a: np.ndarray) -> np.ndarray:
    return a.transpose(0, 3, 1, 2)


def _requant_params(real: np.ndarray, zp: int, np_dtype, activation: str, out_scale: float):
    real = np.asarray(real, dtype=np.float64)
    # 8-bit outputs: a multiplier past 2^30 saturates, as make_requant's does
    pairs = [quantize_multiplier_one(float(v), saturate=True) for v in real.reshape(-1)]
    mult = np.array([p[0] for p in pairs], dtype=np.int64).reshape(real.shape)
    shift = np.array([p[1] for p in pairs], dtype=np.int64).reshape(real.shape)
    qmin, qmax = _RANGE[np.dtype(np_dtype)]
    lo, hi = activation_bounds(qmin, qmax, out_scale, zp, activation)
    return Params(mult, shift, zp, lo, hi, np_dtype)


def _single_rounding_params(in_scale: float, out_scale: float, zp: int, np_dtype):
    """F's ``single_rounding_requant`` (concat, mul) on NumPy."""
    sr = single_rounding_multiplier(float(in_scale) / float(out_scale))
    if sr is None:
        return _requant_params(np.float64(in_scale) * 1.0 / float(out_scale), zp, np_dtype, "none",
                               out_scale)
    qmin, qmax = _RANGE[np.dtype(np_dtype)]
    lo, hi = activation_bounds(qmin, qmax, out_scale, zp, "none")
    return Params(np.int64(sr[0]), np.int64(sr[1]), zp, lo, hi, np_dtype)


class _AddParams:
    __slots__ = ("left_shift", "a_zero_point", "a_multiplier", "a_rshift", "b_zero_point",
                 "b_multiplier", "b_rshift")


class Session:
    """An exported model ready to run; build it with :func:`gpuquant.runtime.load`.

    Attributes:
        input_names, output_names: the graph's input and output names.
        fixed_input_hw: input name -> (H, W) for the 4-D inputs of a graph that holds only
            at the export example's spatial size (``gpuquant.fixed_input_hw`` metadata: a
            non-global adaptive pool, a size-dependent ``ceil_mode`` pool, an ``Upsample``
            as constant ``Gather`` indices); empty when the graph runs at any spatial size.
    """

    def __init__(self, model, source: str = "<model>"):
        from onnx import numpy_helper
        self.source = source
        if not hasattr(model, "metadata_props") or not hasattr(model, "graph"):
            raise TypeError(f"Session: model must be an onnx.ModelProto (gpuquant.runtime.load "
                            f"reads one from a path), got {type(model).__name__}")
        meta = {p.key: p.value for p in model.metadata_props}
        if meta.get(FORMAT_KEY) != FORMAT:
            # another producer's QDQ graph (e.g. onnxruntime's quantize_static: uint8 weights
            # with zero points, float-requantized bias) would run with other numbers
            got = f"{FORMAT_KEY}={meta[FORMAT_KEY]!r}" if FORMAT_KEY in meta else \
                f"no {FORMAT_KEY!r} metadata"
            raise RuntimeFormatError(
                f"{source}: not a graph written by gpuquant.export.to_onnx ({got}; expected "
                f"{FORMAT_KEY}={FORMAT!r}): gpuquant.runtime runs only gpuquant's QDQ form, "
                f"not other quantizers' (e.g. onnxruntime.quantization); run those in "
                f"onnxruntime")
        g = model.graph
        self._const: Dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t)
                                              for t in g.initializer}
        self.input_names = [i.name for i in g.input if i.name not in self._const]
        # declared dims (None where symbolic): rank and channel count are checked on run
        self._input_dims = {
            i.name: [d.dim_value if d.HasField("dim_value") else None
                     for d in i.type.tensor_type.shape.dim]
            for i in g.input if i.name not in self._const}
        self._dim_names = {  # for messages: the symbolic dims' names (N, H, W)
            i.name: [d.dim_value if d.HasField("dim_value") else d.dim_param or "?"
                     for d in i.type.tensor_type.shape.dim]
            for i in g.input if i.name not in self._const}
        self.output_names = [o.name for o in g.output]
        self.fixed_input_hw = self._fixed_input_hw(meta)
        fixed_nodes = [n for n in meta.get(FIXED_NODES_KEY, "").split(",") if n]
        self._fixed_nodes = set(fixed_nodes)
        self._resize_args = self._resize_meta(meta)
        self._fixed_why = f" (node {', '.join(map(repr, fixed_nodes))} exported for that " \
                          f"size)" if fixed_nodes else ""
        self._producer = {}
        self._consumers: Dict[str, list] = {}
        nodes = list(g.node)  # one wrapper per node: fused nodes are tracked by id()
        for n in nodes:
            for o in n.output:
                self._producer[o] = n
            for i in n.input:
                self._consumers.setdefault(i, []).append(n)
        self._views: Dict[str, tuple] = {}   # DQ output -> (q name, scale, zp)
        self._steps: List[tuple] = []
        self._fused = set()
        for n in nodes:
            self._plan(n)

    def _fixed_input_hw(self, meta: dict) -> Dict[str, tuple]:
        """The ``gpuquant.fixed_input_hw`` metadata ("H,W" for each 4-D input, ";" between)
        as input name -> (H, W)."""
        if FIXED_HW_KEY not in meta:
            return {}
        four_d = [k for k in self.input_names if len(self._input_dims[k]) == 4]
        try:
            hw = [tuple(int(v) for v in e.split(",")) for e in meta[FIXED_HW_KEY].split(";")]
        except ValueError:
            hw = []
        if len(hw) != len(four_d) or any(len(e) != 2 or min(e) < 1 for e in hw):
            raise RuntimeFormatError(
                f"{self.source}: metadata {FIXED_HW_KEY}={meta[FIXED_HW_KEY]!r} must give "
                f"'H,W' (positive ints) for each of the {len(four_d)} 4-D inputs {four_d}, "
                f"';' between")
        return dict(zip(four_d, hw))

    def _resize_meta(self, meta: dict) -> dict:
        """The ``gpuquant.nearest_resize`` metadata: Resize node name -> the torch module's
        arguments (JSON)."""
        if RESIZE_KEY not in meta:
            return {}
        try:
            args = json.loads(meta[RESIZE_KEY])
        except ValueError:
            args = None
        if not isinstance(args, dict) or not all(isinstance(v, dict) for v in args.values()):
            raise RuntimeFormatError(f"{self.source}: metadata {RESIZE_KEY} must be a JSON "
                                     f"object node name -> the Upsample's arguments, got "
                                     f"{meta[RESIZE_KEY][:80]!r}")
        return args

    # ------------------------------------------------------------------ planning
    def _where(self, node) -> str:
        return f"{self.source}: node {node.name!r} ({node.op_type})"

    def _err(self, node, msg: str):
        return RuntimeFormatError(f"{self.source}: node {node.name!r} ({node.op_type}): {msg}")

    def _attrs(self, node) -> dict:
        from onnx import helper
        return {a.name: helper.get_attribute_value(a) for a in node.attribute}

    def _scalar(self, name: str, node):
        if name not in self._const:
            raise self._err(node, f"{name!r} must be an initializer")
        return self._const[name]

    def _view(self, name: str, node):
        """(q tensor name, scale float32, zero point int) behind a DQ'd activation input."""
        v = self._views.get(name)
        if v is None:
            raise self._err(node, f"input {name!r} is not a DequantizeLinear of a quantized "
                                  f"activation")
        return v

    def _dq_const(self, name: str, node, what: str, dtype):
        """(int array, float32 scale, DequantizeLinear) of a DequantizeLinear of an
        initializer in gpuquant's form: ``dtype`` values, zero points 0 (or none), the scale
        per tensor or per output channel (axis 0). ``what``: "weight" or "bias"."""
        p = self._producer.get(name)
        if p is None or p.op_type != "DequantizeLinear" or p.input[0] not in self._const:
            raise self._err(node, f"{what} {name!r} must be a DequantizeLinear of an initializer")
        self._fused.add(id(p))
        q = self._const[p.input[0]]
        scale = np.asarray(self._scalar(p.input[1], p))
        zp = self._scalar(p.input[2], p) if len(p.input) > 2 and p.input[2] else None
        axis = self._attrs(p).get("axis", 1)  # ONNX's default axis is 1
        if q.dtype != dtype or q.ndim == 0:
            raise self._err(p, f"{what} of {node.name!r} is {q.dtype} of shape "
                               f"{list(q.shape)}; gpuquant's QDQ form stores {np.dtype(dtype)} "
                               f"{what}s, output channels first")
        per_channel = scale.ndim == 1 and scale.shape[0] == q.shape[0] and axis % q.ndim == 0
        if scale.dtype != np.float32 or not (scale.ndim == 0 or per_channel):
            raise self._err(p, f"{what} scale of {node.name!r} ({scale.dtype}, shape "
                               f"{list(scale.shape)}, axis {axis}); expected float32, per "
                               f"tensor or per output channel (axis 0, {q.shape[0]} values)")
        if zp is not None and (zp.dtype != dtype or zp.shape != scale.shape or zp.any()):
            raise self._err(p, f"{what} zero point of {node.name!r} ({zp.dtype} {_head(zp)}) "
                               f"must be {np.dtype(dtype)} zeros shaped as the scale: "
                               f"gpuquant's {what}s are symmetric (zero point 0)")
        return q, scale, p

    def _q_params(self, q):
        """(float32 scale, zero point array) of a QuantizeLinear: per tensor, to int8 / uint8,
        with its zero point given (ONNX's default is uint8 0)."""
        if len(q.input) < 3 or not q.input[2]:
            raise self._err(q, "QuantizeLinear without a zero point input; gpuquant's QDQ "
                               "form gives every QuantizeLinear its int8 / uint8 zero point")
        scale, zp = self._scalar(q.input[1], q), self._scalar(q.input[2], q)
        if np.ndim(scale) != 0 or np.ndim(zp) != 0 or zp.dtype not in _RANGE:
            raise self._err(q, f"activations must be quantized per tensor to int8 / uint8, got "
                               f"scale shape {list(np.shape(scale))}, zero point {zp.dtype} "
                               f"shape {list(np.shape(zp))}")
        return np.float32(scale), zp

    def _tail(self, node):
        """Follow ``node``'s output through an optional Relu / Clip(0, 6) to its one
        QuantizeLinear: (activation, q output name, scale, zp, np dtype)."""
        act = "none"
        out = node.output[0]
        cons = self._consumers.get(out, [])
        if len(cons) == 1 and cons[0].op_type in ("Relu", "Clip"):
            c = cons[0]
            if c.op_type == "Relu":
                act = "relu"
            else:
                lo = float(self._scalar(c.input[1], c)) if len(c.input) > 1 and c.input[1] else None
                hi = float(self._scalar(c.input[2], c)) if len(c.input) > 2 and c.input[2] else None
                if (lo, hi) != (0.0, 6.0):
                    raise self._err(c, f"Clip({lo}, {hi}) is not a fused ReLU6")
                act = "relu6"
            self._fused.add(id(c))
            out = c.output[0]
            cons = self._consumers.get(out, [])
        if len(cons) != 1 or cons[0].op_type != "QuantizeLinear":
            raise self._err(node, "its output must feed exactly one QuantizeLinear (QDQ form)")
        q = cons[0]
        self._fused.add(id(q))
        scale, zp_arr = self._q_params(q)
        return act, q.output[0], float(scale), int(zp_arr), zp_arr.dtype

    def _plan(self, n):
        if id(n) in self._fused and n.op_type != "DequantizeLinear":
            return
        op = n.op_type
        if op == "DequantizeLinear":
            if n.input[0] in self._const:
                return  # weights / bias: read by the op that uses them
            scale = self._scalar(n.input[1], n)
            zp = self._scalar(n.input[2], n) if len(n.input) > 2 and n.input[2] else np.int8(0)
            if np.ndim(scale) != 0:
                raise self._err(n, "activations must be quantized per tensor")
            self._views[n.output[0]] = (n.input[0], float(np.float32(scale)), int(zp))
            # materialized only where something other than a fused op reads it
            if any(c.op_type not in _FUSABLE for c in self._consumers.get(n.output[0], [])) \
                    or n.output[0] in self.output_names:
                self._steps.append(("dequantize", n.input[0], n.output[0], np.float32(scale),
                                    int(zp)))
            return
        if op == "QuantizeLinear":
            scale, zp = self._q_params(n)
            qmin, qmax = _RANGE[zp.dtype]
            self._steps.append(("quantize", n.input[0], n.output[0], scale, zp, qmin, qmax))
            return
        if op == "Transpose":
            perm = [int(v) for v in self._attrs(n).get("perm", [])]
            if not perm or sorted(perm) != list(range(len(perm))) or perm[0] != 0:
                raise self._err(n, f"a Transpose must give its permutation and keep the batch "
                                   f"dimension first (as gpuquant.export.to_onnx writes it), "
                                   f"got perm={perm}")
            self._steps.append(("transpose", n.input[0], n.output[0], perm, self._where(n)))
            return
        if op in ("Flatten", "Reshape", "Identity"):
            a = self._attrs(n)
            shape = self._scalar(n.input[1], n) if op == "Reshape" else None
            self._steps.append((op.lower(), n.input[0], n.output[0], a.get("axis", 1), shape,
                                self._where(n)))
            return
        if op not in _FUSABLE:
            raise self._err(n, f"not supported by gpuquant.runtime (it runs the QDQ graphs "
                               f"gpuquant.export.to_onnx writes: {sorted(_FUSABLE)} between "
                               f"DequantizeLinear and QuantizeLinear, Flatten, Reshape, "
                               f"Transpose)")
        getattr(self, f"_plan_{op}")(n, self._attrs(n))

    def _weighted(self, n):
        """Conv / Gemm: (input name, input zero point, int8 weight, int64 bias or None,
        output name, requantization params from ``s_x * s_w / s_y``)."""
        xq, sx, zx = self._view(n.input[0], n)
        w, sw, _ = self._dq_const(n.input[1], n, "weight", np.int8)
        if not (np.isfinite(sw).all() and (sw > 0).all()):
            raise self._err(n, f"weight scales must be positive and finite, got {_head(sw)}")
        b = None
        if len(n.input) > 2 and n.input[2]:
            b, sb, p_b = self._dq_const(n.input[2], n, "bias", np.int32)
            # the int32 bias is added to the accumulator, whose unit is s_x * s_w: its scale
            # must be that product (as the exporter writes it, float32), bit for bit
            want = np.float32(sx) * sw
            if b.ndim != 1 or b.shape[0] != w.shape[0] or \
                    np.broadcast_to(sb, b.shape).tobytes() != \
                    np.broadcast_to(want, b.shape).tobytes():
                raise self._err(p_b, f"bias of {n.name!r} (shape {list(b.shape)}, scale "
                                     f"{_head(sb)}) must hold one int32 per output channel "
                                     f"({w.shape[0]}) at scale float32(s_x) * s_w "
                                     f"({_head(want)}), the accumulator's unit")
            b = b.astype(np.int64)
        act, out, sy, zy, dt = self._tail(n)
        p = _requant_params(np.float64(sx) * sw.astype(np.float64) / float(sy), zy, dt, act, sy)
        return xq, zx, w, b, out, p

    def _plan_Conv(self, n, a):
        xq, zx, w, b, out, p = self._weighted(n)
        pads = self._pads(n, a)
        cache: dict = {}
        self._steps.append(("conv", xq, out, zx, np.ascontiguousarray(w, np.int8), b,
                            tuple(a.get("strides", [1, 1])), tuple(pads[:2]),
                            tuple(a.get("dilations", [1, 1])), int(a.get("group", 1)), p, cache,
                            self._where(n)))

    def _plan_Gemm(self, n, a):
        if a.get("transB", 0) != 1 or a.get("transA", 0) != 0 or a.get("alpha", 1.0) != 1.0 \
                or a.get("beta", 1.0) != 1.0:
            raise self._err(n, "only Gemm(x, W, b) with transB=1 (a Linear layer) is supported")
        xq, zx, w, b, out, p = self._weighted(n)
        pw = _gemm.pack_linear(np.ascontiguousarray(w, np.int8))
        self._steps.append(("linear", xq, out, zx, pw, b, p, w.shape[1], self._where(n)))

    def _plan_Add(self, n, a):
        aq, sa, za = self._view(n.input[0], n)
        bq, sb, zb = self._view(n.input[1], n)
        act, out, sy, zy, dt = self._tail(n)
        if act == "relu6":
            raise self._err(n, "Add with ReLU6 is not a gpuquant Elemwise")
        left, (ma, ra), (mb, rb), sum_scale = add_multipliers(sa, sb)
        ap = _AddParams()
        ap.left_shift, ap.a_zero_point, ap.a_multiplier, ap.a_rshift = left, za, ma, ra
        ap.b_zero_point, ap.b_multiplier, ap.b_rshift = zb, mb, rb
        p_out = _requant_params(np.float64(sum_scale) * 1.0 / float(sy), zy, dt, act, sy)
        self._steps.append(("add", (aq, bq), out, ap, p_out))

    def _plan_Mul(self, n, a):
        aq, sa, za = self._view(n.input[0], n)
        bq, sb, zb = self._view(n.input[1], n)
        act, out, sy, zy, dt = self._tail(n)
        if act != "none":
            raise self._err(n, "Mul with a fused activation is not a gpuquant Elemwise")
        p = _single_rounding_params(float(np.float64(sa) * np.float64(sb)), sy, zy, dt)
        self._steps.append(("mul", (aq, bq), out, za, zb, p))

    def _plan_Concat(self, n, a):
        views = [self._view(i, n) for i in n.input]
        act, out, sy, zy, dt = self._tail(n)
        if act != "none":
            raise self._err(n, "Concat with a fused activation is not a gpuquant Concat")
        params = []
        for q, s, z in views:
            in_dt = self._dtype_of(q)
            same = np.float32(s) == np.float32(sy) and z == zy and in_dt == np.dtype(dt)
            params.append(None if same else _single_rounding_params(s, sy, zy, dt))
        self._steps.append(("concat", [v[0] for v in views], out, [v[2] for v in views], params,
                            int(a.get("axis", 0)), dt))

    def _plan_Cast(self, n, a):
        """A Cast is only the index of a lookup (``_plan_Gather`` checks it and its input)."""
        cons = self._consumers.get(n.output[0], [])
        if not cons or any(c.op_type != "Gather" or list(c.input[1:]) != [n.output[0]]
                           for c in cons) or n.output[0] in self.output_names:
            raise self._err(n, "a Cast must be the indices of a Gather (gpuquant's form of a "
                               "quantized Activation's table lookup)")

    def _plan_Gather(self, n, a):
        """A quantized ``Activation``: ``Gather(DequantizeLinear(table, s_y, zp_y),
        Cast(DequantizeLinear(x, 1, 0), int32 / int64), axis=0)`` feeding one
        ``QuantizeLinear(s_y, zp_y)``: the index is the code itself, so the output is
        ``stored[x mod 256]`` (ONNX Gather counts a negative index from the back), exactly;
        an int8 input's table is stored rotated (entry ``i`` for code ``i - 256`` from 128
        on), un-rotated here once into gpuquant's order (entry ``code - storage_min``). Or
        a size-dependent ``Upsample`` (:meth:`_plan_gather_hw`)."""
        form = ("gpuquant exports a quantized Activation as Gather(DequantizeLinear(table), "
                "Cast(DequantizeLinear(x, 1, 0)), axis=0) -> QuantizeLinear with the "
                "table's qparams (256 entries, rotated by 128 for an int8 x: the codes "
                "0..127, then -128..-1), and an Upsample at one size as Gather(Gather("
                "DequantizeLinear(x), rows, axis=2), cols, axis=3) -> QuantizeLinear with x's "
                "qparams, rows / cols constant int64 / int32 1-D indices")
        if len(n.input) != 2:
            raise self._err(n, f"inputs {list(n.input)}; {form}")
        if n.input[1] in self._const:
            return self._plan_gather_hw(n, a, form)
        if a.get("axis", 0) != 0:
            raise self._err(n, f"axis {a.get('axis', 0)} with computed indices "
                               f"{n.input[1]!r}; {form}")
        cast = self._producer.get(n.input[1])
        if cast is None or cast.op_type != "Cast" or \
                int(self._attrs(cast).get("to", 0)) not in (_ONNX_INT32, _ONNX_INT64):
            raise self._err(n, f"indices {n.input[1]!r} are not a Cast to int32 / int64; {form}")
        xq, sx, zx = self._view(cast.input[0], cast)
        x_dt = self._dtype_of(xq)
        dq = self._producer[cast.input[0]]
        zp_dt = self._scalar(dq.input[2], dq).dtype if len(dq.input) > 2 and dq.input[2] \
            else None
        if x_dt is None or zp_dt != x_dt or np.float32(sx) != np.float32(1.0) or zx != 0:
            raise self._err(cast, f"the index must be DequantizeLinear(x, scale 1, zero point "
                                  f"0 of x's int8 / uint8 dtype) of a quantized activation "
                                  f"(the code itself), got scale {sx}, zero point {zx} "
                                  f"({zp_dt}) of a {x_dt} tensor; {form}")
        table, st, zt = self._dq_table(n.input[0], n)
        if x_dt == np.int8:  # stored[c mod 256] -> gpuquant's order, entry c + 128
            table = np.roll(table, 128)
        act, out, sy, zy, dt = self._tail(n)
        if act != "none" or table.dtype != np.dtype(dt) or \
                np.float32(st).tobytes() != np.float32(sy).tobytes() or zt != zy:
            raise self._err(n, f"the table ({table.dtype}, scale {float(st)}, zero point {zt}) "
                               f"must be dequantized with its QuantizeLinear's qparams ({dt}, "
                               f"{sy}, {zy}) and no activation between; {form}")
        self._steps.append(("lookup", xq, out, np.ascontiguousarray(table)))

    def _gather_index(self, n, form: str) -> np.ndarray:
        """A resize Gather's constant indices: 1-D int64 / int32, none negative, as int64."""
        idx = self._const[n.input[1]]
        if idx.dtype not in (np.int64, np.int32) or idx.ndim != 1 or \
                (idx.size and int(idx.min()) < 0) or (idx.size and int(idx.max()) > _SIZE_MAX):
            lo_hi = f", from {int(idx.min())} to {int(idx.max())}" if idx.size and \
                idx.dtype.kind in "iu" else ""
            raise self._err(n, f"constant indices {n.input[1]!r} ({idx.dtype}, shape "
                               f"{list(idx.shape)}{lo_hi}) must be 1-D int64 / int32 in "
                               f"[0, {_SIZE_MAX}]; {form}")
        return idx.astype(np.int64)

    def _plan_gather_hw(self, n, a, form: str):
        """A size-dependent quantized ``Upsample``: ``Gather(Gather(DequantizeLinear(x),
        rows, axis=2), cols, axis=3)`` with constant 1-D indices, feeding one
        ``QuantizeLinear`` with x's qparams, both nodes named in the graph's
        ``gpuquant.size_dependent_nodes``: ``x[:, :, rows][:, :, :, cols]``, its codes."""
        if a.get("axis", 0) != 2:
            raise self._err(n, f"axis {a.get('axis', 0)} with constant indices "
                               f"{n.input[1]!r}: the first of a resize's Gathers reads rows "
                               f"(axis 2); {form}")
        xq, sx, zx = self._view(n.input[0], n)
        rows = self._gather_index(n, form)
        cons = self._consumers.get(n.output[0], [])
        c = cons[0] if len(cons) == 1 else None
        if c is None or c.op_type != "Gather" or len(c.input) != 2 or \
                c.input[0] != n.output[0] or c.input[1] not in self._const or \
                self._attrs(c).get("axis", 0) != 3 or n.output[0] in self.output_names:
            raise self._err(n, f"its output must feed exactly one Gather over columns (axis 3, "
                               f"constant indices), got "
                               f"{[f'{k.name!r} ({k.op_type})' for k in cons]}; {form}")
        cols = self._gather_index(c, form)
        unnamed = [k.name for k in (n, c) if k.name not in self._fixed_nodes]
        if unnamed or not self.fixed_input_hw:
            raise self._err(n, f"Gather nodes {unnamed or [n.name, c.name]} with constant "
                               f"indices hold only at one input size, but the metadata "
                               f"{FIXED_HW_KEY!r} / {FIXED_NODES_KEY!r} does not name them "
                               f"(to_onnx writes both); {form}")
        self._fused.add(id(c))
        out = self._pool_tail(c, sx, zx)
        self._steps.append(("gather_hw", xq, out, rows, cols, self._where(n)))

    def _dq_table(self, name: str, node):
        """(table, float32 scale, zero point) of a lookup's table: 256 int8 / uint8 entries,
        per tensor, its zero point given."""
        p = self._producer.get(name)
        if p is None or p.op_type != "DequantizeLinear" or p.input[0] not in self._const \
                or len(p.input) < 3 or not p.input[2]:
            raise self._err(node, f"data {name!r} must be a DequantizeLinear (with its zero "
                                  f"point) of an initializer: the lookup table")
        self._fused.add(id(p))
        t = self._const[p.input[0]]
        scale, zp = self._scalar(p.input[1], p), self._scalar(p.input[2], p)
        if t.dtype not in _RANGE or t.shape != (256,) or np.ndim(scale) != 0 or \
                np.ndim(zp) != 0 or np.asarray(scale).dtype != np.float32 or zp.dtype != t.dtype:
            raise self._err(p, f"a lookup table must be 256 int8 / uint8 entries with a float32 "
                               f"scalar scale and a zero point of its dtype, got {t.dtype} of "
                               f"shape {list(t.shape)}, scale {np.asarray(scale).dtype} shape "
                               f"{list(np.shape(scale))}, zero point {zp.dtype}")
        return t, np.float32(scale), int(zp)

    def _dtype_of(self, qname: str):
        p = self._producer.get(qname)
        while p is not None and p.op_type in ("Flatten", "Reshape", "Identity", "Transpose"):
            p = self._producer.get(p.input[0])
        if p is None or p.op_type != "QuantizeLinear":
            return None
        return self._q_params(p)[1].dtype

    def _pool_tail(self, n, sx, zx):
        act, out, sy, zy, dt = self._tail(n)
        if act != "none" or np.float32(sy) != np.float32(sx) or zy != zx:
            raise self._err(n, "a pool's output must keep its input's qparams")
        return out

    def _pads(self, n, a) -> list:
        """A Conv's / pool's explicit symmetric ``pads`` (auto_pad NOTSET, as exported)."""
        auto = a.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else str(auto)
        if auto != "NOTSET":
            raise self._err(n, f"auto_pad={auto!r}; gpuquant's QDQ form gives explicit pads "
                               f"(auto_pad NOTSET or absent)")
        pads = list(a.get("pads", [0, 0, 0, 0]))
        if pads[:2] != pads[2:]:
            raise self._err(n, f"asymmetric pads {pads}")
        return pads

    def _pool_window(self, n, a):
        """(kernel, strides, symmetric pads) of a MaxPool / AveragePool node."""
        pads = self._pads(n, a)
        k = tuple(a["kernel_shape"])
        return k, tuple(a.get("strides", k)), tuple(pads[:2])

    def _plan_MaxPool(self, n, a):
        xq, sx, zx = self._view(n.input[0], n)
        out = self._pool_tail(n, sx, zx)
        k, strides, pads = self._pool_window(n, a)
        self._steps.append(("maxpool", xq, out, k, strides, pads,
                            tuple(a.get("dilations", [1, 1])), bool(a.get("ceil_mode", 0)),
                            self._where(n)))

    def _plan_AveragePool(self, n, a):
        xq, sx, zx = self._view(n.input[0], n)
        out = self._pool_tail(n, sx, zx)
        k, strides, pads = self._pool_window(n, a)
        self._steps.append(("avgpool", xq, out, zx, k, strides, pads,
                            bool(a.get("ceil_mode", 0)), bool(a.get("count_include_pad", 0)),
                            self._where(n)))

    def _plan_GlobalAveragePool(self, n, a):
        xq, sx, zx = self._view(n.input[0], n)
        out = self._pool_tail(n, sx, zx)
        self._steps.append(("gap", xq, out, zx, self._where(n)))

    def _plan_Resize(self, n, a):
        """A quantized ``Upsample``: ``Resize(mode="nearest")`` of a DequantizeLinear'd
        activation with constant ``scales`` ``[1, 1, sh, sw]`` (no roi, no sizes), the
        coordinate / nearest modes of one torch mode, feeding a ``QuantizeLinear`` with the
        input's qparams; the torch module's arguments from the metadata decide the pixels."""
        def text(k, default):
            v = a.get(k, default)
            return v.decode() if isinstance(v, bytes) else str(v)

        form = ("gpuquant exports a quantized Upsample as Resize(DequantizeLinear(x), '', "
                "scales=[1, 1, sh, sw], mode='nearest') with the torch mode's "
                f"coordinate_transformation_mode / nearest_mode ({RESIZE_FORMS}) -> "
                "QuantizeLinear with x's qparams, its arguments in the metadata "
                f"{RESIZE_KEY!r}")
        xq, sx, zx = self._view(n.input[0], n)
        args = self._resize_args.get(n.name)
        if args is None:
            raise self._err(n, f"no entry in the metadata {RESIZE_KEY!r} for this node "
                               f"(entries: {_head(sorted(self._resize_args))}; the torch "
                               f"Upsample's arguments, which decide its pixels, keyed by "
                               f"the Resize node's name: a graph optimiser that renames "
                               f"nodes breaks the link; run the file to_onnx wrote); {form}")
        mode = args.get("mode")
        got = (text("mode", "nearest"), text("coordinate_transformation_mode", "half_pixel"),
               text("nearest_mode", "round_prefer_floor"))
        if mode not in RESIZE_FORMS or got != ("nearest",) + RESIZE_FORMS[mode]:
            raise self._err(n, f"mode / coordinate_transformation_mode / nearest_mode {got} "
                               f"for an Upsample of mode {mode!r}; {form}")
        if len(n.input) < 3 or n.input[1] or (len(n.input) > 3 and n.input[3]) or \
                n.input[2] not in self._const:
            raise self._err(n, f"inputs {list(n.input)}; {form}")
        scales = self._const[n.input[2]]
        if scales.dtype != np.float32 or scales.shape != (4,) or \
                scales[:2].tolist() != [1.0, 1.0] or not (scales[2:] > 0).all():
            raise self._err(n, f"scales {scales.dtype} {_head(scales)}; {form}")
        size, sf, recompute = self._upsample_args(n, args)
        if n.name not in self._fixed_nodes and (sf is None or recompute or np.float32(
                sf).tobytes() != scales[2:].tobytes()):
            raise self._err(n, f"scales {_head(scales)} for an Upsample of size={size}, "
                               f"scale_factor={sf}, recompute_scale_factor={recompute}, in a "
                               f"graph that holds at any spatial size: only float32(scale_factor) "
                               f"is torch's at every size (else {FIXED_HW_KEY!r} and "
                               f"{FIXED_NODES_KEY!r} name the node)")
        out = self._pool_tail(n, sx, zx)
        self._steps.append(("resize", xq, out, size, sf, recompute, mode == "nearest-exact",
                            scales[2:].copy(), self._where(n)))

    def _upsample_args(self, n, args: dict):
        """(size pair or None, scale_factor pair or None, recompute_scale_factor) of a
        Resize's metadata entry, checked."""
        size, sf = args.get("size"), args.get("scale_factor")
        recompute = args.get("recompute_scale_factor")

        def pair(v, kind):
            return isinstance(v, list) and len(v) == 2 and all(
                isinstance(t, kind) and not isinstance(t, bool) and t > 0 for t in v)
        if (size is None) == (sf is None) or (size is not None and not pair(size, int)) or \
                (sf is not None and not (pair(sf, (int, float)) and all(map(math.isfinite, sf)))) \
                or recompute not in (None, True, False):
            raise self._err(n, f"metadata {RESIZE_KEY!r} entry {args!r}: expected size (two "
                               f"ints >= 1) or scale_factor (two floats > 0), and "
                               f"recompute_scale_factor None / true / false")
        return (None if size is None else tuple(size),
                None if sf is None else tuple(float(v) for v in sf), recompute)

    # ------------------------------------------------------------------ execution
    def run(self, x, *more):
        """Run the model.

        Args:
            x: the input as a NumPy array (float32, or float16: read as float32 exactly, as
                the torch int8 model's ``QuantStub`` reads it), or a dict name -> array for
                several inputs; further positional arrays for further inputs.

        Returns:
            The output array (a list when the graph has several outputs).

        Raises:
            TypeError: an input that is not a NumPy array, or of a dtype other than float32 /
                float16 (float64 included, as the torch int8 model refuses it: a silent
                conversion would round it; convert with ``x.astype(numpy.float32)``); a dict
                followed by positional arrays (the inputs come one way or the other).
            ValueError: a wrong number of inputs; a rank, channel count or (where the
                graph fixes it: ``to_onnx(..., dynamic_batch=False)``) batch size other than
                the graph's; NaN in an input that is quantized (as the
                torch model's ``quantize``); an input too small for a layer's window, or
                whose size does not fit a layer (as the torch int8 model; names the node);
                a spatial size other than :attr:`fixed_input_hw`'s where the graph holds
                only for the export example's (names the nodes); a size at which a Resize's
                scales give another output size than its torch Upsample (names the node).
        """
        if isinstance(x, dict):
            if more:
                raise TypeError(f"{self.source}: run takes the inputs as one dict name -> array "
                                f"or as positional arrays, not both: got a dict of "
                                f"{sorted(x)} and {len(more)} more positional argument(s)")
            feeds = dict(x)
        else:
            if len((x,) + more) != len(self.input_names):
                raise ValueError(f"{self.source}: expects inputs {self.input_names}, got "
                                 f"{len((x,) + more)} arrays")
            feeds = dict(zip(self.input_names, (x,) + more))
        if set(feeds) != set(self.input_names):
            raise ValueError(f"{self.source}: expects inputs {self.input_names}, got "
                             f"{sorted(feeds)}")
        env: Dict[str, np.ndarray] = {}
        for k, v in feeds.items():
            if not isinstance(v, np.ndarray):
                raise TypeError(f"{self.source}: input {k!r} must be a numpy.ndarray, got "
                                f"{type(v).__name__}")
            if v.dtype.kind != "f" or v.dtype.itemsize not in (2, 4):
                # float32 / float16, those of the torch int8 model's QuantStub that NumPy has
                # (float16 converts exactly; the torch model quantizes it in float32 too);
                # float64 is refused there (and by to_onnx), and converting it here rounded
                hint = "; convert with x.astype(numpy.float32)" if v.dtype.kind == "f" else ""
                raise TypeError(f"{self.source}: input {k!r} must be a float32 or float16 array "
                                f"(as the torch int8 model takes it), got {v.dtype}{hint}")
            dims = self._input_dims.get(k) or []
            fixed = self.fixed_input_hw.get(k)
            # the batch too where the graph fixes it (to_onnx(..., dynamic_batch=False)), as
            # onnxruntime refuses another; 4-D spatial sizes: fixed_input_hw below
            if dims and (v.ndim != len(dims) or any(
                    d is not None and v.shape[i] != d for i, d in enumerate(dims)
                    if i < 2 or len(dims) != 4)):
                size = "" if len(dims) != 4 else ", any spatial size" if fixed is None else \
                    f", spatial size {fixed[0]}x{fixed[1]} only"
                batch = "any batch" if dims[0] is None else f"batch {dims[0]} only"
                raise ValueError(f"{self.source}: input {k!r} must have shape "
                                 f"{self._dim_names[k]} ({batch}"
                                 f"{size}), got {list(v.shape)}")
            if fixed is not None and tuple(v.shape[2:]) != fixed:
                raise ValueError(f"{self.source}: input {k!r} of spatial size "
                                 f"{v.shape[2]}x{v.shape[3]}: this graph holds only for "
                                 f"{fixed[0]}x{fixed[1]}, the export example's"
                                 f"{self._fixed_why}; export again with an example of this "
                                 f"size")
            env[k] = np.ascontiguousarray(v, dtype=np.float32)
        for st in self._steps:
            _EXEC[st[0]](st, env)
        outs = [np.ascontiguousarray(env[o]) for o in self.output_names]
        return outs[0] if len(outs) == 1 else outs

    __call__ = run


def _x_quantize(st, env):
    _, src, out, scale, zp, qmin, qmax = st
    x = env[src]
    if np.isnan(x).any():  # as gpuquant.functional.quantize (the torch model) refuses it
        raise ValueError("quantize: x contains NaN, which has no quantized value")
    q = _ew.quantize_array(x, scale, zp, qmin, qmax, None, zp.dtype)
    env[out] = _nchw(_nhwc(q)) if q.ndim == 4 else q


def _x_dequantize(st, env):
    _, src, out, scale, zp = st
    env[out] = np.ascontiguousarray(_ew.dequantize_array(env[src], scale, np.int32(zp), None))


def _x_reshape(st, env):
    op, src, out, axis, shape, where = st
    x = env[src]
    if op == "identity":
        env[out] = x
    elif op == "flatten":  # both sizes spelt out: NumPy cannot infer a -1 of an empty batch
        axis = axis % x.ndim if x.ndim else 0
        env[out] = np.reshape(x, (math.prod(x.shape[:axis]), math.prod(x.shape[axis:])))
    else:
        shape = [x.shape[i] if (s == 0 and i < x.ndim) else int(s) for i, s in enumerate(shape)]
        if -1 in shape:  # spelt out: NumPy cannot infer a -1 of an empty array
            j = shape.index(-1)
            rest = math.prod(shape[:j]) * math.prod(shape[j + 1:])
            if rest and x.size % rest == 0:
                shape[j] = x.size // rest
            elif x.size == 0:  # as the exporter writes it: -1 stands for input dimensions
                shape[j] = math.prod(x.shape[j:x.ndim - (len(shape) - j - 1)])
        if math.prod(shape) != x.size or any(d < 0 for d in shape):
            raise ValueError(f"{where}: cannot reshape an input of shape {list(x.shape)} to "
                             f"{list(shape)} (the graph's shape {[int(v) for v in st[4]]}); "
                             f"a different input size reaches it")
        env[out] = np.reshape(x, shape)


def _x_transpose(st, env):
    _, src, out, perm, where = st
    x = env[src]
    if x.ndim != len(perm):
        raise ValueError(f"{where}: a Transpose of {len(perm)} dimensions got an input of shape "
                         f"{list(x.shape)}")
    env[out] = np.transpose(x, perm)


def _check_window(where: str, op: str, x: np.ndarray, k, stride, pads, dil=(1, 1),
                  ceil_mode=False) -> None:
    """As gpuquant.functional's int8 ops (and torch) refuse a window that leaves no output:
    the padded input smaller than the (dilated) kernel (by more than stride - 1 in ceil_mode)."""
    size = tuple(x.shape[2:])
    eff = tuple(d * (kk - 1) + 1 for d, kk in zip(dil, k))
    slack = tuple(s - 1 for s in stride) if ceil_mode else (0, 0)
    if x.ndim != 4 or any(n == 0 or n + 2 * p + sl < e
                          for n, p, sl, e in zip(size, pads, slack, eff)):
        raise ValueError(f"{where}: {op}: padded input {size} + 2*{tuple(pads)} is smaller than "
                         f"the {'dilated ' if eff != tuple(k) else ''}kernel {eff}"
                         f"{' (by more than stride - 1 in ceil_mode)' if ceil_mode else ''}: "
                         f"no output")


def _x_conv(st, env):
    _, src, out, zx, w, b, stride, pads, dil, groups, p, cache, where = st
    _check_window(where, "conv2d", env[src], w.shape[2:], stride, pads, dil)

    def cached(kind, build):
        if kind not in cache:
            cache[kind] = build()
        return cache[kind]
    env[out] = _nchw(_conv.conv2d_nhwc(_nhwc(env[src]), zx, w, b, stride, pads, dil, groups, p,
                                       cached))


def _x_linear(st, env):
    _, src, out, zx, pw, b, p, k, where = st
    x = env[src]
    if x.ndim != 2 or x.shape[1] != k:
        raise ValueError(f"{where}: linear: x of shape {list(x.shape)} must be (N, {k}) "
                         f"(in_features={k}); a different input size reaches it")
    env[out] = _gemm.linear_rows(np.ascontiguousarray(x), zx, pw, p, b)


def _pair_views(names, env):
    xs = [env[n] for n in names]
    if all(x.ndim == 4 for x in xs):
        return [_nhwc(x) for x in xs], True
    return xs, False


def _x_add(st, env):
    _, names, out, ap, p_out = st
    (a, b), four = _pair_views(names, env)
    y = _ew.add_arrays(a, b, ap, p_out)
    env[out] = _nchw(y) if four else y


def _x_mul(st, env):
    _, names, out, za, zb, p = st
    (a, b), four = _pair_views(names, env)
    y = _ew.mul_arrays(a, za, b, zb, p)
    env[out] = _nchw(y) if four else y


def _x_concat(st, env):
    _, names, out, zps, params, axis, dt = st
    xs, four = _pair_views(names, env)
    nd = env[names[0]].ndim
    ax = _NHWC_AXIS[axis % nd] if four else axis % nd
    y = _ew.concat_arrays(xs, zps, params, ax, dt)
    env[out] = _nchw(y) if four else y


def _x_maxpool(st, env):
    _, src, out, k, s, pads, dil, ceil, where = st
    _check_window(where, "max_pool2d", env[src], k, s, pads, dil, ceil)
    env[out] = _nchw(_pool.max_pool2d_nhwc(_nhwc(env[src]), k, s, pads, dil, ceil))


def _x_avgpool(st, env):
    _, src, out, zx, k, s, pads, ceil, cip, where = st
    x = env[src]
    _check_window(where, "avg_pool2d", x, k, s, pads, (1, 1), ceil)
    qmin, qmax = _RANGE[x.dtype]
    env[out] = _nchw(_pool.avg_pool2d_nhwc(_nhwc(x), zx, k, s, pads, ceil, cip, None, qmin,
                                           qmax))


def _x_gap(st, env):
    _, src, out, zx, where = st
    x = env[src]
    if x.ndim != 4 or 0 in x.shape[2:]:
        raise ValueError(f"{where}: adaptive_avg_pool2d: input of spatial size "
                         f"{tuple(x.shape[2:])} has nothing to average")
    qmin, qmax = _RANGE[x.dtype]
    env[out] = _nchw(_pool.adaptive_avg_pool2d_nhwc(_nhwc(x), zx, (1, 1), qmin, qmax))


def _x_lookup(st, env):
    _, src, out, table = st
    x = env[src]
    if x.ndim == 4:  # in the NHWC memory order, as the other ops keep 4-D activations
        env[out] = _nchw(_ew.lookup_array(_nhwc(x), table))
    else:
        env[out] = _ew.lookup_array(x, table)


def _x_resize(st, env):
    _, src, out, size, sf, recompute, exact, scales, where = st
    x = env[src]
    if x.ndim != 4 or 0 in x.shape[2:]:
        raise ValueError(f"{where}: upsample_nearest2d: input of shape {list(x.shape)}; it "
                         f"must be 4-D with a non-empty spatial size")
    in_hw = x.shape[2:]
    if size is not None:
        out_hw = size
    else:  # as torch's interpolate: floor(in * scale_factor) in float64
        out_hw = tuple(int(math.floor(float(n) * v)) for n, v in zip(in_hw, sf))
        if min(out_hw) < 1 or max(out_hw) > _SIZE_MAX:
            raise ValueError(f"{where}: upsample_nearest2d: scale_factor {list(sf)} gives an "
                             f"output size {out_hw} from {tuple(in_hw)}; it must be between 1 "
                             f"and 2^31 - 1")
    onnx_hw = tuple(int(np.floor(s * np.float32(n))) for s, n in zip(scales, in_hw))
    if onnx_hw != tuple(out_hw):  # never other pixels than torch's: refuse the graph's size
        raise ValueError(f"{where}: at input size {tuple(in_hw)} the graph's Resize (scales "
                         f"{scales.tolist()}) gives {onnx_hw}, the torch Upsample "
                         f"(size={size}, scale_factor={sf}) {tuple(out_hw)}; export again "
                         f"with an example of this size")
    factor = sf is not None and not recompute  # torch's index reads 1 / scale_factor
    ih, iw = (_pool.nearest_source_index(int(n), int(o), sf[d] if factor else None, exact)
              for d, (n, o) in enumerate(zip(in_hw, out_hw)))
    env[out] = _nchw(_pool.gather_hw_nhwc(_nhwc(x), ih, iw))


def _x_gather_hw(st, env):
    _, src, out, rows, cols, where = st
    x = env[src]
    if x.ndim != 4 or (rows.size and rows.max() >= x.shape[2]) or \
            (cols.size and cols.max() >= x.shape[3]):
        raise ValueError(f"{where}: an input of shape {list(x.shape)} for row indices up to "
                         f"{int(rows.max(initial=-1))} and column indices up to "
                         f"{int(cols.max(initial=-1))}; export again with an example of "
                         f"this size")
    env[out] = _nchw(_pool.gather_hw_nhwc(_nhwc(x), rows, cols))


_EXEC = {"quantize": _x_quantize, "dequantize": _x_dequantize, "flatten": _x_reshape,
         "reshape": _x_reshape, "identity": _x_reshape, "transpose": _x_transpose,
         "conv": _x_conv, "linear": _x_linear,
         "add": _x_add, "mul": _x_mul, "concat": _x_concat, "maxpool": _x_maxpool,
         "avgpool": _x_avgpool, "gap": _x_gap, "lookup": _x_lookup, "resize": _x_resize,
         "gather_hw": _x_gather_hw}
_FUSABLE = ("Conv", "Gemm", "Add", "Mul", "Concat", "MaxPool", "AveragePool",
            "GlobalAveragePool", "Cast", "Gather", "Resize")
