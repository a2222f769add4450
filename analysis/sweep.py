"""Accuracy, GMACs, diversity and throughput of every method x keep rate over a labelled folder.

`run_sweep` loads each image batch once (DataLoader workers decode in parallel) and evaluates every
pending setting on it. Throughput is measured per setting: only that setting's engine forward is
timed (wall clock, CUDA synchronised), after an untimed warm-up forward; data loading, accuracy
and diversity bookkeeping are outside the timed region, so `images_per_s` is the model's speed
under that plan on this machine.

Results go to `results.json` (rows with every field, diversity per layer included, and the run's
configuration) and `results.csv` (the scalar columns). A row's `key` identifies its setting
(model, weights, method, keep rate, params, crop, limit, data folder, diversity options); a
rerun with the same output folder skips every finished key, and a pass interrupted midway resumes
from `partial.json`, batch by batch. Everything is deterministic: no shuffling, no sampling.

ToMe has no keep rate: its `r` is matched to each keep rate's budget with
`analysis.methods.tome.r_for_keep_rate` (the constant r whose total token count over the blocks
best matches EViT's selection at that keep rate), and the r used goes into the row's `params`.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
import time
from types import SimpleNamespace
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from .datasets import ImageDataset, collate_skipping, resolve_dataset
from .diversity import diversity_per_block_both
from .engine import ReductionPlan, run
from .gmacs import plan_gmacs
from .methods import METHODS, get_method
from .models import LoadedModel, TokenscopeError, data_config, load_model, make_transform

CSV_COLUMNS = (
    "model", "method", "keep_rate", "params", "top1", "top5", "n_images", "n_skipped", "gmacs", "images_per_s",
    "label", "weights", "dense_gmacs", "gmacs_reduction_pct", "crop_pct", "limit", "device", "diversity_mean",
)
DENSE = "none"


class SweepError(TokenscopeError):
    """A sweep that cannot run: an unknown or unavailable method, a bad keep rate or option."""


@dataclass(frozen=True)
class Setting:
    """One method x keep rate of a sweep.

    Attributes:
        method: registered method name, or "none" (the dense model).
        keep_rate: the keep rate (for ToMe: the keep rate whose budget its r matches).
        plan: the engine plan.
        params: what the row records (ToMe: {"r": ...}; otherwise the plan's explicit parameters).
    """

    method: str
    keep_rate: float
    plan: ReductionPlan
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        return "Dense" if self.method == DENSE else get_method(self.method).label

    def params_dict(self) -> dict[str, Any]:
        return {name: (list(value) if isinstance(value, tuple) else value) for name, value in self.params}


@dataclass
class SweepConfig:
    """What a sweep runs (the CLI flags).

    Attributes:
        data: the dataset folder; labels: optional ground-truth file (flat layout).
        model, weights, device: as `load_model`.
        methods: method names ("none" = dense); keep_rates: each in (0, 1].
        crop_pct: centre-crop fraction (None: the model's timm data config).
        limit: at most this many images (evenly spaced, see `LabelledFiles.subset`).
        batch_size, workers: the DataLoader's.
        out: the output folder (results.json, results.csv, partial.json).
        diversity_centre: "medoid" or "median"; diversity_size_weighted: weight tokens by size.
        diversity_images: r(Z) is averaged over this many images, evenly spaced over the files
            (it costs about as much as the forward pass on a CPU); None = every image.
        tome_schedule: "constant" (one r for every block) or "matched" (a per-block r list).
    """

    data: str
    model: str = "deit_small_patch16_224"
    weights: str = "pretrained"
    methods: tuple[str, ...] = ("evit", "etps", "bat", "dpc", "tome")
    keep_rates: tuple[float, ...] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)
    crop_pct: float | None = None
    limit: int | None = None
    batch_size: int = 64
    workers: int = 2
    out: str = "runs/sweep"
    device: str | None = None
    labels: str | None = None
    diversity_centre: str = "medoid"
    diversity_size_weighted: bool = False
    tome_schedule: str = "constant"
    diversity_images: int | None = 500  # images whose r(Z) is averaged (evenly spaced; None = all)
    checkpoint_every: int | None = None  # batches between partial.json saves (None: about every 256 images)


def tome_r_for(keep_rate: float, depth: int, n0: int, schedule: str = "constant"):
    """ToMe's r at a keep rate's budget (EViT's selection, no fused token, at layers 4, 7, 10)."""
    from .methods.tome import r_for_keep_rate

    try:
        return r_for_keep_rate(keep_rate, depth=depth, n0=n0, layers=(4, 7, 10), fuse=False, schedule=schedule)
    except ValueError as err:
        raise SweepError(f"--tome-schedule: {err}") from None


def build_settings(methods: tuple[str, ...], keep_rates: tuple[float, ...], loaded: LoadedModel,
                   tome_schedule: str = "constant") -> list[Setting]:
    """Every method x keep rate as a `Setting`, validated against the model before any work.

    Raises SweepError for an unknown method (naming the registered ones), a method that cannot run
    with the loaded weights (e.g. dTPS without its predictor), or a keep rate outside (0, 1].
    """
    if not methods:
        raise SweepError("no methods given: pass --methods, e.g. evit,etps,bat,dpc,tome")
    if not keep_rates:
        raise SweepError("no keep rates given: pass --keep-rates, e.g. 1.0,0.9,0.8,0.7,0.6,0.5")
    for rate in keep_rates:
        if not (0.0 < rate <= 1.0) or math.isnan(rate):
            raise SweepError(f"keep rate must be in (0, 1], got {rate}")
    model = loaded.model
    depth = len(model.blocks)
    n0 = model.patch_embed.num_patches + 1
    settings: list[Setting] = []
    for name in dict.fromkeys(methods):
        if name == DENSE:
            settings.append(Setting(DENSE, 1.0, ReductionPlan()))
            continue
        if name not in METHODS:
            raise SweepError(
                f"method {name!r} is not registered (yet): choose from {', '.join(sorted(METHODS))} or 'none' for the dense model")
        reason = get_method(name).unavailable_reason(loaded.extras)
        if reason:
            raise SweepError(f"{get_method(name).label} cannot run in this sweep: {reason}")
        for rate in keep_rates:
            if name == "tome":
                r = tome_r_for(rate, depth, n0, tome_schedule)
                plan = ReductionPlan.make("tome", 1.0, None, r=r)
                settings.append(Setting(name, float(rate), plan, (("r", r),)))
            else:
                plan = ReductionPlan.make(name, rate)
                settings.append(Setting(name, float(rate), plan, plan.params))
            settings[-1].plan.validate(depth)
    return settings


def setting_key(config: SweepConfig, setting: Setting, data_root: Path) -> str:
    """The identity of a finished row (what resuming compares)."""
    payload = {
        "model": config.model, "weights": config.weights, "method": setting.method, "keep_rate": round(setting.keep_rate, 9),
        "params": setting.params_dict(), "crop_pct": config.crop_pct, "limit": config.limit, "data": str(data_root),
        "labels": config.labels, "centre": config.diversity_centre, "size_weighted": config.diversity_size_weighted,
        "diversity_images": config.diversity_images,
    }
    return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class _Tally:
    correct1: int = 0
    correct5: int = 0
    seen: int = 0
    seconds: float = 0.0
    timed: int = 0
    batches: int = 0
    diversity_seen: int = 0
    diversity: list[float] = field(default_factory=list)
    diversity_per_token: list[float] = field(default_factory=list)
    token_counts: list[int] = field(default_factory=list)

    def add_diversity(self, raw: np.ndarray, per_token: np.ndarray) -> None:
        if raw.shape[0] == 0:
            return
        self.diversity_seen += raw.shape[0]
        sums, sums_pt = raw.sum(0), per_token.sum(0)
        if not self.diversity:
            self.diversity, self.diversity_per_token = sums.tolist(), sums_pt.tolist()
        else:
            self.diversity = (np.asarray(self.diversity) + sums).tolist()
            self.diversity_per_token = (np.asarray(self.diversity_per_token) + sums_pt).tolist()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SweepError(f"{path} cannot be read as JSON ({err}); move it away or pick another --out folder") from None


def load_results(path: str | Path) -> dict[str, Any]:
    """Read a sweep's results: `results.json` or a folder holding it. Returns {"config", "rows"}.

    Raises SweepError when the file is missing or is not a tokenscope results file."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise SweepError(f"no results file at {path}: run `python -m analysis sweep ... --out DIR` first, or give the path of a results.json")
    return validate_results(_read_json(path), str(path))


def validate_results(content: Any, source: str = "the results file") -> dict[str, Any]:
    """Check parsed results.json content (e.g. an upload) and return it with a `config` entry.

    Raises SweepError naming what is missing."""
    if not isinstance(content, dict) or not isinstance(content.get("rows"), list):
        raise SweepError(f"{source} is not a tokenscope results file (it has no 'rows' list): give the results.json a sweep wrote")
    required = {"model", "method", "keep_rate", "top1", "gmacs"}
    for row in content["rows"]:
        if not isinstance(row, dict) or not required <= set(row):
            raise SweepError(f"{source} has a row without {', '.join(sorted(required))}: is it a tokenscope results file?")
    if not isinstance(content.get("config"), dict):
        content["config"] = {}
    return content


def _write_results(out: Path, config: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    order = {name: index for index, name in enumerate(config.get("methods", []))}
    rows = sorted(rows, key=lambda r: (r["model"], order.get(r["method"], 99), r["method"], -r["keep_rate"]))
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps({"config": config, "rows": rows}, indent=1))
    os.replace(tmp, out / "results.json")
    with open(out / "results.csv.tmp", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "params": json.dumps(row["params"], sort_keys=True)})
    os.replace(out / "results.csv.tmp", out / "results.csv")


def _topk_correct(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices.cpu()
    hits = top5 == labels.unsqueeze(1)
    return int(hits[:, 0].sum()), int(hits.any(1).sum())


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@dataclass
class SweepOutcome:
    """What `run_sweep` produced: all rows of the output folder, and how many settings ran now."""

    rows: list[dict[str, Any]]
    config: dict[str, Any]
    ran: int
    skipped_settings: int
    out: Path


def run_sweep(
    config: SweepConfig,
    loaded: LoadedModel | None = None,
    progress: Callable[[float, str], None] | None = None,
    show_bar: bool = True,
) -> SweepOutcome:
    """Run (or resume) a sweep and write results.json / results.csv into `config.out`.

    Args:
        config: what to run.
        loaded: an already loaded model (the app's cached one); else `load_model` from the config.
        progress: optional callback (fraction done in [0, 1], message), e.g. for st.progress.
        show_bar: draw a tqdm bar on stderr.
    Returns:
        a `SweepOutcome`.
    Raises:
        SweepError / DatasetError / PlanError / WeightsError with one-line reasons, before any model
        work where possible.
    """
    from tqdm.auto import tqdm

    files = resolve_dataset(config.data, config.labels).subset(config.limit)
    if config.batch_size < 1:
        raise SweepError(f"--batch-size must be at least 1, got {config.batch_size}")
    if config.workers < 0:
        raise SweepError(f"--workers must be 0 or more, got {config.workers}")
    if config.diversity_centre not in ("medoid", "median"):
        raise SweepError(f"diversity centre must be medoid or median, got {config.diversity_centre!r}")
    if loaded is None:
        loaded = load_model(config.model, config.weights, config.device)
    # the loaded model is the truth (the app passes its cached one); the caller's config is not modified
    config = dataclasses.replace(config, model=loaded.name, weights=loaded.weights, device=loaded.device)
    model = loaded.model
    dconfig = data_config(model, config.crop_pct)
    settings = build_settings(tuple(config.methods), tuple(config.keep_rates), loaded, config.tome_schedule)

    out = Path(config.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    root = files.root.resolve()
    run_config = {
        "data": str(root), "layout": files.layout, "labels": str(files.ground_truth) if files.ground_truth else None,
        "model": loaded.name, "weights": loaded.weights, "weights_label": loaded.weights_label, "is_random": loaded.is_random,
        "device": loaded.device, "methods": list(dict.fromkeys(config.methods)), "keep_rates": list(config.keep_rates),
        "crop_pct": dconfig["crop_pct"], "crop_pct_requested": config.crop_pct, "data_config": {
            k: (list(v) if isinstance(v, tuple) else v) for k, v in dconfig.items()},
        "limit": config.limit, "batch_size": config.batch_size, "workers": config.workers, "n_files": len(files),
        "diversity_centre": config.diversity_centre, "diversity_size_weighted": config.diversity_size_weighted,
        "diversity_images": config.diversity_images, "tome_schedule": config.tome_schedule, "torch_threads": torch.get_num_threads(),
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "timing": "images_per_s: engine forward only (track=False, block outputs kept for diversity), after one untimed warm-up "
                  "forward per setting; data loading, accuracy and diversity bookkeeping are not timed",
    }
    previous: list[dict[str, Any]] = []
    if (out / "results.json").exists():
        previous = load_results(out)["rows"]
    done = {row.get("key") for row in previous}
    keys = {setting: setting_key(config, setting, root) for setting in settings}
    pending = [s for s in settings if keys[s] not in done]
    if not pending:
        _write_results(out, run_config, previous)
        if progress:
            progress(1.0, "every setting was already done")
        return SweepOutcome(previous, run_config, 0, len(settings), out)

    # Resume a pass that was interrupted: tallies of the batches already counted.
    partial_path = out / "partial.json"
    tallies: dict[Setting, _Tally] = {s: _Tally() for s in pending}
    skipped: list[str] = []
    if partial_path.exists():
        state = _read_json(partial_path)
        if state.get("batch_size") == config.batch_size and state.get("n_files") == len(files):
            for setting in pending:
                saved = state.get("tallies", {}).get(keys[setting])
                if saved:
                    tallies[setting] = _Tally(**saved)
            skipped = list(state.get("skipped", []))
    start_batch = min(t.batches for t in tallies.values())
    if start_batch == 0:
        skipped = []  # the pass restarts at the first batch and records the skipped files again

    n_diversity = len(files) if config.diversity_images is None else min(len(files), max(0, config.diversity_images))
    diversity_indices = torch.from_numpy(np.unique(np.linspace(0, len(files) - 1, n_diversity).round().astype(np.int64))) \
        if n_diversity else torch.empty(0, dtype=torch.long)
    transform = make_transform(model, config.crop_pct)
    dataset = ImageDataset(files, transform)
    first_index = start_batch * config.batch_size
    sampler = range(first_index, len(files))
    loader = DataLoader(dataset, batch_size=config.batch_size, sampler=sampler, num_workers=config.workers,
                        collate_fn=collate_skipping, prefetch_factor=4 if config.workers else None)
    total = len(files)
    bar = tqdm(total=total, initial=first_index, unit="img", desc=f"sweep {len(pending)} settings", disable=not show_bar)
    warmed: set[Setting] = set()
    device = loaded.device
    batch_index = start_batch
    checkpoint_every = config.checkpoint_every or max(1, 256 // config.batch_size)
    for batch in loader:
        if batch.skipped:
            skipped.extend(batch.skipped)
        if batch.images.numel():
            images = batch.images.to(device)
            for setting in pending:
                tally = tallies[setting]
                if tally.batches > batch_index:
                    continue  # already counted before an interruption
                if setting not in warmed:
                    run(model, images[: min(4, len(images))], setting.plan, extras=loaded.extras, track=False)
                    warmed.add(setting)
                _sync(device)
                started = time.perf_counter()
                result = run(model, images, setting.plan, extras=loaded.extras, track=False, keep_block_outputs=True)
                _sync(device)
                tally.seconds += time.perf_counter() - started
                tally.timed += len(images)
                c1, c5 = _topk_correct(result.logits, batch.labels)
                tally.correct1 += c1
                tally.correct5 += c5
                tally.seen += len(images)
                tally.token_counts = result.token_counts
                chosen = torch.isin(batch.indices, diversity_indices).to(device)
                if chosen.any():
                    subset = SimpleNamespace(block_outputs=[o[chosen] for o in result.block_outputs],
                                             block_sizes=[z[chosen] for z in result.block_sizes])
                    raw, per_token = diversity_per_block_both(subset, config.diversity_centre, config.diversity_size_weighted)
                    tally.add_diversity(raw, per_token)
        for setting in pending:
            tallies[setting].batches = max(tallies[setting].batches, batch_index + 1)
        batch_index += 1
        bar.update(len(batch.indices) + len(batch.skipped))
        if batch_index % checkpoint_every == 0:
            state = {"batch_size": config.batch_size, "n_files": len(files), "skipped": skipped,
                     "tallies": {keys[s]: vars(t) for s, t in tallies.items()}}
            tmp = out / "partial.json.tmp"
            tmp.write_text(json.dumps(state))
            os.replace(tmp, partial_path)
        if progress:
            progress(min(1.0, bar.n / max(total, 1)), f"{bar.n}/{total} images, {len(pending)} settings")
    bar.close()
    if all(tally.seen == 0 for tally in tallies.values()):
        example = skipped[0] if skipped else "no file was loaded"
        raise SweepError(f"none of the {len(files)} images in {root} could be read (e.g. {example}); check the folder")

    rows = [row for row in previous if row.get("key") not in {keys[s] for s in pending}]
    # GMACs from the token counts the pass observed (a dummy forward only for a setting that never ran).
    gmacs = {s: plan_gmacs(model, s.plan, loaded.extras, tallies[s].token_counts or None) for s in pending}
    dense_gmacs = plan_gmacs(model, ReductionPlan())
    for setting in pending:
        tally = tallies[setting]
        seen = max(tally.seen, 1)
        div_seen = max(tally.diversity_seen, 1)
        diversity = (np.asarray(tally.diversity) / div_seen).tolist() if tally.diversity else []
        diversity_pt = (np.asarray(tally.diversity_per_token) / div_seen).tolist() if tally.diversity_per_token else []
        depth = len(model.blocks)
        rows.append({
            "key": keys[setting],
            "model": loaded.name,
            "weights": loaded.weights_label,
            "method": setting.method,
            "label": setting.label,
            "keep_rate": setting.keep_rate,
            "params": setting.params_dict(),
            "top1": 100.0 * tally.correct1 / seen if tally.seen else float("nan"),
            "top5": 100.0 * tally.correct5 / seen if tally.seen else float("nan"),
            "n_images": tally.seen,
            "n_skipped": len(skipped),
            "skipped_files": skipped[:50],
            "gmacs": gmacs[setting],
            "dense_gmacs": dense_gmacs,
            "gmacs_reduction_pct": 100.0 * (1.0 - gmacs[setting] / dense_gmacs),
            "images_per_s": tally.timed / tally.seconds if tally.seconds > 0 else float("nan"),
            "seconds": tally.seconds,
            "token_counts": tally.token_counts,
            "reducing_layers": list(setting.plan.reducing_layers(depth)),
            "diversity": diversity,
            "diversity_per_token": diversity_pt,
            "diversity_mean": float(np.mean(diversity)) if diversity else float("nan"),
            "diversity_images": tally.diversity_seen,
            "diversity_centre": config.diversity_centre,
            "diversity_size_weighted": config.diversity_size_weighted,
            "crop_pct": dconfig["crop_pct"],
            "limit": config.limit,
            "data": str(root),
            "device": device,
            "batch_size": config.batch_size,
        })
    _write_results(out, run_config, rows)
    if partial_path.exists():
        partial_path.unlink()
    if progress:
        progress(1.0, f"done: {len(pending)} settings on {total} images")
    return SweepOutcome(load_results(out)["rows"], run_config, len(pending), len(settings) - len(pending), out)
