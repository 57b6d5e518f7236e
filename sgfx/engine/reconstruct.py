"""Label-free block reconstruction after the sweep: with the masks fixed, fit each block's kept weights to the dense
model's block outputs.

The one-shot sweep fits every layer on its own (its OBS solve sees one layer's output). What it cannot fix is how
the errors of a block's layers combine through its non-linearities, SE gates and residual adds; on the trained
MobileNet-style classifier of ``docs/RESULTS.md`` the 2:4 loss was spread over the pointwise convs in that way. In
the spirit of AdaPrune and BRECQ, this step walks the graph block by block (a block is a module of the model's own
hierarchy holding at most :data:`sgfx.config.RECONSTRUCT_BLOCK_LAYERS` pruned layers, found from the trace's
``nn_module_stack``), feeds each block the *pruned* model's values at its inputs (so it also absorbs the error of
the blocks before it) and
adjusts its parameters (the pruned weights on their kept entries only, biases, BatchNorm affines) with Adam to
match the dense copy's values at its outputs on the calibration inputs. No labels are read.

Every block is checked on a held-out part of the calibration batches (the last fifth, at least one batch): a block
whose held-out error did not fall gets its parameters back, so the step never makes a block worse on data it did not
fit. Zeros stay exactly zero (gradients masked before each step, weights masked after it, as in
:func:`sgfx.finetune.finetune`). Values live in the run's activation store, so the step spills as the sweep does.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx
from torch.fx.node import Node

from ..config import RECONSTRUCT_BLOCK_LAYERS
from ..finetune import masked_step
from ..runtime.activations import ActivationStore, BatchValues, MappedValues
from ..runtime.timing import phase
from ..runtime.calibration import call_node, node_failure

__all__ = ["Block", "find_blocks", "reconstruct_blocks", "held_out_split"]

logger = logging.getLogger(__name__)

HELD_OUT_FRACTION = 0.2  # of the calibration batches, kept for the check that a block got better


@dataclass
class Block:
    """Consecutive graph nodes reconstructed together; ``params`` (qualified names) are what the fit may change."""

    name: str
    nodes: list[Node]
    params: dict[str, torch.nn.Parameter]
    masks: dict[str, torch.Tensor]  # pruned weights of the block: True where an entry is kept

    @property
    def fits(self) -> bool:
        return bool(self.masks)


def held_out_split(batches: int) -> tuple[list[int], list[int]]:
    """(fit, held out) batch indices: the last fifth held out (at least one batch), or all of them for both when
    there is a single batch."""
    if batches < 2:
        return [0], [0]
    held = max(1, round(batches * HELD_OUT_FRACTION))
    return list(range(batches - held)), list(range(batches - held, batches))


def _module_paths(node: Node) -> list[str]:
    """The node's enclosing modules, outermost first ('' is the root)."""
    if node.op == "call_module":
        return _prefixes(str(node.target) + ".")
    if node.op == "get_attr":
        return _prefixes(str(node.target))
    return [""] + [path for path, _ in node.meta.get("nn_module_stack", {}).values()]


def _prefixes(qualified_name: str) -> list[str]:
    """'' and every enclosing module path of a parameter's qualified name ('a.b.weight' -> '', 'a', 'a.b')."""
    parts = qualified_name.split(".")[:-1]
    return [""] + [".".join(parts[: i + 1]) for i in range(len(parts))]


def _node_params(gm: torch.fx.GraphModule, node: Node) -> dict[str, torch.nn.Parameter]:
    """The parameters a node uses directly: a module's (all of them), or the one a ``get_attr`` fetches."""
    if node.op == "call_module":
        return dict(gm.get_submodule(node.target).named_parameters(prefix=str(node.target)))
    if node.op == "get_attr":
        try:
            return {str(node.target): gm.get_parameter(str(node.target))}
        except AttributeError:  # a buffer or a constant
            return {}
    return {}


def find_blocks(gm: torch.fx.GraphModule, pruned_weights: set[str],
                block_layers: int = RECONSTRUCT_BLOCK_LAYERS) -> list[Block]:
    """The graph's nodes (placeholders and output excluded) cut into blocks, in graph order.

    A node belongs to its outermost enclosing module that holds at most ``block_layers`` pruned weights; nodes the
    trace placed at the top level of a larger model join the block before them, and so does a run of nodes without
    a pruned weight (a layer's BatchNorm, activation and pooling are fitted with it). A parameter that nodes of
    two blocks use (a tied weight) is fitted in neither."""
    counts = Counter(prefix for name in pruned_weights for prefix in _prefixes(name))
    groups: list[tuple[str, list[Node]]] = []
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        key = next((p for p in _module_paths(node) if counts[p] <= block_layers), None)
        if groups and (key is None or key == groups[-1][0]):
            groups[-1][1].append(node)
        else:
            groups.append((key or node.name, [node]))
    blocks: list[Block] = []
    for key, nodes in groups:
        params = {name: p for node in nodes for name, p in _node_params(gm, node).items()}
        if blocks and not any(name in pruned_weights for name in params):
            blocks[-1].nodes += nodes
            blocks[-1].params.update(params)
        else:
            masks = {name: p.detach() != 0 for name, p in params.items() if name in pruned_weights}
            blocks.append(Block(key, nodes, params, masks))
    users: Counter = Counter(id(p) for block in blocks for p in {id(p): p for p in block.params.values()}.values())
    for block in blocks:
        for name in [n for n, p in block.params.items() if users[id(p)] > 1]:
            block.params.pop(name)
            block.masks.pop(name, None)
    return blocks


class _BlockRunner:
    """Runs a block's nodes for one batch on a GraphModule, reading the values from before the block with ``fetch``."""

    def __init__(self, gm: torch.fx.GraphModule):
        self.interpreter = torch.fx.Interpreter(gm)

    def run(self, nodes: list[Node], fetch: Callable[[Node], Any], batch: Any, index: int) -> dict[Node, Any]:
        local: dict[Node, Any] = {}
        read = lambda a: local[a] if a in local else fetch(a)  # noqa: E731
        for node in nodes:
            try:
                local[node] = call_node(self.interpreter, node, read)
            except Exception as exc:
                raise node_failure(node, batch, exc, index) from exc
        return local


def _block_loss(outputs: list[Any], targets: list[Any]) -> torch.Tensor:
    """Sum over the block's floating-point outputs of their mean squared error relative to the target's mean square."""
    terms = [(out - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-12)
             for out, target in zip(outputs, targets) if isinstance(out, torch.Tensor) and out.is_floating_point()]
    return torch.stack(terms).sum()


class _Copy:
    """One model (pruned or dense) walked block by block along ``gm``'s nodes: its runner and the stored per-batch
    values still read."""

    def __init__(self, runs_on: torch.fx.GraphModule, placeholders: list[Node], store: ActivationStore,
                 batches: Sequence[Any], inputs_of: Callable[[Any], list[Any]]):
        self.runner, self.store, self.batches = _BlockRunner(runs_on), store, batches
        self.env: dict[Node, Any] = {n: MappedValues(batches, lambda b, i=i: inputs_of(b)[i])
                                     for i, n in enumerate(placeholders)}

    def outputs(self, block: Block, outputs: list[Node], index: int) -> list[Any]:
        """The block's outputs for batch ``index``, from this copy's stored inputs (cloned: the block may run
        in-place ops on them)."""
        fetch = lambda a: _private(self.env[a][index])  # noqa: E731
        local = self.runner.run(block.nodes, fetch, self.batches[index], index)
        return [local[n] for n in outputs]

    def forward(self, block: Block, outputs: list[Node]) -> dict[Node, BatchValues]:
        """The block's outputs for every batch, in the store."""
        results = {n: self.store.new(n.name) for n in outputs}
        with torch.no_grad():
            for index in range(len(self.batches)):
                for node, value in zip(outputs, self.outputs(block, outputs, index)):
                    results[node].append(value)
        return results

    def advance(self, fresh: dict[Node, BatchValues], done: set[Node]) -> None:
        """Keep the block's outputs; free the values no later block reads."""
        self.env.update(fresh)
        for node in done:
            stored = self.env.pop(node, None)
            if isinstance(stored, BatchValues):
                stored.clear()


def reconstruct_blocks(gm: torch.fx.GraphModule, dense: torch.fx.GraphModule, blocks: list[Block],
                       batches: Sequence[Any], steps: int, lr: float, store: ActivationStore,
                       inputs_of: Callable[[Any], list[Any]],
                       on_block: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Fit each block of ``gm`` (pruned, modified in place) to ``dense`` (its unpruned copy) in graph order.

    Args:
        gm, dense: the pruned graph and its dense copy (the same graph, the same channel order).
        blocks: ``gm``'s blocks (:func:`find_blocks`), in graph order; those with pruned weights are fitted.
        batches: the calibration batches; ``inputs_of(batch)`` gives the graph's placeholder values for one.
        steps: Adam steps per block, one calibration batch each (cycling over the fit batches).
        lr: Adam's learning rate.
        store: where the per-batch values live (they spill as the sweep's do).
        on_block: called with each block's record when it is done (progress).

    Returns:
        ``{"blocks": [...], "output_error_before", "output_error_after", "kept"}``: one record per block with
        pruned weights (name, weights, steps, held-out error before and after the fit, kept), and the graph outputs'
        held-out error relative to the dense copy's before and after the whole step; when it did not fall, every
        block's parameters are put back (``kept`` False).
    """
    where = {node: index for index, block in enumerate(blocks) for node in block.nodes}
    last_read = {node: max((len(blocks) if u.op == "output" else where[u] for u in node.users), default=-1)
                 for node in gm.graph.nodes}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]  # gm's nodes key both copies' values
    pruned, dense_copy = (_Copy(m, placeholders, store, batches, inputs_of) for m in (gm, dense))
    fit, held = held_out_split(len(batches))
    graph_outputs = [n for n in gm.graph.nodes if last_read[n] == len(blocks)]
    whole = Block("graph", [n for block in blocks for n in block.nodes], {}, {})
    with torch.no_grad():
        before = {index: pruned.outputs(whole, graph_outputs, index) for index in held}
    saved = {name: p.detach().clone() for block in blocks for name, p in block.params.items()}
    records = []
    for position, block in enumerate(blocks):
        outputs = [n for n in block.nodes if last_read[n] > position]
        with phase("forward (dense)"):
            targets = dense_copy.forward(block, outputs)
        if block.fits and steps > 0:
            with phase("block reconstruction"):
                record = _fit(block, pruned, outputs, targets, fit, held, steps, lr, saved)
            records.append(record)
            logger.info("block %s: held-out error %.3g -> %.3g%s", block.name, record["error_before"],
                        record["error_fitted"], "" if record["kept"] else " (reverted)")
            if on_block is not None:
                on_block(record)
        with phase("forward (pruned)"):
            values = pruned.forward(block, outputs)
        done = {n for n in list(pruned.env) + outputs if last_read[n] <= position}
        dense_copy.advance(targets, done)
        pruned.advance(values, done)

    def output_error(outputs_of: Callable[[int], list[Any]]) -> float:
        return sum(float(_block_loss(outputs_of(i), [dense_copy.env[n][i] for n in graph_outputs]))
                   for i in held) / len(held)

    error_before = output_error(before.__getitem__)
    error_after = output_error(lambda i: [pruned.env[n][i] for n in graph_outputs])
    kept = error_after < error_before
    if not kept:
        logger.warning("block reconstruction did not lower the held-out output error (%.3g -> %.3g): put back",
                       error_before, error_after)
        with torch.no_grad():
            for block in blocks:
                for name, p in block.params.items():
                    p.copy_(saved[name])
    return {"blocks": records, "output_error_before": error_before, "output_error_after": error_after,
            "kept": kept}


def _fit(block: Block, pruned: _Copy, outputs: list[Node], targets: dict[Node, BatchValues], fit: list[int],
         held: list[int], steps: int, lr: float, saved: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Adam on the block's parameters, one fit batch per step; put back to ``saved`` (the values before the step,
    unchanged for this block so far: no parameter is in two blocks) unless the held-out error fell."""

    def error(index: int) -> torch.Tensor:
        return _block_loss(pruned.outputs(block, outputs, index), [targets[n][index] for n in outputs])

    def held_error() -> float:
        with torch.no_grad():
            return sum(float(error(index)) for index in held) / len(held)

    before = held_error()
    trainable = {name: p.requires_grad for name, p in block.params.items()}
    for p in block.params.values():
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(block.params.values(), lr=lr)
    weights = {name: block.params[name] for name in block.masks}
    with torch.enable_grad():
        for step in range(steps):
            masked_step(optimizer, error(fit[step % len(fit)]), weights, block.masks)
    for name, p in block.params.items():
        p.grad = None
        p.requires_grad_(trainable[name])
    after = held_error()
    kept = after < before
    if not kept:
        with torch.no_grad():
            for name, p in block.params.items():
                p.copy_(saved[name])
    return {"block": block.name, "weights": sorted(block.masks), "steps": steps, "error_before": before,
            "error_fitted": after, "kept": kept}


def _private(value: Any) -> Any:
    """A stored value as a block may use it: tensors cloned, so that an in-place first op cannot change the store."""
    return value.clone() if isinstance(value, torch.Tensor) else value
