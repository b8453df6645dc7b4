#!/usr/bin/env bash
# Build selkernels with its CUDA kernels (sm_80 and sm_90) as a wheel, install it into a CUDA-torch
# virtual environment, and check from outside the source tree that every selkernels op has a CUDA
# kernel. Needs nvcc, not a GPU.
#   usage: .ci/cuda_build.sh [VENV]
#   VENV defaults to ${SELKERNELS_CUDA_VENV:-$HOME/.cache/selkernels/cu130}, created with
#   ${SELKERNELS_CUDA_TORCH:-torch==2.14.1} (the CUDA 13.0 build) when missing.
# The wheel goes to a temporary directory, so the CPU build in the source tree is left alone.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-${SELKERNELS_CUDA_VENV:-$HOME/.cache/selkernels/cu130}}"
torch_spec="${SELKERNELS_CUDA_TORCH:-torch==2.14.1}"
pip_q=(-q --disable-pip-version-check)

# The toolkit root: CUDA_HOME if it holds nvcc, else where nvcc says it lives (nvcc on PATH may be
# a wrapper script, so ask nvcc itself rather than resolving the link).
cuda_home="${CUDA_HOME:-}"
if [ -z "$cuda_home" ] || [ ! -x "$cuda_home/bin/nvcc" ]; then
  command -v nvcc >/dev/null || { echo "cuda_build: nvcc not found (set CUDA_HOME)" >&2; exit 1; }
  top="$(cd /tmp && nvcc --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n1)"
  [ -n "$top" ] && [ -x "$top/bin/nvcc" ] || { echo "cuda_build: cannot locate the CUDA toolkit root" >&2; exit 1; }
  cuda_home="$(cd "$top" && pwd)"
fi
echo "cuda_build: CUDA_HOME=$cuda_home ($("$cuda_home/bin/nvcc" --version | grep -o 'release [0-9.]*'))"

if [ ! -x "$venv/bin/python" ]; then
  echo "cuda_build: creating $venv with $torch_spec"
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
"$py" -c "import torch" 2>/dev/null || "$py" -m pip install "${pip_q[@]}" "$torch_spec"
"$py" -m pip install "${pip_q[@]}" numpy ninja setuptools wheel
"$py" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 'cuda_build: torch in $venv has no CUDA')"

wheel_dir="$(mktemp -d)"
check_dir="$(mktemp -d)"
src_dir="$(mktemp -d)"
trap 'rm -rf "$wheel_dir" "$check_dir" "$src_dir"' EXIT
# Build from a copy of the sources (tracked and untracked, minus ignored files): pip builds a local
# directory in place, and its build/ must not mix with the CPU development build's objects.
if git -C "$root" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git -C "$root" ls-files -z -co --exclude-standard | (cd "$root" && tar --null -T - -cf -) | tar -xf - -C "$src_dir"
else
  (cd "$root" && tar --exclude=./build --exclude='./.venv*' -cf - .) | tar -xf - -C "$src_dir"
fi
start=$SECONDS
(
  cd "$src_dir"
  CUDA_HOME="$cuda_home" TORCH_CUDA_ARCH_LIST="8.0;9.0" SELKERNELS_FORCE_CUDA=1 MAX_JOBS="${MAX_JOBS:-2}" \
    "$py" -m pip wheel "${pip_q[@]}" . --no-deps --no-build-isolation -w "$wheel_dir"
)
echo "cuda_build: wheel built in $((SECONDS - start)) s"
"$py" -m pip install "${pip_q[@]}" --no-deps --force-reinstall "$wheel_dir"/selkernels-*.whl

cd "$check_dir"  # import the installed wheel, not the source tree
"$py" - <<'PY'
import sys

import torch
import selkernels

so = selkernels._C.__file__
assert "site-packages" in so, f"imported {so}, not the installed wheel"
ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("selkernels::"))
assert ops, "no selkernels ops registered"
# A CompositeExplicitAutograd kernel (ATen calls only, e.g. the spectral backward) serves every
# device, CUDA included.
def kind(n):
    if torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA"):
        return "CUDA kernel ok"
    if torch._C._dispatch_has_kernel_for_dispatch_key(n, "CompositeExplicitAutograd"):
        return "device-generic kernel ok"
    return "CUDA kernel MISSING"
missing = [n for n in ops if kind(n).endswith("MISSING")]
for n in ops:
    print(f"  {n}: {kind(n)}")
if missing:
    sys.exit(f"cuda_build: ops without a CUDA kernel: {missing}")
print(f"cuda_build: {len(ops)} ops, all with CUDA (or device-generic) kernels ({so})")
PY
