#!/usr/bin/env bash
# Kernel-level measurements on a lent GPU machine, for tuning (docs/gpu-check.md), in one call
# with `.device/` carried (scripts/prepare-device.sh):
#   1. `icdit bench-gemm`: every GEMM tile shape and split on DiT-XL/2's linear shapes at
#      batches 1, 4, 16 (with guidance), and attention under each key split    -> gemm.md
#   2. Nsight Compute details (speed of light, occupancy, warp stall reasons) of the first
#      GEMM launches of `bench-gemm --rows 512`                                 -> ncu-gemm.txt
#   3. Nsight Compute kernel durations over `bench-gpu --depth 2 --batches 1`  -> ncu-step.txt
#   4. `icdit bench-gpu --batches 1` (step kinds, 50-step sampling)            -> engine.txt
# Files go to ${OUT:-out/gpu-profile}. GPU_PROFILE_SECONDS (default 150) bounds the whole run.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-out/gpu-profile}
BUDGET=${GPU_PROFILE_SECONDS:-150}
PY=${PYTHON:-python3}
BIN=.device/bin
mkdir -p "$OUT_DIR"
START=$SECONDS
left() { echo $((BUDGET - (SECONDS - START))); }

if [[ ! -d "$BIN" && -f .device/bin.tar.xz ]]; then
    "$PY" -c 'import tarfile; tarfile.open(".device/bin.tar.xz").extractall(".device")'
fi
if ldd "$BIN/icdit" | grep -q 'libcuda.so.1 => not found'; then
    dir=$("$PY" -c 'import ctypes, os
ctypes.CDLL("libcuda.so.1")
print(next(os.path.dirname(l.split()[-1]) for l in open("/proc/self/maps") if "libcuda.so" in l))' 2>/dev/null)
    export LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader

echo "== 1. bench-gemm"
timeout -k 5 $(($(left) * 5 / 10)) "$BIN/icdit" bench-gemm >"$OUT_DIR/gemm.md" 2>&1
echo "exit $? after $((SECONDS - START)) s"
grep -E '\| auto \|' "$OUT_DIR/gemm.md" | head -n 40

echo "== 2. ncu details of the first GEMMs at 512 rows"
timeout -k 5 $(($(left) * 4 / 10)) ncu --clock-control none -k regex:'gemm_fused_f16' --launch-count 12 \
    --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats \
    --section MemoryWorkloadAnalysis \
    "$BIN/icdit" bench-gemm --rows 512 --iters 1 >"$OUT_DIR/ncu-gemm.txt" 2>&1
echo "exit $? after $((SECONDS - START)) s"

echo "== 3. ncu durations of one step at batch 1 (2 blocks)"
timeout -k 5 $(($(left) * 6 / 10)) ncu --clock-control none --metrics gpu__time_duration.sum --csv --print-units base \
    "$BIN/icdit" bench-gpu --depth 2 --batches 1 --iters 1 --e2e-runs 0 >"$OUT_DIR/ncu-step.txt" 2>&1
echo "exit $? after $((SECONDS - START)) s"

echo "== 4. bench-gpu --batches 1"
timeout -k 5 $(($(left) - 5)) "$BIN/icdit" bench-gpu --batches 1 --e2e-runs 2 >"$OUT_DIR/engine.txt" 2>&1
echo "exit $? after $((SECONDS - START)) s"
tail -n 4 "$OUT_DIR/engine.txt"
