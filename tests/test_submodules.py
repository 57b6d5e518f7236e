"""submodules=[...] / "auto": untraceable models pruned one traced submodule at a time, sequentially."""

import pytest
import torch
import torch.fx
import torch.nn.functional as F

import sgfx
import sgfx.engine.layer_step
from models import TinyDetector, plain_sparsify
from reference import conv_column_permutation, hessian_of
from sgfx.engine.inventory import is_weight

pytestmark = pytest.mark.filterwarnings("ignore:sgfx.*stayed dense")


def _images(gen, batches=3, per_batch=2):
    return [[torch.rand(3, 32, 32, generator=gen) for _ in range(per_batch)] for _ in range(batches)]


def test_whole_model_is_untraceable_so_submodules_are_needed(gen):
    with pytest.raises(sgfx.TraceError):
        sgfx.sparsify(TinyDetector().eval(), _images(gen), "2:4")


@pytest.mark.parametrize("submodules", [["backbone", "head"], "auto"])
def test_submodules_pruned_and_model_type_kept(submodules, gen):
    model = TinyDetector().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = _images(gen)
    det = sgfx.sparsify(model, images, "2:4", submodules=submodules)
    assert type(det) is TinyDetector and det is not model
    assert isinstance(det.backbone, torch.fx.GraphModule) and isinstance(det.head, torch.fx.GraphModule)
    report = sgfx.get_report(det)
    assert [s["name"] for s in report.submodules] == ["backbone", "head"]  # execution order
    pruned = {r.weight_name for r in report.pruned_layers}
    assert pruned == {"backbone.c3.0.weight", "backbone.c4.0.weight", "head.conv.weight", "head.cls.weight",
                      "head.box.weight"}
    assert {n for n, p in det.named_parameters() if is_weight(p)} <= {r.weight_name for r in report.layers}
    assert sgfx.check_pattern(det, "2:4")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the user's model untouched
    with torch.no_grad():
        out = det(images[0])  # the model's own forward, post-processing included
    assert len(out) == 2 and set(out[0]) == {"scores", "boxes"}
    if submodules == "auto":  # the model itself is not a candidate; both children trace
        assert report.refused_submodules == {}


def test_shared_head_is_calibrated_on_every_level_from_the_pruned_backbone(gen, solved_hessians):
    """The head's conv (used once per feature level) gets the Hessian of both levels' inputs, as the *pruned*
    backbone produces them: sequential across submodules."""
    model = TinyDetector().eval()
    images = _images(gen)
    det = sgfx.sparsify(model, images, "2:4", submodules=["backbone", "head"], dense_targets=False,
                        permute_channels=False, stats_correction=False)
    record = {r.name: r for r in sgfx.get_report(det).layers}["head.conv"]
    assert record.uses == 2 and record.samples == 3 * 2 * (8 * 8 + 4 * 4)

    def by_hand(backbone):
        rows = []
        with torch.no_grad():
            for batch in images:
                for level in backbone(torch.stack(batch)).values():
                    cols = F.unfold(level, 3, padding=1)  # (B, C·9, L)
                    rows.append(cols.transpose(1, 2).reshape(-1, cols.shape[1]))
        perm = conv_column_permutation(32, (3, 3))
        return hessian_of(torch.cat(rows))[perm][:, perm]

    got = dict(solved_hessians)[(32, 32 * 9)]  # the last of this shape: backbone.c4 has it too
    torch.testing.assert_close(got, by_hand(det.backbone), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, by_hand(model.backbone), rtol=1e-3, atol=1e-4), "built from the dense backbone"


def test_bad_submodule_names_and_calls(gen):
    model = TinyDetector().eval()
    images = _images(gen, batches=1)
    with pytest.raises(ValueError, match="'neck' does not exist in TinyDetector .*backbone, head"):
        sgfx.sparsify(model, images, "2:4", submodules=["backbone", "neck"])
    with pytest.raises(ValueError, match="overlap"):
        sgfx.sparsify(model, images, "2:4", submodules=["backbone", "backbone.c3"])
    with pytest.raises(TypeError, match="list of submodule names"):
        sgfx.sparsify(model, images, "2:4", submodules="backbone")
    model.unused = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match=r"\['unused'\] never called"):
        sgfx.sparsify(model, images, "2:4", submodules=["backbone", "unused"])


def test_submodule_called_twice_per_forward_is_said_in_the_report(gen):
    model = TinyDetector().eval()
    model.calls_head_twice = True
    det = sgfx.sparsify(model, _images(gen), "2:4", submodules=["backbone", "head"])
    head = [s for s in sgfx.get_report(det).submodules if s["name"] == "head"][0]
    assert head["calls"] == 6 and head["calls_per_forward"] == 2 and "called 2 times per forward" in head["note"]


def test_plain_models_give_the_same_weights_with_or_without_submodules(gen):
    """A traceable model pruned as one submodule equals the whole-model run (same graph, same calibration)."""
    from models import ConvBnNet

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    model = ConvBnNet().eval()
    calib = [torch.randn(4, 3, 16, 16, generator=gen) for _ in range(2)]
    whole = plain_sparsify(model, calib, "2:4")
    split = plain_sparsify(Wrapper(model).eval(), calib, "2:4", submodules=["inner"])
    for name, p in whole.named_parameters():
        assert torch.equal(p, split.inner.get_parameter(name)), name


def test_save_and_load_a_submodules_model(gen, tmp_path):
    model = TinyDetector().eval()
    images = _images(gen)
    det = sgfx.sparsify(model, images, "2:4", submodules=["backbone", "head"])
    sgfx.save(det, tmp_path / "det.sgfx")
    with pytest.raises(sgfx.SgfxFormatError, match="model=TinyDetector"):
        sgfx.load(tmp_path / "det.sgfx")
    loaded = sgfx.load(tmp_path / "det.sgfx", model=TinyDetector())
    assert type(loaded) is TinyDetector and isinstance(loaded.head, torch.fx.GraphModule)
    for name, tensor in det.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert sgfx.check_pattern(loaded, "2:4")
    with torch.no_grad():
        a, b = det(images[0]), loaded.eval()(images[0])
    for x, y in zip(a, b):
        torch.testing.assert_close(x["scores"], y["scores"])


class _Boxed:
    """An object holding tensors that is not a pytree (as torchvision's ImageList)."""

    def __init__(self, tensors):
        self.tensors = tensors


class _DictHead(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, features: dict):
        return {k: self.conv(v) for k, v in features.items()}


class _BoxedHead(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, boxed):
        return self.conv(boxed.tensors)


class _Parent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.dict_head = _DictHead()
        self.boxed_head = _BoxedHead()

    def forward(self, images: list):
        x = self.stem(torch.stack(images))
        out = self.dict_head({"a": x, "b": x[..., ::2, ::2]})
        return [out["a"].sum() + out["b"].sum() + self.boxed_head(_Boxed(x)).sum() for _ in images]


def test_dict_inputs_trace_and_objects_holding_tensors_are_refused(gen):
    model = _Parent().eval()
    images = _images(gen, batches=2)
    det = sgfx.sparsify(model, images, "2:4", submodules=["dict_head"])
    assert {r.weight_name for r in sgfx.get_report(det).pruned_layers} == {"dict_head.conv.weight"}
    assert isinstance(det.dict_head, torch.fx.GraphModule)
    with pytest.raises(sgfx.TraceError, match="'boxed_head'.*_Boxed holding tensors"):
        sgfx.sparsify(model, images, "2:4", submodules=["boxed_head"])
    auto = sgfx.get_report(sgfx.sparsify(model, images, "2:4", submodules="auto"))
    assert "boxed_head" in auto.refused_submodules and "holding tensors" in auto.refused_submodules["boxed_head"]
    assert "boxed_head.conv.weight" in {r.weight_name for r in auto.pruned_layers}  # auto went one level down


def test_shared_use_scheduling_keeps_the_function_and_refuses_aliased_in_place_ops(gen):
    from sgfx.layers import find_prunable_layers
    from sgfx.passes import schedule_shared_uses

    class Levels(torch.nn.Module):  # a head shared by two levels, the second level computed after the first head
        def __init__(self, inplace_alias=False):
            super().__init__()
            self.down = torch.nn.Conv2d(8, 8, 3, 2, 1)
            self.head = torch.nn.Conv2d(8, 4, 3, padding=1)
            self.inplace_alias = inplace_alias

        def forward(self, x):
            a = self.head(x)
            y = self.down(x)
            if self.inplace_alias:
                z = y * 2
                y.relu_()  # mutates y, which z's consumer below also reads
                return a.mean() + self.head(y).mean() + (z + y).mean()
            return a.mean() + self.head(y).mean()

    x = torch.randn(2, 8, 8, 8, generator=gen)
    gm = torch.fx.symbolic_trace(Levels())
    with torch.no_grad():
        before = gm(x)
        order = [n.name for n in gm.graph.nodes]
        assert schedule_shared_uses(gm, find_prunable_layers(gm)) is gm
        assert [n.name for n in gm.graph.nodes] != order  # reordered
        torch.testing.assert_close(gm(x), before)
    names = [n.name for n in gm.graph.nodes]
    assert names.index("down") < names.index("head")  # both levels' inputs exist at the first head call
    pruned = sgfx.sparsify(Levels().eval(), x, "2:4")
    head = {r.name: r for r in sgfx.get_report(pruned).layers}["head"]
    assert head.uses == 2 and head.samples == 2 * (8 * 8 + 4 * 4)  # calibrated on both calls
    aliased = torch.fx.symbolic_trace(Levels(inplace_alias=True))
    order = [n.name for n in aliased.graph.nodes]
    schedule_shared_uses(aliased, find_prunable_layers(aliased))
    assert [n.name for n in aliased.graph.nodes] == order  # left as it was
