"""``selkernels bench``: the fused ops against what users run today, at shapes from real networks.

For every case each *variant* (the fused op and its baselines) is timed forward and forward+backward
in one process, on one machine, so the ratios are comparable. Reported per case:

* medians over short blocks of calls (torch.utils.benchmark.Timer with an explicit thread count on
  CPU; the Timer synchronises the device around every block on CUDA), forward and forward+backward.
  The variants of a case are timed round-robin, block by block, so that load from other processes
  falls on all of them alike;
* fused speed-up over every baseline;
* bandwidth as a fraction of ``x.sum()`` on the same tensor in the same run:
  ``t(x.sum()) / t(fused forward)`` (1.0 = the op reads x as fast as torch's own reduction);
* peak extra memory of forward+backward: the highest number of bytes torch held above the level at
  the start of ``out = op(x); torch.autograd.grad(out.sum(), x)`` (the inputs are already allocated).
  On CUDA from ``torch.cuda.max_memory_allocated``; on CPU from the allocation events that
  ``torch.profiler`` records with ``profile_memory=True`` (torch's CPU allocator has no peak counter).

Forward+backward always calls ``torch.autograd.grad(out.sum(), x)`` so that no variant pays a
``.grad`` accumulation the others do not. The fused backward returns a stride-0 broadcast of an
[N, C] tensor; a user accumulating into ``x.grad`` would materialise it (one write of x's size).

The training-step suite (:mod:`selkernels.bench_step`: the regularizer inside a real step, and the
modeled GPU cost per step) runs first; ``--family step`` runs only it.

Op families plug in through :func:`register_suite`: a function ``(config) -> list[Case]``. A family
that has ``(title, [(name, callable), ...])`` groups uses :func:`cases_from_groups`.
"""
from __future__ import annotations

import csv
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch.utils import benchmark as tbench

__all__ = [
    "BenchConfig",
    "Case",
    "Workload",
    "register_suite",
    "cases_from_groups",
    "selectivity_cases",
    "torch_selectivity",
    "collect_cases",
    "run",
    "format_table",
    "write_outputs",
]

# Order matters: the fused op first, then the baselines it is compared against.
FUSED = "fused"


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------
@dataclass
class BenchConfig:
    device: str = "cpu"
    dtypes: Tuple[str, ...] = ("float32", "bfloat16")
    threads: int = 0  # 0: torch's current setting
    quick: bool = False
    min_run_time: float = 0.2  # seconds of timed calls per variant and mode, on average
    block_time: float = 0.0005  # seconds per timed block: short blocks are rarely hit by preemption
    min_rounds: int = 7
    compile: bool = True
    filter: str = ""


@dataclass
class Workload:
    """A built case: callables that close over their inputs.

    ``forward[v]()`` runs variant v's forward; ``forward_backward[v]()`` (optional) its forward and
    ``torch.autograd.grad`` of the summed output. ``bandwidth_input`` is the tensor whose ``sum()``
    sets the bandwidth reference (None: no bandwidth column).
    """

    forward: Dict[str, Callable[[], object]]
    forward_backward: Dict[str, Callable[[], object]] = field(default_factory=dict)
    bandwidth_input: Optional[torch.Tensor] = None
    notes: Dict[str, str] = field(default_factory=dict)  # variant -> remark (compile time, or why it is missing)


@dataclass
class Case:
    family: str
    name: str
    dtype: str
    shape: str
    build: Callable[[BenchConfig], Workload]  # builds tensors lazily, one case in memory at a time


_SUITES: Dict[str, Callable[[BenchConfig], List[Case]]] = {}


def register_suite(family: str):
    """Decorator: ``@register_suite("covariance") def cases(config) -> list[Case]``."""

    def wrap(fn):
        _SUITES[family] = fn
        return fn

    return wrap


def cases_from_groups(family: str, groups: Iterable[Tuple[str, Sequence[Tuple[str, Callable[[], object]]]]], *,
                      dtype: str = "", mode: str = "fwd") -> List[Case]:
    """Cases from ``(title, [(name, callable), ...])`` groups, the first callable being the fused op.

    Each group is one case whose variants are timed as given (``mode`` labels what a call does);
    speed-ups are relative to the first. Callables must finish their own device work (synchronise).
    """
    cases = []
    groups = [(title, list(pairs)) for title, pairs in groups]
    titles = [title for title, _ in groups]
    for title, pairs in groups:
        if titles.count(title) > 1:  # e.g. the same shape timed forward and forward+backward
            title = f"{title} [{pairs[0][0]}]"

        def build(cfg, pairs=pairs, mode=mode):
            table = {name: fn for name, fn in pairs}
            return Workload(forward=table) if mode == "fwd" else Workload(forward={}, forward_backward=table)

        cases.append(Case(family, title, dtype, "", build))
    return cases


# ----------------------------------------------------------------------------------------------
# Selectivity suite
# ----------------------------------------------------------------------------------------------
def torch_selectivity(x: torch.Tensor, labels: torch.Tensor, num_classes: int, eps: float = 1e-7) -> torch.Tensor:
    """The best eager composition we found: spatial mean, index_add into class sums, SI in torch ops.

    Same result as :func:`selkernels.selectivity_index` (no ignored labels). Written without
    data-dependent shapes so torch.compile can capture it in one graph.
    """
    n, c = x.shape[0], x.shape[1]
    act = x.reshape(n, c, -1).sum(-1, dtype=torch.float32 if x.dtype != torch.float64 else x.dtype)
    act = act / (x.numel() // max(n * c, 1))
    sums = act.new_zeros((num_classes, c)).index_add(0, labels, act)
    counts = act.new_zeros((num_classes,)).index_add(0, labels, act.new_ones((n,)))
    present = counts > 0
    means = sums / counts.clamp_min(1).unsqueeze(1)
    num_present = present.sum()
    mu_max = means.masked_fill(~present.unsqueeze(1), float("-inf")).amax(0)
    mu_rest = (means.sum(0) - mu_max) / (num_present - 1).clamp_min(1)
    si = (mu_max - mu_rest) / (mu_max + mu_rest + eps)
    return torch.where(num_present >= 2, si, torch.zeros_like(si))


# (name, N, C, spatial, K): block outputs of networks the regularizer is used on.
SELECTIVITY_SHAPES = [
    ("resnet20-cifar10 stage1", 128, 16, (32, 32), 10),
    ("resnet20-cifar10 stage2", 128, 32, (16, 16), 10),
    ("resnet20-cifar10 stage3", 128, 64, (8, 8), 10),
    ("resnet18-tinyimagenet", 256, 256, (8, 8), 200),
    ("resnet50-imagenet (scaled)", 128, 512, (4, 4), 1000),
]
# bf16 on the shapes with the most distinct regimes, to keep the default run short.
SELECTIVITY_BF16 = {"resnet20-cifar10 stage1", "resnet18-tinyimagenet", "resnet50-imagenet (scaled)"}
SELECTIVITY_QUICK_SHAPES = [
    ("tiny K=10", 16, 4, (4, 4), 10),
    ("tiny K=50", 32, 8, (2, 2), 50),
]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def _fwd_bwd(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Callable[[], object]:
    return lambda: torch.autograd.grad(fn(x).sum(), x)


def _build_selectivity(n: int, c: int, spatial: Tuple[int, ...], k: int, dtype: torch.dtype):
    from . import reference
    from .ops import selectivity_index

    def build(cfg: BenchConfig) -> Workload:
        gen = torch.Generator().manual_seed(0)
        # Post-ReLU activations: non-negative, as the SI assumes.
        x = torch.rand((n, c) + tuple(spatial), generator=gen).to(device=cfg.device, dtype=dtype)
        labels = torch.randint(0, k, (n,), generator=gen).to(cfg.device)
        xg = x.clone().requires_grad_(True)
        ops = {
            FUSED: lambda t: selectivity_index(t, labels, k),
            "paper": lambda t: reference.paper_class_selectivity(t, labels),
            "eager": lambda t: torch_selectivity(t, labels, k),
        }
        work = Workload(forward={v: (lambda f=f: f(x)) for v, f in ops.items()},
                        forward_backward={v: _fwd_bwd(f, xg) for v, f in ops.items()},
                        bandwidth_input=x)
        if cfg.compile:
            try:
                torch._dynamo.reset()  # a fresh cache per case: static shapes, no recompile limit
                compiled = torch.compile(torch_selectivity, dynamic=False)
                fwd = lambda: compiled(x, labels, k)  # noqa: E731
                fwd_bwd = lambda: torch.autograd.grad(compiled(xg, labels, k).sum(), xg)  # noqa: E731
                t0 = time.perf_counter()
                fwd(), fwd_bwd()  # compile both graphs now, outside the timed region
                work.notes["compiled"] = f"compiled in {time.perf_counter() - t0:.1f} s (excluded from timings)"
                work.forward["compiled"] = fwd
                work.forward_backward["compiled"] = fwd_bwd
            except Exception as err:  # noqa: BLE001 - report any compiler failure as n/a
                work.notes["compiled"] = f"torch.compile failed: {type(err).__name__}: {str(err)[:200]}"
        return work

    return build


@register_suite("selectivity")
def selectivity_cases(cfg: BenchConfig) -> List[Case]:
    shapes = SELECTIVITY_QUICK_SHAPES if cfg.quick else SELECTIVITY_SHAPES
    cases = []
    for dtype_name in cfg.dtypes:
        for name, n, c, spatial, k in shapes:
            if dtype_name == "bfloat16" and not cfg.quick and name not in SELECTIVITY_BF16:
                continue
            shape = f"N={n} C={c} {'x'.join(map(str, spatial))} K={k}"
            cases.append(Case("selectivity", name, dtype_name, shape,
                              _build_selectivity(n, c, spatial, k, _DTYPES[dtype_name])))
    return cases


# ----------------------------------------------------------------------------------------------
# Covariance and spectral penalty suite (case builders in selkernels/bench_covariance.py)
# ----------------------------------------------------------------------------------------------
@register_suite("covariance")
def covariance_cases(cfg: BenchConfig) -> List[Case]:
    from .bench_covariance import benchmark_groups

    n, d, ks, spectral_n = (64, 16, (4,), 32) if cfg.quick else (1024, 256, (10, 100), 256)
    return [case for dtype_name in cfg.dtypes if dtype_name == "float32"  # float32 keeps the default run short
            for case in cases_from_groups("covariance", benchmark_groups(n, d, ks, spectral_n, dtype=_DTYPES[dtype_name],
                                                                         device=cfg.device), dtype=dtype_name)]


# ----------------------------------------------------------------------------------------------
# Dataset pass: dataset-level SI of a layer over many batches (ClassSelectivity)
# ----------------------------------------------------------------------------------------------
DATASET_SHAPES = [("tinyimagenet test pass", 40, 128, 256, (8, 8), 200)]  # batches, N, C, spatial, K
DATASET_QUICK_SHAPES = [("tiny pass", 4, 16, 8, (4, 4), 20)]


def published_dataset_pass(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], num_classes: int):
    """What the published analysis scripts run: per batch, a Python loop over the classes with a
    boolean mask, adding each class's summed unit means into float64 running sums."""
    sums = [None] * num_classes
    counts = torch.zeros(num_classes, dtype=torch.int64)
    for x, y in zip(xs, ys):
        act = x.reshape(x.shape[0], x.shape[1], -1).mean(-1)
        counts += torch.bincount(y, minlength=num_classes).cpu()
        for k in range(num_classes):
            part = act[y == k].sum(0).double()
            sums[k] = part if sums[k] is None else sums[k] + part
    return torch.stack(sums), counts


def _build_dataset_pass(batches: int, n: int, c: int, spatial: Tuple[int, ...], k: int, dtype: torch.dtype):
    from .metrics import ClassSelectivity
    from .ops import class_means, selectivity_from_means

    def build(cfg: BenchConfig) -> Workload:
        gen = torch.Generator().manual_seed(0)
        xs = [torch.rand((n, c) + tuple(spatial), generator=gen).to(device=cfg.device, dtype=dtype)
              for _ in range(batches)]
        ys = [torch.randint(0, k, (n,), generator=gen).to(cfg.device) for _ in range(batches)]
        sync = torch.cuda.synchronize if cfg.device.startswith("cuda") else (lambda: None)

        def metric_pass():
            metric = ClassSelectivity(None, k)
            for x, y in zip(xs, ys):
                metric.update_from(x, y)
            out = metric.compute()
            sync()
            return out

        def hand_rolled():  # what the demo did before ClassSelectivity: sum of means * counts
            sums, counts = None, None
            for x, y in zip(xs, ys):
                means, cnt = class_means(x, y, k)
                part = means * cnt.unsqueeze(1)
                sums, counts = (part, cnt) if sums is None else (sums + part, counts + cnt)
            out = selectivity_from_means(sums / counts.clamp_min(1).unsqueeze(1), counts)
            sync()
            return out

        def sums_only():  # the bandwidth reference: read every batch once
            out = [x.sum() for x in xs]
            sync()
            return out

        def published():
            out = published_dataset_pass(xs, ys, k)
            sync()
            return out

        return Workload(forward={FUSED: metric_pass, "hand-rolled": hand_rolled, "x.sum() of each batch": sums_only,
                                 "published loop": published})

    return build


@register_suite("dataset")
def dataset_cases(cfg: BenchConfig) -> List[Case]:
    shapes = DATASET_QUICK_SHAPES if cfg.quick else DATASET_SHAPES
    return [Case("dataset", name, dtype_name, f"{b} x [{n}, {c}, {'x'.join(map(str, sp))}] K={k}",
                 _build_dataset_pass(b, n, c, sp, k, _DTYPES[dtype_name]))
            for dtype_name in cfg.dtypes if dtype_name == "float32"
            for name, b, n, c, sp, k in shapes]


def collect_cases(cfg: BenchConfig, families: Optional[Sequence[str]] = None) -> List[Case]:
    cases = []
    for family, suite in _SUITES.items():
        if families and family not in families:
            continue
        cases += [c for c in suite(cfg) if cfg.filter.lower() in f"{c.family} {c.name} {c.dtype}".lower()]
    return cases


# ----------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------
def _interleaved_medians(fns: Dict[str, Callable[[], object]], cfg: BenchConfig) -> Dict[str, Tuple[float, float, int]]:
    """{name: (median, interquartile range, timed calls)} in seconds per call, measured round-robin.

    Each function is timed in short blocks (``Timer.timeit``, ``block_time`` of calls, at least one
    call) taken in turn, one per function per round, for at least ``min_rounds`` rounds and
    ``min_run_time`` per function on average: load from other processes then falls on all of them
    alike instead of on whichever ran while the machine was busy.
    """
    threads = cfg.threads or torch.get_num_threads()
    timers, number = {}, {}
    for name, fn in fns.items():
        fn()  # warm-up: first-call allocations and lazy initialisation stay out of the timings
        timers[name] = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
        once = timers[name].timeit(1).median
        number[name] = max(1, min(1000, int(cfg.block_time / max(once, 1e-7))))
    blocks: Dict[str, List[float]] = {name: [] for name in fns}
    spent = dict.fromkeys(fns, 0.0)
    rounds = 0
    while rounds < cfg.min_rounds or sum(spent.values()) < cfg.min_run_time * len(fns):
        for name, timer in timers.items():
            t = timer.timeit(number[name]).median  # seconds per call over the block
            blocks[name].append(t)
            spent[name] += t * number[name]
        rounds += 1
    out = {}
    for name, times in blocks.items():
        q = torch.tensor(times, dtype=torch.float64).quantile(torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
        out[name] = (float(q[1]), float(q[2] - q[0]), len(times) * number[name])
    return out


def _peak_extra_bytes(fn: Callable[[], object], device: str) -> Optional[int]:
    """Peak bytes allocated by torch while fn runs, above the level at its start."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return int(peak)
    from torch.profiler import ProfilerActivity, profile

    # Kineto logs every profiler start/stop on stderr; keep the progress bar and table readable.
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn()
            del out
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    # Allocations carry +bytes, frees -bytes: the running sum in time order is the live total.
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return int(peak) if events else None


@dataclass
class Result:
    family: str
    case: str
    dtype: str
    shape: str
    variant: str
    mode: str  # "fwd", "fwd+bwd" or "x.sum"
    median_ms: float
    iqr_ms: float
    runs: int
    peak_extra_mb: Optional[float] = None


def run(cfg: BenchConfig, cases: Sequence[Case], *, progress: bool = True) -> Tuple[List[Result], Dict[str, str]]:
    """Time every case; returns the results and the notes on variants that could not run."""
    from tqdm.auto import tqdm

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    results: List[Result] = []
    notes: Dict[str, str] = {}
    bar = tqdm(cases, desc="selkernels bench", unit="case", disable=not progress, dynamic_ncols=True)
    for case in bar:
        bar.set_postfix_str(f"{case.name} {case.dtype}", refresh=True)
        work = case.build(cfg)
        for variant, note in work.notes.items():
            notes[f"{case.family}/{case.name}/{case.dtype}/{variant}"] = note
        base = dict(family=case.family, case=case.name, dtype=case.dtype, shape=case.shape)
        for mode, table in (("fwd", work.forward), ("fwd+bwd", work.forward_backward)):
            fns = dict(table)
            if mode == "fwd" and work.bandwidth_input is not None:
                fns["x.sum"] = work.bandwidth_input.sum  # interleaved with the forwards it is compared to
            for variant, (med, iqr, runs) in _interleaved_medians(fns, cfg).items():
                peak = _peak_extra_bytes(fns[variant], cfg.device) if mode == "fwd+bwd" else None
                results.append(Result(**base, variant=variant, mode="x.sum" if variant == "x.sum" else mode,
                                      median_ms=med * 1e3, iqr_ms=iqr * 1e3, runs=runs,
                                      peak_extra_mb=None if peak is None else peak / 2**20))
        del work
    return results, notes


# ----------------------------------------------------------------------------------------------
# Summaries and output
# ----------------------------------------------------------------------------------------------
def summarize(results: Sequence[Result]) -> List[dict]:
    """One row per (case, dtype, mode): medians, speed-ups of the first variant (the fused op) over
    each other one, bandwidth fraction and peak memory. ``variants`` lists the row's variants in order.
    """
    keyed: Dict[tuple, Dict[str, Result]] = {}
    xsum: Dict[tuple, float] = {}
    for r in results:
        case_key = (r.family, r.case, r.dtype, r.shape)
        if r.mode == "x.sum":
            xsum[case_key] = r.median_ms
        else:
            keyed.setdefault(case_key + (r.mode,), {})[r.variant] = r
    rows = []
    for key, by in keyed.items():
        family, case, dtype, shape, mode = key
        variants = list(by)
        first = by[variants[0]]
        row = dict(family=family, case=case, dtype=dtype, shape=shape, mode=mode, variants=variants)
        for v in variants:
            row[f"{v}_ms"] = by[v].median_ms
        for v in variants[1:]:
            row[f"speedup_vs_{v}"] = by[v].median_ms / first.median_ms
        torch_baselines = [by[v].median_ms for v in ("eager", "compiled") if v in by]
        if torch_baselines:
            row["speedup_vs_best_torch"] = min(torch_baselines) / first.median_ms
        if key[:4] in xsum:
            row["xsum_ms"] = xsum[key[:4]]
            if mode == "fwd":
                row["bandwidth_vs_xsum"] = xsum[key[:4]] / first.median_ms
        for v in variants:
            if by[v].peak_extra_mb is not None:
                row[f"{v}_peak_mb"] = by[v].peak_extra_mb
        rows.append(row)
    return rows


def _fmt(value, spec: str, missing: str = "n/a") -> str:
    return missing if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _render(header: List[str], body: List[List[str]], left: int) -> List[str]:
    """Text columns (the first ``left``) left-aligned, numbers right-aligned."""
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]

    def line(cells):
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return [line(header), "  ".join("-" * w for w in widths)] + [line(b) for b in body]


def _family_table(rows: Sequence[dict]) -> List[str]:
    variants = rows[0]["variants"]
    if all(r["variants"] == variants for r in rows) or rows[0]["family"] == "selectivity":
        variants = list(dict.fromkeys(v for r in rows for v in r["variants"]))
        baselines = variants[1:]
        has_best = any("speedup_vs_best_torch" in r for r in rows)
        has_bw = any("xsum_ms" in r for r in rows)
        has_mem = any(f"{v}_peak_mb" in r for r in rows for v in variants)
        header = (["case", "dtype", "shape", "mode"] + [f"{v} ms" for v in variants] + (["x.sum ms"] if has_bw else [])
                  + [f"x vs {v}" for v in baselines] + (["x vs best"] if has_best else [])
                  + (["bw/x.sum"] if has_bw else []) + ([f"{v} MB" for v in variants] if has_mem else []))
        body = []
        for r in rows:
            fwd = r["mode"] == "fwd"
            body.append([r["case"], r["dtype"], r["shape"], r["mode"]]
                        + [_fmt(r.get(f"{v}_ms"), ".3f") for v in variants]
                        + ([_fmt(r.get("xsum_ms"), ".3f") if fwd else ""] if has_bw else [])
                        + [_fmt(r.get(f"speedup_vs_{v}"), ".1f") for v in baselines]
                        + ([_fmt(r.get("speedup_vs_best_torch"), ".2f")] if has_best else [])
                        + ([_fmt(r.get("bandwidth_vs_xsum"), ".0%") if fwd else ""] if has_bw else [])
                        + ([_fmt(r.get(f"{v}_peak_mb"), ".2f") if not fwd else "" for v in variants] if has_mem else []))
        return _render(header, body, 4)
    # Cases with different variant sets: one line per variant, speed-up of the case's first variant.
    header = ["case", "dtype", "variant", "ms", "first vs this"]
    body = [[r["case"], r["dtype"], v, _fmt(r[f"{v}_ms"], ".3f"),
             "(first)" if i == 0 else _fmt(r[f"speedup_vs_{v}"], ".1f")]
            for r in rows for i, v in enumerate(r["variants"])]
    return _render(header, body, 3)


def format_table(rows: Sequence[dict]) -> str:
    """One table per op family."""
    if not rows:
        return "(no cases)"
    out: List[str] = []
    for family in dict.fromkeys(r["family"] for r in rows):
        if out:
            out.append("")
        out.append(f"[{family}]")
        out += _family_table([r for r in rows if r["family"] == family])
    return "\n".join(out)


def environment(cfg: BenchConfig) -> dict:
    env = dict(torch=torch.__version__, python=platform.python_version(), machine=platform.machine(),
               processor=_cpu_name(), device=cfg.device, threads=cfg.threads or torch.get_num_threads(),
               cpu_count=os.cpu_count(), load_average=_load_average(), time=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    if cfg.device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
    return env


def _load_average() -> Optional[float]:
    """1-minute load average: other processes competing for the cores skew CPU timings."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def write_outputs(out_dir: str, cfg: BenchConfig, results: Sequence[Result], rows: Sequence[dict],
                  notes: Dict[str, str], table: str) -> Dict[str, str]:
    """results.csv (every measurement), summary.csv (one row per case and mode), results.json, speedups.png."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, v) for k, v in
             dict(results_csv="results.csv", summary_csv="summary.csv", json="results.json",
                  table="table.txt", plot="speedups.png").items()}
    with open(paths["results_csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(results[0]).keys()) if results else ["case"])
        w.writeheader()
        for r in results:
            w.writerow(asdict(r))
    with open(paths["summary_csv"], "w", newline="") as f:
        fields = list(dict.fromkeys(k for r in rows for k in r)) or ["case"]
        w = csv.DictWriter(f, fieldnames=fields, restval="")
        w.writeheader()
        w.writerows([dict(r, variants=" ".join(r["variants"])) for r in rows])
    with open(paths["json"], "w") as f:
        json.dump(dict(config=asdict(cfg), environment=environment(cfg), notes=notes,
                       results=[asdict(r) for r in results], summary=list(rows)), f, indent=1)
    with open(paths["table"], "w") as f:
        f.write(table + "\n")
    plot_speedups(rows, paths["plot"])
    return paths


def plot_speedups(rows: Sequence[dict], path: str) -> None:
    """Speed-up of each case's first variant (the fused op) over every other one: a panel per family and mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r["family"], r["mode"]) for r in rows)) or [("", "fwd")]
    cols = 2
    nrows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(13, 5 * nrows), squeeze=False)
    for ax, (family, mode) in zip(axes.flat, panels):
        sel = [r for r in rows if (r["family"], r["mode"]) == (family, mode)]
        baselines = list(dict.fromkeys(v for r in sel for v in r["variants"][1:]))
        width = 0.8 / max(len(baselines), 1)
        for i, b in enumerate(baselines):
            vals = [r.get(f"speedup_vs_{b}", float("nan")) for r in sel]
            ax.bar([j + i * width for j in range(len(sel))], vals, width, label=f"vs {b}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_title(f"{family} {mode}: speed-up of the fused op (higher is better)", fontsize=10)
        ax.set_xticks([j + width * (len(baselines) - 1) / 2 for j in range(len(sel))])
        ax.set_xticklabels([f"{r['case']}\n{r['dtype']}" for r in sel], rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("time(baseline) / time(fused)")
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None, *, args=None) -> int:
    """Entry point of ``selkernels bench`` (``args`` from the CLI parser, or parsed from argv)."""
    if args is None:
        import argparse

        parser = argparse.ArgumentParser(prog="selkernels bench")
        add_arguments(parser)
        args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("selkernels bench: --device cuda requested but torch.cuda.is_available() is False")
    cfg = BenchConfig(device=args.device, dtypes=tuple(args.dtype), threads=args.threads, quick=args.quick,
                      min_run_time=args.min_run_time if args.min_run_time else (0.01 if args.quick else 0.2),
                      compile=args.compile if args.compile is not None else not args.quick, filter=args.filter,
                      block_time=0.0005, min_rounds=3 if args.quick else 7)
    families = args.family
    run_step = (not families or "step" in families) and cfg.filter.lower() in "step"
    cases = collect_cases(cfg, [f for f in families if f != "step"] if families else None)
    if families == ["step"]:
        cases = []
    if not cases and not run_step:
        raise SystemExit(f"selkernels bench: no case matches --filter {args.filter!r}")
    if run_step:  # the step-level suite first: the regularizer's cost inside a training step
        from .bench_step import main_step

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        step_results, step_table = main_step(cfg.device, quick=cfg.quick, compile_variants=cfg.compile,
                                             min_rounds=3 if cfg.quick else 5,
                                             min_run_time=0.01 if cfg.quick else 0.5)
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "step_table.txt"), "w") as f:
                f.write(step_table + "\n")
            with open(os.path.join(args.out, "step_results.json"), "w") as f:
                json.dump([asdict(r) for r in step_results], f, indent=1)
        if not cases:
            return 0
    t0 = time.perf_counter()
    results, notes = run(cfg, cases, progress=not args.no_progress)
    rows = summarize(results)
    table = format_table(rows)
    env = environment(cfg)
    print(f"\nselkernels bench: torch {env['torch']}, {env['device']} ({env['processor']}), "
          f"{env['threads']} threads, load average {env['load_average']}, {time.perf_counter() - t0:.0f} s")
    print(table)
    print("ms: medians; x vs V: time(V)/time(fused); best = faster of eager and compiled; "
          "bw/x.sum: t(x.sum())/t(fused fwd); MB: peak extra memory of fwd+bwd.")
    for key, note in notes.items():
        print(f"{key}: {note}")
    if env["load_average"] is not None and env["load_average"] > (os.cpu_count() or 1) + 0.5:
        print(f"warning: load average {env['load_average']} on {os.cpu_count()} CPUs: other processes compete for the "
              f"cores and inflate CPU timings (multi-threaded ones most); re-run on an idle machine"
              + (" or with --threads 1." if env["threads"] > 1 else "."))
    if args.out:
        paths = write_outputs(args.out, cfg, results, rows, notes, table)
        print("wrote " + ", ".join(paths.values()))
    return 0


def add_arguments(parser) -> None:
    import argparse

    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=sorted(_DTYPES),
                        help="dtypes to run (default: float32 bfloat16; bfloat16 on a subset of shapes)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's current setting)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few repetitions: a smoke run of seconds")
    parser.add_argument("--filter", default="", help="only cases whose 'family name dtype' contains this substring")
    parser.add_argument("--family", nargs="+", default=None,
                        help="suites to run: step (the training-step suite, run first) and the op families "
                        f"{', '.join(_SUITES)} (default: all)")
    parser.add_argument("--min-run-time", type=float, default=0.0,
                        help="seconds of timed calls per variant, on average (default 0.2, 0.01 with --quick)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="time torch.compile of the eager composition (default: on, off with --quick)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--out", default=None, help="directory for results.csv, summary.csv, results.json, "
                        "table.txt and speedups.png")
