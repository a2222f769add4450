"""`python -m analysis sweep --data DIR ...`: top-1/top-5, GMACs, diversity and throughput per method x keep rate.

Launched by `torchrun --nproc_per_node N -m analysis sweep ...` it runs on N processes (gloo on the
CPU, NCCL with one GPU per process) and rank 0 writes the same results as one process would."""
from __future__ import annotations

import argparse
import sys

from ..distributed import World
from ..errors import SweepError
from ..lists import comma_list
from ..sweep import SweepConfig, default_methods, run_sweep
from .common import add_crop_arg, add_method_param_args, add_model_args, method_params_from_args

DEFAULT_KEEP_RATES = "1.0,0.9,0.8,0.7,0.6,0.5"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("sweep", help="accuracy, GMACs, diversity and throughput per method and keep rate over a labelled folder",
                                   description="A method parameter given a comma list (e.g. --seed 0,1,2) runs one setting per value; "
                                               "the figures and table average the values of a seed-like parameter.",
                                   allow_abbrev=False)
    parser.add_argument("--data", required=True, help="ImageNet-style folder: WordNet-id folders, index folders, flat images + a 'filename index' file, "
                             "or tar shards read in place (a .tar, a folder of them, or a pattern such as 'val-{000000..000049}.tar')")
    parser.add_argument("--labels", default=None, help="ground-truth file of 'filename index' lines for a flat folder (default: found in --data)")
    add_model_args(parser)
    defaults = ",".join(default_methods())
    parser.add_argument("--methods", default=defaults, help=f"comma list of methods ('none' = dense) (default {defaults})")
    parser.add_argument("--keep-rates", default=DEFAULT_KEEP_RATES,
                        help=f"comma list of keep rates in (0, 1]; a method without a keep rate (ToMe) meets each one's token budget "
                             f"(default {DEFAULT_KEEP_RATES})")
    add_crop_arg(parser)
    parser.add_argument("--limit", type=int, default=None, help="at most N images, evenly spaced over the sorted files")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes decoding images (default 2)")
    parser.add_argument("--out", default="runs/sweep", help="output folder for results.json and results.csv (default runs/sweep)")
    parser.add_argument("--diversity-centre", default="medoid", choices=("medoid", "median"), help="centre of r(Z): medoid (BAT's) or channel-wise median")
    parser.add_argument("--diversity-size-weighted", action="store_true", help="weight each token by the patches it holds in r(Z)")
    parser.add_argument("--diversity-images", type=int, default=500, help="average r(Z) over this many images, evenly spaced (0 = none; default 500)")
    parser.add_argument("--budget-schedule", "--tome-schedule", dest="budget_schedule", default="constant", choices=("constant", "matched"),
                        help="how a method with its own budget parameter (ToMe's r) meets each keep rate's token budget: one constant value, "
                             "or one per block (default constant)")
    parser.add_argument("--figures", default=None, metavar="DIR", help="also write the paper figures and table there (as `figures --results OUT --out DIR`)")
    parser.add_argument("--patterns", action="store_true",
                        help="also the dataset-level analysis: keep frequency and survival depth per patch, agreement between methods "
                             "at equal keep rate, fidelity to the dense model (then `python -m analysis compare OUT --out DIR`)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_method_param_args(parser)
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    methods = tuple(comma_list(args.methods, str, "--methods", SweepError))
    params = {name: method_params_from_args(args, name, methods, many=True) for name in methods if name != "none"}
    config = SweepConfig(
        data=args.data, labels=args.labels, model=args.model, weights=args.weights, device=args.device,
        methods=methods, method_params={name: values for name, values in params.items() if values},
        keep_rates=tuple(comma_list(args.keep_rates, float, "--keep-rates", SweepError, "1.0,0.9,0.7")),
        crop_pct=args.crop_pct, limit=args.limit, batch_size=args.batch_size, workers=args.workers, out=args.out,
        diversity_centre=args.diversity_centre, diversity_size_weighted=args.diversity_size_weighted,
        budget_schedule=args.budget_schedule, diversity_images=args.diversity_images, patterns=args.patterns,
    )
    world = World.from_env(args.device)  # torchrun: join its process group; else one process
    try:
        outcome = run_sweep(config, show_bar=not args.quiet, world=world)
    finally:
        world.close()
    if not world.is_main:
        return 0  # rank 0 reports and writes the figures
    skipped = next((row.get("skipped_files") for row in outcome.rows if row.get("skipped_files")), [])
    for reason in skipped[:20]:
        print(f"skipped unreadable image {reason}", file=sys.stderr)
    if len(skipped) > 20:
        print(f"... and {len(skipped) - 20} more unreadable images (results.json lists the first 50)", file=sys.stderr)
    rows = [r for r in outcome.rows if r.get("model") == outcome.config["model"]]
    if outcome.config.get("is_random"):
        print("WARNING: random weights: accuracies are meaningless", file=sys.stderr)
    print(f"{outcome.ran} settings run, {outcome.skipped_settings} already done; results in {outcome.out}/results.json and results.csv")
    print(f"{'method':<38}{'keep':>6}  {'params':<18}{'top1':>7}{'top5':>7}{'GMACs':>7}{'img/s':>9}  n (skipped)")
    for row in rows:
        params = ",".join(f"{k}={v}" for k, v in row["params"].items())
        print(f"{row['label']:<38}{row['keep_rate']:>6.2f}  {params:<18}{row['top1']:>7.2f}{row['top5']:>7.2f}{row['gmacs']:>7.2f}"
              f"{row['images_per_s']:>9.1f}  {row['n_images']} ({row['n_skipped']})")
    notes = sorted({row["timing_note"] for row in rows if row.get("timing_note")})
    for note in notes:
        print(f"WARNING: {note}", file=sys.stderr)
    if args.figures:
        from ..figures import write_figures

        figures = write_figures(outcome.out, args.figures, model=outcome.config["model"])
        print(f"{len(figures['written'])} figure and table files in {args.figures}")
        for name, reason in figures["skipped"].items():
            print(f"skipped {name}: {reason}", file=sys.stderr)
        for reason in figures["skipped_images"]:
            print(f"skipped image {reason}", file=sys.stderr)
    return 0
