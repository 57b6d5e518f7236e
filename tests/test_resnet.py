"""A randomly initialised CIFAR ResNet-18 end to end (the largest model of the fast suite)."""

import pytest
import torch

import sgfx
from models import cifar_resnet18, plain_sparsify, randomize_bn
from reference import conv_via_loops_ok


@pytest.fixture(scope="module")
def resnet_and_result():
    gen = torch.Generator().manual_seed(0)
    model = randomize_bn(cifar_resnet18(), gen).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calib = [torch.randn(16, 3, 32, 32, generator=gen) for _ in range(2)]
    with pytest.warns(UserWarning, match=r"weights stayed dense \(1 of .* input channels per group \(3\)"):
        gm = plain_sparsify(model, calib, "2:4")
    return model, before, calib, gm


def test_resnet18_every_eligible_layer_is_exactly_2_4(resnet_and_result):
    model, _, _, gm = resnet_and_result
    report = sgfx.get_report(gm)
    assert len(report.layers) == 21  # 20 convs + fc
    skipped = [r.name for r in report.layers if not r.pruned]
    assert skipped == ["conv1"]  # 3 input channels
    for record in report.pruned_layers:
        w = gm.get_parameter(record.weight_name)
        assert int((w != 0).sum()) <= w.numel() // 2, record.name
        assert 0.0 <= record.rel_error < 0.5
    assert sgfx.check_pattern(gm, "2:4")
    # the element-by-element reference (pure Python, ~5 us a weight) on one conv of each kind: 3x3 stride 1,
    # 3x3 stride 2, 1x1 stride-2 downsample; check_pattern above covers every layer
    for name in ("layer1.0.conv1", "layer2.0.conv1", "layer2.0.downsample.0"):
        assert conv_via_loops_ok(gm.get_submodule(name).weight, 2, 4), name


def test_resnet18_forward_and_model_untouched(resnet_and_result):
    model, before, calib, gm = resnet_and_result
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with torch.no_grad():
        out, ref = gm(calib[0]), model(calib[0])
    assert out.shape == (16, 10) and torch.isfinite(out).all()
    assert not torch.equal(out, ref)


@pytest.mark.slow  # a second ResNet-18 run (7 s); test_sparsify.test_same_result_twice is the fast check
def test_resnet18_same_result_twice(resnet_and_result):
    model, _, calib, gm = resnet_and_result
    with pytest.warns(UserWarning):
        again = plain_sparsify(model, calib, "2:4")
    for name, param in gm.named_parameters():
        assert torch.equal(param, again.get_parameter(name)), name


def test_resnet18_default_remedies_keep_the_pattern(resnet_and_result):
    """The default configuration (permutation, dense targets, statistics correction, BN re-estimation)."""
    model, _, calib, _ = resnet_and_result
    with pytest.warns(UserWarning, match=r"weights stayed dense \(1 of .* input channels per group \(3\)"):
        gm = sgfx.sparsify(model, calib, "2:4")
    report = sgfx.get_report(gm)
    assert len(report.permuted) == 8 and len(report.bn_reestimated) == 19  # not bn1: conv1 stays dense
    assert any(r.dense_targets for r in report.layers) and not report.stats_corrected  # fc: 32 samples < 512
    assert sgfx.check_pattern(gm, "2:4")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert gm(x).shape == (4, 10) and bool(torch.isfinite(gm(x)).all())
