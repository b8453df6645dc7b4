"""``selkernels bench``: the fused ops against what users run today, at shapes from real networks.

A subpackage split by concern:

* :mod:`.core` — the case registry (:func:`register_suite`, :func:`cases_from_groups`), round-robin
  medians and peak memory (:func:`run`);
* :mod:`.output` — one table per op family, CSV / JSON / plot files;
* one module per op family, each registering its suite on import: :mod:`.selectivity`,
  :mod:`.covariance`, :mod:`.dataset` (a dataset pass of :class:`selkernels.ClassSelectivity`);
* :mod:`.step` — the training-step suite (the regularizer inside a real step against the byte
  floor, and the modeled GPU cost per step), run first;
* :mod:`.cli` — the ``selkernels bench`` command.

See :mod:`.core` for what is timed and how.
"""

from . import covariance, dataset, selectivity  # noqa: F401  (register their suites)
from .cli import add_arguments, main
from .core import SUITES, BenchConfig, Case, Workload, cases_from_groups, collect_cases, register_suite, run
from .covariance import covariance_cases
from .dataset import dataset_cases
from .output import format_table, summarize, write_outputs
from .selectivity import selectivity_cases, torch_selectivity

__all__ = [
    "BenchConfig",
    "Case",
    "Workload",
    "SUITES",
    "register_suite",
    "cases_from_groups",
    "collect_cases",
    "run",
    "summarize",
    "format_table",
    "write_outputs",
    "selectivity_cases",
    "torch_selectivity",
    "covariance_cases",
    "dataset_cases",
    "add_arguments",
    "main",
]
