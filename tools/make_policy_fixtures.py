#!/usr/bin/env python3
"""Regenerate tests/fixtures/policies/: reference samples of the caching policies of
docs/caching-policies.md (FORA-style block reuse and TaylorSeer-style forecasting), written here
from the papers' formulas on top of tools/dit_torch.py (our PyTorch DiT, checked against the
official code by tools/check_dit_torch.py).

    python3 tools/make_policy_fixtures.py --out tests/fixtures/policies

Setting: the hd72 fixture model, DDIM (eta 0) over respacing "10", guidance 4 on channels 0..2
(the official forward_with_cfg), the z and labels of tests/fixtures/icc/sample_icc_hd72 (whose
`sample_full`, made by the official code, this script's full-compute loop reproduces; the error
is printed and stored in the metadata).

Policies, with full steps "step < warmup or step % period == 0" (steps counted in sampling order
from 0):
  * fora: on a full step each block's attention-branch output a = attn(modulate(LN(x))) and
    MLP-branch output m = mlp(modulate(LN(x))) are kept; on a cached step x += g1·a_kept and
    x += g2·m_kept with the current step's gates (attention and MLP skipped).
  * taylor (order M): each branch keeps factors D_0..D_M. A full step at distance Δ from the
    previous one sets D_0 = y and D_{i+1} = (D_i(new) − D_i(old))/Δ for the orders the history
    allows; a cached step k steps after the last full step uses y ≈ Σ_i D_i·k^i/i!.

CPU, float32, one thread, deterministic algorithms.
"""

import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F
from safetensors import safe_open

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import dit_layouts  # noqa: E402
import dit_torch  # noqa: E402

MODEL_REL = "tests/fixtures/hd72/official.safetensors"
INPUT_REL = "tests/fixtures/icc/sample_icc_hd72.safetensors"
SPEC = "10"
CFG_SCALE = 4.0
GUIDED_CHANNELS = 3  # the official forward_with_cfg guides channels 0..2 only

# (name, policy, order, period, warmup)
SETTINGS = [
    ("fora_p2", "fora", 0, 2, 0),
    ("fora_p3", "fora", 0, 3, 0),
    ("taylor1_p3", "taylor", 1, 3, 0),
    ("taylor2_p3_w2", "taylor", 2, 3, 2),
    ("taylor2_p2", "taylor", 2, 2, 0),
]


def ln(z):
    return F.layer_norm(z, z.shape[-1:], eps=1e-6)


def modulate(z, shift, scale):
    return z * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Forecaster:
    """One branch's Taylor factors (TaylorSeer's finite differences)."""

    def __init__(self, order):
        self.order = order
        self.factors = []   # D_0, D_1, ...
        self.last_full = None

    def update(self, y, step):
        new = [y]
        if self.factors:
            delta = step - self.last_full
            for i in range(min(self.order, len(self.factors))):
                new.append((new[i] - self.factors[i]) / delta)
        self.factors = new
        self.last_full = step

    def predict(self, step):
        k = step - self.last_full
        out = self.factors[0]
        for i in range(1, len(self.factors)):
            out = out + self.factors[i] * (k ** i / math.factorial(i))
        return out


def policy_forward(model, x, t, y, step, full, state):
    """The DiT forward with each block's two branch outputs computed (full) or predicted."""
    tok = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y, False)
    for blk, (fa, fm) in zip(model.blocks, state):
        sh1, sc1, g1, sh2, sc2, g2 = blk.adaLN_modulation(c).chunk(6, dim=1)
        if full:
            a = blk.attn(modulate(ln(tok), sh1, sc1))
            fa.update(a, step)
        else:
            a = fa.predict(step)
        tok = tok + g1.unsqueeze(1) * a
        if full:
            m = blk.mlp(modulate(ln(tok), sh2, sc2))
            fm.update(m, step)
        else:
            m = fm.predict(step)
        tok = tok + g2.unsqueeze(1) * m
    return model.unpatchify(model.final_layer(tok, c))


@torch.no_grad()
def sample(model, diffusion, z, labels, is_full, order):
    """DDIM (eta 0) with guidance on channels 0..2; `is_full(step)` None: no caching."""
    n = z.shape[0]
    x = torch.cat([z, z], 0)
    y = torch.cat([labels, torch.full_like(labels, model.cfg.num_classes)], 0)
    state = [(Forecaster(order), Forecaster(order)) for _ in model.blocks]
    tmap = torch.from_numpy(diffusion.timestep_map)
    full_steps = []
    for step, ki in enumerate(reversed(range(diffusion.num_timesteps))):
        k = torch.full((x.shape[0],), ki, dtype=torch.long)
        half = x[:n]
        inp = torch.cat([half, half], 0)
        full = is_full is None or is_full(step)
        if full:
            full_steps.append(step)
        if is_full is None:
            out = model(inp, tmap[k], y)
        else:
            out = policy_forward(model, inp, tmap[k], y, step, full, state)
        eps, rest = out[:, :GUIDED_CHANNELS], out[:, GUIDED_CHANNELS:]
        e_c, e_u = eps.chunk(2, 0)
        g = e_u + CFG_SCALE * (e_c - e_u)
        out = torch.cat([torch.cat([g, g], 0), rest], 1)
        _, _, x0 = diffusion.p_mean_logvar(out, inp, k)
        nd = inp.ndim
        eps = (dit_torch._gather(diffusion.sqrt_recip_abar, k, nd) * inp - x0) / dit_torch._gather(
            diffusion.sqrt_recipm1_abar, k, nd)
        ap = dit_torch._gather(diffusion.alphas_cumprod_prev, k, nd)
        x = x0 * torch.sqrt(ap) + torch.sqrt(1 - ap) * eps
    return x[:n], full_steps


def rel_l2(a, ref):
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(REPO_ROOT, "tests/fixtures/policies"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    model, _ = dit_torch.load_safetensors(os.path.join(REPO_ROOT, MODEL_REL))
    with safe_open(os.path.join(REPO_ROOT, INPUT_REL), "pt") as f:
        z, labels, official_full = f.get_tensor("z"), f.get_tensor("y"), f.get_tensor("sample_full")
        official_reuse = f.get_tensor("sample_reuse")
    diffusion = dit_torch.Diffusion(SPEC)
    full, _ = sample(model, diffusion, z, labels, None, 0)
    report = {"full_vs_official_full": float(f"{rel_l2(full, official_full):.3g}")}
    print(f"full compute vs the official code's: relative L2 {report['full_vs_official_full']}")
    tensors = {"z": z, "y": labels, "sample_full": full}
    settings = {}
    for name, policy, order, period, warmup in SETTINGS:
        out, fulls = sample(model, diffusion, z, labels,
                            lambda s, p=period, w=warmup: s < w or s % p == 0, order)
        tensors[f"sample_{name}"] = out
        err = float(f"{rel_l2(out, full):.4g}")
        settings[name] = {"policy": policy, "order": order, "period": period, "warmup": warmup,
                          "full_steps": fulls, "rel_l2_vs_full": err}
        print(f"{name}: full steps {fulls}, relative L2 against full compute {err}")
    # FORA at period 2 is what the official icc code's naive reuse (period 2) computes.
    report["fora_p2_vs_official_icc_reuse"] = float(f"{rel_l2(tensors['sample_fora_p2'], official_reuse):.3g}")
    print(f"fora period 2 vs the official icc code's reuse: relative L2 {report['fora_p2_vs_official_icc_reuse']}")
    os.makedirs(args.out, exist_ok=True)
    meta = {"format": "pt", "spec": SPEC, "cfg_scale": str(CFG_SCALE), "model": MODEL_REL,
            "settings": json.dumps(settings, sort_keys=True), "report": json.dumps(report, sort_keys=True)}
    dit_layouts.save_safetensors(tensors, os.path.join(args.out, "samples_hd72.safetensors"), meta)


if __name__ == "__main__":
    main()
