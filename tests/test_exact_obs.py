"""Exact greedy OBS (OBC) for N:M: against a reference that re-inverts the Hessian of the remaining weights at every
step, and its use for small layers inside sparsify."""

import pytest
import torch
from torch import nn

import sgfx
from reference import correlated_inputs, hessian_of
from sgfx import NMPattern, sparsegpt_prune
from sgfx import obs
from sgfx.obs import exact_nm_prune, exact_work

PATTERNS = [NMPattern(2, 4), NMPattern(1, 4), NMPattern(4, 8)]


def _problem(gen, rows=10, cols=32, n=300):
    weight = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    return weight, hessian_of(correlated_inputs(n, cols, gen))


def greedy_obs_reference(weight, hessian, pattern, percdamp=0.01):
    """Row by row, step by step: invert the damped Hessian restricted to the row's remaining weights, prune the
    cheapest eligible one (w_j² / [H_F⁻¹]_jj, its group not yet full) and apply the OBS update to the rest."""
    damped = hessian + percdamp * hessian.diagonal().mean() * torch.eye(len(hessian), dtype=hessian.dtype)
    out = weight.clone()
    mask = torch.zeros_like(weight, dtype=torch.bool)
    for row in range(weight.shape[0]):
        w = out[row]
        for _ in range(weight.shape[1] // pattern.m * pattern.n_pruned):
            free = (~mask[row]).nonzero().flatten()
            inverse = torch.linalg.inv(damped[free][:, free])
            full = mask[row].view(-1, pattern.m).sum(1) >= pattern.n_pruned
            cost = w[free] ** 2 / inverse.diagonal()
            cost[full[free // pattern.m]] = float("inf")
            k = int(cost.argmin())
            w[free] -= w[free[k]] / inverse[k, k] * inverse[:, k]
            w[free[k]] = 0.0
            mask[row, free[k]] = True
    return out, mask


def _error(weight, pruned, hessian):
    delta = weight - pruned.double()
    return float(((delta @ hessian) * delta).sum())


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_exact_solve_matches_reinverting_reference_float64(gen, pattern):
    weight, hessian = _problem(gen)
    expected_w, expected_mask = greedy_obs_reference(weight, hessian, pattern)
    result = exact_nm_prune(weight, hessian, pattern, dtype=torch.float64)
    assert torch.equal(result.pruned, expected_mask)
    torch.testing.assert_close(result.weight, expected_w, rtol=1e-8, atol=1e-8)
    groups = result.weight.view(weight.shape[0], -1, pattern.m)
    assert int((groups != 0).sum(dim=2).max()) <= pattern.n
    assert torch.equal(result.weight == 0, result.pruned | (weight == 0))


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_exact_solve_has_less_error_than_sparsegpt(gen, pattern):
    weight, hessian = _problem(gen, rows=24, cols=48)
    exact = exact_nm_prune(weight, hessian, pattern, dtype=torch.float64)
    blocked = sparsegpt_prune(weight, hessian, pattern, dtype=torch.float64)
    assert _error(weight, exact.weight, hessian) < 0.95 * _error(weight, blocked.weight, hessian)
    # the reported loss is the OBS objective: half the (damped) error of the pruned weights
    damped = hessian + 0.01 * hessian.diagonal().mean() * torch.eye(48, dtype=torch.float64)
    assert exact.loss == pytest.approx(_error(weight, exact.weight, damped) / 2, rel=1e-6)


def test_row_chunks_give_the_same_result(gen, monkeypatch):
    weight, hessian = _problem(gen, rows=9, cols=16)
    whole = exact_nm_prune(weight, hessian, NMPattern(2, 4), dtype=torch.float64)
    monkeypatch.setattr(obs, "_EXACT_CHUNK_BYTES", 4 * 16 * 16 * 8)  # 4 rows at a time: chunks of 4, 4, 1
    chunked = exact_nm_prune(weight, hessian, NMPattern(2, 4), dtype=torch.float64)
    assert torch.equal(whole.weight, chunked.weight) and torch.equal(whole.pruned, chunked.pruned)


def test_inputs_kept_and_dead_columns_zeroed(gen):
    weight, _ = _problem(gen, cols=16)
    x = correlated_inputs(200, 16, gen)
    x[:, [2, 7]] = 0.0
    hessian = hessian_of(x)
    w0, h0 = weight.clone(), hessian.clone()
    result = exact_nm_prune(weight, hessian, NMPattern(2, 4))
    assert torch.equal(weight, w0) and torch.equal(hessian, h0)
    assert result.weight.dtype == torch.float32 and torch.all(result.weight[:, [2, 7]] == 0)


def test_bad_arguments_are_refused(gen):
    weight, hessian = _problem(gen, cols=16)
    with pytest.raises(TypeError, match="N:M"):
        exact_nm_prune(weight, hessian, sgfx.Unstructured(0.5))
    with pytest.raises(ValueError, match="Hessian shape"):
        exact_nm_prune(weight, hessian[:8, :8], NMPattern(2, 4))
    with pytest.raises(ValueError, match="multiples of M"):
        exact_nm_prune(weight[:, :14], hessian[:14, :14], NMPattern(2, 4))


@pytest.mark.parametrize("value", [-1, True, 1.5, "2e9"])
def test_exact_obs_work_option_is_validated(value):
    with pytest.raises(ValueError, match="exact_obs_work"):
        sgfx.SparsifyConfig("2:4", exact_obs_work=value)


def _small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 64, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(64, 10)).eval()


def test_sparsify_solves_small_layers_exactly_and_the_rest_blocked(gen, monkeypatch):
    """With the limit between the layers' costs, the small ones take the exact solve, the large one SparseGPT's;
    the exact layers' output error on the calibration inputs is lower than with SparseGPT everywhere."""
    model = _small_model()
    calib = [torch.randn(16, 3, 8, 8, generator=gen) for _ in range(4)]
    calls = []
    original = obs.exact_nm_prune
    from sgfx.engine import layer_step
    monkeypatch.setattr(layer_step, "exact_nm_prune",
                        lambda w, *a, **k: calls.append(tuple(w.shape)) or original(w, *a, **k))
    limit = exact_work(10, 64)  # the 1x1 conv (64, 32) and the Linear (10, 64); not the 3x3 conv (32, 144)
    common = dict(dense_targets=False, stats_correction=False, bn_reestimate=False, permute_channels=False,
                  progress=False)
    exact = sgfx.sparsify(model, calib, "2:4", exact_obs_work=limit, **common)
    assert calls == [(64, 32), (10, 64)]  # the first conv's 27 columns do not take 2:4: it stays dense
    blocked = sgfx.sparsify(model, calib, "2:4", exact_obs_work=0, **common)
    solvers = {r.name: r.solver for r in sgfx.get_report(exact).pruned_layers}
    assert sorted(solvers.values()) == ["blocked", "exact", "exact"]
    assert {r.solver for r in sgfx.get_report(blocked).pruned_layers} == {"blocked"}
    assert sgfx.get_report(exact).table().count("exact OBS") == 2
    for gm in (exact, blocked):
        assert sgfx.check_pattern(gm, "2:4")
    err = {}
    for name, gm in (("exact", exact), ("blocked", blocked)):
        with torch.no_grad():
            err[name] = sum(float((gm(x) - model(x)).square().sum()) for x in calib)
    assert err["exact"] < err["blocked"]
