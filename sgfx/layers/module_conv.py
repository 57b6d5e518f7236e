"""Conv subclasses with their own ``forward`` (timm's ``Conv2dSame``, ``StdConv2d``, ``ScaledStdConv2d``...), kept
whole as leaf modules and still pruned.

Such a module may pad at run time (TensorFlow "same" padding, whose amount depends on the input size and makes
symbolic tracing fail) or compute the weight it convolves with (weight standardisation). sgfx does not trace into
it: it runs the module's own ``forward`` with a :class:`torch.overrides.TorchFunctionMode` that records the one
``F.conv*d`` call inside, and so learns the conv's *actual* input (after run-time padding) and arguments. The
Hessian is built from that input. A module whose conv receives its parameter unchanged is pruned like a plain
conv. A module that transforms its weight first (standardisation) cannot be pruned in place, because zeros in the
raw parameter would not stay zeros: it is reported with that reason, unless the user allowed folding the
transformed weight into a plain conv (:func:`fold_weight_transforms`, inference only).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .base import LayerUnsupported, register
from .paths import set_path
from .conv import _CONV_ARGS, ConvLayer, as_tuple, is_plain_conv

__all__ = ["ModuleConvLayer", "capture_conv_call", "has_own_forward", "fold_weight_transforms"]

_CONV_FUNCTIONS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}


def has_own_forward(module: nn.Module) -> bool:
    """An ``nn.Conv1d/2d/3d`` subclass that overrides ``forward``."""
    return isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and not is_plain_conv(module)


class _ConvRecorder(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls: list[dict[str, Any]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _CONV_FUNCTIONS:
            self.calls.append({**dict(zip(_CONV_ARGS, args)), **kwargs})
        return func(*args, **kwargs)


def capture_conv_call(module: nn.Module, x: torch.Tensor) -> tuple[dict[str, Any], torch.Tensor]:
    """Run ``module(x)``; return the arguments of the single conv call inside it and the module's output.

    Raises:
        LayerUnsupported: the forward makes no conv call or several.
    """
    recorder = _ConvRecorder()
    with recorder:
        output = module(x)
    if len(recorder.calls) != 1:
        raise LayerUnsupported(f"{type(module).__name__}.forward makes {len(recorder.calls)} conv calls (one "
                               "is needed to prune it as a unit)")
    return recorder.calls[0], output


@register
class ModuleConvLayer(ConvLayer):
    """A conv subclass with its own forward: the kernel input and geometry come from its recorded conv call."""

    module_types = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    functions = {}

    def __init__(self, name: str, module: nn.Module):
        super().__init__(name, module.weight, module.stride, 0, module.dilation, module.groups,
                         weight_name=f"{name}.weight", op=f"{type(module).__name__}")
        self.module = module
        self._captured = False

    @classmethod
    def accepts_module(cls, module: nn.Module) -> bool:
        return has_own_forward(module)

    @classmethod
    def build_from_module(cls, name: str, module: nn.Module) -> "ModuleConvLayer":
        return cls(name, module)

    def kernel_input(self, x: torch.Tensor) -> torch.Tensor:
        call, _ = capture_conv_call(self.module, x)
        if call["weight"] is not self.module.weight:
            raise LayerUnsupported(
                f"{type(self.module).__name__}.forward transforms its weight before the conv (e.g. weight "
                "standardisation), so zeros in the parameter would not stay zeros: pass fold_weight_transforms=True "
                "to fold the transformed weight into a plain conv (inference only) and prune that")
        stride, padding = call.get("stride", 1), call.get("padding", 0)
        dilation, groups = call.get("dilation", 1), call.get("groups", 1)
        if not self._captured:
            self.set_geometry(stride, padding, dilation, groups)
            self._captured = True
        elif (as_tuple(stride, self.dims), as_tuple(dilation, self.dims), int(groups)) != (
                self.stride, self.dilation, self.groups):
            raise LayerUnsupported(f"{type(self.module).__name__}: its conv geometry changes between calls")
        return call["input"]



def fold_weight_transforms(gm: torch.fx.GraphModule, inputs: dict[str, torch.Tensor]) -> list[str]:
    """Replace every conv-subclass module of ``gm`` whose forward transforms its weight (and otherwise only runs
    one conv on its input, possibly padded) by a plain ``nn.Conv*d`` holding the transformed weight, in place.

    ``inputs`` maps module names to one batch of their input (recorded by the caller). Returns the names of the
    modules folded. Inference only: the folded conv no longer standardises its weight when trained.
    """
    folded = []
    for name, module in list(gm.named_modules()):
        if not has_own_forward(module) or name not in inputs:
            continue
        x = inputs[name]
        call, output = capture_conv_call(module, x)
        if call["weight"] is module.weight:
            continue
        if call["input"] is not x:  # run-time padding in front of the conv: a plain conv cannot replace it
            continue
        dims, padding = x.dim() - 2, call.get("padding", 0)
        weight = call["weight"].detach()
        plain = getattr(nn, f"Conv{dims}d")(
            weight.shape[1] * call.get("groups", 1), weight.shape[0], tuple(weight.shape[2:]),
            stride=call.get("stride", 1), padding=padding, dilation=call.get("dilation", 1),
            groups=call.get("groups", 1), bias=call.get("bias") is not None, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            plain.weight.copy_(weight)
            if plain.bias is not None:
                plain.bias.copy_(call["bias"].detach())
            if not torch.allclose(plain(x), output, rtol=1e-4, atol=1e-5):
                continue  # the forward does more than one conv: leave it
        plain.train(module.training)
        set_path(gm, name, plain)
        folded.append(name)
    return folded
