"""Huge pages for torch's CPU tensors (sgfx.runtime.allocator): detected from the kernel's own page accounting,
switched on by the front-ends before the first tensor, never changing a computed value."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import sgfx
from sgfx.runtime import allocator

needs_madvise = pytest.mark.skipif(allocator.system_mode() != "madvise",
                                   reason="the kernel's THP mode is not 'madvise': torch's request changes nothing")


def _start(code: str, env_value: str | None) -> subprocess.Popen:
    """Start ``code`` in a fresh interpreter with THP_MEM_ALLOC_ENABLE set to ``env_value`` (None: unset)."""
    env = {k: v for k, v in os.environ.items() if k != allocator.HUGE_PAGES_ENV}
    if env_value is not None:
        env[allocator.HUGE_PAGES_ENV] = env_value
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _last_line(process: subprocess.Popen) -> str:
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    return out.strip().splitlines()[-1]


def _python(code: str, env_value: str | None) -> str:
    return _last_line(_start(code, env_value))


@needs_madvise
def test_enable_after_importing_sgfx_and_its_cli():
    """Importing sgfx (and the CLI) allocates no CPU tensor, so the CLI's enable_huge_pages() still takes effect;
    a user's THP_MEM_ALLOC_ENABLE=0 is respected."""
    code = """
        import sgfx, sgfx.cli.main
        from sgfx.runtime.allocator import enable_huge_pages
        print(enable_huge_pages())
    """
    processes = {value: _start(code, value) for value in (None, "0", "1")}  # at once
    assert {value: _last_line(process) for value, process in processes.items()} == {
        None: "True", "0": "False", "1": "True"}


@needs_madvise
def test_too_late_once_a_tensor_exists_and_the_hint_is_logged_once():
    out = _python("""
        import logging, torch
        records = []
        handler = logging.Handler(); handler.emit = records.append
        logging.getLogger("sgfx.runtime.allocator").addHandler(handler)
        logging.getLogger("sgfx.runtime.allocator").setLevel(logging.INFO)
        torch.ones(1 << 22)  # the allocator's choice is now fixed, without huge pages
        from sgfx.runtime.allocator import enable_huge_pages, hint_huge_pages
        late = enable_huge_pages()
        import os; os.environ.pop("THP_MEM_ALLOC_ENABLE")
        first, second = hint_huge_pages(), hint_huge_pages()
        print(late, first, second, len(records), "THP_MEM_ALLOC_ENABLE=1" in records[0].getMessage())
    """, None)
    assert out == "False False False 1 True"


def test_huge_pages_change_no_value():
    """The same sparsify in two processes, with and without huge pages: bit-identical weights; the report says
    which ran."""
    code = """
        import json, sys, torch, sgfx
        from sgfx.runtime.allocator import enable_huge_pages
        enable_huge_pages()
        sys.path.insert(0, "tests")
        from models import ConvBnNet
        torch.manual_seed(0)
        model = ConvBnNet().eval()
        calib = [torch.randn(128, 3, 16, 16)]  # activations of 4 MB: above torch's 2 MiB threshold
        gm = sgfx.sparsify(model, calib, "2:4", memory_format="channels_last")
        digest = [float(p.double().sum()) for p in gm.parameters()] + [int((p == 0).sum()) for p in gm.parameters()]
        print(json.dumps([sgfx.get_report(gm).memory["huge_pages"], digest]))
    """
    processes = [_start(code, value) for value in ("1", "0")]  # at once: each is mostly interpreter start-up
    with_pages, without = (json.loads(_last_line(process)) for process in processes)
    assert without[0] is False
    if allocator.system_mode() == "madvise":
        assert with_pages[0] is True
    assert with_pages[1] == without[1]


def test_report_records_the_paging(gen):
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 1)).eval()
    gm = sgfx.sparsify(model, [torch.randn(4, 4, 8, 8, generator=gen)], "2:4")
    assert sgfx.get_report(gm).memory["huge_pages"] is allocator.huge_pages_in_use()
