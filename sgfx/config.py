"""Sparsity patterns and the frozen configuration of :func:`sgfx.sparsify`: the one list of options.

Everything a user types is parsed and validated here, at the API boundary, so that the passes below can
trust their inputs. Each option is one :class:`SparsifyConfig` field declared with :func:`_option`: its default,
its documentation (rendered into the class docstring) and how the command line spells it; ``sgfx.sparsify``'s
keywords and ``sgfx sparsify``'s flags are derived from these fields. Strings follow NVIDIA's convention: ``"2:4"``
keeps *at most* 2 nonzeros in every 4 consecutive weights. Floats are unstructured fractions of weights set to zero.
"""

from __future__ import annotations

import dataclasses
import os
import re
import textwrap
from dataclasses import dataclass, field
from typing import Any, Union

import torch

from .quantize import ACTIVATION_METHODS, QUANTIZE_MODES
from .runtime.memory_format import MEMORY_FORMATS
from .runtime.memory import parse_bytes
__all__ = ["NMPattern", "Unstructured", "Pattern", "parse_pattern", "SparsifyConfig", "build_config", "option_help",
           "METHODS"]

METHODS = ("sparsegpt", "magnitude", "wanda")
AUGMENTATIONS = (None, "hflip")
STATS_CORRECTIONS = ("off", "mean", "mean_std")
ALLOCATIONS = ("uniform", "global")
TARGETS = ("weights", "flops")

# What ``None`` (the default) resolves to: the best combination measured on the seed models (docs/RESULTS.md).
DEFAULT_DENSE_TARGETS = True  # for method="sparsegpt"
DEFAULT_PERMUTE_CHANNELS = True  # for N:M patterns
DEFAULT_STATS_CORRECTION = "mean"
EXACT_OBS_WORK = 2_000_000_000  # exact greedy OBS for N:M layers up to this many multiply-adds (about 1 s here)
RECONSTRUCT_BLOCK_LAYERS = 4  # reconstruct=: a module of the model is one block when it holds at most this many
# pruned layers

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
        if not 0.0 <= float(self.sparsity) < 1.0:  # 0.0 (nothing pruned) only with quantize=: SparsifyConfig checks
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


def _option(default: Any, doc: str, cli: dict[str, Any] | None = None, compare: bool = True) -> Any:
    """One option: a dataclass field with its documentation and its command-line form in the metadata.

    ``cli`` holds the flag's ``argparse`` settings by name (``kind``: ``"bool"``, ``"int"``, ``"float"``,
    ``"names"``, ``"text"``, ``"pattern"``; ``choices``; ``flag`` when the flag is not ``--the-field-name``;
    ``default``); ``None`` means the option cannot be typed on a command line (Python objects).
    """
    return field(default=default, compare=compare, metadata={"doc": doc, "cli": cli})


@dataclass(frozen=True)
class SparsifyConfig:
    """Every option of :func:`sgfx.sparsify`, validated on construction.

    ``None`` options resolve, on construction, to the best combination measured on the seed models
    (``docs/RESULTS.md``); the stored config holds the resolved values.

    Example:
        >>> SparsifyConfig("2:4", skip=["fc*"]).sparsity
        NMPattern(n=2, m=4)
    """

    sparsity: Any = _option("2:4", '``"N:M"`` (at most N nonzeros in every M consecutive input channels, e.g. '
                            '``"2:4"``), or a float in (0, 1) for unstructured sparsity; stored parsed.',
                            {"kind": "pattern", "flag": "--pattern", "default": "2:4"})
    method: str = _option("sparsegpt", '``"sparsegpt"`` (OBS with weight updates), ``"wanda"`` (``|w|·‖x‖``, no '
                          'update) or ``"magnitude"``.', {"choices": METHODS})
    blocksize: int = _option(128, "Columns per lazy-update block of the OBS solve.", {"kind": "int"})
    percdamp: float = _option(0.01, "Damping added to the Hessian diagonal, as a fraction of its mean.",
                              {"kind": "float"})
    exact_obs_work: int = _option(EXACT_OBS_WORK, "N:M layers whose exact greedy OBS solve (OBC) costs at most this "
                                  "many multiply-adds (rows x columns^3 / 2 per weight group, about a second per "
                                  "2e9 on 2 CPU cores) use it instead of SparseGPT's blocked solve: about half the "
                                  "reconstruction error on narrow layers. 0: SparseGPT everywhere. Not with INT8.",
                                  {"kind": "int"})
    max_damping_retries: int = _option(6, "How many times damping is multiplied by 10 when Cholesky fails.",
                                       {"kind": "int"})
    skip: tuple[str, ...] = _option((), 'Layer names or glob patterns (``fnmatch``) to leave dense, e.g. '
                                    '``["conv1", "fc*"]``.', {"kind": "names"})
    device: Any = _option(None, 'Where calibration (forward passes, Hessians) and the solves run, e.g. ``"cuda"``; '
                          "the model copy moves there for the run and the result is returned on the model's device. "
                          "``None``: where the model is.", {"kind": "text"})
    leaf_modules: tuple[Any, ...] = _option((), "Module types or qualified names the tracer must not enter (their "
                                            "layers are still pruned, by running each such module as a unit).")
    concrete_args: dict[str, Any] | None = _option(None, "Forwarded to ``torch.fx.Tracer.trace`` to specialise "
                                                   "Python control flow.", compare=False)
    submodules: Any = _option(None, "For models that cannot be traced whole (detection models): a list of "
                              "submodule names, each traced and pruned on its own in execution order with inputs "
                              "recorded while the *whole* model runs, or ``\"auto\"`` (the largest traceable "
                              "submodules). Each calibration item is then passed to the model as given, "
                              "``model(item)``.", {"kind": "names"})
    bn_reestimate: bool | None = _option(None, "Re-estimate the running statistics of every BatchNorm after a "
                                         "pruned layer from the calibration data, during the sweep (``None``: on "
                                         "whenever the model has such a BatchNorm).", {"kind": "bool"})
    dense_targets: bool | None = _option(None, "Fit each pruned layer to the *dense* model's outputs "
                                         "(``‖W X_dense − Ŵ X_pruned‖``) rather than to ``W X_pruned``, where its "
                                         "calibration samples cover its columns; runs the dense model alongside. "
                                         "SparseGPT only. ``None``: on for SparseGPT.", {"kind": "bool"})
    per_layer_targets: bool = _option(False, "With dense targets: hold out the last fifth of the calibration "
                                      "batches and keep dense targets only for the layers where, solved on the "
                                      "other batches, they give a lower held-out error ‖W X_dense − Ŵ X‖² than the "
                                      "plain target (two extra solves per such layer); each record's "
                                      "target_errors holds both errors.", {"kind": "bool"})
    augment: str | None = _option(None, '``"hflip"`` adds the horizontal mirror of every calibration image (4-D '
                                  "inputs; only valid where mirror images are valid inputs). ``None``: the data as "
                                  "given.", {"choices": AUGMENTATIONS[1:]})
    stats_correction: str | bool | None = _option(
        None, '``"mean"`` restores each pruned layer\'s per-channel output mean to the dense model\'s (through its '
        'bias), ``"mean_std"`` also its standard deviation (by scaling the channel); layers whose only consumer is '
        "a re-estimated BatchNorm, or with fewer samples than columns, are left alone. Runs the dense model "
        'alongside. ``"off"`` (or ``False``) disables it; ``None``: ``"mean"``.', {"choices": STATS_CORRECTIONS})
    permute_channels: bool | None = _option(None, "Before calibration, reorder the channels between each prunable "
                                            "producer and its consumers (the function is unchanged) so that N:M "
                                            "groups keep more saliency. N:M only; ``None``: on for N:M patterns.",
                                            {"kind": "bool"})
    reconstruct: int = _option(0, "Label-free block reconstruction after the sweep: Adam steps per block (a module "
                               f"of the model holding at most {RECONSTRUCT_BLOCK_LAYERS} pruned layers), each on one "
                               "calibration batch, fitting the block's kept weights, biases and BatchNorm affines to the dense model's "
                               "block outputs from the pruned model's block inputs; a block whose error on the "
                               "held-out last fifth of the batches does not fall is put back. Masks stay fixed; "
                               "no labels are read. ``0``: off. The report's ``reconstructed`` lists each block.",
                               {"kind": "int"})
    reconstruct_lr: float = _option(1e-3, "Adam's learning rate for ``reconstruct``.", {"kind": "float"})
    allocation: str = _option("uniform", '``"uniform"`` (every layer at ``sparsity``) or ``"global"`` '
                              "(unstructured only: per-layer levels from measured error curves so that exactly "
                              "``sparsity`` of all prunable weights, or FLOPs, is pruned; with "
                              '``method="magnitude"``, one global |w| threshold).', {"choices": ALLOCATIONS})
    budget: float | None = _option(None, "N:M only: the fraction of prunable weights (or FLOPs) that must be N:M; "
                                   "the layers whose N:M error is largest stay dense (``None``: every eligible "
                                   "layer is N:M).", {"kind": "float"})
    target: str = _option("weights", 'What ``allocation="global"`` and ``budget`` count: ``"weights"`` or '
                          '``"flops"`` (multiply-adds).', {"choices": TARGETS})
    accelerated_only: bool = _option(False, "N:M only: prune only the layers TensorRT's 2:4 kernels are known to "
                                     "run faster when sparse (Conv and Linear; not transposed convs, not depthwise "
                                     "convs); the others stay dense with that reason. The report gives the share of "
                                     "the prunable layers' multiply-adds that is N:M.", {"kind": "bool"})
    quantize: str | None = _option(None, '``"int8"``: also quantize every pruned layer as TensorRT\'s explicit INT8 '
                                   "runs it (weights symmetric per output channel, rounded inside the OBS solve so "
                                   "that the rounding error is compensated too and zeros stay zero; its input, and "
                                   "its output unless that is a graph output, per tensor, calibrated in sweep "
                                   "order); the model returned simulates the INT8 arithmetic and exports as QDQ "
                                   "ONNX. With sparsity ``0.0`` nothing is pruned (dense INT8). ``None``: float.",
                                   {"choices": QUANTIZE_MODES})
    activation_calibration: str = _option(ACTIVATION_METHODS[0], 'How each activation\'s INT8 scale is chosen: '
                                          '``"max"`` (max |x|, default: on the seed models it lost no more than '
                                          'the percentile) or ``"percentile"`` (99.99th percentile of |x|).',
                                          {"choices": ACTIVATION_METHODS})
    fold_weight_transforms: bool = _option(False, "Replace conv subclasses that transform their weight in "
                                           "``forward`` (weight standardisation, NFNets' ``ScaledStdConv2d``) by a "
                                           "plain conv holding the transformed weight, so that it can be pruned "
                                           "(inference only). ``False`` leaves them dense, with the reason in the "
                                           "report.", {"kind": "bool"})
    max_memory: int | str | None = _option(None, 'Host memory the run may use, in bytes or as a string (``"8GB"``, '
                                           '``"7.5GiB"``); activations beyond it spill to disk, and a run that '
                                           "cannot fit even so is refused before it starts. ``None``: the memory in "
                                           "use at the start plus 75 % of what the machine has available then.",
                                           {"kind": "text"})
    spill_dir: str | None = _option(None, "Where activations spill (a temporary directory inside it, removed at the "
                                    "end); ``None``: the system's temporary directory.", {"kind": "text"})
    memory_format: str = _option(MEMORY_FORMATS[0], 'Memory format of the calibration forward passes: ``"auto"`` '
                                 "(time one forward of a few images contiguous and channels-last, keep the faster; "
                                 'the report\'s ``memory_format`` says which), ``"channels_last"`` or '
                                 '``"contiguous"``. Only the batches change format: the returned model is the same up '
                                 "to float32 rounding.", {"choices": MEMORY_FORMATS})

    def __post_init__(self) -> None:
        for name in ("fold_weight_transforms", "per_layer_targets", "accelerated_only"):  # plain switches
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        self._check_solver()
        self._check_tracing()
        self._check_remedies()
        self._check_allocation()
        self._check_quantization()
        self._check_resources()

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)  # frozen dataclass: only while validating

    def _check_solver(self) -> None:
        self._set("sparsity", parse_pattern(self.sparsity))
        if not isinstance(self.method, str) or self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; accepted: {', '.join(METHODS)}")
        if isinstance(self.blocksize, bool) or not isinstance(self.blocksize, int) or self.blocksize < 1:
            raise ValueError(f"blocksize must be a positive int, got {self.blocksize!r}")
        if isinstance(self.exact_obs_work, bool) or not isinstance(self.exact_obs_work, int) or self.exact_obs_work < 0:
            raise ValueError(f"exact_obs_work must be a non-negative int (0: SparseGPT's solve everywhere), got "
                             f"{self.exact_obs_work!r}")
        if isinstance(self.sparsity, NMPattern) and self.blocksize % self.sparsity.m:
            raise ValueError(f"blocksize {self.blocksize} must be a multiple of M={self.sparsity.m} so that no N:M "
                             "group straddles two blocks")
        if isinstance(self.percdamp, bool) or not isinstance(self.percdamp, (int, float)) or not (
                0.0 <= self.percdamp < 10.0):
            raise ValueError(f"percdamp must be a float in [0, 10), got {self.percdamp!r}")
        if isinstance(self.max_damping_retries, bool) or not isinstance(self.max_damping_retries, int) \
                or self.max_damping_retries < 0:
            raise ValueError(f"max_damping_retries must be a non-negative int, got {self.max_damping_retries!r}")
        self._set("skip", _as_name_tuple(self.skip, "skip"))

    def _check_tracing(self) -> None:
        leaf = () if self.leaf_modules is None else tuple(self.leaf_modules)
        for item in leaf:
            if not (isinstance(item, str) or (isinstance(item, type) and issubclass(item, torch.nn.Module))):
                raise TypeError(f"leaf_modules entries must be nn.Module subclasses or names, got {item!r}")
        self._set("leaf_modules", leaf)
        if self.concrete_args is not None and not isinstance(self.concrete_args, dict):
            raise TypeError(f"concrete_args must be a dict, got {type(self.concrete_args).__name__}")
        if self.submodules is not None and self.submodules != "auto":
            if isinstance(self.submodules, str):
                raise TypeError("submodules must be a list of submodule names (e.g. ['backbone', 'rpn.head']) or "
                                f"'auto', got the string {self.submodules!r}")
            names = _as_name_tuple(self.submodules, "submodules")
            if not names:
                raise ValueError("submodules is empty: name at least one submodule, or pass 'auto'")
            self._set("submodules", "auto" if names == ("auto",) else names)

    def _check_remedies(self) -> None:
        for name in ("bn_reestimate", "dense_targets", "permute_channels"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise TypeError(f"{name} must be True, False or None, got {value!r}")
        if self.dense_targets is None:
            self._set("dense_targets", DEFAULT_DENSE_TARGETS and self.method == "sparsegpt")
        if self.dense_targets and self.method != "sparsegpt":
            raise ValueError(f"dense_targets needs method='sparsegpt' (it changes the weights), got {self.method!r}")
        if self.per_layer_targets and not self.dense_targets:
            raise ValueError("per_layer_targets chooses between dense and plain targets: it needs dense_targets "
                             "(the default for method='sparsegpt')")
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"unknown augment {self.augment!r}; accepted: None, " + ", ".join(AUGMENTATIONS[1:]))
        if self.stats_correction is None:
            self._set("stats_correction", DEFAULT_STATS_CORRECTION)
        elif self.stats_correction is False:
            self._set("stats_correction", "off")
        if not isinstance(self.stats_correction, str) or self.stats_correction not in STATS_CORRECTIONS:
            raise ValueError(f"unknown stats_correction {self.stats_correction!r}; accepted: None (default), False, "
                             + ", ".join(STATS_CORRECTIONS))
        if isinstance(self.reconstruct, bool) or not isinstance(self.reconstruct, int) or self.reconstruct < 0:
            raise ValueError(f"reconstruct must be a non-negative int (Adam steps per block; 0: off), got "
                             f"{self.reconstruct!r}")
        if isinstance(self.reconstruct_lr, bool) or not isinstance(self.reconstruct_lr, (int, float)) or not (
                0 < self.reconstruct_lr < 1):
            raise ValueError(f"reconstruct_lr must be a float in (0, 1), got {self.reconstruct_lr!r}")
        if self.permute_channels is None:
            self._set("permute_channels", DEFAULT_PERMUTE_CHANNELS and isinstance(self.sparsity, NMPattern))
        if self.permute_channels and not isinstance(self.sparsity, NMPattern):
            raise ValueError(f"permute_channels needs an N:M pattern (it regroups channels), got {self.sparsity}")

    def _check_allocation(self) -> None:
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
            self._set("budget", float(self.budget))
        if self.target not in TARGETS:
            raise ValueError(f"unknown target {self.target!r}; accepted: {', '.join(TARGETS)}")
        if self.accelerated_only and not isinstance(self.sparsity, NMPattern):
            raise ValueError(f"accelerated_only applies to N:M patterns (the sparse kernels' layout), got "
                             f"{self.sparsity}")

    def _check_quantization(self) -> None:
        if self.quantize is not None and self.quantize not in QUANTIZE_MODES:
            raise ValueError(f"unknown quantize {self.quantize!r}; accepted: None (float), "
                             + ", ".join(map(repr, QUANTIZE_MODES)))
        if self.memory_format not in MEMORY_FORMATS:
            raise ValueError(f"unknown memory_format {self.memory_format!r}; accepted: " + ", ".join(MEMORY_FORMATS))
        if self.activation_calibration not in ACTIVATION_METHODS:
            raise ValueError(f"unknown activation_calibration {self.activation_calibration!r}; accepted: "
                             + ", ".join(ACTIVATION_METHODS))
        if isinstance(self.sparsity, Unstructured) and self.sparsity.sparsity == 0.0:
            if self.quantize is None:
                raise ValueError(f"sparsity 0.0 prunes nothing: it is only for quantize='int8' (dense INT8); "
                                 f"{_ACCEPTED}")
            if self.allocation != "uniform":
                raise ValueError("sparsity 0.0 (dense INT8) takes no allocation")
        if self.quantize is not None and self.reconstruct:
            raise ValueError("reconstruct with quantize='int8' is not supported yet (the fit would have to pass "
                             "gradients through the fake-quantized activations); use one or the other")
        if self.quantize is not None and self.submodules is not None:
            raise ValueError("quantize='int8' with submodules= is not supported yet (its export path is the whole "
                             "graph's); sparsify the traceable model, or quantize without submodules")

    def _check_resources(self) -> None:
        if self.device is not None:
            try:
                device = torch.device(self.device)
            except (RuntimeError, TypeError) as exc:
                raise ValueError(f"invalid device {self.device!r}: {exc}") from None
            if device.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(f"device {self.device!r} requested but CUDA is not available here")
            self._set("device", device)
        if self.max_memory is not None:
            self._set("max_memory", parse_bytes(self.max_memory))
        if self.spill_dir is not None:
            if not isinstance(self.spill_dir, (str, os.PathLike)):
                raise TypeError(f"spill_dir must be a path, got {type(self.spill_dir).__name__}")
            if not os.path.isdir(self.spill_dir):
                raise ValueError(f"spill_dir {str(self.spill_dir)!r} is not an existing directory")
            self._set("spill_dir", os.fspath(self.spill_dir))

    @property
    def allocates(self) -> bool:
        """Whether an allocation chooses per-layer patterns (``allocation="global"`` or a ``budget``)."""
        return self.allocation == "global" or self.budget is not None


OPTIONS = tuple(f.name for f in dataclasses.fields(SparsifyConfig))


def option_help(name: str) -> str:
    """The documentation of option ``name`` (one place: its field)."""
    return next(f.metadata["doc"] for f in dataclasses.fields(SparsifyConfig) if f.name == name)


def _document(cls: type) -> str:
    """The class docstring with an ``Args:`` entry per option, from the fields' documentation."""
    lines = [textwrap.fill(f.metadata["doc"], 108, initial_indent=f"    {f.name}: ", subsequent_indent=" " * 8)
             for f in dataclasses.fields(cls)]
    summary, _, rest = cls.__doc__.partition("\n\n")
    return f"{summary}\n\nArgs:\n" + "\n".join(lines) + "\n\n" + rest


SparsifyConfig.__doc__ = _document(SparsifyConfig)


def build_config(sparsity: Any, options: dict[str, Any]) -> SparsifyConfig:
    """The config of one ``sparsify`` call: ``sparsity`` given as a :class:`SparsifyConfig`, or a pattern with the
    options given by keyword (``None`` values mean "the default").

    Raises:
        TypeError: an unknown option, or options given both ways.
    """
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(unknown)}; accepted: {', '.join(OPTIONS[1:])}")
    given = {k: v for k, v in options.items() if v is not None}
    if isinstance(sparsity, SparsifyConfig):
        if given:
            raise TypeError(f"pass options either in SparsifyConfig or as keywords, not both (got {sorted(given)})")
        return sparsity
    if "sparsity" in given:
        raise TypeError("sparsity is given positionally (the third argument), not as an option")
    return SparsifyConfig(sparsity, **given)
