"""Conv layout: unfold + (kh, kw, C_in) column order reproduces F.conv2d; streaming Hessians are exact."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sgfx.layers as layers
from reference import conv_column_permutation, conv_via_loops_ok, unfold_hessian
from sgfx.config import NMPattern
from sgfx.layers import PrunableLayer

CONV_CASES = [
    dict(in_channels=8, out_channels=6, kernel_size=3, padding=1),
    dict(in_channels=8, out_channels=6, kernel_size=3, stride=2, padding=0),
    dict(in_channels=8, out_channels=4, kernel_size=(3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1)),
    dict(in_channels=8, out_channels=6, kernel_size=3, padding=1, groups=2),
    dict(in_channels=8, out_channels=8, kernel_size=3, padding=1, groups=8),
    dict(in_channels=8, out_channels=6, kernel_size=1),
    dict(in_channels=8, out_channels=6, kernel_size=3, padding=1, padding_mode="reflect"),
    dict(in_channels=8, out_channels=6, kernel_size=3, padding=1, padding_mode="circular"),
    dict(in_channels=8, out_channels=6, kernel_size=4, padding="same"),
    dict(in_channels=8, out_channels=6, kernel_size=3, padding="valid"),
]


@pytest.mark.parametrize("kwargs", CONV_CASES, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_patches_and_solve_layout_reproduce_conv(kwargs, gen):
    conv = nn.Conv2d(**kwargs, bias=False).double()
    x = torch.randn(3, 8, 9, 11, generator=gen, dtype=torch.float64)
    expected = conv(x)  # (B, C_out, H', W')
    layer = PrunableLayer.from_module("conv", conv)
    patches = layer.patches(x)  # (groups, B·H'·W', cols) in solve order
    assert patches.shape == (layer.num_groups, 3 * expected.shape[2] * expected.shape[3], layer.columns)
    outputs = [patches[g] @ w.T for g, w in enumerate(layer.solve_matrices())]  # (B·H'·W', rows) each
    b, c_out, h, w = expected.shape
    got = torch.cat(outputs, dim=1).view(b, h, w, c_out).permute(0, 3, 1, 2)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.forward_with(x, conv.weight), expected, rtol=1e-12, atol=1e-12)


def test_patches_equal_permuted_unfold(gen):
    """The patch matrix is F.unfold's, with columns reordered (C_in, kh, kw) -> (kh, kw, C_in)."""
    conv = nn.Conv2d(8, 4, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2))
    x = torch.randn(2, 8, 7, 9, generator=gen)
    layer = PrunableLayer.from_module("conv", conv)
    unfolded = F.unfold(x, (3, 2), dilation=(1, 2), padding=(1, 0), stride=(2, 1))  # (B, C·K, L)
    rows = unfolded.transpose(1, 2).reshape(-1, unfolded.shape[1])
    perm = conv_column_permutation(8, (3, 2))
    torch.testing.assert_close(layer.patches(x)[0], rows[:, perm], rtol=0, atol=0)


@pytest.mark.parametrize("kwargs", CONV_CASES[:4] + CONV_CASES[6:7], ids=str)
def test_streaming_conv_hessian_equals_one_shot(kwargs, gen, monkeypatch):
    monkeypatch.setattr(layers.hessian, "_CHUNK_ELEMENTS", 500)  # force many chunks per batch
    conv = nn.Conv2d(**kwargs, bias=False)
    inputs = [torch.randn(5, 8, 7, 6, generator=gen), torch.randn(2, 8, 7, 6, generator=gen)]
    layer = PrunableLayer.from_module("conv", conv)
    acc = layers.HessianAccumulator(layer)
    for x in inputs:
        acc.add(x)
    got = acc.finalize()
    full = unfold_hessian(inputs, conv)  # (C·K, C·K) for all channels, unfold order
    cols = layer.columns
    perm = conv_column_permutation(layer.in_per_group, layer.kernel_size)
    for g, h in enumerate(got):
        block = full[g * cols:(g + 1) * cols, g * cols:(g + 1) * cols]
        torch.testing.assert_close(h, block[perm][:, perm], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("min_tile, tiles", [(128, 6), (4, 3), (5, 2)])
def test_streaming_linear_hessian_equals_one_shot(gen, monkeypatch, min_tile, tiles):
    monkeypatch.setattr(layers.hessian, "_CHUNK_ELEMENTS", 64)
    monkeypatch.setattr(layers.hessian, "_MIN_TILE", min_tile)  # several upper-triangle tiles
    monkeypatch.setattr(layers.hessian, "_TILES", tiles)
    lin = nn.Linear(16, 4)
    inputs = [torch.randn(3, 5, 16, generator=gen), torch.randn(7, 16, generator=gen)]  # extra leading dims
    acc = layers.HessianAccumulator(PrunableLayer.from_module("fc", lin))
    for x in inputs:
        acc.add(x)
    (got,) = acc.finalize()
    rows = torch.cat([x.reshape(-1, 16) for x in inputs]).double()
    torch.testing.assert_close(got, 2.0 / rows.shape[0] * rows.T @ rows, rtol=1e-5, atol=1e-6)
    assert acc.samples == 22


@pytest.mark.parametrize("float64_max", [16384, 8], ids=["float64-sums", "float32-sums"])
def test_one_vector_batches_are_collected_into_one_product(gen, monkeypatch, float64_max):
    """A Linear layer fed one vector per batch: the buffered products give the one-shot Hessian and sample count."""
    monkeypatch.setattr(layers.hessian, "_FLOAT64_MAX_COLUMNS", float64_max)
    monkeypatch.setattr(layers.hessian, "_CHUNK_ELEMENTS", 16 * 5)  # a product every 5 vectors, 2 left pending at the end
    acc = layers.HessianAccumulator(PrunableLayer.from_module("fc", nn.Linear(16, 4)))
    inputs = [torch.randn(1, 16, generator=gen) for _ in range(12)]
    for x in inputs:
        acc.add(x)
    (got,) = acc.finalize()
    rows = torch.cat(inputs).double()
    assert acc.samples == 12 and acc.dtype == (torch.float64 if float64_max > 16 else torch.float32)
    torch.testing.assert_close(got.double(), 2.0 / 12 * rows.T @ rows, rtol=1e-5, atol=1e-6)


def test_solve_groups_fall_along_input_channels(gen):
    conv = nn.Conv2d(8, 4, 3, padding=1, bias=False)
    layer = PrunableLayer.from_module("conv", conv)
    (matrix,) = layer.solve_matrices()
    pruned = matrix.clone().view(4, -1, 4)  # every 4 consecutive solve columns ...
    pruned[:, :, 2:] = 0  # ... keep their first two
    layer.write_back([pruned.view(4, -1)])
    assert conv_via_loops_ok(conv.weight, 2, 4)
    for ci in range(0, 8, 4):  # exactly channels ci, ci+1 survive at every kernel position
        assert torch.all(conv.weight[:, ci + 2:ci + 4] == 0)
        assert torch.all(conv.weight[:, ci:ci + 2] != 0)


@pytest.mark.parametrize(
    "module, pattern, eligible",
    [
        (nn.Conv2d(3, 8, 3), NMPattern(2, 4), False),
        (nn.Conv2d(16, 16, 3, groups=16), NMPattern(2, 4), False),
        (nn.Conv2d(16, 16, 3, groups=4), NMPattern(2, 4), True),
        (nn.Conv2d(16, 16, 3, groups=4), NMPattern(4, 8), False),
        (nn.Linear(10, 4), NMPattern(2, 4), False),
        (nn.Linear(12, 4), NMPattern(2, 4), True),
    ],
)
def test_eligibility(module, pattern, eligible):
    reason = PrunableLayer.from_module("m", module).ineligibility(pattern)
    assert (reason is None) == eligible
    if not eligible:
        assert f"M={pattern.m}" in reason


def test_linear_rejects_wrong_width(gen):
    acc = layers.HessianAccumulator(PrunableLayer.from_module("fc", nn.Linear(16, 4)))
    with pytest.raises(ValueError, match="in_features"):
        acc.add(torch.randn(2, 15, generator=gen))
