"""Where the sequential sweep's activations live: a budgeted store over accelerator memory, host memory and disk.

Why: the sweep runs the graph node by node over *all* calibration batches (each layer must see every batch's input
from the already-pruned layers before it), so every live graph value holds one tensor per batch. With ImageNet-size
inputs and a thousand images that is tens of gigabytes. The store keeps each value's per-batch tensors in the
fastest tier that has room (the compute device, then host memory, then memory-mapped files under a temporary
directory) and, when a tier is over its budget, moves the tensors of the values needed *furthest in the future*
down a tier (Belady's rule: the sweep knows every value's next user). A spilled tensor is read back one batch at a
time, memory-mapped, so a layer's passes over its input never hold more than one batch of it in memory.

The temporary directory is removed when the store is closed (the sweep closes it on success and on error), and
each file as soon as its tensor is freed or read back for good.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from .memory import InsufficientMemory
from .timing import phase

__all__ = ["ActivationStore", "BatchValues", "MappedValues", "Concatenated", "StoreStats"]

logger = logging.getLogger(__name__)

_TIERS = ("device", "host", "disk")
_LOW_WATER = 0.9  # a tier over budget is emptied down to this fraction of it, so that spills come in runs


@dataclass
class StoreStats:
    """What the store held: peak bytes per memory tier and the bytes written to disk (all in bytes)."""

    budgets: dict[str, int]
    peak: dict[str, int]
    spilled_bytes: int = 0  # written to disk over the whole sweep
    peak_disk_bytes: int = 0  # on disk at the same time, at most
    spill_dir: str | None = None


def _dense_order(tensor: torch.Tensor) -> tuple[int, ...]:
    """The dim order in which ``tensor``'s memory is dense (``(0, 2, 3, 1)`` for channels-last), else the plain
    order: a spilled value comes back in the memory format it went out in."""
    order = tuple(sorted(range(tensor.dim()), key=lambda d: -tensor.stride(d)))
    return order if tensor.permute(order).is_contiguous() else tuple(range(tensor.dim()))


class _Spilled:
    """A tensor written to a file (its bytes in its own memory format); read back memory-mapped
    (copy-on-write)."""

    __slots__ = ("path", "shape", "dtype", "nbytes", "order")

    @phase("spill I/O")
    def __init__(self, tensor: torch.Tensor, path: str):
        tensor = tensor.detach().cpu()
        self.order = _dense_order(tensor)
        stored = tensor.permute(self.order).contiguous()  # a view when the tensor is dense in that order
        self.path, self.shape, self.dtype, self.nbytes = path, tuple(stored.shape), tensor.dtype, tensor.nbytes
        with open(path, "wb") as handle:
            handle.write(memoryview(stored.reshape(-1).view(torch.uint8).numpy()) if stored.numel() else b"")

    @phase("spill I/O")
    def load(self) -> torch.Tensor:
        numel = 1
        for size in self.shape:
            numel *= size
        inverse = tuple(sorted(range(len(self.order)), key=self.order.__getitem__))
        if numel == 0:
            return torch.empty(self.shape, dtype=self.dtype).permute(inverse)
        return torch.from_file(self.path, shared=False, size=numel, dtype=self.dtype).view(self.shape).permute(inverse)

    def remove(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class BatchValues(Sequence):
    """One graph value's per-batch entries, held by an :class:`ActivationStore`.

    Reading an entry returns it on the store's compute device (read back from disk when spilled); tensors are
    accounted in their tier, other objects (shapes, tuples of sizes) are kept as they are. ``release(i)`` frees
    entry ``i`` early (its last reader has run).
    """

    def __init__(self, store: "ActivationStore", label: str = "", borrowed: bool = False):
        self.store, self.label = store, label
        self.borrowed = borrowed  # entries owned elsewhere (the calibration batches): release() keeps them
        self.node = None  # the graph node whose value this is (the sweep's spill order uses it)
        self._entries: list[Any] = []
        self._tiers: list[str | None] = []  # per entry: its tier, or None for non-tensors and released entries

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        entry, tier = self._entries[index], self._tiers[index]
        if tier is None:
            return entry
        if tier == "disk":
            entry = entry.load()
        return entry.to(self.store.compute_device) if entry.device != self.store.compute_device else entry

    def __iter__(self) -> Iterator[Any]:
        return (self[i] for i in range(len(self)))

    def append(self, value: Any) -> None:
        self._entries.append(value)
        self._tiers.append(None)
        if isinstance(value, torch.Tensor):
            self.store._admit(self, len(self._entries) - 1)

    def extend(self, values) -> None:
        for value in values:
            self.append(value)

    def release(self, index: int) -> None:
        """Free entry ``index`` (unless borrowed): its memory or its file."""
        if self.borrowed or self._tiers[index] is None:
            return
        self.store._forget(self, index)
        self._entries[index] = None

    def clear(self) -> None:
        for index in range(len(self._entries)):
            self.release(index)

    def peek(self, index: int) -> Any:
        """Entry ``index`` without reading it back or moving it: a spilled tensor comes as a ``meta`` tensor of its
        shape and dtype (for sizes)."""
        entry, tier = self._entries[index], self._tiers[index]
        if tier == "disk":
            return torch.empty(entry.shape, dtype=entry.dtype, device="meta")
        return entry

    def held(self, tier: str) -> list[int]:
        return [i for i, t in enumerate(self._tiers) if t == tier]

    def __del__(self):
        try:
            for index, tier in enumerate(self._tiers):
                if tier is not None:
                    self.store._forget(self, index)
        except Exception:  # interpreter shutdown
            pass

    def __repr__(self) -> str:
        return f"BatchValues({self.label!r}, {len(self)} batches)"


class MappedValues(Sequence):
    """A read-only view ``fn(base[i])`` of a sequence (the calibration batches as one graph input sees them)."""

    borrowed = True

    def __init__(self, base: Sequence, fn: Callable[[Any], Any]):
        self.base, self.fn = base, fn

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self.fn(self.base[index])

    def release(self, index: int) -> None:
        """Views own nothing."""


class Concatenated(Sequence):
    """Several per-batch sequences read one after another (a shared layer's inputs from all its calls)."""

    def __init__(self, parts: list[Sequence]):
        self.parts = parts

    def __len__(self) -> int:
        return sum(len(part) for part in self.parts)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        for part in self.parts:
            if index < len(part):
                return part[index]
            index -= len(part)
        raise IndexError("batch index out of range")

    def __iter__(self) -> Iterator[Any]:
        for part in self.parts:
            yield from part


class ActivationStore:
    """A memory budget shared by every live graph value of a sweep.

    Args:
        host_bytes: host-memory budget for activations (bytes).
        compute_device: where the sweep computes; entries are returned there.
        device_bytes: with an accelerator ``compute_device``, its memory budget for activations (0: none kept
            there, every entry goes to host memory).
        spill_dir: where spilled tensors go (a new temporary directory inside it; default: the system temp dir).
        disk_bytes: the most the store may write to disk at once (default: the free space minus 1 GiB).
        cap: the run's whole host-memory cap, taken once when the run starts; the budgets are cut from it.
    """

    def __init__(self, host_bytes: int, compute_device: torch.device | str | None = None, device_bytes: int = 0,
                 spill_dir: str | None = None, disk_bytes: int | None = None, cap: int | None = None):
        self.compute_device = torch.device(compute_device or "cpu")
        on_accelerator = self.compute_device.type != "cpu"
        self.budgets = {"device": int(device_bytes) if on_accelerator else 0, "host": int(host_bytes)}
        self.used = {"device": 0, "host": 0}
        self.peak = {"device": 0, "host": 0}
        self.disk_used = self.peak_disk = self.spilled_bytes = 0
        self.cap = cap  # the run's whole memory cap (max_memory), which the budgets are cut from
        self._spill_root, self._dir, self._files = spill_dir, None, 0
        self._disk_limit = disk_bytes
        # every value holding entries in a memory tier, by id; weak: a value freed by the sweep leaves by itself
        self._values: weakref.WeakValueDictionary[int, BatchValues] = weakref.WeakValueDictionary()
        # set by the sweep: values with a larger next use spill first; None: never spilled (pinned)
        self.next_use: Callable[[BatchValues], float | None] = lambda values: 0.0

    # ---------------------------------------------------------------------------------------------- public
    def new(self, label: str = "", borrowed: bool = False) -> BatchValues:
        """An empty value list in this store."""
        return BatchValues(self, label, borrowed)

    def set_budgets(self, host: int, device: int) -> None:
        """New budgets per tier (bytes), enforced at once: what is over spills now."""
        self.budgets["host"] = int(host)
        self.budgets["device"] = int(device) if self.compute_device.type != "cpu" else 0
        self.rebalance()

    def stats(self) -> StoreStats:
        return StoreStats(dict(self.budgets), dict(self.peak), self.spilled_bytes, self.peak_disk, self._dir)

    def close(self) -> None:
        """Remove the spill directory (and every file left in it)."""
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> "ActivationStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------------------------------------- tiers
    def _first_tier(self, nbytes: int) -> str:
        return "device" if self.budgets["device"] >= nbytes else "host"

    def _account(self, tier: str, nbytes: int) -> None:
        if tier == "disk":
            self.disk_used += nbytes
            self.peak_disk = max(self.peak_disk, self.disk_used)
            return
        self.used[tier] += nbytes
        self.peak[tier] = max(self.peak[tier], self.used[tier])

    def _admit(self, values: BatchValues, index: int) -> None:
        tensor = values._entries[index]
        tier = self._first_tier(tensor.nbytes)
        if tier == "device" and tensor.device != self.compute_device:
            tensor = tensor.to(self.compute_device)
        elif tier == "host" and tensor.device.type != "cpu":
            tensor = tensor.cpu()
        values._entries[index], values._tiers[index] = tensor, tier
        self._account(tier, tensor.nbytes)
        self._values[id(values)] = values
        self.rebalance()

    def _forget(self, values: BatchValues, index: int) -> None:
        tier, entry = values._tiers[index], values._entries[index]
        nbytes = entry.nbytes
        if tier == "disk":
            entry.remove()
            self.disk_used -= nbytes
        else:
            self.used[tier] -= nbytes
        values._tiers[index] = None

    def _demote(self, values: BatchValues, index: int, tier: str) -> None:
        """Move entry ``index`` from ``tier`` to the next one down."""
        entry = values._entries[index]
        self.used[tier] -= entry.nbytes
        if tier == "device":
            values._entries[index], values._tiers[index] = entry.cpu(), "host"
            self._account("host", entry.nbytes)
            return
        values._entries[index], values._tiers[index] = self._spill(entry), "disk"
        self._account("disk", entry.nbytes)

    def _spill(self, tensor: torch.Tensor) -> _Spilled:
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix="sgfx-spill-", dir=self._spill_root)
            logger.info("activations over the memory budget: spilling to %s", self._dir)
        limit = self._disk_limit
        if limit is None:
            limit = shutil.disk_usage(self._dir).free - (1 << 30) + self.disk_used
        if self.disk_used + tensor.nbytes > limit:
            raise InsufficientMemory(
                f"sgfx: spilling activations needs more than the {limit / 2**30:.1f} GiB available in {self._dir}; "
                "raise max_memory, use fewer calibration images or point spill_dir at a larger disk")
        self._files += 1
        self.spilled_bytes += tensor.nbytes
        return _Spilled(tensor, os.path.join(self._dir, f"{self._files}.bin"))

    def rebalance(self) -> None:
        """While a memory tier is over budget, move the entries of the value needed furthest ahead down a tier
        (down to ``_LOW_WATER`` of the budget)."""
        if all(self.used[tier] <= self.budgets[tier] for tier in self.used):
            return
        for tier in ("device", "host"):
            if self.used[tier] <= self.budgets[tier]:
                continue
            target = _LOW_WATER * self.budgets[tier]
            ranked = [(self.next_use(v), v) for v in list(self._values.values()) if v.held(tier)]
            ranked = [(rank, v) for rank, v in ranked if rank is not None]
            for _, values in sorted(ranked, key=lambda item: item[0], reverse=True):
                for index in reversed(values.held(tier)):  # the batches read last go first
                    self._demote(values, index, tier)
                    if self.used[tier] <= target:
                        break
                if self.used[tier] <= target:
                    break
        for key, values in list(self._values.items()):
            if not (values.held("device") or values.held("host")):
                del self._values[key]
