"""The speed benchmark's baselines compute the same pruning as sgfx's kernel (so its ratios compare like with like)."""

import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

from reference import correlated_inputs, hessian_of  # noqa: E402
from reference_kernels import per_column, reference_blocked  # noqa: E402
from sgfx import NMPattern, sparsegpt_prune  # noqa: E402


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8)])
@pytest.mark.parametrize("cols, blocksize", [(64, 16), (96, 32)])
def test_baselines_equal_sgfx_kernel(gen, n, m, cols, blocksize):
    weight = torch.randn(16, cols, generator=gen, dtype=torch.float64)
    hessian = hessian_of(correlated_inputs(3 * cols, cols, gen))
    ours = sparsegpt_prune(weight, hessian, NMPattern(n, m), blocksize=blocksize, dtype=torch.float64)
    blocked_w, blocked_mask = reference_blocked(weight.double(), hessian, n, m, blocksize=blocksize)
    column_w, column_mask = per_column(weight.double(), hessian, n, m)
    for w, mask in ((blocked_w, blocked_mask), (column_w, column_mask)):
        assert float((mask == ours.pruned).float().mean()) > 0.99
        same = (mask == ours.pruned).all(dim=1)  # rows are solved independently: equal masks, equal weights
        assert int(same.sum()) >= 0.9 * len(same)
        torch.testing.assert_close(w.double()[same], ours.weight[same], rtol=1e-4, atol=1e-5)
