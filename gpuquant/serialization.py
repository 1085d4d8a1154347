"""``gpuquant.save`` / ``gpuquant.load``: quantized models in one safetensors file.

The file holds the model's ``state_dict`` tensors (int8 weights, int32 biases, the qparams
buffers, any float tensors) as safetensors, and in the safetensors header's metadata a
small JSON description: the module tree (path and class of every module; for each
``gpuquant.nn.quantized`` module its class name and constructor arguments), the modules'
extra state (their dtype names), optionally the ``gpuquant.models`` builder, and a SHA-256
over the JSON and every tensor's bytes. Nothing is pickled and no code is imported from the
file other than classes of ``gpuquant.nn.quantized`` (the transformer modules of
``gpuquant.nn.quantized.linear_dynamic`` included) / ``torch.nn`` containers and builder
functions of ``gpuquant.models``.

Rebuilding the tree on load (the design choice): modules with arbitrary ``forward`` code
(a user's ``Net``, ResNet's blocks) cannot be rebuilt from data. So ``load`` takes

* ``model=skeleton``: an instance of the same architecture (e.g. the float model, as it
  was before ``quantize`` or ``quantize_dynamic``); every quantized module recorded in the
  file replaces the module at its path; or
* nothing, when the file names its builder (``save(..., arch="resnet18",
  arch_kwargs={"num_classes": 10})``, any builder function in ``gpuquant.models``), or when the
  model is made only of quantized modules inside ``torch.nn.Sequential`` / ``ModuleList``
  / ``ModuleDict`` (plus ``Identity``, ``Dropout``, ``Flatten``).

A file that is truncated, altered or not a gpuquant model raises ``ValueError`` naming the
file and the fault; a loaded model is exactly the saved one (outputs byte-identical).
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import Optional

import torch

from ._compile import uncompiled

__all__ = ["save", "load"]

FORMAT = "gpuquant-model"
VERSION = 1
_CONTAINERS = {"Sequential": torch.nn.Sequential, "ModuleList": torch.nn.ModuleList,
               "ModuleDict": torch.nn.ModuleDict, "Identity": torch.nn.Identity,
               "Dropout": torch.nn.Dropout, "Flatten": torch.nn.Flatten}
_EXTRA = "_extra_state"


def _root_name(model) -> str:
    """The model's class name as saved (a drop-in model's original one, deep copies too)."""
    from .quantization.fx import root_name
    return root_name(model)


def _safetensors(who: str):
    """safetensors.torch (in the deploy extra), with an install hint where it is missing."""
    try:
        import safetensors.torch as st
    except ImportError as e:
        raise ImportError(f"{who} needs the safetensors package (gpuquant's file format): "
                          f"pip install safetensors (or pip install 'gpuquant[deploy]')") from e
    return st


def _quantized():
    from .nn import quantized as Q
    return Q


def _dynamic():
    from .nn.quantized import linear_dynamic as D
    return D


def _saved_classes() -> dict:
    """Class name -> class of every module with a saved form (names are unique)."""
    Q, D = _quantized(), _dynamic()
    classes = {n: getattr(Q, n) for n in Q.__all__[1:] if n not in ("ConvAdd", "ConvDequant")}
    classes.update((n, getattr(D, n)) for n in ("DynamicLinear", "StaticActLinear",
                                                "WeightOnlyLinear", "DynamicMultiheadAttention"))
    return classes


def _ctor_args(m, path: str) -> dict:
    """The constructor arguments of a gpuquant.nn.quantized module (JSON-able)."""
    Q, D = _quantized(), _dynamic()
    if isinstance(m, D.DynamicMultiheadAttention):
        proj = m.in_proj
        weight_only = isinstance(proj, D.WeightOnlyLinear)
        return {"embed_dim": m.embed_dim, "num_heads": m.num_heads,
                "batch_first": m.batch_first, "bias": proj.bias is not None,
                "weight_only": weight_only, "weight_dtype": proj.weight_dtype.name,
                **({} if weight_only else {"act_dtype": proj.act_dtype.name}),
                # (only when set: files without it, older ones too, load with 0)
                **({"dropout": m.dropout} if m.dropout else {})}
    if isinstance(m, D._Int8WeightLinear):
        args = {"in_features": m.in_features, "out_features": m.out_features,
                "bias": m.bias is not None, "weight_dtype": m.weight_dtype.name}
        if isinstance(m, D.DynamicLinear):  # StaticActLinear too; act_scale is a buffer
            args["act_dtype"] = m.act_dtype.name
        return args
    d = m._dtypes
    lst = (lambda v: list(v) if isinstance(v, (tuple, list)) else v)
    if isinstance(m, Q.Conv2d):
        return {"in_channels": m.in_channels, "out_channels": m.out_channels,
                "kernel_size": lst(m.kernel_size), "stride": lst(m.stride),
                "padding": lst(m.padding), "dilation": lst(m.dilation), "groups": m.groups,
                "bias": m.bias is not None, "input_dtype": d["input"],
                "output_dtype": d["output"], "weight_dtype": d["weight"]}
    if isinstance(m, Q.Linear):
        return {"in_features": m.in_features, "out_features": m.out_features,
                "bias": m.bias is not None, "input_dtype": d["input"],
                "output_dtype": d["output"], "weight_dtype": d["weight"]}
    if isinstance(m, Q.Elemwise):
        return {"method": m.method, "a_dtype": d["a"], "b_dtype": d["b"],
                "output_dtype": d["output"]}
    if isinstance(m, Q.Activation):
        return {"kind": m.kind, "negative_slope": m.negative_slope, "input_dtype": d["input"],
                "output_dtype": d["output"]}
    if isinstance(m, Q.Concat):
        return {"num_inputs": m.num_inputs, "input_dtype": d["input"],
                "output_dtype": d["output"]}
    if isinstance(m, Q.QuantStub):
        return {"output_dtype": d["output"]}
    if isinstance(m, Q.DequantStub):
        return {"input_dtype": d["input"]}
    if isinstance(m, (Q.MaxPool2d, Q.AvgPool2d, Q.AdaptiveAvgPool2d, Q.Upsample)):
        args = {"input_dtype": d["input"]}
        args.update({k: lst(getattr(m, k)) for k in type(m)._ARGS})
        return args
    if isinstance(m, (Q.ConvAdd, Q.ConvDequant)):
        raise TypeError(f"gpuquant.save: module {path or '<root>'!r} ({type(m).__name__}) comes "
                        f"from gpuquant.quantization.fuse_epilogues; save the model before "
                        f"fusing and fuse again after gpuquant.load")
    raise TypeError(f"gpuquant.save: module {path or '<root>'!r} ({type(m).__name__}) has no "
                    f"saved form; supported quantized classes: {list(_saved_classes())}")


def _tuples(v):
    return tuple(_tuples(t) for t in v) if isinstance(v, list) else v


def _describe(model: torch.nn.Module) -> list:
    Q, D = _quantized(), _dynamic()
    from .nn.qat.module import QATModule
    saved = _saved_classes()
    tree, first, aliases = [], {}, []
    for path, m in model.named_modules(remove_duplicate=False):
        if any(path.startswith(a + ".") for a in aliases):
            continue  # inside a shared module: its first path describes it
        if id(m) in first:  # one module under a second name (tied / shared layers)
            tree.append({"path": path, "alias_of": first[id(m)]})
            aliases.append(path)
            continue
        first[id(m)] = path
        cls = type(m)
        entry = {"path": path, "class": f"{cls.__module__}.{cls.__qualname__}"}
        if isinstance(m, QATModule):
            raise ValueError(f"gpuquant.save: module {path or '<root>'!r} is a QAT module "
                             f"({cls.__name__}): save the int8 model that "
                             f"gpuquant.quantization.quantize(model) returns (a QAT "
                             f"checkpoint: torch.save(model.state_dict()))")
        if isinstance(m, (Q.QuantizedModule, D._Int8WeightLinear, D.DynamicMultiheadAttention)):
            if getattr(Q, cls.__name__, None) is not cls and saved.get(cls.__name__) is not cls:
                raise TypeError(f"gpuquant.save: module {path or '<root>'!r} is a "
                                f"{cls.__module__}.{cls.__name__}, not a class of "
                                f"gpuquant.nn.quantized; it has no saved form")
            entry["quantized"] = cls.__name__
            entry["args"] = _ctor_args(m, path)
        elif isinstance(m, torch.nn.Dropout):
            entry["args"] = {"p": m.p}
        elif isinstance(m, torch.nn.Flatten):
            entry["args"] = {"start_dim": m.start_dim, "end_dim": m.end_dim}
        tree.append(entry)
    if not any("quantized" in e for e in tree):
        raise ValueError(f"gpuquant.save: {type(model).__name__} holds no quantized module; it "
                         f"saves what gpuquant.quantization.quantize / quantize_dynamic return "
                         f"(a float model: torch.save(model.state_dict()))")
    return tree


def _digest(desc: str, tensors: dict) -> str:
    h = hashlib.sha256(desc.encode("utf-8"))
    for k in sorted(tensors):
        t = tensors[k]
        h.update(f"\0{k}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save(model: torch.nn.Module, path, *, arch: Optional[str] = None,
         arch_kwargs: Optional[dict] = None) -> None:
    """Save a quantized model (``gpuquant.quantization.quantize``'s result) to ``path``.

    Args:
        model: the model (any device; tensors are stored from CPU copies).
        path: the file to write (conventionally ``*.safetensors``).
        arch: optional name of the ``gpuquant.models`` function that builds the
            architecture (``"resnet18"``, ``"resnet50"``, ``"mobilenet_v2"``,
            ``"mobilenet_v3_large"``, ``"mobilenet_v3_small"`` or ``"digits_net"``), so
            ``load(path)`` needs no skeleton.
        arch_kwargs: its keyword arguments (JSON values), e.g. ``{"num_classes": 10}``.

    Raises:
        TypeError: not a module, a quantized module class with no saved form (named), or
            arguments of the wrong type.
        ValueError: an ``arch`` that is not a builder of ``gpuquant.models``
            (``gpuquant.models._BUILDERS``) or does not build the model's architecture
            with ``arch_kwargs`` (checked on the meta device), ``arch_kwargs`` that are not
            JSON values, a
            model holding QAT modules (not converted yet) or no quantized module.
        ImportError: the safetensors package is not installed (names the install).

    Example:
        >>> gpuquant.save(int8_model, "net.safetensors", arch="resnet18",
        ...               arch_kwargs={"num_classes": 10})
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"gpuquant.save: model must be a torch.nn.Module, got "
                        f"{type(model).__name__}")
    model = uncompiled(model)  # torch.compile(model): saved as the model it wraps
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"gpuquant.save: path must be a str or os.PathLike, got "
                        f"{type(path).__name__}")
    builder = None
    if arch is not None:
        _builder(arch, "gpuquant.save")
        if arch_kwargs is not None and not isinstance(arch_kwargs, dict):
            raise TypeError(f"gpuquant.save: arch_kwargs must be a dict, got "
                            f"{type(arch_kwargs).__name__}")
        builder = {"arch": arch, "kwargs": dict(arch_kwargs or {})}
    elif arch_kwargs is not None:
        raise ValueError("gpuquant.save: arch_kwargs given without arch")
    st_save = _safetensors("gpuquant.save").save
    tensors, extra = {}, {}
    for k, v in model.state_dict().items():
        if k.endswith(_EXTRA) and not isinstance(v, torch.Tensor):
            extra[k] = v
        elif isinstance(v, torch.Tensor):
            tensors[k] = v.detach().to("cpu", copy=True).contiguous()
        else:
            raise TypeError(f"gpuquant.save: state_dict entry {k!r} is a {type(v).__name__}, "
                            f"not a tensor; it has no safe saved form")
    desc = {"format": FORMAT, "version": VERSION, "root": _root_name(model),
            "builder": builder, "tree": _describe(model), "extra_state": extra}
    if builder is not None:
        _check_builder(builder, desc)
    if isinstance(model, torch.fx.GraphModule):  # converted from plain torch.nn (drop-in)
        desc["dropin"] = True
        desc["graph"] = _module_calls(model)
    try:
        text = json.dumps(desc, sort_keys=True)
    except TypeError as e:
        raise ValueError(f"gpuquant.save: the description is not JSON-serialisable ({e}); "
                         f"arch_kwargs and extra state must be plain JSON values") from e
    meta = {"gpuquant": text, "gpuquant_sha256": _digest(text, tensors)}
    data = st_save(tensors, metadata=meta)
    with open(os.fspath(path), "wb") as f:
        f.write(data)


def _builder(arch, who: str):
    from . import models
    if not isinstance(arch, str) or arch not in models._BUILDERS:
        raise ValueError(f"{who}: arch must name a builder function of gpuquant.models, got "
                         f"{arch!r}; allowed: {list(models._BUILDERS)}")
    return getattr(models, arch)


def _check_builder(builder: dict, desc: dict) -> None:
    """Refuse an ``arch`` / ``arch_kwargs`` that does not build the saved model's
    architecture (built on the meta device: no memory), which ``load(path)`` would only
    find out: other keyword arguments, another root class, no module at a quantized path."""
    arch, kwargs = builder["arch"], builder["kwargs"]
    try:
        with torch.device("meta"):
            built = _builder(arch, "gpuquant.save")(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"gpuquant.save: arch={arch!r} does not build with arch_kwargs="
                         f"{kwargs!r} ({type(e).__name__}: {e})") from None
    if _root_name(built) != desc["root"]:
        raise ValueError(f"gpuquant.save: arch={arch!r} builds a {_root_name(built)}, but the "
                         f"model is a {desc['root']}; name its builder, or save without arch "
                         f"(load then takes model=<skeleton>)")
    for e in desc["tree"]:
        if "quantized" in e and e["path"]:
            try:
                built.get_submodule(e["path"])
            except AttributeError:
                raise ValueError(f"gpuquant.save: arch={arch!r} (arch_kwargs={kwargs!r}) builds "
                                 f"no module at {e['path']!r}, where the model holds a "
                                 f"{e['quantized']}; is it the model's architecture?") from None


def _bad(path, what: str) -> ValueError:
    return ValueError(f"gpuquant.load: {path!r} is not a valid gpuquant model file: {what}")


def _read(path):
    """(description dict, tensors) of a file, every check done."""
    st_load = _safetensors("gpuquant.load").load
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] == b"PK\x03\x04":
        raise _bad(path, "it is a zip archive (a torch.save file?); gpuquant.load reads the "
                         "safetensors files gpuquant.save writes")
    if len(data) < 8:
        raise _bad(path, f"{len(data)} bytes, shorter than a safetensors header (truncated?)")
    (n,) = struct.unpack("<Q", data[:8])
    if len(data) > 8 and data[8:9] != b"{":
        raise _bad(path, "not a safetensors file (its header does not begin with '{'; an "
                         "ONNX file? gpuquant.runtime.load and onnxruntime read those); "
                         "gpuquant.load reads the files gpuquant.save writes")
    if n > len(data) - 8:
        raise _bad(path, f"the header claims {n} bytes but only {len(data) - 8} follow "
                         f"(truncated?)")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
        meta = header.get("__metadata__") or {}
        text, digest = meta["gpuquant"], meta["gpuquant_sha256"]
        desc = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
        raise _bad(path, f"no readable gpuquant description in the header "
                         f"({type(e).__name__}: {e})") from None
    if not isinstance(desc, dict) or desc.get("format") != FORMAT:
        raise _bad(path, f"format {desc.get('format') if isinstance(desc, dict) else desc!r}, "
                         f"expected {FORMAT!r}")
    if desc.get("version") != VERSION:
        raise _bad(path, f"format version {desc.get('version')!r}, this gpuquant reads "
                         f"{VERSION}")
    ends = []
    for k, v in header.items():
        if k == "__metadata__" or not isinstance(v, dict) or "data_offsets" not in v:
            continue
        off = v["data_offsets"]
        if not (isinstance(off, list) and len(off) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in off)):
            raise _bad(path, f"tensor {k!r} has data_offsets {off!r}, expected two "
                             f"non-negative integers (corrupted header)")
        ends.append(off[1])
    need = 8 + n + max(ends, default=0)
    if len(data) != need:
        raise _bad(path, f"{len(data)} bytes, the header describes {need} (truncated or "
                         f"extended)")
    try:
        tensors = st_load(data)
    except Exception as e:  # safetensors' own consistency checks
        raise _bad(path, f"safetensors could not read the tensors ({type(e).__name__}: "
                         f"{e})") from None
    if _digest(text, tensors) != digest:
        raise _bad(path, "checksum mismatch: the tensors or the description were altered "
                         "after saving (corrupted file)")
    return desc, tensors


def _build_quantized(entry, path):
    name = entry.get("quantized")
    cls = _saved_classes().get(name) if isinstance(name, str) else None
    if cls is None:
        raise _bad(path, f"unknown quantized class {name!r} at {entry.get('path')!r}")
    args = {k: _tuples(v) for k, v in entry.get("args", {}).items()}
    try:
        return cls(**args)
    except (ValueError, NotImplementedError) as e:  # the constructors' argument checks
        raise _bad(path, f"module {entry.get('path')!r} ({name}) cannot be built from its "
                         f"saved arguments ({type(e).__name__}: {e})") from None


_SLOTS = ("__dict__", "_parameters", "_buffers", "_modules")


def _module_calls(gm: torch.fx.GraphModule) -> list:
    """The modules a traced (drop-in) model calls, in its graph's order."""
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_module"]


def _set_submodule(root, dotted: str, module, undo: Optional[list] = None) -> None:
    """Put ``module`` at ``dotted``; with ``undo`` (grafting into a skeleton, which must
    hold a module there), first record what was there.

    Raises:
        AttributeError: no module at ``dotted``'s parent path; grafting, none at ``dotted``.
    """
    parent, leaf = _parent(root, dotted)
    if undo is not None and leaf not in parent._modules:
        raise AttributeError(f"no module {dotted!r}")
    if undo is not None:
        _remember(parent, leaf, undo)
    setattr(parent, leaf, module) if hasattr(parent, leaf) else parent.add_module(leaf, module)


def _parent(root, dotted: str):
    """(the module holding ``dotted``, its last name)."""
    parent_path, _, leaf = dotted.rpartition(".")
    return (root.get_submodule(parent_path) if parent_path else root), leaf


def _remember(parent, leaf: str, undo: list) -> None:
    """Record in ``undo`` what ``parent`` holds under ``leaf`` (setattr may drop a parameter
    / buffer / attribute of that name), for :func:`_undo`."""
    undo.append((parent, leaf, leaf in parent._non_persistent_buffers_set,
                 [(slot, getattr(parent, slot).get(leaf, _SLOTS)) for slot in _SLOTS]))


def _undo(undo: list) -> None:
    """Put back what :func:`_set_submodule` replaced, newest first."""
    for parent, leaf, non_persistent, slots in reversed(undo):
        for slot, old in slots:
            d = getattr(parent, slot)
            if old is _SLOTS:
                d.pop(leaf, None)
            else:
                d[leaf] = old
        if non_persistent:
            parent._non_persistent_buffers_set.add(leaf)


def _from_tree(desc, path):
    """Rebuild a model made only of quantized modules and torch.nn containers."""
    root = None
    for entry in desc["tree"]:
        if "alias_of" in entry:
            _set_submodule(root, entry["path"], root.get_submodule(entry["alias_of"]))
            continue
        p, cls_path = entry["path"], entry["class"]
        if "quantized" in entry:
            m = _build_quantized(entry, path)
        else:
            short = cls_path.rsplit(".", 1)[-1]
            cls = _CONTAINERS.get(short)
            if cls is None or f"{cls.__module__}.{cls.__qualname__}" != cls_path:
                raise ValueError(
                    f"gpuquant.load: {path!r}: module {p or '<root>'!r} is a {cls_path}, whose "
                    f"code is not in the file; pass model=<an instance of the architecture> "
                    f"(e.g. the float model; one converted from plain torch.nn: "
                    f"gpuquant.quantization.prepare_plain(<float model>, example_inputs)), "
                    f"or save with arch=<gpuquant.models builder>")
            m = cls(**entry.get("args", {}))
        if not p:
            root = m
        else:
            _set_submodule(root, p, m)
    return root


def _graft(skeleton, desc, path, undo: Optional[list] = None):
    """Put the file's quantized modules into ``skeleton`` at their paths (recording in
    ``undo`` what they replace)."""
    built = {}
    for entry in desc["tree"]:
        p = entry["path"]
        if "alias_of" in entry:  # a shared module's second name: the same module there
            m = built.get(entry["alias_of"])
            if m is None:
                continue  # a shared float module: the skeleton shares it already
        elif "quantized" not in entry:
            continue
        else:
            m = built[p] = _build_quantized(entry, path)
        if not p:
            return m
        try:
            _set_submodule(skeleton, p, m, undo)
        except AttributeError:
            hint = _DROPIN_HINT if desc.get("dropin") else ""
            raise ValueError(f"gpuquant.load: {path!r}: the model given has no module at "
                             f"{p!r} (the file's quantized {type(m).__name__} goes there); "
                             f"is it the same architecture?{hint}") from None
    if isinstance(skeleton, torch.fx.GraphModule):  # drop-in: as quantize() leaves it
        from .quantization.fx import unused_paths
        recorded = {e["path"] for e in desc["tree"]}  # (files of older releases keep them)
        for p in unused_paths(skeleton):
            if p in recorded:
                continue
            parent, leaf = _parent(skeleton, p)
            _remember(parent, leaf, undo)
            delattr(parent, leaf)
    _check_fit(skeleton, desc, path)
    return skeleton


_DROPIN_HINT = (" (a model converted from plain torch.nn: build the skeleton as the saved "
                "model was, with the same disable_quantize() calls before prepare_plain)")


def _check_fit(root, desc, path) -> None:
    """Refuse a skeleton whose own modules (those the file does not replace: containers,
    float islands) are of other classes than the saved model's, or, for a drop-in model,
    whose traced graph calls other modules: the loaded model would compute something else.
    Classes compare by qualified name (a class saved from ``__main__`` matches the same
    class imported from a module)."""
    for e in desc["tree"]:
        p = e["path"]
        if not p or "alias_of" in e or "quantized" in e or not isinstance(e.get("class"), str):
            continue
        try:
            cls = type(root.get_submodule(p))
        except AttributeError:
            raise ValueError(f"gpuquant.load: {path!r}: the model given has no module at {p!r} "
                             f"(a {e['class']} in the saved model); is it the same "
                             f"architecture?") from None
        full = f"{cls.__module__}.{cls.__qualname__}"
        if e["class"] != full and not e["class"].endswith("." + cls.__qualname__):
            raise ValueError(f"gpuquant.load: {path!r}: module {p!r} is a {full} in the model "
                             f"given but a {e['class']} in the saved model; is it the same "
                             f"architecture?")
    want = desc.get("graph")
    if isinstance(want, list) and isinstance(root, torch.fx.GraphModule):
        got = _module_calls(root)
        if got != want:
            i = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b),
                     min(len(got), len(want)))
            at = lambda seq: repr(seq[i]) if i < len(seq) else "nothing"  # noqa: E731
            raise ValueError(f"gpuquant.load: {path!r}: the model given calls other modules "
                             f"than the saved one: its call {i} is {at(got)}, the saved "
                             f"model's {at(want)}{_DROPIN_HINT}")


def load(path, model: Optional[torch.nn.Module] = None, map_location=None) -> torch.nn.Module:
    """Load a model saved by :func:`save`.

    Args:
        path: the file.
        model: optional skeleton of the same architecture (e.g. a fresh float model): the
            saved quantized modules replace its modules at their paths (changed in place;
            left as it was when the load fails).
            Needed unless the file names a ``gpuquant.models`` builder or the model is only
            quantized modules in ``torch.nn`` containers.
        map_location: device for the loaded tensors (``"cpu"``, ``"cuda"``, a
            ``torch.device``, an int CUDA index); default CPU.

    Returns:
        The quantized model, in eval mode, on ``map_location``.

    Raises:
        TypeError: arguments of the wrong type.
        ImportError: the safetensors package is not installed (names the install).
        FileNotFoundError: no such file. IsADirectoryError: ``path`` is a directory.
        ValueError: a truncated, corrupted or foreign file (a ``torch.save`` or ONNX file
            is named as one), a description that does not
            build a model, a skeleton that does not fit (each names the file and the fault),
            a tree that needs a skeleton, or a ``map_location`` that is no device here.

    Example:
        >>> qmodel = gpuquant.load("net.safetensors", map_location="cuda")
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"gpuquant.load: path must be a str or os.PathLike, got "
                        f"{type(path).__name__}")
    if model is not None and not isinstance(model, torch.nn.Module):
        raise TypeError(f"gpuquant.load: model must be None or a torch.nn.Module skeleton, got "
                        f"{type(model).__name__}")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"gpuquant.load: {path!r} is a directory, not a model file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"gpuquant.load: no such file {path!r}")
    device = _device(map_location)
    desc, tensors = _read(path)
    # A skeleton is changed in place only when the whole load succeeds: every module put into
    # it is recorded and put back on any failure (cheaper than grafting into a deep copy of a
    # possibly large float model, and the caller keeps the object it passed on success).
    undo: list = []
    try:
        root = _build_root(path, desc, tensors, model, undo)
    except BaseException:
        _undo(undo)
        raise
    _dynamic().keep_off_torch_fast_path(root)  # as quantize_dynamic leaves the model
    return root.to(device).eval()


def _device(map_location) -> torch.device:
    """``map_location`` as a usable torch.device (ValueError / TypeError otherwise)."""
    if map_location is None:
        return torch.device("cpu")
    if isinstance(map_location, bool) or not isinstance(map_location, (str, int, torch.device)):
        raise TypeError(f"gpuquant.load: map_location must be None, a str, an int (CUDA "
                        f"index) or a torch.device, got {type(map_location).__name__}")
    try:
        device = torch.device(map_location)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"gpuquant.load: map_location {map_location!r} is not a device "
                         f"({e}); use e.g. 'cpu', 'cuda', 'cuda:0'") from None
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise ValueError(f"gpuquant.load: map_location {map_location!r} is not available "
                         f"here ({type(e).__name__}: {e})") from None
    return device


def _build_root(path, desc, tensors, model, undo: list):
    """The model with the file's modules and tensors (``model`` changed in place)."""
    if desc.get("dropin") and not isinstance(model, torch.fx.GraphModule):
        given = "no model= was given" if model is None else \
            f"the {type(model).__name__} given does not run it"
        raise ValueError(f"gpuquant.load: {path!r} holds a model converted from plain torch.nn "
                         f"(its forward is a traced torch.fx graph with quant stubs, and "
                         f"{given}); pass model="
                         f"gpuquant.quantization.prepare_plain(<float model>, example_inputs) "
                         f"as the skeleton")
    try:
        if not isinstance(desc.get("tree"), list) or not all(
                isinstance(e, dict) and isinstance(e.get("path"), str) for e in desc["tree"]):
            raise TypeError("'tree' must be a list of module entries with a 'path'")
        if model is not None:
            root = _graft(model, desc, path, undo)
        elif desc.get("builder"):
            b = desc["builder"]
            root = _graft(_builder(b["arch"], "gpuquant.load")(**b.get("kwargs", {})), desc,
                          path)
        else:
            root = _from_tree(desc, path)
            if root is None:
                raise KeyError("no entry for the root module (path '')")
        state = dict(tensors)
        state.update(desc.get("extra_state", {}))
    except (KeyError, TypeError, AttributeError, RuntimeError, IndexError) as e:
        raise _bad(path, f"its description does not build a model"
                         f"{' into the model given' if model is not None else ''} "
                         f"({type(e).__name__}: {e})") from None
    if _root_name(root) != desc.get("root"):
        raise ValueError(f"gpuquant.load: {path!r} holds a {desc.get('root')} but the model "
                         f"built is a {_root_name(root)}")
    # torch's load_state_dict copies what fits before it reports what does not: keep the
    # skeleton's own tensors (not those of the modules just put in) to put them back
    quantized = {e["path"] for e in desc["tree"] if "quantized" in e}
    grafted = [e["path"] + "." for e in desc["tree"]
               if e["path"] in quantized or e.get("alias_of") in quantized] \
        if model is not None else None
    own = {k: v for k, v in root.state_dict(keep_vars=True).items()
           if grafted is not None and k in state and isinstance(v, torch.Tensor)
           and not any(k.startswith(g) for g in grafted)}
    for k, v in own.items():  # load_state_dict would cast the file's tensor to the skeleton's
        t = state[k]
        if (isinstance(t, torch.Tensor) and t.is_floating_point() and v.is_floating_point()
                and t.dtype != v.dtype):
            raise ValueError(f"gpuquant.load: {path!r} holds {k!r} as {t.dtype} but the model "
                             f"given has it as {v.dtype} (the model was cast, e.g. .half(), "
                             f"before saving); cast the skeleton the same way first")
    kept = {k: v.detach().clone() for k, v in own.items()}
    try:
        root.load_state_dict(state, strict=True)
    except Exception as e:
        with torch.no_grad():
            for k, v in kept.items():
                own[k].copy_(v)
        if not isinstance(e, (RuntimeError, TypeError, KeyError, ValueError, AttributeError)):
            raise
        raise ValueError(f"gpuquant.load: {path!r} does not fit the model built "
                         f"({type(root).__name__}): {type(e).__name__}: {e}") from None
    return root
