#!/usr/bin/env bash
# CPU comparison, icdit vs eager PyTorch float32, same machine, same thread count, random weights:
#   (a) DiT-XL/2 forward, 256 px, rows 2 (one image with guidance)
#   (b) ICC increment-calibrated step, rank 128, same shapes
#   (c) SD-VAE decode, 32x32x4 latent -> 256x256 image
# Rounds alternate between the two implementations; medians over all timed runs are reported.
# Prints one table and writes every raw run to ${OUT:-out/cpu-compare}/cpu-compare.json.
#
#   cargo build --release && scripts/cpu-compare.sh
#   THREADS=8 ROUNDS=5 RUNS=3 scripts/cpu-compare.sh
#   scripts/cpu-compare.sh --quick        # or QUICK=1: DiT-S/2 at a 16x16 latent, about a minute
#   ISA=avx2 scripts/cpu-compare.sh       # both sides held to one instruction set (below)
#
# ISA (scalar, avx2, avx512, neon; default: each side's best) sets ICDIT_CPU_ISA for icdit and
# holds PyTorch to the same vector width: ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS and
# ONEDNN_MAX_CPU_ISA (avx2: AVX2; scalar: ATen's default kernels, MKL SSE4.2, oneDNN SSE4.1,
# the least PyTorch offers). That is how an AVX2-only CPU is measured on an AVX-512 machine.
#
# Environment: THREADS (default nproc), ROUNDS (3), RUNS (3 timed runs per round), WARMUP (1),
# OUT (out/cpu-compare), QUICK (0), DIT_REPO (a facebookresearch/DiT checkout: time its models.py
# instead of tools/dit_torch.py). Needs python3 with torch; the VAE row also needs diffusers.
# Run it on an otherwise idle machine: PyTorch's OpenMP threads spin-wait, and on oversubscribed
# cores its times inflate many-fold.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

QUICK=${QUICK:-0}
for arg in "$@"; do
    case "$arg" in
        --quick) QUICK=1 ;;
        -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "cpu-compare: unknown argument '$arg' (only --quick)" >&2; exit 2 ;;
    esac
done
THREADS=${THREADS:-$(nproc)}
ISA=${ISA:-}
case "$ISA" in
    "") ;;
    avx512) export ICDIT_CPU_ISA=avx512 ATEN_CPU_CAPABILITY=avx512 ;;
    avx2) export ICDIT_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 ;;
    scalar) export ICDIT_CPU_ISA=scalar ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2 ONEDNN_MAX_CPU_ISA=SSE41 ;;
    neon) export ICDIT_CPU_ISA=neon ;;
    *) echo "cpu-compare: ISA=$ISA: expected scalar, avx2, avx512 or neon" >&2; exit 2 ;;
esac
ROUNDS=${ROUNDS:-3}
RUNS=${RUNS:-3}
WARMUP=${WARMUP:-1}
OUT=${OUT:-out/cpu-compare}
ICDIT=target/release/icdit
RANK=128

if [[ "$QUICK" == 1 ]]; then
    FAMILY=S/2; IMAGE=128; VAE_LATENT=8
else
    FAMILY=XL/2; IMAGE=256; VAE_LATENT=32
fi

if [[ ! -x "$ICDIT" ]]; then
    echo "cpu-compare: $ICDIT not found; build it first with: cargo build --release" >&2
    exit 1
fi
if ! python3 -c 'import torch' 2>/dev/null; then
    echo "cpu-compare: python3 cannot import torch; install PyTorch (CPU build is enough)" >&2
    exit 1
fi

mkdir -p "$OUT"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# --- VAE: can the PyTorch side run, and at this latent size? -----------------------------
VAE_SKIP=""
if ! python3 -c 'import diffusers' 2>/dev/null; then
    VAE_SKIP="diffusers is not installed (pip install diffusers), so the PyTorch VAE decode cannot run"
elif [[ "$VAE_LATENT" != 32 && "$(python3 tools/bench_vae_pytorch.py --help 2>/dev/null || true)" != *--latent* ]]; then
    VAE_SKIP="tools/bench_vae_pytorch.py has no --latent option (it decodes 32x32 only), so quick mode has no PyTorch VAE run"
fi
VAE_PT_ARGS=()
if [[ "$VAE_LATENT" != 32 ]]; then VAE_PT_ARGS=(--latent "$VAE_LATENT"); fi
# Load before anything of ours runs: other busy processes make the comparison meaningless.
LOAD0=$(cut -d' ' -f1 /proc/loadavg 2>/dev/null || echo 0)

echo "cpu-compare: $FAMILY at ${IMAGE}px, VAE latent ${VAE_LATENT}, $THREADS threads, $ROUNDS rounds x $RUNS runs (warmup $WARMUP), ISA ${ISA:-best}" >&2

# --- (a) forward and (b) calibrated step: the Python harness interleaves rounds itself ----
# DIT_REPO=<checkout of facebookresearch/DiT> times the official models.py instead of our port.
REPO_ARGS=()
if [[ -n "${DIT_REPO:-}" ]]; then REPO_ARGS=(--dit-repo "$DIT_REPO"); fi
for step in plain calibrated; do
    echo "cpu-compare: DiT $FAMILY $step ..." >&2
    python3 -W ignore tools/bench_cpu_vs_pytorch.py "${REPO_ARGS[@]}" --icdit "$ICDIT" --family "$FAMILY" \
        --image-size "$IMAGE" --rows 2 --threads "$THREADS" --runs "$RUNS" --warmup "$WARMUP" \
        --rounds "$ROUNDS" --step "$step" --rank "$RANK" --json "$TMP/dit-$step.json" >"$TMP/dit-$step.log"
done

# --- (c) VAE decode: alternate icdit and PyTorch rounds here ------------------------------
: >"$TMP/vae-icdit.jsonl"
: >"$TMP/vae-pytorch.jsonl"
if [[ -n "$VAE_SKIP" ]]; then
    echo "cpu-compare: VAE: PyTorch side skipped: $VAE_SKIP (icdit is still timed)" >&2
fi
for ((r = 1; r <= ROUNDS; r++)); do
    echo "cpu-compare: VAE round $r/$ROUNDS ..." >&2
    "$ICDIT" bench-vae --latent "$VAE_LATENT" --threads "$THREADS" --runs "$RUNS" --warmup "$WARMUP" \
        | tail -n 1 >>"$TMP/vae-icdit.jsonl"
    if [[ -z "$VAE_SKIP" ]]; then
        python3 -W ignore tools/bench_vae_pytorch.py --threads "$THREADS" --iters "$RUNS" --warmup "$WARMUP" \
            "${VAE_PT_ARGS[@]}" --json | tail -n 1 >>"$TMP/vae-pytorch.jsonl"
    fi
done

# --- machine, table, JSON ------------------------------------------------------------------
CPU=$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//' || true)
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ "$COMMIT" != unknown ]] && ! git diff --quiet HEAD -- 2>/dev/null; then COMMIT="$COMMIT-dirty"; fi

CPU="$CPU" COMMIT="$COMMIT" THREADS="$THREADS" ROUNDS="$ROUNDS" RUNS="$RUNS" WARMUP="$WARMUP" \
FAMILY="$FAMILY" IMAGE="$IMAGE" RANK="$RANK" VAE_LATENT="$VAE_LATENT" VAE_SKIP="$VAE_SKIP" QUICK="$QUICK" \
LOAD0="$LOAD0" TMP="$TMP" ISA="${ISA:-best}" OUTFILE="$OUT/cpu-compare.json" python3 - <<'PY'
import datetime, json, os, statistics
import torch

e = os.environ
tmp = e["TMP"]
load = float(e["LOAD0"])
machine = {"cpu": e["CPU"], "threads": int(e["THREADS"]), "torch": torch.__version__,
           "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "git_commit": e["COMMIT"], "loadavg_1min_at_start": load, "isa": e["ISA"],
           "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "pytorch_isa_env": {k: e[k] for k in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS",
                                                 "ONEDNN_MAX_CPU_ISA") if k in e}}
rows = []

for step in ("plain", "calibrated"):
    d = json.load(open(f"{tmp}/dit-{step}.json"))
    what = "forward" if step == "plain" else f"calibrated step r{d['rank']}"
    rows.append({"benchmark": f"DiT-{d['family']} {what}, {d['image_size']}px, rows {d['rows']}",
                 "icdit_median_ms": d["icdit_median_ms"], "pytorch_median_ms": d["pytorch_median_ms"],
                 "raw": d})

vi = [json.loads(l) for l in open(f"{tmp}/vae-icdit.jsonl") if l.strip()]
vp = [json.loads(l) for l in open(f"{tmp}/vae-pytorch.jsonl") if l.strip()]
side = 8 * int(e["VAE_LATENT"])
runs = [x for r in vi for x in r["runs_ms"]]
# bench_vae_pytorch.py reports only each call's median and min, so the PyTorch figure is the
# median of the per-round medians (with RUNS runs inside each round).
rows.append({"benchmark": f"VAE decode {side}x{side}",
             "icdit_median_ms": statistics.median(runs),
             "pytorch_median_ms": statistics.median([r["median_ms"] for r in vp]) if vp else None,
             "pytorch_skipped": e["VAE_SKIP"] or None,
             "raw": {"latent": int(e["VAE_LATENT"]), "icdit_runs_ms": runs, "icdit_rounds": vi,
                     "pytorch_rounds": vp,
                     "pytorch_note": "per-round median_ms/min_ms only (bench_vae_pytorch.py does not print single runs)"}})

for r in rows:
    r["ratio_icdit_over_pytorch"] = (r["icdit_median_ms"] / r["pytorch_median_ms"]
                                     if r.get("pytorch_median_ms") else None)

fmt = lambda v, p=1: "skipped" if v is None else f"{v:.{p}f}"
print(f"machine: {machine['cpu']}; {machine['threads']} threads; torch {machine['torch']}; "
      f"{machine['date']}; commit {machine['git_commit']}")
print(f"instruction set: icdit {e['ISA']}, PyTorch {machine['torch_cpu_capability']} "
      f"({', '.join(f'{k}={v}' for k, v in machine['pytorch_isa_env'].items()) or 'unrestricted'})")
print(f"settings: {e['ROUNDS']} rounds x {e['RUNS']} runs per implementation (warmup {e['WARMUP']}), "
      f"PyTorch fp32 eager ({rows[0]['raw']['pytorch_model'].split(' (')[0]})"
      + ("; QUICK mode" if e["QUICK"] == "1" else ""))
print("| benchmark | icdit median ms | PyTorch median ms | ratio icdit/PyTorch |")
print("|---|---|---|---|")
for r in rows:
    ratio = "-" if r["ratio_icdit_over_pytorch"] is None else f"{r['ratio_icdit_over_pytorch']:.3f}"
    print(f"| {r['benchmark']} | {fmt(r['icdit_median_ms'])} | {fmt(r['pytorch_median_ms'])} | {ratio} |")
if e["VAE_SKIP"]:
    print(f"note: VAE PyTorch side skipped: {e['VAE_SKIP']}")
if load > 0.5:
    print(f"warning: 1-min load average was {load:.2f} before the run; other processes shared the CPUs, so these "
          f"times (PyTorch's especially) are not representative")
settings = {k.lower(): e[k] for k in ("ROUNDS", "RUNS", "WARMUP", "FAMILY", "IMAGE", "RANK", "VAE_LATENT", "QUICK")}
with open(e["OUTFILE"], "w") as f:
    json.dump({"machine": machine, "settings": settings, "benchmarks": rows}, f, indent=1)
print(f"wrote {e['OUTFILE']}")
PY
