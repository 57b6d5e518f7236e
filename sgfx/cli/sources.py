"""Models for the command line: where a model comes from, and its weights, without unpickling code silently.

Sources: ``torchvision:NAME`` and ``timm:NAME`` (architectures, random weights unless ``weights`` is given), a
``torch.export`` program (``.pt2``), a TorchScript archive (converted to a ``torch.export`` program, which needs an
example input size), an ``.sgfx`` file, or, only with ``trust_pickle=True``, a whole pickled ``nn.Module``
(unpickling runs code from the file). Weights: a state_dict file (``.pt``/``.pth`` read with ``weights_only=True``, or
``.safetensors``), loaded strictly. torchvision and timm also give the evaluation transform their weights expect.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx
from torch import nn

from .data import ImageTransform

__all__ = ["SourceError", "LoadedModel", "load_model", "load_weights"]

logger = logging.getLogger(__name__)


class SourceError(ValueError):
    """A model source or weights file that cannot be used as given."""


@dataclass
class LoadedModel:
    model: nn.Module
    transform: ImageTransform | None  # what the source's weights expect, when it says
    description: str


def _torchvision(name: str, num_classes: int | None) -> LoadedModel:
    import torchvision

    available = torchvision.models.list_models()
    if name not in available:
        close = difflib.get_close_matches(name, available, n=3)
        raise SourceError(f"torchvision has no model {name!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if "weights_backbone" in inspect.signature(torchvision.models.get_model_builder(name)).parameters:
        kwargs["weights_backbone"] = None  # detection/segmentation models: no download of a pretrained backbone
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    transform = None
    try:  # the default weights' evaluation transform (a description: nothing is downloaded)
        preset = torchvision.models.get_model_weights(name).DEFAULT.transforms()
        transform = ImageTransform(preset.crop_size[0], preset.resize_size[0], tuple(preset.mean), tuple(preset.std))
    except (ValueError, AttributeError, IndexError, TypeError):
        logger.info("torchvision:%s has no default weights' transform", name)
    return LoadedModel(model, transform, f"torchvision:{name}")


def _timm(name: str, num_classes: int | None) -> LoadedModel:
    try:
        import timm
        from timm.data import resolve_data_config
    except ImportError:
        raise ImportError(f"timm:{name} needs timm: pip install timm") from None
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        raise SourceError(f"timm has no model {name!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    model = timm.create_model(name, pretrained=False, **kwargs)
    config = resolve_data_config({}, model=model)
    channels, size = config["input_size"][0], config["input_size"][-1]
    transform = ImageTransform(size, int(size / config.get("crop_pct", 0.875)), tuple(config["mean"]),
                               tuple(config["std"]), channels)
    return LoadedModel(model, transform, f"timm:{name}")


def _from_program(program: torch.export.ExportedProgram) -> torch.fx.GraphModule:
    """A plain GraphModule of an exported program's graph. ``ExportedProgram.module()`` refuses ``.eval()`` and calls a
    ``_guards_fn`` that checks input shapes; sgfx runs the graph on its own calibration batches and saves only plain
    torch modules, so the guard call is left out."""
    module = program.module()
    graph = module.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            graph.erase_node(node)
    graph._codegen = torch.fx.graph.CodeGen()  # positional tensors in and out, as sgfx.save stores graphs
    output = next(n for n in graph.nodes if n.op == "output")
    out_spec = program.call_spec.out_spec
    if out_spec is not None and out_spec.is_leaf():
        output.args = (output.args[0][0],)  # a model returning one tensor, not a 1-tuple (others: a flat tuple)
    return torch.fx.GraphModule(module, graph, "ExportedModel")


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/", 1)[-1].startswith("code/") for name in archive.namelist())


def _from_file(path: Path, trust_pickle: bool, example_shape: tuple[int, ...] | None) -> LoadedModel:
    if path.suffix == ".sgfx":
        from ..serialization import load

        return LoadedModel(load(path), None, str(path))
    if path.suffix == ".pt2":
        program = torch.export.load(str(path))
        return LoadedModel(_from_program(program), None, str(path))
    if _is_torchscript(path):
        if example_shape is None:
            raise SourceError(f"{path} is TorchScript: converting it to a graph sgfx can prune needs an example "
                              "input shape (--size, or --input-shape)")
        from torch._export.converter import TS2EPConverter

        script = torch.jit.load(str(path), map_location="cpu")
        program = TS2EPConverter(script, (torch.zeros(example_shape),)).convert()
        return LoadedModel(_from_program(program), None, f"{path} (TorchScript)")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError) as exc:
        if not trust_pickle:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SourceError(
                f"{path} does not load safely as a state_dict, TorchScript or torch.export file ({reason}). If it is "
                "a pickled Python object, loading it runs code stored in the file: pass --trust-pickle if you trust "
                "it (or re-save the model with torch.export.save, or save its state_dict and name the "
                "architecture)") from exc
        logger.warning("unpickling %s with weights_only=False (--trust-pickle)", path)
        content = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(content, nn.Module):
        return LoadedModel(content, None, f"{path} (pickled module)")
    raise SourceError(f"{path} holds a {type(content).__name__} (a state_dict?), not a model: name the architecture "
                      f"(torchvision:NAME or timm:NAME) and pass this file as the weights")


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a state_dict file into ``model`` strictly (``.safetensors``, or ``.pt``/``.pth`` with weights_only).

    A checkpoint that wraps its state_dict under ``"state_dict"``, ``"model"`` or ``"model_state_dict"`` is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise SourceError(f"{path} is not a plain state_dict (weights_only loading refused it): {exc}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SourceError(f"{path} does not hold a state_dict of tensors")
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise SourceError(
            f"{path} does not match the model: {len(result.missing_keys)} missing keys "
            f"({', '.join(result.missing_keys[:3])}...), {len(result.unexpected_keys)} unexpected "
            f"({', '.join(result.unexpected_keys[:3])}...)")


def load_model(source: str, weights: str | Path | None = None, *, trust_pickle: bool = False,
               num_classes: int | None = None, example_shape: tuple[int, ...] | None = None) -> LoadedModel:
    """The model named by ``source``, in eval mode, with ``weights`` loaded when given.

    Raises:
        SourceError: unknown model name, missing file, a pickle without ``trust_pickle``, mismatched weights.
        ImportError: ``timm:`` without timm installed.
    """
    kind, _, name = source.partition(":")
    if kind == "torchvision" and name:
        loaded = _torchvision(name, num_classes)
    elif kind == "timm" and name:
        loaded = _timm(name, num_classes)
    else:
        path = Path(source)
        if not path.is_file():
            raise SourceError(f"{source!r} is neither torchvision:NAME, timm:NAME nor an existing file "
                              "(.pt2, TorchScript, .sgfx, or a pickled model with --trust-pickle)")
        loaded = _from_file(path, trust_pickle, example_shape)
    if weights is not None:
        load_weights(loaded.model, weights)
    loaded.model.eval()
    return loaded
