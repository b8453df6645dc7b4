#!/usr/bin/env bash
# One-shot development setup: a virtual environment in .venv with torch, selkernels built in place
# (editable, no build isolation so the extension is compiled against the torch it will run with)
# and the dependencies pyproject.toml lists for development (extras test, lint, analysis, bench).
# Idempotent: re-running rebuilds only what changed.
#   SELKERNELS_TORCH   the torch requirement (default torch==2.13.0, the CPU wheel on this
#                      project's machines; e.g. "torch" for the default build of your platform)
#   SELKERNELS_VENV    where to put the environment (default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${SELKERNELS_VENV:-.venv}"
torch_spec="${SELKERNELS_TORCH:-torch==2.13.0}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
pip=("$py" -m pip install -q --disable-pip-version-check)
# torch and the build tools first: the build runs without isolation, against this torch.
"${pip[@]}" "$torch_spec" setuptools wheel ninja 2>&1 | grep -v "is ignored" || true
"$py" -c "import torch" || { echo "setup: $torch_spec failed to install" >&2; exit 1; }
# The runtime dependencies and the dev extras come from pyproject.toml; torch is already satisfied.
"${pip[@]}" --no-build-isolation -e ".[dev]" 2>&1 | grep -v "is ignored" || true
"$py" -c "import selkernels, pytest, hypothesis, scipy, sklearn, matplotlib, torchmetrics" ||
    { echo "setup: selkernels or its dev dependencies failed to install" >&2; exit 1; }
