"""Output-statistics (bias) correction for pruned layers, done inside the sequential sweep.

Why: OBS minimises each layer's squared output error, but a small systematic shift of a channel's mean survives
it and compounds through the layers after it. In a network with BatchNorm after every conv, re-estimating the
BatchNorm statistics removes that drift; a layer with no BatchNorm after it (all of VGG-16, every classifier
``Linear``) keeps it. Restoring each such layer's per-channel output mean (optionally also its standard deviation)
to the dense model's, measured on the calibration data, is the cheap remedy for those layers.

How: the sweep runs the dense model in lockstep, so at a pruned layer both its pruned outputs (from pruned inputs)
and the dense model's outputs for the same images are at hand. Per output channel, over every calibration sample
and spatial position (float64):

* ``"mean"``: ``bias += μ_dense − μ_pruned``;
* ``"mean_std"``: also scale the channel by ``s = σ_dense / σ_pruned`` (``W_row *= s``,
  ``bias = s (bias − μ_pruned) + μ_dense``); zeros stay zeros, so the sparsity pattern is unchanged.

The layer's outputs are corrected the same way before the layers after it are calibrated on them. A layer whose
only consumer is a BatchNorm that is being re-estimated is left to it. A layer without a bias gets one (a
``Conv2d(bias=False)`` module gains a zero-initialised bias first).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx
from torch import nn
from torch.fx.node import Node

__all__ = ["STATS_CORRECTIONS", "ChannelCorrection", "layers_to_correct", "channel_correction", "apply_correction",
           "layer_bias", "correction_hook"]

STATS_CORRECTIONS = (None, "mean", "mean_std")
_MIN_STD_RATIO = 1e-3  # a channel whose pruned std collapsed below this fraction of the dense one is only shifted


@dataclass
class ChannelCorrection:
    """Per-channel ``y ← scale · (y − pruned_mean) + dense_mean`` (scale ``None``: a pure shift)."""

    dense_mean: torch.Tensor  # (C,) float64
    pruned_mean: torch.Tensor  # (C,) float64
    scale: torch.Tensor | None = None  # (C,) float64

    def apply(self, y: torch.Tensor, channel_dim: int) -> torch.Tensor:
        shape = [1] * y.dim()
        shape[channel_dim] = -1
        as_y = lambda t: t.to(y.dtype).view(shape)  # noqa: E731
        if self.scale is None:
            return y + as_y(self.dense_mean - self.pruned_mean)
        return (y - as_y(self.pruned_mean)) * as_y(self.scale) + as_y(self.dense_mean)


def layers_to_correct(gm: torch.fx.GraphModule, pruned: set[Node], bn_reestimated: set[Node]) -> set[Node]:
    """Pruned nodes whose outputs are not consumed solely by a re-estimated BatchNorm."""
    selected = set()
    for node in pruned:
        users = list(node.users)
        if not (len(users) == 1 and users[0] in bn_reestimated):
            selected.add(node)
    return selected


def _moments(outputs: list[torch.Tensor], channel_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (population) std over all batches, in float64."""
    total = count = total_sq = 0
    for y in outputs:
        y = y.double().movedim(channel_dim, 0).reshape(y.shape[channel_dim], -1)
        total = total + y.sum(1)
        total_sq = total_sq + y.square().sum(1)
        count += y.shape[1]
    mean = total / count
    var = (total_sq / count - mean.square()).clamp_min(0.0)
    return mean, var.sqrt()


def channel_correction(outputs: list[torch.Tensor], dense_outputs: list[torch.Tensor], channel_dim: int,
                       mode: str) -> ChannelCorrection:
    """The correction that maps the pruned outputs' per-channel statistics onto the dense ones."""
    if mode not in STATS_CORRECTIONS[1:]:
        raise ValueError(f"unknown statistics correction {mode!r}; accepted: " + ", ".join(STATS_CORRECTIONS[1:]))
    pruned_mean, pruned_std = _moments(outputs, channel_dim)
    dense_mean, dense_std = _moments(dense_outputs, channel_dim)
    if mode == "mean":
        return ChannelCorrection(dense_mean, pruned_mean)
    usable = pruned_std > _MIN_STD_RATIO * dense_std
    scale = torch.where(usable, dense_std / pruned_std.clamp_min(torch.finfo(torch.float64).tiny), 1.0)
    return ChannelCorrection(dense_mean, pruned_mean, scale)


@torch.no_grad()
def apply_correction(weight: torch.Tensor, bias: torch.Tensor, correction: ChannelCorrection) -> None:
    """Fold ``correction`` into a layer's ``weight`` (output channels first) and ``bias`` (C,), in place."""
    old_bias = bias.double()
    if correction.scale is None:
        bias.copy_((old_bias + correction.dense_mean - correction.pruned_mean).to(bias.dtype))
        return
    scale = correction.scale
    weight.mul_(scale.to(weight.dtype).view(-1, *[1] * (weight.dim() - 1)))
    bias.copy_((scale * (old_bias - correction.pruned_mean) + correction.dense_mean).to(bias.dtype))


def ensure_bias(module: nn.Module) -> torch.Tensor:
    """The module's bias, creating a zero one (same dtype/device as the weight) when it has none."""
    if module.bias is None:
        weight = module.weight
        module.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device),
                                   requires_grad=weight.requires_grad)
    return module.bias


def layer_bias(gm: torch.fx.GraphModule, node: Node) -> torch.Tensor | None:
    """The bias tensor a Conv2d/Linear node adds (created for modules without one); None for a functional call
    whose bias is not a ``get_attr`` of ``gm``."""
    if node.op == "call_module":
        return ensure_bias(gm.get_submodule(node.target))
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if isinstance(bias, Node) and bias.op == "get_attr":
        tensor = gm
        for part in str(bias.target).split("."):
            tensor = getattr(tensor, part, None)
        return tensor if isinstance(tensor, torch.Tensor) else None
    return None


def correction_hook(weight: torch.Tensor, bias: torch.Tensor, channel_dim: int, mode: str,
                    applied: list[ChannelCorrection] | None = None):
    """``hook(outputs, dense_outputs) -> corrected outputs`` for the sweep; folds the correction into the layer."""
    def hook(outputs: list[torch.Tensor], dense_outputs: list[torch.Tensor]) -> list[torch.Tensor]:
        correction = channel_correction(outputs, dense_outputs, channel_dim, mode)
        apply_correction(weight, bias, correction)
        if applied is not None:
            applied.append(correction)
        return [correction.apply(y, channel_dim) for y in outputs]
    return hook
