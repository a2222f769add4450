"""`python -m analysis inspect IMAGE ...`: per-image token counts, provenance and predictions."""
from __future__ import annotations

import argparse
import json
import sys

from ..diversity import diversity_per_block
from ..gmacs import gmacs_report
from ..inspect import inspect_batch, plan_params, stage_records, top_k
from ..methods import METHODS
from ..models import load_image, load_model, data_config
from .common import add_crop_arg, add_method_param_args, add_model_args, make_plan, method_params_from_args, parse_layers


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("inspect", help="token counts, provenance and top-5 for images")
    parser.add_argument("images", nargs="+", help="image files (JPEG, PNG, WebP, BMP, TIFF, GIF)")
    add_model_args(parser)
    parser.add_argument("--method", default="evit", help=f"none or one of: {', '.join(sorted(METHODS))} (default evit)")
    parser.add_argument("--keep-rate", type=float, default=0.7, help="fraction of non-cls tokens kept per stage, in (0, 1] (default 0.7)")
    parser.add_argument("--layers", default=None, help="1-based reducing blocks, e.g. 4,7,10 (default: the method's)")
    add_method_param_args(parser)
    add_crop_arg(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON list with one object per image")
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    params = method_params_from_args(args, args.method)
    plan = make_plan(args.method, args.keep_rate, parse_layers(args.layers), params)
    # Everything that can fail on user input is checked before any model work.
    images = [load_image(path) for path in args.images]
    loaded = load_model(args.model, args.weights, args.device)
    depth = len(loaded.model.blocks)
    plan.validate(depth)
    config = data_config(loaded.model, args.crop_pct)
    inspection = inspect_batch(loaded, images, plan, args.crop_pct)
    reduced_top5 = top_k(inspection.reduced.logits)
    dense_top5 = top_k(inspection.dense.logits)
    diversity = diversity_per_block(inspection.reduced)  # [B, depth], l1 medoid (methods.md §5)
    cost = gmacs_report(loaded.model, plan, loaded.extras, inspection.reduced.token_counts)
    records = []
    for index, path in enumerate(args.images):
        records.append({
            "file": path,
            "model": loaded.name,
            "weights": loaded.weights_label,
            "method": plan.method,
            "params": plan_params(plan, depth),
            "device": loaded.device,
            "crop_pct": config["crop_pct"],
            "token_counts": inspection.reduced.token_counts,
            "stages": stage_records(inspection.reduced, index),
            "top5": reduced_top5[index],
            "dense_top5": dense_top5[index],
            "diversity": [round(float(value), 6) for value in diversity[index]],
            "gmacs": round(cost["gmacs"], 6),
            "dense_gmacs": round(cost["dense_gmacs"], 6),
        })
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
        lines.append(f"  layer {stage['layer']}: {len(stage['token_kinds'])} tokens {kinds}, {dropped} patches discarded")
    for title, key in (("reduced", "top5"), ("dense", "dense_top5")):
        best = ", ".join(f"{p['label']} {100 * p['prob']:.1f}%" for p in record[key][:3])
        lines.append(f"  {title} top-3: {best}")
    return "\n".join(lines)
