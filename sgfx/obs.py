"""Pruning kernels: SparseGPT's blocked Optimal Brain Surgeon solve, and the magnitude and Wanda baselines.

Pure functions on tensors (CPU or CUDA): a weight matrix ``W`` of shape (rows, cols) whose columns are in
solve order (N:M groups are ``m`` consecutive columns) and, for OBS, the layer Hessian ``H = 2/n X Xᵀ`` of
shape (cols, cols). Nothing here knows about modules, graphs or logging.

SparseGPT (Frantar & Alistarh, 2023) visits the columns left to right. With ``U`` the upper Cholesky factor of
``H⁻¹`` (``H⁻¹ = Uᵀ U``), pruning weight ``w_ij`` costs ``w_ij² / U_jj²`` and the optimal compensation of the
row's later weights is ``-(w_ij / U_jj) · U_j,j:``. Columns are processed in blocks: updates inside a block are
applied eagerly, updates to the columns after it are applied once per block (lazy batch updates).

sgfx never forms ``H⁻¹``. It factors the reversed Hessian once (``H = V Vᵀ``, ``V`` upper, ``U = V⁻¹``) and,
because a visited column never changes again, rebuilds each block's compensated weights from the final weights
of the columns before it with one GEMM against ``V``: the same lazy update, at a third of SparseGPT's
factorisation cost (see ``sparsegpt_prune``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .config import NMPattern, Pattern, Unstructured
from .quantize import quantize_weight, weight_scales as row_scales

__all__ = [
    "SolveResult", "sparsegpt_prune", "magnitude_prune", "wanda_prune",
    "dense_target_weight", "sparsegpt_error_curve", "error_terms", "exact_nm_prune", "exact_work",
]


class FactorizationError(RuntimeError):
    """The damped Hessian stayed indefinite after every damping retry."""


@dataclass
class SolveResult:
    weight: torch.Tensor  # (rows, cols) pruned and compensated, in the solve dtype
    pruned: torch.Tensor  # (rows, cols) bool, True where the mask zeroed a weight
    loss: float  # OBS objective: sum of w²/(2·U_jj²) over pruned weights (0 for magnitude)
    damping: float = 0.0  # absolute damping finally added to diag(H)
    damping_retries: int = 0  # times the damping was raised x10 because Cholesky failed
    factor_s: float = 0.0  # seconds spent factorising the Hessian
    scales: torch.Tensor | None = None  # (rows,) the INT8 scales the weight was rounded to (quantized solves)
    solver: str = "blocked"  # "blocked" (SparseGPT's sweep) or "exact" (greedy OBS per row, exact_nm_prune)


def _rotate_180_(matrix: torch.Tensor, strip: int = 1024) -> torch.Tensor:
    """``J M J`` (both axes reversed) in place, strip by strip, without a second full-size buffer."""
    n = matrix.shape[0]
    for top in range(0, n // 2, strip):
        bottom = min(top + strip, n // 2)
        upper = matrix[top:bottom].clone()
        matrix[top:bottom] = matrix[n - bottom:n - top].flip(0, 1)
        matrix[n - bottom:n - top] = upper.flip(0, 1)
    if n % 2:
        matrix[n // 2] = matrix[n // 2].flip(0)
    return matrix


def _mark_dead_columns_(hess: torch.Tensor) -> torch.Tensor:
    """Set ``H_jj = 1`` where column j never received input (``H_jj = 0``); returns those columns' mask."""
    dead = hess.diagonal() == 0
    hess.diagonal()[dead] = 1.0
    return dead


_CHOLESKY_BLOCK = 256  # CPU: diagonal blocks of the blocked Cholesky below


def _cholesky_lower_(matrix: torch.Tensor) -> int:
    """Factor the SPD ``matrix = L Lᵀ`` in place (``L`` lower; the strict upper triangle is zeroed).
    Returns 0, or like LAPACK the order of the first non-positive leading minor.

    On CPU, LAPACK's ``potrf`` reaches about a third of GEMM throughput on 2 cores. This right-looking blocked
    version spends its flops in GEMMs instead: each panel is ``A21 · L11⁻ᵀ`` with the small triangular inverse
    formed explicitly, and the trailing update touches only the lower block columns (its speed against
    ``torch.linalg.cholesky``, with the same error against a float64 factor: docs/RESULTS.md).
    """
    size = matrix.shape[0]
    if matrix.device.type != "cpu" or size <= 2 * _CHOLESKY_BLOCK:
        lower, info = torch.linalg.cholesky_ex(matrix)
        matrix.copy_(lower)
        return int(info)
    for start in range(0, size, _CHOLESKY_BLOCK):
        stop = min(start + _CHOLESKY_BLOCK, size)
        diagonal, info = torch.linalg.cholesky_ex(matrix[start:stop, start:stop])  # (b, b) L11
        if int(info):
            return int(info) + start
        matrix[start:stop, start:stop] = diagonal
        if stop == size:
            break
        eye = torch.eye(stop - start, dtype=matrix.dtype)
        inverse = torch.linalg.solve_triangular(diagonal, eye, upper=False)  # (b, b) L11⁻¹
        panel = matrix[stop:, start:stop]  # (rest, b) A21 -> L21 = A21 · L11⁻ᵀ
        panel.copy_(panel @ inverse.T)
        for column in range(stop, size, 2 * _CHOLESKY_BLOCK):  # A22 -= L21 L21ᵀ, lower block columns only
            offset = column - stop
            matrix[column:, column:column + 2 * _CHOLESKY_BLOCK].addmm_(
                panel[offset:], panel[offset:offset + 2 * _CHOLESKY_BLOCK].T, alpha=-1)
    matrix.tril_()
    return 0


def _factor_with_retries(hessian: torch.Tensor, percdamp: float, max_retries: int,
                         overwrite: bool) -> tuple[torch.Tensor, float, int]:
    """Lower ``L`` with ``J (H + λI) J = L Lᵀ``; λ starts at ``percdamp · mean diag H``, x10 per failure."""
    mean_diag = float(hessian.diagonal().mean())
    damping = percdamp * mean_diag if percdamp > 0 else 0.0
    reversed_h = _rotate_180_(hessian) if overwrite else hessian.flip(0, 1)  # (cols, cols), J H J
    lower = torch.empty_like(reversed_h)
    for retry in range(max_retries + 1):
        lower.copy_(reversed_h).diagonal().add_(damping)
        if _cholesky_lower_(lower) == 0:
            return lower, damping, retry
        damping = max(damping * 10.0, 1e-8 * max(mean_diag, 1e-30))
    raise FactorizationError(
        f"Hessian is not positive definite even with damping {damping:.3g} after {max_retries} retries"
    )


def _v_block(lower: torch.Tensor, rows: slice, cols: slice) -> torch.Tensor:
    """``V[rows, cols]`` of ``V = J L J`` (upper, ``H + λI = V Vᵀ``), copied out of ``L`` without forming ``V``."""
    n = lower.shape[0]
    return lower[n - rows.stop:n - rows.start, n - cols.stop:n - cols.start].flip(0, 1)


def dense_target_weight(weight: torch.Tensor, hessian: torch.Tensor, shift: torch.Tensor, percdamp: float = 0.01,
                        max_damping_retries: int = 6, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``W* = W + W (A − H)(H + λI)⁻¹``: the weight that best maps the pruned model's inputs to the dense model's
    outputs, regularised towards ``W``.

    With ``A = 2/n Σ x_dense x_prunedᵀ`` and ``H = 2/n Σ x_pruned x_prunedᵀ``, ``W*`` minimises
    ``‖W X_dense − W* X_pruned‖² + λ‖W* − W‖²`` (``= W A H⁻¹`` when ``λ = 0``; ``= W`` when the inputs agree), and
    ``‖W X_dense − Ŵ X_pruned‖² = ‖(W* − Ŵ) X_pruned‖² + const`` for ``λ = 0``, so running OBS on ``(W*, H)``
    minimises the error against the dense model's outputs instead of against ``W X_pruned``. ``λ`` is the solve's
    damping (``percdamp · mean diag H``).

    Args:
        weight: (rows, cols); hessian: (cols, cols), in solve column order.
        shift: (rows, cols) ``W (A − H) = 2/n Σ (W (x_dense − x_pruned)) x_prunedᵀ``: the layer's weight gradient
            for the output difference, which sgfx computes without forming the (cols, cols) ``A``.
    """
    hess = hessian.to(dtype=dtype, copy=True)
    _mark_dead_columns_(hess)
    lower, _, _ = _factor_with_retries(hess, percdamp, max_damping_retries, overwrite=True)  # J(H + λI)J = L Lᵀ
    del hess
    w = weight.to(dtype)
    # (H + λI) X = shiftᵀ  <=>  L Lᵀ (J X) = J shiftᵀ
    solved = torch.cholesky_solve(shift.to(dtype).T.flip(0).contiguous(), lower).flip(0)  # (cols, rows)
    return w + solved.T  # (rows, cols)


_SUB_BLOCK = 8  # unstructured: columns updated eagerly together before one GEMM updates the rest of the block


def _block_prune_counts(pattern: Unstructured, rows: int, cols: int, blocksize: int) -> list[int]:
    """Weights to prune in each block so that the layer total is exactly round(sparsity · rows · cols)."""
    bounds = list(range(0, cols, blocksize)) + [cols]
    cumulative = [round(pattern.sparsity * rows * b) for b in bounds]
    return [hi - lo for lo, hi in zip(cumulative[:-1], cumulative[1:])]


_PANEL = 32  # columns whose eager updates stay inside the panel; one GEMM per panel updates the rest of the block


def _quantize_group_(group: torch.Tensor, group_errors: torch.Tensor, group_pruned: torch.Tensor,
                     scale: torch.Tensor, coupling: torch.Tensor, grid: torch.Tensor) -> None:
    """Joint pruning and INT8 rounding of one group (GPTQ's column loop inside SparseGPT's): each column in turn is
    rounded to its row's grid (zero where pruned), and its scaled error ``(w − q)/U_jj`` is pushed onto the group's
    later columns at once. Leaves the group's columns on the grid and its errors in ``group_errors``.

    Args:
        group: (s, rows) the group's compensated columns; group_pruned: (s, rows) bool; scale: (s, 1) ``1/U_jj``;
        coupling: (s, s) ``U[group, group]``; grid: (rows,) each row's INT8 scale.
    """
    for k in range(group.shape[0]):
        column = group[k]
        rounded = quantize_weight(column, grid).masked_fill_(group_pruned[k], 0.0)
        torch.mul(column - rounded, scale[k], out=group_errors[k])
        column.copy_(rounded)
        if k + 1 < group.shape[0]:
            group[k + 1:].addr_(coupling[k, k + 1:], group_errors[k], alpha=-1)


def _compensate_block(w_block: torch.Tensor, hinv_block: torch.Tensor, mask: torch.Tensor,
                      pattern: Pattern, grid: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SparseGPT's column sweep over one block: choose each N:M group's mask from the compensated weights (or use
    the given unstructured ``mask``), and push every pruned weight's error onto the block's later columns.

    Args:
        w_block: (rows, b) weights of the block, already compensated for the blocks before it.
        hinv_block: (b, b) ``U[B, B]``, the block's part of the upper Cholesky factor of ``H⁻¹``.
        mask: (rows, b) bool, True where pruned (filled in here for N:M).
    Returns:
        (compensated weights, scaled errors ``(w − q)/U_jj``, mask), each (rows, b).

    Inside a group of s columns (an N:M group, or ``_SUB_BLOCK`` columns when unstructured) the scaled errors solve
    ``e = S ⊙ (w − e Ũ)``, with ``S = mask / U_jj`` and ``Ũ`` the strictly upper part of the group's block of U
    (column j's error only sees the errors of the columns before it). ``Ũ`` is nilpotent, so
    ``e = Σ_k (−1)^k T^k (S ⊙ w)`` with ``T(v) = S ⊙ (v Ũ)`` is finite. Term k follows chains of k + 1 pruned
    columns, so it stops after as many terms as a row prunes in the group (2 for 2:4): a tiny GEMM per term instead of
    a loop over the columns. One GEMM then updates the group's own kept columns and the rest of its panel of
    ``_PANEL`` columns, and one per panel the rest of the block. Works on transposed copies (columns contiguous).

    With ``grid`` (rows,), the INT8 scale of each row, kept weights are rounded too and every column's rounding
    error is compensated as well (:func:`_quantize_group_`): the closed form no longer applies, the group is a loop.
    """
    columns = w_block.T.contiguous()  # (b, rows)
    pruned = mask.T.contiguous()  # (b, rows)
    errors = torch.empty_like(columns)  # (b, rows)
    inverse_diag = hinv_block.diagonal().reciprocal().unsqueeze(1)  # (b, 1)
    width = columns.shape[0]
    step = pattern.m if isinstance(pattern, NMPattern) else _SUB_BLOCK
    panel_width = step * max(1, _PANEL // step)  # whole groups per panel
    terms = pattern.n_pruned if isinstance(pattern, NMPattern) else step  # pruned columns per row and group
    for panel in range(0, width, panel_width):
        panel_end = min(panel + panel_width, width)
        for sub in range(panel, panel_end, step):
            end = min(sub + step, panel_end)
            group, group_errors, group_pruned = columns[sub:end], errors[sub:end], pruned[sub:end]  # (s, rows)
            scale = inverse_diag[sub:end]  # (s, 1)
            if isinstance(pattern, NMPattern):  # lowest |w| / U_jj within the group, per row
                drop = (group * scale).abs_().topk(pattern.n_pruned, dim=0, largest=False).indices
                group_pruned.scatter_(0, drop, True)
            if grid is not None:
                _quantize_group_(group, group_errors, group_pruned, scale, hinv_block[sub:end, sub:end], grid)
                if end < panel_end:
                    columns[end:panel_end].addmm_(hinv_block[sub:end, end:panel_end].T, group_errors, alpha=-1)
                continue
            factor = group_pruned * scale  # (s, rows) S
            coupling = hinv_block[sub:end, sub:end].triu(1).T  # (s, s) Ũᵀ
            term = torch.mul(group, factor, out=group_errors).clone()  # S ⊙ w
            for power in range(1, min(end - sub, terms)):
                term = (coupling @ term).mul_(factor)
                group_errors.add_(term, alpha=-1.0 if power % 2 else 1.0)
            columns[sub:panel_end].addmm_(hinv_block[sub:end, sub:panel_end].T, group_errors, alpha=-1)
        if panel_end < width:
            columns[panel_end:].addmm_(hinv_block[panel:panel_end, panel_end:].T, errors[panel:panel_end], alpha=-1)
    return columns.T, errors.T, pruned.T


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    pattern: Pattern,
    blocksize: int = 128,
    percdamp: float = 0.01,
    max_damping_retries: int = 6,
    dtype: torch.dtype = torch.float32,
    overwrite_hessian: bool = False,
    weight_scales: torch.Tensor | str | None = None,
) -> SolveResult:
    """Prune ``weight`` to ``pattern`` with SparseGPT's adaptive-mask OBS solve.

    Args:
        weight: (rows, cols) weights in solve column order; not modified.
        hessian: (cols, cols) symmetric PSD ``2/n X Xᵀ``; not modified unless ``overwrite_hessian``.
        pattern: N:M groups along consecutive columns, or an unstructured fraction (mask chosen per block).
        blocksize: columns per lazy-update block (a multiple of M for N:M patterns).
        percdamp: damping as a fraction of mean(diag H); raised x10 per failed Cholesky.
        max_damping_retries: how many times to raise the damping before giving up.
        dtype: solve precision.
        overwrite_hessian: let the solve modify ``hessian`` in place instead of copying it (saves one
            cols x cols buffer for very wide layers).
        weight_scales: (rows,) INT8 scales (:mod:`sgfx.quantize`): round every kept weight to its row's grid as
            its column is visited and compensate that error too (SparseGPT's joint sparsification and
            quantization; GPTQ when nothing is pruned). ``"solve"``: take them from a first, float sweep on the same
            factor (each row's largest compensated weight; the original weights' maxima clip the compensated ones).

    Returns:
        SolveResult with the compensated, pruned (and, with ``weight_scales``, rounded) weight in ``dtype``.
    """
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"Hessian shape {tuple(hessian.shape)} does not match weight columns {cols}")
    _check_blocks(pattern, cols, blocksize)
    original = weight.to(dtype=dtype, copy=True)  # (rows, cols) W0
    hess = hessian.to(dtype=dtype, copy=not overwrite_hessian)  # (cols, cols); rotated in place below
    original[:, _mark_dead_columns_(hess)] = 0.0  # columns whose input is always zero
    started = time.perf_counter()
    lower, damping, retries = _factor_with_retries(hess, percdamp, max_damping_retries, overwrite=True)  # L
    factor_s = time.perf_counter() - started  # exact on CPU; cholesky_ex's info check synchronises CUDA too
    del hess
    if isinstance(weight_scales, str):
        if weight_scales != "solve":
            raise ValueError(f"weight_scales must be a tensor, 'solve' or None, got {weight_scales!r}")
        weight_scales = row_scales(_sweep(original, lower, pattern, blocksize)[0])
    grid = None if weight_scales is None else weight_scales.to(original.device, dtype)
    final, pruned, loss = _sweep(original, lower, pattern, blocksize, grid)
    return SolveResult(final, pruned, loss, damping, retries, factor_s, weight_scales)


def exact_work(rows: int, cols: int) -> int:
    """Multiply-adds of :func:`exact_nm_prune` on a (rows, cols) weight: one rank-1 update of every row's
    (cols, cols) inverse Hessian per pruned weight (cols / 2 of them at 2:4)."""
    return rows * cols ** 3 // 2


_EXACT_CHUNK_BYTES = 1 << 28  # rows whose (cols, cols) inverses are updated together


def exact_nm_prune(weight: torch.Tensor, hessian: torch.Tensor, pattern: NMPattern, percdamp: float = 0.01,
                   max_damping_retries: int = 6, dtype: torch.dtype = torch.float32) -> SolveResult:
    """Prune ``weight`` to an N:M ``pattern`` with exact greedy OBS (OBC, Frantar & Alistarh 2022), row by row.

    Each row keeps its own inverse Hessian ``G``: it repeatedly removes, among the weights whose group still has
    room to prune, the one of least cost ``w_j² / G_jj``, compensates the row's remaining weights by
    ``-(w_j / G_jj) G_:j`` and drops j from ``G`` (``G -= G_:j G_j: / G_jj``). SparseGPT instead visits columns left to
    right and shares one factor across rows, which costs about twice the error on the narrow layers of efficient
    networks (docs/RESULTS.md); this solve costs :func:`exact_work` multiply-adds, so it is kept for small layers.

    Args:
        weight: (rows, cols) weights in solve column order; not modified.
        hessian: (cols, cols) symmetric PSD; not modified.
        pattern: N:M groups along consecutive columns.
        percdamp, max_damping_retries, dtype: as :func:`sparsegpt_prune`.

    Returns:
        SolveResult (loss: the sum of ``w_j² / (2 G_jj)`` over the pruned weights, as SparseGPT's).
    """
    rows, cols = weight.shape
    if not isinstance(pattern, NMPattern):
        raise TypeError(f"exact_nm_prune takes an N:M pattern, got {pattern!r}")
    if hessian.shape != (cols, cols):
        raise ValueError(f"Hessian shape {tuple(hessian.shape)} does not match weight columns {cols}")
    _check_blocks(pattern, cols, pattern.m)
    work = weight.to(dtype=dtype, copy=True)  # (rows, cols), compensated in place
    hess = hessian.to(dtype=dtype, copy=True)
    work[:, _mark_dead_columns_(hess)] = 0.0
    started = time.perf_counter()
    lower, damping, retries = _factor_with_retries(hess, percdamp, max_damping_retries, overwrite=True)
    inverse = torch.cholesky_inverse(lower).flip(0, 1)  # (cols, cols) (H + λI)⁻¹ = J (L Lᵀ)⁻¹ J
    factor_s = time.perf_counter() - started
    del hess, lower
    pruned = torch.zeros(rows, cols, dtype=torch.bool, device=work.device)
    loss = torch.zeros((), dtype=torch.float64, device=work.device)
    chunk = max(1, _EXACT_CHUNK_BYTES // (cols * cols * work.element_size()))
    for top in range(0, rows, chunk):
        w, mask = work[top:top + chunk], pruned[top:top + chunk]  # (r, cols) views
        r = w.shape[0]
        g = inverse.expand(r, cols, cols).clone()  # (r, cols, cols) each row's inverse Hessian
        room = torch.full((r, cols // pattern.m), pattern.n_pruned, device=w.device)  # (r, groups) left to prune
        picked = torch.arange(r, device=w.device)
        for _ in range(cols // pattern.m * pattern.n_pruned):  # one weight per row and step
            diag = g.diagonal(dim1=1, dim2=2)  # (r, cols)
            cost = w.square() / diag.clamp_min(torch.finfo(dtype).tiny)
            cost.masked_fill_(mask | (room == 0).repeat_interleave(pattern.m, dim=1), float("inf"))
            j = cost.argmin(dim=1)  # (r,)
            column = g[picked, :, j]  # (r, cols) G_:j
            ratio = w[picked, j] / diag[picked, j]  # (r,)
            loss += (w[picked, j] * ratio).sum(dtype=torch.float64) / 2
            w.sub_(ratio[:, None] * column)
            g.baddbmm_(column.unsqueeze(2), (column / diag[picked, j, None]).unsqueeze(1), alpha=-1)
            mask[picked, j] = True
            room[picked, j // pattern.m] -= 1
        w.masked_fill_(mask, 0.0)  # pruned weights are exactly zero
    return SolveResult(work, pruned, float(loss), damping, retries, factor_s, solver="exact")


def _check_blocks(pattern: Pattern, cols: int, blocksize: int) -> None:
    if isinstance(pattern, NMPattern) and (cols % pattern.m or blocksize % pattern.m):
        raise ValueError(f"columns ({cols}) and blocksize ({blocksize}) must be multiples of M={pattern.m}")


def _sweep(original: torch.Tensor, lower: torch.Tensor, pattern: Pattern, blocksize: int,
           grid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The OBS sweep over column blocks, given the factor ``lower`` of the damped, reversed Hessian (and, to
    quantize as well, each row's INT8 scale ``grid``).

    Returns (final weights, pruned mask, OBS loss).
    """
    rows, cols = original.shape
    dtype = original.dtype
    # Visited columns never change again, so the compensated weights of block B before it is visited are
    #   W[:, B] = W0[:, B] + (W0 - Q)[:, :start] · V[:start, B] · V[B, B]⁻¹
    # with Q the final (pruned, compensated) weights: one GEMM per block plays SparseGPT's lazy update.
    final = torch.empty_like(original)  # (rows, cols) Q
    delta = torch.empty_like(original)  # (rows, cols) W0 - Q, filled block by block
    pruned = torch.zeros(rows, cols, dtype=torch.bool, device=original.device)
    loss = torch.zeros((), dtype=torch.float64, device=original.device)
    counts = _block_prune_counts(pattern, rows, cols, blocksize) if isinstance(pattern, Unstructured) else None
    for block, start in enumerate(range(0, cols, blocksize)):
        stop = min(start + blocksize, cols)
        span = slice(start, stop)
        eye = torch.eye(stop - start, dtype=dtype, device=original.device)
        hinv_block = torch.linalg.solve_triangular(_v_block(lower, span, span), eye, upper=True)  # (b, b) U[B, B]
        w_block = original[:, start:stop].clone()  # (rows, b)
        if start:
            shift = delta[:, :start] @ _v_block(lower, slice(0, start), span)  # (rows, b)
            w_block += shift @ hinv_block
        diag = hinv_block.diagonal()  # (b,)
        mask = torch.zeros(rows, stop - start, dtype=torch.bool, device=original.device)  # (rows, b)
        if counts is not None and counts[block]:
            scores = (w_block.square() / diag.square()).flatten()
            mask.view(-1)[torch.topk(scores, counts[block], largest=False).indices] = True
        w_block, errors, mask = _compensate_block(w_block, hinv_block, mask, pattern, grid)
        loss += errors.square().sum(dtype=torch.float64) / 2
        if grid is not None:  # exactly q * s: the rounding above left the columns there up to the GEMM's rounding
            w_block = quantize_weight(w_block, grid)
        w_block.masked_fill_(mask, 0.0)  # pruned weights are exactly zero
        final[:, start:stop] = w_block
        torch.sub(original[:, start:stop], w_block, out=delta[:, start:stop])
        pruned[:, start:stop] = mask
    return final, pruned, float(loss)


def _energy(matrix: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr(M H Mᵀ)``: ‖MX‖² on the inputs H was built from (up to H's 2/n scale)."""
    return float(((matrix @ hessian) * matrix).sum(dtype=torch.float64))


def error_terms(weight: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor) -> tuple[float, float]:
    """``(tr(ΔW H ΔWᵀ), tr(W H Wᵀ))`` with ΔW = W − Ŵ: ‖WX − ŴX‖² and ‖WX‖² on the inputs H was built from."""
    h = hessian.to(pruned.dtype)
    weight = weight.to(pruned.dtype)
    return _energy(weight - pruned, h), _energy(weight, h)


def sparsegpt_error_curve(weight: torch.Tensor, hessian: torch.Tensor, patterns: list[Pattern],
                          blocksize: int = 128, percdamp: float = 0.01, max_damping_retries: int = 6,
                          dtype: torch.dtype = torch.float32) -> tuple[list[tuple[float, float]], int]:
    """SparseGPT's reconstruction error at each pattern, factoring ``hessian`` once: for each pattern the
    :func:`error_terms` ``(‖WX − ŴX‖², ‖WX‖²)``, and the damping retries.

    Rows are solved independently, so ``weight`` may be a subset of a layer's rows.
    """
    _, cols = weight.shape
    for pattern in patterns:
        _check_blocks(pattern, cols, blocksize)
    original = weight.to(dtype=dtype, copy=True)
    hess = hessian.to(dtype=dtype, copy=True)
    original[:, _mark_dead_columns_(hess)] = 0.0
    lower, _, retries = _factor_with_retries(hess, percdamp, max_damping_retries, overwrite=True)
    del hess
    h = hessian.to(dtype)
    signal = _energy(original, h)  # tr(W H Wᵀ): the same for every pattern
    return [(_energy(original - _sweep(original, lower, p, blocksize)[0], h), signal) for p in patterns], retries


def _prune_lowest(weight: torch.Tensor, scores: torch.Tensor, pattern: Pattern, per_row: bool,
                  dtype: torch.dtype) -> SolveResult:
    """Zero the lowest-scoring weights: per group of M columns (N:M), per row or per layer (unstructured)."""
    rows, cols = weight.shape
    work = weight.to(dtype=dtype, copy=True)
    if isinstance(pattern, NMPattern):
        if cols % pattern.m:
            raise ValueError(f"columns ({cols}) must be a multiple of M={pattern.m}")
        groups = scores.view(rows, cols // pattern.m, pattern.m)
        drop = torch.topk(groups, pattern.n_pruned, dim=2, largest=False).indices
        pruned = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, drop, True).view(rows, cols)
    elif per_row:
        drop = torch.topk(scores, round(pattern.sparsity * cols), dim=1, largest=False).indices
        pruned = torch.zeros(rows, cols, dtype=torch.bool, device=work.device).scatter_(1, drop, True)
    else:
        count = round(pattern.sparsity * rows * cols)
        pruned = torch.zeros(rows * cols, dtype=torch.bool, device=work.device)
        pruned[torch.topk(scores.flatten(), count, largest=False).indices] = True
        pruned = pruned.view(rows, cols)
    work.masked_fill_(pruned, 0.0)
    return SolveResult(work, pruned, 0.0)


def magnitude_prune(weight: torch.Tensor, pattern: Pattern, dtype: torch.dtype = torch.float32) -> SolveResult:
    """Zero the smallest-magnitude weights: per group of M columns for N:M, per layer for unstructured."""
    return _prune_lowest(weight, weight.abs().to(dtype), pattern, per_row=False, dtype=dtype)


def wanda_prune(weight: torch.Tensor, input_sq_norms: torch.Tensor, pattern: Pattern,
                dtype: torch.dtype = torch.float32) -> SolveResult:
    """Wanda (Sun et al., 2023): zero the weights with the lowest ``|w_ij| · ‖x_j‖``, no weight update.

    Args:
        weight: (rows, cols) in solve column order.
        input_sq_norms: (cols,) squared input norms per column, e.g. ``diag(H)`` (any positive scale).
        pattern: N:M groups along columns, or an unstructured fraction compared per output row.
    """
    scores = weight.abs().to(dtype) * input_sq_norms.to(dtype=dtype, device=weight.device).clamp_min(0).sqrt()
    return _prune_lowest(weight, scores, pattern, per_row=True, dtype=dtype)
