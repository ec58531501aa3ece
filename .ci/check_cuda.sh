#!/usr/bin/env bash
# Developer tool (`make check-cuda`), not run by CI, which builds and links the CUDA kernels for real:
# compile-check every csrc/*.cu for sm_90 against the installed torch's headers (nvcc -c, no link), in
# seconds per file, e.g. while editing one kernel.
# Works with a CPU-only torch: the one generated CUDA header such a torch lacks is stubbed in a temp dir.
# Usage: .ci/check_cuda.sh [file.cu ...]   (default: every csrc/*.cu). Env: NVCC, JOBS (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
JOBS=${JOBS:-2}
PYTHON=${PYTHON:-python}
if [[ ! -x "$NVCC" ]]; then
  echo "check_cuda: nvcc not found (set NVCC=...)" >&2
  exit 2
fi

if [[ $# -gt 0 ]]; then
  files=("$@")
else
  shopt -s nullglob
  files=(csrc/*.cu)
fi
if [[ ${#files[@]} -eq 0 ]]; then
  echo "check_cuda: no .cu files to check"
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/stub/c10/cuda/impl"
printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$work/stub/c10/cuda/impl/cuda_cmake_macros.h"

torch_includes=$("$PYTHON" -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I' + p for p in include_paths()))")
# Same language/arch flags as setup.py's nvcc build (sm_90 only here).
flags=(-std=c++20 -O3 --use_fast_math -lineinfo --expt-relaxed-constexpr -DUED_FAST_WITH_CUDA
       -gencode=arch=compute_90,code=sm_90 -Xptxas=-warn-spills -I"$work/stub" $torch_includes)

echo "check_cuda: $("$NVCC" --version | tail -1); ${#files[@]} file(s), $JOBS at a time"
export NVCC work
check_one() {
  local src=$1 name log start rc
  name=$(echo "$src" | tr '/.' '__')
  log="$work/$name.log"
  start=$(date +%s.%N)
  set +e
  "$NVCC" "${@:2}" -c -o "$work/$name.o" "$src" >"$log" 2>&1
  rc=$?
  set -e
  local secs
  secs=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')
  if [[ $rc -ne 0 ]]; then
    echo "check_cuda: FAIL $src (${secs}s)"
    sed 's/^/    /' "$log"
    return 1
  fi
  echo "check_cuda: ok   $src (${secs}s)"
  if grep -qiE 'warning|spill' "$log"; then sed 's/^/    /' "$log" | grep -iE 'warning|spill' | head -20; fi
}
export -f check_one

status=0
printf '%s\0' "${files[@]}" | xargs -0 -P "$JOBS" -I{} bash -c 'check_one "$@"' _ {} "${flags[@]}" || status=1
if [[ $status -ne 0 ]]; then
  echo "check_cuda: FAILED (see the FAIL lines above)" >&2
  exit 1
fi
echo "check_cuda: all ${#files[@]} file(s) compile for sm_90"

# The kd_loss row math also runs on the host (no GPU needed): check it against float64.
if [[ $# -eq 0 && -f .ci/kd_math_check.cu && -f csrc/kd_loss_cuda.cu ]]; then
  "$NVCC" -std=c++20 -O2 -DUED_FAST_KD_MATH_ONLY -diag-suppress 177 -Icsrc -o "$work/kd_math_check" .ci/kd_math_check.cu
  "$work/kd_math_check" || { echo "check_cuda: FAIL kd_loss row math (.ci/kd_math_check.cu)" >&2; exit 1; }
fi
