"""Per-layer sparsity under a global budget: sensitivity curves, a dynamic program, and 2:4-or-dense choices.

Why: uniform sparsity gives every layer the same fraction, yet a few layers cost most of the accuracy at high
sparsity (OBC's SPDY; OWL for LLMs). This pass measures, before pruning, how much each layer's output changes at a
grid of candidate levels, and picks levels that meet the global budget (in weights or FLOPs) exactly while
keeping the most signal through the network: a layer whose relative reconstruction error is
``E = ‖WX − ŴX‖² / ‖WX‖²`` keeps a fraction ``1 − E`` of its output's energy clean, a chain of layers about
``Π (1 − E_l)``, so the allocation minimises ``Σ −log(1 − E_l)`` (≈ ``Σ E_l`` for small errors; it only differs
where a layer's error nears 1, which the raw sum would treat as bounded). The two objectives were not compared by
measurement.

- **Sensitivity**: one dense pass of the calibration data (:class:`~sgfx.engine.sweep.SequentialPruner`
  with a callback that measures and changes nothing). Each layer's Hessian is factored once and the pruning method
  is run at every candidate level on at most ``_ROWS`` evenly spaced output rows (rows are solved independently, so
  the error of those rows is exact): a fraction of one uniform run's solve time.
- **Allocation** (unstructured): a dynamic program over the layers' candidate levels (the uniform level among them,
  so the chosen allocation's estimated error never exceeds uniform's), on a cost grid of ``_UNITS`` steps, then an
  exact fill: weights are moved between layers along their error curves until the pruned total is exactly the
  budget (to the weight, or to one weight's FLOPs).
- **Mixed N:M / dense** (``budget``): a knapsack chooses the layers left dense, maximising the error they avoid,
  such that the N:M layers cover at least ``budget`` of the prunable weights (or FLOPs).
- **Global magnitude** (``method="magnitude"``): one threshold on |w| across all layers, the usual baseline.
"""

from __future__ import annotations

import bisect
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch.fx.node import Node
from torch.fx.passes.shape_prop import ShapeProp

from ..runtime.calibration import placeholder_values
from ..config import NMPattern, Pattern, SparsifyConfig, Unstructured
from ..layers import HessianAccumulator, PrunableLayer
from ..obs import error_terms, magnitude_prune, sparsegpt_error_curve, wanda_prune
from .sweep import SequentialPruner

__all__ = ["LayerCost", "Sensitivity", "layer_costs", "measure_sensitivity", "allocate", "keep_dense",
           "global_magnitude_levels", "candidate_levels"]

logger = logging.getLogger(__name__)

_ROWS = 128  # output rows per layer the sensitivity solves use
_UNITS = 4000  # cost grid of the dynamic programs
_GRID = (0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98)  # unstructured candidate levels (0 = dense is added)
MAX_LEVEL = 0.98  # no layer is pruned beyond this by an allocation


@dataclass
class LayerCost:
    weights: int  # prunable weights
    macs: int  # multiply-adds per image (weights x output positions)

    def per_weight(self, target: str) -> float:
        return 1.0 if target == "weights" else self.macs / self.weights


def signal_loss(error: float) -> float:
    """``−log(1 − E)``: the cost of a layer's relative error in the allocation objective (E is clamped below 1)."""
    return -math.log1p(-min(max(error, 0.0), 1.0 - 1e-6))


@dataclass
class Sensitivity:
    """A layer's cost at each candidate level (``levels[0] == 0``, ``errors[0] == 0``): :func:`signal_loss` of
    its measured relative reconstruction error."""

    levels: tuple[float, ...]
    errors: tuple[float, ...]
    damping_retries: int = 0

    def error_at(self, level: float) -> float:
        """Piecewise-linear interpolation of the curve (levels beyond the grid take the last slope)."""
        i = min(max(bisect.bisect_right(self.levels, level) - 1, 0), len(self.levels) - 2)
        lo, hi = self.levels[i], self.levels[i + 1]
        return self.errors[i] + (self.errors[i + 1] - self.errors[i]) * (level - lo) / (hi - lo)

    def slope_at(self, level: float, upward: bool) -> float:
        """d error / d level just above (``upward``) or just below ``level``."""
        i = bisect.bisect_right(self.levels, level) - 1 if upward else bisect.bisect_left(self.levels, level) - 1
        i = min(max(i, 0), len(self.levels) - 2)
        return (self.errors[i + 1] - self.errors[i]) / (self.levels[i + 1] - self.levels[i])


def candidate_levels(fraction: float) -> tuple[float, ...]:
    """The unstructured levels each layer's curve is measured at: 0, the grid, and the uniform level itself."""
    return tuple(sorted({0.0, *_GRID, round(fraction, 6)}))


def layer_costs(gm: torch.fx.GraphModule, batch: Any,
                layers: dict[Node, PrunableLayer]) -> dict[str, LayerCost]:
    """Weights and multiply-adds per image of each layer, from the shapes of one image run through the graph."""
    one = batch[:1] if isinstance(batch, torch.Tensor) else batch  # one image (a recorded call: all of it)
    ShapeProp(gm).propagate(*placeholder_values(gm.graph, one))
    costs = {}
    for node, layer in layers.items():
        shape = node.meta["tensor_meta"].shape  # the layer's output for one image
        channels = shape[layer.channel_dim]
        positions = math.prod(shape) // channels
        costs[layer.name] = LayerCost(layer.weight.numel(), layer.weight.numel() * positions)
    return costs


class _Measurer:
    """The SequentialPruner callback of the sensitivity pass: errors at each pattern, weights untouched."""

    def __init__(self, config: SparsifyConfig, patterns: list[Pattern], device):
        self.config, self.patterns, self.device = config, patterns, device
        self.curves: dict[str, tuple[list[float], int]] = {}

    def __call__(self, layer: PrunableLayer, inputs: list[torch.Tensor], dense_inputs=None) -> None:
        device = self.device or layer.weight.device
        accumulator = HessianAccumulator(layer, device)
        for x in inputs:
            accumulator.add(x)
        hessians = accumulator.finalize()
        num = [0.0] * len(self.patterns)
        den = [0.0] * len(self.patterns)
        retries = 0
        for matrix, hessian in zip(layer.solve_matrices(), hessians):
            matrix = matrix.to(device)
            rows = torch.linspace(0, matrix.shape[0] - 1, min(_ROWS, matrix.shape[0])).round().long().unique()
            terms, group_retries = self._terms(matrix[rows.to(device)], hessian)
            for i, (group_num, group_den) in enumerate(terms):  # summed over groups, then divided
                num[i] += group_num
                den[i] += group_den
            retries = max(retries, group_retries)
        self.curves[layer.name] = ([n / d if d > 0 else 0.0 for n, d in zip(num, den)], retries)

    def _terms(self, sample: torch.Tensor, hessian: torch.Tensor) -> tuple[list[tuple[float, float]], int]:
        """Error terms of the rows ``sample`` at each pattern, and the damping retries the solve needed."""
        config = self.config
        if config.method == "sparsegpt":
            return sparsegpt_error_curve(sample, hessian, self.patterns, config.blocksize, config.percdamp,
                                         config.max_damping_retries)
        if config.method == "wanda":
            return [error_terms(sample, wanda_prune(sample, hessian.diagonal(), p).weight, hessian)
                    for p in self.patterns], 0
        return [error_terms(sample, magnitude_prune(sample, p).weight, hessian) for p in self.patterns], 0


def measure_sensitivity(gm: torch.fx.GraphModule, batches: list[torch.Tensor], layers: dict[Node, PrunableLayer],
                        config: SparsifyConfig, patterns: list[Pattern]) -> dict[str, tuple[list[float], int]]:
    """Each layer's relative reconstruction error at each of ``patterns`` on the dense model's inputs
    (``{name: (errors, damping retries)}``); ``gm`` is run but not modified."""
    measurer = _Measurer(config, patterns, config.device)
    with torch.no_grad():
        SequentialPruner(gm, layers, measurer).run_batches(batches)
    return measurer.curves


def _dp(options: list[list[tuple[int, float]]], pick_min: bool,
        capacity: int) -> tuple[list[list[int]], list[float]]:
    """Exact-cost dynamic program: ``best[c]`` is the min (or max) total value over one option per item whose
    integer costs sum to exactly c <= capacity; returns (per item, the option chosen at each total; best)."""
    worst = math.inf if pick_min else -math.inf
    best = [worst] * (capacity + 1)
    best[0] = 0.0
    choices = []
    for item in options:
        new, choice = [worst] * (capacity + 1), [-1] * (capacity + 1)
        for c, value in enumerate(best):
            if value == worst:
                continue
            for k, (cost, gain) in enumerate(item):
                total = c + cost
                if total <= capacity and ((value + gain < new[total]) if pick_min else (value + gain > new[total])):
                    new[total], choice[total] = value + gain, k
        best = new
        choices.append(choice)
    return choices, best


def _backtrack(options: list[list[tuple[int, float]]], choices: list[list[int]], end: int) -> list[int]:
    picks = []
    for item, choice in zip(reversed(options), reversed(choices)):
        k = choice[end]
        picks.append(k)
        end -= item[k][0]
    return picks[::-1]


def allocate(curves: dict[str, Sensitivity], costs: dict[str, LayerCost], fraction: float,
             target: str = "weights") -> dict[str, float]:
    """Per-layer unstructured levels whose pruned cost is exactly ``fraction`` of the total (to one weight),
    minimising the summed relative errors. Levels are ``count / weights``, so each layer prunes an exact count."""
    names = list(curves)
    unit_cost = {n: costs[n].per_weight(target) for n in names}
    total = sum(costs[n].weights * unit_cost[n] for n in names)
    goal, unit = fraction * total, total / _UNITS
    if target == "weights":
        goal = round(goal)  # an exact number of weights
    options = [[(round(level * costs[n].weights * unit_cost[n] / unit), error)
                for level, error in zip(curves[n].levels, curves[n].errors) if level <= MAX_LEVEL] for n in names]
    choices, best = _dp(options, pick_min=True, capacity=_UNITS)
    centre, window = round(goal / unit), len(names)  # rounding each layer's cost moves the total by < 1/2 unit
    reachable = [c for c in range(max(0, centre - window), min(_UNITS, centre + window) + 1) if best[c] < math.inf]
    if reachable:  # the grid holds the uniform level, so this is the usual case
        end = min(reachable, key=lambda c: (best[c], abs(c - centre)))
    else:  # the closest total the grid reaches; the exact fill below moves the rest
        end = min((c for c in range(_UNITS + 1) if best[c] < math.inf), key=lambda c: (abs(c - centre), best[c]))
    picks = _backtrack(options, choices, end)
    counts = {n: round([lv for lv in curves[n].levels if lv <= MAX_LEVEL][k] * costs[n].weights)
              for n, k in zip(names, picks)}
    _fill_exactly(counts, curves, costs, unit_cost, goal)
    _exchange(counts, curves, costs, unit_cost)
    _fill_exactly(counts, curves, costs, unit_cost, goal)
    return {n: counts[n] / costs[n].weights for n in names}


def _exchange(counts: dict[str, int], curves: dict[str, Sensitivity], costs: dict[str, LayerCost],
              unit_cost: dict[str, float]) -> None:
    """Trade pruned cost between layers while it lowers the summed error: un-prune where that saves the most error
    per unit of cost, prune where it adds the least, one linear segment of the curves at a time. Refines the
    grid's solution between its levels (the curves are piecewise linear, so each step is exact)."""
    per_cost = {n: costs[n].weights * unit_cost[n] for n in counts}  # cost of pruning the whole layer

    def level(n: str) -> float:
        return counts[n] / costs[n].weights

    for _ in range(20 * len(counts)):
        up = [n for n in counts if level(n) < MAX_LEVEL]
        down = [n for n in counts if counts[n] > 0]
        if not up or not down:
            return
        taker = min(up, key=lambda n: curves[n].slope_at(level(n), True) / per_cost[n])
        giver = max(down, key=lambda n: curves[n].slope_at(level(n), False) / per_cost[n])
        gain = curves[giver].slope_at(level(giver), False) / per_cost[giver]
        loss = curves[taker].slope_at(level(taker), True) / per_cost[taker]
        if taker == giver or gain <= loss * (1 + 1e-9):
            return
        # the cost that can move before either curve reaches its next level
        above = min([lv for lv in curves[taker].levels if lv > level(taker) + 1e-12] + [MAX_LEVEL])
        below = max([lv for lv in curves[giver].levels if lv < level(giver) - 1e-12] + [0.0])
        cost = min((above - level(taker)) * per_cost[taker], (level(giver) - below) * per_cost[giver])
        taken = min(math.floor(cost / unit_cost[taker]), math.floor(MAX_LEVEL * costs[taker].weights) - counts[taker])
        given = min(round(taken * unit_cost[taker] / unit_cost[giver]), counts[giver])
        if taken <= 0 or given <= 0:
            return
        counts[taker] += taken
        counts[giver] -= given


def _fill_exactly(counts: dict[str, int], curves: dict[str, Sensitivity], costs: dict[str, LayerCost],
                  unit_cost: dict[str, float], goal: float) -> None:
    """Move pruned weights until the pruned cost is within half a weight's cost of ``goal``: add where the error
    grows least per unit of cost, remove where it falls most, never past the next level of a curve (the marginal
    cost holds only within a segment). Each move shrinks the gap."""
    for _ in range(10 * len(counts) * (len(next(iter(curves.values())).levels) + 2)):
        gap = goal - sum(counts[n] * unit_cost[n] for n in counts)
        upward = gap > 0
        movable = [n for n in counts if unit_cost[n] < 2 * abs(gap)
                   and (counts[n] < math.floor(MAX_LEVEL * costs[n].weights) if upward else counts[n] > 0)]
        if not movable:
            return

        def marginal(n: str) -> float:
            return curves[n].slope_at(counts[n] / costs[n].weights, upward) / (costs[n].weights * unit_cost[n])

        name = min(movable, key=marginal) if upward else max(movable, key=marginal)
        move = max(1, min(_segment_room(counts[name], costs[name].weights, curves[name].levels, upward),
                          round(abs(gap) / unit_cost[name])))
        counts[name] += move if upward else -move


def _segment_room(count: int, weights: int, levels: tuple[float, ...], upward: bool) -> int:
    """Weights a layer can gain (or lose) before its level reaches the next grid level (or ``MAX_LEVEL``/0)."""
    level = count / weights
    if upward:
        above = min([lv for lv in levels if lv > level + 1e-12 and lv <= MAX_LEVEL] + [MAX_LEVEL])
        return max(0, math.floor(above * weights) - count)
    below = max([lv for lv in levels if lv < level - 1e-12] + [0.0])
    return max(0, count - math.ceil(below * weights))


def keep_dense(errors: dict[str, float], costs: dict[str, LayerCost], budget: float,
               target: str = "weights") -> set[str]:
    """Layers to leave dense so that the others cover at least ``budget`` of the cost, keeping the most error."""
    names = list(errors)
    cost = {n: costs[n].weights * costs[n].per_weight(target) for n in names}
    total = sum(cost.values())
    unit = total / _UNITS
    capacity = math.floor((1.0 - budget) * total / unit + 1e-9)
    options = [[(0, 0.0), (math.ceil(cost[n] / unit - 1e-9), errors[n])] for n in names]  # costs rounded up
    choices, best = _dp(options, pick_min=False, capacity=capacity)
    end = max(range(capacity + 1), key=lambda c: best[c])
    return {n for n, k in zip(names, _backtrack(options, choices, end)) if k == 1}


def global_magnitude_levels(layers: dict[str, torch.Tensor], costs: dict[str, LayerCost], fraction: float,
                            target: str = "weights") -> dict[str, float]:
    """One |w| threshold across all layers (by ascending |w|, until ``fraction`` of the cost is pruned); a layer
    that would pass ``MAX_LEVEL`` is capped there and the threshold moves on among the others."""
    names = list(layers)
    magnitudes = torch.cat([layers[n].detach().abs().flatten().float().cpu() for n in names])
    owner = torch.cat([torch.full((layers[n].numel(),), i) for i, n in enumerate(names)])
    unit = torch.tensor([costs[n].per_weight(target) for n in names], dtype=torch.float64)
    sizes = torch.tensor([layers[n].numel() for n in names])
    caps = torch.floor(MAX_LEVEL * sizes).long()
    goal = fraction * float((unit * sizes).sum())
    order = owner[torch.argsort(magnitudes, stable=True)]  # layer of each weight, by ascending |w|
    capped = torch.zeros(len(names), dtype=torch.bool)
    for _ in range(len(names)):
        pool = order[~capped[order]]
        remaining = goal - float((unit * caps)[capped].sum())
        count = int(torch.searchsorted(torch.cumsum(unit[pool], 0), remaining, right=True))
        pruned = torch.bincount(pool[:count], minlength=len(names))
        over = (pruned > caps) & ~capped
        if not over.any():
            break
        capped |= over
    pruned = torch.where(capped, caps, pruned)
    return {n: int(pruned[i]) / layers[n].numel() for i, n in enumerate(names)}


def plan(gm: torch.fx.GraphModule, batches: list[torch.Tensor], layers: dict[Node, PrunableLayer],
         config: SparsifyConfig, costs: dict[str, LayerCost] | None = None
         ) -> tuple[dict[str, Pattern], dict[str, str], dict]:
    """(pattern per layer name, reason per layer kept dense, a summary for the report) for ``config``'s
    allocation or budget. Runs the sensitivity pass when the method needs Hessians. ``costs`` (from
    :func:`layer_costs`, a superset of ``layers`` allowed) saves measuring them again."""
    started = time.perf_counter()
    by_name = {layer.name: layer for layer in layers.values()}
    if costs is None or not set(by_name) <= set(costs):
        costs = layer_costs(gm, batches[0], layers)
    costs = {name: costs[name] for name in by_name}
    summary = {"target": config.target, "levels": {}}
    patterns: dict[str, Pattern] = {}
    dense: dict[str, str] = {}
    curves = {}
    if isinstance(config.sparsity, NMPattern):
        curves = measure_sensitivity(gm, batches, layers, config, [config.sparsity])
        errors = {n: curves[n][0][0] for n in by_name}
        for name in keep_dense(errors, costs, config.budget, config.target):
            dense[name] = (f"kept dense by budget={config.budget:g} ({config.target}): "
                           f"{config.sparsity} error {errors[name]:.2e}")
        patterns = {n: config.sparsity for n in by_name if n not in dense}
        summary.update(kind="budget", budget=config.budget, errors=errors)
    else:
        fraction = config.sparsity.sparsity
        if config.method == "magnitude":
            levels = global_magnitude_levels({n: layer.weight for n, layer in by_name.items()}, costs, fraction,
                                             config.target)
        else:
            grid = candidate_levels(fraction)
            curves = measure_sensitivity(gm, batches, layers, config, [Unstructured(lv) for lv in grid[1:]])
            sensitivities = {n: Sensitivity(grid, (0.0, *map(signal_loss, curves[n][0])), curves[n][1])
                             for n in by_name}
            levels = allocate(sensitivities, costs, fraction, config.target)
            summary["errors"] = {n: -math.expm1(-sensitivities[n].error_at(levels[n])) for n in by_name}
        for name, level in levels.items():
            if level <= 0:
                dense[name] = "allocated 0% (kept dense by allocation='global')"
            else:
                patterns[name] = Unstructured(level)
        summary.update(kind="global", fraction=fraction, levels=levels)
    cost = {n: costs[n].weights * costs[n].per_weight(config.target) for n in by_name}
    if summary["kind"] == "budget":  # the share of the prunable cost that is N:M
        achieved = sum(cost[n] for n in patterns) / sum(cost.values())
    else:  # the share of the prunable cost that is pruned
        achieved = sum(cost[n] * patterns[n].sparsity for n in patterns) / sum(cost.values())
    summary.update(achieved=achieved, search_s=time.perf_counter() - started,
                   damping_retries={n: curve[1] for n, curve in curves.items() if curve[1]})
    logger.info("allocation (%s): %.4f of the %s pruned, search %.1f s", summary["kind"], summary["achieved"],
                config.target, summary["search_s"])
    return patterns, dense, summary
