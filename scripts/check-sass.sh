#!/usr/bin/env bash
# The Hopper kernels' machine code (issue 26), checked without a GPU: each kernels/*_sm90.cu
# (the GEMM, the VAE convolution) built for sm_90a must issue wgmma (HGMMA) and tensor memory
# accelerator loads (UTMALDG), and touch no local memory (LDL/STL: spilled registers or arrays
# indexed at run time, which ptxas's spill report can miss).
# Usage: scripts/check-sass.sh DIR   DIR holds the fatbins build.rs made (gemm_sm90.fatbin,
#        conv_sm90.fatbin): the cuda build's OUT_DIR (scripts/ci-cuda.sh finds it) or
#        .device/kernels (scripts/prepare-device.sh copies them there for scripts/gpu-check.sh).
# Environment: CUOBJDUMP (default: $CUDA_PATH/bin/cuobjdump, else cuobjdump on PATH; it needs
# nvdisasm beside it or on PATH — scripts/install-cuda-toolchain.sh installs both).
set -euo pipefail
dir=${1:?usage: scripts/check-sass.sh DIR}
cuobjdump=${CUOBJDUMP:-}
if [[ -z "$cuobjdump" ]]; then
    if [[ -n "${CUDA_PATH:-}" && -x "$CUDA_PATH/bin/cuobjdump" ]]; then
        cuobjdump=$CUDA_PATH/bin/cuobjdump
    else
        cuobjdump=cuobjdump
    fi
fi
failed=0
for kernel in gemm_sm90 conv_sm90; do
    fatbin=$dir/$kernel.fatbin
    if [[ ! -f "$fatbin" ]]; then
        echo "check-sass: $fatbin: missing" >&2
        failed=1
        continue
    fi
    if ! sass=$(PATH="$(dirname "$cuobjdump"):$PATH" "$cuobjdump" -sass "$fatbin" 2>&1); then
        echo "check-sass: $cuobjdump -sass $fatbin failed: $sass" >&2
        failed=1
        continue
    fi
    count() { grep -cE "$1" <<<"$sass" || true; }
    hgmma=$(count '\bHGMMA\b|\bHGMMA\.')
    tma=$(count '\bUTMALDG\b|\bUTMALDG\.')
    local_mem=$(count '\b(LDL|STL)(\.|\b)')
    arch=$(grep -m1 -oE 'sm_[0-9]+a?' <<<"$sass" || echo unknown)
    echo "check-sass: $kernel ($arch): $hgmma HGMMA, $tma UTMALDG, $local_mem LDL/STL"
    if [[ "$arch" != sm_90a ]] || ((hgmma == 0 || tma == 0 || local_mem > 0)); then
        echo "check-sass: $kernel: expected sm_90a code with HGMMA and UTMALDG and no LDL/STL" >&2
        failed=1
    fi
done
exit $failed
