"""Train icdit's bundled default model: a small pixel-space DiT on the "shapes-32" set.

The recipe is DiT's (tools/dit_torch.py): uniform t over 1000 linear-beta steps, epsilon prediction
with the learned-range variance, hybrid loss (MSE + variational bound with the mean frozen), class
dropout 0.1 to the null label so classifier-free guidance works, AdamW with weight decay 0, and an
EMA of the weights that is the only thing exported. Differences forced by the short CPU run (and why):
  * lr 1e-3 with a 200-step linear warm-up instead of a constant 1e-4: a few thousand steps on a
    2-3M parameter model, where 1e-4 (and, in the first run, 3e-4) leaves it visibly under-trained:
    under Adam the class-embedding rows grow by about lr per element per step, and class
    conditioning was the bottleneck;
  * batch 16 instead of 256: at patch 2 (256 tokens per image) a step of 16 images takes 0.4 s on
    two CPU cores, so a 45-minute budget buys ~6,500 steps of 16 images (batch 32 would halve that);
  * EMA decay 0.999 instead of 0.9999, with the warm-up min(decay, (1+t)/(10+t)): the EMA must
    forget the initialisation within a run of a few thousand steps (0.9999 averages over ~10000
    steps, longer than the whole run; 0.999 over the last ~1000);
  * gradient-norm clipping at 1.0: guards the short, relatively high-lr run against vb-term spikes;
  * class-embedding table initialised with std 1.0 instead of 0.02 (--class-init-std): with 0.02 the
    class rows (norm ~0.3) are drowned by the timestep embedding (norm 20-35) in c = t + y, and in a
    few thousand steps the model never learns to use the label (measured at t = 500: the mean
    squared change of eps between label and null label was 2.7e-5 after 1,000 steps; with std 1.0
    it was 7.8e-4 after 400 steps; a 10x learning rate on the table instead gave 4.7e-5).

Training stops at --steps (the reproducible stop) or, as a safety cap, after --max-minutes of wall
time, whichever comes first. Every --ckpt-every steps a full
checkpoint (model, EMA, optimizer, RNG, step) goes to --work-dir, and `--resume` continues from it.

Outputs:
  * --out: EMA weights only, official DiT state-dict names, float32 safetensors, written atomically,
    with metadata format / dit_config / icdit_space / icdit_class_names / icdit_training;
  * --log-csv: one row per --log-every steps (mean loss terms over those steps);
  * --work-dir/preview_XXXXXX.png: EMA sample grids during training (one row per class).

Example (the command used for weights/icdit-shapes-32.safetensors is in weights/README.md):
  python tools/train_default_model.py --max-minutes 40
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import pathlib
import sys
import time

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from dit_torch import DiT, DiTConfig, Diffusion  # noqa: E402
import make_dataset  # noqa: E402


def lr_factor(args: argparse.Namespace, step: int) -> float:
    """The learning rate at `step` over --lr: linear warm-up, then constant or a cosine decay that
    reaches --lr-final-frac at --steps (so a run's schedule is fixed by its command line)."""
    if step < args.warmup:
        return (step + 1) / max(1, args.warmup)
    if args.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.lr_final_frac + (1.0 - args.lr_final_frac) * 0.5 * (1.0 + math.cos(math.pi * progress))


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="weights/icdit-shapes-32.safetensors")
    ap.add_argument("--log-csv", default="docs/training/shapes32-loss.csv")
    ap.add_argument("--work-dir", default="/tmp/icdit-train")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--init-from", metavar="SAFETENSORS", default=None,
                    help="start from these weights (official layout, e.g. the bundled model's EMA) "
                         "instead of the random initialisation; the optimizer starts fresh")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-count", type=int, default=40000)
    ap.add_argument("--data-version", type=int, default=make_dataset.VERSION, choices=make_dataset.VERSIONS,
                    help="shapes-32 version (3: class 7 is a star; the bundled model's first three runs)")
    ap.add_argument("--data-cache", default=None,
                    help="npz cache of the dataset (default ~/.cache/icdit/ + make_dataset.cache_name)")
    ap.add_argument("--hidden", type=int, default=144)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--patch", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--lr-schedule", choices=["constant", "cosine"], default="cosine",
                    help="after the warm-up: constant lr, or a cosine decay to --lr-final-frac·lr at --steps")
    ap.add_argument("--lr-final-frac", type=float, default=0.05)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--class-init-std", type=float, default=1.0,
                    help="std of the class-embedding table at init (DiT: 0.02)")
    ap.add_argument("--class-lr-mult", type=float, default=1.0,
                    help="learning-rate multiplier for the class-embedding table (DiT: 1)")
    ap.add_argument("--steps", type=int, default=6500)
    ap.add_argument("--max-minutes", type=float, default=180.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu",
                    help="torch device for the model (e.g. cuda); data order, t and noise are still drawn "
                         "on the CPU from the seeded generator, so the run is the same draw on any device")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--ckpt-every", type=int, default=500)
    ap.add_argument("--preview-every", type=int, default=1000)
    ap.add_argument("--plot-loss", metavar="PNG", default=None,
                    help="only plot --log-csv to this PNG (needs matplotlib) and exit")
    return ap.parse_args()


def plot_loss(csv_path: str, png_path: str) -> None:
    """Loss curve (log scale): total, mse and vb per logged interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(open(csv_path)))
    step = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    for key in ("loss", "mse", "vb"):
        ax.plot(step, [float(r[key]) for r in rows], label=key, lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("mean per interval")
    ax.set_title("icdit-shapes-32 training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)


@torch.no_grad()
def preview(ema: DiT, path: str, per_class: int = 4, steps: str = "ddim25", cfg: float = 4.0, seed: int = 1) -> None:
    """One row per class, `per_class` seeds each, DDIM for speed."""
    g = torch.Generator().manual_seed(seed)
    k = ema.cfg.num_classes
    labels = torch.arange(k).repeat_interleave(per_class)
    z = torch.randn(len(labels), ema.cfg.in_channels, ema.cfg.input_size, ema.cfg.input_size, generator=g)
    x = Diffusion(steps).sample(ema, z, labels, cfg_scale=cfg, method="ddim", generator=g)
    img = ((x.clamp(-1, 1) + 1) * 127.5 + 0.5).floor().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    make_dataset.save_grid(img, k, path)


def save_weights(ema: DiT, path: str, meta: dict) -> None:
    from safetensors.torch import save_file

    sd = {k: v.detach().float().cpu().contiguous().clone() for k, v in ema.state_dict().items()}
    tmp = path + ".tmp"
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, tmp, metadata=meta)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def main() -> None:
    args = parse_args()
    if args.plot_loss:
        plot_loss(args.log_csv, args.plot_loss)
        return
    if args.preview_every:
        try:  # the previews are PNGs written with Pillow: fail now, not at the first preview
            import PIL  # noqa: F401
        except ImportError:
            sys.exit("train_default_model.py: previews need Pillow (pip install pillow), or pass --preview-every 0")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work = pathlib.Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)

    t_data = time.time()
    cache = args.data_cache or f"~/.cache/icdit/{make_dataset.cache_name(args.data_count, args.seed, args.data_version)}"
    imgs, labels = make_dataset.load_or_make(args.data_count, args.seed, cache, args.data_version)
    data = torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()
    data_y = torch.from_numpy(labels)
    print(f"data: {len(data)} images in {time.time() - t_data:.1f}s", flush=True)

    cfg = DiTConfig(input_size=32, patch_size=args.patch, in_channels=3, hidden_size=args.hidden,
                    depth=args.depth, num_heads=args.heads, mlp_ratio=4.0, class_dropout_prob=0.1,
                    num_classes=len(make_dataset.CLASS_NAMES), learn_sigma=True)
    device = torch.device(args.device)
    model = DiT(cfg)
    ema = DiT(cfg)
    ema.load_state_dict(model.state_dict())
    ema.eval().requires_grad_(False)
    nparams = sum(p.numel() for p in model.state_dict().values())
    torch.nn.init.normal_(model.y_embedder.embedding_table.weight, std=args.class_init_std)
    init_training = None
    if args.init_from:
        from safetensors import safe_open

        with safe_open(args.init_from, "pt") as f:  # weights, and the file's own training record
            model.load_state_dict({k: f.get_tensor(k) for k in f.keys()}, strict=True)
            init_training = json.loads((f.metadata() or {}).get("icdit_training", "null"))
        print(f"init: weights from {args.init_from}", flush=True)
    ema.load_state_dict(model.state_dict())
    model.to(device)
    ema.to(device)
    table = model.y_embedder.embedding_table.weight
    rest = [p for p in model.parameters() if p is not table]
    opt = torch.optim.AdamW([{"params": rest, "mult": 1.0}, {"params": [table], "mult": args.class_lr_mult}],
                            lr=args.lr, weight_decay=0.0)
    diffusion = Diffusion()
    gen = torch.Generator().manual_seed(args.seed + 1)   # data order, t and noise

    step, wall_before = 0, 0.0
    ckpt_path = work / "checkpoint.pt"
    if args.resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=False, map_location=device)
        model.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["opt"])
        gen.set_state(ck["gen"].cpu())
        torch.set_rng_state(ck["torch_rng"].cpu())
        step, wall_before = ck["step"], ck["wall"]
        print(f"resumed at step {step}", flush=True)
    print(f"config {cfg.to_json()}  params {nparams:,}", flush=True)

    new_csv = not (args.resume and os.path.exists(args.log_csv))
    pathlib.Path(args.log_csv).parent.mkdir(parents=True, exist_ok=True)
    csv_f = open(args.log_csv, "w" if new_csv else "a", newline="")
    log = csv.writer(csv_f)
    if new_csv:
        log.writerow(["step", "wall_s", "lr", "loss", "mse", "vb", "grad_norm"])

    def save_checkpoint() -> None:
        tmp = work / "checkpoint.pt.tmp"
        torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                    "gen": gen.get_state(), "torch_rng": torch.get_rng_state(), "step": step,
                    "wall": time.time() - t0, "args": vars(args)}, tmp)
        os.replace(tmp, ckpt_path)

    t0 = time.time() - wall_before
    acc = {"loss": 0.0, "mse": 0.0, "vb": 0.0, "gn": 0.0, "n": 0}
    perm, pos = torch.randperm(len(data), generator=gen), 0
    last_loss = float("nan")
    model.train()
    while step < args.steps and (time.time() - t0) < args.max_minutes * 60:
        if pos + args.batch > len(perm):
            perm, pos = torch.randperm(len(data), generator=gen), 0
        idx = perm[pos: pos + args.batch]
        pos += args.batch
        x0, y = data[idx], data_y[idx]
        k = torch.randint(0, diffusion.num_timesteps, (len(idx),), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        x0, y, k, noise = x0.to(device), y.to(device), k.to(device), noise.to(device)

        lr = args.lr * lr_factor(args, step)
        for group in opt.param_groups:
            group["lr"] = lr * group["mult"]
        terms = diffusion.training_losses(model, x0, k, y, noise)
        loss = terms["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        # EMA with the usual warm-up, decay_t = min(decay, (1 + t)/(10 + t)): a plain 0.999 EMA still
        # holds 0.999^1000 = 37% of the (zero-output) initial weights after 1000 steps, which makes
        # early previews pure noise; with the warm-up the EMA tracks the model from the start.
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.mul_(decay).add_(pm.detach(), alpha=1 - decay)
        step += 1

        acc["loss"] += loss.item()
        acc["mse"] += terms["mse"].mean().item()
        acc["vb"] += terms["vb"].mean().item()
        acc["gn"] += float(gn)
        acc["n"] += 1
        if step % args.log_every == 0:
            n = acc["n"]
            last_loss = acc["loss"] / n
            wall = time.time() - t0
            log.writerow([step, f"{wall:.1f}", f"{lr:.3g}", f"{last_loss:.5f}", f"{acc['mse'] / n:.5f}",
                          f"{acc['vb'] / n:.5f}", f"{acc['gn'] / n:.4f}"])
            csv_f.flush()
            print(f"step {step} wall {wall:.0f}s loss {last_loss:.4f} mse {acc['mse'] / n:.4f} "
                  f"vb {acc['vb'] / n:.4f} |g| {acc['gn'] / n:.3f}", flush=True)
            acc = {"loss": 0.0, "mse": 0.0, "vb": 0.0, "gn": 0.0, "n": 0}
        if step % args.ckpt_every == 0:
            save_checkpoint()
        if args.preview_every and step % args.preview_every == 0:
            preview(copy.deepcopy(ema).cpu(), str(work / f"preview_{step:06d}.png"))

    wall = time.time() - t0
    save_checkpoint()  # so that `--resume` can continue from exactly here
    training = {
        "steps": step, "batch": args.batch, "lr": args.lr, "warmup_steps": args.warmup,
        "lr_schedule": args.lr_schedule if args.lr_schedule == "constant"
        else f"cosine to {args.lr_final_frac} x lr at step {args.steps}",
        "optimizer": "AdamW(weight_decay=0)", "grad_clip": args.clip, "class_init_std": args.class_init_std, "class_lr_mult": args.class_lr_mult, "ema_decay": args.ema, "ema_warmup": "min(decay, (1+t)/(10+t))",
        "init_from": args.init_from and os.path.basename(args.init_from),
        "init_training": init_training,
        "seed": args.seed, "data": f"shapes-32 v{args.data_version} ({args.data_count} images, seed {args.seed})",
        "loss": "hybrid mse+vb, uniform t over 1000 linear-beta steps",
        "wall_time_s": round(wall, 1), "final_loss": round(last_loss, 5),
        "machine": (f"CPU, torch {torch.__version__}, {args.threads} threads" if device.type == "cpu"
                    else f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"),
    }
    meta = {
        "format": "pt",
        "dit_config": cfg.to_json(),
        "icdit_space": "pixel",
        "icdit_class_names": json.dumps(make_dataset.class_names(args.data_version)),
        "icdit_training": json.dumps(training),
        # Defaults `icdit sample` uses for this model when no flags are given: fast enough to
        # run in seconds on a CPU (DiT's own default is DDPM over 250 steps).
        "icdit_sampling": json.dumps({"sampler": "ddim", "steps": 25, "cfg": 4.0}),
    }
    save_weights(ema, args.out, meta)
    csv_f.close()
    print(f"done: {step} steps in {wall / 60:.1f} min, final loss {last_loss:.4f}; wrote {args.out}", flush=True)
    print(json.dumps(training), flush=True)


if __name__ == "__main__":
    main()
