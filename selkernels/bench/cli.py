"""``selkernels bench``: parse the options, run the registered suites, print and write the tables."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict

import torch

from .core import DTYPES, SUITES, BenchConfig, collect_cases, environment, run, steady_allocator
from .output import format_table, summarize, write_outputs


def main(argv: Sequence[str] | None = None, *, args=None) -> int:
    """Entry point of ``selkernels bench`` (``args`` from the CLI parser, or parsed from argv)."""
    if args is None:
        import argparse

        parser = argparse.ArgumentParser(prog="selkernels bench")
        add_arguments(parser)
        args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("selkernels bench: --device cuda requested but torch.cuda.is_available() is False")
    cfg = BenchConfig(
        device=args.device,
        dtypes=tuple(args.dtype),
        threads=args.threads,
        quick=args.quick,
        min_run_time=args.min_run_time if args.min_run_time else (0.01 if args.quick else 0.2),
        compile=args.compile if args.compile is not None else not args.quick,
        filter=args.filter,
        block_time=0.0005,
        min_rounds=3 if args.quick else 7,
    )
    if not cfg.quick:  # a smoke run (as the tests make in-process) leaves the allocator alone
        steady = steady_allocator()
        print(
            "selkernels bench: "
            + ("freed memory kept for reuse (no per-step page faults)" if steady else "system allocator as is")
        )
    families = args.family
    run_step = (not families or "step" in families) and cfg.filter.lower() in "step"
    cases = (
        [] if families == ["step"] else collect_cases(cfg, [f for f in families if f != "step"] if families else None)
    )
    if not cases and not run_step:
        raise SystemExit(f"selkernels bench: no case matches --filter {args.filter!r}")
    if run_step:  # the step-level suite first: the regularizer's cost inside a training step
        from .step import main_step

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        step_results, step_table = main_step(
            cfg.device,
            quick=cfg.quick,
            compile_variants=cfg.compile,
            min_rounds=3 if cfg.quick else 5,
            min_run_time=args.min_run_time if args.min_run_time else (0.01 if cfg.quick else 0.5),
        )
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
    print(
        f"\nselkernels bench: torch {env['torch']}, {env['device']} ({env['processor']}), "
        f"{env['threads']} threads, load average {env['load_average']}, {time.perf_counter() - t0:.0f} s"
    )
    print(table)
    print(
        "ms: medians; x vs V: time(V)/time(fused); best = faster of eager and compiled; "
        "bw/x.sum: t(x.sum())/t(fused fwd); MB: peak extra memory of fwd+bwd."
    )
    for key, note in notes.items():
        print(f"{key}: {note}")
    if env["load_average"] is not None and env["load_average"] > (os.cpu_count() or 1) + 0.5:
        print(
            f"warning: load average {env['load_average']} on {os.cpu_count()} CPUs: other processes compete for the "
            f"cores and inflate CPU timings (multi-threaded ones most); re-run on an idle machine"
            + (" or with --threads 1." if env["threads"] > 1 else ".")
        )
    if args.out:
        paths = write_outputs(args.out, cfg, results, rows, notes, table)
        print("wrote " + ", ".join(paths.values()))
    return 0


def add_arguments(parser) -> None:
    import argparse

    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument(
        "--dtype",
        nargs="+",
        default=["float32", "bfloat16"],
        choices=sorted(DTYPES),
        help="dtypes to run (default: float32 bfloat16; bfloat16 on a subset of shapes)",
    )
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's current setting)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few repetitions: a smoke run of seconds")
    parser.add_argument("--filter", default="", help="only cases whose 'family name dtype' contains this substring")
    parser.add_argument(
        "--family",
        nargs="+",
        default=None,
        help="suites to run: step (the training-step suite, run first) and the op families "
        f"{', '.join(SUITES)} (default: all)",
    )
    parser.add_argument(
        "--min-run-time",
        type=float,
        default=0.0,
        help="seconds of timed calls per variant, on average (default 0.2; the step suite 0.5; 0.01 with --quick)",
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="time torch.compile of the eager composition (default: on, off with --quick)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--out", default=None, help="directory for results.csv, summary.csv, results.json, table.txt and speedups.png"
    )
