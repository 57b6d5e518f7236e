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
import time
import warnings
from typing import Any, Callable

import torch
import torch.fx
from torch.fx.node import Node

from ..config import Pattern, SparsifyConfig
from ..layers import LayerUnsupported, PrunableLayer
from ..obs import (FactorizationError, dense_target_weight, error_terms, magnitude_prune, sparsegpt_prune,
                   wanda_prune)
from ..report import LayerRecord, SparsityReport
from .bn_reestimate import batchnorms_after_pruned, reestimate_batchnorm
from .sequential_prune import SequentialPruner
from .stats_correction import correction_hook, layer_bias, layers_to_correct

__all__ = ["LayerPruner", "dense_target_shifts", "prune_sequentially", "progress_bar"]

logger = logging.getLogger(__name__)


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


def dense_target_shifts(layer: PrunableLayer, inputs: list[torch.Tensor], dense_inputs: list[torch.Tensor],
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


class LayerPruner:
    """The per-layer step called by the SequentialPruner: Hessian, solve, write-back, record."""

    def __init__(self, config: SparsifyConfig, records: dict[str, LayerRecord], callback,
                 patterns: dict[str, Pattern] | None = None):
        self.config = config
        self.records = records
        self.callback = callback
        self.patterns = patterns or {}  # per-layer patterns chosen by an allocation; else config.sparsity

    def skip(self, layer: PrunableLayer, reason: str) -> None:
        """Leave ``layer`` dense with ``reason`` (summed up in sparsify's one warning)."""
        self.records[layer.name].reason = reason
        logger.info("%s left dense: %s", layer.name, reason)

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
            shifts = dense_target_shifts(layer, inputs, dense_inputs, record.samples, device)
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
        except (FactorizationError, LayerUnsupported) as exc:
            solve = isinstance(exc, FactorizationError)
            record.status, record.reason = "skipped", f"solve failed: {exc}" if solve else str(exc)
            if solve:
                warnings.warn(f"sgfx: {layer.name} left dense: {exc}", RuntimeWarning, stacklevel=2)
            else:  # a layer kind found out at run time: summed up in sparsify's one warning
                logger.info("%s left dense: %s", layer.name, exc)
            if self.callback is not None:
                self.callback(record)
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


@contextlib.contextmanager
def progress_bar(enabled: bool, layers: int, callback):
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


def prune_sequentially(gm: torch.fx.GraphModule, batches: list[Any], to_prune: dict[Node, PrunableLayer],
                       config: SparsifyConfig, records: dict[str, LayerRecord], result: SparsityReport,
                       on_layer: Callable[[LayerRecord], None] | None, patterns: dict[str, Pattern],
                       blocks: dict | None = None) -> None:
    """Prune ``to_prune`` (and the layers inside the leaf modules ``blocks``) in one sweep over ``batches``, with
    the remedies ``config`` asks for, in place."""
    hooks, batchnorms = {}, {}
    if config.bn_reestimate is not False:
        batchnorms = batchnorms_after_pruned(gm, set(to_prune))
        hooks = {node: functools.partial(reestimate_batchnorm, bn) for node, bn in batchnorms.items()}
        result.bn_reestimated = [str(node.target) for node in batchnorms]
    corrections = correction_hooks(gm, to_prune, set(batchnorms), config.stats_correction, result)
    dense = copy.deepcopy(gm) if config.dense_targets or corrections else None  # the unpruned model, in lockstep
    with torch.no_grad():
        SequentialPruner(gm, to_prune, LayerPruner(config, records, on_layer, patterns), hooks, dense,
                         corrections, blocks).run_batches(batches)
