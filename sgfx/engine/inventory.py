"""Account for every weight of the model: the ones sgfx does not prune get a report entry with the reason.

Why: a user asking for 2:4 must not get a model whose Conv3d, attention or embedding weights were silently left
dense. Every parameter with two or more dimensions (a weight matrix or kernel; biases and norm scales are
excluded) that no prunable layer owns is listed with why: an unsupported layer kind, a weight inside a leaf module,
a weight a functional call uses that sgfx cannot prune, or one the traced forward never uses. :func:`dense_summary`
gives the one warning ``sparsify`` prints: the fraction of the model's weights that stayed dense, and why.
"""

from __future__ import annotations

import fnmatch
import logging
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.fx
from torch.fx.node import Node

from ..config import SparsifyConfig
from ..layers import PrunableLayer
from ..layout import not_accelerated_reason
from ..report import LayerRecord, SparsityReport
from .leaf_blocks import LeafBlock, find_leaf_blocks

__all__ = ["Inventory", "take_inventory", "unpruned_weight_records", "dense_summary", "is_weight", "match_skip"]

logger = logging.getLogger(__name__)


def is_weight(tensor: torch.Tensor) -> bool:
    """A weight matrix or kernel (two or more dimensions longer than 1), as opposed to a bias, a norm's scale or a
    per-channel gain shaped (C, 1, 1, 1)."""
    return sum(size > 1 for size in tensor.shape) >= 2


def _target_name(target) -> str:
    return getattr(target, "__name__", None) or str(target)


def _reason(gm: torch.fx.GraphModule, name: str, called: dict[str, str], uses: dict[str, list[Node]],
            rejected: dict[Node, str], kept_whole: dict[str, str]) -> tuple[str, str]:
    """(kind label, reason) for a weight no prunable layer owns."""
    owner = name.rpartition(".")[0]
    for module_name, reason in kept_whole.items():
        if owner == module_name or owner.startswith(module_name + "."):
            return type(gm.get_submodule(module_name)).__name__, reason
    if owner in called:
        return called[owner], f"unsupported layer kind {called[owner]}"
    parts = owner.split(".")
    for depth in range(len(parts) - 1, 0, -1):  # the nearest leaf module above the owner
        ancestor = ".".join(parts[:depth])
        if ancestor in called:
            return called[ancestor], f"inside leaf module {ancestor} ({called[ancestor]})"
    users = [user for node in uses.get(name, []) for user in node.users]
    for user in users:
        if user in rejected:
            return _target_name(user.target), f"{_target_name(user.target)}: {rejected[user]}"
    if users:
        used_by = sorted({_target_name(u.target) for u in users})
        return "parameter", f"used by {', '.join(used_by)} (not a prunable layer kind)"
    if uses.get(name):
        return "parameter", "read by the graph but not used by any op"
    return "parameter", "not used by the traced forward"


def unpruned_weight_records(gm: torch.fx.GraphModule, found: dict[Node, PrunableLayer], rejected: dict[Node, str],
                            kept_whole: dict[str, str], pattern: str, method: str,
                            exclude: set[str] = frozenset()) -> list[LayerRecord]:
    """A skipped :class:`LayerRecord` for every weight of ``gm`` that no layer in ``found`` owns and that is not
    named in ``exclude`` (weights that already have a record)."""
    owned = {id(layer.weight) for layer in found.values()}
    called = {str(n.target): type(gm.get_submodule(n.target)).__name__
              for n in gm.graph.nodes if n.op == "call_module"}
    uses: dict[str, list[Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            uses.setdefault(str(node.target), []).append(node)
    records = []
    for name, param in gm.named_parameters():
        if not is_weight(param) or id(param) in owned or name in exclude:
            continue
        kind, reason = _reason(gm, name, called, uses, rejected, kept_whole)
        records.append(LayerRecord(name, kind, tuple(param.shape), pattern, method, "skipped", reason,
                                   sparsity=float((param == 0).float().mean()), weight_name=name))
    return records


def _percent(fraction: float) -> str:
    """A fraction as a percentage with two significant digits below 10 % (0.083 %, not 0.1 %)."""
    return f"{fraction:.1%}" if fraction >= 0.1 else f"{100 * fraction:.2g} %"


def dense_summary(gm: torch.nn.Module, report: SparsityReport) -> str | None:
    """'X % of the model's weights stayed dense ...' with the commonest reasons, or None when every weight was
    pruned."""
    sizes = {name: p.numel() for name, p in gm.named_parameters() if is_weight(p)}
    total = sum(sizes.values())
    dense = [r for r in report.layers if not r.pruned and r.weight_name in sizes]
    dense_elements = sum(sizes[r.weight_name] for r in dense)
    if not dense or total == 0:
        return None
    reasons = Counter()
    for record in dense:
        reasons[record.reason.split(":")[0] if record.reason.startswith("skip=") else record.reason] += \
            sizes[record.weight_name]
    top = "; ".join(f"{reason} ({_percent(count / total)})" for reason, count in reasons.most_common(3))
    return (f"sgfx: {_percent(dense_elements / total)} of the model's weights stayed dense ({len(dense)} of "
            f"{len(sizes)} weight tensors): {top}. sgfx.report(gm) lists each with its reason")


def match_skip(name: str, patterns: Sequence[str]) -> str | None:
    """The first ``skip`` pattern (exact name or fnmatch glob) matching ``name``."""
    for pattern in patterns:
        if name == pattern or fnmatch.fnmatchcase(name, pattern):
            return pattern
    return None


@dataclass
class Inventory:
    """Every weight of a graph, sorted for the sweep.

    Attributes:
        records: a record per prunable layer (of the graph or inside a leaf module), by name, in graph order.
        others: records of the weights no prunable layer owns, each with its reason.
        to_prune: the graph's prunable nodes to prune (skip and eligibility applied).
        blocks: leaf modules (or wrapped functions) with layers to prune inside.
        inner: those inner layers, by name.
    """

    records: dict[str, LayerRecord]
    others: list[LayerRecord]
    to_prune: dict[Node, PrunableLayer]
    blocks: dict[Node, LeafBlock]
    inner: dict[str, PrunableLayer]


def _dense_reason(layer: PrunableLayer, config: SparsifyConfig, in_block: LeafBlock | None) -> tuple[str, str | None]:
    """(reason the layer stays dense or "", the skip pattern that matched it or None)."""
    matched = match_skip(layer.name, config.skip)
    reason = f"skip={matched!r}" if matched else (layer.ineligibility(config.sparsity) or "")
    if not reason and config.accelerated_only:
        slow = not_accelerated_reason(layer.op, layer.num_groups, layer.in_per_group)
        reason = f"accelerated_only: {slow}" if slow else ""
    if in_block is not None and not reason and config.allocates:
        reason = f"inside leaf module {in_block.name}: allocation and budget cover the graph's layers only"
    if reason and not matched:  # summed up in one warning at the end (dense_summary), each in the report
        logger.info("%s left dense: %s", layer.name, reason)
    return reason, matched


def take_inventory(gm: torch.fx.GraphModule, config: SparsifyConfig, found: dict[Node, PrunableLayer],
                   rejected: dict[Node, str], kept_whole: dict[str, str]) -> Inventory:
    """Records for every weight of ``gm``; its prunable layers (``found``, with the calls ``rejected``) and the
    leaf modules with prunable layers inside, to prune (``skip`` and each layer's eligibility applied)."""
    pattern_name = str(config.sparsity)
    blocks = find_leaf_blocks(gm, found, set(kept_whole))
    records: dict[str, LayerRecord] = {}
    to_prune, used_skips = {}, set()
    candidates = [(node, layer, None) for node, layer in found.items()]
    candidates += [(node, layer, block) for node, block in blocks.items() for layer in block.layers.values()]
    position = {node: index for index, node in enumerate(gm.graph.nodes)}
    candidates.sort(key=lambda item: position[item[0]])  # graph order (stable inside a leaf module)
    for node, layer, block in candidates:
        record = LayerRecord(layer.name, layer.op, tuple(layer.weight.shape), pattern_name, config.method, "skipped",
                             weight_name=layer.weight_name, sparsity=float((layer.weight == 0).float().mean()),
                             uses=len(layer.uses))
        records[layer.name] = record
        record.reason, matched = _dense_reason(layer, config, block)
        used_skips.add(matched)
        if record.reason and block is not None:
            del block.layers[layer.name]
        elif not record.reason and block is None:
            to_prune[node] = layer
    for pattern in sorted(set(config.skip) - used_skips):
        warnings.warn(f"sgfx: skip pattern {pattern!r} matched no prunable layer", UserWarning, stacklevel=7)
    inner = {layer.name: layer for block in blocks.values() for layer in block.layers.values()}
    others = unpruned_weight_records(gm, found, rejected, kept_whole, pattern_name, config.method,
                                     exclude={r.weight_name for r in records.values()})
    return Inventory(records, others, to_prune, {n: b for n, b in blocks.items() if b.layers}, inner)
