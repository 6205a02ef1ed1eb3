#!/usr/bin/env python3
"""Convert an official PixArt-α checkpoint (PixArt-alpha/PixArt-alpha's `.pth`) to a diffusers-
layout pipeline folder icdit reads (model_index.json, transformer/, scheduler/).

    python3 tools/convert_pixart_checkpoint.py PixArt-XL-2-512x512.pth OUT_DIR [--dtype f16]
    python3 tools/convert_pixart_checkpoint.py --to-official PIPELINE_DIR OUT.pth   # the reverse
    python3 tools/convert_pixart_checkpoint.py --self-test

The official files hold {"state_dict": {...}} (also accepted: a plain state dict, an "ema"
entry, a DDP "module." prefix). Key mapping (official → diffusers):

    x_embedder.proj                    → pos_embed.proj
    t_embedder.mlp.{0,2}               → adaln_single.emb.timestep_embedder.linear_{1,2}
    t_block.1                          → adaln_single.linear
    csize_embedder.mlp.{0,2}           → adaln_single.emb.resolution_embedder.linear_{1,2}   (MS)
    ar_embedder.mlp.{0,2}              → adaln_single.emb.aspect_ratio_embedder.linear_{1,2} (MS)
    y_embedder.y_proj.fc{1,2}          → caption_projection.linear_{1,2}
    blocks.i.scale_shift_table         → transformer_blocks.i.scale_shift_table
    blocks.i.attn.qkv (rows q|k|v)     → transformer_blocks.i.attn1.to_{q,k,v}
    blocks.i.attn.proj                 → transformer_blocks.i.attn1.to_out.0
    blocks.i.cross_attn.q_linear       → transformer_blocks.i.attn2.to_q
    blocks.i.cross_attn.kv_linear (k|v)→ transformer_blocks.i.attn2.to_{k,v}
    blocks.i.cross_attn.proj           → transformer_blocks.i.attn2.to_out.0
    blocks.i.mlp.fc{1,2}               → transformer_blocks.i.ff.net.{0.proj,2}
    final_layer.linear                 → proj_out
    final_layer.scale_shift_table      → scale_shift_table

Dropped: `pos_embed` (a fixed sin-cos table; icdit computes it — the stored one is checked
against that formula when it is not all zeros, which also recovers the interpolation scale)
and `y_embedder.y_embedding` (the learned null caption of training's caption dropout; the
pipeline guides with the encoded negative prompt instead). The config comes from the shapes;
the head count, which no shape carries, is 16 for the released hidden size 1152 (else
--num-heads); the micro-conditions are on when csize_embedder/ar_embedder are present; the
sample size is read from `pos_embed` or --image-size. The folder has no text encoder, tokenizer
or VAE: copy text_encoder/, tokenizer/ and vae/ from a diffusers PixArt-α folder (or use
`--prompt-embeds` / `--out-latents`).
"""

import argparse
import json
import math
import os
import re
import sys
import tempfile

import numpy as np
import torch
from safetensors.torch import load_file, save_file

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
HEADS_BY_HIDDEN = {1152: 16}
# PixArt-XL-2-512x512's scheduler config (the values icdit checks).
SCHEDULER = {
    "_class_name": "DPMSolverMultistepScheduler",
    "algorithm_type": "dpmsolver++",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "solver_order": 2,
    "solver_type": "midpoint",
    "steps_offset": 0,
    "thresholding": False,
    "timestep_spacing": "linspace",
    "trained_betas": None,
}
MODEL_INDEX = {
    "_class_name": "PixArtAlphaPipeline",
    "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
    "transformer": ["diffusers", "PixArtTransformer2DModel"],
}


class ConvertError(Exception):
    pass


def load_official(path):
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise ConvertError(f"{path}: expected a state dict, found {type(obj).__name__}")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    bad = [k for k, v in obj.items() if not torch.is_tensor(v)]
    if bad:
        raise ConvertError(f"{path}: non-tensor entries {bad[:5]}")
    return obj


# (official prefix, diffusers prefix) of the one-to-one linears outside the blocks.
GLOBAL_LINEARS = [
    ("x_embedder.proj", "pos_embed.proj"),
    ("t_embedder.mlp.0", "adaln_single.emb.timestep_embedder.linear_1"),
    ("t_embedder.mlp.2", "adaln_single.emb.timestep_embedder.linear_2"),
    ("t_block.1", "adaln_single.linear"),
    ("y_embedder.y_proj.fc1", "caption_projection.linear_1"),
    ("y_embedder.y_proj.fc2", "caption_projection.linear_2"),
    ("final_layer.linear", "proj_out"),
]
MICRO_LINEARS = [
    ("csize_embedder.mlp.0", "adaln_single.emb.resolution_embedder.linear_1"),
    ("csize_embedder.mlp.2", "adaln_single.emb.resolution_embedder.linear_2"),
    ("ar_embedder.mlp.0", "adaln_single.emb.aspect_ratio_embedder.linear_1"),
    ("ar_embedder.mlp.2", "adaln_single.emb.aspect_ratio_embedder.linear_2"),
]
# Per block: (official, diffusers) one-to-one linears; qkv and kv are split.
BLOCK_LINEARS = [
    ("attn.proj", "attn1.to_out.0"),
    ("cross_attn.q_linear", "attn2.to_q"),
    ("cross_attn.proj", "attn2.to_out.0"),
    ("mlp.fc1", "ff.net.0.proj"),
    ("mlp.fc2", "ff.net.2"),
]


def depth_of(keys, pattern):
    ids = sorted({int(m.group(1)) for k in keys for m in [re.match(pattern, k)] if m})
    if not ids or ids != list(range(len(ids))):
        raise ConvertError(f"block indices are not 0..N-1: {ids[:10]}")
    return len(ids)


def pos_table(c, grid, base, scale):
    """The official / diffusers 2-D sin-cos table for a square grid (float64, then float32)."""
    pos = np.arange(grid, dtype=np.float32) / (grid / base) / scale
    omega = 1.0 / 10000 ** (np.arange(c // 4, dtype=np.float64) / (c / 4.0))
    out = np.einsum("m,d->md", pos.astype(np.float64), omega)
    one = np.concatenate([np.sin(out), np.cos(out)], axis=1)  # (grid, C/2)
    col = np.tile(one, (grid, 1))  # token (i, j) → column j
    row = np.repeat(one, grid, axis=0)  # → row i
    return np.concatenate([col, row], axis=1).astype(np.float32)


def to_diffusers(sd, image_size=None, num_heads=None):
    """The diffusers state dict and config.json of an official state dict."""
    sd = dict(sd)
    out = {}

    def take(key):
        if key not in sd:
            raise ConvertError(f"missing tensor {key!r}")
        return sd.pop(key)

    def move(src, dst):
        for part in ("weight", "bias"):
            out[f"{dst}.{part}"] = take(f"{src}.{part}")

    micro = any(k.startswith("csize_embedder.") or k.startswith("ar_embedder.") for k in sd)
    for src, dst in GLOBAL_LINEARS + (MICRO_LINEARS if micro else []):
        move(src, dst)
    out["scale_shift_table"] = take("final_layer.scale_shift_table")
    depth = depth_of(sd, r"blocks\.(\d+)\.")
    for i in range(depth):
        b, t = f"blocks.{i}.", f"transformer_blocks.{i}."
        out[t + "scale_shift_table"] = take(b + "scale_shift_table")
        for part in ("weight", "bias"):
            for name, chunk in zip(("to_q", "to_k", "to_v"), torch.chunk(take(f"{b}attn.qkv.{part}"), 3, dim=0)):
                out[f"{t}attn1.{name}.{part}"] = chunk.contiguous()
            for name, chunk in zip(("to_k", "to_v"), torch.chunk(take(f"{b}cross_attn.kv_linear.{part}"), 2, dim=0)):
                out[f"{t}attn2.{name}.{part}"] = chunk.contiguous()
        for src, dst in BLOCK_LINEARS:
            move(b + src, t + dst)
    pos = sd.pop("pos_embed", None)
    sd.pop("y_embedder.y_embedding", None)
    if sd:
        raise ConvertError(f"unexpected tensors: {sorted(sd)[:10]}")

    c, cin, p, _ = out["pos_embed.proj.weight"].shape
    heads = num_heads or HEADS_BY_HIDDEN.get(c)
    if heads is None or c % heads:
        raise ConvertError(f"hidden size {c}: pass --num-heads (the head count is not stored in the checkpoint)")
    if pos is not None:
        n = pos.shape[-2]
        grid = math.isqrt(n)
        if grid * grid != n:
            raise ConvertError(f"pos_embed: {n} tokens is not a square grid")
        sample_size = grid * p
        if image_size and image_size // 8 != sample_size:
            raise ConvertError(f"--image-size {image_size} but pos_embed is for {sample_size * 8}")
    elif image_size:
        sample_size = image_size // 8
    else:
        raise ConvertError("no pos_embed to read the sample size from: pass --image-size")
    scale = float(max(sample_size // 64, 1))
    if pos is not None and pos.abs().max() > 0:
        grid = sample_size // p
        table = pos.reshape(-1, c).float().numpy()
        fits = [s for s in (scale, 0.5, 1.0, 2.0, 3.0, 4.0) if np.abs(pos_table(c, grid, grid, s) - table).max() < 1e-5]
        if not fits:
            raise ConvertError("pos_embed is not the 2-D sin-cos table at any interpolation scale 0.5 to 4")
        scale = fits[0]
    out_channels = out["proj_out.weight"].shape[0] // (p * p)
    config = {
        "_class_name": "PixArtTransformer2DModel",
        "activation_fn": "gelu-approximate",
        "attention_bias": True,
        "attention_head_dim": c // heads,
        "caption_channels": out["caption_projection.linear_1.weight"].shape[1],
        "cross_attention_dim": c,
        "in_channels": cin,
        "interpolation_scale": scale,
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,
        "norm_type": "ada_norm_single",
        "num_attention_heads": heads,
        "num_embeds_ada_norm": 1000,
        "num_layers": depth,
        "out_channels": out_channels,
        "patch_size": p,
        "sample_size": sample_size,
        "use_additional_conditions": micro,
    }
    return out, config


def to_official(sd, config):
    """The reverse mapping (for tests): a diffusers state dict and config → official keys,
    with the sin-cos pos_embed and a zero y_embedding (120 tokens) as the official model saves."""
    sd = dict(sd)
    out = {}
    for src, dst in GLOBAL_LINEARS + (MICRO_LINEARS if config.get("use_additional_conditions") else []):
        for part in ("weight", "bias"):
            out[f"{src}.{part}"] = sd.pop(f"{dst}.{part}")
    out["final_layer.scale_shift_table"] = sd.pop("scale_shift_table")
    for i in range(config["num_layers"]):
        b, t = f"blocks.{i}.", f"transformer_blocks.{i}."
        out[b + "scale_shift_table"] = sd.pop(t + "scale_shift_table")
        for part in ("weight", "bias"):
            out[f"{b}attn.qkv.{part}"] = torch.cat([sd.pop(f"{t}attn1.{n}.{part}") for n in ("to_q", "to_k", "to_v")])
            out[f"{b}cross_attn.kv_linear.{part}"] = torch.cat([sd.pop(f"{t}attn2.{n}.{part}") for n in ("to_k", "to_v")])
            for src, dst in BLOCK_LINEARS:
                out[f"{b}{src}.{part}"] = sd.pop(f"{t}{dst}.{part}")
    if sd:
        raise ConvertError(f"unexpected diffusers tensors: {sorted(sd)[:10]}")
    c = config["num_attention_heads"] * config["attention_head_dim"]
    grid = config["sample_size"] // config["patch_size"]
    scale = config.get("interpolation_scale") or max(config["sample_size"] // 64, 1)
    out["pos_embed"] = torch.from_numpy(pos_table(c, grid, grid, scale)).unsqueeze(0)
    out["y_embedder.y_embedding"] = torch.zeros(120, config["caption_channels"])
    return out


def write_pipeline(sd, config, out_dir, dtype="f32"):
    """model_index.json, scheduler/ and transformer/ (config + one safetensors), written to a
    temporary folder first and renamed into place."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".convert-")
    os.makedirs(os.path.join(tmp, "transformer"))
    os.makedirs(os.path.join(tmp, "scheduler"))
    save_file({k: v.to(DTYPES[dtype]).contiguous() for k, v in sorted(sd.items())},
              os.path.join(tmp, "transformer", "diffusion_pytorch_model.safetensors"))
    for rel, obj in [("transformer/config.json", config), ("scheduler/scheduler_config.json", SCHEDULER),
                     ("model_index.json", MODEL_INDEX)]:
        with open(os.path.join(tmp, rel), "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
    if os.path.exists(out_dir):
        raise ConvertError(f"{out_dir} exists; remove it or choose another folder")
    os.rename(tmp, out_dir)


def self_test():
    """The sin-cos table equals diffusers' get_2d_sincos_pos_embed (the official formula at the
    trained size); tiny random diffusers models (with and without micro-conditions) → official →
    back: every tensor and the config round-trip exactly, the diffusers forward of the converted
    model equals the original's, and a wrong stored table is refused."""
    from diffusers import PixArtTransformer2DModel
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    for c, grid, scale in [(24, 4, 1.0), (1152, 32, 1.0), (1152, 64, 2.0), (48, 6, 0.5)]:
        want = get_2d_sincos_pos_embed(c, grid, base_size=grid, interpolation_scale=scale, output_type="pt")
        assert np.abs(pos_table(c, grid, grid, scale) - want.float().numpy()).max() < 1e-6, (c, grid, scale)

    base = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=2, num_attention_heads=2,
                attention_head_dim=12, caption_channels=16, cross_attention_dim=24, norm_type="ada_norm_single")
    for micro in (False, True):
        torch.manual_seed(0)
        m = PixArtTransformer2DModel(**base, use_additional_conditions=micro).eval()
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.randn(p.shape) * 0.1)
        cfg = {k: v for k, v in m.config.items() if not k.startswith("_")}
        official = to_official(m.state_dict(), cfg)
        with tempfile.TemporaryDirectory() as d:
            torch.save({"state_dict": official}, os.path.join(d, "x.pth"))
            sd, config = to_diffusers(load_official(os.path.join(d, "x.pth")), num_heads=2)
            write_pipeline(sd, config, os.path.join(d, "pipe"))
            back = load_file(os.path.join(d, "pipe", "transformer", "diffusion_pytorch_model.safetensors"))
            ref = m.state_dict()
            assert sorted(back) == sorted(ref), set(back) ^ set(ref)
            assert all(torch.equal(back[k], ref[k]) for k in ref)
            m2 = PixArtTransformer2DModel.from_pretrained(os.path.join(d, "pipe", "transformer")).eval()
            assert m2.config.use_additional_conditions == micro and m2.config.interpolation_scale == 1.0
            x, t, e = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, 5, 16)
            cond = {"resolution": torch.tensor([[64.0, 64.0]] * 2), "aspect_ratio": torch.ones(2, 1)} if micro else None
            with torch.no_grad():
                a = m(x, encoder_hidden_states=e, timestep=t, added_cond_kwargs=cond, return_dict=False)[0]
                b = m2(x, encoder_hidden_states=e, timestep=t, added_cond_kwargs=cond, return_dict=False)[0]
            assert torch.equal(a, b)
            # A wrong stored table is refused.
            bad = dict(official, pos_embed=official["pos_embed"] * 1.01)
            try:
                to_diffusers(bad, num_heads=2)
                raise AssertionError("a wrong pos_embed was accepted")
            except ConvertError as err:
                assert "pos_embed" in str(err)
        print(f"self-test ({'with' if micro else 'without'} micro-conditions): round trip exact, forward equal")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", nargs="?")
    ap.add_argument("dst", nargs="?")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="f32")
    ap.add_argument("--image-size", type=int, choices=[256, 512, 1024])
    ap.add_argument("--num-heads", type=int)
    ap.add_argument("--to-official", action="store_true", help="diffusers pipeline folder SRC → official .pth DST")
    ap.add_argument("--self-test", action="store_true")
    a = ap.parse_args()
    try:
        if a.self_test:
            self_test()
        elif not (a.src and a.dst):
            ap.error("SRC and DST are required")
        elif a.to_official:
            with open(os.path.join(a.src, "transformer", "config.json")) as f:
                config = json.load(f)
            sd = load_file(os.path.join(a.src, "transformer", "diffusion_pytorch_model.safetensors"))
            torch.save({"state_dict": to_official(sd, config)}, a.dst)
        else:
            sd, config = to_diffusers(load_official(a.src), a.image_size, a.num_heads)
            write_pipeline(sd, config, a.dst, a.dtype)
            print(f"{a.src}: {config['num_layers']} blocks, hidden {config['cross_attention_dim']}, sample size "
                  f"{config['sample_size']}, micro-conditions {config['use_additional_conditions']} → {a.dst}")
    except ConvertError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
