"""BatchNorm re-estimation after pruning, done inside the sequential sweep.

Why: pruning a conv shifts the mean and variance of its outputs, and a BatchNorm after it keeps normalising with
the dense model's running statistics. Much of one-shot pruning's accuracy loss on BN networks is this drift, not the
weights themselves (docs/RESULTS.md measures how much on the seed models).

How: when the sweep reaches a BatchNorm whose input depends on a pruned layer, its running mean and (unbiased)
variance are replaced by the exact statistics of that input over *all* calibration batches (per-batch passes
combined in float64; no momentum, no per-batch averaging), before the node runs. Layers after it are then
calibrated on the corrected activations. BatchNorms upstream of every pruned layer keep the model's own statistics.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.fx
from torch import nn
from torch.fx.node import Node

from ..runtime import distributed
from ..runtime.timing import phase

__all__ = ["batchnorms_after_pruned", "reestimate_batchnorm"]


def batchnorms_after_pruned(gm: torch.fx.GraphModule, pruned: set[Node]) -> dict[Node, nn.Module]:
    """BatchNorm call_module nodes with a pruned node among their ancestors, in topological order."""
    affected: set[Node] = set()
    found: dict[Node, nn.Module] = {}
    calls = Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_module")
    for node in gm.graph.nodes:
        if node in pruned or any(arg in affected for arg in node.all_input_nodes):
            affected.add(node)
        if node.op == "call_module" and node in affected and node not in pruned:
            module = gm.get_submodule(node.target)
            shared = calls[str(node.target)] > 1  # one module normalising several feature levels: keep its statistics
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats and not shared:
                found[node] = module
    return found


@torch.no_grad()
@phase("batchnorm re-estimation")
def reestimate_batchnorm(bn: nn.Module, inputs: list[torch.Tensor]) -> None:
    """Set ``bn``'s running mean / unbiased variance to the statistics of ``inputs`` (per channel, dim 1).

    Each batch's mean and biased variance come from the training-mode batch-norm kernel (faster than ``var_mean``
    over dims (0, 2, 3) on CPU, docs/RESULTS.md; it returns ``1/sqrt(var)`` with eps 0, a float32 rounding away from
    ``var``); batches are combined exactly in float64 (Chan et al.'s pairwise formula), so the result equals the
    statistics of all inputs pooled. Across processes the ranks' statistics are pooled the same way.
    """
    count, mean, m2 = 0, None, None
    for x in inputs:
        n = x.numel() // x.shape[1]
        _, mean_b, inv_std = torch.ops.aten.native_batch_norm(x.float(), None, None, None, None, True, 0.0, 0.0)
        inv_std = inv_std.double()
        var_b = torch.where(inv_std > 0, inv_std.pow(-2), 0.0)  # the kernel reports a constant channel as 0
        count, mean, m2 = _combine(count, mean, m2, n, mean_b.double(), var_b * n)
    if distributed.is_active():  # every rank's (count, mean, M2), combined in rank order: the same on all ranks
        channels = bn.running_mean.shape[0]
        local = torch.zeros(1 + 2 * channels, dtype=torch.float64, device=bn.running_mean.device)
        if mean is not None:
            local[0], local[1:1 + channels], local[1 + channels:] = count, mean, m2
        count, mean, m2 = 0, None, None
        for part in distributed.all_gather(local):
            if part[0] > 0:
                count, mean, m2 = _combine(count, mean, m2, int(part[0]), part[1:1 + channels],
                                           part[1 + channels:])
    if count < 2:
        return
    bn.running_mean.copy_(mean.to(bn.running_mean.dtype))
    bn.running_var.copy_((m2 / (count - 1)).to(bn.running_var.dtype))


def _combine(count: int, mean, m2, n: int, mean_b: torch.Tensor, m2_b: torch.Tensor):
    """Chan et al.'s pairwise update: the (count, mean, M2) of two sets pooled."""
    if mean is None:
        return n, mean_b, m2_b
    total = count + n
    shift = mean_b.to(mean.device) - mean
    return total, mean + shift * (n / total), m2 + m2_b.to(mean.device) + shift.square() * (count * n / total)
