"""Command line: ``selkernels bench`` (benchmarks) and ``selkernels demo`` (training demo)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    from . import bench, demo

    parser = argparse.ArgumentParser(prog="selkernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bench.add_arguments(
        sub.add_parser(
            "bench",
            help="time the fused ops against the references and torch",
            description=bench.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    demo.add_arguments(
        sub.add_parser(
            "demo",
            help="train a small CNN on scikit-learn digits with the selectivity regularizer at several alphas",
            description=demo.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        from . import bench

        return bench.main(args=args)
    from . import demo

    return demo.main(args=args)


if __name__ == "__main__":
    raise SystemExit(main())
