"""The ``sgfx`` command: sparsify a model on a folder of images, inspect, check, evaluate and export the result.

    sgfx sparsify torchvision:resnet50 --weights resnet50.pth --calib ~/imagenet/train --images 512 -o r50.sgfx
    sgfx report r50.sgfx                        # the per-layer table (--json for JSON)
    sgfx check r50.sgfx --pattern 2:4           # exit 0 when every pruned weight follows it, 1 when not
    sgfx eval r50.sgfx --data ~/imagenet/val --dense torchvision:resnet50 --dense-weights resnet50.pth
    sgfx export r50.sgfx -o r50.onnx --input-shape 1,3,224,224

Failures exit with status 1 and a one-line reason on stderr (``-v`` shows the traceback and the library's log);
bad arguments exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from dataclasses import asdict

EXIT_OK, EXIT_FAILED = 0, 1


# ------------------------------------------------------------------------------------------ argument types
def _pattern(text: str):
    """argparse type: "N:M" or a fraction, validated like sgfx.sparsify does."""
    from ..config import parse_pattern

    try:
        return parse_pattern(float(text))
    except ValueError:
        pass
    try:
        return parse_pattern(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _shape(text: str) -> tuple[int, ...]:
    """argparse type: "1,3,224,224"."""
    try:
        shape = tuple(int(d) for d in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise argparse.ArgumentTypeError(f"expected positive sizes such as 1,3,224,224, got {text!r}")
    return shape


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


# ------------------------------------------------------------------------------------------ shared pieces
def _add_model_args(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    dest = prefix.replace("-", "_")
    parser.add_argument(f"--{prefix}weights", dest=f"{dest}weights",
                        help="state_dict file (.pth/.pt, read with weights_only=True, or .safetensors)")
    if not prefix:
        parser.add_argument("--num-classes", type=_positive, help="classes of a torchvision:/timm: architecture")
        parser.add_argument("--trust-pickle", action="store_true",
                            help="allow a whole pickled model (unpickling runs code from the file)")


def _add_image_args(parser: argparse.ArgumentParser, folder: str, images_help: str) -> None:
    parser.add_argument(folder, required=True, help="an ImageFolder tree (root/<class>/<image>) or a folder of images")
    parser.add_argument("--images", type=_positive, help=images_help)
    parser.add_argument("--size", type=_positive, help="centre-crop size (default: the weights' own, else 224)")
    parser.add_argument("--resize", type=_positive, help="short side before cropping (default: size / 0.875)")
    parser.add_argument("--mean", type=float, nargs="+", help="normalisation mean per channel (default: the weights' "
                                                                   "own, else ImageNet's)")
    parser.add_argument("--std", type=float, nargs="+", help="normalisation std per channel")
    parser.add_argument("--channels", type=int, choices=[1, 3], help="1 for grey-scale models (default 3)")
    parser.add_argument("--batch-size", type=_positive, default=32)
    parser.add_argument("--seed", type=int, default=0, help="which images are drawn (default 0)")


def _transform(args: argparse.Namespace, own=None):
    """The image transform: the flags, else the weights' own (``own``), else ImageNet's at 224 px."""
    from .data import IMAGENET_MEAN, IMAGENET_STD, ImageTransform

    channels = args.channels or (own.channels if own else 3)
    size = args.size or (own.size if own else 224)
    resize = args.resize or (own.resize if own and not args.size else round(size / 0.875))
    default_mean, default_std = (own.mean, own.std) if own and own.channels == channels else (
        (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.5,), (0.5,)))
    mean, std = tuple(args.mean or default_mean), tuple(args.std or default_std)
    return ImageTransform(size, resize, mean, std, channels)


def _load(source: str, weights: str | None, args: argparse.Namespace, shape: tuple[int, ...] | None = None):
    from .sources import load_model

    return load_model(source, weights, trust_pickle=getattr(args, "trust_pickle", False),
                      num_classes=getattr(args, "num_classes", None), example_shape=shape)


def _image_set(args: argparse.Namespace, folder: str, transform):
    from .data import ImageSet

    images = ImageSet(folder, transform, args.images, args.seed)
    logging.getLogger("sgfx.cli").info("%d images from %s", len(images), folder)
    return images


def _batches(images, batch_size: int, desc: str, show: bool):
    from tqdm.auto import tqdm

    total = -(-len(images) // batch_size)
    return tqdm(images.batches(batch_size), total=total, desc=desc, unit="batch", disable=None if show else True,
                leave=False)


def _print_report(report, as_json: bool) -> None:
    if as_json:
        data = asdict(report)
        data.pop("lowering", None)
        print(json.dumps(data, indent=1, default=str))
    else:
        print(report)


def _option_flags() -> dict[str, dict]:
    """``sgfx sparsify``'s flags for the options, from :class:`sgfx.SparsifyConfig`'s fields: {name: cli spec}."""
    import dataclasses

    from ..config import SparsifyConfig

    return {f.name: f.metadata["cli"] for f in dataclasses.fields(SparsifyConfig) if f.metadata["cli"] is not None}


_KINDS = {"int": {"type": int}, "float": {"type": float}, "text": {}, "names": {"nargs": "+", "metavar": "NAME"},
          "pattern": {"type": _pattern, "metavar": "PATTERN"}, "bool": {"action": argparse.BooleanOptionalAction}}


def _add_option_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per option; its help is the option's documentation."""
    from ..config import option_help

    for name, spec in _option_flags().items():
        settings = dict(_KINDS[spec.get("kind", "text")])
        if "choices" in spec:
            settings["choices"] = spec["choices"]
        text = option_help(name).replace("``", "").replace("%", "%%")
        default = spec.get("default")
        parser.add_argument(spec.get("flag", "--" + name.replace("_", "-")), dest=name, default=default,
                            help=text + (f" Default {default}." if default is not None else ""), **settings)


# ------------------------------------------------------------------------------------------------- verbs
def _sparsify(args: argparse.Namespace) -> int:
    from .. import api, serialization
    from ..passes.trace import trace
    from ..report import get_report

    probe = _transform(args)  # the example shape TorchScript conversion needs: before the model's own transform
    loaded = _load(args.model, args.weights, args, (2, probe.channels, probe.size, probe.size))
    transform = _transform(args, loaded.transform)
    images = _image_set(args, args.calib, transform)
    # read while sparsify stores them (spilling to disk beyond --max-memory)
    calib = (x for x, _ in _batches(images, args.batch_size, "sgfx: reading images", not args.quiet))
    options = {name: getattr(args, name) for name in _option_flags()}
    if options["submodules"]:
        model = loaded.model  # traced per submodule; each is checked for storage once pruned
    else:
        model = trace(loaded.model)
        try:  # before the work; the passes only add nodes .sgfx files allow (opened attention) or reorder them
            serialization.check_saveable(model)
        except TypeError as exc:
            raise TypeError(f"{args.model} cannot be stored as .sgfx, so it is not pruned: {exc}") from None
    gm = api.sparsify(model, calib, options.pop("sparsity"), progress=False if args.quiet else None, **options)
    del calib
    sizes = serialization.save(gm, args.output)
    _print_report(get_report(gm), args.json)
    if not args.json:
        print(f"wrote {args.output} ({sizes['bytes'] / 1e6:.1f} MB; dense state_dict {sizes['dense_bytes'] / 1e6:.1f} "
              f"MB); images {transform.size} px, mean {transform.mean}, std {transform.std}", file=sys.stderr)
    return EXIT_OK


def _report(args: argparse.Namespace) -> int:
    from ..serialization import read_pruned

    report, _ = read_pruned(args.model)  # no model is built: also for files saved with --submodules
    if report is None:
        raise ValueError(f"{args.model} holds no sgfx report (saved from a model sgfx did not sparsify)")
    _print_report(report, args.json)
    return EXIT_OK


def _check(args: argparse.Namespace) -> int:
    from ..check import PatternCheck, check_pattern, count_violations
    from ..layout import nm_axis
    from ..serialization import read_pruned

    if args.model.endswith(".sgfx") and not args.weights:  # the stored pruned weights, each along its kind's axis
        report, weights = read_pruned(args.model)
        result = PatternCheck(str(args.pattern))
        for record in report.layers if report else []:
            if record.pruned:
                result.checked.append(record.weight_name)
                try:
                    bad = count_violations(weights[record.weight_name], args.pattern, nm_axis(record.op))
                except ValueError:
                    result.checked.pop()
                    result.ineligible.append(record.weight_name)
                    continue
                if bad:
                    result.violations[record.weight_name] = bad
    else:
        result = check_pattern(_load(args.model, args.weights, args).model, args.pattern)
    if args.json:
        print(json.dumps(asdict(result) | {"ok": result.ok}, indent=1))
    else:
        verdict = "OK" if result.ok else "FAILED"
        print(f"{verdict}: {len(result.checked)} weights checked against {result.pattern}, "
              f"{len(result.violations)} violate it" + "".join(f"\n  {name}: {count} groups"
                                                             for name, count in result.violations.items()))
        if not result.checked:
            print("  no weight could be checked (none pruned, or no prunable layer shaped for the pattern)")
    return EXIT_OK if result.ok else EXIT_FAILED


def _eval(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from .evaluation import accuracy, paired_difference, topk_correct

    probe = _transform(args)
    shape = (2, probe.channels, probe.size, probe.size)
    models = {args.model: _load(args.model, args.weights, args, shape)}
    if args.dense:
        models[f"{args.dense} (dense)"] = _load(args.dense, args.dense_weights, args, shape)
    own = next((m.transform for m in models.values() if m.transform is not None), None)
    images = _image_set(args, args.data, _transform(args, own))
    names = list(models)
    correct = {name: {1: [], 5: []} for name in names}
    for batch in _batches(images, args.batch_size, "sgfx: evaluating", not args.quiet):
        for name in names:
            for k, found in topk_correct(models[name].model, [batch]).items():
                correct[name][k].append(found)
    import torch

    correct = {name: {k: torch.cat(v) for k, v in ks.items()} for name, ks in correct.items()}
    rows = [{"model": name, "images": len(images), "top-1 %": round(accuracy(c[1]), 2),
             "top-5 %": round(accuracy(c[5]), 2)} for name, c in correct.items()]
    if len(names) == 2:
        diff, half = paired_difference(correct[names[0]][1], correct[names[1]][1])
        rows[0]["top-1 vs dense (95% CI), pp"] = f"{diff:+.2f} ± {half:.2f}"
    print(json.dumps(rows, indent=1) if args.json else tabulate(rows, headers="keys", tablefmt="github"))
    return EXIT_OK


def _export(args: argparse.Namespace) -> int:
    import torch

    from ..lowering.onnx import export_onnx
    from ..serialization import load

    gm = load(args.model)
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    x = torch.randn(*args.input_shape, generator=torch.Generator().manual_seed(0))
    report = export_onnx(gm, (x,), args.output, dtype=dtype, dynamic_batch=args.dynamic_batch, exporter=args.exporter,
                         check_outputs=not args.no_check_outputs, require_2_4=not args.any_pattern)
    print(report)
    return EXIT_OK


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="sgfx: .* left dense")  # the 1-channel first conv; see report
        _, text = run_demo(tuple(args.patterns), tuple(args.methods), args.calib_samples, args.seed)
    print(text)
    return EXIT_OK


# ------------------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    from ..config import METHODS

    parser = argparse.ArgumentParser(prog="sgfx", description="One-shot sparsification of trained CNNs.",
                                     epilog="MODEL: torchvision:NAME, timm:NAME, a .pt2 (torch.export), a TorchScript "
                                            "file, a .sgfx file, or a pickled model with --trust-pickle.")
    parser.add_argument("--version", action="version", version=f"sgfx {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each layer; tracebacks on errors")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sparsify", help="prune a model in one shot on a folder of calibration images")
    p.add_argument("model", help="the model (see MODEL below)")
    _add_model_args(p)
    _add_image_args(p, "--calib", "how many calibration images to draw (default: all; a few hundred are enough)")
    _add_option_flags(p)
    p.add_argument("-o", "--output", required=True, help="the .sgfx file to write")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_sparsify)

    p = sub.add_parser("report", help="print the per-layer report of a .sgfx file")
    p.add_argument("model", help="a .sgfx file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_report)

    p = sub.add_parser("check", help="check that pruned weights follow a pattern (exit 0: yes, 1: no)")
    p.add_argument("model", help="a .sgfx file (its pruned layers) or any model (its prunable layers' weights)")
    _add_model_args(p)
    p.add_argument("--pattern", type=_pattern, required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_check)

    p = sub.add_parser("eval", help="top-1/top-5 accuracy on an ImageFolder tree, beside the dense model if given")
    p.add_argument("model")
    _add_model_args(p)
    p.add_argument("--dense", help="the dense model to compare with (same image transform)")
    _add_model_args(p, "dense-")
    _add_image_args(p, "--data", "how many images to draw (default: all)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_eval)

    p = sub.add_parser("export", help="export a .sgfx model to ONNX for TensorRT and verify its 2:4 layers",
                       description="Export a model saved with sgfx.save to ONNX, check every pruned layer's 2:4 "
                                   "pattern on the exported weights with TensorRT's rules, compare onnxruntime with "
                                   "PyTorch, and print the trtexec command (a --quantize int8 model: QDQ ONNX).")
    p.add_argument("model", help="a .sgfx file")
    p.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    p.add_argument("--input-shape", type=_shape, required=True, help="example input shape, e.g. 1,3,224,224")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    p.add_argument("--dynamic-batch", action="store_true", help="make the batch dimension dynamic")
    p.add_argument("--no-check-outputs", action="store_true", help="skip the onnxruntime comparison")
    p.add_argument("--any-pattern", action="store_true", help="export models not pruned to 2:4 too")
    p.add_argument("--exporter", choices=["auto", "dynamo", "torchscript"], default="auto",
                   help="torch.onnx's exporter: auto (default) uses torch.export and falls back to TorchScript for "
                        "models torch.export refuses")
    p.set_defaults(func=_export)

    p = sub.add_parser("demo", help="train a small CNN on scikit-learn digits and prune it (offline, seconds)")
    p.add_argument("--patterns", type=_pattern, nargs="+", default=["2:4", "1:4"],
                   help='"N:M" or fractions (default: 2:4 1:4)')
    p.add_argument("--methods", nargs="+", choices=METHODS, default=["magnitude", "sparsegpt"])
    p.add_argument("--calib-samples", type=_positive, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ..runtime.allocator import enable_huge_pages

    enable_huge_pages()  # before the first tensor: torch reads the setting once (sgfx.runtime.allocator)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if args.verbose:
        return args.func(args)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"sgfx {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, ImportError, OSError, RuntimeError, MemoryError) as exc:  # one line (-v: traceback)
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"sgfx {args.command}: error: {message}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
