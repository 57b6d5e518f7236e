"""Efficient networks of the kind people deploy, trained here: a MobileNetV3-style CIFAR-10 classifier.

``MobileNetCIFAR`` has what the seed models lack: depthwise 3x3/5x5 convs, squeeze-and-excitation, hard-swish,
inverted residuals and small channel counts. Its depthwise convs (one input channel per group) cannot take N:M
and stay dense with that reason; every pointwise conv, the SE layers and the classifier are prunable.

    python examples/efficient.py --train                 # train (about an hour on 2 cores), cache the checkpoint
    python examples/efficient.py --patterns 2:4          # prune with each remedy on/off, paired differences

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
