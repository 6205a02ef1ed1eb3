#!/usr/bin/env python3
"""Reference fixtures for the PixArt-XL-2-1024-MS features (tests/pixart_ms.rs), made by diffusers:
the resolution / aspect-ratio micro-conditions, non-square latents and resolution binning.

* `tiny_ms/`: a tiny random `PixArtTransformer2DModel` with `use_additional_conditions=True` set
  explicitly (diffusers only defaults it on at sample_size 128), hidden 24 (divisible by 3 for
  the two hidden/3-wide condition MLPs' three embeddings).
* `forward.safetensors`: its forward on a non-square latent (8×12) with a different resolution
  and aspect ratio per row (`resolution`, `aspect_ratio`, as `added_cond_kwargs`), and the
  forward of `../pixart/tiny` (no conditions) on a 12×8 latent: both use the position table
  computed for a grid that is not the trained one.
* `sampling.safetensors`: 5 guided DPM-Solver++ steps of the tiny_ms model on a 12×8 latent, in
  PixArtAlphaPipeline's loop with the added_cond_kwargs it builds for a 1024-MS model
  (resolution = the sampled size in pixels, 8 × the latent, aspect = height / width, on every
  row); the pipeline itself passes them only when sample_size is 128, so the loop is ours.
* `converted/`: tiny_ms written in the official PixArt-α `.pth` layout and converted back by
  `tools/convert_pixart_checkpoint.py` (a pipeline folder: model_index.json, transformer/, scheduler/).
* `resize.safetensors` and `bins.json`: `PixArtImageProcessor.resize_and_crop_tensor` on random
  images and `classify_height_width_bin` on requested sizes for the three bin tables.

    python3 tools/make_pixart_ms_fixtures.py --out tests/fixtures/pixart_ms

Runs on the CPU, one thread, deterministic algorithms.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile

import torch
from safetensors.torch import save_file
import diffusers
from diffusers import DPMSolverMultistepScheduler, PixArtTransformer2DModel
from diffusers.image_processor import PixArtImageProcessor
from diffusers.pipelines.pixart_alpha import pipeline_pixart_alpha as pipe

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import convert_pixart_checkpoint as convert  # noqa: E402
import make_pixart_fixtures as base  # noqa: E402

CONFIG = dict(base.CONFIG, num_attention_heads=2, attention_head_dim=12, cross_attention_dim=24,
              use_additional_conditions=True)
D = CONFIG["caption_channels"]


def make_model():
    return base.make_model(CONFIG, seed=11)


def forward(m, x, t, ehs, mask, cond=None):
    with torch.no_grad():
        return m(x, encoder_hidden_states=ehs, timestep=t, encoder_attention_mask=mask,
                 added_cond_kwargs=cond, return_dict=False)[0]


def sample(m, steps, cfg, z, pos, pos_mask, neg, neg_mask):
    """PixArtAlphaPipeline's guided loop with a 1024-MS model's added_cond_kwargs."""
    sch = DPMSolverMultistepScheduler.from_config({k: v for k, v in base.SCHEDULER.items() if not k.startswith("_")})
    sch.set_timesteps(steps)
    b, h, w = z.shape[0], z.shape[2] * 8, z.shape[3] * 8
    res = torch.tensor([h, w]).repeat(b, 1).float()
    ar = torch.tensor([float(h / w)]).repeat(b, 1).float()
    cond = {"resolution": torch.cat([res, res]), "aspect_ratio": torch.cat([ar, ar])}
    ehs, mask = torch.cat([neg, pos]), torch.cat([neg_mask, pos_mask])
    x, traj = z.clone(), []
    for t in sch.timesteps:
        eps = forward(m, torch.cat([x, x]), t.expand(2 * b), ehs, mask, cond)
        u, c = eps.chunk(2)
        eps = (u + cfg * (c - u)).chunk(2, dim=1)[0]
        x = sch.step(eps, t, x, return_dict=False)[0]
        traj.append(x.clone())
    return sch.timesteps.clone(), torch.stack(traj)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/pixart_ms")
    ap.add_argument("--tiny", default="tests/fixtures/pixart/tiny", help="the conditionless tiny pipeline")
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    m = make_model()
    base.save_pipeline(m, os.path.join(a.out, "tiny_ms"), torch.float32)
    # The same model through the official .pth layout and back by tools/convert_pixart_checkpoint.py.
    cfg = {k: v for k, v in m.config.items() if not k.startswith("_")}
    with tempfile.TemporaryDirectory() as d:
        torch.save({"state_dict": convert.to_official(m.state_dict(), cfg)}, os.path.join(d, "tiny_ms.pth"))
        sd, config = convert.to_diffusers(convert.load_official(os.path.join(d, "tiny_ms.pth")), num_heads=2)
    dst = os.path.join(a.out, "converted")
    shutil.rmtree(dst, ignore_errors=True)
    convert.write_pipeline(sd, config, dst)

    g = torch.Generator().manual_seed(12)
    c = CONFIG["in_channels"]
    L = base.L
    x = torch.randn(2, c, 8, 12, generator=g)
    t = torch.tensor([999, 420], dtype=torch.int64)
    ehs = torch.randn(2, L, D, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.int64)
    resolution = torch.tensor([[64.0, 96.0], [1024.0, 512.0]])
    aspect = torch.tensor([[64.0 / 96.0], [2.0]])
    out_ms = forward(m, x, t, ehs, mask, {"resolution": resolution, "aspect_ratio": aspect})
    tiny = PixArtTransformer2DModel.from_pretrained(os.path.join(a.tiny, "transformer")).eval()
    x2 = torch.randn(2, c, 12, 8, generator=g)
    out_plain = forward(tiny, x2, t, ehs, mask)
    save_file({"x": x, "t": t, "encoder_hidden_states": ehs, "encoder_attention_mask": mask,
               "resolution": resolution, "aspect_ratio": aspect, "out": out_ms,
               "x_plain": x2, "out_plain": out_plain},
              os.path.join(a.out, "forward.safetensors"))

    z = torch.randn(2, c, 12, 8, generator=g)
    pos = torch.randn(2, L, D, generator=g)
    pos_mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.int64)
    neg = torch.randn(1, L, D, generator=g)
    neg_mask = torch.tensor([[1, 0, 0, 0, 0, 0]], dtype=torch.int64)
    ts, traj = sample(m, 5, 4.5, z, pos, pos_mask, neg.expand(2, L, D), neg_mask.expand(2, L))
    save_file({"z": z, "prompt_embeds": pos, "attention_mask": pos_mask, "negative_embeds": neg,
               "negative_mask": neg_mask, "timesteps": ts.to(torch.int64), "trajectory": traj},
              os.path.join(a.out, "sampling.safetensors"))
    save_file({"prompt_embeds": neg, "attention_mask": neg_mask}, os.path.join(a.out, "negative_embeds.safetensors"))

    resize = {}
    for i, (src, dst) in enumerate([((12, 20), (16, 16)), ((24, 16), (10, 14)), ((8, 8), (13, 9))]):
        img = torch.randn(1, 3, *src, generator=g)
        resize[f"in_{i}"] = img[0]
        resize[f"out_{i}"] = PixArtImageProcessor.resize_and_crop_tensor(img, dst[1], dst[0])[0].contiguous()
    save_file(resize, os.path.join(a.out, "resize.safetensors"))
    requests = [(1024, 1024), (1080, 1920), (1920, 1080), (600, 800), (100, 10000), (5000, 70), (512, 700),
                (333, 333), (768, 1024), (1000, 1300)]
    bins = {}
    for name, table in [("1024", pipe.ASPECT_RATIO_1024_BIN), ("512", pipe.ASPECT_RATIO_512_BIN),
                        ("256", pipe.ASPECT_RATIO_256_BIN)]:
        bins[name] = [[h, w, *PixArtImageProcessor.classify_height_width_bin(h, w, ratios=table)] for h, w in requests]
    with open(os.path.join(a.out, "bins.json"), "w") as f:
        json.dump(bins, f, indent=1)
    with open(os.path.join(a.out, "README.md"), "w") as f:
        f.write("# PixArt-α 1024-MS fixtures\n\nMade by `tools/make_pixart_ms_fixtures.py` (do not edit by hand) "
                f"with diffusers {diffusers.__version__}, torch {torch.__version__}; see the script's docstring.\n\n"
                f"* `tiny_ms/`: `PixArtTransformer2DModel(**{json.dumps(CONFIG)})`, random weights.\n"
                "* `converted/`: tiny_ms through the official `.pth` layout and back (tools/convert_pixart_checkpoint.py).\n"
                "* `forward`: tiny_ms on x [2, 4, 8, 12] with per-row `resolution` [2, 2] and `aspect_ratio` [2, 1] "
                "(`out`); ../pixart/tiny on `x_plain` [2, 4, 12, 8] (`out_plain`); same t, caption and mask.\n"
                "* `sampling`: 5 guided (4.5) DPM-Solver++ steps of tiny_ms from `z` [2, 4, 12, 8] "
                "(resolution 96×64, aspect 1.5), latents after each step in `trajectory`; the negative prompt's "
                "embeddings also in `negative_embeds` (as `icdit sample --negative-embeds` reads them).\n"
                "* `resize`: `resize_and_crop_tensor` of `in_i` to (16, 16), (10, 14), (13, 9); `bins.json`: "
                "[height, width, binned height, binned width] per table.\n")


if __name__ == "__main__":
    main()
