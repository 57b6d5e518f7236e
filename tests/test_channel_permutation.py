"""Channel permutation: the dense function is unchanged, the search never loses saliency, pruning stays valid."""

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

import sgfx
from models import ConvBnNet, cifar_resnet10, randomize_bn
from sgfx.config import NMPattern
from sgfx.passes.channel_permutation import (
    _best_swaps, find_permutation_groups, kept_saliency, permute_channel_groups, search_permutation,
)
from sgfx.layers import find_prunable_layers
from sgfx.passes.trace import trace


class VggLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                                      nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(inplace=True),
                                      nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Dropout(), nn.Linear(64, 32),
                                        nn.ReLU(), nn.Dropout(), nn.Linear(32, 10))

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class FunctionalActs(nn.Module):
    """Producer -> F.relu / max_pool2d / x.relu() fan-out to two consumers."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        y = F.max_pool2d(F.relu(self.conv1(x)), 2).relu()
        return self.conv2(y) + self.conv3(y)


CASES = {  # model, input, expected producers
    "convbn": (ConvBnNet, (3, 16, 16), ["conv1", "fc1"]),
    "resnet10": (cifar_resnet10, (3, 16, 16), [f"layer{i}.0.conv1" for i in range(1, 5)]),
    "vgg_like": (VggLike, (3, 16, 16), ["features.0", "features.3", "classifier.0", "classifier.3"]),
    "functional": (FunctionalActs, (3, 16, 16), ["conv1"]),
}


def _traced(name, gen):
    build, shape, producers = CASES[name]
    model = build().eval()
    randomize_bn(model, gen)
    for p in model.parameters():  # uneven channel scales, so that the order matters
        if p.dim() > 1:
            p.data *= torch.rand(p.shape[0], *[1] * (p.dim() - 1), generator=gen) * 2
    return trace(model, (), None), shape, producers


@pytest.mark.parametrize("name", list(CASES))
def test_permutation_leaves_the_dense_function_unchanged(gen, name):
    gm, shape, producers = _traced(name, gen)
    batches = [torch.randn(8, *shape, generator=gen) for _ in range(2)]
    x = torch.randn(4, *shape, generator=gen)
    with torch.no_grad():
        before = gm(x)
        groups = permute_channel_groups(gm, batches, set(find_prunable_layers(gm)), NMPattern(2, 4))
        after = gm(x)
    assert [g.name for g in groups] == producers
    assert any(not torch.equal(g.permutation, torch.arange(len(g.permutation))) for g in groups)
    for g in groups:
        assert sorted(g.permutation.tolist()) == list(range(len(g.permutation)))
        assert g.kept_after >= g.kept_before
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_residual_streams_and_flatten_are_not_permuted(gen):
    gm, _, _ = _traced("resnet10", gen)
    groups = find_permutation_groups(gm, set(find_prunable_layers(gm)), NMPattern(2, 4))
    assert all(g.name.endswith("conv1") and g.name != "conv1" for g in groups)  # not the stem: it feeds an add
    gm, _, _ = _traced("vgg_like", gen)
    names = [g.name for g in find_permutation_groups(gm, set(find_prunable_layers(gm)), NMPattern(2, 4))]
    assert "features.5" not in names  # its channels are flattened into classifier.0


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_best_swap_matches_brute_force(n, m):
    g = torch.Generator().manual_seed(1)
    a = torch.rand(7, 5, m, generator=g, dtype=torch.float64)
    b = torch.rand(7, 5, m, generator=g, dtype=torch.float64)
    a[0, 0, 1] = a[0, 0, 2]  # a tie
    gain, i, j = _best_swaps(a, b, n)

    def kept(x):
        return float(x.topk(n, -1).values.sum())

    for p in range(5):
        candidates = []
        for ii in range(m):
            for jj in range(m):
                a2, b2 = a[:, p].clone(), b[:, p].clone()
                a2[:, ii], b2[:, jj] = b[:, p, jj], a[:, p, ii]
                candidates.append(kept(a2) + kept(b2) - kept(a[:, p]) - kept(b[:, p]))
        assert gain[p].item() == pytest.approx(max(candidates), abs=1e-9)
        assert candidates[int(i[p]) * m + int(j[p])] == pytest.approx(max(candidates), abs=1e-9)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_search_spreads_strong_channels(n, m):
    g = torch.Generator().manual_seed(0)
    channels = 8 * m
    scale = torch.ones(channels)
    scale[:m] = 10.0  # all strong channels in the first group: the identity order must prune some of them
    saliency = (torch.rand(64, channels, generator=g, dtype=torch.float64) * scale).square()
    pattern = NMPattern(n, m)
    order = search_permutation(saliency, pattern)
    assert sorted(order.tolist()) == list(range(channels))
    identity = kept_saliency(saliency, torch.arange(channels), pattern)
    assert kept_saliency(saliency, order, pattern) > identity * 1.05
    strong_per_group = (order.view(-1, m) < m).sum(1)
    assert int(strong_per_group.max()) <= max(1, -(-m // 8))


def test_sparsify_with_permutation_is_valid_and_saves(gen, tmp_path):
    model = VggLike().eval()
    calib = [torch.randn(16, 3, 16, 16, generator=gen) for _ in range(2)]
    with pytest.warns(UserWarning, match=r"stayed dense \(1 of 6 weight tensors\): input channels per group \(3\)"):
        gm = sgfx.sparsify(model, calib, "2:4", permute_channels=True)
    report = sgfx.get_report(gm)
    assert [p["producer"] for p in report.permuted] == ["features.0", "features.3", "classifier.0", "classifier.3"]
    assert sgfx.check_pattern(gm, "2:4")
    x = torch.randn(4, 3, 16, 16, generator=gen)
    with torch.no_grad():
        dense, pruned = model(x), gm(x)
    assert float((dense - pruned).norm() / dense.norm()) < 0.5
    sgfx.save(gm, tmp_path / "m.sgfx")
    loaded = sgfx.load(tmp_path / "m.sgfx")
    assert torch.equal(loaded(x), gm(x))
    assert sgfx.get_report(loaded).permuted == report.permuted


def test_permutation_options_are_validated(gen):
    calib = torch.randn(4, 3, 16, 16, generator=gen)
    with pytest.raises(ValueError, match="N:M"):
        sgfx.sparsify(VggLike(), calib, 0.5, permute_channels=True)
    with pytest.raises(TypeError, match="permute_channels"):
        sgfx.sparsify(VggLike(), calib, "2:4", permute_channels="yes")


def test_modules_called_more_than_once_are_not_permuted(gen):
    """A consumer (or producer) shared by two calls: permuting it for one call would change the other."""

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(8, 16, 3, padding=1)
            self.b = nn.Conv2d(8, 16, 3, padding=1)
            self.head = nn.Conv2d(16, 8, 1)  # applied to both branches

        def forward(self, x):
            return self.head(torch.relu(self.a(x))) + self.head(torch.relu(self.b(x)))

    model = Shared().eval()
    gm = torch.fx.symbolic_trace(model)
    assert find_permutation_groups(gm, set(find_prunable_layers(gm)) | set(gm.graph.nodes), NMPattern(2, 4)) == []
    x = torch.randn(2, 8, 6, 6, generator=gen)
    pruned = sgfx.sparsify(model, x, "2:4", permute_channels=True, dense_targets=False, stats_correction=False)
    assert sgfx.get_report(pruned).permuted == []


@pytest.mark.parametrize("model_fn", [VggLike, lambda: randomize_bn(ConvBnNet(), torch.Generator().manual_seed(3))],
                         ids=["vgg-like", "conv-bn"])
def test_permutation_chosen_in_the_sweep_equals_the_pass_before_it(gen, monkeypatch, model_fn):
    """With dense targets the sweep takes the saliencies from its dense copy (no forward pass of its own) and
    permutes each producer after it was pruned: the same orders and, up to rounding, the same model as the
    permutation pass before the sweep."""
    import sgfx.engine.pipeline as pipeline

    model = model_fn().eval()
    calib = [torch.randn(32, 3, 16, 16, generator=gen) for _ in range(3)]
    options = dict(memory_format="contiguous")
    with pytest.warns(UserWarning):
        in_sweep = sgfx.sparsify(model, calib, "2:4", **options)
    monkeypatch.setattr(pipeline, "_permutes_in_sweep", lambda run: False)
    with pytest.warns(UserWarning):
        before = sgfx.sparsify(model, calib, "2:4", **options)
    ours, theirs = sgfx.get_report(in_sweep), sgfx.get_report(before)
    assert "permute channels" not in ours.steps_s and "permute channels" in theirs.steps_s
    assert ours.permuted and [p["producer"] for p in ours.permuted] == [p["producer"] for p in theirs.permuted]
    for mine, other in zip(ours.permuted, theirs.permuted):
        assert mine["kept_after"] == pytest.approx(other["kept_after"], rel=1e-5), mine["producer"]
    for name, weight in before.named_parameters():
        torch.testing.assert_close(in_sweep.get_parameter(name), weight, rtol=1e-3, atol=1e-4, msg=name)
    assert sgfx.check_pattern(in_sweep, "2:4")
    x = torch.randn(8, 3, 16, 16, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(in_sweep(x), before(x), rtol=1e-3, atol=1e-4)
