#!/usr/bin/env python3
"""Checks tools/pixart_torch.py (our PyTorch port of PixArt-α, used by the GPU check's PyTorch
baseline) against diffusers on tiny random configurations, in float32 on the CPU:

  * forward: diffusers' `PixArtTransformer2DModel` state dict loaded unchanged (strict) into
    `PixArt`; random inputs, two timesteps, a partially masked caption; relative L2 <= 1e-6
    (two configurations: sample 8 / patch 2 / 2 blocks, and sample 16 / patch 2 / 3 blocks with
    interpolation_scale 2 and heads of 8);
  * sampling: a 10-step guided (scale 4.5) trajectory with DPM-Solver++ 2M (PixArt's scheduler
    config) and with DDIM, diffusers' schedulers driven as PixArtAlphaPipeline drives them
    (guidance on all channels, variance half dropped) against `pixart_torch.sample`; every step's
    latents relative L2 <= 1e-5; the timesteps must be identical;
  * the GPU baseline's icc steps (tools/bench_pytorch_pixart_gpu.py `Icc`): with exact factors
    (down = W, up = I) a calibrated step after a full step must give the model's output at a new
    x and t (relative L2 <= 1e-6), while a reuse step there must differ (> 1e-3).

    python3 tools/check_pixart_torch.py        # needs diffusers (0.42.1 here); ~5 s CPU (8-14 s wall with imports)

Measured here (diffusers 0.42.1, torch 2.15, CPU, one thread): see MEASURED below, printed by
each run; the numbers are also in docs/pixart.md.
"""

MEASURED = """
forward tiny-a: rel L2 0 (bit-identical), forward tiny-b: rel L2 0 (bit-identical)
dpm-solver++ 10 steps, guided 4.5: max over steps rel L2 2.2e-07 (final 2.2e-07)
ddim 10 steps, guided 4.5:         max over steps rel L2 2.9e-07 (final 2.9e-07)
bench icc step, exact factors, new x and t: rel L2 2.1e-07 (a reuse step differs by 4.0e-01)
(the check is not blind: dropping the caption mask gives 1.4e-01, interpolation_scale 1
instead of 2 on tiny-b 2.4e-01)
"""

import os
import sys

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PixArtTransformer2DModel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pixart_torch import Ddim, DpmSolverPP, PixArt, PixArtConfig, sample  # noqa: E402

FORWARD_TOL = 1e-6
SAMPLE_TOL = 1e-5
CONFIGS = {
    "tiny-a": dict(sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=2,
                   num_attention_heads=2, attention_head_dim=16, caption_channels=24, cross_attention_dim=32),
    "tiny-b": dict(sample_size=16, patch_size=2, in_channels=4, out_channels=8, num_layers=3,
                   num_attention_heads=4, attention_head_dim=8, caption_channels=40, cross_attention_dim=32,
                   interpolation_scale=2),
}
SCHEDULER = dict(algorithm_type="dpmsolver++", beta_end=0.02, beta_schedule="linear", beta_start=0.0001,
                 num_train_timesteps=1000, prediction_type="epsilon", solver_order=2, solver_type="midpoint",
                 lower_order_final=True, thresholding=False, timestep_spacing="linspace", steps_offset=0)
L = 7  # caption tokens


def diffusers_model(cfg: dict, seed: int) -> PixArtTransformer2DModel:
    torch.manual_seed(seed)
    m = PixArtTransformer2DModel(norm_type="ada_norm_single", **cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # the default init zeroes parts of the model: redraw everything
        for _, p in m.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) / (p[0].numel() ** 0.5 if p.ndim > 1 else 10.0))
    return m


def ours(m: PixArtTransformer2DModel) -> PixArt:
    model = PixArt(PixArtConfig.from_dict(dict(m.config))).eval()
    model.load_state_dict(m.state_dict(), strict=True)
    return model


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def check_forward(name, cfg, seed):
    m = diffusers_model(cfg, seed)
    p = ours(m)
    g = torch.Generator().manual_seed(seed + 2)
    s, c = cfg["sample_size"], cfg["in_channels"]
    x = torch.randn(2, c, s, s, generator=g)
    t = torch.tensor([999, 37])
    text = torch.randn(2, L, cfg["caption_channels"], generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0], [1] * L])
    with torch.no_grad():
        ref = m(x, encoder_hidden_states=text, timestep=t, encoder_attention_mask=mask, return_dict=False)[0]
        got = p(x, t, text, mask)
    return rel(got, ref), m, p


def diffusers_sample(m, scheduler, steps, scale, z, text, mask):
    """PixArtAlphaPipeline's loop on diffusers' classes; text/mask are [negative; positive]."""
    scheduler.set_timesteps(steps)
    x, traj = z.clone(), []
    for t in scheduler.timesteps:
        with torch.no_grad():
            out = m(torch.cat([x, x]), encoder_hidden_states=text, timestep=t.expand(2 * x.shape[0]),
                    encoder_attention_mask=mask, return_dict=False)[0]
        u, c = out.chunk(2)
        eps = (u + scale * (c - u)).chunk(2, dim=1)[0]
        x = scheduler.step(eps, t, x, return_dict=False)[0]
        traj.append(x.clone())
    return [int(t) for t in scheduler.timesteps], traj


def check_sampling(m, p, cfg, steps=10, scale=4.5, seed=5):
    g = torch.Generator().manual_seed(seed)
    s, c, d = cfg["sample_size"], cfg["in_channels"], cfg["caption_channels"]
    z = torch.randn(2, c, s, s, generator=g)
    pos = torch.randn(2, L, d, generator=g)
    pos_mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0]])
    neg = torch.randn(1, L, d, generator=g).expand(2, L, d)
    neg_mask = torch.tensor([[1, 0, 0, 0, 0, 0, 0]]).expand(2, L)
    results = {}
    for name, theirs, mine in [
        ("dpm-solver++", DPMSolverMultistepScheduler.from_config(SCHEDULER), DpmSolverPP(steps)),
        ("ddim", DDIMScheduler.from_config(SCHEDULER, clip_sample=False, set_alpha_to_one=False), Ddim(steps)),
    ]:
        ts, ref = diffusers_sample(m, theirs, steps, scale, z, torch.cat([neg, pos]), torch.cat([neg_mask, pos_mask]))
        if ts != mine.timesteps:
            raise SystemExit(f"{name}: timesteps differ: diffusers {ts}, ours {mine.timesteps}")
        traj = []
        sample(p, mine, z, pos, pos_mask, neg, neg_mask, scale=scale, trajectory=traj)
        errs = [rel(a, b) for a, b in zip(traj, ref)]
        results[name] = (max(errs), errs[-1], ts)
    return results


def check_icc(p: PixArt, seed=9):
    """The GPU baseline's icc step kinds (tools/bench_pytorch_pixart_gpu.py) with exact factors
    (down = W, up = I, so y_s + up·down·(x − x_s) = W·x + b) must give the model's own output at
    another x and t than the full step's: every cached linear's input is then the right one."""
    from bench_pytorch_pixart_gpu import CACHED, Icc

    icc = Icc(p, rank=4, seed=0)
    for blk, f in zip(p.transformer_blocks, icc.factors):
        for name in CACHED:
            w = blk.get_submodule(name).weight.detach()
            f[name] = (w.clone(), torch.eye(w.shape[0]))
    cfg = p.cfg
    g = torch.Generator().manual_seed(seed)
    x0, x1 = (torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g) for _ in range(2))
    text = torch.randn(2, L, cfg.caption_channels, generator=g)
    mask = torch.tensor([[1, 1, 0, 0, 0, 0, 0], [1] * L])
    with torch.no_grad():
        ctx, bias = p.encode_caption(text, mask)
        icc.prepare(ctx)
        icc.full(x0, torch.tensor([800, 800]), ctx, bias)
        t1 = torch.tensor([600, 600])
        got = icc.calibrated(x1, t1, ctx, bias)
        ref = p.denoise(x1, t1, ctx, bias)
        # and not a blind comparison: the reuse step at the new inputs differs from the model
        reuse = icc.reuse(x1, t1, ctx, bias)
    return rel(got, ref), rel(reuse, ref)


def main():
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    failed = False
    models = {}
    for i, (name, cfg) in enumerate(CONFIGS.items()):
        err, m, p = check_forward(name, cfg, 10 * i)
        models[name] = (m, p)
        ok = err <= FORWARD_TOL
        failed |= not ok
        print(f"forward {name}: rel L2 {err:.1e} (tolerance {FORWARD_TOL:.0e}) {'ok' if ok else 'FAIL'}")
    m, p = models["tiny-a"]
    for name, (worst, final, ts) in check_sampling(m, p, CONFIGS["tiny-a"]).items():
        ok = worst <= SAMPLE_TOL
        failed |= not ok
        print(f"{name} 10 steps (guided 4.5, timesteps {ts[0]}..{ts[-1]} identical): max over steps rel L2 "
              f"{worst:.1e}, final {final:.1e} (tolerance {SAMPLE_TOL:.0e}) {'ok' if ok else 'FAIL'}")
    err, reuse = check_icc(p)
    ok = err <= FORWARD_TOL and reuse > 1e-3
    failed |= not ok
    print(f"bench icc step with exact factors vs the model at new x, t: rel L2 {err:.1e} (tolerance {FORWARD_TOL:.0e}; "
          f"a reuse step there differs by {reuse:.1e}) {'ok' if ok else 'FAIL'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
