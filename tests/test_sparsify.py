"""End to end: sparsify on small models, the sequential property, the report, and every bad input."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sgfx
import sgfx.api
import sgfx.engine.layer_step
from models import ConvBnNet, Functional, TwoLayer, randomize_bn, plain_sparsify
from reference import conv_column_permutation, conv_via_loops_ok, hessian_of

PATTERNS = ["2:4", "1:4", "4:8", 0.5]


def _calib(gen, n=64, shape=(3, 16, 16), batch=16):
    return [torch.randn(batch, *shape, generator=gen) for _ in range(n // batch)]


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.filterwarnings("ignore:sgfx.*left dense")
@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
@pytest.mark.parametrize("method", ["sparsegpt", "magnitude", "wanda"])
def test_end_to_end_small_cnn(gen, pattern, method):
    model = randomize_bn(ConvBnNet(), gen).eval()
    before = _state(model)
    calib = _calib(gen)
    gm = plain_sparsify(model, calib, pattern, method=method)
    assert isinstance(gm, torch.fx.GraphModule)
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before), "user model was mutated"
    report = sgfx.get_report(gm)
    pruned = {r.name for r in report.pruned_layers}
    expected = {"conv2", "fc1", "fc2"} if isinstance(pattern, str) else {"conv1", "conv2", "fc1", "fc2"}
    assert pruned == expected
    parsed = sgfx.parse_pattern(pattern)
    for name in pruned:
        w = gm.get_parameter(f"{name}.weight")
        if isinstance(parsed, sgfx.NMPattern):
            assert float((w == 0).float().mean()) >= parsed.sparsity  # exact (or more, dead inputs)
            if w.dim() == 4:
                assert conv_via_loops_ok(w, parsed.n, parsed.m)
        else:
            assert int((w == 0).sum()) >= round(0.5 * w.numel())
    assert sgfx.check_pattern(gm, pattern)
    if isinstance(pattern, str):  # the ineligible first conv stays dense and is reported
        conv1 = next(r for r in report.layers if r.name == "conv1")
        assert conv1.status == "skipped" and "not divisible" in conv1.reason
        torch.testing.assert_close(gm.conv1.weight, model.conv1.weight, rtol=0, atol=0)
    x = torch.randn(8, 3, 16, 16, generator=gen)
    out, ref = gm(x), model(x)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    # Everything but the pruned weights is unchanged: the dense model with the pruned weights loaded agrees.
    patched = copy.deepcopy(model)
    patched.load_state_dict(gm.state_dict())
    torch.testing.assert_close(patched(x), out, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:sgfx.*left dense")
def test_same_result_twice(gen):
    model = randomize_bn(ConvBnNet(), gen).eval()
    calib = _calib(gen)
    a = sgfx.sparsify(model, calib, "2:4")
    b = sgfx.sparsify(model, calib, "2:4")
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name


def test_sequential_hessian_comes_from_pruned_inputs(gen, solved_hessians):
    """The second layer's Hessian equals one built by hand from the *pruned* first layer's outputs."""
    model = TwoLayer().eval()
    calib = [torch.randn(4, 8, 10, 10, generator=gen) for _ in range(3)]
    gm = sgfx.sparsify(model, calib, "2:4")
    conv2 = gm.conv2
    layer = sgfx.layers.PrunableLayer.from_module("conv2", conv2)
    perm = conv_column_permutation(16, (3, 3))

    def by_hand(first_layer):
        rows = []
        for x in calib:
            h = F.relu(first_layer(x))
            cols = F.unfold(h, 3, padding=1, stride=2)  # (B, 16·9, L)
            rows.append(cols.transpose(1, 2).reshape(-1, cols.shape[1]))
        return hessian_of(torch.cat(rows))[perm][:, perm]

    got = dict(solved_hessians)[(8, 16 * 9)]
    torch.testing.assert_close(got, by_hand(gm.conv1), rtol=1e-5, atol=1e-6)
    dense_version = by_hand(model.conv1)
    assert not torch.allclose(got, dense_version, rtol=1e-3, atol=1e-4), "Hessian was built from dense inputs"
    assert layer.columns == 16 * 9


@pytest.mark.filterwarnings("ignore:sgfx.*left dense")
def test_sparsegpt_layer_error_below_magnitude(gen):
    model = randomize_bn(ConvBnNet(), gen).eval()
    calib = _calib(gen)
    errors = {}
    for method in ("sparsegpt", "magnitude", "wanda"):
        records = sgfx.get_report(plain_sparsify(model, calib, "2:4", method=method)).pruned_layers
        errors[method] = {r.name: r.rel_error for r in records}
    for name, err in errors["sparsegpt"].items():
        assert err < errors["magnitude"][name], name
        assert err < errors["wanda"][name], name


@pytest.mark.parametrize("method", ["sparsegpt", "magnitude"])  # from the Hessian / from forward passes
# 400, 49 or 16 input vectors for 72 columns: from the Hessian below twice as many columns as samples
@pytest.mark.parametrize("images, size", [(4, 10), (1, 7), (1, 4)])
def test_reported_error_matches_outputs(gen, method, images, size):
    model = TwoLayer().eval()
    calib = [torch.randn(images, 8, size, size, generator=gen)]
    gm = plain_sparsify(model, calib, "2:4", method=method)
    record = next(r for r in sgfx.get_report(gm).layers if r.name == "conv1")
    x = calib[0]
    torch.set_grad_enabled(False)
    dense = F.conv2d(x, model.conv1.weight, None, padding=1)
    pruned = F.conv2d(x, gm.conv1.weight, None, padding=1)
    expected = float((dense - pruned).square().sum() / dense.square().sum())
    torch.set_grad_enabled(True)
    assert record.rel_error == pytest.approx(expected, rel=1e-4)


def test_functional_layers_are_pruned(gen):
    model = Functional().eval()
    gm = sgfx.sparsify(model, _calib(gen, shape=(8, 6, 6)), "2:4")
    names = {r.name for r in sgfx.get_report(gm).pruned_layers}
    assert names == {"w_conv", "w_fc"}
    assert conv_via_loops_ok(gm.w_conv, 2, 4)
    assert sgfx.check_pattern(gm.w_fc, "2:4")
    assert not torch.equal(gm.w_conv, model.w_conv)


def test_grouped_conv_and_depthwise(gen):
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, groups=2), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1, groups=16)).eval()
    with pytest.warns(UserWarning, match=r"stayed dense \(1 of 2 weight tensors\): input channels per group \(1\)"):
        gm = sgfx.sparsify(model, torch.randn(8, 8, 6, 6, generator=gen), "2:4")
    status = {r.name: r.status for r in sgfx.get_report(gm).layers}
    assert status == {"0": "pruned", "2": "skipped"}
    assert conv_via_loops_ok(gm.get_parameter("0.weight"), 2, 4)


def test_half_precision_model(gen):
    model = TwoLayer().eval().half()
    calib = [torch.randn(4, 8, 10, 10, generator=gen).half()]
    gm = sgfx.sparsify(model, calib, "2:4")
    assert all(p.dtype == torch.float16 for p in gm.parameters())
    assert sgfx.check_pattern(gm, "2:4")
    assert model.conv1.weight.dtype == torch.float16 and bool((model.conv1.weight != 0).all())


@pytest.mark.filterwarnings("ignore:sgfx.*left dense")
def test_training_mode_warns_and_is_restored(gen):
    model = randomize_bn(ConvBnNet(), gen).train()
    with pytest.warns(UserWarning, match="training mode"):
        gm = plain_sparsify(model, _calib(gen), "2:4")
    assert gm.training and model.training
    # calibration used running statistics (eval): pruning in train mode would have changed them
    assert torch.equal(gm.bn1.running_mean, model.bn1.running_mean)


@pytest.mark.filterwarnings("ignore:sgfx.*left dense")
def test_skip_globs_and_unmatched_skip(gen):
    model = ConvBnNet().eval()
    with pytest.warns(UserWarning, match="'nothing\\*' matched no prunable layer"):
        gm = sgfx.sparsify(model, _calib(gen), "2:4", skip=["fc*", "nothing*"])
    status = {r.name: (r.status, r.reason) for r in sgfx.get_report(gm).layers}
    assert status["fc1"] == ("skipped", "skip='fc*'") and status["fc2"][0] == "skipped"
    assert status["conv2"][0] == "pruned"
    assert torch.equal(gm.fc1.weight, model.fc1.weight)


def test_config_object(gen):
    config = sgfx.SparsifyConfig("4:8", method="magnitude", skip="conv2")
    gm = sgfx.sparsify(TwoLayer().eval(), torch.randn(2, 8, 6, 6, generator=gen), config)
    assert sgfx.get_report(gm).method == "magnitude" and sgfx.check_pattern(gm, "4:8")
    with pytest.raises(TypeError, match="not both"):
        sgfx.sparsify(TwoLayer(), torch.randn(2, 8, 6, 6), config, method="sparsegpt")


def test_dataloader_of_labelled_batches(gen):
    data = torch.utils.data.TensorDataset(torch.randn(20, 8, 6, 6, generator=gen), torch.zeros(20, dtype=torch.long))
    gm = sgfx.sparsify(TwoLayer().eval(), torch.utils.data.DataLoader(data, batch_size=8), "2:4")
    assert sgfx.get_report(gm).layers[0].samples == 20 * 36


def test_graph_module_input_not_mutated(gen):
    traced = torch.fx.symbolic_trace(TwoLayer().eval())
    before = _state(traced)
    gm = sgfx.sparsify(traced, torch.randn(2, 8, 6, 6, generator=gen), "2:4")
    assert gm is not traced and all(torch.equal(v, traced.state_dict()[k]) for k, v in before.items())


def test_layers_inside_leaf_modules_are_pruned_sequentially(gen, solved_hessians):
    """A leaf module stays one graph node; its layers are pruned in execution order, conv2 from the *pruned*
    conv1's outputs (the module run as a unit, a hook recording conv2's input)."""
    model = nn.Sequential(TwoLayer(), nn.Conv2d(8, 8, 1)).eval()
    calib = [torch.randn(2, 8, 6, 6, generator=gen) for _ in range(2)]
    gm = plain_sparsify(model, calib, "2:4", leaf_modules=[TwoLayer])
    assert [n.op for n in gm.graph.nodes if n.target == "0"] == ["call_module"]  # still one node
    records = {r.name: r for r in sgfx.get_report(gm).layers}
    assert [name for name, r in records.items() if r.pruned] == ["0.conv1", "0.conv2", "1"]
    assert sgfx.check_pattern(gm, "2:4")
    perm = conv_column_permutation(16, (3, 3))

    def by_hand(conv1):
        rows = []
        for x in calib:
            cols = F.unfold(F.relu(conv1(x)), 3, padding=1, stride=2)
            rows.append(cols.transpose(1, 2).reshape(-1, cols.shape[1]))
        return hessian_of(torch.cat(rows))[perm][:, perm]

    with torch.no_grad():
        torch.testing.assert_close(dict(solved_hessians)[(8, 144)], by_hand(gm.get_submodule("0").conv1), rtol=1e-4,
                                   atol=1e-5)
        assert not torch.allclose(dict(solved_hessians)[(8, 144)], by_hand(model[0].conv1), rtol=1e-3, atol=1e-4)


def test_report_table_and_records(gen):
    gm = sgfx.sparsify(TwoLayer().eval(), torch.randn(2, 8, 6, 6, generator=gen), "2:4")
    table = sgfx.report(gm)
    assert "conv1" in table and "conv2" in table and "2:4" in table and "rel. error" in table
    rows = sgfx.get_report(gm).to_dicts()
    assert rows[0]["name"] == "conv1" and rows[0]["status"] == "pruned" and rows[0]["sparsity"] == 0.5
    assert "|" in sgfx.report(gm, tablefmt="github")
    with pytest.raises(ValueError, match="no sgfx report"):
        sgfx.report(TwoLayer())


# ------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad", ["2:2", "0:4", "5:4", "2-4", "abc", "", 1.5, 0, 1, -0.2, 0.0])
def test_bad_patterns_raise_value_error(bad):
    with pytest.raises(ValueError, match="accepted"):
        sgfx.sparsify(TwoLayer(), torch.randn(1, 8, 6, 6), bad)


@pytest.mark.parametrize("bad", [None, True, [2, 4], object()])
def test_bad_pattern_types_raise_type_error(bad):
    with pytest.raises(TypeError):
        sgfx.sparsify(TwoLayer(), torch.randn(1, 8, 6, 6), bad)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(method="obs"), "unknown method"),
        (dict(blocksize=0), "blocksize"),
        (dict(blocksize=6), "multiple of M=4"),
        (dict(percdamp=-1.0), "percdamp"),
        (dict(device="nonsense"), "invalid device"),
    ],
)
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        sgfx.sparsify(TwoLayer(), torch.randn(1, 8, 6, 6), "2:4", **options)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_device_without_cuda():
    with pytest.raises(ValueError, match="CUDA is not available"):
        sgfx.sparsify(TwoLayer(), torch.randn(1, 8, 6, 6), "2:4", device="cuda")


@pytest.mark.parametrize("calib, error, message", [
    ([], ValueError, "empty"),
    (iter([]), ValueError, "empty"),
    (torch.empty(0, 8, 6, 6), ValueError, "empty"),
    ([torch.full((1, 8, 6, 6), float("nan"))], ValueError, "NaN or Inf"),
    ([torch.randn(1, 8, 6, 6), torch.full((1, 8, 6, 6), float("inf"))], ValueError, "batch 1 contains NaN"),
    (None, TypeError, "calib"),
    (42, TypeError, "calib"),
    (["not a tensor"], TypeError, "batch 0"),
])
def test_bad_calibration_data(calib, error, message):
    with pytest.raises(error, match=message):
        sgfx.sparsify(TwoLayer(), calib, "2:4")


class _FixedBatch(nn.Module):
    """Works only on batches of 2: adds a (2, 8) table after its Linear."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 8)
        self.register_buffer("table", torch.ones(2, 8))

    def forward(self, x):
        return self.fc(x) + self.table


def test_wrong_calibration_shape_names_the_node():
    # raised by the permutation pass's forward (default for N:M) or by the sweep: either names the node and shape
    expected = r"node `%conv1.*(expects a \(B, 8, H, W\) input, got shape|input shape) \(2, 3, 6, 6\)"
    with pytest.raises(sgfx.CalibrationError, match=expected):
        sgfx.sparsify(TwoLayer().eval(), torch.randn(2, 3, 6, 6), "2:4")
    model = nn.Sequential(nn.Flatten(), nn.ReLU(), nn.Linear(12, 4))
    # the memory estimate's forward of the first batch finds it first
    with pytest.raises(sgfx.CalibrationError, match=r"node `%_2.*input shape \(2, 3, 6, 6\).*cannot be multiplied"):
        sgfx.sparsify(model, torch.randn(2, 3, 6, 6), "2:4")
    with pytest.raises(sgfx.CalibrationError, match=r"node `%add.*batch 1 \(input shape \(3, 12\)\).*size of tensor"):
        sgfx.sparsify(_FixedBatch().eval(), [torch.randn(2, 12), torch.randn(3, 12)], 0.5)


def test_not_a_module():
    with pytest.raises(TypeError, match="nn.Module"):
        sgfx.sparsify(lambda x: x, torch.randn(1, 8), "2:4")


def test_no_prunable_layers_warns_and_returns_graph():
    model = nn.Sequential(nn.ReLU(), nn.Flatten()).eval()
    with pytest.warns(UserWarning, match="no prunable"):
        gm = sgfx.sparsify(model, torch.randn(2, 3, 4, 4), "2:4")
    assert isinstance(gm, torch.fx.GraphModule) and sgfx.get_report(gm).layers == []
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(gm(x), model(x))


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: not traceable
            return self.fc(x)
        return x


def test_untraceable_model_names_the_construct():
    with pytest.raises(sgfx.TraceError, match=r"(?s)test_sparsify.py:\d+ in forward: if x.sum\(\) > 0.*leaf_modules"):
        sgfx.sparsify(_DataDependent(), torch.randn(2, 8), "2:4")


def test_check_pattern_detects_violations(gen):
    w = torch.randn(4, 8, 3, 3, generator=gen)
    assert not sgfx.check_pattern(w, "2:4")
    w_ok = w.clone()
    w_ok[:, 1::2] = 0  # 2 of every 4 input channels zero ...
    assert sgfx.check_pattern(w_ok, "2:4")
    w_kw = w.clone()
    w_kw[..., 1:] = 0  # ... but zeros along the kernel width are not N:M along input channels
    w_kw[..., 0] = 1.0
    assert sgfx.check_pattern(w_kw, "2:4").violations == {"weight": 4 * 3 * 2}
    with pytest.raises(ValueError, match="not divisible"):
        sgfx.check_pattern(torch.randn(4, 6), "2:4")
    assert sgfx.check_pattern(torch.tensor([[0.0, 1.0, 0.0, 2.0]]), 0.5)
    assert not sgfx.check_pattern(torch.tensor([[0.0, 1.0, 3.0, 2.0]]), 0.5)


def test_hflip_augmentation_doubles_calibration(gen):
    calib = torch.randn(4, 8, 6, 6, generator=gen)
    model = TwoLayer().eval()
    plain = sgfx.sparsify(model, calib, "2:4")
    flipped = sgfx.sparsify(model, calib, "2:4", augment="hflip")
    both = sgfx.sparsify(model, [calib, calib.flip(-1)], "2:4")  # the same data, passed by hand
    assert sgfx.get_report(flipped).layers[0].samples == 2 * sgfx.get_report(plain).layers[0].samples
    for name, param in flipped.named_parameters():
        assert torch.equal(param, both.get_parameter(name)), name
    with pytest.raises(ValueError, match="hflip"):
        sgfx.sparsify(nn.Linear(8, 4), torch.randn(3, 8), "2:4", augment="hflip")
    with pytest.raises(ValueError, match="unknown augment"):
        sgfx.sparsify(TwoLayer(), calib, "2:4", augment="rotate")


def test_explicit_cpu_device_gives_the_same_weights(gen):
    """``device="cpu"`` moves every statistic and solve through the device paths; the result must not change."""
    model = TwoLayer().eval()
    calib = [torch.randn(8, 8, 10, 10, generator=gen) for _ in range(2)]
    default = sgfx.sparsify(model, calib, "2:4")
    explicit = sgfx.sparsify(model, calib, "2:4", device="cpu")
    assert sgfx.get_report(explicit).layers[0].dense_targets or sgfx.get_report(explicit).layers[1].dense_targets
    for (name, expected), (_, got) in zip(default.state_dict().items(), explicit.state_dict().items()):
        assert torch.equal(got, expected), name


def test_weights_passed_to_a_wrapped_function_are_pruned_sequentially(gen, solved_hessians):
    """A wrapped function's F.linear weights are pruned in use order, w_out from relu(x·w_in) with w_in pruned; a
    weight it uses otherwise (a matmul) is reported, not silent."""
    from models import WrappedFunctionNet

    model = WrappedFunctionNet().eval()
    calib = [torch.randn(64, 16, generator=gen) for _ in range(2)]
    gm = plain_sparsify(model, calib, "2:4")
    assert any(n.op == "call_function" and n.target.__name__ == "gated_mlp" for n in gm.graph.nodes)  # kept whole
    records = {r.name: r for r in sgfx.get_report(gm).layers}
    assert [n for n, r in records.items() if r.pruned] == ["fc", "w_in", "w_out"]
    assert "does not multiply by it with F.linear" in records["w_gate"].reason
    assert sgfx.check_pattern(gm, "2:4")
    with torch.no_grad():
        hidden = [F.relu(F.linear(gm.fc(x), gm.w_in)) for x in calib]
        torch.testing.assert_close(dict(solved_hessians)[(16, 32)], hessian_of(torch.cat(hidden)), rtol=1e-4, atol=1e-5)
        dense = [F.relu(F.linear(gm.fc(x), model.w_in)) for x in calib]
        assert not torch.allclose(dict(solved_hessians)[(16, 32)], hessian_of(torch.cat(dense)), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("where, value", [("conv1.weight", float("nan")), ("conv2.bias", float("inf")),
                                          ("bn1.running_var", float("inf"))])
def test_nonfinite_weights_are_refused_with_their_names(where, value):
    model = ConvBnNet().eval()
    with torch.no_grad():
        sgfx.layers.fetch_tensor(model, where).view(-1)[3] = value
    with pytest.raises(ValueError, match=rf"non-finite values.*{where.replace('.', '[.]')} \("):
        sgfx.sparsify(model, torch.randn(4, 3, 16, 16), "2:4")


class _TwoInputs(nn.Module):
    """A two-branch model (image + side input), as a siamese or image + metadata network."""

    def __init__(self):
        super().__init__()
        self.image = nn.Linear(16, 8)
        self.side = nn.Linear(12, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x, side, scale: float = 1.0):
        return self.head(F.relu(self.image(x) + scale * self.side(side)))


def _two_input_batches(gen):
    return [(torch.randn(32, 16, generator=gen), torch.randn(32, 12, generator=gen) * 3) for _ in range(3)]


@pytest.mark.parametrize("wrap", ["Inputs", "dict", "Inputs with a target", "keyword"])
def test_several_inputs_are_calibrated_on_their_real_values(gen, solved_hessians, wrap):
    """Each graph input gets its own calibration values: the side branch's Hessian is built from the side inputs
    given, not from a default or the first input."""
    data = _two_input_batches(gen)
    items = {"Inputs": [sgfx.Inputs(x, s) for x, s in data],
             "dict": [{"x": x, "side": s} for x, s in data],
             "Inputs with a target": [(sgfx.Inputs(x, s), torch.zeros(len(x))) for x, s in data],
             "keyword": [sgfx.Inputs(x, side=s, scale=1.0) for x, s in data]}[wrap]
    model = _TwoInputs().eval()
    gm = sgfx.sparsify(model, items, "2:4", dense_targets=False, stats_correction=False)
    hessians = dict(solved_hessians)
    torch.testing.assert_close(hessians[(8, 12)], hessian_of(torch.cat([s for _, s in data])), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hessians[(8, 16)], hessian_of(torch.cat([x for x, _ in data])), rtol=1e-5, atol=1e-5)
    assert sgfx.check_pattern(gm, "2:4")
    x, s = data[0]
    reference = copy.deepcopy(model)
    reference.load_state_dict(gm.state_dict())  # the model's own forward with the pruned weights
    torch.testing.assert_close(gm(x, s), reference(x, s), rtol=1e-6, atol=1e-6)


def test_several_inputs_bad_items():
    with pytest.raises(ValueError, match="gets no value: a plain batch feeds the first input only: pass each "
                                         "batch as sgfx.Inputs"):
        sgfx.sparsify(_TwoInputs().eval(), [torch.randn(4, 16)], "2:4")
    with pytest.raises(TypeError, match="batch 0: Inputs\\(\\) holds no tensor"):
        sgfx.sparsify(_TwoInputs().eval(), [sgfx.Inputs()], "2:4")
    with pytest.raises(ValueError, match="batch 1 contains NaN"):
        sgfx.sparsify(_TwoInputs().eval(), [sgfx.Inputs(torch.randn(4, 16), torch.randn(4, 12)),
                                            sgfx.Inputs(torch.randn(4, 16), torch.full((4, 12), float("nan")))],
                      "2:4")
    with pytest.raises(ValueError, match="augment='hflip' needs image batches"):
        sgfx.sparsify(_TwoInputs().eval(), [sgfx.Inputs(torch.randn(4, 16), torch.randn(4, 12))], "2:4",
                      augment="hflip")


def _macs_by_hooks(model, x):
    """Multiply-adds per image of every conv/linear module: weight elements x output positions (forward hooks)."""
    macs, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            def hook(m, args, out, name=name):
                channels = out.shape[1] if out.dim() > 2 else out.shape[-1]
                macs[name] = m.weight.numel() * (out[:1].numel() // channels)
            handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return macs


def test_accelerated_only_leaves_transposed_and_depthwise_convs_dense_and_reports_the_sparse_share(gen):
    from models import UNet

    class WithDepthwise(nn.Module):
        def __init__(self):
            super().__init__()
            self.unet = UNet()
            self.depthwise = nn.Conv2d(4, 4, 3, padding=1, groups=4)

        def forward(self, x):
            return self.depthwise(self.unet(x))

    model = WithDepthwise().eval()
    calib = torch.randn(8, 3, 32, 32, generator=gen)
    everything = sgfx.get_report(sgfx.sparsify(model, calib, "2:4"))
    report = sgfx.get_report(sgfx.sparsify(model, calib, "2:4", accelerated_only=True))
    records = {r.name: r for r in report.layers}
    transposed = [r for r in report.layers if r.op.startswith("ConvTranspose")]
    assert transposed and all(not r.pruned and r.reason.startswith("accelerated_only: ConvTranspose")
                              for r in transposed)
    assert not records["depthwise"].pruned  # 1 input channel per group: ineligible for 2:4 in any case
    assert {r.name for r in report.pruned_layers} == {r.name for r in everything.pruned_layers} - {
        r.name for r in transposed}
    macs = _macs_by_hooks(model, calib)
    for name, count in macs.items():
        assert records[name].macs == count, name
    expected = sum(macs[r.name] for r in report.pruned_layers) / sum(macs.values())
    assert report.sparse_macs_fraction == pytest.approx(expected)
    assert report.sparse_macs_fraction < everything.sparse_macs_fraction
    assert f"{expected:.1%} of the prunable layers' multiply-adds on pruned weights" in str(report)
    with pytest.raises(ValueError, match="accelerated_only applies to N:M"):
        sgfx.sparsify(model, calib, 0.5, accelerated_only=True)
