"""Dotted paths into a module tree (``"layer1.0.conv1.weight"``), read and written in one place for the package."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["get_path", "fetch_tensor", "set_path"]


def get_path(root: nn.Module, path: str) -> Any:
    """The attribute at dotted ``path`` under ``root`` (a submodule, parameter, buffer or plain attribute), or
    None when a step is missing."""
    value: Any = root
    for atom in path.split("."):
        value = getattr(value, atom, None)
    return value


def fetch_tensor(root: nn.Module, path: str) -> torch.Tensor | None:
    """The tensor at dotted ``path`` under ``root``, or None (missing, or not a tensor)."""
    value = get_path(root, path)
    return value if isinstance(value, torch.Tensor) else None


def set_path(root: nn.Module, path: str, value: Any, create: bool = False) -> None:
    """Put ``value`` at dotted ``path`` under ``root``: a module as a submodule, a parameter as a parameter, another
    tensor as a buffer. ``create`` adds empty modules for missing parents; else a missing parent raises
    ``AttributeError``."""
    parent, _, leaf = path.rpartition(".")
    owner = root
    for atom in parent.split(".") if parent else []:
        if create and not hasattr(owner, atom):
            owner.add_module(atom, nn.Module())
        owner = owner.get_submodule(atom)
    if isinstance(value, nn.Module):
        setattr(owner, leaf, value) if leaf in owner._modules else owner.add_module(leaf, value)
    elif isinstance(value, nn.Parameter):
        owner.register_parameter(leaf, value)
    elif isinstance(value, torch.Tensor):
        owner.register_buffer(leaf, value)
    else:
        setattr(owner, leaf, value)
