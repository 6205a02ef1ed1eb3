#!/usr/bin/env python3
"""PyTorch CPU timing of the SD-VAE decoder at 256 x 256 output (latent B x 4 x 32 x 32).

    python3 tools/bench_vae_pytorch.py --threads 2 --iters 3 [--json]
    python3 tools/bench_vae_pytorch.py --iters 1 --save-weights /tmp/vae256 \\
        --save-latents /tmp/vae256/latents.safetensors --save-decoded /tmp/vae256/decoded.safetensors

The model is diffusers' AutoencoderKL with the real sd-vae-ft-ema / sd-vae-ft-mse architecture
(dit-reference.md F.1: block_out_channels [128, 256, 512, 512], layers_per_block 2,
norm_num_groups 32, latent_channels 4) and seeded random weights drawn as in
make_vae_fixtures.py (GroupNorm 1 + 0.1 N, conv/linear N(0, 1/fan_in), so activations stay
finite and no kernel meets zeros or denormals). It runs float32, eager, under
torch.inference_mode(), and times `vae.decode(latents / 0.18215).sample`, DiT's call.

Cost: 311.09 GMAC per image (dit-reference.md G.3; GroupNorm, SiLU and softmax not counted),
so one decode is several seconds on a few cores.

--save-weights/--save-latents/--save-decoded write the same random model (diffusers folder:
config.json + diffusion_pytorch_model.safetensors, full state dict, ~335 MB), its latents
(`latents` f32 [B, 4, 32, 32]) and the decode of the last timed iteration (`decoded` f32
[B, 3, 256, 256]) so the Rust decoder can be checked at full size against the same weights.
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_vae_fixtures import DEFAULT_SCALING_FACTOR, LATENT_STD, build_vae  # noqa: E402

MACS_PER_IMAGE = 311.09e9  # dit-reference.md G.3, batch 1, 256 x 256 output

SD_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, act_fn="silu",
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32,
    sample_size=256, scaling_factor=DEFAULT_SCALING_FACTOR, use_post_quant_conv=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed decodes first (default 1)")
    ap.add_argument("--iters", type=int, default=3, help="timed decodes (default 3)")
    ap.add_argument("--batch", type=int, default=1, help="images per decode (default 1)")
    ap.add_argument("--latent", type=int, default=32, help="latent side (default 32 -> 256x256 output)")
    ap.add_argument("--seed", type=int, default=0, help="weights use seed, latents seed + 1 (default 0)")
    ap.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    ap.add_argument("--save-weights", metavar="DIR", help="write the random model as a diffusers folder")
    ap.add_argument("--save-latents", metavar="FILE", help="write `latents` f32 [B, 4, 32, 32]")
    ap.add_argument("--save-decoded", metavar="FILE", help="write `decoded` f32 [B, 3, 256, 256]")
    args = ap.parse_args()
    if args.iters < 1 or args.warmup < 0 or args.batch < 1 or args.threads < 1:
        ap.error("--iters, --batch and --threads must be >= 1, --warmup >= 0")

    torch.set_num_threads(args.threads)
    import diffusers
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    vae = build_vae(SD_VAE_CONFIG, args.seed)
    build_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(args.seed + 1)
    latents = torch.randn(args.batch, 4, args.latent, args.latent, generator=g) * LATENT_STD
    sf = vae.config.scaling_factor

    if args.save_weights:
        vae.save_pretrained(args.save_weights, safe_serialization=True)
    for path in (args.save_latents, args.save_decoded):
        if path and os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
    if args.save_latents:
        save_file({"latents": latents.contiguous()}, args.save_latents, metadata={"format": "pt"})

    times = []
    with torch.inference_mode():
        for i in range(args.warmup + args.iters):
            t = time.perf_counter()
            out = vae.decode(latents / sf).sample
            dt = time.perf_counter() - t
            if i >= args.warmup:
                times.append(dt)
    if not torch.isfinite(out).all():
        raise RuntimeError("decode produced non-finite values")
    if args.save_decoded:
        save_file({"decoded": out.contiguous()}, args.save_decoded, metadata={"format": "pt"})

    med, best = statistics.median(times), min(times)
    macs = MACS_PER_IMAGE if args.latent == 32 else None  # the reference doc counts the 256-px decode
    res = dict(bench=f"sd_vae_decode_{args.latent * 8}_pytorch_cpu", latent=args.latent, batch=args.batch,
               threads=args.threads,
               warmup=args.warmup, iters=args.iters, median_ms=round(med * 1e3, 3), min_ms=round(best * 1e3, 3),
               macs_per_image=macs, gmac_per_s=round(args.batch * macs / med / 1e9, 3) if macs else None,
               torch=torch.__version__, diffusers=diffusers.__version__, dtype="float32",
               out_std=round(out.std().item(), 4))
    if args.json:
        print(json.dumps(res, sort_keys=True))
    else:
        print(f"SD-VAE decode 256x256, batch {args.batch}, {args.threads} threads, torch {torch.__version__}, "
              f"diffusers {diffusers.__version__} (model built in {build_s:.1f} s)")
        rate = f"{res['gmac_per_s']:.1f} GMAC/s at {MACS_PER_IMAGE / 1e9:.2f} GMAC/image; " if macs else ""
        print(f"  median {res['median_ms']:.1f} ms, min {res['min_ms']:.1f} ms over {args.iters} iters "
              f"({args.warmup} warmup); {rate}output std {res['out_std']}")


if __name__ == "__main__":
    main()
