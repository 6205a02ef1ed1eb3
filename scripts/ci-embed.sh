#!/usr/bin/env bash
# The embedding interfaces (issue 25), as CI runs them after the README's test command:
#   1. the C ABI's own tests (header up to date, same bytes as the Rust API, a panic reaching
#      C as a status, cancellation from another thread, no allocation per request);
#   2. examples/c/sample.c built with the system C compiler against include/icdit.h and
#      libicdit_c.so, run on the bundled model; its pixels are compared with the CLI's in 4;
#   3. the Python package: a venv with maturin, numpy and pytest from the package registries
#      and the abi3 wheel, both cached under ${XDG_CACHE_HOME:-~/.cache}/icdit (the wheel is
#      rebuilt only when its sources change, in the target folder kept there);
#   4. pytest python/tests: the wheel imported, the bundled model sampled, pixels equal to the
#      CLI's and the C example's, errors, cancellation, previews, calibration.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
start=$SECONDS
cache="${XDG_CACHE_HOME:-$HOME/.cache}/icdit"
venv="$cache/py-venv"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# The C library and the wheel build in one target folder kept in the cache (icdit is built
# there with feature `dlopen`, without debug info), so a later run recompiles only what changed.
export CARGO_TARGET_DIR="$cache/embed-target" CARGO_PROFILE_RELEASE_DEBUG=0
lib="$CARGO_TARGET_DIR/release"
cargo test --release -p icdit-c
cargo build --release -p icdit-c --lib
echo "ci-embed: C ABI tests done after $((SECONDS - start)) s"

cc -std=c11 -Wall -Wextra -Werror -O2 examples/c/sample.c -Iinclude -L"$lib" -licdit_c \
    -Wl,-rpath,"$lib" -o "$work/c-sample"
"$work/c-sample" --class 1,2,3 --seed 0 --out "$work/c-pixels.u8"

if ! "$venv/bin/python" -c "import maturin, numpy, pytest" 2>/dev/null; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip
    "$venv/bin/pip" install --quiet "maturin>=1.9,<2" numpy pytest
fi
# The wheel's key: every file that goes into it.
key=$(git ls-files -z Cargo.toml Cargo.lock build.rs src kernels python | xargs -0 sha256sum | sha256sum | cut -c1-16)
wheels="$cache/wheels/$key"
if ! ls "$wheels"/icdit-*.whl >/dev/null 2>&1; then
    rm -rf "$cache/wheels"
    "$venv/bin/maturin" build --release --compatibility linux -m python/Cargo.toml \
        -i "$venv/bin/python" -o "$wheels"
fi
"$venv/bin/pip" install --quiet --force-reinstall --no-deps "$wheels"/icdit-*.whl
echo "ci-embed: wheel ready after $((SECONDS - start)) s"

# From another folder, so `import icdit` is the installed wheel, not python/icdit.
test -x target/release/icdit || cargo build --release --bin icdit --target-dir target
(cd "$work" && ICDIT_CLI="$repo/target/release/icdit" ICDIT_C_PIXELS="$work/c-pixels.u8" \
    ICDIT_C_CLASSES=1,2,3 "$venv/bin/python" -m pytest -q -p no:cacheprovider "$repo/python/tests")
echo "ci-embed: done after $((SECONDS - start)) s"
