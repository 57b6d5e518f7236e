"""Every conv kind's input vectors and Hessian against an autograd reference; the solve layout round-trips.

The reference needs no unfolding code: a conv's output is linear in its weight, so the input vector of output
position p is the gradient of y[b, o, p] with respect to output channel o's weights (autograd through PyTorch's own
conv kernels, for every kind, stride, padding, dilation, groups and output_padding).
"""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sgfx.layers as layers
from sgfx.config import NMPattern
from sgfx.layers import ConvLayer, ConvTransposeLayer, PrunableLayer
from sgfx.engine.inventory import is_weight

CASES = [
    (nn.Conv1d, dict(in_channels=8, out_channels=6, kernel_size=3, padding=1), (9,)),
    (nn.Conv1d, dict(in_channels=8, out_channels=4, kernel_size=4, stride=2, dilation=2, groups=2), (15,)),
    (nn.Conv1d, dict(in_channels=8, out_channels=6, kernel_size=3, padding=2, padding_mode="reflect"), (9,)),
    (nn.Conv2d, dict(in_channels=8, out_channels=6, kernel_size=(3, 2), stride=(2, 1), padding=(1, 0)), (7, 6)),
    (nn.Conv3d, dict(in_channels=8, out_channels=6, kernel_size=3, padding=1), (4, 5, 3)),
    (nn.Conv3d, dict(in_channels=8, out_channels=4, kernel_size=(1, 3, 3), stride=(1, 2, 2), groups=2), (3, 7, 6)),
    (nn.Conv3d, dict(in_channels=8, out_channels=6, kernel_size=2, padding="same"), (3, 4, 4)),
    (nn.ConvTranspose1d, dict(in_channels=8, out_channels=6, kernel_size=3, stride=2, padding=1,
                              output_padding=1), (6,)),
    (nn.ConvTranspose1d, dict(in_channels=8, out_channels=4, kernel_size=4, stride=3, padding=4, dilation=2,
                              groups=2), (5,)),
    (nn.ConvTranspose2d, dict(in_channels=8, out_channels=6, kernel_size=2, stride=2), (4, 3)),
    (nn.ConvTranspose2d, dict(in_channels=8, out_channels=6, kernel_size=3, stride=(2, 1), padding=1,
                              output_padding=(1, 0)), (4, 5)),
    (nn.ConvTranspose2d, dict(in_channels=8, out_channels=4, kernel_size=3, padding=2, groups=4), (5, 5)),
    (nn.ConvTranspose3d, dict(in_channels=8, out_channels=4, kernel_size=2, stride=2), (2, 3, 2)),
]
IDS = [f"{cls.__name__}-{i}" for i, (cls, _, _) in enumerate(CASES)]


def _reference_vectors(module: nn.Module, x: torch.Tensor, group: int) -> torch.Tensor:
    """(n, cols) input vectors of group ``group`` from autograd: d y[b, o, p] / d W_o, in solve column order
    (kernel position of the conv kernel the layer multiplies, then input channel)."""
    transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
    weight = module.weight.detach().clone().requires_grad_(True)
    if transposed:
        y = getattr(F, f"conv_transpose{weight.dim() - 2}d")(x, weight, None, module.stride, module.padding,
                                                             module.output_padding, module.groups, module.dilation)
    else:
        y = module._conv_forward(x, weight, None)  # (B, C_out, S'...), honouring padding_mode
    out_per_group = y.shape[1] // module.groups
    o = group * out_per_group  # the first output channel of the group: every channel sees the same vectors
    vectors = []
    for b in range(y.shape[0]):
        for p in range(y[0, 0].numel()):
            (grad,) = torch.autograd.grad(y[b, o].flatten()[p], weight, retain_graph=True)
            if transposed:  # (C_in, C_out/g, k...): output channel o's weights are column o % (C_out/g) of its group
                in_per_group = grad.shape[0] // module.groups
                block = grad[group * in_per_group:(group + 1) * in_per_group, o % out_per_group]  # (C_in/g, k...)
                block = block.flip(list(range(1, block.dim())))  # the equivalent conv's flipped kernel
            else:
                block = grad[o]  # (C_in/g, k...)
            vectors.append(block.movedim(0, -1).flatten())  # (k..., C_in/g)
    return torch.stack(vectors)


@pytest.mark.parametrize("cls, kwargs, size", CASES, ids=IDS)
def test_input_vectors_and_hessian_match_autograd_reference(cls, kwargs, size, gen, monkeypatch):
    monkeypatch.setattr(layers.hessian, "_CHUNK_ELEMENTS", 300)  # many chunks per batch
    module = cls(**kwargs, bias=False).double()
    x = torch.randn(2, kwargs["in_channels"], *size, generator=gen, dtype=torch.float64)
    layer = PrunableLayer.from_module("m", module)
    assert isinstance(layer, ConvTransposeLayer if "Transpose" in cls.__name__ else ConvLayer)
    assert layer.op == cls.__name__
    groups = kwargs.get("groups", 1)
    reference = [_reference_vectors(module, x, g) for g in range(groups)]
    rows = torch.cat(list(layer.rows(layer.kernel_input(x).double(), 1 << 30)), dim=1)  # (groups, n, cols)
    torch.testing.assert_close(rows.double(), torch.stack(reference), rtol=1e-6, atol=1e-6)  # float32 rows
    acc = layers.HessianAccumulator(layer)
    acc.add(x[:1])
    acc.add(x[1:])
    hessians = acc.finalize()
    n = reference[0].shape[0]
    for h, ref in zip(hessians, reference):
        torch.testing.assert_close(h.double(), 2 / n * ref.T @ ref, rtol=1e-5, atol=1e-5)


def _unfold_reference(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(groups, n, cols) patches of a Conv1d/2d/3d by explicit padding and ``Tensor.unfold`` (one sliding window
    per spatial dim, dilation by slicing the window), columns (kernel position, channel): unfold-and-matmul."""
    dims = x.dim() - 2
    kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
    if isinstance(module.padding, str):  # "same": the extra pixel of an even total goes after
        totals = [d * (k - 1) for d, k in zip(dilation, kernel)]
        pads = [(t // 2, t - t // 2) for t in totals]
    else:
        pads = [(p, p) for p in module.padding]
    flat_pads = [v for before, after in reversed(pads) for v in (before, after)]
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    windows = F.pad(x, flat_pads, mode=mode)
    for d in range(dims):  # (B, C, S'..., window...) with each window sliced by its dilation
        span = dilation[d] * (kernel[d] - 1) + 1
        windows = windows.unfold(2 + d, span, stride[d])
    index = (Ellipsis,) + tuple(slice(None, None, dl) for dl in dilation)
    windows = windows[index]  # (B, C, S'..., k...)
    b, c = windows.shape[:2]
    out = windows.shape[2:2 + dims]
    groups = module.groups
    per_group = c // groups
    patches = windows.reshape(b, groups, per_group, *out, *kernel)
    patches = patches.permute(1, 0, *range(3, 3 + dims), *range(3 + dims, 3 + 2 * dims), 2)  # (G, B, S', k, c)
    return patches.reshape(groups, b * math.prod(out), math.prod(kernel) * per_group)


@pytest.mark.parametrize("cls, kwargs, size", [c for c in CASES if "Transpose" not in c[0].__name__],
                         ids=[i for i in IDS if "Transpose" not in i])
def test_conv_hessian_matches_unfold_and_matmul(cls, kwargs, size, gen):
    module = cls(**kwargs, bias=False).double()
    x = torch.randn(3, kwargs["in_channels"], *size, generator=gen, dtype=torch.float64)
    layer = PrunableLayer.from_module("m", module)
    reference = _unfold_reference(module, x)  # (G, n, cols)
    acc = layers.HessianAccumulator(layer)
    acc.add(x)
    for h, ref in zip(acc.finalize(), reference):
        torch.testing.assert_close(h.double(), 2 / ref.shape[0] * ref.T @ ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls, kwargs, size", CASES, ids=IDS)
def test_solve_layout_reproduces_forward_and_round_trips(cls, kwargs, size, gen):
    module = cls(**kwargs, bias=False).double()
    x = torch.randn(2, kwargs["in_channels"], *size, generator=gen, dtype=torch.float64)
    layer = PrunableLayer.from_module("m", module)
    expected = module(x)  # (B, C_out, S'...)
    rows = layer.patches(layer.kernel_input(x))  # (groups, n, cols)
    outputs = torch.cat([rows[g] @ w.T for g, w in enumerate(layer.solve_matrices())], dim=1)  # (n, C_out)
    got = outputs.view(x.shape[0], *expected.shape[2:], -1).movedim(-1, 1)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.forward_with(x, module.weight), expected, rtol=1e-12, atol=1e-12)
    before = module.weight.detach().clone()
    layer.write_back([m.clone() * 2 for m in layer.solve_matrices()])
    torch.testing.assert_close(module.weight.detach(), 2 * before, rtol=0, atol=0)


@pytest.mark.parametrize("cls, kwargs, size", CASES, ids=IDS)
def test_output_input_product_is_the_weight_gradient(cls, kwargs, size, gen):
    """Σ g pᵀ (dense targets) equals autograd's gradient of <grad, y(W)>, mapped into solve order by the layer."""
    module = cls(**kwargs, bias=False).double()
    x = torch.randn(2, kwargs["in_channels"], *size, generator=gen, dtype=torch.float64)
    layer = PrunableLayer.from_module("m", module)
    grad_out = torch.randn_like(module(x))
    weight = module.weight.detach().clone().requires_grad_(True)
    (reference,) = torch.autograd.grad((layer.forward_with(x, weight) * grad_out).sum(), weight)
    with torch.no_grad():
        module.weight.copy_(reference)  # the layer's own layout conversion of the reference gradient
    expected = layer.solve_matrices()
    got = layer.output_input_product(x, grad_out)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


def test_transposed_conv_groups_along_input_channels():
    conv = nn.ConvTranspose2d(6, 8, 3)  # C_in = 6: not divisible by 4
    layer = PrunableLayer.from_module("up", conv)
    assert layer.nm_axis == 0 and layer.in_per_group == 6
    assert "input channels per group (6) not divisible by M=4" in layer.ineligibility(NMPattern(2, 4))
    assert PrunableLayer.from_module("up", nn.ConvTranspose2d(8, 6, 3)).ineligibility(NMPattern(2, 4)) is None


def test_functional_calls_of_every_kind_are_found(gen):
    import torch.fx

    from sgfx.layers import find_prunable_layers

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = nn.Parameter(torch.randn(8, 4, 3))
            self.w3 = nn.Parameter(torch.randn(8, 8, 1, 3, 3))
            self.wt = nn.Parameter(torch.randn(8, 4, 2, 2))
            self.wl = nn.Parameter(torch.randn(4, 16))

        def forward(self, x):  # (B, 4, 16)
            y = F.conv1d(x, self.w1, padding=1)  # (B, 8, 16)
            z = F.conv3d(y.view(-1, 8, 1, 4, 4), self.w3, padding=(0, 1, 1))
            t = F.conv_transpose2d(z.squeeze(2), self.wt, stride=2)  # (B, 4, 8, 8)
            return F.linear(t.flatten(2)[..., :16], self.wl)

    gm = torch.fx.symbolic_trace(Functional())
    found = {layer.name: layer.op for layer in find_prunable_layers(gm).values()}
    assert found == {"w1": "Conv1d", "w3": "Conv3d", "wt": "ConvTranspose2d", "wl": "Linear"}


# ------------------------------------------------------------------------------------------ end to end
def _models():
    from models import AudioCNN, TinyTransformer, TinyYOLO, UNet, Video3D

    return {
        "audio-conv1d": (AudioCNN, lambda g: torch.randn(4, 1, 2000, generator=g)),
        "video-conv3d": (Video3D, lambda g: torch.randn(2, 3, 4, 16, 16, generator=g)),
        "unet-convtranspose": (UNet, lambda g: torch.randn(2, 3, 16, 16, generator=g)),
        "transformer-mha": (TinyTransformer, lambda g: torch.randint(0, 50, (4, 12), generator=g)),
        "yolo-style": (TinyYOLO, lambda g: torch.randn(2, 3, 32, 32, generator=g)),
    }


@pytest.mark.parametrize("name", list(_models()))
@pytest.mark.parametrize("pattern", ["2:4", 0.5])
def test_every_weight_is_pruned_or_reported(name, pattern, gen, tmp_path):
    import sgfx

    build, data = _models()[name]
    model = build().eval()
    calib = [data(gen) for _ in range(2)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = sgfx.sparsify(model, calib, pattern, bn_reestimate=False)  # random BN statistics: keep them
    report = sgfx.get_report(gm)
    summaries = [w for w in caught if "of the model's weights stayed dense" in str(w.message)]
    assert len(summaries) == int(any(not r.pruned for r in report.layers))  # one warning exactly when any
    weights = {n: p for n, p in gm.named_parameters() if is_weight(p)}
    assert set(weights) <= {r.weight_name for r in report.layers}  # every weight has a record
    for record in report.layers:
        assert record.pruned or record.reason, record  # never silent
    pruned = [r for r in report.layers if r.pruned]
    eligible = [r for r in report.layers if r.op in ("Conv1d", "Conv2d", "Conv3d", "ConvTranspose2d", "Linear")
                and not r.reason]
    assert len(pruned) == len(eligible) and pruned
    assert sgfx.check_pattern(gm, pattern)
    with torch.no_grad():
        dense_out, sparse_out = model(calib[0]), gm(calib[0])
    dense_out = dense_out if isinstance(dense_out, tuple) else (dense_out,)
    sparse_out = sparse_out if isinstance(sparse_out, tuple) else (sparse_out,)
    for d, s in zip(dense_out, sparse_out):
        assert float((d - s).norm() / d.norm()) < 0.6  # pruned, not broken
    sgfx.save(gm, tmp_path / "m.sgfx")
    loaded = sgfx.load(tmp_path / "m.sgfx")
    for n, p in gm.state_dict().items():
        assert torch.equal(loaded.state_dict()[n], p), n
    with torch.no_grad():
        again = loaded(calib[0])
    again = again if isinstance(again, tuple) else (again,)
    for s, a in zip(sparse_out, again):
        torch.testing.assert_close(a, s, rtol=1e-5, atol=1e-6)  # weights bit-exact; kernels may differ


def test_transposed_conv_pruned_along_input_channels(gen):
    import sgfx
    from models import UNet
    from reference import conv_via_loops_ok

    gm = sgfx.sparsify(UNet().eval(), torch.randn(2, 3, 16, 16, generator=gen), "2:4")
    for name in ("up1", "up2"):
        weight = gm.get_submodule(name).weight.detach()  # (C_in, C_out, k, k)
        assert conv_via_loops_ok(weight.transpose(0, 1), 2, 4), name  # every 4 input channels: <= 2 nonzeros
        assert not conv_via_loops_ok(weight, 2, 4), name  # and not (by chance) along output channels
        assert sgfx.get_report(gm).layers[[r.name for r in sgfx.get_report(gm).layers].index(name)].op \
            == "ConvTranspose2d"


def test_unsupported_kinds_are_listed_with_reasons(gen):
    import sgfx
    from models import TinyTransformer

    gm = sgfx.sparsify(TinyTransformer().eval(), torch.randint(0, 50, (4, 12), generator=gen), "2:4")
    records = {r.weight_name: r for r in sgfx.get_report(gm).layers}
    assert records["embed.weight"].reason == "unsupported layer kind Embedding"
    assert not records["embed.weight"].pruned


def test_functional_calls_of_every_kind_are_pruned_along_their_axes(gen, tmp_path):
    import sgfx
    from models import plain_sparsify

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = nn.Parameter(torch.randn(8, 4, 3))
            self.w3 = nn.Parameter(torch.randn(8, 8, 1, 3, 3))
            self.wt = nn.Parameter(torch.randn(8, 4, 2, 2))  # (C_in, C_out, k, k)
            self.wl = nn.Parameter(torch.randn(4, 16))

        def forward(self, x):  # (B, 4, 16)
            y = F.conv1d(x, self.w1, padding=1)
            z = F.conv3d(y.view(-1, 8, 1, 4, 4), self.w3, padding=(0, 1, 1))
            t = F.conv_transpose2d(z.squeeze(2), self.wt, stride=2)
            return F.linear(t.flatten(2)[..., :16], self.wl)

    model = Functional()
    gm = plain_sparsify(model, torch.randn(16, 4, 16, generator=gen), "2:4")
    assert len(sgfx.get_report(gm).pruned_layers) == 4 and sgfx.check_pattern(gm, "2:4")
    wt = gm.get_parameter("wt").detach()
    groups = wt.movedim(0, -1).reshape(-1, 4)  # runs of 4 input channels (dim 0)
    assert int(((groups != 0).sum(1) > 2).sum()) == 0
    sgfx.save(gm, tmp_path / "f.sgfx")
    assert torch.equal(sgfx.load(tmp_path / "f.sgfx").get_parameter("wt"), gm.get_parameter("wt"))
