#!/usr/bin/env bash
# One command on a GPU machine: build, GPU tests, compute sanitizers, op- and step-level benchmarks.
#   usage: scripts/gpu_check.sh DIR
# Writes every step's full log to DIR/<step>.log, a status line per step to DIR/status.tsv, the
# benchmark results to DIR/opbench.json and DIR/stepbench.json, and prints one short table last.
# Made for a machine whose python3 holds a CUDA torch (e.g. 2.11.0+cu130) with nvcc and
# compute-sanitizer on PATH (or in $CUDA_HOME/bin), no network and nothing of selkernels
# installed: it builds in place (MAX_JOBS=16, the visible GPU's architecture) and runs from the
# source tree. Steps that need a missing tool (pytest, compute-sanitizer) are reported as skipped.
# The steps share one time budget (GPU_CHECK_BUDGET_S, default 460 s), so the run ends in < 8 min.
# Exit status: 0 when every step that ran passed.
set -uo pipefail
out="${1:?usage: scripts/gpu_check.sh DIR}"
root="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
: > "$out/status.tsv"
py="${PYTHON:-python3}"
deadline=$((SECONDS + ${GPU_CHECK_BUDGET_S:-460}))
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
cd "$root"

cuda_bin="${CUDA_HOME:-/usr/local/cuda}/bin"
sanitizer="$(command -v compute-sanitizer || true)"
[ -z "$sanitizer" ] && [ -x "$cuda_bin/compute-sanitizer" ] && sanitizer="$cuda_bin/compute-sanitizer"

# step NAME BUDGET_S NOTE CMD...: runs CMD with a timeout (its budget, at most what is left),
# its output to DIR/NAME.log; records exit code, seconds and NOTE.
step() {
  local name="$1" budget="$2" note="$3"
  shift 3
  local left=$((deadline - SECONDS - 5))
  [ "$budget" -gt "$left" ] && budget="$left"
  if [ "$budget" -le 0 ]; then
    printf '%s\t124\t0\tnot run: time budget spent\n' "$name" >> "$out/status.tsv"
    return
  fi
  local t0=$SECONDS rc
  echo "== $name (at most ${budget} s)"
  timeout --kill-after=10 "$budget" "$@" > "$out/$name.log" 2>&1
  rc=$?
  [ $rc -eq 124 ] && note="timed out after ${budget} s; $note"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$note" >> "$out/status.tsv"
  return 0
}

skip() {
  printf '%s\t77\t0\t%s\n' "$1" "$2" >> "$out/status.tsv"
}

# 1. Build in place for the visible GPU.
arch="$("$py" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null || echo 9.0)"
step build 240 "torch $("$py" -c 'import torch; print(torch.__version__)' 2>/dev/null), sm_${arch/./}" \
  env MAX_JOBS=16 TORCH_CUDA_ARCH_LIST="$arch" SELKERNELS_FORCE_CUDA=1 "$py" setup.py build_ext --inplace
if ! "$py" -c "import torch, selkernels, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >> "$out/build.log" 2>&1; then
  echo "gpu_check: selkernels does not import with CUDA (see $out/build.log)" >&2
fi

# 2. GPU tests.
if "$py" -c "import pytest" 2>/dev/null; then
  step gpu_tests 120 "" "$py" -m pytest -q -x -p no:cacheprovider tests/test_cuda.py
else
  skip gpu_tests "pytest is not installed"
fi

# 3. Compute sanitizers on the driver (every selkernels op once), selkernels kernels only
# (mangled names hold the selk:: namespace); the caching allocator off so memcheck sees the
# true allocation bounds.
for tool in memcheck racecheck synccheck; do
  if [ -z "$sanitizer" ]; then
    skip "$tool" "compute-sanitizer not found"
    continue
  fi
  extra=()
  [ "$tool" = memcheck ] && extra=(--leak-check full)
  [ "$tool" = racecheck ] && extra=(--racecheck-report hazard)
  step "$tool" 60 "" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool "$tool" "${extra[@]}" \
    --kernel-name kns=selk --error-exitcode 1 "$py" -m selkernels.gpu_check driver --device cuda
done

# 4. Benchmarks, CUDA-event timed.
step opbench 45 "" "$py" -m selkernels.gpu_check opbench --device cuda --out "$out/opbench.json"
step stepbench 150 "eager and torch.compile variants" \
  "$py" -m selkernels.gpu_check stepbench --device cuda --out "$out/stepbench.json"

"$py" -m selkernels.gpu_check table "$out" | tee "$out/summary.txt"
echo "total $SECONDS s"
awk -F'\t' '$2 != 0 && $2 != 77 { bad = 1 } END { exit bad }' "$out/status.tsv"
