"""INT8 as TensorRT's explicit quantization runs it: the one place that says what the grids are.

- Weights: symmetric, one scale per output channel, zero point 0, integers in [-127, 127] (the narrow range
  TensorRT and ModelOpt use for weights; a zero stays exactly zero, so N:M layouts survive).
- Activations: symmetric, one scale per tensor, zero point 0, integers in [-128, 127] (ONNX ``QuantizeLinear``'s
  int8 range; TensorRT takes zero points of 0 only).
- Rounding: half to even, as ``torch.round``, ``torch.fake_quantize_per_tensor_affine`` and ONNX
  ``QuantizeLinear`` all do, so the fake-quantized GraphModule computes what the INT8 engine computes, up to the
  order of accumulation.

A weight value is stored as the float32 product ``q * scale``; ``round(w / scale)`` gives ``q`` back exactly.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

__all__ = ["QUANTIZE_MODES", "ACTIVATION_METHODS", "WEIGHT_QMAX", "ACT_QMIN", "ACT_QMAX", "weight_scales",
           "quantize_weight", "dequantize_weight", "weight_integers", "activation_scale", "fake_quantize_activation"]

QUANTIZE_MODES = ("int8",)  # sparsify(quantize=...): None (float) or one of these
# how a per-tensor activation scale is calibrated; the first is the default: on the seed models "max" lost no more than
# "percentile" (99.99th) did (docs/RESULTS.md), so no clipping by default
ACTIVATION_METHODS = ("max", "percentile")
DEFAULT_PERCENTILE = 99.99  # of |x| over the calibration values, for "percentile"
WEIGHT_QMAX = 127
ACT_QMIN, ACT_QMAX = -128, 127
_TINY = 1e-12  # floor of a scale: a channel or tensor that is all zeros still gets a positive scale


def weight_scales(weight: torch.Tensor) -> torch.Tensor:
    """One positive scale per row of ``weight`` (rows, cols): ``max |w| / 127``, float32, shape (rows,)."""
    amax = weight.detach().abs().amax(dim=1).float()
    return torch.where(amax > 0, amax, torch.ones_like(amax)).clamp_min(_TINY) / WEIGHT_QMAX


def _along(scales: torch.Tensor, dims: int, axis: int) -> torch.Tensor:
    """Per-channel ``scales`` shaped to broadcast along ``axis`` of a ``dims``-dimensional weight."""
    shape = [1] * dims
    shape[axis] = -1
    return scales.view(shape)


def quantize_weight(weight: torch.Tensor, scales: torch.Tensor, axis: int = 0) -> torch.Tensor:
    """``weight`` rounded to its grid: ``clamp(round(w / s), -127, 127) * s`` with ``s`` broadcast along ``axis``
    (in float32, or float64 for a float64 weight; zeros stay zero)."""
    dtype = torch.promote_types(weight.dtype, torch.float32)
    s = _along(scales, weight.dim(), axis).to(weight.device, dtype)
    return torch.round(weight.to(dtype) / s).clamp_(-WEIGHT_QMAX, WEIGHT_QMAX).mul_(s).to(weight.dtype)


def dequantize_weight(integers: torch.Tensor, scales: torch.Tensor, axis: int = 0,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``integers * s`` (float32 products, as :func:`quantize_weight` makes them) in ``dtype``."""
    return (integers.float() * _along(scales, integers.dim(), axis).to(integers.device, torch.float32)).to(dtype)


def weight_integers(weight: torch.Tensor, scales: torch.Tensor, axis: int = 0) -> torch.Tensor:
    """The int8 values of a weight already on its grid (``quantize_weight``'s output); raises ``ValueError`` if
    ``weight`` is not on it (then it was changed after quantization)."""
    q = torch.round(weight.float() / _along(scales, weight.dim(), axis).to(weight.device, torch.float32))
    if q.abs().max() > WEIGHT_QMAX or not torch.equal(dequantize_weight(q, scales, axis, weight.dtype), weight):
        raise ValueError("weight is not on its INT8 grid (modified after quantization?)")
    return q.to(torch.int8)


def activation_scale(values: Iterable[torch.Tensor], method: str, percentile: float = DEFAULT_PERCENTILE,
                     reduce_max: Callable[[float], float] = lambda v: v,
                     reduce_sum: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> torch.Tensor:
    """The per-tensor scale (a float32 scalar tensor) of an activation seen as ``values`` (one tensor per batch).

    ``"max"``: ``max |x| / 127``. ``"percentile"``: the ``percentile`` of ``|x|`` over all values (from a
    histogram of 4096 bins up to the max, as TensorRT's and ModelOpt's calibrators do) / 127: a few outliers no
    longer stretch the grid of the rest. ``reduce_max``/``reduce_sum`` combine the max and the histogram across
    processes (calibration sharded over ranks).

    Raises:
        ValueError: NaN or infinite values (named by the caller), or no values.
    """
    tensors = [v.detach() for v in values]
    if not tensors:
        raise ValueError("no calibration values")
    amax = 0.0
    for tensor in tensors:
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError("NaN or infinite activations")
        amax = max(amax, float(tensor.abs().max())) if tensor.numel() else amax
    amax = reduce_max(amax)
    if amax == 0.0:
        return torch.tensor(1.0 / ACT_QMAX)
    if method == "percentile":
        bins = 4096
        histogram = torch.zeros(bins, dtype=torch.float64)
        for tensor in tensors:
            histogram += torch.histc(tensor.abs().float().flatten(), bins=bins, min=0.0, max=amax).double().cpu()
        histogram = reduce_sum(histogram)
        cumulative = histogram.cumsum(0) / histogram.sum()
        index = int(torch.searchsorted(cumulative, torch.tensor(percentile / 100.0, dtype=torch.float64)))
        amax = min(amax, (index + 1) * amax / bins)
    elif method != "max":
        raise ValueError(f"unknown activation calibration {method!r}; accepted: {', '.join(ACTIVATION_METHODS)}")
    return torch.tensor(max(amax, _TINY) / ACT_QMAX, dtype=torch.float32)


def fake_quantize_activation(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """What a quantizer node of the graph computes (the graph calls the torch op directly, so files stay safe to
    load): ``clamp(round(x / s), -128, 127) * s``."""
    return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, ACT_QMIN, ACT_QMAX)
