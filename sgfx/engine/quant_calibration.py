"""INT8 activation scales, calibrated inside the sequential sweep.

Why in the sweep: a later layer must be calibrated on what the INT8 engine will feed it, the outputs of the layers
before it *pruned and quantized*. When the sweep reaches a quantizer node (:mod:`sgfx.passes.quantizers`), its
scale is set from the values waiting at its input over all calibration batches (combined across processes), and
only then does the node run, so every node after it, the layer it feeds included, sees quantized values. A
quantizer already on another's grid takes that one's scale.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch
import torch.fx
from torch.fx.node import Node

from ..passes.quantizers import is_quantizer
from ..quantize import activation_scale
from ..report import SparsityReport
from ..runtime import distributed

__all__ = ["quantizer_hooks"]


def _global_max(value: float) -> float:
    if not distributed.is_active():
        return value
    return float(max(t.item() for t in distributed.all_gather(torch.tensor([value], dtype=torch.float64))))


def _calibrate(gm: torch.fx.GraphModule, entry: dict, method: str, values: Sequence[torch.Tensor]) -> None:
    scale = getattr(gm, entry["scale_buffer"])
    if entry["source"] is not None:
        scale.copy_(getattr(gm, entry["source"]))
        entry["method"] = "shared"
    else:
        try:
            scale.copy_(activation_scale(values, method, reduce_max=_global_max,
                                         reduce_sum=distributed.all_reduce_sum))
        except ValueError as exc:
            where = f"output of {entry['producer']}" if entry["producer"] else f"input of {', '.join(entry['readers'])}"
            raise ValueError(f"calibrating the INT8 scale of the {where}: {exc}") from None
        entry["method"] = method
    entry["scale"] = float(scale)


def quantizer_hooks(gm: torch.fx.GraphModule, report: SparsityReport,
                    method: str) -> dict[Node, Callable[[Sequence[torch.Tensor]], None]]:
    """``{quantizer node: hook(input values)}`` for the sweep's ``before_node``: each sets its scale buffer and its
    entry of ``report.quantizers`` (inserted by :func:`sgfx.passes.quantizers.insert_quantizers`)."""
    entries = {entry["scale_buffer"]: entry for entry in report.quantizers}
    return {node: functools.partial(_calibrate, gm, entries[node.args[1].target], method)
            for node in gm.graph.nodes if is_quantizer(node)}
