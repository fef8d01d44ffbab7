"""``python -m bench [--quick] [--sections io,driver,...]`` (``make bench``): see :mod:`bench.suite`."""

from __future__ import annotations

import argparse
import logging
import sys

from bench.context import RESULTS, SECTIONS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="vecap's CPU benchmarks, side by side on the same "
        "inputs; results to bench/results/results.{json,md}. "
        "The GPU script is separate: python -m bench.gpu",
    )
    p.add_argument(
        "--quick", action="store_true", help="small sizes, one repetition (~12 min on 2 cores; the full run ~30)"
    )
    p.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated subset of: {', '.join(SECTIONS)} (default: all)",
    )
    p.add_argument("--out", default=str(RESULTS), help="results folder (default: %(default)s)")
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        p.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from bench.suite import main as run

    return run(quick=args.quick, sections=args.sections, out_dir=args.out)


if __name__ == "__main__":
    sys.exit(main())
