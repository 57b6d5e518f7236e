"""Lowering of sparsified GraphModules to kernels that exploit the sparsity (CUDA only)."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.fx

from .semi_structured import LoweringDecision, SemiStructuredLinear, lower_semi_structured, plan_semi_structured
from .tensorrt import lower_tensorrt

__all__ = ["lower", "LoweringDecision", "SemiStructuredLinear", "plan_semi_structured"]

BACKENDS = ("semi_structured", "tensorrt")


def lower(gm: torch.fx.GraphModule, backend: str = "semi_structured",
          example_inputs: Sequence[torch.Tensor] | None = None, **options: Any) -> torch.nn.Module:
    """Make a sparsified model run on sparse hardware; ``gm`` itself is not modified.

    Args:
        gm: a GraphModule from :func:`sgfx.sparsify`.
        backend: ``"semi_structured"`` (PyTorch 2:4 sparse matmuls for eligible Linear layers) or ``"tensorrt"``
            (Torch-TensorRT engines with ``sparse_weights=True``; needs ``example_inputs``).
        example_inputs: example inputs, for ``"tensorrt"``.
        **options: ``dtype`` (both); ``min_block_size``, ``torch_executed_ops`` (tensorrt).

    Returns:
        The lowered module, on CUDA.

    Example:
        >>> fast = sgfx.lower(sgfx.sparsify(model, calib, "2:4"), backend="semi_structured")  # doctest: +SKIP
    """
    if not isinstance(gm, torch.fx.GraphModule):
        raise TypeError(f"sgfx.lower takes the GraphModule returned by sgfx.sparsify, got {type(gm).__name__}")
    if backend == "semi_structured":
        return lower_semi_structured(gm, **options)
    if backend == "tensorrt":
        return lower_tensorrt(gm, example_inputs or (), **options)
    raise ValueError(f"unknown backend {backend!r}; accepted: {', '.join(BACKENDS)}")
