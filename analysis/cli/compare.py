"""`python -m analysis compare RESULTS_DIR --out DIR`: the dataset-level analysis of a `sweep --patterns`
as tables (CSV, Markdown, LaTeX) and figures (PDF, SVG, 300-dpi PNG); see analysis/compare.py."""
from __future__ import annotations

import argparse
import sys

from ..compare import write_compare


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("compare", help="keep-frequency maps, agreement, map similarity, fidelity and correlation "
                                                   "tables and figures from a sweep run with --patterns", allow_abbrev=False)
    parser.add_argument("results", help="a sweep's output folder or its results.json (run with --patterns)")
    parser.add_argument("--out", required=True, help="folder for the tables and figures")
    parser.add_argument("--keep-rate", type=float, default=None, help="keep rate of the single-rate figures (default: nearest 0.7)")
    parser.add_argument("--model", default=None, help="which model's rows, when the results hold several")
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    outcome = write_compare(args.results, args.out, keep_rate=args.keep_rate, model=args.model)
    for path in outcome["written"]:
        print(path)
    for name, reason in outcome["skipped"].items():
        print(f"skipped {name}: {reason}", file=sys.stderr)
    return 0
