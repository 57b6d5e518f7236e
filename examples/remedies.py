"""Each of sgfx's remedies switched off in turn on a trained model, with paired differences against the dense model.

A *task* is a trained model, its calibration batches, a per-sample score on the test set (1/0 correctness for a
classifier, per-image mean IoU for a segmenter), unlabeled batches for label-free recovery and a few probe
inputs. For every variant the table gives the metric, its paired difference from the dense model with the 95 %
interval, the share of multiply-adds on pruned weights, the float32-vs-float64 sensitivity of the outputs (the
dense model's is the first row) and the time ``sgfx.sparsify`` (or the recovery) took.

    python examples/efficient.py --out runs/efficient.json      # MobileNet-style classifier and shapes U-Net
"""

from __future__ import annotations

import copy
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from tabulate import tabulate
from torch import nn

import sgfx
from sgfx.cli.evaluation import paired_difference

VARIANTS: dict[str, dict] = {
    "default": {},
    "no dense targets": {"dense_targets": False},
    "per-layer targets (held out)": {"per_layer_targets": True},
    "no statistics correction": {"stats_correction": False},
    "no BN re-estimation": {"bn_reestimate": False},
    "no channel permutation": {"permute_channels": False},
    "blocked solve only (no exact OBS)": {"exact_obs_work": 0},
    "accelerated_only": {"accelerated_only": True},
    "SparseGPT, no remedies": {"dense_targets": False, "stats_correction": False, "bn_reestimate": False,
                               "permute_channels": False},
    "magnitude + BN re-estimation": {"method": "magnitude", "stats_correction": False, "permute_channels": False},
    "default + block reconstruction": {"reconstruct": 200},
}
RECONSTRUCTED = "default + block reconstruction"  # label-free recovery also runs from this variant's model


@dataclass
class Task:
    name: str
    model: nn.Module
    calib: list[torch.Tensor]
    score: Callable[[nn.Module], torch.Tensor]  # per test sample, higher is better (0/1 or IoU)
    metric: str
    unlabeled: Sequence[torch.Tensor]  # batches for label-free recovery (no labels read)
    distill_loss: str  # "kl" (classifier) or "mse" (maps)
    probe: torch.Tensor  # inputs for the float32-vs-float64 sensitivity


class Augmented:
    """Unlabeled batches re-augmented on every pass (``augment(batch, generator)``; one generator for the run, so
    each epoch sees new crops and flips): what a training loader would do, still without labels."""

    def __init__(self, batches: Sequence[torch.Tensor], augment: Callable, seed: int = 0):
        self.batches, self.augment = batches, augment
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self.augment(batch, self.generator) for batch in self.batches)


def sensitivity(model: nn.Module, probe: torch.Tensor) -> float:
    """max |f32 − f64| / max |f64| of the model's outputs on ``probe``."""
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(probe.double())
        single = model(probe).double()
    return float((single - exact).abs().max() / exact.abs().max())


def _row(task: Task, label: str, model: nn.Module, dense_scores: torch.Tensor, seconds: float | None,
         macs: float | None, scores: torch.Tensor | None = None) -> dict:
    scores = (task.score(model) if scores is None else scores).double()
    diff, half = paired_difference(scores, dense_scores)
    return {"model": task.name, "variant": label, task.metric: round(100 * float(scores.mean()), 2),
            "vs dense (95% CI), pp": f"{diff:+.2f} ± {half:.2f}", "diff_pp": round(diff, 3),
            "ci_pp": round(half, 3), "sparse MACs": "" if macs is None else f"{macs:.1%}",
            "f32 vs f64": f"{sensitivity(model, task.probe):.1e}",
            "time s": "" if seconds is None else round(seconds, 1)}


def run_task(task: Task, pattern: str = "2:4", variants: dict[str, dict] | None = None,
             recovery_epochs: int = 2, recovery_lr: float = 0.005, recovery: bool = True,
             channels_last: bool = False) -> list[dict]:
    """The dense row, one row per variant, and the default (and the block-reconstructed variant, when run) followed
    by label-free recovery (distillation from the dense model on ``task.unlabeled`` with every zero kept;
    ``channels_last``: trained in that memory format, faster for depthwise convs on a CPU)."""
    dense_scores = task.score(task.model)
    rows = [_row(task, "dense", task.model, dense_scores, None, None, dense_scores)]
    starts: dict[str, nn.Module] = {}
    for label, options in (variants or VARIANTS).items():
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="sgfx: .* stayed dense")  # listed in the report
            gm = sgfx.sparsify(task.model, task.calib, pattern, progress=False, **options)
        seconds = time.perf_counter() - started
        rows.append(_row(task, label, gm, dense_scores, seconds, sgfx.get_report(gm).sparse_macs_fraction))
        print(tabulate([rows[-1]], headers="keys", tablefmt="plain"), flush=True)
        if label.split(",")[0] in ("default", RECONSTRUCTED):  # also "default, skip ..." (efficient.py --skip)
            starts[label] = gm
    for label, start in starts.items() if recovery else ():
        started = time.perf_counter()
        if channels_last:  # the student (finetune trains a copy) and the teacher; inputs follow the weights
            start = copy.deepcopy(start).to(memory_format=torch.channels_last)
        teacher = copy.deepcopy(task.model).to(memory_format=torch.channels_last) if channels_last else task.model
        recovered = sgfx.finetune(start, task.unlabeled, epochs=recovery_epochs, lr=recovery_lr, weight_decay=0.0,
                                  distill=teacher, alpha=1.0, distill_loss=task.distill_loss, progress=False)
        recovered.to(memory_format=torch.contiguous_format)
        assert sgfx.check_pattern(recovered, pattern)
        augmented = ", crop + flip" if isinstance(task.unlabeled, Augmented) else ""
        images = sum(len(b) for b in (task.unlabeled.batches if augmented else task.unlabeled))
        rows.append(_row(task, f"{label} + label-free recovery ({recovery_epochs} epochs over "
                               f"{images} unlabeled images{augmented}, lr {recovery_lr:g})", recovered, dense_scores,
                         time.perf_counter() - started, sgfx.get_report(recovered).sparse_macs_fraction))
    return rows


def report(rows: list[dict], out: Path | None = None) -> str:
    shown = [{k: v for k, v in row.items() if k not in ("diff_pp", "ci_pp")} for row in rows]
    text = tabulate(shown, headers="keys", tablefmt="github")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=1))
    return text
