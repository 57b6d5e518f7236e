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
axis from :func:`nm_axis` (an exported ONNX weight's from :func:`onnx_nm_axis`) and cut groups with :func:`nm_groups`.
"""

from __future__ import annotations

import torch

__all__ = ["nm_axis", "onnx_nm_axis", "onnx_torch_axis", "nm_groups", "nm_ungroup", "not_accelerated_reason",
           "TRANSPOSED_KINDS", "NO_SPARSE_DECONVOLUTION"]

TRANSPOSED_KINDS = frozenset({"ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d"})
_ONNX_TRANSPOSED = "ConvTranspose"  # its weight is [C_in, C_out/g, k...], PyTorch's ConvTranspose layout


def nm_axis(kind: str = "Linear") -> int:
    """The PyTorch weight axis along which N:M groups run for a layer of ``kind`` (a :class:`LayerRecord` ``op``)."""
    return 0 if kind in TRANSPOSED_KINDS else 1


# Polygraphy's sparsity checker covers Conv and MatMul/Gemm only; no TensorRT sparse deconvolution is documented
# as far as sgfx knows
NO_SPARSE_DECONVOLUTION = ("ConvTranspose: no known TensorRT 2:4 kernel (Polygraphy checks Conv/MatMul/Gemm only; "
                           "no sparse deconvolution); pattern kept along C_in")
DEPTHWISE = "depthwise convolution (1 input channel per group)"


def not_accelerated_reason(kind: str, groups: int, in_per_group: int) -> str | None:
    """Why TensorRT's 2:4 kernels would not run a layer of ``kind`` (a :class:`LayerRecord` ``op``) faster, or
    None: its sparse kernels cover Conv and Gemm/MatMul (what Polygraphy's sparsity checker inspects), not
    transposed convolutions, and not depthwise convolutions. No channel-count threshold is documented, so none is
    applied."""
    if kind in TRANSPOSED_KINDS:
        return NO_SPARSE_DECONVOLUTION
    if groups > 1 and in_per_group == 1:
        return DEPTHWISE
    return None


def onnx_nm_axis(op_type: str, attributes: dict | None = None) -> int:
    """The axis of an ONNX node's weight (input 1) that N:M groups run along, as TensorRT reads it: its reduction
    axis (Conv [C_out, C_in/g, k...]: 1; ConvTranspose: 0; Gemm: 1 with ``transB``, else 0; MatMul [K, N]: 0)."""
    if op_type == "Conv":
        return 1
    if op_type == _ONNX_TRANSPOSED:
        return 0
    if op_type == "Gemm":
        return 1 if (attributes or {}).get("transB", 0) else 0
    if op_type == "MatMul":
        return 0
    raise ValueError(f"no TensorRT sparsity rule for ONNX op {op_type!r}")


def onnx_torch_axis(op_type: str) -> int:
    """Where PyTorch's layout has an ONNX node's N:M axis: dim 0 for ConvTranspose (the same layout), dim 1 for
    Conv, Gemm and MatMul weights once back in PyTorch's (out, in) / (C_out, C_in, k...) layout."""
    return 0 if op_type == _ONNX_TRANSPOSED else 1


def nm_groups(weight: torch.Tensor, m: int, axis: int = 1) -> torch.Tensor:
    """(n_groups, m): every run of ``m`` consecutive entries along ``axis``, one per row (a view when possible).

    Rows are ordered by the other axes in their order (for a Conv weight: C_out, kh, kw), then along ``axis``.
    """
    return weight.movedim(axis, -1).reshape(-1, m)


def nm_ungroup(groups: torch.Tensor, shape: tuple[int, ...], axis: int = 1) -> torch.Tensor:
    """Inverse of :func:`nm_groups`: a contiguous tensor of ``shape`` from its (n_groups, m) rows."""
    moved = [d for i, d in enumerate(shape) if i != axis] + [shape[axis]]
    return groups.reshape(moved).movedim(-1, axis).contiguous()
