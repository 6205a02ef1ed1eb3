#!/usr/bin/env python3
"""A PixArt-α pipeline folder with random weights, for timing icdit's PixArt engine where no
checkpoint can be downloaded (the GPU check's machine): model_index.json, transformer/config.json,
transformer/diffusion_pytorch_model.safetensors (f16) and scheduler/scheduler_config.json, the
layout `icdit` loads. Needs only torch (the safetensors file is written here: an 8-byte header
length, the JSON header, the raw tensors), and tools/pixart_torch.py for the parameter names and
shapes, which equal diffusers'. Every weight is drawn from N(0, 0.02): the numbers mean nothing,
only the shapes and the time they take.

    python3 tools/make_random_pixart.py --sample-size 32 --out /tmp/pixart-256     # PixArt-XL-2-256x256
    python3 tools/make_random_pixart.py --sample-size 32 --out /tmp/pixart-256 --factors F.safetensors --rank 128
    python3 tools/make_random_pixart.py --sample-size 8 --layers 2 --heads 2 --caption-channels 64 --out D
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pixart_torch import PixArt, PixArtConfig  # noqa: E402

SCHEDULER = {
    "_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver++", "beta_end": 0.02,
    "beta_schedule": "linear", "beta_start": 0.0001, "num_train_timesteps": 1000, "prediction_type": "epsilon",
    "solver_order": 2, "solver_type": "midpoint", "lower_order_final": True, "thresholding": False,
    "timestep_spacing": "linspace", "steps_offset": 0,
}
# The linears icc caches on PixArt (docs/pixart.md), whose factors are `<name>.up` [out, r] and
# `<name>.down` [r, in].
CACHED = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_out.0",
          "ff.net.0.proj", "ff.net.2")
MODEL_INDEX = {"_class_name": "PixArtAlphaPipeline", "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
               "transformer": ["diffusers", "PixArtTransformer2DModel"]}


def write_safetensors(path: str, tensors: dict[str, torch.Tensor]) -> None:
    """f16 tensors in safetensors' layout, written to a temporary name and renamed."""
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        b = tensors[name].detach().to(torch.float16).contiguous().cpu().numpy().tobytes()
        header[name] = {"dtype": "F16", "shape": list(tensors[name].shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    tmp = path + ".partial"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--sample-size", type=int, default=32, help="latent side: 32 (256 px), 64 (512 px)")
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=72)
    ap.add_argument("--caption-channels", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--factors", help="also write random rank-R icc factors for every cached linear here")
    ap.add_argument("--rank", type=int, default=128)
    a = ap.parse_args()
    inner = a.heads * a.head_dim
    cfg = PixArtConfig(sample_size=a.sample_size, num_layers=a.layers, num_attention_heads=a.heads,
                       attention_head_dim=a.head_dim, caption_channels=a.caption_channels, cross_attention_dim=inner)
    torch.manual_seed(a.seed)
    model = PixArt(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    os.makedirs(os.path.join(a.out, "transformer"), exist_ok=True)
    os.makedirs(os.path.join(a.out, "scheduler"), exist_ok=True)
    config = {"_class_name": "PixArtTransformer2DModel", "sample_size": a.sample_size, "patch_size": 2,
              "in_channels": 4, "out_channels": 8, "num_layers": a.layers, "num_attention_heads": a.heads,
              "attention_head_dim": a.head_dim, "caption_channels": a.caption_channels,
              "cross_attention_dim": inner, "norm_type": "ada_norm_single", "norm_eps": 1e-6,
              "norm_elementwise_affine": False, "use_additional_conditions": False, "interpolation_scale": None,
              "activation_fn": "gelu-approximate", "attention_bias": True, "num_embeds_ada_norm": 1000,
              "upcast_attention": False, "only_cross_attention": False, "double_self_attention": False,
              "dropout": 0.0, "attention_type": "default"}
    with open(os.path.join(a.out, "transformer", "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    with open(os.path.join(a.out, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(SCHEDULER, f, indent=2, sort_keys=True)
    with open(os.path.join(a.out, "model_index.json"), "w") as f:
        json.dump(MODEL_INDEX, f, indent=2, sort_keys=True)
    write_safetensors(os.path.join(a.out, "transformer", "diffusion_pytorch_model.safetensors"), model.state_dict())
    if a.factors:
        sd, factors = model.state_dict(), {}
        for i in range(a.layers):
            for layer in CACHED:
                name = f"transformer_blocks.{i}.{layer}"
                out, inp = sd[name + ".weight"].shape
                factors[name + ".up"] = torch.randn(out, a.rank) * 0.02
                factors[name + ".down"] = torch.randn(a.rank, inp) * 0.02
        write_safetensors(a.factors, factors)
        print(f"make_random_pixart: {a.factors}: rank-{a.rank} factors of {len(factors) // 2} linears")
    print(f"make_random_pixart: {a.out}: {len(model.state_dict())} tensors, "
          f"{sum(t.numel() for t in model.state_dict().values()) / 1e6:.1f} M parameters (f16)")


if __name__ == "__main__":
    main()
