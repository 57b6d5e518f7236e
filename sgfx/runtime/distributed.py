"""Data-parallel calibration across the processes of an initialised ``torch.distributed`` process group.

Why: calibration statistics are sums over images, so each process can run its own shard of the calibration set
through the sweep and the sums can be added up. Per layer, everything the sweep computes from data is reduced
before it is used: Hessian sums and sample counts (:mod:`sgfx.layers.hessian`), dense-target shifts, BatchNorm
moments, statistics-correction moments and channel-permutation saliencies. The OBS solve, which is not a sum,
runs once per layer on an owner rank (layers are dealt round-robin) and the pruned weight is broadcast, so every
rank continues with the same weights and ends with bit-identical ones. The result equals a single process
calibrated on the union of the shards, up to the rounding of the sums.

Every rank must call :func:`sgfx.sparsify` with the same model and options; the shards may differ in size. An
error on one rank leaves the others waiting in the next collective until the group's timeout, as in DDP.
CPU tensors go through gloo as they are; on NCCL the tensors stay on their GPU. This module is the only place
that talks to ``torch.distributed``; without an initialised group (or with one process) every function is the
identity.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import torch
import torch.distributed as dist

from .timing import phase

__all__ = ["is_active", "rank", "world_size", "owner", "all_reduce_sum", "all_reduce_count", "broadcast_tensor",
           "broadcast_object", "all_gather", "describe", "solve_threads"]


def is_active() -> bool:
    """Whether sgfx calibrates across processes: a process group is initialised and has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_active() else 0


def world_size() -> int:
    return dist.get_world_size() if is_active() else 1


def owner(index: int) -> int:
    """The rank that solves the ``index``-th pruned layer (round-robin)."""
    return index % world_size()


@contextlib.contextmanager
def solve_threads() -> Iterator[None]:
    """While a rank solves a layer, the other ranks on its host wait for the broadcast (gloo blocks without
    spinning): on CPU the solving rank borrows their threads (``LOCAL_WORLD_SIZE``, which torchrun sets, times its
    own), so that a solve is as fast as in one process. Nothing changes on GPUs or without that variable."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    if not is_active() or local <= 1 or dist.get_backend() != "gloo":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(min(before * local, os.cpu_count() or before))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _through_backend(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor the backend can take: gloo reduces CPU tensors only (a CUDA tensor goes through host memory)."""
    if tensor.is_cuda and dist.get_backend() == "gloo":
        return tensor.cpu()
    return tensor


@phase("waiting for ranks")
def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the ranks, in place; returns it."""
    if not is_active():
        return tensor
    carrier = _through_backend(tensor)
    dist.all_reduce(carrier, op=dist.ReduceOp.SUM)
    if carrier is not tensor:
        tensor.copy_(carrier)
    return tensor


@phase("waiting for ranks")
def all_reduce_count(count: int | float) -> int | float:
    """Sum a Python number over the ranks (exactly, in float64 or int64)."""
    if not is_active():
        return count
    dtype = torch.int64 if isinstance(count, int) else torch.float64
    total = torch.tensor([count], dtype=dtype, device=_collective_device())
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.item()


@phase("waiting for ranks")
def broadcast_tensor(tensor: torch.Tensor, src: int) -> torch.Tensor:
    """Overwrite ``tensor`` on every rank with rank ``src``'s, in place."""
    if not is_active():
        return tensor
    carrier = _through_backend(tensor.detach())
    contiguous = carrier.contiguous()
    dist.broadcast(contiguous, src=src)
    if contiguous is not tensor:
        with torch.no_grad():
            tensor.copy_(contiguous)
    return tensor


@phase("waiting for ranks")
def broadcast_object(obj: Any, src: int) -> Any:
    """Rank ``src``'s picklable object, on every rank."""
    if not is_active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_collective_device())
    return box[0]


@phase("waiting for ranks")
def all_gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape on each), in rank order."""
    if not is_active():
        return [tensor]
    carrier = _through_backend(tensor.contiguous())
    parts = [torch.empty_like(carrier) for _ in range(world_size())]
    dist.all_gather(parts, carrier)
    return [part.to(tensor.device) for part in parts]


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def describe() -> dict[str, Any]:
    """What the report records about the process group (empty for a single process)."""
    if not is_active():
        return {}
    return {"world_size": world_size(), "backend": str(dist.get_backend())}
