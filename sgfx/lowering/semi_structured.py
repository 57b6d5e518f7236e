"""Lower pruned ``nn.Linear`` layers and 1x1 convolutions to PyTorch semi-structured (2:4) sparse matmuls on CUDA.

Why: a 2:4 weight only runs faster where the hardware's sparse tensor cores do the matmul. PyTorch exposes them
through ``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt, on Hopper and Ampere; CUTLASS, Ampere only), for
fp16/bf16/int8 weights whose shapes are multiples of the backend's minimum tile. PyTorch has no sparse
convolution; a 1x1 convolution (stride 1, no padding, groups 1) is a matmul over channels, so it becomes one on a
channels-last view of its input. Whether that beats cuDNN's dense convolution depends on the shape, so each such
layer is timed on its real input (``example_inputs``) and lowered only where the sparse matmul was faster; other
convolutions stay dense (TensorRT, the other backend, handles them).

The plan (which layer is lowered, or why not) is pure logic and runs anywhere; the replacement needs CUDA.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..check import count_violations
from ..layers import is_plain_conv
from ..report import find_report

__all__ = ["LoweringDecision", "SemiStructuredLinear", "SemiStructuredConv1x1", "plan_semi_structured",
           "lower_semi_structured", "is_pointwise", "median_cuda_ms"]

logger = logging.getLogger(__name__)

_DTYPES = (torch.float16, torch.bfloat16, torch.int8)
CANDIDATE = "candidate: 1x1 conv as a channels-last 2:4 matmul, lowered only if timed faster than the dense conv"


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


def _weight_reason(weight: torch.Tensor, min_rows: int, min_cols: int, dtype: torch.dtype) -> str:
    """Why a (rows, cols) matmul weight cannot be stored semi-structured, or ""."""
    rows, cols = weight.shape
    if cols % 4 or count_violations(weight, "2:4"):
        return "weight is not 2:4 sparse"
    if rows % min_rows or cols % min_cols:
        return f"shape {rows}x{cols} is not a multiple of the ({min_rows}, {min_cols}) tile for {dtype}"
    return ""


def is_pointwise(conv: nn.Conv2d) -> bool:
    """A 1x1 convolution that is a plain matmul over channels (stride 1, no padding, groups 1)."""
    return (isinstance(conv, nn.Conv2d) and is_plain_conv(conv) and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
            and conv.groups == 1 and (conv.padding in ((0, 0), "valid")) and conv.padding_mode == "zeros")


def plan_semi_structured(gm: torch.fx.GraphModule, dtype: torch.dtype) -> list[LoweringDecision]:
    """Decide, for every Conv2d/Linear called in ``gm``, whether it can become a semi-structured matmul.

    A 1x1 convolution that can is planned as a candidate (``lowered=False``, reason "candidate: ..."):
    :func:`lower_semi_structured` times it and lowers it only where the sparse matmul is faster.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"semi-structured sparsity needs float16, bfloat16 or int8 weights, got {dtype}")
    min_rows, min_cols = _shape_constraints(dtype)
    decisions = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        if isinstance(module, nn.Conv2d):
            if not is_pointwise(module):
                reason = ("PyTorch has no sparse convolution kernel; only plain 1x1 stride-1 convs are matmuls "
                          "(use 'tensorrt')")
            else:
                reason = _weight_reason(module.weight.flatten(1), min_rows, min_cols, dtype) or CANDIDATE
            decisions.append(LoweringDecision(node.target, "semi_structured", False, reason))
        elif isinstance(module, (nn.Conv1d, nn.Conv3d, nn.modules.conv._ConvTransposeNd)):
            decisions.append(LoweringDecision(node.target, "semi_structured", False,
                                              f"PyTorch has no sparse {type(module).__name__} kernel (use 'tensorrt')"))
        elif isinstance(module, nn.Linear):
            reason = _weight_reason(module.weight, min_rows, min_cols, dtype)
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


class SemiStructuredConv1x1(nn.Module):
    """A 1x1 stride-1 ``nn.Conv2d`` as a 2:4 matmul over channels on a channels-last view of its input.

    ``compress`` turns the (C_out, C_in) weight into what ``F.linear`` multiplies with (the semi-structured tensor on
    CUDA; tests pass the identity to check the layout on the CPU).
    """

    def __init__(self, conv: nn.Conv2d, compress=None):
        super().__init__()
        compress = compress or torch.sparse.to_sparse_semi_structured
        self.out_channels = conv.out_channels
        self.weight = nn.Parameter(compress(conv.weight.detach().flatten(1).contiguous()), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(-1, channels)  # (B·H·W, C_in): a copy unless x is channels-last
        out = F.linear(rows, self.weight, self.bias)  # (B·H·W, C_out)
        return out.view(batch, height, width, self.out_channels).permute(0, 3, 1, 2)  # channels-last output


@torch.no_grad()
def median_cuda_ms(fn, x: torch.Tensor, warmup: int = 3, repeats: int = 20) -> float:
    """Median wall time of ``fn(x)`` on the GPU in milliseconds (CUDA events), after ``warmup`` calls."""
    for _ in range(warmup):
        fn(x)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(x)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _time_candidates(model: nn.Module, decisions: list[LoweringDecision], example_inputs) -> None:
    """Time each candidate 1x1 conv dense vs semi-structured on the input it sees, and decide by the numbers."""
    candidates = {d.layer: d for d in decisions if d.reason == CANDIDATE}
    if not candidates:
        return
    if not example_inputs:
        for decision in candidates.values():
            decision.reason = "1x1 conv left dense: not timed (pass example_inputs to measure it)"
        return
    seen: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(name).register_forward_pre_hook(
        lambda _m, args, name=name: seen.setdefault(name, args[0].detach())) for name in candidates]
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        try:
            model(*[x.to(device="cuda", dtype=dtype) if x.is_floating_point() else x.cuda() for x in example_inputs])
        finally:
            for hook in hooks:
                hook.remove()
        for name, decision in candidates.items():
            conv = model.get_submodule(name)
            sparse = SemiStructuredConv1x1(conv)
            dense_ms, sparse_ms = median_cuda_ms(conv, seen[name]), median_cuda_ms(sparse, seen[name])
            decision.lowered = sparse_ms < dense_ms
            verdict = "lowered" if decision.lowered else "left dense"
            decision.reason = (f"1x1 conv {verdict}: sparse matmul {sparse_ms:.3f} ms vs dense conv {dense_ms:.3f} ms "
                               f"on input {tuple(seen[name].shape)}")


def _replacement(module: nn.Module) -> nn.Module:
    return SemiStructuredConv1x1(module) if isinstance(module, nn.Conv2d) else SemiStructuredLinear(module)


def lower_semi_structured(gm: torch.fx.GraphModule, dtype: torch.dtype | None = None,
                          example_inputs: Sequence[torch.Tensor] | None = None) -> torch.fx.GraphModule:
    """A CUDA copy of ``gm`` in ``dtype`` (default: the model's half dtype, else float16) with every eligible 2:4
    Linear replaced by :class:`SemiStructuredLinear`, and every eligible 1x1 conv replaced by
    :class:`SemiStructuredConv1x1` where it timed faster on ``example_inputs``; the decisions are added to the report.

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
    _time_candidates(lowered, decisions, example_inputs)
    for decision in decisions:
        if decision.lowered:
            lowered.set_submodule(decision.layer, _replacement(lowered.get_submodule(decision.layer)))
    lowered.recompile()
    report = find_report(lowered)
    if report is not None:
        report.lowering = decisions
    return lowered
