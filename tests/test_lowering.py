"""Lowering: eligibility decisions, clear errors without CUDA/TensorRT, torch.compile, and (GPU only) numerics."""

import importlib.util

import pytest
import torch
from torch import nn

import sgfx
from models import ConvBnNet, randomize_bn

HAS_CUDA = torch.cuda.is_available()


class MLPHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 1)
        self.big = nn.Linear(128, 64)  # 64x128: a multiple of every backend's tile
        self.odd = nn.Linear(64, 12)  # 12 rows: no backend takes it
        self.kept_dense = nn.Linear(12, 32)

    def forward(self, x):
        x = self.conv(x).flatten(1)
        return self.kept_dense(self.odd(torch.relu(self.big(x))))


@pytest.fixture
def pruned_head(gen):
    model = MLPHead().eval()
    return model, sgfx.sparsify(model, torch.randn(32, 8, 2, 4, generator=gen), "2:4", skip=["kept_dense"])


def test_semi_structured_plan(pruned_head):
    _, gm = pruned_head
    plan = {d.layer: d for d in sgfx.lowering.plan_semi_structured(gm, torch.float16)}
    assert plan["big"].lowered and plan["big"].reason == ""
    assert not plan["odd"].lowered and "not a multiple" in plan["odd"].reason
    assert not plan["kept_dense"].lowered and plan["kept_dense"].reason == "weight is not 2:4 sparse"
    assert not plan["conv"].lowered and "no sparse convolution" in plan["conv"].reason
    with pytest.raises(ValueError, match="float16, bfloat16 or int8"):
        sgfx.lowering.plan_semi_structured(gm, torch.float32)


@pytest.mark.skipif(HAS_CUDA, reason="checks the error raised without CUDA")
def test_semi_structured_needs_cuda(pruned_head):
    _, gm = pruned_head
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        sgfx.lower(gm, backend="semi_structured")


@pytest.mark.skipif(importlib.util.find_spec("torch_tensorrt") is not None, reason="torch-tensorrt is installed")
def test_tensorrt_missing_gives_install_hint(pruned_head):
    _, gm = pruned_head
    with pytest.raises(ImportError, match=r"pip install 'sgfx\[tensorrt\]'"):
        sgfx.lower(gm, backend="tensorrt", example_inputs=(torch.randn(1, 8, 2, 4),))


def test_lower_bad_arguments(pruned_head):
    model, gm = pruned_head
    with pytest.raises(ValueError, match="unknown backend"):
        sgfx.lower(gm, backend="cusparse")
    with pytest.raises(TypeError, match="GraphModule"):
        sgfx.lower(model)


@pytest.mark.filterwarnings("ignore:sgfx.*left dense")
def test_torch_compile_matches_eager(gen):
    model = randomize_bn(ConvBnNet(), gen).eval()
    gm = sgfx.sparsify(model, torch.randn(16, 3, 16, 16, generator=gen), "2:4")
    x = torch.randn(4, 3, 16, 16, generator=gen)
    compiled = torch.compile(gm)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), gm(x), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not HAS_CUDA, reason="semi-structured sparsity needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_semi_structured_numerics_match_dense_with_zeros(pruned_head, gen, dtype):
    _, gm = pruned_head
    lowered = sgfx.lower(gm, backend="semi_structured", dtype=dtype)
    assert isinstance(lowered.big, sgfx.lowering.SemiStructuredLinear)
    assert isinstance(lowered.odd, nn.Linear)
    reference = gm.to(device="cuda", dtype=dtype)
    x = torch.randn(64, 8, 2, 4, generator=gen).to(device="cuda", dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(lowered(x), reference(x), rtol=2e-2, atol=2e-2)
