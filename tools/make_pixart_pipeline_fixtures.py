#!/usr/bin/env python3
"""A whole tiny PixArt-α pipeline folder and what diffusers' PixArtAlphaPipeline samples with it
(tests/pixart_pipeline.rs): prompts in, latents out, through the T5 tokenizer and encoder.

Writes tests/fixtures/pixart_pipe/:
  model_index.json, scheduler/   as tests/fixtures/pixart/tiny (PixArt's DPM-Solver++ config)
  transformer/   a random PixArtTransformer2DModel as ../pixart/tiny's but with caption_channels
                 64, the width of the tiny T5 encoder (so prompts can drive it), and sample_size
                 32 (PixArt-XL-2-256x256's, so the pipeline's ASPECT_RATIO_256_BIN applies)
  vae/           a random tiny AutoencoderKL with 4 blocks (8× like PixArt-α's VAE), 8 channels
  text_encoder, tokenizer        symbolic links to ../t5/text_encoder and ../t5/tokenizer
                 (made by tools/make_t5_fixtures.py; run that first)
  reference.safetensors
    z (f32 [2, 4, 32, 32]): the initial latents;
    latents (f32 [2, 4, 32, 32]): PixArtAlphaPipeline(prompt=PROMPTS, negative_prompt="",
      num_inference_steps=4, guidance_scale=4.5, latents=z, use_resolution_binning=False,
      output_type="latent") — 120 tokens, the pipeline's defaults otherwise;
    binned_every4 (f32 [1, 3, 60, 60]): every 4th row and column of the pipeline's image in
      [0, 1] (output_type "pt", [1, 3, 240, 240]) for PROMPTS[0] at height = width = 240 with
      resolution binning on: sampled at the 256×256 bin from z[:1], 3 steps, decoded and
      resized back by resize_and_crop_tensor;
    z_wide (f32 [1, 4, 24, 40]) and wide_every4 (f32 [1, 3, 50, 80]): the same for PROMPTS[1] at
      200×320 (a non-square request: its bin is 192×320, the latent 24×40).

    python3 tools/make_pixart_pipeline_fixtures.py --out tests/fixtures/pixart_pipe

Runs on the CPU, one thread, deterministic algorithms; without the optional bs4/ftfy
packages the pipeline's caption cleaning is `lower().strip()`.
"""

import argparse
import json
import os
import sys

import torch
from safetensors.torch import save_file
import diffusers
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtAlphaPipeline
from transformers import T5EncoderModel, T5Tokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_pixart_fixtures as base  # noqa: E402

CONFIG = dict(base.CONFIG, caption_channels=64, sample_size=32)
VAE = dict(block_out_channels=[8, 8, 8, 8], down_block_types=["DownEncoderBlock2D"] * 4,
           up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, layers_per_block=1, norm_num_groups=4,
           sample_size=256)
PROMPTS = ["A red square on a white table", "two blue circles"]
MODEL_INDEX = dict(base.MODEL_INDEX, text_encoder=["transformers", "T5EncoderModel"],
                   tokenizer=["transformers", "T5Tokenizer"], vae=["diffusers", "AutoencoderKL"])


def make_model():
    return base.make_model(CONFIG, seed=21)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/pixart_pipe")
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    m = make_model()
    base.save_pipeline(m, a.out, torch.float32)
    with open(os.path.join(a.out, "model_index.json"), "w") as f:
        json.dump(MODEL_INDEX, f, indent=2, sort_keys=True)
    for part in ["text_encoder", "tokenizer"]:
        link = os.path.join(a.out, part)
        if not os.path.islink(link):
            os.symlink(os.path.join("..", "t5", part), link)
    torch.manual_seed(23)
    vae = AutoencoderKL(**VAE).eval()
    vae.save_pretrained(os.path.join(a.out, "vae"))
    pipe = PixArtAlphaPipeline(
        tokenizer=T5Tokenizer.from_pretrained(os.path.join(a.out, "tokenizer")),
        text_encoder=T5EncoderModel.from_pretrained(os.path.join(a.out, "text_encoder")).eval(),
        vae=vae,
        transformer=m,
        scheduler=DPMSolverMultistepScheduler.from_pretrained(os.path.join(a.out, "scheduler")),
    )
    g = torch.Generator().manual_seed(22)
    z = torch.randn(2, CONFIG["in_channels"], CONFIG["sample_size"], CONFIG["sample_size"], generator=g)
    # The 200×320 request's bin (ASPECT_RATIO_256_BIN, ratio 0.625 → 0.6: 192×320 → latent 24×40).
    z2 = torch.randn(1, CONFIG["in_channels"], 24, 40, generator=g)
    with torch.no_grad():
        latents = pipe(prompt=PROMPTS, negative_prompt="", num_inference_steps=4, guidance_scale=4.5, latents=z,
                       height=256, width=256, use_resolution_binning=False, output_type="latent").images
        binned = pipe(prompt=PROMPTS[:1], negative_prompt="", num_inference_steps=3, guidance_scale=4.5,
                      latents=z[:1], height=240, width=240, use_resolution_binning=True, output_type="pt").images
        wide = pipe(prompt=PROMPTS[1:], negative_prompt="", num_inference_steps=3, guidance_scale=4.5,
                    latents=z2, height=200, width=320, use_resolution_binning=True, output_type="pt").images
    assert binned.shape == (1, 3, 240, 240), binned.shape
    assert wide.shape == (1, 3, 200, 320), wide.shape
    # Every 4th row and column of the image keeps the file small (60×60 of 240×240).
    save_file({"z": z, "latents": latents.contiguous(),
               "binned_every4": binned[:, :, ::4, ::4].contiguous(), "z_wide": z2,
               "wide_every4": wide[:, :, ::4, ::4].contiguous()},
              os.path.join(a.out, "reference.safetensors"))
    with open(os.path.join(a.out, "prompts.txt"), "w") as f:
        f.write("\n".join(PROMPTS) + "\n")
    with open(os.path.join(a.out, "README.md"), "w") as f:
        f.write("# A tiny PixArt-α pipeline folder\n\nMade by `tools/make_pixart_pipeline_fixtures.py` (do not edit "
                f"by hand) with diffusers {diffusers.__version__}, torch {torch.__version__}; see its docstring. "
                "`prompts.txt` holds the prompts, one a line.\n")


if __name__ == "__main__":
    main()
