"""Prunable layers as the solver sees them: weight layout, eligibility, and streaming Hessians.

A :class:`PrunableLayer` wraps one Conv2d or Linear weight found in the graph (an ``nn.Conv2d``/``nn.Linear``
call_module, or a functional ``F.conv2d``/``F.linear`` whose weight comes from ``get_attr``). It converts between
the PyTorch weight layout and the solve layout and accumulates the layer Hessian from calibration inputs.

Solve layout. Linear: (out, in), groups along ``in_features``. Conv2d with ``g`` groups: one matrix per group,
(C_out/g, kh·kw·C_in/g) with columns ordered (kh, kw, C_in) so that every M consecutive columns are M input
channels at one kernel position (the layout NVIDIA's sparse tensor cores and TensorRT require).

Hessian. ``H = 2/n Σ x xᵀ`` over the n input vectors the layer multiplies (rows of a Linear input, unfolded
patches of a conv input). Each chunk's product runs in float32 (BLAS block sums keep its relative error near
1e-6, far below the 1 % damping added later) and chunks accumulate in float64 so that many batches do not
drift. Conv inputs are unfolded a few images at a time, so no layer ever holds the unfolded inputs of the whole
calibration set. Patches are cut straight into solve order (see ``PrunableLayer.patches``). Stride-1 convs on
feature maps large against their kernel skip the unfolding: their Gram blocks come from shifted correlations of
the input (:mod:`sgfx.conv_gram`), whichever of the two routes needs fewer multiply-adds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .config import NMPattern, Pattern
from .conv_gram import ConvGeometry, assemble, correlate, gram_flops, plan_blocks

__all__ = ["PrunableLayer", "HessianAccumulator", "conv_column_permutation", "fetch_tensor"]

# Unfolded elements per chunk (~64 MB in float32): bounds the transient memory of one Hessian update.
_CHUNK_ELEMENTS = 1 << 24
# Hessian products are split into about _TILES column tiles (at least _MIN_TILE wide) so that only the upper
# triangle of tiles is computed.
_TILES = 6
_MIN_TILE = 128
# Wider Hessians (VGG's 25088-wide classifier) accumulate in float32: 2.5 GB instead of 5 GB.
_FLOAT64_MAX_COLUMNS = 16384
# Shifted correlations run a few GEMMs per channel group: not worth it for (near-)depthwise convs.
_MIN_SHIFT_CHANNELS = 8


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def fetch_tensor(root: nn.Module, target: str) -> torch.Tensor | None:
    """The tensor at dotted path ``target`` under ``root`` (a parameter, buffer or plain attribute), or None."""
    value = root
    for atom in target.split("."):
        value = getattr(value, atom, None)
    return value if isinstance(value, torch.Tensor) else None


def conv_column_permutation(in_per_group: int, kernel_size: tuple[int, int]) -> torch.Tensor:
    """Index ``perm`` with ``solve_col[j] = unfold_col[perm[j]]`` for one conv group.

    ``F.unfold`` orders a patch's features (C_in, kh, kw); the solve layout orders them (kh, kw, C_in).
    """
    positions = kernel_size[0] * kernel_size[1]
    channel = torch.arange(in_per_group).repeat(positions)  # (K·C,) channel of each solve column
    position = torch.arange(positions).repeat_interleave(in_per_group)  # (K·C,) kernel position
    return channel * positions + position


@dataclass
class PrunableLayer:
    """One weight the solver can prune, with the convolution arguments needed to rebuild its inputs."""

    name: str
    op: str  # "Conv2d" or "Linear"
    weight: torch.Tensor  # the live parameter (written back in place)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)  # (left, right, top, bottom), as F.pad takes it
    padding_mode: str = "zeros"
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    weight_name: str = ""  # qualified name of the weight tensor in the GraphModule
    _perm: torch.Tensor | None = field(default=None, repr=False)

    @classmethod
    def from_conv_args(
        cls, name: str, weight: torch.Tensor, stride, padding, dilation, groups: int, padding_mode: str = "zeros",
        weight_name: str | None = None,
    ) -> "PrunableLayer":
        stride, dilation = _pair(stride), _pair(dilation)
        kernel = tuple(weight.shape[2:])
        if isinstance(padding, str):
            if padding == "valid":
                pads = (0, 0, 0, 0)
            elif padding == "same":  # as nn.Conv2d: the extra pixel of an even total goes right/bottom
                total = [d * (k - 1) for d, k in zip(dilation, kernel)]
                pads = (total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2)
            else:
                raise ValueError(f"unsupported conv padding {padding!r}")
        else:
            ph, pw = _pair(padding)
            pads = (pw, pw, ph, ph)
        return cls(name, "Conv2d", weight, stride, pads, padding_mode, dilation, int(groups), weight_name or name)

    @classmethod
    def from_module(cls, name: str, module: nn.Module) -> "PrunableLayer":
        if isinstance(module, nn.Linear):
            return cls(name, "Linear", module.weight, weight_name=f"{name}.weight")
        if isinstance(module, nn.Conv2d):
            return cls.from_conv_args(
                name, module.weight, module.stride, module.padding, module.dilation, module.groups,
                module.padding_mode, weight_name=f"{name}.weight",
            )
        raise TypeError(f"{name}: {type(module).__name__} is not prunable (Conv2d or Linear)")

    # ----------------------------------------------------------------------------------------- layout
    @property
    def kernel_size(self) -> tuple[int, int]:
        return tuple(self.weight.shape[2:]) if self.op == "Conv2d" else (1, 1)

    @property
    def in_per_group(self) -> int:
        """Input channels (or features) per group: the axis N:M groups run along."""
        return self.weight.shape[1]

    @property
    def num_groups(self) -> int:
        return self.groups if self.op == "Conv2d" else 1

    @property
    def columns(self) -> int:
        return self.in_per_group * self.kernel_size[0] * self.kernel_size[1]

    def ineligibility(self, pattern: Pattern) -> str | None:
        """Why this layer cannot take ``pattern``, or None if it can."""
        if isinstance(pattern, NMPattern) and self.in_per_group % pattern.m:
            axis = "input channels per group" if self.op == "Conv2d" else "in_features"
            return f"{axis} ({self.in_per_group}) not divisible by M={pattern.m}"
        return None

    def _permutation(self) -> torch.Tensor | None:
        if self.op != "Conv2d" or self.kernel_size == (1, 1):
            return None
        if self._perm is None:
            self._perm = conv_column_permutation(self.in_per_group, self.kernel_size)
        return self._perm

    def solve_matrices(self) -> list[torch.Tensor]:
        """The weight as one (rows, columns) matrix per group, in solve column order (views or copies)."""
        rows_total = self.weight.shape[0]
        flat = self.weight.detach().reshape(rows_total, -1)  # (C_out, C·kh·kw) in unfold order
        perm = self._permutation()
        if perm is not None:
            flat = flat[:, perm.to(flat.device)]
        rows = rows_total // self.num_groups
        return [flat[g * rows:(g + 1) * rows] for g in range(self.num_groups)]

    def write_back(self, matrices: list[torch.Tensor]) -> None:
        """Store solve-layout matrices (one per group) into the live weight, in its own dtype."""
        solved = torch.cat(matrices, dim=0)  # (C_out, columns) in solve order
        perm = self._permutation()
        if perm is not None:
            unfolded = torch.empty_like(solved)
            unfolded[:, perm.to(solved.device)] = solved
            solved = unfolded
        with torch.no_grad():
            self.weight.copy_(solved.reshape(self.weight.shape).to(self.weight.device, self.weight.dtype))

    # ---------------------------------------------------------------------------------------- inputs
    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        if not any(self.padding):
            return x
        mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
        return F.pad(x, self.padding, mode=mode)

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """Conv input (B, C, H, W) -> (groups, B·H'·W', kh·kw·C/groups): every input vector the conv multiplies,
        columns already in solve order (kh, kw, C_in), honouring stride, padding (mode), dilation and groups.

        Built from a channels-last copy with one strided view, so the im2col matrix is written once.
        """
        x = self._pad(x).permute(0, 2, 3, 1).contiguous()  # (B, Hp, Wp, C)
        batch, height, width, channels = x.shape
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        out_h, out_w = self._output_size(height, width)
        sb, sy, sx, sc = x.stride()
        groups = self.num_groups
        view = x.as_strided(  # (G, B, H', W', kh, kw, C/G)
            (groups, batch, out_h, out_w, kh, kw, channels // groups),
            (sc * (channels // groups), sb, sy * sh, sx * sw, sy * dh, sx * dw, sc),
        )
        return view.reshape(groups, batch * out_h * out_w, kh * kw * (channels // groups))

    def patch_geometry(self, height: int, width: int) -> ConvGeometry | None:
        """The geometry for shift-correlation Gram matrices of an (H, W) input, or None when they do not apply
        (Linear, strided, non-zero padding mode, or 1x1 kernels, whose unfolding is a plain reshape)."""
        if self.op != "Conv2d" or self.stride != (1, 1) or self.padding_mode != "zeros" or self.kernel_size == (1, 1):
            return None
        return ConvGeometry(self.kernel_size, self.dilation, self.padding, height, width)

    def _output_size(self, padded_height: int, padded_width: int) -> tuple[int, int]:
        """The conv's output height and width for an already padded input."""
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        return (padded_height - dh * (kh - 1) - 1) // sh + 1, (padded_width - dw * (kw - 1) - 1) // sw + 1

    def input_vectors(self, x: torch.Tensor) -> int:
        """How many input vectors (Hessian samples) one batch ``x`` of this layer's input holds."""
        if self.op == "Linear":
            return x.numel() // x.shape[-1]
        left, right, top, bottom = self.padding
        out_h, out_w = self._output_size(x.shape[-2] + top + bottom, x.shape[-1] + left + right)
        return x.shape[0] * out_h * out_w

    def hessian_accumulator(self, device: torch.device | None = None,
                            diagonal_only: bool = False) -> "HessianAccumulator":
        return HessianAccumulator(self, device, diagonal_only)

    def output_input_product(self, x: torch.Tensor, grad: torch.Tensor) -> list[torch.Tensor]:
        """``Σ g pᵀ`` over the input vectors p of ``x`` and the matching output vectors g of ``grad`` (shaped like the
        layer's output): the layer's weight gradient, one (rows/groups, cols) matrix per group in solve order.

        For a conv it is PyTorch's conv weight-gradient kernel (no unfolding); for a Linear one GEMM.
        """
        if self.op == "Linear":
            return [grad.reshape(-1, grad.shape[-1]).T @ x.reshape(-1, x.shape[-1])]
        product = torch.nn.grad.conv2d_weight(self._pad(x), self.weight.shape, grad, self.stride, 0, self.dilation,
                                              self.groups)  # (C_out, C/groups, kh, kw)
        flat = product.reshape(product.shape[0], -1)
        perm = self._permutation()
        if perm is not None:
            flat = flat[:, perm.to(flat.device)]
        rows = flat.shape[0] // self.num_groups
        return [flat[g * rows:(g + 1) * rows] for g in range(self.num_groups)]

    def forward_with(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The layer's linear map (no bias) with another weight: used to measure reconstruction error."""
        if self.op == "Linear":
            return F.linear(x, weight)
        return F.conv2d(self._pad(x), weight, None, self.stride, 0, self.dilation, self.groups)


def _upper_tiles(cols: int) -> list[tuple[int, int]]:
    """(start, width) of the column tiles whose products on and right of the diagonal make up XᵀX's upper part."""
    tile = max(_MIN_TILE, -(-cols // (_TILES * 64)) * 64)
    return [(i, min(tile, cols - i)) for i in range(0, cols, tile)]


def _tile_flops(n: int, cols: int) -> int:
    """FLOPs of the tiled upper product of n input vectors of width cols."""
    return sum(2 * n * tile * (cols - i) for i, tile in _upper_tiles(cols))


class HessianAccumulator:
    """Streams calibration inputs of one layer into ``H = 2/n Σ x xᵀ`` (one Hessian per conv group)."""

    def __init__(self, layer: PrunableLayer, device: torch.device | None = None, diagonal_only: bool = False):
        self.layer = layer
        self.device = device
        self.diagonal_only = diagonal_only  # only diag(H) = 2/n Σ x_j² (what Wanda needs)
        self.dtype = torch.float64 if layer.columns <= _FLOAT64_MAX_COLUMNS else torch.float32
        self.sums: torch.Tensor | None = None  # (groups, cols, cols) in solve order, allocated lazily
        self.samples = 0
        self.flops = 0  # multiply-add FLOPs of the Gram products so far (2 per MAC)
        self._routes: dict[tuple[int, ...], tuple] = {}  # per-image input shape -> (geometry, blocks) or None
        # shifted route: per per-image input shape, the running sums of its pieces, assembled at finalize
        self._pieces: dict[tuple[int, ...], tuple[dict, dict]] = {}
        self._pending_rows: list[torch.Tensor] = []  # unfolded route: chunks waiting for one product

    def _buffer_rows(self, rows: torch.Tensor) -> None:
        """Collect small chunks (a Linear layer sees one vector per image) into products of about
        ``_CHUNK_ELEMENTS`` inputs: one pass over a wide Hessian per chunk, not per calibration batch."""
        self.samples += rows.shape[1]
        if 2 * rows.numel() >= _CHUNK_ELEMENTS:  # big enough on its own (unfolded conv inputs): no concatenation
            self._add_rows(rows)
            return
        self._pending_rows.append(rows)
        if sum(r.numel() for r in self._pending_rows) >= _CHUNK_ELEMENTS:
            self._flush_rows()

    def _flush_rows(self) -> None:
        if self._pending_rows:
            rows = torch.cat(self._pending_rows, dim=1) if len(self._pending_rows) > 1 else self._pending_rows[0]
            self._pending_rows.clear()
            self._add_rows(rows)

    def _add_rows(self, rows: torch.Tensor) -> None:
        """rows: (groups, n, cols) float32 input vectors. Only tiles on or above the diagonal are computed
        (XᵀX is symmetric): about 60 % of the full product's flops; ``finalize`` mirrors them."""
        groups, n, cols = rows.shape
        if self.diagonal_only:
            if self.sums is None:
                self.sums = torch.zeros(groups, cols, dtype=torch.float64, device=rows.device)
            self.sums += rows.square().sum(dim=1, dtype=torch.float64)
            return
        if self.sums is None:
            self.sums = torch.zeros(groups, cols, cols, dtype=self.dtype, device=rows.device)
        for i, tile in _upper_tiles(cols):
            left = rows[:, :, i:i + tile].transpose(1, 2)  # (groups, t, n)
            if self.sums.dtype == rows.dtype:  # accumulate in place: no (t, cols) temporary
                self.sums[:, i:i + tile, i:].baddbmm_(left, rows[:, :, i:])
            else:
                self.sums[:, i:i + tile, i:] += torch.bmm(left, rows[:, :, i:]).to(self.dtype)  # (groups, t, cols-i)
        self.flops += _tile_flops(n, cols) * groups

    def _rows(self, x: torch.Tensor):
        """Yield the input vectors of one batch as (groups, n, cols) float32 chunks, on the accumulator's device."""
        for rows in self._host_rows(x):
            yield rows if self.device is None else rows.to(self.device)

    def _check_conv_input(self, x: torch.Tensor) -> None:
        channels = self.layer.in_per_group * self.layer.num_groups
        if x.dim() != 4 or x.shape[1] != channels:
            raise ValueError(
                f"{self.layer.name}: Conv2d expects a (B, {channels}, H, W) input, got shape {tuple(x.shape)}"
            )

    def _host_rows(self, x: torch.Tensor):
        layer = self.layer
        x = x.detach().float()
        if layer.op == "Linear":
            if x.shape[-1] != layer.columns:
                raise ValueError(f"{layer.name}: input last dim {x.shape[-1]} != in_features {layer.columns}")
            flat = x.reshape(-1, layer.columns)
            step = max(1, _CHUNK_ELEMENTS // layer.columns)
            for start in range(0, flat.shape[0], step):
                yield flat[start:start + step].unsqueeze(0)
            return
        per_image = max(1, layer.patches(x[:1]).numel())
        step = max(1, _CHUNK_ELEMENTS // per_image)
        for start in range(0, x.shape[0], step):
            yield layer.patches(x[start:start + step])  # (groups, n, cols)

    def _shift_route(self, x: torch.Tensor) -> tuple | None:
        """(geometry, blocks) when shifted correlations need fewer FLOPs than unfolding for images shaped like x's."""
        key = tuple(x.shape[1:])
        if key not in self._routes:
            self._routes[key] = None
            geometry = None
            if not self.diagonal_only and x.dim() == 4 and self.layer.in_per_group >= _MIN_SHIFT_CHANNELS:
                geometry = self.layer.patch_geometry(*x.shape[-2:])
            if geometry is not None and min(geometry.output_size) > 0:
                blocks = plan_blocks(geometry, symmetric=True)
                shifted = gram_flops(geometry, blocks, 1, self.layer.in_per_group)
                if shifted < _tile_flops(self.layer.input_vectors(x[:1]), self.layer.columns):
                    self._routes[key] = (geometry, blocks)
        return self._routes[key]

    def _add_shifted(self, x: torch.Tensor, route: tuple) -> None:
        geometry, blocks = route
        layer, groups = self.layer, self.layer.num_groups
        device = x.device if self.device is None else self.device
        sep_h, sep_w = geometry.separation
        step = max(1, _CHUNK_ELEMENTS // ((x.shape[2] + sep_h) * (x.shape[3] + sep_w) * x.shape[1]))
        for start in range(0, x.shape[0], step):
            chunk = x[start:start + step].detach().to(device, torch.float32)
            self._stash(tuple(x.shape[1:]), correlate(chunk, chunk, geometry, blocks, groups))
            self.flops += gram_flops(geometry, blocks, chunk.shape[0], layer.in_per_group) * groups
            self.samples += layer.input_vectors(chunk)

    def _stash(self, key: tuple, pieces: tuple[dict, dict]) -> None:
        """Add one chunk's correlations and strip sums to the running sums for ``key`` (in the Hessian dtype)."""
        if key not in self._pieces:
            self._pieces[key] = tuple({name: value.to(self.dtype) for name, value in part.items()} for part in pieces)
            return
        for total, part in zip(self._pieces[key], pieces):
            for name, value in part.items():
                total[name] += value

    def _assemble_pieces(self) -> None:
        """Turn the stashed pieces into the Gram blocks of ``sums``."""
        cols, groups = self.layer.columns, self.layer.num_groups
        for shape, (correlations, strip_sums) in self._pieces.items():
            if self.sums is None:
                self.sums = next(iter(correlations.values())).new_zeros(groups, cols, cols)
            assemble(self.sums, correlations, strip_sums, self._routes[shape][1])
        self._pieces.clear()

    def add(self, x: torch.Tensor) -> None:
        """Add one calibration batch of this layer's input."""
        if self.layer.op == "Conv2d":
            self._check_conv_input(x)
            route = self._shift_route(x)
            if route is not None:
                self._add_shifted(x, route)
                return
        for rows in self._rows(x):
            self._buffer_rows(rows)

    def finalize(self) -> list[torch.Tensor]:
        """One (cols, cols) Hessian per group in solve column order (or its (cols,) diagonal)."""
        self._assemble_pieces()
        self._flush_rows()
        if self.sums is None or self.samples == 0:
            raise ValueError(f"{self.layer.name}: no calibration input reached this layer")
        hessians, self.sums = self.sums, None
        if self.diagonal_only:
            return list((hessians * (2.0 / self.samples)).unbind(0))
        cols = hessians.shape[-1]
        for i in range(0, cols, _MIN_TILE):  # mirror the computed upper triangle in place, strip by strip
            hessians[:, i + _MIN_TILE:, i:i + _MIN_TILE] = hessians[:, i:i + _MIN_TILE, i + _MIN_TILE:].transpose(1, 2)
            strip = hessians[:, i:i + _MIN_TILE, i:i + _MIN_TILE]
            strip.copy_(strip.triu() + strip.triu(1).transpose(1, 2))
        hessians.mul_(2.0 / self.samples)
        return list(hessians.unbind(0))
