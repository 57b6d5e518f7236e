"""The memory format the sweep runs its forward passes in, measured per model.

Why: on CPU, oneDNN runs many convolutions markedly faster on channels-last (NHWC) inputs than on contiguous
(NCHW) ones (ResNet-50's convs at 224 px: 1.1-2.7x here, the whole forward 1.37x, docs/RESULTS.md), but not every
model gains: a graph full of reshapes or a tiny one may lose to the conversions. So ``"auto"`` times one forward
of a slice of the first calibration batch in each format and runs channels-last unless the probe finds it
clearly slower (:data:`MARGIN`) or the forward is too short to time (:data:`MIN_PROBE_S`).

Reproducibility: the format changes the float rounding. Within a process the first measurement of a graph and
input shape is reused, so two runs give the same result; across processes the ranks' mean decides for all.
Between two separate processes the choice can flip only where both formats are within about 10 % (ResNet-18 at
32 px measured 1.0x: a flip there costs no time but changes the last bits); ``memory_format="channels_last"`` or
``"contiguous"`` pins it, and the report's ``memory_format`` says which ran.

Only the calibration batches change format (4-D floating tensors): convolutions then produce channels-last
outputs and the element-wise ops keep them; the weights, and so the returned model, are untouched.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import torch
import torch.fx

from . import distributed
from .calibration import map_tensors, placeholder_values

__all__ = ["MEMORY_FORMATS", "PROBE_IMAGES", "MARGIN", "MIN_PROBE_S", "to_memory_format", "choose_memory_format"]

logger = logging.getLogger(__name__)

MEMORY_FORMATS = ("auto", "channels_last", "contiguous")  # the option's values; the first is the default
PROBE_IMAGES = 8  # images of the first batch timed in each format
MARGIN = 1.1  # channels-last is kept unless its probe takes more than this times the contiguous one
MIN_PROBE_S = 0.02  # a contiguous probe shorter than this: the format cannot matter, stay contiguous (and
# deterministic: timings that short go either way from run to run)
_REPEATS = 2  # the first run of a format builds its kernels: the faster of the repeats counts
_measured: dict[tuple, dict[str, float] | None] = {}  # (graph code, input shapes/dtypes/devices) -> probe seconds


def to_memory_format(batch: Any, memory_format: str) -> Any:
    """``batch`` with its 4-D floating tensors in ``memory_format`` (``"channels_last"``; anything else: as is)."""
    if memory_format != "channels_last":
        return batch
    return map_tensors(batch, lambda t: t.contiguous(memory_format=torch.channels_last)
                       if t.dim() == 4 and t.is_floating_point() else t)


def _has_image_input(batch: Any) -> bool:
    found = []
    map_tensors(batch, lambda t: found.append(t.dim() == 4 and t.is_floating_point()))
    return any(found)


def _slice(batch: Any, images: int) -> Any:
    """The first ``images`` images: every tensor whose first dim is the image batch's, cut to them."""
    sizes = []
    map_tensors(batch, lambda t: sizes.append(t.shape[0]) if t.dim() == 4 and t.is_floating_point() else None)
    return map_tensors(batch, lambda t: t[:images] if t.dim() >= 1 and t.shape[0] == sizes[0] else t)


def choose_memory_format(gm: torch.fx.GraphModule, batch: Any, convert: Callable[[Any], Any],
                         requested: str = "auto") -> dict[str, Any]:
    """The format to run ``gm`` in, with the evidence: ``{"chosen": ..., "probe_s": {format: seconds}}`` (the
    seconds of one forward of :data:`PROBE_IMAGES` images of ``batch`` in each format) or ``{"chosen": ...,
    "reason": ...}`` when nothing was timed. ``convert`` is the run's batch conversion (device, dtype)."""
    if requested != "auto":
        return {"chosen": requested, "reason": "requested"}
    if not _has_image_input(batch):
        return {"chosen": "contiguous", "reason": "no 4-D image input"}
    if not any(isinstance(m, torch.nn.Conv2d) for m in gm.modules()) and not any(
            n.op == "call_function" and "conv" in getattr(n.target, "__name__", "") for n in gm.graph.nodes):
        return {"chosen": "contiguous", "reason": "no 2-D convolution"}
    sample = convert(_slice(batch, PROBE_IMAGES))
    shapes = []
    map_tensors(sample, lambda t: shapes.append((tuple(t.shape), str(t.dtype), str(t.device))))
    key = (gm.code, tuple(shapes))
    if key not in _measured:
        _measured[key] = _probe(gm, sample)
    seconds = _measured[key]
    if distributed.is_active():  # the ranks' mean, so that every rank decides alike on less noise
        seconds = _mean_over_ranks(seconds)
    if seconds is None:
        found = {"chosen": "contiguous", "reason": "probe failed"}
    elif seconds["contiguous"] < MIN_PROBE_S:
        found = {"chosen": "contiguous", "probe_s": seconds, "reason": "forward too short for the format to matter"}
    else:
        chosen = "channels_last" if seconds["channels_last"] <= MARGIN * seconds["contiguous"] else "contiguous"
        found = {"chosen": chosen, "probe_s": seconds}
    logger.info("memory format: %s (%s)", found["chosen"], found.get("probe_s", found.get("reason")))
    return found


def _mean_over_ranks(seconds: dict[str, float] | None) -> dict[str, float] | None:
    """Each format's probe time averaged over the ranks (which probe at once, on the same kind of machine); None
    where any rank's probe failed."""
    formats = ("contiguous", "channels_last")
    values = [0.0, 0.0, 1.0] if seconds is None else [seconds[f] for f in formats] + [0.0]
    total = distributed.all_reduce_sum(torch.tensor(values, dtype=torch.float64)).tolist()
    if total[2] > 0:
        return None
    return {f: t / distributed.world_size() for f, t in zip(formats, total)}


def _probe(gm: torch.fx.GraphModule, sample: Any) -> dict[str, float] | None:
    """Seconds of one forward of ``sample`` in each format (the faster of :data:`_REPEATS`); None if it fails."""
    seconds = {}
    try:
        with torch.no_grad():
            for memory_format in ("contiguous", "channels_last"):
                inputs = placeholder_values(gm.graph, to_memory_format(sample, memory_format))
                best = float("inf")
                for _ in range(_REPEATS):
                    started = time.perf_counter()
                    gm(*inputs)
                    if _on_cuda(inputs):
                        torch.cuda.synchronize()
                    best = min(best, time.perf_counter() - started)
                seconds[memory_format] = best
    except Exception as exc:  # the sweep's own run reports a failing graph with the node; keep the default here
        logger.info("memory format probe failed (%s: %s): running contiguous", type(exc).__name__, exc)
        return None
    return seconds


def _on_cuda(inputs: Any) -> bool:
    found = []
    map_tensors(inputs, lambda t: found.append(t.is_cuda))
    return any(found)
