"""All seed models: 2:4 (or --pattern) for each method, plus an unstructured sparsity sweep with a plot.

    python examples/run_sweep.py --models mnist_cnn cifar_cnn resnet18_cifar --out runs/sweep.json
    python examples/run_sweep.py --models cifar_cnn --sparsities 0.1 0.3 0.5 0.7 0.9 --plot runs/sweep.png
"""

from __future__ import annotations

import logging
from pathlib import Path

from common import MODELS, build_parser, format_rows, parse_pattern_arg, prepare, sparsify_and_evaluate, write_rows


def plot_sweep(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 3.6), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model and r["pattern"].endswith("unstructured")]
        for method, bn, targets in sorted({(r["method"], r["bn_reestimate"], r["dense_targets"]) for r in mine}):
            points = sorted((float(r["pattern"].split("%")[0]) / 100, r["pruned"]) for r in mine
                            if (r["method"], r["bn_reestimate"], r["dense_targets"]) == (method, bn, targets))
            label = method + (" + BN re-est." if bn else "") + (" + dense targets" if targets else "")
            ax.plot([0.0] + [p[0] for p in points], [mine[0]["baseline"]] + [p[1] for p in points], "o-", label=label)
        ax.set(title=model, xlabel="unstructured sparsity", ylabel="test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv=None) -> list[dict]:
    parser = build_parser("Sweep the seed models: N:M per method and an unstructured sparsity curve.")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--sparsities", nargs="*", type=float, default=[], help="unstructured fractions to sweep")
    parser.add_argument("--plot", type=Path, default=None, help="accuracy-vs-sparsity plot (.png)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    rows = []
    for name in args.models:
        model, train_set, test_set, dense = prepare(name, args)
        for pattern in [parse_pattern_arg(args.pattern)] + list(args.sparsities):
            rows += sparsify_and_evaluate(name, model, train_set, test_set, dense, args.methods, pattern,
                                          args.calib_samples, args.seed, args.batch_size, args.bn,
                                          args.dense_targets, args.augment, args.stats_correction, args.permute)
    print(format_rows(rows))
    write_rows(rows, args.out)
    if args.sparsities:
        plot_path = args.plot or (args.out.with_suffix(".png") if args.out else Path("sweep.png"))
        plot_sweep(rows, plot_path)
        print(f"plot: {plot_path}")
    return rows


if __name__ == "__main__":
    main()
