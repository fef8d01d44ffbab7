"""``python -m vecap.report ROOT [--out FILE] [-n N]``: the report without the ``vecap`` CLI."""

from __future__ import annotations

import argparse
import logging
import sys

from vecap.report import build_report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vecap.report", description="Write a dataset root's HTML report.")
    parser.add_argument("root")
    parser.add_argument("--out", default=None, help="HTML file (default: <root>/report.html)")
    parser.add_argument("-n", "--n-samples", type=int, default=48)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.stdout.write(f"{build_report(args.root, args.out, args.n_samples)}\n")


if __name__ == "__main__":
    main()
