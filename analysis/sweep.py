"""Accuracy, GMACs, diversity and throughput of every method x keep rate over a labelled folder.

A sweep is three parts:
1. **Batch iteration** (`run_sweep`'s loop): each image batch is loaded once, by the one DataLoader
   helper (`datasets.make_loader`), and every pending setting runs on it. Only the setting's engine
   forward is timed (wall clock, CUDA synchronised), after an untimed warm-up forward.
2. **Accumulators**, one set per setting (`Accumulator`: `update(observation)`, `merge(other)`,
   `row()`, `state()`): accuracy, timing, diversity and token counts. They keep sums and counts,
   never means, so `merge` is exact: two halves of a folder merged give the whole folder's row.
   A new measure is a new accumulator in `ACCUMULATORS`; the loop does not change.
3. **Resume and writing**: `results.json` (every field of a `SweepRow`, and the run's
   configuration) and `results.csv` (the `CSV_COLUMNS`, derived from `SweepRow`'s fields). A row's
   `key` identifies its setting; a rerun with the same output folder skips finished keys, and a pass
   interrupted midway resumes from `partial.json` (the accumulators' states), batch by batch.

Every method meets each keep rate's budget through its own `Method.budget` (keep-rate methods run
at that keep rate; ToMe picks the r whose token budget matches); the plan's explicit parameters go
into the row's `params`. Everything is deterministic: no shuffling, no sampling.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import itertools
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import torch

from .datasets import Batch, LabelledFiles, make_loader, resolve_dataset
from .distributed import World
from .diversity import diversity_of_blocks
from .engine import Result, method_unavailable, run
from .errors import SweepError
from .gmacs import plan_gmacs
from .models import LoadedModel, data_config, load_model, make_transform
from .plan import DENSE, ReductionPlan
from .registry import all_methods, get_method

SCHEDULES = ("constant", "matched")


def default_methods() -> tuple[str, ...]:
    """A sweep's default methods: the registered methods marked `in_default_sweep`."""
    return tuple(name for name, method in all_methods().items() if method.in_default_sweep)


@dataclass(frozen=True)
class Setting:
    """One method x keep rate of a sweep.

    Attributes:
        method: registered method name, or "none" (the dense model).
        keep_rate: the keep rate whose budget the setting meets.
        plan: the engine plan (`Method.budget` at that keep rate, plus the user's parameters).
    """

    method: str
    keep_rate: float
    plan: ReductionPlan

    @property
    def label(self) -> str:
        return "Dense" if self.method == DENSE else get_method(self.method).label

    @property
    def params(self) -> tuple[tuple[str, Any], ...]:
        """What the row records as `params`: the plan's explicitly set parameters."""
        return self.plan.params

    def params_dict(self) -> dict[str, Any]:
        return {name: (list(value) if isinstance(value, tuple) else value) for name, value in self.params}


@dataclass
class SweepConfig:
    """What a sweep runs (the CLI flags).

    Attributes:
        data: the dataset folder; labels: optional ground-truth file (flat layout).
        model, weights, device: as `load_model`.
        methods: method names ("none" = dense); keep_rates: each in (0, 1].
        method_params: per method, parameters set by the user ({"bat": {"beta": 0.3}}); a list
            for a parameter that is not itself a list (`int_list`) runs one setting per value
            ({"rand": {"seed": [0, 1, 2]}}; several lists: every combination).
        crop_pct: centre-crop fraction (None: the model's timm data config).
        limit: at most this many images (evenly spaced, see `LabelledFiles.subset`).
        batch_size, workers: the DataLoader's.
        out: the output folder (results.json, results.csv, partial.json).
        diversity_centre: "medoid" or "median"; diversity_size_weighted: weight tokens by size.
        diversity_images: r(Z) is averaged over this many images, evenly spaced over the files
            (it costs about as much as the forward pass on a CPU); None = every image.
        budget_schedule: for methods with their own budget parameter (ToMe's r): "constant" (one
            value for every block) or "matched" (per block), see `Method.budget`.
        checkpoint_every: batches between partial.json saves (None: about every 256 images).
        patterns: also the dataset-level analysis (`--patterns`, analysis/patterns.py): keep
            frequency and survival depth per patch, agreement between methods at equal keep rate,
            fidelity to the dense model (PatternAccumulator, AgreementAccumulator, FidelityAccumulator).
    """

    data: str
    model: str = "deit_small_patch16_224"
    weights: str = "pretrained"
    methods: tuple[str, ...] = field(default_factory=default_methods)
    keep_rates: tuple[float, ...] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)
    method_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    crop_pct: float | None = None
    limit: int | None = None
    batch_size: int = 64
    workers: int = 2
    out: str = "runs/sweep"
    device: str | None = None
    labels: str | None = None
    diversity_centre: str = "medoid"
    diversity_size_weighted: bool = False
    budget_schedule: str = "constant"
    diversity_images: int | None = 500
    checkpoint_every: int | None = None
    patterns: bool = False


def build_settings(methods: tuple[str, ...], keep_rates: tuple[float, ...], loaded: LoadedModel,
                   schedule: str = "constant", method_params: dict[str, dict[str, Any]] | None = None) -> list[Setting]:
    """Every method x keep rate as a `Setting`, validated against the model before any work.

    Raises SweepError for a method that cannot run with the loaded weights (e.g. dTPS without its
    predictor), a keep rate outside (0, 1] or an unknown schedule; PlanError for an unknown method
    (naming the registered ones) or a bad method parameter.
    """
    if not methods:
        raise SweepError("no methods given: pass --methods, e.g. evit,etps,bat,dpc,tome")
    if not keep_rates:
        raise SweepError("no keep rates given: pass --keep-rates, e.g. 1.0,0.9,0.8,0.7,0.6,0.5")
    if schedule not in SCHEDULES:
        raise SweepError(f"budget schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
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
        method = get_method(name)
        reason = method_unavailable(method, loaded.model, loaded.extras)
        if reason:
            raise SweepError(f"{method.label} cannot run in this sweep: {reason}")
        for user in user_variants(method, (method_params or {}).get(name, {})):
            for rate in keep_rates:
                plan = method.budget(float(rate), depth, n0, schedule=schedule)
                if user:
                    plan = ReductionPlan.make(plan.method, plan.keep_rate, plan.layers, **{**dict(plan.params), **user})
                plan.validate(depth)
                settings.append(Setting(name, float(rate), plan))
    return settings


def user_variants(method, params: dict[str, Any]) -> list[dict[str, Any]]:
    """The user's parameters of one method as a list of settings: a list value for a parameter that
    is not itself a list (`int_list`) is several values, one setting each (every combination of
    several such lists, in the order given)."""
    names = [key for key, value in params.items() if isinstance(value, list) and
             not (method.param(key) is not None and method.param(key).kind == "int_list")]
    if not names:
        return [dict(params)]
    return [{**params, **dict(zip(names, values))} for values in itertools.product(*(params[key] for key in names))]


def setting_key(config: SweepConfig, setting: Setting, data_root: Path) -> str:
    """The identity of a finished row (what resuming compares)."""
    payload = {
        "model": config.model, "weights": config.weights, "method": setting.method, "keep_rate": round(setting.keep_rate, 9),
        "params": setting.params_dict(), "crop_pct": config.crop_pct, "limit": config.limit, "data": str(data_root),
        "labels": config.labels, "centre": config.diversity_centre, "size_weighted": config.diversity_size_weighted,
        "diversity_images": config.diversity_images,
    }
    layers = setting.plan.layers
    if layers is not None:
        payload["layers"] = list(layers)
    if config.patterns:  # only then, so that the keys of earlier sweeps stay the same
        payload["patterns"] = True
    return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Accumulators
# ----------------------------------------------------------------------------------------------

@dataclass
class Observation:
    """One setting's forward over one batch, as the accumulators see it.

    Attributes:
        result: the engine `Result` (block outputs kept when an accumulator asked for them).
        batch: the `Batch` (labels, dataset indices).
        seconds: wall time of the timed forward.
        model / extras: the model and its method weights (for per-image GMACs).
        dense: the dense model's `Result` on the same batch (block outputs kept), when an
            accumulator asked for it (`needs_dense`), else None.
        setting: the `Setting` this forward ran.
    """

    result: Result
    batch: Batch
    seconds: float
    model: Any = None
    extras: dict[str, Any] = field(default_factory=dict)
    dense: Result | None = None
    setting: Any = None


class Accumulator:
    """A per-setting measure summed over batches.

    Subclasses are dataclasses of plain numbers and lists (their state) and implement `update`,
    `merge` and `row`. What a batch's forward must provide is asked, never assumed:
    `needs_block_outputs(indices)` (every block's tokens), `needs_provenance()` (the stages'
    provenance, `track=True`), `needs_dense()` (the dense model's result for the same batch,
    computed once per batch and shared by every setting, as `Observation.dense`). `enabled(config)`
    says whether a sweep uses the accumulator at all (e.g. only with --patterns). Everything is kept
    as sums and counts so `merge` is exact.
    """

    name: ClassVar[str] = ""

    @classmethod
    def enabled(cls, config: "SweepConfig") -> bool:
        return True

    def needs_block_outputs(self, indices: torch.Tensor) -> bool:
        return False

    def needs_provenance(self) -> bool:
        return False

    def needs_dense(self) -> bool:
        return False

    def update(self, obs: Observation) -> None:
        raise NotImplementedError

    def merge(self, other: "Accumulator") -> None:
        raise NotImplementedError

    def row(self) -> dict[str, Any]:
        """The row fields this accumulator contributes."""
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, Any], context: "SweepContext") -> "Accumulator":
        acc = cls.create(context)
        for name, value in state.items():
            setattr(acc, name, value)
        return acc

    @classmethod
    def create(cls, context: "SweepContext") -> "Accumulator":
        return cls()


@dataclass
class SweepContext:
    """What accumulators may need to set themselves up: the config and the files."""

    config: SweepConfig
    files: LabelledFiles
    shared: dict[str, Any] = field(default_factory=dict)  # what accumulators of different settings share in one run


def _topk_correct(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices.cpu()
    hits = top5 == labels.unsqueeze(1)
    return int(hits[:, 0].sum()), int(hits.any(1).sum())


@dataclass
class AccuracyAccumulator(Accumulator):
    """Top-1 / top-5 hits and images seen."""

    name: ClassVar[str] = "accuracy"
    correct1: int = 0
    correct5: int = 0
    seen: int = 0

    def update(self, obs: Observation) -> None:
        c1, c5 = _topk_correct(obs.result.logits, obs.batch.labels)
        self.correct1 += c1
        self.correct5 += c5
        self.seen += int(obs.batch.labels.numel())

    def merge(self, other: "AccuracyAccumulator") -> None:
        self.correct1 += other.correct1
        self.correct5 += other.correct5
        self.seen += other.seen

    def row(self) -> dict[str, Any]:
        nan = float("nan")
        return {"top1": 100.0 * self.correct1 / self.seen if self.seen else nan,
                "top5": 100.0 * self.correct5 / self.seen if self.seen else nan,
                "n_images": self.seen, "correct1": self.correct1, "correct5": self.correct5}


# A sweep's throughput is indicative only: below this many timed batches, or with other processes
# competing for the cores, its images_per_s is flagged (`timing_note`); `bench` is the measurement.
MIN_TIMED_BATCHES = 5


@dataclass
class TimingAccumulator(Accumulator):
    """Seconds of timed forwards and the images they processed, and the highest 1-minute load
    average seen after a batch (other processes competing for the cores make the times unreliable)."""

    name: ClassVar[str] = "timing"
    seconds: float = 0.0
    images: int = 0
    batches: int = 0
    load_max: float = 0.0

    def update(self, obs: Observation) -> None:
        self.seconds += obs.seconds
        self.images += int(obs.batch.labels.numel())
        self.batches += 1
        try:
            self.load_max = max(self.load_max, os.getloadavg()[0])
        except (AttributeError, OSError):
            pass

    def merge(self, other: "TimingAccumulator") -> None:
        self.seconds += other.seconds
        self.images += other.images
        self.batches += other.batches
        self.load_max = max(self.load_max, other.load_max)

    def row(self) -> dict[str, Any]:
        return {"images_per_s": self.images / self.seconds if self.seconds > 0 else float("nan"), "seconds": self.seconds,
                "timed_batches": self.batches, "load_average_max": self.load_max, "timing_note": timing_note(self.batches, self.load_max)}


def timing_note(batches: int, load: float, threads: int | None = None) -> str | None:
    """Why a sweep's images_per_s is only indicative (few timed batches, or a load average above the
    cores + 1, i.e. other processes competed), or None when neither holds."""
    reasons = []
    if batches < MIN_TIMED_BATCHES:
        reasons.append(f"it rests on {batches} timed batch{'es' if batches != 1 else ''} (fewer than {MIN_TIMED_BATCHES})")
    cores = max(os.cpu_count() or 1, threads or torch.get_num_threads())
    if load > cores + 1:
        reasons.append(f"the load average reached {load:.1f} on {cores} cores (other processes competed)")
    if not reasons:
        return None
    return "images/s is indicative only: " + " and ".join(reasons) + "; measure speed with `python -m analysis bench`"


@dataclass
class TokenCountAccumulator(Accumulator):
    """Each image's own tokens leaving each block (methods with a count per image, ATS, differ from
    image to image): per block the sum, the sum of squares, the minimum and the maximum over images,
    and the histogram of the count after the last block."""

    name: ClassVar[str] = "tokens"
    sums: list[float] = field(default_factory=list)
    squares: list[float] = field(default_factory=list)
    low: list[int] = field(default_factory=list)
    high: list[int] = field(default_factory=list)
    final_histogram: dict[str, int] = field(default_factory=dict)
    images: int = 0

    def update(self, obs: Observation) -> None:
        counts = obs.result.image_token_counts
        if counts is None:
            counts = torch.tensor([obs.result.token_counts] * int(obs.batch.labels.numel()))
        self._add(counts.double().sum(0).numpy(), (counts.double() ** 2).sum(0).numpy(), counts.min(0).values.numpy(),
                  counts.max(0).values.numpy(), counts[:, -1].tolist(), int(counts.shape[0]))

    def _add(self, sums, squares, low, high, finals, images: int) -> None:
        if images == 0:
            return
        if not self.sums:
            self.sums, self.squares = np.asarray(sums, float).tolist(), np.asarray(squares, float).tolist()
            self.low, self.high = np.asarray(low).astype(int).tolist(), np.asarray(high).astype(int).tolist()
        else:
            self.sums = (np.asarray(self.sums) + sums).tolist()
            self.squares = (np.asarray(self.squares) + squares).tolist()
            self.low = np.minimum(self.low, low).astype(int).tolist()
            self.high = np.maximum(self.high, high).astype(int).tolist()
        finals = finals.items() if isinstance(finals, dict) else ((str(c), 1) for c in finals)
        for count, number in finals:
            self.final_histogram[str(count)] = self.final_histogram.get(str(count), 0) + int(number)
        self.images += images

    def merge(self, other: "TokenCountAccumulator") -> None:
        if other.images:
            self._add(np.asarray(other.sums), np.asarray(other.squares), np.asarray(other.low), np.asarray(other.high),
                      dict(other.final_histogram), other.images)

    def mean_counts(self) -> list[float]:
        return [value / self.images for value in self.sums] if self.images else []

    def row(self) -> dict[str, Any]:
        mean = self.mean_counts()
        exact = [int(round(v)) for v in mean]
        fixed = bool(mean) and self.low == self.high
        out: dict[str, Any] = {"token_counts": exact if fixed else mean}
        if mean and not fixed:
            std = np.sqrt(np.maximum(np.asarray(self.squares) / self.images - np.asarray(mean) ** 2, 0.0))
            out.update(token_counts_std=std.tolist(), token_counts_min=self.low, token_counts_max=self.high,
                       final_tokens_histogram=dict(sorted(self.final_histogram.items(), key=lambda kv: int(kv[0]))))
        return out


@dataclass
class GMACsAccumulator(Accumulator):
    """GMACs per image from each image's own token counts (`gmacs.plan_gmacs`, cached per distinct
    count sequence): the sum, the sum of squares, the minimum and the maximum over images."""

    name: ClassVar[str] = "gmacs"
    total: float = 0.0
    squares: float = 0.0
    low: float = float("inf")
    high: float = float("-inf")
    images: int = 0

    def update(self, obs: Observation) -> None:
        counts = obs.result.image_token_counts
        model = obs.model
        values = [_image_gmacs(model, obs.result.plan, obs.extras, tuple(row)) for row in counts.tolist()]
        self._add(sum(values), sum(v * v for v in values), min(values), max(values), len(values))

    def _add(self, total: float, squares: float, low: float, high: float, images: int) -> None:
        self.total += total
        self.squares += squares
        self.low = min(self.low, low)
        self.high = max(self.high, high)
        self.images += images

    def merge(self, other: "GMACsAccumulator") -> None:
        if other.images:
            self._add(other.total, other.squares, other.low, other.high, other.images)

    def row(self) -> dict[str, Any]:
        if not self.images:
            return {}
        mean = self.total / self.images
        std = math.sqrt(max(self.squares / self.images - mean * mean, 0.0))
        return {"gmacs": mean, "gmacs_std": std, "gmacs_min": self.low, "gmacs_max": self.high}


_GMACS_CACHE: dict[tuple, float] = {}


def _image_gmacs(model: torch.nn.Module, plan: ReductionPlan, extras: dict[str, Any], counts: tuple[int, ...]) -> float:
    key = (id(model), plan, counts)
    if key not in _GMACS_CACHE:
        if len(_GMACS_CACHE) > 50_000:
            _GMACS_CACHE.clear()
        _GMACS_CACHE[key] = plan_gmacs(model, plan, extras, list(counts))
    return _GMACS_CACHE[key]


@dataclass
class DiversityAccumulator(Accumulator):
    """The sums of r(Z) per block (raw and per token) over the evenly spaced diversity images."""

    name: ClassVar[str] = "diversity"
    chosen: list[int] = field(default_factory=list)
    centre: str = "medoid"
    size_weighted: bool = False
    seen: int = 0
    raw: list[float] = field(default_factory=list)
    per_token: list[float] = field(default_factory=list)

    @classmethod
    def create(cls, context: SweepContext) -> "DiversityAccumulator":
        config, n = context.config, len(context.files)
        count = n if config.diversity_images is None else min(n, max(0, config.diversity_images))
        chosen = np.unique(np.linspace(0, n - 1, count).round().astype(np.int64)).tolist() if count else []
        return cls(chosen=chosen, centre=config.diversity_centre, size_weighted=config.diversity_size_weighted)

    def _mask(self, indices: torch.Tensor) -> torch.Tensor:
        return torch.isin(indices, torch.tensor(self.chosen, dtype=torch.long))

    def needs_block_outputs(self, indices: torch.Tensor) -> bool:
        return bool(self.chosen) and bool(self._mask(indices).any())

    def update(self, obs: Observation) -> None:
        if not self.chosen or obs.result.block_outputs is None:
            return
        chosen = self._mask(obs.batch.indices).to(obs.result.logits.device)
        if not chosen.any():
            return
        result, prefix = obs.result, obs.result.num_prefix_tokens
        counts = result.image_token_counts
        if counts is not None and bool((counts != counts[:1]).any()):
            # images keep their own counts (padding): each chosen image on its own tokens
            for index in torch.nonzero(chosen.cpu()).flatten().tolist():
                own = counts[index].tolist()
                raw, per_token = diversity_of_blocks([o[index:index + 1, :n] for o, n in zip(result.block_outputs, own)],
                                                     [z[index:index + 1, :n] for z, n in zip(result.block_sizes, own)],
                                                     self.centre, self.size_weighted, prefix)
                self._add(raw.sum(0), per_token.sum(0), 1)
            return
        raw, per_token = diversity_of_blocks([o[chosen] for o in result.block_outputs], [z[chosen] for z in result.block_sizes],
                                             self.centre, self.size_weighted, prefix)
        self._add(raw.sum(0), per_token.sum(0), raw.shape[0])

    def _add(self, raw: np.ndarray, per_token: np.ndarray, count: int) -> None:
        if count == 0:
            return
        self.seen += count
        self.raw = np.asarray(raw).tolist() if not self.raw else (np.asarray(self.raw) + raw).tolist()
        self.per_token = np.asarray(per_token).tolist() if not self.per_token else (np.asarray(self.per_token) + per_token).tolist()

    def merge(self, other: "DiversityAccumulator") -> None:
        if other.seen:
            self._add(np.asarray(other.raw), np.asarray(other.per_token), other.seen)

    def row(self) -> dict[str, Any]:
        seen = max(self.seen, 1)
        diversity = (np.asarray(self.raw) / seen).tolist() if self.raw else []
        per_token = (np.asarray(self.per_token) / seen).tolist() if self.per_token else []
        return {"diversity": diversity, "diversity_per_token": per_token,
                "diversity_mean": float(np.mean(diversity)) if diversity else float("nan"),
                "diversity_images": self.seen, "diversity_centre": self.centre, "diversity_size_weighted": self.size_weighted}


def _add_lists(mine: list, other) -> list:
    other = np.asarray(other, dtype=np.float64)
    return other.tolist() if not len(mine) else (np.asarray(mine, dtype=np.float64) + other).tolist()


@dataclass
class PatternAccumulator(Accumulator):
    """With --patterns: per block and patch, the images in which the patch still has a token of its
    own (`patterns.block_states`), the sum of survival depths per patch, and the token kinds its
    stages produced (how `patterns.method_family` tells merging from pruning when the method's
    comparison rows do not). Row: `keep_frequency` [D][P], `survival_depth` [P] (means over images),
    `patch_grid` (rows, columns), `token_kinds_seen`, `pattern_family` (declared, or "")."""

    name: ClassVar[str] = "patterns"
    own_counts: list[list[float]] = field(default_factory=list)
    survival: list[float] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    images: int = 0
    grid: list[int] = field(default_factory=list)
    family: str = ""

    @classmethod
    def enabled(cls, config: SweepConfig) -> bool:
        return config.patterns

    def needs_provenance(self) -> bool:
        return True

    def update(self, obs: Observation) -> None:
        from .patterns import block_states, kinds_seen, patch_grid, survival_depth

        result, batch = obs.result, int(obs.batch.labels.numel())
        if batch == 0:
            return
        depth, num_patches = len(obs.model.blocks), int(obs.model.patch_embed.num_patches)
        own, _ = block_states(result.stages, depth, batch, num_patches)
        self.own_counts = _add_lists(self.own_counts, own.double().sum(0).numpy())
        self.survival = _add_lists(self.survival, survival_depth(own).sum(0).numpy())
        self.kinds = sorted(set(self.kinds) | kinds_seen(result.stages))
        self.images += batch
        self.grid = list(patch_grid(obs.model))
        self.family = _declared_family(obs.setting.method) or self.family

    def merge(self, other: "PatternAccumulator") -> None:
        if other.images:
            self.own_counts = _add_lists(self.own_counts, other.own_counts)
            self.survival = _add_lists(self.survival, other.survival)
            self.kinds = sorted(set(self.kinds) | set(other.kinds))
            self.images += other.images
            self.grid = self.grid or other.grid
            self.family = self.family or other.family

    def row(self) -> dict[str, Any]:
        if not self.images:
            return {}
        return {"keep_frequency": (np.asarray(self.own_counts) / self.images).round(6).tolist(),
                "survival_depth": (np.asarray(self.survival) / self.images).round(6).tolist(),
                "patch_grid": self.grid, "token_kinds_seen": self.kinds, "pattern_images": self.images,
                "pattern_family": self.family}


def _declared_family(method: str | None) -> str:
    """"merging" or "pruning" when the method's comparison rows say so (a "merging" row wins), else ""."""
    if not method or method == DENSE:
        return ""
    rows = {entry.row for entry in get_method(method).comparison}
    return "merging" if "merging" in rows else "pruning" if "pruning" in rows else ""


@dataclass
class AgreementAccumulator(Accumulator):
    """With --patterns: per other method at the same keep rate, and per block, the sums (and sums of
    squares) over images of the IoU of the kept-patch sets and of the NMI, homogeneity, completeness
    and V-measure between the patch partitions (`patterns.iou`, `patterns.partition_scores`).

    The settings of one sweep run one after another on each batch; each posts its patch states on a
    board shared by the run (`SweepContext.shared`), and a setting compares itself with those posted
    before it on the same batch, so each pair is counted once, in the later setting's row (`agreement`:
    {other method: {measure: [mean per block], measure_std: [...], "n": images}}; homogeneity takes
    the other method as the true classes). A pair is counted only on batches both ran in the same
    process (settings finished in an earlier run, or run by another process, are not compared)."""

    name: ClassVar[str] = "agreement"
    sums: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    @classmethod
    def enabled(cls, config: SweepConfig) -> bool:
        return config.patterns

    @classmethod
    def create(cls, context: SweepContext) -> "AgreementAccumulator":
        acc = cls()
        acc._board = context.shared.setdefault("agreement_board", {})
        return acc

    def needs_provenance(self) -> bool:
        return True

    def update(self, obs: Observation) -> None:
        from .patterns import block_states, iou, partition_scores

        batch = int(obs.batch.labels.numel())
        if batch == 0 or obs.setting.method == DENSE:
            return
        board = getattr(self, "_board", None)
        if board is None:
            return
        depth, num_patches = len(obs.model.blocks), int(obs.model.patch_embed.num_patches)
        own, labels = block_states(obs.result.stages, depth, batch, num_patches)
        key = tuple(obs.batch.indices.tolist())
        if board.get("key") != key:
            board.clear()
            board["key"], board["posted"] = key, {}
        posted = board["posted"]
        rate = round(obs.setting.keep_rate, 9)
        for (method, other_rate), (other_own, other_labels) in posted.items():
            if other_rate != rate or method == obs.setting.method:
                continue
            scores = {"iou": iou(own, other_own), **partition_scores(other_labels, labels)}
            mine = self.sums.setdefault(method, {})
            for name, value in scores.items():
                value = value.double()
                mine[name] = _add_lists(mine.get(name, []), value.sum(0).numpy())
                mine[f"{name}_sq"] = _add_lists(mine.get(f"{name}_sq", []), (value ** 2).sum(0).numpy())
            self.counts[method] = self.counts.get(method, 0) + batch
        posted[(obs.setting.method, rate)] = (own, labels)

    def merge(self, other: "AgreementAccumulator") -> None:
        for method, sums in other.sums.items():
            mine = self.sums.setdefault(method, {})
            for name, value in sums.items():
                mine[name] = _add_lists(mine.get(name, []), value)
            self.counts[method] = self.counts.get(method, 0) + other.counts.get(method, 0)

    def row(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for method, sums in self.sums.items():
            n = self.counts.get(method, 0)
            if not n:
                continue
            entry: dict[str, Any] = {"n": n}
            for name in ("iou", "nmi", "homogeneity", "completeness", "v_measure"):
                mean = np.asarray(sums[name]) / n
                std = np.sqrt(np.maximum(np.asarray(sums[f"{name}_sq"]) / n - mean ** 2, 0.0))
                entry[name], entry[f"{name}_std"] = mean.round(6).tolist(), std.round(6).tolist()
            out[method] = entry
        return {"agreement": out} if out else {}


@dataclass
class FidelityAccumulator(Accumulator):
    """With --patterns: how far the setting strays from the dense model on the same images (whose
    forward runs once per batch, shared by every setting): top-1 agreement with the dense prediction,
    the mean KL(dense || reduced) of the softmax, the mean cosine similarity of the final class-token
    features (after the final norm), and per block the linear CKA of the class-token features from
    the unbiased HSIC summed over minibatches (the sweep's batches; a batch below 4 images is left
    out of the CKA). A model without a class token uses the size-weighted mean of its patch tokens."""

    name: ClassVar[str] = "fidelity"
    agree: int = 0
    kl: float = 0.0
    cosine: float = 0.0
    images: int = 0
    hsic_xy: list[float] = field(default_factory=list)
    hsic_xx: list[float] = field(default_factory=list)
    hsic_yy: list[float] = field(default_factory=list)
    cka_batches: int = 0

    @classmethod
    def enabled(cls, config: SweepConfig) -> bool:
        return config.patterns

    def needs_dense(self) -> bool:
        return True

    def needs_block_outputs(self, indices: torch.Tensor) -> bool:
        return True

    def update(self, obs: Observation) -> None:
        from .patterns import cosine, linear_cka_terms, logit_fidelity, summary_tokens

        dense, result = obs.dense, obs.result
        batch = int(obs.batch.labels.numel())
        if dense is None or batch == 0 or result.block_outputs is None or dense.block_outputs is None:
            return
        logits = logit_fidelity(dense.logits, result.logits)
        self.agree += int(logits["agree"].sum())
        self.kl += float(logits["kl"].sum())
        has_cls = getattr(obs.model, "cls_token", None) is not None
        prefix = result.num_prefix_tokens
        mine = summary_tokens(result.block_outputs, result.block_sizes, has_cls, prefix)
        theirs = summary_tokens(dense.block_outputs, dense.block_sizes, has_cls, prefix)
        norm = obs.model.norm
        with torch.inference_mode():
            final_mine = summary_tokens([norm(result.block_outputs[-1])], [result.block_sizes[-1]], has_cls, prefix)[0]
            final_dense = summary_tokens([norm(dense.block_outputs[-1])], [dense.block_sizes[-1]], has_cls, prefix)[0]
        self.cosine += float(cosine(final_dense, final_mine).sum())
        self.images += batch
        if batch >= 4:
            terms = np.asarray([linear_cka_terms(x, y) for x, y in zip(theirs, mine)])
            self.hsic_xy = _add_lists(self.hsic_xy, terms[:, 0])
            self.hsic_xx = _add_lists(self.hsic_xx, terms[:, 1])
            self.hsic_yy = _add_lists(self.hsic_yy, terms[:, 2])
            self.cka_batches += 1

    def merge(self, other: "FidelityAccumulator") -> None:
        self.agree += other.agree
        self.kl += other.kl
        self.cosine += other.cosine
        self.images += other.images
        if other.cka_batches:
            self.hsic_xy = _add_lists(self.hsic_xy, other.hsic_xy)
            self.hsic_xx = _add_lists(self.hsic_xx, other.hsic_xx)
            self.hsic_yy = _add_lists(self.hsic_yy, other.hsic_yy)
            self.cka_batches += other.cka_batches

    def row(self) -> dict[str, Any]:
        from .patterns import cka_from_sums

        if not self.images:
            return {}
        cka = [cka_from_sums(a, b, c) for a, b, c in zip(self.hsic_xy, self.hsic_xx, self.hsic_yy)]
        return {"dense_agreement": 100.0 * self.agree / self.images, "dense_kl": self.kl / self.images,
                "dense_cosine": self.cosine / self.images, "cka": cka, "cka_final": cka[-1] if cka else float("nan"),
                "cka_batches": self.cka_batches}


# Every setting gets one of each (in this order); a new measure is a new entry here.
ACCUMULATORS: tuple[type[Accumulator], ...] = (AccuracyAccumulator, TimingAccumulator, TokenCountAccumulator, GMACsAccumulator,
                                                DiversityAccumulator, PatternAccumulator, AgreementAccumulator,
                                                FidelityAccumulator)


@dataclass
class Tally:
    """A setting's accumulators plus how many batches of the pass they have counted."""

    accumulators: dict[str, Accumulator]
    batches: int = 0

    @classmethod
    def create(cls, context: SweepContext) -> "Tally":
        return cls({acc.name: acc.create(context) for acc in ACCUMULATORS if acc.enabled(context.config)})

    def merge(self, other: "Tally") -> None:
        for name, acc in self.accumulators.items():
            acc.merge(other.accumulators[name])

    def state(self) -> dict[str, Any]:
        return {"batches": self.batches, **{name: acc.state() for name, acc in self.accumulators.items()}}

    @classmethod
    def from_state(cls, state: dict[str, Any], context: SweepContext) -> "Tally":
        tally = cls({acc.name: acc.from_state(state[acc.name], context) if acc.name in state else acc.create(context)
                     for acc in ACCUMULATORS if acc.enabled(context.config)})
        tally.batches = int(state.get("batches", 0))
        return tally

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for acc in self.accumulators.values():
            out.update(acc.row())
        return out


# ----------------------------------------------------------------------------------------------
# Rows and results files
# ----------------------------------------------------------------------------------------------

def _csv(default: Any = None):
    return field(default=default, metadata={"csv": True})


@dataclass
class SweepRow:
    """One method x keep rate of a sweep: a row of results.json; the fields marked for CSV, in
    order, are the columns of results.csv (`CSV_COLUMNS`). Accuracy in percent, GMACs per image.
    Measures beyond these fields (from further accumulators) travel in `extra`, flattened into the
    JSON row."""

    model: str = _csv("")
    method: str = _csv("")
    keep_rate: float = _csv(1.0)
    params: dict[str, Any] = field(default_factory=dict, metadata={"csv": True})
    top1: float = _csv(float("nan"))
    top5: float = _csv(float("nan"))
    n_images: int = _csv(0)
    n_skipped: int = _csv(0)
    gmacs: float = _csv(float("nan"))
    images_per_s: float = _csv(float("nan"))
    label: str = _csv("")
    weights: str = _csv("")
    dense_gmacs: float = _csv(float("nan"))
    gmacs_reduction_pct: float = _csv(float("nan"))
    crop_pct: float | None = _csv(None)
    limit: int | None = _csv(None)
    device: str = _csv("")
    diversity_mean: float = _csv(float("nan"))
    key: str = ""
    plan: dict[str, Any] = field(default_factory=dict)
    uses_keep_rate: bool = True
    skipped_files: list[str] = field(default_factory=list)
    seconds: float = 0.0
    token_counts: list[Any] = field(default_factory=list)
    reducing_layers: list[int] = field(default_factory=list)
    diversity: list[float] = field(default_factory=list)
    diversity_per_token: list[float] = field(default_factory=list)
    diversity_images: int = 0
    diversity_centre: str = "medoid"
    diversity_size_weighted: bool = False
    data: str = ""
    batch_size: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        record = dataclasses.asdict(self)
        extra = record.pop("extra")
        record.update(extra)
        return record

    @classmethod
    def from_fields(cls, values: dict[str, Any]) -> "SweepRow":
        """A row from a flat dict: known fields go to their field, the rest into `extra`."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in values.items() if k in names}
        return cls(**known, extra={k: v for k, v in values.items() if k not in names})


CSV_COLUMNS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(SweepRow) if f.metadata.get("csv"))


def gmacs_spread(row: dict[str, Any]) -> float:
    """The standard deviation over images of a row's per-image GMACs (0 when every image costs the
    same, i.e. the method keeps one token count for all; per-image budgets such as ATS's vary)."""
    std = row.get("gmacs_std")
    low, high = row.get("gmacs_min"), row.get("gmacs_max")
    if std is None or low is None or high is None or not high > low:
        return 0.0
    return float(std)


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


def write_results(out: Path, config: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """results.json (every field) and results.csv (`CSV_COLUMNS`), written atomically."""
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


def _check_config(config: SweepConfig) -> None:
    if config.batch_size < 1:
        raise SweepError(f"--batch-size must be at least 1, got {config.batch_size}")
    if config.workers < 0:
        raise SweepError(f"--workers must be 0 or more, got {config.workers}")
    if config.diversity_centre not in ("medoid", "median"):
        raise SweepError(f"diversity centre must be medoid or median, got {config.diversity_centre!r}")


def _run_config(config: SweepConfig, loaded: LoadedModel, files: LabelledFiles, dconfig: dict[str, Any]) -> dict[str, Any]:
    root = files.root.resolve()
    return {
        "data": str(root), "layout": files.layout, "labels": str(files.ground_truth) if files.ground_truth else None,
        "model": loaded.name, "weights": loaded.weights, "weights_label": loaded.weights_label, "is_random": loaded.is_random,
        "device": loaded.device, "methods": list(dict.fromkeys(config.methods)), "keep_rates": list(config.keep_rates),
        "crop_pct": dconfig["crop_pct"], "crop_pct_requested": config.crop_pct, "data_config": {
            k: (list(v) if isinstance(v, tuple) else v) for k, v in dconfig.items()},
        "limit": config.limit, "batch_size": config.batch_size, "workers": config.workers, "n_files": len(files),
        "diversity_centre": config.diversity_centre, "diversity_size_weighted": config.diversity_size_weighted,
        "diversity_images": config.diversity_images, "budget_schedule": config.budget_schedule,
        "torch_threads": torch.get_num_threads(), "n_parameters": sum(p.numel() for p in loaded.model.parameters()),
        "timing": "images_per_s: engine forward only (track=False, block outputs kept for diversity), after one untimed warm-up "
                  "forward per setting; data loading, accuracy and diversity bookkeeping are not timed",
    }


def run_sweep(
    config: SweepConfig,
    loaded: LoadedModel | None = None,
    progress: Callable[[float, str], None] | None = None,
    show_bar: bool = True,
    world: World | None = None,
) -> SweepOutcome:
    """Run (or resume) a sweep and write results.json / results.csv into `config.out`.

    Args:
        config: what to run.
        loaded: an already loaded model (the app's cached one); else `load_model` from the config.
        progress: optional callback (fraction done in [0, 1], message), e.g. for st.progress.
        show_bar: draw a tqdm bar on stderr.
        world: this process's place in a distributed sweep (`World.from_env`, launched by
            torchrun); None: one process. Each process evaluates the batches it `owns` (round robin,
            so every batch holds the same images as in one process), keeps its own resume file
            (`partial.rank<r>of<n>.json`), and rank 0 gathers every process's accumulator states,
            merges them with the accumulators' exact `merge` and writes the results.
    Returns:
        a `SweepOutcome` (on every rank).
    Raises:
        SweepError / DatasetError / PlanError / WeightsError with one-line reasons, before any model
        work where possible.
    """
    from tqdm.auto import tqdm

    files = resolve_dataset(config.data, config.labels).subset(config.limit)
    _check_config(config)
    if loaded is None:
        loaded = load_model(config.model, config.weights, config.device)
    # the loaded model is the truth (the app passes its cached one); the caller's config is not modified
    config = dataclasses.replace(config, model=loaded.name, weights=loaded.weights, device=loaded.device)
    model = loaded.model
    dconfig = data_config(model, config.crop_pct)
    settings = build_settings(tuple(config.methods), tuple(config.keep_rates), loaded, config.budget_schedule, config.method_params)

    world = world or World()
    out = Path(config.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    root = files.root.resolve()
    run_config = {**_run_config(config, loaded, files, dconfig), "processes": world.size, "backend": world.backend}
    previous: list[dict[str, Any]] = []
    if world.is_main and (out / "results.json").exists():
        previous = load_results(out)["rows"]
    previous = world.broadcast(previous)  # rank 0's folder decides what is done (it writes the results)
    done = {row.get("key") for row in previous}
    keys = {setting: setting_key(config, setting, root) for setting in settings}
    pending = [s for s in settings if keys[s] not in done]
    if not pending:
        if world.is_main:
            write_results(out, run_config, previous)
        if progress:
            progress(1.0, "every setting was already done")
        return SweepOutcome(previous, run_config, 0, len(settings), out)

    # This process's batches: global batch b holds files [b * batch_size, (b + 1) * batch_size).
    n_batches = max(1, math.ceil(len(files) / config.batch_size))
    owned = [b for b in range(n_batches) if world.owns(b)]

    # Resume a pass that was interrupted: the accumulators of the batches already counted (counted
    # in this process's own batches; every process keeps its own resume file).
    context = SweepContext(config, files)
    partial_path = out / ("partial.json" if not world.distributed else f"partial.rank{world.rank}of{world.size}.json")
    tallies: dict[Setting, Tally] = {s: Tally.create(context) for s in pending}
    skipped: list[tuple[int, str]] = []  # (global batch, reason), so the processes' lists join in file order
    if partial_path.exists():
        state = _read_json(partial_path)
        if state.get("batch_size") == config.batch_size and state.get("n_files") == len(files):
            for setting in pending:
                saved = state.get("tallies", {}).get(keys[setting])
                if saved:
                    tallies[setting] = Tally.from_state(saved, context)
            skipped = [(int(b), str(r)) for b, r in state.get("skipped_at", [])]
    start = min(t.batches for t in tallies.values())  # position in `owned`
    if start == 0:
        skipped = []  # the pass restarts at the first batch and records the skipped files again

    indices = [i for b in owned[start:] for i in range(b * config.batch_size, min(len(files), (b + 1) * config.batch_size))]
    loader = make_loader(files, make_transform(model, config.crop_pct), config.batch_size, config.workers, indices=indices)
    share = sum(min(len(files), (b + 1) * config.batch_size) - b * config.batch_size for b in owned)
    total = len(files)
    bar = tqdm(total=share, initial=share - len(indices), unit="img", desc=f"sweep {len(pending)} settings"
               + (f" (process {world.rank + 1}/{world.size})" if world.distributed else ""),
               disable=not show_bar or not world.is_main)
    warmed: set[Setting] = set()
    device = loaded.device
    position_in_owned = start
    checkpoint_every = config.checkpoint_every or max(1, 256 // config.batch_size)
    pass_started = time.perf_counter()
    for batch in loader:
        batch_index = owned[position_in_owned]
        skipped.extend((batch_index, reason) for reason in batch.skipped)
        if batch.images.numel():
            images = batch.images.to(device)
            dense = None
            if any(acc.needs_dense() for s in pending if tallies[s].batches <= position_in_owned
                   for acc in tallies[s].accumulators.values()):
                dense = run(model, images, ReductionPlan(), extras=loaded.extras, track=False, keep_block_outputs=True)
            for position, setting in enumerate(pending):
                tally = tallies[setting]
                if tally.batches > position_in_owned:
                    continue  # already counted before an interruption
                if setting not in warmed:
                    run(model, images[: min(4, len(images))], setting.plan, extras=loaded.extras, track=False)
                    warmed.add(setting)
                keep_outputs = any(acc.needs_block_outputs(batch.indices) for acc in tally.accumulators.values())
                track = any(acc.needs_provenance() for acc in tally.accumulators.values())
                _sync(device)
                started = time.perf_counter()
                result = run(model, images, setting.plan, extras=loaded.extras, track=track, keep_block_outputs=keep_outputs)
                _sync(device)
                observation = Observation(result, batch, time.perf_counter() - started, model, loaded.extras, dense, setting)
                for acc in tally.accumulators.values():
                    acc.update(observation)
                if progress:  # within a batch too: one setting after another
                    progress(min(1.0, (batch_index + (position + 1) / len(pending)) / n_batches),
                             f"batch {batch_index + 1}/{n_batches}: {setting.label} at keep rate {setting.keep_rate:g} "
                             f"({position + 1}/{len(pending)} settings)")
        for setting in pending:
            tallies[setting].batches = max(tallies[setting].batches, position_in_owned + 1)
        position_in_owned += 1
        bar.update(len(batch.indices) + len(batch.skipped))
        if position_in_owned % checkpoint_every == 0:
            state = {"batch_size": config.batch_size, "n_files": len(files), "processes": world.size,
                     "skipped_at": [list(item) for item in skipped],
                     "tallies": {keys[s]: t.state() for s, t in tallies.items()}}
            tmp = partial_path.with_name(partial_path.name + ".tmp")
            tmp.write_text(json.dumps(state))
            os.replace(tmp, partial_path)
        if progress:
            progress(min(1.0, bar.n / max(share, 1)), f"{bar.n}/{share} images, {len(pending)} settings")
    bar.close()
    wall = time.perf_counter() - pass_started

    # Every process's accumulators and skipped files on rank 0, merged exactly.
    seen = world.all_sum([sum(t.accumulators["accuracy"].seen for t in tallies.values())])[0]  # images, all processes
    gathered = world.gather({"tallies": {keys[s]: t.state() for s, t in tallies.items()}, "skipped": skipped, "wall": wall})
    outcome_rows: list[dict[str, Any]] | None = None
    if world.is_main:
        for other in gathered[1:]:
            for setting in pending:
                tallies[setting].merge(Tally.from_state(other["tallies"][keys[setting]], context))
            skipped.extend((int(b), str(r)) for b, r in other["skipped"])
        reasons = [reason for _, reason in sorted(skipped, key=lambda item: item[0])]  # file order (stable within a batch)
        if seen == 0:
            example = reasons[0] if reasons else "no file was loaded"
            error = f"none of the {len(files)} images in {root} could be read (e.g. {example}); check the folder"
        else:
            error = None
            wall_max = max(item["wall"] for item in gathered)
            run_config["pass_seconds"] = wall_max
            run_config["pass_images_per_s"] = sum(t.accumulators["accuracy"].seen for t in tallies.values()) / wall_max if wall_max > 0 else None
            rows = [row for row in previous if row.get("key") not in {keys[s] for s in pending}]
            rows += [make_row(setting, tallies[setting], keys[setting], loaded, config, dconfig, reasons, root).to_json()
                     for setting in pending]
            write_results(out, run_config, rows)
            outcome_rows = load_results(out)["rows"]
        error = world.broadcast(error)
    else:
        error = world.broadcast(None)
    if error:
        raise SweepError(error)
    outcome_rows = world.broadcast(outcome_rows)
    world.barrier()  # the results are written: every process's resume file can go
    if partial_path.exists():
        partial_path.unlink()
    if progress:
        progress(1.0, f"done: {len(pending)} settings on {total} images")
    return SweepOutcome(outcome_rows, run_config, len(pending), len(settings) - len(pending), out)


def make_row(setting: Setting, tally: Tally, key: str, loaded: LoadedModel, config: SweepConfig, dconfig: dict[str, Any],
             skipped: list[str], root: Path) -> SweepRow:
    """The `SweepRow` of one setting from its accumulators (GMACs: the mean over images of each
    image's GMACs from its own token counts)."""
    model = loaded.model
    fields = tally.fields()
    gmacs = fields.get("gmacs")
    if gmacs is None:  # no image was seen
        gmacs = plan_gmacs(model, setting.plan, loaded.extras)
    dense_gmacs = plan_gmacs(model, ReductionPlan())
    method = None if setting.method == DENSE else get_method(setting.method)
    return SweepRow.from_fields({
        **fields,
        "key": key, "model": loaded.name, "weights": loaded.weights_label, "method": setting.method, "label": setting.label,
        "keep_rate": setting.keep_rate, "params": setting.params_dict(), "plan": setting.plan.to_record(),
        "uses_keep_rate": True if method is None else bool(method.uses_keep_rate),
        "n_skipped": len(skipped), "skipped_files": skipped[:50],
        "gmacs": gmacs, "dense_gmacs": dense_gmacs, "gmacs_reduction_pct": 100.0 * (1.0 - gmacs / dense_gmacs),
        "reducing_layers": list(setting.plan.reducing_layers(len(model.blocks))),
        "crop_pct": dconfig["crop_pct"], "limit": config.limit, "data": str(root), "device": loaded.device,
        "batch_size": config.batch_size,
    })
