"""ONNX export for TensorRT: the pattern verified on the exported initializers, by sgfx and by NVIDIA Polygraphy (an
independent checker), onnxruntime parity, fp16, BatchNorm folding, and bad input."""

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sgfx
from models import ConvBnNet, Functional, randomize_bn
from reference import polygraphy_sparse_tensors

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("polygraphy")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:sgfx.*left dense", "ignore::DeprecationWarning",
                                        "ignore::FutureWarning")


class Mixed(nn.Module):
    """Grouped, depthwise, 1x1 and strided convs, and a Linear over a 3-D input (a MatMul in ONNX)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.grouped = nn.Conv2d(16, 32, 3, padding=1, groups=2)
        self.depthwise = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.pointwise = nn.Conv2d(32, 24, 1, stride=2)
        self.token = nn.Linear(24, 16)
        self.head = nn.Linear(16, 6)

    def forward(self, x):
        x = F.relu(self.pointwise(F.relu(self.depthwise(F.relu(self.grouped(F.relu(self.stem(x))))))))
        tokens = self.token(x.flatten(2).transpose(1, 2))  # (B, HW, 16)
        return self.head(tokens.mean(1))


MODELS = {"convbn": (ConvBnNet, (3, 16, 16)), "functional": (Functional, (8, 8, 8)), "mixed": (Mixed, (3, 8, 8))}


def _assert_polygraphy_agrees(path, layers):
    """Every weight layer: sgfx's verdict equals Polygraphy's (a tensor it skips is not sparse-eligible)."""
    candidates, sparse = polygraphy_sparse_tensors(path)
    assert layers, "no weight layer found"
    for layer in layers:
        assert (layer.initializer in sparse) == layer.eligible, (layer, layer.initializer in candidates)


@pytest.fixture
def sparsified(request, gen):
    name, pattern = request.param
    build, shape = MODELS[name]
    model = randomize_bn(build(), gen).eval()
    gm = sgfx.sparsify(model, torch.randn(32, *shape, generator=gen), pattern)
    return gm, torch.randn(3, *shape, generator=gen)


CASES = [(name, pattern) for name in MODELS for pattern in ("2:4", "1:4")]


@pytest.mark.parametrize("sparsified", CASES, indirect=True, ids=[f"{n}-{p}" for n, p in CASES])
def test_export_verifies_pattern_parity_and_agrees_with_polygraphy(sparsified, tmp_path):
    gm, x = sparsified
    path = tmp_path / "model.onnx"
    report = sgfx.export_onnx(gm, (x,), path)
    assert path.is_file() and [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # one file, no leftovers
    pruned = {r.name for r in sgfx.get_report(gm).pruned_layers}
    assert pruned and {layer.layer for layer in report.pruned} == pruned
    assert all(layer.eligible for layer in report.pruned)
    assert report.max_rel_error is not None and report.max_rel_error <= 1e-4
    _assert_polygraphy_agrees(path, report.layers)
    assert "--sparsity=enable" in report.trtexec and str(path) in str(report)


@pytest.mark.parametrize("sparsified", [("mixed", "2:4")], indirect=True)
def test_report_names_why_layers_are_not_eligible(sparsified, tmp_path):
    gm, x = sparsified
    report = sgfx.export_onnx(gm, (x,), tmp_path / "m.onnx")
    by_layer = {layer.layer: layer for layer in report.layers}
    assert "not a multiple of 4" in by_layer["stem"].reason  # 3 input channels
    assert "depthwise" in by_layer["depthwise"].reason
    assert by_layer["grouped"].eligible and by_layer["pointwise"].eligible
    token = by_layer["token"]  # Linear on a 3-D input: MatMul with a transposed weight
    assert token.op_type in ("MatMul", "Gemm") and token.eligible and token.pruned


def test_batchnorm_folding_rescales_weights_and_keeps_zeros(gen, tmp_path):
    model = randomize_bn(ConvBnNet(), gen).eval()
    with torch.no_grad():
        model.bn2.weight.uniform_(0.5, 2.0, generator=gen)
    gm = sgfx.sparsify(model, torch.randn(32, 3, 16, 16, generator=gen), "2:4")
    path = tmp_path / "m.onnx"
    sgfx.export_onnx(gm, torch.randn(2, 3, 16, 16, generator=gen), path)
    proto = onnx.load(str(path))
    assert "BatchNormalization" not in {n.op_type for n in proto.graph.node}  # the optimizer folded it
    folded = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}["conv2.weight"]
    weight = gm.conv2.weight.detach().numpy()
    assert not np.allclose(folded, weight)  # rescaled per output channel ...
    np.testing.assert_array_equal(folded == 0, weight == 0)  # ... with exactly the same zeros
    scale = (gm.bn2.weight / torch.sqrt(gm.bn2.running_var + gm.bn2.eps)).detach().numpy()
    np.testing.assert_allclose(folded, weight * scale[:, None, None, None], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype, proto_type", [(torch.float16, TensorProto.FLOAT16), (torch.bfloat16, TensorProto.BFLOAT16)])
@pytest.mark.parametrize("sparsified", [("convbn", "2:4")], indirect=True)
def test_half_precision_export_keeps_dtype_and_pattern(sparsified, tmp_path, dtype, proto_type):
    gm, x = sparsified
    path = tmp_path / "half.onnx"
    report = sgfx.export_onnx(gm, (x,), path, dtype=dtype)
    assert report.dtype == str(dtype).removeprefix("torch.") and report.max_rel_error is None
    assert "--stronglyTyped" in report.trtexec and "float32 exports" in report.parity_note
    proto = onnx.load(str(path))
    weights = {t.name: t for t in proto.graph.initializer}
    for layer in report.layers:
        assert weights[layer.initializer].data_type == proto_type
    assert gm.conv2.weight.dtype == torch.float32  # the GraphModule itself is untouched
    assert all(layer.eligible for layer in report.pruned) and len(report.pruned) == 3
    if dtype == torch.float16:  # Polygraphy reads bfloat16 through int32 fields only; float16 it reads
        _assert_polygraphy_agrees(path, report.layers)


@pytest.mark.parametrize("sparsified", [("convbn", "2:4")], indirect=True)
def test_dynamic_batch_export_runs_other_batch_sizes(sparsified, tmp_path, gen):
    import onnxruntime as ort

    gm, x = sparsified
    path = tmp_path / "dyn.onnx"
    sgfx.export_onnx(gm, (x,), path, dynamic_batch=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    big = torch.randn(7, *x.shape[1:], generator=gen)
    out = session.run(None, {session.get_inputs()[0].name: big.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(out, gm(big).numpy(), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("sparsified", [("convbn", "2:4")], indirect=True)
def test_a_pruned_layer_that_lost_its_pattern_is_an_error_and_leaves_no_file(sparsified, tmp_path):
    gm, x = sparsified
    with torch.no_grad():
        gm.conv2.weight.add_(0.01)  # zeros gone between pruning and export
    path = tmp_path / "bad.onnx"
    with pytest.raises(sgfx.ExportError, match=r"conv2 \(conv2.weight\): pattern 2:4 lost"):
        sgfx.export_onnx(gm, (x,), path)
    assert list(tmp_path.iterdir()) == []


def test_non_2_4_pattern_is_refused_for_tensorrt_unless_asked(gen, tmp_path):
    model = randomize_bn(ConvBnNet(), gen).eval()
    gm = sgfx.sparsify(model, torch.randn(32, 3, 16, 16, generator=gen), "4:8")
    x = torch.randn(2, 3, 16, 16, generator=gen)
    with pytest.raises(ValueError, match="TensorRT accelerates only 2:4.*4:8"):
        sgfx.export_onnx(gm, (x,), tmp_path / "m.onnx")
    report = sgfx.export_onnx(gm, (x,), tmp_path / "m.onnx", require_2_4=False)
    assert report.pruned and not any(layer.eligible for layer in report.pruned)
    assert all("not 2:4 along axis" in layer.reason for layer in report.pruned)


def test_bad_inputs(gen, tmp_path, monkeypatch):
    model = ConvBnNet().eval()
    x = torch.randn(2, 3, 16, 16, generator=gen)
    with pytest.raises(ValueError, match="not sparsified by sgfx"):
        sgfx.export_onnx(model, (x,), tmp_path / "m.onnx")
    gm = sgfx.sparsify(model, torch.randn(16, 3, 16, 16, generator=gen), "2:4", method="magnitude")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="not an existing directory"):
        sgfx.export_onnx(gm, (x,), tmp_path / "file" / "m.onnx")
    with pytest.raises(ValueError, match="is a directory"):
        sgfx.export_onnx(gm, (x,), tmp_path)
    with pytest.raises(ValueError, match="dtype must be"):
        sgfx.export_onnx(gm, (x,), tmp_path / "m.onnx", dtype=torch.int8)
    with pytest.raises(TypeError, match="example inputs"):
        sgfx.export_onnx(gm, ("x",), tmp_path / "m.onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r"pip install 'sgfx\[onnx\]'.*check_outputs=False"):
        sgfx.export_onnx(gm, (x,), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
    sgfx.export_onnx(gm, (x,), tmp_path / "m.onnx", check_outputs=False)
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ImportError, match=r"pip install 'sgfx\[onnx\]'"):
        sgfx.export_onnx(gm, (x,), tmp_path / "m2.onnx")


# ------------------------------------------------------------------------------- the checker on its own
def _graph(nodes, initializers, inputs):
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(a, name) for name, a in initializers.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _two_four(shape, axis, rng, violate=False):
    """A random weight that is 2:4 along ``axis`` (or breaks it in one run of four)."""
    w = rng.standard_normal(shape).astype(np.float32)
    moved = np.moveaxis(w, axis, -1)
    runs = moved.reshape(-1, 4)
    drop = np.argsort(rng.random(runs.shape), axis=1)[:, :2]
    np.put_along_axis(runs, drop, 0.0, axis=1)
    if violate:
        runs[5] = 1.0
    return np.ascontiguousarray(np.moveaxis(runs.reshape(moved.shape), -1, axis))


@pytest.mark.parametrize("violate", [False, True])
def test_checker_axes_match_polygraphy_on_hand_built_graphs(tmp_path, violate):
    rng = np.random.default_rng(0)
    weights = {
        "conv_w": _two_four((8, 8, 3, 3), 1, rng, violate),
        "gemm_nt": _two_four((16, 8), 0, rng, violate),  # Gemm transB=0: B is [K, N], groups along axis 0
        "gemm_t": _two_four((16, 8), 1, rng, violate),  # Gemm transB=1: B is [N, K], groups along axis 1
        "matmul_b": _two_four((16, 8), 0, rng, violate),  # MatMul B [K, N]
        "stored_nk": _two_four((8, 16), 1, rng, violate),  # [N, K] reaching MatMul through Transpose
        "gemm_wrong_axis": _two_four((16, 8), 1, rng),  # 2:4 along the wrong axis for transB=0
    }
    f = TensorProto.FLOAT
    nodes = [
        helper.make_node("Conv", ["x", "conv_w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Gemm", ["a", "gemm_nt"], ["g1"], name="gemm_nt"),
        helper.make_node("Gemm", ["a2", "gemm_t"], ["g2"], name="gemm_t", transB=1),
        helper.make_node("MatMul", ["a", "matmul_b"], ["m1"], name="matmul"),
        helper.make_node("Transpose", ["stored_nk"], ["kn"], perm=[1, 0]),
        helper.make_node("Cast", ["kn"], ["kn_cast"], to=f),
        helper.make_node("MatMul", ["a", "kn_cast"], ["m2"], name="matmul_t"),
        helper.make_node("Gemm", ["a", "gemm_wrong_axis"], ["g3"], name="gemm_wrong_axis"),
        helper.make_node("Conv", ["x", "dyn_w"], ["d"], name="dynamic"),
        helper.make_node("MatMul", ["a", "a3"], ["attn"], name="attention"),  # two activations: not a weight layer
    ]
    inputs = [helper.make_tensor_value_info(n, f, None) for n in ("x", "a", "a2", "a3", "dyn_w")]
    path = tmp_path / "hand.onnx"
    onnx.save(_graph(nodes, weights, inputs), str(path))
    layers = {layer.node: layer for layer in sgfx.check_onnx_sparsity(path)}
    assert set(layers) == {"conv", "gemm_nt", "gemm_t", "matmul", "matmul_t", "gemm_wrong_axis", "dynamic"}
    axes = {n: layers[n].axis for n in ("conv", "gemm_nt", "gemm_t", "matmul", "matmul_t")}
    assert axes == {"conv": 1, "gemm_nt": 0, "gemm_t": 1, "matmul": 0, "matmul_t": 1}
    assert layers["matmul_t"].initializer == "stored_nk"
    for name in ("conv", "gemm_nt", "gemm_t", "matmul", "matmul_t"):
        assert layers[name].eligible is not violate
        assert layers[name].violations == (1 if violate else 0)
    assert not layers["gemm_wrong_axis"].eligible
    assert "not a constant initializer" in layers["dynamic"].reason
    _assert_polygraphy_agrees(path, [layers[n] for n in layers if n != "dynamic"])



@pytest.mark.parametrize("name", ["unet", "video", "audio", "transformer"])
def test_new_layer_kinds_export_with_their_axes(name, gen, tmp_path):
    """Conv1d/Conv3d/ConvTranspose2d and opened attention: every pruned layer keeps its pattern in ONNX, Polygraphy
    agrees on every Conv/Gemm/MatMul, and transposed convs are reported as not accelerated by TensorRT."""
    from models import AudioCNN, TinyTransformer, UNet, Video3D

    build, x = {"unet": (UNet, torch.randn(2, 3, 16, 16, generator=gen)),
                "video": (Video3D, torch.randn(2, 3, 4, 16, 16, generator=gen)),
                "audio": (AudioCNN, torch.randn(2, 1, 2000, generator=gen)),
                "transformer": (TinyTransformer, torch.randint(0, 50, (2, 12), generator=gen))}[name]
    gm = sgfx.sparsify(build().eval(), x, "2:4")
    path = tmp_path / "m.onnx"
    report = sgfx.export_onnx(gm, (x[:1],), path)
    assert {layer.layer for layer in report.pruned} == {r.name for r in sgfx.get_report(gm).pruned_layers}
    transposed = [layer for layer in report.layers if layer.op_type == "ConvTranspose"]
    assert len(transposed) == (2 if name == "unet" else 0)
    for layer in transposed:  # pruned along C_in (ONNX axis 0) but no TensorRT sparse deconvolution
        assert layer.pruned and layer.axis == 0 and layer.violations == 0 and "no sparse deconvolution" in layer.reason
    others = [layer for layer in report.layers if layer.op_type != "ConvTranspose"]
    assert all(layer.eligible for layer in others if layer.pruned)
    _assert_polygraphy_agrees(path, others)


# ------------------------------------------------------------------ graphs torch.export refuses, parity tolerance
def _shape_arithmetic_onnx(path, rng):
    """A Conv -> Relu -> Reshape(to a shape held in an initializer) -> Gemm graph: onnx2torch's Reshape turns the
    shape tensor into Python sizes at run time (``torch.Size(shape)``), which torch.export cannot trace."""
    init = {"w1": rng.standard_normal((16, 8, 3, 3)).astype(np.float32) * 0.2, "b1": np.zeros(16, np.float32),
            "w2": rng.standard_normal((12, 16 * 36)).astype(np.float32) * 0.05, "b2": np.zeros(12, np.float32),
            "shape": np.array([-1, 16 * 36], np.int64)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Reshape", ["r", "shape"], ["f"]),
             helper.make_node("Gemm", ["f", "w2", "b2"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 12])],
                              initializer=[numpy_helper.from_array(a, name) for name, a in init.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    onnx.save(model, path)


def test_a_model_converted_with_onnx2torch_exports_through_the_torchscript_exporter(gen, tmp_path):
    onnx2torch = pytest.importorskip("onnx2torch")
    import onnxruntime as ort

    _shape_arithmetic_onnx(tmp_path / "source.onnx", np.random.default_rng(0))
    converted = onnx2torch.convert(str(tmp_path / "source.onnx")).eval()
    x = torch.randn(4, 8, 6, 6, generator=gen)
    with pytest.raises(Exception):  # the case at hand: torch.export refuses the converted graph
        torch.export.export(converted, (x,))
    gm = sgfx.sparsify(converted, torch.randn(64, 8, 6, 6, generator=gen), "2:4")
    assert {r.op for r in sgfx.get_report(gm).pruned_layers} == {"Conv2d", "Linear"}
    with pytest.raises(Exception, match="export"):
        sgfx.export_onnx(gm, (x,), tmp_path / "dynamo.onnx", exporter="dynamo")
    report = sgfx.export_onnx(gm, (x,), tmp_path / "pruned.onnx", dynamic_batch=True)
    assert report.exporter == "torchscript" and "TorchExportError" in report.fallback_reason
    assert "torchscript exporter" in str(report)
    assert len(report.pruned) == 2 and all(layer.eligible for layer in report.pruned)
    _assert_polygraphy_agrees(tmp_path / "pruned.onnx", report.layers)
    session = ort.InferenceSession(str(tmp_path / "pruned.onnx"), providers=["CPUExecutionProvider"])
    other = torch.randn(7, 8, 6, 6, generator=gen)  # another batch size: the batch dimension is dynamic
    got = session.run(None, {session.get_inputs()[0].name: other.numpy()})[0]
    np.testing.assert_allclose(got, gm(other).detach().numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown exporter 'onnx'"):
        sgfx.export_onnx(gm, (x,), tmp_path / "m.onnx", exporter="onnx")


class _IllConditioned(nn.Module):
    """Outputs that pass through a large offset and back: float32 rounds them at the offset's scale."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(32, 16)

    def forward(self, x):
        return (self.fc(x) + 3e4) - 3e4


def test_parity_is_held_to_the_models_own_float32_sensitivity(gen, tmp_path, monkeypatch):
    gm = sgfx.sparsify(_IllConditioned().eval(), torch.randn(64, 32, generator=gen), "2:4")
    x = torch.randn(8, 32, generator=gen)
    report = sgfx.export_onnx(gm, (x,), tmp_path / "m.onnx", rtol=1e-6)
    assert report.float32_sensitivity > 1e-4  # float32 vs float64 of the model itself
    assert report.parity_tolerance == pytest.approx(max(1e-6, 4 * report.float32_sensitivity))
    assert report.max_rel_error <= report.parity_tolerance
    import onnxruntime as ort

    real_run = ort.InferenceSession.run
    monkeypatch.setattr(ort.InferenceSession, "run", lambda self, *a, **k: [o + 1.0 for o in real_run(self, *a, **k)])
    with pytest.raises(sgfx.ExportError, match=r"differ from the model's by .* above the tolerance .*own float32"):
        sgfx.export_onnx(gm, (x,), tmp_path / "wrong.onnx", rtol=1e-6)
    assert not (tmp_path / "wrong.onnx").exists()
