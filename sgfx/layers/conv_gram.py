"""Gram matrices of stride-1 convolution patches without unfolding the input.

For a stride-1 conv the entry of output pixel (i, j)'s patch at kernel position k = (a, b) is the input pixel
(i + a·dh − top, j + b·dw − left), or a padding zero. So the Gram block of two kernel positions k, k' is a sum
of ``x[:, y, x] · x'[:, y + du, x + dv]ᵀ`` over a rectangle of input pixels, where (du, dv) is the offset between
k and k' and the rectangle is cut where padding enters the patch.

Every block with the same offset shares one correlation over *all* valid pixel pairs, computed as a single GEMM
of two shifted views of a channels-last copy of the input in which each row and each image is followed by enough
zeros that a shift never pairs pixels across a row or image border. Each block then subtracts the thin strips of
border pixels its own rectangle leaves out. The result equals the im2col product exactly (up to float32 summation
order) for about ``|offsets|`` instead of ``(K·C)²/C²`` multiply-adds per pixel and channel pair: 13 instead of
~41 (the upper triangle) for a 3×3 Hessian, with no im2col copy. It pays off when the feature map is large against
the kernel; :func:`gram_flops` lets the caller compare. sgfx builds its conv Hessians this way (``symmetric=True``);
the general two-input form is kept for cross-products of different inputs. Its speed against the unfolded
product: docs/RESULTS.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ConvGeometry", "GramBlock", "plan_blocks", "gram_flops", "correlate", "assemble"]


@dataclass(frozen=True)
class ConvGeometry:
    """What the patches of a stride-1, zero-padded conv depend on."""

    kernel: tuple[int, int]  # (kh, kw)
    dilation: tuple[int, int]  # (dh, dw)
    padding: tuple[int, int, int, int]  # (left, right, top, bottom)
    height: int  # input height H (unpadded)
    width: int  # input width W (unpadded)

    @property
    def output_size(self) -> tuple[int, int]:
        (kh, kw), (dh, dw) = self.kernel, self.dilation
        left, right, top, bottom = self.padding
        return self.height + top + bottom - dh * (kh - 1), self.width + left + right - dw * (kw - 1)

    @property
    def separation(self) -> tuple[int, int]:
        """Zero rows after each image and zero columns after each row that keep every shift inside one row."""
        return self.dilation[0] * (self.kernel[0] - 1), self.dilation[1] * (self.kernel[1] - 1)


@dataclass(frozen=True)
class GramBlock:
    """Block (first, second) of the Gram matrix: the correlation at ``offset`` minus border ``strips``.

    ``strips`` are input-pixel rectangles (y0, y1, x0, x1) of the first operand whose pairs the correlation
    includes but the block does not.
    """

    first: int  # kernel position index a·kw + b of the rows
    second: int  # kernel position index of the columns
    offset: tuple[int, int]  # (du, dv) in input pixels
    strips: tuple[tuple[int, int, int, int], ...]


def _paired(size: int, shift: int) -> tuple[int, int]:
    """The range of input rows (or columns) y whose partner y + shift also lies in the image."""
    return max(0, -shift), min(size, size - shift)


def _window(start: int, length: int, size: int, shift: int) -> tuple[int, int]:
    """The part of [start, start + length) inside ``_paired(size, shift)``; empty ranges start at its end."""
    lo, hi = _paired(size, shift)
    first = min(max(start, lo), hi)
    return first, max(first, min(start + length, hi))


def plan_blocks(geometry: ConvGeometry, symmetric: bool) -> list[GramBlock]:
    """The blocks to compute: those on or above the diagonal if ``symmetric``, else all K² of them."""
    (kh, kw), (dh, dw) = geometry.kernel, geometry.dilation
    left, _, top, _ = geometry.padding
    out_h, out_w = geometry.output_size
    positions = [(a, b) for a in range(kh) for b in range(kw)]
    blocks = []
    for first, (a, b) in enumerate(positions):
        for second, (a2, b2) in enumerate(positions):
            if symmetric and second < first:
                continue
            du, dv = (a2 - a) * dh, (b2 - b) * dw
            rows, all_rows = _window(a * dh - top, out_h, geometry.height, du), _paired(geometry.height, du)
            cols, all_cols = _window(b * dw - left, out_w, geometry.width, dv), _paired(geometry.width, dv)
            strips = [(all_rows[0], rows[0], *all_cols), (rows[1], all_rows[1], *all_cols),
                      (*rows, all_cols[0], cols[0]), (*rows, cols[1], all_cols[1])]
            strips = tuple(s for s in strips if s[1] > s[0] and s[3] > s[2])
            blocks.append(GramBlock(first, second, (du, dv), strips))
    return blocks


def gram_flops(geometry: ConvGeometry, blocks: list[GramBlock], batch: int, channels: int) -> int:
    """Multiply-add FLOPs (2 per MAC) that :func:`correlate` spends on one batch per channel group."""
    sep_h, sep_w = geometry.separation
    flat = batch * (geometry.height + sep_h) * (geometry.width + sep_w)
    offsets = {block.offset for block in blocks}
    strips = {(*strip, *block.offset) for block in blocks for strip in block.strips}  # each computed once
    strip_pixels = sum(batch * (y1 - y0) * (x1 - x0) for y0, y1, x0, x1, _, _ in strips)
    return 2 * channels * channels * (len(offsets) * flat + strip_pixels)


def _zero_separated(x: torch.Tensor, geometry: ConvGeometry) -> torch.Tensor:
    """(B, C, H, W) -> (B·(H+sh)·(W+sw), C) channels-last, each row and image followed by zeros."""
    batch, channels, height, width = x.shape
    sep_h, sep_w = geometry.separation
    buffer = x.new_zeros(batch, height + sep_h, width + sep_w, channels)
    buffer[:, :height, :width] = x.permute(0, 2, 3, 1)
    return buffer.view(-1, channels)


def correlate(first: torch.Tensor, second: torch.Tensor, geometry: ConvGeometry, blocks: list[GramBlock],
              groups: int) -> tuple[dict, dict]:
    """The pieces the listed blocks are made of, for one chunk of inputs: the correlation at each offset and the
    sum over each border strip, every one (groups, c, c) in the inputs' dtype, c = C/groups.

    Pieces are linear in the inputs, so callers may sum them over chunks and :func:`assemble` the blocks once.

    Args:
        first, second: (B, C, H, W) inputs (the same tensor for a Hessian); ``H, W`` must match ``geometry``.
        blocks: from :func:`plan_blocks`.
        groups: conv groups; group g only pairs its own channels.
    Returns:
        (correlations keyed by offset, strip sums keyed by (y0, y1, x0, x1, du, dv)).
    """
    batch, channels, height, width = first.shape
    if (height, width) != (geometry.height, geometry.width) or second.shape != first.shape:
        raise ValueError(f"inputs {tuple(first.shape)}/{tuple(second.shape)} do not match the planned geometry")
    per_group = channels // groups
    flat_a = _zero_separated(first, geometry)  # (N, C)
    flat_b = flat_a if second is first else _zero_separated(second, geometry)
    image_a, image_b = first.permute(0, 2, 3, 1), second.permute(0, 2, 3, 1)  # (B, H, W, C) views
    row_length = width + geometry.separation[1]
    total = flat_a.shape[0]
    correlations: dict[tuple[int, int], torch.Tensor] = {}
    strip_sums: dict[tuple[int, ...], torch.Tensor] = {}
    for block in blocks:
        du, dv = block.offset
        if block.offset not in correlations:
            shift = du * row_length + dv  # the partner pixel's distance in the flat buffer
            lo, hi = max(0, -shift), min(total, total - shift)
            correlations[block.offset] = torch.stack([
                flat_a[lo:hi, g * per_group:(g + 1) * per_group].T
                @ flat_b[lo + shift:hi + shift, g * per_group:(g + 1) * per_group]
                for g in range(groups)])  # (groups, c, c)
        for y0, y1, x0, x1 in block.strips:
            key = (y0, y1, x0, x1, du, dv)
            if key not in strip_sums:
                pixels_a = image_a[:, y0:y1, x0:x1].reshape(-1, groups, per_group).transpose(0, 1)  # (G, n, c)
                pixels_b = image_b[:, y0 + du:y1 + du, x0 + dv:x1 + dv].reshape(-1, groups, per_group).transpose(0, 1)
                strip_sums[key] = pixels_a.transpose(1, 2) @ pixels_b  # (groups, c, c)
    return correlations, strip_sums


def assemble(sums: torch.Tensor, correlations: dict, strip_sums: dict, blocks: list[GramBlock]) -> None:
    """Add each block, its offset's correlation minus its strips, into ``sums`` (groups, K·c, K·c) in solve layout
    (kernel position major, then channel)."""
    per_group = next(iter(correlations.values())).shape[-1]
    for block in blocks:
        du, dv = block.offset
        rows = slice(block.first * per_group, (block.first + 1) * per_group)
        cols = slice(block.second * per_group, (block.second + 1) * per_group)
        target = sums[:, rows, cols]
        target += correlations[block.offset]
        for strip in block.strips:
            target -= strip_sums[(*strip, du, dv)]
