"""`python -m analysis inspect IMAGE ...`: per-image token counts, provenance and predictions."""
from __future__ import annotations

import argparse
import json
import sys

from ..inspect import analyse_images, crop_pct_used
from ..models import load_image, load_model
from ..registry import all_methods
from .common import add_crop_arg, add_method_param_args, add_model_args, make_plan, parse_layers


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("inspect", help="token counts, provenance and top-5 for images", allow_abbrev=False)
    parser.add_argument("images", nargs="+", help="image files (JPEG, PNG, WebP, BMP, TIFF, GIF)")
    add_model_args(parser)
    first = next(iter(all_methods()))
    parser.add_argument("--method", default=first, help=f"none or one of: {', '.join(all_methods())} (default {first})")
    parser.add_argument("--keep-rate", type=float, default=0.7, help="fraction of non-cls tokens kept per stage, in (0, 1] (default 0.7)")
    parser.add_argument("--layers", default=None, help="1-based reducing blocks, e.g. 4,7,10 (default: the method's)")
    add_method_param_args(parser)
    add_crop_arg(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON list with one object per image")
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    plan = make_plan(args, args.method, args.keep_rate, parse_layers(args.layers))
    # Everything that can fail on user input is checked before any model work.
    images = [load_image(path) for path in args.images]
    loaded = load_model(args.model, args.weights, args.device)
    plan.validate(len(loaded.model.blocks))
    crop_pct = crop_pct_used(loaded, args.crop_pct)
    analyses = analyse_images(loaded, images, plan, args.crop_pct)
    records = [analysis.to_json(path, loaded, crop_pct) for path, analysis in zip(args.images, analyses)]
    if args.json:
        json.dump(records, sys.stdout)
        sys.stdout.write("\n")
    else:
        for record in records:
            print(_summary(record))
    return 0


def _summary(record: dict) -> str:
    lines = [
        f"{record['file']}",
        f"  model {record['model']} ({record['weights']}), device {record['device']}, crop {record['crop_pct']}",
        f"  method {record['method']} {record['params']}",
        f"  tokens per block: {' '.join(map(str, record['token_counts']))}",
        f"  GMACs {record['gmacs']:.3f} (dense {record['dense_gmacs']:.3f})",
    ]
    for stage in record["stages"]:
        kinds = {kind: stage["token_kinds"].count(kind) for kind in dict.fromkeys(stage["token_kinds"])}
        dropped = stage["patch_to_token"].count(-1)
        note = f" ({stage['note']})" if stage.get("note") else ""
        lines.append(f"  layer {stage['layer']}: {len(stage['token_kinds'])} tokens {kinds}, {dropped} patches discarded{note}")
    for title, key in (("reduced", "top5"), ("dense", "dense_top5")):
        best = ", ".join(f"{p['label']} {100 * p['prob']:.1f}%" for p in record[key][:3])
        lines.append(f"  {title} top-3: {best}")
    return "\n".join(lines)
