#!/usr/bin/env bash
# Installs the CUDA 13.0 toolchain icdit's `cuda` feature builds with, on a machine with no GPU
# and no CUDA install, from the package registries alone (recipe: docs/gpu-emulation.md):
#   - nvcc, ptxas, headers and CCCL from PyPI wheels pinned to 13.0 (the GPU machines' driver
#     is CUDA 13.0), into a virtual environment, with cuobjdump and nvdisasm (13.2: the oldest
#     on PyPI) for the SASS check;
#   - libcuda.so for linking from Debian's non-free `libcuda1`, downloaded (not installed) and
#     unpacked with `dpkg -x`; at run time without a GPU it makes cuInit report "no device".
# Idempotent: every step is skipped when its result is already in the cache folder, so a CI
# cache of ${XDG_CACHE_HOME:-$HOME/.cache}/icdit makes later runs take seconds.
#
# Prints the environment to use and writes it to $CACHE/cuda-13.0.env for `source`:
#   CUDA_PATH           toolkit root (bin/nvcc, include/cuda.h); build.rs and cust read it
#   CUDA_LIBRARY_PATH   same root: cust's build script links <root>/lib64/libcuda.so
#   ICDIT_NVCC          the nvcc build.rs runs
#   LD_LIBRARY_PATH     <root>/lib64 first, so test binaries start and find no device
set -euo pipefail

CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/icdit"
VENV="$CACHE/cuda-13.0-venv"
APT="$CACHE/apt"
ENV_FILE="$CACHE/cuda-13.0.env"
PYTHON="${PYTHON:-python3}"
mkdir -p "$CACHE"
start=$SECONDS

# 1. Compiler and headers. cccl provides <nv/target>, which cuda_fp16.h includes.
if [[ ! -f "$VENV/.done-nvcc" ]]; then
    echo "install-cuda-toolchain: PyPI wheels (nvcc 13.0, ~300 MB) into $VENV"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --cache-dir "$CACHE/pip" \
        "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-crt==13.0.*" \
        "nvidia-nvvm==13.0.*" "nvidia-cuda-cccl==13.0.*"
    touch "$VENV/.done-nvcc"
fi
# (Found by glob rather than by asking the venv's python, so a restored cache still works.)
ROOT=$(ls -d "$VENV"/lib/python3*/site-packages/nvidia/cu13 2>/dev/null | head -n1)
[[ -n "$ROOT" && -x "$ROOT/bin/nvcc" && -f "$ROOT/include/cuda.h" ]] || {
    echo "install-cuda-toolchain: $ROOT/bin/nvcc or include/cuda.h missing after install" >&2
    exit 1
}

# 1b. cuobjdump and nvdisasm, for the SASS check of the Hopper kernels (scripts/check-sass.sh).
#     PyPI has them from 13.2 on; a newer disassembler reads 13.0's sm_90a code.
if [[ ! -x "$ROOT/bin/cuobjdump" || ! -x "$ROOT/bin/nvdisasm" ]]; then
    echo "install-cuda-toolchain: cuobjdump and nvdisasm 13.2 (PyPI) into $ROOT/bin"
    "$VENV/bin/pip" install --quiet --no-deps --cache-dir "$CACHE/pip" \
        "nvidia-cuda-cuobjdump==13.2.*" "nvidia-cuda-nvdisasm==13.2.*"
fi

# 2. libcuda.so from Debian non-free, through a private apt configuration that adds
#    `contrib non-free` to the mirror and suite this machine already uses.
if [[ ! -e "$ROOT/lib64/libcuda.so" ]]; then
    echo "install-cuda-toolchain: libcuda1 from Debian non-free into $ROOT/lib64"
    mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial" "$APT/debs" "$APT/unpacked"
    src=$(ls /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1 || true)
    if [[ -n "$src" ]]; then
        uri=$(awk '/^URIs:/ {print $2; exit}' "$src")
        suite=$(awk '/^Suites:/ {print $2; exit}' "$src")
    else
        read -r uri suite < <(awk '$1 == "deb" && $2 !~ /^\[/ {print $2, $3; exit}' /etc/apt/sources.list)
    fi
    [[ -n "${uri:-}" && -n "${suite:-}" ]] || {
        echo "install-cuda-toolchain: cannot read the Debian mirror from /etc/apt" >&2
        exit 1
    }
    echo "deb $uri $suite non-free" >"$APT/sources.list"  # libcuda1 lives in non-free
    opts=(-o "Dir::Etc::SourceList=$APT/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
          -o "Dir::State::Lists=$APT/lists" -o "Dir::Cache=$APT/cache"
          -o "Debug::NoLocking=1" -o "APT::Sandbox::User=root")
    apt-get "${opts[@]}" -qq update
    (cd "$APT/debs" && apt-get "${opts[@]}" -qq download libcuda1)
    deb=$(ls "$APT"/debs/libcuda1_*.deb | head -n1)
    dpkg -x "$deb" "$APT/unpacked"
    lib=$(find "$APT/unpacked" -name 'libcuda.so.[0-9]*.*' -type f | head -n1)
    [[ -n "$lib" ]] || { echo "install-cuda-toolchain: no libcuda.so.* in $deb" >&2; exit 1; }
    mkdir -p "$ROOT/lib64"
    ln -sfr "$lib" "$ROOT/lib64/libcuda.so.1"  # relative: the cache folder may move
    ln -sfr "$lib" "$ROOT/lib64/libcuda.so"
fi

cat >"$ENV_FILE" <<EOF
export CUDA_PATH="$ROOT"
export CUDA_LIBRARY_PATH="$ROOT"
export ICDIT_NVCC="$ROOT/bin/nvcc"
export LD_LIBRARY_PATH="$ROOT/lib64\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
EOF
"$ROOT/bin/nvcc" --version | tail -n2
echo "install-cuda-toolchain: ready in $((SECONDS - start)) s; environment (also in $ENV_FILE):"
cat "$ENV_FILE"
