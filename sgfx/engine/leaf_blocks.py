"""Prune the layers inside leaf modules and wrapped functions, which the tracer keeps whole, by running them as units.

Why: some modules cannot be traced into (timm registers NormFreeBlock, MobileViT blocks and others as FX leaves;
users pass ``leaf_modules`` to get past a tracing failure), yet they hold most of the model's weights. A leaf module
is one ``call_module`` node in the graph; when the sweep reaches it, its inner layers are pruned in their execution
order: the module runs on the node's inputs (every calibration batch) with a forward pre-hook that records the
next inner layer's input, that layer is pruned, and the next one then sees its pruned output. This is the same
sequential calibration as in the graph, one level down. BatchNorm re-estimation, statistics correction and
channel permutation do not reach inside leaf modules.

Functions the tracer keeps whole (``torch.fx.wrap``: torchvision's ``shifted_window_attention`` takes Swin's ``qkv``
and ``proj`` weights as arguments) are handled the same way: a 2-D parameter passed to such a call is pruned as a
Linear layer when the function multiplies by it with ``F.linear``; its input is recorded with a
:class:`torch.overrides.TorchFunctionMode` while the function runs on the node's inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.fx.node import Node, map_arg

from ..layers import LinearLayer, PrunableLayer, fetch_tensor, layer_for_module

__all__ = ["LeafBlock", "find_leaf_blocks", "find_function_blocks", "record_inputs", "record_function_inputs",
           "execution_order", "calls_of"]


@dataclass
class LeafBlock:
    """A leaf module (or a wrapped function call) of the graph and the prunable layers inside it."""

    name: str
    layers: dict[str, PrunableLayer] = field(default_factory=dict)  # qualified name -> layer
    modules: dict[str, nn.Module] = field(default_factory=dict)  # qualified name -> the inner module
    function: Any = None  # a wrapped function's target (then ``layers`` are its weight arguments, by path)


class _LinearRecorder(TorchFunctionMode):
    """Records the input of every ``F.linear`` call whose weight is one of ``weights`` (by identity)."""

    def __init__(self, weights: dict[str, torch.Tensor]):
        super().__init__()
        self.weights = weights
        self.inputs: dict[str, list[torch.Tensor]] = {name: [] for name in weights}
        self.order: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and len(args) > 1:
            for name, weight in self.weights.items():
                if args[1] is weight:
                    self.inputs[name].append(args[0])
                    if name not in self.order:
                        self.order.append(name)
        return func(*args, **kwargs)


def _weight_arguments(gm: torch.fx.GraphModule, node: Node) -> dict[str, torch.Tensor]:
    """The 2-D parameters a call_function node passes (as get_attr nodes) to its target."""
    found = {}
    for arg in node.all_input_nodes:
        if arg.op == "get_attr":
            tensor = fetch_tensor(gm, str(arg.target))
            if isinstance(tensor, nn.Parameter) and tensor.dim() == 2:
                found[str(arg.target)] = tensor
    return found


def find_function_blocks(gm: torch.fx.GraphModule, found: dict[Node, PrunableLayer],
                         owned: set[int]) -> dict[Node, LeafBlock]:
    """call_function nodes (not a prunable kind) that receive 2-D parameters: candidate Linear layers inside."""
    blocks: dict[Node, LeafBlock] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node in found:
            continue
        weights = {n: w for n, w in _weight_arguments(gm, node).items() if id(w) not in owned}
        if not weights:
            continue
        target = getattr(node.target, "__name__", str(node.target))
        block = LeafBlock(f"{target} ({node.name})", function=node.target)
        for name, weight in weights.items():
            owned.add(id(weight))
            layer = LinearLayer(name, "Linear", weight, name)
            layer.uses = [node]
            block.layers[name] = layer
        blocks[node] = block
    return blocks


def record_function_inputs(node: Node, weights: dict[str, torch.Tensor], calls: list[tuple[tuple, dict]]
                           ) -> tuple[list[str], dict[str, list[torch.Tensor]]]:
    """Run a wrapped function on each call; the order in which ``F.linear`` first uses each of ``weights`` (by
    identity), and the inputs it multiplies them with."""
    recorder = _LinearRecorder(weights)
    with torch.no_grad(), recorder:
        for args, kwargs in calls:
            node.target(*args, **kwargs)
    return recorder.order, recorder.inputs


def find_leaf_blocks(gm: torch.fx.GraphModule, found: dict[Node, PrunableLayer],
                     exclude: set[str] = frozenset()) -> dict[Node, LeafBlock]:
    """call_module nodes of modules that are not a prunable kind themselves but contain prunable layers (modules
    named in ``exclude`` are left out: their weights are reported with their own reason), and wrapped function calls
    that receive 2-D parameters (:func:`find_function_blocks`)."""
    owned = {id(layer.weight) for layer in found.values()}
    blocks: dict[Node, LeafBlock] = {}
    seen_modules: set[str] = set()
    for node in gm.graph.nodes:
        if node.op != "call_module" or node in found or str(node.target) in seen_modules | set(exclude):
            continue
        seen_modules.add(str(node.target))
        block = LeafBlock(str(node.target))
        for sub_name, sub in gm.get_submodule(node.target).named_modules():
            if not sub_name:
                continue
            layer = layer_for_module(f"{node.target}.{sub_name}", sub)
            if layer is not None and id(layer.weight) not in owned:
                owned.add(id(layer.weight))
                layer.uses = [node]
                block.layers[layer.name] = layer
                block.modules[layer.name] = sub
        if block.layers:
            blocks[node] = block
    blocks.update(find_function_blocks(gm, found, owned))
    return blocks


def _call(module: nn.Module, args: tuple, kwargs: dict) -> None:
    with torch.no_grad():
        module(*args, **kwargs)


def execution_order(module: nn.Module, block: LeafBlock, args: tuple, kwargs: dict) -> list[str]:
    """The inner layers of ``block`` in the order ``module`` first calls them on one input."""
    order: list[str] = []
    handles = [m.register_forward_pre_hook(lambda m, a, name=name: order.append(name) if name not in order else None)
               for name, m in block.modules.items()]
    try:
        _call(module, args, kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return order


def record_inputs(module: nn.Module, inner: nn.Module, calls: list[tuple[tuple, dict]]) -> list[torch.Tensor]:
    """The first input of every call of ``inner`` while ``module`` runs on each of ``calls``."""
    inputs: list[torch.Tensor] = []
    handle = inner.register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
    try:
        for args, kwargs in calls:
            _call(module, args, kwargs)
    finally:
        handle.remove()
    return inputs


def calls_of(node: Node, env: dict[Node, list[Any]], batches: int) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) of ``node`` for every batch, from an environment of per-batch values."""
    return [(map_arg(node.args, lambda n: env[n][i]), map_arg(node.kwargs, lambda n: env[n][i]))
            for i in range(batches)]
