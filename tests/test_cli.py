"""The command line: ``selkernels bench --quick`` and ``selkernels demo --quick`` end to end.

These check that every case and variant is measured and written out, not how fast anything is.
"""

import csv
import json
import math
import subprocess
import sys

import pytest
import torch

from selkernels import bench, cli, reference
from selkernels.bench import BenchConfig, selectivity_cases, torch_selectivity

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = cli.main(["bench", "--quick", "--no-progress", "--threads", "1", "--out", str(out)])
    return rc, buf.getvalue(), out


def test_bench_quick_writes_every_case(bench_run):
    rc, stdout, out = bench_run
    assert rc == 0
    cases = selectivity_cases(BenchConfig(quick=True))
    assert len(cases) >= 2
    for name in ("results.csv", "summary.csv", "results.json", "table.txt", "speedups.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "speedups.png").read_bytes()[:8] == PNG_MAGIC

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    measured = {(r["case"], r["dtype"], r["variant"], r["mode"]) for r in rows}
    for case in cases:
        assert case.name in stdout
        assert (case.name, case.dtype, "x.sum", "x.sum") in measured
        for variant in ("fused", "paper", "eager"):
            for mode in ("fwd", "fwd+bwd"):
                assert (case.name, case.dtype, variant, mode) in measured, (case.name, case.dtype, variant, mode)
    # Every registered family is in the default run, e.g. the covariance cases.
    covariance = bench.covariance_cases(BenchConfig(quick=True))
    assert covariance
    for case in covariance:
        assert case.name in stdout
        assert any(r["family"] == "covariance" and r["case"] == case.name for r in rows)
    for r in rows:
        assert float(r["median_ms"]) > 0 and int(r["runs"]) > 0
        if r["mode"] == "fwd+bwd":
            assert float(r["peak_extra_mb"]) >= 0

    data = json.loads((out / "results.json").read_text())
    assert len(data["results"]) == len(rows)
    assert data["environment"]["torch"] == torch.__version__
    summary = [s for s in data["summary"] if s["family"] == "selectivity"]
    assert {(s["case"], s["dtype"]) for s in summary} == {(c.name, c.dtype) for c in cases}
    for s in summary:
        for key in ("speedup_vs_paper", "speedup_vs_eager"):
            assert s[key] > 0 and math.isfinite(s[key])
        if s["mode"] == "fwd":
            assert s["bandwidth_vs_xsum"] > 0


def test_bench_filter_selects_cases(tmp_path, capsys):
    assert cli.main(["bench", "--quick", "--no-progress", "--filter", "K=50 float32", "--min-run-time", "0.001"]) == 0
    stdout = capsys.readouterr().out
    assert "tiny K=50" in stdout and "tiny K=10" not in stdout
    with pytest.raises(SystemExit):
        cli.main(["bench", "--quick", "--no-progress", "--filter", "no such case"])


@pytest.mark.parametrize("num_classes,present", [(10, 10), (50, 7), (5, 1)])
def test_eager_baseline_matches_reference(num_classes, present):
    # The benchmark's eager/compiled baseline must compute the same SI as the library and the oracle.
    gen = torch.Generator().manual_seed(num_classes)
    x = torch.rand(40, 6, 3, 5, dtype=torch.float64, generator=gen)
    labels = torch.randint(0, present, (40,), generator=gen)
    expected = reference.selectivity_index_reference(x, labels, num_classes)
    torch.testing.assert_close(torch_selectivity(x, labels, num_classes), expected)


def test_demo_quick(tmp_path, capsys):
    assert (
        cli.main(
            [
                "demo",
                "--quick",
                "--no-progress",
                "--threads",
                "1",
                "--out",
                str(tmp_path),
                "--figures",
                str(tmp_path / "fig"),
            ]
        )
        == 0
    )
    stdout = capsys.readouterr().out
    for alpha in ("-10", "0", "10"):
        assert f"\n{alpha.rjust(5)} " in stdout
    assert "SmallViT" in stdout and "SI mlp2" in stdout and "SI block3" in stdout
    for name in ("demo.csv", "demo.json", "demo.txt", "demo.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    for name in ("si_histograms_cnn.png", "si_histograms_vit.png", "ablation_cnn.png", "ablation_vit.png"):
        assert (tmp_path / "fig" / name).read_bytes()[:8] == PNG_MAGIC, name
    data = json.loads((tmp_path / "demo.json").read_text())
    assert len(data["runs"]) == 2 * 3 * 2  # models x alphas x seeds
    for run in data["runs"]:
        assert 0.0 <= run["accuracy"] <= 1.0
        assert len(run["layer_si"]) == (3 if run["model"] == "cnn" else 2)
        assert all(math.isfinite(v) for v in run["layer_si"])


def test_module_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "selkernels", "bench", "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "--quick" in proc.stdout


def test_bench_plugs_in_another_family(tmp_path, monkeypatch, capsys):
    # Another op family registers (title, [(name, callable), ...]) groups, the fused op first.
    a = torch.rand(64, 64)
    groups = [
        ("matmul 64", [("a @ a", lambda: a @ a), ("einsum", lambda: torch.einsum("ij,jk->ik", a, a))]),
        ("sum 64", [("a.sum()", lambda: a.sum()), ("python sum", lambda: sum(a.flatten().tolist()))]),
    ]
    monkeypatch.setitem(bench.SUITES, "toy", lambda cfg: bench.cases_from_groups("toy", groups, dtype="float32"))
    assert cli.main(["bench", "--quick", "--no-progress", "--family", "toy", "--out", str(tmp_path)]) == 0
    stdout = capsys.readouterr().out
    assert "[toy]" in stdout and "[selectivity]" not in stdout
    for name in ("matmul 64", "a @ a", "einsum", "sum 64", "python sum"):
        assert name in stdout
    summary = json.loads((tmp_path / "results.json").read_text())["summary"]
    assert [s["case"] for s in summary] == ["matmul 64", "sum 64"]
    assert summary[0]["speedup_vs_einsum"] > 0 and summary[1]["speedup_vs_python sum"] > 0
    assert (tmp_path / "speedups.png").read_bytes()[:8] == PNG_MAGIC
