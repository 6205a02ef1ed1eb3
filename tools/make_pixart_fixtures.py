#!/usr/bin/env python3
"""Reference fixtures for icdit's PixArt-α support (tests/pixart.rs), made by diffusers.

A tiny random `PixArtTransformer2DModel` (norm_type ada_norm_single) saved as a diffusers
pipeline folder (model_index.json, transformer/, scheduler/), the same weights cast to f16
and bf16, the transformer's forward on random inputs with a partial caption mask, and whole
sampling runs (DPM-Solver++ 2M and DDIM, with and without guidance) driven by diffusers'
schedulers in the loop PixArtAlphaPipeline runs (guidance on all channels, then the
learned-variance half dropped).

    python3 tools/make_pixart_fixtures.py --out tests/fixtures/pixart

Runs on the CPU, one thread, deterministic algorithms.
"""

import argparse
import json
import os

import torch
from safetensors.torch import save_file
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PixArtTransformer2DModel
import diffusers

CONFIG = dict(
    sample_size=8,
    patch_size=2,
    in_channels=4,
    out_channels=8,
    num_layers=2,
    num_attention_heads=2,
    attention_head_dim=16,
    caption_channels=24,
    cross_attention_dim=32,
    norm_type="ada_norm_single",
)
# PixArt-XL-2-512x512's scheduler/scheduler_config.json, values that matter.
SCHEDULER = {
    "_class_name": "DPMSolverMultistepScheduler",
    "_diffusers_version": diffusers.__version__,
    "algorithm_type": "dpmsolver++",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "solver_order": 2,
    "solver_type": "midpoint",
    "lower_order_final": True,
    "thresholding": False,
    "trained_betas": None,
    "timestep_spacing": "linspace",
    "steps_offset": 0,
}
MODEL_INDEX = {
    "_class_name": "PixArtAlphaPipeline",
    "_diffusers_version": diffusers.__version__,
    "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
    "transformer": ["diffusers", "PixArtTransformer2DModel"],
}
L = 6  # caption tokens
D = CONFIG["caption_channels"]


def make_model():
    torch.manual_seed(0)
    m = PixArtTransformer2DModel(**CONFIG).eval()
    # Redraw every parameter: the default init zeroes parts of the model (and so outputs).
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("scale_shift_table"):
                p.copy_(torch.randn(p.shape, generator=g) / D**0.5)
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
    return m


def cast_copy(m, dtype):
    """The model with every weight rounded to `dtype`, computing in f32."""
    c = PixArtTransformer2DModel(**CONFIG).eval()
    c.load_state_dict({k: v.to(dtype).float() for k, v in m.state_dict().items()})
    return c


def save_pipeline(m, out, dtype, with_scheduler=True):
    os.makedirs(os.path.join(out, "transformer"), exist_ok=True)
    cfg = dict(m.config)
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    cfg["_class_name"] = "PixArtTransformer2DModel"
    cfg["_diffusers_version"] = diffusers.__version__
    with open(os.path.join(out, "transformer", "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    sd = {k: v.to(dtype).contiguous() for k, v in m.state_dict().items()}
    save_file(sd, os.path.join(out, "transformer", "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(out, "model_index.json"), "w") as f:
        json.dump(MODEL_INDEX, f, indent=2, sort_keys=True)
    if with_scheduler:
        os.makedirs(os.path.join(out, "scheduler"), exist_ok=True)
        with open(os.path.join(out, "scheduler", "scheduler_config.json"), "w") as f:
            json.dump(SCHEDULER, f, indent=2, sort_keys=True)


def forward(m, x, t, ehs, mask):
    with torch.no_grad():
        return m(x, encoder_hidden_states=ehs, timestep=t, encoder_attention_mask=mask, return_dict=False)[0]


def sample(m, scheduler, steps, cfg, z, pos, pos_mask, neg, neg_mask):
    """PixArtAlphaPipeline's denoising loop (guidance, variance half dropped, scheduler step)."""
    scheduler.set_timesteps(steps)
    x = z.clone()
    guided = cfg > 1.0
    ehs = torch.cat([neg, pos]) if guided else pos
    mask = torch.cat([neg_mask, pos_mask]) if guided else pos_mask
    traj = []
    for t in scheduler.timesteps:
        inp = torch.cat([x, x]) if guided else x
        eps = forward(m, inp, t.expand(inp.shape[0]), ehs, mask)
        if guided:
            u, c = eps.chunk(2)
            eps = u + cfg * (c - u)
        eps = eps.chunk(2, dim=1)[0]
        x = scheduler.step(eps, t, x, return_dict=False)[0]
        traj.append(x.clone())
    return scheduler.timesteps.clone(), torch.stack(traj)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/pixart")
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    m = make_model()
    save_pipeline(m, os.path.join(a.out, "tiny"), torch.float32)
    save_pipeline(m, os.path.join(a.out, "tiny_f16"), torch.float16, with_scheduler=False)
    save_pipeline(m, os.path.join(a.out, "tiny_bf16"), torch.bfloat16, with_scheduler=False)

    g = torch.Generator().manual_seed(2)
    c, s = CONFIG["in_channels"], CONFIG["sample_size"]
    x = torch.randn(2, c, s, s, generator=g)
    t = torch.tensor([999, 37], dtype=torch.int64)
    ehs = torch.randn(2, L, D, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.int64)
    inputs = dict(x=x, t=t, encoder_hidden_states=ehs, encoder_attention_mask=mask)
    save_file({k: v.contiguous() for k, v in inputs.items()}, os.path.join(a.out, "forward_in.safetensors"))
    refs = {
        "out": forward(m, x, t, ehs, mask),
        "out_f16": forward(cast_copy(m, torch.float16), x, t, ehs, mask),
        "out_bf16": forward(cast_copy(m, torch.bfloat16), x, t, ehs, mask),
    }
    save_file({k: v.contiguous() for k, v in refs.items()}, os.path.join(a.out, "forward_out.safetensors"))

    # Sampling: two images, their prompt embeddings (partial masks) and one negative prompt's
    # embeddings (`""` is one `</s>` token: mask [1, 0, …]), repeated per image as the pipeline does.
    z = torch.randn(2, c, s, s, generator=g)
    pos = torch.randn(2, L, D, generator=g)
    pos_mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.int64)
    neg = torch.randn(1, L, D, generator=g)
    neg_mask = torch.tensor([[1, 0, 0, 0, 0, 0]], dtype=torch.int64)
    save_file({"prompt_embeds": pos, "attention_mask": pos_mask}, os.path.join(a.out, "prompt_embeds.safetensors"))
    save_file({"prompt_embeds": neg, "attention_mask": neg_mask}, os.path.join(a.out, "negative_embeds.safetensors"))
    save_file({"z": z}, os.path.join(a.out, "noise.safetensors"))
    negs, neg_masks = neg.expand(2, L, D).contiguous(), neg_mask.expand(2, L).contiguous()
    runs = {}
    base = dict(SCHEDULER)
    del base["_class_name"], base["_diffusers_version"]
    for name, steps, cfg in [("dpm", 6, 4.5), ("dpm_unguided", 5, 1.0), ("ddim", 6, 4.5)]:
        if name.startswith("dpm"):
            sch = DPMSolverMultistepScheduler.from_config(base)
        else:
            sch = DDIMScheduler.from_config(base, clip_sample=False, set_alpha_to_one=False)
        ts, traj = sample(m, sch, steps, cfg, z, pos, pos_mask, negs, neg_masks)
        runs[f"{name}_timesteps"] = ts.to(torch.int64)
        runs[f"{name}_trajectory"] = traj
    # DPM-Solver++ timesteps of the published 20-step default.
    sch = DPMSolverMultistepScheduler.from_config(base)
    sch.set_timesteps(20)
    runs["dpm20_timesteps"] = sch.timesteps.to(torch.int64)
    save_file({k: v.contiguous() for k, v in runs.items()}, os.path.join(a.out, "sampling.safetensors"))
    with open(os.path.join(a.out, "README.md"), "w") as f:
        f.write(
            "# PixArt-α fixtures\n\nMade by `tools/make_pixart_fixtures.py` (do not edit by hand) with "
            f"diffusers {diffusers.__version__}, torch {torch.__version__}.\n\n"
            f"* `tiny/`: a random `PixArtTransformer2DModel(**{json.dumps(CONFIG)})` as a pipeline folder "
            "(model_index.json, transformer/, scheduler/ = PixArt's DPM-Solver++ config); `tiny_f16/`, "
            "`tiny_bf16/`: the same weights cast.\n"
            "* `forward_in` / `forward_out`: inputs x, t, encoder_hidden_states, encoder_attention_mask "
            "(image 0's mask is partial) and diffusers' outputs with the f32, f16 and bf16 weights.\n"
            "* `prompt_embeds`, `negative_embeds`, `noise`: a 2-image sampling request; `sampling`: the "
            "latents after each step (`*_trajectory`, [steps, B, C, H, W]) and the timesteps of "
            "DPM-Solver++ 6 steps at guidance 4.5, 5 steps unguided, and DDIM 6 steps at 4.5; "
            "`dpm20_timesteps`: the 20-step default's.\n"
        )


if __name__ == "__main__":
    main()
