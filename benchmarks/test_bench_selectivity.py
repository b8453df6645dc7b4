"""Regression tracking of the selectivity benchmark with pytest-benchmark.

    pytest benchmarks/ --benchmark-only                       # every case, variant and mode
    pytest benchmarks/ --benchmark-only -k "fused and fwd"    # a subset
    pytest benchmarks/ --benchmark-only --benchmark-save=base  # then --benchmark-compare

Same cases and variants as ``selkernels bench`` (selkernels/bench.py): fused, the paper-style loop,
the eager torch composition and its torch.compile, forward and forward+backward. Not part of the test
suite (pyproject's testpaths is tests/). Compare numbers within one run or one machine only.
"""
import pytest
import torch

from selkernels.bench import BenchConfig, selectivity_cases

CONFIG = BenchConfig(dtypes=("float32", "bfloat16"))
VARIANTS = ("fused", "paper", "eager", "compiled")
MODES = ("fwd", "fwd+bwd")
# Flat and ordered by case, so each case's tensors and compiled graphs are built once.
PARAMS = [(case, mode, variant) for case in selectivity_cases(CONFIG) for mode in MODES for variant in VARIANTS]

_current = {}


def _workload(case):
    if _current.get("case") is not case:
        _current.clear()
        _current.update(case=case, work=case.build(CONFIG))
    return _current["work"]


@pytest.mark.parametrize("case,mode,variant", PARAMS,
                         ids=[f"{c.name.replace(' ', '_')}-{c.dtype}-{m}-{v}" for c, m, v in PARAMS])
def test_selectivity(benchmark, case, mode, variant):
    work = _workload(case)
    fn = (work.forward if mode == "fwd" else work.forward_backward).get(variant)
    if fn is None:
        pytest.skip(work.notes.get(variant, f"{variant} not available"))
    benchmark.group = f"selectivity {case.name} {case.dtype} {case.shape} {mode}"
    benchmark.extra_info.update(shape=case.shape, dtype=case.dtype, threads=torch.get_num_threads())
    fn()
    benchmark(fn)
