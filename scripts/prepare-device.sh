#!/usr/bin/env bash
# Builds, on the development machine, what scripts/gpu-check.sh runs on a lent GPU machine (which
# has no Rust toolchain): the CUDA test binaries and `icdit`, all with `--features cuda`, copied
# with stable names into the git-ignored folder .device/ that travels with the working tree
# (docs/gpu-check.md):
#   .device/bin/gpu_convert, gpu_gemm, gpu_layernorm, gpu_ptxas, gpu_residual  (tests/gpu_*.rs)
#   .device/bin/lib                                                           (the library's unit tests)
#   .device/bin/icdit                                                         (the command)
#   .device/manifest.txt   commit, date, toolchain, build path, size and sha256 of each binary
# (the Python tools the PyTorch steps run, tools/bench_pytorch_gpu.py, tools/dit_torch.py,
# tools/bench_pytorch_pixart_gpu.py, tools/bench_pytorch_common.py, tools/pixart_torch.py, tools/make_random_pixart.py, travel with the working tree: checked below)
# packed as .device/bin.tar.xz (about 8× smaller: the device tool carries 64 MiB with the tree),
# which scripts/gpu-check.sh unpacks to .device/bin on the GPU machine.
# Debug information and symbols are stripped (the GPU machine has no debugger for them, and the
# 64 MiB the device tool carries is tight): panic messages still give file and line. Fails if .device/ is
# over DEVICE_LIMIT_MIB (default 60; the device tool carries at most 64 MiB with the tree).
#
# Options: --with-dataset (also the training set for scripts/gpu-train.sh).
# Environment: ICDIT_CUDA_ARCH (default 90: H100/H200), DEVICE_LIMIT_MIB, CARGO_TARGET_DIR (as cargo).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
DEST=.device
LIMIT_MIB=${DEVICE_LIMIT_MIB:-60}
ENV_FILE="${XDG_CACHE_HOME:-$HOME/.cache}/icdit/cuda-13.0.env"

# 1. The CUDA 13.0 toolchain (nvcc for build.rs, libcuda.so to link), installed once and cached.
[[ -f "$ENV_FILE" ]] || bash scripts/install-cuda-toolchain.sh
# shellcheck disable=SC1090
source "$ENV_FILE"
export ICDIT_CUDA_ARCH=${ICDIT_CUDA_ARCH:-90}
echo "prepare-device: toolchain $("$ICDIT_NVCC" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), kernels for sm_$ICDIT_CUDA_ARCH"

# 2. Build. cargo's JSON messages name each executable: compiler-artifact messages carry
#    "executable" and, for test harnesses, profile.test = true.
json=$(mktemp)
list=$(mktemp)
trap 'rm -f "$json" "$list"' EXIT
cargo test --release --features cuda --lib --test 'gpu_*' --no-run --message-format=json >"$json"
cargo build --release --features cuda --bin icdit --message-format=json >>"$json"
python3 - "$json" >"$list" <<'EOF'
import json, os, sys
found = {}
for line in open(sys.argv[1]):
    if not line.startswith("{"):
        continue
    m = json.loads(line)
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    t, test = m["target"], m["profile"]["test"]
    if test and "lib" in t["kind"]:
        found["lib"] = m["executable"]
    elif test and "test" in t["kind"] and t["name"].startswith("gpu_"):
        found[t["name"]] = m["executable"]
    elif not test and "bin" in t["kind"] and t["name"] == "icdit":
        found["icdit"] = m["executable"]
kernels = None
for line in open(sys.argv[1]):
    if line.startswith("{"):
        m = json.loads(line)
        if m.get("reason") == "build-script-executed" and "icdit" in m.get("package_id", "") \
                and os.path.exists(os.path.join(m.get("out_dir", ""), "gemm_sm90.fatbin")):
            kernels = m["out_dir"]
for name, path in sorted(found.items()):
    print(name, path)
if kernels:
    print("kernels", kernels)
EOF
wanted=(lib icdit)
for f in tests/gpu_*.rs; do wanted+=("$(basename "$f" .rs)"); done
for want in "${wanted[@]}"; do
    grep -q "^$want " "$list" || { echo "prepare-device: cargo reported no executable for $want" >&2; exit 1; }
done

# 3. Copy with stable names, without debug information; the Hopper kernels' fatbins (the build
#    script's output folder) to .device/kernels, for gpu-check.sh's SASS check (check-sass.sh),
#    packed with the binaries below.
rm -rf "$DEST/bin" "$DEST/kernels"
mkdir -p "$DEST/bin" "$DEST/kernels"
kernels_dir=$(sed -n 's/^kernels //p' "$list")
[[ -n "$kernels_dir" ]] || { echo "prepare-device: cargo reported no build-script output with the fatbins" >&2; exit 1; }
cp "$kernels_dir"/*_sm90.fatbin "$DEST/kernels/"
sed -i '/^kernels /d' "$list"
while read -r name path; do
    if command -v strip >/dev/null; then
        strip --strip-all -o "$DEST/bin/$name" "$path"
    else
        echo "prepare-device: no strip on PATH: copying $name with its debug information" >&2
        cp "$path" "$DEST/bin/$name"
    fi
    chmod 755 "$DEST/bin/$name"
done <"$list"
if ! ldd "$DEST/bin/gpu_gemm" | grep -q libcuda; then
    echo "prepare-device: $DEST/bin/gpu_gemm does not link libcuda: was it built with --features cuda?" >&2
    exit 1
fi

# 4. Files read at run time by way of the build path. The test binaries are started on the GPU
#    machine from a checkout at another path; gpu-check.sh links this path to that checkout when
#    it does not exist there, but say where it matters.
baked=$(grep -rln 'CARGO_MANIFEST_DIR' tests/gpu_*.rs tests/gpu_common src 2>/dev/null | tr '\n' ' ' || true)

# 5. The manifest gpu-check.sh prints into card.txt and summary.json.
{
    echo "# .device/ built by scripts/prepare-device.sh"
    echo "built_at=$(date -u +%FT%TZ)"
    echo "commit=$(git rev-parse --verify -q HEAD 2>/dev/null || echo unknown)"
    echo "dirty_files=$(git status --porcelain 2>/dev/null | wc -l)"
    echo "rustc=$(rustc -V)"
    echo "features=cuda"
    echo "cuda_arch=sm_$ICDIT_CUDA_ARCH"
    echo "nvcc=$("$ICDIT_NVCC" --version | tail -n1)"
    echo "build_host=$(uname -srm); $(ldd --version 2>&1 | head -n1)"
    echo "build_root=$PWD"
    echo "manifest_dir_users=${baked:-none}"
    while read -r name _; do
        echo "bin.$name=$(stat -c %s "$DEST/bin/$name") $(sha256sum "$DEST/bin/$name" | cut -d' ' -f1)"
    done <"$list"
} >"$DEST/manifest.txt"

# 6. Pack: bin/ and kernels/ become bin.tar.xz (the manifest describes the unpacked files).
rm -f "$DEST/bin.tar.xz"
tar -C "$DEST" -cJf "$DEST/bin.tar.xz" bin kernels
rm -rf "$DEST/bin" "$DEST/kernels"

# 7. With --with-dataset: the bundled model's training set, compressed (8 MB), for
#    scripts/gpu-train.sh (generating it there would take a minute of device time).
dataset=$(python3 tools/make_dataset.py --print-cache-name)
if [[ " $* " == *" --with-dataset "* ]]; then
    cache="${XDG_CACHE_HOME:-$HOME/.cache}/icdit/$dataset"
    python3 - "$cache" "$DEST/$dataset" <<'PYEOF'
import os, sys
import numpy as np
sys.path.insert(0, "tools")
import make_dataset
images, labels = make_dataset.load_or_make(40000, 0, sys.argv[1])
np.savez_compressed(sys.argv[2] + ".tmp.npz", images=images, labels=labels, seed=np.int64(0),
                    version=np.int64(make_dataset.VERSION))
os.replace(sys.argv[2] + ".tmp.npz", sys.argv[2])
PYEOF
else
    rm -f "$DEST"/shapes32v*_seed*_n*.npz
fi

# 7b. The Python tools gpu-check.sh runs travel with the working tree (tracked or untracked but
#     not ignored files), not in .device/: check that none is missing or git-ignored.
for f in tools/bench_pytorch_gpu.py tools/bench_pytorch_common.py tools/dit_torch.py tools/bench_pytorch_pixart_gpu.py tools/pixart_torch.py tools/make_random_pixart.py; do
    if [[ ! -f "$f" ]] || git check-ignore -q "$f"; then
        echo "prepare-device: $f is missing or git-ignored: gpu-check.sh's PyTorch steps need it on the GPU machine" >&2
        exit 1
    fi
done

# 8. Sizes. The device tool carries the working tree (tracked and untracked-not-ignored files) and
#    .device together, 64 MiB at most.
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
bytes=$(du -sb "$DEST" | cut -f1)
tree=$(git ls-files -z --cached --others --exclude-standard -- . ':(exclude).device' | xargs -0 -r stat -c %s 2>/dev/null |
       awk '{ s += $1 } END { print s + 0 }')
ls -l "$DEST"
echo "prepare-device: $DEST is $(mib "$bytes") MiB (limit $LIMIT_MIB MiB); with the working tree" \
     "($(mib "$tree") MiB) $(mib $((bytes + tree))) MiB of the 64 MiB the device tool carries;" \
     "$((SECONDS - start)) s"
if [[ -n "$baked" ]]; then
    echo "prepare-device: note: these sources use env!(\"CARGO_MANIFEST_DIR\"), baked as $PWD: $baked"
fi
if ((bytes > LIMIT_MIB * 1048576)); then
    echo "prepare-device: $DEST is over $LIMIT_MIB MiB" >&2
    exit 1
fi
if ((bytes + tree > 63 * 1048576)); then
    echo "prepare-device: $DEST plus the working tree is over 63 MiB: the call would be refused" >&2
    exit 1
fi
echo "prepare-device: ready. On the GPU machine: bash scripts/gpu-check.sh (carry: [\".device\"])"
