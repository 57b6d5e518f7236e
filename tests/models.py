"""Small models shared by the tests."""

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import sgfx

# Plain SparseGPT (no dense targets, permutation or statistics correction): what tests of the solve, the report
# and the other passes compare against references.
PLAIN = dict(dense_targets=False, permute_channels=False, stats_correction=False)


def plain_sparsify(model, calib, sparsity="2:4", **options):
    """``sgfx.sparsify`` with the remedies that change weights beyond the OBS solve switched off (unless given)."""
    return sgfx.sparsify(model, calib, sparsity, **{**PLAIN, **options})


class ConvBnNet(nn.Module):
    """conv-bn-relu-pool-linear, with a first conv whose 3 channels cannot take N:M."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        x = self.pool(F.relu(self.bn2(self.conv2(x))))
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(8, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 8, 3, padding=1, stride=2)

    def forward(self, x):
        return self.conv2(F.relu(self.conv1(x)))


class Functional(nn.Module):
    """F.conv2d / F.linear with parameters read through get_attr."""

    def __init__(self):
        super().__init__()
        self.w_conv = nn.Parameter(torch.randn(16, 8, 3, 3) * 0.2)
        self.w_fc = nn.Parameter(torch.randn(10, 16) * 0.2)
        self.b_fc = nn.Parameter(torch.zeros(10))

    def forward(self, x):
        x = F.relu(F.conv2d(x, self.w_conv, None, 1, 1))
        return F.linear(x.mean((2, 3)), self.w_fc, self.b_fc)


def cifar_resnet18():
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


def randomize_bn(model, gen):
    """Give BatchNorm layers non-trivial statistics so that eval-mode forward is not an identity."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model
