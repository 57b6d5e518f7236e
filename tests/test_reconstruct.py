"""Label-free block reconstruction (``reconstruct=``): blocks from the module hierarchy, zeros kept, held-out checks."""

import pytest
import torch

import sgfx
from sgfx.engine import pipeline
from sgfx.engine.reconstruct import find_blocks, held_out_split
from sgfx.layers import fetch_tensor
from sgfx.passes.trace import trace
from tests.models import ConvBnNet, Functional, UNet, plain_sparsify
from tests.test_speed import _Residual


def _calibrated(model, shape, gen, images=192):
    """``model`` with BatchNorm statistics of the data (as a trained model has), its data and a test set."""
    data = torch.randn(images + 128, *shape, generator=gen)
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # the cumulative average: the data's statistics, not a mix with the initial ones
    with torch.no_grad():
        for batch in data[:images].split(32):
            model(batch)
    return model.eval(), list(data[:images].split(32)), data[images:]


def _relative_error(outputs, reference):
    return float((outputs - reference).pow(2).mean() / reference.pow(2).mean())


MODELS = [(ConvBnNet, (3, 16, 16)), (_Residual, (3, 16, 16)), (Functional, (8, 8, 8))]


@pytest.mark.parametrize("make, shape", MODELS, ids=[m.__name__ for m, _ in MODELS])
def test_magnitude_masks_are_kept_and_the_fit_lowers_the_output_error(gen, make, shape):
    """Magnitude pruning leaves large errors that the fit can lower: the masks are exactly those of the run without
    reconstruction, zeros stay zero, and the held-out and test output errors fall."""
    model, calib, test = _calibrated(make(), shape, gen)
    options = dict(method="magnitude", permute_channels=False, stats_correction=False, bn_reestimate=False)
    plain = sgfx.sparsify(model, calib, "2:4", **options)
    fitted = sgfx.sparsify(model, calib, "2:4", reconstruct=60, reconstruct_lr=1e-3, **options)
    summary = sgfx.get_report(fitted).reconstructed
    assert summary["kept"] and summary["output_error_after"] < summary["output_error_before"]
    assert [b["block"] for b in summary["blocks"]]
    for record in sgfx.get_report(plain).pruned_layers:
        before, after = fetch_tensor(plain, record.weight_name), fetch_tensor(fitted, record.weight_name)
        assert torch.equal(before != 0, after != 0), record.name  # same kept entries, zeros exactly zero
        assert not torch.equal(before, after), record.name  # and the kept ones moved
    with torch.no_grad():
        reference = model(test)
        assert _relative_error(fitted(test), reference) < 0.9 * _relative_error(plain(test), reference)


def test_output_error_before_is_the_plain_models_held_out_error(gen):
    """The summary's starting error is the relative squared error of the run without reconstruction against the
    dense model on the held-out batches (the last fifth), computed here directly."""
    model, calib, _ = _calibrated(ConvBnNet(), (3, 16, 16), gen)
    plain = plain_sparsify(model, calib, "2:4")
    fitted = plain_sparsify(model, calib, "2:4", reconstruct=5)
    _, held = held_out_split(len(calib))
    with torch.no_grad():
        direct = sum(_relative_error(plain(calib[i]), model(calib[i])) for i in held) / len(held)
    assert sgfx.get_report(fitted).reconstructed["output_error_before"] == pytest.approx(direct, rel=1e-4)


def test_a_step_that_does_not_help_is_put_back_exactly(gen, monkeypatch):
    """When the held-out output error does not fall the model is the run without reconstruction, bit for bit."""
    model, calib, _ = _calibrated(ConvBnNet(), (3, 16, 16), gen)
    plain = sgfx.sparsify(model, calib, "2:4")
    real = pipeline.reconstruct_blocks

    def worse_on_held_out(*args, **kwargs):  # a fit that diverges: the guard must undo it
        return real(*args[:4], 20, 0.5, *args[6:], **kwargs)

    monkeypatch.setattr(pipeline, "reconstruct_blocks", worse_on_held_out)
    fitted = sgfx.sparsify(model, calib, "2:4", reconstruct=20)
    summary = sgfx.get_report(fitted).reconstructed
    assert not summary["kept"] and summary["output_error_after"] >= summary["output_error_before"]
    for name, value in plain.state_dict().items():
        assert torch.equal(value, fitted.state_dict()[name]), name
    assert "put back" in str(sgfx.get_report(fitted))


def test_default_run_is_aligned_with_the_dense_copy(gen):
    """With the defaults (channels permuted inside the sweep) the fit starts from the aligned dense copy: the first
    block's error is small and the step lowers the held-out output error on a U-Net with skips and transposed
    convs."""
    model, calib, test = _calibrated(UNet(width=8), (3, 16, 16), gen, images=160)
    fitted = sgfx.sparsify(model, calib, "2:4", reconstruct=40, reconstruct_lr=1e-3)
    report = sgfx.get_report(fitted)
    assert report.permuted  # the in-sweep permutation ran, so misalignment would show
    summary = report.reconstructed
    assert summary["blocks"][0]["error_before"] < 0.5
    assert all(b["error_fitted"] < b["error_before"] for b in summary["blocks"] if b["kept"])
    assert report.time_split["block reconstruction"] > 0


def test_blocks_follow_the_module_hierarchy():
    gm = trace(UNet(), (), None)
    pruned = {n + ".weight" for n in ("down1.3", "down2.0", "down2.3", "bottom.0", "bottom.3", "up2", "dec2.0",
                                      "dec2.3", "up1", "dec1.0", "dec1.3", "head")}
    blocks = find_blocks(gm, pruned)
    assert [b.name for b in blocks] == ["down1", "down2", "bottom", "up2", "dec2", "up1", "dec1", "head"]
    assert sorted(blocks[1].masks) == ["down2.0.weight", "down2.3.weight"]
    assert "down2.1.weight" in blocks[1].params and "down2.1.bias" in blocks[1].params  # BatchNorm affine
    # a model at the top level with more pruned layers than a block holds: one block per layer and what follows
    gm = trace(ConvBnNet(), (), None)
    blocks = find_blocks(gm, {"conv2.weight", "fc1.weight", "fc2.weight"}, block_layers=2)
    assert [b.name for b in blocks] == ["conv1", "conv2", "fc1", "fc2"]
    assert not blocks[0].fits and "bn2.weight" in blocks[1].params


class _Tied(torch.nn.Module):
    """``a`` and ``b`` share a weight; ``c`` between them puts ``b`` in another block."""

    def __init__(self):
        super().__init__()
        self.a, self.c, self.b = (torch.nn.Linear(16, 16) for _ in range(3))
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.c(torch.relu(self.a(x)))))


def test_a_weight_tied_across_blocks_is_fitted_in_neither():
    gm = trace(_Tied(), (), None)
    blocks = find_blocks(gm, {"a.weight", "c.weight"}, block_layers=1)
    assert [b.name for b in blocks] == ["a", "c"]
    assert "a.weight" not in blocks[0].params and "b.weight" not in blocks[1].params
    assert "c.weight" in blocks[1].masks and "b.bias" in blocks[1].params and "a.bias" in blocks[0].params


@pytest.mark.parametrize("options, message", [
    (dict(reconstruct=-1), "non-negative int"), (dict(reconstruct=True), "non-negative int"),
    (dict(reconstruct=2.5), "non-negative int"), (dict(reconstruct=5, reconstruct_lr=0), "reconstruct_lr"),
    (dict(reconstruct=5, quantize="int8"), "not supported yet"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        sgfx.SparsifyConfig("2:4", **options)


def test_multi_process_runs_are_refused(gen, monkeypatch):
    monkeypatch.setattr(pipeline.distributed, "is_active", lambda: True)
    with pytest.raises(ValueError, match="multi-process"):
        sgfx.sparsify(ConvBnNet().eval(), [torch.randn(4, 3, 16, 16, generator=gen)], "2:4", reconstruct=5)


def test_report_survives_save_and_load(gen, tmp_path):
    model, calib, _ = _calibrated(ConvBnNet(), (3, 16, 16), gen)
    fitted = plain_sparsify(model, calib, "2:4", reconstruct=5)
    sgfx.save(fitted, tmp_path / "m.sgfx")
    loaded = sgfx.load(tmp_path / "m.sgfx")
    assert sgfx.get_report(loaded).reconstructed == sgfx.get_report(fitted).reconstructed
