#!/usr/bin/env bash
# Hashes of a fixed set of outputs, for showing that a refactor changed nothing (issue 21):
# factors from `calibrate`, samples on the CPU and the emulated GPU pipeline under every cache
# policy and both samplers, on the bundled model and the hd72 fixture model, and VAE decodes.
#   scripts/output-hashes.sh [ICDIT_BINARY] [OUT_DIR]    (defaults: target/release/icdit, a temp dir)
# Run it on the binary before and after a change and diff the two listings. Safetensors files
# are hashed with their JSON header's keys sorted, so that binaries from before 2026-12-05 (which
# wrote factor-file metadata in hash-map order, varying from run to run) compare too; icdit now
# writes metadata keys sorted (src/tensorfile.rs). Forces the AVX2 CPU path
# (identical bits to AVX-512 and NEON) when the CPU has it, so listings compare across machines
# with any of the three.
set -euo pipefail
cd "$(dirname "$0")/.."
B=${1:-target/release/icdit}
O=${2:-$(mktemp -d)}
mkdir -p "$O"
rm -f "$O"/*
if grep -qw avx2 /proc/cpuinfo 2>/dev/null; then export ICDIT_CPU_ISA=avx2; fi
run() { "$B" "$@" >/dev/null 2>"$O/last.log" || { echo "output-hashes: failed: icdit $*" >&2; cat "$O/last.log" >&2; exit 1; }; }
F=tests/fixtures/icc/factors_casvd_r8.safetensors
W=tests/fixtures/hd72/official.safetensors
run calibrate --method ca-svd --rank 8 --calib-self 16 --out "$O/factors.safetensors" --threads 2
for be in cpu emu; do
    # The emulated GPU is slow: fewer steps and images there.
    if [[ $be == cpu ]]; then S=10 C=0,3,7; else S=3 C=3; fi
    run sample --backend $be --class $C --steps $S --seed 5 --out-latents "$O/$be-none.safetensors" --grid "$O/$be-none.png"
    run sample --backend $be --class $C --steps $S --seed 5 --cache reuse --out-latents "$O/$be-reuse.safetensors"
    run sample --backend $be --class $C --steps $S --seed 5 --cache icc --factors "$O/factors.safetensors" --out-latents "$O/$be-icc.safetensors"
    run sample --backend $be --class 0 --steps 3 --sampler ddpm --seed 2 --cfg 1 --out-latents "$O/$be-ddpm.safetensors"
    run sample --backend $be --weights $W --class 1,2 --steps 4 --seed 1 --cache icc --factors $F --out-latents "$O/$be-hd72-icc.safetensors"
    run decode --backend $be --vae tests/fixtures/vae/new --latents "$O/cpu-hd72-icc.safetensors" --out-decoded "$O/$be-vae.safetensors" --grid "$O/$be-vae.png"
done
rm -f "$O/last.log"
python3 - "$O" <<'PY'
import hashlib, json, os, struct, sys
d = sys.argv[1]
for name in sorted(os.listdir(d)):
    b = open(os.path.join(d, name), "rb").read()
    if name.endswith(".safetensors"):
        n = struct.unpack("<Q", b[:8])[0]
        header = json.dumps(json.loads(b[8:8 + n]), sort_keys=True).encode()
        b = header + b[8 + n:]
    print(hashlib.sha256(b).hexdigest(), name)
PY
