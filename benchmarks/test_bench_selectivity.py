"""Regression tracking of the selectivity benchmark with pytest-benchmark.

    pytest benchmarks/ --benchmark-only                       # every case, variant and mode
    pytest benchmarks/ --benchmark-only -k "fused and fwd"    # a subset
    pytest benchmarks/ --benchmark-only --benchmark-save=base  # then --benchmark-compare

Same cases and variants as ``selkernels bench`` (selkernels/bench/selectivity.py): fused, the paper-style loop,
the eager torch composition and its torch.compile, forward and forward+backward. Not part of the test
suite (pyproject's testpaths is tests/). Compare numbers within one run or one machine only.
"""

import pytest
import torch

from selkernels.bench import BenchConfig, selectivity_cases

CONFIG = BenchConfig(dtypes=("float32", "bfloat16"), compile=False)
COMPILE_CONFIG = BenchConfig(dtypes=CONFIG.dtypes, compile=True)
VARIANTS = ("fused", "paper", "eager", "compiled")
MODES = ("fwd", "fwd+bwd")
# Ordered by case, then variant, so each case's tensors are built once and torch.compile runs only
# when a compiled variant is selected.
PARAMS = [(case, mode, variant) for case in selectivity_cases(CONFIG) for variant in VARIANTS for mode in MODES]

_current = {}


def _workload(case, variant):
    key = (case.name, case.dtype, variant == "compiled")
    if _current.get("key") != key:
        _current.clear()
        _current.update(key=key, work=case.build(COMPILE_CONFIG if key[2] else CONFIG))
    return _current["work"]


@pytest.mark.parametrize(
    "case,mode,variant", PARAMS, ids=[f"{c.name.replace(' ', '_')}-{c.dtype}-{m}-{v}" for c, m, v in PARAMS]
)
def test_selectivity(benchmark, case, mode, variant):
    work = _workload(case, variant)
    fn = (work.forward if mode == "fwd" else work.forward_backward).get(variant)
    if fn is None:
        pytest.skip(work.notes.get(variant, f"{variant} not available"))
    benchmark.group = f"selectivity {case.name} {case.dtype} {case.shape} {mode}"
    benchmark.extra_info.update(shape=case.shape, dtype=case.dtype, threads=torch.get_num_threads())
    fn()
    benchmark(fn)
