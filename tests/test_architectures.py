"""Slow end-to-end checks on full-size torchvision architectures (random weights): every family sparsifies, every
weight is pruned or reported, the pattern holds, detection models keep their type and forward. ``-m slow``."""

import pathlib
import sys
import warnings

import pytest
import torch

import sgfx
from sgfx.engine.inventory import is_weight
from sgfx.runtime.calibration import tensors_of

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import architectures  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name, least", [("fasterrcnn", 0.99), ("ssdlite", 0.9), ("vit_b_16", 0.99),
                                         ("deeplabv3", 0.95), ("r3d_18", 0.99), ("swin_t", 0.99)])
def test_architecture_sparsifies_with_every_weight_accounted_for(name, least):
    family, build, make, batches, options = architectures.MODELS[name]
    options = {k: v for k, v in options.items() if k != "measure"}
    g = torch.Generator().manual_seed(0)
    model = build().eval()
    calib = [make(g) for _ in range(batches)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned = sgfx.sparsify(model, calib, "2:4", **options)
    assert type(pruned) is type(model) or isinstance(pruned, torch.fx.GraphModule)
    report = sgfx.get_report(pruned)
    weights = {n: p.numel() for n, p in pruned.named_parameters() if is_weight(p)}
    assert set(weights) <= {r.weight_name for r in report.layers}
    assert all(r.pruned or r.reason for r in report.layers)
    fraction = sum(weights.get(r.weight_name, 0) for r in report.pruned_layers) / sum(weights.values())
    assert fraction >= least, fraction
    assert sgfx.check_pattern(pruned, "2:4")
    with torch.no_grad():
        out = pruned(make(g))
    assert all(torch.isfinite(t).all() for t in tensors_of(out))
    if name == "swin_t":  # its qkv/proj weights reach torchvision's wrapped shifted_window_attention: still pruned
        pruned_names = {r.weight_name for r in report.pruned_layers}
        assert {"features.1.0.attn.qkv.weight", "features.1.0.attn.proj.weight"} <= pruned_names
