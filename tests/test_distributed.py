"""Global-batch statistics across ranks (selkernels.distributed, SelectivityRegularizer(sync=...)).

Real process groups: 2 and 3 gloo ranks spawned on loopback. Every rank builds the same full batch
from a fixed seed, keeps its slice, and compares the distributed result with the single-process
result on the whole batch, computed in the same rank. Children write any failure's traceback to a
file that the parent reports; every child destroys its process group, and the parent bounds the
run's time and terminates children that outlive it.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.multiprocessing as mp
from torch import nn

import selkernels
from selkernels import SelectivityRegularizer
from selkernels.distributed import all_reduce_moments, global_class_means, global_selectivity_index

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is not available"
)

K = 5
ALPHA = -0.7
RUN_TIMEOUT_S = 90  # whole spawned run, spawn and imports included
PG_TIMEOUT = datetime.timedelta(seconds=30)


# ----------------------------------------------------------------------------------------------
# Spawning harness
# ----------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, err_dir: str, scenarios) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=PG_TIMEOUT
        )
        for name in scenarios:
            globals()[name](rank, world)
    except BaseException:
        with open(os.path.join(err_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise SystemExit(1) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _spawn(world: int, scenarios, tmp_path, timeout_s: float = RUN_TIMEOUT_S) -> None:
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world, port, str(tmp_path), list(scenarios)), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    try:
        while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
            # A failed rank leaves the others waiting in a collective: stop them soon after.
            if any(p.exitcode not in (None, 0) for p in procs):
                deadline = min(deadline, time.monotonic() + 5)
            time.sleep(0.05)
    finally:
        timed_out = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
    errors = [(f.name, f.read_text()) for f in sorted(tmp_path.glob("rank*.err"))]
    report = "\n".join(f"--- {name}\n{text}" for name, text in errors)
    assert not errors, f"ranks failed:\n{report}"
    assert not timed_out, f"ranks {timed_out} still running after {timeout_s} s (terminated)"
    assert all(p.exitcode == 0 for p in procs), f"exit codes {[p.exitcode for p in procs]}"


# ----------------------------------------------------------------------------------------------
# Shared data and model (identical on every rank and in the single-process reference)
# ----------------------------------------------------------------------------------------------
class _Net(nn.Module):
    """A conv layer (spatial activations) and a linear layer, both hooked after their ReLU."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.act1 = nn.ReLU()
        self.fc = nn.Linear(6 * 16, 10)
        self.act2 = nn.ReLU()
        self.head = nn.Linear(10, K)

    def forward(self, x):
        h = self.act1(self.conv(x))
        return self.head(self.act2(self.fc(h.flatten(1))))


def _net() -> _Net:
    torch.manual_seed(0)
    return _Net().double()


def _batch(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, K, (n,), generator=g)
    return x, y


def _slices(sizes):
    starts = [sum(sizes[:r]) for r in range(len(sizes))]
    return [slice(s, s + n) for s, n in zip(starts, sizes)]


def _grads(model):
    # The penalty does not reach the classifier head: no gradient there counts as zero.
    return [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in model.parameters()]


def _rank_mean(tensors, world):
    out = []
    for t in tensors:
        t = t.clone()
        dist.all_reduce(t)
        out.append(t / world)
    return out


def _close(a, b, what, rtol=1e-10, atol=1e-12):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


class _CountAllReduce:
    """Counts all-reduce calls: the library's functional collectives and torch.distributed.all_reduce
    (the library looks both up on each call)."""

    def __enter__(self):
        self.calls = 0
        self._orig = dist.all_reduce, funcol.all_reduce

        def counting(orig):
            def call(*args, **kwargs):
                self.calls += 1
                return orig(*args, **kwargs)

            return call

        dist.all_reduce, funcol.all_reduce = (counting(f) for f in self._orig)
        return self

    def __exit__(self, *exc):
        dist.all_reduce, funcol.all_reduce = self._orig


def _check_selectivity(rank, world, sizes, x, y):
    """Global SI, penalty and rank-averaged penalty gradients equal single-process on the joined batch."""
    assert len(sizes) == world
    mine = _slices(sizes)[rank]

    ref_model = _net()
    with SelectivityRegularizer([ref_model.act1, ref_model.act2], ALPHA, K, sync="local") as ref_reg:
        ref_model(x)
        ref_pen = ref_reg.penalty(y)
        ref_pen.backward()
        ref_si = ref_reg.last_layer_si
    ref_grads = _grads(ref_model)

    for sync in ("global", None):  # None: global because the group is initialized
        model = _net()
        with SelectivityRegularizer([model.act1, model.act2], ALPHA, K, sync=sync) as reg:
            model(x[mine])
            with _CountAllReduce() as fwd:
                pen = reg.penalty(y[mine])
            with _CountAllReduce() as bwd:
                pen.backward()
            _close(pen.detach(), ref_pen.detach(), f"penalty sync={sync}")
            _close(reg.last_layer_si, ref_si, f"layer SI sync={sync}")
        _close(_rank_mean(_grads(model), world), ref_grads, f"rank-mean gradient sync={sync}")
        assert (fwd.calls, bwd.calls) == (1, 1), (fwd.calls, bwd.calls)  # one each way for all layers

    # sync="local": the published per-rank statistic, no communication.
    model = _net()
    with SelectivityRegularizer([model.act1, model.act2], ALPHA, K, sync="local") as reg:
        model(x[mine])
        with _CountAllReduce() as calls:
            pen = reg.penalty(y[mine])
        assert calls.calls == 0
        acts = [torch.relu(model.conv(x[mine]))]
        acts.append(torch.relu(model.fc(acts[0].flatten(1))))
        local_si = torch.stack([selkernels.selectivity_index(a, y[mine], K).mean() for a in acts])
        _close(reg.last_layer_si, local_si.detach(), "local SI")

    # Functional API on raw tensors, one tensor and a list with mixed dtypes (one float64 buffer).
    g = torch.Generator().manual_seed(7)
    a_full = torch.rand(x.shape[0], 4, 3, generator=g, dtype=torch.float64)
    b_full = torch.rand(x.shape[0], 6, generator=g, dtype=torch.float64)
    si_a = global_selectivity_index(a_full[mine], y[mine], K)
    _close(si_a, selkernels.selectivity_index(a_full, y, K), "global_selectivity_index")
    with _CountAllReduce() as calls:
        si_ab = global_selectivity_index([a_full[mine], b_full[mine].float()], y[mine], K)
    assert calls.calls == 1
    assert si_ab[0].dtype == torch.float64
    _close(si_ab[0], si_a, "list, float64 layer")
    _close(si_ab[1], selkernels.selectivity_index(b_full, y, K), "list, float32 layer", rtol=1e-5, atol=1e-6)
    means, counts = global_class_means([a_full[mine]], y[mine], K)
    ref_means, ref_counts = selkernels.class_means(a_full, y, K)
    assert torch.equal(counts, ref_counts)
    _close(means[0], ref_means, "global class means")


def _check_moments(rank, world, sizes, y):
    """all_reduce_moments equals the moments of the joined samples, single and per class."""
    mine = _slices(sizes)[rank]
    g = torch.Generator().manual_seed(3)
    d = 4
    z = torch.randn(len(y), d, generator=g, dtype=torch.float64) * 3 + 100  # offset: cancellation-prone

    def moments(v):
        n = torch.tensor(float(v.shape[0]), dtype=torch.float64)
        if v.shape[0] == 0:  # garbage where the count is 0: must not leak into the merge
            return (
                n,
                torch.full((d,), float("nan"), dtype=torch.float64),
                torch.full((d, d), float("nan"), dtype=torch.float64),
            )
        mu = v.mean(0)
        return n, mu, (v - mu).T @ (v - mu)

    n, mu, m2 = all_reduce_moments(*moments(z[mine]))
    rn, rmu, rm2 = moments(z)
    _close(n, rn, "count")
    _close(mu, rmu, "mean", rtol=1e-13)
    _close(m2, rm2, "M2", rtol=1e-11)

    # Per class, batched [K]; class K-1 is absent everywhere.
    yk = y.clamp_max(K - 2)
    per_rank = [moments(z[mine][yk[mine] == k]) for k in range(K)]
    n, mu, m2 = all_reduce_moments(*(torch.stack(t) for t in zip(*per_rank)))
    ref = [moments(z[yk == k]) for k in range(K - 1)]
    for k in range(K - 1):
        _close(n[k], ref[k][0], f"count[{k}]")
        _close(mu[k], ref[k][1], f"mean[{k}]", rtol=1e-13)
        _close(m2[k], ref[k][2], f"M2[{k}]", rtol=1e-11)
    assert n[K - 1] == 0 and torch.all(mu[K - 1] == 0) and torch.all(m2[K - 1] == 0)

    # Integer counts (as StreamingCovariance keeps them) come back as exact integers.
    counts = torch.stack([t[0] for t in per_rank]).long()
    n_int, mu_int, m2_int = all_reduce_moments(counts, *(torch.stack(t) for t in list(zip(*per_rank))[1:]))
    assert n_int.dtype == torch.int64 and torch.equal(n_int, n.long())
    _close(mu_int, mu, "mean, integer counts", rtol=0, atol=0)
    _close(m2_int, m2, "M2, integer counts", rtol=0, atol=0)


def _check_streaming(rank, world, sizes, y):
    """StreamingCovariance.all_reduce (overall and per class) equals one accumulator fed every sample."""
    mine = _slices(sizes)[rank]
    g = torch.Generator().manual_seed(4)
    z = torch.randn(len(y), 3, 2, 2, generator=g, dtype=torch.float64) + 10
    yk = y.clamp(0, K - 2)  # class K-1 absent everywhere
    for num_classes in (None, K):
        ref = selkernels.StreamingCovariance(3, num_classes=num_classes)
        ref.update(z, None if num_classes is None else yk)
        stats = selkernels.StreamingCovariance(3, num_classes=num_classes)
        zm, ym = z[mine], yk[mine]
        half = zm.shape[0] // 2
        for part in (slice(0, half), slice(half, None)):  # two local updates
            if zm[part].shape[0]:
                stats.update(zm[part], None if num_classes is None else ym[part])
        assert stats.all_reduce() is stats
        assert torch.equal(stats.count, ref.count), (stats.count, ref.count)
        _close(stats.mean, ref.mean, f"StreamingCovariance mean, num_classes={num_classes}", rtol=1e-12)
        _close(stats.M2, ref.M2, f"StreamingCovariance M2, num_classes={num_classes}", rtol=1e-10, atol=1e-10)
        if num_classes is None:  # further local updates continue from the global state
            stats.update(z[:4])
            ref.update(z[:4])
            _close(stats.M2, ref.M2, "StreamingCovariance M2 after a further update", rtol=1e-10, atol=1e-10)


def _check_class_selectivity(rank, world, sizes, y):
    """ClassSelectivity across ranks (compute under global sync, all_reduce in place) equals one
    process on the joined data; the sum-statistic, unit_dim=-1 regularizer equals the joined batch."""
    mine = _slices(sizes)[rank]
    g = torch.Generator().manual_seed(8)
    n = len(y)
    conv = torch.rand(n, 5, 3, 3, generator=g, dtype=torch.float64)
    tokens = torch.randn(n, 4, 6, generator=g, dtype=torch.float64)  # signed [N, T, D]

    def metric(sync=None):
        return selkernels.ClassSelectivity(None, K, unit_dim=-1, transform="abs", sync=sync)

    ref = metric(sync="local")
    ref.update_from([conv.transpose(1, 3), tokens], y)
    ref_res = ref.compute()
    local = metric()
    m = conv[mine].shape[0]
    if m:  # a rank without samples never updates: it learns the layer widths from the others
        for part in (slice(0, m // 2), slice(m // 2, m)):
            local.update_from([conv[mine][part].transpose(1, 3), tokens[mine][part]], y[mine][part])
    with _CountAllReduce() as calls:
        res = local.compute()  # sync=None: global while the group is initialized
    assert calls.calls == 3  # the layer count and widths, then one buffer for all sums and counts
    for a, b in zip(res, ref_res):
        assert torch.equal(a.counts, b.counts)
        _close(a.class_sums, b.class_sums, "ClassSelectivity class sums", rtol=0, atol=1e-12)
        _close(a.si, b.si, "ClassSelectivity SI", rtol=0, atol=1e-12)
        assert torch.equal(a.preferred_class, b.preferred_class)
    only_mine = metric(sync="local")
    if m:
        only_mine.update_from([conv[mine].transpose(1, 3), tokens[mine]], y[mine])
        own_si = selkernels.selectivity_from_means(*selkernels.class_means(tokens[mine].mean(1).abs(), y[mine], K))
        _close(only_mine.compute()[1].si, own_si, "sync='local' SI", rtol=0, atol=1e-12)
    local.all_reduce()
    state = local.state_dict()
    assert torch.equal(state["counts"], ref.state_dict()["counts"])
    _close(state["sums"][1], ref.state_dict()["sums"][1], "all_reduce sums", rtol=0, atol=1e-12)
    with _CountAllReduce() as calls:
        again = local.compute()  # already global: no second reduction
    assert calls.calls == 0
    _close(again[0].si, ref_res[0].si, "SI after all_reduce", rtol=0, atol=1e-12)
    with pytest.raises(RuntimeError, match="reset"):
        local.update_from([conv[:2].transpose(1, 3), tokens[:2]], y[:2])

    x_ref = tokens.abs().clone().requires_grad_()
    x_mine = tokens[mine].abs().clone().requires_grad_()
    pens = []
    for xb, yb, sync in ((x_ref, y, "local"), (x_mine, y[mine], "global")):
        layer = nn.Identity()
        with SelectivityRegularizer(layer, ALPHA, K, sync=sync, unit_dim=-1, statistic="sum") as reg:
            layer(xb)
            pens.append(reg.penalty(yb))
    _close(pens[1].detach(), pens[0].detach(), "sum-statistic penalty, unit_dim=-1")
    (grad_ref,) = torch.autograd.grad(pens[0], x_ref)
    (grad_mine,) = torch.autograd.grad(pens[1], x_mine)
    # Every rank's penalty is the global one; DDP divides the summed gradients by the world size.
    _close(grad_mine, world * grad_ref[mine], "sum-statistic penalty gradient")


# ----------------------------------------------------------------------------------------------
# Scenarios run in the children
# ----------------------------------------------------------------------------------------------
def scenario_even(rank, world):
    sizes = [12] * world
    x, y = _batch(sum(sizes))
    _check_selectivity(rank, world, sizes, x, y)
    _check_moments(rank, world, sizes, y)
    _check_streaming(rank, world, sizes, y)
    _check_class_selectivity(rank, world, sizes, y)


def scenario_uneven(rank, world):
    # Rank 0: 3 samples of classes {0, 1} only; rank 1: 14 samples including ignored ones;
    # rank 2: no samples at all.
    assert world == 3
    sizes = [3, 14, 0]
    x, y = _batch(sum(sizes), seed=5)
    y[:3] = torch.tensor([0, 1, 0])
    y[5] = y[9] = -100
    assert set(y[3:17].tolist()) >= {2, 3, 4}
    _check_selectivity(rank, world, sizes, x, y)
    _check_moments(rank, world, sizes, y.clamp_min(0))
    _check_streaming(rank, world, sizes, y.clamp_min(0))
    _check_class_selectivity(rank, world, sizes, y)

    # process_group: a subgroup of ranks 1 and 2 joins only their samples (x[3:17]).
    sub = dist.new_group([1, 2])
    if rank in (1, 2):
        mine = _slices(sizes)[rank]
        pens = []
        for sync, xb, yb, group in (("global", x[mine], y[mine], sub), ("local", x[3:17], y[3:17], None)):
            model = _net()
            with SelectivityRegularizer([model.act1, model.act2], ALPHA, K, sync=sync, process_group=group) as reg:
                model(xb)
                pens.append(reg.penalty(yb).detach())
        _close(pens[0], pens[1], "penalty over a subgroup")


def scenario_ddp_step(rank, world):
    """DDP step on CE + global penalty == single-process step on the joined batch (equal slices)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    sizes = [10] * world
    mine = _slices(sizes)[rank]
    x, y = _batch(sum(sizes), seed=11)
    x2, y2 = _batch(sum(sizes), seed=12)

    ref = _net()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    model = _net()
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
    with (
        SelectivityRegularizer([ref.act1, ref.act2], ALPHA, K, sync="local") as ref_reg,
        SelectivityRegularizer([model.act1, model.act2], ALPHA, K) as reg,
    ):
        for xb, yb in ((x, y), (x2, y2)):  # two steps: the second starts from updated weights
            ref_opt.zero_grad()
            (nn.functional.cross_entropy(ref(xb), yb) + ref_reg.penalty(yb)).backward()
            ref_opt.step()
            opt.zero_grad()
            (nn.functional.cross_entropy(ddp(xb[mine]), yb[mine]) + reg.penalty(yb[mine])).backward()
            opt.step()
            _close(reg.last_layer_si, ref_reg.last_layer_si, "layer SI")
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        _close(p.detach(), q.detach(), f"parameter {name} after two DDP steps")


def _train(model, reg, batches, step_fn):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    pens = []
    for xb, yb in batches:
        opt.zero_grad()
        loss = step_fn(xb, yb)
        loss.backward()
        opt.step()
        pens.append(loss.detach())
    return pens, [p.detach().clone() for p in model.parameters()]


def scenario_compiled_step(rank, world):
    """A training step under torch.compile(fullgraph=True, dynamic=True) with sync="global" equals
    the eager step: losses and parameters after three steps (the third with another batch size)."""
    mine = _slices([10] * world)[rank]
    batches = []
    for seed, n in ((21, 10), (22, 10), (23, 7)):
        x, y = _batch(n * world, seed=seed)
        batches.append((x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]))
    assert batches[0][0].shape[0] == len(range(*mine.indices(10 * world)))
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model = _net()
        with SelectivityRegularizer([model.act1, model.act2], ALPHA, K, sync="global") as reg:

            def step(xb, yb, model=model, reg=reg):
                return nn.functional.cross_entropy(model(xb), yb) + reg.penalty(yb)

            fn = torch.compile(step, fullgraph=True, dynamic=True) if compiled else step
            results.append(_train(model, reg, batches, fn))
    (eager_pens, eager_params), (comp_pens, comp_params) = results
    for i, (a, b) in enumerate(zip(eager_pens, comp_pens)):
        _close(b, a, f"compiled loss, step {i}", rtol=1e-9, atol=1e-11)
    for i, (a, b) in enumerate(zip(eager_params, comp_params)):
        _close(b, a, f"compiled parameter {i}", rtol=1e-9, atol=1e-11)


def scenario_mismatched_layouts(rank, world):
    """Ranks that disagree on K, or on the hooked layers' widths, all get the same ValueError
    (not a gloo abort), eager and compiled; afterwards the group still works."""
    x, y = _batch(8, seed=rank)
    model = _net()
    with SelectivityRegularizer([model.act1, model.act2], ALPHA, K + rank, sync="global") as reg:
        model(x)
        with pytest.raises(ValueError, match=r"disagree.*rank 0: num_classes=5.*rank 1: num_classes=6"):
            reg.penalty(y)
    # Same total size, different order: only the layout check tells them apart.
    layers = [model.act1, model.act2] if rank == 0 else [model.act2, model.act1]
    torch._dynamo.reset()
    with SelectivityRegularizer(layers, ALPHA, K, sync="global") as reg:

        def penalty_step(xb, yb):
            model(xb)
            return reg.penalty(yb)

        step = torch.compile(penalty_step, fullgraph=True)
        with pytest.raises(ValueError, match=r"layer widths \[6, 10\].*layer widths \[10, 6\]"):
            step(x, y)
    si = global_selectivity_index(torch.rand(8, 3, dtype=torch.float64), y, K)  # the group still works
    assert si.shape == (3,)


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------
def test_two_ranks_even_split_and_ddp(tmp_path):
    _spawn(2, ["scenario_even", "scenario_ddp_step"], tmp_path)


def test_two_ranks_compiled_step_and_mismatched_layouts(tmp_path):
    _spawn(2, ["scenario_compiled_step", "scenario_mismatched_layouts"], tmp_path, timeout_s=400)  # compiles


def test_three_ranks_uneven_split(tmp_path):
    _spawn(3, ["scenario_uneven"], tmp_path)


def test_single_rank_group_is_local_exactly(tmp_path):
    x, y = _batch(20)
    results = {}
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1, timeout=PG_TIMEOUT
    )
    try:
        for sync in ("local", "global", None):
            model = _net()
            with SelectivityRegularizer([model.act1, model.act2], ALPHA, K, sync=sync) as reg:
                model(x)
                pen = reg.penalty(y)
                pen.backward()
            results[sync] = (pen.detach(), _grads(model))
        n, mu, m2 = torch.tensor(3.0, dtype=torch.float64), torch.randn(4, dtype=torch.float64), torch.eye(4)
        out = all_reduce_moments(n, mu, m2)
        assert all(torch.equal(a, b) for a, b in zip(out, (n, mu, m2)))
        stats = selkernels.StreamingCovariance(4)
        stats.update(torch.randn(10, 4, dtype=torch.float64))
        before = [t.clone() for t in (stats.count, stats.mean, stats.M2)]
        stats.all_reduce()
        assert all(torch.equal(a, b) for a, b in zip(before, (stats.count, stats.mean, stats.M2)))
    finally:
        dist.destroy_process_group()
    for sync in ("global", None):
        assert torch.equal(results[sync][0], results["local"][0])
        assert all(torch.equal(a, b) for a, b in zip(results[sync][1], results["local"][1]))


def test_without_process_group():
    assert not dist.is_initialized()
    x, y = _batch(16)
    model = _net()
    with SelectivityRegularizer([model.act1, model.act2], ALPHA, K) as reg:  # None: local
        model(x)
        pen = reg.penalty(y)
    with SelectivityRegularizer([model.act1, model.act2], ALPHA, K, sync="local") as reg:
        model(x)
        assert torch.equal(reg.penalty(y), pen)
    with SelectivityRegularizer([model.act1, model.act2], ALPHA, K, sync="global") as reg:
        model(x)
        with pytest.raises(RuntimeError, match="not initialized"):
            reg.penalty(y)
    # The functional API is the single-device op exactly.
    a = torch.rand(16, 3, 2, dtype=torch.float64)
    si = global_selectivity_index([a, a.float()], y, K)
    assert torch.equal(si[0], selkernels.selectivity_index(a, y, K))
    assert torch.equal(si[1], selkernels.selectivity_index(a.float(), y, K))
    means, counts = global_class_means([a], y, K)
    ref_means, ref_counts = selkernels.class_means(a, y, K)
    assert torch.equal(means[0], ref_means) and torch.equal(counts, ref_counts)


def test_bad_arguments():
    model = _net()
    with pytest.raises(ValueError, match="sync"):
        SelectivityRegularizer(model.act1, ALPHA, K, sync="all")
    d = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="m2"):
        all_reduce_moments(torch.tensor(1.0, dtype=torch.float64), d, torch.zeros(3, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="mean"):
        all_reduce_moments(torch.ones(2, dtype=torch.float64), d, torch.zeros(3, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="count"):
        all_reduce_moments(torch.tensor(True), d, torch.zeros(3, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="m2"):
        all_reduce_moments(torch.tensor(1), d, torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one"):
        global_class_means([], torch.zeros(0, dtype=torch.long), K)
