"""Lower pruned ``nn.Linear`` layers to PyTorch semi-structured (2:4) sparse matmuls on CUDA.

Why: a 2:4 weight only runs faster where the hardware's sparse tensor cores do the matmul. PyTorch exposes them
through ``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt, on Hopper and Ampere; CUTLASS, Ampere only), for
fp16/bf16/int8 weights whose shapes are multiples of the backend's minimum tile. PyTorch has no sparse
convolution, so convolutions stay dense here (TensorRT, the other backend, handles them).

The plan (which layer is lowered, or why not) is pure logic and runs anywhere; the replacement needs CUDA.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..check import count_violations
from ..report import REPORT_KEY

__all__ = ["LoweringDecision", "SemiStructuredLinear", "plan_semi_structured", "lower_semi_structured"]

logger = logging.getLogger(__name__)

_DTYPES = (torch.float16, torch.bfloat16, torch.int8)


@dataclass
class LoweringDecision:
    layer: str
    backend: str
    lowered: bool
    reason: str = ""


def _shape_constraints(dtype: torch.dtype) -> tuple[int, int]:
    """(min_rows, min_cols) of the semi-structured backend PyTorch would use for this dtype."""
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    use_cutlass = not (torch.backends.cusparselt.is_available()) or getattr(
        torch.sparse.SparseSemiStructuredTensor, "_FORCE_CUTLASS", False)
    cls = SparseSemiStructuredTensorCUTLASS if use_cutlass else SparseSemiStructuredTensorCUSPARSELT
    config = cls._DTYPE_SHAPE_CONSTRAINTS.get(dtype)
    if config is None:
        raise ValueError(f"{cls.__name__} does not support {dtype}")
    return config.sparse_min_rows, config.sparse_min_cols


def plan_semi_structured(gm: torch.fx.GraphModule, dtype: torch.dtype) -> list[LoweringDecision]:
    """Decide, for every Conv2d/Linear called in ``gm``, whether it can become a semi-structured matmul."""
    if dtype not in _DTYPES:
        raise ValueError(f"semi-structured sparsity needs float16, bfloat16 or int8 weights, got {dtype}")
    min_rows, min_cols = _shape_constraints(dtype)
    decisions = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        if isinstance(module, nn.Conv2d):
            decisions.append(LoweringDecision(node.target, "semi_structured", False,
                                              "PyTorch has no sparse convolution kernel (use backend='tensorrt')"))
        elif isinstance(module, nn.Linear):
            rows, cols = module.weight.shape
            reason = ""
            if cols % 4 or count_violations(module.weight, "2:4"):
                reason = "weight is not 2:4 sparse"
            elif rows % min_rows or cols % min_cols:
                reason = f"shape {rows}x{cols} is not a multiple of the ({min_rows}, {min_cols}) tile for {dtype}"
            decisions.append(LoweringDecision(node.target, "semi_structured", not reason, reason))
    return decisions


class SemiStructuredLinear(nn.Module):
    """``nn.Linear`` whose 2:4 weight is stored compressed for the sparse tensor cores."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        dense = linear.weight.detach().contiguous()
        self.weight = nn.Parameter(torch.sparse.to_sparse_semi_structured(dense), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        leading = x.shape[:-1]
        out = F.linear(x.reshape(-1, self.in_features), self.weight, self.bias)
        return out.reshape(*leading, self.out_features)


def lower_semi_structured(gm: torch.fx.GraphModule, dtype: torch.dtype | None = None) -> torch.fx.GraphModule:
    """A CUDA copy of ``gm`` in ``dtype`` (default: the model's half dtype, else float16) with every eligible 2:4
    Linear replaced by :class:`SemiStructuredLinear`; the decisions are added to the report.

    Raises:
        RuntimeError: no CUDA device (this backend runs only on NVIDIA GPUs).
    """
    if not torch.cuda.is_available():
        raise RuntimeError("backend='semi_structured' needs a CUDA GPU with sparse tensor cores (Ampere or newer); "
                           "no CUDA device is available here")
    if dtype is None:
        dtype = next((p.dtype for p in gm.parameters() if p.dtype in (torch.float16, torch.bfloat16)), torch.float16)
        logger.info("semi_structured: lowering in %s", dtype)
    lowered = copy.deepcopy(gm).to(device="cuda", dtype=dtype).eval()
    decisions = plan_semi_structured(lowered, dtype)
    for decision in decisions:
        if decision.lowered:
            lowered.set_submodule(decision.layer, SemiStructuredLinear(lowered.get_submodule(decision.layer)))
    lowered.recompile()
    report = lowered.meta.get(REPORT_KEY)
    if report is not None:
        report.lowering = decisions
    return lowered
