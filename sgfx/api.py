"""``sgfx.sparsify``: trace, calibrate sequentially, prune with OBS, report."""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import time
import warnings
from typing import Any, Callable, Iterable

import torch
import torch.fx
from torch import nn

from .config import Pattern, SparsifyConfig, Unstructured
from .layers import PrunableLayer
from .obs import (FactorizationError, dense_target_weight, error_terms, magnitude_prune, sparsegpt_prune,
                  wanda_prune)
from .passes.allocation import plan as plan_allocation
from .passes.bn_reestimate import batchnorms_after_pruned, reestimate_batchnorm
from .passes.channel_permutation import permute_channels as permute_channel_groups
from .passes.sequential_prune import SequentialPruner, find_prunable_layers, match_skip
from .passes.stats_correction import correction_hook, layer_bias, layers_to_correct
from .passes.trace import trace
from .report import REPORT_KEY, LayerRecord, SparsityReport

__all__ = ["sparsify", "calibration_batches"]

logger = logging.getLogger(__name__)

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_OPTION_NAMES = ("method", "blocksize", "percdamp", "skip", "device", "leaf_modules", "concrete_args", "allocation",
                 "budget", "target",
                 "bn_reestimate", "dense_targets", "augment", "stats_correction", "permute_channels")


def calibration_batches(calib: Any) -> list[torch.Tensor]:
    """Materialise calibration data as a list of input tensors, validating each batch.

    Accepts one tensor (a single batch) or an iterable of batches, each a tensor or a tuple/list whose first
    element is the input (as a ``DataLoader`` over a labelled dataset yields).

    Raises:
        TypeError: not a tensor / iterable of tensors or tuples.
        ValueError: no batches, an empty batch, or NaN/Inf values.
    """
    if isinstance(calib, torch.Tensor):
        items: Iterable[Any] = [calib]
    elif calib is None or isinstance(calib, (str, bytes, dict)):
        raise TypeError(f"calib must be a tensor or an iterable of batches, got {type(calib).__name__}")
    else:
        try:
            items = iter(calib)
        except TypeError:
            raise TypeError(f"calib must be a tensor or an iterable of batches, got {type(calib).__name__}") from None
    batches = []
    for index, item in enumerate(items):
        x = item[0] if isinstance(item, (tuple, list)) and len(item) > 0 else item
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"calibration batch {index}: expected a tensor or a (input, ...) tuple/list, got {type(item).__name__}"
            )
        if x.numel() == 0:
            raise ValueError(f"calibration batch {index} is empty (shape {tuple(x.shape)})")
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise ValueError(f"calibration batch {index} contains NaN or Inf values")
        batches.append(x.detach())
    if not batches:
        raise ValueError("calibration data is empty: pass a tensor or an iterable yielding at least one batch")
    return batches


def _resolve_config(sparsity: Any, options: dict[str, Any]) -> SparsifyConfig:
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


def _relative_error(layer: PrunableLayer, inputs: list[torch.Tensor], dense: torch.Tensor) -> float:
    """‖WX − ŴX‖² / ‖WX‖² over all calibration inputs (the layer's linear map, bias excluded), by forward passes."""
    delta = dense - layer.weight.detach().float()
    num = den = 0.0
    for x in inputs:
        x = x.float()
        num += float(layer.forward_with(x, delta).square().sum(dtype=torch.float64))
        den += float(layer.forward_with(x, dense).square().sum(dtype=torch.float64))
    return num / den if den > 0 else 0.0


def _relative_error_from_hessians(dense: list[torch.Tensor], pruned: list[torch.Tensor],
                                  hessians: list[torch.Tensor]) -> float:
    """The same ratio as ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` per group: cheaper than forwards when cols < samples."""
    terms = [error_terms(w, w_hat, h) for w, w_hat, h in zip(dense, pruned, hessians)]
    num, den = sum(t[0] for t in terms), sum(t[1] for t in terms)
    return num / den if den > 0 else 0.0


def _dense_target_shifts(layer: PrunableLayer, inputs: list[torch.Tensor], dense_inputs: list[torch.Tensor],
                         samples: int, device) -> list[torch.Tensor]:
    """``W (A − H) = 2/n Σ (W (x_dense − x)) xᵀ`` per group, (rows/groups, cols) each, over the layer's input vectors.

    One forward pass of the input difference and one weight-gradient pass per batch: 4·n·|W| FLOPs in PyTorch's
    conv kernels, instead of the (cols, cols) cross-covariance ``A`` (2·n·cols²) and a GEMM with it. Taking the
    difference of the inputs first also avoids the cancellation of ``W A − W H``. ``samples`` is n, the input
    vectors of all batches (the Hessian's count).
    """
    weight = layer.weight.detach().to(device, torch.float32)
    sums = None
    for x, x_dense in zip(inputs, dense_inputs):
        x = x.detach().to(device, torch.float32)
        grad = layer.forward_with(x_dense.detach().to(device, torch.float32) - x, weight)  # (.., C_out, ..)
        products = layer.output_input_product(x, grad)
        sums = [p.double() for p in products] if sums is None else [s.add_(p) for s, p in zip(sums, products)]
    return [s * (2.0 / samples) for s in sums]


class _LayerPruner:
    """The per-layer step called by the SequentialPruner: Hessian, solve, write-back, record."""

    def __init__(self, config: SparsifyConfig, records: dict[str, LayerRecord], callback,
                 patterns: dict[str, Pattern] | None = None):
        self.config = config
        self.records = records
        self.callback = callback
        self.patterns = patterns or {}  # per-layer patterns chosen by an allocation; else config.sparsity

    def pattern(self, layer: PrunableLayer) -> Pattern:
        return self.patterns.get(layer.name, self.config.sparsity)

    @staticmethod
    def _statistics(layer: PrunableLayer, inputs: list[torch.Tensor], device, record: LayerRecord, start: float,
                    diagonal_only: bool = False, dense_inputs: list[torch.Tensor] | None = None):
        """Stream the layer's inputs into its Hessians (or their diagonals); with ``dense_inputs`` also the
        dense-target shifts ``W (A − H)``. Returns (statistics, shifts or None); records samples, FLOPs and time."""
        accumulator = layer.hessian_accumulator(device, diagonal_only)
        for x in inputs:
            accumulator.add(x)
        statistics = accumulator.finalize()
        record.samples, record.hessian_flops = accumulator.samples, accumulator.flops
        shifts = None
        if dense_inputs is not None:
            shifts = _dense_target_shifts(layer, inputs, dense_inputs, record.samples, device)
            record.hessian_flops += 4 * record.samples * layer.weight.numel()  # a forward and a weight gradient
        record.hessian_s = time.perf_counter() - start
        return statistics, shifts

    def _sparsegpt(self, layer: PrunableLayer, inputs: list[torch.Tensor], dense_inputs: list[torch.Tensor] | None,
                   matrices: list[torch.Tensor], device, record: LayerRecord, start: float) -> list:
        config = self.config
        # Fitting the dense outputs needs a well-determined cross-covariance: at least as many samples as columns.
        # A Linear layer sees one sample per image, so with a few hundred images it keeps the plain target.
        record.dense_targets = bool(config.dense_targets) and (
            sum(layer.input_vectors(x) for x in inputs) >= layer.columns)
        hessians, shifts = self._statistics(layer, inputs, device, record, start,
                                            dense_inputs=dense_inputs if record.dense_targets else None)
        targets = matrices if shifts is None else [
            dense_target_weight(w, h, shift, config.percdamp, config.max_damping_retries)
            for w, h, shift in zip(matrices, hessians, shifts)]
        del shifts
        keep_hessians = layer.columns < record.samples  # then the error is cheaper from H than by forward passes
        results = [
            sparsegpt_prune(w, h, self.pattern(layer), config.blocksize, config.percdamp,
                            config.max_damping_retries, overwrite_hessian=not keep_hessians)
            for w, h in zip(targets, hessians)
        ]
        if keep_hessians:
            record.rel_error = _relative_error_from_hessians(matrices, [r.weight for r in results], hessians)
        record.factor_s = sum(r.factor_s for r in results)
        record.damping = max(r.damping for r in results)
        record.damping_retries = max(r.damping_retries for r in results)
        if record.damping_retries:
            logger.warning("%s: Cholesky failed, damping raised x10^%d", layer.name, record.damping_retries)
        return results

    def __call__(self, layer: PrunableLayer, inputs: list[torch.Tensor],
                 dense_inputs: list[torch.Tensor] | None = None) -> None:
        config = self.config
        record = self.records[layer.name]
        device = config.device or layer.weight.device
        start = time.perf_counter()
        matrices = [m.to(device) for m in layer.solve_matrices()]
        try:
            if config.method == "magnitude":
                results = [magnitude_prune(w, self.pattern(layer)) for w in matrices]
            elif config.method == "wanda":
                norms, _ = self._statistics(layer, inputs, device, record, start, diagonal_only=True)
                results = [wanda_prune(w, d, self.pattern(layer)) for w, d in zip(matrices, norms)]
            else:
                results = self._sparsegpt(layer, inputs, dense_inputs, matrices, device, record, start)
        except FactorizationError as exc:
            record.status, record.reason = "skipped", f"solve failed: {exc}"
            warnings.warn(f"sgfx: {layer.name} left dense: {exc}", RuntimeWarning, stacklevel=2)
            return
        del matrices
        dense = layer.weight.detach().float().clone() if record.rel_error is None else None  # forward-route error
        layer.write_back([r.weight for r in results])
        record.solve_s = time.perf_counter() - start - record.hessian_s
        record.status = "pruned"
        record.sparsity = float((layer.weight == 0).float().mean())
        if dense is not None:
            record.rel_error = _relative_error(layer, inputs, dense)
        logger.info(
            "%s %s: sparsity %.3f, rel. error %.3e, %.2f s", layer.name, record.op, record.sparsity,
            record.rel_error, record.hessian_s + record.solve_s,
        )
        if self.callback is not None:
            self.callback(record)


def _correction_hooks(gm: torch.fx.GraphModule, to_prune: dict, bn_nodes: set, mode: str,
                      result: SparsityReport) -> dict:
    """Statistics-correction hooks for the pruned layers that may need one (each records itself when applied)."""
    if mode == "off":
        return {}
    hooks = {}
    for node in sorted(layers_to_correct(gm, set(to_prune), bn_nodes), key=list(to_prune).index):
        layer = to_prune[node]
        if node.op != "call_module" and layer_bias(gm, node, create=False) is None:
            warnings.warn(f"sgfx: {layer.name}: no bias to correct its statistics through (a functional call "
                          "without a get_attr bias); left uncorrected", UserWarning, stacklevel=3)
            continue
        hooks[node] = correction_hook(layer.weight, functools.partial(layer_bias, gm, node),
                                      1 if layer.op == "Conv2d" else -1, mode, layer.columns,
                                      functools.partial(result.stats_corrected.append, layer.name))
    return hooks


@contextlib.contextmanager
def _progress_bar(enabled: bool, layers: int, callback):
    """Yield the per-layer callback: ``callback``, preceded by a tqdm bar's update when ``enabled``."""
    if not enabled:
        yield callback
        return
    from tqdm.auto import tqdm

    with tqdm(total=layers, desc="sgfx: pruning", unit="layer", disable=None, dynamic_ncols=True) as bar:
        def on_layer(record: LayerRecord) -> None:
            bar.set_postfix_str(record.name, refresh=False)
            bar.update(1)
            if callback is not None:
                callback(record)

        yield on_layer


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
    callback: Callable[[LayerRecord], None] | None = None,
    progress: bool = False,
) -> torch.fx.GraphModule:
    """Prune a trained model's Conv2d/Linear weights in one shot, without fine-tuning.

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
        device: where the solves run (e.g. ``"cuda"``); default: where the model is.
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
        callback: called with each layer's :class:`LayerRecord` once it is pruned (for progress bars).
        progress: show a progress bar over the layers (tqdm, on stderr; off when stderr is not a terminal).

    Returns:
        A new ``torch.fx.GraphModule`` equal to ``model`` except for the pruned weights, in the model's dtypes
        and training mode. ``sgfx.report(gm)`` prints what was done.

    Raises:
        TypeError: a model that is not an ``nn.Module``, bad option types, or an untraceable model.
        ValueError: bad pattern or options, empty or non-finite calibration data, or calibration batches the
            model cannot run (the message names the graph node).

    Example:
        >>> gm = sgfx.sparsify(model, calib_loader, "2:4")  # doctest: +SKIP
        >>> print(sgfx.report(gm))  # doctest: +SKIP
    """
    options = dict(zip(_OPTION_NAMES, (method, blocksize, percdamp, skip, device, leaf_modules, concrete_args,
                                       allocation, budget, target,
                                       bn_reestimate, dense_targets, augment, stats_correction,
                                       permute_channels)))
    config = _resolve_config(sparsity, options)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if callback is not None and not callable(callback):
        raise TypeError("callback must be callable")
    batches = calibration_batches(calib)
    if config.augment == "hflip":
        if any(b.dim() != 4 for b in batches):
            raise ValueError("augment='hflip' needs image batches of shape (B, C, H, W)")
        batches = batches + [b.flip(-1) for b in batches]
    started = time.perf_counter()

    gm = trace(model, config.leaf_modules, config.concrete_args)
    was_training = model.training
    if was_training:
        warnings.warn(
            "sgfx: the model is in training mode; calibrating in eval mode (BatchNorm running statistics, "
            "no dropout). The result is returned in training mode like the model.", UserWarning, stacklevel=2,
        )
    gm.eval()
    original_dtypes = _upcast_low_precision(gm)
    if original_dtypes:
        logger.info("low-precision model: calibrating and solving in float32, writing back in its dtypes")
    model_device = _model_device(gm)
    batches = [b.to(model_device, torch.float32) if b.dtype in _LOW_PRECISION else b.to(model_device)
               for b in batches]

    pattern_name = str(config.sparsity)
    found = find_prunable_layers(gm)
    records: dict[str, LayerRecord] = {}
    to_prune = {}
    used_skips: set[str] = set()
    for node, layer in found.items():
        record = LayerRecord(
            layer.name, layer.op, tuple(layer.weight.shape), pattern_name, config.method, "skipped",
            weight_name=layer.weight_name,
        )
        record.sparsity = float((layer.weight == 0).float().mean())
        records[layer.name] = record
        matched = match_skip(layer.name, config.skip)
        reason = f"skip={matched!r}" if matched else layer.ineligibility(config.sparsity)
        if matched:
            used_skips.add(matched)
        elif reason:
            warnings.warn(f"sgfx: {layer.name} left dense: {reason}", UserWarning, stacklevel=2)
        if reason:
            record.reason = reason
        else:
            to_prune[node] = layer
    for pattern in sorted(set(config.skip) - used_skips):
        warnings.warn(f"sgfx: skip pattern {pattern!r} matched no prunable layer", UserWarning, stacklevel=2)

    result = SparsityReport(pattern_name, config.method, list(records.values()))
    if not to_prune:
        warnings.warn("sgfx: no prunable Conv2d/Linear layer in this model; returning the traced graph unchanged",
                      UserWarning, stacklevel=2)
    else:
        if config.permute_channels:
            with torch.no_grad():
                groups = permute_channel_groups(gm, batches, set(to_prune), config.sparsity)
            result.permuted = [
                {"producer": g.name, "consumers": [str(c.target) for c in g.consumers],
                 "channels": len(g.permutation), "kept_before": g.kept_before, "kept_after": g.kept_after}
                for g in groups]
        patterns = {}
        if config.allocation == "global" or config.budget is not None:
            patterns, kept_dense, result.allocation = plan_allocation(gm, batches, to_prune, config)
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
        hooks, batchnorms = {}, {}
        if config.bn_reestimate is not False:
            batchnorms = batchnorms_after_pruned(gm, set(to_prune))
            hooks = {node: functools.partial(reestimate_batchnorm, bn) for node, bn in batchnorms.items()}
            result.bn_reestimated = [str(node.target) for node in batchnorms]
        corrections = _correction_hooks(gm, to_prune, set(batchnorms), config.stats_correction, result)
        # the unpruned model, run in lockstep
        dense = copy.deepcopy(gm) if config.dense_targets or corrections else None
        with torch.no_grad(), _progress_bar(progress, len(to_prune), callback) as on_layer:
            SequentialPruner(gm, to_prune, _LayerPruner(config, records, on_layer, patterns), hooks, dense,
                             corrections).run_batches(batches)
        del dense
    _restore_dtypes(gm, original_dtypes)
    gm.train(was_training)
    result.total_s = time.perf_counter() - started
    gm.meta[REPORT_KEY] = result
    return gm
