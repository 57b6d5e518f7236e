"""Per-layer allocation under a global budget, 2:4-or-dense under a budget, and masked fine-tuning."""

import itertools
import math

import pytest
import torch

import sgfx
from models import ConvBnNet, TwoLayer, cifar_resnet10, randomize_bn
from sgfx.engine.allocation import (LayerCost, Sensitivity, allocate, candidate_levels, global_magnitude_levels,
                                   keep_dense)
from reference import relative_error
from sgfx.obs import sparsegpt_error_curve, sparsegpt_prune
from reference import correlated_inputs, hessian_of

pytestmark = pytest.mark.filterwarnings("ignore:sgfx.*left dense", "ignore:sgfx.*no bias")


def _curve(levels, scale, power=2.0):
    return Sensitivity(tuple(levels), tuple(scale * lv ** power for lv in levels))


def test_allocation_is_the_brute_force_optimum_and_exact():
    levels = (0.0, 0.3, 0.5, 0.7, 0.9)
    curves = {"a": _curve(levels, 1.0), "b": _curve(levels, 4.0), "c": _curve(levels, 0.25, 3.0)}
    costs = {"a": LayerCost(1000, 1000), "b": LayerCost(2000, 8000), "c": LayerCost(1000, 500)}
    chosen = allocate(curves, costs, 0.5)
    pruned = sum(round(chosen[n] * costs[n].weights) for n in costs)
    assert pruned == 2000  # exactly half of the 4000 weights
    # brute force over the grid (exact budgets only), then the same exact fill: allocate may not be worse
    best = min((sum(curves[n].errors[k] for n, k in zip(costs, ks)), ks)
               for ks in itertools.product(range(len(levels)), repeat=3)
               if sum(levels[k] * costs[n].weights for n, k in zip(costs, ks)) == 2000)
    got = sum(curves[n].error_at(chosen[n]) for n in costs)
    assert got <= best[0] + 1e-9
    uniform = sum(curves[n].error_at(0.5) for n in costs)
    assert got <= uniform + 1e-12 and chosen["b"] < 0.5 < chosen["c"]  # the sensitive layer gets less


@pytest.mark.parametrize("fraction", [0.5, 0.8, 0.9])
def test_allocation_never_estimated_worse_than_uniform(gen, fraction):
    """Layers from 10^3 to 10^6 weights: rounding each layer to the DP's cost grid leaves a gap of thousands of
    weights, which the exact fill must spread along the curves (once it pushed small layers to 98 %)."""
    grid = candidate_levels(fraction)
    sizes = [int(s) for s in torch.logspace(3, 6, 20).tolist()]
    curves, costs = {}, {}
    for i, size in enumerate(sizes):
        scale = float(torch.rand((), generator=gen)) * 2 + 0.1
        errors = [min(0.99, scale * lv ** 3) for lv in grid]
        curves[f"l{i}"] = Sensitivity(grid, tuple(-math.log1p(-e) for e in errors))
        costs[f"l{i}"] = LayerCost(size, size)
    chosen = allocate(curves, costs, fraction)
    assert sum(round(chosen[n] * costs[n].weights) for n in costs) == round(fraction * sum(sizes))
    allocated = sum(curves[n].error_at(chosen[n]) for n in costs)
    uniform = sum(curves[n].error_at(fraction) for n in costs)
    assert allocated <= uniform + 1e-9


def test_flops_target_counts_multiply_adds():
    levels = candidate_levels(0.6)  # the grid plan() measures: 0, the fixed levels and the uniform level
    curves = {n: _curve(levels, 1.0) for n in "ab"}
    costs = {"a": LayerCost(1000, 1000 * 64), "b": LayerCost(1000, 1000 * 1)}  # a: 64 positions, b: 1
    chosen = allocate(curves, costs, 0.6, target="flops")
    flops = sum(chosen[n] * costs[n].macs for n in costs)
    assert abs(flops - 0.6 * (64_000 + 1_000)) <= 64  # within one weight's multiply-adds
    assert chosen["a"] > chosen["b"]  # equal error curves: prune where the FLOPs are


def test_keep_dense_is_the_knapsack_optimum():
    errors = {"a": 0.3, "b": 0.25, "c": 0.2, "d": 0.01}
    costs = {"a": LayerCost(60, 60), "b": LayerCost(30, 30), "c": LayerCost(25, 25), "d": LayerCost(885, 885)}
    dense = keep_dense(errors, costs, budget=0.94)  # at most 60 of 1000 weights dense
    assert dense == {"b", "c"}  # 0.45 > a alone (0.3); a + anything is over 60
    assert sum(costs[n].weights for n in costs if n not in dense) >= 940


def test_global_magnitude_is_one_threshold(gen):
    weights = {"a": torch.randn(40, 10, generator=gen), "b": 3 * torch.randn(20, 30, generator=gen)}
    costs = {n: LayerCost(w.numel(), w.numel()) for n, w in weights.items()}
    levels = global_magnitude_levels(weights, costs, 0.5)
    everything = torch.cat([w.abs().flatten() for w in weights.values()])
    threshold = everything.kthvalue(500).values
    for name, w in weights.items():
        assert round(levels[name] * w.numel()) == int((w.abs() <= threshold).sum())


def test_error_curve_matches_full_solves(gen):
    inputs = correlated_inputs(512, 64, gen)
    hessian = hessian_of(inputs)
    weight = torch.randn(32, 64, generator=gen)
    patterns = [sgfx.Unstructured(0.5), sgfx.Unstructured(0.8), sgfx.NMPattern(2, 4)]
    terms, _ = sparsegpt_error_curve(weight, hessian, patterns, blocksize=16)
    for (num, den), pattern in zip(terms, patterns):
        solved = sparsegpt_prune(weight, hessian, pattern, blocksize=16).weight
        assert num / den == pytest.approx(relative_error(weight, solved, hessian), rel=1e-6)


@pytest.mark.parametrize("method, target", [("sparsegpt", "weights"), ("magnitude", "flops")])
def test_global_allocation_end_to_end_meets_the_budget_exactly(gen, method, target):
    model = randomize_bn(cifar_resnet10() if method == "magnitude" else ConvBnNet(), gen).eval()
    calib = torch.randn(32, 3, 16, 16, generator=gen).split(16)
    gm = sgfx.sparsify(model, calib, 0.8, allocation="global", target=target, method=method)
    report = sgfx.get_report(gm)
    layers = [r for r in report.layers if r.level is not None]
    assert len(layers) == len(report.layers) and len({round(r.level, 2) for r in layers}) > 2  # levels differ
    assert all(r.level <= 0.98 for r in layers)
    zeros = {r.name: int((gm.get_parameter(r.weight_name) == 0).sum()) for r in layers}
    assert all(zeros[r.name] >= round(r.level * gm.get_parameter(r.weight_name).numel()) for r in layers)
    if target == "weights":
        total = sum(gm.get_parameter(r.weight_name).numel() for r in layers)
        assert sum(round(r.level * gm.get_parameter(r.weight_name).numel()) for r in layers) == round(0.8 * total)
    assert report.allocation["achieved"] == pytest.approx(0.8, abs=1e-4)
    assert "global allocation" in str(report) and "%" in layers[1].pattern
    if method == "magnitude":  # one |w| threshold across the layers below the cap, on the original weights
        original = dict(model.named_parameters())
        size = {r.name: gm.get_parameter(r.weight_name).numel() for r in layers}
        below_cap = [r for r in layers if round(r.level * size[r.name]) < math.floor(0.98 * size[r.name])]
        assert below_cap
        pruned = torch.cat([original[r.weight_name].detach().abs()[gm.get_parameter(r.weight_name) == 0]
                            for r in below_cap])
        kept = torch.cat([original[r.weight_name].detach().abs()[gm.get_parameter(r.weight_name) != 0]
                          for r in below_cap])
        assert float(pruned.max()) <= float(kept.min())


def test_budget_keeps_the_most_sensitive_layers_dense(gen):
    model = randomize_bn(ConvBnNet(), gen).eval()
    gm = sgfx.sparsify(model, torch.randn(32, 3, 16, 16, generator=gen), "2:4", budget=0.9)
    report = sgfx.get_report(gm)
    kept = [r for r in report.layers if r.reason.startswith("kept dense by budget=0.9")]
    # 38,016 prunable weights: only fc2 (640) fits in the 10 % that may stay dense (conv2 has 4,608)
    assert [r.name for r in kept] == ["fc2"] and report.allocation["achieved"] >= 0.9
    assert sgfx.check_pattern(gm, "2:4")  # every pruned layer is a valid 2:4 layer
    for record in kept:
        assert torch.count_nonzero(gm.get_parameter(record.weight_name) == 0) == 0


def test_allocation_options_are_validated(gen):
    model = TwoLayer().eval()
    x = torch.randn(4, 8, 8, 8, generator=gen)
    with pytest.raises(ValueError, match="use budget"):
        sgfx.sparsify(model, x, "2:4", allocation="global")
    with pytest.raises(ValueError, match="budget applies to N:M"):
        sgfx.sparsify(model, x, 0.5, budget=0.9)
    with pytest.raises(ValueError, match="unknown target"):
        sgfx.sparsify(model, x, 0.5, allocation="global", target="params")


def _loader(gen, batches=6):
    return [(torch.randn(16, 3, 16, 16, generator=gen), torch.randint(0, 10, (16,), generator=gen))
            for _ in range(batches)]


@pytest.mark.parametrize("distill", [False, True])
def test_finetune_keeps_every_zero_and_leaves_the_input_alone(gen, distill):
    model = randomize_bn(ConvBnNet(), gen).eval()
    gm = sgfx.sparsify(model, torch.randn(32, 3, 16, 16, generator=gen), "2:4")
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    tuned = sgfx.finetune(gm, _loader(gen), epochs=3, lr=0.05, weight_decay=1e-2, momentum=0.9,
                          distill=model if distill else None, progress=False)
    for record in sgfx.get_report(gm).pruned_layers:
        original, trained = gm.get_parameter(record.weight_name), tuned.get_parameter(record.weight_name)
        assert torch.equal(trained[original == 0], torch.zeros_like(trained[original == 0]))  # 18 steps later
        assert not torch.equal(trained, original)  # and it did train
    assert sgfx.check_pattern(tuned, "2:4") and not tuned.training
    assert all(torch.equal(v, gm.state_dict()[k]) for k, v in before.items())  # the one-shot model is untouched


def test_finetune_bad_input(gen):
    model = ConvBnNet().eval()
    with pytest.raises(ValueError, match="sgfx.sparsify"):
        sgfx.finetune(model, _loader(gen))
    gm = sgfx.sparsify(model, torch.randn(8, 3, 16, 16, generator=gen), "2:4", method="magnitude")
    with pytest.raises(TypeError, match=r"\(input, target\)"):
        sgfx.finetune(gm, [torch.randn(2, 3, 16, 16)], progress=False)
    with pytest.raises(ValueError, match="epochs"):
        sgfx.finetune(gm, _loader(gen), epochs=0)


@pytest.mark.parametrize("distill_loss", ["kl", "mse"])
def test_label_free_distillation_needs_no_targets_keeps_zeros_and_moves_towards_the_dense_outputs(gen, distill_loss):
    """alpha=1.0: input batches alone; the pruned model's outputs get closer to the dense model's on held-out
    inputs, by the measure it was trained on, and every zero stays zero."""
    model = randomize_bn(ConvBnNet(), gen).eval()
    gm = sgfx.sparsify(model, torch.randn(32, 3, 16, 16, generator=gen), "2:4", method="magnitude")
    unlabeled = [torch.randn(16, 3, 16, 16, generator=gen) for _ in range(8)]
    held_out = torch.randn(64, 3, 16, 16, generator=gen)

    def gap(m):
        with torch.no_grad():
            out, ref = m(held_out), model(held_out)
        if distill_loss == "mse":
            return float(torch.nn.functional.mse_loss(out, ref))
        return float(torch.nn.functional.kl_div(out.log_softmax(-1), ref.log_softmax(-1), reduction="batchmean",
                                                log_target=True))

    tuned = sgfx.finetune(gm, unlabeled, epochs=4, lr=0.02, weight_decay=0.0, distill=model, alpha=1.0,
                          distill_loss=distill_loss, progress=False)
    assert gap(tuned) < 0.8 * gap(gm)
    for record in sgfx.get_report(gm).pruned_layers:
        original, trained = gm.get_parameter(record.weight_name), tuned.get_parameter(record.weight_name)
        assert torch.equal(trained[original == 0], torch.zeros_like(trained[original == 0]))
    with pytest.raises(ValueError, match="alpha=1.0 trains on distillation alone"):
        sgfx.finetune(gm, unlabeled, alpha=1.0, progress=False)
    with pytest.raises(ValueError, match="unknown distill_loss"):
        sgfx.finetune(gm, unlabeled, distill=model, alpha=1.0, distill_loss="l1", progress=False)
    with pytest.raises(TypeError, match="without labels pass distill=dense_model, alpha=1.0"):
        sgfx.finetune(gm, unlabeled, distill=model, alpha=0.5, progress=False)
