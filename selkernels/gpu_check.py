"""Pieces of ``scripts/gpu_check.sh`` (the one-command check on a GPU machine), runnable on CPU too.

    python -m selkernels.gpu_check driver   --device cuda         # launch every selkernels kernel once
    python -m selkernels.gpu_check opbench  --device cuda --out F  # op-level timings (CUDA events)
    python -m selkernels.gpu_check stepbench --device cuda --out F # step-level suite (CUDA events)
    python -m selkernels.gpu_check table DIR                       # the short summary table

``driver`` is what the compute sanitizers run: small inputs through every public entry point, and
a check that every ``selkernels::`` op with a kernel for the device was dispatched (the list comes
from the dispatcher, so a new op without a workload here fails the check instead of going
unchecked). ``table`` reads the ``status.tsv`` and JSON files the script leaves in DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["registered_ops", "run_driver", "op_benchmark", "format_summary"]


def registered_ops(device: str) -> list[str]:
    """``selkernels::`` ops with a kernel for the device type's dispatch key."""
    key = "CUDA" if device.startswith("cuda") else "CPU"
    return sorted(
        n
        for n in torch._C._dispatch_get_all_op_names()
        if n.startswith("selkernels::") and torch._C._dispatch_has_kernel_for_dispatch_key(n, key)
    )


class _OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name.startswith("selkernels::"):
            self.seen.add(name)
        return func(*args, **(kwargs or {}))


def _workloads(device: str) -> dict[str, Callable[[], None]]:
    """Small calls through every public entry point, forward and backward, mixed dtypes and layouts."""
    import selkernels
    from selkernels import reference

    gen = torch.Generator().manual_seed(0)

    def rand(*shape, dtype=torch.float32):
        return torch.rand(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)

    labels = torch.randint(0, 7, (37,), generator=gen).to(device)
    labels[3] = -100  # an ignored sample

    def selectivity_single():
        for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
            for x in (
                rand(37, 9, 5, 5, dtype=dtype),
                rand(37, 9, 5, 5, dtype=dtype).to(memory_format=torch.channels_last),
                rand(37, 6, dtype=dtype),
            ):
                x.requires_grad_(True)
                means, counts = selkernels.class_means(x, labels, 7)
                si = selkernels.selectivity_index(x, labels, 7)
                torch.autograd.grad(si.sum() + means.sum(), x)

    def selectivity_layers():
        xs = [
            rand(37, 4, 6, 6).requires_grad_(True),
            rand(37, 5, 3, 3, dtype=torch.bfloat16).requires_grad_(True),
            rand(37, 3, dtype=torch.float64).requires_grad_(True),
            rand(37, 2, 2, 8).to(memory_format=torch.channels_last).requires_grad_(True),
        ]
        seg = selkernels.segment_labels(labels, 7)
        si = selkernels.selectivity_index(xs, seg)
        cm = selkernels.class_means(xs, seg)
        torch.autograd.grad(sum(s.sum() for s in si) + sum(m.sum() for m, _ in cm), xs)
        tokens = rand(37, 4, 6).requires_grad_(True)  # [N, positions, D]: unit_dim=-1
        torch.autograd.grad(selkernels.selectivity_index([tokens], seg, unit_dim=-1)[0].sum(), tokens)

    def selectivity_from_means():
        x = rand(37, 11, 2, 2)
        means, counts = selkernels.class_means(x, labels, 7)
        means = means.requires_grad_(True)
        torch.autograd.grad(selkernels.selectivity_from_means(means, counts).sum(), means)

    def dataset_metric():
        metric = selkernels.ClassSelectivity(None, 7)
        for _ in range(2):
            metric.update_from([rand(37, 9, 5, 5), rand(37, 3, 6, dtype=torch.bfloat16)], labels)
        metric.compute()

    def double_backward():
        x = rand(37, 5, 3, 3, dtype=torch.float64).requires_grad_(True)
        means, counts = selkernels.class_means(x, labels, 7)
        (g,) = torch.autograd.grad((means**2).sum(), x, create_graph=True)
        torch.autograd.grad(g.sum(), x)

    def covariance():
        for num_classes in (None, 7):
            for dtype in (torch.float32, torch.float64):
                stats = selkernels.StreamingCovariance(9, num_classes=num_classes, device=device)
                z = rand(37, 9, dtype=dtype)
                stats.update(z, None if num_classes is None else labels.clamp_min(0))
                stats.covariance()

    def spectral():
        h = rand(40, 24).requires_grad_(True)
        v = torch.linalg.qr(rand(24, 24, dtype=torch.float64))[0].requires_grad_(True)
        loss = selkernels.spectral_penalty(h, v, tau=3)
        torch.autograd.grad(loss, (h, v))

    def regularizer_step():
        net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3), torch.nn.ReLU()
        ).to(device)
        with selkernels.SelectivityRegularizer([net[1], net[3]], alpha=-1.0, num_classes=7) as reg:
            out = net(rand(37, 3, 8, 8))
            (out.mean() + reg.penalty(labels)).backward()
        reference.paper_selectivity_penalty([out.detach()], labels.clamp_min(0), -1.0)

    return {
        f.__name__: f
        for f in (
            selectivity_single,
            selectivity_layers,
            selectivity_from_means,
            dataset_metric,
            double_backward,
            covariance,
            spectral,
            regularizer_step,
        )
    }


def run_driver(device: str = "cpu", print_fn=print) -> int:
    """Run every workload once on ``device``; 0 when every registered op was dispatched, else 1."""
    import selkernels  # noqa: F401  (registers the ops)

    expected = registered_ops(device)
    recorder = _OpRecorder()
    failed = []
    with recorder:
        for name, fn in _workloads(device).items():
            try:
                fn()
            except Exception as err:  # noqa: BLE001 - report every failing workload, then fail
                failed.append(f"{name}: {type(err).__name__}: {err}")
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    missing = [op for op in expected if op not in recorder.seen]
    print_fn(f"driver: {len(recorder.seen & set(expected))}/{len(expected)} selkernels ops dispatched on {device}")
    for line in failed:
        print_fn(f"driver: workload failed: {line}")
    if missing:
        print_fn(f"driver: ops no workload dispatched (add one to selkernels/gpu_check.py): {missing}")
    return 1 if failed or missing else 0


# ----------------------------------------------------------------------------------------------
# Op-level timings with CUDA events (perf_counter on CPU)
# ----------------------------------------------------------------------------------------------
OP_SHAPES = [  # (name, N, C, spatial, K): as selkernels bench
    ("resnet20 stage1", 128, 16, (32, 32), 10),
    ("resnet20 stage3", 128, 64, (8, 8), 10),
    ("resnet18-tinyimagenet", 256, 256, (8, 8), 200),
    ("resnet50-imagenet (scaled)", 128, 512, (4, 4), 1000),
]


def _median_time(fn: Callable[[], object], device: str, reps: int) -> float:
    from .bench.step import _time_once

    fn(), fn()
    times = sorted(_time_once(fn, device) for _ in range(reps))
    return times[len(times) // 2]


def op_benchmark(device: str = "cpu", *, shapes=OP_SHAPES, reps: int = 20) -> list[dict]:
    """Per shape: fused forward and forward+backward against the best torch composition and the
    published loop, and ``x.sum()`` for the bandwidth fraction (float32)."""
    import selkernels
    from selkernels import reference
    from selkernels.bench import torch_selectivity

    rows = []
    for name, n, c, spatial, k in shapes:
        gen = torch.Generator().manual_seed(0)
        x = torch.rand((n, c) + tuple(spatial), generator=gen).to(device)
        labels = torch.randint(0, k, (n,), generator=gen).to(device)
        xg = x.clone().requires_grad_(True)
        variants = {
            "fused": lambda t, labels=labels, k=k: selkernels.selectivity_index(t, labels, k),
            "torch": lambda t, labels=labels, k=k: torch_selectivity(t, labels, k),
            "paper": lambda t, labels=labels: reference.paper_class_selectivity(t, labels),
        }
        row = dict(
            case=name,
            shape=f"N={n} C={c} {'x'.join(map(str, spatial))} K={k}",
            xsum_ms=_median_time(x.sum, device, reps) * 1e3,
        )
        for v, f in variants.items():
            row[f"{v}_fwd_ms"] = _median_time(lambda f=f, x=x: f(x), device, reps) * 1e3

            def fwd_bwd(f=f, xg=xg):
                return torch.autograd.grad(f(xg).sum(), xg)

            row[f"{v}_fwdbwd_ms"] = _median_time(fwd_bwd, device, reps) * 1e3
        row["bandwidth_vs_xsum"] = row["xsum_ms"] / row["fused_fwd_ms"]
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# Summary table (printed last by gpu_check.sh)
# ----------------------------------------------------------------------------------------------
def _read_status(path: str) -> list[list[str]]:
    """status.tsv: one line per step, ``name<TAB>exit code<TAB>seconds<TAB>note``."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [line.rstrip("\n").split("\t") + [""] * 3 for line in f if line.strip()]


# Per step, the log lines that say how it went (the last match of each pattern).
_LOG_SUMMARIES = {
    "gpu_tests": (r"\d+ (passed|failed)|error",),
    "memcheck": (r"ERROR SUMMARY", r"^driver: \d+"),
    "racecheck": (r"RACECHECK SUMMARY|ERROR SUMMARY", r"^driver: \d+"),
    "synccheck": (r"ERROR SUMMARY", r"^driver: \d+"),
    "build": (r"error:",),
}


def _log_note(out_dir: str, name: str) -> str:
    import re

    path = os.path.join(out_dir, f"{name}.log")
    if name not in _LOG_SUMMARIES or not os.path.exists(path):
        return ""
    with open(path, errors="replace") as f:
        lines = f.read().splitlines()
    found = []
    for pattern in _LOG_SUMMARIES[name]:
        hits = [line for line in lines if re.search(pattern, line)]
        if hits:
            found.append(hits[-1].strip("= ").strip()[:70])
    return "; ".join(found)


def format_summary(out_dir: str) -> str:
    """The short table: each step's result, then the key op- and step-level figures."""
    lines = [f"== selkernels gpu_check summary (logs in {out_dir})"]
    status = _read_status(os.path.join(out_dir, "status.tsv"))
    width = max([len(s[0]) for s in status] + [4])
    for name, rc, secs, note, *_ in status:
        note = "; ".join(n for n in (note, _log_note(out_dir, name)) if n)
        verdict = "ok" if rc == "0" else ("skipped" if rc == "77" else f"FAIL (exit {rc})")
        lines.append(f"{name.ljust(width)}  {verdict:<16} {secs:>5} s  {note}".rstrip())
    op_path = os.path.join(out_dir, "opbench.json")
    if os.path.exists(op_path):
        with open(op_path) as f:
            rows = json.load(f)
        lines.append("op (float32)                fwd ms  fwd+bwd ms  bw/x.sum  vs torch fwd+bwd  vs paper fwd+bwd")
        for r in rows:
            lines.append(
                f"{r['case'][:26]:<26}  {r['fused_fwd_ms']:6.3f}  {r['fused_fwdbwd_ms']:10.3f}  "
                f"{r['bandwidth_vs_xsum']:8.0%}  {r['torch_fwdbwd_ms'] / r['fused_fwdbwd_ms']:15.1f}x  "
                f"{r['paper_fwdbwd_ms'] / r['fused_fwdbwd_ms']:15.1f}x"
            )
    step_path = os.path.join(out_dir, "stepbench.json")
    if os.path.exists(step_path):
        with open(step_path) as f:
            rows = json.load(f)
        lines.append("step                 variant              step ms  overhead ms  % of step  x floor")
        for r in rows:
            if r["variant"] in ("none", "compiled none"):
                continue

            def num(key, spec, r=r):
                return "" if r.get(key) is None else format(r[key], spec)

            lines.append(
                f"{r['case'][:20]:<20} {r['variant'][:20]:<20} {r['median_ms']:7.2f}  "
                f"{num('overhead_ms', '11.2f'):>11}  {num('overhead_pct', '9.1f'):>9}  "
                f"{num('floor_multiple', '7.2f'):>7}"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m selkernels.gpu_check", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("driver", "opbench", "stepbench"):
        p = sub.add_parser(name)
        p.add_argument("--device", default="cuda")
        p.add_argument("--out", default=None, help="JSON file for the results (benchmarks)")
        p.add_argument("--quick", action="store_true", help="tiny shapes, few repetitions (a smoke run)")
        if name == "stepbench":
            p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    t = sub.add_parser("table")
    t.add_argument("dir")
    args = parser.parse_args(argv)
    if args.command == "table":
        print(format_summary(args.dir))
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 1
    if args.command == "driver":
        return run_driver(args.device)
    t0 = time.perf_counter()
    if args.command == "opbench":
        shapes = [("tiny", 16, 4, (4, 4), 10)] if args.quick else OP_SHAPES
        rows = op_benchmark(args.device, shapes=shapes, reps=3 if args.quick else 20)
        for r in rows:
            print(json.dumps(r))
    else:
        from dataclasses import asdict

        from .bench.step import main_step

        results, _ = main_step(
            args.device,
            quick=args.quick,
            compile_variants=not args.no_compile,
            min_rounds=3 if args.quick else 10,
            min_run_time=0.01 if args.quick else 0.3,
        )
        rows = [asdict(r) for r in results]
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    print(f"gpu_check {args.command}: {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
