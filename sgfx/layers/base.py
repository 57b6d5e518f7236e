"""The one interface every prunable layer kind implements, and the registry that finds them in a graph.

A layer kind is one small adapter class in its own module (``linear.py``, ``conv.py``, ``conv_transpose.py``,
``module_conv.py``), registered with :func:`register`. It says

- which ``nn.Module`` types and which functional calls it handles (:meth:`PrunableLayer.from_module`,
  :meth:`PrunableLayer.from_call`);
- how its weight maps to and from the *solve layout*: one (rows, columns) matrix per group, columns ordered
  (kernel position, input channel) so that every M consecutive columns are M entries of one N:M group
  (:mod:`sgfx.layout` says which weight axis that is);
- how one batch of the node's input becomes the input vectors the weight multiplies (the Hessian's samples);
- how to run its linear map with another weight (reconstruction errors, dense targets) and the weight gradient
  of an output (dense targets).

Everything else (Hessians, the OBS solve, statistics correction, serialization, the checker) goes through this
interface, so adding a kind touches one file.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Iterator

import torch
from torch import nn
from torch.fx.node import Node

from ..config import NMPattern, Pattern
from ..layout import nm_axis
from .paths import fetch_tensor

__all__ = ["PrunableLayer", "LayerUnsupported", "register", "KINDS", "layer_for_module", "find_layer",
           "find_prunable_layers"]

KINDS: list[type["PrunableLayer"]] = []  # registered kinds, in import order; the first that accepts a module wins


def register(kind: type["PrunableLayer"]) -> type["PrunableLayer"]:
    """Class decorator adding a layer kind to the registry."""
    KINDS.append(kind)
    return kind


class LayerUnsupported(ValueError):
    """Raised while pruning when a layer turns out not to be prunable (the layer is left dense with this reason)."""


class PrunableLayer:
    """One weight the solver can prune. Subclasses implement the layout and input hooks below.

    Attributes:
        name: the layer's name in the report (module path, or the weight's path for a functional call).
        op: the kind shown in the report and used by :func:`sgfx.layout.nm_axis` (``"Conv2d"``, ``"Linear"``..).
        weight: the live parameter (written back in place).
        weight_name: qualified name of the weight tensor in the GraphModule.
    """

    module_types: ClassVar[tuple[type, ...]] = ()
    functions: ClassVar[dict[Any, tuple[str, ...]]] = {}  # functional target -> its positional argument names
    channel_dim: ClassVar[int] = 1  # output channel axis of the layer's output

    def __init__(self, name: str, op: str, weight: torch.Tensor, weight_name: str | None = None):
        self.name, self.op, self.weight = name, op, weight
        self.weight_name = weight_name or name
        self.uses: list[Node] = []  # graph nodes calling this weight (set by find_prunable_layers)

    # ------------------------------------------------------------------------------------- discovery
    @classmethod
    def from_module(cls, name: str, module: nn.Module) -> "PrunableLayer":
        """The layer for a module of a registered kind (the registry picks the kind).

        Raises:
            TypeError: the module is not of a registered kind.
        """
        layer = layer_for_module(name, module)
        if layer is None:
            raise TypeError(f"{name}: {type(module).__name__} is not a prunable layer kind")
        return layer

    @classmethod
    def accepts_module(cls, module: nn.Module) -> bool:
        return True

    @classmethod
    def build_from_module(cls, name: str, module: nn.Module) -> "PrunableLayer | None":
        raise NotImplementedError

    @classmethod
    def from_call(cls, name: str, weight: torch.Tensor, bound: dict[str, Any], target: Any) -> "PrunableLayer | None":
        """The layer for a functional call ``target`` with bound arguments (weight a ``get_attr``), or None."""
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------- layout
    @property
    def nm_axis(self) -> int:
        return nm_axis(self.op)

    @property
    def num_groups(self) -> int:
        return 1

    @property
    def in_per_group(self) -> int:
        """Size of the N:M axis per group (input channels or features)."""
        return self.weight.shape[self.nm_axis] // (self.num_groups if self.nm_axis == 0 else 1)

    @property
    def columns(self) -> int:
        raise NotImplementedError

    def ineligibility(self, pattern: Pattern) -> str | None:
        """Why this layer cannot take ``pattern``, or None if it can."""
        if isinstance(pattern, NMPattern) and self.in_per_group % pattern.m:
            axis = "in_features" if self.op == "Linear" else "input channels per group"
            return f"{axis} ({self.in_per_group}) not divisible by M={pattern.m}"
        return None

    def solve_matrices(self) -> list[torch.Tensor]:
        """The weight as one (rows, columns) matrix per group, in solve column order."""
        raise NotImplementedError

    def write_back(self, matrices: list[torch.Tensor]) -> None:
        """Store solve-layout matrices (one per group) into the live weight, in its own dtype."""
        raise NotImplementedError

    def scale_output_channels_(self, scale: torch.Tensor) -> None:
        """Multiply each output channel's weights by ``scale`` (C_out,), in place (statistics correction)."""
        with torch.no_grad():
            self.weight.mul_(scale.to(self.weight.dtype).view(-1, *[1] * (self.weight.dim() - 1)))

    # ---------------------------------------------------------------------------------------- inputs
    def kernel_input(self, x: torch.Tensor) -> torch.Tensor:
        """The tensor the layer's kernel multiplies, from one batch of the node's input (checked)."""
        return x

    def rows(self, kernel_x: torch.Tensor, chunk_elements: int) -> Iterator[torch.Tensor]:
        """Input vectors of a kernel input as (groups, n, columns) float32 chunks of about ``chunk_elements``."""
        raise NotImplementedError

    def shift_geometry(self, kernel_x: torch.Tensor):
        """A :class:`sgfx.layers.conv_gram.ConvGeometry` when shifted correlations can build the Gram blocks, else
        None."""
        return None

    def forward_with(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The layer's linear map (no bias) on the node's input with another weight (in the PyTorch layout)."""
        raise NotImplementedError

    def output_input_product(self, x: torch.Tensor, grad: torch.Tensor) -> list[torch.Tensor]:
        """``Σ g pᵀ`` over the input vectors p of ``x`` and matching output vectors g of ``grad`` (shaped like the
        layer's output): the weight gradient, one (rows, columns) matrix per group in solve order."""
        raise NotImplementedError


def bind_call(node: Node, argnames: tuple[str, ...], defaults: dict[str, Any]) -> dict[str, Any]:
    """A functional call's arguments by name: positional ones named by ``argnames``, then kwargs, then defaults."""
    bound = dict(defaults)
    bound.update(zip(argnames, node.args))
    bound.update(node.kwargs)
    return bound


def layer_for_module(name: str, module: nn.Module) -> PrunableLayer | None:
    """The layer of the first registered kind that takes ``module``, or None."""
    for kind in KINDS:
        if isinstance(module, kind.module_types) and kind.accepts_module(module):
            return kind.build_from_module(name, module)
    return None


def find_layer(gm: torch.fx.GraphModule, node: Node,
               on_reject: Callable[[str], None] | None = None) -> PrunableLayer | None:
    """The prunable layer ``node`` runs (a registered module kind, or a registered functional call whose weight
    is a ``get_attr``), else None. ``on_reject(reason)`` hears why a call of a known kind is not prunable."""
    if node.op == "call_module":
        return layer_for_module(node.target, gm.get_submodule(node.target))
    if node.op != "call_function":
        return None
    claimed = False
    for kind in KINDS:
        argnames = kind.functions.get(node.target)
        if argnames is None:
            continue
        claimed = True
        bound = bind_call(node, argnames, {})
        weight_node = bound.get("weight")
        if not isinstance(weight_node, Node) or weight_node.op != "get_attr":
            if on_reject is not None:
                on_reject("its weight is computed at run time (not a get_attr parameter)")
            return None
        weight = fetch_tensor(gm, weight_node.target)
        layer = None if weight is None else kind.from_call(str(weight_node.target), weight, bound, node.target)
        if layer is not None:
            return layer
    if claimed and on_reject is not None:
        on_reject("arguments not supported (geometry computed at run time)")
    return None


def find_prunable_layers(gm: torch.fx.GraphModule,
                         rejected: dict[Node, str] | None = None) -> dict[Node, PrunableLayer]:
    """Prunable nodes (every registered layer kind) in topological order. A weight used by
    several nodes (a head shared across feature levels) is pruned at its first use, from the inputs of every use
    available by then; ``layer.uses`` lists the nodes. ``rejected`` (if given) receives the calls of a known kind
    that cannot be pruned, with the reason."""
    layers: dict[Node, PrunableLayer] = {}
    first_use: dict[int, PrunableLayer] = {}
    for node in gm.graph.nodes:
        on_reject = None if rejected is None else (lambda reason, node=node: rejected.__setitem__(node, reason))
        layer = find_layer(gm, node, on_reject)
        if layer is None:
            continue
        if id(layer.weight) in first_use:
            first_use[id(layer.weight)].uses.append(node)
            continue
        layer.uses = [node]
        first_use[id(layer.weight)] = layer
        layers[node] = layer
    return layers
