"""torch.export keeps sparsified weights bit-exact (small models, every run); the seed models and torchvision
ResNet-50 go through the whole road to TensorRT (marker ``slow``: ONNX fp32/fp16, Polygraphy, onnxruntime parity)."""

import pathlib
import sys

import pytest
import torch

import sgfx
from models import ConvBnNet, Functional, cifar_resnet10, randomize_bn

pytestmark = pytest.mark.filterwarnings("ignore:sgfx.*left dense", "ignore::DeprecationWarning",
                                        "ignore::FutureWarning", "ignore:sgfx.*no bias to correct")


@pytest.mark.parametrize("build, shape", [(ConvBnNet, (3, 16, 16)), (Functional, (8, 8, 8)),
                                          (cifar_resnet10, (3, 8, 8))], ids=["convbn", "functional", "resnet10"])
def test_torch_export_keeps_weights_bit_exact(gen, tmp_path, build, shape):
    model = randomize_bn(build(), gen).eval()
    gm = sgfx.sparsify(model, torch.randn(8, *shape, generator=gen), "2:4", method="magnitude")
    x = torch.randn(2, *shape, generator=gen)
    program = torch.export.export(gm, (x,))
    torch.export.save(program, tmp_path / "m.pt2")
    loaded = torch.export.load(tmp_path / "m.pt2")
    state = gm.state_dict()
    for ep in (program, loaded):
        assert sorted(ep.state_dict) == sorted(state)
        for name, tensor in state.items():
            assert torch.equal(ep.state_dict[name], tensor), name
    for record in sgfx.get_report(gm).pruned_layers:
        assert sgfx.check_pattern(loaded.state_dict[record.weight_name], "2:4")
    with torch.no_grad():
        torch.testing.assert_close(loaded.module()(x), gm(x), rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mnist_cnn", "cifar_cnn", "resnet18_cifar", "vgg16_cifar", "resnet50"])
def test_model_reaches_tensorrt_verified(name, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("polygraphy")
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
    from export_check import check_model

    row = check_model(name, tmp_path)
    assert row["pruned"] > 0
    assert row["pruned_found"] == row["pruned"] == row["pruned_eligible"] == row["fp16_pruned_eligible"]
    assert row["disagreements"] == []  # Polygraphy agrees with sgfx on every weight layer
    assert row["polygraphy_sparse"] == row["eligible"]
    assert row["max_rel_error"] <= 1e-4
    assert row["torch_export_bit_exact"] and row["torch_export_same_outputs"]
