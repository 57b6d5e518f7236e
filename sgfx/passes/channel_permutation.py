"""Input-channel permutation for N:M sparsity (as NVIDIA's ASP does), applied before calibration.

Why: an N:M pattern keeps N of every M *consecutive* input channels at each kernel position. If several important
channels sit in the same group, every row of the layer must drop some of them. Reordering a layer's input channels
so that important channels are spread over the groups keeps more saliency under the same pattern. The reordering is
free at inference if the layer that produces those channels writes them in the new order: permute the producer's
output channels (weight rows, bias), every per-channel op in between (BatchNorm), and the input channels of every
consumer. The network computes exactly the same function before pruning.

Where it applies (found through the FX graph): a ``Conv2d`` (``groups=1``) or ``Linear`` module whose output
reaches, only through per-channel ops (BatchNorm, ReLU-like activations, pooling, dropout), only ``Conv2d``
(``groups=1``) resp. ``Linear`` modules as their input. Residual additions, concatenations, flatten and
anything else end the search for that producer: those channels keep their order.

How the order is chosen: each consumer weight gives a saliency per (row, channel): ``(|W| · ‖x_c‖)²``, with
``‖x_c‖`` the channel's norm on the (dense) calibration inputs — the OBS error of dropping that weight when the
inputs are uncorrelated. Channels are first dealt to the groups in a snake order of their total saliency, then a
greedy local search swaps channels between random pairs of groups while the saliency kept by the N:M pattern
(summed over all rows of all consumers) grows.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.node import Node

from ..config import NMPattern
from ..layers import is_plain_conv
from ..report import SparsityReport
from ..runtime import distributed
from ..runtime.calibration import node_failure, placeholder_values

__all__ = ["PermutationGroup", "find_permutation_groups", "search_permutation", "kept_saliency",
           "apply_permutation", "permute_channel_groups", "permute_channels", "channel_square_sums", "group_saliency",
           "apply_order",
           "report_groups"]

logger = logging.getLogger(__name__)

_SPATIAL_CHANNELWISE_MODULES = (  # per-channel only on (B, C, ...) tensors: conv producers
    nn.modules.batchnorm._BatchNorm, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
)
_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
    nn.Hardswish, nn.Hardsigmoid, nn.ELU, nn.Dropout, nn.Identity,
)
_SPATIAL_CHANNELWISE_FUNCTIONS = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
_ELEMENTWISE_FUNCTIONS = {
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, torch.sigmoid, torch.tanh, F.hardswish, F.elu,
    F.dropout,
}
_ELEMENTWISE_METHODS = {"relu", "sigmoid", "tanh", "contiguous"}


@dataclass
class PermutationGroup:
    """A producer layer, the per-channel nodes after it, and the layers consuming its channels."""

    producer: Node
    channelwise: list[Node] = field(default_factory=list)
    consumers: list[Node] = field(default_factory=list)
    permutation: torch.Tensor | None = None  # new channel order: new channel i is old channel permutation[i]
    kept_before: float = 0.0  # saliency kept by the N:M pattern in the original order
    kept_after: float = 0.0

    @property
    def name(self) -> str:
        return str(self.producer.target)


def _module(gm: torch.fx.GraphModule, node: Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _layer_kind(module: nn.Module | None) -> str | None:
    if isinstance(module, nn.Conv2d) and is_plain_conv(module) and module.groups == 1:
        return "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    return None


def _is_channelwise(gm: torch.fx.GraphModule, node: Node, source: Node, kind: str) -> bool:
    """A node that maps each channel to the same channel, with ``source`` as its only tensor input. Pooling and
    BatchNorm qualify only after convolutions (channels in dim 1); after a Linear only elementwise ops do."""
    if node.all_input_nodes != [source] or node.args[:1] != (source,):
        return False
    spatial = kind == "conv"
    if node.op == "call_module":
        module = _module(gm, node)
        return isinstance(module, _ELEMENTWISE_MODULES) or (
            spatial and isinstance(module, _SPATIAL_CHANNELWISE_MODULES))
    if node.op == "call_function":
        return node.target in _ELEMENTWISE_FUNCTIONS or (spatial and node.target in _SPATIAL_CHANNELWISE_FUNCTIONS)
    if node.op == "call_method":
        return node.target in _ELEMENTWISE_METHODS
    return False


def find_permutation_groups(gm: torch.fx.GraphModule, pruned: set[Node], pattern: NMPattern) -> list[PermutationGroup]:
    """Producers whose channels may be reordered: every consumer is in ``pruned``, and the channel count is a
    multiple of ``pattern.m`` (more than one group)."""
    groups = []
    calls = Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_module")
    for node in gm.graph.nodes:
        kind = _layer_kind(_module(gm, node))
        if kind is None or calls[str(node.target)] > 1:  # a module called twice: its other calls would change
            continue
        group, frontier, valid = PermutationGroup(node), [node], True
        while frontier and valid:
            source = frontier.pop()
            for user in source.users:
                user_kind = _layer_kind(_module(gm, user))
                if user_kind == kind and user.args[:1] == (source,) and len(user.all_input_nodes) == 1:
                    group.consumers.append(user)
                elif _is_channelwise(gm, user, source, kind):
                    group.channelwise.append(user)
                    frontier.append(user)
                else:
                    valid = False
                    break
        if not valid or not group.consumers or any(c not in pruned or calls[str(c.target)] > 1
                                                   for c in group.consumers):
            continue
        channels = _module(gm, node).weight.shape[0]
        if channels % pattern.m or channels <= pattern.m:
            continue
        groups.append(group)
    return groups


def _saliency_rows(weight: torch.Tensor, channel_norms: torch.Tensor) -> torch.Tensor:
    """(rows, C) saliency (|W|·‖x_c‖)² of a consumer weight, rows = out · kh · kw."""
    w = weight.detach().double()
    if w.dim() == 4:
        w = w.permute(0, 2, 3, 1).reshape(-1, w.shape[1])
    return (w.abs() * channel_norms.double()).square()


def kept_saliency(saliency: torch.Tensor, order: torch.Tensor, pattern: NMPattern) -> float:
    """Saliency kept when every row keeps its N largest of each M consecutive channels in ``order``."""
    grouped = saliency[:, order].view(saliency.shape[0], -1, pattern.m)
    return float(grouped.topk(pattern.n, dim=-1).values.sum(dtype=torch.float64))


def _snake_order(saliency: torch.Tensor, m: int) -> torch.Tensor:
    """Deal channels, most salient first, to the groups in a snake order: every group gets a mix of ranks."""
    channels = saliency.shape[1]
    ranked = saliency.sum(0).argsort(descending=True)
    groups = channels // m
    slots = torch.arange(channels)
    rounds, position = slots // groups, slots % groups
    group_of = torch.where(rounds % 2 == 0, position, groups - 1 - position)
    order = torch.empty(channels, dtype=torch.long)
    order[group_of * m + rounds] = ranked
    return order


def _drop_one(values: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For groups ``values`` (..., M): the kept sum S (top-N), and per slot k the kept sum of the group without
    slot k and the N-th largest value of that reduced group (the bar a newcomer must beat)."""
    ordered, index = values.sort(-1, descending=True)
    rank = index.argsort(-1)  # rank of each slot, 0 = largest
    kept = ordered[..., :n].sum(-1, keepdim=True)
    nth, next_ = ordered[..., n - 1:n], ordered[..., n:n + 1]
    in_top = rank < n
    kept_without = torch.where(in_top, kept - values + next_, kept)
    bar = torch.where(in_top, next_, nth)
    return kept.squeeze(-1), kept_without, bar


def _best_swaps(a: torch.Tensor, b: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For P pairs of groups ``a``, ``b`` (rows, P, M): the gain and slots (i, j) of the best swap a_i <-> b_j.

    Without sorting per candidate: the group ``a`` with a_i replaced by b_j keeps
    ``kept(a without a_i) + max(0, b_j - bar_i)``, so every swap costs a few elementwise operations.
    """
    kept_a, without_a, bar_a = _drop_one(a, n)  # (rows, P), (rows, P, M), (rows, P, M)
    kept_b, without_b, bar_b = _drop_one(b, n)
    base = ((without_a - kept_a.unsqueeze(-1)).sum(0).unsqueeze(-1)  # (P, i, 1)
            + (without_b - kept_b.unsqueeze(-1)).sum(0).unsqueeze(-2))  # (P, 1, j)
    gain_a = (b.unsqueeze(-2) - bar_a.unsqueeze(-1)).clamp_min(0).sum(0)  # (P, i, j): b_j enters a
    gain_b = (a.unsqueeze(-1) - bar_b.unsqueeze(-2)).clamp_min(0).sum(0)  # a_i enters b
    pairs, m = a.shape[1], a.shape[2]
    gain, flat = (base + gain_a + gain_b).view(pairs, -1).max(1)
    return gain, flat // m, flat % m


def search_permutation(saliency: torch.Tensor, pattern: NMPattern, rounds: int = 12, patience: int = 3,
                       max_elements: int = 2 ** 24, seed: int = 0) -> torch.Tensor:
    """A channel order that keeps at least as much N:M saliency as the identity.

    Args:
        saliency: (rows, C) nonnegative saliency, C a multiple of ``pattern.m``.
        pattern: the N:M pattern the order is chosen for.
        rounds: at most this many rounds of pairing all groups at random and applying each pair's best swap.
        patience: stop after this many rounds without improvement.
        max_elements: bound on the (rows, pairs, M, M) work tensors, by evaluating pairs in chunks.
        seed: seeds the random pairing.

    Returns:
        ``order`` (C,): new channel ``i`` is old channel ``order[i]``.
    """
    m, n = pattern.m, pattern.n
    channels = saliency.shape[1]
    groups = channels // m
    identity = torch.arange(channels)
    order = _snake_order(saliency, m)
    if kept_saliency(saliency, identity, pattern) > kept_saliency(saliency, order, pattern):
        order = identity.clone()
    saliency = saliency.float()  # the search compares sums; the caller scores the result in float64
    scale = float(saliency.sum()) or 1.0
    generator = torch.Generator().manual_seed(seed)
    chunk = max(1, max_elements // (saliency.shape[0] * m * m))
    stale = 0
    for _ in range(rounds):
        shuffled = torch.randperm(groups, generator=generator)
        first, second = shuffled[: groups // 2], shuffled[groups // 2: 2 * (groups // 2)]
        slots = order.view(groups, m)
        improved = False
        for start in range(0, len(first), chunk):
            g1, g2 = first[start:start + chunk], second[start:start + chunk]
            gain, i, j = _best_swaps(saliency[:, slots[g1]], saliency[:, slots[g2]], n)  # (rows, P, M) each
            take = gain > 1e-7 * scale  # above float32 noise
            if bool(take.any()):
                g1, g2, i, j = g1[take], g2[take], i[take], j[take]
                moved = slots[g1, i].clone()
                slots[g1, i] = slots[g2, j]
                slots[g2, j] = moved
                improved = True
        stale = 0 if improved else stale + 1
        if stale >= patience:
            break
    return order


def _permute_param(tensor: torch.Tensor | None, order: torch.Tensor, dim: int) -> None:
    if tensor is not None:
        tensor.data = tensor.data.index_select(dim, order.to(tensor.device)).contiguous()


@torch.no_grad()
def apply_permutation(gm: torch.fx.GraphModule, group: PermutationGroup, order: torch.Tensor) -> None:
    """Reorder the group's channels in place: producer rows and bias, per-channel parameters and buffers,
    consumer input channels. The function of ``gm`` is unchanged."""
    producer = _module(gm, group.producer)
    _permute_param(producer.weight, order, 0)
    _permute_param(producer.bias, order, 0)
    for node in group.channelwise:
        module = _module(gm, node)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            for tensor in (module.weight, module.bias, module.running_mean, module.running_var):
                _permute_param(tensor, order, 0)
    for node in group.consumers:
        _permute_param(_module(gm, node).weight, order, 1)
    group.permutation = order


def permute_channel_groups(gm: torch.fx.GraphModule, batches: list[torch.Tensor], pruned: set[Node],
                           pattern: NMPattern, seed: int = 0) -> list[PermutationGroup]:
    """Find every permutable producer, choose its order from the dense model's calibration activations and
    apply it to ``gm`` in place. Returns the groups (with kept saliency before and after) for the report."""
    groups = find_permutation_groups(gm, pruned, pattern)
    if not groups:
        return []
    wanted = {c for g in groups for c in g.consumers}
    sums: dict[Node, torch.Tensor] = {}

    class _Norms(torch.fx.Interpreter):
        def run_node(self, node: Node):
            if node in wanted:
                sums[node] = sums.get(node, 0) + channel_square_sums(gm, node, self.env[node.args[0]])
            try:
                return super().run_node(node)
            except Exception as exc:
                raise node_failure(node, batch, exc) from exc

    runner = _Norms(gm)
    runner.extra_traceback = False
    for batch in batches:
        runner.run(*placeholder_values(gm.graph, batch))
    for node in gm.graph.nodes:  # across processes: the saliencies of every rank's shard, in graph order
        if node in sums:
            distributed.all_reduce_sum(sums[node])
    # A group's consumers are permuted only along their input channels, by that group alone (producers come in
    # graph order), so scoring every group on the saliencies taken before any is applied equals scoring each just
    # before it is applied. Across processes each rank searches the groups it owns, then the orders are broadcast.
    saliencies = [group_saliency(gm, group, sums[group.consumers[0]]) for group in groups]
    orders = {index: search_permutation(saliency, pattern, seed=seed) for index, saliency in enumerate(saliencies)
              if distributed.owner(index) == distributed.rank()}
    for index, (group, saliency) in enumerate(zip(groups, saliencies)):
        apply_order(gm, group, saliency, orders.get(index), pattern, index)
    return groups  # parameters changed in place; the graph itself is untouched


def channel_square_sums(gm: torch.fx.GraphModule, consumer: Node, x: torch.Tensor) -> torch.Tensor:
    """Σ x_c² per input channel of ``consumer`` over one batch of its input ``x`` (float64, (C,))."""
    x = x.movedim(1, -1) if _layer_kind(_module(gm, consumer)) == "conv" else x
    return x.reshape(-1, x.shape[-1]).double().square().sum(0)


def group_saliency(gm: torch.fx.GraphModule, group: PermutationGroup, square_sums: torch.Tensor) -> torch.Tensor:
    """(rows of all consumers, C) saliency of ``group`` from the squared channel norms of its consumers' (dense)
    input, summed over every rank's batches (the consumers read the same tensor)."""
    return torch.cat([_saliency_rows(_module(gm, c).weight, square_sums.sqrt()) for c in group.consumers])


def apply_order(gm: torch.fx.GraphModule, group: PermutationGroup, saliency: torch.Tensor,
                order: torch.Tensor | None, pattern: NMPattern, index: int) -> torch.Tensor:
    """Apply the order the group's owner rank (``index`` round-robin) found (``order``; None on the other ranks,
    which receive it) to ``gm``, recording the kept saliency before and after; returns the order."""
    owner = distributed.owner(index)
    if order is None:
        order = torch.empty(saliency.shape[1], dtype=torch.long)
    order = distributed.broadcast_tensor(order, owner)
    group.kept_before = kept_saliency(saliency, torch.arange(saliency.shape[1]), pattern)
    group.kept_after = kept_saliency(saliency, order, pattern)
    apply_permutation(gm, group, order)
    logger.info("%s: %d channels permuted, N:M-kept saliency %.4f -> %.4f of total", group.name, len(order),
                group.kept_before / float(saliency.sum()), group.kept_after / float(saliency.sum()))
    return order


def report_groups(report: SparsityReport, groups: list[PermutationGroup]) -> None:
    """Add each group (producer, consumers, channels, kept saliency before and after) to ``report.permuted``."""
    report.permuted += [{"producer": g.name, "consumers": [str(c.target) for c in g.consumers],
                         "channels": len(g.permutation), "kept_before": g.kept_before, "kept_after": g.kept_after}
                        for g in groups]


def permute_channels(gm: torch.fx.GraphModule, batches: Sequence[Any], pruned: set[Node], pattern: NMPattern,
                     report: SparsityReport | None = None) -> torch.fx.GraphModule:
    """Reorder the channels between each prunable producer and its consumers (:func:`permute_channel_groups`) in
    place; ``report.permuted`` receives each group (producer, consumers, channels, kept saliency before and
    after). Returns ``gm``."""
    with torch.no_grad():
        groups = permute_channel_groups(gm, batches, pruned, pattern)
    if report is not None:
        report_groups(report, groups)
    return gm
