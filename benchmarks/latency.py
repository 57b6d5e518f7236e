"""Inference latency of 2:4-sparsified models: dense vs semi-structured vs TensorRT (dense and sparse weights).

    python benchmarks/latency.py                      # ResNet-18 and VGG-16 (CIFAR), batch 1/32/256, fp16
    python benchmarks/latency.py --models resnet18_cifar --batches 1 32

Needs a CUDA GPU (sparse tensor cores); on a machine without one it says so and exits 0. TensorRT rows appear only
where torch-tensorrt is installed. Each number is the median of repeated timed runs after warm-up, and every
speed-up is against the dense model measured in the same run. Weights are random-init pruned by magnitude 2:4:
latency does not depend on their values.
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import statistics
import sys
import warnings

import torch
from tabulate import tabulate

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import sgfx  # noqa: E402


def median_ms(fn, x, warmup=10, repeats=50) -> float:
    with torch.no_grad():
        for _ in range(warmup):
            fn(x)
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(x)
            stop.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(stop))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet18_cifar", "vgg16_cifar"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32, 256])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("latency benchmark: unmeasured (no CUDA GPU on this machine)")
        return
    import common

    has_trt = importlib.util.find_spec("torch_tensorrt") is not None
    rows = []
    for name in args.models:
        model = common.MODELS[name].build().eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm = sgfx.sparsify(model, torch.randn(16, 3, 32, 32), "2:4", method="magnitude")
        dense = gm.to("cuda", torch.float16)
        sparse = sgfx.lower(gm, backend="semi_structured", dtype=torch.float16)
        lowered = sum(d.lowered for d in sgfx.get_report(sparse).lowering)
        for batch in args.batches:
            x = torch.randn(batch, 3, 32, 32, device="cuda", dtype=torch.float16)
            base = median_ms(dense, x)
            variants = {"semi_structured": sparse}
            if has_trt:
                import torch_tensorrt

                variants["tensorrt dense"] = torch_tensorrt.compile(dense, ir="dynamo", inputs=[x])
                variants["tensorrt sparse"] = sgfx.lower(gm, backend="tensorrt", example_inputs=(x,))
            rows.append([name, batch, "dense fp16", f"{base:.3f}", "1.00x", ""])
            for label, module in variants.items():
                ms = median_ms(module, x)
                note = f"{lowered} Linear layers lowered" if label == "semi_structured" else ""
                rows.append([name, batch, label, f"{ms:.3f}", f"{base / ms:.2f}x", note])
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}"
          + ("" if has_trt else " (torch-tensorrt not installed: TensorRT rows unmeasured)"))
    print(tabulate(rows, headers=["model", "batch", "variant", "median ms", "speed-up", "note"], tablefmt="github"))


if __name__ == "__main__":
    main()
