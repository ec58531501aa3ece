#!/usr/bin/env bash
# Build every .ci/*_math_check.cu with nvcc as host code (the kernels' row math, no GPU needed) and run
# it; each compares the CUDA kernels' math with float64 and exits non-zero on a mismatch.
# The source it checks is csrc/<name>_cuda.cu, compiled with -DUED_FAST_<NAME>_MATH_ONLY
# (kd -> UED_FAST_KD_MATH_ONLY, ensemble -> UED_FAST_ENS_MATH_ONLY, sparse -> UED_FAST_SPARSE_MATH_ONLY). Env: NVCC.
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
if [[ ! -x "$NVCC" ]]; then
  echo "check_host_math: nvcc not found (set NVCC=...)" >&2
  exit 2
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

declare -A math_only=([kd]=UED_FAST_KD_MATH_ONLY [ensemble]=UED_FAST_ENS_MATH_ONLY [sparse]=UED_FAST_SPARSE_MATH_ONLY)
status=0
shopt -s nullglob
for src in .ci/*_math_check.cu; do
  name=$(basename "$src" _math_check.cu)
  define=${math_only[$name]:-}
  if [[ -z "$define" ]]; then
    echo "check_host_math: FAIL $src: no MATH_ONLY define known for '$name' (add it to math_only)" >&2
    status=1
    continue
  fi
  if ! "$NVCC" -std=c++20 -O2 -D"$define" -diag-suppress 177 -Icsrc -o "$work/$name" "$src"; then
    echo "check_host_math: FAIL $src does not compile" >&2
    status=1
    continue
  fi
  if "$work/$name"; then
    echo "check_host_math: ok   $src"
  else
    echo "check_host_math: FAIL $src (the math differs from float64, see above)" >&2
    status=1
  fi
done
exit $status
