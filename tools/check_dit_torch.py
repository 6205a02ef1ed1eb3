"""Check tools/dit_torch.py against the official DiT code (facebookresearch/DiT checkout).

For each test config, both models get the same weights (every parameter re-drawn at random, so
adaLN-Zero and the zero-initialised output layer do not hide anything), then we compare:
  * state-dict names, order and shapes (must be identical), and pos_embed (must be bit-identical);
  * forward outputs, relative max error = max|ours - official| / max|official|  (limit 1e-6);
  * forward_with_cfg (3-channel configs only, where the official 3-channel rule is all channels);
  * training loss terms mse / vb / loss from official `create_diffusion("").training_losses` on the
    same x_start / t / noise / y, with t = 0 rows to exercise the discretized-Gaussian NLL and
    x_start on the 8-bit grid including exact -1 and +1 (limit 1e-6 relative per term);
  * parameter gradients of the mean loss (checks the frozen-mean vb term; limit 1e-5 relative);
  * respaced schedules ("250", "100", "ddim25", "25"): timestep map and float64 arrays exactly,
    and p_mean_variance (mean, log-variance, x0) on the same model output;
  * whole CFG sampling loops, DDPM ("10") and DDIM ("ddim10"), with the same per-step noise.

Usage: python tools/check_dit_torch.py --dit-repo /tmp/dit-official
Exit status 1 when any comparison fails; the numbers are printed either way.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import dit_torch  # noqa: E402

CONFIGS = [
    # The bundled default model (patch 2 since shapes-32 v3).
    dict(input_size=32, patch_size=2, in_channels=3, hidden_size=144, depth=6, num_heads=2, num_classes=10),
    # The previous bundled model (patch 4).
    dict(input_size=32, patch_size=4, in_channels=3, hidden_size=144, depth=6, num_heads=2, num_classes=10),
    # A latent-space (4-channel), patch-2, 3-head config closer to DiT-XL/2's shape rules.
    dict(input_size=16, patch_size=2, in_channels=4, hidden_size=96, depth=3, num_heads=3, num_classes=7),
]

FAILURES: list[str] = []


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    ref = b.abs().max().item()
    assert ref > 0, "reference tensor is all zeros"
    return (a - b).abs().max().item() / ref


def report(name: str, err: float, limit: float) -> None:
    ok = err <= limit
    if not ok:
        FAILURES.append(name)
    print(f"  {'ok  ' if ok else 'FAIL'} {name:<44} rel max err {err:.3e} (limit {limit:.0e})")


def randomise(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Re-draw every parameter except pos_embed with non-trivial values."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "pos_embed":
                continue
            fan_in = p.shape[1] if p.ndim >= 2 else p.shape[0]
            if p.ndim == 4:
                fan_in = p.shape[1] * p.shape[2] * p.shape[3]
            std = 1.0 / fan_in ** 0.5 if p.ndim >= 2 else 0.1
            if "adaLN_modulation" in name:
                std *= 0.5
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def check_config(cfg_kw: dict, official_models, create_diffusion) -> None:
    print(f"config {cfg_kw}")
    gen = torch.Generator().manual_seed(1234)
    off = official_models.DiT(**cfg_kw, mlp_ratio=4.0, class_dropout_prob=0.1, learn_sigma=True).eval()
    ours = dit_torch.DiT(dit_torch.DiTConfig(**cfg_kw)).eval()

    ko, ku = list(off.state_dict()), list(ours.state_dict())
    same_names = ko == ku and all(off.state_dict()[k].shape == ours.state_dict()[k].shape for k in ko)
    if not same_names:
        FAILURES.append("state-dict layout")
    print(f"  {'ok  ' if same_names else 'FAIL'} state-dict names/order/shapes identical ({len(ko)} tensors)")
    pe_equal = torch.equal(off.pos_embed, ours.pos_embed)
    if not pe_equal:
        FAILURES.append("pos_embed")
    print(f"  {'ok  ' if pe_equal else 'FAIL'} pos_embed bit-identical")

    randomise(off, gen)
    ours.load_state_dict(off.state_dict(), strict=True)

    b, c, s, nc = 8, cfg_kw["in_channels"], cfg_kw["input_size"], cfg_kw["num_classes"]
    x = torch.randn(b, c, s, s, generator=gen)
    t = torch.tensor([0, 1, 17, 250, 500, 998, 999, 3])
    y = torch.randint(0, nc + 1, (b,), generator=gen)
    y[0] = nc  # null label
    with torch.no_grad():
        report("forward", rel_err(ours(x, t, y), off(x, t, y)), 1e-6)
        if c == 3:
            xc = torch.cat([x[:4], x[4:]], 0)
            yc = torch.cat([y[:4], torch.full((4,), nc)], 0)
            tc = torch.cat([t[:4], t[:4]], 0)
            report("forward_with_cfg (scale 4)",
                   rel_err(ours.forward_with_cfg(xc, tc, yc, 4.0), off.forward_with_cfg(xc, tc, yc, 4.0)), 1e-6)

    # Training losses on 8-bit data.
    x0 = (torch.randint(0, 256, (b, c, s, s), generator=gen).float() / 127.5 - 1.0)
    x0[:, :, 0, 0], x0[:, :, 0, 1] = -1.0, 1.0
    tt = torch.tensor([0, 0, 1, 5, 100, 500, 998, 999])
    noise = torch.randn(x0.shape, generator=gen)
    yl = torch.randint(0, nc, (b,), generator=gen)
    d_off = create_diffusion(timestep_respacing="")
    d_ours = dit_torch.Diffusion()
    off.zero_grad()
    ours.zero_grad()
    lo = d_off.training_losses(off, x0, tt, model_kwargs=dict(y=yl), noise=noise)
    lu = d_ours.training_losses(ours, x0, tt, yl, noise)
    for key in ("mse", "vb", "loss"):
        report(f"training_losses[{key}]", rel_err(lu[key], lo[key]), 1e-6)
        print(f"       official {key}: {[f'{v:.5f}' for v in lo[key].tolist()]}")
    lo["loss"].mean().backward()
    lu["loss"].mean().backward()
    worst, count = 0.0, 0
    go = dict(off.named_parameters())
    for name, p in ours.named_parameters():
        if p.grad is None:
            continue
        worst = max(worst, rel_err(p.grad, go[name].grad))
        count += 1
    report(f"grad of mean loss ({count} tensors, worst)", worst, 1e-5)


def check_schedules(create_diffusion) -> None:
    print("schedules")
    for spec in ("250", "100", "ddim25", "25"):
        do, du = create_diffusion(timestep_respacing=spec), dit_torch.Diffusion(spec)
        same = (list(do.timestep_map) == du.timestep_map.tolist()
                and np.array_equal(do.betas, du.betas)
                and np.array_equal(do.posterior_log_variance_clipped, du.post_logvar_clipped)
                and np.array_equal(do.posterior_mean_coef1, du.post_coef1)
                and np.array_equal(do.posterior_mean_coef2, du.post_coef2)
                and np.array_equal(do.sqrt_recipm1_alphas_cumprod, du.sqrt_recipm1_abar))
        if not same:
            FAILURES.append(f"schedule {spec}")
        print(f"  {'ok  ' if same else 'FAIL'} respacing {spec!r}: timestep map and float64 arrays identical "
              f"({du.num_timesteps} steps)")
        # One reverse step on a fixed model output: learned-range mean/logvar/x0, then DDIM.
        g = torch.Generator().manual_seed(7)
        x = torch.randn(4, 3, 8, 8, generator=g)
        out = torch.randn(4, 6, 8, 8, generator=g)
        k = torch.tensor([0, 1, du.num_timesteps // 2, du.num_timesteps - 1])
        fake = lambda xx, tt, **kw: out
        pm = do.p_mean_variance(fake, x, k, clip_denoised=False)
        mean, logvar, x0 = du.p_mean_logvar(out, x, k)
        report(f"  {spec}: p_mean_variance mean", rel_err(mean, pm["mean"]), 1e-6)
        report(f"  {spec}: p_mean_variance log_variance", rel_err(logvar, pm["log_variance"]), 1e-6)
        report(f"  {spec}: p_mean_variance pred_xstart", rel_err(x0, pm["pred_xstart"]), 1e-6)


def check_sampling_loops(official_models, create_diffusion) -> None:
    """Whole CFG sampling loops (DDPM learned range and DDIM eta=0) on the default pixel config.

    Both loops draw their per-step noise from torch's global generator in the same order (model call,
    then randn of the full 2n batch), so re-seeding before each loop gives them the same noise.
    """
    print("sampling loops (CFG 4, [cond; uncond] batch)")
    cfg_kw = CONFIGS[0]
    gen = torch.Generator().manual_seed(99)
    off = official_models.DiT(**cfg_kw, mlp_ratio=4.0, class_dropout_prob=0.1, learn_sigma=True).eval()
    randomise(off, gen)
    ours = dit_torch.DiT(dit_torch.DiTConfig(**cfg_kw)).eval()
    ours.load_state_dict(off.state_dict(), strict=True)
    n, nc = 3, cfg_kw["num_classes"]
    z = torch.randn(n, 3, 32, 32, generator=gen)
    labels = torch.tensor([0, 4, 9])
    zz = torch.cat([z, z], 0)
    yy = torch.cat([labels, torch.full((n,), nc)], 0)
    for spec, method in (("10", "ddpm"), ("ddim10", "ddim")):
        do = create_diffusion(timestep_respacing=spec)
        loop = do.p_sample_loop if method == "ddpm" else do.ddim_sample_loop
        torch.manual_seed(5)
        with torch.no_grad():
            ref = loop(off.forward_with_cfg, zz.shape, zz, clip_denoised=False,
                       model_kwargs=dict(y=yy, cfg_scale=4.0), device="cpu", progress=False)[:n]
        torch.manual_seed(5)
        got = dit_torch.Diffusion(spec).sample(ours, z, labels, cfg_scale=4.0, method=method)
        report(f"{method} loop over {spec!r}", rel_err(got, ref), 1e-6)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dit-repo", required=True, help="path to a facebookresearch/DiT checkout")
    args = ap.parse_args()
    torch.set_num_threads(2)
    sys.path.insert(0, str(pathlib.Path(args.dit_repo).resolve()))
    import models as official_models  # noqa: E402  (the checkout's models.py)
    from diffusion import create_diffusion  # noqa: E402

    torch.manual_seed(0)
    for cfg in CONFIGS:
        check_config(cfg, official_models, create_diffusion)
    check_schedules(create_diffusion)
    check_sampling_loops(official_models, create_diffusion)
    print("ALL OK" if not FAILURES else f"FAILED: {FAILURES}")
    sys.exit(1 if FAILURES else 0)


if __name__ == "__main__":
    main()
