"""Compressed save/load: bit-exact round trips, size, and rejection of bad files."""

import json
import pathlib
import zipfile

import pytest
import torch
from torch import nn

import sgfx
from models import ConvBnNet, Functional, TinyDetector, TwoLayer, cifar_resnet10, randomize_bn
from sgfx.serialization import pack_bitmask, pack_nm, unpack_bitmask, unpack_nm


@pytest.mark.parametrize("shape", [(8, 16), (6, 8, 3, 3), (4, 24, 1, 1)])
@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8"])
def test_nm_packing_round_trip_is_bit_exact(gen, shape, pattern):
    parsed = sgfx.parse_pattern(pattern)
    weight = torch.randn(*shape, generator=gen)
    groups = (weight.permute(0, 2, 3, 1) if weight.dim() == 4 else weight).reshape(-1, parsed.m)
    drop = torch.topk(groups.abs(), parsed.n_pruned, dim=1, largest=False).indices
    groups.scatter_(1, drop, 0.0)  # groups is a copy for 4-D: rebuild the weight from it
    if weight.dim() == 4:
        o, c, kh, kw = shape
        weight = groups.view(o, kh, kw, c).permute(0, 3, 1, 2).contiguous()
    else:
        weight = groups.view(shape)
    weight[0].zero_()  # groups with fewer than N nonzeros too
    assert sgfx.check_pattern(weight, pattern)
    packed = pack_nm(weight, parsed)
    assert packed["values"].numel() == weight.numel() * parsed.n // parsed.m
    restored = unpack_nm(packed, shape, parsed)
    assert torch.equal(restored, weight)


def test_nm_packing_rejects_violations(gen):
    with pytest.raises(ValueError, match="does not follow"):
        pack_nm(torch.randn(4, 8, generator=gen), sgfx.NMPattern(2, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_bitmask_round_trip(gen, dtype):
    weight = torch.randn(7, 13, generator=gen).to(dtype)
    weight[weight.abs() < 0.6] = 0
    restored = unpack_bitmask(pack_bitmask(weight), weight.shape, dtype)
    assert torch.equal(restored, weight) and restored.dtype == dtype


def _roundtrip(gm, tmp_path):
    path = tmp_path / "model.sgfx"
    sizes = sgfx.save(gm, path)
    return sgfx.load(path), sizes


@pytest.mark.filterwarnings("ignore:sgfx.*left dense")
@pytest.mark.parametrize("pattern", ["2:4", 0.5])
@pytest.mark.parametrize("make", [ConvBnNet, Functional, TwoLayer], ids=lambda f: f.__name__)
def test_save_load_identical_model(gen, tmp_path, make, pattern):
    model = make().eval()
    shape = (3, 16, 16) if make is ConvBnNet else (8, 6, 6)
    calib = [torch.randn(8, *shape, generator=gen) for _ in range(2)]
    gm = sgfx.sparsify(model, calib, pattern)
    loaded, sizes = _roundtrip(gm, tmp_path)
    assert isinstance(loaded, torch.fx.GraphModule)
    original, restored = gm.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for key in original:
        assert torch.equal(original[key], restored[key]) and original[key].dtype == restored[key].dtype, key
    x = torch.randn(4, *shape, generator=gen)
    with torch.no_grad():
        assert torch.equal(gm(x), loaded(x))
    assert [n.op for n in gm.graph.nodes] == [n.op for n in loaded.graph.nodes]
    assert sgfx.get_report(loaded).to_dicts() == sgfx.get_report(gm).to_dicts()
    assert sgfx.check_pattern(loaded, pattern)


@pytest.mark.filterwarnings("ignore:sgfx.*left dense")
@pytest.mark.parametrize("pattern", ["2:4", 0.5])
def test_file_smaller_than_dense_state_dict(gen, tmp_path, pattern):
    model = ConvBnNet().eval()  # 38 k weights, most of them pruned: the file is mostly packed values
    gm = sgfx.sparsify(model, torch.randn(16, 3, 16, 16, generator=gen), pattern, method="magnitude")
    _, sizes = _roundtrip(gm, tmp_path)
    assert sizes["bytes"] < 0.7 * sizes["dense_bytes"]


@pytest.mark.filterwarnings("ignore:sgfx.*left dense")
def test_resnet_file_size_ratio(gen, tmp_path):
    model = randomize_bn(cifar_resnet10(), gen).eval()
    gm = sgfx.sparsify(model, torch.randn(8, 3, 32, 32, generator=gen), "2:4", method="magnitude")
    loaded, sizes = _roundtrip(gm, tmp_path)
    ratio = sizes["bytes"] / sizes["dense_bytes"]
    assert 0.5 < ratio < 0.56  # 2:4 float32: half the values + 2 bits per kept value; conv1 and BNs dense
    x = torch.randn(2, 3, 32, 32, generator=gen)
    with torch.no_grad():
        assert torch.equal(gm(x), loaded(x))


def test_half_precision_round_trip(gen, tmp_path):
    gm = sgfx.sparsify(TwoLayer().eval().half(), torch.randn(2, 8, 6, 6, generator=gen).half(), "2:4")
    loaded, _ = _roundtrip(gm, tmp_path)
    assert all(p.dtype == torch.float16 for p in loaded.parameters())
    assert all(torch.equal(a, b) for a, b in zip(gm.parameters(), loaded.parameters()))


def test_dense_graph_module_without_report(tmp_path, gen):
    traced = torch.fx.symbolic_trace(ConvBnNet().eval())
    loaded, sizes = _roundtrip(traced, tmp_path)
    x = torch.randn(2, 3, 16, 16, generator=gen)
    with torch.no_grad():
        assert torch.equal(traced(x), loaded(x))
    assert sizes["bytes"] >= 0.95 * sizes["dense_bytes"]


# ------------------------------------------------------------------------------------------------ bad files
@pytest.fixture
def saved(tmp_path, gen):
    gm = sgfx.sparsify(TwoLayer().eval(), torch.randn(2, 8, 6, 6, generator=gen), "2:4")
    path = tmp_path / "model.sgfx"
    sgfx.save(gm, path)
    return path


def test_truncated_file_rejected(saved):
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) // 2])
    with pytest.raises(sgfx.SgfxFormatError, match="not a readable sgfx file"):
        sgfx.load(saved)


def test_corrupted_tensor_rejected(saved):
    with zipfile.ZipFile(saved) as archive:
        entries = {info.filename: archive.read(info) for info in archive.infolist()}
    biggest = max((name for name in entries if "/data/" in name), key=lambda n: len(entries[n]))
    blob = bytearray(entries[biggest])
    blob[len(blob) // 2] ^= 0xFF  # flip one byte of tensor data
    entries[biggest] = bytes(blob)
    with zipfile.ZipFile(saved, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, payload in entries.items():
            archive.writestr(name, payload)
    with pytest.raises(sgfx.SgfxFormatError, match="corrupted|not a readable"):
        sgfx.load(saved)


def test_foreign_files_rejected(tmp_path):
    plain = tmp_path / "state.pt"
    torch.save(TwoLayer().state_dict(), plain)
    with pytest.raises(sgfx.SgfxFormatError, match="not an sgfx file"):
        sgfx.load(plain)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(sgfx.SgfxFormatError):
        sgfx.load(text)


def _rewrite_meta(path, edit):
    blob = torch.load(path, weights_only=True)
    meta = json.loads(blob["sgfx_meta"])
    edit(meta)
    blob["sgfx_meta"] = json.dumps(meta)
    torch.save(blob, path)


def test_disallowed_call_target_rejected(saved):
    def inject(meta):  # make a node call torch.load: a file must never be able to run such code
        for node in meta["nodes"]:
            if node["op"] == "call_module":
                node.update(op="call_function", target={"module": "torch", "name": "load"})
                break
    _rewrite_meta(saved, inject)
    with pytest.raises(sgfx.SgfxFormatError, match="not allowed"):
        sgfx.load(saved)


def test_foreign_module_class_rejected(saved):
    def inject(meta):
        next(iter(meta["modules"].values()))["class"] = "Module.__subclasses__"
    _rewrite_meta(saved, inject)
    with pytest.raises(sgfx.SgfxFormatError, match="not a torch.nn layer"):
        sgfx.load(saved)


def test_unsupported_submodule_cannot_be_saved(tmp_path, gen):
    class Custom(nn.Module):
        def forward(self, x):
            return x * 2

    model = nn.Sequential(nn.Conv2d(8, 8, 1), Custom()).eval()
    gm = sgfx.sparsify(model, torch.randn(2, 8, 4, 4, generator=gen), "2:4", leaf_modules=[Custom])
    with pytest.raises(TypeError, match="only torch.nn layers"):
        sgfx.save(gm, tmp_path / "x.sgfx")
    assert not (tmp_path / "x.sgfx").exists()


def test_aten_targets_round_trip_and_nothing_else_resolves():
    from sgfx.serialization import SgfxFormatError, _encode_target, _resolve_target

    for op in (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default, torch.ops.aten.batch_norm.default,
               torch._assert):
        assert _resolve_target(_encode_target(op)) is op
    for name in ("no_such_op.default", "conv2d.no_such_overload", "conv2d", "conv2d.default.extra"):
        with pytest.raises(SgfxFormatError, match="not allowed"):
            _resolve_target({"module": "torch.ops.aten", "name": name})
    with pytest.raises(SgfxFormatError, match="not allowed"):
        _resolve_target({"module": "torch.ops.custom_ns", "name": "op.default"})


DATA = pathlib.Path(__file__).parent / "data"


def test_files_saved_before_the_layout_change_still_load():
    """.sgfx files written by sgfx before the package was laid out anew (issue 20; tests/data/make_before_layout.py
    wrote them) load and compute what they computed then: opened attention (named as sgfx.passes.attention in the
    file), a conv/BatchNorm graph, and a detector saved with submodules=. The outputs were computed on another CPU,
    whose kernels sum in another order: equal to float32 rounding (a few ulps), not bit for bit."""
    exact = {"rtol": 1e-5, "atol": 1e-5}
    expected = torch.load(DATA / "before_layout_outputs.pt", weights_only=True)
    attention = sgfx.load(DATA / "before_layout_attention.sgfx")
    assert sgfx.get_report(attention).opened_attention
    torch.testing.assert_close(attention(expected["tokens"]), expected["attention"], **exact)
    convbn = sgfx.load(DATA / "before_layout_convbn.sgfx")
    torch.testing.assert_close(convbn(expected["x"]), expected["convbn"], **exact)
    assert sgfx.check_pattern(convbn, "2:4")
    detector = sgfx.load(DATA / "before_layout_detector.sgfx", model=TinyDetector().eval())
    features = detector.backbone(torch.stack(expected["detector_images"]))["p4"]
    torch.testing.assert_close(features, expected["detector_backbone"], **exact)
