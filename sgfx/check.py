"""Independent verification that weights follow a sparsity pattern, exactly as the hardware states it.

N:M for a Conv2d weight (C_out, C_in/g, kh, kw): for every output channel and kernel position, every run of M
consecutive input channels holds at most N nonzeros (TensorRT's rule). For a Linear weight (out, in): every run
of M consecutive ``in_features``. Unstructured: the fraction of exact zeros reaches the target.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .config import NMPattern, parse_pattern
from .layers import fetch_tensor
from .report import REPORT_KEY

__all__ = ["PatternCheck", "check_pattern", "count_violations", "nm_groups", "nm_ungroup"]

# The N:M layout, in one place: groups run along the input axis of a PyTorch weight (dim 1: Conv input channels,
# Linear in_features), one group per output channel and kernel position. ONNX Conv weights share it; the ONNX
# checker (sgfx.lowering.onnx) passes other axes for Gemm/MatMul operands.
GROUP_AXIS = 1


def nm_groups(weight: torch.Tensor, m: int, axis: int = GROUP_AXIS) -> torch.Tensor:
    """(n_groups, m): every run of ``m`` consecutive entries along ``axis``, one per row (a view when possible).

    Rows are ordered by the other axes in their order (for a Conv weight: C_out, kh, kw), then along ``axis``.
    """
    return weight.movedim(axis, -1).reshape(-1, m)


def nm_ungroup(groups: torch.Tensor, shape: tuple[int, ...], axis: int = GROUP_AXIS) -> torch.Tensor:
    """Inverse of :func:`nm_groups`: a contiguous tensor of ``shape`` from its (n_groups, m) rows."""
    moved = [d for i, d in enumerate(shape) if i != axis] + [shape[axis]]
    return groups.reshape(moved).movedim(-1, axis).contiguous()


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


def count_violations(weight: torch.Tensor, pattern: Any) -> int:
    """Number of N:M groups with more than N nonzeros (or 1 if an unstructured target is missed).

    Raises:
        ValueError: the weight is not 2-D/4-D, or its input axis is not divisible by M.
    """
    pattern = parse_pattern(pattern)
    if weight.dim() not in (2, 4):
        raise ValueError(f"expected a Linear (2-D) or Conv2d (4-D) weight, got shape {tuple(weight.shape)}")
    nonzero = weight.detach() != 0
    if not isinstance(pattern, NMPattern):
        zeros = weight.numel() - int(nonzero.sum())
        return int(zeros < round(pattern.sparsity * weight.numel()))
    in_axis = weight.shape[1]
    if in_axis % pattern.m:
        raise ValueError(f"input axis of weight {tuple(weight.shape)} ({in_axis}) is not divisible by M={pattern.m}")
    return int((nm_groups(nonzero, pattern.m).sum(dim=1) > pattern.n).sum())


def _weights_to_check(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    meta = getattr(module, "meta", None)
    if isinstance(meta, dict) and REPORT_KEY in meta:
        return [(r.weight_name, fetch_tensor(module, r.weight_name)) for r in meta[REPORT_KEY].layers if r.pruned]
    return [
        (f"{name}.weight", m.weight) for name, m in module.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    ]


def check_pattern(weight_or_model: torch.Tensor | nn.Module, pattern: Any) -> PatternCheck:
    """Check that a weight, or every pruned weight of a model, follows ``pattern``.

    For a GraphModule from :func:`sgfx.sparsify`, the layers its report lists as pruned are checked; for any
    other module, every Conv2d/Linear whose shape can hold the pattern.

    Args:
        weight_or_model: a 2-D/4-D weight tensor, or a module.
        pattern: ``"N:M"`` or an unstructured fraction.

    Returns:
        A :class:`PatternCheck`, truthy when all checked weights comply.

    Example:
        >>> assert sgfx.check_pattern(gm, "2:4")  # doctest: +SKIP
    """
    parsed = parse_pattern(pattern)
    result = PatternCheck(str(parsed))
    if isinstance(weight_or_model, torch.Tensor):
        items = [("weight", weight_or_model)]
    elif isinstance(weight_or_model, nn.Module):
        items = _weights_to_check(weight_or_model)
    else:
        raise TypeError(f"expected a tensor or nn.Module, got {type(weight_or_model).__name__}")
    for name, weight in items:
        try:
            bad = count_violations(weight, parsed)
        except ValueError:
            if isinstance(weight_or_model, torch.Tensor):
                raise
            result.ineligible.append(name)
            continue
        result.checked.append(name)
        if bad:
            result.violations[name] = bad
    return result
