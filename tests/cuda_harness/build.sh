#!/usr/bin/env bash
# Build and run the CUDA-semantics harness tests: tests/cuda_harness/selftest.cpp and every
# tests/cuda_harness/test_*.cpp, one executable each, into tests/cuda_harness/build/MODE/.
#
#   tests/cuda_harness/build.sh [plain|tsan|asan] [--no-run]
#
# Each executable runs once per schedule seed in $SELK_SIM_SEEDS (default "0 1 7": index order,
# reversed, shuffled). Exit status is non-zero if any build or run fails.
# Env: CXX (default g++), CXXFLAGS_EXTRA, SELK_SIM_SEEDS, JOBS (parallel compiles, default nproc).
set -euo pipefail

MODE="${1:-plain}"
RUN=1
[[ "${2:-}" == "--no-run" ]] && RUN=0
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
CXX="${CXX:-g++}"
SEEDS="${SELK_SIM_SEEDS:-0 1 7}"
OUT="$HERE/build/$MODE"

# The simulator is injected into every TU (no kernel header includes it).
SIM=(-DSELK_CUDA_SIM -include "$ROOT/tools/cuda_sim/cuda_sim.h")
BASE=(-std=c++20 -O1 -g -Wall -Wextra -Wno-unused-parameter -I "$ROOT/csrc" -I "$HERE" "${SIM[@]}")
case "$MODE" in
  plain) SAN=() ;;
  tsan) SAN=(-fsanitize=thread) ;;
  asan) SAN=(-fsanitize=address,undefined -fsanitize=bounds -fno-sanitize-recover=all -fno-omit-frame-pointer) ;;
  *) echo "usage: $0 [plain|tsan|asan] [--no-run]" >&2; exit 2 ;;
esac
# shellcheck disable=SC2206
EXTRA=(${CXXFLAGS_EXTRA:-})

mkdir -p "$OUT"
shopt -s nullglob
SRCS=("$HERE"/selftest.cpp "$HERE"/test_*.cpp)

# Compile in parallel (2 cores on the dev box; a TSan build of one test takes ~10 s).
JOBS="${JOBS:-$(nproc 2>/dev/null || echo 2)}"
pids=()
names=()
for src in "${SRCS[@]}"; do
  name="$(basename "$src" .cpp)"
  (
    "$CXX" "${BASE[@]}" "${SAN[@]}" "${EXTRA[@]}" "$src" -o "$OUT/$name" 2>"$OUT/$name.build.log" \
      || { cat "$OUT/$name.build.log" >&2; exit 1; }
  ) &
  pids+=($!)
  names+=("$name")
  while (( $(jobs -rp | wc -l) >= JOBS )); do wait -n || true; done
done
fail=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "BUILD FAILED: ${names[$i]} ($MODE)" >&2
    fail=1
  fi
done
(( fail )) && exit 1
echo "built ${#names[@]} harness test(s) in $OUT"
(( RUN )) || exit 0

case "$MODE" in
  tsan) export TSAN_OPTIONS="${TSAN_OPTIONS:-halt_on_error=1 second_deadlock_stack=1}" ;;
  asan) export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1 abort_on_error=0}"
        export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1}" ;;
esac
for name in "${names[@]}"; do
  for seed in $SEEDS; do
    if SELK_SIM_SEED="$seed" "$OUT/$name" >"$OUT/$name.seed$seed.log" 2>&1; then
      echo "ok   $MODE $name seed=$seed"
    else
      echo "FAIL $MODE $name seed=$seed (log: $OUT/$name.seed$seed.log)" >&2
      tail -n 40 "$OUT/$name.seed$seed.log" >&2
      fail=1
    fi
  done
done
exit $fail
