"""Baselines the speed benchmark compares sgfx's kernel against, written from the published algorithms.

- ``reference_blocked``: SparseGPT's blocked algorithm as published (float32, Cholesky -> cholesky_inverse ->
  upper Cholesky of H⁻¹, a per-column loop inside each block of 128, lazy updates of the later columns).
- ``per_column``: the report's method: the same factor, then one rank-1 update of *all* remaining columns per
  column (no blocking), which makes it memory-bound on wide layers.

Both take N:M patterns (the benchmark's case); they return the pruned weight and the mask.
"""

from __future__ import annotations

import torch


def inverse_factor_reference(hessian: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹ the published way: factorise, invert, factorise again."""
    hess = hessian.clone()
    dead = hess.diagonal() == 0
    hess.diagonal()[dead] = 1.0
    hess.diagonal().add_(percdamp * float(hess.diagonal().mean()))
    lower = torch.linalg.cholesky(hess)
    inverse = torch.cholesky_inverse(lower)
    return torch.linalg.cholesky(inverse, upper=True)


def reference_blocked(weight, hessian, n, m, blocksize=128, percdamp=0.01):
    w = weight.clone().float()
    hinv = inverse_factor_reference(hessian.float(), percdamp)
    w[:, hessian.diagonal() == 0] = 0
    rows, cols = w.shape
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for start in range(0, cols, blocksize):
        stop = min(start + blocksize, cols)
        w1 = w[:, start:stop].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        h1 = hinv[start:stop, start:stop]
        m1 = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(stop - start):
            col = w1[:, i]
            d = h1[i, i]
            if i % m == 0:
                scores = w1[:, i:i + m] ** 2 / torch.diag(h1)[i:i + m].reshape(1, -1) ** 2
                m1.scatter_(1, i + torch.topk(scores, m - n, dim=1, largest=False)[1], True)
            q = col.clone()
            q[m1[:, i]] = 0
            q1[:, i] = q
            e = (col - q) / d
            w1[:, i:] -= e.unsqueeze(1).matmul(h1[i, i:].unsqueeze(0))
            err1[:, i] = e
        w[:, start:stop] = q1
        mask[:, start:stop] = m1
        w[:, stop:] -= err1.matmul(hinv[start:stop, stop:])
    return w, mask


def per_column(weight, hessian, n, m, percdamp=0.01, hinv=None, limit=None):
    """The unblocked method; ``limit`` stops after that many columns (to time a slice of a huge layer)."""
    w = weight.clone().float()
    if hinv is None:
        hinv = inverse_factor_reference(hessian.float(), percdamp)
    rows, cols = w.shape
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for j in range(cols if limit is None else min(limit, cols)):
        if j % m == 0:
            scores = w[:, j:j + m] ** 2 / torch.diag(hinv)[j:j + m] ** 2
            mask[:, j:j + m].scatter_(1, torch.topk(scores, m - n, dim=1, largest=False)[1], True)
        err = torch.where(mask[:, j], w[:, j], 0.0) / hinv[j, j]
        w[:, j:] -= err.unsqueeze(1) * hinv[j, j:].unsqueeze(0)  # rank-1 update of every remaining column
        w[mask[:, j], j] = 0
    return w, mask
