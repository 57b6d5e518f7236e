"""The accuracy frontier on the trained seed models: accuracy vs sparsity for three ways of choosing where to prune.

    python benchmarks/frontier.py --out runs/frontier.json --plot docs/frontier.png     # ResNet-18 and CIFARCNN
    python benchmarks/frontier.py --models cifar_cnn --levels 0.5 0.8 --patterns 2:4 --finetune-steps 0

Protocol of docs/RESULTS.md: the shared checkpoints, 256 calibration images from the CIFAR-10 training split
(seed 0), the full 10,000-image test split. For each unstructured level and N:M pattern:

- ``magnitude+BN``: the fair baseline: magnitude pruning with BatchNorm re-estimation (unstructured: one global
  |w| threshold, ``allocation="global"``; N:M: per group), no other remedy;
- ``uniform``: sgfx's default (every layer at the same level);
- ``allocated``: ``allocation="global"`` (unstructured) or ``budget=0.9`` (2:4: the most sensitive layers, up to
  10 % of the prunable weights, stay dense).

Then ``sgfx.finetune`` (distilled from the dense model, random crop + flip, batch 128; one epoch is 391 steps, or
``--finetune-steps``) from the allocated 80 % point of each model, timed. Needs ../shared (checkpoints and data); says so and exits otherwise.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
import warnings

import torch
from tabulate import tabulate

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import common  # noqa: E402
import sgfx  # noqa: E402


def variants(level) -> dict[str, dict]:
    if isinstance(level, float):
        return {"magnitude+BN": dict(method="magnitude", allocation="global", stats_correction=False),
                "uniform": {}, "allocated": dict(allocation="global")}
    base = {"magnitude+BN": dict(method="magnitude", stats_correction=False), "uniform": {}}
    return base | ({"allocated": dict(budget=0.9)} if level == "2:4" else {})


def train_batches(train_set: common.ImageSet, batch_size: int, seed: int):
    """One shuffled, augmented epoch of (images, labels) batches (the training recipe's crop + flip)."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train_set.labels), generator=generator)
    for idx in order.split(batch_size):
        yield common.crop_and_flip(train_set.normalize(train_set.images[idx]), generator), train_set.labels[idx]


class Epoch:
    """A re-iterable, sized epoch for sgfx.finetune."""

    def __init__(self, train_set, batch_size: int, seed: int = 0):
        self.train_set, self.batch_size, self.seed = train_set, batch_size, seed

    def __len__(self) -> int:
        return -(-len(self.train_set.labels) // self.batch_size)

    def __iter__(self):
        return train_batches(self.train_set, self.batch_size, self.seed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18_cifar", "cifar_cnn"])
    parser.add_argument("--levels", nargs="+", type=float, default=[0.5, 0.6, 0.7, 0.8, 0.9])
    parser.add_argument("--patterns", nargs="+", default=["2:4", "4:8", "1:4"])
    parser.add_argument("--finetune-steps", type=int, default=-1, help="-1: one epoch; 0: none")
    parser.add_argument("--out", type=pathlib.Path)
    parser.add_argument("--plot", type=pathlib.Path)
    args = parser.parse_args(argv)
    if not (common.SHARED / "checkpoints").is_dir():
        print("frontier: unmeasured (no ../shared checkpoints and data here)")
        return
    rows = []
    for name in args.models:
        spec = common.MODELS[name]
        model = spec.build()
        model.load_state_dict(torch.load(common.SHARED / "checkpoints" / f"{spec.checkpoint}.pt", weights_only=True))
        model.eval()
        train_set = common.load_dataset(spec.dataset, True)
        test_set = common.load_dataset(spec.dataset, False)
        calib = common.calibration_set(train_set, 256, 0)
        dense = common.evaluate(model, test_set)
        print(f"{name}: dense {dense:.2f} %", flush=True)
        finetuned_from = None
        for level in [*args.levels, *args.patterns]:
            for label, options in variants(level).items():
                started = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    gm = sgfx.sparsify(model, calib, level, **options)
                elapsed = time.perf_counter() - started
                accuracy = common.evaluate(gm, test_set)
                report = sgfx.get_report(gm)
                row = {"model": name, "level": str(sgfx.parse_pattern(level)), "variant": label,
                       "dense": round(dense, 2), "accuracy": round(accuracy, 2), "drop": round(dense - accuracy, 2),
                       "sparsify_s": round(elapsed, 1), "search_s": round(report.allocation.get("search_s", 0.0), 1),
                       "achieved": round(report.allocation.get("achieved", 0.0), 4),
                       "dense_layers": [r.name for r in report.layers if not r.pruned],
                       "damping_retries": sum(r.damping_retries for r in report.layers),
                       "levels": {r.name: round(r.level, 3) for r in report.layers if r.level is not None}}
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "levels"}), flush=True)
                if args.out:  # as it goes: a long run that stops early keeps its rows
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    args.out.write_text(json.dumps(rows, indent=1))
                if label == "allocated" and level == 0.8:
                    finetuned_from = gm
        if finetuned_from is not None and args.finetune_steps != 0:
            started = time.perf_counter()
            tuned = sgfx.finetune(finetuned_from, Epoch(train_set, 128), epochs=1, distill=model,
                                  max_steps=None if args.finetune_steps < 0 else args.finetune_steps, progress=False)
            elapsed = time.perf_counter() - started
            zeros_kept = all(bool((tuned.get_parameter(r.weight_name)[
                finetuned_from.get_parameter(r.weight_name) == 0] == 0).all())
                for r in sgfx.get_report(finetuned_from).pruned_layers)
            accuracy = common.evaluate(tuned, test_set)
            steps = len(Epoch(train_set, 128)) if args.finetune_steps < 0 else args.finetune_steps
            row = {"model": name, "level": "80% unstructured", "variant": f"allocated + fine-tune ({steps} steps)",
                   "dense": round(dense, 2), "accuracy": round(accuracy, 2), "drop": round(dense - accuracy, 2),
                   "sparsify_s": round(elapsed, 1), "zeros_kept": zeros_kept}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(tabulate([[r["model"], r["level"], r["variant"], r["accuracy"], r["drop"], r["sparsify_s"]]
                    for r in rows], headers=["model", "level", "variant", "accuracy %", "drop pp", "time s"],
                   tablefmt="github"))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))
    if args.plot:
        plot(rows, args.plot)


def plot(rows: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    figure, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    markers = {"magnitude+BN": ("s", "tab:blue"), "uniform": ("o", "tab:orange"), "allocated": ("^", "tab:green")}
    for ax, name in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == name]
        for variant, (marker, color) in markers.items():
            points = sorted((float(r["level"].split("%")[0]) / 100, r["accuracy"]) for r in mine
                            if r["variant"] == variant and "unstructured" in r["level"])
            if points:
                ax.plot(*zip(*points), marker=marker, color=color, label=f"{variant} (unstructured)")
            for r in mine:
                if r["variant"] == variant and ":" in r["level"]:
                    n, m = map(int, r["level"].split(":"))
                    ax.scatter([1 - n / m], [r["accuracy"]], marker=marker, s=70, edgecolors=color,
                               facecolors="none", label=f"{variant} (N:M)" if r["level"] == "2:4" else None)
                    ax.annotate(r["level"], (1 - n / m, r["accuracy"]), textcoords="offset points", xytext=(4, 4),
                                fontsize=7)
        ax.axhline(mine[0]["dense"], color="gray", linestyle="--", label="dense")
        ax.set_title(f"{name}: one-shot accuracy vs sparsity (hollow: N:M)")
        ax.set_xlabel("fraction of prunable weights zeroed")
        ax.set_ylabel("CIFAR-10 test accuracy %")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
