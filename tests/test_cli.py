"""The ``sgfx`` command on tiny models and image folders written here: the installed entry point in a subprocess once
(check), ``sgfx.cli.main`` in-process for everything else (same code, no interpreter start each time)."""

import json
import shutil
import subprocess

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

import sgfx
from sgfx import cli
from sgfx.cli.data import DataError, ImageSet, ImageTransform, find_images
from sgfx.cli.evaluation import accuracy, paired_difference, topk_correct

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                        "ignore::UserWarning")
SGFX = shutil.which("sgfx")


def halve(x):  # a plain Python function: traced as a call that an .sgfx file may not store
    return x * 0.5


torch.fx.wrap("halve")


class Unsaveable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        return halve(self.conv(x))


class Tiny(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.bn(self.conv1(x)))))
        return self.fc(x.mean((2, 3)))


def _write_images(folder, classes=("ant", "bee", "cow"), per_class=4, size=(20, 24), seed=0):
    rng = np.random.default_rng(seed)
    for name in classes:
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = (rng.random((*size, 3)) * 255).astype("uint8")
            Image.fromarray(pixels).save(folder / name / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    _write_images(root / "images")
    model = Tiny().eval()
    torch.export.save(torch.export.export(model, (torch.randn(2, 3, 16, 16),)), root / "tiny.pt2")
    return root, model


def run(*args, timeout=300):
    assert SGFX, "the sgfx console script is not installed (pip install -e .)"
    return subprocess.run([SGFX, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def test_sparsify_report_check_eval_export_through_the_entry_point(workspace, capsys):
    root, model = workspace
    out = root / "tiny.sgfx"
    assert cli.main(["sparsify", str(root / "tiny.pt2"), "--calib", str(root / "images"), "--size", "16",
                     "--pattern", "2:4", "-o", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["status"]) for r in report["layers"]] == [
        ("conv1.weight", "skipped"), ("conv2.weight", "pruned"), ("fc.weight", "pruned")]  # conv1: 3 channels
    assert out.is_file() and sgfx.check_pattern(sgfx.load(out), "2:4")

    failed = run("check", out, "--pattern", "1:4")  # the installed console script, its exit status and streams
    assert failed.returncode == 1 and failed.stdout.startswith("FAILED") and "conv2.weight" in failed.stdout
    assert "Traceback" not in failed.stderr
    assert cli.main(["check", str(out), "--pattern", "2:4"]) == 0
    capsys.readouterr()
    assert cli.main(["report", str(out)]) == 0
    table = capsys.readouterr().out
    assert "conv2.weight" in table and "2:4" in table and "2/3 layers pruned" in table

    assert cli.main(["eval", str(out), "--data", str(root / "images"), "--size", "16", "--dense",
                     str(root / "tiny.pt2"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    images = ImageSet(root / "images", ImageTransform(16, round(16 / 0.875)))
    expected = {name: topk_correct(m, images.batches(32)) for name, m in (("sparse", sgfx.load(out)), ("dense", model))}
    assert [r["images"] for r in rows] == [12, 12]
    assert rows[0]["top-1 %"] == round(accuracy(expected["sparse"][1]), 2)
    assert rows[1]["top-1 %"] == round(accuracy(expected["dense"][1]), 2)
    diff, half = paired_difference(expected["sparse"][1], expected["dense"][1])
    assert rows[0]["top-1 vs dense (95% CI), pp"] == f"{diff:+.2f} ± {half:.2f}"

    assert cli.main(["export", str(out), "-o", str(root / "tiny.onnx"), "--input-shape", "2,3,16,16"]) == 0
    exported = capsys.readouterr().out
    assert "2/3 weight layers sparse-eligible, 2 pruned by sgfx" in exported and "trtexec --onnx=" in exported
    eligible = {layer.initializer for layer in sgfx.check_onnx_sparsity(root / "tiny.onnx") if layer.eligible}
    assert eligible == {"conv2.weight", "fc.weight"}


def test_export_failures_are_one_line(workspace, tmp_path, capsys):
    root, _ = workspace
    gm = sgfx.sparsify(Tiny().eval(), torch.randn(8, 3, 16, 16), "2:4", method="magnitude")
    sgfx.save(gm, tmp_path / "t.sgfx")
    args = ["export", str(tmp_path / "t.sgfx"), "--input-shape", "2,3,16,16", "-o"]
    assert cli.main(args + [str(tmp_path / "missing" / "t.onnx")]) == 1
    assert capsys.readouterr().err.strip() == (f"sgfx export: error: cannot write the ONNX file to "
                                               f"{tmp_path / 'missing' / 't.onnx'}: {tmp_path / 'missing'} is not "
                                               "an existing directory")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args[:3] + ["0,3"] + args[4:] + [str(tmp_path / "t.onnx")])
    assert exit_info.value.code == 2


def test_torchvision_model_with_safetensors_weights(workspace, tmp_path):
    from safetensors.torch import save_file
    import torchvision

    root, _ = workspace
    state = torchvision.models.resnet18(num_classes=3).state_dict()
    state["fc.bias"] = torch.full((3,), 7.0)  # a value sparsify leaves alone: proves these weights were loaded
    save_file(state, tmp_path / "w.safetensors")
    assert cli.main(["-q", "sparsify", "torchvision:resnet18", "--num-classes", "3", "--weights",
                     str(tmp_path / "w.safetensors"), "--calib", str(root / "images"), "--images", "6", "--size", "32",
                     "--method", "magnitude", "-o", str(tmp_path / "r.sgfx")]) == 0
    gm = sgfx.load(tmp_path / "r.sgfx")
    assert torch.equal(gm.fc.bias, torch.full((3,), 7.0))
    assert len(sgfx.get_report(gm).pruned_layers) == 20 and sgfx.check_pattern(gm, "2:4")


def test_model_sources_and_their_transforms(tmp_path, capsys):
    from sgfx.cli.sources import SourceError, load_model

    loaded = load_model("torchvision:resnet18", num_classes=3)
    assert loaded.transform == ImageTransform(224, 256, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # IMAGENET1K_V1
    assert loaded.model.fc.out_features == 3 and not loaded.model.training
    with pytest.raises(SourceError, match="did you mean resnet18"):
        load_model("torchvision:resnet81")
    torch.save({"fc.weight": torch.zeros(3, 512)}, tmp_path / "bad.pth")
    with pytest.raises(SourceError, match="does not match the model: 1.. missing keys"):
        load_model("torchvision:resnet18", tmp_path / "bad.pth", num_classes=3)
    torch.save({"state_dict": Tiny().state_dict()}, tmp_path / "wrapped.pth")
    with pytest.raises(SourceError, match="holds a dict .* not a model"):
        load_model(str(tmp_path / "wrapped.pth"))
    pytest.importorskip("timm")
    timm_model = load_model("timm:resnet10t", num_classes=5)
    assert (timm_model.transform.size, timm_model.transform.resize) == (176, 201)  # its config: 176 px, crop 0.875
    assert timm_model.model.get_classifier().out_features == 5


def test_allocation_flags(workspace, tmp_path):
    root, _ = workspace
    out = tmp_path / "g.sgfx"
    assert cli.main(["-q", "sparsify", str(root / "tiny.pt2"), "--calib", str(root / "images"), "--size", "16",
                     "--pattern", "0.6", "--allocation", "global", "--method", "magnitude", "-o", str(out)]) == 0
    report = sgfx.get_report(sgfx.load(out))
    levels = {r.name: r.level for r in report.layers}
    assert all(level is not None for level in levels.values()) and len(set(levels.values())) > 1
    with pytest.raises(SystemExit):
        cli.main(["sparsify", "m.pt2", "--calib", "x", "-o", "y", "--target", "params"])


def test_torchscript_and_pickled_sources(workspace, tmp_path, capsys):
    root, model = workspace
    torch.jit.trace(model, torch.randn(2, 3, 16, 16)).save(tmp_path / "tiny.ts")
    assert cli.main(["-q", "sparsify", str(tmp_path / "tiny.ts"), "--calib", str(root / "images"), "--size", "16",
                     "-o", str(tmp_path / "ts.sgfx")]) == 0
    assert sgfx.check_pattern(sgfx.load(tmp_path / "ts.sgfx"), "2:4")
    torch.save(model, tmp_path / "pickled.pt")
    args = ["-q", "sparsify", str(tmp_path / "pickled.pt"), "--calib", str(root / "images"), "--size", "16",
            "-o", str(tmp_path / "p.sgfx")]
    capsys.readouterr()
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert "does not load safely" in err and "--trust-pickle" in err and not (tmp_path / "p.sgfx").exists()
    assert cli.main(args[:2] + [args[2], "--trust-pickle"] + args[3:]) == 0
    assert sgfx.get_report(sgfx.load(tmp_path / "p.sgfx")).pruned_layers


@pytest.mark.parametrize("case, message", [
    ("empty", "no images"), ("corrupt", "cannot read image"), ("missing", "is not a directory"),
    ("unknown-model", "has no model 'resnet1800'"), ("bad-size", "need 0 < size <= resize"),
])
def test_errors_are_one_line_with_status_1(workspace, tmp_path, capsys, case, message):
    root, _ = workspace
    calib, model = root / "images", str(root / "tiny.pt2")
    extra = []
    if case == "empty":
        calib = tmp_path / "empty"
        calib.mkdir()
    elif case == "corrupt":
        calib = _write_images(tmp_path / "corrupt", per_class=1)
        (calib / "ant" / "9.png").write_bytes(b"not a png")
    elif case == "missing":
        calib = tmp_path / "nowhere"
    elif case == "unknown-model":
        model = "torchvision:resnet1800"
    else:
        extra = ["--size", "64", "--resize", "32"]
    assert cli.main(["sparsify", model, "--calib", str(calib), "-o", str(tmp_path / "o.sgfx"), *extra]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("sgfx sparsify: error:") and message in err and len(err.splitlines()) == 1


def test_bad_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["sparsify", "m.pt2", "--calib", "x", "-o", "y", "--pattern", "5:4"])
    assert exit_info.value.code == 2 and "invalid" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- the data
def test_image_folders_flat_and_seeded(tmp_path):
    tree = _write_images(tmp_path / "tree")
    paths, labels, classes = find_images(tree)
    assert classes == ["ant", "bee", "cow"] and labels == [0] * 4 + [1] * 4 + [2] * 4
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in paths[:5]:
        shutil.copy(p, flat / f"{p.parent.name}-{p.name}")
    (flat / "notes.txt").write_text("not an image")
    flat_paths, flat_labels, _ = find_images(flat)
    assert len(flat_paths) == 5 and flat_labels is None
    first, again, other = (ImageSet(tree, ImageTransform(16, 18), 5, seed) for seed in (0, 0, 1))
    assert first.paths == again.paths and first.paths != other.paths and len(first) == 5
    only_text = tmp_path / "text"
    only_text.mkdir()
    (only_text / "a.txt").write_text("no image here")
    with pytest.raises(DataError, match="no images"):
        find_images(only_text)
    with pytest.raises(DataError, match="is not a directory"):
        find_images(paths[0])


def test_transform_matches_manual_resize_crop_normalise(tmp_path):
    y, x = np.mgrid[0:30, 0:40]
    smooth = np.stack([4 * x + 2 * y, 200 - 3 * y, 5 * x], axis=-1).clip(0, 255).astype("uint8")  # resizes alike
    Image.fromarray(smooth).save(tmp_path / "g.png")
    transform = ImageTransform(16, 20, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    with Image.open(tmp_path / "g.png") as image:
        got = transform(image)
        resized = image.convert("RGB").resize((26, 20), Image.BILINEAR)  # short side 30 -> 20, long side int(26.7)
    pixels = np.asarray(resized, dtype=np.float32)[2:18, 5:21] / 255.0  # centre 16x16 crop
    expected = (torch.from_numpy(pixels).permute(2, 0, 1) - torch.tensor([0.5, 0.4, 0.3])[:, None, None]) / \
        torch.tensor([0.2, 0.25, 0.3])[:, None, None]
    assert got.shape == (3, 16, 16)
    torch.testing.assert_close(got, expected, atol=0.05, rtol=0)  # antialiased vs plain bilinear: a few levels


def test_paired_difference_against_hand_computation():
    first = torch.tensor([1, 1, 0, 1, 0, 1, 1, 0], dtype=torch.bool)
    second = torch.tensor([1, 0, 0, 1, 1, 0, 1, 0], dtype=torch.bool)
    diff, half = paired_difference(first, second)
    d = np.array([0, 1, 0, 0, -1, 1, 0, 0], dtype=float)
    assert diff == pytest.approx(100 * d.mean())
    assert half == pytest.approx(100 * 1.96 * d.std(ddof=1) / np.sqrt(8))


def test_progress_bar_counts_layers_on_a_terminal(monkeypatch, gen):
    import io
    import sys

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    seen = []
    sgfx.sparsify(Tiny().eval(), torch.randn(8, 3, 8, 8, generator=gen), "2:4", progress=True, callback=seen.append)
    assert [r.name for r in seen] == ["conv2", "fc"]  # the user's callback still runs
    assert "sgfx: pruning" in screen.getvalue() and "2/2" in screen.getvalue()


def test_unsaveable_model_fails_before_pruning(workspace, tmp_path, capsys, monkeypatch):
    root, _ = workspace
    torch.save(Unsaveable(), tmp_path / "u.pt")
    pruned = []
    monkeypatch.setattr(sgfx.api, "sparsify", lambda *a, **k: pruned.append(1))
    assert cli.main(["sparsify", str(tmp_path / "u.pt"), "--trust-pickle", "--calib", str(root / "images"),
                     "--size", "16", "-o", str(tmp_path / "u.sgfx")]) == 1
    err = capsys.readouterr().err
    assert "cannot be stored as .sgfx, so it is not pruned" in err and "halve" in err
    assert pruned == [] and not (tmp_path / "u.sgfx").exists()


@pytest.mark.slow  # a full-size torchvision detector (about 12 s); test_submodules covers the library on small ones
def test_detection_model_with_submodules_auto(workspace, tmp_path, capsys):
    """A torchvision detector (untraceable whole) from the command line: --submodules auto, then report and check
    read the file without the model's code."""
    root, _ = workspace
    out = tmp_path / "ssd.sgfx"
    assert cli.main(["-q", "sparsify", "torchvision:ssdlite320_mobilenet_v3_large", "--num-classes", "3",
                     "--submodules", "auto", "--calib", str(root / "images"), "--size", "64", "-o", str(out)]) == 0
    capsys.readouterr()
    assert cli.main(["report", str(out)]) == 0
    table = capsys.readouterr().out
    assert "2 submodules traced" in table and "backbone.features" in table
    assert cli.main(["check", str(out), "--pattern", "2:4"]) == 0
    assert capsys.readouterr().out.startswith("OK: ")
    assert cli.main(["check", str(out), "--pattern", "1:4"]) == 1  # it can fail
    loaded = sgfx.load(out, model=torchvision.models.get_model("ssdlite320_mobilenet_v3_large", weights=None,
                                                                 weights_backbone=None, num_classes=3))
    assert sgfx.check_pattern(loaded, "2:4")


def test_max_memory_and_spill_dir_flags(workspace, tmp_path, capsys):
    root, _ = workspace
    base = ["sparsify", str(root / "tiny.pt2"), "--calib", str(root / "images"), "--size", "16", "-o"]
    spill = tmp_path / "spill"
    spill.mkdir()
    assert cli.main(["-q"] + base + [str(tmp_path / "a.sgfx"), "--max-memory", "20GB", "--spill-dir", str(spill),
                                     "--json"]) == 0
    memory = json.loads(capsys.readouterr().out)["memory"]
    assert memory["max_memory"] == 20 * 10 ** 9 and list(spill.iterdir()) == []
    assert cli.main(["-q"] + base + [str(tmp_path / "b.sgfx"), "--max-memory", "1KB"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("sgfx sparsify: error: sgfx: max_memory=0.00 GB is below the") and "\n" not in err
    assert not (tmp_path / "b.sgfx").exists()


def test_sparsify_int8_and_export_qdq(workspace, tmp_path, capsys):
    """--quantize int8 on a torch.export file (aten convs) and `sgfx export` writing QDQ ONNX from the saved file."""
    root, _ = workspace
    out = tmp_path / "int8.sgfx"
    assert cli.main(["-q", "sparsify", str(root / "tiny.pt2"), "--calib", str(root / "images"), "--size", "16",
                     "--pattern", "2:4", "--quantize", "int8", "-o", str(out)]) == 0
    report = sgfx.get_report(sgfx.load(out))
    assert report.quantize == "int8"
    assert {r.name for r in report.layers if "weight_scale" in r.quant} == {"conv2.weight", "fc.weight"}
    capsys.readouterr()
    assert cli.main(["export", str(out), "-o", str(tmp_path / "int8.onnx"), "--input-shape", "2,3,16,16"]) == 0
    printed = capsys.readouterr().out
    assert "2 layers INT8 (QDQ)" in printed and "--int8" in printed and "QLinearConv" in printed
