"""The step-level benchmark suite (selkernels/bench/step.py): every case and variant measured,
the variants computing the same penalty, and the modeled GPU cost from the launchers' plan."""

import math

import pytest
import torch

import selkernels
from selkernels.bench import step as bench_step
from selkernels.bench.step import (
    GPU_ASSUMPTIONS,
    RESNET18_IMAGENET_BLOCKS,
    RESNET20_BLOCKS,
    gpu_model,
    modeled_gpu_rows,
)


def test_quick_run_measures_every_case_and_variant():
    lines = []
    results, table = bench_step.main_step(
        quick=True, compile_variants=False, min_rounds=2, min_run_time=0.0, print_fn=lines.append
    )
    by = {(r.case, r.variant): r for r in results}
    for case in ("blocks K=10", "blocks K=100", "resnet20 K=10"):
        for variant in ("none", "floor", "paper", "torch", "selkernels"):
            assert (case, variant) in by, (case, variant)
        none = by[(case, "none")]
        for variant in ("floor", "paper", "torch", "selkernels"):
            r = by[(case, variant)]
            assert r.median_ms > 0 and r.rounds >= 2 and r.baseline == "none"
            assert math.isclose(r.overhead_ms, r.median_ms - none.median_ms, rel_tol=1e-9, abs_tol=1e-12)
            assert math.isclose(r.overhead_pct, 100 * r.overhead_ms / none.median_ms, rel_tol=1e-9)
            floor = by[(case, "floor")].overhead_ms
            if floor > 0:
                assert math.isclose(r.floor_multiple, r.overhead_ms / floor, rel_tol=1e-9)
    assert table.startswith("[step]") and "selkernels" in table
    assert any(line.startswith("[step]") for line in lines)


def test_variants_compute_the_same_penalty():
    """paper loop, torch composition and SelectivityRegularizer give one penalty (fp64, every class
    present), so the suite times equal work."""
    k, n = 10, 40
    net = bench_step._BlockOutputs(n, [(c // 4, h // 4, w // 4) for c, h, w in RESNET20_BLOCKS], "cpu", torch.float64)
    labels = torch.arange(n) % k
    with selkernels.SelectivityRegularizer(list(net.blocks), bench_step.ALPHA, k) as reg:
        catcher = bench_step._OutputCatcher(net.blocks)
        net()
        outs = catcher.take()
        ours = reg.penalty(labels)
        catcher.remove()
    for other in (bench_step._paper_penalty(outs, labels, k), bench_step._torch_penalty(outs, labels, k)):
        torch.testing.assert_close(other, ours, rtol=1e-10, atol=1e-12)
    assert bench_step._floor_penalty(outs, labels, k).item() == 0


def test_gpu_model_arithmetic():
    shapes = [(4, 3, 5, 5), (4, 6, 2, 2)]
    plan = [
        dict(kernel="a", grid=(2, 1, 1), block=(256, 1, 1), bytes_read=1000, bytes_written=10, host_syncs=0),
        dict(kernel="b", grid=(1, 1, 1), block=(128, 1, 1), bytes_read=50, bytes_written=20, host_syncs=1),
    ]
    a = dict(GPU_ASSUMPTIONS, bandwidth_gbs=1.0, launch_us=2.0, host_sync_us=7.0)
    row = gpu_model(plan, shapes, 2, 10.0, "toy", a)
    out_bytes = (4 * 3 * 25 + 4 * 6 * 4) * 2
    unit_bytes = (4 * 3 + 4 * 6) * 2
    # Autograd's in-place add of the broadcast, one per layer, is counted on top of the plan.
    assert row.launches == 2 + len(shapes) and row.host_syncs == 1
    assert row.mb_read * 2**20 == pytest.approx(1050 + out_bytes + unit_bytes)
    assert row.mb_written * 2**20 == pytest.approx(30 + out_bytes)
    expect_ms = row.launches * 2.0e-3 + 7.0e-3 + (1080 + 2 * out_bytes + unit_bytes) / 1e9 * 1e3
    assert row.modeled_ms == pytest.approx(expect_ms)
    assert row.pct_of_step == pytest.approx(100 * expect_ms / 10.0)
    assert row.floor_ms == pytest.approx(3 * out_bytes / 1e9 * 1e3)


def test_modeled_gpu_column_from_the_launch_plan():
    """The modeled counts are the launchers' own plan (plus autograd's add per layer), and the GPU
    targets hold for 8 hooked ResNet-18 layers: <= 12 selkernels launches, 0 host syncs, and a
    modeled cost within 1.2x the byte floor."""
    plan_fn = getattr(selkernels.ops, "cuda_launch_plan", None)
    if plan_fn is None:
        pytest.skip("selkernels.ops.cuda_launch_plan is not available in this build")
    rows = {r.case: r for r in modeled_gpu_rows()}
    shapes = [(256,) + s for s in RESNET18_IMAGENET_BLOCKS]
    plan = plan_fn(shapes, 1000, [torch.bfloat16] * len(shapes), sm_count=GPU_ASSUMPTIONS["sm_count"])
    assert plan and all({"kernel", "grid", "block", "bytes_read", "bytes_written"} <= set(e) for e in plan)
    r18 = rows["resnet18 imagenet N=256 K=1000"]
    out_bytes = sum(math.prod(s) for s in shapes) * 2
    unit_bytes = sum(s[0] * s[1] for s in shapes) * 2
    assert r18.launches == len(plan) + len(shapes)  # + autograd's add per layer
    assert r18.host_syncs == sum(e["host_syncs"] for e in plan)
    assert r18.mb_read * 2**20 == pytest.approx(sum(e["bytes_read"] for e in plan) + out_bytes + unit_bytes)
    assert r18.mb_written * 2**20 == pytest.approx(sum(e["bytes_written"] for e in plan) + out_bytes)
    selkernels_launches = len(plan)
    assert selkernels_launches <= 12, plan
    assert r18.host_syncs == 0
    # The % of step rests on the assumed step time and bandwidth: what holds whatever they are is
    # the cost relative to the floor (one read of the outputs, read + write of their gradient).
    assert r18.modeled_ms <= 1.2 * r18.floor_ms, r18
    assert r18.pct_of_step == pytest.approx(100 * r18.modeled_ms / GPU_ASSUMPTIONS["resnet18_imagenet_step_ms"])
    text = bench_step.format_gpu_table(list(rows.values()))
    assert "resnet18 imagenet" in text and str(GPU_ASSUMPTIONS["resnet18_imagenet_step_ms"]) in text
