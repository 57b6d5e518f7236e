"""The per-layer step of the sequential sweep: statistics, targets, solve, write-back, record.

:class:`sgfx.engine.sweep.SequentialPruner` decides *when* a layer is pruned (once its pruned inputs exist); this
module decides *how*: stream the inputs into the layer's Hessian (or its diagonal for Wanda), optionally fit the
dense model's outputs (dense targets), run the OBS solve per group, write the weight back, and record samples,
FLOPs, time, damping and the reconstruction error.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Sequence

import torch

from ..config import NMPattern, Pattern, SparsifyConfig
from ..layers import HessianAccumulator, LayerUnsupported, PrunableLayer
from ..obs import (FactorizationError, dense_target_weight, error_terms, exact_nm_prune, exact_work,
                   magnitude_prune, sparsegpt_prune, wanda_prune)
from ..quantize import quantize_weight, weight_integers, weight_scales as row_scales
from ..report import LayerRecord
from ..runtime import distributed
from ..runtime.timing import phase

__all__ = ["LayerPruner", "dense_target_shifts"]

logger = logging.getLogger(__name__)


def _error_by_forwards(config: SparsifyConfig, layer: PrunableLayer, record: LayerRecord) -> bool:
    """Whether the layer's error is measured by forward passes rather than from its Hessian. From H it costs
    about rows·cols² multiply-adds (and keeping H through the solve); by forwards, two passes of samples·rows·cols
    each (at the slower convolution rate): H wins below twice as many columns as samples. Magnitude and Wanda have
    no full H."""
    return config.method != "sparsegpt" or layer.columns >= 2 * record.samples


@phase("layer errors")
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


@phase("dense targets")
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


@phase("layer errors")
def _held_out_terms(layer: PrunableLayer, candidates: list[list[torch.Tensor] | None], inputs: Sequence[torch.Tensor],
                    dense_inputs: Sequence[torch.Tensor], device) -> torch.Tensor:
    """Per candidate ``Ŵ`` (given in solve layout; None: a solve that failed), ``‖W X_dense − Ŵ X‖²`` and
    ``‖W X_dense‖²`` on this rank's held-out batches: a (candidates, 2) float64 tensor (the live weight is ``W``;
    it is restored). The dense outputs are computed once for all candidates."""
    original = layer.weight.detach().clone()
    weights = []
    for candidate in candidates:
        if candidate is None:
            weights.append(None)
            continue
        layer.write_back(candidate)
        weights.append(layer.weight.detach().to(device, torch.float32).clone())
    layer.weight.data.copy_(original)
    dense = original.to(device, torch.float32)
    terms = torch.zeros(len(candidates), 2, dtype=torch.float64)
    terms[[k for k, weight in enumerate(weights) if weight is None], 0] = float("inf")
    for x, x_dense in zip(inputs, dense_inputs):
        want = layer.forward_with(x_dense.detach().to(device, torch.float32), dense)
        norm = want.square().sum(dtype=torch.float64).cpu()
        x = x.detach().to(device, torch.float32)
        for k, weight in enumerate(weights):
            if weight is not None:
                terms[k, 0] += (want - layer.forward_with(x, weight)).square().sum(dtype=torch.float64).cpu()
            terms[k, 1] += norm
    return terms


def obs_solve(weight: torch.Tensor, hessian: torch.Tensor, pattern: Pattern, config: SparsifyConfig,
              overwrite_hessian: bool = False, quantized: bool = False):
    """One OBS solve: exact greedy OBS for an N:M layer small enough (``config.exact_obs_work``; not with INT8,
    whose rounding only the blocked sweep compensates), SparseGPT's blocked solve otherwise."""
    if isinstance(pattern, NMPattern) and not quantized and exact_work(*weight.shape) <= config.exact_obs_work:
        return exact_nm_prune(weight, hessian, pattern, config.percdamp, config.max_damping_retries)
    return sparsegpt_prune(weight, hessian, pattern, config.blocksize, config.percdamp, config.max_damping_retries,
                           overwrite_hessian=overwrite_hessian, weight_scales="solve" if quantized else None)


class LayerPruner:
    """The per-layer step called by the SequentialPruner: statistics, solve, write-back, record.

    Across processes (:mod:`sgfx.runtime.distributed`) every rank gathers the statistics of its shard and they are
    summed;
    the solve runs on the layer's owner rank, which broadcasts the pruned weight and the record.
    """

    def __init__(self, config: SparsifyConfig, records: dict[str, LayerRecord], callback,
                 patterns: dict[str, Pattern] | None = None, weight_scales: dict[str, torch.Tensor] | None = None):
        self.config = config
        self.records = records
        self.callback = callback
        self.patterns = patterns or {}  # per-layer patterns chosen by an allocation; else config.sparsity
        self.weight_scales = weight_scales or {}  # quantize="int8": layer name -> its per-channel scale buffer
        self._solved = 0  # layers handled so far: the next one's owner rank

    def skip(self, layer: PrunableLayer, reason: str) -> None:
        """Leave ``layer`` dense with ``reason`` (summed up in sparsify's one warning)."""
        self.records[layer.name].reason = reason
        logger.info("%s left dense: %s", layer.name, reason)

    def pattern(self, layer: PrunableLayer) -> Pattern:
        return self.patterns.get(layer.name, self.config.sparsity)

    @staticmethod
    @phase("hessians")
    def _statistics(layer: PrunableLayer, inputs: Sequence[torch.Tensor], device, record: LayerRecord,
                    start: float, diagonal_only: bool = False):
        """Stream the layer's inputs into its Hessians (or their diagonals); records samples, FLOPs and time."""
        accumulator = HessianAccumulator(layer, device, diagonal_only)
        for x in inputs:
            accumulator.add(x)
        statistics = accumulator.finalize()
        record.samples, record.hessian_flops = accumulator.samples, accumulator.flops
        record.hessian_s = time.perf_counter() - start
        return statistics

    def _gather(self, layer: PrunableLayer, inputs: Sequence[torch.Tensor], dense_inputs, device,
                record: LayerRecord, start: float, owner: int):
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
        if record.dense_targets and config.per_layer_targets:
            record.dense_targets = self._dense_targets_hold_out(layer, inputs, dense_inputs, device, record, owner)
        shifts = None
        if record.dense_targets:
            shifts = dense_target_shifts(layer, inputs, dense_inputs, record.samples, device)
            record.hessian_flops += 4 * record.samples * layer.weight.numel()  # a forward and a weight gradient
            record.hessian_s = time.perf_counter() - start
        return hessians, shifts

    def _dense_targets_hold_out(self, layer: PrunableLayer, inputs, dense_inputs, device, record: LayerRecord,
                                owner: int) -> bool:
        """Whether dense targets lower this layer's error on held-out calibration batches (each rank's last fifth,
        at least one where it has two): both targets are solved on the other batches and scored on those; records
        both errors. Across processes the two candidate solves run on two ranks at once (the layer's owner and the
        next) and are broadcast, and the errors are summed over every rank's held-out batches, so that all ranks
        decide alike."""
        held = max(1, len(inputs) // 5) if len(inputs) >= 2 else 0
        if distributed.all_reduce_count(held) == 0:
            record.target_errors = {"note": "one calibration batch: nothing to hold out, dense targets kept"}
            return True
        fit, fit_dense = inputs[:len(inputs) - held], dense_inputs[:len(inputs) - held]
        accumulator = HessianAccumulator(layer, device)
        for x in fit:
            accumulator.add(x)
        hessians = accumulator.finalize()
        shifts = dense_target_shifts(layer, fit, fit_dense, accumulator.samples, device)
        config, pattern = self.config, self.pattern(layer)
        matrices = [w.to(device) for w in layer.solve_matrices()]
        names = ("plain", "dense")
        candidates = []
        for k, name in enumerate(names):
            solver = (owner + k) % distributed.world_size()
            candidate = None
            if distributed.rank() == solver:
                with phase("solve"):
                    try:
                        targets = self._targets(matrices, hessians, shifts if name == "dense" else None)
                        candidate = [obs_solve(w, h, pattern, config).weight for w, h in zip(targets, hessians)]
                    except FactorizationError as exc:
                        logger.info("%s: %s-target candidate not solved: %s", layer.name, name, exc)
            candidates.append(candidate)
        if distributed.is_active():
            candidates = [self._broadcast_candidate(candidate, (owner + k) % distributed.world_size(), device)
                          for k, candidate in enumerate(candidates)]
        terms = distributed.all_reduce_sum(_held_out_terms(layer, candidates, inputs[len(inputs) - held:],
                                                           dense_inputs[len(inputs) - held:], device))
        errors = {name: float(num / den) if den > 0 else 0.0 for name, (num, den) in zip(names, terms.tolist())}
        record.target_errors = errors
        return errors["dense"] < errors["plain"]

    def _targets(self, matrices: list[torch.Tensor], hessians: list[torch.Tensor],
                 shifts: list[torch.Tensor] | None) -> list[torch.Tensor]:
        """The weights the OBS solve fits per group: the layer's own, or with ``shifts`` its dense targets."""
        if shifts is None:
            return matrices
        config = self.config
        return [dense_target_weight(w, h, shift, config.percdamp, config.max_damping_retries)
                for w, h, shift in zip(matrices, hessians, shifts)]

    @staticmethod
    def _broadcast_candidate(candidate: list[torch.Tensor] | None, solver: int, device) -> list[torch.Tensor] | None:
        """Rank ``solver``'s candidate weights (None where its solve failed) on every rank."""
        layout = distributed.broadcast_object(None if candidate is None else [(w.shape, w.dtype) for w in candidate],
                                              solver)
        if layout is None:
            return None
        if candidate is None:
            candidate = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in layout]
        return [distributed.broadcast_tensor(w.contiguous(), solver) for w in candidate]

    @phase("solve")
    def _solve(self, layer: PrunableLayer, statistics, matrices: list[torch.Tensor], record: LayerRecord) -> list:
        """The pruned (and with INT8, rounded) weights per group (runs on one rank). INT8 scales, one per row of
        each group, are each row's largest weight after the float solve (a first sweep on the same factor)."""
        config, pattern = self.config, self.pattern(layer)
        quantized = layer.name in self.weight_scales
        if config.method in ("magnitude", "wanda"):  # no weight update: round to nearest after pruning
            results = [magnitude_prune(w, pattern) for w in matrices] if config.method == "magnitude" else \
                [wanda_prune(w, d, pattern) for w, d in zip(matrices, statistics[0])]
            if quantized:
                for result in results:
                    result.scales = row_scales(result.weight)
                    result.weight = quantize_weight(result.weight, result.scales)
                self._fill_scales(layer, [r.scales for r in results])
            return results
        hessians, shifts = statistics
        targets = self._targets(matrices, hessians, shifts)
        del shifts
        keep_hessians = not _error_by_forwards(config, layer, record)
        results = [obs_solve(w, h, pattern, config, overwrite_hessian=not keep_hessians, quantized=quantized)
                   for w, h in zip(targets, hessians)]
        if quantized:
            self._fill_scales(layer, [r.scales for r in results])
        if keep_hessians:
            record.rel_error = _relative_error_from_hessians(matrices, [r.weight for r in results], hessians)
        record.factor_s = sum(r.factor_s for r in results)
        record.damping = max(r.damping for r in results)
        record.solver = results[0].solver
        record.damping_retries = max(r.damping_retries for r in results)
        if record.damping_retries:
            logger.warning("%s: Cholesky failed, damping raised x10^%d", layer.name, record.damping_retries)
        return results

    def _fill_scales(self, layer: PrunableLayer, grids: list[torch.Tensor]) -> None:
        """Write the groups' row scales into the layer's per-output-channel scale buffer (groups in channel order)."""
        self.weight_scales[layer.name].copy_(torch.cat(grids).to(self.weight_scales[layer.name]))

    def _check_grid(self, layer: PrunableLayer, record: LayerRecord) -> None:
        """The written-back weight must be exactly on its per-channel grid (the int8 values it exports as)."""
        scales = self.weight_scales[layer.name]
        try:
            weight_integers(layer.weight.detach(), scales, record.quant["weight_axis"])
        except ValueError as exc:
            raise LayerUnsupported(f"INT8 write-back failed: {exc}") from None
        record.quant.update(weight_scale_min=float(scales.min()), weight_scale_max=float(scales.max()))

    def _share(self, layer: PrunableLayer, record: LayerRecord, owner: int, failure: str | None) -> str | None:
        """Across processes: the owner's record (and failure) to every rank, then its pruned weight (and its INT8
        scales)."""
        fields, failure = distributed.broadcast_object((vars(record).copy(), failure), owner)
        vars(record).update(fields)
        if failure is None:
            distributed.broadcast_tensor(layer.weight.data, owner)
            if layer.name in self.weight_scales:
                distributed.broadcast_tensor(self.weight_scales[layer.name], owner)
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
            statistics = self._gather(layer, inputs, dense_inputs, device, record, start, owner)
            if _error_by_forwards(self.config, layer, record):
                dense = layer.weight.detach().float().clone()
            if distributed.rank() == owner:
                matrices = [m.to(device) for m in layer.solve_matrices()]
                with distributed.solve_threads():
                    results = self._solve(layer, statistics, matrices, record)
                del matrices, statistics
                with phase("solve"):
                    layer.write_back([r.weight for r in results])
                if layer.name in self.weight_scales:
                    self._check_grid(layer, record)
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
