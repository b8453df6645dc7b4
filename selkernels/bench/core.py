"""The timing core of ``selkernels bench``: case registry, round-robin medians, peak memory.

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

Op families plug in through :func:`register_suite`: a function ``(config) -> list[Case]``. A family
that has ``(title, [(name, callable), ...])`` groups uses :func:`cases_from_groups`.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils import benchmark as tbench

# Order matters: the fused op first, then the baselines it is compared against.
FUSED = "fused"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass
class BenchConfig:
    device: str = "cpu"
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
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

    forward: dict[str, Callable[[], object]]
    forward_backward: dict[str, Callable[[], object]] = field(default_factory=dict)
    bandwidth_input: torch.Tensor | None = None
    notes: dict[str, str] = field(default_factory=dict)  # variant -> remark (compile time, or why it is missing)


@dataclass
class Case:
    family: str
    name: str
    dtype: str
    shape: str
    build: Callable[[BenchConfig], Workload]  # builds tensors lazily, one case in memory at a time


SUITES: dict[str, Callable[[BenchConfig], list[Case]]] = {}


def register_suite(family: str):
    """Decorator: ``@register_suite("covariance") def cases(config) -> list[Case]``."""

    def wrap(fn):
        SUITES[family] = fn
        return fn

    return wrap


def cases_from_groups(
    family: str,
    groups: Iterable[tuple[str, Sequence[tuple[str, Callable[[], object]]]]],
    *,
    dtype: str = "",
    mode: str = "fwd",
) -> list[Case]:
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


def collect_cases(cfg: BenchConfig, families: Sequence[str] | None = None) -> list[Case]:
    cases = []
    for family, suite in SUITES.items():
        if families and family not in families:
            continue
        cases += [c for c in suite(cfg) if cfg.filter.lower() in f"{c.family} {c.name} {c.dtype}".lower()]
    return cases


def _interleaved_medians(fns: dict[str, Callable[[], object]], cfg: BenchConfig) -> dict[str, tuple[float, float, int]]:
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
    blocks: dict[str, list[float]] = {name: [] for name in fns}
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


def _peak_extra_bytes(fn: Callable[[], object], device: str) -> int | None:
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
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
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
    peak_extra_mb: float | None = None


def run(cfg: BenchConfig, cases: Sequence[Case], *, progress: bool = True) -> tuple[list[Result], dict[str, str]]:
    """Time every case; returns the results and the notes on variants that could not run."""
    from tqdm.auto import tqdm

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    results: list[Result] = []
    notes: dict[str, str] = {}
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
                results.append(
                    Result(
                        **base,
                        variant=variant,
                        mode="x.sum" if variant == "x.sum" else mode,
                        median_ms=med * 1e3,
                        iqr_ms=iqr * 1e3,
                        runs=runs,
                        peak_extra_mb=None if peak is None else peak / 2**20,
                    )
                )
        del work
    return results, notes


def environment(cfg: BenchConfig) -> dict:
    env = dict(
        torch=torch.__version__,
        python=platform.python_version(),
        machine=platform.machine(),
        processor=_cpu_name(),
        device=cfg.device,
        threads=cfg.threads or torch.get_num_threads(),
        cpu_count=os.cpu_count(),
        load_average=_load_average(),
        time=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    if cfg.device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
    return env


def steady_allocator() -> bool:
    """Keep freed CPU memory in the process for reuse (glibc: no mmap for large blocks, no trim).

    By default glibc maps each large tensor afresh and unmaps it when freed, so every training
    step page-faults its activations in again: on ResNet-20 (N=128) that is tens of ms per step,
    more than the regularizer costs, and it lands on whichever variant's allocation pattern
    triggers it (the bare step measured slower than the step with a penalty). A caching allocator
    (CUDA's, or jemalloc/tcmalloc on CPU) reuses memory anyway. Returns False where not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def _load_average() -> float | None:
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
