"""Per-layer records of a sparsify run, attached to the returned GraphModule, and their table."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.fx
from tabulate import tabulate

__all__ = ["LayerRecord", "SparsityReport", "attach_report", "find_report", "get_report", "report"]

# Where a report lives: in a GraphModule's ``meta`` (copied by deepcopy), else (a model returned with submodules=)
# as an attribute of that name. Only attach_report and find_report read or write it.
_REPORT_KEY = "sgfx_report"


@dataclass
class LayerRecord:
    """What happened to one weight of the model (pruned, or left dense with the reason)."""

    name: str
    op: str
    weight_shape: tuple[int, ...]
    pattern: str
    method: str
    status: str  # "pruned" or "skipped"
    reason: str = ""
    sparsity: float = 0.0  # achieved fraction of exact zeros in the weight
    rel_error: float | None = None  # ‖WX − ŴX‖² / ‖WX‖² over the calibration inputs (bias excluded)
    samples: int = 0  # input vectors the Hessian was built from
    hessian_s: float = 0.0  # building the Hessian from the calibration inputs
    hessian_flops: int = 0  # multiply-add FLOPs its Gram products executed (dense-target products included)
    factor_s: float = 0.0  # factorising it (part of solve_s)
    solve_s: float = 0.0  # the OBS solve, factorisation included, and the write-back
    damping: float | None = None
    damping_retries: int = 0
    solver: str = ""  # SparseGPT layers: "exact" (greedy OBS, small N:M layers) or "blocked" (SparseGPT's sweep)
    weight_name: str = ""  # qualified name of the weight tensor in the GraphModule
    dense_targets: bool = False  # fitted to the dense model's outputs (dense_targets=True and samples >= columns)
    level: float | None = None  # the sparsity an allocation or budget chose for this layer (None: uniform)
    uses: int = 1  # graph calls sharing this weight (a head applied per feature level): all calibrate it
    macs: int = 0  # multiply-adds per input image (0: not counted, e.g. inside a leaf module)
    target_errors: dict[str, Any] = field(default_factory=dict)  # per_layer_targets: held-out error of each target
    quant: dict[str, Any] = field(default_factory=dict)  # quantize="int8": scale buffers, axis, scale range

    @property
    def pruned(self) -> bool:
        return self.status == "pruned"


@dataclass
class SparsityReport:
    """The records of one run; ``str(report)`` is the table."""

    pattern: str
    method: str
    layers: list[LayerRecord] = field(default_factory=list)
    total_s: float = 0.0
    bn_reestimated: list[str] = field(default_factory=list)  # BatchNorms whose statistics were re-estimated
    stats_corrected: list[str] = field(default_factory=list)  # layers whose output statistics were corrected
    permuted: list[dict] = field(default_factory=list)  # channel groups reordered before pruning (producer, ...)
    reconstructed: dict[str, Any] = field(default_factory=dict)  # reconstruct=: blocks, held-out output errors
    lowering: list[Any] = field(default_factory=list)  # LoweringDecision per layer, once sgfx.lower ran
    allocation: dict[str, Any] = field(default_factory=dict)  # allocation/budget: kind, target, achieved, search_s
    opened_attention: list[str] = field(default_factory=list)  # MultiheadAttention modules opened into projections
    kept_whole: dict[str, str] = field(default_factory=dict)  # modules a pass kept whole (attention), with why
    folded: list[str] = field(default_factory=list)  # conv subclasses folded into plain convs (weight transforms)
    submodules: list[dict[str, Any]] = field(default_factory=list)  # submodules=: what was traced and its calls
    refused_submodules: dict[str, str] = field(default_factory=dict)  # submodules="auto": untraceable, with why
    memory: dict[str, Any] = field(default_factory=dict)  # cap, estimate, activation store peaks, bytes spilled
    distributed: dict[str, Any] = field(default_factory=dict)  # world_size and backend when run across processes
    quantize: str | None = None  # "int8" when weights and activations were quantized
    quantizers: list[dict[str, Any]] = field(default_factory=list)  # INT8 activation quantizers, in sweep order
    memory_format: dict[str, Any] = field(default_factory=dict)  # the sweep's format: chosen, probe_s or reason
    time_split: dict[str, float] = field(default_factory=dict)  # seconds per phase (sgfx.runtime.timing) + "other"
    steps_s: dict[str, float] = field(default_factory=dict)  # seconds per pipeline step, in order

    def to_dicts(self) -> list[dict[str, Any]]:
        return [asdict(record) for record in self.layers]

    @property
    def pruned_layers(self) -> list[LayerRecord]:
        return [record for record in self.layers if record.pruned]

    @property
    def sparse_macs_fraction(self) -> float | None:
        """The share of the counted layers' multiply-adds that run on pruned weights (None: none counted)."""
        total = sum(r.macs for r in self.layers)
        return sum(r.macs for r in self.pruned_layers) / total if total else None

    def table(self, tablefmt: str = "simple") -> str:
        headers = ["layer", "type", "weight", "pattern", "sparsity", "rel. error", "time s", "note"]
        rows = []
        for r in self.layers:
            note = r.reason if not r.pruned else "; ".join(
                (["exact OBS"] if r.solver == "exact" else [])
                + ([f"damping x10^{r.damping_retries}"] if r.damping_retries else [])
                + ([f"shared by {r.uses} calls"] if r.uses > 1 else []) + ([r.quant["reason"]] if "reason" in
                                                                            r.quant else []))
            rows.append([
                r.name, r.op, "x".join(map(str, r.weight_shape)), r.pattern if r.pruned else "dense",
                f"{r.sparsity:.1%}", "" if r.rel_error is None else f"{r.rel_error:.2e}",
                f"{r.hessian_s + r.solve_s:.2f}", note,
            ] + ([_int8_cell(r.quant)] if self.quantize else []))
        if self.quantize:
            headers.append("int8 scales: weight (per channel); input; output")
        summary = (
            f"sgfx {self.method} {self.pattern}: {len(self.pruned_layers)}/{len(self.layers)} layers pruned "
            f"in {self.total_s:.1f} s"
            + (f"; {sum(1 for r in self.layers if 'weight_scale' in r.quant)} layers and {len(self.quantizers)} "
               f"activations {self.quantize}" if self.quantize else "")
            + (f"; {len(self.bn_reestimated)} BatchNorm statistics re-estimated" if self.bn_reestimated else "")
            + (f"; {len(self.stats_corrected)} layers' output statistics corrected" if self.stats_corrected else "")
            + (f"; channels of {len(self.permuted)} layers permuted" if self.permuted else "")
            + (f"; {sum(b['kept'] for b in self.reconstructed['blocks'])}/{len(self.reconstructed['blocks'])} "
               "blocks reconstructed (held-out output error "
               f"{self.reconstructed['output_error_before']:.3g} -> {self.reconstructed['output_error_after']:.3g}"
               + ("" if self.reconstructed["kept"] else ", put back") + ")" if self.reconstructed else "")
            + (f"; {len(self.opened_attention)} MultiheadAttention opened" if self.opened_attention else "")
            + (f"; {len(self.folded)} weight transforms folded" if self.folded else "")
            + (f"; {len(self.submodules)} submodules traced" if self.submodules else "")
            + (f"; {self.sparse_macs_fraction:.1%} of the prunable layers' multiply-adds on pruned weights"
               if self.sparse_macs_fraction is not None else "")
            + (f"; {self.memory['spilled_bytes'] / 1e9:.2f} GB of activations spilled to disk"
               if self.memory.get("spilled_bytes") else "")
            + (f"; calibrated on {self.distributed['world_size']} processes" if self.distributed else "")
            + (f"; {self.allocation['kind']} allocation: {self.allocation['achieved']:.2%} of prunable "
               f"{self.allocation['target']} " + ("in N:M layers" if self.allocation["kind"] == "budget" else "pruned")
               + f", search {self.allocation['search_s']:.1f} s" if self.allocation else "")
        )
        return summary + "\n" + tabulate(rows, headers=headers, tablefmt=tablefmt)

    def time_table(self, tablefmt: str = "simple") -> str:
        """Where the run's time went: seconds and share of the total per phase (largest first)."""
        total = self.total_s or sum(self.time_split.values()) or 1.0
        rows = [[name, f"{seconds:.2f}", f"{seconds / total:.1%}"]
                for name, seconds in sorted(self.time_split.items(), key=lambda item: -item[1])]
        return tabulate(rows, headers=["phase", "s", "share"], tablefmt=tablefmt)

    def __str__(self) -> str:
        return self.table()


def _int8_cell(quant: dict[str, Any]) -> str:
    if "weight_scale" not in quant:
        return "float"
    output = f"{quant['output_scale']:.2e}" if quant.get("output_scale") is not None else "float"
    return (f"{quant['weight_scale_min']:.1e}..{quant['weight_scale_max']:.1e}; {quant['input_scale']:.2e}; "
            f"{output}")


def attach_report(module: torch.nn.Module, found: SparsityReport) -> None:
    """Attach ``found`` to ``module`` where :func:`find_report` looks for it."""
    meta = getattr(module, "meta", None)
    if isinstance(module, torch.fx.GraphModule) and isinstance(meta, dict):
        meta[_REPORT_KEY] = found
    else:
        setattr(module, _REPORT_KEY, found)


def find_report(module: torch.nn.Module) -> SparsityReport | None:
    """The :class:`SparsityReport` attached by :func:`sgfx.sparsify` (to a GraphModule's ``meta``, or as the
    ``sgfx_report`` attribute of a model returned with ``submodules=``), or None for any other module."""
    meta = getattr(module, "meta", None)
    if isinstance(meta, dict) and _REPORT_KEY in meta:
        return meta[_REPORT_KEY]
    attached = getattr(module, _REPORT_KEY, None)
    return attached if isinstance(attached, SparsityReport) else None


def get_report(gm: torch.nn.Module) -> SparsityReport:
    """The :class:`SparsityReport` attached by :func:`sgfx.sparsify`.

    Raises:
        ValueError: ``gm`` did not come from :func:`sgfx.sparsify`.
    """
    found = find_report(gm)
    if found is None:
        raise ValueError("this module carries no sgfx report; pass the model returned by sgfx.sparsify")
    return found


def report(gm: torch.nn.Module, tablefmt: str = "simple") -> str:
    """Per-layer table of a sparsified model: pattern, achieved sparsity, reconstruction error, time, skips.

    Args:
        gm: a GraphModule returned by :func:`sgfx.sparsify`.
        tablefmt: any ``tabulate`` format (``"simple"``, ``"github"``, ``"html"`` ...).

    Returns:
        The table as a string; the records behind it are ``sgfx.get_report(gm).layers``.

    Example:
        >>> print(sgfx.report(sgfx.sparsify(model, calib, "2:4")))  # doctest: +SKIP
    """
    return get_report(gm).table(tablefmt)
