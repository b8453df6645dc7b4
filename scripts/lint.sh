#!/usr/bin/env bash
# Lint and format checks, as CI runs them (ruff for Python, clang-format for C++/CUDA).
#   scripts/lint.sh          check; exit non-zero on any violation
#   scripts/lint.sh --fix    apply the fixes and the formatting in place
# Uses the tools of .venv (installed by scripts/setup.sh from the [lint] extra).
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${SELKERNELS_VENV:-.venv}/bin"
mapfile -t cxx < <(git ls-files '*.cpp' '*.h' '*.cu' '*.cuh')
if [[ "${1:-}" == "--fix" ]]; then
  "$bin/ruff" check --fix .
  "$bin/ruff" format .
  "$bin/clang-format" -i "${cxx[@]}"
else
  "$bin/ruff" check .
  "$bin/ruff" format --check .
  "$bin/clang-format" --dry-run -Werror "${cxx[@]}"
fi
echo "lint: ok (${#cxx[@]} C++/CUDA files, ruff over the Python tree)"
