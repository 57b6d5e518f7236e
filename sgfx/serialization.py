"""Compressed, safe save/load of sparsified GraphModules.

Why a format of its own: ``torch.save(gm)`` pickles code, so loading it can run arbitrary code, and a dense
state_dict stores every pruned zero. An ``.sgfx`` file is a ``torch.save`` archive holding only plain tensors and
one JSON string, read back with ``torch.load(weights_only=True)``:

- the graph as JSON nodes; call targets must resolve to native torch ops (``torch.*`` functions or ``torch.ops.aten``
  operators, as graphs from ``torch.export`` call them), ``torch.nn.functional``, ``operator`` or ``math`` functions,
  public ``Tensor`` methods, or ``torch.nn`` module classes rebuilt from their constructor arguments — never to
  anything else, so loading (and running) the model executes no code from the file;
- N:M weights as their kept values plus the bit-packed index of each value inside its group of M (groups along
  input channels, as the pruning made them); unstructured ones as a bitmask plus the nonzero values; everything
  else as it is;
- a SHA-256 digest per tensor, checked before anything is built, so a truncated, corrupted or foreign file is
  rejected with ``SgfxFormatError`` and never yields a half-loaded model.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import inspect
import io
import json
import math
import operator
import os
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo
from torch.utils._pytree import treespec_dumps, treespec_loads

from .layers.paths import set_path
from .layout import nm_axis, nm_groups, nm_ungroup
from .config import NMPattern, parse_pattern
from .passes.attention import attention_core, attention_output
from .quantize import dequantize_weight, weight_integers
from .report import LayerRecord, SparsityReport, attach_report, find_report

__all__ = ["save", "load", "read_pruned", "check_saveable", "SgfxFormatError", "pack_nm", "unpack_nm", "pack_bitmask", "unpack_bitmask"]

_FORMAT, _VERSION = "sgfx", 1
_SAFE_FUNCTION_MODULES = {"torch.nn.functional": torch.nn.functional, "operator": operator,
                          "_operator": operator, "math": math}
# Python-level torch functions that traced graphs call (timm's shape checks use torch._assert)
_SAFE_TORCH_FUNCTIONS = {"_assert": torch._assert}
# sgfx's own graph functions (opened attention), by module
_SAFE_SGFX_FUNCTIONS = {"sgfx.passes.attention": {"attention_core": attention_core,
                                                   "attention_output": attention_output}}
_SAFE_BUILTINS = {"getattr": getattr, "len": len, "max": max, "min": min, "abs": abs, "int": int, "float": float}


class SgfxFormatError(ValueError):
    """The file is not a valid sgfx archive (foreign, truncated, corrupted or unsupported)."""


# ------------------------------------------------------------------------------------------- weight packing
def _bits_for(m: int) -> int:
    needed = max(1, (m - 1).bit_length())
    return next(b for b in (1, 2, 4, 8) if b >= needed)


def _pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack small non-negative ints (< 2**bits) into uint8, 8/bits per byte."""
    per_byte = 8 // bits
    flat = values.flatten().to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % per_byte)]).view(-1, per_byte)
    shifts = torch.arange(per_byte, dtype=torch.uint8) * bits
    return (flat << shifts).sum(dim=1, dtype=torch.uint8)


def _unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, dtype=torch.uint8) * bits
    values = (packed.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return values.flatten()[:count].to(torch.int64)


def pack_nm(weight: torch.Tensor, pattern: NMPattern, axis: int = 1) -> dict[str, torch.Tensor]:
    """Kept values (n_groups, N) and bit-packed in-group indices of an N:M weight (groups along ``axis``)."""
    groups = nm_groups(weight, pattern.m, axis)
    nonzero = groups != 0
    if int(nonzero.sum(dim=1).max()) > pattern.n:
        raise ValueError(f"weight does not follow {pattern}: cannot pack it as such")
    # the N largest-|value| positions of each group hold every nonzero (ties among zeros are harmless)
    order = torch.argsort((~nonzero).to(torch.int8), dim=1, stable=True)[:, :pattern.n]
    values = torch.gather(groups, 1, order)
    return {"values": values.contiguous(), "indices": _pack_bits(order, _bits_for(pattern.m))}


def unpack_nm(packed: dict[str, torch.Tensor], shape: tuple[int, ...], pattern: NMPattern,
              axis: int = 1) -> torch.Tensor:
    values = packed["values"]
    order = _unpack_bits(packed["indices"], _bits_for(pattern.m), values.numel()).view_as(values)
    groups = torch.zeros(values.shape[0], pattern.m, dtype=values.dtype).scatter_(1, order, values)
    return nm_ungroup(groups, shape, axis)


def pack_bitmask(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    nonzero = weight.flatten() != 0
    return {"mask": _pack_bits(nonzero, 1), "values": weight.flatten()[nonzero].contiguous()}


def unpack_bitmask(packed: dict[str, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    count = math.prod(shape)
    mask = _unpack_bits(packed["mask"], 1, count).bool()
    flat = torch.zeros(count, dtype=dtype)
    flat[mask] = packed["values"]
    return flat.view(shape)


# ----------------------------------------------------------------------------------------- graph encoding
def _encode_target(target: Any) -> dict[str, str]:
    if isinstance(target, torch._ops.OpOverload) and target.namespace == "aten":  # graphs from torch.export
        return {"module": "torch.ops.aten", "name": f"{target._opname}.{target._overloadname}"}
    short = getattr(target, "__name__", "")
    candidates = (
        ("torch.nn.functional", short),  # F.linear is torch._C._nn.linear: store it under F
        (getattr(target, "__module__", None) or "", getattr(target, "__qualname__", None) or short),
        ("torch", short),  # native ops, whose __module__ may differ
    )
    for module, name in candidates:
        spec = {"module": module, "name": name}
        if _resolve_target(spec, strict=False) is target:
            return spec
    raise TypeError(f"cannot save a graph calling {target!r}: only native torch ops, torch.nn.functional, "
                    "operator and math functions are stored")


def _resolve_target(spec: Any, strict: bool = True) -> Any:
    if not isinstance(spec, dict) or not isinstance(spec.get("module"), str) or not isinstance(spec.get("name"), str):
        raise SgfxFormatError(f"bad call target {spec!r}")
    module, name = spec["module"], spec["name"]
    found = None
    if module in _SAFE_FUNCTION_MODULES and "." not in name:
        found = getattr(_SAFE_FUNCTION_MODULES[module], name, None)
    elif module == "builtins":
        found = _SAFE_BUILTINS.get(name)
    elif module in _SAFE_SGFX_FUNCTIONS:
        found = _SAFE_SGFX_FUNCTIONS[module].get(name)
    elif module == "torch.ops.aten" and name.count(".") == 1:  # native aten operators only
        packet, overload = name.split(".")
        packet = getattr(torch.ops.aten, packet, None)
        found = getattr(packet, overload, None) if isinstance(packet, torch._ops.OpOverloadPacket) else None
    elif module == "torch" and name in _SAFE_TORCH_FUNCTIONS:
        found = _SAFE_TORCH_FUNCTIONS[name]
    elif module == "torch" and "." not in name:
        native = getattr(torch._C._VariableFunctions, name, None)  # native ops only: no torch.load & co.
        found = getattr(torch, name, None) if native is not None else None
    if found is None and strict:
        raise SgfxFormatError(f"call target {module}.{name} is not allowed in an sgfx file")
    return found


def _encode_arg(value: Any) -> Any:
    if isinstance(value, torch.fx.Node):
        return {"$node": value.name}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {"$tuple": [_encode_arg(v) for v in value]}
    if isinstance(value, list):
        return [_encode_arg(v) for v in value]
    if isinstance(value, dict):
        return {"$dict": [[k, _encode_arg(v)] for k, v in value.items()]}
    if isinstance(value, slice):
        return {"$slice": [_encode_arg(value.start), _encode_arg(value.stop), _encode_arg(value.step)]}
    if value is Ellipsis:
        return {"$ellipsis": True}
    if isinstance(value, torch.dtype):
        return {"$dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"$device": str(value)}
    raise TypeError(f"cannot save a graph argument of type {type(value).__name__}: {value!r}")


def _decode_arg(value: Any, nodes: dict[str, torch.fx.Node]) -> Any:
    if isinstance(value, list):
        return [_decode_arg(v, nodes) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) != 1:
        raise SgfxFormatError(f"bad graph argument {value!r}")
    (kind, payload), = value.items()
    if kind == "$node":
        if payload not in nodes:
            raise SgfxFormatError(f"graph refers to unknown node {payload!r}")
        return nodes[payload]
    if kind == "$tuple":
        return tuple(_decode_arg(v, nodes) for v in payload)
    if kind == "$dict":
        return {k: _decode_arg(v, nodes) for k, v in payload}
    if kind == "$slice":
        return slice(*(_decode_arg(v, nodes) for v in payload))
    if kind == "$ellipsis":
        return Ellipsis
    if kind == "$dtype":
        dtype = getattr(torch, str(payload), None)
        if not isinstance(dtype, torch.dtype):
            raise SgfxFormatError(f"unknown dtype {payload!r}")
        return dtype
    if kind == "$device":
        return torch.device(payload)
    raise SgfxFormatError(f"bad graph argument {value!r}")


def _module_spec(name: str, module: nn.Module) -> dict[str, Any]:
    cls = type(module)
    if getattr(nn, cls.__name__, None) is not cls:
        raise TypeError(f"cannot save submodule {name!r} of type {cls.__module__}.{cls.__qualname__}: only torch.nn "
                        "layers are stored (trace custom modules through instead of keeping them as leaves)")
    kwargs = {}
    for param in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        if param.name in ("device", "dtype") or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        value = getattr(module, param.name, param.empty)
        if isinstance(value, torch.Tensor) or (value is None and isinstance(param.default, bool)):
            kwargs[param.name] = value is not None  # a flag such as bias=True stored as the tensor it made
        elif value is not param.empty:
            kwargs[param.name] = _encode_arg(value)
        elif param.default is param.empty:
            raise TypeError(f"cannot save submodule {name!r}: constructor argument {param.name!r} not recoverable")
    return {"class": cls.__name__, "kwargs": kwargs}


def _build_module(spec: Any) -> nn.Module:
    if not isinstance(spec, dict):
        raise SgfxFormatError("bad module entry")
    cls = getattr(nn, str(spec.get("class")), None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise SgfxFormatError(f"module class {spec.get('class')!r} is not a torch.nn layer")
    kwargs = {k: _decode_arg(v, {}) for k, v in spec.get("kwargs", {}).items()}
    with torch.device("meta"):  # no allocation: every tensor is replaced from the file below
        return cls(**kwargs)


def _digest(tensor: torch.Tensor) -> str:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    data = flat.view(torch.uint8) if flat.numel() else torch.empty(0, dtype=torch.uint8)
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()


# ----------------------------------------------------------------------------------------------- save/load
def _encode_graph(gm: torch.fx.GraphModule) -> tuple[list[dict], dict[str, dict]]:
    """The graph's nodes and the specs of the modules it calls, as stored (TypeError for what cannot be)."""
    if not isinstance(gm, torch.fx.GraphModule):
        raise TypeError(f"sgfx.save takes a torch.fx.GraphModule, got {type(gm).__name__}")
    nodes, modules = [], {}
    for node in gm.graph.nodes:
        entry = {"op": node.op, "name": node.name, "args": _encode_arg(node.args), "kwargs": _encode_arg(node.kwargs)}
        if node.op == "call_function":
            entry["target"] = _encode_target(node.target)
        elif node.op == "call_module":
            entry["target"] = node.target
            modules[node.target] = _module_spec(node.target, gm.get_submodule(node.target))
        else:
            entry["target"] = node.target
        nodes.append(entry)
    info = getattr(gm.graph._codegen, "pytree_info", None)
    if info is not None:  # traced with structured inputs: the forward flattens them (torch.fx.PH)
        nodes.append({"op": "pytree", "orig_args": list(info.orig_args), "in_spec": treespec_dumps(info.in_spec),
                      "out_spec": None if info.out_spec is None else treespec_dumps(info.out_spec)})
    return nodes, modules


def check_saveable(gm: torch.fx.GraphModule) -> None:
    """Raise ``TypeError`` (saying which node or module) if :func:`save` could not store ``gm``'s graph.

    Pruning never changes the graph, so checking the traced model first avoids losing a long run at the end.
    """
    _encode_graph(gm)


def _graphs_to_store(model: nn.Module) -> dict[str, tuple[list[dict], dict[str, dict]]]:
    """{submodule name ('' for the model itself): encoded graph} of a GraphModule or of a model returned by
    ``sparsify(..., submodules=...)``."""
    if isinstance(model, torch.fx.GraphModule):
        return {"": _encode_graph(model)}
    report = find_report(model)
    if not isinstance(model, nn.Module) or report is None or not report.submodules:
        raise TypeError(f"sgfx.save takes a torch.fx.GraphModule or a model returned by sgfx.sparsify(..., "
                        f"submodules=...), got {type(model).__name__}")
    return {entry["name"]: _encode_graph(model.get_submodule(entry["name"])) for entry in report.submodules}


# The report's fields a file keeps: all but the lowering decisions (objects of a run) and the allocation search.
_STORED_REPORT_FIELDS = tuple(f.name for f in dataclasses.fields(SparsityReport) if f.name not in ("lowering",
                                                                                                  "allocation"))


def _report_dict(report: SparsityReport) -> dict[str, Any]:
    stored = {name: getattr(report, name) for name in _STORED_REPORT_FIELDS}
    return {**stored, "layers": report.to_dicts()}


def save(gm: nn.Module, path: str | os.PathLike) -> dict[str, int]:
    """Write ``gm`` compressed to ``path``.

    Args:
        gm: a GraphModule, typically from :func:`sgfx.sparsify` (its report tells which weights are N:M or
            unstructured; without one every weight is stored dense), or a model returned by
            ``sgfx.sparsify(..., submodules=...)``: its pruned submodules' graphs and every tensor of the model
            are stored, and :func:`load` rebuilds it into an instance of the model's class that you pass.
        path: the file to write.

    Returns:
        ``{"bytes": file size, "dense_bytes": size of torch.save(gm.state_dict())}``.

    Example:
        >>> sgfx.save(gm, "model.sgfx"); gm2 = sgfx.load("model.sgfx")  # doctest: +SKIP
    """
    graphs = _graphs_to_store(gm)
    report = find_report(gm)
    pruned = {r.weight_name: (r.pattern, nm_axis(r.op)) for r in report.layers if r.pruned} if report else {}
    int8 = {r.weight_name: {"scale": r.quant["weight_scale"], "axis": r.quant["weight_axis"]}
            for r in report.layers if r.pruned and "weight_scale" in r.quant} if report else {}
    tensors, entries = {}, {}
    state = dict(gm.named_parameters(remove_duplicate=False))
    state.update(gm.named_buffers(remove_duplicate=False))
    for name, tensor in state.items():
        tensor = tensor.detach().cpu()
        entry = {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch."),
                 "parameter": isinstance(state[name], nn.Parameter), "encoding": "dense"}
        if name in int8:  # stored as its INT8 integers; load multiplies them by the scale buffer again
            tensor = weight_integers(tensor, state[int8[name]["scale"]].detach().cpu(), int8[name]["axis"])
            entry["int8"] = int8[name]
        label, axis = pruned.get(name, (None, 1))  # the report's pattern label: "2:4" or "50% unstructured"
        if label is not None and ":" in label and tensor.dim() >= 2:
            pattern = parse_pattern(label)
            parts = pack_nm(tensor, pattern, axis)
            entry.update(encoding="nm", pattern=str(pattern), axis=axis)
        elif label is not None:
            parts = pack_bitmask(tensor)
            entry["encoding"] = "bitmask"
        else:
            parts = {"data": tensor.contiguous()}
        entry["parts"] = {}
        for part, value in parts.items():
            key = f"{name}:{part}"
            tensors[key] = value
            entry["parts"][part] = {"key": key, "sha256": _digest(value)}
        entries[name] = entry
    meta = {"format": _FORMAT, "version": _VERSION, "tensors": entries, "training": gm.training,
            "class_name": type(gm).__name__, "report": None if report is None else _report_dict(report)}
    if "" in graphs:
        meta["nodes"], meta["modules"] = graphs[""]
    else:
        meta["submodule_graphs"] = {name: {"nodes": nodes, "modules": modules, "training": gm.get_submodule(name)
                                           .training, "class_name": type(gm.get_submodule(name)).__name__}
                                    for name, (nodes, modules) in graphs.items()}
    torch.save({"sgfx_meta": json.dumps(meta), "tensors": tensors}, path)
    dense = io.BytesIO()
    torch.save(gm.state_dict(), dense)
    return {"bytes": os.path.getsize(path), "dense_bytes": dense.getbuffer().nbytes}


def _read(path: str | os.PathLike) -> tuple[dict, dict]:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # a foreign, truncated or corrupted archive
        raise SgfxFormatError(f"{path}: not a readable sgfx file ({type(exc).__name__}: {exc})") from None
    valid = isinstance(blob, dict) and isinstance(blob.get("sgfx_meta"), str) and isinstance(blob.get("tensors"), dict)
    if not valid:
        raise SgfxFormatError(f"{path}: not an sgfx file (no sgfx metadata)")
    try:
        meta = json.loads(blob["sgfx_meta"])
    except json.JSONDecodeError as exc:
        raise SgfxFormatError(f"{path}: corrupted sgfx metadata ({exc})") from None
    if meta.get("format") != _FORMAT or meta.get("version") != _VERSION:
        raise SgfxFormatError(f"{path}: unsupported format {meta.get('format')!r} version {meta.get('version')!r}")
    return meta, blob["tensors"]


def _decode_tensor(name: str, entry: dict, tensors: dict) -> torch.Tensor:
    parts = {}
    for part, ref in entry["parts"].items():
        value = tensors.get(ref["key"])
        if not isinstance(value, torch.Tensor) or _digest(value) != ref["sha256"]:
            raise SgfxFormatError(f"tensor {name!r} ({part}) is missing or corrupted (checksum mismatch)")
        parts[part] = value
    shape, dtype = tuple(entry["shape"]), torch.int8 if "int8" in entry else getattr(torch, entry["dtype"])
    if entry["encoding"] == "nm":
        axis = entry.get("axis", 1)
        if not isinstance(axis, int) or not 0 <= axis < len(shape):
            raise SgfxFormatError(f"tensor {name!r}: bad N:M axis {axis!r}")
        tensor = unpack_nm(parts, shape, parse_pattern(entry["pattern"]), axis)
    elif entry["encoding"] == "bitmask":
        tensor = unpack_bitmask(parts, shape, dtype)
    elif entry["encoding"] == "dense":
        tensor = parts["data"]
    else:
        raise SgfxFormatError(f"unknown encoding {entry['encoding']!r} for {name!r}")
    if tuple(tensor.shape) != shape or tensor.dtype != dtype:
        raise SgfxFormatError(
            f"tensor {name!r} decodes to {tuple(tensor.shape)}/{tensor.dtype}, expected {shape}/{dtype}")
    canonical = torch.empty(shape, dtype=dtype)
    if tensor.stride() != canonical.stride():  # strides of size-1 dims too: conv kernels pick their path by them
        tensor = canonical.copy_(tensor)
    return tensor


def _dequantize(entries: dict[str, dict], decoded: dict[str, torch.Tensor]) -> None:
    """Replace each INT8-stored weight among ``entries`` (the file's tensor entries) by ``integers * scale`` (the
    float32 values the model computed with)."""
    for name, entry in entries.items():
        if "int8" not in entry:
            continue
        scale = decoded.get(entry["int8"].get("scale"))
        axis = entry["int8"].get("axis")
        values = decoded[name]
        if not isinstance(scale, torch.Tensor) or not isinstance(axis, int) or not 0 <= axis < values.dim() \
                or scale.numel() != values.shape[axis]:
            raise SgfxFormatError(f"tensor {name!r}: bad INT8 scale reference {entry['int8']!r}")
        decoded[name] = dequantize_weight(values, scale, axis, getattr(torch, entry["dtype"]))


def _build_graph_module(entry: dict, decoded: dict[str, torch.Tensor], parameters: dict[str, bool]
                        ) -> torch.fx.GraphModule:
    """A GraphModule from its stored nodes and modules and its (decoded) tensors."""
    root = nn.Module()
    for target, spec in entry["modules"].items():
        set_path(root, target, _build_module(spec), create=True)
    for name, tensor in decoded.items():  # replaces the modules' meta tensors
        value = nn.Parameter(tensor, requires_grad=tensor.is_floating_point()) if parameters[name] else tensor
        set_path(root, name, value, create=True)
    leftover = [n for n, t in list(root.named_parameters()) + list(root.named_buffers()) if t.is_meta]
    if leftover:
        raise SgfxFormatError(f"tensors missing from the file: {leftover}")
    graph = torch.fx.Graph()
    nodes: dict[str, torch.fx.Node] = {}
    for node_entry in entry["nodes"]:
        op = node_entry["op"]
        if op == "pytree":
            out_spec = node_entry["out_spec"]
            graph._codegen = _PyTreeCodeGen(_PyTreeInfo(list(node_entry["orig_args"]),
                                                        treespec_loads(node_entry["in_spec"]),
                                                        None if out_spec is None else treespec_loads(out_spec)))
            continue
        target = _resolve_target(node_entry["target"]) if op == "call_function" else node_entry["target"]
        if op == "call_method" and (not isinstance(target, str) or target.startswith("_")
                                    or not hasattr(torch.Tensor, target)):
            raise SgfxFormatError(f"method {target!r} is not a public Tensor method")
        args, kwargs = _decode_arg(node_entry["args"], nodes), _decode_arg(node_entry["kwargs"], nodes)
        nodes[node_entry["name"]] = graph.create_node(op, target, tuple(args), kwargs, name=node_entry["name"])
    graph.lint()
    gm = torch.fx.GraphModule(root, graph, entry.get("class_name", "GraphModule"))
    present = {n for n, _ in list(gm.named_parameters()) + list(gm.named_buffers())}
    for name in decoded.keys() - present:  # tensors no node reads (INT8 weight scales): GraphModule drops them
        value = nn.Parameter(decoded[name], requires_grad=False) if parameters[name] else decoded[name]
        set_path(gm, name, value, create=True)
    gm.train(bool(entry.get("training", False)))
    return gm


def _into_model(model: nn.Module, graphs: dict[str, dict], decoded: dict[str, torch.Tensor],
                parameters: dict[str, bool]) -> nn.Module:
    """A deep copy of ``model`` with the stored submodule graphs in place and every tensor from the file."""
    owned = copy.deepcopy(model)
    for name, entry in graphs.items():
        prefix = name + "."
        mine = {k[len(prefix):]: v for k, v in decoded.items() if k.startswith(prefix)}
        gm = _build_graph_module(entry, mine, {k[len(prefix):]: v for k, v in parameters.items()
                                               if k.startswith(prefix)})
        try:
            set_path(owned, name, gm)
        except AttributeError:
            raise SgfxFormatError(f"the model passed has no parent module for submodule {name!r}: not the model this "
                                  "file was saved from") from None
    state = dict(owned.named_parameters(remove_duplicate=False))
    state.update(owned.named_buffers(remove_duplicate=False))
    if set(state) != set(decoded):
        missing, extra = sorted(set(decoded) - set(state))[:5], sorted(set(state) - set(decoded))[:5]
        raise SgfxFormatError(f"the model passed does not match the file: tensors only in the file {missing}, "
                              f"only in the model {extra}")
    with torch.no_grad():
        for name, tensor in decoded.items():
            if tuple(state[name].shape) != tuple(tensor.shape):
                raise SgfxFormatError(f"{name}: shape {tuple(tensor.shape)} in the file, "
                                      f"{tuple(state[name].shape)} in the model passed")
            state[name].copy_(tensor)
    return owned


def load(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Rebuild the model saved by :func:`save`: same graph, bit-exact weights, same forward.

    Args:
        path: an ``.sgfx`` file.
        model: only for files saved from a model pruned with ``submodules=``: an instance of that model's class,
            built the same way (e.g. ``fasterrcnn_resnet50_fpn(weights=None)``); a deep copy of it gets the stored
            graphs and every tensor. Its own code runs the forward, so pass only a class you trust.

    Returns:
        A ``torch.fx.GraphModule``, or (with ``model``) a model of ``model``'s class.

    Raises:
        SgfxFormatError: the file is foreign, truncated, corrupted or uses a disallowed call target; a
            submodules file without ``model``, or a ``model`` that does not match the file.
    """
    meta, tensors = _read(path)
    graphs = meta.get("submodule_graphs")
    if graphs is None and model is not None:
        raise ValueError("model= is only for files saved from a model pruned with sparsify(..., submodules=...)")
    if graphs is not None and model is None:
        raise SgfxFormatError(f"{path} holds a {meta.get('class_name')} pruned with submodules=: pass "
                              f"model={meta.get('class_name')}(...) (built the same way) to load it into")
    if model is not None and type(model).__name__ != meta.get("class_name"):
        raise SgfxFormatError(f"{path} was saved from a {meta.get('class_name')}, not a {type(model).__name__}")
    try:
        decoded = {name: _decode_tensor(name, entry, tensors) for name, entry in meta["tensors"].items()}
        _dequantize(meta["tensors"], decoded)
        parameters = {name: bool(entry["parameter"]) for name, entry in meta["tensors"].items()}
        if graphs is None:
            result = _build_graph_module({**meta, "training": meta.get("training", False)}, decoded, parameters)
        else:
            result = _into_model(model, graphs, decoded, parameters)
            result.train(bool(meta.get("training", False)))
    except SgfxFormatError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        raise SgfxFormatError(f"{path}: malformed sgfx file ({type(exc).__name__}: {exc})") from None
    report = _decode_report(meta)
    if report is not None:
        attach_report(result, report)
    return result


def _decode_report(meta: dict) -> SparsityReport | None:
    info = meta.get("report")
    if not info:
        return None
    layers = [LayerRecord(**{**r, "weight_shape": tuple(r["weight_shape"])}) for r in info["layers"]]
    stored = {name: info[name] for name in _STORED_REPORT_FIELDS if name in info and name != "layers"}
    return SparsityReport(**stored, layers=layers)


def read_pruned(path: str | os.PathLike) -> tuple[SparsityReport | None, dict[str, torch.Tensor]]:
    """The report of an ``.sgfx`` file and its pruned weights, decoded (checksums verified), without building the
    model: what ``sgfx report``/``sgfx check`` need, also for files saved with ``submodules=``."""
    meta, tensors = _read(path)
    report = _decode_report(meta)
    names = {r.weight_name for r in report.layers if r.pruned} if report else set()
    names |= {meta["tensors"][n]["int8"]["scale"] for n in names if "int8" in meta["tensors"].get(n, {})}
    try:
        decoded = {name: _decode_tensor(name, meta["tensors"][name], tensors) for name in names}
        _dequantize({n: meta["tensors"][n] for n in names}, decoded)
        return report, decoded
    except KeyError as exc:
        raise SgfxFormatError(f"{path}: malformed sgfx file (no tensor {exc})") from None
