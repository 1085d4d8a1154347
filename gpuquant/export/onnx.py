"""Quantized gpuquant models -> ONNX in QDQ form (QuantizeLinear / DequantizeLinear).

The model is traced with ``torch.fx`` (quantized modules are leaves; plain tensor code such
as ``torch.flatten`` becomes graph nodes), run once on the example input to learn every
tensor's shape, and each node is written with the ONNX helper API:

* every int8 / uint8 activation of gpuquant is one ONNX int8 / uint8 tensor (the output of a
  ``QuantizeLinear``); a consumer reads it through ``DequantizeLinear`` with the qparams the
  consumer stored at conversion;
* ``Conv`` / ``Gemm``: int8 weight initializers with per-output-channel scales (axis 0, zero
  points 0), the int32 bias with scale ``s_x * s_w`` (float32) and zero point 0; a fused
  ReLU is a ``Relu`` node, ReLU6 a ``Clip(0, 6)``, then ``QuantizeLinear`` to the output's
  qparams (the pattern onnxruntime fuses into ``QLinearConv`` and TensorRT into int8 layers);
* ``Elemwise`` -> ``Add`` (+ ``Relu``) / ``Mul``, ``Concat`` -> ``Concat``, pools ->
  ``MaxPool`` / ``AveragePool`` / ``GlobalAveragePool``, each between DQ and Q;
* ``Activation(kind)`` (the int8 form is a 256-entry table over the input's codes) ->
  ``Cast(DequantizeLinear(x, 1, 0), int32)`` (the code itself, exact in float32; every
  Q / DQ zero point the lookup adds is 0, as TensorRT requires) indexing a ``Gather`` of
  ``DequantizeLinear(table)`` (the int8 / uint8 table at the output's qparams; for an int8
  input stored rotated by 128, so that ONNX Gather's negative indices, counted from the
  back, read code ``c`` at entry ``c mod 256``), then ``QuantizeLinear`` to the same qparams:
  the bytes of gpuquant's table in every consumer (see :func:`_lookup`);
* ``Upsample`` (nearest modes), between DQ and Q: a ``scale_factor`` whose float32 Resize
  is torch's at every size up to 4096 -> ``Resize(mode="nearest")`` with constant ``scales``
  (``nearest``: ``coordinate_transformation_mode="asymmetric"``, ``nearest_mode="floor"``;
  ``nearest-exact``: ``"half_pixel"``, ``"round_prefer_ceil"``), the module's arguments in
  the metadata (``gpuquant.nearest_resize``, read by :mod:`gpuquant.runtime`, which picks
  torch's pixels from them); any other (a ``size``, a recomputed or other factor) -> two
  ``Gather`` nodes (axis 2, then 3) with torch's source indices at the example's size as
  constant int64 tables, exact everywhere, size-dependent (see :func:`_upsample`);
* ``flatten`` / ``reshape`` / ``view`` / ``permute`` / ``transpose`` act on the int8 tensor
  itself (Flatten, Reshape, Transpose; a transpose keeps the batch dimension first).

The graph's batch dimension is symbolic (``N``) and its spatial size free, except where a
node holds only for the example's spatial size (an ``AdaptiveAvgPool2d`` to more than 1x1, a
fixed-kernel ``AveragePool``; a ``ceil_mode`` pool whose windows depend on the size; an
``Upsample`` given a ``size``, or whose ratio ONNX's Resize cannot follow at every size: its
constant ``Gather`` indices): then the model's metadata says so (``gpuquant.fixed_input_hw``
= ``"H,W"``, the nodes in ``gpuquant.size_dependent_nodes``), ``to_onnx`` warns once, and
:mod:`gpuquant.runtime` refuses other sizes. :mod:`gpuquant.runtime` executes these files
with the contract's integer semantics; onnxruntime requantizes in float (within one output
step of gpuquant per layer; the steps compound through a network).
"""
from __future__ import annotations

import functools
import json
import math
import operator
import os
import warnings
from typing import Dict, Optional

import numpy as np
import torch

from .._compile import uncompiled
from ..nn.quantized.fused import ConvAdd, ConvDequant
from ..nn.quantized.module import QuantizedTracer
from ..quantization.epilogue import unfuse_epilogues
from ..quantization.fx import is_eval_identity
from ..runtime.session import (FIXED_HW_KEY, FIXED_NODES_KEY, FORMAT, FORMAT_KEY,
                               RESIZE_FORMS, RESIZE_KEY)

__all__ = ["to_onnx", "OPSET"]

OPSET = 13
_ACT_DTYPES = ("qint8", "quint8")   # activation dtypes whose range is their storage's
_RELU6 = "relu6"


def _onnx():
    try:
        import onnx
        from onnx import helper, numpy_helper
    except ImportError as e:  # pragma: no cover - onnx is in the deploy extra
        raise ImportError("gpuquant.export.to_onnx needs the onnx package: "
                          "pip install 'gpuquant[deploy]'") from e
    return onnx, helper, numpy_helper


class _Recorder(torch.fx.Interpreter):
    """Runs the traced graph once, keeping every node's value (for shapes)."""

    def __init__(self, gm):
        super().__init__(gm)
        self.values: Dict[str, object] = {}

    def run_node(self, n):
        v = super().run_node(n)
        self.values[n.name] = v
        return v


class _Q:
    """An int8 / uint8 ONNX tensor standing for a gpuquant activation."""

    def __init__(self, name: str, scale: float, zp: int, dtype: str, shape):
        self.name, self.scale, self.zp, self.dtype, self.shape = name, scale, zp, dtype, shape


class _Builder:
    def __init__(self, model_name: str):
        self.onnx, self.helper, self.nph = _onnx()
        self.nodes, self.inits = [], []
        self.names = set()
        self.model_name = model_name
        self._dq = {}
        self.size_dependent = []  # (ONNX node name, why): valid only at the example's size
        self.resize_args = {}     # Resize node name -> the torch Upsample's arguments

    def fresh(self, base: str) -> str:
        base = base.replace(".", "_") or "t"
        name, i = base, 1
        while name in self.names:
            name = f"{base}_{i}"
            i += 1
        self.names.add(name)
        return name

    def init(self, base: str, arr: np.ndarray) -> str:
        name = self.fresh(base)
        arr = np.asarray(arr)
        self.inits.append(self.nph.from_array(arr if arr.flags.c_contiguous else arr.copy(), name))
        return name

    def node(self, op: str, inputs, base: str, **attrs) -> str:
        out = self.fresh(base)
        self.nodes.append(self.helper.make_node(op, list(inputs), [out],
                                                name=self.fresh(f"{base}_{op}"), **attrs))
        return out

    # ---------------------------------------------------------------- Q / DQ
    def zp_init(self, base, zp: int, dtype: str) -> str:
        np_dt = np.int8 if dtype == "qint8" else np.uint8
        return self.init(base, np.array(zp, dtype=np_dt))

    def quantize(self, x: str, base: str, scale: float, zp: int, dtype: str, shape) -> _Q:
        s = self.init(f"{base}_scale", np.array(scale, dtype=np.float32))
        z = self.zp_init(f"{base}_zero_point", zp, dtype)
        return _Q(self.node("QuantizeLinear", [x, s, z], f"{base}_q"), scale, zp, dtype, shape)

    def dequantize(self, q: _Q, scale: float, zp: int) -> str:
        key = (q.name, np.float32(scale).tobytes(), int(zp))
        if key not in self._dq:
            s = self.init(f"{q.name}_dq_scale", np.array(scale, dtype=np.float32))
            z = self.zp_init(f"{q.name}_dq_zero_point", zp, q.dtype)
            self._dq[key] = self.node("DequantizeLinear", [q.name, s, z], f"{q.name}_dq")
        return self._dq[key]

    def weight(self, base: str, w: torch.Tensor, w_scale: torch.Tensor) -> str:
        o = w.shape[0]
        q = self.init(f"{base}_weight", w.detach().cpu().numpy().astype(np.int8))
        s = self.init(f"{base}_weight_scale", w_scale.detach().cpu().numpy().astype(np.float32))
        z = self.init(f"{base}_weight_zero_point", np.zeros(o, dtype=np.int8))
        return self.node("DequantizeLinear", [q, s, z], f"{base}_weight_dq", axis=0)

    def bias(self, base: str, b: torch.Tensor, in_scale: float, w_scale: torch.Tensor) -> str:
        o = b.shape[0]
        scale = np.float32(in_scale) * w_scale.detach().cpu().numpy().astype(np.float32)
        q = self.init(f"{base}_bias", b.detach().cpu().numpy().astype(np.int32))
        s = self.init(f"{base}_bias_scale", scale.astype(np.float32))
        z = self.init(f"{base}_bias_zero_point", np.zeros(o, dtype=np.int32))
        return self.node("DequantizeLinear", [q, s, z], f"{base}_bias_dq", axis=0)

    def activation(self, y: str, base: str, activation: str) -> str:
        if activation == "relu":
            return self.node("Relu", [y], f"{base}_relu")
        if activation == _RELU6:
            lo = self.init(f"{base}_clip_min", np.array(0.0, dtype=np.float32))
            hi = self.init(f"{base}_clip_max", np.array(6.0, dtype=np.float32))
            return self.node("Clip", [y, lo, hi], f"{base}_relu6")
        return y


def _who(name: str, m) -> str:
    return f"module {name!r} ({type(m).__name__})"


def _qp(m, name: str):
    """(scale as float, zero point, dtype name) of a quantized module's per-tensor qparams."""
    return float(getattr(m, f"{name}_scale")), int(getattr(m, f"{name}_zero_point")), \
        m._dtypes[name]


def _check_act_dtype(dtype: str, who: str) -> None:
    if dtype not in _ACT_DTYPES:
        raise NotImplementedError(f"to_onnx: {who} uses activation dtype {dtype}; ONNX "
                                  f"QuantizeLinear clamps to the full int8 / uint8 range, so "
                                  f"only {list(_ACT_DTYPES)} export exactly")


def _pair(v):
    return tuple(int(t) for t in v) if isinstance(v, (tuple, list)) else (int(v), int(v))


def to_onnx(model: torch.nn.Module, example_input, path: Optional[str] = None,
            opset: int = OPSET, dynamic_batch: bool = True):
    """Export a quantized model (``gpuquant.quantization.quantize``'s result) to ONNX (QDQ).

    Args:
        model: the quantized model: a float input goes through a ``QuantStub`` first; the
            output is float after a ``DequantStub`` (else the int8 / uint8 tensor).
        example_input: a float tensor (one input) or a tuple of them; used to trace the
            model and learn the shapes.
        path: file to write (a str or ``os.PathLike``), or None (only return the model).
        opset: ONNX opset, from 13 to the newest the installed onnx package knows.
        dynamic_batch: make the first dimension of inputs and outputs symbolic (``N``).

    Returns:
        The ``onnx.ModelProto`` (checked with ``onnx.checker``).

    Raises:
        TypeError: not a module, inputs that are not float tensors, a path that is not a
            str / os.PathLike.
        ValueError: an opset outside 13 to the installed onnx's newest, a model in training
            mode, a model with no static quantized module (e.g. only ``quantize_dynamic``'s
            modules, which have no QDQ export).
        NotImplementedError: a module or operation with no QDQ export (named), e.g. a float
            layer left in the model, an activation dtype other than qint8 / quint8; an output
            other than a tensor or a flat tuple / list of tensors (a dict, a nested tuple,
            None; named).

    Warns:
        UserWarning: once, naming the nodes, where the graph holds only for the example's
            spatial size (a non-global ``AdaptiveAvgPool2d``, a ``ceil_mode`` pool whose
            windows depend on the size, an ``Upsample`` given a ``size`` or whose ratio
            Resize cannot follow at every size: constant ``Gather`` indices, torch's pixels
            at the example's size); the model's metadata then records it
            (``gpuquant.fixed_input_hw`` = ``"H,W"``, one per 4-D input, ``;`` between) and
            :mod:`gpuquant.runtime` refuses other sizes.

    Example:
        >>> qmodel = quantize(qat_model)
        >>> gpuquant.export.to_onnx(qmodel, torch.randn(1, 3, 224, 224), "model.onnx")
    """
    from ..nn import quantized as Q

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"to_onnx: model must be a torch.nn.Module, got {type(model).__name__}")
    model = uncompiled(model)  # torch.compile(model): the model it wraps
    inputs = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    for i, x in enumerate(inputs):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            what = f"a {x.dtype} tensor" if isinstance(x, torch.Tensor) else \
                f"a {type(x).__module__}.{type(x).__name__}"
            raise TypeError(f"to_onnx: example_input[{i}] must be a float tensor "
                            f"(torch.Tensor), got {what} (leave out parameters that are not "
                            f"tensors: forward runs with their defaults)")
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"to_onnx: path must be None, a str or an os.PathLike, got "
                        f"{type(path).__name__} {path!r}")
    max_opset = _onnx()[0].defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not 13 <= opset <= max_opset:
        raise ValueError(f"to_onnx: opset must be an int from 13 (QDQ with per-channel axis) to "
                         f"{max_opset} (the newest the installed onnx knows), got {opset!r}")
    if model.training:
        raise ValueError("to_onnx: the model is in training mode; export the quantized model "
                         "(gpuquant.quantization.quantize returns it in eval mode)")
    if not any(isinstance(m, Q.QuantizedModule) for m in model.modules()):
        from ..nn.quantized import linear_dynamic as D
        dyn = [f"{n or '<root>'} ({type(m).__name__})" for n, m in model.named_modules()
               if isinstance(m, (D._Int8WeightLinear, D.DynamicMultiheadAttention))]
        if dyn:
            raise ValueError(f"to_onnx: the model's quantized modules are dynamic / weight-only "
                             f"ones ({', '.join(dyn[:3])}{', ...' if len(dyn) > 3 else ''}; "
                             f"from quantize_dynamic), which have no QDQ ONNX export: only the "
                             f"static int8 modules of gpuquant.nn.quantized (from "
                             f"gpuquant.quantization.quantize) export")
        raise ValueError("to_onnx: the model holds no gpuquant.nn.quantized module; convert it "
                         "with gpuquant.quantization.quantize first")

    try:
        if any(isinstance(m, (ConvAdd, ConvDequant)) for m in model.modules()):
            model = unfuse_epilogues(model)  # fused modules export as their two ops
        graph = QuantizedTracer().trace(model)
    except Exception as e:  # fx cannot follow data-dependent Python control flow
        raise NotImplementedError(f"to_onnx: torch.fx could not trace {type(model).__name__} "
                                  f"({type(e).__name__}: {e}); export needs forward code "
                                  f"without data-dependent control flow") from e
    params = [n for n in graph.nodes if n.op == "placeholder"]
    if len(inputs) > len(params):
        raise ValueError(f"to_onnx: example_input gives {len(inputs)} inputs but "
                         f"{type(model).__name__}.forward takes {len(params)} "
                         f"({', '.join(n.target for n in params)})")
    for n in params[len(inputs):]:  # parameters left to their defaults
        if not n.args:
            raise ValueError(f"to_onnx: the model takes more inputs than example_input gives "
                             f"({len(inputs)}): {n.target!r} has no example")
        if n.users:
            raise ValueError(f"to_onnx: forward's parameter {n.target!r} (default "
                             f"{n.args[0]!r}) is used by the model; the ONNX graph's inputs "
                             f"are the example tensors only: compute it in the model or make "
                             f"it a constant attribute")
    gm = torch.fx.GraphModule(model, graph)
    rec = _Recorder(gm)
    with torch.no_grad():
        rec.run(*inputs)
    vals = rec.values
    modules = dict(model.named_modules())

    b = _Builder(type(model).__name__)
    onnx, helper = b.onnx, b.helper
    env: Dict[str, object] = {}      # fx node name -> _Q | ("float", onnx name)
    graph_inputs, graph_outputs = [], []
    no_batch = set()                 # fx nodes whose first dimension is not the batch

    def batch_shape(shape, batch=True):
        shape = list(shape)
        if dynamic_batch and shape:
            shape[0] = "N" if batch else None  # e.g. flatten(x, 0): N * C * H * W
        return shape

    def q_of(arg, who: str) -> _Q:
        v = env.get(arg.name) if isinstance(arg, torch.fx.Node) else None
        if not isinstance(v, _Q):
            raise NotImplementedError(f"to_onnx: {who} expects a quantized (int8 / uint8) input "
                                      f"but its input {getattr(arg, 'name', arg)!r} is not one "
                                      f"(a float op between quantized modules?)")
        return v

    def out_q(y: str, base: str, m, node) -> _Q:
        s, z, dt = _qp(m, "output")
        _check_act_dtype(dt, _who(node.target, m))
        return b.quantize(y, base, s, z, dt, tuple(vals[node.name].shape))

    def dq_input(arg, m, name: str, who: str) -> str:
        q = q_of(arg, who)
        s, z, dt = _qp(m, name)
        _check_act_dtype(dt, who)
        return b.dequantize(q, s, z)

    for node in graph.nodes:
        if any(a.name in no_batch for a in node.all_input_nodes):
            no_batch.add(node.name)
        if node.op == "call_module" and isinstance(modules.get(node.target), torch.nn.Flatten) \
                and _merges_batch(vals[node.args[0].name], vals[node.name], node,
                                  modules[node.target].start_dim):
            no_batch.add(node.name)
        if node.op == "placeholder":
            i = len(graph_inputs)
            if i >= len(inputs):  # an unused parameter left to its default (checked above)
                continue
            name = b.fresh("input" if len(inputs) == 1 else f"input_{i}")
            graph_inputs.append(helper.make_tensor_value_info(
                name, onnx.TensorProto.FLOAT, batch_shape(inputs[i].shape)))
            env[node.name] = ("float", name)
        elif node.op == "call_module":
            m = modules[node.target]
            who = _who(node.target, m)
            base = node.target
            if isinstance(m, Q.QuantStub):
                src = env[node.args[0].name]
                if not isinstance(src, tuple):
                    raise NotImplementedError(f"to_onnx: {who} needs a float input")
                env[node.name] = out_q(src[1], base, m, node)
            elif isinstance(m, Q.DequantStub):
                env[node.name] = ("float", dq_input(node.args[0], m, "input", who))
            elif isinstance(m, Q.Conv2d):
                x = dq_input(node.args[0], m, "input", who)
                w = b.weight(base, m.weight, m.weight_scale)
                ins = [x, w]
                if m.bias is not None:
                    ins.append(b.bias(base, m.bias, float(m.input_scale), m.weight_scale))
                ph, pw = _pair(m.padding)
                y = b.node("Conv", ins, f"{base}_conv", kernel_shape=list(m.kernel_size),
                           strides=list(_pair(m.stride)), pads=[ph, pw, ph, pw],
                           dilations=list(_pair(m.dilation)), group=int(m.groups))
                env[node.name] = out_q(b.activation(y, base, m.activation), base, m, node)
            elif isinstance(m, Q.Linear):
                if vals[node.args[0].name].dim() != 2:
                    raise NotImplementedError(f"to_onnx: {who} on a {vals[node.args[0].name].dim()}"
                                              f"-D input; only (N, in_features) exports (Gemm)")
                x = dq_input(node.args[0], m, "input", who)
                ins = [x, b.weight(base, m.weight, m.weight_scale)]
                if m.bias is not None:
                    ins.append(b.bias(base, m.bias, float(m.input_scale), m.weight_scale))
                y = b.node("Gemm", ins, f"{base}_gemm", transB=1)
                env[node.name] = out_q(b.activation(y, base, m.activation), base, m, node)
            elif isinstance(m, Q.Elemwise):
                xa = dq_input(node.args[0], m, "a", who)
                xb = dq_input(node.args[1], m, "b", who)
                op = "Mul" if m.method == "mul" else "Add"
                y = b.node(op, [xa, xb], f"{base}_{op.lower()}")
                if m.method == "add_relu":
                    y = b.activation(y, base, "relu")
                env[node.name] = out_q(y, base, m, node)
            elif isinstance(m, Q.Concat):
                tensors = node.args[0] if node.args else node.kwargs["tensors"]
                dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
                ins = []
                for i, t in enumerate(tensors):
                    q = q_of(t, who)
                    _check_act_dtype(m._dtypes["input"], who)
                    ins.append(b.dequantize(q, float(m.input_scale[i]),
                                            int(m.input_zero_point[i])))
                nd = vals[node.name].dim()
                y = b.node("Concat", ins, f"{base}_concat", axis=int(dim) % nd)
                env[node.name] = out_q(y, base, m, node)
            elif isinstance(m, (Q.MaxPool2d, Q.AvgPool2d, Q.AdaptiveAvgPool2d)):
                env[node.name] = _pool(b, m, node, vals, dq_input, who, base)
            elif isinstance(m, Q.Upsample):
                env[node.name] = _upsample(b, m, node, vals, dq_input, who, base)
            elif isinstance(m, Q.Activation):
                env[node.name] = _lookup(b, m, q_of(node.args[0], who), who, base,
                                         tuple(vals[node.name].shape))
            elif isinstance(m, (torch.nn.Identity, torch.nn.Dropout)) or is_eval_identity(m):
                env[node.name] = env[node.args[0].name]
            elif isinstance(m, torch.nn.Flatten):
                env[node.name] = _flatten(b, env[node.args[0].name], vals[node.args[0].name],
                                          vals[node.name], base, m.start_dim, m.end_dim)
            else:
                raise NotImplementedError(
                    f"to_onnx: {who} has no QDQ export; supported: gpuquant.nn.quantized "
                    f"modules ({', '.join(Q.__all__[1:])}), Identity, Dropout, Flatten "
                    f"(a float layer left in the model cannot run between int8 tensors)")
        elif node.op in ("call_function", "call_method") and _reads_shape(node, env):
            env[node.name] = _SHAPE  # x.size(0), x.shape[1] * 2: no ONNX node (a reshape
            # takes its shape from the traced output, with the batch dimension kept free)
        elif node.op in ("call_function", "call_method"):
            env[node.name] = _tensor_op(b, node, env, vals)
            a0 = node.args[0] if node.args else None
            if isinstance(a0, torch.fx.Node) and _merges_batch(vals[a0.name], vals[node.name],
                                                               node):
                no_batch.add(node.name)
        elif node.op == "output":
            outs = _flat_outputs(node.args[0], env)
            for i, o in enumerate(outs):
                v = env[o.name]
                src = v[1] if isinstance(v, tuple) else v.name
                name = b.fresh("output" if len(outs) == 1 else f"output_{i}")
                b.nodes.append(helper.make_node("Identity", [src], [name],
                                                name=b.fresh(f"{name}_id")))
                t = vals[o.name]
                et = onnx.TensorProto.FLOAT if isinstance(v, tuple) else (
                    onnx.TensorProto.INT8 if v.dtype == "qint8" else onnx.TensorProto.UINT8)
                graph_outputs.append(helper.make_tensor_value_info(
                    name, et, batch_shape(t.shape, o.name not in no_batch)))
        elif node.op == "get_attr":
            raise NotImplementedError(f"to_onnx: attribute access {node.target!r} in forward is "
                                      f"not supported")

    if not b.size_dependent:  # any spatial size runs: say so in the declared shapes, else
        _free_spatial(graph_inputs, graph_outputs)  # onnxruntime refuses other sizes
    g = helper.make_graph(b.nodes, f"gpuquant_{b.model_name}", graph_inputs, graph_outputs,
                          initializer=b.inits)
    proto = helper.make_model(g, producer_name="gpuquant",
                              opset_imports=[helper.make_opsetid("", int(opset))])
    proto.ir_version = min(proto.ir_version, 8)  # readable by older onnxruntime releases
    props = {FORMAT_KEY: FORMAT}
    if b.resize_args:
        props[RESIZE_KEY] = json.dumps(b.resize_args, sort_keys=True)
    if b.size_dependent:
        props.update(_fixed_size(b.size_dependent, inputs))
    helper.set_model_props(proto, props)
    onnx.checker.check_model(proto, full_check=True)
    if path is not None:
        onnx.save(proto, str(path))
    return proto


def _free_spatial(graph_inputs, graph_outputs) -> None:
    """Make H and W of the 4-D inputs symbolic (``H`` / ``W``, ``H_i`` / ``W_i`` for input i
    of several) and those of the 4-D outputs unknown, as every non-batch size of outputs of
    3 or 5+ dimensions: the graph holds at any spatial size."""
    for i, vi in enumerate(graph_inputs):
        dims = vi.type.tensor_type.shape.dim
        if len(dims) == 4:
            sfx = "" if len(graph_inputs) == 1 else f"_{i}"
            dims[2].dim_param, dims[3].dim_param = f"H{sfx}", f"W{sfx}"
    for vi in graph_outputs:  # (a 2-D output keeps its width: a classifier's, mostly)
        dims = vi.type.tensor_type.shape.dim
        for d in (dims[2:] if len(dims) == 4 else dims[1:] if len(dims) > 2 else ()):
            d.Clear()  # H, W; or a reshape's sizes (tokens: (N, C, H*W))


def _fixed_size(nodes, inputs) -> dict:
    """Metadata (and one UserWarning) for a graph whose ``nodes`` ((name, why) pairs) hold
    only for the example inputs' spatial size."""
    hw = [tuple(int(d) for d in x.shape[-2:]) for x in inputs if x.dim() == 4]
    size = " and ".join(f"{h}x{w}" for h, w in hw) or "the example's size"
    warnings.warn(f"to_onnx: the ONNX graph is valid only at input spatial size {size} (the "
                  f"example's): " + "; ".join(f"node {n!r} ({why})" for n, why in nodes) +
                  f". gpuquant.runtime refuses other sizes (metadata {FIXED_HW_KEY!r}); export "
                  f"with an example of each size you run", UserWarning, stacklevel=3)
    return {FIXED_HW_KEY: ";".join(f"{h},{w}" for h, w in hw),
            FIXED_NODES_KEY: ",".join(n for n, _ in nodes)}


def _ceil_depends_on_size(k, st, p, dil) -> bool:
    """Whether a ceil_mode pool's ONNX form (:func:`_ceil_mode`'s choice) holds for one
    input size only. In a dimension with stride 1 ceil and floor mode agree; with no padding
    and a stride at most the (dilated) kernel PyTorch never drops a last window, so ONNX's
    ceil_mode 1 is PyTorch's at every size. Elsewhere the choice follows the example."""
    return any(s != 1 and (pp != 0 or s > d * (kk - 1) + 1)
               for kk, s, pp, d in zip(k, st, p, dil))


def _flat_outputs(out, env) -> list:
    """The traced model's outputs as a list of fx nodes of tensors: one tensor, or a flat
    tuple / list of them (ONNX graph outputs are a flat list of tensors)."""
    outs = list(out) if isinstance(out, (tuple, list)) else [out]

    def seq(o) -> str:  # fx stores lists as immutable_list
        return "tuple" if isinstance(o, tuple) else "list"

    def what(o) -> str:
        if isinstance(o, dict):
            return f"a dict (keys {list(o)})"
        if isinstance(o, (tuple, list)):
            return f"a {seq(o)} (nested)"
        if isinstance(o, torch.fx.Node):
            return f"a value read off a tensor's shape (node {o.name!r})"
        return "None" if o is None else f"a {type(o).__name__} ({o!r})"

    for i, o in enumerate(outs):
        if not isinstance(o, torch.fx.Node) or env.get(o.name) is _SHAPE:
            whole = f"a {seq(out)} whose item {i} is {what(o)}" \
                if isinstance(out, (tuple, list)) else what(o)
            hint = "; return a tuple of its values" if isinstance(o, dict) else ""
            raise NotImplementedError(f"to_onnx: the model's output is {whole}; supported: a "
                                      f"tensor or a flat tuple / list of tensors (ONNX graph "
                                      f"outputs are a flat list){hint}")
    return outs


def _ceil_mode(ceil_mode, in_hw, out_hw, k, st, p, dil, who: str) -> int:
    """The ONNX ``ceil_mode`` giving PyTorch's pool output size ``out_hw``. PyTorch's ceil
    mode drops a last window that would start in the right padding; ONNX's (and
    onnxruntime's) keeps it. Where PyTorch dropped it in every dimension the windows are
    floor mode's (0: same windows, same divisors); where it kept a partial window in every
    dimension, 1. One dimension of each cannot be said with ONNX's one attribute and
    symmetric pads (what gpuquant.runtime reads): refused by name."""
    if not ceil_mode:
        return 0
    room = [n + 2 * pp - d * (kk - 1) - 1 for n, pp, d, kk in zip(in_hw, p, dil, k)]
    out = [int(o) for o in out_hw]
    if out == [-(-r // ss) + 1 for r, ss in zip(room, st)]:
        return 1
    if out == [r // ss + 1 for r, ss in zip(room, st)]:
        return 0
    raise NotImplementedError(
        f"to_onnx: {who} with ceil_mode=True at input size {tuple(in_hw)}: PyTorch keeps a "
        f"partial last window in one dimension and drops it (it would start in the padding) "
        f"in the other, which ONNX's single ceil_mode cannot say; pad the input or use "
        f"ceil_mode=False")


def _pool(b: _Builder, m, node, vals, dq_input, who: str, base: str) -> _Q:
    from ..nn import quantized as Q
    x = dq_input(node.args[0], m, "input", who)
    s, z, dt = _qp(m, "input")
    shape_in = tuple(vals[node.args[0].name].shape)
    if isinstance(m, Q.MaxPool2d):
        if m.return_indices:
            raise NotImplementedError(f"to_onnx: {who} with return_indices")
        k = _pair(m.kernel_size)
        st = k if m.stride in (None, [], ()) else _pair(m.stride)
        p = _pair(m.padding)
        dil = _pair(m.dilation)
        ceil = _ceil_mode(m.ceil_mode, shape_in[-2:], vals[node.name].shape[-2:], k, st, p, dil,
                          who)
        y = b.node("MaxPool", [x], f"{base}_maxpool", kernel_shape=list(k), strides=list(st),
                   pads=[p[0], p[1], p[0], p[1]], dilations=list(dil), ceil_mode=ceil)
        size_dep = m.ceil_mode and _ceil_depends_on_size(k, st, p, dil)
    elif isinstance(m, Q.AvgPool2d):
        if m.divisor_override:
            raise NotImplementedError(f"to_onnx: {who} with divisor_override (ONNX AveragePool "
                                      f"has none)")
        k = _pair(m.kernel_size)
        st = k if m.stride in (None, [], ()) else _pair(m.stride)
        p = _pair(m.padding)
        cip = bool(m.count_include_pad)
        if cip and m.ceil_mode:
            # ceil_mode windows that run past the padded input: PyTorch divides by the taps
            # inside the padded input, onnxruntime's QLinearAveragePool (what it fuses
            # DQ -> AveragePool -> Q into) by the whole kernel. With no padding PyTorch's
            # divisor is count_include_pad=0's, which every consumer reads the same way.
            if p == (0, 0):
                cip = False
            else:
                out_hw = tuple(vals[node.name].shape[-2:])
                for n_in, n_out, kk, ss, pp in zip(shape_in[-2:], out_hw, k, st, p):
                    if (n_out - 1) * ss - pp + kk > n_in + pp:
                        raise NotImplementedError(
                            f"to_onnx: {who} with ceil_mode=True, count_include_pad=True and "
                            f"padding={p} has windows past the padded input at input size "
                            f"{tuple(shape_in[-2:])}: ONNX consumers disagree on their divisor "
                            f"(onnxruntime's QLinearAveragePool divides by the whole kernel, "
                            f"PyTorch by the taps inside the padded input); use "
                            f"count_include_pad=False, padding=0 or ceil_mode=False")
        ceil = _ceil_mode(m.ceil_mode, shape_in[-2:], vals[node.name].shape[-2:], k, st, p,
                          (1, 1), who)
        y = b.node("AveragePool", [x], f"{base}_avgpool", kernel_shape=list(k),
                   strides=list(st), pads=[p[0], p[1], p[0], p[1]], ceil_mode=ceil,
                   count_include_pad=int(cip))
        size_dep = m.ceil_mode and _ceil_depends_on_size(k, st, p, (1, 1))
    else:
        oh, ow = tuple(vals[node.name].shape[-2:])
        h, w = shape_in[-2:]
        size_dep = (oh, ow) != (1, 1)  # a fixed kernel: adaptive at this input size only
        if not size_dep:
            y = b.node("GlobalAveragePool", [x], f"{base}_gap")
        elif h % oh == 0 and w % ow == 0:
            k = (h // oh, w // ow)
            y = b.node("AveragePool", [x], f"{base}_avgpool", kernel_shape=list(k),
                       strides=list(k))
        else:
            raise NotImplementedError(f"to_onnx: {who}: adaptive pooling from {(h, w)} to "
                                      f"{(oh, ow)} has windows of unequal sizes (no ONNX op)")
    if size_dep:
        why = "adaptive pooling as a fixed-kernel AveragePool" \
            if isinstance(m, Q.AdaptiveAvgPool2d) else "ceil_mode windows"
        b.size_dependent.append((b.nodes[-1].name,
                                 f"{who}: {why} for input {tuple(shape_in[-2:])}"))
    return b.quantize(y, base, s, z, dt, tuple(vals[node.name].shape))


_RESIZE_CHECKED = 4096  # a scale_factor Resize is size-free if exact at every size to this


def _round_half_up(x: np.ndarray) -> np.ndarray:
    """C's ``round`` (half away from zero) in x's float type, exactly."""
    t = np.trunc(x)
    return t + np.sign(x) * (np.abs(x - t) >= 0.5)


def _onnx_nearest(out: int, scale, exact: bool, ftype) -> np.ndarray:
    """ONNX Resize's source index (before clamping to the input) of each of ``out`` output
    indices, with the formula evaluated in ``ftype``: float32 is onnxruntime's arithmetic
    (``o / scale``; ``(o + 0.5) / scale - 0.5`` rounded half up), float64 about the
    real-valued one. int64."""
    o = np.arange(out).astype(ftype)
    s = ftype(np.float32(scale))
    x = (o + ftype(0.5)) / s - ftype(0.5) if exact else o / s
    return (_round_half_up(x) if exact else np.floor(x)).astype(np.int64)


def _resize_picks(n: int, out: int, want: np.ndarray, scale, exact: bool) -> bool:
    """Whether ``Resize`` with float32 ``scale`` on an input dimension of ``n`` gives ``out``
    outputs reading input indices ``want`` in float32 arithmetic (onnxruntime's) and in
    float64 (a consumer computing more precisely: no index sits on a rounding boundary that
    float32 crosses)."""
    s = np.float32(scale)
    if int(np.floor(s * np.float32(n))) != out or math.floor(float(s) * n) != out:
        return False
    return all(np.array_equal(np.clip(_onnx_nearest(out, s, exact, ft), 0, n - 1), want)
               for ft in (np.float32, np.float64))


@functools.lru_cache(maxsize=64)
def _resize_size_free(scale_factor: float, exact: bool) -> bool:
    """Whether ``Resize`` with scale ``float32(scale_factor)`` picks torch's pixels (and output
    size) for ``interpolate(scale_factor=scale_factor)`` at every input size from 1 to
    ``_RESIZE_CHECKED`` (in float32 and float64 arithmetic, :func:`_resize_picks`): then the
    exported graph is declared free of spatial size. Past the checked sizes a consumer's
    float32 Resize may part from torch: an audit found onnxruntime one pixel off at widths
    of 524294 (nearest-exact, 2.2) and 1797560 (nearest, 1.75); gpuquant.runtime computes
    torch's indices itself (metadata) and stays exact at any size. Below an index where both
    agree unclamped, the clamped indices agree at every size; the sizes where torch copies or
    halves (``nearest`` with an output of once or twice the input) are checked one by one."""
    from ..backends.numpy.pool import nearest_source_index
    s = np.float32(scale_factor)
    ns = np.arange(1, _RESIZE_CHECKED + 1)
    outs = np.floor(ns.astype(np.float64) * float(scale_factor)).astype(np.int64)  # torch's
    run = outs >= 1  # (smaller outputs: torch refuses them, and so does gpuquant.runtime)
    if not run.any() or int(outs.max()) > 2 ** 22:
        return False
    if (np.floor(s * ns.astype(np.float32)).astype(np.int64) != outs)[run].any() or \
            (np.floor(float(s) * ns) != outs)[run].any():
        return False
    top = int(outs.max())
    t = nearest_source_index(2 ** 40, top, float(scale_factor), exact)  # unclamped
    e = [np.maximum(_onnx_nearest(top, s, exact, ft), 0) for ft in (np.float32, np.float64)]
    bad = np.nonzero((t != e[0]) | (t != e[1]))[0]
    for n, out in zip(ns[run], outs[run]):
        n, out = int(n), int(out)
        if not exact and out in (n, 2 * n):  # torch's copy / halving
            if float(s) == out / n:  # o / 1, o / 2: exact in any float arithmetic
                continue
            if not _resize_picks(n, out, nearest_source_index(n, out, float(scale_factor),
                                                              exact), s, exact):
                return False
            continue
        d = bad[bad < out]
        if d.size and any((np.minimum(t[d], n - 1) != np.minimum(v[d], n - 1)).any()
                          for v in e):
            return False
    return True


def _upsample(b: _Builder, m, node, vals, dq_input, who: str, base: str) -> _Q:
    """A quantized nearest ``Upsample``: torch's pixels picked from ``DequantizeLinear(x)``,
    then ``QuantizeLinear`` to the input's qparams (a copy of codes in every consumer), in one
    of two forms:

    * a ``scale_factor`` (not recomputed) whose float32 value makes Resize pick torch's
      pixels at every input size up to 4096 in both dimensions (integer factors, halves, ...;
      :func:`_resize_size_free`): ``Resize(scales=[1, 1, sh, sw], mode="nearest")``
      (coordinate / nearest modes from
      :data:`gpuquant.runtime.session.RESIZE_FORMS`), free of spatial size (a
      consumer's Resize checked to 4096; gpuquant.runtime exact at any size);
      the module's arguments are recorded for :mod:`gpuquant.runtime` (metadata
      ``gpuquant.nearest_resize``: Resize node name -> ``size``, ``scale_factor``, ``mode``,
      ``recompute_scale_factor``), which computes torch's pixels from them; the entry is
      keyed by the node's name, so a graph optimiser that renames nodes makes
      gpuquant.runtime refuse the file (naming the node, whose metadata entry is missing)
      rather than guess, while other consumers, which read only the scales, are unaffected;
    * otherwise (a ``size``, ``recompute_scale_factor=True``: torch's ratio is ``in / out``
      of the actual size; a factor such as 0.3 whose float32 Resize differs from torch's
      ``1 / scale_factor`` at some size): ``Gather(Gather(x, rows, axis=2), cols, axis=3)``
      with torch's source indices at the example's size as constant int64 tables
      (``nearest_source_index``): exact in every consumer, and size-dependent (warned,
      metadata, refused by gpuquant.runtime at other sizes)."""
    from ..backends.numpy.pool import nearest_source_index
    from ..functional.integer import upsample_args
    if m.mode not in RESIZE_FORMS:  # (the module refuses other modes)
        raise NotImplementedError(f"to_onnx: {who} with mode {m.mode!r}")
    x = dq_input(node.args[0], m, "input", who)
    s, z, dt = _qp(m, "input")
    in_hw = tuple(int(v) for v in vals[node.args[0].name].shape[-2:])
    out_hw = tuple(int(v) for v in vals[node.name].shape[-2:])
    size, sf = upsample_args(who, m.size, m.scale_factor)
    exact = m.mode == "nearest-exact"
    factor = sf is not None and not m.recompute_scale_factor  # torch's index uses 1 / factor
    free = [factor and _resize_size_free(f, exact) for f in (sf or (None, None))]
    if all(free):
        ctm, nm = RESIZE_FORMS[m.mode]
        sc = b.init(f"{base}_scales", np.array([1.0, 1.0] + list(sf), dtype=np.float32))
        y = b.node("Resize", [x, "", sc], f"{base}_resize", mode="nearest",
                   coordinate_transformation_mode=ctm, nearest_mode=nm)
        b.resize_args[b.nodes[-1].name] = {
            "size": None, "scale_factor": list(sf), "mode": m.mode,
            "recompute_scale_factor": m.recompute_scale_factor}
        return b.quantize(y, base, s, z, dt, tuple(vals[node.name].shape))
    why, names = [], []
    for d, (n, out) in enumerate(zip(in_hw, out_hw)):
        idx = nearest_source_index(n, out, sf[d] if factor else None, exact)
        t = b.init(f"{base}_{('row', 'col')[d]}_index", idx.astype(np.int64))
        x = b.node("Gather", [x, t], f"{base}_{('rows', 'cols')[d]}", axis=d + 2)
        names.append(b.nodes[-1].name)
        if not free[d]:
            why.append(f"dimension {d + 2}: " + (
                f"size={size}, a ratio that depends on the input size" if size is not None
                else "recompute_scale_factor=True, a ratio that depends on the input size"
                if not factor else f"scale_factor {sf[d]!r}, whose float32 Resize differs "
                f"from torch at some input sizes up to {_RESIZE_CHECKED}"))
    b.size_dependent.append((names[0], f"{who}: torch's source rows / columns for input "
                                       f"{in_hw} as constant Gather indices ({'; '.join(why)})"))
    b.size_dependent.append((names[1], f"{who}: its columns"))
    return b.quantize(x, base, s, z, dt, tuple(vals[node.name].shape))


def _lookup(b: _Builder, m, q: _Q, who: str, base: str, shape) -> _Q:
    """A quantized ``Activation``: its table (entry ``code - storage_min`` = the output code
    of input ``code``) indexed by the input's codes, as

        idx = Cast(DequantizeLinear(x, scale 1, zero point 0), to=int32)   # the code itself
        y = QuantizeLinear(Gather(DequantizeLinear(stored, s_y, zp_y), idx), s_y, zp_y)

    where ``stored`` is the table for a uint8 input (codes 0..255 are its indices) and, for
    an int8 input, the table rotated by 128 (``np.roll(table, -128)``: entry ``i`` holds the
    output of code ``i`` for ``i < 128``, of code ``i - 256`` from 128 on), which ONNX Gather
    reads at ``c mod 256`` for code ``c``: a negative index counts from the back (ONNX
    Gather takes indices in ``[-256, 255]`` for 256 entries).

    Why this form: the table is the op (``quantize(f(dequantize(q)))`` built with torch's
    ``f`` at conversion); recomputing ``f`` in float (ONNX ``Sigmoid``, ``Gelu``, ...)
    would differ from it by a float32 step here and there, so every consumer would be off
    by an output step on some codes, and opset 13 has no ``Gelu`` / ``Mish``. A ``Gather``
    of the stored table gives gpuquant's bytes in any consumer: the code in float32 is an
    exact integer in [-128, 255]; ``DequantizeLinear`` then ``QuantizeLinear`` of a table
    entry with the same qparams gives it back (``|code - zp| <= 255``, so the float32
    rounding of ``(code - zp) * s`` moves it far less than half a step). The index's
    ``DequantizeLinear`` has zero point 0 (not ``storage_min``, which would be -128 for int8:
    TensorRT takes only zero points 0), hence the rotation instead of a shift; the table's
    own DQ / Q carry the output's qparams (zero point 0 for the symmetric int8 qconfigs).
    Kept in QDQ style, as the other ops: the table is an int8 / uint8 initializer read
    through ``DequantizeLinear`` (as weights are), the output an int8 / uint8 tensor made by
    ``QuantizeLinear``, and no node casts an int8 tensor (TensorRT takes 8-bit tensors only
    through Q / DQ). onnxruntime 1.32 gives the table's bytes on all 256 codes of either
    dtype, with its graph optimizations and without (a test). :mod:`gpuquant.runtime`
    matches the pattern (refusing any other index zero point) and gathers the integer table,
    un-rotated at load, directly."""
    s_in, z_in, dt_in = _qp(m, "input")
    s, z, dt = _qp(m, "output")
    _check_act_dtype(dt_in, who)
    _check_act_dtype(dt, who)
    if q.dtype != dt_in:  # (the torch module refuses it too)
        raise NotImplementedError(f"to_onnx: {who} expects a {dt_in} input, got a {q.dtype} "
                                  f"tensor")
    one = b.init(f"{base}_index_scale", np.array(1.0, dtype=np.float32))
    zero = b.zp_init(f"{base}_index_zero_point", 0, q.dtype)
    code = b.node("DequantizeLinear", [q.name, one, zero], f"{base}_index_dq")
    idx = b.node("Cast", [code], f"{base}_index", to=b.onnx.TensorProto.INT32)
    table = m.table(torch.device("cpu")).numpy()
    np_dt = np.int8 if dt == "qint8" else np.uint8
    if table.shape != (256,) or table.dtype != np_dt:  # pragma: no cover - the module's own
        raise ValueError(f"to_onnx: {who}: table of shape {table.shape} and dtype "
                         f"{table.dtype}; expected 256 {np.dtype(np_dt)} entries")
    if q.dtype == "qint8":  # code c at entry c mod 256: codes 0..127, then -128..-1
        table = np.roll(table, -128)
    t = b.init(f"{base}_table", table)
    ts = b.init(f"{base}_table_scale", np.array(s, dtype=np.float32))
    tz = b.zp_init(f"{base}_table_zero_point", z, dt)
    values = b.node("DequantizeLinear", [t, ts, tz], f"{base}_table_dq")
    y = b.node("Gather", [values, idx], f"{base}_gather", axis=0)
    return b.quantize(y, base, s, z, dt, shape)


def _merges_batch(in_val, out_val, node, start_dim=None) -> bool:
    """Whether a flatten / reshape output's first dimension is no longer the batch."""
    if start_dim is None and (node.target is torch.flatten or node.target == "flatten"):
        start_dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    if start_dim is not None and in_val.dim() and start_dim % in_val.dim() == 0 \
            and out_val.dim() < in_val.dim():
        return True
    return in_val.dim() == 0 or out_val.dim() == 0 or out_val.shape[0] != in_val.shape[0]


def _flatten(b: _Builder, src, in_val, out_val, base: str, start: int, end: int):
    """torch.flatten(x, start, end): ONNX Flatten where it is the same (start 1 to the last
    dimension: ONNX Flatten is always 2-D), else a Reshape copying the dimensions before
    ``start`` (0), -1 for the flattened ones, then the trailing ones."""
    nd = in_val.dim()
    if nd == 0:
        return _reshape(b, src, out_val, base)
    start, end = int(start) % nd, int(end) % nd
    if start == 1 and end == nd - 1:
        return _reshape(b, src, out_val, base, flatten_axis=1)
    trailing = list(out_val.shape[start + 1:])  # the example's: input dims end + 1 ...
    y = _reshape(b, src, out_val, base, shape=[0] * start + [-1] + trailing)
    if trailing and end < nd - 1:
        b.size_dependent.append((b.nodes[-1].name, f"{base}: flatten({start}, {end}) keeps "
                                                   f"the example's trailing sizes {trailing}"))
    return y


def _reshape(b: _Builder, src, out_val, base: str, flatten_axis=None, shape=None,
             in_val=None):
    """Flatten / Reshape of an int8 tensor (or a float one)."""
    name = src.name if isinstance(src, _Q) else src[1]
    if flatten_axis is not None:
        y = b.node("Flatten", [name], f"{base}_flatten", axis=int(flatten_axis))
    else:
        if shape is None:
            shape = list(out_val.shape)
            if shape:  # 0: copy the (symbolic) batch dimension; -1 where it is merged away
                keep = in_val is None or (in_val.dim() and in_val.shape[0] == shape[0])
                shape[0] = 0 if keep else -1
        sh = b.init(f"{base}_shape", np.array(shape, dtype=np.int64))
        y = b.node("Reshape", [name, sh], f"{base}_reshape")
    if isinstance(src, _Q):
        return _Q(y, src.scale, src.zp, src.dtype, tuple(out_val.shape))
    return ("float", y)


_SHAPE = ("shape",)  # env value of a Python number / size read off a tensor's shape
_SHAPE_METHODS = ("size", "dim", "numel", "nelement")
_SHAPE_ARITH = (operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv,
                operator.neg)


def _reads_shape(node, env) -> bool:
    """Whether ``node`` is a value read off a tensor's shape (``x.size(0)``, ``x.dim()``,
    ``x.shape``) or arithmetic on such values only."""
    if node.op == "call_method" and node.target in _SHAPE_METHODS:
        return True
    if node.op != "call_function":
        return False
    if node.target is getattr and len(node.args) == 2 and node.args[1] in ("shape", "ndim"):
        return True
    inputs = node.all_input_nodes
    return node.target in _SHAPE_ARITH and bool(inputs) and \
        all(env.get(a.name) is _SHAPE for a in inputs)


def _size_read(a, src) -> Optional[int]:
    """The dimension ``a`` reads off tensor node ``src`` (``src.size(i)``, ``src.shape[i]``),
    or None."""
    if not isinstance(a, torch.fx.Node):
        return None
    if a.op == "call_method" and a.target == "size" and a.args and a.args[0] is src \
            and len(a.args) == 2 and isinstance(a.args[1], int):
        return a.args[1]
    if a.op == "call_function" and a.target is operator.getitem and len(a.args) == 2 \
            and isinstance(a.args[1], int):
        s = a.args[0]  # src.shape[i], or src.size()[i] (n, c, h, w = src.size())
        if isinstance(s, torch.fx.Node) and (
                (s.op == "call_function" and s.target is getattr and s.args == (src, "shape"))
                or (s.op == "call_method" and s.target == "size" and s.args == (src,)
                    and not s.kwargs)):
            return a.args[1]
    return None


def _reshape_shape(b: _Builder, node, in_val, out_val) -> list:
    """ONNX Reshape's shape for a ``reshape`` / ``view`` node, from its arguments: a literal
    stays (``-1`` included); ``x.size(i)`` / ``x.shape[i]`` / ``x.size()[i]`` of the
    reshaped tensor at position ``i`` becomes 0 (copy that dimension at run time), and a
    read of its channels (dimension 1 of an (N, C, H, W) or (N, F) tensor, which no input
    size changes) their number. Any other size (arithmetic on sizes, another tensor's,
    another dimension's) is -1 where the shape has none yet (ONNX infers it); else at
    position 0 it is 0 where the example's batch passes through (else -1), and elsewhere
    the example's value in a size-dependent node (warned, recorded in the metadata), where
    it had been written as a constant silently."""
    src = node.args[0]
    args = list(node.args[1:]) or [node.kwargs.get("shape", ())]
    if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)):
        args = list(args[0])
    ex = list(out_val.shape)
    if len(args) != len(ex):  # (not seen: torch checked the call) the example's shape
        args = [None] * len(ex)
    nd = in_val.dim()
    # the input's dimensions that no input size changes: the channels / features of an
    # (N, C, H, W) or (N, F) tensor
    constant = {1} if nd in (2, 4) else set()
    free = -1 not in [a for a in args if isinstance(a, int)]  # no -1 yet: one may be added
    shape, fixed = [], []
    for i, a in enumerate(args):
        j = _size_read(a, src)
        j = None if j is None or not -nd <= j < nd else j % nd
        if isinstance(a, int) and not isinstance(a, bool):
            shape.append(a)
        elif j == i:
            shape.append(0)
        elif j in constant:
            shape.append(ex[i])
        elif i == 0 and j is None:  # a batch size from elsewhere: the old rule
            shape.append(0 if nd and in_val.shape[0] == ex[0] else -1)
            free = free and shape[-1] != -1
        elif free:  # the one dimension ONNX infers
            shape.append(-1)
            free = False
        else:
            shape.append(ex[i])
            fixed.append(i)
    if fixed:
        b.size_dependent.append((f"{node.name}_reshape",
                                 f"{node.name}: a reshape to sizes computed from the example "
                                 f"({', '.join(f'dim {i} = {ex[i]}' for i in fixed)})"))
    return shape


def _permutation(node, nd: int) -> list:
    """The ONNX Transpose ``perm`` of a traced ``permute`` / ``transpose`` (tensor method or
    torch function; dimensions positional, as a sequence, or by keyword), non-negative.

    Raises:
        NotImplementedError: dimensions that are not constant ints forming a permutation."""
    args, kw = list(node.args[1:]), dict(node.kwargs)
    transpose = node.target in ("transpose", torch.transpose)
    if transpose:
        dims = args + [kw[k] for k in ("dim0", "dim1") if k in kw]
        if len(dims) != 2:
            dims = None
    else:
        dims = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else \
            (args or kw.get("dims"))
    ok = dims is not None and all(isinstance(d, int) and not isinstance(d, bool) and
                                  -nd <= d < nd for d in dims)
    if ok and transpose:
        d0, d1 = (d % nd for d in dims)
        perm = list(range(nd))
        perm[d0], perm[d1] = perm[d1], perm[d0]
        return perm
    perm = [d % nd for d in dims] if ok else []
    if not ok or sorted(perm) != list(range(nd)):
        raise NotImplementedError(f"to_onnx: {node.target!r} (node {node.name!r}) with "
                                  f"dimensions {dims!r}: the export takes constant ints "
                                  f"forming a permutation of the {nd} dimensions")
    return perm


def _tensor_op(b: _Builder, node, env, vals):
    """torch functions / tensor methods in forward code: flatten, reshape, view, permute,
    transpose (ONNX Transpose of the int8 tensor: a copy of codes), contiguous."""
    target = node.target
    args = node.args
    src = env.get(args[0].name) if args and isinstance(args[0], torch.fx.Node) else None
    what = target if isinstance(target, str) else getattr(target, "__name__", repr(target))
    if src is None:
        raise NotImplementedError(f"to_onnx: operation {what!r} (node {node.name!r}) has no QDQ "
                                  f"export")
    in_val = vals[args[0].name]
    if target is torch.flatten or target == "flatten":
        start = args[1] if len(args) > 1 else node.kwargs.get("start_dim", 0)
        end = args[2] if len(args) > 2 else node.kwargs.get("end_dim", -1)
        return _flatten(b, src, in_val, vals[node.name], node.name, start, end)
    if target in ("reshape", "view") or target is torch.reshape:
        shape = _reshape_shape(b, node, in_val, vals[node.name])
        return _reshape(b, src, vals[node.name], node.name, shape=shape)
    if target in ("contiguous",):
        return src
    if target in ("permute", "transpose") or target in (torch.permute, torch.transpose):
        perm = _permutation(node, in_val.dim())
        if perm and perm[0] != 0:
            raise NotImplementedError(
                f"to_onnx: {what} (node {node.name!r}) moves the batch dimension "
                f"(permutation {perm}); the exported graph keeps the batch first")
        name = src.name if isinstance(src, _Q) else src[1]
        y = b.node("Transpose", [name], f"{node.name}_transpose", perm=perm)
        if isinstance(src, _Q):
            return _Q(y, src.scale, src.zp, src.dtype, tuple(vals[node.name].shape))
        return ("float", y)
    if target is operator.getitem:
        raise NotImplementedError(f"to_onnx: indexing (node {node.name!r}) has no QDQ export")
    raise NotImplementedError(f"to_onnx: operation {what!r} (node {node.name!r}) has no QDQ "
                              f"export; supported in forward code: flatten, reshape, view, "
                              f"permute, transpose, contiguous between quantized modules")
