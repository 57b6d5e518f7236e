"""Conv subclasses with their own forward (run-time "same" padding, weight standardisation) and timm models."""

import math

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

import sgfx
import sgfx.engine.layer_step
from models import plain_sparsify
from reference import conv_column_permutation, hessian_of

pytestmark = pytest.mark.filterwarnings("ignore:sgfx.*stayed dense")


class SamePadConv(nn.Conv2d):
    """TensorFlow "same" padding computed from the input size at run time (as timm's Conv2dSame): untraceable."""

    def forward(self, x):
        pads = []
        for size, k, s in zip(x.shape[-2:][::-1], self.kernel_size[::-1], self.stride[::-1]):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class StdConv(nn.Conv2d):
    """Weight-standardised conv (as NFNets' ScaledStdConv2d): the conv sees a function of the parameter."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Net(nn.Module):
    def __init__(self, conv_cls):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1)
        self.conv2 = conv_cls(8, 16, 3, stride=2)
        self.conv3 = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        return self.conv3(F.relu(self.conv2(F.relu(self.conv1(x)))))


def test_run_time_padding_conv_is_kept_whole_and_pruned_from_its_padded_input(gen, solved_hessians):
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(Net(SamePadConv))  # plain tracing fails on the run-time padding
    model = Net(SamePadConv).eval()
    calib = [torch.randn(2, 4, 9, 9, generator=gen) for _ in range(2)]
    gm = plain_sparsify(model, calib, "2:4")  # no leaf_modules needed
    records = {r.name: r for r in sgfx.get_report(gm).layers}
    assert records["conv2"].pruned and records["conv2"].op == "SamePadConv"
    assert sgfx.check_pattern(gm, "2:4")
    perm = conv_column_permutation(8, (3, 3))

    def by_hand(conv1):  # 9x9 input, stride 2, k 3: "same" pads 1 on each side
        rows = []
        for x in calib:
            cols = F.unfold(F.pad(F.relu(conv1(x)), [1, 1, 1, 1]), 3, stride=2)
            rows.append(cols.transpose(1, 2).reshape(-1, cols.shape[1]))
        return hessian_of(torch.cat(rows))[perm][:, perm]

    with torch.no_grad():
        torch.testing.assert_close(dict(solved_hessians)[(16, 72)], by_hand(gm.conv1), rtol=1e-4, atol=1e-5)


def test_weight_standardised_conv_is_reported_unless_folding_is_allowed(gen):
    model = Net(StdConv).eval()
    calib = [torch.randn(2, 4, 9, 9, generator=gen) for _ in range(2)]
    gm = sgfx.sparsify(model, calib, "2:4")
    record = {r.name: r for r in sgfx.get_report(gm).layers}["conv2"]
    assert not record.pruned and "transforms its weight" in record.reason and "fold_weight_transforms" in record.reason
    assert torch.equal(gm.conv2.weight, model.conv2.weight)  # untouched
    folded = sgfx.sparsify(model, calib, "2:4", fold_weight_transforms=True)
    report = sgfx.get_report(folded)
    assert report.folded == ["conv2"] and type(folded.conv2) is nn.Conv2d
    assert {r.name: r for r in report.layers}["conv2"].pruned and sgfx.check_pattern(folded, "2:4")
    # the fold itself is exact: the folded conv equals the standardised one before pruning
    from sgfx.layers import fold_weight_transforms

    traced = sgfx.passes.trace.trace(model)
    x = torch.randn(2, 8, 9, 9, generator=gen)
    with torch.no_grad():
        expected = model.conv2(x)
        assert fold_weight_transforms(traced, {"conv2": x}) == ["conv2"]
        torch.testing.assert_close(traced.conv2(x), expected, rtol=1e-5, atol=1e-6)


def test_timm_models_with_same_padding_standardised_convs_and_leaf_blocks(gen):
    timm = pytest.importorskip("timm")
    calib = [torch.randn(2, 3, 32, 32, generator=gen)]
    # TensorFlow-ported: Conv2dSame (run-time padding) where stride > 1
    tf = sgfx.sparsify(timm.create_model("tf_mobilenetv3_small_minimal_100", num_classes=4).eval(), calib, "2:4")
    same = [r for r in sgfx.get_report(tf).layers if r.op == "Conv2dSame"]
    assert same and all(r.pruned or "not divisible" in r.reason for r in same)
    assert sgfx.check_pattern(tf, "2:4")
    # NFNet: ScaledStdConv2d inside timm's registered leaf NormFreeBlock
    nf = timm.create_model("nf_resnet26", num_classes=4).eval()
    kept = sgfx.get_report(sgfx.sparsify(nf, calib, "2:4"))
    assert not any(r.pruned for r in kept.layers if r.op == "ScaledStdConv2d")
    folded = sgfx.sparsify(nf, calib, "2:4", fold_weight_transforms=True)
    report = sgfx.get_report(folded)
    assert len(report.folded) == 29 and len(report.pruned_layers) == 29  # all but the 3-channel stem
    assert sgfx.check_pattern(folded, "2:4")
