#!/usr/bin/env bash
# Compile-only check of the extension's sources against torch 2.11's headers in C++17, the oldest
# torch the GPU machines run (their python3 holds torch 2.11.0+cu130): csrc/*.cpp and csrc/cpu/*.cpp
# with g++ -fsyntax-only, and csrc/cuda/*.cu with nvcc -c for sm_90 when nvcc is found (the .cu
# files include ATen's CUDA headers, so their host code must compile too). Nothing is linked.
#   usage: .ci/torch211_headers.sh
#   SELKERNELS_TORCH211_INCLUDE  directory holding torch/include (default
#                                ~/.cache/selkernels/torch-2.11.0-include)
#   SELKERNELS_CUDA_VENV         CUDA torch venv whose nvidia/cu13/include supplies cusparse.h etc.
#                                (default ~/.cache/selkernels/cu130, as .ci/cuda_build.sh)
# The headers come from PyPI's torch==2.11.0 wheel (the CUDA 13.0 build, 531 MB: the only 2.11 wheel
# the project's index serves; a CPU wheel would need download.pytorch.org): downloaded once, only
# torch/include (62 MB) is kept, the wheel is deleted.
# Exit 0: all compile; 1: a source does not.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
inc_root="${SELKERNELS_TORCH211_INCLUDE:-$HOME/.cache/selkernels/torch-2.11.0-include}"
py="${PYTHON:-$root/.venv/bin/python}"
[ -x "$py" ] || py=python3
jobs="${MAX_JOBS:-1}"

if [ ! -f "$inc_root/torch/include/torch/extension.h" ]; then
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  echo "torch211_headers: downloading torch==2.11.0 (once) for its headers"
  "$py" -m pip download -q --no-deps torch==2.11.0 -d "$tmp" || { echo "torch211_headers: download failed" >&2; exit 1; }
  mkdir -p "$inc_root"
  unzip -q -o "$tmp"/torch-2.11.0-*.whl 'torch/include/*' -d "$inc_root" || { echo "torch211_headers: unzip failed" >&2; exit 1; }
fi
inc="$inc_root/torch/include"
grep -q 'TORCH_VERSION_MINOR 11$' "$inc/torch/headeronly/version.h" 2>/dev/null || { echo "torch211_headers: $inc is not torch 2.11" >&2; exit 1; }
py_inc="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
# The flags cpp_extension gives the extension (setup.py), with the C++17 that torch 2.11 builds with.
common=(-std=c++17 -O0 -I "$root/csrc" -I "$inc" -I "$inc/torch/csrc/api/include" -I "$py_inc"
        -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H -D_GLIBCXX_USE_CXX11_ABI=1)
log="$(mktemp -d)"
fail=0

cpp=("$root"/csrc/*.cpp "$root"/csrc/cpu/*.cpp)
printf '%s\n' "${cpp[@]}" | xargs -P "$jobs" -I{} sh -c \
  'g++ "$@" -fsyntax-only -fopenmp "{}" > "'"$log"'/$(basename {}).log" 2>&1 || echo "{}" >> "'"$log"'/failed"' _ "${common[@]}"

nvcc="${NVCC:-$(command -v nvcc || true)}"
[ -z "$nvcc" ] && [ -x /usr/local/cuda/bin/nvcc ] && nvcc=/usr/local/cuda/bin/nvcc
cu=("$root"/csrc/cuda/*.cu)
# ATen's CUDA headers include cusparse.h and cublas_v2.h, which a minimal toolkit lacks: take them
# from the CUDA torch venv's nvidia wheels, as setup.py does.
cuda_venv="${SELKERNELS_CUDA_VENV:-$HOME/.cache/selkernels/cu130}"
cuda_inc=()
for d in "$cuda_venv"/lib/python3*/site-packages/nvidia/cu13/include; do
  [ -d "$d" ] && cuda_inc+=(-I "$d")
done
if [ -n "$nvcc" ]; then
  printf '%s\n' "${cu[@]}" | xargs -P "$jobs" -I{} sh -c \
    '"'"$nvcc"'" "$@" -DSELKERNELS_WITH_CUDA --expt-relaxed-constexpr -arch=sm_90 -c "{}" -o /dev/null \
       > "'"$log"'/$(basename {}).log" 2>&1 || echo "{}" >> "'"$log"'/failed"' _ "${common[@]}" "${cuda_inc[@]}"
else
  echo "torch211_headers: nvcc not found: the .cu files were not checked"
fi

for f in "${cpp[@]}" ${nvcc:+"${cu[@]}"}; do
  if grep -qxF "$f" "$log/failed" 2>/dev/null; then
    echo "FAIL  ${f#$root/}"
    sed -n '1,30p' "$log/$(basename "$f").log"
    fail=1
  else
    echo "ok    ${f#$root/}"
  fi
done
rm -rf "$log"
[ $fail -eq 0 ] && echo "torch211_headers: every source compiles against torch 2.11 headers (C++17)"
exit $fail
