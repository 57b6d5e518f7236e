"""nn.MultiheadAttention opened into projections: same function, all four projections pruned sequentially."""

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

import sgfx
import sgfx.engine.layer_step
from models import TinyTransformer, plain_sparsify
from reference import hessian_of
from sgfx.passes.attention import attention_core, open_attention
from sgfx.report import SparsityReport


class SelfAttention(nn.Module):
    def __init__(self, batch_first=True, need_weights=False, average=True, **mha):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first, **mha)
        self.need_weights, self.average = need_weights, average

    def forward(self, x, attn_mask=None, key_padding_mask=None):
        out, weights = self.attn(x, x, x, need_weights=self.need_weights, attn_mask=attn_mask,
                                 key_padding_mask=key_padding_mask, average_attn_weights=self.average)
        return out if weights is None else (out, weights)


class CrossAttention(nn.Module):
    def __init__(self, **mha):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True, **mha)

    def forward(self, x, memory):
        return self.attn(x, memory, memory, need_weights=False)[0]


def _masks(kind, gen):
    if kind == "bool-attn":
        return {"attn_mask": torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)}
    if kind == "float-attn":
        return {"attn_mask": torch.randn(5, 5, generator=gen)}
    if kind == "padding":
        return {"key_padding_mask": torch.tensor([[False] * 4 + [True], [False] * 5, [True] + [False] * 4])}
    return {}


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights, average", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("mask", ["none", "bool-attn", "float-attn", "padding"])
def test_opened_graph_equals_the_module(batch_first, need_weights, average, mask, gen):
    model = SelfAttention(batch_first, need_weights, average).eval()
    x = torch.randn(3, 5, 16, generator=gen)
    x = x if batch_first else x.transpose(0, 1)
    masks = _masks(mask, gen)
    gm = torch.fx.symbolic_trace(model)
    found = SparsityReport("2:4", "sparsegpt")
    assert open_attention(gm, found) is gm
    assert found.opened_attention == ["attn"] and found.kept_whole == {}
    assert not any(n.op == "call_module" for n in gm.graph.nodes)  # the MHA call is gone
    with torch.no_grad():
        expected, got = model(x, **masks), gm(x, **masks)
    expected = expected if isinstance(expected, tuple) else (expected,)
    got = got if isinstance(got, tuple) else (got,)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_separate_projection_weights_open_into_three(gen):
    """kdim/vdim != embed_dim: three projections, each from its own input (cross-attention works here)."""

    class Separate(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 4, batch_first=True, kdim=8, vdim=12)

        def forward(self, x, memory_k, memory_v):
            return self.attn(x, memory_k, memory_v, need_weights=False)[0]

    model = Separate().eval()
    inputs = (torch.randn(2, 5, 16, generator=gen), torch.randn(2, 7, 8, generator=gen),
              torch.randn(2, 7, 12, generator=gen))
    gm = torch.fx.symbolic_trace(model)
    found = SparsityReport("2:4", "sparsegpt")
    open_attention(gm, found)
    assert found.opened_attention == ["attn"]
    weights = [n.args[1].target for n in gm.graph.nodes if n.target is F.linear]
    assert weights == ["attn.q_proj_weight", "attn.k_proj_weight", "attn.v_proj_weight", "attn.out_proj.weight"]
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), model(*inputs), rtol=1e-5, atol=1e-6)


def test_cross_attention_with_packed_weights_is_kept_whole_and_reported(gen):
    model = CrossAttention().eval()
    calib = (torch.randn(2, 5, 16, generator=gen), torch.randn(2, 7, 16, generator=gen))

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            return self.inner(x, x.flip(1))  # key/value are a different node than the query

    with pytest.warns(UserWarning, match="stayed dense"):
        gm = sgfx.sparsify(Wrapper().eval(), calib[0], "2:4")
    records = {r.weight_name: r for r in sgfx.get_report(gm).layers}
    assert "cross-attention" in records["inner.attn.in_proj_weight"].reason
    assert not records["inner.attn.in_proj_weight"].pruned
    assert records["inner.attn.out_proj.weight"].reason == records["inner.attn.in_proj_weight"].reason


@pytest.mark.parametrize("batch_first", [True, False])
def test_all_four_projections_pruned_and_out_proj_sees_pruned_attention(batch_first, gen, solved_hessians):
    model = TinyTransformer(dim=16, heads=4, layers=1, batch_first=batch_first).eval()
    calib = [torch.randint(0, 50, (4, 12), generator=gen) for _ in range(2)]
    gm = plain_sparsify(model, calib, "2:4")
    report = sgfx.get_report(gm)
    pruned = {r.weight_name for r in report.pruned_layers}
    assert {"attn.0.in_proj_weight", "attn.0.out_proj.weight"} <= pruned
    assert report.opened_attention == ["attn.0"]
    assert sgfx.check_pattern(gm, "2:4")
    in_proj = gm.get_parameter("attn.0.in_proj_weight")
    assert in_proj.shape == (48, 16) and float((in_proj == 0).float().mean()) == 0.5  # q, k and v rows
    # out_proj's Hessian: from the attention output of the *pruned* q/k/v projections
    def by_hand(mha):
        rows = []
        for tokens in calib:
            x = model.embed(tokens)
            x = x if batch_first else x.transpose(0, 1)
            qkv = F.linear(model.norm[0](x), mha.in_proj_weight, mha.in_proj_bias)
            rows.append(attention_core(qkv, None, None, 4, batch_first, need_weights=False)[0].reshape(-1, 16))
        return hessian_of(torch.cat(rows))

    got = dict(solved_hessians)[(16, 16)]  # out_proj: the only 16x16 weight
    with torch.no_grad():
        torch.testing.assert_close(got, by_hand(gm.get_submodule("attn.0")), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(got, by_hand(model.attn[0]), rtol=1e-3, atol=1e-4), "built from dense q/k/v"
