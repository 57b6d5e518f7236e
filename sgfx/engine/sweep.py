"""Sequential calibration and pruning, in one topological sweep of the graph.

Why one sweep: SparseGPT's guarantee holds layer by layer only if each layer's Hessian is built from the inputs
it will really see, i.e. the outputs of the layers before it *after* they were pruned. Re-running the graph
prefix for each layer costs O(L²) forward passes; instead this ``torch.fx.Interpreter`` runs the graph node by
node over *all* calibration batches at once (each environment value holds one entry per batch). When it
reaches a prunable node it first builds the Hessian from the inputs waiting there, prunes the weight in place,
and only then computes that node's outputs, with the pruned weight, for the nodes after it. Each batch of a value
is freed as soon as its last user has run on that batch. The values live in an :class:`sgfx.runtime.activations.
ActivationStore`, which keeps them within a memory budget by spilling those needed furthest ahead to disk.

Segments: the nodes between two that need all batches at once (a prunable layer, a hook such as BatchNorm
re-estimation or an INT8 quantizer's calibration, a leaf block) run batch by batch as one segment, and only the
values read after the segment enter the store: a BatchNorm output that only its ReLU reads is never stored for
every batch (nor written to disk under a memory cap). Each op sees the same inputs as node by node, so the
results are bit-identical.
"""

from __future__ import annotations

import bisect
import copy
import functools
import math
import warnings
from typing import Any, Callable, Sequence

import torch
import torch.fx
from torch.fx.node import Node

from ..config import Pattern, SparsifyConfig
from ..layers import PrunableLayer, fetch_tensor, is_plain_conv
from ..passes.channel_permutation import (PermutationGroup, apply_order, apply_permutation, channel_square_sums,
                                          find_permutation_groups, group_saliency, report_groups, search_permutation)
from ..passes.quantizers import is_quantizer
from ..runtime import distributed
from ..quantize import dequantize_weight, weight_integers
from ..passes.schedule import is_inplace
from ..report import LayerRecord, SparsityReport
from ..runtime.activations import ActivationStore, BatchValues, Concatenated, MappedValues
from ..runtime.calibration import CalibrationError, call_node, node_failure, placeholder_values
from ..runtime.timing import phase
from .bn_reestimate import batchnorms_after_pruned, reestimate_batchnorm
from .layer_step import LayerPruner
from .quant_calibration import quantizer_hooks
from .leaf_blocks import LeafBlock, calls_of, execution_order, record_function_inputs, record_inputs
from .stats_correction import correction_hook, layer_bias, layers_to_correct

__all__ = ["SequentialPruner", "prune_sequentially", "correction_hooks"]


class SequentialPruner(torch.fx.Interpreter):
    """Runs ``gm`` over a list of batches node by node, pruning each layer in ``layers`` before it runs.

    Args:
        gm: the graph to run (its prunable weights are modified in place).
        layers: prunable nodes to prune, as returned by :func:`sgfx.layers.find_prunable_layers` (possibly filtered).
        prune: ``prune(layer, inputs, dense_inputs)`` prunes ``layer.weight`` given its input for every batch (and,
            with ``dense``, the input the unpruned model gives it; else ``None``).
        before_node: optional ``{node: hook}``; ``hook(inputs)`` runs with the node's first input for every batch
            just before the node runs (BatchNorm re-estimation uses it).
        dense: optional unpruned copy of ``gm`` run in lockstep, so that each layer also sees its dense inputs.
        after_node: optional ``{node: hook}`` (needs ``dense``); ``hook(outputs, dense_outputs)`` gets the node's
            outputs for every batch, pruned and dense, and returns the outputs the nodes after it see
            (statistics correction uses it).
        blocks: optional ``{node: LeafBlock}``: leaf modules whose inner layers are pruned (through ``prune``)
            when the sweep reaches them, before they run.
        store: where the per-batch values live (default: an unbounded store in memory).
        dense_identity: nodes the dense copy passes its input through unchanged (INT8 quantizers: the dense
            reference is the float model).
        permutations: channel-permutation groups (needs ``dense``) chosen in the sweep, each when its first
            consumer is reached: from the dense copy's values there, instead of a forward pass of its own before the
            sweep (:meth:`_permute`).
        pattern: the N:M pattern the permutations are chosen for.
    """

    def __init__(
        self,
        gm: torch.fx.GraphModule,
        layers: dict[Node, PrunableLayer],
        prune: Callable[[PrunableLayer, list[torch.Tensor], list[torch.Tensor] | None], None],
        before_node: dict[Node, Callable[[list[torch.Tensor]], None]] | None = None,
        dense: torch.fx.GraphModule | None = None,
        after_node: dict[Node, Callable[[list[Any], list[Any]], list[Any]]] | None = None,
        blocks: dict[Node, LeafBlock] | None = None,
        store: ActivationStore | None = None,
        dense_identity: set[Node] | None = None,
        permutations: list[PermutationGroup] | None = None,
        pattern: Pattern | None = None,
    ):
        if (after_node or permutations) and dense is None:
            raise ValueError("after_node hooks and permutations read the dense model: pass dense")
        super().__init__(gm, garbage_collect_values=True)
        self.extra_traceback = False  # our own error names the node and the batch
        self.layers = layers
        self.prune = prune
        self.before_node = before_node or {}
        self.after_node = after_node or {}
        self.blocks = blocks or {}  # leaf modules whose inner layers are pruned when the node is reached
        self.dense_identity = dense_identity or set()
        self.dense = None if dense is None else torch.fx.Interpreter(dense)  # runs gm's nodes on dense weights
        self.dense_env: dict[Node, list[Any]] = {}
        self.store = store or ActivationStore(host_bytes=1 << 62)
        self.store.next_use = self._next_use
        nodes = list(gm.graph.nodes)
        self._position = {node: index for index, node in enumerate(nodes)}
        self._user_positions = {node: sorted(self._position[u] for u in node.users) for node in nodes}
        # a value mutated in place while other nodes also read it must stay one tensor: a spilled copy would not
        # see the mutation
        self._pinned = {n.args[0] for n in nodes if is_inplace(gm, n) and n.args and isinstance(n.args[0], Node)
                        and len(n.args[0].users) > 1}
        self._now = 0  # position of the node being run
        self._batches: Sequence[Any] = []
        self._convert: Callable[[Any], Any] = lambda batch: batch
        self._batch_index = 0  # the batch being run, for error messages
        self._placeholders_seen = 0
        self._segments = self._find_segments(gm)
        self.pattern = pattern
        self.permutations = {c: (index, group) for index, group in enumerate(permutations or [])
                             for c in group.consumers}

    def _find_segments(self, gm: torch.fx.GraphModule) -> dict[Node, list[Node]]:
        """``{first node: nodes}`` of every run of two or more consecutive nodes that can go batch by batch: no
        prunable use, leaf block, after-hook or dense pass-through among them; a node with a before-hook (which
        reads its input for every batch) starts a new run."""
        whole = set(self.layers) | {u for layer in self.layers.values() for u in layer.uses} | set(self.blocks) \
            | set(self.after_node) | self.dense_identity
        runs, current = [], []
        for node in gm.graph.nodes:
            streamable = node.op in ("call_module", "call_function", "call_method") and node not in whole
            if not streamable or node in self.before_node:
                runs.append(current)
                current = []
            if streamable:
                current.append(node)
        runs.append(current)
        return {run[0]: run for run in runs if len(run) > 1}

    def run_batches(self, batches: Sequence[Any], convert: Callable[[Any], Any] | None = None) -> list[Any]:
        """Run every batch (a tensor, or a :class:`sgfx.runtime.calibration.CallInputs`) through the graph; returns the
        graph output of each batch. ``convert`` (device and dtype moves) is applied to each batch as it is read."""
        self._batches = batches
        self._convert = convert or (lambda batch: batch)
        checked = range(len(batches)) if not isinstance(batches[0], torch.Tensor) else [0]
        try:
            for index in checked:
                placeholder_values(self.module.graph, batches[index])
        except ValueError as exc:
            raise CalibrationError(str(exc)) from None
        self._placeholders_seen = 0
        return list(self.run(enable_io_processing=False))

    def _next_use(self, values: BatchValues) -> float | None:
        """Where the store should look first for values to spill: the position of the value's next reader
        (infinity for calibration batches no longer read, -1 for values about to be freed, None: never)."""
        node = getattr(values, "node", None)
        if node is None:
            return math.inf
        if node in self._pinned:
            return None
        users = self._user_positions[node]
        after = bisect.bisect_left(users, self._now)
        if after < len(users):
            return users[after]
        return math.inf if values.borrowed else -1

    def _placeholder(self, node: Node) -> Sequence[Any]:
        self._placeholders_seen += 1
        slot, graph, convert = self._placeholders_seen - 1, self.module.graph, self._convert
        if isinstance(self._batches, BatchValues) and self._batches.node is None:
            self._batches.node = node  # the calibration batches: spilled by this input's readers
        return MappedValues(self._batches, lambda batch: placeholder_values(graph, convert(batch))[slot])

    def _new_values(self, n: Node) -> BatchValues:
        values = self.store.new(n.name)
        values.node = n
        return values

    def _release_inputs(self, n: Node, env: dict, index: int) -> None:
        """Free batch ``index`` of the values whose last reader is ``n``."""
        for used in self.user_to_last_uses.get(n, []):
            values = env.get(used)
            if isinstance(values, BatchValues):
                values.release(index)

    def _prune_block(self, n: Node, block: LeafBlock) -> None:
        """Prune the layers inside leaf module ``n`` in their execution order, each from its inputs while the
        module runs on this node's inputs for every batch (:mod:`sgfx.engine.leaf_blocks`)."""
        batches = len(self._batches)
        calls = calls_of(n, self.env, batches)
        if block.function is not None:
            self._prune_function_block(n, block, calls, batches)
            return
        module = self.module.get_submodule(n.target)
        dense_module = None if self.dense is None else self.dense.module.get_submodule(n.target)
        dense_calls = None if self.dense is None else calls_of(n, self.dense_env, batches)
        order = execution_order(module, block, *calls[0])
        self._skip_unused(block, order, f"inside leaf module {block.name}, whose forward never calls it (its "
                                        "weight is used another way)")
        for name in order:
            if name not in block.layers:
                continue
            inputs = record_inputs(module, self.module.get_submodule(name), calls)
            dense_inputs = None if dense_module is None else record_inputs(
                dense_module, self.dense.module.get_submodule(name), dense_calls)
            self.prune(block.layers[name], inputs, dense_inputs)

    def _skip_unused(self, block: LeafBlock, used: list[str], reason: str) -> None:
        """Leave the block's layers its run did not use dense, with ``reason`` (when the pruner records skips)."""
        for name in sorted(set(block.layers) - set(used)):
            if hasattr(self.prune, "skip"):
                self.prune.skip(block.layers[name], reason)

    def _prune_function_block(self, n: Node, block: LeafBlock, calls: list, batches: int) -> None:
        """Prune the weights a wrapped function multiplies with ``F.linear``, in the order it uses them, each from
        its inputs recorded while the function runs on this node's inputs (the ones before already pruned)."""
        weights = {name: layer.weight for name, layer in block.layers.items()}
        order, _ = record_function_inputs(n, weights, calls[:1])
        self._skip_unused(block, order, f"passed to {block.name}, which does not multiply by it with F.linear "
                                        "(not a prunable use)")
        dense_calls = None if self.dense is None else calls_of(n, self.dense_env, batches)
        for name in order:
            inputs = record_function_inputs(n, {name: weights[name]}, calls)[1][name]
            dense_inputs = None
            if dense_calls is not None:  # the dense copy's own parameter, by the same path
                dense_weight = {name: fetch_tensor(self.dense.module, name)}
                dense_inputs = record_function_inputs(n, dense_weight, dense_calls)[1][name]
            self.prune(block.layers[name], inputs, dense_inputs)

    def _run_batch(self, node: Node, index: int, runner: torch.fx.Interpreter | None = None) -> Any:
        self._batch_index = index  # for error messages
        runner = runner or self
        env = self.env if runner is self else self.dense_env
        return call_node(runner, node, lambda n: env[n][index])

    @phase("forward (dense)")
    def _run_dense(self, n: Node) -> None:
        """The node's outputs on the unpruned weights; frees dense values whose last use this is."""
        if n.op != "output":
            outputs = self._new_values(n)
            for index in range(len(self._batches)):
                outputs.append(self.dense_env[n.args[0]][index] if n in self.dense_identity
                               else self._run_batch(n, index, self.dense))
                self._release_inputs(n, self.dense_env, index)
            self.dense_env[n] = outputs
        for used in self.user_to_last_uses.get(n, []):
            self.dense_env.pop(used, None)

    @phase("forward (pruned)")
    def _run_all(self, n: Node) -> BatchValues:
        outputs = self._new_values(n)
        for index in range(len(self._batches)):
            outputs.append(self._run_batch(n, index))
            self._release_inputs(n, self.env, index)
        return outputs

    def _stream(self, nodes: list[Node], runner: torch.fx.Interpreter, env: dict) -> dict[Node, Any]:
        """Run the segment ``nodes`` batch by batch on ``runner`` (reading ``env``); returns each node's value: the
        store's entries for values read after the segment, ``None`` for values only the segment reads."""
        inside = set(nodes)
        results = {m: self._new_values(m) if any(u not in inside for u in m.users) else None for m in nodes}
        outside_last = [v for m in nodes for v in self.user_to_last_uses.get(m, []) if v not in inside]
        for index in range(len(self._batches)):
            local: dict[Node, Any] = {}
            fetch = lambda a: local[a] if a in local else env[a][index]  # noqa: E731
            for m in nodes:
                self._now, self._batch_index = self._position[m], index
                try:
                    local[m] = call_node(runner, m, fetch)
                except Exception as exc:
                    raise node_failure(m, self._batches[index], exc, index) from exc
                if results[m] is not None:
                    results[m].append(local[m])
                for used in self.user_to_last_uses.get(m, []):
                    local.pop(used, None)
            for used in outside_last:
                if isinstance(env.get(used), BatchValues):
                    env[used].release(index)
        return results

    def _run_segment(self, nodes: list[Node]) -> Any:
        """Run a segment (dense copy first); the later nodes' values go straight into the environments, where the
        interpreter finds them and does not run those nodes again. Returns the first node's value."""
        tail_last_uses = [v for m in nodes[1:] for v in self.user_to_last_uses.get(m, [])]
        if self.dense is not None:
            with phase("forward (dense)"):
                self.dense_env.update(self._stream(nodes, self.dense, self.dense_env))
            for used in tail_last_uses + self.user_to_last_uses.get(nodes[0], []):
                self.dense_env.pop(used, None)
        with phase("forward (pruned)"):
            results = self._stream(nodes, self, self.env)
        self.env.update({m: results[m] for m in nodes[1:]})  # found there: the interpreter skips these nodes
        inside = set(nodes)
        for used in tail_last_uses:  # it collects only after the nodes it runs itself (the segment's stay, as None)
            if used not in inside:
                self.env.pop(used, None)
        return results[nodes[0]]

    def _permute(self, index: int, group: PermutationGroup, reached: Node) -> None:
        """Choose and apply ``group``'s channel order when the sweep reaches its first consumer ``reached``.

        The saliency needs the consumers' dense input, which the dense copy holds by now: no forward pass of its
        own. The producer has been pruned and has run by then; reordering its rows (and bias, the BatchNorms
        between, the consumers' columns) afterwards is exact, and so is reordering the values already computed
        between them, in both copies.
        """
        with phase("channel permutation"):
            source = group.consumers[0].args[0]
            source = source if source in self.dense_env else reached.args[0]
            values = self.dense_env[source]
            sums = sum(channel_square_sums(self.module, reached, values[i]) for i in range(len(values)))
            saliency = group_saliency(self.module, group, distributed.all_reduce_sum(sums))
            order = None
            if distributed.owner(index) == distributed.rank():
                with distributed.solve_threads():  # the other ranks wait for the order: borrow their threads
                    order = search_permutation(saliency, self.pattern)
            order = apply_order(self.module, group, saliency, order, self.pattern, index)
            apply_permutation(self.dense.module, group, order)
            dim = 1 if is_plain_conv(self.module.get_submodule(group.producer.target)) else -1  # Linear: last
            for node in [group.producer, *group.channelwise]:  # the values between the producer and consumers
                for env in (self.env, self.dense_env):
                    if isinstance(env.get(node), BatchValues):
                        env[node] = self._reordered(node, env[node], order, dim)

    def _reordered(self, node: Node, values: BatchValues, order: torch.Tensor, dim: int) -> BatchValues:
        """``values`` with their channels (``dim``) in ``order``, in the same memory format."""
        reordered = self._new_values(node)
        for index in range(len(values)):
            value = values[index]
            moved = value.index_select(dim, order.to(value.device))
            if value.dim() == 4 and value.is_contiguous(memory_format=torch.channels_last):
                moved = moved.contiguous(memory_format=torch.channels_last)
            reordered.append(moved)
            values.release(index)
        return reordered

    def _prune_layer(self, n: Node, layer: PrunableLayer) -> None:
        """Prune ``layer`` from the inputs of its calls computed by now (and their dense counterparts)."""
        try:
            uses = [u for u in (layer.uses or [n]) if u.args[0] in self.env]
            inputs = Concatenated([self.env[u.args[0]] for u in uses])
            dense_inputs = Concatenated([self.dense_env[u.args[0]] for u in uses]) if self.dense is not None else None
            self.prune(layer, inputs, dense_inputs)
        except ValueError as exc:  # inputs the layer cannot take
            raise CalibrationError(f"pruning failed at node `{n.format_node()}`: {exc}") from exc
        except MemoryError:
            raise
        except Exception as exc:
            raise RuntimeError(f"sgfx: pruning failed at node `{n.format_node()}`: {exc}") from exc

    def run_node(self, n: Node) -> Any:
        self._now = self._position[n]
        if n.op == "placeholder":
            value = self._placeholder(n)
            if self.dense is not None:
                self.dense_env[n] = value
            return value
        if n.op == "get_attr":  # parameters are the same for every batch
            if self.dense is not None:
                self.dense_env[n] = [self.dense.fetch_attr(n.target)] * len(self._batches)
            return [self.fetch_attr(n.target)] * len(self._batches)
        permutation = self.permutations.get(n)
        if permutation is not None and permutation[1].permutation is None:
            self._permute(*permutation, n)
        if n in self.layers:
            self._prune_layer(n, self.layers[n])
        block = self.blocks.get(n)
        if block is not None:
            try:
                self._prune_block(n, block)
            except ValueError as exc:
                raise CalibrationError(f"pruning inside leaf module `{n.format_node()}` failed: {exc}") from exc
        hook = self.before_node.get(n)
        if hook is not None:
            hook(self.env[n.args[0]])
        if n in self._segments:
            return self._run_segment(self._segments[n])
        self._batch_index = 0
        try:
            if self.dense is not None:
                self._run_dense(n)
            outputs = self._run_all(n)
        except (CalibrationError, MemoryError):
            raise
        except Exception as exc:
            raise node_failure(n, self._batches[self._batch_index], exc, self._batch_index) from exc
        after = self.after_node.get(n)
        if after is None:
            return outputs
        try:
            with phase("statistics correction"):
                corrected = after(outputs, self.dense_env[n])
            if corrected is outputs:
                return outputs
            values = self._new_values(n)
            for index, value in enumerate(corrected):
                values.append(value)
                outputs.release(index)
            return values
        except Exception as exc:
            raise RuntimeError(f"sgfx: correcting the outputs of node `{n.format_node()}` failed: {exc}") from exc


def _scale_on_grid(gm: torch.fx.GraphModule, layer: PrunableLayer, quant: dict, factors: torch.Tensor) -> None:
    """Scale an INT8 layer's output channels by ``factors`` (statistics correction's standard-deviation ratios,
    non-negative) keeping its integers: the per-channel scales are multiplied instead, and the weight rewritten as
    exactly ``integers * scale``."""
    scales, axis = getattr(gm, quant["weight_scale"]), quant["weight_axis"]
    integers = weight_integers(layer.weight.detach(), scales, axis)
    scales.mul_(factors.to(scales))
    quant.update(weight_scale_min=float(scales.min()), weight_scale_max=float(scales.max()))
    with torch.no_grad():
        layer.weight.copy_(dequantize_weight(integers, scales, axis, layer.weight.dtype))


def correction_hooks(gm: torch.fx.GraphModule, to_prune: dict, bn_nodes: set, mode: str,
                      result: SparsityReport) -> dict:
    """Statistics-correction hooks for the pruned layers that may need one (each records itself when applied)."""
    if mode == "off":
        return {}
    hooks = {}
    for node in sorted(layers_to_correct(gm, set(to_prune), bn_nodes), key=list(to_prune).index):
        layer = to_prune[node]
        if len(layer.uses) > 1:  # one bias serves calls with different statistics (feature levels): leave it
            continue
        if node.op != "call_module" and layer_bias(gm, node, create=False) is None:
            warnings.warn(f"sgfx: {layer.name}: no bias to correct its statistics through (a functional call "
                          "without a get_attr bias); left uncorrected", UserWarning, stacklevel=3)
            continue
        record = next((r for r in result.layers if r.name == layer.name), None)
        scale = layer.scale_output_channels_ if record is None or "weight_scale" not in record.quant else \
            functools.partial(_scale_on_grid, gm, layer, record.quant)
        hooks[node] = correction_hook(scale, functools.partial(layer_bias, gm, node),
                                      layer.channel_dim, mode, layer.columns,
                                      functools.partial(result.stats_corrected.append, layer.name))
    return hooks


def prune_sequentially(gm: torch.fx.GraphModule, batches: list[Any], to_prune: dict[Node, PrunableLayer],
                       config: SparsifyConfig, records: dict[str, LayerRecord], result: SparsityReport,
                       on_layer: Callable[[LayerRecord], None] | None, patterns: dict[str, Pattern],
                       blocks: dict | None = None, store: ActivationStore | None = None,
                       convert: Callable[[Any], Any] | None = None,
                       permute: bool = False) -> torch.fx.GraphModule | None:
    """Prune ``to_prune`` (and the layers inside the leaf modules ``blocks``) in one sweep over ``batches``, with
    the remedies ``config`` asks for, in place; activations live in ``store``, batches pass through ``convert``.
    With ``quantize="int8"``, the quantizers already in the graph are calibrated as the sweep reaches them and the
    layers whose records hold a weight-scale buffer are rounded in their solves. ``permute``: choose the channel
    permutations in the sweep (needs dense targets: the dense copy's values give the saliencies). Returns the dense
    copy (in the same channel order as ``gm``, for :mod:`sgfx.engine.reconstruct`) when one was made, else None."""
    hooks, batchnorms = {}, {}
    if config.bn_reestimate is not False:
        batchnorms = batchnorms_after_pruned(gm, set(to_prune))
        hooks = {node: functools.partial(reestimate_batchnorm, bn) for node, bn in batchnorms.items()}
        result.bn_reestimated = [str(node.target) for node in batchnorms]
    corrections = correction_hooks(gm, to_prune, set(batchnorms), config.stats_correction, result)
    scales, quantizers = {}, set()
    if config.quantize is not None:
        hooks.update(quantizer_hooks(gm, result, config.activation_calibration))
        scales = {r.name: getattr(gm, r.quant["weight_scale"]) for r in records.values() if "weight_scale" in r.quant}
        quantizers = {node for node in gm.graph.nodes if is_quantizer(node)}
    groups = find_permutation_groups(gm, set(to_prune), config.sparsity) if permute else []
    lockstep = bool(config.dense_targets or corrections)  # the unpruned model runs beside the pruned one
    dense = copy.deepcopy(gm) if lockstep or config.reconstruct else None
    pruner = LayerPruner(config, records, on_layer, patterns, scales)
    with torch.no_grad():
        SequentialPruner(gm, to_prune, pruner, hooks, dense if lockstep else None, corrections, blocks, store,
                         quantizers, groups, config.sparsity).run_batches(batches, convert)
    report_groups(result, [g for g in groups if g.permutation is not None])
    return dense
