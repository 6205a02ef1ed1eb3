"""An ICC increment-calibrated ("inc") DiT step in eager PyTorch float32, for CPU timing baselines.

Follows dit-reference.md E.3-E.4 (ICC's `models_sp_step_decomp.py`, written from the reference, not
copied). A preceding full step caches, per block and per row, the input and output (bias included)
of the four block linears:

    qkv: x (B, N, C), y split into q, k, v (B, N, C) each    proj: x (B, N, C), y (B, N, C)
    fc1: x (B, N, C), y before GELU (B, N, 4C)               fc2:  x = GELU output (B, N, 4C), y (B, N, C)

The calibrated step then runs every block as in A.6 (adaLN recomputed from the current c, LayerNorm,
modulate, gated residuals) with each of q, k, v, proj, fc1, fc2 replaced by

    y = y_s + F.linear(F.linear(x - x_s, down), up)        down (r, in), up (out, r), no bias

and full softmax attention over the new q, k, v. q, k and v share one x_s, so x - x_s is formed once
per block, as in ICC. Patch embedding, the t/y embedders and the final layer run at full cost.
Cost per block and row: 18·N·C·r + 2·N²·C + 6·C² MACs (E.7 / G.2).

Works on any model with the official DiT layout: `tools/dit_torch.py`'s `DiT` or the official
`models.py` (timm `Attention`/`Mlp`), since it only reads the submodules both share.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LAYERS = ("q", "k", "v", "proj", "fc1", "fc2")


def _heads(attn) -> int:
    """Head count: timm's Attention calls it `num_heads`, tools/dit_torch.py's `heads`."""
    return getattr(attn, "num_heads", None) or attn.heads


def _ln(z: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(z, z.shape[-1:], eps=1e-6)  # no affine (A.6 step 3)


def _modulate(z: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return z * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def _embed(model, x, t, y):
    tok = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y, False)
    return tok, c


@torch.inference_mode()
def full_step(model, x, t, y):
    """A full forward that also returns the per-block caches (list of dicts keyed by LAYERS)."""
    tok, c = _embed(model, x, t, y)
    caches = []
    for blk in model.blocks:
        sh1, sc1, g1, sh2, sc2, g2 = blk.adaLN_modulation(c).chunk(6, dim=1)
        b, n, ch = tok.shape
        h = _heads(blk.attn)
        u = _modulate(_ln(tok), sh1, sc1)
        qkv = blk.attn.qkv(u)
        q, k, v = (s.contiguous() for s in qkv.split(ch, dim=-1))
        split = lambda z: z.view(b, n, h, ch // h).transpose(1, 2)
        o = F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(b, n, ch)
        a = blk.attn.proj(o)
        tok = tok + g1.unsqueeze(1) * a
        w = _modulate(_ln(tok), sh2, sc2)
        f1 = blk.mlp.fc1(w)
        g = F.gelu(f1, approximate="tanh")
        f2 = blk.mlp.fc2(g)
        tok = tok + g2.unsqueeze(1) * f2
        caches.append({"qkv_x": u, "q_y": q, "k_y": k, "v_y": v, "proj_x": o, "proj_y": a,
                       "fc1_x": w, "fc1_y": f1, "fc2_x": g, "fc2_y": f2})
    return model.unpatchify(model.final_layer(tok, c)), caches


def random_factors(model, rank: int, seed: int = 0):
    """Per block {layer: (down (r, in), up (out, r))}, N(0, 1/in) and N(0, 1/r) so outputs stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for blk in model.blocks:
        c = blk.attn.proj.in_features
        hid = blk.mlp.fc1.out_features
        dims = {"q": (c, c), "k": (c, c), "v": (c, c), "proj": (c, c), "fc1": (c, hid), "fc2": (hid, c)}
        f = {}
        for name in LAYERS:
            fin, fout = dims[name]
            down = torch.randn(rank, fin, generator=g) * fin ** -0.5
            up = torch.randn(fout, rank, generator=g) * rank ** -0.5
            f[name] = (down, up)
        out.append(f)
    return out


def _calib(d: torch.Tensor, y_s: torch.Tensor, f) -> torch.Tensor:
    down, up = f
    return y_s + F.linear(F.linear(d, down), up)


@torch.inference_mode()
def calibrated_step(model, caches, factors, x, t, y):
    """One increment-calibrated forward (E.4) against `caches` from `full_step`; caches are not updated."""
    tok, c = _embed(model, x, t, y)
    for blk, cs, f in zip(model.blocks, caches, factors):
        sh1, sc1, g1, sh2, sc2, g2 = blk.adaLN_modulation(c).chunk(6, dim=1)
        b, n, ch = tok.shape
        h = _heads(blk.attn)
        d = _modulate(_ln(tok), sh1, sc1) - cs["qkv_x"]
        q = _calib(d, cs["q_y"], f["q"])
        k = _calib(d, cs["k_y"], f["k"])
        v = _calib(d, cs["v_y"], f["v"])
        split = lambda z: z.view(b, n, h, ch // h).transpose(1, 2)
        o = F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(b, n, ch)
        a = _calib(o - cs["proj_x"], cs["proj_y"], f["proj"])
        tok = tok + g1.unsqueeze(1) * a
        w = _modulate(_ln(tok), sh2, sc2)
        hmid = _calib(w - cs["fc1_x"], cs["fc1_y"], f["fc1"])
        g = F.gelu(hmid, approximate="tanh")
        f2 = _calib(g - cs["fc2_x"], cs["fc2_y"], f["fc2"])
        tok = tok + g2.unsqueeze(1) * f2
    return model.unpatchify(model.final_layer(tok, c))


def inc_macs_per_row(n: int, c: int, depth: int, rank: int) -> int:
    """Block MACs of one calibrated step for one row (E.7; pre/post layers not included)."""
    return depth * (18 * n * c * rank + 2 * n * n * c + 6 * c * c)


def self_check() -> None:
    """Three checks on a small random model (seconds on one core):
    1. full_step reproduces model.forward;
    2. calibrated_step on the same inputs (every increment 0) reproduces the full output;
    3. on other inputs it differs, so the calibrated path is not a silent copy of the cache.
    """
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from dit_torch import DiT, DiTConfig

    torch.manual_seed(0)
    model = DiT(DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2,
                          num_heads=4, num_classes=1000)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.1)
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([500, 500])
    y = torch.tensor([3, 1000])
    with torch.inference_mode():
        ref = model(x, t, y)
    full, caches = full_step(model, x, t, y)
    assert ref.abs().max() > 0.1, "reference output is trivial"
    e1 = (full - ref).abs().max().item()
    f = random_factors(model, 16)
    same = calibrated_step(model, caches, f, x, t, y)
    e2 = (same - ref).abs().max().item()
    other = calibrated_step(model, caches, f, x + 0.1 * torch.randn_like(x), torch.tensor([480, 480]), y)
    e3 = (other - ref).abs().max().item()
    print(f"full vs forward {e1:.2e}; calibrated(same input) vs forward {e2:.2e}; "
          f"calibrated(other input) vs forward {e3:.2e}")
    assert e1 < 1e-5 and e2 < 1e-5 and e3 > 1e-3, "pytorch_icc_step self-check failed"


if __name__ == "__main__":
    self_check()
