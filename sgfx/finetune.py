"""Masked fine-tuning of a sparsified model: recover accuracy while every pruned weight stays exactly zero.

Optional: the one-shot model from :func:`sgfx.sparsify` is the product; this is the step after it for users who
have training data and an epoch to spend. Without labels (a detector's or a segmenter's calibration folder),
``distill=dense_model, alpha=1.0`` fits the pruned model to the dense model's outputs alone: KL on softened logits
for classifiers, mean squared error (``distill_loss="mse"``) for maps and boxes. The zeros are kept by masking each
pruned weight's gradient before every optimizer step (so momentum and Adam's moments never move them) and
re-applying the mask after it (so weight decay, or any optimizer, cannot either).
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .layers import fetch_tensor
from .report import find_report

__all__ = ["finetune", "pruned_masks"]

logger = logging.getLogger(__name__)


def pruned_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{weight name: bool mask of the entries to keep}`` for every layer the sgfx report lists as pruned."""
    report = find_report(model)
    if report is None:
        raise ValueError("finetune keeps sgfx's sparsity: pass the model returned by sgfx.sparsify or sgfx.load")
    return {r.weight_name: fetch_tensor(model, r.weight_name).detach() != 0 for r in report.pruned_layers}


def _batches(loader: Iterable[Any], labels: bool):
    """``(input, target)`` pairs; without ``labels``, also bare input tensors (the target is then None)."""
    for index, item in enumerate(loader):
        if not labels and isinstance(item, torch.Tensor):
            yield item, None
            continue
        if isinstance(item, (tuple, list)) and item and isinstance(item[0], torch.Tensor) and not labels:
            yield item[0], None
            continue
        if not (isinstance(item, (tuple, list)) and len(item) >= 2 and isinstance(item[0], torch.Tensor)
                and isinstance(item[1], torch.Tensor)):
            what = "(input, target) tensors" if labels else "input tensors or (input, ...) tuples"
            raise TypeError(f"finetune batch {index}: expected {what}, got {type(item).__name__}"
                            + ("; without labels pass distill=dense_model, alpha=1.0" if labels else ""))
        yield item[0], item[1]


DISTILL_LOSSES = ("kl", "mse")


def finetune(model: nn.Module, train_loader: Iterable[Any], epochs: int = 1, *, lr: float = 0.01,
             momentum: float = 0.9, weight_decay: float = 5e-4, distill: nn.Module | None = None,
             temperature: float = 4.0, alpha: float = 0.5, max_steps: int | None = None,
             device: str | torch.device | None = None, progress: bool = True,
             distill_loss: str = "kl") -> nn.Module:
    """Fine-tune a sparsified model with SGD (Nesterov momentum, cosine learning rate), keeping its zeros.

    Args:
        model: the GraphModule from :func:`sgfx.sparsify` (not modified: a copy is trained).
        train_loader: an iterable of ``(input, target)`` batches (a ``DataLoader`` over a labelled dataset),
            iterated once per epoch; with ``alpha=1.0`` and ``distill``, input tensors alone (no labels needed).
        epochs: passes over ``train_loader``.
        lr: peak learning rate (cosine-decayed to 0 over the run).
        momentum, weight_decay: SGD's.
        distill: the dense model to distil from (its softened outputs at ``temperature``), or None.
        temperature: distillation temperature.
        alpha: weight of the distillation loss; ``1 − alpha`` goes to cross-entropy with the targets (``1.0``:
            label-free, the dense model's outputs are the only target).
        distill_loss: ``"kl"`` (softened class distributions, for classifiers) or ``"mse"`` (every output
            element: maps, boxes, embeddings).
        max_steps: stop after this many optimizer steps (default: ``epochs`` full passes).
        device: where to train (default: where the model is).
        progress: a tqdm bar over the steps with the running loss (off when stderr is not a terminal).

    Returns:
        A new module in eval mode with the same zeros; its report is the input's.

    Example:
        >>> ft = sgfx.finetune(gm, train_loader, epochs=1, distill=model)  # doctest: +SKIP
    """
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if lr <= 0 or temperature <= 0:
        raise ValueError(f"lr and temperature must be positive, got lr={lr!r}, temperature={temperature!r}")
    if distill_loss not in DISTILL_LOSSES:
        raise ValueError(f"unknown distill_loss {distill_loss!r}; accepted: {', '.join(DISTILL_LOSSES)}")
    if alpha == 1.0 and distill is None:
        raise ValueError("alpha=1.0 trains on distillation alone: pass distill=the dense model")
    labels = not (alpha == 1.0 and distill is not None)
    masks = pruned_masks(model)
    student = copy.deepcopy(model)
    device = torch.device(device) if device is not None else next(student.parameters()).device
    student.to(device).train()
    teacher = None if distill is None else copy.deepcopy(distill).to(device).eval()
    masks = {name: mask.to(device) for name, mask in masks.items()}
    weights = {name: student.get_parameter(name) for name in masks}
    optimizer = torch.optim.SGD(student.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay,
                                nesterov=momentum > 0)
    total = _total_steps(train_loader, epochs, max_steps)
    schedule = None if total is None else torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="sgfx: fine-tuning", unit="step", disable=None if progress else True)
    steps = 0
    try:
        for _ in range(epochs):
            for inputs, targets in _batches(train_loader, labels):
                inputs = inputs.to(device)
                targets = None if targets is None else targets.to(device)
                loss = _loss(student, teacher, inputs, targets, temperature, alpha, distill_loss)
                masked_step(optimizer, loss, weights, masks)
                if schedule is not None:
                    schedule.step()
                steps += 1
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}", refresh=False)
                if max_steps is not None and steps >= max_steps:
                    break
            if max_steps is not None and steps >= max_steps:
                break
    finally:
        bar.close()
    logger.info("fine-tuned %d steps", steps)
    return student.eval()


def _total_steps(train_loader: Iterable[Any], epochs: int, max_steps: int | None) -> int | None:
    """Optimizer steps the run will take (None: unknown, a loader without a length)."""
    try:
        per_epoch = len(train_loader)  # type: ignore[arg-type]
    except TypeError:
        per_epoch = None
    return max_steps or (per_epoch * epochs if per_epoch is not None else None)


def _loss(student: nn.Module, teacher: nn.Module | None, inputs: torch.Tensor, targets: torch.Tensor | None,
          temperature: float, alpha: float, distill_loss: str = "kl") -> torch.Tensor:
    """Cross-entropy with the targets, mixed with distillation from ``teacher``'s outputs when given (softened
    class distributions, or every output element with ``"mse"``); distillation alone without targets."""
    outputs = student(inputs)
    loss = None if targets is None else F.cross_entropy(outputs, targets)
    if teacher is None:
        return loss
    with torch.no_grad():
        reference = teacher(inputs)
    if distill_loss == "mse":
        kd = F.mse_loss(outputs, reference)
    else:
        soft = F.log_softmax(reference / temperature, dim=-1)
        kd = F.kl_div(F.log_softmax(outputs / temperature, dim=-1), soft, reduction="batchmean",
                      log_target=True) * temperature ** 2
    return kd if loss is None else (1 - alpha) * loss + alpha * kd


def masked_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, weights: dict[str, torch.Tensor],
                 masks: dict[str, torch.Tensor]) -> None:
    """One optimizer step in which no pruned weight moves: gradients masked before, weights masked after."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    with torch.no_grad():
        for name, weight in weights.items():
            if weight.grad is not None:
                weight.grad.mul_(masks[name])
    optimizer.step()
    with torch.no_grad():
        for name, weight in weights.items():
            weight.mul_(masks[name])
