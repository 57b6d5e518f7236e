"""Host-memory budget of a calibration run: ``max_memory`` parsing, the machine's available memory, and the
estimate made before any work starts.

Why before: a sweep that runs out of memory after an hour of Hessians is the worst way to learn that the calibration
set was too large. One forward pass of the first batch gives every graph value's size; replaying the sweep's
liveness (a value lives from its node to its last user) over those sizes, scaled to the whole calibration set, gives
the activations' peak; the parameters (twice when the dense model runs alongside) and the largest layer's Hessian
and factor are the fixed part. The activation store (:mod:`sgfx.runtime.activations`) then gets what is left of the
cap; what does not fit spills to disk, and a set that cannot run even then is refused with the numbers.
"""

from __future__ import annotations

import logging
import os
import re
import resource
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch.fx.node import Node

from .calibration import node_failure, placeholder_values, tensors_of

__all__ = ["InsufficientMemory", "MemoryEstimate", "MemoryPlan", "parse_bytes", "available_memory",
           "default_max_memory", "current_rss", "estimate_memory", "activation_budget", "plan_memory", "format_bytes"]

logger = logging.getLogger(__name__)

# The default cap: the memory in use when sparsify starts plus this fraction of what the machine has available.
DEFAULT_AVAILABLE_FRACTION = 0.75
_UNITS = {"": 1, "B": 1, "K": 10 ** 3, "KB": 10 ** 3, "KIB": 2 ** 10, "M": 10 ** 6, "MB": 10 ** 6, "MIB": 2 ** 20,
          "G": 10 ** 9, "GB": 10 ** 9, "GIB": 2 ** 30, "T": 10 ** 12, "TB": 10 ** 12, "TIB": 2 ** 40}
_BYTES_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")
_HESSIAN_COPIES = 3  # H, its Cholesky factor and the solve's working copy
_TRANSIENT_COPIES = 2  # one batch of the widest node's inputs and output (pruned and dense), and as much for temporaries


class InsufficientMemory(MemoryError):
    """The calibration run cannot fit in ``max_memory`` (plus the disk it may spill to); raised before it starts."""


def parse_bytes(value: Any, option: str = "max_memory") -> int:
    """``8_000_000_000``, ``"8GB"``, ``"7.5 GiB"``, ``"512MB"`` -> bytes (decimal units for kB/MB/GB/TB and the bare
    letters, binary for KiB/MiB/GiB/TiB).

    Raises:
        TypeError: not an int, float or string.
        ValueError: an unparsable string, an unknown unit or a size that is not positive.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"{option} must be a number of bytes or a string such as '8GB', got {type(value).__name__}")
    if isinstance(value, str):
        match = _BYTES_RE.match(value)
        unit = match.group(2).upper() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(f"cannot read {option}={value!r}; accepted: a number of bytes or a number with a unit "
                             "(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. '8GB'")
        value = float(match.group(1)) * _UNITS[unit]
    if not value > 0:
        raise ValueError(f"{option} must be positive, got {value!r}")
    return int(value)


def format_bytes(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB"


def _cgroup_room() -> int | None:
    """Memory the process's cgroup still allows (v2), when it sets a limit."""
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        if limit == "max":
            return None
        return int(limit) - int(open("/sys/fs/cgroup/memory.current").read().strip())
    except (OSError, ValueError):
        return None


def available_memory() -> int:
    """Bytes the machine can give this process now: ``MemAvailable`` (Linux), capped by a cgroup limit."""
    available = None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None:  # other POSIX systems: physical memory
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    room = _cgroup_room()
    return min(available, room) if room is not None else available


def current_rss() -> int:
    """This process's resident memory now (bytes)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def default_max_memory() -> int:
    """The cap used when ``max_memory`` is not given: what the process uses now plus 75 % of what is available."""
    return current_rss() + int(DEFAULT_AVAILABLE_FRACTION * available_memory())


@dataclass
class MemoryEstimate:
    """Bytes a calibration run needs, estimated before it starts.

    ``activations``: the peak of the live graph values over all batches (both models when the dense one runs
    alongside); ``per_batch``: the same values for one batch at the node that needs most; ``fixed``: parameters
    (and their dense copy), the largest Hessian and its factor; ``baseline``: the process's memory before the run.
    """

    activations: int
    per_batch: int
    fixed: int
    baseline: int
    batches: int

    @property
    def in_memory(self) -> int:
        """Peak RSS if every activation stays in memory."""
        return self.minimum + self.activations

    @property
    def minimum(self) -> int:
        """The least host memory the run needs with every activation it can spill on disk."""
        return self.baseline + self.fixed + _TRANSIENT_COPIES * self.per_batch

    def activation_budget(self, cap: int) -> int:
        """What the activation store may keep in host memory under ``cap``."""
        return cap - self.minimum

    def describe(self) -> str:
        batches = f"{self.batches} batch" + ("es" if self.batches != 1 else "")
        return (f"activations {format_bytes(self.activations)} over {batches}, parameters and "
                f"largest Hessian {format_bytes(self.fixed)}, already in use {format_bytes(self.baseline)}")


class _SizeRecorder(torch.fx.Interpreter):
    """Runs one batch and records the bytes of every node's output (tensors inside tuples and lists included) and
    which inputs it aliases (a view, an in-place op: no new memory)."""

    def __init__(self, gm: torch.fx.GraphModule):
        super().__init__(gm, garbage_collect_values=True)
        self.sizes: dict[Node, int] = {}
        self.aliases: dict[Node, list[Node]] = {}

    def run_node(self, n: Node) -> Any:
        try:
            value = super().run_node(n)
        except Exception as exc:
            raise node_failure(n, self.batch, exc) from exc
        if n.op not in ("get_attr", "output"):
            tensors = tensors_of(value)
            self.sizes[n] = sum(t.nbytes for t in tensors)
            storages = {t.untyped_storage().data_ptr() for t in tensors}
            self.aliases[n] = [a for a in n.all_input_nodes if a in self.sizes and storages & {
                t.untyped_storage().data_ptr() for t in tensors_of(self.env[a])}]
        return value


def _live_peak(gm: torch.fx.GraphModule, sizes: dict[Node, int], aliases: dict[Node, list[Node]]) -> tuple[int, int]:
    """(peak of the live values' bytes, the largest inputs-plus-output of one node), for one batch.

    Values that alias each other (views, in-place ops) share one storage, alive until the last reader of any of
    them. At each node, the values it is the last reader of are freed batch by batch while its output is made, so
    the step holds the larger of the two, not both."""
    nodes = list(gm.graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    group = {n: n for n in sizes}
    for node in nodes:
        for source in aliases.get(node, []):
            group[node] = group[source]  # inputs come first: their group is final
    size, start, end = {}, {}, {}
    for node, root in group.items():
        size[root] = max(size.get(root, 0), sizes[node])
        start.setdefault(root, position[node])
        end[root] = max([end.get(root, position[node])] + [position[u] for u in node.users])
        if node.op == "placeholder":  # the calibration batches are kept for the whole sweep
            end[root] = len(nodes)
    peak = widest = 0
    for index, node in enumerate(nodes):
        alive = [r for r in size if start[r] <= index <= end[r]]
        steady = sum(size[r] for r in alive if start[r] != index and end[r] != index)
        made = sum(size[r] for r in alive if start[r] == index)
        freed = sum(size[r] for r in alive if end[r] == index and start[r] != index)
        peak = max(peak, steady + max(made, freed))
        touched = {group[a] for a in node.all_input_nodes if a in group} | ({group[node]} if node in group else set())
        widest = max(widest, sum(size[r] for r in touched))
    return peak, widest


def _elements(batches, index: int) -> int:
    """Tensor elements of batch ``index``, without reading a spilled batch back."""
    batch = batches.peek(index) if hasattr(batches, "peek") else batches[index]
    return sum(t.numel() for t in tensors_of(batch))


def estimate_memory(gm: torch.fx.GraphModule, batches, layers: list, dense_copy: bool,
                    convert=lambda batch: batch) -> MemoryEstimate:
    """Estimate a sweep of ``gm`` over ``batches`` (sizes scale with each batch's elements against the first's).

    Args:
        gm: the graph to calibrate.
        batches: the calibration batches (the first is run once).
        layers: the prunable layers (for the largest Hessian).
        dense_copy: whether the dense model runs alongside (twice the parameters and activations).
        convert: applied to a batch before it is run (device, dtype).
    """
    first = convert(batches[0])
    recorder = _SizeRecorder(gm)
    recorder.batch = first
    recorder.extra_traceback = False
    with torch.no_grad():
        recorder.run(*placeholder_values(gm.graph, first), enable_io_processing=False)
    peak, widest = _live_peak(gm, recorder.sizes, recorder.aliases)
    scale = sum(_elements(batches, i) for i in range(len(batches))) / (_elements(batches, 0) or 1)
    copies = 2 if dense_copy else 1
    params = sum(p.nbytes for p in gm.parameters()) + sum(b.nbytes for b in gm.buffers())
    hessian = max((layer.num_groups * layer.columns ** 2 * 8 for layer in layers), default=0)
    return MemoryEstimate(activations=int(copies * peak * scale), per_batch=copies * widest,
                          fixed=(copies - 1) * params + _HESSIAN_COPIES * hessian, baseline=current_rss(),
                          batches=len(batches))


def activation_budget(estimate: MemoryEstimate, cap: int, spill_dir: str | None) -> int:
    """Host bytes the activation store may use under ``cap``.

    Raises:
        InsufficientMemory: the run needs more than ``cap`` even with its activations on disk, or the disk cannot
            hold what does not fit.
    """
    budget = estimate.activation_budget(cap)
    if budget <= 0:
        raise InsufficientMemory(
            f"sgfx: max_memory={format_bytes(cap)} is below the {format_bytes(estimate.minimum)} this run needs even "
            f"with every activation spilled to disk ({estimate.describe()}, one batch of the widest node "
            f"{format_bytes(estimate.per_batch)}); raise max_memory or use smaller calibration batches")
    spilled = estimate.activations - budget
    if spilled > 0:
        room = spill_room(spill_dir)
        if spilled > room:
            raise InsufficientMemory(
                f"sgfx: the calibration set does not fit: {estimate.describe()}; max_memory={format_bytes(cap)} "
                f"leaves {format_bytes(budget)} for activations, and the {format_bytes(spilled)} to spill exceed "
                f"the {format_bytes(room)} free on disk; use fewer calibration images, raise max_memory or set "
                "spill_dir to a larger disk")
    return budget


def spill_room(spill_dir: str | None) -> int:
    """Free bytes where spilled activations would go (keeping 1 GiB free)."""
    return shutil.disk_usage(spill_dir or tempfile.gettempdir()).free - (1 << 30)


def device_budget(device: torch.device) -> int:
    """Accelerator memory activations may use: half of what is free when the sweep starts (0 on the CPU)."""
    if device.type != "cuda":
        return 0
    free, _ = torch.cuda.mem_get_info(device)
    return free // 2


@dataclass
class MemoryPlan:
    """The activation budgets of one run (bytes per tier) and the report's memory entry."""

    host: int
    device: int
    entry: dict[str, Any]


def plan_memory(gm: torch.fx.GraphModule, batches, layers: list, dense_copy: bool, convert, cap: int,
                spill_dir: str | None, device: torch.device) -> MemoryPlan:
    """Estimate the run (:func:`estimate_memory`) and cut its activation budgets from ``cap``.

    Raises:
        InsufficientMemory: it cannot fit, even spilling to disk (before any work starts).
    """
    estimate = estimate_memory(gm, batches, layers, dense_copy, convert)
    host = activation_budget(estimate, cap, spill_dir)
    logger.info("memory: cap %s; estimated %s with every activation in memory (%s)", format_bytes(cap),
                format_bytes(estimate.in_memory), estimate.describe())
    if estimate.in_memory > cap:
        logger.info("memory: about %s of activations will spill to disk", format_bytes(estimate.activations - host))
    return MemoryPlan(host, device_budget(device), {
        "max_memory": cap, "estimated_in_memory": estimate.in_memory, "estimated_minimum": estimate.minimum,
        "estimated_activations": estimate.activations})
