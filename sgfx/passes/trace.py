"""Trace a model into a ``torch.fx.GraphModule`` that sgfx owns.

Why a pass of its own: sgfx must never mutate the user's model, so tracing starts from a deep copy; and when
symbolic tracing fails (data-dependent control flow, unsupported Python on proxies) the user needs to know which
line of *their* model broke and how to work around it (``leaf_modules`` or ``concrete_args``), not a torch.fx
stack trace.
"""

from __future__ import annotations

import copy
import os
import traceback
from typing import Any, Iterable

import torch
import torch.fx

from ..layers import has_own_forward

__all__ = ["TraceError", "trace"]

_TORCH_DIR = os.path.dirname(torch.__file__)
_SGFX_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TraceError(TypeError):
    """The model cannot be symbolically traced by torch.fx."""


def _timm_notrace() -> tuple[tuple[type, ...], tuple[Any, ...]]:
    """timm's registered FX leaf modules and functions (empty when timm is not importable)."""
    try:
        from timm.layers import _fx as timm_fx
    except Exception:  # timm missing, or a version without the registry
        return (), ()
    return tuple(getattr(timm_fx, "_leaf_modules", ())), tuple(getattr(timm_fx, "_autowrap_functions", ()))


class _LeafTracer(torch.fx.Tracer):
    """Keeps the user's leaf modules, timm's registered ones, and conv subclasses with their own ``forward`` whole
    (the last are still pruned: :mod:`sgfx.layers.module_conv`)."""

    def __init__(self, leaf_types: tuple[type, ...], leaf_names: frozenset[str]):
        timm_modules, timm_functions = _timm_notrace()
        super().__init__(autowrap_functions=timm_functions)
        self.leaf_types = leaf_types + timm_modules
        self.leaf_names = leaf_names

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self.leaf_types) or module_qualified_name in self.leaf_names or has_own_forward(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _user_frame(exc: BaseException) -> str:
    """'file:line in func: code' of the innermost frame outside torch and sgfx, if any."""
    frames = [
        f for f in traceback.extract_tb(exc.__traceback__)
        if not f.filename.startswith(_TORCH_DIR) and not f.filename.startswith(_SGFX_DIR)
    ]
    if not frames:
        return ""
    f = frames[-1]
    return f"{f.filename}:{f.lineno} in {f.name}: {(f.line or '').strip()}"


def trace(
    model: torch.nn.Module,
    leaf_modules: Iterable[Any] = (),
    concrete_args: dict[str, Any] | None = None,
) -> torch.fx.GraphModule:
    """Symbolically trace a deep copy of ``model``; an existing GraphModule is deep-copied as it is.

    Raises:
        TraceError: tracing failed; the message names the failing line and the workarounds.
    """
    if isinstance(model, torch.fx.GraphModule):
        return copy.deepcopy(model)
    owned = copy.deepcopy(model)
    leaf_modules = tuple(leaf_modules)
    tracer = _LeafTracer(
        tuple(m for m in leaf_modules if isinstance(m, type)),
        frozenset(m for m in leaf_modules if isinstance(m, str)),
    )
    try:
        graph = tracer.trace(owned, concrete_args=concrete_args)
    except Exception as exc:  # torch.fx raises TraceError, TypeError, RuntimeError, NotImplementedError ...
        where = _user_frame(exc)
        raise TraceError(
            f"torch.fx cannot trace {type(model).__name__}: {type(exc).__name__}: {exc}"
            + (f"\n  failing construct: {where}" if where else "")
            + "\n  workarounds: make the offending submodule a leaf (sparsify(..., leaf_modules=[TheModule] or "
            "['its.qualified.name']); its layers are still pruned, with the module run as a unit), or fix the "
            "branch with "
            "concrete_args={'arg': value}; or pass a torch.fx.GraphModule you traced yourself."
        ) from exc
    return torch.fx.GraphModule(tracer.root, graph, type(model).__name__)
