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


def cifar_resnet10():
    """ResNet-18's CIFAR stem and widths with one BasicBlock per stage (every kind of layer, half the work)."""
    model = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=10)
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


class AudioCNN(nn.Module):
    """A 1-D CNN over raw waveforms (M5-style): Conv1d stack, global pooling, Linear head."""

    def __init__(self, classes: int = 4, width: int = 32):
        super().__init__()
        self.conv1 = nn.Conv1d(1, width, 16, stride=4)
        self.bn1 = nn.BatchNorm1d(width)
        self.conv2 = nn.Conv1d(width, width, 3, padding=1)
        self.bn2 = nn.BatchNorm1d(width)
        self.conv3 = nn.Conv1d(width, 2 * width, 3, padding=1, dilation=1)
        self.bn3 = nn.BatchNorm1d(2 * width)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):  # (B, 1, T)
        x = F.max_pool1d(F.relu(self.bn1(self.conv1(x))), 4)
        x = F.max_pool1d(F.relu(self.bn2(self.conv2(x))), 4)
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc(x.mean(-1))


class UNet(nn.Module):
    """A two-level U-Net with transposed-conv upsampling and skip concatenations."""

    def __init__(self, channels: int = 3, classes: int = 4, width: int = 16):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

        self.down1, self.down2, self.bottom = block(channels, width), block(width, 2 * width), block(2 * width,
                                                                                                  4 * width)
        self.up2 = nn.ConvTranspose2d(4 * width, 2 * width, 2, stride=2)
        self.dec2 = block(4 * width, 2 * width)
        self.up1 = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
        self.dec1 = block(2 * width, width)
        self.head = nn.Conv2d(width, classes, 1)

    def forward(self, x):
        d1 = self.down1(x)
        d2 = self.down2(F.max_pool2d(d1, 2))
        b = self.bottom(F.max_pool2d(d2, 2))
        u2 = self.dec2(torch.cat([self.up2(b), d2], 1))
        u1 = self.dec1(torch.cat([self.up1(u2), d1], 1))
        return self.head(u1)


class Video3D(nn.Module):
    """A small 3-D CNN over clips (B, C, T, H, W)."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.stem = nn.Conv3d(3, 16, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False)
        self.bn = nn.BatchNorm3d(16)
        self.conv = nn.Conv3d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        return self.fc(F.relu(self.conv(x)).mean((2, 3, 4)))


class TinyTransformer(nn.Module):
    """Token embedding + self-attention encoder layers written with nn.MultiheadAttention, and a classifier."""

    def __init__(self, vocab: int = 50, dim: int = 32, heads: int = 4, layers: int = 2, batch_first: bool = True):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.batch_first = batch_first
        self.attn = nn.ModuleList(nn.MultiheadAttention(dim, heads, batch_first=batch_first) for _ in range(layers))
        self.norm = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))
        self.mlp = nn.ModuleList(nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
                                 for _ in range(layers))
        self.head = nn.Linear(dim, 4)

    def forward(self, tokens):  # (B, L) int64
        x = self.embed(tokens)
        if not self.batch_first:
            x = x.transpose(0, 1)
        for attn, norm, mlp in zip(self.attn, self.norm, self.mlp):
            h = norm(x)
            x = x + attn(h, h, h, need_weights=False)[0]
            x = x + mlp(x)
        return self.head(x.mean(1 if self.batch_first else 0))


class TinyYOLO(nn.Module):
    """A YOLO-style detector: conv backbone, two-scale neck with upsampling and concatenation, 1x1 detection heads
    predicting (x, y, w, h, objectness, classes) per anchor and cell; decoding boxes from the raw maps is left to
    post-processing, as in YOLO code bases."""

    def __init__(self, classes: int = 3, anchors: int = 2, width: int = 16):
        super().__init__()

        def cbl(cin, cout, k=3, s=1):
            return nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2, bias=False), nn.BatchNorm2d(cout),
                                 nn.LeakyReLU(0.1))

        self.stem = cbl(3, width, 3, 2)
        self.stage1 = nn.Sequential(cbl(width, 2 * width, 3, 2), cbl(2 * width, 2 * width))
        self.stage2 = nn.Sequential(cbl(2 * width, 4 * width, 3, 2), cbl(4 * width, 4 * width))
        self.lateral = cbl(4 * width, 2 * width, 1)
        self.fuse = cbl(4 * width, 2 * width)
        outputs = anchors * (5 + classes)
        self.head_small = nn.Conv2d(4 * width, outputs, 1)
        self.head_large = nn.Conv2d(2 * width, outputs, 1)

    def forward(self, x):
        c3 = self.stage1(self.stem(x))
        c4 = self.stage2(c3)
        up = F.interpolate(self.lateral(c4), scale_factor=2.0, mode="nearest")
        p3 = self.fuse(torch.cat([up, c3], 1))
        return self.head_small(c4), self.head_large(p3)


class TinyDetector(nn.Module):
    """An untraceable detector in the torchvision style: a backbone returning a dict of feature levels, a head
    shared across levels (it loops over a list), and data-dependent post-processing (score threshold, top-k per
    image) that torch.fx cannot trace. ``model(list_of_images)`` returns one dict per image."""

    def __init__(self, classes: int = 3, width: int = 16):
        super().__init__()
        self.backbone = TinyDetectorBackbone(width)
        self.head = TinyDetectorHead(2 * width, classes)
        self.calls_head_twice = False

    def forward(self, images: list):
        x = torch.stack(images)
        features = self.backbone(x)
        levels = list(features.values())
        logits, boxes = self.head(levels)
        if self.calls_head_twice:  # a submodule called several times per forward
            logits2, _ = self.head(levels[::-1])
            logits = [a + b.flip(0) * 0 for a, b in zip(logits, logits2[::-1])]
        results = []
        for i in range(x.shape[0]):
            scores = torch.cat([level[i].flatten(1).amax(0) for level in logits]).sigmoid()
            keep = scores > 0.5  # data-dependent: untraceable
            if int(keep.sum()) == 0:
                keep = scores >= scores.max()
            results.append({"scores": scores[keep].topk(min(5, int(keep.sum()))).values,
                            "boxes": torch.cat([b[i].flatten(1).T for b in boxes])[:5]})
        return results


class TinyDetectorBackbone(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1), nn.BatchNorm2d(width), nn.ReLU())
        self.c3 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, 2, 1), nn.BatchNorm2d(2 * width), nn.ReLU())
        self.c4 = nn.Sequential(nn.Conv2d(2 * width, 2 * width, 3, 2, 1), nn.BatchNorm2d(2 * width), nn.ReLU())

    def forward(self, x):
        c3 = self.c3(self.stem(x))
        return {"p3": c3, "p4": self.c4(c3)}


class TinyDetectorHead(nn.Module):
    def __init__(self, channels: int, classes: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.cls = nn.Conv2d(channels, classes, 1)
        self.box = nn.Conv2d(channels, 4, 1)

    def forward(self, features: list):
        logits, boxes = [], []
        for feature in features:  # one shared head for every level
            h = F.relu(self.conv(feature))
            logits.append(self.cls(h))
            boxes.append(self.box(h))
        return logits, boxes


def gated_mlp(x, w_in, w_out, w_gate):
    """A function torch.fx keeps whole (wrapped below): two F.linear uses of its weights, one matmul use."""
    return F.linear(F.relu(F.linear(x, w_in)), w_out) * torch.sigmoid(x @ w_gate)


torch.fx.wrap("gated_mlp")


class WrappedFunctionNet(nn.Module):
    """Weights passed into a wrapped function (as torchvision's Swin passes qkv/proj to shifted_window_attention)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.w_in = nn.Parameter(torch.randn(32, 16) / 4)
        self.w_out = nn.Parameter(torch.randn(16, 32) / 6)
        self.w_gate = nn.Parameter(torch.randn(16, 16) / 4)

    def forward(self, x):
        return gated_mlp(self.fc(x), self.w_in, self.w_out, self.w_gate)
