"""Where a sparsify run's time goes: exclusive wall time per phase (forward passes, Hessians, solves, spill I/O,
waiting for other ranks), so that the next bottleneck is visible in the report and the benchmarks.

Phases nest: entering one pauses the enclosing one, so the times add up to at most the run's wall time (what no
phase claims is the report's ``other``). Outside :func:`timed_run` every :func:`phase` is a no-op costing one
global read, so library code can mark its phases unconditionally.

Example::

    with timed_run() as split:
        with phase("forward"):
            ...
    split  # {"forward": 1.23}
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

__all__ = ["PHASES", "phase", "timed_run"]

# The phases library code marks, in the order tables list them (one place: the report and benchmarks read it).
PHASES = (
    "forward (pruned)",  # the sweep running the graph's nodes on the pruned weights
    "forward (dense)",  # the unpruned copy run in lockstep (dense targets, statistics correction)
    "hessians",  # streaming inputs into Hessians (Gram products)
    "dense targets",  # the forward and weight-gradient passes of the dense-target shifts
    "solve",  # factorisation, OBS sweep, write-back
    "layer errors",  # forward passes measuring a layer's reconstruction error
    "batchnorm re-estimation",
    "statistics correction",
    "channel permutation",  # the norms pass and the search
    "memory format probe",
    "spill I/O",  # writing activations to disk and mapping them back (reads fault in lazily, inside readers)
    "waiting for ranks",  # collectives: the time a rank waits for the others' statistics or solves
    "block reconstruction",  # reconstruct=: the Adam steps fitting each block to the dense copy
)

_active: list | None = None  # [totals dict, stack of [name, started]] while a timed run is going on


@contextlib.contextmanager
def timed_run() -> Iterator[dict[str, float]]:
    """Collect phase times until the block ends; yields the dict it fills (seconds per phase). Re-entrant: an
    inner run (a nested sparsify) adds to the outer one."""
    global _active
    if _active is not None:
        yield _active[0]
        return
    totals: dict[str, float] = {}
    _active = [totals, []]
    try:
        yield totals
    finally:
        _active = None


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Count the block's wall time to ``name`` (exclusive of phases entered inside it)."""
    state = _active
    if state is None:
        yield
        return
    totals, stack = state
    now = time.perf_counter()
    if stack:  # pause the enclosing phase
        outer = stack[-1]
        totals[outer[0]] = totals.get(outer[0], 0.0) + now - outer[1]
    stack.append([name, now])
    try:
        yield
    finally:
        now = time.perf_counter()
        inner = stack.pop()
        totals[inner[0]] = totals.get(inner[0], 0.0) + now - inner[1]
        if stack:
            stack[-1][1] = now  # resume the enclosing phase
