"""sgfx: one-shot sparsification of trained CNNs with torch.fx and SparseGPT's Optimal Brain Surgeon solve.

Example:
    >>> import sgfx
    >>> gm = sgfx.sparsify(model, calib, "2:4")  # doctest: +SKIP
    >>> print(sgfx.report(gm))  # doctest: +SKIP
"""

from .api import Inputs, PatternCheck, calibration_batches, check_pattern, get_report, load, report, save, sparsify
from .config import NMPattern, SparsifyConfig, Unstructured, parse_pattern
from .finetune import finetune
from .lowering import ExportError, OnnxExportReport, check_onnx_sparsity, export_onnx, lower
from .obs import FactorizationError, SolveResult, magnitude_prune, sparsegpt_prune, wanda_prune
from .passes.trace import TraceError
from .report import LayerRecord, SparsityReport
from .runtime import distributed
from .runtime.calibration import CalibrationError
from .runtime.memory import InsufficientMemory
from .serialization import SgfxFormatError

__version__ = "0.1.0"

__all__ = [
    "sparsify",
    "Inputs",
    "finetune",
    "calibration_batches",
    "report",
    "get_report",
    "check_pattern",
    "PatternCheck",
    "SparsifyConfig",
    "NMPattern",
    "Unstructured",
    "parse_pattern",
    "sparsegpt_prune",
    "magnitude_prune",
    "wanda_prune",
    "SolveResult",
    "LayerRecord",
    "SparsityReport",
    "CalibrationError",
    "InsufficientMemory",
    "distributed",
    "TraceError",
    "FactorizationError",
    "save",
    "lower",
    "export_onnx",
    "check_onnx_sparsity",
    "OnnxExportReport",
    "ExportError",
    "load",
    "SgfxFormatError",
    "__version__",
]
