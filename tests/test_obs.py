"""The OBS kernel against the per-column reference, and its numerical edge cases."""

import pytest
import torch

from reference import correlated_inputs, hessian_of, per_column_obs
from sgfx import FactorizationError, NMPattern, Unstructured, magnitude_prune, sparsegpt_prune, wanda_prune

PATTERNS = [NMPattern(2, 4), NMPattern(1, 4), NMPattern(4, 8), NMPattern(2, 8), Unstructured(0.5), Unstructured(0.3)]


def _problem(gen, rows=12, cols=48, n=400):
    weight = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    return weight, hessian_of(correlated_inputs(n, cols, gen))


# M not dividing the 32-column panel of the group sweep, or wider than it: every group must still be solved whole.
PANEL_CASES = [(NMPattern(2, 3), 48), (NMPattern(1, 6), 24), (NMPattern(20, 48), 48)]


@pytest.mark.parametrize("pattern, blocksize", [(p, b) for p in PATTERNS for b in (8, 16, 128)] + PANEL_CASES, ids=str)
def test_kernel_matches_per_column_reference_float64(gen, pattern, blocksize):
    weight, hessian = _problem(gen)
    expected_w, expected_mask = per_column_obs(weight, hessian, pattern, blocksize)
    result = sparsegpt_prune(weight, hessian, pattern, blocksize=blocksize, dtype=torch.float64)
    assert torch.equal(result.pruned, expected_mask)
    torch.testing.assert_close(result.weight, expected_w, rtol=1e-9, atol=1e-9)
    if isinstance(pattern, NMPattern):
        groups = result.weight.view(weight.shape[0], -1, pattern.m)
        assert int((groups != 0).sum(dim=2).max()) <= pattern.n


@pytest.mark.parametrize("pattern", [NMPattern(2, 4), Unstructured(0.5)], ids=str)
def test_kernel_float32_close_to_reference(gen, pattern):
    weight, hessian = _problem(gen, rows=16, cols=64)
    expected_w, expected_mask = per_column_obs(weight, hessian, pattern, 16)
    result = sparsegpt_prune(weight, hessian, pattern, blocksize=16)
    assert result.weight.dtype == torch.float32
    agreement = float((result.pruned == expected_mask).double().mean())
    assert agreement > 0.99
    # OBS solves each row on its own: rows with the same mask must end with the same weights (float32 rounding
    # can flip a near-tie, which changes that row's compensation, so only rows whose masks agree are compared)
    same = (result.pruned == expected_mask).all(dim=1)
    assert int(same.sum()) >= 0.9 * len(same)
    torch.testing.assert_close(result.weight.double()[same], expected_w[same], rtol=1e-3, atol=1e-4)


def test_inputs_not_modified(gen):
    weight, hessian = _problem(gen)
    w0, h0 = weight.clone(), hessian.clone()
    sparsegpt_prune(weight, hessian, NMPattern(2, 4), dtype=torch.float64)
    assert torch.equal(weight, w0) and torch.equal(hessian, h0)


def test_dead_columns_are_zeroed(gen):
    weight, _ = _problem(gen, cols=16)
    x = correlated_inputs(200, 16, gen)
    x[:, [3, 9]] = 0.0  # these inputs never fire
    result = sparsegpt_prune(weight, hessian_of(x), NMPattern(2, 4), dtype=torch.float64)
    assert torch.all(result.weight[:, [3, 9]] == 0)
    groups = (result.weight != 0).reshape(-1, 4).sum(1)
    assert int(groups.max()) <= 2


def test_damping_raised_when_cholesky_fails(gen):
    weight, hessian = _problem(gen, cols=16)
    indefinite = hessian - 2.0 * torch.linalg.eigvalsh(hessian).max() * torch.eye(16, dtype=torch.float64) * 0.01
    indefinite[0, 0] = -5 * float(hessian.diagonal().mean())
    result = sparsegpt_prune(weight, indefinite, NMPattern(2, 4), percdamp=0.01, dtype=torch.float64)
    assert result.damping_retries >= 1
    assert result.damping > 0.01 * float(indefinite.diagonal().mean())
    with pytest.raises(FactorizationError):
        sparsegpt_prune(weight, indefinite, NMPattern(2, 4), max_damping_retries=0, dtype=torch.float64)


def test_loss_is_obs_objective(gen):
    weight, hessian = _problem(gen, cols=24)
    result = sparsegpt_prune(weight, hessian, NMPattern(2, 4), blocksize=8, dtype=torch.float64)
    assert result.loss > 0
    # OBS loss equals ½ΔWᵀ H_damped ΔW summed over rows (exact for the sequential solve).
    delta = weight - result.weight
    damped = hessian + 0.01 * hessian.diagonal().mean() * torch.eye(24, dtype=torch.float64)
    quadratic = 0.5 * float(torch.einsum("rc,cd,rd->", delta, damped, delta))
    assert result.loss == pytest.approx(quadratic, rel=1e-6)


@pytest.mark.parametrize("pattern", [NMPattern(2, 4), NMPattern(1, 4), Unstructured(0.6)], ids=str)
def test_magnitude_keeps_largest(gen, pattern):
    weight = torch.randn(8, 32, generator=gen)
    result = magnitude_prune(weight, pattern)
    if isinstance(pattern, NMPattern):
        for row in range(8):
            for g in range(0, 32, pattern.m):
                group = weight[row, g:g + pattern.m].abs()
                kept = result.weight[row, g:g + pattern.m] != 0
                assert int(kept.sum()) == pattern.n
                assert float(group[kept].min()) >= float(group[~kept].max())
    else:
        count = round(0.6 * weight.numel())
        assert int((result.weight == 0).sum()) == count
        assert float(weight.abs()[result.pruned].max()) <= float(weight.abs()[~result.pruned].min())
    torch.testing.assert_close(result.weight[~result.pruned], weight[~result.pruned])


@pytest.mark.parametrize("pattern", [NMPattern(2, 4), NMPattern(4, 8), Unstructured(0.5)], ids=str)
def test_sparsegpt_error_below_magnitude_on_correlated_inputs(gen, pattern):
    x = correlated_inputs(512, 64, gen, rank=24)  # low rank: strongly correlated coordinates
    weight = torch.randn(32, 64, generator=gen)
    hessian = hessian_of(x)

    def error(w):
        return float(((weight.double() - w.double()) @ x.double().T).square().sum())

    sgpt = sparsegpt_prune(weight, hessian, pattern).weight
    mag = magnitude_prune(weight, pattern).weight
    assert error(sgpt) < 0.7 * error(mag)


def test_shape_errors(gen):
    weight, hessian = _problem(gen, cols=16)
    with pytest.raises(ValueError, match="Hessian shape"):
        sparsegpt_prune(weight, hessian[:8, :8], NMPattern(2, 4))
    with pytest.raises(ValueError, match="multiples of M"):
        sparsegpt_prune(weight[:, :14], hessian[:14, :14], NMPattern(2, 4))


@pytest.mark.parametrize("pattern", [NMPattern(2, 4), NMPattern(4, 8), Unstructured(0.5)], ids=str)
def test_wanda_prunes_lowest_weight_times_input_norm(gen, pattern):
    weight = torch.randn(6, 16, generator=gen)
    x = correlated_inputs(100, 16, gen) * torch.linspace(0.1, 3.0, 16)  # columns of very different scales
    norms = (x.square().sum(0) * 2 / 100).float()  # diag(H)
    result = wanda_prune(weight, norms, pattern)
    scores = weight.abs() * x.norm(dim=0)
    size = pattern.m if isinstance(pattern, NMPattern) else 16  # unstructured: compared per output row
    keep = pattern.n if isinstance(pattern, NMPattern) else 8
    for row in range(6):
        for g in range(0, 16, size):
            kept = result.weight[row, g:g + size] != 0
            assert int(kept.sum()) == keep
            assert float(scores[row, g:g + size][kept].min()) >= float(scores[row, g:g + size][~kept].max())
    torch.testing.assert_close(result.weight[~result.pruned], weight[~result.pruned])
