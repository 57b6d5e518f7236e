"""INT8 with 2:4 (quantize="int8"): the joint OBS kernel against the per-column reference, the fake-quantized graph
against an independent forward, the QDQ export against onnxruntime and Polygraphy, the file format, bad input."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sgfx
from models import PLAIN, ConvBnNet, TwoLayer, UNet, randomize_bn
from reference import correlated_inputs, hessian_of, per_column_obs, polygraphy_sparse_tensors
from sgfx import NMPattern, Unstructured, sparsegpt_prune
from sgfx.passes.quantizers import is_quantizer
from sgfx.quantize import activation_scale, quantize_weight, weight_integers, weight_scales

PATTERNS = [NMPattern(2, 4), NMPattern(4, 8), Unstructured(0.5), Unstructured(0.0)]


def _on_grid(weight: torch.Tensor, scales: torch.Tensor, axis: int = 0) -> bool:
    shape = [1] * weight.dim()
    shape[axis] = -1
    q = weight.double() / scales.double().view(shape)
    return bool(torch.all((q - q.round()).abs() < 1e-4)) and float(q.abs().max()) <= 127 + 1e-4  # float32 products


# ------------------------------------------------------------------------------------------------- the kernel
@pytest.mark.parametrize("pattern, blocksize", [(p, b) for p in PATTERNS for b in (8, 16, 128)], ids=str)
def test_joint_kernel_matches_per_column_reference_float64(gen, pattern, blocksize):
    weight = torch.randn(12, 48, generator=gen, dtype=torch.float64)
    hessian = hessian_of(correlated_inputs(400, 48, gen))
    grid = weight_scales(weight).double()
    expected_w, expected_mask = per_column_obs(weight, hessian, pattern, blocksize, grid=grid)
    result = sparsegpt_prune(weight, hessian, pattern, blocksize=blocksize, dtype=torch.float64, weight_scales=grid)
    assert torch.equal(result.pruned, expected_mask)
    torch.testing.assert_close(result.weight, expected_w, rtol=1e-9, atol=1e-9)
    assert _on_grid(result.weight, grid)
    assert torch.all(result.weight[result.pruned] == 0)
    if isinstance(pattern, NMPattern):
        assert int((result.weight.view(12, -1, pattern.m) != 0).sum(2).max()) <= pattern.n


@pytest.mark.parametrize("pattern", [Unstructured(0.0)], ids=str)
def test_joint_kernel_adds_less_error_than_rounding_afterwards(gen, pattern):
    """Compensating the rounding error (GPTQ: nothing pruned) adds less output error to the float solution than
    rounding it to the same grid. (With pruning, the rounding changes which weights later groups prune, and on a
    random layer the two differ by less than the greedy mask choice's own noise: docs/RESULTS.md.)"""
    weight = torch.randn(32, 64, generator=gen, dtype=torch.float64)
    hessian = hessian_of(correlated_inputs(800, 64, gen))
    solution = sparsegpt_prune(weight, hessian, pattern, dtype=torch.float64).weight
    grid = weight_scales(solution).double() * 4  # a coarse grid wide enough not to clip

    def error(w):
        delta = weight - w
        return float(((delta @ hessian) * delta).sum())

    joint = sparsegpt_prune(weight, hessian, pattern, dtype=torch.float64, weight_scales=grid).weight
    separate = quantize_weight(solution, grid)
    assert error(joint) - error(solution) < 0.6 * (error(separate) - error(solution))


def test_solve_scales_come_from_the_float_solution(gen):
    weight = torch.randn(16, 32, generator=gen, dtype=torch.float64)
    hessian = hessian_of(correlated_inputs(400, 32, gen))
    solution = sparsegpt_prune(weight, hessian, NMPattern(2, 4), dtype=torch.float64).weight
    result = sparsegpt_prune(weight, hessian, NMPattern(2, 4), dtype=torch.float64, weight_scales="solve")
    torch.testing.assert_close(result.scales, weight_scales(solution), rtol=0, atol=0)
    assert _on_grid(result.weight, result.scales)
    with pytest.raises(ValueError, match="weight_scales must be"):
        sparsegpt_prune(weight, hessian, NMPattern(2, 4), weight_scales="max")


def test_weight_grid_helpers(gen):
    weight = torch.randn(6, 10, 3, generator=gen)
    scales = weight_scales(weight.reshape(6, -1))
    rounded = quantize_weight(weight, scales)
    assert torch.equal(weight_integers(rounded, scales).float() * scales.view(-1, 1, 1), rounded)
    assert int(weight_integers(rounded, scales).abs().max()) == 127  # the largest |w| of each row maps to 127
    with pytest.raises(ValueError, match="not on its INT8 grid"):
        weight_integers(rounded + 1e-3, scales)


def test_activation_scales(gen):
    values = [torch.randn(5000, generator=gen) for _ in range(4)]
    amax = max(float(v.abs().max()) for v in values)
    assert float(activation_scale(values, "max")) == pytest.approx(amax / 127, rel=1e-6)
    outlier = values + [torch.tensor([1e3])]
    assert float(activation_scale(outlier, "max")) == pytest.approx(1e3 / 127, rel=1e-6)
    assert float(activation_scale(outlier, "percentile")) < 0.01 * 1e3 / 127  # one outlier in 20001 values: under 0.01 %
    with pytest.raises(ValueError, match="NaN or infinite"):
        activation_scale([torch.tensor([1.0, float("nan")])], "max")
    with pytest.raises(ValueError, match="unknown activation calibration"):
        activation_scale(values, "mse")


# ------------------------------------------------------------------------------------------------- the graph
def _quantized_forward(gm: torch.fx.GraphModule, x: torch.Tensor) -> torch.Tensor:
    """The graph run with each quantizer replaced by the formula ``clamp(round(x / s), -128, 127) * s``."""

    class Formula(torch.fx.Interpreter):
        def call_function(self, target, args, kwargs):
            if target is torch.fake_quantize_per_tensor_affine:
                value, scale = args[0], args[1]
                return torch.round(value / scale).clamp(-128, 127) * scale
            return super().call_function(target, args, kwargs)

    with torch.no_grad():
        return Formula(gm).run(x)


MODELS = {"convbn": (ConvBnNet, (3, 16, 16)), "two_layer": (TwoLayer, (8, 12, 12)), "unet": (UNet, (3, 16, 16))}


def _sparsify(name, gen, pattern="2:4", randomize=True, compare=False, **options):
    build, shape = MODELS[name]
    model = randomize_bn(build(), gen).eval() if randomize else build().eval()
    calib = [torch.randn(8, *shape, generator=gen) for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = sgfx.sparsify(model, calib, pattern, quantize="int8", **options)
        floating = sgfx.sparsify(model, calib, pattern, **options) if compare and pattern else model  # same pruning
        return (model, floating), gm, shape


@pytest.mark.parametrize("name, pattern", [(n, p) for n in MODELS for p in ("2:4", 0.0)] + [("convbn", 0.5)], ids=str)
def test_quantized_graph_is_int8_and_keeps_the_pattern(gen, name, pattern):
    (dense_model, floating_model), gm, shape = _sparsify(name, gen, pattern, randomize=False, compare=True,
                                                         bn_reestimate=False)
    report = sgfx.get_report(gm)
    quantized = [r for r in report.layers if "weight_scale" in r.quant]
    assert quantized and report.quantize == "int8"
    for record in quantized:
        weight = gm.get_parameter(record.weight_name).detach()
        assert _on_grid(weight, getattr(gm, record.quant["weight_scale"]), record.quant["weight_axis"])
        assert record.quant["input_scale"] > 0
    if pattern == "2:4":
        assert sgfx.check_pattern(gm, "2:4")
    x = torch.randn(4, *shape, generator=gen)
    with torch.no_grad():
        got, dense, floating = gm(x), dense_model(x), floating_model(x)
    torch.testing.assert_close(got, _quantized_forward(gm, x), rtol=1e-4, atol=1e-4 * float(got.abs().max()))
    # INT8 adds little to the error of the float model pruned the same way (none, for 0.0)
    assert float((got - dense).norm()) < 1.2 * float((floating - dense).norm()) + 0.05 * float(dense.norm())
    assert all(entry["scale"] > 0 for entry in report.quantizers)


def test_mean_std_correction_keeps_the_integers(gen):
    """stats_correction="mean_std" rescales output channels after the solve: the INT8 scales absorb it."""
    _, gm, _ = _sparsify("two_layer", gen, "2:4", stats_correction="mean_std")
    report = sgfx.get_report(gm)
    assert report.stats_corrected
    for record in report.layers:
        if "weight_scale" in record.quant:
            weight = gm.get_parameter(record.weight_name).detach()
            assert _on_grid(weight, getattr(gm, record.quant["weight_scale"]), record.quant["weight_axis"])
    assert sgfx.check_pattern(gm, "2:4")


def test_quantizers_where_int8_kernels_need_them(gen):
    """Input of every quantized layer; output after each conv-bn-relu unit, not after the graph's output; an input
    on another quantizer's grid (through ReLU and max pooling) shares its scale."""
    _, gm, _ = _sparsify("convbn", gen, 0.0)
    report = sgfx.get_report(gm)
    entries = {e["scale_buffer"]: e for e in report.quantizers}
    by_layer = {r.name: r.quant for r in report.layers}
    assert by_layer["conv1"]["output_after_relu"] and by_layer["conv2"]["output_after_relu"]
    assert "output_scale" not in by_layer["fc2"]  # the graph output stays float
    conv2_input = entries[by_layer["conv2"]["input_buffer"]]
    assert conv2_input["source"] == by_layer["conv1"]["output_buffer"] and conv2_input["method"] == "shared"
    assert by_layer["conv2"]["input_scale"] == by_layer["conv1"]["output_scale"]
    quantizers = [n for n in gm.graph.nodes if is_quantizer(n)]
    assert len(quantizers) == len(report.quantizers)


def test_scales_are_calibrated_on_the_quantized_upstream(gen):
    """Sequential: a quantizer's scale is the statistic of what reaches it from the already pruned and quantized
    layers before it (recomputed here from the returned graph, whose conv1 computes what the sweep saw)."""
    calib = [torch.randn(8, 8, 12, 12, generator=gen) for _ in range(3)]
    gm = sgfx.sparsify(TwoLayer().eval(), calib, "2:4", quantize="int8", activation_calibration="max")
    quant = {r.name: r.quant for r in sgfx.get_report(gm).layers}
    assert quant["conv1"]["input_scale"] == pytest.approx(max(float(b.abs().max()) for b in calib) / 127, rel=1e-6)
    seen = []
    handle = gm.conv1.register_forward_hook(lambda module, args, out: seen.append(F.relu(out)))
    with torch.no_grad():
        for batch in calib:
            gm(batch)
    handle.remove()
    assert quant["conv1"]["output_scale"] == pytest.approx(max(float(v.max()) for v in seen) / 127, rel=1e-6)
    assert quant["conv2"]["input_scale"] == quant["conv1"]["output_scale"]


def test_float_model_unchanged_without_quantize(gen):
    model = ConvBnNet().eval()
    gm = sgfx.sparsify(model, torch.randn(8, 3, 16, 16, generator=gen), "2:4", **PLAIN)
    assert not any(is_quantizer(n) for n in gm.graph.nodes)
    assert sgfx.get_report(gm).quantize is None and not sgfx.get_report(gm).quantizers


def test_save_load_stores_int8_and_is_bit_exact(gen, tmp_path):
    _, gm, shape = _sparsify("convbn", gen)
    path = tmp_path / "int8.sgfx"
    sgfx.save(gm, path)
    stored = torch.load(path, weights_only=True)["tensors"]
    assert stored["conv2.weight:values"].dtype == torch.int8
    loaded = sgfx.load(path)
    x = torch.randn(4, *shape, generator=gen)
    with torch.no_grad():
        assert torch.equal(gm(x), loaded(x))
    assert sgfx.get_report(loaded).quantizers == sgfx.get_report(gm).quantizers
    for record in sgfx.get_report(gm).layers:  # the weight scales, which no graph node reads, come back too
        if "weight_scale" in record.quant:
            assert torch.equal(getattr(loaded, record.quant["weight_scale"]), getattr(gm, record.quant["weight_scale"]))
    _, weights = sgfx.serialization.read_pruned(path)
    assert torch.equal(weights["conv2.weight"], gm.conv2.weight.detach())


# ------------------------------------------------------------------------------------------------- the export
@pytest.mark.parametrize("name", list(MODELS))
def test_qdq_export_runs_in_onnxruntime(gen, tmp_path, name):
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    _, gm, shape = _sparsify(name, gen)
    x = torch.randn(2, *shape, generator=gen)
    report = sgfx.export_onnx(gm, (x,), tmp_path / "m.onnx")
    assert report.max_rel_error <= 1e-3  # the file as written against the fake-quantized graph
    quantized = {r.name for r in sgfx.get_report(gm).layers if "weight_scale" in r.quant}
    assert set(report.int8_layers) == quantized
    model = onnx.load(tmp_path / "m.onnx")
    initializers = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    expected_axis = {"Conv": 0, "ConvTranspose": 1, "Gemm": 0}
    for node in model.graph.node:
        if node.op_type in expected_axis and node.input[1] in producers:
            dq = producers[node.input[1]]
            assert dq.op_type == "DequantizeLinear"
            assert initializers[dq.input[0]].data_type == onnx.TensorProto.INT8
            axis = next(a.i for a in dq.attribute if a.name == "axis")
            assert axis == expected_axis[node.op_type]
            assert producers[node.input[0]].op_type == "DequantizeLinear"  # its input is Q/DQ'd
    for layer in report.pruned:
        if layer.op_type != "ConvTranspose":
            assert layer.eligible, layer  # 2:4 read on the INT8 integers behind DequantizeLinear
    kernels = report.onnxruntime_kernels
    with_output = sum(1 for r in sgfx.get_report(gm).layers if r.quant.get("output_scale") is not None
                      and r.op.startswith("Conv2d"))
    assert kernels.get("QLinearConv", 0) >= with_output


def test_polygraphy_agrees_on_the_int8_initializers(gen, tmp_path):
    pytest.importorskip("polygraphy")
    _, gm, shape = _sparsify("convbn", gen)
    report = sgfx.export_onnx(gm, (torch.randn(2, *shape, generator=gen),), tmp_path / "m.onnx")
    candidates, sparse = polygraphy_sparse_tensors(tmp_path / "m.onnx", int8_as_float=True)
    ours = {layer.initializer for layer in report.layers if layer.eligible}
    assert ours == {"conv2.weight_int8", "fc1.weight_int8", "fc2.weight_int8"}  # conv1: 3 input channels
    assert ours <= candidates  # Polygraphy followed each DequantizeLinear to the INT8 initializer
    assert ours == sparse


def test_fold_with_negative_gamma_keeps_the_integers(gen, tmp_path):
    pytest.importorskip("onnxruntime")
    build, shape = MODELS["convbn"]
    model = randomize_bn(build(), gen).eval()
    with torch.no_grad():
        model.bn2.weight[::2] *= -1  # folding flips these channels' weights
    calib = [torch.randn(8, *shape, generator=gen) for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = sgfx.sparsify(model, calib, "2:4", quantize="int8")
    report = sgfx.export_onnx(gm, (torch.randn(2, *shape, generator=gen),), tmp_path / "m.onnx")
    assert report.max_rel_error <= 1e-3 and "conv2" in report.int8_layers


# ------------------------------------------------------------------------------------------------- bad input
def test_bad_quantize_options(gen):
    x = torch.randn(4, 8, 6, 6, generator=gen)
    with pytest.raises(ValueError, match="unknown quantize 'int4'"):
        sgfx.sparsify(TwoLayer().eval(), x, "2:4", quantize="int4")
    with pytest.raises(ValueError, match="unknown activation_calibration"):
        sgfx.sparsify(TwoLayer().eval(), x, "2:4", quantize="int8", activation_calibration="entropy")
    with pytest.raises(ValueError, match="sparsity 0.0 prunes nothing"):
        sgfx.sparsify(TwoLayer().eval(), x, 0.0)
    with pytest.raises(ValueError, match="submodules= is not supported"):
        sgfx.sparsify(TwoLayer().eval(), x, "2:4", quantize="int8", submodules=["conv1"])


def test_model_already_quantized_is_refused(gen):
    class Prequantized(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 16, 3)

        def forward(self, x):
            return self.conv(torch.fake_quantize_per_tensor_affine(x, 0.1, 0, -128, 127))

    with pytest.raises(ValueError, match="already quantizes"):
        sgfx.sparsify(Prequantized().eval(), torch.randn(4, 8, 6, 6, generator=gen), "2:4", quantize="int8")


def test_nan_activations_are_named(gen):
    class Blowup(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(8, 16, 3), nn.Conv2d(16, 8, 3)

        def forward(self, x):
            return self.conv2(torch.log(self.conv1(x)))  # log of negative values: NaN

    with pytest.raises(ValueError, match="input of conv2: NaN or infinite"):
        sgfx.sparsify(Blowup().eval(), torch.randn(4, 8, 8, 8, generator=gen), "2:4", quantize="int8", **PLAIN)


def test_layers_that_cannot_be_quantized_are_reported(gen):
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 16, 3, padding=1)
            self.up = nn.ConvTranspose2d(16, 16, 2, stride=2, groups=2)
            self.w = nn.Parameter(torch.randn(8, 16, 1, 1) * 0.1)  # a functional conv, called twice

        def forward(self, x):
            y = self.up(F.relu(self.conv(x)))
            return F.conv2d(y, self.w) + F.conv2d(y.flip(-1), self.w)

    with pytest.warns(UserWarning, match="stay float"):
        gm = sgfx.sparsify(Mixed().eval(), torch.randn(4, 8, 6, 6, generator=gen), "2:4", quantize="int8")
    quant = {r.name: r.quant for r in sgfx.get_report(gm).layers}
    assert "weight_scale" in quant["conv"]
    assert "grouped ConvTranspose" in quant["up"]["reason"]
    assert "called once" in quant["w"]["reason"]
    assert "not quantized" in sgfx.report(gm)
