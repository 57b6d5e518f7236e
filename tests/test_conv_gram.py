"""Shift-correlation Gram matrices equal the im2col products; the blocked Cholesky equals LAPACK's."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sgfx.layers as layers
import sgfx.obs as obs
from reference import conv_column_permutation
from sgfx.layers.conv_gram import assemble, correlate, plan_blocks
from sgfx.layers import PrunableLayer

# (kernel, padding, dilation, groups, input H x W): same, valid, asymmetric "same" (even kernel), dilated,
# padding wider than the kernel, a map smaller than the kernel reach, 1-D kernels.
GEOMETRIES = [
    ((3, 3), 1, 1, 1, (8, 8)),
    ((3, 3), 0, 1, 1, (7, 9)),
    ((4, 2), "same", 1, 1, (6, 7)),
    ((5, 3), (2, 0), 1, 2, (6, 5)),
    ((3, 3), 2, 2, 1, (9, 8)),
    ((3, 3), "same", 2, 4, (6, 7)),
    ((3, 3), 3, 1, 1, (4, 4)),
    ((3, 3), 5, 1, 1, (2, 2)),
    ((1, 3), (0, 1), 1, 1, (3, 10)),
]


def _unfolded(x: torch.Tensor, layer: PrunableLayer) -> torch.Tensor:
    """(groups, n, cols) patch rows in solve order, from F.pad + F.unfold (the textbook im2col)."""
    cols = F.unfold(F.pad(x, layer.padding), layer.kernel_size, dilation=layer.dilation)  # (B, C·K, L)
    groups, per_group = layer.num_groups, layer.in_per_group
    rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])  # (n, C·K) in (C, kh, kw) order
    perm = conv_column_permutation(per_group, layer.kernel_size)
    size = per_group * layer.kernel_size[0] * layer.kernel_size[1]
    return torch.stack([rows[:, g * size:(g + 1) * size][:, perm] for g in range(groups)])


def _geometry(layer: PrunableLayer, height: int, width: int):
    """The shift-correlation geometry the accumulator would use for an (H, W) kernel input, or None."""
    return layer.shift_geometry(torch.empty(0, 0, height, width, device="meta"))


def _upper_block_mask(cols: int, per_group: int) -> torch.Tensor:
    block = torch.arange(cols) // per_group
    return block[:, None] <= block[None, :]


@pytest.mark.parametrize("kernel, padding, dilation, groups, size", GEOMETRIES, ids=str)
@pytest.mark.parametrize("symmetric", [True, False], ids=["hessian", "cross"])
def test_shifted_gram_equals_unfolded_product(kernel, padding, dilation, groups, size, symmetric, gen):
    conv = nn.Conv2d(8, 4, kernel, padding=padding, dilation=dilation, groups=groups, bias=False)
    layer = PrunableLayer.from_module("conv", conv)
    first = torch.randn(3, 8, *size, generator=gen, dtype=torch.float64)
    second = first if symmetric else torch.randn(3, 8, *size, generator=gen, dtype=torch.float64)
    geometry = _geometry(layer, *size)
    sums = torch.zeros(groups, layer.columns, layer.columns, dtype=torch.float64)
    blocks = plan_blocks(geometry, symmetric)
    assemble(sums, *correlate(first, second, geometry, blocks, groups), blocks)
    expected = _unfolded(first, layer).transpose(1, 2) @ _unfolded(second, layer)  # (groups, cols, cols)
    if symmetric:  # only the blocks on and above the diagonal are written
        keep = _upper_block_mask(layer.columns, layer.in_per_group)
        sums, expected = sums * keep, expected * keep
    torch.testing.assert_close(sums, expected, rtol=1e-12, atol=1e-10)


def test_geometry_does_not_apply_to_strided_or_padded_modes():
    assert _geometry(PrunableLayer.from_module("c", nn.Conv2d(8, 4, 3, stride=2)), 8, 8) is None
    assert _geometry(PrunableLayer.from_module("c", nn.Conv2d(8, 4, 3, padding=1, padding_mode="reflect")), 8,
                     8) is None
    assert _geometry(PrunableLayer.from_module("c", nn.Conv2d(8, 4, 1)), 8, 8) is None
    assert PrunableLayer.from_module("fc", nn.Linear(8, 4)).shift_geometry(torch.zeros(2, 8)) is None


@pytest.mark.parametrize("chunk", [1 << 24, 700], ids=["whole", "chunked"])
def test_accumulator_routes_agree(chunk, gen, monkeypatch):
    """The accumulator's shifted route gives the unfolded route's Hessian and needs fewer FLOPs."""
    monkeypatch.setattr(layers.hessian, "_CHUNK_ELEMENTS", chunk)
    conv = nn.Conv2d(16, 8, 3, padding=1, bias=False)
    layer = PrunableLayer.from_module("conv", conv)
    inputs = [torch.randn(4, 16, 12, 12, generator=gen), torch.randn(3, 16, 12, 12, generator=gen)]
    results = {}
    for route in ("shifted", "unfolded"):
        acc = layers.HessianAccumulator(layer)
        if route == "unfolded":
            monkeypatch.setattr(acc, "_shift_route", lambda x: None)
        else:
            assert acc._shift_route(inputs[0]) is not None, "a 12x12 map should take the shifted route"
        for x in inputs:
            acc.add(x)
        results[route] = (acc.finalize(), acc.samples, acc.flops)
    (hess_s, samples_s, flops_s), (hess_u, samples_u, flops_u) = results.values()
    assert samples_s == samples_u == 7 * 12 * 12
    torch.testing.assert_close(hess_s, hess_u, rtol=1e-5, atol=1e-5)
    assert 0 < flops_s < flops_u


@pytest.mark.parametrize("size", [40, 53], ids=["multiple", "ragged"])
def test_blocked_cholesky_equals_lapack(size, gen, monkeypatch):
    monkeypatch.setattr(obs, "_CHOLESKY_BLOCK", 8)  # many panels at a small size
    x = torch.randn(size, size + 5, generator=gen, dtype=torch.float64)
    spd = x @ x.T / size
    factor = spd.clone()
    assert obs._cholesky_lower_(factor) == 0
    torch.testing.assert_close(factor, torch.linalg.cholesky(spd), rtol=1e-10, atol=1e-10)
    indefinite = spd.clone()
    indefinite[size - 9, size - 9] = -1.0  # first failing leading minor lies in a later panel
    expected = int(torch.linalg.cholesky_ex(indefinite).info)
    assert expected == size - 8 and obs._cholesky_lower_(indefinite) == expected


def test_batches_of_different_sizes_mix_routes(gen):
    """A 12x12 map takes the shifted route, a 1x1 map the unfolded one: together they give the one-shot Hessian."""
    conv = nn.Conv2d(16, 8, 3, padding=1, bias=False)
    layer = PrunableLayer.from_module("conv", conv)
    inputs = [torch.randn(2, 16, 12, 12, generator=gen), torch.randn(3, 16, 1, 1, generator=gen),
              torch.randn(2, 16, 12, 12, generator=gen)]
    acc = layers.HessianAccumulator(layer)
    routes = [acc._shift_route(x) is not None for x in inputs]
    assert routes == [True, False, True]
    for x in inputs:
        acc.add(x)
    (got,) = acc.finalize()
    rows = torch.cat([_unfolded(x, layer)[0] for x in inputs]).double()  # (n, cols)
    torch.testing.assert_close(got, 2.0 / rows.shape[0] * rows.T @ rows, rtol=1e-5, atol=1e-5)
    assert acc.samples == rows.shape[0]
