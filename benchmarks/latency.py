"""Inference latency of 2:4-sparsified models: dense vs semi-structured vs TensorRT (dense and sparse weights).

    python benchmarks/latency.py                      # ResNet-50 (224 px) and VGG-16 (32 px), batch 1/32/256, fp16
    python benchmarks/latency.py --models resnet18_cifar --batches 1 32 --out runs/latency.json

Needs a CUDA GPU (sparse tensor cores); on a machine without one it says so and exits 0. TensorRT rows appear only
where torch-tensorrt is installed, with TensorRT's own count of the layers it found eligible and ran sparse. Each
number is the median of repeated timed runs after warm-up, and every speed-up is against the dense model measured in
the same run. The semi-structured model is also checked against the dense one (fp16 tolerance, max error relative
to the largest output). Weights are random-init pruned by magnitude 2:4: latency does not depend on their values.
Run by ``benchmarks/gpu_check.sh``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import sys
import warnings

import torch
import torchvision
from tabulate import tabulate

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import sgfx  # noqa: E402
from sgfx.lowering.semi_structured import median_cuda_ms  # noqa: E402


def median_ms(fn, x) -> float:
    return median_cuda_ms(fn, x, warmup=10, repeats=50)


FP16_TOLERANCE = 2e-2
INPUT_SIZES = {"resnet50": 224}


def build(name: str) -> torch.nn.Module:
    import common

    return (torchvision.models.resnet50() if name == "resnet50" else common.MODELS[name].build()).eval()


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-12))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet50", "vgg16_cifar"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32, 256])
    parser.add_argument("--out", type=pathlib.Path, help="write the rows as JSON")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("latency benchmark: unmeasured (no CUDA GPU on this machine)")
        return
    has_trt = importlib.util.find_spec("torch_tensorrt") is not None
    rows = []
    failures = []
    for name in args.models:
        size = INPUT_SIZES.get(name, 32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm = sgfx.sparsify(build(name), torch.randn(8, 3, size, size), "2:4", method="magnitude")
        dense = copy_to_cuda(gm)
        for batch in args.batches:
            x = torch.randn(batch, 3, size, size, device="cuda", dtype=torch.float16)
            sparse = sgfx.lower(gm, backend="semi_structured", dtype=torch.float16, example_inputs=(x,))
            decisions = sgfx.get_report(sparse).lowering
            kinds = [type(sparse.get_submodule(d.layer)).__name__ for d in decisions if d.lowered]
            with torch.no_grad():
                error = relative_error(sparse(x), dense(x))
            if error > FP16_TOLERANCE:
                failures.append(f"{name} batch {batch}: semi_structured differs from dense by {error:.2e}")
            base = median_ms(dense, x)
            variants = {"semi_structured": (sparse, f"lowered {kinds.count('SemiStructuredLinear')} Linear, "
                                                    f"{kinds.count('SemiStructuredConv1x1')} 1x1 conv; "
                                                    f"max rel. error {error:.1e}")}
            if has_trt:
                import torch_tensorrt

                variants["tensorrt dense"] = (torch_tensorrt.compile(dense, ir="dynamo", inputs=[x]), "")
                trt = sgfx.lower(gm, backend="tensorrt", example_inputs=(x,))
                variants["tensorrt sparse"] = (trt, str(trt.sgfx_tensorrt))
            rows.append([name, batch, "dense fp16", f"{base:.3f}", "1.00x", ""])
            for label, (module, note) in variants.items():
                ms = median_ms(module, x)
                rows.append([name, batch, label, f"{ms:.3f}", f"{base / ms:.2f}x", note])
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}"
          + ("" if has_trt else " (torch-tensorrt not installed: TensorRT rows unmeasured)"))
    headers = ["model", "batch", "variant", "median ms", "speed-up", "note"]
    print(tabulate(rows, headers=headers, tablefmt="github"))
    if args.out:
        args.out.write_text(json.dumps([dict(zip(headers, row)) for row in rows], indent=1))
    if failures:
        raise SystemExit("semi-structured outputs differ from dense beyond fp16 tolerance:\n" + "\n".join(failures))


def copy_to_cuda(gm: torch.nn.Module) -> torch.nn.Module:
    """The dense-kernel baseline: the same sparsified weights, fp16 on CUDA (gm itself stays on the CPU)."""
    import copy

    return copy.deepcopy(gm).to("cuda", torch.float16).eval()


if __name__ == "__main__":
    main()
