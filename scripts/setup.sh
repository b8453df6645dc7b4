#!/usr/bin/env bash
# One-shot development setup: a virtual environment in .venv with torch, the runtime and test
# dependencies, and selkernels built in place (editable, no build isolation so the extension is
# compiled against the torch it will run with). Idempotent: re-running rebuilds only what changed.
#   SELKERNELS_TORCH   the torch requirement (default torch==2.13.0, the CPU wheel on this
#                      project's machines; e.g. "torch" for the default build of your platform)
#   SELKERNELS_VENV    where to put the environment (default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${SELKERNELS_VENV:-.venv}"
torch_spec="${SELKERNELS_TORCH:-torch==2.13.0}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --disable-pip-version-check "$torch_spec" numpy scipy scikit-learn tqdm matplotlib ninja \
    pybind11 setuptools wheel pytest pytest-benchmark hypothesis 2>&1 | grep -v "is ignored" || true
"$py" -c "import torch, numpy, scipy, sklearn, tqdm, matplotlib, pytest, hypothesis" ||
    { echo "setup: dependencies failed to install ($torch_spec and the packages above)" >&2; exit 1; }
"$py" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e . 2>&1 | grep -v "is ignored" || true
"$py" -c "import selkernels" || { echo "setup: selkernels failed to build" >&2; exit 1; }
