"""Regression tracking of the dataset-pass benchmark (ClassSelectivity over 40 batches) with
pytest-benchmark: ``pytest benchmarks/test_bench_dataset.py --benchmark-only``.

Same case and variants as ``selkernels bench --family dataset`` (selkernels/bench/dataset.py): the
ClassSelectivity pass, the hand-rolled sum of means * counts, ``x.sum()`` of every batch (the
bandwidth reference) and the published per-class loop.
"""

import pytest
import torch

from selkernels.bench import BenchConfig, dataset_cases

CONFIG = BenchConfig(dtypes=("float32",), compile=False)
VARIANTS = ("fused", "hand-rolled", "x.sum() of each batch", "published loop")
PARAMS = [(case, variant) for case in dataset_cases(CONFIG) for variant in VARIANTS]

_current = {}


def _workload(case):
    if _current.get("key") != case.name:
        _current.clear()
        _current.update(key=case.name, work=case.build(CONFIG))
    return _current["work"]


@pytest.mark.parametrize(
    "case,variant", PARAMS, ids=[f"{c.name.replace(' ', '_')}-{v.replace(' ', '_')}" for c, v in PARAMS]
)
def test_dataset_pass(benchmark, case, variant):
    fn = _workload(case).forward[variant]
    benchmark.group = f"dataset {case.name} {case.shape}"
    benchmark.extra_info.update(shape=case.shape, threads=torch.get_num_threads())
    fn()
    benchmark(fn)
