"""BatchNorm re-estimation during the sweep: statistics equal those computed by hand on the pruned model."""

import pytest
import torch
import torch.nn.functional as F

import sgfx
from models import ConvBnNet, randomize_bn, plain_sparsify
from sgfx.engine.bn_reestimate import reestimate_batchnorm


def _calib(gen):
    return [torch.randn(16, 3, 16, 16, generator=gen) for _ in range(3)]


@pytest.mark.filterwarnings("ignore:sgfx.*left dense")
@pytest.mark.parametrize("method", ["sparsegpt", "magnitude"])
def test_bn_statistics_match_hand_computation(gen, method):
    model = randomize_bn(ConvBnNet(), gen).eval()
    calib = _calib(gen)
    gm = plain_sparsify(model, calib, "2:4", method=method)  # default: re-estimate
    assert sgfx.get_report(gm).bn_reestimated == ["bn2"]  # bn1 follows the dense (ineligible) conv1
    with torch.no_grad():
        feats = [gm.conv2(gm.pool(F.relu(gm.bn1(gm.conv1(x))))) for x in calib]  # pruned conv2's outputs
    per_channel = torch.cat([f.transpose(0, 1).reshape(32, -1) for f in feats], dim=1).double()
    torch.testing.assert_close(gm.bn2.running_mean.double(), per_channel.mean(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gm.bn2.running_var.double(), per_channel.var(1, unbiased=True), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gm.bn1.running_mean, model.bn1.running_mean, rtol=0, atol=0)
    assert not torch.allclose(gm.bn2.running_mean, model.bn2.running_mean)


@pytest.mark.filterwarnings("ignore:sgfx.*left dense")
def test_bn_reestimation_can_be_switched_off(gen):
    model = randomize_bn(ConvBnNet(), gen).eval()
    gm = plain_sparsify(model, _calib(gen), "2:4", bn_reestimate=False)
    assert sgfx.get_report(gm).bn_reestimated == []
    for name in ("bn1", "bn2"):
        assert torch.equal(getattr(gm, name).running_var, getattr(model, name).running_var)


@pytest.mark.filterwarnings("ignore:sgfx.*left dense")
def test_bn_reestimation_reduces_output_drift(gen):
    """With re-estimation, the pruned network's logits stay closer to the dense ones on held-out inputs."""
    model = randomize_bn(ConvBnNet(), gen).eval()
    calib = [torch.randn(32, 3, 16, 16, generator=gen) for _ in range(4)]
    held_out = torch.randn(64, 3, 16, 16, generator=gen)
    with torch.no_grad():
        # give the dense model statistics that fit its inputs, as a trained model's would
        reestimate_batchnorm(model.bn1, [model.conv1(x) for x in calib])
        reestimate_batchnorm(
            model.bn2, [model.conv2(model.pool(F.relu(model.bn1(model.conv1(x))))) for x in calib])
        dense = model(held_out)
        drift = {flag: (plain_sparsify(model, calib, "2:4", method="magnitude", bn_reestimate=flag)(held_out)
                        - dense).norm() for flag in (False, True)}
    assert drift[True] < drift[False]


def test_bad_bn_option():
    with pytest.raises(TypeError, match="bn_reestimate"):
        sgfx.SparsifyConfig("2:4", bn_reestimate="yes")


@pytest.mark.parametrize("shape", [(10, 3), (4, 3, 5, 5)], ids=["1d", "2d"])
def test_reestimate_pools_batches_and_keeps_constant_channels(shape, gen):
    """Pooled statistics of uneven batches, with a constant channel (a dead ReLU channel) getting variance 0."""
    from torch import nn


    bn = nn.BatchNorm1d(3) if len(shape) == 2 else nn.BatchNorm2d(3)
    inputs = [torch.randn(shape, generator=gen) * 3 + 1, torch.randn((shape[0] // 2, *shape[1:]), generator=gen)]
    for x in inputs:
        x[:, 1] = 2.0
    reestimate_batchnorm(bn, inputs)
    pooled = torch.cat([x.transpose(0, 1).reshape(3, -1) for x in inputs], dim=1).double()  # (C, all values)
    torch.testing.assert_close(bn.running_mean.double(), pooled.mean(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), pooled.var(1), rtol=1e-5, atol=1e-6)
    assert bn.running_var[1] == 0
