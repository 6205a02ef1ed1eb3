#!/usr/bin/env bash
# CI for the `cuda` feature on a machine without a GPU (issue 6; docs/gpu-emulation.md):
#   1. installs the pinned CUDA 13.0 toolchain (cached under ${XDG_CACHE_HOME:-~/.cache}/icdit),
#   2. builds every target with `--features cuda` (nvcc compiles kernels/*.cu for sm_90),
#   3. prints ptxas's resource usage of every kernel and fails on any spill or local memory;
#      disassembles the Hopper kernels (scripts/check-sass.sh: HGMMA and UTMALDG present, no
#      LDL/STL),
#   4. runs the cuda-feature GPU tests (every one has `cuda` in its name): without a GPU each
#      prints "<test>: skipped: no CUDA device". The emulated tests in the same binaries are not
#      run again: the README's test command ran them, and the feature changes no emulated code.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS

bash scripts/install-cuda-toolchain.sh
# shellcheck disable=SC1091
source "${XDG_CACHE_HOME:-$HOME/.cache}/icdit/cuda-13.0.env"
echo "ci-cuda: toolchain ready after $((SECONDS - start)) s"

cargo build --release --features cuda --all-targets
echo "ci-cuda: cuda build done after $((SECONDS - start)) s"

cargo test --release --features cuda --test gpu_ptxas -- --nocapture
# The cuda build's fatbins: the build-script output folder that holds them, newest first.
kernels_dir=$(dirname "$(ls -t target/release/build/icdit-*/out/gemm_sm90.fatbin | head -n1)")
bash scripts/check-sass.sh "$kernels_dir"

log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --release --features cuda --test 'gpu_*' -- --nocapture cuda 2>&1 | tee "$log"
skipped=$(grep -c ': skipped: no CUDA device' "$log" || true)
ran=$(grep -o 'test result: ok\. [0-9]* passed' "$log" | awk '{s += $4} END {print s + 0}')
if [[ "$ran" -lt 20 ]]; then
    echo "ci-cuda: only $ran CUDA test(s) matched the filter \`cuda\`; expected every CUDA test" >&2
    exit 1
fi
if [[ "$skipped" -gt 0 ]]; then
    echo "ci-cuda: $skipped CUDA test(s) skipped: no CUDA device; their kernels ran under emulation"
else
    echo "ci-cuda: CUDA tests ran on a GPU"
fi
echo "ci-cuda: done in $((SECONDS - start)) s"
