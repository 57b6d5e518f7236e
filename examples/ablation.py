"""Ablation of sgfx's accuracy remedies: each remedy on/off, for each model and pattern, with every method given
the same BatchNorm re-estimation, on the full test split.

    python examples/ablation.py --models mnist_cnn cifar_cnn resnet18_cifar --patterns 2:4 --out runs/ablation.json
    python examples/ablation.py --models resnet18_cifar --configs sparsegpt+bn +permute --patterns 2:4 4:8

Prints one row per run and a pivot (configurations x models, accuracy drop in points) for each pattern.
"""

from __future__ import annotations

import logging
from collections import defaultdict

from tabulate import tabulate
from torch import nn

from common import (
    MODELS, build_parser, calibration_set, has_batchnorm, parse_pattern_arg, prepare, prune_and_evaluate,
    write_rows,
)

_OFF = dict(dense_targets=False, permute_channels=False, stats_correction="off", augment=None)  # every remedy off
_BN = dict(_OFF, bn_reestimate=True)
CONFIGS: dict[str, dict] = {  # "+x": SparseGPT + BN re-estimation + x
    "magnitude": dict(_OFF, method="magnitude", bn_reestimate=False),
    "magnitude+bn": dict(_BN, method="magnitude"),
    "wanda": dict(_OFF, method="wanda", bn_reestimate=False),
    "wanda+bn": dict(_BN, method="wanda"),
    "sparsegpt": dict(_OFF, bn_reestimate=False),
    "sparsegpt+bn": dict(_BN),
    "+stats": dict(_BN, stats_correction="mean"),
    "+stats_std": dict(_BN, stats_correction="mean_std"),
    "+permute": dict(_BN, permute_channels=True),
    "+dense_targets": dict(_BN, dense_targets=True),
    "+hflip": dict(_BN, augment="hflip"),
    "+permute+stats": dict(_BN, permute_channels=True, stats_correction="mean"),
    "+dense_targets+stats": dict(_BN, dense_targets=True, stats_correction="mean"),
    "+permute+dense_targets": dict(_BN, permute_channels=True, dense_targets=True),
    "+permute+hflip": dict(_BN, permute_channels=True, augment="hflip"),
    "+dense_targets+hflip": dict(_BN, dense_targets=True, augment="hflip"),
    "+permute+dense_targets+hflip": dict(_BN, permute_channels=True, dense_targets=True, augment="hflip"),
    "+permute+dense_targets+stats": dict(_BN, permute_channels=True, dense_targets=True, stats_correction="mean"),
    "+permute+dense_targets+stats+hflip": dict(_BN, permute_channels=True, dense_targets=True,
                                               stats_correction="mean", augment="hflip"),
    "default": {},  # sgfx.sparsify's own defaults
}
BN_ONLY = {"magnitude+bn", "wanda+bn", "sparsegpt+bn"}  # identical to their plain row on a model without BatchNorm


def applicable(config: str, model: nn.Module, pattern) -> bool:
    options = CONFIGS[config]
    if options.get("permute_channels") and not isinstance(pattern, str):
        return False  # permutation regroups N:M groups; nothing to regroup for unstructured sparsity
    return has_batchnorm(model) or config not in BN_ONLY


def pivot(rows: list[dict]) -> str:
    """One table per pattern: configurations down, models across, drop in points."""
    out = []
    for pattern in dict.fromkeys(r["pattern"] for r in rows):
        mine = [r for r in rows if r["pattern"] == pattern]
        models = list(dict.fromkeys(r["model"] for r in mine))
        drops = defaultdict(dict)
        for r in mine:
            drops[r["config"]][r["model"]] = r["drop"]
        dense = {r["model"]: r["baseline"] for r in mine}
        table = [["dense accuracy"] + [dense[m] for m in models]]
        table += [[config] + [drops[config].get(m, "") for m in models] for config in drops]
        out.append(f"{pattern}: accuracy drop (pp), lower is better\n"
                   + tabulate(table, headers=["config"] + models, tablefmt="github"))
    return "\n\n".join(out)


def main(argv=None) -> list[dict]:
    parser = build_parser("Accuracy ablation of the remedies: each config on each model and pattern.")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--patterns", nargs="+", default=["2:4"], help='"N:M" strings and/or unstructured fractions')
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    patterns = [parse_pattern_arg(p) for p in args.patterns]
    rows = []
    for name in args.models:
        model, train_set, test_set, dense = prepare(name, args)
        calib = calibration_set(train_set, args.calib_samples, args.seed)
        for pattern in patterns:
            for config in args.configs:
                if applicable(config, model, pattern):
                    rows.append(prune_and_evaluate(name, model, calib, test_set, dense, pattern, CONFIGS[config],
                                                   args.batch_size, label=config))
                    print(f"{name} {pattern} {config}: {rows[-1]['pruned']:.2f} (drop {rows[-1]['drop']:.2f})",
                          flush=True)
                    write_rows(rows, args.out)  # partial results survive an interrupted run
    print(pivot(rows))
    return rows


if __name__ == "__main__":
    main()
