"""``nn.Conv1d/2d/3d`` and their functional calls: weight (C_out, C_in/g, k...), N:M along C_in.

Solve layout with ``g`` groups: one matrix per group, (C_out/g, K·C_in/g) with columns ordered (kernel position,
C_in) so that every M consecutive columns are M input channels at one kernel position (the layout NVIDIA's sparse
tensor cores and TensorRT require).

Input vectors: the patches the conv multiplies, cut straight into solve order from a channels-last copy of the
padded input with one strided view (im2col written once), honouring stride, padding (mode), dilation and groups.
Stride-1 2-D convs may skip the unfolding (:mod:`sgfx.layers.conv_gram`, chosen by the Hessian accumulator).
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .conv_gram import ConvGeometry
from .base import PrunableLayer, register

__all__ = ["ConvLayer", "is_plain_conv"]

_CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_WEIGHT_GRADS = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight, 3: torch.nn.grad.conv3d_weight}
_PLAIN_FORWARDS = {kind.forward for kind in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                                             nn.ConvTranspose3d)}
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_ATEN_CONVOLUTION_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding",
                          "groups")
_GEOMETRY = ("stride", "padding", "dilation", "groups", "output_padding")


def is_plain_conv(module: nn.Module) -> bool:
    """An ``nn.Conv1d/2d/3d`` or ``nn.ConvTranspose1d/2d/3d`` whose ``forward`` is its PyTorch class's own (a
    subclass that overrides it may pad, transform the weight or do more at run time)."""
    return isinstance(module, nn.modules.conv._ConvNd) and type(module).forward in _PLAIN_FORWARDS


def as_tuple(value: Any, dims: int) -> tuple[int, ...]:
    """An int or a sequence as a ``dims``-tuple of ints."""
    if isinstance(value, int):
        return (value,) * dims
    value = tuple(int(v) for v in value)
    return value * dims if len(value) == 1 else value


def pad_order(before: tuple[int, ...], after: tuple[int, ...]) -> tuple[int, ...]:
    """Per-dim (before, after) padding in ``F.pad`` order: last spatial dim first."""
    return tuple(v for b, a in zip(reversed(before), reversed(after)) for v in (b, a))


def geometry_from_call(bound: dict[str, Any], target: Any) -> dict[str, Any] | None:
    """stride/padding/dilation/groups (and transposed/output_padding) of a functional conv call, or None when one
    of them is computed at run time."""
    args = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1, "transposed": False, "output_padding": 0}
    args.update({k: v for k, v in bound.items() if k in args})
    if any(isinstance(args[k], torch.fx.Node) for k in (*_GEOMETRY, "transposed")):
        return None
    return args


@register
class ConvLayer(PrunableLayer):
    """A convolution with 1, 2 or 3 spatial dims."""

    module_types = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    functions = {
        **{fn: _CONV_ARGS for fn in _CONV_FNS.values()},
        **{getattr(torch.ops.aten, f"conv{d}d").default: _CONV_ARGS for d in (1, 2, 3)},
        **{getattr(torch.ops.aten, f"conv{d}d").padding: _CONV_ARGS for d in (1, 2, 3)},
        torch.ops.aten.convolution.default: _ATEN_CONVOLUTION_ARGS,
    }

    def __init__(self, name: str, weight: torch.Tensor, stride: Any = 1, padding: Any = 0, dilation: Any = 1,
                 groups: int = 1, padding_mode: str = "zeros", weight_name: str | None = None, op: str | None = None):
        dims = weight.dim() - 2
        super().__init__(name, op or f"Conv{dims}d", weight, weight_name)
        self.dims = dims
        self.set_geometry(stride, padding, dilation, groups, padding_mode)

    def set_geometry(self, stride: Any, padding: Any, dilation: Any, groups: int, padding_mode: str = "zeros") -> None:
        dims, kernel = self.dims, self.kernel_size
        self.stride, self.dilation = as_tuple(stride, dims), as_tuple(dilation, dims)
        self.groups, self.padding_mode = int(groups), padding_mode
        if isinstance(padding, str):
            if padding == "valid":
                total = [0] * dims
            elif padding == "same":  # as nn.Conv: the extra pixel of an even total goes after
                total = [d * (k - 1) for d, k in zip(self.dilation, kernel)]
            else:
                raise ValueError(f"unsupported conv padding {padding!r}")
            self.padding = pad_order(tuple(t // 2 for t in total), tuple(t - t // 2 for t in total))
        else:
            pads = as_tuple(padding, dims)
            self.padding = pad_order(pads, pads)

    @classmethod
    def accepts_module(cls, module: nn.Module) -> bool:
        return is_plain_conv(module)

    @classmethod
    def build_from_module(cls, name: str, module: nn.Module) -> "ConvLayer":
        return cls(name, module.weight, module.stride, module.padding, module.dilation, module.groups,
                   module.padding_mode, weight_name=f"{name}.weight")

    @classmethod
    def from_call(cls, name: str, weight: torch.Tensor, bound: dict[str, Any], target: Any) -> "ConvLayer | None":
        args = geometry_from_call(bound, target)
        if args is None or args["transposed"] or weight.dim() not in (3, 4, 5):
            return None
        return cls(name, weight, args["stride"], args["padding"], args["dilation"], args["groups"])

    # ----------------------------------------------------------------------------------------- layout
    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    @property
    def num_groups(self) -> int:
        return self.groups

    @property
    def in_per_group(self) -> int:
        return self.kernel_weight().shape[1]

    @property
    def columns(self) -> int:
        return self.in_per_group * math.prod(self.kernel_size)

    def kernel_weight(self) -> torch.Tensor:
        """The weight as the conv kernel (C_out, C_in/g, k...) that multiplies ``kernel_input``'s patches."""
        return self.weight

    def store_kernel_weight(self, kernel: torch.Tensor) -> None:
        with torch.no_grad():
            self.weight.copy_(kernel.reshape(self.weight.shape).to(self.weight.device, self.weight.dtype))

    def to_solve(self, kernel: torch.Tensor) -> list[torch.Tensor]:
        """(C_out, C/g, k...) -> per group (C_out/g, K·C/g) with columns (kernel position, channel)."""
        g = self.groups
        grouped = kernel.reshape(g, kernel.shape[0] // g, *kernel.shape[1:])  # (g, R, C/g, k...)
        return list(grouped.movedim(2, -1).reshape(g, grouped.shape[1], -1).unbind(0))

    def from_solve(self, matrices: list[torch.Tensor]) -> torch.Tensor:
        solved = torch.stack(matrices)  # (g, R, K·C/g)
        g, rows = solved.shape[:2]
        kernel = solved.reshape(g, rows, *self.kernel_size, -1).movedim(-1, 2)  # (g, R, C/g, k...)
        return kernel.reshape(g * rows, *kernel.shape[2:])

    def solve_matrices(self) -> list[torch.Tensor]:
        return self.to_solve(self.kernel_weight().detach())

    def write_back(self, matrices: list[torch.Tensor]) -> None:
        self.store_kernel_weight(self.from_solve(matrices))

    # ---------------------------------------------------------------------------------------- inputs
    def kernel_input(self, x: torch.Tensor) -> torch.Tensor:
        channels = self.in_per_group * self.groups
        if x.dim() != self.dims + 2 or x.shape[1] != channels:
            spatial = ", ".join("DHW"[3 - self.dims:])
            raise ValueError(f"{self.name}: {self.op} expects a (B, {channels}, {spatial}) input, "
                             f"got shape {tuple(x.shape)}")
        return x

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        if not any(self.padding):
            return x
        mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
        return F.pad(x, self.padding, mode=mode)

    def _output_size(self, padded: tuple[int, ...]) -> tuple[int, ...]:
        return tuple((s - d * (k - 1) - 1) // st + 1
                     for s, k, st, d in zip(padded, self.kernel_size, self.stride, self.dilation))

    def _padded_size(self, spatial: tuple[int, ...]) -> tuple[int, ...]:
        pads = self.padding[::-1]  # (after_first, before_first, ...) reversed F.pad order
        return tuple(s + pads[2 * i] + pads[2 * i + 1] for i, s in enumerate(spatial))

    def patches(self, kernel_x: torch.Tensor) -> torch.Tensor:
        """Kernel input (B, C, S...) -> (groups, B·prod(S'), K·C/groups): every input vector the conv multiplies,
        columns already in solve order (k..., C_in)."""
        x = self._pad(kernel_x).movedim(1, -1).contiguous()  # (B, S..., C)
        batch, spatial, channels = x.shape[0], tuple(x.shape[1:-1]), x.shape[-1]
        out = self._output_size(spatial)
        strides = x.stride()
        sb, ss, sc = strides[0], strides[1:-1], strides[-1]
        per_group = channels // self.groups
        view = x.as_strided(  # (G, B, S'..., k..., C/G)
            (self.groups, batch, *out, *self.kernel_size, per_group),
            (sc * per_group, sb, *[s * st for s, st in zip(ss, self.stride)],
             *[s * d for s, d in zip(ss, self.dilation)], sc),
        )
        return view.reshape(self.groups, batch * math.prod(out), math.prod(self.kernel_size) * per_group)

    def rows(self, kernel_x: torch.Tensor, chunk_elements: int) -> Iterator[torch.Tensor]:
        kernel_x = kernel_x.detach().float()
        per_image = max(1, self.patches(kernel_x[:1]).numel())
        step = max(1, chunk_elements // per_image)
        for start in range(0, kernel_x.shape[0], step):
            yield self.patches(kernel_x[start:start + step])  # (groups, n, cols)

    def shift_geometry(self, kernel_x: torch.Tensor) -> ConvGeometry | None:
        if (self.dims != 2 or self.stride != (1, 1) or self.padding_mode != "zeros" or self.kernel_size == (1, 1)
                or min(self.padding) < 0):
            return None
        return ConvGeometry(self.kernel_size, self.dilation, self.padding, *kernel_x.shape[-2:])

    def forward_with(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return _CONV_FNS[self.dims](self._pad(self.kernel_input(x)), weight, None, self.stride, 0, self.dilation,
                                    self.groups)

    def output_input_product(self, x: torch.Tensor, grad: torch.Tensor) -> list[torch.Tensor]:
        kernel_x = self._pad(self.kernel_input(x))
        product = _WEIGHT_GRADS[self.dims](kernel_x, self.kernel_weight().shape, grad, self.stride, 0,
                                           self.dilation, self.groups)  # (C_out, C/g, k...)
        return self.to_solve(product)
