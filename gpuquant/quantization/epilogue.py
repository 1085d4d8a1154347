"""Epilogue fusion of a converted model for inference: each quantized conv / linear whose
output goes only into an integer add (a residual block) or into the network's
``DequantStub`` becomes one fused module (:mod:`gpuquant.nn.quantized.fused`), so the
backend runs the add or the dequantization in the GEMM's epilogue (Triton: one kernel, the
int8 intermediate never written). Same bytes as the unfused model on every backend.

    >>> qmodel = quantize(qat_model)                    # save / export this one
    >>> fast = fuse_epilogues(qmodel).cuda()            # run this one

The result is a ``torch.fx.GraphModule`` sharing the model's modules (parameters and buffers
are the same objects, so ``.cuda()`` on one moves the shared modules of the other too: fuse
a ``copy.deepcopy`` to keep an independent unfused model). :func:`gpuquant.save` stores unfused models (save ``qmodel``, fuse
after :func:`gpuquant.load`); :func:`gpuquant.export.to_onnx` takes either (it expands fused
modules with :func:`unfuse_epilogues`).
"""
from __future__ import annotations

import collections

import torch
import torch.fx as fx

from ..nn.quantized.conv import Conv2d
from ..nn.quantized.elemwise import Elemwise
from ..nn.quantized.fused import ConvAdd, ConvDequant, matching_qparams
from ..nn.quantized.linear import Linear
from ..nn.quantized.module import QuantizedModule, QuantizedTracer
from ..nn.quantized.stubs import DequantStub

__all__ = ["fuse_epilogues", "unfuse_epilogues"]


def _check_model(model, who: str) -> None:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{who}: expects a torch.nn.Module, got {type(model).__name__}")
    if not any(isinstance(m, QuantizedModule) for m in model.modules()):
        raise ValueError(f"{who}: the model holds no gpuquant.nn.quantized module; convert it "
                         f"with gpuquant.quantization.quantize first")
    if model.training:
        raise ValueError(f"{who}: the model is in training mode; fuse the converted (eval) model")


def _trace(model, who: str) -> fx.GraphModule:
    try:
        graph = QuantizedTracer().trace(model)
    except Exception as e:  # data-dependent control flow, ...
        raise NotImplementedError(f"{who}: torch.fx could not trace {type(model).__name__} "
                                  f"({type(e).__name__}: {e}); epilogue fusion needs forward "
                                  f"code without data-dependent control flow") from e
    return fx.GraphModule(model, graph, class_name=f"Fused{type(model).__name__}")


def fuse_epilogues(model: torch.nn.Module) -> fx.GraphModule:
    """Fuse each quantized conv / linear into the add or ``DequantStub`` that is the only
    user of its output.

    A pair is fused when the producer module is called once in the traced graph, its output
    has that single user and reaches it directly (no op in between), the consumer is an
    ``Elemwise("add" | "add_relu")`` (either operand) or a ``DequantStub`` reading the
    producer's own qparams, and neither is used elsewhere. The fused module takes the
    consumer's place (its qualified name), so per-module reports such as
    :func:`gpuquant.backends.verify` line up with the unfused model's.

    Args:
        model: a converted (``quantize``) model in eval mode.

    Returns:
        A ``torch.fx.GraphModule`` computing the same bytes; ``.fused`` lists the
        ``(producer, consumer)`` qualified names that were fused.

    Raises:
        TypeError: not a module. ValueError: no quantized module, training mode, or modules
            with forward hooks (the fused graph would not call them).
        NotImplementedError: ``torch.fx`` cannot trace the model.
    """
    who = "fuse_epilogues"
    _check_model(model, who)
    hooked = [name or "<root>" for name, m in model.named_modules()
              if m._forward_hooks or m._forward_pre_hooks]
    if hooked:  # the traced graph calls no hooks, and fused modules run their parts directly
        raise ValueError(f"{who}: modules with forward hooks or pre-hooks ({hooked[:4]}"
                         f"{' ...' if len(hooked) > 4 else ''}) would silently lose them; "
                         f"remove the hooks first (and register them on the fused model's "
                         f"modules if needed)")
    gm = _trace(model, who)
    graph = gm.graph
    modules = dict(gm.named_modules())
    calls = collections.Counter(n.target for n in graph.nodes if n.op == "call_module")

    def producer_of(arg):
        """The producer module of ``arg`` if ``arg`` is a fusable producer's output."""
        if not isinstance(arg, fx.Node) or arg.op != "call_module":
            return None
        m = modules.get(arg.target)
        if (not isinstance(m, (Conv2d, Linear)) or calls[arg.target] != 1
                or len(arg.users) != 1 or len(arg.args) != 1 or arg.kwargs):
            return None
        return m

    fused = []
    for node in list(graph.nodes):
        if node.op != "call_module" or calls[node.target] != 1 or node.kwargs:
            continue
        consumer = modules.get(node.target)
        new_mod = new_args = src = None
        if (isinstance(consumer, Elemwise) and consumer.method in ("add", "add_relu")
                and len(node.args) == 2):
            for pos in (0, 1):
                prod = producer_of(node.args[pos])
                other = node.args[1 - pos]
                if prod is not None and other is not node.args[pos]:
                    src = node.args[pos]
                    new_mod = ConvAdd(prod, consumer, pos)
                    new_args = (src.args[0], other)
                    break
        elif isinstance(consumer, DequantStub) and len(node.args) == 1:
            prod = producer_of(node.args[0])
            if prod is not None and matching_qparams(prod, consumer):
                src = node.args[0]
                new_mod = ConvDequant(prod, consumer)
                new_args = (src.args[0],)
        if new_mod is None:
            continue
        _replace_module(gm, node.target, new_mod)
        with graph.inserting_before(node):
            new = graph.call_module(node.target, new_args)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        graph.erase_node(src)
        fused.append((src.target, node.target))
    graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()  # the producers now live inside the fused modules
    gm.fused = fused
    # torch.fx's GraphModule.__deepcopy__ restores the attributes listed here
    gm.meta.setdefault("_user_preserved_attributes", {})["fused"] = fused
    return gm


def unfuse_epilogues(model: torch.nn.Module) -> fx.GraphModule:
    """The inverse of :func:`fuse_epilogues`: every fused module back as its two modules
    (calls of ``<name>.producer`` and ``<name>.add`` / ``<name>.dequant``); what export
    needs. A model without fused modules comes back traced and unchanged."""
    who = "unfuse_epilogues"
    _check_model(model, who)
    gm = _trace(model, who)
    graph = gm.graph
    modules = dict(gm.named_modules())
    for node in list(graph.nodes):
        m = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(m, (ConvAdd, ConvDequant)):
            continue
        with graph.inserting_before(node):
            y = graph.call_module(f"{node.target}.producer", (node.args[0],))
            if isinstance(m, ConvAdd):
                ab = (y, node.args[1]) if m.operand == 0 else (node.args[1], y)
                new = graph.call_module(f"{node.target}.add", ab)
            else:
                new = graph.call_module(f"{node.target}.dequant", (y,))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return gm


def _replace_module(gm: fx.GraphModule, target: str, module: torch.nn.Module) -> None:
    parent_name, _, name = target.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, name, module)
