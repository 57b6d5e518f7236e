"""The progress bar over a sweep's layers (tqdm on stderr), with the memory in use."""

from __future__ import annotations

import contextlib
import logging
import sys

from ..report import LayerRecord
from ..runtime import distributed
from ..runtime.activations import ActivationStore
from ..runtime.memory import current_rss

__all__ = ["progress_bar", "show_progress", "memory_figure"]


def show_progress(progress: bool | None) -> bool:
    """Whether to draw the progress bar: ``progress`` when given; by default, when stderr is a terminal, the
    ``sgfx`` logger is not set above WARNING, and this is rank 0 (or the only process)."""
    if progress is not None:
        return bool(progress) and distributed.rank() == 0
    quiet = logging.getLogger("sgfx").getEffectiveLevel() > logging.WARNING
    return sys.stderr.isatty() and not quiet and distributed.rank() == 0


def memory_figure(store: ActivationStore | None) -> str:
    """The live memory figure shown on the progress bar: RSS, and what the store holds on disk."""
    text = f"RSS {current_rss() / 1e9:.1f} GB"
    if store is not None and store.disk_used:
        text += f", on disk {store.disk_used / 1e9:.1f} GB"
    if store is not None and store.used["device"]:
        text += f", on {store.compute_device.type} {store.used['device'] / 1e9:.1f} GB"
    return text


@contextlib.contextmanager
def progress_bar(enabled: bool | None, total: int, callback, store: ActivationStore | None = None,
                 desc: str = "sgfx: pruning", unit: str = "layer", label=lambda record: record.name):
    """Yield the per-item callback (a layer's record by default): ``callback``, preceded by a tqdm bar's update
    (``label(record)`` and the memory figure) when :func:`show_progress` says so."""
    if not show_progress(enabled):
        yield callback
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=desc, unit=unit, disable=None, dynamic_ncols=True) as bar:
        def on_item(record) -> None:
            bar.set_postfix_str(f"{label(record)} | {memory_figure(store)}", refresh=False)
            bar.update(1)
            if callback is not None:
                callback(record)

        yield on_item
