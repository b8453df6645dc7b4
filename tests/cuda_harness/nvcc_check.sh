#!/usr/bin/env bash
# Compiles the CUDA kernel headers with the real nvcc, so the CPU harness cannot hide code that
# nvcc rejects (e.g. atomicAdd on int64_t, atomicMax on float, C++20 in a C++17 build).
#
#   tests/cuda_harness/nvcc_check.sh
#
#  1. every tests/cuda_harness/nvcc/*.cu (each includes kernel headers and explicitly
#     instantiates their templates) with `nvcc -c` for sm_80 and sm_90;
#  2. every csrc/cuda/*.cuh that no nvcc/*.cu includes, in a generated include-only TU
#     (templates are then not instantiated: a warning asks for an nvcc/<name>.cu);
#  3. api_surface.cuh also with g++ under the harness (same intrinsic overloads in both);
#  4. every must_reject/*.cuh must FAIL under g++ -DSELK_CUDA_SIM and under nvcc (unless it
#     says NVCC_ACCEPTS).
# Exit 0: all good; 1: a failure; 77: skipped because nvcc is missing.
# Env: NVCC (default: nvcc on PATH, else /usr/local/cuda/bin/nvcc), NVCC_ARCHS ("80 90").
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
NVCC="${NVCC:-$(command -v nvcc || true)}"
[[ -z "$NVCC" && -x /usr/local/cuda/bin/nvcc ]] && NVCC=/usr/local/cuda/bin/nvcc
if [[ -z "$NVCC" ]]; then
  echo "SKIP: nvcc not found (set NVCC=/path/to/nvcc)"
  exit 77
fi
ARCHS="${NVCC_ARCHS:-80 90}"
CXX="${CXX:-g++}"
OUT="$HERE/build/nvcc"
mkdir -p "$OUT"
# Same language level and flags as the extension's nvcc build (setup.py).
NVFLAGS=(-std=c++17 --expt-relaxed-constexpr -O1 -I "$ROOT/csrc" -I "$HERE")
SIMFLAGS=(-std=c++20 -fsyntax-only -Wall -Wextra -Wno-unused-parameter -Wno-pragma-once-outside-header -DSELK_CUDA_SIM
          -include "$ROOT/tools/cuda_sim/cuda_sim.h" -I "$ROOT/csrc" -I "$HERE")
fail=0
echo "nvcc: $NVCC ($("$NVCC" --version | tail -n 1))"

shopt -s nullglob
TUS=("$HERE"/nvcc/*.cu)
for hdr in "$ROOT"/csrc/cuda/*.cuh; do
  base="$(basename "$hdr")"
  if ! grep -qs "$base" "${TUS[@]}" /dev/null; then
    gen="$OUT/include_only_${base%.cuh}.cu"
    echo "#include \"cuda/$base\"" > "$gen"
    [[ "$base" != cuda_compat.cuh ]] && \
      echo "WARNING: no tests/cuda_harness/nvcc/*.cu includes csrc/cuda/$base: compiled include-only, templates NOT instantiated"
    TUS+=("$gen")
  fi
done

for tu in "${TUS[@]}"; do
  for arch in $ARCHS; do
    obj="$OUT/$(basename "$tu" .cu).sm_$arch.o"
    if "$NVCC" "${NVFLAGS[@]}" -arch="sm_$arch" -c "$tu" -o "$obj" >"$obj.log" 2>&1; then
      echo "ok   nvcc sm_$arch $(basename "$tu")"
    else
      echo "FAIL nvcc sm_$arch $(basename "$tu")"
      cat "$obj.log"
      fail=1
    fi
  done
done

if "$CXX" "${SIMFLAGS[@]}" -x c++ "$HERE/api_surface.cuh" >"$OUT/api_surface.sim.log" 2>&1; then
  echo "ok   harness g++ api_surface.cuh"
else
  echo "FAIL harness g++ api_surface.cuh"
  cat "$OUT/api_surface.sim.log"
  fail=1
fi

first_arch="${ARCHS%% *}"
for bad in "$HERE"/must_reject/*.cuh; do
  name="$(basename "$bad")"
  if "$CXX" "${SIMFLAGS[@]}" -x c++ "$bad" >"$OUT/reject_$name.sim.log" 2>&1; then
    echo "FAIL harness g++ accepted must_reject/$name"
    fail=1
  else
    echo "ok   harness g++ rejects must_reject/$name"
  fi
  if grep -q NVCC_ACCEPTS "$bad"; then continue; fi
  tu="$OUT/reject_${name%.cuh}.cu"
  echo "#include \"$bad\"" > "$tu"
  if "$NVCC" "${NVFLAGS[@]}" -arch="sm_$first_arch" -c "$tu" -o "$OUT/reject.o" >"$tu.log" 2>&1; then
    echo "FAIL nvcc accepted must_reject/$name (the harness is stricter than nvcc here: fix the test or the harness)"
    fail=1
  else
    echo "ok   nvcc rejects must_reject/$name"
  fi
done
exit $fail
