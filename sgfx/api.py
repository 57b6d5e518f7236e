"""The face of sgfx: :func:`sparsify` builds a :class:`SparsifyConfig` from its arguments and hands it to the
engine; saving, loading, the report and the pattern check are re-exported from their modules."""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from torch import nn

from .check import PatternCheck, check_pattern
from .config import SparsifyConfig, build_config
from .engine import sparsify_graph, sparsify_submodules
from .report import LayerRecord, get_report, report
from .runtime import distributed
from .runtime.calibration import Inputs, calibration_batches
from .serialization import load, save

__all__ = ["sparsify", "Inputs", "calibration_batches", "save", "load", "report", "get_report", "check_pattern",
           "PatternCheck", "SparsifyConfig"]


def _refuse_nonfinite(model: nn.Module) -> None:
    """Raise ValueError naming every parameter or floating buffer of ``model`` that holds NaN or Inf."""
    bad = []
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
            bad.append(f"{name} ({nan} NaN, {inf} Inf of {tensor.numel()})")
    if bad:
        raise ValueError(f"the model holds non-finite values, so sgfx does not prune it: {'; '.join(bad[:10])}"
                         + (f"; and {len(bad) - 10} more tensors" if len(bad) > 10 else "")
                         + ". Check the checkpoint it was loaded from")


def sparsify(model: nn.Module, calib: Any, sparsity: Any = "2:4", *,
             callback: Callable[[LayerRecord], None] | None = None, progress: bool | None = None,
             **options: Any) -> nn.Module:
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
        calib: one input tensor, or an iterable of batches: tensors, or tuples whose first element is the input;
            for a model with several inputs, :class:`sgfx.Inputs` items (``sgfx.Inputs(x, mask, meta=m)``) or
            dicts of keyword inputs. With ``submodules=`` each item is passed to the model as given,
            ``model(item)``.
        sparsity: ``"N:M"`` (at most N nonzeros in every M consecutive input channels, e.g. ``"2:4"``), a float
            in (0, 1) for unstructured sparsity, or a :class:`SparsifyConfig` holding every option.
        callback: called with each layer's :class:`LayerRecord` once it is pruned.
        progress: a progress bar over the layers with the memory in use (tqdm, on stderr). ``None`` (default): shown
            when stderr is a terminal and the ``sgfx`` logger is not set above WARNING (and only on rank 0 of a
            process group).
        **options: any field of :class:`SparsifyConfig` by name (``method``, ``skip``, ``dense_targets``,
            ``submodules``, ``max_memory`` ...; its docstring documents each); ``None`` means the default.

    Returns:
        A new ``torch.fx.GraphModule`` equal to ``model`` except for the pruned weights, in the model's dtypes
        and training mode. With ``submodules``: a deep copy of ``model`` (its own type and ``forward``) whose
        named submodules are replaced by their pruned GraphModules. ``sgfx.report(result)`` prints what was done.

    Raises:
        TypeError: a model that is not an ``nn.Module``, an unknown option, bad option types, or an untraceable
            model.
        ValueError: bad pattern or options, NaN or Inf in the model's weights (the message names the tensors),
            empty or non-finite calibration data, or calibration batches the model cannot run (the message names
            the graph node); with ``quantize="int8"``, a model that already quantizes or NaN/Inf activations.

    Example:
        >>> gm = sgfx.sparsify(model, calib_loader, "2:4")  # doctest: +SKIP
        >>> det = sgfx.sparsify(fasterrcnn, images, "2:4", submodules="auto")  # doctest: +SKIP
        >>> int8 = sgfx.sparsify(model, calib_loader, "2:4", quantize="int8")  # 2:4 + INT8  # doctest: +SKIP
        >>> print(sgfx.report(gm))  # doctest: +SKIP
    """
    config = build_config(sparsity, options)
    if distributed.is_active() and config.allocates:
        raise ValueError("allocation='global' and budget= are not supported across processes yet (their errors are "
                         "measured per process); run them in one process")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _refuse_nonfinite(model)
    if callback is not None and not callable(callback):
        raise TypeError("callback must be callable")
    if model.training:
        warnings.warn(
            "sgfx: the model is in training mode; calibrating in eval mode (BatchNorm running statistics, "
            "no dropout). The result is returned in training mode like the model.", UserWarning, stacklevel=2,
        )
    if config.submodules is not None:
        return sparsify_submodules(model, calib, config, callback, progress)
    return sparsify_graph(model, calib, config, callback, progress)
