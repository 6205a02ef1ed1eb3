#!/usr/bin/env bash
# The one-call GPU check (docs/gpu-check.md), run on a lent GPU machine (one H100 or H200, CUDA
# driver, nvcc, PyTorch; no Rust toolchain, no network) with `.device/` carried from the
# development machine (scripts/prepare-device.sh). In about 8 minutes (5.5 with GPU_CHECK_PIXART=0):
#   1. card: nvidia-smi, nvcc, torch, host, the .device manifest             -> card.txt
#   2. Rust CUDA tests: each .device/bin/gpu_* and .device/bin/lib, one by one -> tests.log
#      with ICDIT_REQUIRE_GPU=1, so a CUDA test that finds no device fails instead of printing
#      "<test>: skipped: no CUDA device" and passing
#   3. CUDA engine: `icdit bench-gpu` (step kinds, 50-step sampling, memory)  -> engine.log
#   4. PyTorch baselines: tools/bench_pytorch_gpu.py (DiT-XL/2, random weights) -> pytorch.log/.json
#  4b. PyTorch PixArt-α baseline: tools/bench_pytorch_pixart_gpu.py (PixArt-XL/2 at 256 and 512 px,
#      random weights) -> appended to pytorch.log; its JSON goes into summary.json
#   5. summary: a markdown table, printed last, and JSON                      -> summary.md/.json
# Files go to ${OUT:-out/gpu-check}, flat (the device tool brings back at most 8 files: these 7
# plus gpu-check.log, the whole stdout). Every step runs under its own `timeout`, cut to what is
# left of the budget, so one hang cannot eat the run; the time of each step and the total are
# reported. With no GPU (neither nvidia-smi nor torch.cuda sees one) it prints
# "no GPU present: dry run", lists each command it would run, and exits 0.
#
# Environment: GPU_CHECK_BUDGET (seconds for everything, default 330 + step 4b's 90),
# GPU_CHECK_BATCHES (sampling batches, default 1,4,16), GPU_CHECK_FAMILY (default XL/2),
# GPU_CHECK_COMPILE_MODE (default max-autotune), GPU_CHECK_COMPILE_TIMEOUT (default 150 s),
# GPU_CHECK_ENGINE_ARGS (arguments of `icdit bench-gpu`, default "--batches 1,4,16 --e2e-runs 2"),
# GPU_CHECK_PYTORCH=0 (skip step 4), GPU_CHECK_NCU=0 (skip the per-kernel profile),
# GPU_CHECK_DRY_RUN=1 (list only), PYTHON (default python3); step 4b: GPU_CHECK_PIXART=0 (skip it),
# GPU_CHECK_PIXART_BUDGET (its seconds, default 90, added to the default budget),
# GPU_CHECK_PIXART_SIZES (default 256,512), GPU_CHECK_PIXART_BATCHES (default 1),
# GPU_CHECK_PIXART_COMPILE_MODE (default "default": max-autotune's compile does not fit its budget);
# GPU_CHECK_PIXART_DIR=DIR (a PixArt-α pipeline folder on the machine: step 3 times its passes
# with `bench-gpu --pixart`; unset: a random-weight PixArt-XL-2-256 folder is made with torch).
# Exit status: 0 when every step passed (or in a dry run), 1 otherwise.
set -uo pipefail  # not -e: a failing step is recorded and the next one still runs
cd "$(dirname "$0")/.."

OUT_DIR=${OUT:-out/gpu-check}
# Step 4b's seconds, kept back from the steps before it and added to the default budget.
RESERVE_PIXART=${GPU_CHECK_PIXART_BUDGET:-90}
[[ "${GPU_CHECK_PIXART:-1}" == 0 ]] && RESERVE_PIXART=0
BUDGET=${GPU_CHECK_BUDGET:-$((330 + RESERVE_PIXART))}
BATCHES=${GPU_CHECK_BATCHES:-1,4,16}
FAMILY=${GPU_CHECK_FAMILY:-XL/2}
COMPILE_MODE=${GPU_CHECK_COMPILE_MODE:-max-autotune}
COMPILE_TIMEOUT=${GPU_CHECK_COMPILE_TIMEOUT:-150}
ENGINE_ARGS=${GPU_CHECK_ENGINE_ARGS:---batches 1,4,16 --e2e-runs 2}
PY=${PYTHON:-python3}
BIN=.device/bin
# Seconds kept back for the steps after the Rust tests (PyTorch needs ~2 min for the eager
# variants at batches 1,4,16 on an H100) and for the summary.
RESERVE_PYTORCH=150
[[ "${GPU_CHECK_PYTORCH:-1}" == 0 ]] && RESERVE_PYTORCH=0
RESERVE_PYTORCH=$((RESERVE_PYTORCH + RESERVE_PIXART))
RESERVE_SUMMARY=15
# The test binaries prepare-device.sh builds: one per tests/gpu_*.rs, and the library's unit tests.
EXPECTED_TESTS=()
for f in tests/gpu_*.rs; do [[ -e "$f" ]] && EXPECTED_TESTS+=("$(basename "$f" .rs)"); done
EXPECTED_TESTS+=(lib)

# scripts/prepare-device.sh packs the binaries; unpack them once (python's tarfile: no xz needed).
if [[ ! -d "$BIN" && -f .device/bin.tar.xz ]]; then
    "$PY" -c 'import tarfile; tarfile.open(".device/bin.tar.xz").extractall(".device")' ||
        echo "gpu-check: could not unpack .device/bin.tar.xz" >&2
fi
mkdir -p "$OUT_DIR"
# Outputs of an earlier run in the same folder would be mistaken for this run's.
rm -f "$OUT_DIR"/{card.txt,tests.log,engine.log,pytorch.log,pytorch.json,summary.md,summary.json}
if ! command -v nvcc >/dev/null 2>&1 && [[ -x /usr/local/cuda/bin/nvcc ]]; then PATH="$PATH:/usr/local/cuda/bin"; fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
STEPS="$WORK/steps.tsv"
: >"$STEPS"
START=$SECONDS
DRY=0
FAILED=0

say() { printf '%s\n' "$*"; }
elapsed() { echo $((SECONDS - START)); }
left() { echo $((BUDGET - (SECONDS - START))); }
# cap WANT KEEP: a step's time limit: WANT, cut so that KEEP seconds of the budget stay.
cap() { local c=$(($(left) - $2)); ((c > $1)) && c=$1; echo "$c"; }
# note NAME STATUS SECONDS DETAIL: one row of the summary.
note() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$STEPS"; }
# show CMD...: the exact command line, as the dry run lists it.
show() {
    local a line="   "
    for a in "$@"; do
        if [[ "$a" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then line+=" $a"; else line+=" '${a//\'/\'\\\'\'}'"; fi
    done
    say "$line"
}

# ---- 0. is there a GPU? -----------------------------------------------------------------------
smi_ok=0
torch_ok=0
smi_why="not installed"
if command -v nvidia-smi >/dev/null 2>&1; then
    smi_why="failed"
    if timeout 20 nvidia-smi -L >/dev/null 2>&1; then smi_ok=1; fi
fi
if timeout 120 "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
    torch_ok=1
fi

main() {
    say "gpu-check: $(date -u +%FT%TZ), budget ${BUDGET} s, output in $OUT_DIR"
    if [[ "${GPU_CHECK_DRY_RUN:-0}" == 1 ]]; then
        DRY=1
        say "GPU_CHECK_DRY_RUN=1: dry run"
    elif ((smi_ok == 0 && torch_ok == 0)); then
        DRY=1
        say "=================================================================="
        say "no GPU present: dry run (nvidia-smi: $smi_why,"
        say "torch.cuda: not available). Commands the check would run, in order:"
        say "=================================================================="
    elif ((smi_ok == 0 || torch_ok == 0)); then
        say "WARNING: nvidia-smi $( ((smi_ok)) && echo sees || echo 'does not see') a GPU, torch.cuda" \
            "$( ((torch_ok)) && echo sees || echo 'does not see') one: running the check anyway"
    fi

    step_card
    step_libcuda
    step_tests
    step_engine
    step_pytorch
    step_pytorch_pixart
    step_summary
    if ((DRY)); then
        say "dry run: nothing was run; exit 0"
        return 0
    fi
    return $((FAILED ? 1 : 0))
}

# ---- 1. the card ------------------------------------------------------------------------------
step_card() {
    local t0=$SECONDS f="$OUT_DIR/card.txt"
    local query=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw,pstate
    local torch_info='import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available());
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "sm", f"{p.major}.{p.minor}", "SMs", p.multi_processor_count, "memory GiB", round(p.total_memory / 2**30, 1))'
    say "== 1. card -> card.txt"
    if ((DRY)); then
        show timeout 20 nvidia-smi
        show timeout 20 nvidia-smi --query-gpu=$query --format=csv
        show timeout 20 nvcc --version
        show timeout 60 "$PY" -c "<torch version, CUDA version, device properties>"
        show cat .device/manifest.txt
        return
    fi
    {
        echo "## date"; date -u +%FT%TZ
        echo "## nvidia-smi"; timeout 20 nvidia-smi
        echo "## nvidia-smi --query-gpu"; timeout 20 nvidia-smi --query-gpu=$query --format=csv
        echo "## nvcc --version"; timeout 20 nvcc --version
        echo "## torch"; timeout 60 "$PY" -c "$torch_info"
        echo "## host"; uname -a; ldd --version 2>&1 | head -n1; echo "cpus $(nproc)"; free -g
        echo "## .device/manifest.txt"; cat .device/manifest.txt 2>&1
    } >"$f" 2>&1
    CARD=$(timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n1)
    [[ -n "$CARD" ]] || CARD=$(timeout 60 "$PY" -c 'import torch; print(torch.cuda.get_device_name(0))' 2>/dev/null)
    CARD_SHORT=$(sed -E 's/^NVIDIA //I; s/[ ,].*//' <<<"$CARD" | tr '[:upper:]' '[:lower:]')
    local nvcc torch
    nvcc=$(timeout 20 nvcc --version 2>/dev/null | sed -n 's/.*release \([0-9.]*\).*/\1/p')
    torch=$(sed -n 's/^torch \([^ ]*\) cuda \([^ ]*\).*/\1 (CUDA \2)/p' "$f")
    say "card: $CARD; nvcc ${nvcc:-absent}; torch ${torch:-?}"
    grep -E '^(commit|built_at|features)=' .device/manifest.txt 2>/dev/null | sed 's/^/  .device: /'
    note card ok $((SECONDS - t0)) "$CARD; nvcc ${nvcc:-absent}; torch ${torch:-?}"
}

# ---- libcuda and the build path ----------------------------------------------------------------
# The binaries link libcuda.so.1 (cust, feature `cuda`); the driver provides it on the GPU machine,
# but not always on the loader's default path. The test binaries were built at another path: where
# that path does not exist here, a link to this checkout stands in for it, so that a test reading
# files through a baked env!("CARGO_MANIFEST_DIR") finds them (docs/gpu-check.md).
step_libcuda() {
    local probe build_root dir=""
    probe=$(ls "$BIN"/gpu_* "$BIN"/lib "$BIN"/icdit 2>/dev/null | head -n1)
    build_root=$(sed -n 's/^build_root=//p' .device/manifest.txt 2>/dev/null)
    if ((DRY)); then
        say "== (setup) libcuda.so.1 on the loader path, build path link"
        show ldd "${probe:-$BIN/gpu_gemm}"
        say "    (if libcuda.so.1 is not found: LD_LIBRARY_PATH += its folder, searched in /usr/local/nvidia/lib64 ... or where torch's driver load finds it)"
        if [[ -n "$build_root" && "$build_root" != "$PWD" ]]; then
            show ln -s "$PWD" "$build_root"
            say "    (only if $build_root does not exist on the GPU machine)"
        fi
        return
    fi
    [[ -n "$probe" ]] || return 0
    if [[ -n "$build_root" && "$build_root" != "$PWD" && ! -e "$build_root" ]]; then
        if mkdir -p "$(dirname "$build_root")" 2>/dev/null && ln -s "$PWD" "$build_root" 2>/dev/null; then
            say "build path: linked $build_root -> $PWD"
        else
            say "build path: could not link $build_root -> $PWD (tests that read files by a baked path will fail)"
        fi
    fi
    if ! ldd "$probe" 2>/dev/null | grep -q 'libcuda'; then
        say "WARNING: $probe does not link libcuda: built without --features cuda? No GPU code will run."
        return 0
    fi
    if ldd "$probe" | grep -q 'libcuda.so.1 => not found'; then
        for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/lib; do
            if [[ -e "$d/libcuda.so.1" ]]; then dir=$d; break; fi
        done
        if [[ -z "$dir" ]]; then
            dir=$(timeout 60 "$PY" -c 'import ctypes, os
ctypes.CDLL("libcuda.so.1")
print(next(os.path.dirname(l.split()[-1]) for l in open("/proc/self/maps") if "libcuda.so" in l))' 2>/dev/null)
        fi
        if [[ -n "$dir" ]]; then
            export LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
            say "libcuda.so.1: not on the loader path; using $dir"
        else
            say "ERROR: libcuda.so.1 not found anywhere: the CUDA test binaries cannot start"
        fi
    fi
    { echo "## ldd $probe"; ldd "$probe"; } >>"$OUT_DIR/card.txt" 2>&1
}

# ---- 2. Rust CUDA tests ------------------------------------------------------------------------
# field WORD FILE: the sum of the numbers before WORD ("3 passed;") on libtest's result lines.
field() {
    awk -v w="$1" '/^test result:/ { for (i = 2; i <= NF; i++) if ($i == w ";" || $i == w) s += $(i - 1) }
                   END { print s + 0 }' "$2"
}
# failing OUT: the names of the failing tests in a test binary's output (at most 8).
failing() {
    grep -E '^test .* FAILED$|^    [a-z_:0-9]+$' "$1" | sed 's/^test //; s/ \.\.\. FAILED$//; s/^ *//' | sort -u | head -n 8 | paste -sd ' ' -
}

step_tests() {
    local log="$OUT_DIR/tests.log" bins=() name want c t0 rc out passed failed ignored skipped status detail
    say "== 2. Rust CUDA tests -> tests.log (each: --nocapture --test-threads 1, under timeout)"
    for name in "${EXPECTED_TESTS[@]}"; do
        [[ -x "$BIN/$name" ]] && bins+=("$BIN/$name")
    done
    for b in "$BIN"/gpu_*; do  # test binaries added since this list was written
        [[ -x "$b" && ! " ${bins[*]} " =~ " $b " ]] && bins+=("$b")
    done
    if ((DRY)); then
        if ((${#bins[@]} == 0)); then
            say "    (.device/bin is empty or missing here: run scripts/prepare-device.sh; the check would run:)"
            for name in "${EXPECTED_TESTS[@]}"; do bins+=("$BIN/$name"); done
        fi
        for b in "${bins[@]}"; do
            want=60; [[ $(basename "$b") == lib ]] && want=90
            show timeout -k 5 "$want" env ICDIT_REQUIRE_GPU=1 CARGO_MANIFEST_DIR="$PWD" "$b" --nocapture --test-threads 1
        done
        return
    fi
    : >"$log"
    if ((${#bins[@]} == 0)); then
        say "ERROR: no test binaries in $BIN: was .device carried (carry: [\".device\"]) and prepared?"
        note "Rust tests" "FAIL" 0 "no binaries in $BIN (scripts/prepare-device.sh, carry .device)"
        FAILED=1
        return
    fi
    for name in "${EXPECTED_TESTS[@]}"; do  # a test file newer than .device/
        if [[ ! -x "$BIN/$name" ]]; then
            say "  $name: MISSING from $BIN (tests/$name.rs exists: rerun scripts/prepare-device.sh)"
            note "$name" "MISSING" 0 "no binary in $BIN: .device/ is older than the tests"
            FAILED=1
        fi
    done
    for b in "${bins[@]}"; do
        name=$(basename "$b")
        want=60; [[ $name == lib ]] && want=90
        c=$(cap "$want" $((RESERVE_PYTORCH + RESERVE_SUMMARY)))
        if ((c < 5)); then
            note "$name" "SKIPPED (budget)" 0 "no time left"
            FAILED=1
            continue
        fi
        out="$WORK/$name.out"
        t0=$SECONDS
        # ICDIT_REQUIRE_GPU=1: a CUDA test that cannot reach the GPU fails (tests/gpu_common).
        timeout -k 5 "$c" env ICDIT_REQUIRE_GPU=1 CARGO_MANIFEST_DIR="$PWD" "$b" --nocapture --test-threads 1 >"$out" 2>&1
        rc=$?
        { echo "===== $name: exit $rc after $((SECONDS - t0)) s (limit $c s)"; cat "$out"; echo; } >>"$log"
        passed=$(field passed "$out")
        failed=$(field failed "$out")
        ignored=$(field ignored "$out")
        # "<test>: skipped: <reason>", in the panic message under ICDIT_REQUIRE_GPU=1 (libtest
        # prints "test name ... " before the test's own output, so not only at line starts)
        skipped=$(grep -o 'skipped: ' "$out" | wc -l)
        detail="$passed passed, $failed failed, $ignored ignored, $skipped skipped"
        if ((rc == 124 || rc == 137)); then
            status="TIMEOUT"; detail="killed after $c s; $detail"
        elif ((rc == 126 || rc == 127)); then
            status="CANNOT RUN"; detail="exit $rc: $(tail -n1 "$out")"
        elif ((skipped > 0)); then
            # Failed under ICDIT_REQUIRE_GPU=1 (or passed, if built before the variable existed).
            status="SKIPPED ON GPU"; detail="$detail: $(grep -o 'skipped: [^(]*' "$out" | sed 's/ *$//' | sort -u | head -n 2 | paste -sd ';' -) on a GPU machine"
            ((rc != 0)) && detail="$detail; failing: $(failing "$out")"
        elif ((rc != 0)); then
            status="FAIL"
            detail="$detail; failing: $(failing "$out")"
        elif ((passed == 0)); then
            status="NO TESTS"
        else
            status="ok"
        fi
        [[ "$status" == ok ]] || FAILED=1
        if ((skipped > 0)); then
            say "!!!!!!!!!! $name: $skipped CUDA test(s) said 'skipped: ...' ON A GPU MACHINE !!!!!!!!!!"
        fi
        say "  $name: $status ($detail) in $((SECONDS - t0)) s"
        note "$name" "$status" $((SECONDS - t0)) "$detail"
    done
    # The ptxas table (registers, shared memory, spills) of gpu_ptxas, for the report.
    sed -nE '/ptxas resource usage per kernel:/,/^(ok|FAILED|)$/p' "$log" | head -n 40
}

# ---- 3. the CUDA engine ------------------------------------------------------------------------
# `icdit bench-gpu [GPU_CHECK_ENGINE_ARGS]` times every step kind of DiT-XL/2 (random weights) at
# each batch, 50-step DDIM end to end under none / reuse / icc, arena and device memory, prints a
# table and ends its stdout with one JSON line; it exits non-zero on a failure. Correctness
# against the CPU reference is step 2's tests/gpu_pipeline.rs (cuda_* tests).
step_engine() {
    local log="$OUT_DIR/engine.log" c t0 rc args=()
    read -r -a args <<<"$ENGINE_ARGS"
    say "== 3. CUDA engine -> engine.log"
    if [[ ! -x "$BIN/icdit" ]]; then
        if ((DRY)); then
            show timeout -k 5 240 "$BIN/icdit" bench-gpu "${args[@]}"
            return
        fi
        say "CUDA engine: $BIN/icdit not carried — skipped"
        note "CUDA engine" "skipped" 0 "$BIN/icdit not carried"
        return
    fi
    if ((DRY)); then
        show timeout -k 5 40 "$BIN/icdit" bench-vae --backend cuda --batch 1 --runs 5
        show timeout -k 5 40 "$BIN/icdit" bench-vae --backend cuda --batch 16 --runs 5
        show env ICDIT_GEMM=wmma timeout -k 5 40 "$BIN/icdit" bench-vae --backend cuda --batch 1 --runs 5
        show env ICDIT_GEMM=wmma timeout -k 5 40 "$BIN/icdit" bench-vae --backend cuda --batch 16 --runs 5
        show timeout -k 5 240 "$BIN/icdit" bench-gpu "${args[@]}"
        show timeout -k 5 60 "$BIN/icdit" bench-gemm
        if [[ -n "${GPU_CHECK_PIXART_DIR:-}" ]]; then
            show timeout -k 5 60 "$BIN/icdit" bench-gpu --pixart "$GPU_CHECK_PIXART_DIR" --batches 1 --iters 10
        else
            show timeout -k 5 60 "$PY" tools/make_random_pixart.py --sample-size 32 --out "$OUT_DIR/pixart-256" --factors "$OUT_DIR/pixart-256-r128.safetensors" --rank 128
            show timeout -k 5 60 "$BIN/icdit" bench-gpu --pixart "$OUT_DIR/pixart-256" --pixart-factors "$OUT_DIR/pixart-256-r128.safetensors" --batches 1 --iters 10
        fi
        show bash scripts/check-sass.sh .device/kernels
        show env ICDIT_GEMM=wmma timeout -k 5 60 "$BIN/icdit" bench-gpu --batches 1 --e2e-runs 1
        show timeout -k 5 90 ncu --clock-control none --metrics gpu__time_duration.sum --csv "$BIN/icdit" bench-gpu --depth 2 --batches 1 --iters 1 --e2e-runs 0
        return
    fi
    c=$(cap 240 $((RESERVE_PYTORCH + RESERVE_SUMMARY)))
    t0=$SECONDS
    { "$BIN/icdit" --version; } >"$log" 2>&1
    # The GPU VAE decoder (SD-VAE shapes, random weights): one 256×256 image, then batch 16, on
    # the Hopper kernels ("hopper_kernels": true) and then on the fallback kernels
    # (ICDIT_GEMM=wmma) for the comparison. Run first and briefly; its JSON lines are not the
    # engine's last line.
    for gemm in auto wmma; do
        for vb in 1 16; do
            ICDIT_GEMM=$gemm timeout -k 5 40 "$BIN/icdit" bench-vae --backend cuda --batch "$vb" --runs 5 >>"$log" 2>&1 ||
                echo "ICDIT_GEMM=$gemm bench-vae --batch $vb: exit $?" >>"$log"
        done
    done
    grep '"icdit-cuda-vae"' "$log" | sed 's/^/  vae: /'
    c=$(cap 240 $((RESERVE_PYTORCH + RESERVE_SUMMARY)))
    timeout -k 5 "$c" "$BIN/icdit" bench-gpu "${args[@]}" >>"$log" 2>&1
    rc=$?
    tail -n 30 "$log"
    # The GEMM on every DiT-XL/2 linear shape under each launch the kernel offers (the rule
    # the launcher uses is checked against these); after the engine's JSON line.
    c=$(cap 60 $((RESERVE_PYTORCH + RESERVE_SUMMARY)))
    if ((c >= 10)); then
        { echo "## icdit bench-gemm"; timeout -k 5 "$c" "$BIN/icdit" bench-gemm 2>&1 | sed 's/^/# /'; } >>"$log"
        grep -E '^# \| (qkv|proj|fc1|fc2|icc|attention)' "$log" | grep -E '\| auto \|' | head -n 60
    fi
    # PixArt-α (issue 23): per-step pass times of none / reuse / icc (bench-gpu --pixart), prefixed
    # `# ` after the engine's JSON line, on GPU_CHECK_PIXART_DIR (a pipeline folder already on the
    # machine; the check downloads nothing) or else on a random-weight PixArt-XL-2-256x256 folder
    # with random rank-128 factors made here with torch (tools/make_random_pixart.py; removed after).
    c=$(cap 90 $((RESERVE_PYTORCH + RESERVE_SUMMARY)))
    if ((c >= 30)); then
        local pdir="${GPU_CHECK_PIXART_DIR:-}" pfac=() made=""
        if [[ -z "$pdir" ]]; then
            pdir="$OUT_DIR/pixart-256"
            made="$pdir $OUT_DIR/pixart-256-r128.safetensors"
            timeout -k 5 60 "$PY" tools/make_random_pixart.py --sample-size 32 --out "$pdir" \
                --factors "$OUT_DIR/pixart-256-r128.safetensors" --rank 128 >>"$log" 2>&1 || pdir=""
            [[ -n "$pdir" ]] && pfac=(--pixart-factors "$OUT_DIR/pixart-256-r128.safetensors")
        fi
        c=$(cap 60 $((RESERVE_PYTORCH + RESERVE_SUMMARY)))
        if [[ -n "$pdir" ]] && ((c >= 10)); then
            { echo "## icdit bench-gpu --pixart $pdir ${pfac[*]}"
              timeout -k 5 "$c" "$BIN/icdit" bench-gpu --pixart "$pdir" "${pfac[@]}" --batches 1 --iters 10 2>&1 | sed 's/^/# /'; } >>"$log"
            grep -E '^# \| 1 \|' "$log" | tail -n 4
        else
            echo "## PixArt-α pass times: no pipeline folder (tools/make_random_pixart.py failed, or no time left)" >>"$log"
        fi
        # shellcheck disable=SC2086
        [[ -n "$made" ]] && rm -rf $made
    fi
    # The Hopper kernels (issue 26): their SASS must use the tensor memory accelerator and wgmma
    # (UTMALDG, HGMMA) and no local memory (scripts/check-sass.sh on the fatbins prepare-device.sh
    # copied to .device/kernels), their first-use check must have passed, and the same engine on
    # the fallback kernels (ICDIT_GEMM=wmma, batch 1) gives the comparison in this run.
    if command -v cuobjdump >/dev/null 2>&1 || [[ -x "${CUDA_PATH:-/nonexistent}/bin/cuobjdump" ]]; then
        local sass_out sass_rc=0
        sass_out=$(bash scripts/check-sass.sh .device/kernels 2>&1) || sass_rc=$?
        sed 's/^/## /' <<<"$sass_out" | tee -a "$log"
        if ((sass_rc != 0)); then
            note "Hopper kernels' SASS" FAIL 0 "$(tr '\n' ' ' <<<"$sass_out")"
            FAILED=1
        fi
    else
        echo "## cuobjdump: not on PATH (Hopper kernels' SASS not checked)" >>"$log"
    fi
    if grep -qE 'disagrees? with the fallback kernels' "$log"; then
        note "Hopper kernels' first-use check" FAIL 0 "$(grep -m1 -E 'disagrees? with the fallback' "$log")"
        FAILED=1
    fi
    c=$(cap 60 $((RESERVE_PYTORCH + RESERVE_SUMMARY)))
    if ((c >= 30)); then
        { echo "## ICDIT_GEMM=wmma icdit bench-gpu --batches 1 --e2e-runs 1 (the fallback kernels, for comparison)"
          ICDIT_GEMM=wmma timeout -k 5 "$c" "$BIN/icdit" bench-gpu --batches 1 --e2e-runs 1 2>&1 | sed 's/^/# /'; } >>"$log"
    fi
    step_kernels "$log"
    if ((rc == 0)); then
        note "CUDA engine" ok $((SECONDS - t0)) "icdit bench-gpu ${args[*]}"
    else
        note "CUDA engine" "$( ((rc == 124 || rc == 137)) && echo TIMEOUT || echo FAIL)" $((SECONDS - t0)) "exit $rc"
        FAILED=1
    fi
}

# ---- 3b. per-kernel times -------------------------------------------------------------------------
# Nsight Compute, clocks left alone, one metric (kernel duration), over `bench-gpu --depth 2`: two
# DiT-XL/2-wide blocks at batch 1 (+ guidance), every step kind, so each kernel of a block shows
# once per kind. Appended to engine.log after the engine's JSON (its lines start with '#').
# GPU_CHECK_NCU=0 skips it.
step_kernels() {
    local log=$1 c rc csv="$WORK/ncu.csv"
    [[ "${GPU_CHECK_NCU:-1}" == 1 ]] || return 0
    command -v ncu >/dev/null 2>&1 || { echo "## ncu: not on PATH" >>"$log"; return 0; }
    c=$(cap 90 $((RESERVE_PYTORCH + RESERVE_SUMMARY)))
    ((c >= 20)) || { echo "## ncu: skipped (budget)" >>"$log"; return 0; }
    timeout -k 5 "$c" ncu --clock-control none --metrics gpu__time_duration.sum --csv --print-units base \
        "$BIN/icdit" bench-gpu --depth 2 --batches 1 --iters 1 --e2e-runs 0 >"$csv" 2>"$WORK/ncu.err"
    rc=$?
    echo "## ncu per-kernel durations (bench-gpu --depth 2 --batches 1 --iters 1 --e2e-runs 0; exit $rc)" >>"$log"
    "$PY" - "$csv" <<'PYEOF' 2>&1 | tee -a "$log"
import csv, sys, collections
rows = [r for r in csv.reader(l for l in open(sys.argv[1]) if l.startswith('"'))]
if not rows:
    print("# ncu wrote no rows"); sys.exit()
h = rows[0]
ki, vi = h.index("Kernel Name"), h.index("Metric Value")
gi = h.index("Grid Size") if "Grid Size" in h else None
bi = h.index("Block Size") if "Block Size" in h else None
agg = collections.OrderedDict()
for r in rows[1:]:
    key = (r[ki].split("(")[0], r[gi] if gi is not None else "", r[bi] if bi is not None else "")
    agg.setdefault(key, []).append(float(r[vi].replace(",", "")) / 1e3)
print("# kernel | grid | block | launches | median us | total us")
for (k, g, b), v in agg.items():
    v.sort()
    print(f"# {k} | {g} | {b} | {len(v)} | {v[len(v) // 2]:.2f} | {sum(v):.1f}")
PYEOF
    tail -n 5 "$WORK/ncu.err" | sed 's/^/# ncu: /' >>"$log"
}

# ---- 4. PyTorch baselines ------------------------------------------------------------------------
step_pytorch() {
    local log="$OUT_DIR/pytorch.log" json="$OUT_DIR/pytorch.json" c ct t0 rc cmd
    c=$(cap 100000 $((RESERVE_PIXART + RESERVE_SUMMARY)))
    ((DRY)) && c=$((BUDGET - 60 - RESERVE_PIXART))
    ct=$COMPILE_TIMEOUT
    ((ct > c * 6 / 10)) && ct=$((c * 6 / 10))
    cmd=("$PY" tools/bench_pytorch_gpu.py --device cuda --family "$FAMILY" --batches "$BATCHES"
         --budget "$c" --compile-mode "$COMPILE_MODE" --compile-timeout "$ct" --json "$json")
    say "== 4. PyTorch baselines -> pytorch.log, pytorch.json"
    if [[ "${GPU_CHECK_PYTORCH:-1}" == 0 ]]; then
        say "    GPU_CHECK_PYTORCH=0: skipped"
        ((DRY)) || note "PyTorch" "skipped" 0 "GPU_CHECK_PYTORCH=0"
        return
    fi
    if ((DRY)); then
        show env PYTHONUNBUFFERED=1 timeout -k 10 $((c + 15)) "${cmd[@]}"
        say "    (--budget is what is left of the ${BUDGET} s then, less ${RESERVE_SUMMARY} s for the summary)"
        return
    fi
    if ((c < 30)); then
        note "PyTorch" "SKIPPED (budget)" 0 "${c} s left"
        FAILED=1
        return
    fi
    t0=$SECONDS
    PYTHONUNBUFFERED=1 timeout -k 10 $((c + 15)) "${cmd[@]}" >"$log" 2>&1
    rc=$?
    sed -n '/^== bench_pytorch_gpu results ==/,$p' "$log"
    if ((rc == 0)); then
        note "PyTorch" ok $((SECONDS - t0)) "DiT-$FAMILY, batches $BATCHES, compile $COMPILE_MODE (limit ${ct} s)"
    else
        tail -n 20 "$log"
        note "PyTorch" "$( ((rc == 124 || rc == 137)) && echo TIMEOUT || echo FAIL)" $((SECONDS - t0)) "exit $rc (pytorch.log)"
        FAILED=1
    fi
}

# ---- 4b. PyTorch PixArt-α baseline ----------------------------------------------------------------
# tools/bench_pytorch_pixart_gpu.py: PixArt-XL/2 (our port tools/pixart_torch.py, checked against
# diffusers by tools/check_pixart_torch.py; the GPU machine has no diffusers) at 256 and 512 px, fp16
# eager and fp16 torch.compile, forward at batch 2, 20-step DPM-Solver++ sampling, icc and reuse.
# No new output file (the device tool brings back 8): the log is appended to pytorch.log, the JSON
# goes into summary.json ("pytorch_pixart") and its table into summary.md.
PIXART_JSON=""
step_pytorch_pixart() {
    local log="$OUT_DIR/pytorch.log" json="$WORK/pytorch-pixart.json" c ct t0 rc cmd
    local sizes=${GPU_CHECK_PIXART_SIZES:-256,512} batches=${GPU_CHECK_PIXART_BATCHES:-1}
    local mode=${GPU_CHECK_PIXART_COMPILE_MODE:-default}
    c=$(cap "$RESERVE_PIXART" "$RESERVE_SUMMARY")
    ((DRY)) && c=$RESERVE_PIXART
    # Each size compiles once: the first compile may take 40 % of the step's time.
    ct=$((c * 4 / 10))
    cmd=("$PY" tools/bench_pytorch_pixart_gpu.py --device cuda --sizes "$sizes" --batches "$batches"
         --budget "$c" --compile-mode "$mode" --compile-timeout "$ct" --json "$json")
    say "== 4b. PyTorch PixArt-α baseline -> pytorch.log (appended), summary.json"
    if [[ "${GPU_CHECK_PIXART:-1}" == 0 ]]; then
        say "    GPU_CHECK_PIXART=0: skipped"
        ((DRY)) || note "PyTorch PixArt" "skipped" 0 "GPU_CHECK_PIXART=0"
        return
    fi
    if ((DRY)); then
        show env PYTHONUNBUFFERED=1 timeout -k 10 $((c + 15)) "${cmd[@]}"
        say "    (its output appended to $log; the JSON, in a temporary folder, goes into summary.json)"
        say "    (--budget: GPU_CHECK_PIXART_BUDGET=${RESERVE_PIXART} s, cut to what is left less ${RESERVE_SUMMARY} s)"
        return
    fi
    if ((c < 30)); then
        note "PyTorch PixArt" "SKIPPED (budget)" 0 "${c} s left"
        FAILED=1
        return
    fi
    t0=$SECONDS
    echo "===== tools/bench_pytorch_pixart_gpu.py (step 4b)" >>"$log"
    PYTHONUNBUFFERED=1 timeout -k 10 $((c + 15)) "${cmd[@]}" >"$WORK/pixart.log" 2>&1
    rc=$?
    cat "$WORK/pixart.log" >>"$log"
    sed -n '/^== bench_pytorch_pixart_gpu results ==/,$p' "$WORK/pixart.log"
    [[ -f "$json" ]] && PIXART_JSON=$json
    if ((rc == 0)); then
        note "PyTorch PixArt" ok $((SECONDS - t0)) "PixArt-XL/2 $sizes px, batches $batches, compile $mode (limit ${ct} s)"
    else
        tail -n 20 "$WORK/pixart.log"
        note "PyTorch PixArt" "$( ((rc == 124 || rc == 137)) && echo TIMEOUT || echo FAIL)" $((SECONDS - t0)) "exit $rc (pytorch.log)"
        FAILED=1
    fi
}

# ---- 5. summary ----------------------------------------------------------------------------------
step_summary() {
    say "== 5. summary -> summary.md, summary.json"
    if ((DRY)); then
        show "$PY" - "<summary of the steps, pytorch.json and engine.log>"
        note "dry run" "no GPU" 0 "nothing run"
    fi
    DRY=$DRY CARD="${CARD:-}" CARD_SHORT="${CARD_SHORT:-}" BUDGET=$BUDGET ELAPSED=$(elapsed) PIXART_JSON="$PIXART_JSON" \
        "$PY" - "$STEPS" "$OUT_DIR" <<'EOF'
import datetime, json, os, sys
steps_file, out = sys.argv[1], sys.argv[2]
steps = [dict(zip(("step", "status", "seconds", "detail"), l.rstrip("\n").split("\t")))
         for l in open(steps_file) if l.strip()]
for s in steps:
    s["seconds"] = int(s["seconds"])
date = datetime.datetime.now(datetime.timezone.utc)
card, short = os.environ["CARD"], os.environ["CARD_SHORT"] or "gpu"
summary = {"date": date.isoformat(), "dry_run": os.environ["DRY"] == "1", "card": card,
           "budget_s": int(os.environ["BUDGET"]), "elapsed_s": int(os.environ["ELAPSED"]), "steps": steps,
           "report": f"docs/gpu-runs/{date:%Y-%m-%d}-{short}.md"}
man = ".device/manifest.txt"
if os.path.exists(man):
    summary["device_build"] = dict(l.rstrip("\n").split("=", 1) for l in open(man) if "=" in l and not l.startswith("#"))
lines = [f"## gpu-check {date:%Y-%m-%d %H:%M} UTC: {card or 'no GPU (dry run)'}", "",
         "| step | status | s | detail |", "|---|---|---|---|"]
lines += [f"| {s['step']} | {s['status']} | {s['seconds']} | {s['detail']} |" for s in steps]
ok = all(s["status"] in ("ok", "skipped") for s in steps)
lines.append(f"| total | {'dry run' if summary['dry_run'] else 'ok' if ok else 'PROBLEMS'} "
             f"| {summary['elapsed_s']} | budget {summary['budget_s']} s |")
try:
    pt = json.load(open(os.path.join(out, "pytorch.json")))
    summary["pytorch"] = pt
    lines += ["", f"PyTorch {pt['torch']} baselines, DiT-{pt['config']['family']} {pt['config']['image_size']} px "
              f"(random weights), DDIM {pt['config']['steps']} steps, CFG {pt['config']['cfg']}:", "",
              "| variant | what | images | median ms | ms/image | TFLOP/s | peak MiB | status |", "|---|---|---|---|---|---|---|---|"]
    f = lambda v, fmt: "" if v is None else format(v, fmt)
    for r in pt["results"]:
        st = r["status"]
        if r["what"] == "compile" and "compile_s" in r:
            st = f"compiled in {r['compile_s']:.0f} s ({r['compile_mode']})"
        lines.append(f"| {r['variant']} | {r['what']} | {f(r.get('images'), 'd')} | {f(r.get('median_ms'), '.2f')} | "
                     f"{f(r.get('ms_per_image'), '.2f')} | {f(r.get('tflops'), '.1f')} | {f(r.get('peak_mib'), '.0f')} | {st} |")
except (OSError, ValueError, KeyError):
    pass
try:
    px = json.load(open(os.environ["PIXART_JSON"]))
    summary["pytorch_pixart"] = px
    c = px["config"]
    lines += ["", f"PyTorch {px['torch']} baseline, {c['model']} at {', '.join(map(str, c['sizes']))} px (random weights, "
              f"caption {c['tokens']} tokens), DPM-Solver++ {c['steps']} steps, guidance {c['cfg']}, "
              f"icc rank {c['rank']} period {c['period']}:", "",
              "| px | variant | what | images | median ms | ms/image | TFLOP/s | peak MiB | status |",
              "|---|---|---|---|---|---|---|---|---|"]
    f = lambda v, fmt: "" if v is None else format(v, fmt)
    for r in px["results"]:
        st = r["status"]
        if r["what"] == "compile" and "compile_s" in r:
            st = f"compiled in {r['compile_s']:.0f} s ({r['compile_mode']})"
        elif r["what"] == "icc-check":
            st = f"{st} (inc step after a full step reproduces it)"
        lines.append(f"| {r.get('size', '')} | {r['variant']} | {r['what']} | {f(r.get('images'), 'd')} | "
                     f"{f(r.get('median_ms'), '.2f')} | {f(r.get('ms_per_image'), '.2f')} | {f(r.get('tflops'), '.1f')} | "
                     f"{f(r.get('peak_mib'), '.0f')} | {st} |")
    by = {(r.get("size"), r["variant"], r["what"]): r for r in px["results"] if r.get("median_ms") and r.get("images") == 1}
    ratios = []
    for size in c["sizes"]:
        for num, den, label in (("icc-sample", "sample", f"{c['steps']}-step icc / none"),
                                ("reuse-sample", "sample", f"{c['steps']}-step reuse / none"),
                                ("icc-calibrated", "icc-full", "calibrated / full step")):
            n_, d_ = by.get((size, "fp16", num)), by.get((size, "fp16", den))
            if n_ and d_:
                ratios.append(f"{size} px {label} {n_['median_ms'] / d_['median_ms']:.3f}")
    if ratios:
        lines += ["", "PixArt fp16 eager time ratios (batch 1): " + "; ".join(ratios) + "."]
except (OSError, ValueError, KeyError):
    pass
try:
    last = [l for l in open(os.path.join(out, "engine.log")) if l.startswith("{")]
    if last:
        e = summary["engine"] = json.loads(last[-1])
        lines += ["", f"icdit GPU pipeline ({e['device']}), DiT-{e['family']} {e['image_size']} px (random weights), "
                  f"icc rank {e['rank']}, DDIM {e['steps']}, CFG {e['cfg']}:", "",
                  "| batch | plain ms | full ms | calibrated ms | reuse ms | e2e none ms | e2e reuse ms | e2e icc ms | plain TFLOP/s | arena MiB |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        g = lambda d, k, fmt: "" if d.get(k) is None else format(d[k], fmt)
        for b in e["batches"]:
            st, ee = b["step_ms"], b["e2e_ms"]
            lines.append(f"| {b['batch']} | {g(st, 'plain', '.3f')} | {g(st, 'full', '.3f')} | {g(st, 'calibrated', '.3f')} | "
                         f"{g(st, 'reuse', '.3f')} | {g(ee, 'none', '.2f')} | {g(ee, 'reuse', '.2f')} | {g(ee, 'icc', '.2f')} | "
                         f"{g(b, 'plain_tflops', '.1f')} | {g(b, 'arena_mib', '.0f')} |")
        # Issue 22: every engine's step kinds with their time and MAC ratios to a plain step and
        # their launches (icc = the projected form; icc-direct, icc-folded; icc-gemms = the
        # previous two-GEMM path), the 50-step icc/none ratio, and each step's per-op profile.
        mr = e.get("mac_ratio", {})
        lines += ["", f"Step kinds per engine (MAC ratios: calibrated {g(mr, 'calibrated', '.3f')}, "
                  f"50-step icc period 2 {g(mr, 'icc_period2_schedule', '.3f')}):", "",
                  "| batch | engine | step | ms | time / plain | MACs / plain | launches/step | launches/block |",
                  "|---|---|---|---|---|---|---|---|"]
        for b in e["batches"]:
            for st in b.get("steps", []):
                lines.append(f"| {b['batch']} | {st['engine']} | {st['kind']} | {g(st, 'ms', '.3f')} | "
                             f"{g(st, 'time_ratio', '.3f')} | {g(st, 'mac_ratio', '.3f')} | "
                             f"{g(st, 'launches_per_step', 'd')} | {g(st, 'launches_per_block', 'd')} |")
            ee = b["e2e_ms"]
            if ee.get("none") and ee.get("icc"):
                lines.append(f"| {b['batch']} | 50-step icc / none | | | {ee['icc'] / ee['none']:.3f} | "
                             f"{g(mr, 'icc_period2_schedule', '.3f')} | | |")
        lines += ["", "Device time per kind of op (one step, events around each op):", "",
                  "| batch | engine | step | op | ops | ms |", "|---|---|---|---|---|---|"]
        for b in e["batches"]:
            for pr in b.get("profiles", []):
                for o in pr["ops"]:
                    lines.append(f"| {b['batch']} | {pr['engine']} | {pr['kind']} | {o['op']} | {o['count']} | {g(o, 'ms', '.3f')} |")
except (OSError, ValueError, KeyError):
    pass
lines += ["", f"Report: {summary['report']} (card, commit, date, this table)."]
md = "\n".join(lines) + "\n"
open(os.path.join(out, "summary.md"), "w").write(md)
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
print(md, end="")
EOF
}

main 2>&1 | tee "$OUT_DIR/gpu-check.log"
exit "${PIPESTATUS[0]}"
