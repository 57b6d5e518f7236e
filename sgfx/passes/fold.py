"""Fold weight transforms: replace conv subclasses that transform their weight at run time by plain convs.

Why: a weight-standardised conv (NFNets' ``ScaledStdConv2d``) computes the weight it multiplies by inside
``forward``; pruning its stored parameter would not give a sparse product. For inference the transformed weight
is a constant, so a plain ``nn.Conv*d`` holding it computes the same function and can be pruned. Each candidate is
checked on its recorded input from one calibration batch (:func:`sgfx.layers.fold_weight_transforms`); one whose
forward does more than one conv is left as it is, and the report says so.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

from ..layers import fold_weight_transforms as fold_modules, has_own_forward
from ..report import SparsityReport
from ..runtime.calibration import placeholder_values

__all__ = ["fold_weight_transforms"]


def _module_inputs(gm: torch.fx.GraphModule, batch: Any, wanted) -> dict[str, torch.Tensor]:
    """The first input of each module ``wanted(module)`` selects, from one run of ``gm`` on ``batch``."""
    inputs, handles = {}, []
    for name, module in gm.named_modules():
        if name and wanted(module):
            handles.append(module.register_forward_pre_hook(
                lambda m, args, name=name: inputs.setdefault(name, args[0])))
    try:
        with torch.no_grad():
            gm(*placeholder_values(gm.graph, batch))
    finally:
        for handle in handles:
            handle.remove()
    return inputs


def fold_weight_transforms(gm: torch.fx.GraphModule, batch: Any,
                           report: SparsityReport | None = None) -> torch.fx.GraphModule:
    """Fold every conv subclass of ``gm`` with its own ``forward`` that transforms its weight into a plain conv, in
    place, checked on ``batch`` (one calibration batch as the graph takes it); the folded names go to
    ``report.folded``. Returns ``gm``."""
    folded = fold_modules(gm, _module_inputs(gm, batch, has_own_forward))
    if report is not None:
        report.folded += folded
    return gm
