"""Sparsity patterns and the frozen configuration of :func:`sgfx.sparsify`.

Everything a user types is parsed and validated here, at the API boundary, so that the passes below can
trust their inputs. Strings follow NVIDIA's convention: ``"2:4"`` keeps *at most* 2 nonzeros in every 4
consecutive weights. Floats are unstructured fractions of weights set to zero.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any, Union

import torch

from .memory import parse_bytes
__all__ = [
    "NMPattern",
    "Unstructured",
    "Pattern",
    "parse_pattern",
    "SparsifyConfig",
    "METHODS",
]

METHODS = ("sparsegpt", "magnitude", "wanda")
AUGMENTATIONS = (None, "hflip")
STATS_CORRECTIONS = ("off", "mean", "mean_std")
ALLOCATIONS = ("uniform", "global")
TARGETS = ("weights", "flops")

# What ``None`` (the default) resolves to: the best combination measured on the seed models (docs/RESULTS.md).
DEFAULT_DENSE_TARGETS = True  # for method="sparsegpt"
DEFAULT_PERMUTE_CHANNELS = True  # for N:M patterns
DEFAULT_STATS_CORRECTION = "mean"

_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_ACCEPTED = (
    'accepted: an "N:M" string with integers 0 < N < M (e.g. "2:4", "1:4", "4:8": at most N nonzeros in '
    "every M consecutive weights), or a float in (0, 1) giving the unstructured fraction of weights to zero"
)


@dataclass(frozen=True)
class NMPattern:
    """At most ``n`` nonzeros in every ``m`` consecutive weights (along input channels)."""

    n: int
    m: int

    def __post_init__(self) -> None:
        for name, value in (("n", self.n), ("m", self.m)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"NMPattern.{name} must be an int, got {type(value).__name__}")
        if not 0 < self.n < self.m:
            raise ValueError(f"invalid N:M pattern {self.n}:{self.m}; {_ACCEPTED}")

    @property
    def n_pruned(self) -> int:
        """Weights zeroed in every group of ``m``."""
        return self.m - self.n

    @property
    def sparsity(self) -> float:
        return self.n_pruned / self.m

    def implies(self, other: "NMPattern") -> bool:
        """Whether every weight following this pattern also follows ``other`` (groups aligned from channel 0).

        E.g. 1:2, 1:4, 1:8 and 2:8 imply 2:4; 4:8 and 3:4 do not (three nonzeros can share one run of four).
        """
        if other.m % self.m == 0:  # each run of other.m holds other.m/m whole groups
            return self.n * (other.m // self.m) <= other.n
        if self.m % other.m == 0:  # each run of other.m lies inside one group
            return min(self.n, other.m) <= other.n
        return False

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


@dataclass(frozen=True)
class Unstructured:
    """Zero a fraction ``sparsity`` of a layer's weights, anywhere."""

    sparsity: float

    def __post_init__(self) -> None:
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)):
            raise TypeError(f"unstructured sparsity must be a float, got {type(self.sparsity).__name__}")
        if not 0.0 < float(self.sparsity) < 1.0:
            raise ValueError(f"invalid sparsity {self.sparsity!r}; {_ACCEPTED}")

    def __str__(self) -> str:
        return f"{float(self.sparsity):.0%} unstructured"


Pattern = Union[NMPattern, Unstructured]


def parse_pattern(spec: Any) -> Pattern:
    """Parse ``"N:M"``, a float in (0, 1), or an already-built pattern.

    Raises:
        ValueError: a string or number that is not a valid pattern.
        TypeError: anything that is neither a string nor a number.
    """
    if isinstance(spec, (NMPattern, Unstructured)):
        return spec
    if isinstance(spec, str):
        match = _NM_RE.match(spec)
        if match is None:
            raise ValueError(f"invalid sparsity pattern {spec!r}; {_ACCEPTED}")
        return NMPattern(int(match.group(1)), int(match.group(2)))
    if isinstance(spec, bool) or not isinstance(spec, (int, float)):
        raise TypeError(f"sparsity must be a str or float, got {type(spec).__name__}; {_ACCEPTED}")
    return Unstructured(float(spec))


def _as_name_tuple(value: Any, option: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(f"{option} must be a string or a list of strings, got {type(value).__name__}") from None
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"{option} must contain strings, got {type(item).__name__}")
    return items


@dataclass(frozen=True)
class SparsifyConfig:
    """Every option of :func:`sgfx.sparsify`, validated on construction.

    Args:
        sparsity: ``"N:M"`` string, float in (0, 1), or a parsed pattern; stored parsed.
        method: ``"sparsegpt"`` (OBS with weight updates), ``"wanda"`` (``|w|·‖x‖``, no update) or ``"magnitude"``.
        blocksize: columns per lazy-update block of the OBS solve.
        percdamp: damping added to the Hessian diagonal, as a fraction of its mean.
        skip: layer names or glob patterns (``fnmatch``) to leave dense.
        device: where calibration and the OBS solves run (``None``: the model's own device).
        leaf_modules: module types or qualified names the tracer must not enter.
        concrete_args: forwarded to ``torch.fx.Tracer.trace`` to specialise control flow.
        max_damping_retries: how many times damping is multiplied by 10 when Cholesky fails.
        bn_reestimate: re-estimate the statistics of BatchNorms after pruned layers from the calibration data
            (``None``: on whenever the model has such a BatchNorm).
        dense_targets: fit each pruned layer to the *dense* model's outputs (``‖W X_dense − Ŵ X_pruned‖``) rather
            than to ``W X_pruned``, where its calibration samples cover its columns; runs the dense model alongside
            (twice the activations). SparseGPT only. ``None``: on for SparseGPT.
        augment: ``"hflip"`` adds the horizontal mirror of every calibration image (4-D inputs), doubling a small
            calibration set; ``None`` uses the data as given.
        stats_correction: ``"mean"`` restores each pruned layer's per-channel output mean to the dense model's
            (through its bias), ``"mean_std"`` also its standard deviation (by scaling the channel); layers whose
            only consumer is a re-estimated BatchNorm, or with fewer samples than columns, are left alone. Runs the
            dense model alongside. ``"off"`` (or ``False``) disables it; ``None``: ``"mean"``.
        permute_channels: before calibration, reorder the channels between each prunable producer and its
            consumers (found through the graph; the function is unchanged) so that N:M groups keep more saliency.
            N:M patterns only. ``None``: on for N:M patterns.
        allocation: ``"uniform"`` (every layer at ``sparsity``) or ``"global"`` (unstructured only: per-layer levels
            chosen from measured error curves so that ``sparsity`` of all prunable weights, or FLOPs, is pruned;
            with ``method="magnitude"``, one global |w| threshold).
        budget: N:M only: the fraction of prunable weights (or FLOPs) that must be N:M; the layers whose N:M
            error is largest stay dense (``None``: every eligible layer is N:M).
        target: what ``allocation="global"`` and ``budget`` count: ``"weights"`` or ``"flops"`` (multiply-adds).
        fold_weight_transforms: replace conv subclasses that transform their weight in ``forward`` (weight
            standardisation, e.g. NFNets' ``ScaledStdConv2d``) by a plain conv holding the transformed weight, so
            that it can be pruned (inference only: the result no longer standardises when trained). ``False``
            leaves such layers dense, with the reason in the report.
        max_memory: host memory the calibration run may use, in bytes or as a string (``"8GB"``, ``"7.5GiB"``);
            activations beyond it spill to disk. ``None``: the memory in use at the start plus 75 % of what the
            machine has available then.
        spill_dir: where activations spill (a temporary directory inside it, removed at the end); ``None``: the
            system's temporary directory.

    ``None`` options resolve, on construction, to the best combination measured on the seed models
    (``docs/RESULTS.md``); the stored config holds the resolved values.

    Example:
        >>> SparsifyConfig("2:4", skip=["fc*"]).sparsity
        NMPattern(n=2, m=4)
    """

    sparsity: Any = "2:4"
    method: str = "sparsegpt"
    blocksize: int = 128
    percdamp: float = 0.01
    skip: tuple[str, ...] = ()
    device: Any = None
    leaf_modules: tuple[Any, ...] = ()
    concrete_args: dict[str, Any] | None = field(default=None, compare=False)
    max_damping_retries: int = 6
    bn_reestimate: bool | None = None
    dense_targets: bool | None = None
    augment: str | None = None
    stats_correction: str | bool | None = None
    permute_channels: bool | None = None
    allocation: str = "uniform"
    budget: float | None = None
    target: str = "weights"
    fold_weight_transforms: bool = False
    max_memory: int | str | None = None
    spill_dir: str | None = None

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        set_("sparsity", parse_pattern(self.sparsity))
        if not isinstance(self.method, str) or self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; accepted: {', '.join(METHODS)}")
        if isinstance(self.blocksize, bool) or not isinstance(self.blocksize, int) or self.blocksize < 1:
            raise ValueError(f"blocksize must be a positive int, got {self.blocksize!r}")
        if isinstance(self.sparsity, NMPattern) and self.blocksize % self.sparsity.m:
            raise ValueError(
                f"blocksize {self.blocksize} must be a multiple of M={self.sparsity.m} so that no N:M group "
                "straddles two blocks"
            )
        if isinstance(self.percdamp, bool) or not isinstance(self.percdamp, (int, float)) or not (
            0.0 <= self.percdamp < 10.0
        ):
            raise ValueError(f"percdamp must be a float in [0, 10), got {self.percdamp!r}")
        set_("skip", _as_name_tuple(self.skip, "skip"))
        leaf = () if self.leaf_modules is None else tuple(self.leaf_modules)
        for item in leaf:
            if not (isinstance(item, str) or (isinstance(item, type) and issubclass(item, torch.nn.Module))):
                raise TypeError(f"leaf_modules entries must be nn.Module subclasses or names, got {item!r}")
        set_("leaf_modules", leaf)
        if self.concrete_args is not None and not isinstance(self.concrete_args, dict):
            raise TypeError(f"concrete_args must be a dict, got {type(self.concrete_args).__name__}")
        if self.device is not None:
            try:
                device = torch.device(self.device)
            except (RuntimeError, TypeError) as exc:
                raise ValueError(f"invalid device {self.device!r}: {exc}") from None
            if device.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(f"device {self.device!r} requested but CUDA is not available here")
            set_("device", device)
        if self.bn_reestimate is not None and not isinstance(self.bn_reestimate, bool):
            raise TypeError(f"bn_reestimate must be True, False or None, got {self.bn_reestimate!r}")
        if self.dense_targets is None:
            set_("dense_targets", DEFAULT_DENSE_TARGETS and self.method == "sparsegpt")
        if not isinstance(self.dense_targets, bool):
            raise TypeError(f"dense_targets must be True, False or None, got {self.dense_targets!r}")
        if self.dense_targets and self.method != "sparsegpt":
            raise ValueError(f"dense_targets needs method='sparsegpt' (it changes the weights), got {self.method!r}")
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"unknown augment {self.augment!r}; accepted: None, " + ", ".join(AUGMENTATIONS[1:]))
        if self.stats_correction is None:
            set_("stats_correction", DEFAULT_STATS_CORRECTION)
        elif self.stats_correction is False:
            set_("stats_correction", "off")
        if not isinstance(self.stats_correction, str) or self.stats_correction not in STATS_CORRECTIONS:
            raise ValueError(f"unknown stats_correction {self.stats_correction!r}; accepted: None (default), False, "
                             + ", ".join(STATS_CORRECTIONS))
        if self.permute_channels is None:
            set_("permute_channels", DEFAULT_PERMUTE_CHANNELS and isinstance(self.sparsity, NMPattern))
        if not isinstance(self.permute_channels, bool):
            raise TypeError(f"permute_channels must be True, False or None, got {self.permute_channels!r}")
        if self.permute_channels and not isinstance(self.sparsity, NMPattern):
            raise ValueError(f"permute_channels needs an N:M pattern (it regroups channels), got {self.sparsity}")
        if not isinstance(self.max_damping_retries, int) or self.max_damping_retries < 0:
            raise ValueError(f"max_damping_retries must be a non-negative int, got {self.max_damping_retries!r}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"unknown allocation {self.allocation!r}; accepted: {', '.join(ALLOCATIONS)}")
        if self.allocation == "global" and not isinstance(self.sparsity, Unstructured):
            raise ValueError(f"allocation='global' chooses unstructured levels per layer; for {self.sparsity} use "
                             "budget=... (which layers are N:M and which stay dense)")
        if self.budget is not None:
            if isinstance(self.budget, bool) or not isinstance(self.budget, (int, float)) or not 0 < self.budget <= 1:
                raise ValueError(f"budget must be a fraction in (0, 1], got {self.budget!r}")
            if not isinstance(self.sparsity, NMPattern):
                raise ValueError("budget applies to N:M patterns (which layers are N:M); for unstructured sparsity "
                                 "use allocation='global'")
            set_("budget", float(self.budget))
        if self.target not in TARGETS:
            raise ValueError(f"unknown target {self.target!r}; accepted: {', '.join(TARGETS)}")
        if not isinstance(self.fold_weight_transforms, bool):
            raise TypeError(f"fold_weight_transforms must be True or False, got {self.fold_weight_transforms!r}")
        if self.max_memory is not None:
            set_("max_memory", parse_bytes(self.max_memory))
        if self.spill_dir is not None:
            if not isinstance(self.spill_dir, (str, os.PathLike)):
                raise TypeError(f"spill_dir must be a path, got {type(self.spill_dir).__name__}")
            if not os.path.isdir(self.spill_dir):
                raise ValueError(f"spill_dir {str(self.spill_dir)!r} is not an existing directory")
            set_("spill_dir", os.fspath(self.spill_dir))

    def replace(self, **changes: Any) -> "SparsifyConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
