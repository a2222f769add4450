"""Throughput of the dense and the reduced models: images per second and latency per batch.

What is timed is exactly what `engine.run` does with provenance off (`track=False`), under
`torch.inference_mode`, on seeded random input tensors (no data loading, no preprocessing). For
every batch size, all settings (the dense model and every reduction) are warmed up first and then
timed in *interleaved rounds*: round i times setting 1, setting 2, ... once each. On a shared machine
a burst of foreign load then hits every setting of a round alike instead of one setting's whole
series. Each setting reports the median of its timed repeats and, as its spread, the interquartile
range (25th and 75th percentile) plus the minimum and maximum. `speedup_vs_dense` is the dense
median divided by the setting's median, both measured in the same run.

Two cross-checks for a machine that other processes share: `speedup_min`, the ratio of the fastest
calls (the least disturbed ones), and `speedup_cpu_time`, the ratio of the median process CPU times
(with `threads=1` that is the work done, nearly immune to other load; with more threads it includes
the time threads spin while waiting for each other). `load_average` is the 1-minute load average
after the batch size's timing: above the core count, other processes competed for the cores.

With `bound`, each reduced setting also times its token-count twin (`engine.run_token_count_twin`):
the same blocks at the same token counts, reached by cutting the sequence, with no scoring, no
merging and no attention bias. `speedup_bound` (dense / twin) is the most any method with those
counts could gain on this machine; `method_overhead_pct` (setting / twin - 1) is what the method's
own work costs on top.

On CUDA every timed call is measured with CUDA events recorded on the stream around the call
(`torch.cuda.Event(enable_timing=True)`), after a `synchronize()`, so the time covers the kernels and
not only their launch. Precision (`precision`): float32; `amp-fp16` / `amp-bf16` run the forward under
`torch.autocast`; `half-fp16` / `half-bf16` run a converted copy of the model on converted input
(pure half precision; the shared model is never converted). `amp` alone means float16 autocast on
CUDA and bfloat16 on the CPU.

Beside the times, each setting records (outside the timed calls): its peak memory
(`torch.cuda.max_memory_allocated` after a reset on CUDA; on the CPU the process's peak resident set,
`VmHWM`, after resetting it through `/proc/self/clear_refs`, so the number is that setting's own), the
scaled-dot-product-attention kernel that actually ran (from the profiler's op names: flash,
memory-efficient, cuDNN or math), and the environment (CPU, GPU, driver, CUDA, torch, timm). With
`compile`, every setting whose token counts do not depend on the input runs through `torch.compile`;
its compile time (the first call) and the number of graphs and recompiles are recorded, and a setting
whose shapes change with the data (per-image counts) is timed uncompiled and flagged. With
`oom_halving` (CUDA), a batch size that runs out of memory is halved until it fits, as timm's
benchmark script does, and the row says from where.
"""
from __future__ import annotations

import copy
import csv
import ctypes
import functools
import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from . import engine
from .engine import method_unavailable, run, run_token_count_twin
from .errors import BenchError, PlanError
from .gmacs import plan_gmacs, token_counts
from .lists import comma_list
from .models import LoadedModel
from .plan import ReductionPlan
from .registry import get_method

# The columns of results.csv, in order: the ones the issue names, then the spread and the context.
CSV_COLUMNS: tuple[str, ...] = (
    "model", "method", "keep_rate", "r", "batch_size", "dtype", "device",
    "images_per_s", "latency_ms", "gmacs", "speedup_vs_dense",
    "latency_ms_q1", "latency_ms_q3", "latency_ms_min", "latency_ms_max",
    "images_per_s_q1", "images_per_s_q3", "gmacs_ratio", "token_counts",
    "speedup_min", "cpu_time_ms", "speedup_cpu_time", "load_average",
    "threads", "repeats", "warmup", "weights", "provenance_overhead_pct", "allocator",
    "bound_latency_ms", "speedup_bound", "method_overhead_pct",
    "peak_memory_mb", "memory_kind", "sdpa_backend", "compiled", "compile_s", "graphs", "recompiles", "shape_note",
    "batch_size_requested", "timer", "params", "env_cpu", "env_gpu", "env_driver", "env_cuda", "env_torch", "env_timm",
)
PRECISIONS = ("float32", "amp-fp16", "amp-bf16", "half-fp16", "half-bf16")


@dataclass(frozen=True)
class BenchSetting:
    """One timed configuration: the dense model or one method at one keep rate (or ToMe's r).

    Attributes:
        method: "none" or a registered method name.
        keep_rate: the keep rate (of the plan, or of the budget a method without one meets).
        r: the merges per block of a method driven by an `r` parameter (ToMe), or None.
        plan: the `ReductionPlan` that is run.
    """

    method: str
    keep_rate: float
    r: int | None
    plan: ReductionPlan

    @property
    def label(self) -> str:
        if self.method == "none":
            return "dense"
        text = f"{self.method} r={self.r}" if self.r is not None else f"{self.method} keep={self.keep_rate:g}"
        return text + (" prop_attn=off" if dict(self.plan.params).get("prop_attn") is False else "")


@dataclass
class BenchRow:
    """One row of results.csv; times in milliseconds per batch, throughput in images per second."""

    model: str
    method: str
    keep_rate: float
    r: int | None
    batch_size: int
    dtype: str
    device: str
    images_per_s: float
    latency_ms: float
    gmacs: float
    speedup_vs_dense: float
    latency_ms_q1: float
    latency_ms_q3: float
    latency_ms_min: float
    latency_ms_max: float
    images_per_s_q1: float
    images_per_s_q3: float
    gmacs_ratio: float
    token_counts: str
    threads: int
    repeats: int
    warmup: int
    weights: str
    speedup_min: float = float("nan")
    cpu_time_ms: float = float("nan")
    speedup_cpu_time: float = float("nan")
    load_average: float | None = None
    provenance_overhead_pct: float | None = None
    allocator: str = "system"
    bound_latency_ms: float | None = None
    speedup_bound: float | None = None
    method_overhead_pct: float | None = None
    peak_memory_mb: float | None = None
    memory_kind: str = ""
    sdpa_backend: str = ""
    compiled: bool = False
    compile_s: float | None = None
    graphs: int | None = None
    recompiles: int | None = None
    shape_note: str = ""
    batch_size_requested: int | None = None
    timer: str = "perf_counter"
    params: str = ""
    env_cpu: str = ""
    env_gpu: str = ""
    env_driver: str = ""
    env_cuda: str = ""
    env_torch: str = ""
    env_timm: str = ""
    samples_ms: list[float] = field(default_factory=list, repr=False)

    def csv_record(self) -> dict[str, Any]:
        record = asdict(self)
        record.pop("samples_ms")
        for name, value in record.items():
            if isinstance(value, float) and math.isfinite(value):
                record[name] = round(value, 4)
        return {name: ("" if record[name] is None else record[name]) for name in CSV_COLUMNS}

    def describe(self) -> str:
        """One printed line: the number together with device, dtype, batch size and threads."""
        what = "dense" if self.method == "none" else (
            f"{self.method} r={self.r}" if self.r is not None else f"{self.method} keep={self.keep_rate:g}")
        if '"prop_attn": false' in self.params:
            what += " prop_attn=off"
        line = (
            f"{self.model} {what:<14} | {self.device} {self.dtype} batch {self.batch_size} threads {self.threads}"
            f"{' steady-alloc' if self.allocator == 'steady' else ''} | "
            f"{self.images_per_s:8.1f} img/s (IQR {self.images_per_s_q1:.1f}-{self.images_per_s_q3:.1f}) | "
            f"latency {self.latency_ms:9.1f} ms median, IQR {self.latency_ms_q1:.1f}-{self.latency_ms_q3:.1f}, "
            f"min {self.latency_ms_min:.1f}, max {self.latency_ms_max:.1f} ({self.repeats} repeats) | "
            f"{self.gmacs:.2f} GMACs | speedup {self.speedup_vs_dense:.2f}x (GMACs ratio {self.gmacs_ratio:.2f}x; "
            f"ratio of minima {self.speedup_min:.2f}x, of CPU times {self.speedup_cpu_time:.2f}x)"
        )
        if self.load_average is not None:
            line += f" | load {self.load_average:.1f}"
        if self.provenance_overhead_pct is not None:
            line += f" | provenance {self.provenance_overhead_pct:+.1f}%"
        if self.speedup_bound is not None:
            line += (f" | token-count bound {self.bound_latency_ms:.1f} ms = {self.speedup_bound:.2f}x, "
                     f"method overhead {self.method_overhead_pct:+.1f}%")
        if self.peak_memory_mb is not None:
            line += f" | peak {self.peak_memory_mb:.0f} MB ({self.memory_kind})"
        if self.sdpa_backend:
            line += f" | SDPA {self.sdpa_backend}"
        if self.compiled:
            line += f" | compiled in {self.compile_s:.1f} s, {self.graphs} graphs, {self.recompiles} recompiles"
        if self.shape_note:
            line += f" | {self.shape_note}"
        if self.batch_size_requested is not None and self.batch_size_requested != self.batch_size:
            line += f" | batch {self.batch_size_requested} ran out of memory, halved to {self.batch_size}"
        return line


def parse_list(text: str | Iterable, kind: type, what: str) -> list:
    """'0.7,0.5' -> [0.7, 0.5] (any iterable passes through converted). Raises BenchError, also for an empty list."""
    values = comma_list(text, kind, what, BenchError)
    if not values:
        raise BenchError(f"{what} is empty")
    return values


def make_settings(methods: Iterable[str], keep_rates: Iterable[float] = (0.7,), r_values: Iterable[int] | None = None,
                  depth: int = 12, n0: int = 197, method_params: dict[str, dict[str, Any]] | None = None,
                  prop_attn_both: bool = False) -> list[BenchSetting]:
    """The settings to time: the dense model first (always, the speedups need it), then each
    method at each keep rate. A method without a keep rate runs at each keep rate's token budget
    (`Method.budget` for a model of `depth` blocks and `n0` tokens), or, when `r_values` are given
    and it has an `r` parameter (ToMe, PiToMe, ...), at each of those r instead. With
    `prop_attn_both`, a method with a boolean `prop_attn` parameter the user did not set runs with
    it on and off (two settings each; the float mask of proportional attention rules out flash).

    Raises:
        BenchError: a keep rate outside (0, 1].
        PlanError: a method that is not registered (the message lists the registered ones), or a
            bad method parameter.
    """
    settings = [BenchSetting("none", 1.0, None, ReductionPlan())]
    rates = list(dict.fromkeys(float(rate) for rate in keep_rates))
    for rate in rates:
        if not 0.0 < rate <= 1.0:
            raise BenchError(f"keep rate must be in (0, 1], got {rate}")
    for name in dict.fromkeys(m.strip() for m in methods if m.strip()):
        if name in ("none", "dense"):
            continue
        method = get_method(name)
        user = dict((method_params or {}).get(name, {}))
        if method.uses_keep_rate:
            for rate in rates:
                settings.append(BenchSetting(name, rate, None, ReductionPlan.make(name, rate, **user)))
        elif r_values is not None and method.param("r") is not None and "r" not in user:
            for r in dict.fromkeys(int(r) for r in r_values):
                settings.append(BenchSetting(name, 1.0, int(r), ReductionPlan.make(name, 1.0, **{**user, "r": int(r)})))
        else:
            for rate in rates:
                plan = method.budget(rate, depth, n0)
                plan = ReductionPlan.make(plan.method, plan.keep_rate, plan.layers, **{**dict(plan.params), **user})
                settings.append(BenchSetting(name, rate, None, plan))
    if prop_attn_both:
        doubled = []
        for setting in settings:
            doubled.append(setting)
            spec = None if setting.method == "none" else get_method(setting.method).param("prop_attn")
            if spec is not None and spec.kind == "bool" and "prop_attn" not in (method_params or {}).get(setting.method, {}):
                params = dict(setting.plan.params)
                flipped = not params.get("prop_attn", spec.default)
                plan = ReductionPlan.make(setting.plan.method, setting.plan.keep_rate, setting.plan.layers, **{**params, "prop_attn": flipped})
                doubled.append(BenchSetting(setting.method, setting.keep_rate, setting.r, plan))
        settings = doubled
    return settings


def random_images(model: torch.nn.Module, batch_size: int, device: str, seed: int = 0) -> torch.Tensor:
    """[batch_size, C, H, W] float32 standard-normal input of the model's size, seeded (generated on the CPU)."""
    size = model.patch_embed.img_size
    height, width = (size, size) if isinstance(size, int) else size
    channels = model.patch_embed.proj.in_channels
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, channels, height, width, generator=generator).to(device)


def resolve_precision(device: str, amp: bool, precision: str | None) -> str:
    """The precision of a run (one of `PRECISIONS`): `precision` if given, else `amp`'s autocast
    (float16 on CUDA, bfloat16 on the CPU, which has no useful float16 autocast) or float32.
    Raises BenchError for an unknown name."""
    if precision is None:
        return ("amp-fp16" if device == "cuda" else "amp-bf16") if amp else "float32"
    if precision not in PRECISIONS:
        raise BenchError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def dtype_label(device: str, amp: bool, precision: str | None = None) -> str:
    """The row's dtype text: float32, float16-autocast, bfloat16-autocast, float16 or bfloat16."""
    chosen = resolve_precision(device, amp, precision)
    return {"float32": "float32", "amp-fp16": "float16-autocast", "amp-bf16": "bfloat16-autocast",
            "half-fp16": "float16", "half-bf16": "bfloat16"}[chosen]


def _autocast(device: str, precision: str):
    if not precision.startswith("amp-"):
        return torch.autocast(device_type=device, enabled=False)
    return torch.autocast(device_type=device, dtype=torch.float16 if precision == "amp-fp16" else torch.bfloat16)


def _half_dtype(precision: str) -> torch.dtype | None:
    return {"half-fp16": torch.float16, "half-bf16": torch.bfloat16}.get(precision)


def _timed_call(fn: Callable[[], Any], device: str) -> tuple[float, float]:
    """(seconds, process CPU seconds) of one call. On CUDA the seconds come from CUDA events
    recorded around the call on the current stream (after a synchronize, so earlier work is not
    counted), which time the kernels themselves; on the CPU from `time.perf_counter`. CPU time counts
    every thread: on a quiet machine it is about threads x wall; far less means the process waited
    for cores that other processes held."""
    if device == "cuda":
        torch.cuda.synchronize()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        cpu_start = time.process_time()
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3, time.process_time() - cpu_start
    cpu_start = time.process_time()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start, time.process_time() - cpu_start


def environment() -> dict[str, str]:
    """What a row was measured on: env_cpu, env_gpu, env_driver, env_cuda, env_torch, env_timm."""
    import timm

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    env = {"env_cpu": f"{cpu} ({os.cpu_count()} cores)", "env_gpu": "", "env_driver": "", "env_cuda": torch.version.cuda or "",
           "env_torch": torch.__version__, "env_timm": timm.__version__}
    if torch.cuda.is_available():
        env["env_gpu"] = torch.cuda.get_device_name()
        try:
            version = torch._C._cuda_getDriverVersion()  # noqa: SLF001 - the driver's CUDA version, e.g. 12040
            env["env_driver"] = f"{version // 1000}.{version % 1000 // 10}"
        except (AttributeError, RuntimeError):
            pass
    return env


def _reset_peak_memory(device: str) -> bool:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return True
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # Linux: reset the peak resident set size (VmHWM) to the current one
        return True
    except OSError:
        return False


def _peak_memory_mb(device: str) -> tuple[float | None, str]:
    """(peak MB since `_reset_peak_memory`, what was measured)."""
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20, "cuda max_memory_allocated"
    try:
        with open("/proc/self/status") as handle:
            line = next(line for line in handle if line.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024, "process peak RSS"
    except (OSError, StopIteration, ValueError):
        return None, ""


SDPA_KERNELS = (("flash", "flash_attention"), ("memory-efficient", "efficient_attention"), ("cudnn", "cudnn_attention"),
                ("math", "attention_math"))


def sdpa_backends(fn: Callable[[], Any]) -> str:
    """The scaled-dot-product-attention kernels one call of `fn` ran, from the profiler's aten op
    names (`aten::_scaled_dot_product_flash_attention[_for_cpu]`, `..._efficient_attention`,
    `..._cudnn_attention`, `..._attention_math`): e.g. "flash", or "flash+math" when blocks differ
    (a float mask, such as proportional attention's, rules flash out); "" when none ran."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = {event.key for event in prof.key_averages() if "scaled_dot_product" in event.key}
    return "+".join(label for label, needle in SDPA_KERNELS if any(needle in name for name in names))


def _dynamo_counts() -> tuple[int, int]:
    """(graphs compiled so far, recompiles so far) from torch._dynamo's counters."""
    from torch._dynamo.utils import counters

    graphs = int(counters["stats"].get("unique_graphs", 0))
    recompiles = sum(int(v) for v in counters["recompiles"].values()) if "recompiles" in counters else 0
    return graphs, recompiles


def data_dependent_shapes(model: torch.nn.Module, plan: ReductionPlan, extras: dict[str, Any], device: str) -> bool:
    """Whether a plan's token counts change with the input (per-image budgets): two seeded random
    batches compared. Such a setting recompiles for every new shape, so it is not compiled."""
    if plan.method == "none":
        return False
    counts = []
    for seed in (1, 2):
        images = random_images(model, 2, device, seed)
        result = run(model, images, plan, extras=extras, track=False)
        counts.append((tuple(result.token_counts), None if result.image_token_counts is None else result.image_token_counts.tolist()))
    return counts[0] != counts[1]


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


ALLOCATORS = ("system", "steady")


def use_steady_allocator() -> bool:
    """Make glibc's malloc keep freed memory instead of handing it back to the kernel.

    By default glibc serves every allocation over its mmap threshold (at most 32 MB, e.g. DeiT-S's
    32 x 197 x 1536 float32 MLP activations) with fresh pages, and each first touch of a page is a
    page fault: about 178k per dense DeiT-S forward at batch 32 on the test machine, roughly 15 % of
    its time, and how many a reduced model takes depends on what ran before it (the threshold adapts
    to past frees), so speedups move with the order of the runs. `mallopt(M_MMAP_MAX, 0)` and a 2 GB
    `M_TRIM_THRESHOLD` keep everything on the heap and never trim it: after the warm-up a forward
    takes almost no page faults, whatever ran before (what a caching allocator such as jemalloc or
    tcmalloc gives a deployed service). Process-wide and irreversible; memory is not returned to
    the OS. Returns False where the C library has no `mallopt` (not glibc).
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's <malloc.h> constants
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


@dataclass
class BenchConfig:
    """What to run.

    Attributes:
        batch_sizes: images per forward call.
        warmup: untimed calls per setting before timing (at least 1 is wise: first calls allocate).
        repeats: timed calls per setting (interleaved rounds).
        amp: autocast (float16 on CUDA, bfloat16 on CPU).
        threads: torch intra-op threads (None: leave torch's setting).
        seed: input seed.
        provenance: also time each reduced setting with `track=True` and report the overhead.
        allocator: "system" (the C library's default) or "steady" (glibc only, see
            `use_steady_allocator`; changes the whole process for good, so the app never uses it).
        bound: also time each reduced setting's token-count twin (`engine.run_token_count_twin`:
            the same token counts by plain truncation, no method work) and report the speedup
            that the counts alone allow and the method's own overhead.
        precision: one of `PRECISIONS` (None: from `amp`).
        compile: run each fixed-shape setting through `torch.compile` (see the module docstring).
        memory: record each setting's peak memory (one extra untimed call).
        sdpa: record the attention kernel that ran (one extra profiled call).
        oom_halving: on CUDA, halve a batch size that runs out of memory until it fits.
    """

    batch_sizes: tuple[int, ...] = (32,)
    warmup: int = 2
    repeats: int = 10
    amp: bool = False
    threads: int | None = None
    seed: int = 0
    provenance: bool = False
    allocator: str = "system"
    bound: bool = False
    precision: str | None = None
    compile: bool = False
    memory: bool = True
    sdpa: bool = True
    oom_halving: bool = True

    def validate(self) -> None:
        if self.precision is not None and self.precision not in PRECISIONS:
            raise BenchError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.allocator not in ALLOCATORS:
            raise BenchError(f"allocator must be one of {', '.join(ALLOCATORS)}, got {self.allocator!r}")
        if not self.batch_sizes or any(int(b) < 1 for b in self.batch_sizes):
            raise BenchError(f"batch sizes must be positive integers, got {','.join(map(str, self.batch_sizes)) or 'none'}")
        if self.repeats < 1:
            raise BenchError(f"repeats must be at least 1, got {self.repeats}")
        if self.warmup < 0:
            raise BenchError(f"warmup must be 0 or more, got {self.warmup}")
        if self.threads is not None and self.threads < 1:
            raise BenchError(f"threads must be at least 1, got {self.threads}")


def run_benchmark(
    loaded: LoadedModel,
    settings: list[BenchSetting],
    config: BenchConfig,
    progress: Callable[[float, str], None] | None = None,
) -> list[BenchRow]:
    """Time every setting at every batch size (see the module docstring for the protocol).

    Args:
        loaded: the model (never modified); its device is where everything runs.
        settings: from `make_settings`; the first must be the dense model.
        config: batch sizes, warm-up, repeats, precision, threads.
        progress: optional callback(fraction done in [0, 1], text) called after every timed call.
    Returns:
        one `BenchRow` per (batch size, setting), dense first within each batch size.
    Raises:
        BenchError / PlanError: bad configuration, or a plan that does not fit the model.
    """
    config.validate()
    if not settings or settings[0].method != "none":
        raise BenchError("the first benchmark setting must be the dense model (make_settings puts it there)")
    model = loaded.model
    device = loaded.device
    depth = len(model.blocks)
    for setting in settings:
        setting.plan.validate(depth)
        if setting.method != "none":
            method = get_method(setting.method)
            reason = method_unavailable(method, loaded.model, loaded.extras)
            if reason:
                raise PlanError(f"{method.label} cannot run: {reason}")
    if config.allocator == "steady" and not use_steady_allocator():
        raise BenchError("the steady allocator needs glibc's mallopt, which this C library lacks: use --allocator system")
    if config.threads is not None:
        torch.set_num_threads(int(config.threads))
    threads = torch.get_num_threads()
    precision = resolve_precision(device, config.amp, config.precision)
    dtype = dtype_label(device, config.amp, precision)
    extras = loaded.extras
    env = environment()
    half = _half_dtype(precision)
    if half is not None:
        model = copy.deepcopy(model).to(half)  # a converted copy: the loaded model stays as it is

    # GMACs per image and token counts (one dummy forward per reduced plan), outside the timed region.
    counts = {setting.plan: token_counts(model, setting.plan, extras) for setting in settings}
    gmacs = {setting.plan: plan_gmacs(model, setting.plan, extras, counts[setting.plan]) for setting in settings}

    reduced = [s for s in settings if s.method != "none"]
    modes = ["plain"] + (["provenance"] if config.provenance else []) + (["twin"] if config.bound else [])
    jobs = [(s, "plain") for s in settings] + [(s, mode) for mode in modes[1:] for s in reduced]
    total = len(config.batch_sizes) * len(jobs) * (config.warmup + config.repeats)
    done = 0
    rows: list[BenchRow] = []
    suffix = {"plain": "", "provenance": " (provenance on)", "twin": " (token-count twin)"}
    # torch.compile: fixed-shape settings only (a data-dependent count recompiles for every shape).
    varying = {s.plan: data_dependent_shapes(model, s.plan, extras, device) for s in settings} if config.compile else {}
    compiled: dict[ReductionPlan, Callable] = {}
    compile_info: dict[ReductionPlan, tuple[float, int, int]] = {}
    if config.compile:
        forward = getattr(engine.run, "__wrapped__", engine.run)  # without inference_mode, which dynamo cannot trace
        for setting in settings:
            if not varying[setting.plan]:
                compiled[setting.plan] = torch.compile(functools.partial(forward, model, plan=setting.plan, extras=extras, track=False))
    for requested in config.batch_sizes:
        batch_size = int(requested)
        while True:
            try:
                measured = _measure_batch(model, extras, settings, jobs, counts, compiled, compile_info, config, device, precision, half,
                                          batch_size, progress, done, total, suffix)
                break
            except torch.cuda.OutOfMemoryError:
                if not (device == "cuda" and config.oom_halving and batch_size > 1):
                    raise BenchError(f"batch size {batch_size} does not fit in the GPU's memory: use smaller --batch-sizes") from None
                torch.cuda.empty_cache()
                batch_size //= 2  # timm's benchmark: halve and try again
        samples, cpu_samples, memory, backends = measured
        done += len(jobs) * (config.warmup + config.repeats)
        load = _load_average()
        dense_median = statistics.median(samples[(settings[0], "plain")])
        dense_min = min(samples[(settings[0], "plain")])
        dense_cpu = statistics.median(cpu_samples[(settings[0], "plain")])
        for setting in settings:
            times = samples[(setting, "plain")]
            median = statistics.median(times)
            q1, q3 = _quantile(times, 0.25), _quantile(times, 0.75)
            overhead = bound = None
            if (setting, "provenance") in samples:
                overhead = 100.0 * (statistics.median(samples[(setting, "provenance")]) / median - 1.0)
            if (setting, "twin") in samples:
                bound = statistics.median(samples[(setting, "twin")])
            rows.append(BenchRow(
                model=loaded.name, method=setting.method, keep_rate=setting.keep_rate, r=setting.r,
                batch_size=int(batch_size), dtype=dtype, device=device,
                images_per_s=batch_size / median, latency_ms=1e3 * median,
                gmacs=gmacs[setting.plan], speedup_vs_dense=dense_median / median,
                latency_ms_q1=1e3 * q1, latency_ms_q3=1e3 * q3,
                latency_ms_min=1e3 * min(times), latency_ms_max=1e3 * max(times),
                images_per_s_q1=batch_size / q3, images_per_s_q3=batch_size / q1,
                gmacs_ratio=gmacs[settings[0].plan] / gmacs[setting.plan],
                token_counts=" ".join(map(str, counts[setting.plan])),
                threads=threads, repeats=config.repeats, warmup=config.warmup, weights=loaded.weights_label,
                speedup_min=dense_min / min(times),
                cpu_time_ms=1e3 * statistics.median(cpu_samples[(setting, "plain")]),
                speedup_cpu_time=dense_cpu / statistics.median(cpu_samples[(setting, "plain")]),
                bound_latency_ms=None if bound is None else 1e3 * bound,
                speedup_bound=None if bound is None else dense_median / bound,
                method_overhead_pct=None if bound is None else 100.0 * (median / bound - 1.0),
                provenance_overhead_pct=overhead, load_average=load, allocator=config.allocator, samples_ms=[1e3 * t for t in times],
                peak_memory_mb=memory.get(setting.plan, (None, ""))[0], memory_kind=memory.get(setting.plan, (None, ""))[1],
                sdpa_backend=backends.get(setting.plan, ""), compiled=setting.plan in compiled,
                compile_s=compile_info.get(setting.plan, (None, None, None))[0],
                graphs=compile_info.get(setting.plan, (None, None, None))[1],
                recompiles=compile_info.get(setting.plan, (None, None, None))[2],
                shape_note="token counts depend on the input: not compiled" if varying.get(setting.plan) else "",
                batch_size_requested=int(requested), params=json.dumps(dict(setting.plan.params), sort_keys=True, default=str), timer="cuda events" if device == "cuda" else "perf_counter", **env,
            ))
    return rows


def _measure_batch(model, extras, settings, jobs, counts, compiled, compile_info, config: BenchConfig, device: str, precision: str,
                   half: torch.dtype | None, batch_size: int, progress, done: int, total: int, suffix: dict[str, str]):
    """One batch size: compile (first call) where asked, memory and attention kernel per setting,
    then warm-up and interleaved timing. Returns (samples, cpu_samples, memory, backends)."""
    images = random_images(model, batch_size, device, config.seed)
    if half is not None:
        images = images.to(half)
    samples: dict[tuple[BenchSetting, str], list[float]] = {job: [] for job in jobs}
    cpu_samples: dict[tuple[BenchSetting, str], list[float]] = {job: [] for job in jobs}

    def call(setting: BenchSetting, mode: str):
        if mode == "twin":
            acts = get_method(setting.method).acts
            return lambda: run_token_count_twin(model, images, counts[setting.plan], acts)
        if mode == "plain" and setting.plan in compiled:
            return lambda: compiled[setting.plan](images)
        return lambda: run(model, images, setting.plan, extras=extras, track=mode == "provenance")

    memory: dict[ReductionPlan, tuple[float | None, str]] = {}
    backends: dict[ReductionPlan, str] = {}
    # compiled code runs under no_grad (dynamo cannot trace inference-mode tensors); the rest under inference_mode
    grad_off = torch.no_grad() if compiled else torch.inference_mode()
    with grad_off, _autocast(device, precision):
        for setting in settings:
            if setting.plan in compiled and setting.plan not in compile_info:
                before = _dynamo_counts()
                started = time.perf_counter()
                call(setting, "plain")()
                if device == "cuda":
                    torch.cuda.synchronize()
                after = _dynamo_counts()
                compile_info[setting.plan] = (time.perf_counter() - started, after[0] - before[0], after[1] - before[1])
            if config.memory and _reset_peak_memory(device):
                call(setting, "plain")()
                memory[setting.plan] = _peak_memory_mb(device)
            if config.sdpa:
                backends[setting.plan] = sdpa_backends(call(setting, "plain"))
        for phase, count in (("warm-up", config.warmup), ("timing", config.repeats)):
            for round_index in range(count):
                for setting, mode in jobs:
                    seconds, cpu_seconds = _timed_call(call(setting, mode), device)
                    if phase == "timing":
                        samples[(setting, mode)].append(seconds)
                        cpu_samples[(setting, mode)].append(cpu_seconds)
                    done += 1
                    if progress is not None:
                        progress(done / total, f"batch {batch_size}: {phase} {round_index + 1}/{count}, {setting.label}{suffix[mode]}")
    return samples, cpu_samples, memory, backends


def contention_note(rows: list[BenchRow]) -> str | None:
    """A one-line warning when the load average during timing exceeded the thread count by more
    than one, i.e. other processes competed for the cores and the numbers are unreliable; else None."""
    loads = [row.load_average for row in rows if row.load_average is not None and row.device == "cpu"]
    if not loads or not rows:
        return None
    worst = max(loads)
    cores = os.cpu_count() or 1
    if worst <= max(cores, rows[0].threads) + 1.0:
        return None
    return (f"load average reached {worst:.1f} on {cores} cores while timing: other processes competed for the CPU, "
            "so these times are inflated and the speedups unreliable; re-run on an idle machine")


def _load_average() -> float | None:
    """The 1-minute load average (runnable processes; above the core count means contention), or None."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def write_csv(rows: list[BenchRow], out_dir: str | Path) -> Path:
    """Write `results.csv` (columns `CSV_COLUMNS`) into `out_dir` (created if needed); returns its path."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BenchError(f"cannot create the output folder {str(out)!r}: {err.strerror}") from None
    path = out / "results.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(CSV_COLUMNS))
        writer.writeheader()
        for row in rows:
            writer.writerow(row.csv_record())
    return path
