"""``nn.ConvTranspose1d/2d/3d`` and their functional calls: weight (C_in, C_out/g, k...), N:M along C_in (axis 0).

A transposed conv is a stride-1 conv of its input with zeros inserted between samples (``stride − 1`` per gap),
padded by ``dilation·(k − 1) − padding`` on each side (plus ``output_padding`` after), with the kernel flipped and
its channel axes swapped per group. Each output therefore sums over C_in at every kernel position: that is the
reduction axis the N:M groups run along (:mod:`sgfx.layout`). sgfx builds the Hessian from that equivalent conv's
patches and solves on its kernel, so every rule of :class:`ConvLayer` (solve layout, patches, weight gradient)
applies unchanged; the live weight is converted on the way in and out.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import PrunableLayer, register
from .conv import _ATEN_CONVOLUTION_ARGS, ConvLayer, as_tuple, geometry_from_call, is_plain_conv, pad_order

__all__ = ["ConvTransposeLayer"]

_TRANSPOSE_FNS = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_TRANSPOSE_ARGS = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")


@register
class ConvTransposeLayer(ConvLayer):
    """A transposed convolution, pruned as its equivalent stride-1 convolution."""

    module_types = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    functions = {
        **{fn: _TRANSPOSE_ARGS for fn in _TRANSPOSE_FNS.values()},
        **{getattr(getattr(torch.ops.aten, f"conv_transpose{d}d"), overload): _TRANSPOSE_ARGS
           for d in (1, 2, 3) for overload in getattr(torch.ops.aten, f"conv_transpose{d}d").overloads()},
        torch.ops.aten.convolution.default: _ATEN_CONVOLUTION_ARGS,
    }

    def __init__(self, name: str, weight: torch.Tensor, stride: Any = 1, padding: Any = 0, output_padding: Any = 0,
                 groups: int = 1, dilation: Any = 1, weight_name: str | None = None):
        dims = weight.dim() - 2
        self.transpose_stride, self.transpose_dilation = as_tuple(stride, dims), as_tuple(dilation, dims)
        self.transpose_padding, self.output_padding = as_tuple(padding, dims), as_tuple(output_padding, dims)
        before = [d * (k - 1) - p for d, k, p in zip(self.transpose_dilation, weight.shape[2:], self.transpose_padding)]
        after = [b + o for b, o in zip(before, self.output_padding)]
        PrunableLayer.__init__(self, name, f"ConvTranspose{dims}d", weight, weight_name)
        self.dims = dims
        # the equivalent conv: stride 1, the same dilation, padded by d·(k − 1) − p (+ output_padding after)
        self.stride, self.dilation, self.groups = (1,) * dims, self.transpose_dilation, int(groups)
        self.padding_mode = "zeros"
        self.padding = pad_order(tuple(before), tuple(after))

    @classmethod
    def accepts_module(cls, module: nn.Module) -> bool:
        return is_plain_conv(module) and module.padding_mode == "zeros"

    @classmethod
    def build_from_module(cls, name: str, module: nn.Module) -> "ConvTransposeLayer":
        return cls(name, module.weight, module.stride, module.padding, module.output_padding, module.groups,
                   module.dilation, weight_name=f"{name}.weight")

    @classmethod
    def from_call(cls, name: str, weight: torch.Tensor, bound: dict[str, Any],
                  target: Any) -> "ConvTransposeLayer | None":
        args = geometry_from_call(bound, target)
        if args is None or weight.dim() not in (3, 4, 5) or isinstance(args["padding"], str):
            return None
        if target is torch.ops.aten.convolution.default and not args["transposed"]:
            return None
        return cls(name, weight, args["stride"], args["padding"], args["output_padding"], args["groups"],
                   args["dilation"])

    # ----------------------------------------------------------------------------------------- layout
    @property
    def in_per_group(self) -> int:
        return self.weight.shape[0] // self.groups

    def kernel_weight(self) -> torch.Tensor:
        """(C_in, C_out/g, k...) -> the equivalent conv kernel (C_out, C_in/g, k...), flipped in space."""
        g, w = self.groups, self.weight
        swapped = w.reshape(g, w.shape[0] // g, *w.shape[1:]).transpose(1, 2)  # (g, C_out/g, C_in/g, k...)
        return swapped.reshape(-1, *swapped.shape[2:]).flip(list(range(2, w.dim())))

    def store_kernel_weight(self, kernel: torch.Tensor) -> None:
        g = self.groups
        unflipped = kernel.flip(list(range(2, kernel.dim())))
        grouped = unflipped.reshape(g, unflipped.shape[0] // g, *unflipped.shape[1:]).transpose(1, 2)
        with torch.no_grad():
            self.weight.copy_(grouped.reshape(self.weight.shape).to(self.weight.device, self.weight.dtype))

    def scale_output_channels_(self, scale: torch.Tensor) -> None:
        g, w = self.groups, self.weight
        view = w.view(g, w.shape[0] // g, w.shape[1], *w.shape[2:])  # (g, C_in/g, C_out/g, k...)
        with torch.no_grad():
            view.mul_(scale.to(w.dtype).view(g, 1, w.shape[1], *[1] * (w.dim() - 2)))

    # ---------------------------------------------------------------------------------------- inputs
    def kernel_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input with ``stride − 1`` zeros inserted between samples along each spatial dim."""
        super().kernel_input(x)  # checks the shape
        if all(s == 1 for s in self.transpose_stride):
            return x
        shape = self.kernel_input_shape(x.shape)
        upsampled = x.new_zeros(shape)
        upsampled[(slice(None), slice(None), *[slice(None, None, s) for s in self.transpose_stride])] = x
        return upsampled

    def kernel_input_shape(self, shape: torch.Size) -> tuple[int, ...]:
        return (*shape[:2], *[(n - 1) * s + 1 for n, s in zip(shape[2:], self.transpose_stride)])

    def forward_with(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return _TRANSPOSE_FNS[self.dims](x, weight, None, self.transpose_stride, self.transpose_padding,
                                         self.output_padding, self.groups, self.transpose_dilation)
