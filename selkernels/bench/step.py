"""Step-level benchmark: what the selectivity regularizer adds to a training step.

Op-level timings (``torch.autograd.grad`` of one op's output) miss what a real step pays: the
regularizer's gradient is a broadcast that autograd must add into the dense gradient the block
output already receives from the layers after it, and every hooked layer has its own fixed costs.
This suite measures the regularizer where users feel it:

* ``blocks K=..``: the 9 block outputs of ResNet-20 (CIFAR-10 shapes, N=128) inside an autograd
  graph. Each output ``y = relu(a)`` (``a`` a leaf, so the gradient flows through the ReLU backward as
  in a block) feeds a stand-in for the next block, ``z = y * w + y`` (a residual add and a
  cheap branch), and the loss ``sum((z * v).sum())``: ``y`` receives a dense downstream gradient,
  as real block outputs do. A step is the forward, the penalty and ``torch.autograd.grad`` w.r.t.
  the leaves.
* ``resnet20 K=10``: a whole ResNet-20 training step (forward, cross-entropy + regularizer,
  backward, SGD step with momentum), the 9 block outputs hooked.

Variants, timed round-robin in one process (one call each per round, medians over rounds):

* ``none``: the step without regularizer; the other variants' overhead is their time minus this.
* ``floor``: the byte floor of any regularizer: one read of every block output (its spatial sum)
  and an in-place add of a broadcast [N, C, 1, 1] gradient into the dense gradient of every output
  (a tensor hook), nothing else.
* ``paper``: the published-script loop (:func:`selkernels.reference.paper_selectivity_penalty`).
* ``torch``: the best plain-torch composition (:func:`selkernels.bench.torch_selectivity` per layer);
  ``torch compiled``: the same penalty function under ``torch.compile``: what a user would write
  instead of this library.
* ``selkernels``: :class:`selkernels.SelectivityRegularizer` (hooks and ``penalty``), eager.
* ``compiled none`` / ``compiled selkernels`` (ResNet-20 only): the model's forward and loss under
  ``torch.compile`` (backward by AOTAutograd) without and with the regularizer; the overhead of the
  compiled regularizer is measured against ``compiled none`` and compared with the eager floor.

Reported per variant: step ms, overhead ms, overhead as % of the ``none`` step, and as a multiple
of the floor's overhead. On CUDA every step is timed with CUDA events.

The modeled GPU table (:func:`modeled_gpu_rows`) counts launches, host syncs and bytes per step from
``selkernels.ops.cuda_launch_plan``: the grid sizes come from the host code that launches the
kernels, so the estimate needs no GPU and is reproducible; the step time it is compared with and
the bandwidth and launch cost are stated assumptions (``GPU_ASSUMPTIONS``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .._hooks import LayerOutputHooks

__all__ = [
    "RESNET20_BLOCKS",
    "RESNET18_IMAGENET_BLOCKS",
    "ResNet20",
    "StepCase",
    "StepResult",
    "step_cases",
    "run_step_cases",
    "format_step_table",
    "GPU_ASSUMPTIONS",
    "modeled_gpu_rows",
    "format_gpu_table",
]

ALPHA = -1.0  # the paper's sign: lowers selectivity
# (C, H, W) of the 9 block outputs of ResNet-20 on 32x32 CIFAR images.
RESNET20_BLOCKS = [(16, 32, 32)] * 3 + [(32, 16, 16)] * 3 + [(64, 8, 8)] * 3
# (C, H, W) of the 8 block outputs of ResNet-18 on 224x224 ImageNet images.
RESNET18_IMAGENET_BLOCKS = [(64, 56, 56)] * 2 + [(128, 28, 28)] * 2 + [(256, 14, 14)] * 2 + [(512, 7, 7)] * 2


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------
class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (
            nn.Sequential()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )
        self.out = nn.ReLU()  # the block output, hooked by the regularizer as in the paper

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        return self.out(self.bn2(self.conv2(h)) + self.shortcut(x))


class ResNet20(nn.Module):
    """ResNet-20 for 32x32 images (He et al. 2016, three stages of three basic blocks; 1x1
    projection shortcuts). ``blocks`` lists the 9 block-output ReLU modules."""

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers, cin = [], width
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            for i in range(3):
                layers.append(_BasicBlock(cin, cout, 2 if stage > 0 and i == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)
        self.blocks = [b.out for b in layers]

    def forward(self, x):
        return self.fc(self.layers(self.stem(x)).mean((2, 3)))


class _BlockOutputs(nn.Module):
    """The block outputs alone: ``y_l = relu(a_l)`` for leaves ``a_l``, each feeding a residual
    stand-in for the next block, so every output receives a dense downstream gradient."""

    def __init__(self, n: int, shapes: Sequence[tuple[int, ...]], device, dtype, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)

        def rand(shape, lo=-1.0):
            return (torch.rand((n,) + tuple(shape), generator=gen) * (1 - lo) + lo).to(device=device, dtype=dtype)

        self.pre = [rand(s).requires_grad_(True) for s in shapes]
        self.branch = [rand(s, 0.0) for s in shapes]
        self.head = [rand(s, 0.0) for s in shapes]
        self.blocks = nn.ModuleList(nn.ReLU() for _ in shapes)

    def forward(self) -> torch.Tensor:
        loss = 0
        for relu, a, w, v in zip(self.blocks, self.pre, self.branch, self.head):
            y = relu(a)
            loss = loss + ((y * w + y) * v).sum()
        return loss


# ----------------------------------------------------------------------------------------------
# Penalties of the variants (each takes the block outputs and labels)
# ----------------------------------------------------------------------------------------------
def _torch_penalty(outputs: Sequence[torch.Tensor], labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    from .selectivity import torch_selectivity

    return -ALPHA * torch.stack([torch_selectivity(y, labels, num_classes).mean() for y in outputs]).mean()


def _paper_penalty(outputs: Sequence[torch.Tensor], labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    from ..reference import paper_selectivity_penalty

    return paper_selectivity_penalty(outputs, labels, ALPHA)


class _OutputCatcher(LayerOutputHooks):
    """Forward hooks keeping the latest output of each module (the baselines' equivalent of the
    regularizer's hooks, so every variant pays hooks alike): the output itself, not a view."""

    def __init__(self, modules: Sequence[nn.Module]):
        super().__init__(list(modules))  # each module of a list or an nn.ModuleList

    def _capture(self, index: int, output) -> None:
        self._outputs[index] = output

    def take(self) -> list[torch.Tensor]:
        return self._take_outputs()


def _floor_penalty(outputs: Sequence[torch.Tensor], labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """One read of every output; the backward adds a broadcast gradient in place into the
    accumulated dense gradient of every output (a tensor hook). Not a statistic: a cost floor."""
    total = 0
    for y in outputs:
        s = y.detach().sum(tuple(range(2, y.dim())), keepdim=True)  # [N, C, 1, ...]: the one read
        y.register_hook(lambda g, b=s: g.add_(b))  # y's accumulated gradient, already consumed by every other reader
        total = total + s.sum()
    return total * 0


# ----------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------
@dataclass
class StepCase:
    name: str
    shape: str
    steps: dict[str, Callable[[], object]]  # variant -> one training step
    baseline: dict[str, str]  # variant -> the variant its overhead is measured against
    notes: dict[str, str] = field(default_factory=dict)
    cleanup: list[Callable[[], None]] = field(default_factory=list)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _compile(fn, name: str, warmup: Callable[[], object], notes: dict[str, str]):
    """torch.compile ``fn``; compile now (``warmup``), outside the timings. None on failure."""
    try:
        t0 = time.perf_counter()
        warmup()
        notes[name] = f"compiled in {time.perf_counter() - t0:.1f} s (excluded)"
        return fn
    except Exception as err:  # noqa: BLE001 - a compiler failure is reported, not fatal
        notes[name] = f"torch.compile failed: {type(err).__name__}: {str(err)[:160]}"
        return None


def _blocks_case(n: int, shapes, k: int, device: str, dtype: torch.dtype, compile_variants: bool) -> StepCase:
    from ..regularizers import SelectivityRegularizer

    net = _BlockOutputs(n, shapes, device, dtype)
    labels = torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(1)).to(device)
    catcher = _OutputCatcher(net.blocks)
    # Both hook sets stay on for every variant, so all pay the same hooks.
    reg = SelectivityRegularizer(list(net.blocks), ALPHA, k)

    def step_with(penalty):
        def step():
            loss = net()
            outs = catcher.take()
            if penalty is not None:
                loss = loss + penalty(outs, labels, k)
            return torch.autograd.grad(loss, net.pre)

        return step

    def step_selkernels():
        loss = net() + reg.penalty(labels)
        catcher.take()
        return torch.autograd.grad(loss, net.pre)

    steps = {
        "none": step_with(None),
        "floor": step_with(_floor_penalty),
        "paper": step_with(_paper_penalty),
        "torch": step_with(_torch_penalty),
    }
    notes: dict[str, str] = {}
    if compile_variants:
        torch._dynamo.reset()
        compiled = torch.compile(_torch_penalty, dynamic=False)
        step = step_with(compiled)
        if _compile(compiled, "torch compiled", step, notes) is not None:
            steps["torch compiled"] = step
    steps["selkernels"] = step_selkernels
    shape = f"N={n} 9 blocks {shapes[0][0]}x{shapes[0][1]}^2..{shapes[-1][0]}x{shapes[-1][1]}^2 {str(dtype)[6:]}"
    return StepCase(
        f"blocks K={k}", shape, steps, {v: "none" for v in steps if v != "none"}, notes, [catcher.remove, reg.remove]
    )


def _resnet_case(
    n: int, k: int, width: int, hw: int, device: str, dtype: torch.dtype, compile_variants: bool
) -> StepCase:
    from ..regularizers import SelectivityRegularizer

    gen = torch.Generator().manual_seed(2)
    images = torch.randn(n, 3, hw, hw, generator=gen).to(device=device, dtype=dtype)
    labels = torch.randint(0, k, (n,), generator=gen).to(device)
    torch.manual_seed(0)
    model = ResNet20(k, width).to(device=device, dtype=dtype)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    catcher = _OutputCatcher(model.blocks)
    reg = SelectivityRegularizer(model.blocks, ALPHA, k)  # hooks on for every variant, as the catcher's

    def ce(images, labels):
        return nn.functional.cross_entropy(model(images), labels)

    def loss_with(penalty):
        def loss_fn(images, labels):
            loss = ce(images, labels)
            outs = catcher.take()
            return loss if penalty is None else loss + penalty(outs, labels, k)

        return loss_fn

    def loss_selkernels(images, labels):
        loss = ce(images, labels) + reg.penalty(labels)
        catcher.take()
        return loss

    def make_step(loss_fn, optimizer=opt):
        def step():
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(images, labels)
            loss.backward()
            optimizer.step()
            return loss

        return step

    steps = {
        "none": make_step(loss_with(None)),
        "floor": make_step(loss_with(_floor_penalty)),
        "paper": make_step(loss_with(_paper_penalty)),
        "torch": make_step(loss_with(_torch_penalty)),
    }
    baseline = {v: "none" for v in steps if v != "none"}
    notes: dict[str, str] = {}
    if compile_variants:
        torch._dynamo.reset()
        compiled_penalty = torch.compile(_torch_penalty, dynamic=False)
        step = make_step(loss_with(compiled_penalty))
        if _compile(compiled_penalty, "torch compiled", step, notes) is not None:
            steps["torch compiled"] = step
            baseline["torch compiled"] = "none"
    steps["selkernels"] = make_step(loss_selkernels)
    baseline["selkernels"] = "none"
    if compile_variants:
        # The compiled baseline is a model without hooks: under torch.compile, hooked outputs that
        # leave the graph change what Inductor fuses (tens of ms per step here), so a hooked
        # baseline would hide part of the regularizer's cost.
        torch.manual_seed(0)
        bare = ResNet20(k, width).to(device=device, dtype=dtype)
        bare_opt = torch.optim.SGD(bare.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)

        bare_loss = torch.compile(lambda x, y: nn.functional.cross_entropy(bare(x), y), dynamic=False)
        for name, step in (
            ("compiled none", make_step(bare_loss, bare_opt)),
            ("compiled selkernels", make_step(torch.compile(loss_selkernels, dynamic=False))),
        ):
            if _compile(step, name, step, notes) is not None:
                steps[name] = step
                if name != "compiled none":
                    baseline[name] = "compiled none"
    shape = f"N={n} {hw}x{hw} width {width} {str(dtype)[6:]}"
    return StepCase(f"resnet20 K={k}", shape, steps, baseline, notes, [catcher.remove, reg.remove])


def step_cases(
    device: str = "cpu",
    *,
    quick: bool = False,
    compile_variants: bool = True,
    dtype: torch.dtype = torch.float32,
    ks: Sequence[int] = (10, 100),
) -> list[Callable[[], StepCase]]:
    """Builders (called one at a time, so one case is in memory at a time) of the step cases.

    ``quick`` uses N=8 and a quarter of the widths and image size: a smoke run of seconds.
    """
    n, scale = (8, 4) if quick else (128, 1)
    shapes = [(c // scale, h // scale, w // scale) for c, h, w in RESNET20_BLOCKS]
    builders: list[Callable[[], StepCase]] = [
        (lambda k=k: _blocks_case(n, shapes, k, device, dtype, compile_variants)) for k in ks
    ]
    builders.append(lambda: _resnet_case(n, 10, 16 // scale, 32 // scale, device, dtype, compile_variants))
    return builders


# ----------------------------------------------------------------------------------------------
# Timing and reporting
# ----------------------------------------------------------------------------------------------
@dataclass
class StepResult:
    case: str
    shape: str
    variant: str
    baseline: str
    median_ms: float
    iqr_ms: float
    rounds: int
    overhead_ms: float | None = None
    overhead_pct: float | None = None  # of the baseline step
    floor_multiple: float | None = None  # overhead / the eager floor's overhead


def _time_once(fn: Callable[[], object], device: str) -> float:
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e-3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_round_robin(
    fns: dict[str, Callable[[], object]], device: str, *, min_rounds: int = 5, min_run_time: float = 0.5
) -> dict[str, tuple[float, float, int]]:
    """{name: (median s, IQR s, rounds)}: one call of each function per round, in turn, for at
    least ``min_rounds`` rounds and ``min_run_time`` seconds per function on average. Round r starts
    at function r mod F (and the rounds are a multiple of F), so every function runs equally often
    in every position of the round: a cost that lands on whatever runs first or after a given
    neighbour (allocator state, caches, a clock change) is shared out instead of biasing one."""
    for fn in fns.values():
        fn(), fn()  # warm-up: allocations, lazy initialisation, autograd graph caches
    _sync(device)
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    rounds = 0
    while rounds < min_rounds or time.perf_counter() - start < min_run_time * len(fns) or rounds % len(names):
        for i in range(len(names)):
            name = names[(rounds + i) % len(names)]
            times[name].append(_time_once(fns[name], device))
        rounds += 1
    out = {}
    for name, ts in times.items():
        q = torch.tensor(ts, dtype=torch.float64).quantile(torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
        out[name] = (float(q[1]), float(q[2] - q[0]), len(ts))
    return out


def summarize_case(case: StepCase, timings: dict[str, tuple[float, float, int]]) -> list[StepResult]:
    rows = []
    for variant, (med, iqr, rounds) in timings.items():
        base = case.baseline.get(variant, "")
        r = StepResult(case.name, case.shape, variant, base, med * 1e3, iqr * 1e3, rounds)
        if base in timings:
            r.overhead_ms = (med - timings[base][0]) * 1e3
            r.overhead_pct = 100 * r.overhead_ms / (timings[base][0] * 1e3)
        rows.append(r)
    floor = next((r.overhead_ms for r in rows if r.variant == "floor"), None)
    for r in rows:
        if r.overhead_ms is not None and floor and floor > 0:
            r.floor_multiple = r.overhead_ms / floor
    return rows


def run_step_cases(
    builders: Sequence[Callable[[], StepCase]],
    device: str = "cpu",
    *,
    min_rounds: int = 5,
    min_run_time: float = 0.5,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[StepResult], dict[str, str]]:
    results: list[StepResult] = []
    notes: dict[str, str] = {}
    for build in builders:
        case = build()
        if progress:
            progress(case.name)
        try:
            results += summarize_case(
                case, time_round_robin(case.steps, device, min_rounds=min_rounds, min_run_time=min_run_time)
            )
            notes.update({f"step/{case.name}/{v}": n for v, n in case.notes.items()})
        finally:
            for fn in case.cleanup:
                fn()
        del case
    return results, notes


def _fmt(value, spec: str) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _render(header: list[str], body: list[list[str]], left: int) -> list[str]:
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]

    def line(cells):
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return [line(header), "  ".join("-" * w for w in widths)] + [line(b) for b in body]


def format_step_table(results: Sequence[StepResult]) -> str:
    """One line per case and variant: step ms, overhead ms over its baseline, % of that step, x floor."""
    header = ["case", "variant", "step ms", "iqr ms", "overhead ms", "% of step", "x floor", "vs"]
    body = [
        [
            r.case,
            r.variant,
            _fmt(r.median_ms, ".2f"),
            _fmt(r.iqr_ms, ".2f"),
            _fmt(r.overhead_ms, ".2f"),
            _fmt(r.overhead_pct, ".1f"),
            _fmt(r.floor_multiple, ".2f"),
            r.baseline,
        ]
        for r in results
    ]
    shapes = list(dict.fromkeys(f"{r.case}: {r.shape}" for r in results))
    return "\n".join(["[step]"] + _render(header, body, 2) + shapes)


# ----------------------------------------------------------------------------------------------
# Modeled GPU cost from the launchers' own plan
# ----------------------------------------------------------------------------------------------
# The model's constants: what the modeled times and percentages rest on.
GPU_ASSUMPTIONS = dict(
    bandwidth_gbs=1555.0,  # A100 40GB HBM2 peak (NVIDIA datasheet); the model takes it as attained
    sm_count=108,  # A100: the plan sizes its grids for it
    launch_us=4.0,  # per kernel launch from eager Python dispatch, not overlapped with other work
    host_sync_us=20.0,  # one blocking device-to-host copy: drains the queue; cost beyond the copy
    resnet18_imagenet_step_ms=30.0,  # ResNet-18, ImageNet 224x224, batch 256, AMP bf16, one A100: fwd+bwd+SGD
    activation_dtype="bfloat16",  # block outputs under autocast
)


@dataclass
class GpuModelRow:
    case: str
    launches: int
    host_syncs: int
    mb_read: float
    mb_written: float
    modeled_ms: float
    step_ms: float | None
    pct_of_step: float | None
    floor_ms: float  # one read of the outputs + an in-place add (read + write) of their gradient
    floor_pct: float | None


def _plan_totals(plan: Sequence[dict]) -> tuple[int, int, int, int]:
    """Launches, host syncs, bytes read and written of a launch plan."""
    return (
        len(plan),
        sum(int(e.get("host_syncs", 0)) for e in plan),
        sum(int(e["bytes_read"]) for e in plan),
        sum(int(e["bytes_written"]) for e in plan),
    )


def gpu_model(
    plan: Sequence[dict],
    shapes: Sequence[tuple[int, ...]],
    elem_bytes: int,
    step_ms: float | None,
    case: str,
    assumptions: dict = GPU_ASSUMPTIONS,
) -> GpuModelRow:
    """Modeled per-step cost of a plan (the selkernels launches) for block outputs of ``shapes``.

    The plan leaves out autograd's own work, which the step pays too: adding the broadcast [N, C]
    SI gradient into each output's dense gradient (one launch per layer, in place: a read of the
    dense gradient and of the [N, C] tensor, a write of the dense gradient). It is added here.
    """
    launches, syncs, rd, wr = _plan_totals(plan)
    out_bytes = sum(math.prod(s) * elem_bytes for s in shapes)
    unit_bytes = sum(s[0] * s[1] * elem_bytes for s in shapes)
    launches += len(shapes)
    rd += out_bytes + unit_bytes
    wr += out_bytes
    bw = assumptions["bandwidth_gbs"] * 1e9
    modeled = (launches * assumptions["launch_us"] + syncs * assumptions["host_sync_us"]) * 1e-3 + (rd + wr) / bw * 1e3
    floor = 3 * out_bytes / bw * 1e3  # one read of the outputs, read + write of their gradient
    pct = None if step_ms is None else 100 * modeled / step_ms
    return GpuModelRow(
        case,
        launches,
        syncs,
        rd / 2**20,
        wr / 2**20,
        modeled,
        step_ms,
        pct,
        floor,
        None if step_ms is None else 100 * floor / step_ms,
    )


def modeled_gpu_rows(plan_fn: Callable | None = None, assumptions: dict = GPU_ASSUMPTIONS) -> list[GpuModelRow]:
    """The modeled GPU column: ResNet-20 CIFAR (9 blocks, N=128, K=10 and 100) and ResNet-18
    ImageNet (8 blocks, N=256, K=1000), from ``plan_fn(shapes, num_classes, dtypes)`` (default
    :func:`selkernels.ops.cuda_launch_plan`)."""
    if plan_fn is None:
        from ..ops import cuda_launch_plan as plan_fn
    dtype = getattr(torch, assumptions["activation_dtype"])
    # launches: the plan's + autograd's in-place add of the SI gradient per layer (not in the plan)
    elem = torch.empty((), dtype=dtype).element_size()
    cases = [(f"resnet20 cifar10 N=128 K={k}", [(128,) + s for s in RESNET20_BLOCKS], k, None) for k in (10, 100)]
    cases.append(
        (
            "resnet18 imagenet N=256 K=1000",
            [(256,) + s for s in RESNET18_IMAGENET_BLOCKS],
            1000,
            assumptions["resnet18_imagenet_step_ms"],
        )
    )
    rows = []
    for name, shapes, k, step_ms in cases:
        plan = plan_fn(shapes, k, [dtype] * len(shapes), sm_count=assumptions["sm_count"])
        rows.append(gpu_model(plan, shapes, elem, step_ms, name, assumptions))
    return rows


def format_gpu_table(rows: Sequence[GpuModelRow], assumptions: dict = GPU_ASSUMPTIONS) -> str:
    header = [
        "case (modeled GPU)",
        "launches",
        "host syncs",
        "MB read",
        "MB written",
        "modeled ms",
        "% of step",
        "floor ms",
        "floor %",
    ]
    body = [
        [
            r.case,
            str(r.launches),
            str(r.host_syncs),
            _fmt(r.mb_read, ".1f"),
            _fmt(r.mb_written, ".1f"),
            _fmt(r.modeled_ms, ".3f"),
            _fmt(r.pct_of_step, ".2f"),
            _fmt(r.floor_ms, ".3f"),
            _fmt(r.floor_pct, ".2f"),
        ]
        for r in rows
    ]
    a = assumptions
    return "\n".join(
        ["[step, modeled GPU: per training step, forward + backward of the regularizer]"]
        + _render(header, body, 1)
        + [
            f"launches and bytes: selkernels.ops.cuda_launch_plan (grids for {a['sm_count']} SMs) plus "
            "autograd's in-place add of the SI gradient per layer; floor: one read of the outputs + "
            "read and write of their gradient",
            f"model: {a['bandwidth_gbs']:.0f} GB/s attained, {a['launch_us']} us per launch, "
            f"{a['host_sync_us']} us per host sync, {a['activation_dtype']} block outputs; % of an assumed "
            f"{a['resnet18_imagenet_step_ms']} ms ResNet-18 ImageNet step (batch 256, AMP, one A100)",
        ]
    )


# ----------------------------------------------------------------------------------------------
# Entry point (``selkernels bench`` runs this first)
# ----------------------------------------------------------------------------------------------
def main_step(
    device: str = "cpu",
    *,
    quick: bool = False,
    compile_variants: bool = True,
    min_rounds: int = 5,
    min_run_time: float = 0.5,
    print_fn=print,
) -> tuple[list[StepResult], str]:
    results, notes = run_step_cases(
        step_cases(device, quick=quick, compile_variants=compile_variants),
        device,
        min_rounds=min_rounds,
        min_run_time=min_run_time,
    )
    table = format_step_table(results)
    print_fn(table)
    print_fn(
        "overhead: step ms minus the 'vs' variant's; % of step: of that variant's step; x floor: overhead / "
        "the floor's overhead (one read of the outputs + in-place add of a broadcast gradient). "
        "Eager variants share one hooked model; 'compiled none' is the same network compiled without hooks."
    )
    for key, note in notes.items():
        print_fn(f"{key}: {note}")
    try:
        gpu = format_gpu_table(modeled_gpu_rows())
    except (ImportError, AttributeError) as err:
        gpu = f"[step, modeled GPU] not available: {err}"
    print_fn(gpu)
    return results, table + "\n" + gpu
