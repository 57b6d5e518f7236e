"""The offline quick demo: train a small CNN on scikit-learn's bundled digits, prune it 2:4, compare methods.

Runs in seconds on a CPU and needs no download (scikit-learn ships the 1,797 8x8 digit images).
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


def run_demo(pattern: str = "2:4", methods=("magnitude", "sparsegpt"), calib_samples: int = 256, seed: int = 0):
    """Train, prune with each method, and return (rows, table string)."""
    import sgfx

    data = load_digits_tensors(seed=seed)
    started = time.perf_counter()
    model = train_digits_cnn(data, seed=seed)
    train_s = time.perf_counter() - started
    dense = accuracy(model, data.x_test, data.y_test)
    calib = data.x_train[:calib_samples].split(64)
    rows = []
    for method in methods:
        started = time.perf_counter()
        gm = sgfx.sparsify(model, calib, pattern, method=method)
        elapsed = time.perf_counter() - started
        pruned = accuracy(gm, data.x_test, data.y_test)
        records = sgfx.get_report(gm).pruned_layers
        mean_err = sum(r.rel_error for r in records) / max(len(records), 1)
        rows.append({
            "model": "DigitsCNN", "method": method, "pattern": str(sgfx.parse_pattern(pattern)),
            "dense": round(dense, 2),
            "pruned": round(pruned, 2), "drop": round(dense - pruned, 2),
            "layers pruned": f"{len(records)}/{len(sgfx.get_report(gm).layers)}",
            "mean rel. error": f"{mean_err:.2e}", "sparsify s": round(elapsed, 2),
        })
    table = tabulate(rows, headers="keys", tablefmt="github")
    header = (f"sklearn digits: {len(data.y_train)} train / {len(data.y_test)} test images, "
              f"trained in {train_s:.1f} s, {calib_samples} calibration images")
    return rows, header + "\n\n" + table
