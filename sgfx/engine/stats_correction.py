"""Output-statistics (bias) correction for pruned layers, done inside the sequential sweep.

Why: OBS minimises each layer's squared output error, but a small systematic shift of a channel's mean survives
it and compounds through the layers after it. In a network with BatchNorm after every conv, re-estimating the
BatchNorm statistics removes that drift; a layer with no BatchNorm after it (all of VGG-16, every classifier
``Linear``) keeps it. Restoring each such layer's per-channel output mean (optionally also its standard deviation)
to the dense model's, measured on the calibration data, is the cheap remedy for those layers.

How: the sweep runs the dense model in lockstep, so at a pruned layer both its pruned outputs (from pruned inputs)
and the dense model's outputs for the same images are at hand. Per output channel, over every calibration sample
and spatial position (float64), the paired differences ``d = y_pruned − y_dense`` give the shift ``−mean(d)`` and
its standard error ``se = std(d)/√n``. The shift is shrunk towards zero by its own uncertainty,
``k = max(0, 1 − se² / mean(d)²)`` (a James–Stein-style factor), so a channel whose shift is within noise is barely
moved; a conv sees thousands of positions per image and keeps k ≈ 1.

* ``"mean"``: ``bias += k · (μ_dense − μ_pruned)``;
* ``"mean_std"``: also scale the channel by ``s = σ_dense / σ_pruned`` about its mean (``W_row *= s``,
  ``bias = s (bias − μ_pruned) + μ_pruned + shift``); zeros stay zeros, so the sparsity pattern is unchanged.

The layer's outputs are corrected the same way before the layers after it are calibrated on them. A layer whose
only consumer is a BatchNorm that is being re-estimated is left to it, and so is a layer with fewer output values per
channel than weight columns (in practice every Linear layer: one sample per image): correcting classifier layers
cost accuracy on the seed models, correcting VGG-16's convs helped (docs/RESULTS.md). A ``Conv2d(bias=False)``
module gains a bias when a correction is applied to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
import torch.fx
from torch import nn
from torch.fx.node import Node

from ..runtime import distributed
from ..config import STATS_CORRECTIONS
from ..layers import fetch_tensor

__all__ = ["ChannelCorrection", "layers_to_correct", "channel_correction", "apply_correction",
           "layer_bias", "correction_hook", "shrinkage"]

_MODES = tuple(mode for mode in STATS_CORRECTIONS if mode != "off")
_MIN_STD_RATIO = 1e-3  # a channel whose pruned std collapsed below this fraction of the dense one is only shifted


@dataclass
class ChannelCorrection:
    """Per-channel ``y ← scale · (y − center) + center + shift`` (scale ``None``: ``y + shift``), all (C,) float64."""

    shift: torch.Tensor
    center: torch.Tensor
    scale: torch.Tensor | None = None

    def apply(self, y: torch.Tensor, channel_dim: int) -> torch.Tensor:
        shape = [1] * y.dim()
        shape[channel_dim] = -1
        as_y = lambda t: t.to(y.dtype).view(shape)  # noqa: E731
        if self.scale is None:
            return y + as_y(self.shift)
        return (y - as_y(self.center)) * as_y(self.scale) + as_y(self.center + self.shift)


def layers_to_correct(gm: torch.fx.GraphModule, pruned: set[Node], bn_reestimated: set[Node]) -> set[Node]:
    """Pruned nodes whose outputs are not consumed solely by a re-estimated BatchNorm."""
    selected = set()
    for node in pruned:
        users = list(node.users)
        if not (len(users) == 1 and users[0] in bn_reestimated):
            selected.add(node)
    return selected


class _Moments:
    """Per-channel count, mean and population variance of a stream of tensors, float64."""

    def __init__(self, channel_dim: int):
        self.channel_dim, self.count, self.total, self.total_sq = channel_dim, 0, 0.0, 0.0

    def add(self, y: torch.Tensor) -> None:
        y = y.double().movedim(self.channel_dim, 0).reshape(y.shape[self.channel_dim], -1)
        self.total = self.total + y.sum(1)
        self.total_sq = self.total_sq + y.square().sum(1)
        self.count += y.shape[1]

    def reduce(self) -> "_Moments":
        """Add up every rank's sums (:mod:`sgfx.runtime.distributed`); a no-op for one process."""
        if distributed.is_active():
            packed = distributed.all_reduce_sum(torch.cat([torch.tensor([float(self.count)], dtype=torch.float64,
                                                                        device=self.total.device),
                                                           self.total, self.total_sq]))
            channels = self.total.shape[0]
            self.count, self.total, self.total_sq = int(packed[0]), packed[1:1 + channels], packed[1 + channels:]
        return self

    def mean_var(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.total / self.count
        return mean, (self.total_sq / self.count - mean.square()).clamp_min(0.0)


def shrinkage(diff_mean: torch.Tensor, diff_var: torch.Tensor, count: int) -> torch.Tensor:
    """``max(0, 1 − se²/mean²)`` per channel, ``se² = var/count``: how much of a measured shift to apply."""
    signal = diff_mean.square()
    return torch.where(signal > 0, (1 - diff_var / (count * signal)).clamp(0.0, 1.0), 0.0)


def channel_correction(outputs: list[torch.Tensor], dense_outputs: list[torch.Tensor], channel_dim: int,
                       mode: str) -> ChannelCorrection:
    """The correction that maps the pruned outputs' per-channel statistics onto the dense ones (shift shrunk by
    its standard error)."""
    if mode not in _MODES:
        raise ValueError(f"unknown statistics correction {mode!r}; accepted: " + ", ".join(_MODES))
    pruned, dense, diff = (_Moments(channel_dim) for _ in range(3))
    for y, y_dense in zip(outputs, dense_outputs):
        pruned.add(y)
        dense.add(y_dense)
        diff.add(y.double() - y_dense.double())
    pruned_mean, pruned_var = pruned.reduce().mean_var()
    dense_mean, dense_var = dense.reduce().mean_var()
    diff_mean, diff_var = diff.reduce().mean_var()
    shift = -diff_mean * shrinkage(diff_mean, diff_var, diff.count)
    if mode == "mean":
        return ChannelCorrection(shift, pruned_mean)
    usable = pruned_var > (_MIN_STD_RATIO ** 2) * dense_var
    scale = torch.where(usable, (dense_var / pruned_var.clamp_min(torch.finfo(torch.float64).tiny)).sqrt(), 1.0)
    return ChannelCorrection(shift, pruned_mean, scale)


@torch.no_grad()
def apply_correction(scale_weight: Callable[[torch.Tensor], None], bias: torch.Tensor,
                     correction: ChannelCorrection) -> None:
    """Fold ``correction`` into a layer's weight (``scale_weight(scale)`` scales each output channel in place) and
    ``bias`` (C,), in place."""
    old_bias = bias.double()
    if correction.scale is None:
        bias.copy_((old_bias + correction.shift).to(bias.dtype))
        return
    scale = correction.scale
    scale_weight(scale)
    bias.copy_((scale * (old_bias - correction.center) + correction.center + correction.shift).to(bias.dtype))


def ensure_bias(module: nn.Module) -> torch.Tensor:
    """The module's bias, creating a zero one (same dtype/device as the weight) when it has none."""
    if module.bias is None:
        weight = module.weight
        channels = getattr(module, "out_channels", None) or getattr(module, "out_features", None) or weight.shape[0]
        module.bias = nn.Parameter(torch.zeros(channels, dtype=weight.dtype, device=weight.device),
                                   requires_grad=weight.requires_grad)
    return module.bias


def layer_bias(gm: torch.fx.GraphModule, node: Node, create: bool = True) -> torch.Tensor | None:
    """The bias tensor a prunable layer node adds (with ``create``, made for modules without one); None for a
    functional call whose bias is not a ``get_attr`` of ``gm``."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return ensure_bias(module) if create else module.bias
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if isinstance(bias, Node) and bias.op == "get_attr":
        return fetch_tensor(gm, str(bias.target))
    return None


def correction_hook(scale_weight: Callable[[torch.Tensor], None], bias: Callable[[], torch.Tensor],
                    channel_dim: int, mode: str, min_samples: int, on_applied=None):
    """``hook(outputs, dense_outputs) -> corrected outputs`` for the sweep; folds the correction into the layer's
    weight (``scale_weight``) and ``bias()`` (called only when a correction is made, so a bias is created only then).

    The layer is left alone when its outputs hold fewer than ``min_samples`` values per channel (sgfx passes the
    layer's column count): a Linear layer sees one sample per image, and correcting classifier layers from a few
    hundred images cost accuracy on every model measured. ``on_applied()`` is called when a correction is made.
    """
    def hook(outputs: Sequence[torch.Tensor], dense_outputs: Sequence[torch.Tensor]) -> Iterable[torch.Tensor]:
        if distributed.all_reduce_count(sum(y.numel() // y.shape[channel_dim] for y in outputs)) < min_samples:
            return outputs
        correction = channel_correction(outputs, dense_outputs, channel_dim, mode)
        apply_correction(scale_weight, bias(), correction)
        if on_applied is not None:
            on_applied()
        return (correction.apply(y, channel_dim) for y in outputs)  # read one batch at a time
    return hook
