"""The N:M layout, in one place: which weight axis the groups of M run along, and how to cut a weight into them.

NVIDIA's sparse tensor cores (and TensorRT) want every run of M consecutive weights along the *reduction* axis,
the axis each output sums over, to hold at most N nonzeros, at every output channel and kernel position:

- ``Linear`` (out, in): along ``in`` (axis 1);
- ``Conv1d/2d/3d`` (C_out, C_in/g, k...): along C_in (axis 1), at each (output channel, kernel position);
- ``ConvTranspose1d/2d/3d`` (C_in, C_out/g, k...): each output sums over C_in, so along axis 0.
  NVIDIA's Polygraphy sparsity checker covers Conv and MatMul/Gemm only and no TensorRT sparse deconvolution
  kernel was found documented, so sgfx prunes transposed convs along their reduction axis (for accuracy and
  storage) and the ONNX report says they are not known to be accelerated by TensorRT.

The solver (:mod:`sgfx.layers`), the checker (:mod:`sgfx.check`), serialization and the ONNX checker all read the
axis from :func:`nm_axis` and cut groups with :func:`nm_groups`.
"""

from __future__ import annotations

import torch

__all__ = ["nm_axis", "nm_groups", "nm_ungroup", "TRANSPOSED_KINDS"]

TRANSPOSED_KINDS = frozenset({"ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d"})


def nm_axis(kind: str = "Linear") -> int:
    """The PyTorch weight axis along which N:M groups run for a layer of ``kind`` (a :class:`LayerRecord` ``op``)."""
    return 0 if kind in TRANSPOSED_KINDS else 1


def nm_groups(weight: torch.Tensor, m: int, axis: int = 1) -> torch.Tensor:
    """(n_groups, m): every run of ``m`` consecutive entries along ``axis``, one per row (a view when possible).

    Rows are ordered by the other axes in their order (for a Conv weight: C_out, kh, kw), then along ``axis``.
    """
    return weight.movedim(axis, -1).reshape(-1, m)


def nm_ungroup(groups: torch.Tensor, shape: tuple[int, ...], axis: int = 1) -> torch.Tensor:
    """Inverse of :func:`nm_groups`: a contiguous tensor of ``shape`` from its (n_groups, m) rows."""
    moved = [d for i, d in enumerate(shape) if i != axis] + [shape[axis]]
    return groups.reshape(moved).movedim(-1, axis).contiguous()
