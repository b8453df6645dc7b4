"""Regression tracking of the covariance and spectral-penalty benchmarks with pytest-benchmark.

    pytest benchmarks/test_bench_covariance.py --benchmark-only

Same groups as the [covariance] table of ``selkernels bench`` (selkernels/bench/covariance.py): the
streaming update against ``z.T @ z`` and ``torch.cov``, the per-class update against a Python loop over
classes, and ``spectral_penalty`` against its literal reference, forward and forward+backward.
Not part of the test suite (pyproject's testpaths is tests/).
"""

import pytest
import torch

from selkernels.bench.covariance import benchmark_groups

PARAMS = [(title, name, fn) for title, cases in benchmark_groups() for name, fn in cases]


@pytest.mark.parametrize("title,name,fn", PARAMS, ids=[f"{t}-{n}".replace(" ", "_") for t, n, _ in PARAMS])
def test_covariance(benchmark, title, name, fn):
    benchmark.group = title
    benchmark.extra_info.update(threads=torch.get_num_threads())
    fn()
    benchmark(fn)
