"""The seed models, the example data loaders (on fake data trees made here) and one example run end to end."""

import gzip
import json
import pathlib
import struct
import sys
import tarfile

import pytest
import torch

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import common  # noqa: E402
from conftest import SHARED  # noqa: E402

INPUT_SHAPES = {"fashion-mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


@pytest.mark.parametrize("name", list(common.MODELS))
def test_model_forward_shape_and_parameter_count(name):
    spec = common.MODELS[name]
    model = spec.build().eval()
    assert sum(p.numel() for p in model.parameters()) == spec.params
    with torch.no_grad():
        out = model(torch.randn(2, *INPUT_SHAPES[spec.dataset]))
    assert out.shape == (2, 10)


@pytest.mark.parametrize("name", ["mnist_cnn", "cifar_cnn", "resnet18_cifar"])
def test_shared_checkpoints_load(name):
    spec = common.MODELS[name]
    path = SHARED / "checkpoints" / f"{spec.checkpoint}.pt"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    model = spec.build()
    model.load_state_dict(torch.load(path, weights_only=True))  # strict: keys and shapes must match
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["dataset"] in ("fashion-mnist", "cifar10-jpg")
    assert tuple(meta["normalize"]["mean"]) == pytest.approx(common.NORMALIZE[spec.dataset][0])


def _write_idx(path, array: torch.Tensor):
    code = 0x08  # unsigned byte
    header = struct.pack(">I", (code << 8) | array.dim()) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.to(torch.uint8).numpy().tobytes())


def _fake_fashion_mnist(folder, n_train=96, n_test=32):
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = torch.arange(n) % 10
        images = (torch.rand(n, 28, 28, generator=gen) * 60).to(torch.uint8)
        for i, label in enumerate(labels):  # a learnable signal: a bright row per class
            images[i, 2 + 2 * int(label)] = 250
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return folder


def test_fashion_mnist_loader_reads_idx_files(tmp_path):
    source = _fake_fashion_mnist(tmp_path / "fmnist")
    train = common.load_fashion_mnist(True, source, tmp_path / "cache")
    test = common.load_fashion_mnist(False, source, tmp_path / "cache")
    assert train.images.shape == (96, 1, 28, 28) and train.images.dtype == torch.uint8
    assert test.labels.tolist() == [i % 10 for i in range(32)]
    assert int(train.images[3, 0, 2 + 2 * 3].min()) == 250
    images, labels = next(train.batches(16))
    assert images.shape == (16, 1, 28, 28) and images.dtype == torch.float32
    torch.testing.assert_close(images.mean(), ((train.images[:16].float() / 255 - 0.286) / 0.353).mean())


def test_missing_data_says_where_it_looked(tmp_path):
    with pytest.raises(common.DataNotFoundError, match=r"(?s)looked in .*empty.*dataset-fashion-mnist"):
        common.load_fashion_mnist(True, tmp_path / "empty", tmp_path / "cache")
    with pytest.raises(common.DataNotFoundError, match="no CIFAR-10 data in"):
        common.load_cifar10(True, tmp_path / "empty", tmp_path / "cache")


def _fake_cifar_tree(root, per_class=2):
    from PIL import Image

    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    for split in ("train", "test"):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (32, 32), (c * 20, i * 50, 100)).save(folder / f"{i:04d}.png")
    return root


def test_cifar_image_folder_and_archive(tmp_path):
    tree = _fake_cifar_tree(tmp_path / "cifar10-jpg")
    test = common.load_cifar10(False, tree, tmp_path / "cache")
    assert test.images.shape == (20, 3, 32, 32) and test.labels.tolist() == [c for c in range(10) for _ in range(2)]
    assert int(test.images[2, 0, 0, 0]) == 20  # class 1 (automobile) red channel
    cached = list((tmp_path / "cache").glob("cifar10-*-test.pt"))
    assert len(cached) == 1  # decoded once, cached as tensors
    archive = tmp_path / "cifar10-jpg.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree, arcname="cifar10-jpg")
    from_archive = common.load_cifar10(True, archive, tmp_path / "cache2")
    assert from_archive.images.shape == (20, 3, 32, 32)
    assert (tmp_path / "cache2" / "cifar10-jpg" / "train" / "truck").is_dir()


@pytest.mark.filterwarnings("ignore:sgfx.*left dense")
def test_example_end_to_end_on_tiny_data(tmp_path):
    """mnist_cnn trained 1 epoch on fake Fashion-MNIST, pruned by both methods, JSON and CSV written."""
    source = _fake_fashion_mnist(tmp_path / "fmnist")
    out = tmp_path / "out" / "rows.json"
    rows = common.run_example("mnist_cnn", [
        "--epochs", "1", "--data-dir", str(source), "--cache-dir", str(tmp_path / "cache"),
        "--calib-samples", "32", "--methods", "magnitude", "sparsegpt", "--out", str(out),
    ])
    written = json.loads(out.read_text())
    assert written == rows and [r["method"] for r in written] == ["magnitude", "sparsegpt"]
    for row in written:
        assert row["model"] == "mnist_cnn" and row["pattern"] == "2:4" and row["test_samples"] == 32
        assert 0.0 <= row["pruned"] <= 100.0 and row["drop"] == pytest.approx(row["baseline"] - row["pruned"], abs=0.02)
        assert row["layers_pruned"] == 3 and row["layers"] == 4  # conv1 (1 channel) stays dense
        assert row["bn_reestimate"] is False  # SimpleCNN has no BatchNorm: one run per method
    header = out.with_suffix(".csv").read_text().splitlines()[0]
    assert header.startswith("model,config,method,pattern,bn_reestimate,dense_targets,augment,stats_correction,"
                             "permute_channels,baseline")
    assert (tmp_path / "cache" / "checkpoints" / "simple_cnn_e1.pt").is_file()  # the trained model is cached


@pytest.mark.filterwarnings("ignore:sgfx.*left dense")
def test_sweep_writes_plot(tmp_path):
    import run_sweep

    pytest.importorskip("matplotlib")
    source = _fake_fashion_mnist(tmp_path / "fmnist")
    rows = run_sweep.main([
        "--models", "mnist_cnn", "--epochs", "1", "--data-dir", str(source), "--cache-dir", str(tmp_path / "c"),
        "--calib-samples", "16", "--methods", "magnitude", "--sparsities", "0.3", "0.6",
        "--out", str(tmp_path / "sweep.json"),
    ])
    assert [r["pattern"] for r in rows] == ["2:4", "30% unstructured", "60% unstructured"]
    png = tmp_path / "sweep.png"
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"


def test_augment_crops_and_flips_each_image_independently():
    images = torch.arange(16 * 3 * 8 * 8, dtype=torch.float32).view(16, 3, 8, 8)
    out = common.crop_and_flip(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    offsets = set()
    for i in range(16):  # every output is some 8x8 window of its own padded image, possibly mirrored
        found = [(dy, dx, flip) for dy in range(9) for dx in range(9) for flip in (False, True)
                 if torch.equal(out[i], (lambda win: win.flip(2) if flip else win)(padded[i, :, dy:dy + 8, dx:dx + 8]))]
        assert found, i
        offsets.add(found[0][:2])
    assert len(offsets) > 1  # not one offset for the whole batch


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_train_with_augmentation_fits_a_small_set(precision):
    gen = torch.Generator().manual_seed(0)
    shade = torch.randint(0, 2, (64,), generator=gen)  # dark or bright first channel: learnable under crop and flip
    images = torch.randint(0, 128, (64, 3, 8, 8), generator=gen, dtype=torch.uint8)
    images[:, 0] += (shade * 127).to(torch.uint8).view(-1, 1, 1)
    labels = shade
    data = common.ImageSet(images, labels, (0.5,), (0.25,))
    images = data.normalize(images)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(8, 2))
    before = torch.nn.functional.cross_entropy(model(images), labels).item()
    common.train(model, data, epochs=30, batch_size=16, max_lr=0.05, augment=True, precision=precision)
    with torch.no_grad():
        after = torch.nn.functional.cross_entropy(model(images), labels).item()
    assert after < 0.7 * before
    assert not model.training


def test_train_rejects_unknown_precision():
    data = common.ImageSet(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long), (0.0,), (1.0,))
    with pytest.raises(ValueError, match="precision"):
        common.train(torch.nn.Linear(16, 2), data, 1, 2, 0.1, False, precision="fp8")


@pytest.mark.filterwarnings("ignore:sgfx.*left dense")
def test_ablation_runs_configs_and_pivots(tmp_path, capsys):
    import ablation

    source = _fake_fashion_mnist(tmp_path / "fmnist")
    rows = ablation.main([
        "--models", "mnist_cnn", "--epochs", "1", "--data-dir", str(source), "--cache-dir", str(tmp_path / "c"),
        "--calib-samples", "16", "--patterns", "2:4", "0.5",
        "--configs", "magnitude", "sparsegpt", "sparsegpt+bn", "+stats", "+permute",
        "--out", str(tmp_path / "ablation.json"),
    ])
    # SimpleCNN has no BatchNorm (sparsegpt+bn would repeat sparsegpt); unstructured has nothing to permute
    assert [(r["pattern"], r["config"]) for r in rows] == [
        ("2:4", "magnitude"), ("2:4", "sparsegpt"), ("2:4", "+stats"), ("2:4", "+permute"),
        ("50% unstructured", "magnitude"), ("50% unstructured", "sparsegpt"), ("50% unstructured", "+stats")]
    assert [r["stats_correction"] for r in rows[:4]] == ["off", "off", "mean", "off"]
    assert rows[3]["permute_channels"] is True
    assert json.loads((tmp_path / "ablation.json").read_text()) == rows
    printed = capsys.readouterr().out
    assert "2:4: accuracy drop (pp)" in printed and "| +permute " in printed


def test_synthetic_shapes_and_per_image_iou_against_perfect_and_blind_predictors():
    import efficient

    images, masks = efficient.synthetic_shapes(12, size=32, seed=3)
    again, masks_again = efficient.synthetic_shapes(12, size=32, seed=3)
    assert images.shape == (12, 3, 32, 32) and torch.equal(images, again) and torch.equal(masks, masks_again)
    assert set(masks.unique().tolist()) <= {0, 1, 2, 3} and (masks > 0).any(dim=(1, 2)).all()  # a shape in each

    class Oracle(torch.nn.Module):  # logits that put each pixel in its true class
        def forward(self, x):
            return torch.nn.functional.one_hot(masks[: len(x)], 4).permute(0, 3, 1, 2).float()

    class Blind(torch.nn.Module):  # everything background
        def forward(self, x):
            return torch.zeros(len(x), 4, 32, 32).index_fill_(1, torch.tensor([0]), 1.0)

    assert torch.equal(efficient.per_image_iou(Oracle(), images, masks), torch.ones(12, dtype=torch.float64))
    assert torch.equal(efficient.per_image_iou(Blind(), images, masks), torch.zeros(12, dtype=torch.float64))


def test_shapes_unet_transposed_convs_are_left_dense_by_accelerated_only():
    import efficient
    import sgfx

    model = efficient.ShapesUNet(width=8).eval()
    images, _ = efficient.synthetic_shapes(16, size=32, seed=0)
    report = sgfx.get_report(sgfx.sparsify(model, images, "2:4", accelerated_only=True))
    kinds = {r.name: (r.op, r.pruned, r.reason) for r in report.layers}
    assert not kinds["up1"][1] and not kinds["up2"][1] and "ConvTranspose" in kinds["up1"][2]
    assert kinds["dec1.0"][1] and kinds["head"][1]  # plain convs with input channels in fours: 2:4
    assert not kinds["enc1.0"][1] and "input channels per group (3)" in kinds["enc1.0"][2]
