#!/usr/bin/env python3
"""Side-by-side CPU timing: icdit's CPU backend vs the official PyTorch DiT, same machine,
same thread count, same shapes (random weights), interleaved rounds, medians reported.

    cargo build --release
    python3 tools/bench_cpu_vs_pytorch.py --dit-repo /path/to/DiT --threads 2

--dit-repo is a checkout of github.com/facebookresearch/DiT (its models.py is imported;
nothing of it is copied here). Needs torch and timm==0.9.16.
"""
import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time


def official_models(repo):
    spec = importlib.util.spec_from_file_location("dit_official_models", os.path.join(repo, "models.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def torch_times(args, torch, models):
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    name = "DiT-" + args.family
    model = models.DiT_models[name](input_size=args.image_size // 8).eval()
    # The official init zeroes adaLN and the final layer; give every weight real values so
    # no kernel can take a shortcut on zeros.
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.02)
    latent = args.image_size // 8
    x = torch.randn(args.rows, 4, latent, latent)
    t = torch.full((args.rows,), 500, dtype=torch.long)
    y = torch.arange(args.rows) % 1000
    out = []
    with torch.inference_mode():
        for _ in range(args.warmup):
            model(x, t, y)
        for _ in range(args.runs):
            s = time.perf_counter()
            model(x, t, y)
            out.append((time.perf_counter() - s) * 1e3)
    return out


def icdit_times(args):
    cmd = [args.icdit, "bench-forward", "--family", args.family, "--image-size", str(args.image_size),
           "--rows", str(args.rows), "--threads", str(args.threads), "--runs", str(args.runs),
           "--warmup", str(args.warmup)]
    res = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dit-repo", required=True)
    ap.add_argument("--icdit", default="target/release/icdit")
    ap.add_argument("--family", default="XL/2")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--rows", type=int, default=2, help="model batch (2 = one image with guidance)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--runs", type=int, default=3, help="timed passes per round")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of each implementation")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    import torch
    models = official_models(args.dit_repo)
    ours, theirs, kernel = [], [], None
    for r in range(args.rounds):
        res = icdit_times(args)
        ours += res["runs_ms"]
        kernel = res["gemm_kernel"]
        theirs += torch_times(args, torch, models)
        print(f"round {r + 1}/{args.rounds}: icdit median {statistics.median(ours):.1f} ms, "
              f"pytorch median {statistics.median(theirs):.1f} ms", file=sys.stderr)
    mo, mt = statistics.median(ours), statistics.median(theirs)
    result = {
        "machine": platform.processor() or platform.machine(),
        "cpu": open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(": ") if os.path.exists("/proc/cpuinfo") else "",
        "threads": args.threads, "family": args.family, "image_size": args.image_size, "rows": args.rows,
        "torch": torch.__version__, "icdit_gemm_kernel": kernel,
        "icdit_median_ms": mo, "pytorch_median_ms": mt, "ratio_icdit_over_pytorch": mo / mt,
        "icdit_runs_ms": ours, "pytorch_runs_ms": theirs,
    }
    print(f"| implementation | median ms ({len(ours)} runs) |\n|---|---|\n"
          f"| icdit CPU ({kernel}) | {mo:.1f} |\n| PyTorch {torch.__version__} fp32 eager | {mt:.1f} |\n"
          f"ratio icdit/PyTorch: {mo / mt:.3f} ({args.family}, {args.image_size}px, rows {args.rows}, {args.threads} threads)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
