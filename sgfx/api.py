"""``sgfx.sparsify``: validate, trace, run the passes, report."""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx
from torch import nn

from . import distributed
from .activations import ActivationStore, MappedValues
from .calibration import calibration_batches, map_tensors, placeholder_values
from .config import SparsifyConfig, Unstructured
from .memory import activation_budget, current_rss, default_max_memory, estimate_memory, format_bytes
from .layers import fold_weight_transforms as fold_transforms, has_own_forward
from .passes.allocation import plan as plan_allocation
from .passes.attention import open_attention
from .passes.channel_permutation import permute_channels as permute_channel_groups
from .passes.inventory import dense_summary, unpruned_weight_records
from .passes.leaf_blocks import find_leaf_blocks
from .passes.prune_layers import progress_bar, prune_sequentially
from .passes.sequential_prune import find_prunable_layers, match_skip, schedule_shared_uses
from .passes.trace import trace
from .report import REPORT_KEY, LayerRecord, SparsityReport

__all__ = ["sparsify", "calibration_batches", "prune_graph"]

logger = logging.getLogger(__name__)

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_OPTION_NAMES = ("method", "blocksize", "percdamp", "skip", "device", "leaf_modules", "concrete_args", "allocation",
                 "budget", "target", "bn_reestimate", "dense_targets", "augment", "stats_correction",
                 "permute_channels", "fold_weight_transforms", "max_memory", "spill_dir")


def resolve_config(sparsity: Any, options: dict[str, Any]) -> SparsifyConfig:
    given = {k: v for k, v in options.items() if v is not None}
    if isinstance(sparsity, SparsifyConfig):
        if given:
            raise TypeError(f"pass options either in SparsifyConfig or as keywords, not both (got {sorted(given)})")
        return sparsity
    return SparsifyConfig(sparsity, **given)


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
    and a provisional host budget (the cap less what is in use now) until :func:`_plan_memory` sets the estimated
    one."""
    cap = config.max_memory or default_max_memory()
    store = ActivationStore(max(cap - current_rss(), 0), compute_device, spill_dir=config.spill_dir)
    store.cap = cap
    return store


def _device_budget(device: torch.device) -> int:
    """Accelerator memory activations may use: half of what is free when the sweep starts."""
    if device.type != "cuda":
        return 0
    free, _ = torch.cuda.mem_get_info(device)
    return free // 2


def _plan_memory(gm: torch.fx.GraphModule, batches, layers: list, config: SparsifyConfig, store: ActivationStore,
                 convert) -> dict:
    """Estimate the run, refuse it when it cannot fit, and give the store its budgets; returns the report's
    memory entry (filled in with the store's peaks after the sweep)."""
    cap = store.cap
    dense_copy = bool(config.dense_targets) or config.stats_correction != "off"
    estimate = estimate_memory(gm, batches, layers, dense_copy, convert)  # the batches as stored, run converted
    store.budgets["host"] = activation_budget(estimate, cap, config.spill_dir)
    store.budgets["device"] = _device_budget(store.compute_device)
    store.rebalance()
    logger.info("memory: cap %s; estimated %s with every activation in memory (%s)", format_bytes(cap),
                format_bytes(estimate.in_memory), estimate.describe())
    if estimate.in_memory > cap:
        logger.info("memory: about %s of activations will spill to disk",
                    format_bytes(estimate.activations - store.budgets["host"]))
    return {"max_memory": cap, "estimated_in_memory": estimate.in_memory, "estimated_minimum": estimate.minimum,
            "estimated_activations": estimate.activations}


def _module_inputs(gm: torch.fx.GraphModule, batch: Any, wanted) -> dict[str, torch.Tensor]:
    """The first input of each module ``wanted(module)`` selects, from one run of ``gm`` on ``batch``."""
    inputs, handles = {}, []
    for name, module in gm.named_modules():
        if name and wanted(module):
            handles.append(module.register_forward_pre_hook(
                lambda m, args, name=name: inputs.setdefault(name, args[0])))
    try:
        with torch.no_grad():
            gm(*placeholder_values(gm.graph, batch))
    finally:
        for handle in handles:
            handle.remove()
    return inputs


def _discover(gm: torch.fx.GraphModule, config: SparsifyConfig, kept_whole: dict[str, str], found: dict,
              rejected: dict):
    """Records for every weight; the graph's prunable layers (``found``, with the calls ``rejected``) and the leaf
    modules with prunable layers inside, to prune (skip/eligibility applied)."""
    pattern_name = str(config.sparsity)
    blocks = find_leaf_blocks(gm, found, set(kept_whole))
    records: dict[str, LayerRecord] = {}
    to_prune, used_skips = {}, set()
    candidates = [(node, layer, None) for node, layer in found.items()]
    candidates += [(node, layer, block) for node, block in blocks.items() for layer in block.layers.values()]
    position = {node: index for index, node in enumerate(gm.graph.nodes)}
    candidates.sort(key=lambda item: position[item[0]])  # graph order (stable inside a leaf module)
    for node, layer, block in candidates:
        record = LayerRecord(layer.name, layer.op, tuple(layer.weight.shape), pattern_name, config.method, "skipped",
                             weight_name=layer.weight_name, sparsity=float((layer.weight == 0).float().mean()),
                             uses=len(layer.uses))
        records[layer.name] = record
        matched = match_skip(layer.name, config.skip)
        reason = f"skip={matched!r}" if matched else layer.ineligibility(config.sparsity)
        if block is not None and not reason and (config.allocation == "global" or config.budget is not None):
            reason = f"inside leaf module {block.name}: allocation and budget cover the graph's layers only"
        if matched:
            used_skips.add(matched)
        elif reason:  # summed up in one warning at the end (passes/inventory.py), each in the report
            logger.info("%s left dense: %s", layer.name, reason)
        if reason:
            record.reason = reason
            if block is not None:
                del block.layers[layer.name]
        elif block is None:
            to_prune[node] = layer
    for pattern in sorted(set(config.skip) - used_skips):
        warnings.warn(f"sgfx: skip pattern {pattern!r} matched no prunable layer", UserWarning, stacklevel=4)
    inner = {layer.name: layer for block in blocks.values() for layer in block.layers.values()}
    others = unpruned_weight_records(gm, found, rejected, kept_whole, pattern_name, config.method,
                                     exclude={r.weight_name for r in records.values()})
    blocks = {node: block for node, block in blocks.items() if block.layers}
    return records, others, to_prune, blocks, inner


def prune_graph(gm: torch.fx.GraphModule, batches: Sequence[Any], config: SparsifyConfig,
                callback: Callable[[LayerRecord], None] | None = None, progress: bool | None = False,
                warn_dense: bool = True, store: ActivationStore | None = None) -> torch.fx.GraphModule:
    """Run sgfx's passes on a traced ``gm`` (owned by the caller, modified in place) over validated ``batches``
    (a list, or the calibration batches held by ``store``); attaches the report to ``gm.meta`` and returns ``gm``.
    The sweep runs on ``config.device`` (default: the model's device); ``gm`` is returned where it was."""
    model_device = _model_device(gm)
    compute = config.device or model_device
    own_store = store is None
    store = new_store(config, compute) if own_store else store
    store.compute_device = compute
    if compute != model_device:
        gm.to(compute)
    try:
        return _prune_graph(gm, batches, config, callback, progress, warn_dense, store)
    finally:
        if compute != model_device:
            gm.to(model_device)
        if own_store:
            store.close()


def _prune_graph(gm: torch.fx.GraphModule, batches: Sequence[Any], config: SparsifyConfig, callback,
                 progress: bool | None, warn_dense: bool, store: ActivationStore) -> torch.fx.GraphModule:
    started = time.perf_counter()
    was_training = gm.training
    gm.eval()
    original_dtypes = _upcast_low_precision(gm)
    if original_dtypes:
        logger.info("low-precision model: calibrating and solving in float32, writing back in its dtypes")
    compute = store.compute_device

    def convert(batch: Any) -> Any:  # each batch reaches the graph on the compute device, low precision upcast
        return map_tensors(batch, lambda t: t.to(compute, torch.float32) if t.dtype in _LOW_PRECISION
                           else t.to(compute))

    converted = MappedValues(batches, convert)
    opened, kept_whole = open_attention(gm)
    folded = []
    if config.fold_weight_transforms:
        folded = fold_transforms(gm, _module_inputs(gm, converted[0], has_own_forward))
    rejected: dict = {}
    found = find_prunable_layers(gm, rejected)
    if schedule_shared_uses(gm, found):  # same nodes, new order: ``found`` stays valid
        logger.info("weights shared by several calls: graph reordered so that all their inputs exist when pruned")
    records, others, to_prune, blocks, inner = _discover(gm, config, kept_whole, found, rejected)
    result = SparsityReport(str(config.sparsity), config.method, list(records.values()) + others)
    result.opened_attention, result.folded = opened, folded
    result.distributed = distributed.describe()
    if not to_prune and not blocks:
        warnings.warn("sgfx: no prunable layer in this model; returning the traced graph unchanged", UserWarning,
                      stacklevel=3)
    else:
        result.memory = _plan_memory(gm, batches, list(to_prune.values()) + list(inner.values()), config, store,
                                     convert)  # before any work: a run that cannot fit is refused now
        if config.permute_channels:
            with torch.no_grad():
                groups = permute_channel_groups(gm, converted, set(to_prune), config.sparsity)
            result.permuted = [
                {"producer": g.name, "consumers": [str(c.target) for c in g.consumers],
                 "channels": len(g.permutation), "kept_before": g.kept_before, "kept_after": g.kept_after}
                for g in groups]
        patterns = {}
        if config.allocation == "global" or config.budget is not None:
            patterns, kept_dense, result.allocation = plan_allocation(gm, converted, to_prune, config)
            for node, layer in list(to_prune.items()):
                record = records[layer.name]
                if layer.name in kept_dense:
                    record.reason = kept_dense[layer.name]
                    del to_prune[node]
                else:
                    pattern = patterns[layer.name]
                    record.pattern = f"{pattern.sparsity:.1%} unstructured" if isinstance(pattern, Unstructured) \
                        else str(pattern)
                record.level = float(patterns[layer.name].sparsity) if layer.name in patterns else 0.0
        with progress_bar(progress, len(to_prune) + len(inner), callback, store) as on_layer:
            prune_sequentially(gm, batches, to_prune, config, records, result, on_layer, patterns, blocks, store,
                               convert)
        stats = store.stats()
        result.memory.update(peak_host_activations=stats.peak["host"], peak_device_activations=stats.peak["device"],
                             spilled_bytes=stats.spilled_bytes, peak_disk_bytes=stats.peak_disk_bytes)
    _restore_dtypes(gm, original_dtypes)
    gm.train(was_training)
    result.total_s = time.perf_counter() - started
    gm.meta[REPORT_KEY] = result
    summary = dense_summary(gm, result)
    if summary and warn_dense:
        warnings.warn(summary, UserWarning, stacklevel=4)
    return gm


def sparsify(
    model: nn.Module,
    calib: Any,
    sparsity: Any = "2:4",
    *,
    method: str | None = None,
    blocksize: int | None = None,
    percdamp: float | None = None,
    skip: Iterable[str] | str | None = None,
    device: str | torch.device | None = None,
    leaf_modules: Iterable[Any] | None = None,
    concrete_args: dict[str, Any] | None = None,
    bn_reestimate: bool | None = None,
    dense_targets: bool | None = None,
    augment: str | None = None,
    stats_correction: str | bool | None = None,
    permute_channels: bool | None = None,
    allocation: str | None = None,
    budget: float | None = None,
    target: str | None = None,
    fold_weight_transforms: bool | None = None,
    submodules: Iterable[str] | str | None = None,
    max_memory: int | str | None = None,
    spill_dir: str | None = None,
    callback: Callable[[LayerRecord], None] | None = None,
    progress: bool | None = None,
) -> nn.Module:
    """Prune a trained model's weights in one shot, without fine-tuning.

    Every Linear, Conv1d/2d/3d, ConvTranspose1d/2d/3d and self-attention ``nn.MultiheadAttention`` projection is
    pruned (modules or their functional calls on parameters); conv subclasses with their own ``forward`` (timm's
    run-time "same" padding) are kept whole and still pruned. Every other weight is listed in the report with the
    reason it stayed dense, and one warning gives the fraction of the model's weights that stayed dense.

    The model is traced with torch.fx (a deep copy: ``model`` is never modified), then run over the calibration
    data node by node. Each prunable layer is pruned when the graph reaches it, from a Hessian built on the
    inputs produced by the already-pruned layers before it (sequential calibration); its outputs are then
    computed with the pruned weight.

    Args:
        model: a trained ``nn.Module`` or ``torch.fx.GraphModule``.
        calib: one input tensor, or an iterable of batches (tensors, or tuples whose first element is the input).
        sparsity: ``"N:M"`` (at most N nonzeros in every M consecutive input channels, e.g. ``"2:4"``), a float
            in (0, 1) for unstructured sparsity, or a :class:`SparsifyConfig` holding every option.
        method: ``"sparsegpt"`` (default), ``"wanda"`` or ``"magnitude"``.
        blocksize: columns per lazy-update block of the OBS solve (default 128).
        percdamp: Hessian damping as a fraction of its mean diagonal (default 0.01).
        skip: layer names or glob patterns to keep dense, e.g. ``["conv1", "fc*"]``.
        device: where calibration (forward passes, Hessians) and solves run, e.g. ``"cuda"``; the model copy moves
            there for the run and the result is returned on the model's device. Default: where the model is.
        leaf_modules: module types or qualified names the tracer must not enter (their layers stay dense).
        concrete_args: forwarded to the tracer to specialise Python control flow.
        bn_reestimate: recompute the running statistics of every BatchNorm downstream of a pruned layer from
            the calibration data, during the sweep (default: on when there is such a BatchNorm).
        dense_targets: fit each layer to the dense model's outputs instead of its own dense weights applied to
            the pruned inputs, where its calibration samples cover its columns (default: on for SparseGPT; runs the
            dense model alongside). ``False`` turns it off.
        augment: ``"hflip"`` also calibrates on the horizontal mirror of every image (default ``None``).
        stats_correction: ``"mean"`` (default) or ``"mean_std"``: restore each pruned layer's per-channel output
            mean (and std) to the dense model's on the calibration data, through its bias; ``False``/``"off"``
            disables it. Layers feeding only a re-estimated BatchNorm, or with fewer samples than columns (Linear
            layers at a few hundred images), are left alone.
        permute_channels: reorder the channels between each producer layer and its consumers (function unchanged)
            so that the N:M groups keep more saliency, before calibration (default: on for N:M patterns).
        allocation: ``"uniform"`` (default: every layer at ``sparsity``) or ``"global"`` (unstructured: per-layer
            levels from measured error curves, exactly ``sparsity`` of all prunable weights or FLOPs; with
            ``method="magnitude"`` one global |w| threshold). The report gives each layer's level.
        budget: N:M only: prune to the pattern the layers covering at least this fraction of the prunable weights
            (or FLOPs); the layers whose N:M error is largest stay dense (default: all eligible layers).
        target: ``"weights"`` (default) or ``"flops"``: what ``allocation`` and ``budget`` count.
        fold_weight_transforms: fold conv subclasses that transform their weight at run time (weight
            standardisation) into plain convs so they can be pruned; inference only (default ``False``: reported).
        submodules: for models that cannot be traced whole (detection models): a list of submodule names, each
            traced and pruned on its own in execution order with inputs recorded while the *whole* model runs on
            ``calib``, or ``"auto"`` (the largest traceable submodules). Each item of ``calib`` is then passed to
            the model exactly as given, ``model(item)``: for a torchvision detection model an item is a list of
            image tensors; for a loader of ``(input, target)`` pairs pass ``(x for x, _ in loader)``.
        max_memory: host memory the run may use, bytes or ``"8GB"``: calibration activations beyond it spill to
            disk (memory-mapped files, removed at the end). Default: the memory in use now plus 75 % of what the
            machine has available. A run that cannot fit even with spilling is refused before it starts, with the
            estimate.
        spill_dir: directory for spilled activations (default: the system's temporary directory).
        callback: called with each layer's :class:`LayerRecord` once it is pruned (for progress bars).
        progress: a progress bar over the layers with the memory in use (tqdm, on stderr). ``None`` (default): shown
            when stderr is a terminal and the ``sgfx`` logger is not set above WARNING (and only on rank 0 of a
            process group).

    Returns:
        A new ``torch.fx.GraphModule`` equal to ``model`` except for the pruned weights, in the model's dtypes
        and training mode. With ``submodules``: a deep copy of ``model`` (its own type and ``forward``) whose
        named submodules are replaced by their pruned GraphModules. ``sgfx.report(result)`` prints what was done.

    Raises:
        TypeError: a model that is not an ``nn.Module``, bad option types, or an untraceable model.
        ValueError: bad pattern or options, empty or non-finite calibration data, or calibration batches the
            model cannot run (the message names the graph node).

    Example:
        >>> gm = sgfx.sparsify(model, calib_loader, "2:4")  # doctest: +SKIP
        >>> det = sgfx.sparsify(fasterrcnn, images, "2:4", submodules="auto")  # doctest: +SKIP
        >>> print(sgfx.report(gm))  # doctest: +SKIP
    """
    options = dict(zip(_OPTION_NAMES, (method, blocksize, percdamp, skip, device, leaf_modules, concrete_args,
                                       allocation, budget, target, bn_reestimate, dense_targets, augment,
                                       stats_correction, permute_channels, fold_weight_transforms, max_memory,
                                       spill_dir)))
    config = resolve_config(sparsity, options)
    if distributed.is_active() and (config.allocation == "global" or config.budget is not None):
        raise ValueError("allocation='global' and budget= are not supported across processes yet (their error "
                         "curves are measured per process); run them in one process")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if callback is not None and not callable(callback):
        raise TypeError("callback must be callable")
    if model.training:
        warnings.warn(
            "sgfx: the model is in training mode; calibrating in eval mode (BatchNorm running statistics, "
            "no dropout). The result is returned in training mode like the model.", UserWarning, stacklevel=2,
        )
    if submodules is not None:
        from .submodules import sparsify_submodules

        return sparsify_submodules(model, calib, config, submodules, callback, progress)
    gm = trace(model, config.leaf_modules, config.concrete_args)
    gm.train(model.training)
    with new_store(config, config.device or _model_device(gm)) as store:  # spill files removed on exit and error
        batches = calibration_batches(calib, into=store.new("calibration batches", borrowed=True))
        if config.augment == "hflip":
            if any(b.dim() != 4 for b in batches):
                raise ValueError("augment='hflip' needs image batches of shape (B, C, H, W)")
            for index in range(len(batches)):
                batches.append(batches[index].flip(-1))
        return prune_graph(gm, batches, config, callback, progress, store=store)
