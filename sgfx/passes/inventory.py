"""Account for every weight of the model: the ones sgfx does not prune get a report entry with the reason.

Why: a user asking for 2:4 must not get a model whose Conv3d, attention or embedding weights were silently left
dense. Every parameter with two or more dimensions (a weight matrix or kernel; biases and norm scales are
excluded) that no prunable layer owns is listed with why: an unsupported layer kind, a weight inside a leaf module,
a weight a functional call uses that sgfx cannot prune, or one the traced forward never uses. :func:`dense_summary`
gives the one warning ``sparsify`` prints: the fraction of the model's weights that stayed dense, and why.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.fx
from torch.fx.node import Node

from ..layers import PrunableLayer
from ..report import LayerRecord, SparsityReport

__all__ = ["unpruned_weight_records", "dense_summary", "is_weight"]


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
