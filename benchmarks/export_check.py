"""The road to TensorRT on the seed models and torchvision ResNet-50: sparsify, export to ONNX (float32 and float16),
verify the 2:4 pattern with sgfx's checker and with NVIDIA Polygraphy, compare onnxruntime with PyTorch, and
round-trip ``torch.export``.

    python benchmarks/export_check.py --out runs/export_check.json          # all five models (about 10 minutes)
    python benchmarks/export_check.py --models cifar_cnn resnet50

The seed models load their trained checkpoints from ../shared/checkpoints when present (VGG-16 and ResNet-50 use
random weights with randomised BatchNorm statistics: no trained weights are available here). Calibration inputs
are random: the export checks do not depend on accuracy. The three small seed models are pruned with sgfx's default
(SparseGPT); VGG-16 and ResNet-50 with magnitude pruning, to keep the run short (the export sees the same 2:4
layout either way). ``tests/test_export_models.py`` (marker ``slow``) asserts on the rows this script computes.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time
import warnings

import torch
import torchvision
from tabulate import tabulate

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "tests"))

import common  # noqa: E402
import sgfx  # noqa: E402
from reference import polygraphy_sparse_tensors  # noqa: E402

INPUTS = {"mnist_cnn": (1, 28, 28), "cifar_cnn": (3, 32, 32), "resnet18_cifar": (3, 32, 32),
          "vgg16_cifar": (3, 32, 32), "resnet50": (3, 224, 224)}
MAGNITUDE = ("vgg16_cifar", "resnet50")  # pruned by magnitude here to keep the run short
CALIB_IMAGES = {"resnet50": 8}


def build(name: str, generator: torch.Generator) -> tuple[torch.nn.Module, str]:
    """The model and where its weights come from ("trained: <file>" or "random")."""
    if name == "resnet50":
        model = torchvision.models.resnet50()
    else:
        model = common.MODELS[name].build()
        checkpoint = common.SHARED / "checkpoints" / f"{common.MODELS[name].checkpoint}.pt"
        if checkpoint.is_file():
            model.load_state_dict(torch.load(checkpoint, weights_only=True))
            return model.eval(), f"trained ({checkpoint.name})"
    for module in model.modules():  # non-trivial BatchNorm statistics, so that folding them changes weights
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    return model.eval(), "random"


def check_model(name: str, workdir: pathlib.Path, seed: int = 0) -> dict:
    """Everything measured for one model, as one row (no assertion here: the slow test asserts on it)."""
    generator = torch.Generator().manual_seed(seed)
    model, weights = build(name, generator)
    shape = INPUTS[name]
    calib = torch.randn(CALIB_IMAGES.get(name, 64), *shape, generator=generator)
    x = torch.randn(2, *shape, generator=generator)
    method = "magnitude" if name in MAGNITUDE else "sparsegpt"
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="sgfx: .* left dense")
        gm = sgfx.sparsify(model, calib.split(16), "2:4", method=method)
    sparsify_s = time.perf_counter() - started
    pruned = {r.name for r in sgfx.get_report(gm).pruned_layers}

    path = workdir / f"{name}.onnx"
    started = time.perf_counter()
    report = sgfx.export_onnx(gm, (x,), path)
    export_s = time.perf_counter() - started
    started = time.perf_counter()
    candidates, sparse = polygraphy_sparse_tensors(path)
    polygraphy_s = time.perf_counter() - started
    disagree = [layer.initializer for layer in report.layers if (layer.initializer in sparse) != layer.eligible]
    size_mb = path.stat().st_size / 1e6
    path.unlink()

    half = sgfx.export_onnx(gm, (x,), workdir / f"{name}-fp16.onnx", dtype=torch.float16)
    half_eligible = sum(layer.eligible for layer in half.pruned)
    (workdir / f"{name}-fp16.onnx").unlink()

    program = torch.export.export(gm, (x,))
    state = gm.state_dict()
    bit_exact = sorted(program.state_dict) == sorted(state) and all(
        torch.equal(program.state_dict[k], state[k]) for k in state)
    with torch.no_grad():
        same_outputs = torch.equal(program.module()(x), gm(x))
    return {
        "model": name, "weights": weights, "method": method, "layers": len(report.layers),
        "pruned": len(pruned), "pruned_eligible": sum(layer.eligible for layer in report.pruned),
        "pruned_found": len({layer.layer for layer in report.pruned}), "eligible": len(report.eligible),
        "polygraphy_sparse": len(sparse), "polygraphy_candidates": len(candidates), "disagreements": disagree,
        "max_rel_error": report.max_rel_error, "fp16_pruned_eligible": half_eligible,
        "torch_export_bit_exact": bit_exact, "torch_export_same_outputs": same_outputs,
        "onnx_mb": round(size_mb, 1), "sparsify_s": round(sparsify_s, 1), "export_s": round(export_s, 1),
        "polygraphy_s": round(polygraphy_s, 1),
        "not_eligible": sorted({layer.reason for layer in report.layers if not layer.eligible}),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(INPUTS), choices=list(INPUTS))
    parser.add_argument("--out", type=pathlib.Path)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models:
            rows.append(check_model(name, pathlib.Path(workdir)))
            print(json.dumps(rows[-1]), flush=True)
    table = [[r["model"], r["weights"], r["method"], f"{r['pruned_eligible']}/{r['pruned']}",
              f"{r['eligible']}/{r['layers']}", f"{r['polygraphy_sparse']}/{r['polygraphy_candidates']}",
              len(r["disagreements"]), f"{r['max_rel_error']:.1e}", f"{r['fp16_pruned_eligible']}/{r['pruned']}",
              "yes" if r["torch_export_bit_exact"] and r["torch_export_same_outputs"] else "NO",
              r["export_s"], r["polygraphy_s"]] for r in rows]
    headers = ["model", "weights", "method", "pruned eligible", "all eligible", "Polygraphy sparse/checked",
               "disagreements", "ORT max rel err", "fp16 eligible", "torch.export exact", "export s", "Polygraphy s"]
    print(tabulate(table, headers=headers, tablefmt="github"))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()
