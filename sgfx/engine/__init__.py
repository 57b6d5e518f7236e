"""The engine: the ordered steps of a run (:mod:`.pipeline`), the ``submodules=`` driver, the inventory of every
weight, the sequential sweep (:mod:`.sweep`) and its per-layer step (:mod:`.layer_step`), leaf blocks, the sweep's
remedies (BatchNorm re-estimation, statistics correction), allocation and the progress bar."""

from .pipeline import STEPS, prune_graph, sparsify_graph
from .submodules import sparsify_submodules

__all__ = ["STEPS", "prune_graph", "sparsify_graph", "sparsify_submodules"]
