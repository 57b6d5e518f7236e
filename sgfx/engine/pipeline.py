"""The pipeline of one sparsify run on a traced graph: its steps, in order, as data.

Each step reads and writes the :class:`Run` (the graph, the calibration batches, the config, the activation store,
the report being filled in); a step whose ``when`` is false is skipped. The graph passes (:mod:`sgfx.passes`) run
first, then the inventory of every weight, the memory plan (a run that cannot fit is refused before any work),
channel permutation, the allocation of per-layer patterns, and the sequential sweep that prunes.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.fx
from torch import nn
from torch.fx.node import Node

from ..config import SparsifyConfig, Unstructured
from ..layers import PrunableLayer, find_prunable_layers
from ..passes import fold_weight_transforms, open_attention, permute_channels, schedule_shared_uses
from ..passes.quantizers import insert_quantizers
from ..passes.trace import trace
from ..report import LayerRecord, SparsityReport, attach_report
from ..runtime import distributed
from ..runtime.activations import ActivationStore, MappedValues
from ..runtime.calibration import calibration_batches, map_tensors, placeholder_values
from ..runtime.allocator import hint_huge_pages
from ..runtime.memory import current_rss, default_max_memory, plan_memory
from ..runtime.memory_format import choose_memory_format, to_memory_format
from ..runtime.timing import phase, timed_run
from .allocation import layer_costs, plan as plan_allocation
from .inventory import Inventory, dense_summary, take_inventory
from .progress import progress_bar
from .reconstruct import find_blocks, reconstruct_blocks
from .sweep import prune_sequentially

__all__ = ["Run", "Step", "STEPS", "prune_graph", "sparsify_graph", "new_store"]

logger = logging.getLogger(__name__)

_LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass
class Run:
    """What the steps of one run share."""

    gm: torch.fx.GraphModule
    batches: Sequence[Any]  # as validated (a list, or the store's calibration batches)
    config: SparsifyConfig
    store: ActivationStore
    report: SparsityReport
    on_layer: Callable[[LayerRecord], None] | None
    progress: bool | None
    found: dict[Node, PrunableLayer] = field(default_factory=dict)
    rejected: dict[Node, str] = field(default_factory=dict)
    inventory: Inventory | None = None
    patterns: dict[str, Any] = field(default_factory=dict)  # per-layer patterns chosen by an allocation
    costs: dict[str, Any] | None = None  # weights and multiply-adds per layer (None: not counted)
    memory_format: str = "contiguous"  # of the batches the steps after "choose memory format" read
    dense: torch.fx.GraphModule | None = None  # the sweep's unpruned copy, kept for block reconstruction

    def convert(self, batch: Any) -> Any:
        """A batch as the graph takes it: on the compute device, low-precision inputs upcast to float32."""
        device = self.store.compute_device
        moved = map_tensors(batch, lambda t: t.to(device, torch.float32) if t.dtype in _LOW_PRECISION
                            else t.to(device))
        return to_memory_format(moved, self.memory_format)

    @property
    def converted(self) -> MappedValues:
        return MappedValues(self.batches, self.convert)

    @property
    def has_work(self) -> bool:
        return bool(self.inventory and (self.inventory.to_prune or self.inventory.blocks))


def _open_attention(run: Run) -> None:
    open_attention(run.gm, run.report)


def _fold(run: Run) -> None:
    fold_weight_transforms(run.gm, run.converted[0], run.report)


def _find_layers(run: Run) -> None:
    run.found = find_prunable_layers(run.gm, run.rejected)


def _schedule(run: Run) -> None:
    schedule_shared_uses(run.gm, run.found)  # same nodes, new order: ``run.found`` stays valid


def _take_inventory(run: Run) -> None:
    run.inventory = take_inventory(run.gm, run.config, run.found, run.rejected, run.report.kept_whole)
    run.report.layers = list(run.inventory.records.values()) + run.inventory.others
    run.report.distributed = distributed.describe()
    if not run.has_work:
        warnings.warn("sgfx: no prunable layer in this model; returning the traced graph unchanged", UserWarning,
                      stacklevel=6)


def _count_macs(run: Run) -> None:
    """Each graph layer's multiply-adds per image (one image through the graph), for the report's sparse share."""
    try:
        run.costs = layer_costs(run.gm, run.converted[0], run.found)
    except Exception as exc:  # a graph ShapeProp cannot run: the share is left out, the run goes on
        logger.info("multiply-adds not counted: %s", exc)
        return
    for record in run.report.layers:
        if record.name in run.costs:
            record.macs = run.costs[record.name].macs


def _choose_memory_format(run: Run) -> None:
    with phase("memory format probe"):
        run.report.memory_format = choose_memory_format(run.gm, run.batches[0], run.convert, run.config.memory_format)
    run.memory_format = run.report.memory_format["chosen"]


def _plan_memory(run: Run) -> None:
    config, inventory = run.config, run.inventory
    layers = list(inventory.to_prune.values()) + list(inventory.inner.values())
    dense_copy = bool(config.dense_targets) or config.stats_correction != "off"
    plan = plan_memory(run.gm, run.batches, layers, dense_copy, run.convert, run.store.cap, config.spill_dir,
                       run.store.compute_device)
    run.store.set_budgets(plan.host, plan.device)
    run.report.memory = plan.entry
    run.report.memory["huge_pages"] = hint_huge_pages()  # how the CPU tensors' memory is paged (runtime.allocator)


def _permutes_in_sweep(run: Run) -> bool:
    """Channel permutation chosen inside the sweep (from the dense copy's values, no forward pass of its own):
    where that copy runs (dense targets) and nothing before the sweep reads the permuted weights (an allocation)
    or depends on them (INT8 quantizers and their weight-scale buffers)."""
    config = run.config
    return bool(config.permute_channels and config.dense_targets and not config.allocates
                and config.quantize is None)


def _permute(run: Run) -> None:
    with phase("channel permutation"):
        permute_channels(run.gm, run.converted, set(run.inventory.to_prune), run.config.sparsity, run.report)


def _allocate(run: Run) -> None:
    to_prune, records = run.inventory.to_prune, run.inventory.records
    run.patterns, kept_dense, run.report.allocation = plan_allocation(run.gm, run.converted, to_prune, run.config,
                                                                  run.costs)
    for node, layer in list(to_prune.items()):
        record = records[layer.name]
        if layer.name in kept_dense:
            record.reason = kept_dense[layer.name]
            del to_prune[node]
        else:
            pattern = run.patterns[layer.name]
            record.pattern = f"{pattern.sparsity:.1%} unstructured" if isinstance(pattern, Unstructured) \
                else str(pattern)
        record.level = float(run.patterns[layer.name].sparsity) if layer.name in run.patterns else 0.0


def _insert_quantizers(run: Run) -> None:
    """INT8 quantizers for the layers the sweep will prune (calibrated by the sweep itself)."""
    run.report.quantize = run.config.quantize
    insert_quantizers(run.gm, run.inventory.to_prune, run.report)
    for name in run.inventory.inner:  # pruned inside a leaf module, whose graph node is opaque
        run.inventory.records[name].quant = {"reason": "not quantized: inside a leaf module (no graph node to "
                                                       "quantize its input at)"}
    floats = {r.name: r.quant["reason"] for r in run.inventory.records.values() if "reason" in r.quant}
    if floats:
        warnings.warn(f"sgfx: {len(floats)} layers to prune stay float (not INT8): "
                      + "; ".join(f"{k}: {v}" for k, v in list(floats.items())[:3]), UserWarning, stacklevel=6)


def _record_quantization(run: Run) -> None:
    """Each quantized layer's activation scales, from the quantizers the sweep calibrated."""
    for record in run.inventory.records.values():
        if "weight_scale" not in record.quant:
            continue
        if not record.pruned:
            record.quant = {"reason": f"not quantized: {record.reason}"}
            continue
        for entry in run.report.quantizers:
            if record.name in entry["readers"]:
                record.quant.update(input_scale=entry["scale"], input_buffer=entry["scale_buffer"])
            if entry["producer"] == record.name:
                record.quant.update(output_scale=entry["scale"], output_buffer=entry["scale_buffer"],
                                    output_after_relu=entry["after_relu"])


def _sweep(run: Run) -> None:
    inventory, store = run.inventory, run.store
    with progress_bar(run.progress, len(inventory.to_prune) + len(inventory.inner), run.on_layer, store) as on_layer:
        run.dense = prune_sequentially(run.gm, run.batches, inventory.to_prune, run.config, inventory.records,
                                       run.report, on_layer, run.patterns, inventory.blocks, store, run.convert,
                                       _permutes_in_sweep(run))
    if run.config.quantize is not None:
        _record_quantization(run)
    stats = store.stats()
    run.report.memory.update(peak_host_activations=stats.peak["host"], peak_device_activations=stats.peak["device"],
                             spilled_bytes=stats.spilled_bytes, peak_disk_bytes=stats.peak_disk_bytes)


def _reconstruct(run: Run) -> None:
    """Fit each block to the sweep's dense copy (:mod:`sgfx.engine.reconstruct`), then drop the copy."""
    graph, dense, run.dense = run.gm.graph, run.dense, None
    blocks = find_blocks(run.gm, {r.weight_name for r in run.report.pruned_layers})
    with progress_bar(run.progress, sum(b.fits for b in blocks), None, run.store, "sgfx: reconstructing", "block",
                      lambda record: record["block"]) as on_block:
        run.report.reconstructed = reconstruct_blocks(
            run.gm, dense, blocks, run.batches, run.config.reconstruct, run.config.reconstruct_lr, run.store,
            lambda batch: placeholder_values(graph, run.convert(batch)), on_block)


class Step(NamedTuple):
    name: str
    run: Callable[[Run], None]
    when: Callable[[Run], bool] = lambda run: True


STEPS: tuple[Step, ...] = (
    Step("open attention", _open_attention),
    Step("fold weight transforms", _fold, lambda run: run.config.fold_weight_transforms),
    Step("find prunable layers", _find_layers),
    Step("schedule shared uses", _schedule),
    Step("inventory of every weight", _take_inventory),
    Step("count multiply-adds", _count_macs, lambda run: run.has_work),
    Step("choose memory format", _choose_memory_format, lambda run: run.has_work),
    Step("plan memory", _plan_memory, lambda run: run.has_work),  # before any work: a run that cannot fit stops
    Step("permute channels", _permute, lambda run: run.has_work and run.config.permute_channels
         and not _permutes_in_sweep(run)),
    Step("allocate patterns", _allocate, lambda run: run.has_work and run.config.allocates),
    Step("insert INT8 quantizers", _insert_quantizers, lambda run: run.has_work and run.config.quantize is not None),
    Step("sequential sweep", _sweep, lambda run: run.has_work),
    Step("block reconstruction", _reconstruct, lambda run: run.dense is not None and run.config.reconstruct > 0
         and bool(run.report.pruned_layers)),
)


def _upcast_low_precision(gm: nn.Module) -> dict[str, torch.dtype]:
    """Convert float16/bfloat16 parameters and buffers to float32 in place; returns their original dtypes."""
    original = {}
    for name, tensor in list(gm.named_parameters()) + list(gm.named_buffers()):
        if tensor.dtype in _LOW_PRECISION:
            original[name] = tensor.dtype
            tensor.data = tensor.data.float()
    return original


def _restore_dtypes(gm: nn.Module, original: dict[str, torch.dtype]) -> None:
    tensors = dict(gm.named_parameters())
    tensors.update(gm.named_buffers())
    for name, dtype in original.items():
        tensors[name].data = tensors[name].data.to(dtype)


def _model_device(gm: nn.Module) -> torch.device:
    tensor = next(iter(gm.parameters()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def new_store(config: SparsifyConfig, compute_device: torch.device | None = None) -> ActivationStore:
    """An activation store for one run, with the run's memory cap (``max_memory``, or the default taken now, once)
    and a provisional host budget (the cap less what is in use now) until the memory plan sets the estimated
    one."""
    cap = config.max_memory or default_max_memory()
    return ActivationStore(max(cap - current_rss(), 0), compute_device, spill_dir=config.spill_dir, cap=cap)


def _run_steps(run: Run) -> None:
    gm, started = run.gm, time.perf_counter()
    was_training = gm.training
    gm.eval()
    original_dtypes = _upcast_low_precision(gm)
    if original_dtypes:
        logger.info("low-precision model: calibrating and solving in float32, writing back in its dtypes")
    with timed_run() as split:
        for step in STEPS:
            if step.when(run):
                begun = time.perf_counter()
                step.run(run)
                run.report.steps_s[step.name] = time.perf_counter() - begun
                logger.debug("step %s: %.2f s", step.name, run.report.steps_s[step.name])
    _restore_dtypes(gm, original_dtypes)
    gm.train(was_training)
    run.report.total_s = time.perf_counter() - started
    run.report.time_split = dict(split)
    run.report.time_split["other"] = max(run.report.total_s - sum(split.values()), 0.0)
    attach_report(gm, run.report)


def prune_graph(gm: torch.fx.GraphModule, batches: Sequence[Any], config: SparsifyConfig,
                callback: Callable[[LayerRecord], None] | None = None, progress: bool | None = False,
                warn_dense: bool = True, store: ActivationStore | None = None) -> torch.fx.GraphModule:
    """Run :data:`STEPS` on a traced ``gm`` (owned by the caller, modified in place) over validated ``batches``
    (a list, or the calibration batches held by ``store``); attaches the report and returns ``gm``. The sweep runs
    on ``config.device`` (default: the model's device); ``gm`` is returned where it was."""
    if config.reconstruct and distributed.is_active():
        raise ValueError("reconstruct is not supported with multi-process calibration yet (each rank would fit its "
                         "own batches); run it in one process")
    model_device = _model_device(gm)
    compute = config.device or model_device
    own_store = store is None
    store = new_store(config, compute) if own_store else store
    store.compute_device = compute
    if compute != model_device:
        gm.to(compute)
    run = Run(gm, batches, config, store, SparsityReport(str(config.sparsity), config.method), callback, progress)
    try:
        _run_steps(run)
    finally:
        if compute != model_device:
            gm.to(model_device)
        if own_store:
            store.close()
    summary = dense_summary(gm, run.report)
    if summary and warn_dense:
        warnings.warn(summary, UserWarning, stacklevel=4)
    return gm


def sparsify_graph(model: nn.Module, calib: Any, config: SparsifyConfig,
                   callback: Callable[[LayerRecord], None] | None = None,
                   progress: bool | None = None) -> torch.fx.GraphModule:
    """Trace a copy of ``model``, store the calibration batches (spilling beyond the memory cap) and prune it: the
    whole-graph path of :func:`sgfx.sparsify`."""
    gm = trace(model, config.leaf_modules, config.concrete_args)
    gm.train(model.training)
    with new_store(config, config.device or _model_device(gm)) as store:  # spill files removed on exit and error
        batches = calibration_batches(calib, into=store.new("calibration batches", borrowed=True))
        if config.augment == "hflip":
            if any(not isinstance(b, torch.Tensor) or b.dim() != 4 for b in batches):
                raise ValueError("augment='hflip' needs image batches of shape (B, C, H, W) (one tensor each)")
            for index in range(len(batches)):
                batches.append(batches[index].flip(-1))
        return prune_graph(gm, batches, config, callback, progress, store=store)
