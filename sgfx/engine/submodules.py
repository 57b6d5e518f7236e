"""``sparsify(..., submodules=[...] | "auto")``: prune models that cannot be traced whole, one submodule at a time.

Why: detection models (torchvision's Faster R-CNN, RetinaNet, SSD; YOLO code bases) run data-dependent
post-processing (anchor matching, NMS) that symbolic tracing cannot follow, while nearly all of their weights sit in
backbones, necks and heads that trace fine. sgfx therefore traces each named submodule on its own and calibrates
it on the inputs it really receives: the *whole* model runs on the calibration data (``model(item)`` for every
item, exactly as given) while a forward pre-hook records the submodule's arguments, whatever they are (tensors,
lists, dicts of FPN features, ``ImageList``). Submodules are pruned in the model's execution order and each one is
swapped for its pruned GraphModule before the next is recorded, so later submodules see the outputs of the already
pruned earlier ones (sequential calibration across submodules, as within one graph). The result is a deep copy of
the model, of its own type, whose ``forward`` (post-processing included) still runs.

``"auto"`` picks the largest submodules that trace *and* reproduce their own outputs on the first calibration item
(a graph that traced but baked in a branch is rejected), descending into the children of those that do not, and
reports what it chose and what it could not trace.
"""

from __future__ import annotations

import copy
import inspect
import logging
import time
import warnings
from typing import Any, Iterable

import torch
from torch import nn
from torch.fx import PH
from torch.utils._pytree import tree_map

from ..runtime.calibration import CallInputs, calibration_items, check_call_inputs, tensors_of
from ..config import SparsifyConfig
from .inventory import dense_summary, is_weight
from ..layers.paths import set_path
from ..passes.trace import TraceError, trace
from .pipeline import prune_graph
from ..report import LayerRecord, SparsityReport, attach_report, find_report

__all__ = ["sparsify_submodules", "choose_submodules"]

logger = logging.getLogger(__name__)


def _items(calib: Any) -> list[Any]:
    items = list(calibration_items(calib, "model inputs"))
    if not items:
        raise ValueError("calibration data is empty: pass at least one input for the model")
    return items


def _run(model: nn.Module, item: Any) -> Any:
    with torch.no_grad():
        return model(item)


def _record_calls(model: nn.Module, names: list[str], items: list[Any]) -> dict[str, list[CallInputs]]:
    """Every call of each named submodule while ``model`` runs on ``items``: its positional and keyword inputs."""
    calls: dict[str, list[CallInputs]] = {name: [] for name in names}
    handles = [model.get_submodule(name).register_forward_pre_hook(
        lambda m, args, kwargs, name=name: calls[name].append(CallInputs(tuple(args), dict(kwargs))),
        with_kwargs=True) for name in names]
    try:
        for item in items:
            _run(model, item)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _first_calls(model: nn.Module, item: Any) -> tuple[list[str], dict[str, tuple[CallInputs, Any]]]:
    """The order in which modules are first called on ``item``, and each one's first (inputs, output)."""
    order, first = [], {}

    def pre(name):
        def hook(module, args, kwargs):
            if name not in first:
                order.append(name)
                first[name] = (CallInputs(tuple(args), dict(kwargs)), None)
        return hook

    def post(name):
        def hook(module, args, kwargs, output):
            inputs, seen = first[name]
            if seen is None:
                first[name] = (inputs, output)
        return hook

    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(pre(name), with_kwargs=True))
        handles.append(module.register_forward_hook(post(name), with_kwargs=True))
    try:
        _run(model, item)
    finally:
        for handle in handles:
            handle.remove()
    return order, first


def positional(module: nn.Module, call: CallInputs) -> CallInputs:
    """A recorded call with every argument bound positionally to ``module.forward``'s parameters (defaults
    filled), as the traced graph's placeholders take them."""
    signature = inspect.signature(module.forward)
    bound = signature.bind(*call.args, **call.kwargs)
    bound.apply_defaults()
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in signature.parameters.values()):
        return call
    return CallInputs(tuple(bound.arguments[name] for name in signature.parameters))


def structured_args(module: nn.Module, call: CallInputs) -> dict[str, Any]:
    """``concrete_args`` that trace ``module`` on inputs shaped like ``call``: lists, tuples and dicts of tensors
    become pytrees of placeholders (``torch.fx.PH``: the graph takes the same structure and flattens it); tensors
    stay symbolic; other values (None, flags) are fixed to the recorded ones."""
    concrete = {}
    names = list(inspect.signature(module.forward).parameters)
    for name, value in zip(names, call.args):
        if isinstance(value, torch.Tensor):
            continue
        if isinstance(value, (list, tuple, dict)) and tensors_of(value):
            concrete[name] = tree_map(lambda leaf: PH if isinstance(leaf, torch.Tensor) else leaf, value)
        elif tensors_of(value):  # e.g. torchvision's ImageList: fixing it would bake the first call's tensors in
            raise TypeError(f"{type(module).__name__}.forward takes {name!r} as a {type(value).__name__} holding "
                            "tensors, which cannot be a traced graph input (tensors, and lists/tuples/dicts of "
                            "them, can): name its children instead")
        else:
            concrete[name] = value
    return concrete


def _same_outputs(a: Any, b: Any) -> bool:
    ta, tb = tensors_of(a), tensors_of(b)
    return len(ta) == len(tb) and len(ta) > 0 and all(
        x.shape == y.shape and torch.allclose(x.float(), y.float(), rtol=1e-4, atol=1e-5) for x, y in zip(ta, tb))


def _has_weights(module: nn.Module) -> bool:
    return any(is_weight(p) for p in module.parameters())


def _try_graph(module: nn.Module, call: tuple[CallInputs, Any], config: SparsifyConfig) -> tuple[Any, str]:
    """(traced GraphModule, "") when ``module`` traces and the graph reproduces its first call; else (None, why)."""
    inputs, output = call
    try:
        inputs = positional(module, inputs)
        gm = trace(module, config.leaf_modules, structured_args(module, inputs))
    except (TraceError, TypeError) as exc:
        return None, str(exc).splitlines()[0]
    try:
        with torch.no_grad():
            replayed = gm(*inputs.args)
    except Exception as exc:  # the graph does not run on the real inputs
        return None, f"the traced graph fails on the recorded inputs ({type(exc).__name__}: {exc})"
    if not _same_outputs(replayed, output):
        return None, "the traced graph does not reproduce the module's outputs (control flow was baked in)"
    return gm, ""


def choose_submodules(model: nn.Module, item: Any, config: SparsifyConfig) -> tuple[list[str], dict[str, str]]:
    """The largest proper submodules of ``model`` that trace and reproduce their outputs on ``item`` (execution
    order), and {name: reason} for the modules with weights that could not be used. (A model that traces whole is
    better pruned without ``submodules=``; here its children are taken.)"""
    order, first = _first_calls(model, item)
    chosen, refused = [], {}

    def visit(name: str, module: nn.Module) -> None:
        if not _has_weights(module):
            return
        if name not in first:
            refused[name] = "never called on the calibration data"
            return
        if name:  # the model itself is never a candidate: the result keeps its class, its children are traced
            gm, why = _try_graph(module, first[name], config)
            if gm is not None:
                chosen.append(name)
                return
            refused[name] = why
        for child_name, child in module.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child)

    visit("", model)
    return sorted(chosen, key=order.index), refused


def _check_names(model: nn.Module, submodules: Iterable[str]) -> list[str]:
    """The names (validated as strings by :class:`SparsifyConfig`), checked against ``model``."""
    names = list(submodules)
    for name in names:
        try:
            model.get_submodule(name)
        except AttributeError:
            children = ", ".join(n for n, _ in model.named_children())
            raise ValueError(f"submodule {name!r} does not exist in {type(model).__name__} (its children: "
                             f"{children})") from None
        if name == "":
            raise ValueError("submodules names must not be empty (use sgfx.sparsify without submodules)")
    for a in names:
        for b in names:
            if a != b and b.startswith(a + "."):
                raise ValueError(f"submodules {a!r} and {b!r} overlap: name each weight once")
    if len(set(names)) != len(names):
        raise ValueError("submodules lists a name twice")
    return names


def _prefixed(record: LayerRecord, prefix: str) -> LayerRecord:
    record = copy.copy(record)
    record.name, record.weight_name = f"{prefix}.{record.name}", f"{prefix}.{record.weight_name}"
    return record


def _chosen_names(owned: nn.Module, item: Any, config: SparsifyConfig) -> tuple[list[str], dict[str, str]]:
    """The submodules to prune, in execution order, and (``"auto"``) those refused with why."""
    refused: dict[str, str] = {}
    if config.submodules == "auto":
        names, refused = choose_submodules(owned, item, config)
        if not names:
            raise TraceError(f"submodules='auto' found no traceable submodule with weights in "
                             f"{type(owned).__name__}: " + "; ".join(f"{k}: {v}" for k, v in refused.items()))
        logger.info("submodules='auto' could not use: %s", refused)
        logger.info("submodules='auto' chose %s", names)
    else:
        names = _check_names(owned, config.submodules)
    order, _ = _first_calls(owned, item)
    never = [n for n in names if n not in order]
    if never:
        raise ValueError(f"submodule(s) {never} never called while {type(owned).__name__} ran on the first "
                         "calibration item: nothing to calibrate them on")
    return sorted(names, key=order.index), refused


def _merge(result: SparsityReport, part: SparsityReport, name: str, calls: int, per_forward: float) -> None:
    """Add a submodule's report to the whole model's, its names prefixed with the submodule's."""
    result.layers += [_prefixed(r, name) for r in part.layers]
    for listed in ("bn_reestimated", "stats_corrected", "opened_attention", "folded"):
        getattr(result, listed).extend(f"{name}.{n}" for n in getattr(part, listed))
    result.kept_whole.update({f"{name}.{k}": v for k, v in part.kept_whole.items()})
    result.permuted += [{**g, "producer": f"{name}.{g['producer']}"} for g in part.permuted]
    result.submodules.append({"name": name, "calls": calls, "calls_per_forward": per_forward,
                              "note": (f"called {per_forward:g} times per forward: the inputs of all calls are "
                                       "concatenated into its calibration set") if per_forward != 1 else ""})


def _prune_submodule(owned: nn.Module, name: str, items: list[Any], config: SparsifyConfig, callback, progress,
                     training: bool) -> tuple[SparsityReport, int, float]:
    """Trace submodule ``name`` of ``owned``, prune it on the calls recorded while ``owned`` runs on ``items`` and
    swap it in; returns its report, its call count and calls per forward."""
    sub = owned.get_submodule(name)
    calls = [positional(sub, c) for c in _record_calls(owned, [name], items)[name]]
    check_call_inputs(calls)
    try:
        gm = trace(sub, config.leaf_modules, structured_args(sub, calls[0]))
    except (TraceError, TypeError) as exc:
        raise TraceError(f"submodule {name!r}: {exc}") from exc
    gm.train(False)
    prune_graph(gm, calls, config, callback, progress, warn_dense=False)
    gm.train(training)
    set_path(owned, name, gm)
    part = find_report(gm)
    logger.info("submodule %s: %d calls recorded, %d weights pruned", name, len(calls), len(part.pruned_layers))
    return part, len(calls), len(calls) / len(items)


def _outside_records(owned: nn.Module, result: SparsityReport, refused: dict[str, str],
                     config: SparsifyConfig) -> list[LayerRecord]:
    """A skipped record for every weight outside the pruned submodules, with why."""
    covered = {r.weight_name for r in result.layers}
    records = []
    for weight_name, param in owned.named_parameters():
        if is_weight(param) and weight_name not in covered:
            reason = "outside the submodules sgfx traced"
            owners = [bad for bad in refused if weight_name.startswith(bad + ".")]
            if owners:  # the innermost module auto could not trace
                bad = max(owners, key=len)
                reason = f"in {bad}, not traceable on its own: {refused[bad]}"
            records.append(LayerRecord(weight_name, "parameter", tuple(param.shape), str(config.sparsity),
                                       config.method, "skipped", reason, weight_name=weight_name,
                                       sparsity=float((param == 0).float().mean())))
    return records


def sparsify_submodules(model: nn.Module, calib: Any, config: SparsifyConfig, callback=None,
                        progress: bool | None = False) -> nn.Module:
    """See :func:`sgfx.sparsify` (``submodules=``, in ``config``)."""
    started = time.perf_counter()
    if config.augment is not None:
        raise ValueError("augment is not supported with submodules= (calibration items are passed as given)")
    items = _items(calib)
    owned = copy.deepcopy(model)
    was_training = owned.training
    owned.eval()
    names, refused = _chosen_names(owned, items[0], config)
    result = SparsityReport(str(config.sparsity), config.method)
    for name in names:
        part, calls, per_forward = _prune_submodule(owned, name, items, config, callback, progress, was_training)
        _merge(result, part, name, calls, per_forward)
    result.layers += _outside_records(owned, result, refused, config)
    result.refused_submodules = refused
    owned.train(was_training)
    result.total_s = time.perf_counter() - started
    attach_report(owned, result)
    summary = dense_summary(owned, result)
    if summary:
        warnings.warn(summary, UserWarning, stacklevel=3)
    return owned
