"""Prune the layers inside leaf modules, which the tracer keeps whole, by running each leaf module as a unit.

Why: some modules cannot be traced into (timm registers NormFreeBlock, MobileViT blocks and others as FX leaves;
users pass ``leaf_modules`` to get past a tracing failure), yet they hold most of the model's weights. A leaf module
is one ``call_module`` node in the graph; when the sweep reaches it, its inner layers are pruned in their execution
order: the module runs on the node's inputs (every calibration batch) with a forward pre-hook that records the
next inner layer's input, that layer is pruned, and the next one then sees its pruned output. This is the same
sequential calibration as in the graph, one level down. BatchNorm re-estimation, statistics correction and
channel permutation do not reach inside leaf modules (the report's layers say "inside leaf module").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.fx.node import Node, map_arg

from ..layers import PrunableLayer

__all__ = ["LeafBlock", "find_leaf_blocks", "record_inputs", "execution_order", "calls_of"]


@dataclass
class LeafBlock:
    """A leaf module of the graph and the prunable layers inside it (by their module paths in the graph)."""

    name: str
    layers: dict[str, PrunableLayer] = field(default_factory=dict)  # qualified name -> layer
    modules: dict[str, nn.Module] = field(default_factory=dict)  # qualified name -> the inner module


def find_leaf_blocks(gm: torch.fx.GraphModule, found: dict[Node, PrunableLayer],
                     exclude: set[str] = frozenset()) -> dict[Node, LeafBlock]:
    """call_module nodes of modules that are not a prunable kind themselves but contain prunable layers (modules
    named in ``exclude`` are left out: their weights are reported with their own reason)."""
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
            try:
                layer = PrunableLayer.from_module(f"{node.target}.{sub_name}", sub)
            except TypeError:
                continue
            if layer is not None and id(layer.weight) not in owned:
                owned.add(id(layer.weight))
                layer.uses = [node]
                block.layers[layer.name] = layer
                block.modules[layer.name] = sub
        if block.layers:
            blocks[node] = block
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
