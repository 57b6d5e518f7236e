"""Lowering and export of sparsified GraphModules to kernels that exploit the sparsity.

ONNX export and its TensorRT sparsity check run anywhere; the semi-structured and Torch-TensorRT backends need CUDA.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.fx

from .semi_structured import (LoweringDecision, SemiStructuredConv1x1, SemiStructuredLinear, lower_semi_structured,
                              plan_semi_structured)
from .onnx import ExportError, OnnxExportReport, OnnxLayer, check_onnx_sparsity, export_onnx, trtexec_command
from .tensorrt import TensorRTSparsity, lower_tensorrt, parse_sparsity_log

__all__ = ["lower", "LoweringDecision", "SemiStructuredLinear", "plan_semi_structured", "export_onnx",
           "check_onnx_sparsity", "OnnxExportReport", "OnnxLayer", "ExportError", "trtexec_command",
           "SemiStructuredConv1x1", "TensorRTSparsity", "parse_sparsity_log"]

BACKENDS = ("semi_structured", "tensorrt")


def lower(gm: torch.fx.GraphModule, backend: str = "semi_structured",
          example_inputs: Sequence[torch.Tensor] | None = None, **options: Any) -> torch.nn.Module:
    """Make a sparsified model run on sparse hardware; ``gm`` itself is not modified.

    Args:
        gm: a GraphModule from :func:`sgfx.sparsify`.
        backend: ``"semi_structured"`` (PyTorch 2:4 sparse matmuls for eligible Linear layers, and for 1x1
            convolutions where they time faster than the dense conv on ``example_inputs``) or ``"tensorrt"``
            (Torch-TensorRT engines from ``torch.export`` with ``sparse_weights=True``; needs ``example_inputs``; the
            returned module's ``sgfx_tensorrt`` says which layers TensorRT found eligible and ran sparse).
        example_inputs: example inputs: required for ``"tensorrt"``; for ``"semi_structured"``, what 1x1 convs are
            timed on (without them they stay dense).
        **options: ``dtype`` (both); ``min_block_size``, ``torch_executed_ops`` (tensorrt).

    Returns:
        The lowered module, on CUDA.

    Example:
        >>> fast = sgfx.lower(sgfx.sparsify(model, calib, "2:4"), backend="semi_structured")  # doctest: +SKIP
    """
    if not isinstance(gm, torch.fx.GraphModule):
        raise TypeError(f"sgfx.lower takes the GraphModule returned by sgfx.sparsify, got {type(gm).__name__}")
    if backend == "semi_structured":
        return lower_semi_structured(gm, example_inputs=example_inputs, **options)
    if backend == "tensorrt":
        return lower_tensorrt(gm, example_inputs or (), **options)
    raise ValueError(f"unknown backend {backend!r}; accepted: {', '.join(BACKENDS)}")
