#!/usr/bin/env bash
# Fetch the wheels the GPU benchmark needs that the device image lacks, into .whl/ (git-ignored),
# for the device's Python 3.12 on x86-64 manylinux. Run here (with internet); the device call then
# names .whl in `carry` (bench/gpu_run.sh installs them into /tmp/site).
# liger-kernel is pure Python; its requirements (torch, triton) are already on the device image, so
# nothing else is fetched (--no-deps). Set LIGER_VERSION to pin another release.
set -euo pipefail
cd "$(dirname "$0")/.."
LIGER_VERSION=${LIGER_VERSION:-0.6.4}
PYTHON=${PYTHON:-python3}
mkdir -p .whl
grep -qx '/.whl/' .gitignore 2>/dev/null || grep -qx '/.whl/' "$(git rev-parse --git-path info/exclude)" 2>/dev/null \
  || echo '/.whl/' >> "$(git rev-parse --git-path info/exclude)"
rm -f .whl/liger_kernel-*.whl  # one version only: two stop the install on the device
"$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
  -d .whl "liger-kernel==${LIGER_VERSION}"
echo "wheels in .whl/:"
ls -l .whl/
for w in .whl/*.whl; do
  echo "$w requires:"
  unzip -p "$w" '*/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' | sed 's/^/  /' || true
done
echo "total: $(du -sh .whl | cut -f1) (the device call carries at most 64 MiB with the tree)"
