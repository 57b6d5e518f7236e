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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
