#!/usr/bin/env bash
# The aarch64 (ARM: Graviton, Ampere, Apple silicon under Linux) check CI runs: cross-compiles
# the library, its unit tests and the CPU fixture tests for aarch64-unknown-linux-gnu and runs
# them under qemu-user, so the NEON GEMM kernel, the NEON packing transposes and the
# elementwise loops built for aarch64 are exercised against the official fixtures.
#
#   bash scripts/ci-aarch64.sh            # what CI runs
#   AARCH64_TESTS="--lib" bash scripts/ci-aarch64.sh
#
# Toolchain, all from the package registries: the Rust standard library for the target
# (`rustup target add`), Debian's g++-aarch64-linux-gnu (linker and the C++ compiler for the
# CUDA emulation the build also compiles) and qemu-user. If one of them cannot be installed,
# the script says so plainly on stdout, as a line starting "ci-aarch64: NOT RUN", and exits 0:
# the x86-64 suite has already run, and this check depends on the machine's registries. A
# build or test failure fails CI.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

TARGET=aarch64-unknown-linux-gnu
SYSROOT=/usr/aarch64-linux-gnu
TESTS=${AARCH64_TESTS:---lib --test forward_fixtures --test sampling_fixtures --test icc_fixtures --test vae}

not_run() {
    echo "ci-aarch64: NOT RUN: $1"
    echo "ci-aarch64: the NEON paths were not built or tested in this run"
    exit 0
}

if ! rustup target list --installed 2>/dev/null | grep -qx "$TARGET"; then
    echo "ci-aarch64: installing the Rust standard library for $TARGET (rustup)"
    rustup target add "$TARGET" || not_run "rustup could not install the $TARGET standard library"
fi

need=()
command -v aarch64-linux-gnu-g++ >/dev/null || need+=(g++-aarch64-linux-gnu)
command -v qemu-aarch64 >/dev/null || need+=(qemu-user)
if ((${#need[@]})); then
    echo "ci-aarch64: installing ${need[*]} (apt-get)"
    if [[ $(id -u) != 0 ]]; then
        not_run "needs ${need[*]} and is not root to apt-get install them"
    fi
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null; } ||
        not_run "apt-get could not install ${need[*]}"
fi

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L $SYSROOT"
export CXX_aarch64_unknown_linux_gnu=aarch64-linux-gnu-g++
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc

start=$SECONDS
echo "ci-aarch64: building for $TARGET"
cargo build --release --target "$TARGET" --bins
# shellcheck disable=SC2086 # TESTS is a list of cargo arguments
cargo test --release --target "$TARGET" $TESTS -- --test-threads 2
echo "ci-aarch64: the $TARGET binary under qemu:"
qemu-aarch64 -L "$SYSROOT" "target/$TARGET/release/icdit" inspect weights/icdit-shapes-32.safetensors |
    grep -E "^CPU path" || { echo "ci-aarch64: icdit inspect did not report a CPU path"; exit 1; }

# The SIMD paths sum in one order with fused multiply-adds on both architectures, so the
# bundled model's samples from NEON (under qemu) and from this machine's AVX2 must be the same
# bytes. The comparison needs an x86-64 host with AVX2; elsewhere it says why it did not run.
TMPD=$(mktemp -d)
trap 'rm -rf "$TMPD"' EXIT
SAMPLE=(sample --steps 3 --class 0,3,7 --seed 11 --threads 2)
if [[ $(uname -m) == x86_64 ]] && grep -qw avx2 /proc/cpuinfo && grep -qw fma /proc/cpuinfo; then
    cargo build --release --bins
    ICDIT_CPU_ISA=avx2 target/release/icdit "${SAMPLE[@]}" --out-latents "$TMPD/x86-avx2.safetensors" >/dev/null
    qemu-aarch64 -L "$SYSROOT" "target/$TARGET/release/icdit" "${SAMPLE[@]}" \
        --out-latents "$TMPD/aarch64-neon.safetensors" >/dev/null
    if cmp "$TMPD/x86-avx2.safetensors" "$TMPD/aarch64-neon.safetensors"; then
        echo "ci-aarch64: aarch64 NEON and x86-64 AVX2 samples are identical ($(md5sum <"$TMPD/x86-avx2.safetensors" | cut -c1-12))"
    else
        echo "ci-aarch64: aarch64 NEON and x86-64 AVX2 samples differ"
        exit 1
    fi
else
    echo "ci-aarch64: cross-architecture comparison not run: this host has no x86-64 AVX2+FMA path to compare with"
fi
echo "ci-aarch64: done after $((SECONDS - start)) s"
