"""Shared code of the example scripts: the four seed models, their data, training, evaluation and the table.

Each example script is ``run_example("<model>")``; ``run_sweep.py`` loops over models and sparsities. Data and
trained checkpoints are cached under ``--cache-dir`` (default ``~/.cache/sgfx``).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import logging
import os
import shutil
import tarfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
import torchvision
from tabulate import tabulate
from torch import nn

import sgfx
from sgfx.runtime.allocator import enable_huge_pages

enable_huge_pages()  # before any tensor: training and pruning on the CPU run faster on huge pages

from efficient import MobileNetCIFAR  # noqa: E402

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - tqdm is in the examples extra
    class tqdm:  # noqa: N801 - a silent stand-in with the few methods used here
        def __init__(self, iterable=None, **kwargs):
            self.iterable = iterable

        def __iter__(self):
            return iter(self.iterable)

        def update(self, n=1):
            pass

        def set_postfix(self, **kwargs):
            pass

        def close(self):
            pass

LOG = logging.getLogger("sgfx.examples")
REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"  # read-only project data, when this checkout has it beside it
DEFAULT_CACHE = Path(os.environ.get("SGFX_CACHE", Path.home() / ".cache" / "sgfx"))
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
CIFAR_ARCHIVE = SHARED / "data" / "cifar10-jpg.tar.gz"


# ------------------------------------------------------------------------------------------------------ models
class SimpleCNN(nn.Module):
    """MNIST-format CNN (1x28x28, 6.46 M parameters)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 7 * 7, 2048)
        self.fc2 = nn.Linear(2048, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class CIFARCNN(nn.Module):
    """Four conv-bn-relu blocks and a two-layer classifier (3x32x32, 9.36 M parameters)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn_relu(3, 64), *_conv_bn_relu(64, 128), nn.MaxPool2d(2),
            *_conv_bn_relu(128, 256), *_conv_bn_relu(256, 256), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(256 * 8 * 8, 512), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(512, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def resnet18_cifar(num_classes: int = 10) -> nn.Module:
    """torchvision ResNet-18 with a 3x3 stride-1 stem and no max-pool (11.17 M parameters)."""
    model = torchvision.models.resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


def vgg16_cifar(num_classes: int = 10) -> nn.Module:
    """torchvision VGG-16, unchanged (134 M parameters; on 32x32 inputs its classifier sees a replicated 1x1 map)."""
    return torchvision.models.vgg16(num_classes=num_classes)


@dataclass(frozen=True)
class ModelSpec:
    build: Callable[[], nn.Module]
    dataset: str  # "fashion-mnist" or "cifar10"
    checkpoint: str  # file name under ../shared/checkpoints and the cache
    params: int  # parameter count, checked by the tests
    recipe: dict  # default training recipe (epochs, batch size, max lr, augmentation, precision)


MODELS: dict[str, ModelSpec] = {
    "mnist_cnn": ModelSpec(SimpleCNN, "fashion-mnist", "simple_cnn", 6_463_882,
                           dict(epochs=2, batch_size=128, max_lr=0.05, augment=False)),
    "cifar_cnn": ModelSpec(CIFARCNN, "cifar10", "cifar_cnn", 9_355_850,
                           dict(epochs=5, batch_size=128, max_lr=0.02, augment=True)),
    "resnet18_cifar": ModelSpec(resnet18_cifar, "cifar10", "resnet18_cifar", 11_173_962,
                                dict(epochs=4, batch_size=128, max_lr=0.1, augment=True)),
    "vgg16_cifar": ModelSpec(vgg16_cifar, "cifar10", "vgg16_cifar", 134_301_514,
                             dict(epochs=4, batch_size=128, max_lr=0.02, augment=True, precision="bf16")),
    # efficient (issue 21): depthwise + SE + hard-swish, trained here (examples/efficient.py)
    "mobilenet_cifar": ModelSpec(MobileNetCIFAR, "cifar10", "mobilenet_cifar", 1_522_620,
                                 dict(epochs=8, batch_size=128, max_lr=0.1, augment=True, channels_last=True)),
}

NORMALIZE = {
    "fashion-mnist": ((0.286,), (0.353,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.247, 0.2435, 0.2616)),
}


# -------------------------------------------------------------------------------------------------------- data
@dataclass
class ImageSet:
    """Decoded images kept as uint8 (N, C, H, W) with int64 labels; normalised per batch."""

    images: torch.Tensor
    labels: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return (images.float() / 255.0 - mean) / std

    def batches(self, batch_size: int, indices: torch.Tensor | None = None):
        indices = torch.arange(len(self)) if indices is None else indices
        for chunk in indices.split(batch_size):
            yield self.normalize(self.images[chunk]), self.labels[chunk]

    def subset(self, count: int, seed: int = 0) -> "ImageSet":
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:count]
        return ImageSet(self.images[order], self.labels[order], self.mean, self.std)


class DataNotFoundError(FileNotFoundError):
    pass


def _prepare_fashion_mnist_raw(source: Path, cache: Path) -> Path:
    """Copy (decompressing) IDX files from ``source`` into torchvision's FashionMNIST/raw layout."""
    raw = cache / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for url, _ in torchvision.datasets.FashionMNIST.resources:
        name = Path(url).name  # e.g. train-images-idx3-ubyte.gz
        target = raw / name[:-3]
        if target.exists():
            continue
        for candidate in (source / name, source / name[:-3]):
            if candidate.exists():
                opener = gzip.open if candidate.suffix == ".gz" else open
                with opener(candidate, "rb") as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                break
    return cache


def load_fashion_mnist(train: bool, data_dir: Path | None = None, cache: Path = DEFAULT_CACHE,
                       download: bool = False) -> ImageSet:
    """Fashion-MNIST via torchvision, from ``data_dir`` (IDX files, .gz or not), Debian's copy, or a download."""
    source = Path(data_dir) if data_dir is not None else DEBIAN_FASHION_MNIST  # an explicit folder is final
    searched = [str(source)]
    root = cache / "fashion-mnist"
    if any(source.glob("train-images-idx3-ubyte*")):
        _prepare_fashion_mnist_raw(source, root)
    else:
        searched.append(str(root / "FashionMNIST" / "raw"))
    try:
        dataset = torchvision.datasets.FashionMNIST(root, train=train, download=download)
    except RuntimeError as exc:
        raise DataNotFoundError(
            f"Fashion-MNIST not found (looked in {', '.join(searched)}). Get it with "
            "`apt-get install dataset-fashion-mnist`, pass --data-dir to a folder with the IDX files, or pass "
            "--download where the internet is reachable."
        ) from exc
    mean, std = NORMALIZE["fashion-mnist"]
    return ImageSet(dataset.data.unsqueeze(1).clone(), dataset.targets.clone(), mean, std)


def _extract_cifar_archive(archive: Path, cache: Path) -> Path:
    root = cache / "cifar10-jpg"
    if not (root / "test").is_dir():
        LOG.info("extracting %s to %s", archive, cache)
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / ".extracting"
        shutil.rmtree(tmp, ignore_errors=True)
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        shutil.rmtree(root, ignore_errors=True)
        (tmp / "cifar10-jpg").rename(root)
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _decode_image_folder(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    dataset = torchvision.datasets.ImageFolder(str(folder))  # sorted class folders = CIFAR-10's label order
    images = torch.empty(len(dataset), 3, 32, 32, dtype=torch.uint8)
    labels = torch.empty(len(dataset), dtype=torch.long)
    to_tensor = torchvision.transforms.functional.pil_to_tensor
    for i, (path, label) in enumerate(tqdm(dataset.samples, desc=f"decoding {folder.name}", leave=False)):
        image = to_tensor(dataset.loader(path))
        if image.shape != (3, 32, 32):
            raise ValueError(f"{path}: expected a 32x32 RGB image, got {tuple(image.shape)}")
        images[i], labels[i] = image, label
    return images, labels


def load_cifar10(train: bool, data_dir: Path | None = None, cache: Path = DEFAULT_CACHE,
                 download: bool = False) -> ImageSet:
    """CIFAR-10 from an ImageFolder tree (``data_dir`` or the extracted JPEG archive) or torchvision's CIFAR10.

    Decoded tensors are cached in ``cache`` so later runs skip JPEG decoding.
    """
    split = "train" if train else "test"
    mean, std = NORMALIZE["cifar10"]
    searched = []
    folder = None
    if data_dir is not None:
        data_dir = Path(data_dir)
        searched.append(str(data_dir))
        if data_dir.suffixes[-2:] == [".tar", ".gz"] and data_dir.is_file():
            folder = _extract_cifar_archive(data_dir, cache)
        elif (data_dir / split).is_dir():
            folder = data_dir
        elif (data_dir / "cifar10-jpg" / split).is_dir():
            folder = data_dir / "cifar10-jpg"
        if folder is None:
            raise DataNotFoundError(
                f"no CIFAR-10 data in {data_dir}: expected an ImageFolder tree with {split}/<class>/*.jpg, "
                "a cifar10-jpg/ folder holding one, or a cifar10-jpg.tar.gz archive"
            )
    if folder is None and CIFAR_ARCHIVE.is_file():
        searched.append(str(CIFAR_ARCHIVE))
        folder = _extract_cifar_archive(CIFAR_ARCHIVE, cache)
    if folder is not None:
        tensor_cache = cache / f"cifar10-{folder.resolve().as_posix().replace('/', '_')}-{split}.pt"
        if tensor_cache.exists():
            images, labels = torch.load(tensor_cache, weights_only=True)
        else:
            images, labels = _decode_image_folder(folder / split)
            tensor_cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save((images, labels), tensor_cache)
        return ImageSet(images, labels, mean, std)
    root = cache / "cifar10"
    searched.append(str(root))
    try:
        dataset = torchvision.datasets.CIFAR10(root, train=train, download=download)
    except RuntimeError as exc:
        raise DataNotFoundError(
            f"CIFAR-10 not found (looked in {', '.join(searched)}). Pass --data-dir to an ImageFolder tree with "
            "train/ and test/ (or to cifar10-jpg.tar.gz), or --download where the internet is reachable."
        ) from exc
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
    return ImageSet(images, torch.tensor(dataset.targets), mean, std)


def load_dataset(name: str, train: bool, data_dir: Path | None = None, cache: Path = DEFAULT_CACHE,
                 download: bool = False) -> ImageSet:
    loader = {"fashion-mnist": load_fashion_mnist, "cifar10": load_cifar10}[name]
    return loader(train, data_dir, cache, download)


# ---------------------------------------------------------------------------------------------- train / eval
def crop_and_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop (zero padding 4, an offset per image) and horizontal flip (per image) of a normalised batch."""
    n, c, h, w = images.shape
    padded = F.pad(images, (4, 4, 4, 4))
    dy, dx = torch.randint(0, 9, (2, n), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]  # (n, 1, h, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]  # (n, 1, 1, w)
    out = padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
    flip = torch.rand(n, generator=generator) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), out.flip(3), out)


def train(model: nn.Module, data: ImageSet, epochs: int, batch_size: int, max_lr: float, augment: bool,
          seed: int = 0, precision: str = "fp32", channels_last: bool = False) -> nn.Module:
    """SGD (Nesterov, momentum 0.9, wd 5e-4) with OneCycleLR, the recipe of the shared checkpoints.

    ``precision="bf16"`` runs forward and backward under bfloat16 autocast (weights and optimizer stay float32):
    about 1.6x faster for VGG-16 on a CPU with AMX/AVX-512 BF16, which is what makes training it here practical.
    ``channels_last`` trains in that memory format (1.6x faster for the depthwise MobileNet here; the weights are
    returned contiguous).
    """
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)
    device_type = next(model.parameters()).device.type
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=max_lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = epochs * -(-len(data) // batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=steps)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(data), generator=generator)
        bar = tqdm(data.batches(batch_size, order), total=-(-len(data) // batch_size),
                   desc=f"train epoch {epoch + 1}/{epochs}")
        for images, labels in bar:
            if augment:
                images = crop_and_flip(images, generator)
            images = images.contiguous(memory_format=memory_format)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = F.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()
            scheduler.step()
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    return model.to(memory_format=torch.contiguous_format).eval()


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageSet, batch_size: int = 500, desc: str = "eval") -> float:
    """Top-1 accuracy in percent."""
    model.eval()
    correct = 0
    for images, labels in tqdm(data.batches(batch_size), total=-(-len(data) // batch_size), desc=desc, leave=False):
        correct += int((model(images).argmax(1) == labels).sum())
    return 100.0 * correct / len(data)


# -------------------------------------------------------------------------------------------------- checkpoints
def find_checkpoint(spec: ModelSpec, cache: Path) -> Path | None:
    name = f"{spec.checkpoint}.pt"
    for candidate in (SHARED / "checkpoints" / name, cache / "checkpoints" / name):
        if candidate.is_file():
            return candidate
    return None


def load_or_train(name: str, args: argparse.Namespace) -> tuple[nn.Module, Path | None]:
    spec = MODELS[name]
    model = spec.build()
    if args.checkpoint:
        path = Path(args.checkpoint)
    else:
        path = None if args.epochs else find_checkpoint(spec, args.cache_dir)
    if path is not None:
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        model.load_state_dict(torch.load(path, weights_only=True))
        LOG.info("loaded %s", path)
        return model.eval(), path
    recipe = dict(spec.recipe)
    if args.epochs:
        recipe["epochs"] = args.epochs
    cached = args.cache_dir / "checkpoints" / f"{spec.checkpoint}_e{recipe['epochs']}.pt"
    if cached.is_file():
        model.load_state_dict(torch.load(cached, weights_only=True))
        return model.eval(), cached
    data = load_dataset(spec.dataset, True, args.data_dir, args.cache_dir, args.download)
    started = time.perf_counter()
    train(model, data, recipe["epochs"], recipe["batch_size"], recipe["max_lr"], recipe["augment"], args.seed,
          recipe.get("precision", "fp32"), recipe.get("channels_last", False))
    seconds = time.perf_counter() - started
    LOG.info("trained %s in %.0f s", name, seconds)
    cached.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), cached)
    mean, std = NORMALIZE[spec.dataset]
    cached.with_suffix(".json").write_text(json.dumps({
        "model": spec.checkpoint, "dataset": spec.dataset, **recipe, "seed": args.seed, "train_seconds": round(seconds),
        "optimizer": "SGD nesterov momentum 0.9, wd 5e-4, OneCycleLR", "normalize": {"mean": mean, "std": std},
        "torch": torch.__version__}, indent=2))
    return model, cached


# --------------------------------------------------------------------------------------------------- the run
def build_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--checkpoint", help="state_dict to load (default: ../shared/checkpoints, else the cache, "
                                             "else train)")
    parser.add_argument("--epochs", type=int, default=0, help="train this many epochs instead of loading (cached)")
    parser.add_argument("--data-dir", type=Path, default=None, help="dataset folder (or cifar10-jpg.tar.gz)")
    parser.add_argument("--download", action="store_true", help="let torchvision download missing data")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--methods", nargs="+", default=["magnitude", "sparsegpt"], choices=sgfx.config.METHODS)
    parser.add_argument("--pattern", default="2:4", help='"N:M" or an unstructured fraction')
    parser.add_argument("--bn", choices=["on", "off", "both"], default="both",
                        help="BatchNorm re-estimation after pruning (models without BatchNorm run once)")
    parser.add_argument("--dense-targets", choices=["default", "on", "off", "both"], default="default",
                        help="fit SparseGPT layers to the dense model's outputs (ignored for other methods)")
    parser.add_argument("--augment", choices=["hflip"], default=None,
                        help="calibrate on the calibration images and their mirror images")
    parser.add_argument("--stats-correction", choices=["mean", "mean_std", "off"], default=None,
                        help="restore pruned layers' per-channel output statistics (default: sgfx's)")
    parser.add_argument("--permute", choices=["on", "off"], default=None,
                        help="permute channels for N:M before pruning (default: sgfx's, on for N:M)")
    parser.add_argument("--calib-samples", type=int, default=256, help="training images used for calibration")
    parser.add_argument("--test-samples", type=int, default=0, help="evaluate on a random subset (0: all)")
    parser.add_argument("--batch-size", type=int, default=500, help="evaluation batch size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the rows to this .json (and a .csv beside)")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def parse_pattern_arg(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def bn_settings(model: nn.Module, bn: str) -> list[bool]:
    if not has_batchnorm(model):
        return [False]
    return {"on": [True], "off": [False], "both": [False, True]}[bn]


def variants(model: nn.Module, methods: Sequence[str], bn: str, dense_targets: str) -> list[tuple[str, bool, bool]]:
    """(method, bn_reestimate, dense_targets) combinations to run."""
    targets = {"default": [None], "on": [True], "off": [False], "both": [False, True]}[dense_targets]
    return [(method, flag, target) for method in methods for flag in bn_settings(model, bn)
            for target in (targets if method == "sparsegpt" else [False])]


def prune_and_evaluate(name: str, model: nn.Module, calib: list[torch.Tensor], test_set: ImageSet, dense: float,
                       pattern, options: dict, batch_size: int = 500, label: str = "") -> dict:
    """One ``sgfx.sparsify(model, calib, pattern, **options)`` run and its test accuracy, as a result row."""
    method = options.get("method", "sparsegpt")
    layer_bar = tqdm(total=None, desc=f"{name} {label or method} {pattern}: layers", leave=False)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="sgfx: .* left dense")  # listed in the report
        gm = sgfx.sparsify(model, calib, pattern, callback=lambda record: layer_bar.update(1), **options)
    elapsed = time.perf_counter() - started
    layer_bar.close()
    LOG.info("%s", sgfx.report(gm))
    pruned = evaluate(gm, test_set, batch_size, desc=f"eval {label or method}")
    result = sgfx.get_report(gm)
    resolved = sgfx.SparsifyConfig(pattern, **{k: v for k, v in options.items() if v is not None})
    return {
        "model": name, "config": label, "method": method, "pattern": str(sgfx.parse_pattern(pattern)),
        "bn_reestimate": bool(result.bn_reestimated), "dense_targets": resolved.dense_targets,
        "augment": resolved.augment, "stats_correction": resolved.stats_correction,
        "permute_channels": resolved.permute_channels,
        "baseline": round(dense, 2), "pruned": round(pruned, 2), "drop": round(dense - pruned, 2),
        "layers_pruned": len(result.pruned_layers), "layers": len(result.layers),
        "calib_samples": sum(len(b) for b in calib), "test_samples": len(test_set), "sparsify_s": round(elapsed, 1),
    }


def calibration_set(train_set: ImageSet, calib_samples: int, seed: int = 0) -> list[torch.Tensor]:
    return [images for images, _ in train_set.subset(calib_samples, seed).batches(64)]


def sparsify_and_evaluate(name: str, model: nn.Module, train_set: ImageSet, test_set: ImageSet, dense: float,
                          methods: Sequence[str], pattern, calib_samples: int, seed: int = 0,
                          batch_size: int = 500, bn: str = "both", dense_targets: str = "off",
                          augment: str | None = None, stats_correction: str | None = None,
                          permute: str | None = None) -> list[dict]:
    calib = calibration_set(train_set, calib_samples, seed)
    rows = []
    for method, bn_reestimate, targets in variants(model, methods, bn, dense_targets):
        options = dict(method=method, bn_reestimate=bn_reestimate, dense_targets=targets, augment=augment,
                       stats_correction=stats_correction,
                       permute_channels=None if permute is None else permute == "on")
        rows.append(prune_and_evaluate(name, model, calib, test_set, dense, pattern, options, batch_size))
    return rows


def write_rows(rows: list[dict], out: Path | None) -> None:
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def format_rows(rows: list[dict]) -> str:
    headers = ["model", "method", "bn_reestimate", "dense_targets", "stats_correction", "permute_channels",
               "augment", "pattern", "baseline", "pruned", "drop", "sparsify_s"]
    return tabulate([[row[h] for h in headers] for row in rows], headers=headers, tablefmt="github")


def prepare(name: str, args: argparse.Namespace) -> tuple[nn.Module, ImageSet, ImageSet, float]:
    """The trained model, its train and test sets (test possibly subsampled), and its dense test accuracy."""
    spec = MODELS[name]
    model, _ = load_or_train(name, args)
    train_set = load_dataset(spec.dataset, True, args.data_dir, args.cache_dir, args.download)
    test_set = load_dataset(spec.dataset, False, args.data_dir, args.cache_dir, args.download)
    if args.test_samples:
        test_set = test_set.subset(args.test_samples, args.seed)
    return model, train_set, test_set, evaluate(model, test_set, args.batch_size, desc=f"eval {name} dense")


def run_example(name: str, argv: Sequence[str] | None = None) -> list[dict]:
    args = build_parser(f"One-shot pruning of {name}: dense vs pruned accuracy.").parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    args.pattern = parse_pattern_arg(args.pattern)
    sgfx.parse_pattern(args.pattern)  # fail early on a bad pattern
    model, train_set, test_set, dense = prepare(name, args)
    rows = sparsify_and_evaluate(name, model, train_set, test_set, dense, args.methods, args.pattern,
                                 args.calib_samples, args.seed, args.batch_size, args.bn, args.dense_targets,
                                 args.augment, args.stats_correction, args.permute)
    print(format_rows(rows))
    write_rows(rows, args.out)
    return rows
