"""Lower a sparsified GraphModule to TensorRT engines with sparse weights (optional: ``pip install sgfx[tensorrt]``).

Why: TensorRT is the NVIDIA runtime that runs 2:4 convolutions *and* matmuls on sparse tensor cores. The front door
is ``torch.export``: the model is cast to half precision (fp16 by default) and exported, then compiled with
``torch_tensorrt.dynamo.compile(..., use_explicit_typing=True, sparse_weights=True)``: a strongly typed network takes
its precision from the dtypes. TensorRT picks a sparse kernel only where it is faster, and says so only in its log:
``(Sparsity) Layers eligible for sparse math: ...`` and ``(Sparsity) TRT inference plan picked sparse implementation
for layers: ...``. Both lines are captured from Torch-TensorRT's logger and attached to the returned module, so
"no speed-up" is explained instead of silent.
"""

from __future__ import annotations

import copy
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Collection, Iterable, Sequence

import torch
import torch.fx

from ..report import find_report

__all__ = ["lower_tensorrt", "TensorRTSparsity", "parse_sparsity_log", "TRT_LOGGER_NAME"]

logger = logging.getLogger(__name__)

TRT_LOGGER_NAME = "torch_tensorrt [TensorRT Conversion Context]"  # where Torch-TensorRT forwards TensorRT's log
_ELIGIBLE = "(Sparsity) Layers eligible for sparse math:"
_PICKED = "(Sparsity) TRT inference plan picked sparse implementation for layers:"


@dataclass
class TensorRTSparsity:
    """TensorRT's own account of sparsity in a build, and which sgfx layers it covers."""

    eligible: list[str] = field(default_factory=list)  # TensorRT layer names (fused layers joined with " + ")
    picked: list[str] = field(default_factory=list)
    log_seen: bool = False  # TensorRT printed its sparsity lines (False: nothing was eligible or logging was off)
    layers: dict[str, str] = field(default_factory=dict)  # sgfx pruned layer -> "sparse kernel", "eligible", ...

    def __str__(self) -> str:
        if not self.log_seen:
            return "TensorRT printed no sparsity lines: no layer was eligible for sparse math"
        counts = {state: sum(v == state for v in self.layers.values()) for state in set(self.layers.values())}
        return (f"TensorRT: {len(self.eligible)} layers eligible for sparse math, sparse kernels picked for "
                f"{len(self.picked)}; sgfx's pruned layers: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))


def _names(message: str, prefix: str) -> list[str]:
    return [name.strip() for name in message.split(prefix, 1)[1].split(",") if name.strip()]


def _layer_pattern(name: str) -> re.Pattern:
    """A dotted module path as TensorRT layer names spell it (``layer1.0.conv1`` or ``layer1/0/conv1``)."""
    atoms = [re.escape(atom) for atom in name.split(".")]
    return re.compile(r"(?<![\w])" + r"[./_]".join(atoms) + r"(?![\w])")


def parse_sparsity_log(messages: Iterable[str], pruned_layers: Sequence[str] = ()) -> TensorRTSparsity:
    """Read TensorRT's sparsity lines from log messages; map sgfx's pruned layers onto TensorRT's layer names.

    A pruned layer is "sparse kernel" when a picked TensorRT layer's name contains its module path, "eligible (dense
    kernel was faster)" when only an eligible one does, and "not eligible" otherwise (names are matched by module
    path, so a layer TensorRT renamed beyond recognition shows as not eligible).
    """
    result = TensorRTSparsity()
    for message in messages:
        if _ELIGIBLE in message:
            result.eligible += _names(message, _ELIGIBLE)
            result.log_seen = True
        elif _PICKED in message:
            result.picked += _names(message, _PICKED)
            result.log_seen = True
    for name in pruned_layers:
        pattern = _layer_pattern(name)
        if any(pattern.search(trt) for trt in result.picked):
            result.layers[name] = "sparse kernel"
        elif any(pattern.search(trt) for trt in result.eligible):
            result.layers[name] = "eligible (dense kernel was faster)"
        else:
            result.layers[name] = "not eligible"
    return result


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def lower_tensorrt(gm: torch.fx.GraphModule, example_inputs: Sequence[torch.Tensor], dtype: torch.dtype = torch.float16,
                   min_block_size: int = 5, torch_executed_ops: Collection[Any] = ()) -> torch.nn.Module:
    """Compile ``gm`` with Torch-TensorRT from ``torch.export``, sparse weights enabled, strongly typed in ``dtype``.

    Returns:
        The compiled module; its ``sgfx_tensorrt`` attribute is a :class:`TensorRTSparsity` (also logged).

    Raises:
        ImportError: torch-tensorrt is not installed (with the install command).
        RuntimeError: no CUDA device.
        ValueError: no example inputs.
    """
    try:
        import torch_tensorrt
    except ImportError:
        raise ImportError("backend='tensorrt' needs Torch-TensorRT: pip install 'sgfx[tensorrt]' "
                          "(NVIDIA GPU and a matching CUDA/TensorRT required)") from None
    if not torch.cuda.is_available():
        raise RuntimeError("backend='tensorrt' needs a CUDA GPU; none is available here")
    if not example_inputs:
        raise ValueError("backend='tensorrt' needs example_inputs=(x,) to build its engines")
    model = copy.deepcopy(gm).to(device="cuda", dtype=dtype).eval()
    inputs = tuple(x.to(device="cuda", dtype=dtype) if x.is_floating_point() else x.cuda() for x in example_inputs)
    program = torch.export.export(model, inputs)
    capture, trt_logger = _Capture(), logging.getLogger(TRT_LOGGER_NAME)
    level = trt_logger.level
    trt_logger.addHandler(capture)
    trt_logger.setLevel(logging.DEBUG)  # TensorRT prints its sparsity lines at INFO/VERBOSE
    try:
        with torch_tensorrt.logging.info():
            compiled = torch_tensorrt.dynamo.compile(
                program, arg_inputs=list(inputs), use_explicit_typing=True, sparse_weights=True,
                min_block_size=min_block_size, torch_executed_ops=set(torch_executed_ops))
    finally:
        trt_logger.removeHandler(capture)
        trt_logger.setLevel(level)
    report = find_report(gm)
    pruned = [r.name for r in report.pruned_layers] if report is not None else []
    compiled.sgfx_tensorrt = parse_sparsity_log(capture.messages, pruned)
    logger.info("%s", compiled.sgfx_tensorrt)
    return compiled
