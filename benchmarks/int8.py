"""2:4 + INT8 on the trained seed models: sgfx's joint pass against the route a user has today.

    python benchmarks/int8.py --out runs/int8.json                       # SimpleCNN, CIFARCNN, ResNet-18
    python benchmarks/int8.py --models resnet18_cifar --latency          # + onnxruntime latency, batch 1 and 32

Protocol of docs/RESULTS.md: the shared checkpoints, 256 calibration images from the training split (seed 0), the
full test split. Rows, each with its top-1 and its paired difference from the float dense model (95 % interval):

- ``dense INT8 (sgfx)``: ``sparsify(model, calib, 0.0, quantize="int8")``: nothing pruned, weights GPTQ-rounded;
- ``2:4 float (sgfx)``: today's default;
- ``2:4 + INT8 joint (sgfx)``: ``sparsify(model, calib, "2:4", quantize="int8")``, the fake-quantized GraphModule;
- ``... in onnxruntime``: the same model exported as QDQ ONNX and run by onnxruntime on the CPU, once as written
  (``ORT_DISABLE_ALL``: each Q/DQ as the ONNX spec defines it) and once with its INT8 kernels (its optimizations but
  common-subexpression elimination, which would merge the Q/DQ pairs of ResNet's downsampling convs:
  ``sgfx.lowering.onnx.ORT_INT8_DISABLED_OPTIMIZERS``), with the top-1 agreement with the GraphModule;
- ``2:4 float -> quantize_static``: sgfx's 2:4 float model exported, then onnxruntime's ``quantize_static`` (QDQ,
  per-channel weights, its other defaults: MinMax calibration on the same 256 images), run as written and with the
  INT8 kernels; and whether its INT8 weights kept 2:4.

``joint - separate`` is the paired difference between the joint GraphModule and the separate route as written.
With ``--latency``: onnxruntime (CPU, all threads) float vs INT8 QDQ files of the joint model, batch 1 and 32,
median of repeated runs, measured in the same process one after the other. Needs ../shared; exits otherwise.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
from tabulate import tabulate

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import common  # noqa: E402
import sgfx  # noqa: E402
from sgfx.cli.evaluation import paired_difference  # noqa: E402
from sgfx.lowering.onnx import ORT_INT8_DISABLED_OPTIMIZERS, onnxruntime_kernels  # noqa: E402


def predictions(model, test_set, batch_size: int = 500) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(images).argmax(1) for images, _ in test_set.batches(batch_size)])


def ort_predictions(path: str, test_set, optimize: bool, batch_size: int = 500) -> torch.Tensor:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"],
                                   disabled_optimizers=list(ORT_INT8_DISABLED_OPTIMIZERS))
    name = session.get_inputs()[0].name
    return torch.cat([torch.from_numpy(session.run(None, {name: images.numpy()})[0]).argmax(1)
                      for images, _ in test_set.batches(batch_size)])


def quantize_static_route(float_path: str, out_path: str, calib: list[torch.Tensor]) -> None:
    """onnxruntime's post-training quantization of a float file: QDQ, per-channel weights, its other defaults."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": b.numpy()} for b in calib])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(float_path, out_path, Reader(), quant_format=QuantFormat.QDQ, per_channel=True)


def kept_2_4(path: str) -> bool:
    """Whether every sparse-eligible-shaped weight layer sgfx pruned is still 2:4 on its (INT8) initializer."""
    layers = sgfx.lowering.check_onnx_sparsity(path)
    return all("not 2:4" not in layer.reason for layer in layers if layer.sparsity >= 0.45)


def export_float(gm, example, path: str) -> None:
    """The 2:4 float model as a float ONNX file with its input named ``input`` (what quantize_static's reader feeds)."""
    torch.onnx.export(gm, (example,), path, dynamo=False, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, do_constant_folding=True)


def latency(path: str, batch: int, shape: tuple[int, ...], repeats: int) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"],
                                   disabled_optimizers=list(ORT_INT8_DISABLED_OPTIMIZERS))
    name = session.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)
    for _ in range(3):
        session.run(None, {name: x})
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        session.run(None, {name: x})
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def sparsify(model, calib, pattern, **options):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="sgfx: .*")
        started = time.perf_counter()
        gm = sgfx.sparsify(model, calib, pattern, **options)
    return gm, time.perf_counter() - started


def run_model(name: str, args) -> tuple[list[dict], dict]:
    spec = common.MODELS[name]
    model, _ = common.load_or_train(name, args)
    train_set = common.load_dataset(spec.dataset, True, args.data_dir, args.cache_dir, args.download)
    test_set = common.load_dataset(spec.dataset, False, args.data_dir, args.cache_dir, args.download)
    if args.test_samples:
        test_set = test_set.subset(args.test_samples, args.seed)
    calib = common.calibration_set(train_set, args.calib_samples, args.seed)
    example = calib[0][:1]
    labels = test_set.labels
    dense = predictions(model, test_set) == labels
    rows, extra = [], {"model": name}

    def row(label: str, correct: torch.Tensor, seconds: float | None = None, **fields) -> None:
        diff, half = paired_difference(correct, dense)
        rows.append({"model": name, "variant": label, "top1": round(100 * float(correct.float().mean()), 2),
                     "vs dense": f"{diff:+.2f} ± {half:.2f}", "sparsify_s": None if seconds is None else
                     round(seconds, 1), **fields})

    row("dense float", dense)
    gm_joint, seconds = sparsify(model, calib, "2:4", quantize="int8", activation_calibration=args.activation)
    joint_top = predictions(gm_joint, test_set)
    joint = joint_top == labels
    if args.joint_only:  # the activation-calibration comparison
        row("2:4 + INT8 joint (sgfx)", joint, seconds)
        return rows, extra
    gm_int8, int8_seconds = sparsify(model, calib, 0.0, quantize="int8", activation_calibration=args.activation)
    row("dense INT8 (sgfx)", predictions(gm_int8, test_set) == labels, int8_seconds)
    gm_float, float_seconds = sparsify(model, calib, "2:4")
    row("2:4 float (sgfx)", predictions(gm_float, test_set) == labels, float_seconds)
    row("2:4 + INT8 joint (sgfx)", joint, seconds)
    with tempfile.TemporaryDirectory() as scratch:
        joint_path = f"{scratch}/joint.onnx"
        exported = sgfx.export_onnx(gm_joint, (example,), joint_path, dynamic_batch=True)
        extra["joint_export"] = {"int8_layers": len(exported.int8_layers), "kernels": exported.onnxruntime_kernels,
                                 "max_rel_error": exported.max_rel_error,
                                 "int8_kernel_error": exported.int8_kernel_error}
        for optimize, label in ((False, "as written"), (True, "INT8 kernels")):
            predicted = ort_predictions(joint_path, test_set, optimize)
            row(f"  joint in onnxruntime, {label}", predicted == labels,
                agreement=f"{100 * float((predicted == joint_top).float().mean()):.2f} %")
        float_path, separate_path = f"{scratch}/float.onnx", f"{scratch}/separate.onnx"
        export_float(gm_float, example, float_path)
        started = time.perf_counter()
        quantize_static_route(float_path, separate_path, calib)
        separate_s = time.perf_counter() - started
        separate = {}
        for optimize, label in ((False, "as written"), (True, "INT8 kernels")):
            separate[label] = ort_predictions(separate_path, test_set, optimize) == labels
            row(f"2:4 float -> quantize_static, {label}", separate[label], separate_s if not optimize else None,
                kept_2_4=kept_2_4(separate_path))
        extra["separate_kernels"] = onnxruntime_kernels(separate_path)
        diff, half = paired_difference(joint, separate["as written"])
        extra["joint_minus_separate"] = f"{diff:+.2f} ± {half:.2f}"
        if args.latency:
            shape = tuple(example.shape[1:])
            extra["latency_ms"] = {f"batch {b}": {
                "float (2:4 float file)": round(1e3 * latency(float_path, b, shape, args.repeats), 2),
                "INT8 QDQ (joint file)": round(1e3 * latency(joint_path, b, shape, args.repeats), 2)}
                for b in (1, 32)}
    return rows, extra


def main(argv=None) -> None:
    parser = common.build_parser(__doc__.splitlines()[0])
    parser.set_defaults(methods=["sparsegpt"])
    parser.add_argument("--models", nargs="+", default=["mnist_cnn", "cifar_cnn", "resnet18_cifar"],
                        choices=sorted(common.MODELS))
    parser.add_argument("--activation", default=sgfx.quantize.ACTIVATION_METHODS[0],
                        choices=sgfx.quantize.ACTIVATION_METHODS)
    parser.add_argument("--latency", action="store_true")
    parser.add_argument("--joint-only", action="store_true", help="only the dense float and joint rows")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    if not (common.SHARED / "checkpoints").is_dir():
        sys.exit(f"needs the shared checkpoints under {common.SHARED}")
    all_rows, extras = [], []
    for name in args.models:
        rows, extra = run_model(name, args)
        print(tabulate(rows, headers="keys", tablefmt="github"))
        print(json.dumps(extra, indent=1))
        all_rows += rows
        extras.append(extra)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"rows": all_rows, "extra": extras, "activation": args.activation}, indent=1))


if __name__ == "__main__":
    main()
