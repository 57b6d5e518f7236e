"""Streaming layer Hessians ``H = 2/n Σ x xᵀ`` over the n input vectors a layer multiplies (any kind).

Each chunk's product runs in float32 (BLAS block sums keep its relative error near 1e-6, far below the 1 % damping
added later) and chunks accumulate in float64 so that many batches do not drift. Inputs are cut into vectors a few
images at a time by the layer kind (:meth:`PrunableLayer.rows`), so no layer ever holds the unfolded inputs of the
whole calibration set. Stride-1 2-D convs on feature maps large against their kernel skip the unfolding: their Gram
blocks come from shifted correlations of the input (:mod:`sgfx.layers.conv_gram`), whichever of the two routes needs
fewer multiply-adds.
"""

from __future__ import annotations

import torch

from ..runtime import distributed
from .conv_gram import assemble, correlate, gram_flops, plan_blocks
from .base import PrunableLayer

__all__ = ["HessianAccumulator"]

# Input elements per chunk (~64 MB in float32): bounds the transient memory of one Hessian update.
_CHUNK_ELEMENTS = 1 << 24
# Hessian products are split into about _TILES column tiles (at least _MIN_TILE wide) so that only the upper
# triangle of tiles is computed.
_TILES = 6
_MIN_TILE = 128
# Wider Hessians (VGG's 25088-wide classifier) accumulate in float32: 2.5 GB instead of 5 GB.
_FLOAT64_MAX_COLUMNS = 16384
# Shifted correlations run a few GEMMs per channel group: not worth it for (near-)depthwise convs.
_MIN_SHIFT_CHANNELS = 8


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

    def _rows(self, kernel_x: torch.Tensor):
        """Yield the input vectors of one kernel input as (groups, n, cols) float32 chunks, on the accumulator's
        device."""
        for rows in self.layer.rows(kernel_x, _CHUNK_ELEMENTS):
            yield rows if self.device is None else rows.to(self.device)

    def _shift_route(self, x: torch.Tensor) -> tuple | None:
        """(geometry, blocks) when shifted correlations need fewer FLOPs than unfolding for images shaped like x's."""
        key = tuple(x.shape[1:])
        if key not in self._routes:
            self._routes[key] = None
            geometry = None
            if not self.diagonal_only and self.layer.in_per_group >= _MIN_SHIFT_CHANNELS:
                geometry = self.layer.shift_geometry(x)
            if geometry is not None and min(geometry.output_size) > 0:
                blocks = plan_blocks(geometry, symmetric=True)
                shifted = gram_flops(geometry, blocks, 1, self.layer.in_per_group)
                vectors = geometry.output_size[0] * geometry.output_size[1]  # per image
                if shifted < _tile_flops(vectors, self.layer.columns):
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
            self.samples += chunk.shape[0] * geometry.output_size[0] * geometry.output_size[1]

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
        """Add one calibration batch of this layer's (node) input."""
        kernel_x = self.layer.kernel_input(x)
        route = self._shift_route(kernel_x)
        if route is not None:
            self._add_shifted(kernel_x, route)
            return
        for rows in self._rows(kernel_x):
            self._buffer_rows(rows)

    def _reduce(self) -> None:
        """Add up the sums and counts of every rank (:mod:`sgfx.runtime.distributed`; nothing for one process)."""
        if not distributed.is_active():
            return
        if self.sums is None:  # this rank's shard never reached the layer: contribute zeros
            groups, cols = self.layer.num_groups, self.layer.columns
            shape = (groups, cols) if self.diagonal_only else (groups, cols, cols)
            dtype = torch.float64 if self.diagonal_only else self.dtype
            self.sums = torch.zeros(shape, dtype=dtype, device=self.device)
        distributed.all_reduce_sum(self.sums)
        self.samples = distributed.all_reduce_count(self.samples)

    def finalize(self) -> list[torch.Tensor]:
        """One (cols, cols) Hessian per group in solve column order (or its (cols,) diagonal), over the inputs of
        every rank when calibrating across processes."""
        self._assemble_pieces()
        self._flush_rows()
        self._reduce()
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
