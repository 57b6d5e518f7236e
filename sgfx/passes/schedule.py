"""Schedule shared uses: reorder a graph so that a weight shared by several calls is reached once all of them can run.

Why: the sweep prunes a weight at its first call, from the inputs of every call that exist by then. A head shared
across feature levels whose second level is computed after the first head call would otherwise be calibrated on
one level only. A stable topological order in which every call of a shared weight waits for the inputs of all its
calls fixes that without changing the function. Left as it is when that is impossible (a call's input depends on
another call: recurrence) or unsafe (an in-place op mutates a value other nodes read).
"""

from __future__ import annotations

import heapq
import logging
import operator

import torch
import torch.fx
from torch.fx.node import Node

from ..layers import PrunableLayer

__all__ = ["schedule_shared_uses", "is_inplace"]

logger = logging.getLogger(__name__)

_INPLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}


def is_inplace(gm: torch.fx.GraphModule, node: Node) -> bool:
    """Whether ``node`` mutates its first argument (an in-place module, method or function)."""
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(node.target), "inplace", False))
    if node.op == "call_method":
        return str(node.target).endswith("_")
    if node.op == "call_function":
        return node.target in _INPLACE_FUNCTIONS or getattr(node.target, "__name__", "").endswith("_")
    return False


def _unsafe_to_reorder(gm: torch.fx.GraphModule) -> bool:
    """An in-place op on a value that other nodes also read: moving nodes could let them see it mutated."""
    return any(is_inplace(gm, n) and n.args and isinstance(n.args[0], Node) and len(n.args[0].users) > 1
               for n in gm.graph.nodes)


def _shared_use_order(gm: torch.fx.GraphModule, layers: dict[Node, PrunableLayer]) -> list[Node] | None:
    """The stable topological order in which every call of a shared weight waits for all its calls' inputs, or
    None when there is nothing to move, it is impossible (a cycle) or unsafe."""
    extra: dict[Node, set[Node]] = {}
    for layer in layers.values():
        inputs = {u.args[0] for u in layer.uses if isinstance(u.args[0], Node)}
        for use in layer.uses if len(layer.uses) > 1 else []:
            extra.setdefault(use, set()).update(inputs)
    if not extra or _unsafe_to_reorder(gm):
        return None
    nodes = list(gm.graph.nodes)
    position = {node: index for index, node in enumerate(nodes)}
    needs = {n: set(n.all_input_nodes) | extra.get(n, set()) for n in nodes}
    needs[nodes[-1]] = set(nodes[:-1])  # the output node stays last
    users: dict[Node, list[Node]] = {n: [] for n in nodes}
    for node, required in needs.items():
        for r in required:
            users[r].append(node)
    waiting = {n: len(required) for n, required in needs.items()}
    ready = [position[n] for n in nodes if waiting[n] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        node = nodes[heapq.heappop(ready)]
        order.append(node)
        for user in users[node]:
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, position[user])
    if len(order) != len(nodes) or order == nodes:  # a cycle (recurrent use) or nothing to move
        return None
    return order


def schedule_shared_uses(gm: torch.fx.GraphModule, layers: dict[Node, PrunableLayer]) -> torch.fx.GraphModule:
    """Reorder ``gm``'s nodes in place so that every call of a weight shared by several calls (``layers``, from
    :func:`sgfx.layers.find_prunable_layers`: the same nodes stay valid) runs only once the inputs of *all* those
    calls exist; the function does not change. Returns ``gm``."""
    order = _shared_use_order(gm, layers)
    if order is None:
        return gm
    next(iter(gm.graph.nodes)).prepend(order[0])
    for previous, node in zip(order, order[1:]):
        previous.append(node)
    gm.graph.lint()
    gm.recompile()
    logger.info("weights shared by several calls: graph reordered so that all their inputs exist when pruned")
    return gm
