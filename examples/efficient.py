"""Efficient networks of the kind people deploy, trained here: a MobileNetV3-style CIFAR-10 classifier.

``MobileNetCIFAR`` has what the seed models lack: depthwise 3x3/5x5 convs, squeeze-and-excitation, hard-swish,
inverted residuals and small channel counts. Its depthwise convs (one input channel per group) cannot take N:M
and stay dense with that reason; every pointwise conv, the SE layers and the classifier are prunable.

    python examples/efficient.py --train-only            # train (about 40 min on 2 cores), cache the checkpoint
    python examples/efficient.py --out runs/efficient    # prune with each remedy on/off, paired differences

``ShapesUNet`` is a small U-Net whose decoder upsamples with transposed convs, trained on synthetic shapes
(:func:`synthetic_shapes`, no download) and scored by per-image mean IoU.

The checkpoint is cached under ``--cache-dir`` (default ``~/.cache/sgfx``) as ``checkpoints/mobilenet_cifar_e*.pt``
with a JSON file beside it giving the recipe, the time and the dense accuracy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _hswish(x: torch.Tensor) -> torch.Tensor:
    return F.hardswish(x)


class SqueezeExcite(nn.Module):
    """Channel attention: global average, a 1x1 bottleneck (ReLU), a 1x1 expansion (hard-sigmoid), a product."""

    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = F.adaptive_avg_pool2d(x, 1)
        return x * F.hardsigmoid(self.expand(F.relu(self.reduce(scale))))


class InvertedResidual(nn.Module):
    """MobileNetV3 block: 1x1 expansion, depthwise k x k, optional SE, 1x1 projection; residual when shapes allow."""

    def __init__(self, c_in: int, expanded: int, c_out: int, kernel: int, stride: int, se: bool, hswish: bool):
        super().__init__()
        self.act = _hswish if hswish else F.relu
        self.expand = nn.Conv2d(c_in, expanded, 1, bias=False) if expanded != c_in else None
        self.bn1 = nn.BatchNorm2d(expanded) if self.expand is not None else None
        self.depthwise = nn.Conv2d(expanded, expanded, kernel, stride, kernel // 2, groups=expanded, bias=False)
        self.bn2 = nn.BatchNorm2d(expanded)
        self.se = SqueezeExcite(expanded, max(8, expanded // 4)) if se else None
        self.project = nn.Conv2d(expanded, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.expand is None else self.act(self.bn1(self.expand(x)))
        h = self.act(self.bn2(self.depthwise(h)))
        if self.se is not None:
            h = self.se(h)
        h = self.bn3(self.project(h))
        return x + h if self.residual else h


# (kernel, expanded, out, SE, hard-swish, stride): MobileNetV3-Small's table, strides adapted to 32x32 inputs
_BLOCKS = [
    (3, 16, 16, True, False, 1),
    (3, 72, 24, False, False, 2),
    (3, 88, 24, False, False, 1),
    (5, 96, 40, True, True, 2),
    (5, 240, 40, True, True, 1),
    (5, 240, 40, True, True, 1),
    (5, 120, 48, True, True, 1),
    (5, 144, 48, True, True, 1),
    (5, 288, 96, True, True, 2),
    (5, 576, 96, True, True, 1),
    (5, 576, 96, True, True, 1),
]


class MobileNetCIFAR(nn.Module):
    """MobileNetV3-Small-style classifier for 3x32x32 inputs (stride-1 stem; 8x8 -> 4x4 at the last stage)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.stem_bn = nn.BatchNorm2d(16)
        blocks, c_in = [], 16
        for kernel, expanded, c_out, se, hswish, stride in _BLOCKS:
            blocks.append(InvertedResidual(c_in, expanded, c_out, kernel, stride, se, hswish))
            c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Conv2d(c_in, 576, 1, bias=False)
        self.head_bn = nn.BatchNorm2d(576)
        self.fc1 = nn.Linear(576, 1024)
        self.fc2 = nn.Linear(1024, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _hswish(self.stem_bn(self.stem(x)))
        x = self.blocks(x)
        x = _hswish(self.head_bn(self.head(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc2(_hswish(self.fc1(x)))


# ------------------------------------------------------------------------- segmentation with transposed convs
SHAPE_CLASSES = ("background", "disc", "square", "triangle")


def synthetic_shapes(count: int, size: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` RGB images (float, normalised noise background) with 1-3 filled discs, squares and triangles each,
    and their (count, size, size) int64 masks (later shapes drawn over earlier ones). Deterministic in ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    images = 0.3 * torch.randn(count, 3, size, size, generator=gen)
    masks = torch.zeros(count, size, size, dtype=torch.int64)
    for n in range(count):
        for _ in range(int(torch.randint(1, 4, (1,), generator=gen))):
            kind = int(torch.randint(1, 4, (1,), generator=gen))
            cy, cx = (torch.rand(2, generator=gen) * (size - 16) + 8).tolist()
            radius = float(torch.rand(1, generator=gen)) * size / 8 + size / 16
            if kind == 1:
                inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2
            elif kind == 2:
                inside = ((yy - cy).abs() <= radius) & ((xx - cx).abs() <= radius)
            else:  # an upright triangle: below its apex, inside the two slanted sides
                inside = (yy <= cy + radius) & ((xx - cx).abs() <= (yy - (cy - radius)) / 2)
            colour = torch.rand(3, 1, 1, generator=gen) * 2 - 1
            images[n] = torch.where(inside, colour + 0.1 * torch.randn(3, size, size, generator=gen), images[n])
            masks[n][inside] = kind
    return images, masks


class ShapesUNet(nn.Module):
    """A three-level U-Net whose decoder upsamples with ConvTranspose2d (stride 2), as segmentation and DBNet-style
    text-detection heads do; 4 classes."""

    def __init__(self, width: int = 16, classes: int = len(SHAPE_CLASSES)):
        super().__init__()

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
                                 nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())

        self.enc1, self.enc2, self.enc3 = block(3, width), block(width, 2 * width), block(2 * width, 4 * width)
        self.up2 = nn.ConvTranspose2d(4 * width, 2 * width, 2, stride=2)
        self.dec2 = block(4 * width, 2 * width)
        self.up1 = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
        self.dec1 = block(2 * width, width)
        self.head = nn.Conv2d(width, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        e3 = self.enc3(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(e3), e2], 1))
        return self.head(self.dec1(torch.cat([self.up1(d2), e1], 1)))


def per_image_iou(model: nn.Module, images: torch.Tensor, masks: torch.Tensor, batch_size: int = 100) -> torch.Tensor:
    """Per image, the mean IoU over the shape classes present in its mask or its prediction (background excluded)."""
    scores = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            predicted = model(images[start:start + batch_size]).argmax(1)
            truth = masks[start:start + batch_size]
            for p, t in zip(predicted, truth):
                ious = [float(((p == c) & (t == c)).sum()) / float(((p == c) | (t == c)).sum())
                        for c in range(1, len(SHAPE_CLASSES)) if bool(((p == c) | (t == c)).any())]
                scores.append(sum(ious) / len(ious) if ious else 1.0)
    return torch.tensor(scores, dtype=torch.float64)


def train_shapes_unet(cache, seed: int = 0, epochs: int = 6, train_images: int = 4000):
    """Train (or load from ``cache``) the U-Net on synthetic shapes: Adam 1e-3 with cosine decay, batch 32."""
    import json
    import time
    from pathlib import Path

    path = Path(cache) / "checkpoints" / f"shapes_unet_e{epochs}_n{train_images}_s{seed}.pt"
    model = ShapesUNet()
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval(), path
    images, masks = synthetic_shapes(train_images, seed=seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    steps = epochs * (train_images // 32)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    started = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(train_images, generator=torch.Generator().manual_seed(seed + epoch))
        for start in range(0, train_images - 31, 32):
            chunk = order[start:start + 32]
            loss = F.cross_entropy(model(images[chunk]), masks[chunk])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        print(f"shapes U-Net epoch {epoch + 1}/{epochs}: loss {float(loss.detach()):.3f}", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    path.with_suffix(".json").write_text(json.dumps({
        "model": "ShapesUNet", "data": f"synthetic_shapes({train_images}, seed={seed})", "epochs": epochs,
        "batch_size": 32, "optimizer": "Adam 1e-3, cosine", "train_seconds": round(time.perf_counter() - started),
        "torch": torch.__version__}, indent=2))
    return model.eval(), path


def classifier_task(args, name: str = "mobilenet_cifar"):
    """A classifier of ``common.MODELS`` (the MobileNet-style one by default; the seed models load their shared
    checkpoints) on its dataset: 256 calibration images, the full test split."""
    import common
    from remedies import Task
    from sgfx.cli.evaluation import topk_correct

    model, _ = common.load_or_train(name, args)
    spec = common.MODELS[name]
    train_set = common.load_dataset(spec.dataset, True, args.data_dir, args.cache_dir, args.download)
    test_set = common.load_dataset(spec.dataset, False, args.data_dir, args.cache_dir, args.download)
    calib = common.calibration_set(train_set, args.calib_samples, args.seed)
    unlabeled = [images for images, _ in train_set.subset(args.unlabeled, args.seed + 1).batches(128)]
    probe = next(test_set.batches(64))[0]
    return Task(name, model, calib,
                       lambda m: topk_correct(m, test_set.batches(500), ks=(1,))[1], "top-1 %", unlabeled, "kl",
                       probe)


def segmentation_task(args):
    """The shapes U-Net: 256 calibration images, 1000 test images, per-image mean IoU."""
    from remedies import Task

    model, _ = train_shapes_unet(args.cache_dir, args.seed)
    test_images, test_masks = synthetic_shapes(1000, seed=args.seed + 1)
    calib = list(synthetic_shapes(args.calib_samples, seed=args.seed + 2)[0].split(64))
    unlabeled = list(synthetic_shapes(args.unlabeled // 2, seed=args.seed + 3)[0].split(32))
    return Task("shapes_unet", model, calib, lambda m: per_image_iou(m, test_images, test_masks), "mIoU %",
                unlabeled, "mse", test_images[:16])


def main(argv=None) -> None:
    """Train (or load from the cache) the chosen models, print their dense metric, then, unless ``--train-only``,
    prune each with every remedy switched off in turn (seed models: the default and per-layer targets only) and
    print the paired differences; ``--out`` writes the rows as JSON."""
    import json
    import logging

    import common

    parser = common.build_parser("Efficient networks trained here: dense accuracy and one-shot pruning.")
    parser.add_argument("--train-only", action="store_true", help="train/load and evaluate the dense models only")
    parser.add_argument("--tasks", nargs="+", choices=["classifier", "segmentation", "cifar_cnn", "resnet18_cifar",
                                                       "mnist_cnn"], default=["classifier", "segmentation"],
                        help="the efficient models (classifier, segmentation) or a seed model, for which only the "
                             "default and per-layer targets run")
    parser.add_argument("--variants", nargs="+", help="only these rows of remedies.VARIANTS (default: all)")
    parser.add_argument("--unlabeled", type=int, default=2048,
                        help="unlabeled training images for label-free recovery (the U-Net uses half as many)")
    parser.add_argument("--recovery-epochs", type=int, default=2)
    parser.add_argument("--recovery-lr", type=float, default=0.005)
    parser.add_argument("--no-recovery", action="store_true", help="one-shot rows only (no label-free recovery)")
    parser.add_argument("--recovery-augment", action="store_true",
                        help="new random crops and flips of the unlabeled images in every recovery epoch")
    parser.add_argument("--recovery-channels-last", action="store_true",
                        help="run the recovery's training in channels-last (faster for depthwise convs here)")
    parser.add_argument("--skip", nargs="+", default=[], help="layer names or globs every variant leaves dense")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    import remedies

    rows = []
    for name in args.tasks:
        variants, recovery = None, True
        if name != "segmentation":
            task = classifier_task(args, "mobilenet_cifar" if name == "classifier" else name)
            if name != "classifier":
                variants = {k: remedies.VARIANTS[k] for k in ("default", "per-layer targets (held out)")}
                recovery = False
        else:
            task = segmentation_task(args)
        if args.train_only:  # the dense metric (run_task's first row otherwise)
            dense = 100 * float(task.score(task.model).double().mean())
            print(json.dumps({"model": task.name, task.metric: round(dense, 2)}), flush=True)
        if args.variants:
            variants = {k: remedies.VARIANTS[k] for k in args.variants}
        if args.skip:
            variants = {f"{label}, skip {' '.join(args.skip)}": {**options, "skip": args.skip}
                        for label, options in (variants or remedies.VARIANTS).items()}
        if args.recovery_augment:
            task.unlabeled = remedies.Augmented(task.unlabeled, common.crop_and_flip, args.seed + 4)
        if not args.train_only:
            rows += remedies.run_task(task, str(args.pattern), variants, args.recovery_epochs, args.recovery_lr,
                                      recovery and not args.no_recovery, args.recovery_channels_last)
            print(remedies.report([r for r in rows if r["model"] == task.name]), flush=True)
    if rows:
        remedies.report(rows, args.out)


if __name__ == "__main__":
    main()
