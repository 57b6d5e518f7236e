"""Bounded memory: the activation store, the pre-flight estimate, max_memory and spilling to disk."""

import logging
import os

import pytest
import torch

import sgfx
import sgfx.runtime.memory as memory
from sgfx.runtime.activations import ActivationStore
from sgfx.engine.progress import memory_figure, show_progress
from tests.models import ConvBnNet, cifar_resnet10, randomize_bn

KB = 1 << 10


# ------------------------------------------------------------------------------------------- the store itself
def test_store_spills_the_value_needed_furthest_ahead_and_reads_it_back_exactly(tmp_path):
    store = ActivationStore(host_bytes=10 * KB, spill_dir=str(tmp_path))
    soon, later = store.new("soon"), store.new("later")
    order = {"soon": 1.0, "later": 5.0}
    store.next_use = lambda values: order[values.label]
    tensors = [torch.randn(256) for _ in range(8)]  # 1 KiB each
    for t in tensors[:4]:
        soon.append(t.clone())
    for t in tensors[4:]:
        later.append(t.clone())
    assert store.used["host"] <= 10 * KB and store.disk_used == 0  # 8 KiB fit
    for _ in range(4):
        soon.append(torch.randn(256))  # 12 KiB: over budget
    assert store.used["host"] <= 10 * KB
    assert later.held("disk") and not soon.held("disk")  # the value read later went to disk first
    for index, t in enumerate(tensors[4:]):
        assert torch.equal(later[index], t)
    spilled = len(os.listdir(store.stats().spill_dir))
    later.release(later.held("disk")[0])
    assert len(os.listdir(store.stats().spill_dir)) == spilled - 1  # a released entry's file goes at once
    store.close()
    assert os.listdir(tmp_path) == []


def test_store_accounts_releases_and_keeps_other_objects_as_they_are():
    store = ActivationStore(host_bytes=1 << 20)
    values = store.new("v")
    values.append(torch.zeros(1000))
    values.append((2, 3))  # a shape: kept, not accounted
    assert store.used["host"] == 4000 and values[1] == (2, 3)
    values.release(0)
    assert store.used["host"] == 0 and store.stats().peak["host"] == 4000
    borrowed = store.new("batches", borrowed=True)
    borrowed.append(torch.zeros(10))
    borrowed.release(0)  # the calibration batches are owned by the run, not by one reader
    assert torch.equal(borrowed[0], torch.zeros(10))
    del borrowed
    assert store.used["host"] == 0


def test_disk_limit_gives_a_clear_error(tmp_path):
    store = ActivationStore(host_bytes=KB, spill_dir=str(tmp_path), disk_bytes=2 * KB)
    values = store.new("v")
    with pytest.raises(sgfx.InsufficientMemory, match="spilling activations needs more than"):
        for _ in range(8):
            values.append(torch.randn(256))
    store.close()


# ------------------------------------------------------------------------------------------- parsing and config
@pytest.mark.parametrize("text, expected", [("8GB", 8 * 10 ** 9), ("7.5 GiB", int(7.5 * 2 ** 30)), ("512MB", 512e6),
                                            (" 3 kib ", 3 * KB), (1234, 1234), ("2e3", None)])
def test_parse_bytes(text, expected):
    if expected is None:
        with pytest.raises(ValueError, match="cannot read max_memory"):
            memory.parse_bytes(text)
    else:
        assert memory.parse_bytes(text) == expected


@pytest.mark.parametrize("bad, error", [("8 parsecs", ValueError), (-5, ValueError), (0, ValueError),
                                        (True, TypeError), ([8], TypeError)])
def test_bad_max_memory_is_refused_at_the_boundary(bad, error):
    with pytest.raises(error, match="max_memory"):
        sgfx.SparsifyConfig("2:4", max_memory=bad)


def test_spill_dir_must_exist(tmp_path):
    with pytest.raises(ValueError, match="not an existing directory"):
        sgfx.SparsifyConfig("2:4", spill_dir=str(tmp_path / "missing"))


def test_default_cap_comes_from_the_machine():
    cap = memory.default_max_memory()
    assert memory.current_rss() < cap <= memory.current_rss() + memory.available_memory()


# ------------------------------------------------------------------------------------------- end to end
def _model_and_calib():
    gen = torch.Generator().manual_seed(0)
    model = randomize_bn(cifar_resnet10(), gen).eval()
    calib = [torch.randn(8, 3, 16, 16, generator=gen) for _ in range(4)]  # about 9 MB of activations
    return model, calib


@pytest.fixture(scope="module")
def in_memory():
    model, calib = _model_and_calib()
    return sgfx.sparsify(model, calib, "2:4")


@pytest.fixture
def no_baseline(monkeypatch):
    """The process's own memory counted as zero, so that a cap is about activations alone (the test process's
    RSS drifts by more than these small models' activations)."""
    monkeypatch.setattr(memory, "current_rss", lambda: 0)
    monkeypatch.setattr(sgfx.engine.pipeline, "current_rss", lambda: 0)


def _cap_for_spilling(model, calib, fraction=0.25):
    """A max_memory that leaves ``fraction`` of the estimated activations in memory (with ``no_baseline``)."""
    config = sgfx.SparsifyConfig("2:4")
    gm = sgfx.passes.trace.trace(model)
    from sgfx.layers import find_prunable_layers

    estimate = memory.estimate_memory(gm, calib, list(find_prunable_layers(gm).values()), True)
    assert config.dense_targets  # the estimate above counted the dense copy
    return estimate.in_memory - int((1 - fraction) * estimate.activations), estimate


def test_spilling_gives_bit_identical_weights_and_cleans_up(in_memory, tmp_path, no_baseline):
    model, calib = _model_and_calib()
    cap, estimate = _cap_for_spilling(model, calib)
    gm = sgfx.sparsify(model, calib, "2:4", max_memory=cap, spill_dir=str(tmp_path))
    report = sgfx.get_report(gm).memory
    assert report["spilled_bytes"] > 0.3 * estimate.activations
    # the store kept within its budget, but for the one batch just computed (the headroom the estimate leaves)
    assert report["peak_host_activations"] <= estimate.activation_budget(cap) + estimate.per_batch
    assert os.listdir(tmp_path) == []  # spill files and directory removed
    reference = in_memory.state_dict()
    for key, value in gm.state_dict().items():
        assert torch.equal(value, reference[key]), key
    x = calib[0]
    torch.testing.assert_close(gm(x), in_memory(x), rtol=0, atol=0)


def test_spill_directory_removed_on_error(tmp_path, no_baseline):
    model, calib = _model_and_calib()
    cap, _ = _cap_for_spilling(model, calib)
    calls = []

    def failing(record):
        calls.append(record.name)
        if len(calls) == 6:
            raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        sgfx.sparsify(model, calib, "2:4", max_memory=cap, spill_dir=str(tmp_path), callback=failing)
    assert os.listdir(tmp_path) == []


def test_estimate_is_close_to_what_the_store_held(in_memory):
    model, calib = _model_and_calib()
    _, estimate = _cap_for_spilling(model, calib)
    held = sgfx.get_report(in_memory).memory["peak_host_activations"]
    assert 0.5 * estimate.activations <= held <= 1.5 * estimate.activations


def test_a_set_that_cannot_fit_is_refused_before_any_work(no_baseline):
    model, calib = _model_and_calib()
    _, estimate = _cap_for_spilling(model, calib)
    done = []
    with pytest.raises(sgfx.InsufficientMemory, match="even with every activation spilled to disk"):
        sgfx.sparsify(model, calib, "2:4", max_memory=estimate.minimum - 1, callback=done.append)
    assert done == []


def test_a_disk_too_small_is_refused_before_any_work(monkeypatch, no_baseline):
    model, calib = _model_and_calib()
    cap, _ = _cap_for_spilling(model, calib)
    monkeypatch.setattr(memory, "spill_room", lambda spill_dir: 1000)
    done = []
    with pytest.raises(sgfx.InsufficientMemory, match=r"exceed the 0.00 GB free on disk"):
        sgfx.sparsify(model, calib, "2:4", max_memory=cap, callback=done.append)
    assert done == []


def test_memory_recorded_in_the_report(in_memory):
    entry = sgfx.get_report(in_memory).memory
    assert entry["spilled_bytes"] == 0 and entry["max_memory"] > entry["estimated_in_memory"] > 0
    assert "spilled" not in sgfx.report(in_memory).splitlines()[0]


# ------------------------------------------------------------------------------------------- progress
def test_progress_defaults(monkeypatch):
    assert show_progress(True) and not show_progress(False)
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    assert show_progress(None)
    logger = logging.getLogger("sgfx")
    monkeypatch.setattr(logger, "level", logging.ERROR)
    assert not show_progress(None)  # logging says so


def test_memory_figure_names_rss_and_disk(tmp_path):
    store = ActivationStore(host_bytes=KB, spill_dir=str(tmp_path))
    values = store.new("v")
    for _ in range(4):
        values.append(torch.randn(1024))
    figure = memory_figure(store)
    assert figure.startswith("RSS ") and "on disk 0.0 GB" in figure
    store.close()


# ------------------------------------------------------------------------------------------- GPU
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_cuda_calibration_matches_cpu_and_returns_the_model_where_it_was(in_memory):
    model, calib = _model_and_calib()
    gm = sgfx.sparsify(model, calib, "2:4", device="cuda")
    assert next(gm.parameters()).device.type == "cpu"
    for key, value in gm.state_dict().items():
        reference = in_memory.state_dict()[key]
        if value.is_floating_point() and value.dim() > 1:
            assert (value == 0).float().mean() == (reference == 0).float().mean(), key
    torch.testing.assert_close(gm(calib[0]), in_memory(calib[0]), rtol=0.05, atol=0.05)


@cuda
def test_cuda_store_moves_values_down_to_host_then_disk(tmp_path):
    store = ActivationStore(host_bytes=4 * KB, compute_device="cuda", device_bytes=4 * KB, spill_dir=str(tmp_path))
    values = store.new("v")
    tensors = [torch.randn(256, device="cuda") for _ in range(12)]
    for t in tensors:
        values.append(t)
    assert values.held("device") and values.held("host") and values.held("disk")
    for index, t in enumerate(tensors):
        assert torch.equal(values[index], t) and values[index].is_cuda
    store.close()


def test_small_model_runs_with_the_default_cap():
    gm = sgfx.sparsify(ConvBnNet().eval(), torch.randn(4, 3, 16, 16), "2:4")
    assert sgfx.get_report(gm).memory["spilled_bytes"] == 0


class _MutatedWhileShared(torch.nn.Module):
    def forward(self, x):
        a = torch.sin(x)
        b = a * 2  # reads a before the in-place add
        a.add_(1)
        return b + a  # reads a after it


@pytest.mark.parametrize("pinned", [True, False])
def test_values_mutated_in_place_while_shared_are_never_spilled(tmp_path, pinned):
    from sgfx.engine.sweep import SequentialPruner

    gm = sgfx.passes.trace.trace(_MutatedWhileShared())
    batches = [torch.randn(3, 5) for _ in range(3)]
    store = ActivationStore(host_bytes=1, spill_dir=str(tmp_path))  # everything that may spill does
    pruner = SequentialPruner(gm, {}, prune=lambda *args: None, store=store)
    pruner._segments = {}  # node by node (as between two hooks); a segment would run all four nodes per batch
    if not pinned:
        pruner._pinned = set()  # what the guard prevents: the in-place add would change a spilled copy only
    outputs = pruner.run_batches(batches)
    expected = [_MutatedWhileShared()(b.clone()) for b in batches]
    assert store.spilled_bytes > 0
    assert all(torch.equal(o, e) for o, e in zip(outputs, expected)) == pinned
    store.close()


def test_a_segment_runs_values_mutated_in_place_per_batch_and_stores_only_what_crosses_it(tmp_path):
    from sgfx.engine.sweep import SequentialPruner

    gm = sgfx.passes.trace.trace(_MutatedWhileShared())
    batches = [torch.randn(3, 5) for _ in range(3)]
    store = ActivationStore(host_bytes=1, spill_dir=str(tmp_path))
    pruner = SequentialPruner(gm, {}, prune=lambda *args: None, store=store)
    assert [[n.name for n in nodes] for nodes in pruner._segments.values()] == [["sin", "mul", "add_", "add"]]
    pruner._pinned = set()  # no guard needed: nothing inside the segment is stored
    outputs = pruner.run_batches(batches)
    expected = [_MutatedWhileShared()(b.clone()) for b in batches]
    assert all(torch.equal(o, e) for o, e in zip(outputs, expected))
    # only the segment's last value entered the store (and the output node's list of it)
    assert store.spilled_bytes == 2 * sum(e.nbytes for e in expected)
    store.close()
    node_by_node = ActivationStore(host_bytes=1, spill_dir=str(tmp_path))
    pruner = SequentialPruner(gm, {}, prune=lambda *args: None, store=node_by_node)
    pruner._segments = {}
    pruner.run_batches(batches)
    assert node_by_node.spilled_bytes > store.spilled_bytes  # mul and the in-place add were stored too
    node_by_node.close()
