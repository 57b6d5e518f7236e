"""Insert INT8 activation quantizers where TensorRT's explicit quantization and onnxruntime's INT8 kernels need them.

Why: ``quantize="int8"`` must give a GraphModule whose float arithmetic is the INT8 engine's. Each quantized layer
(``nn.Conv1d/2d/3d``, ``nn.Linear``, ``nn.ConvTranspose*`` with one group, called once) gets

- an *input* quantizer on the tensor it reads (shared by the layers that read the same tensor);
- an *output* quantizer after its unit, the layer followed by a BatchNorm and a ReLU where it has them (the nodes an
  INT8 engine fuses into one kernel that writes INT8), unless that output is a graph output. onnxruntime runs a
  Conv as ``QLinearConv`` only when its output is quantized too, and TensorRT then writes INT8 between layers.

A quantizer is ``torch.fake_quantize_per_tensor_affine(x, scale, 0, -128, 127)`` with its scale a buffer of the
GraphModule (a native op: the graph stays saveable and exportable). An input quantizer whose tensor is an output
quantizer's seen through ops that keep values on the grid (ReLU, max pooling, reshapes) takes that quantizer's scale,
so it changes nothing and the two are one Q/DQ pair in ONNX. Scales are calibrated later, in sweep order, by
:mod:`sgfx.engine.quant_calibration`; until then a scale is 1.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.node import Node

from ..layers import PrunableLayer
from ..quantize import ACT_QMAX, ACT_QMIN
from ..report import SparsityReport

__all__ = ["insert_quantizers", "strip_quantizers", "quantizable_reason", "is_quantizer", "existing_quantization",
           "ZERO_POINT"]

ZERO_POINT = "sgfx_int8_zero_point"  # the one int32 zero (a buffer) every quantizer node reads
_ON_GRID_MODULES = (nn.ReLU, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.Flatten, nn.Identity, nn.Dropout)
_ON_GRID_FUNCTIONS = {F.relu, torch.relu, F.max_pool1d, F.max_pool2d, F.max_pool3d, torch.flatten, torch.reshape,
                      F.dropout, operator.getitem}
_ON_GRID_METHODS = {"relu", "relu_", "view", "reshape", "flatten", "contiguous"}


@dataclass
class _Quantizer:
    """One quantizer node of the graph (written into the report as a dict)."""

    node: Node
    scale: str  # the buffer holding its scale
    role: str  # "input" (placed before the layers reading it) or "output" (placed after ``producer``'s unit)
    readers: list[str] = field(default_factory=list)  # the quantized layers whose input it is
    producer: str | None = None  # for an output quantizer: the layer whose unit it ends
    source: "_Quantizer | None" = None  # an output quantizer whose grid this input already is on
    after_relu: bool = False  # output quantizer placed after the unit's ReLU

    def entry(self) -> dict:
        """The report's record of it (``scale`` and ``method`` are filled in by the calibration)."""
        return {"scale_buffer": self.scale, "role": self.role, "readers": self.readers, "producer": self.producer,
                "source": self.source.scale if self.source else None, "after_relu": self.after_relu,
                "scale": None, "method": None}


def is_quantizer(node: Node) -> bool:
    return node.op == "call_function" and node.target is torch.fake_quantize_per_tensor_affine


_QUANTIZE_OPS = ("fake_quantize_per_tensor_affine", "fake_quantize_per_channel_affine", "quantize_per_tensor",
                 "quantize_per_channel", "dequantize", "quantize_per_tensor_dynamic")


def existing_quantization(gm: torch.fx.GraphModule) -> str | None:
    """A node of ``gm`` that already quantizes (a fake-quantize or quantize call, a ``torch.ao`` quantization
    module), formatted, or None."""
    from torch.ao.quantization import DeQuantStub, FakeQuantizeBase, QuantStub

    for node in gm.graph.nodes:
        name = getattr(node.target, "__name__", str(node.target))
        if node.op in ("call_function", "call_method") and name.split(".")[-1] in _QUANTIZE_OPS:
            return node.format_node()
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if isinstance(module, (FakeQuantizeBase, QuantStub, DeQuantStub)) or \
                    type(module).__module__.startswith("torch.ao.nn.quantized"):
                return node.format_node()
    return None


_KINDS = ("Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "Linear")
# aten ops of graphs from torch.export (.pt2 files) that keep values on the grid
_ON_GRID_ATEN = {"aten.relu.default", "aten.relu_.default", "aten.max_pool1d.default", "aten.max_pool2d.default",
                 "aten.max_pool3d.default", "aten.view.default", "aten._unsafe_view.default", "aten.reshape.default",
                 "aten.flatten.using_ints", "aten.clone.default", "aten.contiguous.default",
                 "aten.max_pool2d_with_indices.default"}
_RELU_ATEN = {"aten.relu.default", "aten.relu_.default"}


def quantizable_reason(gm: torch.fx.GraphModule, node: Node, layer: PrunableLayer) -> str | None:
    """Why ``layer`` (called at ``node``) cannot be INT8-quantized with QDQ, or None when it can."""
    if layer.op not in _KINDS or len(layer.uses) > 1:
        return "not quantized: INT8 covers Conv, ConvTranspose and Linear layers called once"
    if "Transpose" in layer.op and getattr(layer, "groups", 1) != 1:
        return "not quantized: a grouped ConvTranspose has no per-output-channel axis in ONNX"
    if not node.args or not isinstance(node.args[0], Node):
        return "not quantized: its input is not a graph value"
    return None


def _target(node: Node) -> str:
    return str(node.target) if node.op == "call_function" else ""


def _on_grid(gm: torch.fx.GraphModule, node: Node) -> bool:
    """Whether ``node`` maps values on an INT8 grid to values on the same grid (ReLU, max pooling, reshapes)."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return isinstance(module, _ON_GRID_MODULES) and not (isinstance(module, nn.Dropout) and module.training)
    if node.op == "call_function":
        return node.target in _ON_GRID_FUNCTIONS or _target(node) in _ON_GRID_ATEN
    return node.op == "call_method" and node.target in _ON_GRID_METHODS


def _is_relu(gm: torch.fx.GraphModule, node: Node) -> bool:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)) is nn.ReLU
    return (node.op == "call_function" and (node.target in (F.relu, torch.relu) or _target(node) in _RELU_ATEN)) or \
        (node.op == "call_method" and node.target in ("relu", "relu_"))


def _batchnorm_output(gm: torch.fx.GraphModule, node: Node | None) -> Node | None:
    """The BatchNorm output that ``node`` is (a module, ``F.batch_norm``, or an aten batch norm's item 0), or None."""
    if node is None:
        return None
    if node.op == "call_module":
        return node if isinstance(gm.get_submodule(node.target), nn.modules.batchnorm._BatchNorm) else None
    if node.op != "call_function" or "batch_norm" not in getattr(node.target, "__name__", _target(node)):
        return None
    items = list(node.users)
    if items and all(u.op == "call_function" and u.target is operator.getitem for u in items):  # aten: a tuple
        first = [u for u in items if u.args[1] == 0]
        return first[0] if len(first) == 1 else None
    return node


def _only_user(node: Node) -> Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _buffer_name(gm: torch.fx.GraphModule, base: str) -> str:
    name, index = base.replace(".", "_"), 1
    while hasattr(gm, name):
        index += 1
        name = f"{base.replace('.', '_')}_{index}"
    return name


class _Inserter:
    def __init__(self, gm: torch.fx.GraphModule):
        self.gm, self.quantizers = gm, {}  # quantizer node -> _Quantizer
        if not hasattr(gm, ZERO_POINT):
            gm.register_buffer(ZERO_POINT, torch.zeros((), dtype=torch.int32))

    def _new(self, value: Node, base: str, role: str, after: Node) -> _Quantizer:
        scale = _buffer_name(self.gm, base)
        self.gm.register_buffer(scale, torch.ones((), dtype=torch.float32))
        graph = self.gm.graph
        with graph.inserting_after(after):
            zero = graph.get_attr(ZERO_POINT)
        with graph.inserting_after(zero):
            scale_node = graph.get_attr(scale)
        with graph.inserting_after(scale_node):
            node = graph.call_function(torch.fake_quantize_per_tensor_affine,
                                       (value, scale_node, zero, ACT_QMIN, ACT_QMAX))
        quantizer = _Quantizer(node, scale, role)
        self.quantizers[node] = quantizer
        return quantizer

    def _source(self, value: Node) -> _Quantizer | None:
        """The output quantizer ``value`` comes from through on-grid ops, if any."""
        while value not in self.quantizers:
            if not _on_grid(self.gm, value) or not value.args or not isinstance(value.args[0], Node):
                return None
            value = value.args[0]
        found = self.quantizers[value]
        return found if found.role == "output" else found.source

    def input(self, node: Node, name: str) -> None:
        value = node.args[0]
        existing = self.quantizers.get(value)
        if existing is None:  # another layer already quantizes this tensor: share it
            existing = next((q for q in self.quantizers.values()
                             if q.role == "input" and q.node.args[0] is value), None)
        if existing is None:
            after = [n for n in self.gm.graph.nodes if n.op == "placeholder"][-1] if value.op == "placeholder" \
                else value  # placeholders stay first
            existing = self._new(value, f"{name}.input_scale", "input", after)
            existing.source = self._source(value)
        existing.readers.append(name)
        node.args = (existing.node, *node.args[1:])

    def output(self, node: Node, name: str) -> None:
        unit, after_relu = node, False
        follower = _only_user(unit)
        normalized = _batchnorm_output(self.gm, follower)
        if normalized is not None:
            unit, follower = normalized, _only_user(normalized)
        if follower is not None and _is_relu(self.gm, follower):
            unit, after_relu = follower, True
        if any(user.op == "output" for user in unit.users):
            return  # a graph output stays float (the caller reads it)
        users = list(unit.users)
        quantizer = self._new(unit, f"{name}.output_scale", "output", unit)
        quantizer.producer = name
        quantizer.after_relu = after_relu
        for user in users:
            user.replace_input_with(unit, quantizer.node)


def insert_quantizers(gm: torch.fx.GraphModule, layers: dict[Node, PrunableLayer],
                      report: SparsityReport) -> torch.fx.GraphModule:
    """Add the INT8 quantizers of ``layers`` (the layers the sweep will prune) to ``gm`` in place, and one
    per-output-channel weight-scale buffer per quantized layer. Writes each quantizer into ``report.quantizers``
    (scale still to calibrate) and each layer's buffers, or why it stays float, into its record's ``quant``.
    Returns ``gm``.

    Raises:
        ValueError: ``gm`` already holds quantization (fake-quantize calls, ``torch.ao`` quantization modules).
    """
    found = existing_quantization(gm)
    if found is not None:
        raise ValueError(f"quantize='int8' takes a float model; this one already quantizes at `{found}`: pass the "
                         "model before quantization (sgfx chooses the scales and rounds the weights itself)")
    records = {r.name: r for r in report.layers}
    inserter = _Inserter(gm)
    order = {node: index for index, node in enumerate(gm.graph.nodes)}
    for node in sorted(layers, key=order.__getitem__):
        layer = layers[node]
        reason = quantizable_reason(gm, node, layer)
        if reason is not None:
            records[layer.name].quant = {"reason": reason}
            continue
        inserter.input(node, layer.name)
        inserter.output(node, layer.name)
        transposed = "Transpose" in layer.op
        channels = layer.weight.shape[1 if transposed else 0]
        buffer = _buffer_name(gm, f"{layer.weight_name}_scale")
        gm.register_buffer(buffer, torch.ones(channels, dtype=torch.float32))
        records[layer.name].quant = {"weight_scale": buffer, "weight_axis": 1 if transposed else 0}
    report.quantizers = [q.entry() for q in inserter.quantizers.values()]
    gm.graph.lint()
    gm.recompile()
    return gm


def strip_quantizers(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Bypass and remove every quantizer node of ``gm`` in place (the float model with the INT8 weights, which the
    QDQ export writes before inserting its pairs). Returns ``gm``."""
    for node in list(gm.graph.nodes):
        if is_quantizer(node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm
