#!/usr/bin/env python3
"""Side-by-side CPU timing: icdit's CPU backend vs a PyTorch DiT, same machine, same thread
count, same shapes (random weights), interleaved rounds, medians reported.

    cargo build --release
    python3 tools/bench_cpu_vs_pytorch.py --threads 2                         # plain forward
    python3 tools/bench_cpu_vs_pytorch.py --threads 2 --step calibrated --rank 128
    python3 tools/bench_cpu_vs_pytorch.py --dit-repo /path/to/DiT --threads 2

The PyTorch model is the official DiT models.py imported from --dit-repo (a checkout of
github.com/facebookresearch/DiT; nothing of it is copied here; needs timm==0.9.16), or without
--dit-repo tools/dit_torch.py's DiT, which tools/check_dit_torch.py verifies bit-exact against
the official code.

--step plain times one forward pass on both sides. --step calibrated times an ICC
increment-calibrated step (dit-reference.md E.4): icdit's `bench-forward --step calibrated`
against tools/pytorch_icc_step.py in eager float32, both with caches from one untimed full
step and random rank-R factors for q, k, v, proj, fc1 and fc2 in every block.
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# DiT family table (dit-reference.md B): hidden size, depth, heads.
FAMILIES = {"XL": (1152, 28, 16), "L": (1024, 24, 16), "B": (768, 12, 12), "S": (384, 12, 6)}


def official_models(repo):
    spec = importlib.util.spec_from_file_location("dit_official_models", os.path.join(repo, "models.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def model_factory(args):
    """(constructor taking the latent side, description of the PyTorch model)."""
    name = "DiT-" + args.family
    if args.dit_repo:
        models = official_models(args.dit_repo)
        return (lambda size: models.DiT_models[name](input_size=size)), f"official models.py from {args.dit_repo}"
    import dit_torch
    kind, patch = args.family.split("/")
    hidden, depth, heads = FAMILIES[kind]

    def make(size):
        return dit_torch.DiT(dit_torch.DiTConfig(input_size=size, patch_size=int(patch), in_channels=4,
                                                 hidden_size=hidden, depth=depth, num_heads=heads,
                                                 num_classes=1000, class_dropout_prob=0.1, learn_sigma=True))
    return make, "tools/dit_torch.py (bit-exact with the official models.py, see tools/check_dit_torch.py)"


def torch_times(args, torch, make_model):
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = make_model(args.image_size // 8).eval()
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
    if args.step == "calibrated":
        import pytorch_icc_step as icc
        # Untimed full step fills the caches; the timed steps see the next (perturbed) input and
        # timestep, as an inc step following a full one does.
        _, caches = icc.full_step(model, x, t, y)
        factors = icc.random_factors(model, args.rank)
        x = x + 0.05 * torch.randn_like(x)
        t = t - 10
        step = lambda: icc.calibrated_step(model, caches, factors, x, t, y)
    else:
        step = lambda: model(x, t, y)
    out = []
    with torch.inference_mode():
        for _ in range(args.warmup):
            step()
        for _ in range(args.runs):
            s = time.perf_counter()
            step()
            out.append((time.perf_counter() - s) * 1e3)
    return out


def icdit_times(args):
    cmd = [args.icdit, "bench-forward", "--family", args.family, "--image-size", str(args.image_size),
           "--rows", str(args.rows), "--threads", str(args.threads), "--runs", str(args.runs),
           "--warmup", str(args.warmup), "--step", args.step]
    if args.step == "calibrated":
        cmd += ["--rank", str(args.rank)]
    res = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dit-repo", help="official DiT checkout; default: tools/dit_torch.py")
    ap.add_argument("--icdit", default="target/release/icdit")
    ap.add_argument("--family", default="XL/2")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--rows", type=int, default=2, help="model batch (2 = one image with guidance)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--runs", type=int, default=3, help="timed passes per round")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of each implementation")
    ap.add_argument("--step", choices=["plain", "calibrated"], default="plain",
                    help="plain forward, or an ICC increment-calibrated step (default plain)")
    ap.add_argument("--rank", type=int, default=128, help="factor rank for --step calibrated (default 128)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.family.split("/")[0] not in FAMILIES and not args.dit_repo:
        ap.error(f"--family must be one of {', '.join(k + '/<patch>' for k in FAMILIES)}")

    import torch
    make_model, source = model_factory(args)
    print(f"PyTorch model: {source}", file=sys.stderr)
    ours, theirs, kernel, gmacs_row = [], [], None, None
    for r in range(args.rounds):
        res = icdit_times(args)
        ours += res["runs_ms"]
        kernel, gmacs_row = res["gemm_kernel"], res.get("gmacs_per_row")
        theirs += torch_times(args, torch, make_model)
        print(f"round {r + 1}/{args.rounds}: icdit median {statistics.median(ours):.1f} ms, "
              f"pytorch median {statistics.median(theirs):.1f} ms", file=sys.stderr)
    mo, mt = statistics.median(ours), statistics.median(theirs)
    rank = args.rank if args.step == "calibrated" else None
    result = {
        "machine": platform.processor() or platform.machine(),
        "cpu": open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(": ") if os.path.exists("/proc/cpuinfo") else "",
        "threads": args.threads, "family": args.family, "image_size": args.image_size, "rows": args.rows,
        "step": args.step, "rank": rank, "pytorch_model": source, "icdit_gmacs_per_row": gmacs_row,
        "torch": torch.__version__, "icdit_gemm_kernel": kernel,
        "icdit_median_ms": mo, "pytorch_median_ms": mt, "ratio_icdit_over_pytorch": mo / mt,
        "icdit_runs_ms": ours, "pytorch_runs_ms": theirs,
    }
    what = "forward" if args.step == "plain" else f"calibrated step, rank {args.rank}"
    print(f"PyTorch model: {source}\n"
          f"| implementation | median ms ({len(ours)} runs) |\n|---|---|\n"
          f"| icdit CPU ({kernel}) | {mo:.1f} |\n| PyTorch {torch.__version__} fp32 eager | {mt:.1f} |\n"
          f"ratio icdit/PyTorch: {mo / mt:.3f} ({args.family} {what}, {args.image_size}px, rows {args.rows}, "
          f"{args.threads} threads)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
