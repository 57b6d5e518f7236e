"""Obviously-correct references the tests compare against, written from the papers, slow on purpose."""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from sgfx.config import NMPattern, Unstructured


def per_column_obs(weight, hessian, pattern, blocksize, percdamp=0.01, grid=None):
    """SparseGPT's adaptive-mask OBS, one column at a time, with an explicit inverse Hessian (float64).

    The inverse Hessian of the columns not yet visited is kept explicitly: visiting column c removes it by
    Gaussian elimination (OBS, Hassibi & Stork), ``Hinv <- Hinv - Hinv[:, c] Hinv[c, :] / Hinv[c, c]``, and
    pruning w_rc moves the row's remaining weights by ``-(w_rc / Hinv[c, c]) Hinv[c, :]``. The saliency of a
    weight is ``w² / d_c`` with ``d_c`` the diagonal entry when c is visited (the squared Cholesky diagonal of
    the paper's Algorithm 1). The mask is chosen from the compensated weights: per group of M columns at its
    first column (N:M), or per block of ``blocksize`` columns (unstructured; block totals rounded so that the
    layer total is exact).

    With ``grid`` (rows,), each row's INT8 scale, a kept weight is rounded to ``clamp(round(w / s), -127, 127) s``
    when its column is visited and its error moves the row's remaining weights the same way (the paper's joint
    sparsification and quantization; GPTQ when nothing is pruned).
    """
    w = weight.double().clone()
    h = hessian.double().clone()
    rows, cols = w.shape
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += percdamp * torch.diag(h).mean() * torch.eye(cols, dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    diag_at_visit, row_at_visit = torch.zeros(cols, dtype=torch.float64), []
    for c in range(cols):  # the elimination does not depend on the weights: do it first
        diag_at_visit[c] = hinv[c, c]
        row_at_visit.append(hinv[c, :].clone())
        hinv = hinv - torch.outer(hinv[:, c], hinv[c, :]) / hinv[c, c]
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for c in range(cols):
        if isinstance(pattern, NMPattern) and c % pattern.m == 0:
            scores = w[:, c:c + pattern.m] ** 2 / diag_at_visit[c:c + pattern.m]
            for r in range(rows):
                order = sorted(range(pattern.m), key=lambda k: float(scores[r, k]))
                for k in order[:pattern.n_pruned]:
                    mask[r, c + k] = True
        if isinstance(pattern, Unstructured) and c % blocksize == 0:
            stop = min(c + blocksize, cols)
            count = round(pattern.sparsity * rows * stop) - round(pattern.sparsity * rows * c)
            scores = (w[:, c:stop] ** 2 / diag_at_visit[c:stop]).flatten()
            for k in sorted(range(scores.numel()), key=lambda k: float(scores[k]))[:count]:
                mask[k // (stop - c), c + k % (stop - c)] = True
        for r in range(rows):
            if mask[r, c]:
                w[r, :] -= w[r, c] / diag_at_visit[c] * row_at_visit[c]
                w[r, c] = 0.0
            elif grid is not None:
                s = float(grid[r])
                q = min(max(round(float(w[r, c]) / s), -127), 127) * s  # Python's round: half to even
                w[r, :] -= (w[r, c] - q) / diag_at_visit[c] * row_at_visit[c]
                w[r, c] = q
    return w, mask


def conv_via_loops_ok(weight, n, m):
    """True if a Conv2d weight (C_out, C_in, kh, kw) has <= n nonzeros in every m consecutive input channels
    at every (output channel, kernel position) — checked with plain loops."""
    c_out, c_in, kh, kw = weight.shape
    for o in range(c_out):
        for i in range(kh):
            for j in range(kw):
                for c in range(0, c_in, m):
                    if int((weight[o, c:c + m, i, j] != 0).sum()) > n:
                        return False
    return True


def correlated_inputs(n, dim, generator, rank=None):
    """n samples of dim-dimensional inputs with strongly correlated coordinates, as real activations have."""
    rank = rank or dim
    mixing = torch.randn(rank, dim, generator=generator) + 0.5 * torch.randn(1, dim, generator=generator)
    return torch.randn(n, rank, generator=generator) @ mixing


def hessian_of(x):
    """2/n X Xᵀ for inputs x of shape (n, dim)."""
    x = x.double()
    return 2.0 / x.shape[0] * x.T @ x


def unfold_hessian(inputs, conv):
    """Hessian of a Conv2d's input for group 0 in (C_in, kh, kw) unfold order, from whole-batch unfolds."""
    rows = []
    for x in inputs:
        if conv.padding_mode != "zeros":
            ph, pw = conv.padding
            x = F.pad(x, (pw, pw, ph, ph), mode=conv.padding_mode)
            pad = 0
        else:
            pad = conv.padding
        cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=pad, stride=conv.stride)
        rows.append(cols.transpose(1, 2).reshape(-1, cols.shape[1]))
    return hessian_of(torch.cat(rows))


def polygraphy_sparse_tensors(model, int8_as_float: bool = False) -> tuple[set[str], set[str]]:
    """NVIDIA Polygraphy's verdict on an ONNX model (``polygraphy inspect sparsity``): the weight initializers it
    considers (Conv/Gemm/MatMul weights with a reduction axis divisible by 4) and those it finds 2:4 sparse.

    An independent oracle for ``sgfx.check_onnx_sparsity``: Polygraphy walks the graph and checks each run of four
    with its own element-by-element loop (slow: about 2 s per million weights).

    Polygraphy follows a weight back through ``DequantizeLinear`` to its INT8 initializer but then skips it
    ("unsupported type: int8"); with ``int8_as_float`` those initializers are handed to it as float32 copies (same
    values, same zeros), so that its own check runs on them.
    """
    import onnx
    from polygraphy.logger import G_LOGGER
    from polygraphy.tools.sparse import SparsityPruner

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    if int8_as_float:
        from onnx import numpy_helper

        model = onnx.ModelProto.FromString(model.SerializeToString())
        for index, tensor in enumerate(model.graph.initializer):
            if tensor.data_type == onnx.TensorProto.INT8:
                values = numpy_helper.to_array(tensor).astype("float32")
                model.graph.initializer[index].CopyFrom(numpy_helper.from_array(values, tensor.name))
    pruner = SparsityPruner(model)
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # it casts float_info.max into the weight dtype
        candidates = {info.name for info in pruner._walk_nodes()}
        pruner.prune_infos.clear()  # check() walks the graph again
        pruner.check()
    return candidates, set(pruner.sparse_tensors)


def conv_column_permutation(in_per_group: int, kernel_size: tuple[int, ...]) -> torch.Tensor:
    """Index ``perm`` with ``solve_col[j] = unfold_col[perm[j]]`` for one conv group: ``F.unfold`` orders a
    patch's features (C_in, k...), sgfx's solve layout (k..., C_in)."""
    positions = math.prod(kernel_size)
    channel = torch.arange(in_per_group).repeat(positions)  # (K·C,) channel of each solve column
    position = torch.arange(positions).repeat_interleave(in_per_group)  # (K·C,) kernel position
    return channel * positions + position


def relative_error(weight: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor) -> float:
    """``‖WX − ŴX‖² / ‖WX‖²`` on the inputs ``H = X Xᵀ`` was built from: ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)``, in float64."""
    h, w, delta = hessian.double(), weight.double(), (weight - pruned).double()
    den = float(torch.einsum("ij,jk,ik->", w, h, w))
    return float(torch.einsum("ij,jk,ik->", delta, h, delta)) / den if den > 0 else 0.0
