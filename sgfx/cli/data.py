"""Images from a folder, for the command line: calibration batches and labelled evaluation batches.

A folder is either an ImageFolder tree (``root/<class>/<image>``: labels are the sorted class folders' indices, as
torchvision's ``ImageFolder`` and ImageNet's validation layout give them) or a flat folder of images (no labels).
Images go through torchvision's standard evaluation transform: resize the short side, centre crop, scale to [0, 1],
normalise. Which images are used is drawn with a fixed seed, so a run is reproducible.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

__all__ = ["DataError", "ImageTransform", "ImageSet", "find_images", "IMAGE_EXTENSIONS"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class DataError(ValueError):
    """A data folder that cannot be used: missing, empty, or holding an unreadable image."""


@dataclass(frozen=True)
class ImageTransform:
    """Resize the short side to ``resize``, centre-crop ``size`` x ``size``, scale to [0, 1], normalise."""

    size: int = 224
    resize: int = 256
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    channels: int = 3

    def __post_init__(self) -> None:
        if self.size <= 0 or self.resize < self.size:
            raise ValueError(f"need 0 < size <= resize, got size={self.size}, resize={self.resize}")
        if len(self.mean) != self.channels or len(self.std) != self.channels or min(self.std) <= 0:
            raise ValueError(f"mean and std need {self.channels} values each (std > 0), got {self.mean}, {self.std}")

    def __call__(self, image) -> torch.Tensor:
        from torchvision.transforms import functional as TF

        image = image.convert("L" if self.channels == 1 else "RGB")
        image = TF.center_crop(TF.resize(image, self.resize, antialias=True), [self.size, self.size])
        return TF.normalize(TF.to_tensor(image), self.mean, self.std)


def find_images(root: str | Path) -> tuple[list[Path], list[int] | None, list[str]]:
    """(image paths, labels or None, class names) of an ImageFolder tree or a flat folder, in sorted order.

    Raises:
        DataError: ``root`` is not a directory, or holds no image with a known extension.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root} is not a directory (expected an ImageFolder tree or a folder of images)")
    is_image = lambda p: p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS  # noqa: E731
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and any(is_image(p) for p in d.iterdir()))
    if classes:
        paths, labels = [], []
        for label, name in enumerate(classes):
            found = sorted(p for p in (root / name).iterdir() if is_image(p))
            paths += found
            labels += [label] * len(found)
        return paths, labels, classes
    paths = sorted(p for p in root.iterdir() if is_image(p))
    if not paths:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {root} or its class folders")
    return paths, None, []


class ImageSet:
    """A seeded selection of ``count`` images of a folder (all when ``count`` is None), read batch by batch."""

    def __init__(self, root: str | Path, transform: ImageTransform, count: int | None = None, seed: int = 0):
        paths, labels, self.classes = find_images(root)
        if count is not None and count <= 0:
            raise ValueError(f"the number of images must be positive, got {count}")
        order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(seed)).tolist()
        if count is not None:
            if count > len(paths):
                logger.warning("asked for %d images, %s holds %d: using all of them", count, root, len(paths))
            order = sorted(order[:count])
        self.paths = [paths[i] for i in order]
        self.labels = None if labels is None else [labels[i] for i in order]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def _load(self, path: Path) -> torch.Tensor:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as image:
                return self.transform(image)
        except (OSError, UnidentifiedImageError) as exc:
            raise DataError(f"cannot read image {path}: {exc}") from None

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """(images (B, C, size, size), labels (B,) or None) in order."""
        for start in range(0, len(self.paths), batch_size):
            chunk: Sequence[Path] = self.paths[start:start + batch_size]
            images = torch.stack([self._load(p) for p in chunk])
            labels = None if self.labels is None else torch.tensor(self.labels[start:start + batch_size])
            yield images, labels
