"""Sequential calibration and pruning, in one topological sweep of the graph.

Why one sweep: SparseGPT's guarantee holds layer by layer only if each layer's Hessian is built from the inputs
it will really see, i.e. the outputs of the layers before it *after* they were pruned. Re-running the graph
prefix for each layer costs O(L²) forward passes; instead this ``torch.fx.Interpreter`` runs the graph node by
node over *all* calibration batches at once (each environment value is a list with one entry per batch). When it
reaches a prunable node it first builds the Hessian from the inputs waiting there, prunes the weight in place,
and only then computes that node's outputs, with the pruned weight, for the nodes after it. Activations are
dropped as soon as their last user has run (the Interpreter's garbage collection).
"""

from __future__ import annotations

import fnmatch
from typing import Any, Callable, Sequence

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.node import Node, map_arg

from ..layers import PrunableLayer, fetch_tensor

__all__ = ["CalibrationError", "find_prunable_layers", "match_skip", "SequentialPruner"]

_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_ATEN_CONVOLUTION_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding",
                          "groups")
# Functional calls sgfx prunes when their weight is a get_attr: torch.nn.functional, and the aten ops of graphs
# from torch.export (``ExportedProgram.module()``; TorchScript converted by torch.export gives aten.convolution).
_LINEAR_FNS = {F.linear, torch._C._nn.linear, torch.ops.aten.linear.default}
_CONV_FNS = {F.conv2d: _CONV_ARGS, torch.conv2d: _CONV_ARGS, torch.ops.aten.conv2d.default: _CONV_ARGS,
             torch.ops.aten.convolution.default: _ATEN_CONVOLUTION_ARGS}
_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1, "transposed": False}


class CalibrationError(ValueError):
    """Running the calibration data through the graph failed at a node."""


def _functional_layer(gm: torch.fx.GraphModule, node: Node) -> PrunableLayer | None:
    """A PrunableLayer for ``F.linear``/``F.conv2d`` (or their aten ops) whose weight is a ``get_attr`` of ``gm``,
    else None."""
    if node.op != "call_function" or (node.target not in _LINEAR_FNS and node.target not in _CONV_FNS):
        return None
    bound = dict(zip(_CONV_FNS.get(node.target, _CONV_ARGS), node.args))
    bound.update(node.kwargs)
    weight_node = bound.get("weight")
    if not isinstance(weight_node, Node) or weight_node.op != "get_attr":
        return None
    weight = fetch_tensor(gm, weight_node.target)
    if weight is None:
        return None
    if node.target in _LINEAR_FNS:
        if weight.dim() != 2:
            return None
        return PrunableLayer(weight_node.target, "Linear", weight, weight_name=weight_node.target)
    args = {**_CONV_DEFAULTS, **bound}
    if weight.dim() != 4 or args["transposed"] or any(
            isinstance(args[k], Node) for k in ("stride", "padding", "dilation", "groups")):
        return None
    return PrunableLayer.from_conv_args(
        weight_node.target, weight, args["stride"], args["padding"], args["dilation"], args["groups"]
    )


def find_prunable_layers(gm: torch.fx.GraphModule) -> dict[Node, PrunableLayer]:
    """Conv2d/Linear nodes in topological order; a weight used by several nodes is pruned at its first use."""
    layers: dict[Node, PrunableLayer] = {}
    seen: set[int] = set()
    for node in gm.graph.nodes:
        layer = None
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                layer = PrunableLayer.from_module(node.target, module)
        else:
            layer = _functional_layer(gm, node)
        if layer is not None and id(layer.weight) not in seen:
            seen.add(id(layer.weight))
            layers[node] = layer
    return layers


def match_skip(name: str, patterns: Sequence[str]) -> str | None:
    """The first ``skip`` pattern (exact name or fnmatch glob) matching ``name``."""
    for pattern in patterns:
        if name == pattern or fnmatch.fnmatchcase(name, pattern):
            return pattern
    return None


class SequentialPruner(torch.fx.Interpreter):
    """Runs ``gm`` over a list of batches node by node, pruning each layer in ``layers`` before it runs.

    Args:
        gm: the graph to run (its prunable weights are modified in place).
        layers: prunable nodes to prune, as returned by :func:`find_prunable_layers` (possibly filtered).
        prune: ``prune(layer, inputs, dense_inputs)`` prunes ``layer.weight`` given its input for every batch (and,
            with ``dense``, the input the unpruned model gives it; else ``None``).
        before_node: optional ``{node: hook}``; ``hook(inputs)`` runs with the node's first input for every batch
            just before the node runs (BatchNorm re-estimation uses it).
        dense: optional unpruned copy of ``gm`` run in lockstep, so that each layer also sees its dense inputs.
        after_node: optional ``{node: hook}`` (needs ``dense``); ``hook(outputs, dense_outputs)`` gets the node's
            outputs for every batch, pruned and dense, and returns the outputs the nodes after it see
            (statistics correction uses it).
    """

    def __init__(
        self,
        gm: torch.fx.GraphModule,
        layers: dict[Node, PrunableLayer],
        prune: Callable[[PrunableLayer, list[torch.Tensor], list[torch.Tensor] | None], None],
        before_node: dict[Node, Callable[[list[torch.Tensor]], None]] | None = None,
        dense: torch.fx.GraphModule | None = None,
        after_node: dict[Node, Callable[[list[Any], list[Any]], list[Any]]] | None = None,
    ):
        if after_node and dense is None:
            raise ValueError("after_node hooks compare with the dense model: pass dense")
        super().__init__(gm, garbage_collect_values=True)
        self.extra_traceback = False  # our own error names the node and the batch
        self.layers = layers
        self.prune = prune
        self.before_node = before_node or {}
        self.after_node = after_node or {}
        self.dense = None if dense is None else torch.fx.Interpreter(dense)  # runs gm's nodes on dense weights
        self.dense_env: dict[Node, list[Any]] = {}
        self._batches: list[torch.Tensor] = []
        self._batch_index = 0  # the batch being run, for error messages
        self._placeholders_seen = 0

    def run_batches(self, batches: list[torch.Tensor]) -> list[Any]:
        """Run every batch through the graph; returns the graph output of each batch."""
        self._batches = batches
        self._placeholders_seen = 0
        return self.run(enable_io_processing=False)

    def _placeholder(self, node: Node) -> list[Any]:
        self._placeholders_seen += 1
        if self._placeholders_seen == 1:
            return list(self._batches)
        if node.args:  # a default value
            return [node.args[0]] * len(self._batches)
        raise CalibrationError(
            f"the graph has more than one input without a default ({node.format_node()}); sgfx calibrates "
            "models taking one tensor input: fix the others with concrete_args"
        )

    def _run_batch(self, node: Node, index: int, runner: torch.fx.Interpreter | None = None) -> Any:
        self._batch_index = index  # for error messages
        runner = runner or self
        env = self.env if runner is self else self.dense_env
        args = map_arg(node.args, lambda n: env[n][index])
        kwargs = map_arg(node.kwargs, lambda n: env[n][index])
        return getattr(runner, node.op)(node.target, args, kwargs)

    def _run_dense(self, n: Node) -> None:
        """The node's outputs on the unpruned weights; frees dense values whose last use this is."""
        if n.op != "output":
            self.dense_env[n] = [self._run_batch(n, i, self.dense) for i in range(len(self._batches))]
        for used in self.user_to_last_uses.get(n, []):
            self.dense_env.pop(used, None)

    def run_node(self, n: Node) -> Any:
        if n.op == "placeholder":
            value = self._placeholder(n)
            if self.dense is not None:
                self.dense_env[n] = list(value)
            return value
        if n.op == "get_attr":  # parameters are the same for every batch
            if self.dense is not None:
                self.dense_env[n] = [self.dense.fetch_attr(n.target)] * len(self._batches)
            return [self.fetch_attr(n.target)] * len(self._batches)
        layer = self.layers.get(n)
        if layer is not None:
            try:
                dense_inputs = self.dense_env[n.args[0]] if self.dense is not None else None
                self.prune(layer, self.env[n.args[0]], dense_inputs)
            except ValueError as exc:  # inputs the layer cannot take
                raise CalibrationError(f"pruning failed at node `{n.format_node()}`: {exc}") from exc
            except Exception as exc:
                raise RuntimeError(f"sgfx: pruning failed at node `{n.format_node()}`: {exc}") from exc
        hook = self.before_node.get(n)
        if hook is not None:
            hook(self.env[n.args[0]])
        self._batch_index = 0
        try:
            if self.dense is not None:
                self._run_dense(n)
            outputs = [self._run_batch(n, index) for index in range(len(self._batches))]
        except CalibrationError:
            raise
        except Exception as exc:
            index = self._batch_index
            shape = tuple(self._batches[index].shape)
            raise CalibrationError(
                f"calibration failed at node `{n.format_node()}` on batch {index} (input shape {shape}): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        after = self.after_node.get(n)
        if after is None:
            return outputs
        try:
            return after(outputs, self.dense_env[n])
        except Exception as exc:
            raise RuntimeError(f"sgfx: correcting the outputs of node `{n.format_node()}` failed: {exc}") from exc
