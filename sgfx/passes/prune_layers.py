"""The per-layer pruning step of the sequential sweep, and the sweep set-up around it.

Why a pass of its own: :class:`sgfx.passes.sequential_prune.SequentialPruner` decides *when* a layer is pruned (once
its pruned inputs exist); this module decides *how*: stream the inputs into the layer's Hessian (or its diagonal
for Wanda), optionally fit the dense model's outputs (dense targets), run the OBS solve per group, write the weight
back, and record samples, FLOPs, time, damping and the reconstruction error. :func:`prune_sequentially` wires in
BatchNorm re-estimation, statistics correction and the dense model run in lockstep.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import sys
import time
import warnings
from typing import Any, Callable, Sequence

import torch
import torch.fx
from torch.fx.node import Node

from .. import distributed
from ..activations import ActivationStore
from ..config import Pattern, SparsifyConfig
from ..layers import LayerUnsupported, PrunableLayer
from ..memory import current_rss
from ..obs import (FactorizationError, dense_target_weight, error_terms, magnitude_prune, sparsegpt_prune,
                   wanda_prune)
from ..report import LayerRecord, SparsityReport
from .bn_reestimate import batchnorms_after_pruned, reestimate_batchnorm
from .sequential_prune import SequentialPruner
from .stats_correction import correction_hook, layer_bias, layers_to_correct

__all__ = ["LayerPruner", "dense_target_shifts", "prune_sequentially", "progress_bar", "show_progress"]

logger = logging.getLogger(__name__)


def _relative_error(layer: PrunableLayer, inputs: Sequence[torch.Tensor], dense: torch.Tensor) -> float:
    """‖WX − ŴX‖² / ‖WX‖² over all calibration inputs (the layer's linear map, bias excluded), by forward passes
    (summed over the ranks when calibrating across processes)."""
    delta = dense - layer.weight.detach().float()
    terms = torch.zeros(2, dtype=torch.float64)
    for x in inputs:
        x = x.float()
        terms[0] += layer.forward_with(x, delta).square().sum(dtype=torch.float64).cpu()
        terms[1] += layer.forward_with(x, dense).square().sum(dtype=torch.float64).cpu()
    num, den = distributed.all_reduce_sum(terms).tolist()
    return num / den if den > 0 else 0.0


def _relative_error_from_hessians(dense: list[torch.Tensor], pruned: list[torch.Tensor],
                                  hessians: list[torch.Tensor]) -> float:
    """The same ratio as ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` per group: cheaper than forwards when cols < samples."""
    terms = [error_terms(w, w_hat, h) for w, w_hat, h in zip(dense, pruned, hessians)]
    num, den = sum(t[0] for t in terms), sum(t[1] for t in terms)
    return num / den if den > 0 else 0.0


def dense_target_shifts(layer: PrunableLayer, inputs: list[torch.Tensor], dense_inputs: list[torch.Tensor],
                         samples: int, device) -> list[torch.Tensor]:
    """``W (A − H) = 2/n Σ (W (x_dense − x)) xᵀ`` per group, (rows/groups, cols) each, over the layer's input vectors.

    One forward pass of the input difference and one weight-gradient pass per batch: 4·n·|W| FLOPs in PyTorch's
    conv kernels, instead of the (cols, cols) cross-covariance ``A`` (2·n·cols²) and a GEMM with it. Taking the
    difference of the inputs first also avoids the cancellation of ``W A − W H``. ``samples`` is n, the input
    vectors of all batches (the Hessian's count, over every rank when calibrating across processes).
    """
    weight = layer.weight.detach().to(device, torch.float32)
    sums = None
    for x, x_dense in zip(inputs, dense_inputs):
        x = x.detach().to(device, torch.float32)
        grad = layer.forward_with(x_dense.detach().to(device, torch.float32) - x, weight)  # (.., C_out, ..)
        products = layer.output_input_product(x, grad)
        sums = [p.double() for p in products] if sums is None else [s.add_(p) for s, p in zip(sums, products)]
    return [distributed.all_reduce_sum(s) * (2.0 / samples) for s in sums]


class LayerPruner:
    """The per-layer step called by the SequentialPruner: statistics, solve, write-back, record.

    Across processes (:mod:`sgfx.distributed`) every rank gathers the statistics of its shard and they are summed;
    the solve runs on the layer's owner rank, which broadcasts the pruned weight and the record.
    """

    def __init__(self, config: SparsifyConfig, records: dict[str, LayerRecord], callback,
                 patterns: dict[str, Pattern] | None = None):
        self.config = config
        self.records = records
        self.callback = callback
        self.patterns = patterns or {}  # per-layer patterns chosen by an allocation; else config.sparsity
        self._solved = 0  # layers handled so far: the next one's owner rank

    def skip(self, layer: PrunableLayer, reason: str) -> None:
        """Leave ``layer`` dense with ``reason`` (summed up in sparsify's one warning)."""
        self.records[layer.name].reason = reason
        logger.info("%s left dense: %s", layer.name, reason)

    def pattern(self, layer: PrunableLayer) -> Pattern:
        return self.patterns.get(layer.name, self.config.sparsity)

    @staticmethod
    def _statistics(layer: PrunableLayer, inputs: Sequence[torch.Tensor], device, record: LayerRecord,
                    start: float, diagonal_only: bool = False):
        """Stream the layer's inputs into its Hessians (or their diagonals); records samples, FLOPs and time."""
        accumulator = layer.hessian_accumulator(device, diagonal_only)
        for x in inputs:
            accumulator.add(x)
        statistics = accumulator.finalize()
        record.samples, record.hessian_flops = accumulator.samples, accumulator.flops
        record.hessian_s = time.perf_counter() - start
        return statistics

    def _gather(self, layer: PrunableLayer, inputs: Sequence[torch.Tensor], dense_inputs, device,
                record: LayerRecord, start: float):
        """The data-dependent part (collective across processes): Hessians and dense-target shifts, or Wanda's
        input norms; ``None`` for magnitude pruning."""
        config = self.config
        if config.method == "magnitude":
            return None
        if config.method == "wanda":
            return self._statistics(layer, inputs, device, record, start, diagonal_only=True), None
        hessians = self._statistics(layer, inputs, device, record, start)
        # Fitting the dense outputs needs a well-determined cross-covariance: at least as many samples as columns.
        # A Linear layer sees one sample per image, so with a few hundred images it keeps the plain target.
        record.dense_targets = bool(config.dense_targets) and dense_inputs is not None and \
            record.samples >= layer.columns
        shifts = None
        if record.dense_targets:
            shifts = dense_target_shifts(layer, inputs, dense_inputs, record.samples, device)
            record.hessian_flops += 4 * record.samples * layer.weight.numel()  # a forward and a weight gradient
            record.hessian_s = time.perf_counter() - start
        return hessians, shifts

    def _solve(self, layer: PrunableLayer, statistics, matrices: list[torch.Tensor], record: LayerRecord) -> list:
        """The pruned weights per group (runs on one rank)."""
        config, pattern = self.config, self.pattern(layer)
        if config.method == "magnitude":
            return [magnitude_prune(w, pattern) for w in matrices]
        if config.method == "wanda":
            return [wanda_prune(w, d, pattern) for w, d in zip(matrices, statistics[0])]
        hessians, shifts = statistics
        targets = matrices if shifts is None else [
            dense_target_weight(w, h, shift, config.percdamp, config.max_damping_retries)
            for w, h, shift in zip(matrices, hessians, shifts)]
        del shifts
        keep_hessians = layer.columns < record.samples  # then the error is cheaper from H than by forward passes
        results = [
            sparsegpt_prune(w, h, pattern, config.blocksize, config.percdamp,
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

    def _share(self, layer: PrunableLayer, record: LayerRecord, owner: int, failure: str | None) -> str | None:
        """Across processes: the owner's record (and failure) to every rank, then its pruned weight."""
        fields, failure = distributed.broadcast_object((vars(record).copy(), failure), owner)
        vars(record).update(fields)
        if failure is None:
            distributed.broadcast_tensor(layer.weight.data, owner)
        return failure

    def __call__(self, layer: PrunableLayer, inputs: Sequence[torch.Tensor],
                 dense_inputs: Sequence[torch.Tensor] | None = None) -> None:
        record = self.records[layer.name]
        device = self.config.device or layer.weight.device
        start = time.perf_counter()
        owner = distributed.owner(self._solved)
        self._solved += 1
        failure, dense = None, None
        try:
            statistics = self._gather(layer, inputs, dense_inputs, device, record, start)
            if self.config.method != "sparsegpt" or layer.columns >= record.samples:  # error by forward passes
                dense = layer.weight.detach().float().clone()
            if distributed.rank() == owner:
                matrices = [m.to(device) for m in layer.solve_matrices()]
                with distributed.solve_threads():
                    results = self._solve(layer, statistics, matrices, record)
                del matrices, statistics
                layer.write_back([r.weight for r in results])
                record.solve_s = time.perf_counter() - start - record.hessian_s
        except (FactorizationError, LayerUnsupported) as exc:
            failure = f"solve failed: {exc}" if isinstance(exc, FactorizationError) else str(exc)
        if distributed.is_active():
            failure = self._share(layer, record, owner, failure)
        if failure is not None:
            record.status, record.reason = "skipped", failure
            if failure.startswith("solve failed:"):
                warnings.warn(f"sgfx: {layer.name} left dense: {failure}", RuntimeWarning, stacklevel=2)
            else:  # a layer kind found out at run time: summed up in sparsify's one warning
                logger.info("%s left dense: %s", layer.name, failure)
            if self.callback is not None:
                self.callback(record)
            return
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


def correction_hooks(gm: torch.fx.GraphModule, to_prune: dict, bn_nodes: set, mode: str,
                      result: SparsityReport) -> dict:
    """Statistics-correction hooks for the pruned layers that may need one (each records itself when applied)."""
    if mode == "off":
        return {}
    hooks = {}
    for node in sorted(layers_to_correct(gm, set(to_prune), bn_nodes), key=list(to_prune).index):
        layer = to_prune[node]
        if len(layer.uses) > 1:  # one bias serves calls with different statistics (feature levels): leave it
            continue
        if node.op != "call_module" and layer_bias(gm, node, create=False) is None:
            warnings.warn(f"sgfx: {layer.name}: no bias to correct its statistics through (a functional call "
                          "without a get_attr bias); left uncorrected", UserWarning, stacklevel=3)
            continue
        hooks[node] = correction_hook(layer.scale_output_channels_, functools.partial(layer_bias, gm, node),
                                      layer.channel_dim, mode, layer.columns,
                                      functools.partial(result.stats_corrected.append, layer.name))
    return hooks


def show_progress(progress: bool | None) -> bool:
    """Whether to draw the progress bar: ``progress`` when given; by default, when stderr is a terminal, the
    ``sgfx`` logger is not set above WARNING, and this is rank 0 (or the only process)."""
    if progress is not None:
        return bool(progress) and distributed.rank() == 0
    quiet = logging.getLogger("sgfx").getEffectiveLevel() > logging.WARNING
    return sys.stderr.isatty() and not quiet and distributed.rank() == 0


def memory_figure(store: ActivationStore | None) -> str:
    """The live memory figure shown on the progress bar: RSS, and what the store holds on disk."""
    text = f"RSS {current_rss() / 1e9:.1f} GB"
    if store is not None and store.disk_used:
        text += f", on disk {store.disk_used / 1e9:.1f} GB"
    if store is not None and store.used["device"]:
        text += f", on {store.compute_device.type} {store.used['device'] / 1e9:.1f} GB"
    return text


@contextlib.contextmanager
def progress_bar(enabled: bool | None, layers: int, callback, store: ActivationStore | None = None):
    """Yield the per-layer callback: ``callback``, preceded by a tqdm bar's update (layer name and the memory
    figure) when :func:`show_progress` says so."""
    if not show_progress(enabled):
        yield callback
        return
    from tqdm.auto import tqdm

    with tqdm(total=layers, desc="sgfx: pruning", unit="layer", disable=None, dynamic_ncols=True) as bar:
        def on_layer(record: LayerRecord) -> None:
            bar.set_postfix_str(f"{record.name} | {memory_figure(store)}", refresh=False)
            bar.update(1)
            if callback is not None:
                callback(record)

        yield on_layer


def prune_sequentially(gm: torch.fx.GraphModule, batches: list[Any], to_prune: dict[Node, PrunableLayer],
                       config: SparsifyConfig, records: dict[str, LayerRecord], result: SparsityReport,
                       on_layer: Callable[[LayerRecord], None] | None, patterns: dict[str, Pattern],
                       blocks: dict | None = None, store: ActivationStore | None = None,
                       convert: Callable[[Any], Any] | None = None) -> None:
    """Prune ``to_prune`` (and the layers inside the leaf modules ``blocks``) in one sweep over ``batches``, with
    the remedies ``config`` asks for, in place; activations live in ``store``, batches pass through ``convert``."""
    hooks, batchnorms = {}, {}
    if config.bn_reestimate is not False:
        batchnorms = batchnorms_after_pruned(gm, set(to_prune))
        hooks = {node: functools.partial(reestimate_batchnorm, bn) for node, bn in batchnorms.items()}
        result.bn_reestimated = [str(node.target) for node in batchnorms]
    corrections = correction_hooks(gm, to_prune, set(batchnorms), config.stats_correction, result)
    dense = copy.deepcopy(gm) if config.dense_targets or corrections else None  # the unpruned model, in lockstep
    with torch.no_grad():
        SequentialPruner(gm, to_prune, LayerPruner(config, records, on_layer, patterns), hooks, dense,
                         corrections, blocks, store).run_batches(batches, convert)
