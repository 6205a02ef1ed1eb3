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


def make_model(config=CONFIG, seed=1):
    """A random PixArtTransformer2DModel of `config` (every tiny fixture's: this one's, the 1024-MS
    one's, the whole pipeline's), its parameters drawn from `seed`."""
    torch.manual_seed(0)
    m = PixArtTransformer2DModel(**config).eval()
    # Redraw every parameter: the default init zeroes parts of the model (and so outputs).
    # The scale-shift tables are drawn at 1/√D of this fixture's caption width (24) in all.
    g = torch.Generator().manual_seed(seed)
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
    traj, x0s = [], []
    for i, t in enumerate(scheduler.timesteps):
        inp = torch.cat([x, x]) if guided else x
        eps = forward(m, inp, t.expand(inp.shape[0]), ehs, mask)
        if guided:
            u, c = eps.chunk(2)
            eps = u + cfg * (c - u)
        eps = eps.chunk(2, dim=1)[0]
        if isinstance(scheduler, DDIMScheduler):
            step = scheduler.step(eps, t, x)
            x, x0 = step.prev_sample, step.pred_original_sample
        else:
            # DPM-Solver++'s data prediction x̂₀ = (x − σ_t·ε)/α_t at this step's σ.
            sigma = scheduler.sigmas[i]
            alpha_t = 1.0 / (sigma**2 + 1.0) ** 0.5
            x0 = (x - sigma * alpha_t * eps) / alpha_t
            x = scheduler.step(eps, t, x, return_dict=False)[0]
        traj.append(x.clone())
        x0s.append(x0.clone())
    return scheduler.timesteps.clone(), torch.stack(traj), torch.stack(x0s)


CACHED = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_out.0",
          "ff.net.0.proj", "ff.net.2"]


def submodule(m, path):
    for part in path.split("."):
        m = getattr(m, part) if not part.isdigit() else m[int(part)]
    return m


class Caching:
    """Our caching definition written independently on diffusers' modules (reference doc,
    "Increment-calibrated caching on PixArt"): a full step runs the model and keeps every cached
    linear's input and output (icc) or every sublayer's output (reuse: attn1, attn2, ff); an icc
    step computes each cached linear as y_s + up·(down·(x − x_s)); a reuse step returns each
    sublayer's kept output (the block applies this step's gates)."""

    def __init__(self, model, policy, factors=None):
        self.mode = "full"
        self.kept = {}
        self.handles = []
        for i, block in enumerate(model.transformer_blocks):
            if policy == "icc":
                for name in CACHED:
                    key = f"transformer_blocks.{i}.{name}"
                    self.handles.append(submodule(block, name).register_forward_hook(self.linear_hook(key, factors)))
            else:
                for name in ["attn1", "attn2", "ff"]:
                    self.handles.append(submodule(block, name).register_forward_hook(self.output_hook(f"{i}.{name}")))

    def linear_hook(self, key, factors):
        up, down = factors[key + ".up"], factors[key + ".down"]

        def hook(module, args, output):
            x = args[0]
            if self.mode == "full":
                self.kept[key] = (x.clone(), output.clone())
                return output
            x_s, y_s = self.kept[key]
            return y_s + (x - x_s) @ down.T @ up.T

        return hook

    def output_hook(self, key):
        def hook(module, args, output):
            if self.mode == "full":
                self.kept[key] = output.clone()
                return output
            return self.kept[key]

        return hook


def sample_cached(m, steps, cfg, period, policy, factors, z, pos, pos_mask, neg, neg_mask):
    """The guided DPM-Solver++ loop with every `period`-th step full (from step 0)."""
    cache = Caching(m, policy, factors)
    scheduler = DPMSolverMultistepScheduler.from_config({k: v for k, v in SCHEDULER.items() if not k.startswith("_")})
    scheduler.set_timesteps(steps)
    x = z.clone()
    ehs, mask = torch.cat([neg, pos]), torch.cat([neg_mask, pos_mask])
    for index, t in enumerate(scheduler.timesteps):
        cache.mode = "full" if index % period == 0 else "cached"
        eps = forward(m, torch.cat([x, x]), t.expand(2 * x.shape[0]), ehs, mask)
        u, c = eps.chunk(2)
        eps = (u + cfg * (c - u)).chunk(2, dim=1)[0]
        x = scheduler.step(eps, t, x, return_dict=False)[0]
    for h in cache.handles:
        h.remove()
    return x


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
        ts, traj, x0s = sample(m, sch, steps, cfg, z, pos, pos_mask, negs, neg_masks)
        runs[f"{name}_timesteps"] = ts.to(torch.int64)
        runs[f"{name}_trajectory"] = traj
        runs[f"{name}_x0"] = x0s
    # DPM-Solver++ timesteps of the published 20-step default.
    sch = DPMSolverMultistepScheduler.from_config(base)
    sch.set_timesteps(20)
    runs["dpm20_timesteps"] = sch.timesteps.to(torch.int64)
    # Caching: random rank-4 factors (named after the layers), icc with period 3 and reuse
    # with period 2, 6 guided DPM-Solver++ steps.
    gf = torch.Generator().manual_seed(3)
    factors = {}
    for i in range(CONFIG["num_layers"]):
        for name in CACHED:
            w = submodule(m.transformer_blocks[i], name).weight
            out_f, in_f = w.shape
            factors[f"transformer_blocks.{i}.{name}.up"] = torch.randn(out_f, 4, generator=gf) / 2.0
            factors[f"transformer_blocks.{i}.{name}.down"] = torch.randn(4, in_f, generator=gf) / in_f**0.5
    save_file(factors, os.path.join(a.out, "factors_rank4.safetensors"))
    runs["icc_period3"] = sample_cached(m, 6, 4.5, 3, "icc", factors, z, pos, pos_mask, negs, neg_masks)
    runs["reuse_period2"] = sample_cached(m, 6, 4.5, 2, "reuse", None, z, pos, pos_mask, negs, neg_masks)
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
            "latents after each step (`*_trajectory`, [steps, B, C, H, W]), each step's x̂₀ (`*_x0`) and the timesteps of "
            "DPM-Solver++ 6 steps at guidance 4.5, 5 steps unguided, and DDIM 6 steps at 4.5; "
            "`dpm20_timesteps`: the 20-step default's; `icc_period3` / `reuse_period2`: the final latents of "
            "6 guided DPM-Solver++ steps under icc (random rank-4 factors `factors_rank4`, every 3rd step full) "
            "and reuse (every 2nd step full), the caching written independently with forward hooks on "
            "diffusers' modules.\n"
        )


if __name__ == "__main__":
    main()
