"""Transparent huge pages for torch's CPU tensors: whether they are in use, and turning them on for a new process.

Why: every forward pass of the sweep writes fresh activation tensors, and glibc hands out large blocks as new
memory maps whose 4 KiB pages the kernel faults in one by one on first touch. On this project's CPU machine (a
virtual machine, where a page fault is expensive) that first touch runs at 1-2.5 GB/s, and torchvision's ResNet-50
forward of 32 images at 224 px took 2.9 s with 4 KiB pages against 2.0 s when torch asked the kernel for 2 MiB
pages; the default sparsify of ResNet-18 CIFAR went from 27.5 to 22.1 s (docs/RESULTS.md).

torch does it when ``THP_MEM_ALLOC_ENABLE=1`` is in the environment at its *first* CPU allocation (the value is
read once and kept), so a library cannot switch it on for a process that already holds tensors. Hence:
:func:`enable_huge_pages` for front-ends that start before any tensor exists (the ``sgfx`` CLI and the
benchmarks call it first), :func:`huge_pages_in_use` for the report, and a hint in the log otherwise. It changes
where memory comes from, never a computed value. Linux only; elsewhere both answer ``None``.
"""

from __future__ import annotations

import logging
import os

import torch

__all__ = ["HUGE_PAGES_ENV", "system_mode", "huge_pages_in_use", "enable_huge_pages", "hint_huge_pages"]

logger = logging.getLogger(__name__)

HUGE_PAGES_ENV = "THP_MEM_ALLOC_ENABLE"  # read by torch's CPU allocator (c10) at its first allocation
_THP_SYSFS = "/sys/kernel/mm/transparent_hugepage/enabled"
_PROBE_BYTES = 8 << 20  # several 2 MiB pages, above torch's 2 MiB threshold for asking
_hinted = False


def system_mode() -> str | None:
    """The kernel's THP mode (``"always"``, ``"madvise"`` or ``"never"``), or None where it cannot be read."""
    try:
        text = open(_THP_SYSFS).read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def huge_pages_in_use() -> bool | None:
    """Whether a large CPU tensor allocated now is backed by huge pages (from ``/proc/self/smaps``; None where
    that cannot be read).

    Note: the first CPU allocation of a process fixes torch's choice; calling this before
    :func:`enable_huge_pages` makes that call too late.
    """
    probe = torch.ones(_PROBE_BYTES // 4)  # faulted in: the kernel decides its page size now
    address = probe.data_ptr()
    try:
        lines = open("/proc/self/smaps").read().splitlines()
    except OSError:
        return None
    inside = False
    for line in lines:
        head = line.split(maxsplit=1)[0] if line else ""
        if "-" in head and not head.endswith(":"):
            low, high = (int(part, 16) for part in head.split("-"))
            inside = low <= address < high
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1]) > 0
    return False


def enable_huge_pages() -> bool | None:
    """Ask torch for huge pages in this process (unless ``THP_MEM_ALLOC_ENABLE`` is already set, to ``0`` for
    instance), and say whether they are in use. Works only before the process allocates its first CPU tensor.

    Returns:
        :func:`huge_pages_in_use`.

    Example:
        >>> from sgfx.runtime.allocator import enable_huge_pages
        >>> enable_huge_pages()  # first thing in a script, before any tensor exists  # doctest: +SKIP
        True
    """
    os.environ.setdefault(HUGE_PAGES_ENV, "1")
    return huge_pages_in_use()


def hint_huge_pages() -> bool | None:
    """:func:`huge_pages_in_use`, and once per process an INFO line saying how to turn them on where the kernel
    would grant them on request and this process does not ask."""
    global _hinted
    in_use = huge_pages_in_use()
    if in_use is False and not _hinted and system_mode() == "madvise" and os.environ.get(HUGE_PAGES_ENV) != "0":
        _hinted = True
        logger.info("torch's CPU allocator does not ask for huge pages here: set %s=1 in the environment before "
                    "the process starts (or call sgfx.runtime.allocator.enable_huge_pages() before any tensor "
                    "exists); large CPU forward passes ran 1.2-1.5x faster with it on the project's machine",
                    HUGE_PAGES_ENV)
    return in_use
