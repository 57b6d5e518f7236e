"""Independent verification that weights follow a sparsity pattern, exactly as the hardware states it.

N:M: every run of M consecutive weights along the reduction axis (:mod:`sgfx.layout`: input channels of a conv,
``in_features`` of a Linear, dim 0 of a transposed conv) holds at most N nonzeros, at every output channel and
kernel position (TensorRT's rule). Unstructured: the fraction of exact zeros reaches the target.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .config import NMPattern, parse_pattern
from .layers import fetch_tensor, layer_for_module
from .layout import nm_axis, nm_groups
from .report import find_report

__all__ = ["PatternCheck", "check_pattern", "count_violations"]


@dataclass
class PatternCheck:
    """Outcome of :func:`check_pattern`; true when every checked weight follows the pattern."""

    pattern: str
    checked: list[str] = field(default_factory=list)
    violations: dict[str, int] = field(default_factory=dict)  # weight name -> offending groups (or 1)
    ineligible: list[str] = field(default_factory=list)  # weights whose shape cannot hold the pattern

    @property
    def ok(self) -> bool:
        return bool(self.checked) and not self.violations

    def __bool__(self) -> bool:
        return self.ok


def count_violations(weight: torch.Tensor, pattern: Any, axis: int = 1) -> int:
    """Number of N:M groups along ``axis`` with more than N nonzeros (or 1 if an unstructured target is missed).

    Raises:
        ValueError: the weight has fewer than 2 dims, or its ``axis`` is not divisible by M.
    """
    pattern = parse_pattern(pattern)
    if weight.dim() < 2:
        raise ValueError(f"expected a weight with 2 or more dims, got shape {tuple(weight.shape)}")
    nonzero = weight.detach() != 0
    if not isinstance(pattern, NMPattern):
        zeros = weight.numel() - int(nonzero.sum())
        return int(zeros < round(pattern.sparsity * weight.numel()))
    size = weight.shape[axis]
    if size % pattern.m:
        raise ValueError(f"axis {axis} of weight {tuple(weight.shape)} ({size}) is not divisible by M={pattern.m}")
    return int((nm_groups(nonzero, pattern.m, axis).sum(dim=1) > pattern.n).sum())


def _weights_to_check(module: nn.Module) -> list[tuple[str, torch.Tensor, int]]:
    """(name, weight, N:M axis) of each weight to check: the report's pruned ones, else every registered kind."""
    found = find_report(module)
    if found is not None:
        return [(r.weight_name, fetch_tensor(module, r.weight_name), nm_axis(r.op)) for r in found.layers if r.pruned]
    items = []
    for name, m in module.named_modules():
        layer = layer_for_module(name, m)
        if layer is not None:
            items.append((f"{name}.weight", m.weight, layer.nm_axis))
    return items


def check_pattern(weight_or_model: torch.Tensor | nn.Module, pattern: Any) -> PatternCheck:
    """Check that a weight, or every pruned weight of a model, follows ``pattern``.

    For a model from :func:`sgfx.sparsify`, the weights its report lists as pruned are checked, each along its
    kind's N:M axis; for any other module, every layer of a prunable kind whose shape can hold the pattern.

    Args:
        weight_or_model: a weight tensor (groups along dim 1), or a module.
        pattern: ``"N:M"`` or an unstructured fraction.

    Returns:
        A :class:`PatternCheck`, truthy when all checked weights comply.

    Example:
        >>> assert sgfx.check_pattern(gm, "2:4")  # doctest: +SKIP
    """
    parsed = parse_pattern(pattern)
    result = PatternCheck(str(parsed))
    if isinstance(weight_or_model, torch.Tensor):
        items = [("weight", weight_or_model, 1)]
    elif isinstance(weight_or_model, nn.Module):
        items = _weights_to_check(weight_or_model)
    else:
        raise TypeError(f"expected a tensor or nn.Module, got {type(weight_or_model).__name__}")
    for name, weight, axis in items:
        try:
            bad = count_violations(weight, parsed, axis)
        except ValueError:
            if isinstance(weight_or_model, torch.Tensor):
                raise
            result.ineligible.append(name)
            continue
        result.checked.append(name)
        if bad:
            result.violations[name] = bad
    return result
