"""Calibration data as the passes see it: a list of batches, each one tensor or the full inputs of one call.

``sgfx.sparsify(model, calib)`` takes tensors (or ``(input, ...)`` tuples, as a labelled ``DataLoader`` yields):
each batch feeds the graph's first input. A model with several inputs takes :class:`Inputs` items
(``sgfx.Inputs(image, mask, meta=m)``) or dicts of keyword inputs, also as the first element of a tuple. Submodules
traced on their own (``submodules=``) take whatever their parent passes them (several tensors, lists, dicts of FPN
features, torchvision ``ImageList`` objects), recorded as a :class:`CallInputs` per call and mapped onto the graph's
placeholders by position, then by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.fx
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["CallInputs", "Inputs", "CalibrationError", "calibration_batches", "calibration_items",
           "placeholder_values", "map_tensors", "tensors_of", "describe", "node_failure", "call_node"]


class CalibrationError(ValueError):
    """Running the calibration data through the graph failed at a node."""


@dataclass
class CallInputs:
    """The positional and keyword arguments of one call of a (sub)module."""

    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


class Inputs(CallInputs):
    """One calibration batch of a model with several inputs: ``Inputs(image, mask, meta=m)`` feeds the graph's
    inputs by position, then by name (the others take their defaults), as ``model(image, mask, meta=m)`` would.

    Example:
        >>> calib = [sgfx.Inputs(left, right) for left, right in stereo_pairs]  # doctest: +SKIP
        >>> gm = sgfx.sparsify(stereo_net, calib, "2:4")  # doctest: +SKIP
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(tuple(args), dict(kwargs))

    def __repr__(self) -> str:
        parts = [describe(a) if isinstance(a, torch.Tensor) else type(a).__name__ for a in self.args]
        parts += [f"{k}={describe(v) if isinstance(v, torch.Tensor) else type(v).__name__}"
                  for k, v in self.kwargs.items()]
        return f"Inputs({', '.join(parts)})"


def tensors_of(batch: Any) -> list[torch.Tensor]:
    """Every tensor in a batch (nested lists, tuples and dicts included; other objects' tensor attributes too)."""
    if isinstance(batch, CallInputs):
        batch = (batch.args, batch.kwargs)
    leaves, _ = tree_flatten(batch)
    found = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            found.append(leaf)
        elif hasattr(leaf, "__dict__") and not isinstance(leaf, type):  # e.g. torchvision's ImageList
            found.extend(v for v in vars(leaf).values() if isinstance(v, torch.Tensor))
    return found


def map_tensors(batch: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``batch`` with ``fn`` applied to every tensor (objects with a ``.to`` method, such as ImageList, get
    ``fn`` through it when ``fn`` only moves or casts)."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, CallInputs):
        return CallInputs(map_tensors(batch.args, fn), map_tensors(batch.kwargs, fn))
    return tree_map(lambda leaf: fn(leaf) if isinstance(leaf, torch.Tensor) else leaf, batch)


def describe(batch: Any) -> str:
    """A short description of a batch for error messages: its shape, or the shapes of its tensors."""
    if isinstance(batch, torch.Tensor):
        return f"input shape {tuple(batch.shape)}"
    return "input tensor shapes " + ", ".join(str(tuple(t.shape)) for t in tensors_of(batch)[:4])


def node_failure(node: torch.fx.Node, batch: Any, exc: Exception, index: int | None = None) -> CalibrationError:
    """The error for a graph node that failed on a calibration batch: names the node, the batch and the cause."""
    where = f"on batch {index} " if index is not None else ""
    return CalibrationError(f"calibration failed at node `{node.format_node()}` {where}({describe(batch)}): "
                            f"{type(exc).__name__}: {exc}")


def call_node(interpreter: torch.fx.Interpreter, node: torch.fx.Node, fetch: Callable[[torch.fx.Node], Any]) -> Any:
    """Run one node on ``interpreter``'s module, its input nodes' values read with ``fetch`` (one batch's)."""
    return getattr(interpreter, node.op)(node.target, torch.fx.node.map_arg(node.args, fetch),
                                         torch.fx.node.map_arg(node.kwargs, fetch))


def placeholder_values(graph: torch.fx.Graph, batch: Any) -> list[Any]:
    """The value of each placeholder of ``graph`` for one batch: a plain batch feeds the first placeholder (the
    others take their defaults); a :class:`CallInputs` is bound by position, then by name, then defaults.

    Raises:
        ValueError: a placeholder gets no value.
    """
    values = []
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    args, kwargs = (batch.args, batch.kwargs) if isinstance(batch, CallInputs) else ((batch,), {})
    if getattr(graph._codegen, "pytree_info", None) is not None and isinstance(batch, CallInputs):
        flat = graph._codegen.process_inputs(*args)  # traced with structured inputs (lists/dicts of tensors)
        if len(flat) != len(placeholders):
            raise ValueError(f"the recorded call has {len(flat)} input leaves, the graph takes {len(placeholders)}")
        return list(flat)
    for index, node in enumerate(placeholders):
        name = str(node.target).lstrip("*")
        if index < len(args):
            values.append(args[index])
        elif name in kwargs:
            values.append(kwargs[name])
        elif node.args:  # a default value
            values.append(node.args[0])
        else:
            hint = ("a plain batch feeds the first input only: pass each batch as sgfx.Inputs(x, y, ...) or a dict "
                    "of keyword inputs, or fix the others with concrete_args"
                    if not isinstance(batch, CallInputs) else "the batch (or the recorded call) did not pass it")
            raise ValueError(f"the graph input `{node.format_node()}` gets no value: {hint}")
    return values


def _check_tensor(x: torch.Tensor, index: int) -> None:
    if x.numel() == 0:
        raise ValueError(f"calibration batch {index} is empty (shape {tuple(x.shape)})")
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"calibration batch {index} contains NaN or Inf values")


def _calibration_batch(item: Any, index: int) -> torch.Tensor | Inputs:
    """One item of ``calib`` as the graph takes it, validated: a tensor, or :class:`Inputs` (from an ``Inputs`` or
    a dict of keyword inputs), alone or first in a tuple/list (what a labelled loader yields)."""
    x = item[0] if isinstance(item, (tuple, list)) and len(item) > 0 else item
    if isinstance(x, dict):
        if not all(isinstance(k, str) for k in x):
            raise TypeError(f"calibration batch {index}: a dict of keyword inputs needs string keys")
        x = Inputs(**x)
    if isinstance(x, CallInputs):
        tensors = tensors_of(x)
        if not tensors:
            raise TypeError(f"calibration batch {index}: {x!r} holds no tensor")
        for tensor in tensors:
            _check_tensor(tensor, index)
        return Inputs(*map_tensors(x.args, torch.Tensor.detach), **map_tensors(x.kwargs, torch.Tensor.detach))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"calibration batch {index}: expected a tensor, sgfx.Inputs, a dict of keyword inputs or "
                        f"an (input, ...) tuple/list, got {type(item).__name__}")
    _check_tensor(x, index)
    return x.detach()


def calibration_items(calib: Any, what: str) -> Iterator[Any]:
    """The items of ``calib``: one tensor (a single item) or an iterable of them (read lazily).

    Raises:
        TypeError: ``calib`` is neither (a string, a dict or ``None`` included); the message says ``what`` the
            items are.
    """
    if isinstance(calib, torch.Tensor):
        return iter([calib])
    if calib is None or isinstance(calib, (str, bytes, dict)):
        raise TypeError(f"calib must be a tensor or an iterable of {what}, got {type(calib).__name__}")
    try:
        return iter(calib)
    except TypeError:
        raise TypeError(f"calib must be a tensor or an iterable of {what}, got {type(calib).__name__}") from None


def calibration_batches(calib: Any, into: list | None = None) -> list[torch.Tensor | Inputs]:
    """Materialise calibration data as a list of batches, validating each.

    Accepts one tensor (a single batch) or an iterable of batches, each a tensor, an :class:`Inputs` or a dict of
    keyword inputs (models with several inputs), alone or as the first element of a tuple/list (as a ``DataLoader``
    over a labelled dataset yields). ``into`` (e.g. a :class:`sgfx.runtime.activations.BatchValues`, which may
    spill tensors to disk as it grows; :class:`Inputs` batches stay in memory) receives the batches instead of a
    new list, and is returned.

    Raises:
        TypeError: not a tensor / iterable of batches, or a batch of another kind.
        ValueError: no batches, an empty batch, or NaN/Inf values.
    """
    batches = [] if into is None else into
    for index, item in enumerate(calibration_items(calib, "batches")):
        batches.append(_calibration_batch(item, index))
    if not batches:
        raise ValueError("calibration data is empty: pass a tensor or an iterable yielding at least one batch")
    return batches


def check_call_inputs(batches: list[CallInputs]) -> None:
    """Validate recorded calls: at least one, each with at least one tensor, all finite."""
    if not batches:
        raise ValueError("no calibration call was recorded")
    for index, batch in enumerate(batches):
        tensors = tensors_of(batch)
        if not tensors:
            raise TypeError(f"calibration call {index} passes no tensor")
        for tensor in tensors:
            _check_tensor(tensor, index)
