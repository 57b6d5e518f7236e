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
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 16, 1)
        self.big = nn.Linear(128, 64)  # 64x128: a multiple of every backend's tile
        self.odd = nn.Linear(64, 12)  # 12 rows: no backend takes it
        self.kept_dense = nn.Linear(12, 32)

    def forward(self, x):
        x = self.conv(torch.relu(self.conv3(x))).flatten(1)
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
    assert not plan["conv3"].lowered and "no sparse convolution" in plan["conv3"].reason
    assert not plan["conv"].lowered and "not a multiple" in plan["conv"].reason  # 16x8: below the tile
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


class Pointwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.pw = nn.Conv2d(64, 128, 1)  # a 1x1 conv whose 128x64 weight fits every backend's tile
        self.strided = nn.Conv2d(128, 64, 1, stride=2)
        self.spatial = nn.Conv2d(64, 64, 3, padding=1)

    def forward(self, x):
        return self.spatial(self.strided(torch.relu(self.pw(x))))


@pytest.fixture
def pruned_pointwise(gen):
    model = Pointwise().eval()
    return sgfx.sparsify(model, torch.randn(8, 64, 8, 8, generator=gen), "2:4", method="magnitude")


def test_pointwise_convs_are_timing_candidates(pruned_pointwise):
    plan = {d.layer: d for d in sgfx.lowering.plan_semi_structured(pruned_pointwise, torch.float16)}
    assert plan["pw"].reason == sgfx.lowering.semi_structured.CANDIDATE and not plan["pw"].lowered
    assert "no sparse convolution" in plan["strided"].reason
    assert "no sparse convolution" in plan["spatial"].reason


@pytest.mark.parametrize("channels_last", [False, True])
def test_pointwise_conv_as_channels_last_matmul_equals_conv(pruned_pointwise, gen, channels_last):
    conv = pruned_pointwise.pw
    module = sgfx.lowering.SemiStructuredConv1x1(conv, compress=lambda w: w)  # dense weight: the layout on the CPU
    x = torch.randn(3, 64, 5, 7, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(module(x), conv(x), rtol=1e-5, atol=1e-5)


def test_tensorrt_sparsity_log_is_parsed_and_mapped_to_layers():
    messages = [
        "Some other TensorRT line",
        "(Sparsity) Layers eligible for sparse math: [CONVOLUTION]-[aten_ops.convolution.default]-[/layer1/0/conv1/"
        "convolution] + [RELU]-[relu], [CONVOLUTION]-[aten_ops.convolution.default]-[/layer1/0/conv2/convolution], "
        "[MATMUL]-[aten_ops.addmm]-[/fc/addmm]",
        "(Sparsity) TRT inference plan picked sparse implementation for layers: [CONVOLUTION]-[aten_ops.convolution"
        ".default]-[/layer1/0/conv2/convolution]",
    ]
    result = sgfx.lowering.parse_sparsity_log(messages, ["layer1.0.conv1", "layer1.0.conv2", "fc", "layer2.0.conv1"])
    assert result.log_seen and len(result.eligible) == 3 and len(result.picked) == 1
    assert result.layers == {"layer1.0.conv1": "eligible (dense kernel was faster)", "layer1.0.conv2": "sparse kernel",
                             "fc": "eligible (dense kernel was faster)", "layer2.0.conv1": "not eligible"}
    assert "1 sparse kernel" in str(result)
    silent = sgfx.lowering.parse_sparsity_log(["nothing here"], ["fc"])
    assert not silent.log_seen and silent.layers == {"fc": "not eligible"} and "no layer was eligible" in str(silent)


@pytest.mark.skipif(not HAS_CUDA, reason="semi-structured sparsity needs a CUDA GPU")
def test_pointwise_lowering_is_timed_and_matches_dense(pruned_pointwise, gen):
    x = torch.randn(32, 64, 28, 28, generator=gen)
    lowered = sgfx.lower(pruned_pointwise, backend="semi_structured", example_inputs=(x,))
    decision = {d.layer: d for d in sgfx.get_report(lowered).lowering}["pw"]
    assert "ms vs dense conv" in decision.reason
    assert isinstance(lowered.pw, sgfx.lowering.SemiStructuredConv1x1) == decision.lowered
    reference = pruned_pointwise.to(device="cuda", dtype=torch.float16)
    with torch.no_grad():
        xs = x.to(device="cuda", dtype=torch.float16)
        torch.testing.assert_close(lowered(xs), reference(xs), rtol=2e-2, atol=2e-2)
