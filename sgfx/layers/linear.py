"""``nn.Linear`` and ``F.linear`` (and aten's linear): weight (out, in), one input vector per row of the input."""

from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .base import PrunableLayer, register

__all__ = ["LinearLayer"]


@register
class LinearLayer(PrunableLayer):
    """Solve layout: the weight itself, (out, in); N:M groups along ``in_features``."""

    module_types = (nn.Linear,)
    functions = {F.linear: ("input", "weight", "bias"), torch._C._nn.linear: ("input", "weight", "bias"),
                 torch.ops.aten.linear.default: ("input", "weight", "bias")}
    channel_dim = -1

    @classmethod
    def build_from_module(cls, name: str, module: nn.Module) -> "LinearLayer":
        return cls(name, "Linear", module.weight, f"{name}.weight")

    @classmethod
    def from_call(cls, name: str, weight: torch.Tensor, bound: dict[str, Any], target: Any) -> "LinearLayer | None":
        return cls(name, "Linear", weight, name) if weight.dim() == 2 else None

    @property
    def columns(self) -> int:
        return self.weight.shape[1]

    def solve_matrices(self) -> list[torch.Tensor]:
        return [self.weight.detach()]

    def write_back(self, matrices: list[torch.Tensor]) -> None:
        with torch.no_grad():
            self.weight.copy_(matrices[0].to(self.weight.device, self.weight.dtype))

    def _check(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.columns:
            raise ValueError(f"{self.name}: input last dim {x.shape[-1]} != in_features {self.columns}")

    def kernel_input(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return x

    def rows(self, kernel_x: torch.Tensor, chunk_elements: int) -> Iterator[torch.Tensor]:
        flat = kernel_x.detach().float().reshape(-1, self.columns)
        step = max(1, chunk_elements // self.columns)
        for start in range(0, flat.shape[0], step):
            yield flat[start:start + step].unsqueeze(0)

    def forward_with(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight)

    def output_input_product(self, x: torch.Tensor, grad: torch.Tensor) -> list[torch.Tensor]:
        return [grad.reshape(-1, grad.shape[-1]).T @ x.reshape(-1, x.shape[-1])]
