"""Open ``nn.MultiheadAttention`` calls into their projections, so that all four are pruned like Linear layers.

Why: torch.fx keeps ``nn.MultiheadAttention`` whole (it is a ``torch.nn`` leaf), and its ``in_proj_weight`` (a third
of a ViT encoder's weights) and ``out_proj`` never reach the solver. This pass rewrites each self-attention call

    out, weights = mha(x, x, x, ...)

into ``qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias)``, ``attn, weights = attention_core(qkv, ...)``,
``out = F.linear(attn, mha.out_proj.weight, mha.out_proj.bias)``. The q/k/v projections then get their Hessian
from the query input, and ``out_proj`` from the attention output computed with the already pruned q/k/v, as the
sequential sweep does for every layer. The parameters stay where they were (``state_dict`` keys unchanged).

Modules with separate q/k/v weights (``kdim``/``vdim`` differ from ``embed_dim``) are opened into three
projections, each fed by its own input, so cross-attention works there. A packed ``in_proj_weight`` whose query,
key and value inputs differ (cross-attention), ``add_bias_kv`` and ``add_zero_attn`` are left whole, with the
reason in the report. The opened graph runs attention without dropout (inference semantics); the report says so.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.node import Node

from ..layers.paths import fetch_tensor
from ..report import SparsityReport

__all__ = ["open_attention", "attention_core", "attention_output"]

_MHA_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
             "is_causal")


def _float_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True: not allowed) as an additive float mask; a float mask as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def attention_core(q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, num_heads: int,
                   batch_first: bool, attn_mask: torch.Tensor | None = None,
                   key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                   average_attn_weights: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scaled dot-product attention of projected q, k, v, in ``nn.MultiheadAttention``'s layout and mask semantics
    (without its projections). With ``k=v=None``, ``q`` holds the packed (q, k, v) projections on its last axis.

    Returns the attention output before ``out_proj`` (shaped like the query input) and the attention weights
    (averaged over heads when ``average_attn_weights``) or None.
    """
    if k is None:
        q, k, v = q.chunk(3, dim=-1)
    unbatched = q.dim() == 2
    if unbatched:  # (L, E): one sequence
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    elif not batch_first:  # (L, B, E) -> (B, L, E)
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    batch, length, embed = q.shape
    source, head_dim = k.shape[1], embed // num_heads
    qh = q.reshape(batch, length, num_heads, head_dim).transpose(1, 2)  # (B, H, L, d)
    kh = k.reshape(batch, source, num_heads, head_dim).transpose(1, 2)  # (B, H, S, d)
    vh = v.reshape(batch, source, num_heads, head_dim).transpose(1, 2)
    mask = None
    if attn_mask is not None:
        mask = _float_mask(attn_mask, q.dtype)
        mask = mask.view(1, 1, length, source) if mask.dim() == 2 else mask.view(batch, num_heads, length, source)
    if key_padding_mask is not None:
        padding = _float_mask(key_padding_mask, q.dtype).view(batch, 1, 1, source)
        mask = padding if mask is None else mask + padding
    if need_weights:
        scores = qh @ kh.transpose(-2, -1) / math.sqrt(head_dim)  # (B, H, L, S)
        if mask is not None:
            scores = scores + mask
        weights = scores.softmax(dim=-1)
        out = weights @ vh
        weights = weights.mean(dim=1) if average_attn_weights else weights
        if unbatched:
            weights = weights.squeeze(0)
    else:
        out, weights = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask), None
    out = out.transpose(1, 2).reshape(batch, length, embed)  # (B, L, E)
    if unbatched:
        out = out.squeeze(0)
    elif not batch_first:
        out = out.transpose(0, 1)
    return out, weights


def attention_output(out: torch.Tensor, weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``nn.MultiheadAttention``'s return value: (output, attention weights or None)."""
    return out, weights


def _whole_reason(module: nn.MultiheadAttention, bound: dict) -> str | None:
    if module.bias_k is not None or module.add_zero_attn:
        return "MultiheadAttention with add_bias_kv/add_zero_attn is kept whole (not opened)"
    if any(isinstance(bound.get(k), Node) for k in ("need_weights", "average_attn_weights")):
        return "MultiheadAttention with need_weights computed at run time is kept whole"
    same_input = bound["query"] is bound["key"] is bound["value"]
    if module._qkv_same_embed_dim and not same_input:
        return ("cross-attention with a packed in_proj_weight (q, k and v rows see different inputs) is kept "
                "whole: its projections stay dense")
    return None


def open_attention(gm: torch.fx.GraphModule, report: SparsityReport | None = None) -> torch.fx.GraphModule:
    """Rewrite every ``nn.MultiheadAttention`` call of ``gm`` that can be opened, in place; returns ``gm``.

    ``report`` (if given) receives the names of the modules opened (``opened_attention``) and, in ``kept_whole``,
    those kept whole with the reason.
    """
    opened, whole = [], {}
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), nn.MultiheadAttention):
            continue
        module: nn.MultiheadAttention = gm.get_submodule(node.target)
        bound = {"key_padding_mask": None, "need_weights": True, "attn_mask": None, "average_attn_weights": True}
        bound.update(zip(_MHA_ARGS, node.args))
        bound.update(node.kwargs)
        reason = _whole_reason(module, bound)
        if reason is not None:
            whole[str(node.target)] = reason
            continue
        name = str(node.target)
        with graph.inserting_before(node):
            def attr(path: str) -> Node | None:
                return graph.get_attr(f"{name}.{path}") if fetch_tensor(module, path) is not None else None

            bias = attr("in_proj_bias")
            if module._qkv_same_embed_dim:
                q = graph.call_function(F.linear, (bound["query"], attr("in_proj_weight"), bias))
                k = v = None
            else:
                embed = module.embed_dim
                slices = [None if bias is None else graph.call_function(
                    operator.getitem, (bias, slice(i * embed, (i + 1) * embed))) for i in range(3)]
                q, k, v = (graph.call_function(F.linear, (bound[arg], attr(f"{arg[0]}_proj_weight"), b))
                           for arg, b in zip(("query", "key", "value"), slices))
            core = graph.call_function(attention_core, (q, k, v, module.num_heads, module.batch_first), {
                "attn_mask": bound["attn_mask"], "key_padding_mask": bound["key_padding_mask"],
                "need_weights": bool(bound["need_weights"]) and _weights_used(node),
                "average_attn_weights": bool(bound["average_attn_weights"])})
            attended = graph.call_function(operator.getitem, (core, 0))
            out = graph.call_function(F.linear, (attended, attr("out_proj.weight"), attr("out_proj.bias")))
            result = graph.call_function(attention_output, (out, graph.call_function(operator.getitem, (core, 1))))
        node.replace_all_uses_with(result)
        graph.erase_node(node)
        opened.append(name)
    if opened:
        graph.lint()
        gm.recompile()
    if report is not None:
        report.opened_attention += opened
        report.kept_whole.update(whole)
    return gm


def _weights_used(node: Node) -> bool:
    """Whether anything reads the attention weights (``out[1]``) of an MHA call."""
    return not all(u.op == "call_function" and u.target is operator.getitem and u.args[1] == 0 for u in node.users)



