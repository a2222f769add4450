"""`python -m analysis figures --results DIR --out DIR`: paper-style figures (PDF, SVG, 300-dpi PNG) and the table."""
from __future__ import annotations

import argparse
import sys

from ..figures import write_figures


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("figures", help="paper-style figures and the results table from a sweep")
    parser.add_argument("--results", required=True, help="a sweep's output folder or its results.json")
    parser.add_argument("--out", required=True, help="folder for the figures and tables")
    parser.add_argument("--images", nargs="+", default=None, help="photos (files or folders) for the comparison grid (default: the sweep's data folder)")
    parser.add_argument("--n-images", type=int, default=4, help="rows of the comparison grid (default 4)")
    parser.add_argument("--keep-rate", type=float, default=None, help="keep rate of the diversity and grid figures (default: nearest 0.7)")
    parser.add_argument("--model", default=None, help="which model's rows, when the results hold several")
    parser.add_argument("--per-token", action="store_true", help="plot r(Z) per token instead of the total")
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    outcome = write_figures(args.results, args.out, images=args.images, keep_rate=args.keep_rate, n_images=args.n_images,
                            model=args.model, per_token=args.per_token)
    for path in outcome["written"]:
        print(path)
    for name, reason in outcome["skipped"].items():
        print(f"skipped {name}: {reason}", file=sys.stderr)
    for reason in outcome["skipped_images"]:
        print(f"skipped image {reason}", file=sys.stderr)
    return 0
