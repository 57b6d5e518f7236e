"""Accuracy of classifiers, and differences between two models with their uncertainty.

Two models evaluated on the same images differ by a paired difference: per image, +1 where only the first is right,
-1 where only the second is, 0 otherwise. Its mean is the accuracy difference; its standard error (over images)
gives the 95 % interval ±1.96·SE. On a few hundred images one or two images either way is well inside it.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

__all__ = ["topk_correct", "paired_difference", "accuracy"]


@torch.no_grad()
def topk_correct(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], ks: tuple[int, ...] = (1, 5),
                 device: torch.device | str | None = None) -> dict[int, torch.Tensor]:
    """Per image, whether the label is among the model's top-k classes: ``{k: bool tensor (n,)}``.

    ``k`` larger than the number of classes counts every image as correct for that k.
    """
    found: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for images, labels in batches:
        if labels is None:
            raise ValueError("evaluation needs labelled images (an ImageFolder tree: root/<class>/<image>)")
        logits = model(images.to(device) if device is not None else images)
        logits = logits[0] if isinstance(logits, (tuple, list)) else logits
        ranked = logits.topk(min(max(ks), logits.shape[-1]), dim=-1).indices.cpu()
        for k in ks:
            found[k].append((ranked[:, :k] == labels[:, None]).any(dim=1))
    return {k: torch.cat(v) for k, v in found.items()}


def accuracy(correct: torch.Tensor) -> float:
    """Percentage of True entries."""
    return 100.0 * float(correct.float().mean())


def paired_difference(first: torch.Tensor, second: torch.Tensor, z: float = 1.96) -> tuple[float, float]:
    """(accuracy of ``first`` − accuracy of ``second``, half-width of its ``z`` interval), in percentage points,
    from per-image correctness of two models on the same images."""
    if first.shape != second.shape or first.numel() < 2:
        raise ValueError("paired_difference needs the correctness of two models on the same (>= 2) images")
    diff = first.double() - second.double()
    return 100.0 * float(diff.mean()), 100.0 * z * float(diff.std()) / math.sqrt(diff.numel())
