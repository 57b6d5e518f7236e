"""QDQ ONNX for an INT8 model: QuantizeLinear/DequantizeLinear where TensorRT's explicit quantization expects them.

Why surgery on the float export rather than exporting the fake-quantize nodes: each exporter writes those its own
way (or not at all), folds BatchNorm after them, and keeps weights as float initializers behind a QuantizeLinear.
TensorRT wants, per quantized layer,

- the weight as an INT8 initializer behind ``DequantizeLinear`` with one scale per output channel (``axis`` 0 for
  Conv and Gemm with ``transB=1``, 1 for ConvTranspose, Gemm with ``transB=0`` and MatMul), zero points 0;
- a ``QuantizeLinear``/``DequantizeLinear`` pair, one scale per tensor, on the layer's input (a pair per layer, even
  where two layers read one tensor), and on its output where sgfx quantized it (onnxruntime fuses
  ``DQ -> Conv -> Q`` into ``QLinearConv`` only with that output pair and a DequantizeLinear of its own).

So the GraphModule is exported in float with its quantizers bypassed, and the pairs are inserted into the file.
BatchNorm folding happens in the exporter after sgfx chose the weight scales: it multiplies each output channel by
``gamma / sigma``, which keeps every channel's INT8 integers and rescales its scale, so the folded initializer is
decomposed back into the same integers and a scale per channel, and the decomposition is checked (integers
identical, residual within float32 rounding) rather than assumed. An output pair after a ReLU is also placed
before it: ``Q(relu(y)) = relu(Q(y))`` for a zero point of 0, so this changes no value and lets the Conv fuse.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..layers import fetch_tensor
from ..quantize import weight_integers
from ..report import SparsityReport

__all__ = ["insert_qdq", "QDQError", "onnx_weight_axis"]


class QDQError(RuntimeError):
    """The float export does not have the structure the INT8 model needs (say which layer and why)."""


def onnx_weight_axis(op_type: str, attributes: dict[str, Any]) -> int:
    """The output-channel axis of a weight initializer as ONNX lays it out for ``op_type``."""
    if op_type == "Conv":
        return 0
    if op_type == "Gemm":
        return 0 if attributes.get("transB", 0) else 1
    return 1  # ConvTranspose [C_in, C_out/g, ...], MatMul [K, N]


def _torch_to_onnx(q: np.ndarray, op_type: str, attributes: dict[str, Any]) -> np.ndarray:
    """A PyTorch-layout weight (Conv/ConvTranspose as ONNX; Linear [out, in]) in the node's ONNX layout."""
    if op_type == "MatMul" or (op_type == "Gemm" and not attributes.get("transB", 0)):
        return q.T
    return q


def _decompose(folded: np.ndarray, integers: np.ndarray, axis: int, layer: str) -> tuple[np.ndarray, np.ndarray]:
    """(int8 values, positive per-channel scales) with ``folded == values * scales`` along ``axis``, checked."""
    f = np.moveaxis(folded.astype(np.float64), axis, 0).reshape(folded.shape[axis], -1)
    q = np.moveaxis(integers.astype(np.float64), axis, 0).reshape(folded.shape[axis], -1)
    energy = (q * q).sum(1)
    scales = np.where(energy > 0, (f * q).sum(1) / np.where(energy > 0, energy, 1.0), 1.0)
    signs = np.where(scales < 0, -1.0, 1.0)  # a negative BatchNorm gamma: flip the channel's integers
    scales = np.abs(scales)
    scales = np.where(scales > 0, scales, 1.0)
    values = q * signs[:, None]
    residual = np.abs(f - values * scales[:, None]).max() if f.size else 0.0
    if residual > 1e-5 * max(np.abs(f).max(), 1e-30):
        raise QDQError(f"{layer}: its exported weight is not its INT8 integers times one scale per channel "
                       f"(residual {residual:.2e}): the exporter changed it beyond a per-channel rescaling")
    shape = list(folded.shape)
    shape.insert(0, shape.pop(axis))
    values = np.moveaxis(values.reshape(shape), 0, axis)
    return values.astype(np.int8), scales.astype(np.float32)


class _Editor:
    """Adds initializers and Q/DQ nodes to an ONNX graph; one pair per (tensor, scale)."""

    def __init__(self, model):
        import onnx

        self.onnx, self.model, self.graph = onnx, model, model.graph
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.pairs: dict[tuple[str, float], str] = {}
        self.new_nodes: list = []
        self.zero = self._constant("sgfx_int8_zero", np.array(0, dtype=np.int8))

    def _constant(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        base, index = name, 0
        while name in self.initializers:
            index += 1
            name = f"{base}_{index}"
        tensor = numpy_helper.from_array(array, name)
        self.graph.initializer.append(tensor)
        self.initializers[name] = tensor
        return name

    def pair(self, tensor: str, scale: float, fresh: bool = False) -> str:
        """The dequantized name of ``tensor`` through a Q/DQ pair of ``scale`` (a new pair with ``fresh``)."""
        key = (tensor, float(scale))
        if key in self.pairs and not fresh:
            return self.pairs[key]
        scale_name = self._constant(f"{tensor}_scale", np.array(scale, dtype=np.float32))
        quantized, dequantized = f"{tensor}_q{len(self.new_nodes)}", f"{tensor}_dq{len(self.new_nodes)}"
        helper = self.onnx.helper
        self.new_nodes += [helper.make_node("QuantizeLinear", [tensor, scale_name, self.zero], [quantized],
                                            name=f"{quantized}_node"),
                           helper.make_node("DequantizeLinear", [quantized, scale_name, self.zero], [dequantized],
                                            name=f"{dequantized}_node")]
        if not fresh:
            self.pairs[key] = dequantized
        return dequantized

    def weight(self, name: str, values: np.ndarray, scales: np.ndarray, axis: int) -> str:
        integers = self._constant(f"{name}_int8", values)
        scale_name = self._constant(f"{name}_scale", scales)
        zeros = self._constant(f"{name}_zero", np.zeros(scales.shape, dtype=np.int8))
        output = f"{name}_dequantized"
        self.new_nodes.append(self.onnx.helper.make_node("DequantizeLinear", [integers, scale_name, zeros], [output],
                                                         name=f"{output}_node", axis=axis))
        return output

    def finish(self) -> None:
        """Add the new nodes, drop unused initializers, and sort the graph topologically."""
        nodes = list(self.graph.node) + self.new_nodes
        used = {i for n in nodes for i in n.input}
        kept = [t for t in self.graph.initializer if t.name in used]
        del self.graph.initializer[:]
        self.graph.initializer.extend(kept)
        available = {t.name for t in kept} | {i.name for i in self.graph.input} | {""}
        ordered, pending = [], nodes
        while pending:
            ready = [n for n in pending if all(i in available for i in n.input)]
            if not ready:
                raise QDQError("the graph with Q/DQ pairs has a cycle or an undefined input")
            ready_ids = {id(n) for n in ready}
            pending = [n for n in pending if id(n) not in ready_ids]
            for node in ready:
                available.update(node.output)
            ordered += ready
        del self.graph.node[:]
        self.graph.node.extend(ordered)


def _consumers(graph, tensor: str) -> list:
    return [n for n in graph.node if tensor in n.input]


def _unit_output(graph, node, after_relu: bool, layer: str) -> tuple[str | None, str]:
    """(the tensor between the layer and its ReLU, or None; the unit's output tensor) in the exported graph."""
    tensor = node.output[0]
    users = _consumers(graph, tensor)
    if len(users) == 1 and users[0].op_type == "BatchNormalization":  # not folded by the exporter
        tensor = users[0].output[0]
        users = _consumers(graph, tensor)
    if not after_relu:
        return None, tensor
    if len(users) != 1 or users[0].op_type != "Relu":
        raise QDQError(f"{layer}: expected its output to go through one Relu in the exported graph, found "
                       f"{[u.op_type for u in users]}")
    return tensor, users[0].output[0]


def _retarget(graph, tensor: str, replacement: str, skip: set[str]) -> None:
    for node in graph.node:
        if node.name in skip:
            continue
        for index, name in enumerate(node.input):
            if name == tensor:
                node.input[index] = replacement


def insert_qdq(model, onnx_layers: list, report: SparsityReport, gm: torch.nn.Module) -> list[str]:
    """Rewrite the float ONNX ``model`` (in place) into QDQ form for the INT8 layers of ``report``; returns the
    layers quantized. ``onnx_layers`` are the file's weight layers matched to sgfx's (``OnnxLayer.layer``)."""
    from onnx import helper, numpy_helper

    records = {r.name: r for r in report.layers if "weight_scale" in r.quant}
    by_name = {n.name: n for n in model.graph.node}
    editor, done = _Editor(model), []
    for onnx_layer in onnx_layers:
        record = records.get(onnx_layer.layer)
        if record is None:
            continue
        node = by_name[onnx_layer.node]
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.input[1] not in editor.initializers:
            raise QDQError(f"{record.name}: its exported weight is not an initializer the node reads directly")
        axis = onnx_weight_axis(node.op_type, attributes)
        scales = fetch_tensor(gm, record.quant["weight_scale"]).detach()
        integers = weight_integers(fetch_tensor(gm, record.weight_name).detach(), scales, record.quant["weight_axis"])
        folded = numpy_helper.to_array(editor.initializers[node.input[1]])
        values, onnx_scales = _decompose(folded, _torch_to_onnx(integers.numpy(), node.op_type, attributes), axis,
                                         record.name)
        node.input[1] = editor.weight(node.input[1], values, onnx_scales, axis)
        # a pair of its own: onnxruntime fuses DQ -> Conv only where the DequantizeLinear has that one consumer
        node.input[0] = editor.pair(node.input[0], record.quant["input_scale"], fresh=True)
        if record.quant.get("output_scale") is not None:
            before_relu, output = _unit_output(model.graph, node, record.quant.get("output_after_relu", False),
                                               record.name)
            scale = record.quant["output_scale"]
            if before_relu is not None:  # the same pair before the ReLU: no value changes, the Conv fuses
                relu = _consumers(model.graph, before_relu)[0]
                relu.input[0] = editor.pair(before_relu, scale, fresh=True)
            dequantized = editor.pair(output, scale)
            _retarget(model.graph, output, dequantized, {n.name for n in editor.new_nodes})
        done.append(record.name)
    editor.finish()
    return done
