"""The CPU-runnable parts of scripts/gpu_check.sh: the sanitizer driver and the summary table."""

import json
import subprocess
import sys
from pathlib import Path

import torch

from selkernels import gpu_check

ROOT = Path(__file__).resolve().parents[1]


def test_driver_dispatches_every_registered_op_on_cpu():
    lines = []
    assert gpu_check.run_driver("cpu", print_fn=lines.append) == 0, lines
    ops = gpu_check.registered_ops("cpu")
    assert ops and all(op.startswith("selkernels::") for op in ops)
    assert lines[0] == f"driver: {len(ops)}/{len(ops)} selkernels ops dispatched on cpu"


def test_driver_fails_on_an_op_without_workload(monkeypatch):
    ops = gpu_check.registered_ops("cpu") + ["selkernels::op_nobody_calls"]
    monkeypatch.setattr(gpu_check, "registered_ops", lambda device: ops)
    lines = []
    assert gpu_check.run_driver("cpu", print_fn=lines.append) == 1
    assert any("op_nobody_calls" in line for line in lines)


def test_summary_table(tmp_path):
    (tmp_path / "status.tsv").write_text(
        "build\t0\t95\ttorch 2.11.0+cu130, sm_90\n"
        "gpu_tests\t1\t40\t\n"
        "memcheck\t0\t30\t\n"
        "racecheck\t77\t0\tcompute-sanitizer not found\n"
        "stepbench\t124\t150\ttimed out after 150 s; \n"
    )
    (tmp_path / "gpu_tests.log").write_text("....F\n= 1 failed, 4 passed in 3.2s =\n")
    (tmp_path / "memcheck.log").write_text(
        "driver: 12/12 selkernels ops dispatched on cuda\n========= ERROR SUMMARY: 0 errors\n"
    )
    (tmp_path / "opbench.json").write_text(
        json.dumps(
            [
                dict(
                    case="resnet20 stage1",
                    fused_fwd_ms=0.02,
                    fused_fwdbwd_ms=0.05,
                    bandwidth_vs_xsum=0.8,
                    torch_fwdbwd_ms=0.5,
                    paper_fwdbwd_ms=2.5,
                )
            ]
        )
    )
    (tmp_path / "stepbench.json").write_text(
        json.dumps(
            [
                dict(case="blocks K=10", variant="none", median_ms=1.0),
                dict(
                    case="blocks K=10",
                    variant="selkernels",
                    median_ms=1.2,
                    overhead_ms=0.2,
                    overhead_pct=20.0,
                    floor_multiple=1.3,
                ),
            ]
        )
    )
    table = gpu_check.format_summary(str(tmp_path))
    lines = table.splitlines()
    assert lines[1].startswith("build") and "ok" in lines[1] and "sm_90" in lines[1]
    assert "FAIL (exit 1)" in lines[2] and "1 failed, 4 passed" in lines[2]
    assert "ERROR SUMMARY: 0 errors" in lines[3] and "driver: 12/12" in lines[3]
    assert "skipped" in lines[4] and "FAIL (exit 124)" in lines[5]
    assert any("resnet20 stage1" in line and "10.0x" in line and "50.0x" in line and "80%" in line for line in lines)
    step = [line for line in lines if line.startswith("blocks K=10")]
    assert len(step) == 1 and "selkernels" in step[0] and "1.30" in step[0]  # 'none' rows are not repeated


def test_cli_and_script():
    out = subprocess.run(
        [sys.executable, "-m", "selkernels.gpu_check", "driver", "--device", "cpu"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_check.sh")]).returncode == 0
    if not torch.cuda.is_available():
        out = subprocess.run(
            [sys.executable, "-m", "selkernels.gpu_check", "driver", "--device", "cuda"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=120,
        )
        assert out.returncode == 1 and "is_available() is False" in out.stderr
