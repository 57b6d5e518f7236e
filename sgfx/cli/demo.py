"""The offline quick demo: train a small CNN on scikit-learn's bundled digits, prune it, compare methods honestly.

Runs in seconds on a CPU and needs no download (scikit-learn ships the 1,797 8x8 digit images). Half of them are
held out (898 test images), and every accuracy difference is a paired difference on the same images with its 95 %
interval, so what the table shows is the methods' difference, not the noise of a few images (docs/RESULTS.md has
the demo's results over several seeds).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tabulate import tabulate
from torch import nn

__all__ = ["DigitsCNN", "load_digits_tensors", "train_digits_cnn", "run_demo"]


class DigitsCNN(nn.Module):
    """A small conv-relu-pool-linear net for 1x8x8 digit images."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(64 * 4 * 4, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = self.pool(torch.relu(self.conv3(torch.relu(self.conv2(x)))))
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


@dataclass
class DigitsSplit:
    x_train: torch.Tensor  # (n, 1, 8, 8) float32, normalised
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_tensors(test_fraction: float = 0.25, seed: int = 0) -> DigitsSplit:
    """scikit-learn's digits as normalised tensors, split reproducibly."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the demo needs scikit-learn: pip install 'sgfx[examples]'") from exc
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8) in [0, 1]
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    images, labels = (images[order] - 0.3) / 0.4, labels[order]
    n_test = int(len(labels) * test_fraction)
    return DigitsSplit(images[n_test:], labels[n_test:], images[:n_test], labels[:n_test])


def train_digits_cnn(data: DigitsSplit, epochs: int = 15, seed: int = 0) -> DigitsCNN:
    torch.manual_seed(seed)
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(data.y_train), generator=generator).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx]).backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * float((model(x).argmax(1) == y).float().mean())


def _layer_errors(results: dict[tuple[str, str], "torch.fx.GraphModule"]) -> str:
    """Per-layer relative reconstruction error ‖WX − ŴX‖²/‖WX‖² of every run, one column per (pattern, method)."""
    import sgfx

    columns = list(results)
    names = [r.name for r in sgfx.get_report(results[columns[0]]).layers]
    errors = {key: {r.name: r for r in sgfx.get_report(gm).layers} for key, gm in results.items()}
    rows = [[name] + [f"{errors[key][name].rel_error:.2e}" if errors[key][name].pruned else "dense"
                      for key in columns] for name in names]
    return tabulate(rows, headers=["layer"] + [f"{method} {pattern}" for pattern, method in columns],
                    tablefmt="github")


def run_demo(patterns=("2:4", "1:4"), methods=("magnitude", "sparsegpt"), calib_samples: int = 256, seed: int = 0,
             epochs: int = 15, test_fraction: float = 0.5):
    """Train, prune with each method at each pattern, and return (rows, printable text).

    Each row has the accuracy, its difference to the dense model and to the first method (paired, on the same test
    images, with the half-width of the 95 % interval), and the mean per-layer reconstruction error.
    """
    import sgfx
    from .evaluation import accuracy as percent, paired_difference

    patterns = (patterns,) if isinstance(patterns, (str, float)) else tuple(patterns)
    data = load_digits_tensors(test_fraction=test_fraction, seed=seed)
    started = time.perf_counter()
    model = train_digits_cnn(data, epochs=epochs, seed=seed)
    train_s = time.perf_counter() - started
    with torch.no_grad():
        dense = model(data.x_test).argmax(1) == data.y_test
    calib = data.x_train[:calib_samples].split(64)
    rows, results = [], {}
    for pattern in patterns:
        label = str(sgfx.parse_pattern(pattern))
        baseline = None
        for method in methods:
            started = time.perf_counter()
            gm = sgfx.sparsify(model, calib, pattern, method=method)
            elapsed = time.perf_counter() - started
            results[(label, method)] = gm
            with torch.no_grad():
                correct = gm(data.x_test).argmax(1) == data.y_test
            baseline = correct if baseline is None else baseline
            records = sgfx.get_report(gm).pruned_layers
            vs_dense, dense_half = paired_difference(correct, dense)
            vs_first, first_half = paired_difference(correct, baseline)
            rows.append({
                "pattern": label, "method": method, "accuracy %": round(percent(correct), 2),
                "vs dense, pp (95% CI)": f"{vs_dense:+.2f} ± {dense_half:.2f}",
                f"vs {methods[0]}, pp (95% CI)": "" if method == methods[0] else f"{vs_first:+.2f} ± {first_half:.2f}",
                "mean rel. error": f"{sum(r.rel_error for r in records) / max(len(records), 1):.2e}",
                "layers pruned": f"{len(records)}/{len(sgfx.get_report(gm).layers)}", "sparsify s": round(elapsed, 2),
                "_accuracy": percent(correct), "_vs_first": (vs_first, first_half), "_dense": percent(dense),
            })
    shown = [{k: v for k, v in row.items() if not k.startswith("_")} for row in rows]
    text = (f"DigitsCNN on scikit-learn digits: trained on {len(data.y_train)} images in {train_s:.1f} s, dense "
            f"accuracy {percent(dense):.2f} % on {len(data.y_test)} held-out images; {calib_samples} calibration "
            f"images.\nDifferences are paired (same test images); ± is the 95 % interval: a difference inside it is "
            f"noise.\n\n{tabulate(shown, headers='keys', tablefmt='github')}\n\nPer-layer reconstruction error "
            f"(‖WX − ŴX‖² / ‖WX‖² on the calibration inputs):\n\n{_layer_errors(results)}")
    return rows, text
