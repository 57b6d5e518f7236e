"""Export a sparsified GraphModule to ONNX for TensorRT, and verify the 2:4 pattern on the exported file itself.

Why: the usual road to sparse tensor cores for a CNN is ``trtexec --onnx=model.onnx --sparsity=enable``. TensorRT
uses a sparse kernel only where the weight *as it reaches TensorRT* has 2:4 along its reduction axis, and says
nothing otherwise. The exporter may fold BatchNorm into a convolution (rescaling its output channels), transpose a
weight or cast it, so the check runs on the ONNX initializers, with TensorRT's rules, after export:

- ``Conv`` weight ``[K, C/g, k...]``: groups of 4 along C (axis 1) at every output channel and kernel position;
- ``Gemm`` B: along its reduction axis, axis 1 when ``transB=1`` (``[N, K]``), else axis 0 (``[K, N]``);
- ``MatMul`` with a constant 2-D B ``[K, N]``: along axis 0.

A weight reached through ``Cast`` or ``Transpose`` nodes is followed back to its initializer (a ``Transpose`` moves
the axis). A layer sgfx pruned whose exported weight lost its pattern is an error, not a warning.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tabulate import tabulate
from torch import nn

from ..check import count_violations
from ..layout import NO_SPARSE_DECONVOLUTION, nm_groups, not_accelerated_reason, onnx_nm_axis, onnx_torch_axis
from ..config import NMPattern, Unstructured, parse_pattern
from ..layers import fetch_tensor
from ..passes.quantizers import strip_quantizers
from ..report import LayerRecord, SparsityReport, find_report
from .qdq import QDQError, insert_qdq

__all__ = ["OnnxLayer", "OnnxExportReport", "ExportError", "export_onnx", "check_onnx_sparsity",
           "trtexec_command"]

logger = logging.getLogger(__name__)

TENSORRT_PATTERN = NMPattern(2, 4)  # the only pattern TensorRT's sparse kernels take
_INSTALL_HINT = "pip install 'sgfx[onnx]'"
_FOLLOWED_OPS = ("Cast", "Identity", "DequantizeLinear")  # ops a weight may pass through keeping its layout (and
# its zeros: TensorRT reads an INT8 weight's 2:4 from the integers behind its DequantizeLinear)
_ELIGIBLE = "sparse-eligible"
_EXTERNAL_DATA_BYTES = 1 << 30  # weights beyond this go to a .data file beside the model (protobuf caps files at 2 GB)


class ExportError(RuntimeError):
    """The exported model does not keep what sgfx produced (a pruned layer's pattern, or its outputs)."""


@dataclass
class OnnxLayer:
    """One Conv/Gemm/MatMul of an ONNX model, as TensorRT's sparsity rules see it."""

    node: str  # ONNX node name
    op_type: str  # "Conv", "Gemm" or "MatMul"
    initializer: str | None  # the weight's initializer (None: computed at run time)
    shape: tuple[int, ...] = ()
    axis: int = 1  # the initializer axis TensorRT groups along
    violations: int = 0  # runs of 4 along ``axis`` with more than 2 nonzeros
    reason: str = _ELIGIBLE  # "sparse-eligible", or why not
    layer: str = ""  # the sgfx layer it came from ("" if none)
    pruned: bool = False  # sgfx pruned that layer
    sparsity: float = 0.0  # fraction of exact zeros in the initializer

    @property
    def eligible(self) -> bool:
        return self.reason == _ELIGIBLE


@dataclass
class OnnxExportReport:
    """What :func:`export_onnx` wrote and verified; ``str(report)`` is the per-layer table."""

    path: str
    dtype: str
    layers: list[OnnxLayer] = field(default_factory=list)
    max_rel_error: float | None = None  # max|ORT − torch| / max|torch| on the example inputs (float32 only)
    float32_sensitivity: float | None = None  # the same measure between the model in float32 and in float64
    parity_tolerance: float | None = None  # what max_rel_error was held to: max(rtol, 4 x float32_sensitivity)
    parity_note: str = ""
    exporter: str = ""  # "dynamo" (torch.export) or "torchscript"
    fallback_reason: str = ""  # why exporter="auto" fell back to the TorchScript exporter
    int8_layers: list[str] = field(default_factory=list)  # quantize="int8": the layers written as QDQ
    onnxruntime_kernels: dict[str, int] = field(default_factory=dict)  # weight-layer ops after onnxruntime's fusions
    int8_kernel_error: float | None = None  # INT8 files: the same error with onnxruntime's fused INT8 kernels

    @property
    def pruned(self) -> list[OnnxLayer]:
        return [layer for layer in self.layers if layer.pruned]

    @property
    def eligible(self) -> list[OnnxLayer]:
        return [layer for layer in self.layers if layer.eligible]

    @property
    def trtexec(self) -> str:
        return trtexec_command(self.path, "int8" if self.int8_layers else self.dtype)

    def table(self, tablefmt: str = "simple") -> str:
        rows = [[layer.layer or "-", layer.node, layer.op_type, layer.initializer or "(dynamic)",
                 "x".join(map(str, layer.shape)), layer.axis, f"{layer.sparsity:.1%}",
                 "yes" if layer.pruned else "no", layer.reason] for layer in self.layers]
        headers = ["sgfx layer", "ONNX node", "op", "initializer", "shape", "2:4 axis", "zeros", "pruned", "TensorRT"]
        parity = (f"max relative error vs PyTorch {self.max_rel_error:.2e} (tolerance {self.parity_tolerance:.2e})"
                  if self.max_rel_error is not None else f"outputs not compared ({self.parity_note})")
        exporter = f"; {self.exporter} exporter" + (f" ({self.fallback_reason})" if self.fallback_reason else "")
        int8 = f"; {len(self.int8_layers)} layers INT8 (QDQ)" if self.int8_layers else ""
        kernels = ("; onnxruntime runs " + ", ".join(f"{v} {k}" for k, v in sorted(self.onnxruntime_kernels.items()))
                   if self.onnxruntime_kernels else "")
        summary = (f"{self.path} ({self.dtype}): {len(self.eligible)}/{len(self.layers)} weight layers "
                   f"sparse-eligible, {len(self.pruned)} pruned by sgfx{int8}; {parity}{exporter}{kernels}")
        return f"{summary}\n{tabulate(rows, headers=headers, tablefmt=tablefmt)}\nbuild: {self.trtexec}"

    def __str__(self) -> str:
        return self.table()


def trtexec_command(path: str | os.PathLike, dtype: str = "float32") -> str:
    """The ``trtexec`` call that builds a sparse engine from an exported file (``--verbose`` prints TensorRT's
    "(Sparsity) Layers eligible for sparse math" and "picked sparse implementation" lines)."""
    engine = Path(path).with_suffix(".engine")
    precision = {"float16": "--stronglyTyped", "bfloat16": "--stronglyTyped", "int8": "--int8 --fp16"}.get(dtype,
                                                                                                          "--fp16")
    return f"trtexec --onnx={path} {precision} --sparsity=enable --saveEngine={engine} --verbose"


def _import_onnx():
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise ImportError(f"ONNX export needs the onnx and onnxscript packages: {_INSTALL_HINT}") from None
    return onnx, numpy_helper


# ------------------------------------------------------------------------------------------- the checker
def _attributes(node) -> dict[str, Any]:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _resolve_weight(name: str, axis: int, initializers: dict, producers: dict) -> tuple[str | None, int]:
    """Follow ``name`` back through Cast/Identity/Transpose to an initializer; returns (initializer, its axis)."""
    while name not in initializers:
        node = producers.get(name)
        if node is None:
            return None, axis
        if node.op_type == "Transpose":
            perm = _attributes(node).get("perm")
            if perm is None:
                return None, axis
            axis = list(perm)[axis]  # output axis `axis` is input axis perm[axis]
        elif node.op_type not in _FOLLOWED_OPS:
            return None, axis
        name = node.input[0]
    return name, axis


def _structural_reason(layer: OnnxLayer, groups: int) -> str | None:
    """Why TensorRT cannot treat this weight as 2:4 whatever its values, or None."""
    if layer.initializer is None:
        return "weight computed at run time, not a constant initializer: TensorRT needs constant sparse weights"
    kind = {"Conv": "Conv2d", "ConvTranspose": "ConvTranspose2d"}.get(layer.op_type, "Linear")
    reason = not_accelerated_reason(kind, groups, layer.shape[1] if layer.op_type == "Conv" else 0)
    if reason is not None:
        return reason
    length = layer.shape[layer.axis]
    if length % TENSORRT_PATTERN.m:
        what = "input channels per group" if layer.op_type == "Conv" else "reduction axis"
        return f"{what} ({length}) not a multiple of {TENSORRT_PATTERN.m}"
    return None


def check_onnx_sparsity(model: Any) -> list[OnnxLayer]:
    """Every Conv, Gemm and constant-weight MatMul of an ONNX model, with TensorRT's 2:4 verdict on its weight.

    Args:
        model: an ``onnx.ModelProto`` or a path to an ``.onnx`` file.

    Returns:
        One :class:`OnnxLayer` per weight layer, in graph order; ``layer.eligible`` is TensorRT's verdict.

    Example:
        >>> [l.initializer for l in sgfx.lowering.check_onnx_sparsity("model.onnx") if not l.eligible]  # doctest: +SKIP
    """
    return _scan(model)[0]


def _scan(model: Any) -> tuple[list[OnnxLayer], dict[str, np.ndarray]]:
    """:func:`check_onnx_sparsity`'s layers, and the nonzero masks of their weights by initializer name."""
    onnx, numpy_helper = _import_onnx()
    if isinstance(model, (str, os.PathLike)):
        model = onnx.load(os.fspath(model))
    if not isinstance(model, onnx.ModelProto):
        raise TypeError(f"expected an onnx.ModelProto or a path, got {type(model).__name__}")
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    nonzeros: dict[str, np.ndarray] = {}  # boolean masks (bfloat16 arrays do not convert to torch)
    layers = []
    for index, node in enumerate(graph.node):
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        attributes = _attributes(node)
        name, axis = _resolve_weight(node.input[1], onnx_nm_axis(node.op_type, attributes), initializers, producers)
        if node.op_type == "MatMul" and (name is None or len(initializers[name].dims) != 2):
            continue  # activation x activation (attention scores) or a batched constant: not a weight layer
        layer = OnnxLayer(node.name or f"{node.op_type}_{index}", node.op_type, name, axis=axis)
        if name is not None:
            if name not in nonzeros:
                nonzeros[name] = numpy_helper.to_array(initializers[name]) != 0
            mask = nonzeros[name]
            layer.shape = tuple(mask.shape)
            layer.sparsity = 1.0 - float(mask.mean()) if mask.size else 0.0
        reason = _structural_reason(layer, int(attributes.get("group", 1)))
        if reason is None or reason == NO_SPARSE_DECONVOLUTION:
            nonzero = torch.from_numpy(nonzeros[name])
            layer.violations = int((nm_groups(nonzero, TENSORRT_PATTERN.m, axis).sum(1) > TENSORRT_PATTERN.n).sum())
            if layer.violations and reason is None:
                total = nonzero.numel() // TENSORRT_PATTERN.m
                reason = f"not 2:4 along axis {axis}: {layer.violations}/{total} runs of 4 hold more than 2 nonzeros"
        layer.reason = reason or _ELIGIBLE
        layers.append(layer)
    return layers, nonzeros


# ------------------------------------------------------------------------------------------- the export
def _check_destination(path: Path) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise ValueError(f"cannot write the ONNX file to {path}: it is a directory")
    if not parent.is_dir():
        raise ValueError(f"cannot write the ONNX file to {path}: {parent} is not an existing directory")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"cannot write the ONNX file to {path}: {parent} is not writable")


def _model_pattern(report: SparsityReport, require_2_4: bool) -> Any:
    pattern = parse_pattern(report.pattern)
    two_four = isinstance(pattern, NMPattern) and pattern.implies(TENSORRT_PATTERN)
    if require_2_4 and not two_four:
        raise ValueError(
            f"TensorRT accelerates only 2:4 sparsity (at most 2 nonzeros in every 4 input channels); this model was "
            f"pruned to {report.pattern}, which does not guarantee it. Prune with '2:4' (or '1:4'), or pass "
            "require_2_4=False to export anyway (its layers are then reported as not sparse-eligible).")
    return pattern


def _torch_layout(array: np.ndarray, axis: int, op_type: str = "Conv") -> np.ndarray:
    """An ONNX weight (or its mask) in PyTorch's layout: its reduction axis moved to where PyTorch has it (dim 1;
    dim 0 for ConvTranspose, whose ONNX layout is PyTorch's), a writable copy."""
    return np.array(np.moveaxis(array, axis, onnx_torch_axis(op_type)))


def _match_layers(layers: list[OnnxLayer], records: list[LayerRecord], weights: dict[str, torch.Tensor],
                  nonzeros: dict[str, np.ndarray]) -> None:
    """Attach each ONNX layer to the sgfx layer whose weight it holds: by initializer name (the exporter keeps
    parameter names, also when it folds a BatchNorm into a Conv), else by identical shape and zero mask."""
    by_name = {r.weight_name: r for r in records}
    unclaimed = {r.weight_name: r for r in records if r.pruned}
    for layer in layers:
        record = by_name.get(layer.initializer or "")
        if record is None and layer.initializer is not None:
            zeros = ~_torch_layout(nonzeros[layer.initializer], layer.axis, layer.op_type)
            record = next((r for name, r in unclaimed.items()
                           if tuple(weights[name].shape) == zeros.shape
                           and np.array_equal(weights[name].cpu().numpy() == 0, zeros)), None)
        if record is not None:
            _attach(layer, record)
            unclaimed.pop(record.weight_name, None)


def _attach(layer: OnnxLayer, record: LayerRecord) -> None:
    """Mark ``layer`` as holding ``record``'s weight; a layer sgfx left dense says why beside a violation."""
    layer.layer, layer.pruned = record.name, record.pruned
    if not record.pruned and layer.violations and record.reason:  # structural reasons speak for themselves
        layer.reason += f" (left dense by sgfx: {record.reason})"


def _verify_pruned(layers: list[OnnxLayer], records: list[LayerRecord], pattern: Any, path: Path,
                   weights: dict[str, torch.Tensor], nonzeros: dict[str, np.ndarray]) -> None:
    """Raise :class:`ExportError` when a layer sgfx pruned lost its weight or its pattern in export."""
    found = {layer.layer for layer in layers if layer.pruned}
    problems = [f"{r.name}: no ONNX weight holds it (the exporter rewrote it)"
                for r in records if r.pruned and r.name not in found]
    for layer in layers:
        if not layer.pruned:
            continue
        nonzero = torch.from_numpy(_torch_layout(nonzeros[layer.initializer], layer.axis, layer.op_type))
        lost = count_violations(nonzero, pattern, onnx_torch_axis(layer.op_type)) \
            if isinstance(pattern, NMPattern) else 0
        record = next(r for r in records if r.name == layer.layer)
        zeros, pruned_zeros = int((~nonzero).sum()), int((weights[record.weight_name] == 0).sum())
        if lost or zeros < pruned_zeros:
            problems.append(f"{layer.layer} ({layer.initializer}): pattern {pattern} lost in export "
                            f"({lost} groups violate it; {zeros} zeros where the model has {pruned_zeros})")
        elif (not layer.eligible and layer.reason != NO_SPARSE_DECONVOLUTION and isinstance(pattern, NMPattern)
              and pattern.implies(TENSORRT_PATTERN)):
            problems.append(f"{layer.layer} ({layer.initializer}): {layer.reason}")
    if problems:
        raise ExportError(f"{path}: the export does not keep sgfx's sparsity:\n  " + "\n  ".join(problems))


def _leaves(outputs: Any) -> list[np.ndarray]:
    outputs = [outputs] if isinstance(outputs, torch.Tensor) else list(torch.utils._pytree.tree_leaves(outputs))
    return [np.asarray(o.detach().cpu().double().numpy() if isinstance(o, torch.Tensor) else o, dtype=np.float64)
            for o in outputs]


def _max_rel_error(expected: list[np.ndarray], got: list[np.ndarray]) -> float:
    """max |got − expected| / max |expected| over the outputs."""
    error = 0.0
    for want, have in zip(expected, got):
        scale = float(np.abs(want).max()) if want.size else 1.0
        error = max(error, float(np.abs(have - want).max()) / (scale or 1.0) if want.size else 0.0)
    return error


def _float32_sensitivity(gm: nn.Module, args: tuple, expected: list[np.ndarray]) -> float | None:
    """How far the model's own float32 outputs are from its float64 outputs (the same measure as the parity
    error): a float32 ONNX runtime cannot be held closer than that. None when the model does not run in float64."""
    try:
        with torch.no_grad():
            exact = _leaves(copy.deepcopy(gm).double()(*(a.double() if a.is_floating_point() else a for a in args)))
    except Exception as exc:  # an op without a float64 kernel: keep the plain tolerance
        logger.info("float32 sensitivity not measured (the model does not run in float64: %s)", exc)
        return None
    return _max_rel_error(exact, expected)


def _onnxruntime_outputs(path: Path, args: tuple, optimize: bool = True,
                         disabled: Sequence[str] = ()) -> list[np.ndarray]:
    """onnxruntime's (CPU) outputs for ``args``; ``optimize=False`` runs the graph as written, without fusions;
    ``disabled`` names optimizers to leave out."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ImportError(f"checking the exported outputs needs onnxruntime: {_INSTALL_HINT} "
                          "(or pass check_outputs=False)") from None
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"],
                                   disabled_optimizers=list(disabled))
    feeds = {i.name: a.detach().cpu().numpy() for i, a in zip(session.get_inputs(), args)}
    return [np.asarray(o, dtype=np.float64) for o in session.run(None, feeds)]


def _parity(gm: nn.Module, args: tuple, path: Path, rtol: float,
            optimize: bool = True) -> tuple[float, float | None, float]:
    """(onnxruntime's error against the model, the model's float32 sensitivity, the tolerance used)."""
    got = _onnxruntime_outputs(path, args, optimize)
    with torch.no_grad():
        expected = _leaves(gm(*args))
    sensitivity = _float32_sensitivity(gm, args, expected)
    # two float32 computations of the same function, each about `sensitivity` from the exact one, may differ by
    # twice that; a factor of 2 more for kernels that sum in other orders (ONNX Runtime's fused Conv)
    tolerance = max(rtol, 4 * sensitivity) if sensitivity is not None else rtol
    return _max_rel_error(expected, got), sensitivity, tolerance


def _check_parity(result: OnnxExportReport, model: nn.Module, args: tuple, staged: Path, check_outputs: bool,
                  dtype: torch.dtype, rtol: float) -> None:
    """Fill in the report's parity fields; raise :class:`ExportError` when onnxruntime disagrees with the model."""
    if not check_outputs:
        result.parity_note = "check_outputs=False"
    elif dtype != torch.float32:
        result.parity_note = f"{result.dtype} export: onnxruntime parity is checked on float32 exports"
    else:
        # an INT8 file is checked as written (each Q/DQ pair computed as the ONNX spec defines it); onnxruntime's
        # fused INT8 kernels are measured apart (int8_kernel_error): on CPUs without VNNI they saturate
        quantized = bool(result.int8_layers)
        result.max_rel_error, result.float32_sensitivity, result.parity_tolerance = _parity(
            model, args, staged, rtol, optimize=not quantized)
        if quantized:
            with torch.no_grad():
                result.int8_kernel_error = _max_rel_error(_leaves(model(*args)), _onnxruntime_outputs(
                    staged, args, disabled=ORT_INT8_DISABLED_OPTIMIZERS))
        if not math.isfinite(result.max_rel_error) or result.max_rel_error > result.parity_tolerance:
            sensitivity = "" if result.float32_sensitivity is None else \
                f"; the model's own float32 outputs are {result.float32_sensitivity:.2e} from float64"
            raise ExportError(f"{result.path}: onnxruntime's outputs differ from the model's by "
                              f"{result.max_rel_error:.2e} (relative to the largest output), above the tolerance "
                              f"{result.parity_tolerance:.2e} (rtol={rtol:g}{sensitivity})")


EXPORTERS = ("auto", "dynamo", "torchscript")
# onnxruntime's common-subexpression elimination merges the Q/DQ pairs of two layers that read one tensor (ResNet's
# downsampling blocks) into one DequantizeLinear with two consumers, which its QDQ fusion then refuses (both convs
# stay float); without it every quantized conv runs as QLinearConv. Pass these as InferenceSession(...,
# disabled_optimizers=...).
ORT_INT8_DISABLED_OPTIMIZERS = ("CommonSubexpressionElimination",)
INT8_KERNELS = ("QLinearConv", "QGemm", "QLinearMatMul", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat",
                "QLinearConvTranspose")
_FLOAT_KERNELS = ("Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul", "ConvTranspose", "NchwcConv")


def _write_qdq(staged: Path, layers: list[OnnxLayer], report: SparsityReport, model: nn.Module
               ) -> tuple[list[OnnxLayer], dict[str, np.ndarray], list[str]]:
    """Rewrite the staged float file into QDQ form (:mod:`sgfx.lowering.qdq`); its layers re-scanned (weights read
    through their DequantizeLinear), with the sgfx layers matched before, and the layers written as INT8."""
    onnx, _ = _import_onnx()
    proto = onnx.load(os.fspath(staged))
    try:
        done = insert_qdq(proto, layers, report, model)
    except (QDQError, ValueError) as exc:
        raise ExportError(f"INT8 export failed: {exc}") from None
    missing = [r.name for r in report.layers if "weight_scale" in r.quant and r.name not in done]
    if missing:
        raise ExportError(f"INT8 export: no ONNX weight layer holds {missing}")
    onnx.save(proto, os.fspath(staged))
    matched = {layer.node: layer.layer for layer in layers if layer.layer}  # node names survive the rewrite
    records = {r.name: r for r in report.layers}
    rescanned, nonzeros = _scan(os.fspath(staged))
    for layer in rescanned:  # the verdicts are the rewritten file's, on the INT8 initializers
        if layer.node in matched:
            _attach(layer, records[matched[layer.node]])
    return rescanned, nonzeros, done


def onnxruntime_kernels(path: str | os.PathLike) -> dict[str, int]:
    """How many of each weight-layer op onnxruntime (CPU, its optimizations but ``ORT_INT8_DISABLED_OPTIMIZERS``)
    runs for the file: its INT8 kernels (``QLinearConv``, ``QGemm``, ...) and float ones (``Conv``, ``FusedConv``,
    ``Gemm``...)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as scratch:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = os.path.join(scratch, "optimized.onnx")
        ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"],
                             disabled_optimizers=list(ORT_INT8_DISABLED_OPTIMIZERS))
        nodes = onnx.load(options.optimized_model_filepath).graph.node
    counts: dict[str, int] = {}
    for node in nodes:
        if node.op_type in INT8_KERNELS or node.op_type in _FLOAT_KERNELS:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _export(model: nn.Module, args: tuple, staged: Path, exporter: str, opset_version: int | None,
            dynamic_batch: bool, external: bool) -> tuple[str, str]:
    """Write the ONNX file with the chosen exporter; returns (the exporter used, why "auto" fell back or "")."""
    if exporter in ("auto", "dynamo"):
        dynamic_shapes = tuple({0: torch.export.Dim("batch")} for _ in args) if dynamic_batch else None
        try:
            torch.onnx.export(model, args, os.fspath(staged), dynamo=True, optimize=True, opset_version=opset_version,
                              dynamic_shapes=dynamic_shapes, external_data=external, verbose=False)
            return "dynamo", ""
        except Exception as exc:  # torch.export refuses graphs with Python shape arithmetic (.tolist(), .item())
            if exporter == "dynamo":
                raise
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            logger.warning("sgfx: torch.export cannot export this model (%s); using the TorchScript exporter", reason)
    names = [f"input_{i}" for i in range(len(args))]
    with torch.no_grad():  # named outputs: the exporter would otherwise read a GraphModule's fx graph as TorchScript's
        outputs = [f"output_{i}" for i in range(len(_leaves(model(*args))))]
    dynamic = {n: {0: "batch"} for n in names + outputs} if dynamic_batch else None
    torch.onnx.export(model, args, os.fspath(staged), dynamo=False, opset_version=opset_version, input_names=names,
                      output_names=outputs, dynamic_axes=dynamic, do_constant_folding=True)
    return "torchscript", reason if exporter == "auto" else ""


def export_onnx(gm: torch.fx.GraphModule, args: Sequence[torch.Tensor] | torch.Tensor, path: str | os.PathLike, *,
                dtype: torch.dtype = torch.float32, opset_version: int | None = None, dynamic_batch: bool = False,
                check_outputs: bool = True, rtol: float = 1e-4, require_2_4: bool = True,
                exporter: str = "auto", int8_rtol: float = 1e-3) -> OnnxExportReport:
    """Export a sparsified model to ONNX with ``torch.onnx.export`` and verify its sparsity for TensorRT.

    The export uses PyTorch's current exporter (``dynamo=True``, through ``torch.export``) with its optimizer on: it
    folds BatchNorm into the preceding Conv, which rescales output channels and keeps every zero. A model that
    ``torch.export`` refuses (shape arithmetic in Python: ``.tolist()``, ``.item()``, as in models converted from
    ONNX with onnx2torch) is exported with the TorchScript exporter instead (``exporter="auto"``; the report says
    which ran and why). The file is written next to ``path`` and moved there only once verified: every layer sgfx
    pruned must still hold its pattern on its ONNX initializer (else :class:`ExportError`), and with
    ``check_outputs`` onnxruntime's outputs on ``args`` must match the model's within ``max(rtol, 4 x the model's
    own float32 sensitivity)`` (float32 exports; the sensitivity is how far the model's float32 outputs are from
    its float64 ones, which no float32 runtime can beat).

    Args:
        gm: a GraphModule from :func:`sgfx.sparsify` or :func:`sgfx.load` (it is not modified).
        args: example inputs (a tensor or a tuple of tensors), as the model takes them.
        path: the ``.onnx`` file to write.
        dtype: ``torch.float32`` (default), ``torch.float16`` or ``torch.bfloat16``: the weights' and inputs' dtype
            in the file (a strongly typed TensorRT network takes its precision from it).
        opset_version: ONNX opset (default: the exporter's).
        dynamic_batch: make the first dimension of every input dynamic.
        check_outputs: compare onnxruntime's outputs with the model's (float32 only; needs onnxruntime).
        rtol: tolerance of that comparison, relative to the largest output magnitude.
        require_2_4: refuse models pruned to a pattern that does not imply 2:4 (the only one TensorRT accelerates).
        exporter: ``"auto"`` (default: ``torch.export``-based, else TorchScript), ``"dynamo"`` or ``"torchscript"``.

    Returns:
        An :class:`OnnxExportReport`: per layer the ONNX node and initializer, the axis TensorRT groups along and
        its verdict; the parity error; ``report.trtexec``, the command that builds the engine.

    Raises:
        ValueError: not a model from sgfx, a non-2:4 model with ``require_2_4``, bad dtype or exporter, or an
            unwritable path.
        ImportError: onnx/onnxscript (or onnxruntime, for ``check_outputs``) missing.
        ExportError: a pruned layer lost its pattern in export, or the outputs differ beyond ``rtol``.

    Example:
        >>> report = sgfx.export_onnx(gm, (x,), "model.onnx", dtype=torch.float16)  # doctest: +SKIP
        >>> print(report)  # doctest: +SKIP
    """
    _import_onnx()
    if not isinstance(gm, nn.Module):
        raise TypeError(f"export_onnx takes the GraphModule returned by sgfx.sparsify, got {type(gm).__name__}")
    report = find_report(gm)
    if report is None:
        raise ValueError("this model was not sparsified by sgfx (it carries no sgfx report): pass the GraphModule "
                         "returned by sgfx.sparsify or sgfx.load")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype}")
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; accepted: {', '.join(EXPORTERS)}")
    args = (args,) if isinstance(args, torch.Tensor) else tuple(args)
    if not args or not all(isinstance(a, torch.Tensor) for a in args):
        raise TypeError("args must be a tensor or a non-empty tuple of tensors (example inputs)")
    path = Path(path)
    _check_destination(path)
    quantized = report.quantize is not None
    if quantized and dtype != torch.float32:
        raise ValueError(f"an INT8 model ({report.quantize}) exports as float32 QDQ ONNX; got dtype={dtype}")
    dense_int8 = quantized and report.pattern == str(Unstructured(0.0))  # quantize="int8" with sparsity 0.0
    pattern = Unstructured(0.0) if dense_int8 else _model_pattern(report, require_2_4)

    model = copy.deepcopy(gm).eval().to(dtype=dtype)
    args = tuple(a.to(dtype) if a.is_floating_point() else a for a in args)
    staging = Path(tempfile.mkdtemp(prefix=".sgfx-export-", dir=path.parent if str(path.parent) else "."))
    try:
        staged = staging / path.name
        weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        exported = strip_quantizers(copy.deepcopy(model)) if quantized else model  # QDQ pairs are added below
        used, fallback = _export(exported, args, staged, exporter, opset_version, dynamic_batch,
                                 weight_bytes >= _EXTERNAL_DATA_BYTES)
        layers, nonzeros = _scan(os.fspath(staged))
        weights = {r.weight_name: fetch_tensor(model, r.weight_name).detach() for r in report.layers if r.pruned}
        _match_layers(layers, report.layers, weights, nonzeros)
        done = []
        if quantized:
            layers, nonzeros, done = _write_qdq(staged, layers, report, model)
        _verify_pruned(layers, report.layers, pattern, path, weights, nonzeros)
        result = OnnxExportReport(os.fspath(path), str(dtype).removeprefix("torch."), layers, exporter=used,
                                  fallback_reason=fallback, int8_layers=done)
        if quantized and check_outputs:
            result.onnxruntime_kernels = onnxruntime_kernels(staged)
        _check_parity(result, model, args, staged, check_outputs, dtype, int8_rtol if quantized else rtol)
        for item in staging.iterdir():  # the model and any external-data file beside it
            os.replace(item, path.parent / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("exported %s: %d/%d weight layers sparse-eligible", path, len(result.eligible), len(result.layers))
    return result
