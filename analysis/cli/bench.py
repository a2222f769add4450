"""`python -m analysis bench`: images/s and latency of the dense and the reduced models; writes results.csv."""
from __future__ import annotations

import argparse
import sys

from ..bench import PRECISIONS, BenchConfig, contention_note, make_settings, parse_list, run_benchmark, write_csv
from ..models import load_model
from .common import add_method_param_args, add_model_args, method_params_from_args


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", allow_abbrev=False, help="throughput (images/s, latency) of the dense and reduced models on random input",
        description="Times engine forwards (provenance off, inference mode) on seeded random input; every setting "
                    "is timed in interleaved rounds; reports the median with the IQR and min/max; writes DIR/results.csv.")
    add_model_args(parser)
    parser.add_argument("--methods", default="none,evit", help="comma list: none and registered methods (default none,evit); the dense model is always timed")
    parser.add_argument("--keep-rates", default="0.7,0.5", help="comma list of keep rates for keep-rate methods (default 0.7,0.5)")
    parser.add_argument("--r", default=None,
                        help="comma list of r values (tokens merged per block), one setting each, for the methods without a keep rate "
                             "that have an r parameter (ToMe); default: every method without a keep rate at each keep rate's budget")
    parser.add_argument("--batch-sizes", default="1,32", help="comma list of batch sizes (default 1,32)")
    parser.add_argument("--amp", action="store_true", help="autocast: float16 on cuda, bfloat16 on cpu (same as --precision amp-fp16 / amp-bf16)")
    parser.add_argument("--precision", default=None, choices=PRECISIONS,
                        help="float32; amp-fp16 / amp-bf16: torch.autocast; half-fp16 / half-bf16: a converted copy of the model (pure half)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the dense model and every setting whose token counts do not depend on the input; "
                             "records compile time, graphs and recompiles (settings with per-image counts are flagged and run uncompiled)")
    parser.add_argument("--no-memory", action="store_true", help="do not record peak memory per setting")
    parser.add_argument("--no-sdpa", action="store_true", help="do not record which attention kernel ran")
    parser.add_argument("--no-oom-halving", action="store_true", help="on CUDA, fail instead of halving a batch size that runs out of memory")
    parser.add_argument("--prop-attn", default="default", choices=("default", "both"),
                        help="both: time every method that has a prop_attn parameter with proportional attention on and off "
                             "(its float mask rules out flash attention)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's, here the core count)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per setting and batch size (default 2)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per setting and batch size, interleaved (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random input (default 0)")
    parser.add_argument("--provenance", action="store_true", help="also time each reduced setting with provenance tracking on and print its overhead")
    parser.add_argument("--bound", action="store_true",
                        help="also time each reduced setting's token-count twin (the same token counts by plain truncation, no method "
                             "work) and print the speedup the counts alone allow and the method's own overhead")
    parser.add_argument("--allocator", default="system", choices=("system", "steady"),
                        help="system: the C library's malloc as is; steady: glibc keeps freed memory (no mmap, no trim), so forwards "
                             "take no page faults and results do not depend on the order of runs (see analysis/bench.py)")
    parser.add_argument("--out", required=True, help="folder for results.csv")
    add_method_param_args(parser)
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    # Everything that can fail on user input is checked before the model loads.
    methods = parse_list(args.methods, str, "--methods")
    params = {name: method_params_from_args(args, name, methods) for name in methods if name not in ("none", "dense")}
    keep_rates = parse_list(args.keep_rates, float, "--keep-rates")
    r_values = None if args.r is None else parse_list(args.r, int, "--r")
    make_settings(methods, keep_rates, r_values, method_params=params, prop_attn_both=args.prop_attn == "both")
    config = BenchConfig(batch_sizes=tuple(parse_list(args.batch_sizes, int, "--batch-sizes")), warmup=args.warmup,
                         repeats=args.repeats, amp=args.amp, threads=args.threads, seed=args.seed, provenance=args.provenance,
                         allocator=args.allocator, bound=args.bound, precision=args.precision, compile=args.compile,
                         memory=not args.no_memory, sdpa=not args.no_sdpa, oom_halving=not args.no_oom_halving)
    config.validate()
    loaded = load_model(args.model, args.weights, args.device)
    settings = make_settings(methods, keep_rates, r_values, len(loaded.model.blocks), loaded.model.patch_embed.num_patches + 1, params,
                             prop_attn_both=args.prop_attn == "both")
    print(f"# {loaded.name}, weights {loaded.weights_label}, device {loaded.device}; "
          f"{len(settings)} settings x {len(config.batch_sizes)} batch sizes, {config.warmup} warm-up + {config.repeats} timed calls each, "
          f"interleaved; median with IQR and min/max; allocator {config.allocator}", flush=True)

    def progress(fraction: float, text: str) -> None:
        sys.stderr.write(f"\r[{100 * fraction:5.1f}%] {text:<60}")
        sys.stderr.flush()

    rows = run_benchmark(loaded, settings, config, progress=progress if sys.stderr.isatty() else None)
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    for row in rows:
        print(row.describe())
    note = contention_note(rows)
    if note:
        print(f"# WARNING: {note}")
    path = write_csv(rows, args.out)
    print(f"# wrote {path}")
    return 0
