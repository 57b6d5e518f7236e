"""Dense targets: fitting each layer to the dense model's outputs through the cross-covariance."""

import pytest
import torch
import torch.nn.functional as F

import sgfx
from models import ConvBnNet, Functional, TwoLayer, randomize_bn, plain_sparsify
from reference import correlated_inputs
from sgfx.obs import dense_target_weight


def test_dense_target_weight_is_the_least_squares_map(gen):
    x_dense = correlated_inputs(400, 24, gen).double()
    x_pruned = x_dense + 0.3 * torch.randn(400, 24, generator=gen, dtype=torch.float64)
    weight = torch.randn(8, 24, generator=gen, dtype=torch.float64)
    hessian = 2 / 400 * x_pruned.T @ x_pruned
    cross = 2 / 400 * x_dense.T @ x_pruned
    got = dense_target_weight(weight, hessian, weight @ (cross - hessian), percdamp=0.0, dtype=torch.float64)
    expected = torch.linalg.lstsq(x_pruned, x_dense @ weight.T).solution.T  # argmin ‖X_p Wᵀ − X_d Wᵀ‖
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-8)
    same = dense_target_weight(weight, hessian, torch.zeros_like(weight), percdamp=0.0, dtype=torch.float64)
    torch.testing.assert_close(same, weight, rtol=1e-8, atol=1e-8)  # identical inputs: W itself


@pytest.mark.parametrize("pattern", ["2:4", 0.5])
def test_dense_targets_reduce_error_against_dense_outputs(gen, pattern):
    model = TwoLayer().eval()
    calib = [torch.randn(8, 8, 10, 10, generator=gen) for _ in range(2)]

    def dense_target_error(gm):
        with torch.no_grad():
            return sum(float((model(x) - gm.conv2(F.relu(gm.conv1(x)))).square().sum()) for x in calib)

    plain = plain_sparsify(model, calib, pattern)
    targeted = plain_sparsify(model, calib, pattern, dense_targets=True)
    assert torch.equal(plain.conv1.weight, targeted.conv1.weight)  # first layer: dense and pruned inputs agree
    assert dense_target_error(targeted) < dense_target_error(plain)
    assert sgfx.check_pattern(targeted, pattern)


@pytest.mark.filterwarnings("ignore:sgfx.*left dense")
def test_dense_targets_on_bn_and_functional_models(gen):
    model = randomize_bn(ConvBnNet(), gen).eval()
    gm = sgfx.sparsify(model, [torch.randn(8, 3, 16, 16, generator=gen)], "2:4", dense_targets=True)
    assert sgfx.check_pattern(gm, "2:4") and gm(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    functional = sgfx.sparsify(Functional().eval(), torch.randn(8, 8, 6, 6, generator=gen), "2:4", dense_targets=True)
    assert {r.name for r in sgfx.get_report(functional).pruned_layers} == {"w_conv", "w_fc"}


def test_dense_targets_need_sparsegpt():
    with pytest.raises(ValueError, match="dense_targets needs method='sparsegpt'"):
        sgfx.SparsifyConfig("2:4", method="magnitude", dense_targets=True)


def test_dense_target_weight_raises_damping_like_the_solve(gen):
    """An indefinite Hessian gets the same damping retries as the OBS solve, and FactorizationError after them."""
    weight = torch.randn(4, 8, generator=gen, dtype=torch.float64)
    hessian = torch.eye(8, dtype=torch.float64)
    hessian[0, 0] = -3.0
    with pytest.raises(sgfx.FactorizationError):
        dense_target_weight(weight, hessian, torch.zeros_like(weight), percdamp=0.01, max_damping_retries=0,
                            dtype=torch.float64)
    got = dense_target_weight(weight, hessian, torch.zeros_like(weight), percdamp=0.01, dtype=torch.float64)
    torch.testing.assert_close(got, weight, rtol=1e-9, atol=1e-9)  # A = H: W itself, whatever the damping


@pytest.mark.parametrize("conv", [
    dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2), dict(kernel_size=(3, 5), padding=(1, 2),
                                                                     dilation=(2, 1)), dict(kernel_size=1),
    dict(kernel_size=3, padding="same", padding_mode="reflect"), dict(kernel_size=3, groups=2, stride=(2, 1)),
])
def test_hessian_samples_count_the_input_vectors(gen, conv):
    """The sample count dense targets divide by (the accumulator's) is the number of input vectors."""
    from sgfx.layers import HessianAccumulator, PrunableLayer

    def samples(layer, x):
        accumulator = HessianAccumulator(layer)
        accumulator.add(x)
        accumulator.finalize()
        return accumulator.samples

    layer = PrunableLayer.from_module("c", torch.nn.Conv2d(8, 8, **conv))
    x = torch.randn(3, 8, 11, 9, generator=gen)
    assert samples(layer, x) == layer.patches(x).shape[1]
    linear = PrunableLayer.from_module("l", torch.nn.Linear(8, 4))
    assert samples(linear, torch.randn(3, 5, 8)) == 15


@pytest.mark.filterwarnings("ignore:sgfx.*left dense")
def test_dense_targets_only_where_samples_cover_the_columns(gen):
    model = ConvBnNet().eval()
    calib = [torch.randn(8, 3, 16, 16, generator=gen)]  # fc1: 8 samples < 512 columns; conv2: 512 >= 144
    with pytest.warns(UserWarning, match=r"weights stayed dense \(1 of .* input channels per group \(3\)"):
        gm = sgfx.sparsify(model, calib, "2:4", dense_targets=True)
    records = {r.name: r for r in sgfx.get_report(gm).layers}
    assert records["conv2"].dense_targets and not records["fc1"].dense_targets
    # fc1 keeps the plain target: with conv2 left dense its inputs are the same in both runs, so are its weights
    gm_fc = sgfx.sparsify(model, calib, "2:4", dense_targets=True, skip=["conv2"])
    plain_fc = sgfx.sparsify(model, calib, "2:4", skip=["conv2"])
    assert torch.equal(gm_fc.fc1.weight, plain_fc.fc1.weight)


@pytest.mark.parametrize("module", [
    torch.nn.Conv2d(8, 6, 3, padding=1), torch.nn.Conv2d(8, 6, 3, stride=2),
    torch.nn.Conv2d(8, 4, (3, 5), padding=(1, 2), dilation=(2, 1)), torch.nn.Conv2d(8, 6, 1),
    torch.nn.Conv2d(8, 6, 3, padding="same", padding_mode="reflect"), torch.nn.Conv2d(8, 6, 3, groups=2, stride=(2, 1)),
    torch.nn.Linear(8, 5),
], ids=str)
def test_dense_target_shift_equals_weight_times_cross_minus_hessian(gen, module):
    """The shift sgfx computes by a forward and a weight-gradient pass equals W (A − H) from the unfolded inputs."""
    from sgfx.engine.layer_step import dense_target_shifts as _dense_target_shifts
    from sgfx.layers import PrunableLayer

    layer = PrunableLayer.from_module("m", module.double())
    shape = (3, 5, 8) if isinstance(module, torch.nn.Linear) else (3, 8, 11, 9)
    inputs = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(2)]
    dense = [x + 0.5 * torch.randn(shape, generator=gen, dtype=torch.float64) for x in inputs]
    def vectors(xs):  # (groups, n, cols) in solve order
        if layer.op == "Linear":
            return torch.cat([x.reshape(-1, 8) for x in xs]).unsqueeze(0)
        return torch.cat([layer.patches(x) for x in xs], dim=1)

    pruned_rows, dense_rows = vectors(inputs), vectors(dense)
    n = pruned_rows.shape[1]
    got = _dense_target_shifts(layer, inputs, dense, n, None)
    for group, (w, shift) in enumerate(zip(layer.solve_matrices(), got)):
        x_p, x_d = pruned_rows[group], dense_rows[group]
        expected = w @ (2 / n * x_d.T @ x_p - 2 / n * x_p.T @ x_p)
        torch.testing.assert_close(shift.double(), expected, rtol=1e-5, atol=1e-6)


def test_held_out_errors_of_the_candidates_equal_the_direct_forward_computation(gen):
    from sgfx.engine.layer_step import _held_out_terms
    from sgfx.layers import PrunableLayer

    conv = torch.nn.Conv2d(8, 6, 3, padding=1)
    layer = PrunableLayer.from_module("c", conv)
    inputs = [torch.randn(2, 8, 7, 7, generator=gen) for _ in range(2)]
    dense_inputs = [x + 0.3 * torch.randn(x.shape, generator=gen) for x in inputs]
    candidates = [[m * (torch.rand(m.shape, generator=gen) > 0.5) for m in layer.solve_matrices()] for _ in range(2)]
    before = conv.weight.detach().clone()
    terms = _held_out_terms(layer, [candidates[0], None, candidates[1]], inputs, dense_inputs, None)
    assert torch.equal(conv.weight, before)  # the live weight is restored
    den = sum(float(F.conv2d(d, before, padding=1).square().sum()) for d in dense_inputs)
    for row, candidate in zip((terms[0], terms[2]), candidates):
        layer.write_back(candidate)
        pruned = conv.weight.detach().clone()
        conv.weight.data.copy_(before)
        num = sum(float((F.conv2d(d, before, padding=1) - F.conv2d(x, pruned, padding=1)).square().sum())
                  for x, d in zip(inputs, dense_inputs))
        assert float(row[0]) == pytest.approx(num, rel=1e-5) and float(row[1]) == pytest.approx(den, rel=1e-5)
    assert terms[1, 0] == float("inf") and float(terms[1, 1]) == pytest.approx(den, rel=1e-5)  # a failed solve


@pytest.mark.filterwarnings("ignore:sgfx.*stayed dense")
def test_per_layer_targets_keep_dense_targets_only_where_they_lower_the_held_out_error(gen):
    from models import ConvBnNet, randomize_bn

    model = randomize_bn(ConvBnNet(), gen).eval()
    calib = [torch.randn(8, 3, 16, 16, generator=gen) for _ in range(5)]
    report = sgfx.get_report(sgfx.sparsify(model, calib, "2:4", per_layer_targets=True))
    chosen = [r for r in report.pruned_layers if r.target_errors]
    assert chosen, "no layer went through the held-out choice"
    for record in chosen:
        errors = record.target_errors
        assert 0 <= errors["plain"] < 1 and 0 <= errors["dense"] < 1
        assert record.dense_targets == (errors["dense"] < errors["plain"])
    linear = [r for r in report.pruned_layers if r.op == "Linear"]
    assert linear and all(not r.target_errors and not r.dense_targets for r in linear)  # samples < columns
    plain = sgfx.get_report(sgfx.sparsify(model, calib, "2:4"))
    assert all(not r.target_errors for r in plain.layers)
    single = sgfx.get_report(sgfx.sparsify(model, calib[0], "2:4", per_layer_targets=True))
    assert all("one calibration batch" in r.target_errors["note"] for r in single.pruned_layers if r.target_errors)
    with pytest.raises(ValueError, match="per_layer_targets .* needs dense_targets"):
        sgfx.sparsify(model, calib, "2:4", per_layer_targets=True, dense_targets=False)
