"""The ``sgfx`` console command."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="sgfx: .* left dense")  # the 1-channel first conv; see report
        _, table = run_demo(args.pattern, tuple(args.methods), args.calib_samples, args.seed)
    print(table)
    return 0


def _export(args: argparse.Namespace) -> int:
    import torch

    from .lowering.onnx import export_onnx
    from .serialization import load

    gm = load(args.model)
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    x = torch.randn(*args.input_shape, generator=torch.Generator().manual_seed(0))
    report = export_onnx(gm, (x,), args.output, dtype=dtype, dynamic_batch=args.dynamic_batch,
                         check_outputs=not args.no_check_outputs, require_2_4=not args.any_pattern)
    print(report)
    return 0


def _shape(text: str) -> tuple[int, ...]:
    """argparse type: "1,3,224,224"."""
    try:
        shape = tuple(int(d) for d in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise argparse.ArgumentTypeError(f"expected positive sizes such as 1,3,224,224, got {text!r}")
    return shape


def _pattern(text: str):
    """argparse type: "N:M" or a fraction, validated like sgfx.sparsify does."""
    from .config import parse_pattern

    try:
        return parse_pattern(float(text))
    except ValueError:
        pass
    try:
        return parse_pattern(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    from . import __version__

    parser = argparse.ArgumentParser(prog="sgfx", description="One-shot sparsification of trained CNNs.")
    parser.add_argument("--version", action="version", version=f"sgfx {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each layer as it is pruned")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small CNN on scikit-learn digits and prune it (offline, seconds)")
    demo.add_argument("--pattern", type=_pattern, default="2:4", help='"N:M" or a fraction such as 0.5 (default 2:4)')
    demo.add_argument("--methods", nargs="+", default=["magnitude", "sparsegpt"])
    demo.add_argument("--calib-samples", type=int, default=256)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    export = sub.add_parser("export", help="export a .sgfx model to ONNX for TensorRT and verify its 2:4 layers",
                            description="Export a model saved with sgfx.save to ONNX, check every pruned layer's "
                                        "2:4 pattern on the exported weights with TensorRT's rules, compare "
                                        "onnxruntime with PyTorch, and print the trtexec command.")
    export.add_argument("model", help="a .sgfx file (sgfx.save)")
    export.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    export.add_argument("--input-shape", type=_shape, required=True, help="example input shape, e.g. 1,3,224,224")
    export.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    export.add_argument("--dynamic-batch", action="store_true", help="make the batch dimension dynamic")
    export.add_argument("--no-check-outputs", action="store_true", help="skip the onnxruntime comparison")
    export.add_argument("--any-pattern", action="store_true", help="export models not pruned to 2:4 too")
    export.set_defaults(func=_export)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if args.verbose:
        return args.func(args)
    try:
        return args.func(args)
    except (ValueError, TypeError, ImportError, OSError, RuntimeError) as exc:  # one line, no traceback (-v shows it)
        print(f"sgfx {args.command}: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
