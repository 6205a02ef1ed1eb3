#!/usr/bin/env bash
# Trains the bundled default model (weights/README.md) on a lent GPU machine in one call:
#   1. a 300-step probe of tools/train_default_model.py --device cuda, for the time per step;
#   2. the run: as many whole thousands of steps as fit in GPU_TRAIN_SECONDS (default 150) at
#      that rate, with the cosine learning-rate decay ending exactly at the last step, so the run
#      is fixed by its command line (printed, and recorded in the weights' metadata);
#   3. a sample grid of the new weights by `icdit sample` on the machine's CPUs, when the
#      binaries of scripts/prepare-device.sh came along (.device/bin.tar.xz).
# The dataset is not generated there (a minute of device time): scripts/prepare-device.sh
# --with-dataset puts the compressed cache (8 MB) in .device/; carry [".device"].
# Files in ${OUT:-out/gpu-train}: icdit-shapes-32.safetensors, shapes32-loss.csv, train.log (the
# probe's log, then the run's), grid.png.
#
# Environment: GPU_TRAIN_SECONDS, GPU_TRAIN_BATCH (default 256), GPU_TRAIN_LR (default 1e-3),
# GPU_TRAIN_DATA (default .device/ + `tools/make_dataset.py --print-cache-name`, the file
# prepare-device.sh packs), PYTHON (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT_DIR=${OUT:-out/gpu-train}
SECONDS_WANTED=${GPU_TRAIN_SECONDS:-150}
BATCH=${GPU_TRAIN_BATCH:-256}
LR=${GPU_TRAIN_LR:-1e-3}
PY=${PYTHON:-python3}
DATA=${GPU_TRAIN_DATA:-.device/$("$PY" tools/make_dataset.py --print-cache-name)}
mkdir -p "$OUT_DIR"
[[ -f "$DATA" ]] || { echo "gpu-train: no dataset at $DATA (scripts/prepare-device.sh --with-dataset)" >&2; exit 1; }

common=(--device cuda --batch "$BATCH" --lr "$LR" --lr-schedule cosine --preview-every 0
        --ckpt-every 1000000 --threads 8 --data-cache "$DATA")

echo "== gpu-train: probe (300 steps, batch $BATCH)"
PYTHONUNBUFFERED=1 timeout -k 5 120 "$PY" tools/train_default_model.py "${common[@]}" --steps 300 \
    --log-every 100 --out /tmp/probe.safetensors --log-csv /tmp/probe.csv --work-dir /tmp/probe \
    >"$OUT_DIR/train.log" 2>&1 || { tail -n 20 "$OUT_DIR/train.log"; exit 1; }
tail -n 3 "$OUT_DIR/train.log"
# Seconds per step from the log's wall clock between steps 100 and 300 (past start-up).
per_step=$("$PY" -c 'import csv; r = {int(x["step"]): float(x["wall_s"]) for x in csv.DictReader(open("/tmp/probe.csv"))}; print((r[300] - r[100]) / 200)')
steps=$("$PY" -c "print(max(1000, int($SECONDS_WANTED / $per_step) // 1000 * 1000))")
echo "gpu-train: $per_step s per step -> --steps $steps"

cmd=("$PY" tools/train_default_model.py "${common[@]}" --steps "$steps" --max-minutes 30
     --out "$OUT_DIR/icdit-shapes-32.safetensors" --log-csv "$OUT_DIR/shapes32-loss.csv" --work-dir /tmp/train)
echo "== gpu-train: ${cmd[*]}"
t0=$SECONDS
{ echo "== ${cmd[*]}"; PYTHONUNBUFFERED=1 "${cmd[@]}"; } >>"$OUT_DIR/train.log" 2>&1
rc=$?
tail -n 6 "$OUT_DIR/train.log"
echo "gpu-train: exit $rc after $((SECONDS - t0)) s"
((rc == 0)) || exit 1

if [[ ! -d .device/bin && -f .device/bin.tar.xz ]]; then
    "$PY" -c 'import tarfile; tarfile.open(".device/bin.tar.xz").extractall(".device")'
fi
if [[ -x .device/bin/icdit ]]; then
    lib=$("$PY" -c 'import ctypes, os
ctypes.CDLL("libcuda.so.1")
print(next(os.path.dirname(l.split()[-1]) for l in open("/proc/self/maps") if "libcuda.so" in l))' 2>/dev/null)
    LD_LIBRARY_PATH="${lib}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" timeout 120 .device/bin/icdit sample \
        --weights "$OUT_DIR/icdit-shapes-32.safetensors" --per-class 8 --grid "$OUT_DIR/grid.png" 2>&1 | tail -n 3
fi
