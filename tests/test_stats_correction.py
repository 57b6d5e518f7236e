"""Statistics correction: after it, each corrected layer's per-channel output mean differs from the dense model's by
at most the standard error of the paired differences (and its std equals the dense one with "mean_std"), computed
here by hand with forward hooks on the dense model and the pruned result."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sgfx
from models import ConvBnNet, Functional, randomize_bn, plain_sparsify
from sgfx.engine import stats_correction as sc


class NoBnNet(nn.Module):
    """VGG-like: convs (one without bias) and a classifier, no BatchNorm anywhere."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(8, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


def _calib(gen, channels=8):
    return [torch.randn(16, channels, 16, 16, generator=gen) for _ in range(3)]


def _channel_outputs(model, names, batches):
    """Per-channel rows (C, samples) of each named layer's outputs over all batches, float64."""
    seen = {name: [] for name in names}
    handles = [getattr(model, name).register_forward_hook(lambda m, i, o, name=name: seen[name].append(o))
               for name in names]
    with torch.no_grad():
        for x in batches:
            model(x)
    for h in handles:
        h.remove()
    rows = {}
    for name, outs in seen.items():
        dim = 1 if outs[0].dim() == 4 else -1
        rows[name] = torch.cat([o.movedim(dim, 0).reshape(o.shape[dim], -1) for o in outs], 1).double()
    return rows


def _paired(model, gm, names, batches):
    """Per-channel paired differences (pruned - dense) of each named layer's outputs: mean, standard error, std."""
    dense, pruned = _channel_outputs(model, names, batches), _channel_outputs(gm, names, batches)
    result = {}
    for name in names:
        d = pruned[name] - dense[name]
        result[name] = (d.mean(1), d.std(1, unbiased=False) / d.shape[1] ** 0.5, pruned[name], dense[name])
    return result


@pytest.mark.parametrize("pattern", ["2:4", 0.5])
@pytest.mark.parametrize("mode", ["mean", "mean_std"])
def test_corrected_layers_keep_no_significant_shift(gen, pattern, mode):
    """After the correction every channel's remaining mean shift is within one standard error of the paired
    differences (the shrunk shift leaves exactly se²/shift when it applies); without it, many channels are not."""
    model = NoBnNet().eval()
    calib = _calib(gen)
    layers = ["conv1", "conv2"]  # fc1/fc2: 48 samples (one per image) < their columns: left alone
    gm = plain_sparsify(model, calib, pattern, stats_correction=mode)
    assert sgfx.get_report(gm).stats_corrected == layers
    for name in ("fc1", "fc2"):
        assert torch.equal(getattr(gm, name).bias, getattr(model, name).bias)  # never corrected
    plain = plain_sparsify(model, calib, pattern)
    corrected, uncorrected = _paired(model, gm, layers, calib), _paired(model, plain, layers, calib)
    for name in layers:
        shift, se, pruned, dense = corrected[name]
        bound = se * (1 + 1e-6) + 1e-9 if mode == "mean" else 3 * se + 1e-9
        assert bool((shift.abs() <= bound).all()), name
        if mode == "mean_std":
            torch.testing.assert_close(pruned.std(1), dense.std(1), rtol=1e-4, atol=1e-6)
    significant = sum(int((s.abs() > 2 * e).sum()) for s, e, _, _ in uncorrected.values())
    assert significant > 10  # the uncorrected model has real shifts for the test to catch
    assert sgfx.check_pattern(gm, pattern)
    # the first layer sees the same inputs with and without correction: same mask (scaling keeps zeros)
    assert torch.equal(gm.conv1.weight == 0, plain.conv1.weight == 0)
    for record in sgfx.get_report(gm).layers:  # no pruned weight revived by the scaling
        assert float((getattr(gm, record.name).weight == 0).float().mean()) == record.sparsity


def test_shift_is_shrunk_by_its_standard_error():
    gen = torch.Generator().manual_seed(0)
    dense = [torch.randn(64, 3, generator=gen) for _ in range(4)]
    true_shift = torch.tensor([2.0, 0.0, 0.05])  # clear, none, within noise for 256 samples of unit noise
    pruned = [d + true_shift + 0.5 * torch.randn(64, 3, generator=gen) for d in dense]
    correction = sc.channel_correction(pruned, dense, -1, "mean")
    d = torch.cat(pruned).double() - torch.cat(dense).double()
    mean, var = d.mean(0), d.var(0, unbiased=False)
    k = (1 - var / (len(d) * mean.square())).clamp(0, 1)
    torch.testing.assert_close(correction.shift, -k * mean)
    assert k[0] > 0.99 and k[2] < 0.9
    corrected = torch.cat([correction.apply(y, -1) for y in pruned]).double()
    assert abs(float(corrected[:, 0].mean() - torch.cat(dense)[:, 0].double().mean())) < 0.01


def test_bias_is_created_and_the_model_is_not_mutated(gen):
    model = NoBnNet().eval()
    gm = sgfx.sparsify(model, _calib(gen), "2:4", stats_correction="mean")
    assert model.conv2.bias is None
    assert isinstance(gm.conv2.bias, nn.Parameter) and gm.conv2.bias.shape == (32,)
    assert gm.conv2.bias.abs().sum() > 0


def test_no_bias_is_created_where_no_correction_is_made(gen):
    model = NoBnNet().eval()
    gm = sgfx.sparsify(model, torch.randn(1, 8, 16, 16, generator=gen), "2:4", stats_correction="mean")
    assert sgfx.get_report(gm).stats_corrected == ["conv1"]  # conv2: 64 positions < 144 columns
    assert gm.conv2.bias is None


def test_corrected_model_saves_and_loads(gen, tmp_path):
    model = NoBnNet().eval()
    gm = sgfx.sparsify(model, _calib(gen), "2:4", stats_correction="mean_std")
    sgfx.save(gm, tmp_path / "m.sgfx")
    loaded = sgfx.load(tmp_path / "m.sgfx")
    x = torch.randn(4, 8, 16, 16, generator=gen)
    assert torch.equal(loaded(x), gm(x))
    assert sgfx.get_report(loaded).stats_corrected == sgfx.get_report(gm).stats_corrected


@pytest.mark.filterwarnings("ignore:sgfx.*left dense")
def test_layers_feeding_a_reestimated_batchnorm_are_left_to_it(gen):
    model = randomize_bn(ConvBnNet(), gen).eval()
    calib = _calib(gen, channels=3)
    gm = sgfx.sparsify(model, calib, "2:4", stats_correction="mean")
    assert sgfx.get_report(gm).stats_corrected == []  # conv2 -> bn2 is re-estimated; fc1/fc2 have too few samples
    assert torch.equal(gm.conv2.bias, sgfx.sparsify(model, calib, "2:4").conv2.bias)
    gm = sgfx.sparsify(model, calib, "2:4", stats_correction="mean", bn_reestimate=False)
    assert sgfx.get_report(gm).stats_corrected == ["conv2"]


def test_functional_layer_without_a_bias_attribute_warns(gen):
    model = Functional().eval()
    with pytest.warns(UserWarning, match="w_conv: no bias"):
        gm = sgfx.sparsify(model, _calib(gen), "2:4", stats_correction="mean")
    assert sgfx.get_report(gm).stats_corrected == ["w_fc"]


@pytest.mark.parametrize("bad", ["median", "MEAN", True])
def test_rejects_unknown_mode(gen, bad):
    with pytest.raises(ValueError, match="stats_correction"):
        sgfx.sparsify(NoBnNet(), _calib(gen), "2:4", stats_correction=bad)
