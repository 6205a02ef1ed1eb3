"""PyTorch port of PixArt-α's transformer (diffusers' `PixArtTransformer2DModel`, norm_type
`ada_norm_single`, no micro-conditions) and of the two schedulers icdit runs it with, for the GPU
check's PyTorch baseline on a machine without diffusers.

Written from ../shared/docs/pixart-reference.md and a reading of diffusers' sources, not copied;
tools/check_pixart_torch.py compares it with diffusers 0.42.1 on tiny random configurations.
Parameter names equal diffusers' state dict (`pos_embed.proj.weight`,
`adaln_single.emb.timestep_embedder.linear_1.weight`, `transformer_blocks.{i}.attn1.to_q.weight`,
`transformer_blocks.{i}.ff.net.0.proj.weight`, `caption_projection.linear_1.weight`,
`scale_shift_table`, `proj_out.weight`, ...), so a diffusers state dict loads unchanged
(`load_state_dict(strict=True)`).

Contents:
  * `PixArtConfig`, `PixArt`: the transformer. `PixArt.forward(x, t, text, mask)` is one model
    call; `encode_caption` / `cross_kv` / `denoise` split it so that a sampler computes what
    depends on the caption only (its projection, the cross-attention K/V) once per request.
  * `DpmSolverPP`: DPM-Solver++ 2M as diffusers' `DPMSolverMultistepScheduler` computes it with
    PixArt's published scheduler config (midpoint, final sigma zero: the last step is first order).
  * `Ddim`: diffusers' `DDIMScheduler` with `clip_sample=False`, `set_alpha_to_one=False`, eta 0.
  * `guided_eps`: guidance on all output channels over a [negative, positive] batch, then the
    learned-variance half dropped.
  * `sample`: PixArtAlphaPipeline's denoising loop (no text encoder, no VAE).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclasses.dataclass
class PixArtConfig:
    """The `transformer/config.json` fields the forward uses, with diffusers' names.

    Defaults are PixArt-XL/2 at 512 px (sample_size 64); 256 px is sample_size 32.
    """

    sample_size: int = 64
    patch_size: int = 2
    in_channels: int = 4
    out_channels: int = 8
    num_layers: int = 28
    num_attention_heads: int = 16
    attention_head_dim: int = 72
    caption_channels: int = 4096
    cross_attention_dim: int = 1152
    norm_eps: float = 1e-6
    interpolation_scale: float | None = None

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_dict(cls, d: dict) -> "PixArtConfig":
        """From a diffusers config dict; settings this port does not implement are refused."""
        if d.get("norm_type", "ada_norm_single") != "ada_norm_single":
            raise ValueError(f"norm_type {d['norm_type']!r}: only 'ada_norm_single' (PixArt-α) is implemented")
        if d.get("use_additional_conditions"):
            raise ValueError("use_additional_conditions: the 1024-MS micro-conditions are not implemented")
        inner = d.get("num_attention_heads", 16) * d.get("attention_head_dim", 72)
        if d.get("cross_attention_dim") not in (None, inner):
            raise ValueError("cross_attention_dim must equal the inner width (heads x head_dim)")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names and v is not None})


def position_table(dim: int, grid: int, base_size: int, interpolation_scale: float) -> torch.Tensor:
    """The computed 2-D sin-cos table, (grid*grid, dim) float32, token n = row*grid + col.

    Positions are index / (grid / base_size) / interpolation_scale; the first dim/2 channels
    encode the column, the rest the row, each half [sin(p*w_k), cos(p*w_k)], w_k = 10000^(-k/(dim/4)).
    Evaluated in float64, then rounded once.
    """
    if dim % 4:
        raise ValueError(f"position table width {dim} is not a multiple of 4")
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (np.arange(quarter, dtype=np.float64) / quarter)
    pos = np.arange(grid, dtype=np.float64) / (grid / base_size) / interpolation_scale
    col, row = np.tile(pos, grid), np.repeat(pos, grid)

    def half(p):
        ang = p[:, None] * omega[None, :]
        return np.concatenate([np.sin(ang), np.cos(ang)], axis=1)

    return torch.from_numpy(np.concatenate([half(col), half(row)], axis=1)).float()


def timestep_features(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """[cos(t*f), sin(t*f)], f_i = exp(-ln(1e4) * i / (dim/2)), float32."""
    half = dim // 2
    f = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    a = t.float()[:, None] * f[None, :]
    return torch.cat([torch.cos(a), torch.sin(a)], dim=-1)


def layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=eps)


class _PatchEmbed(nn.Module):
    def __init__(self, cfg: PixArtConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_channels, cfg.inner_dim, cfg.patch_size, stride=cfg.patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, C), token n = row*grid + col


class _TimestepMlp(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.linear_1 = nn.Linear(256, c)
        self.linear_2 = nn.Linear(c, c)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(f)))


class _TimestepEmb(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.timestep_embedder = _TimestepMlp(c)


class _AdaLnSingle(nn.Module):
    """emb = MLP([cos, sin] features of t); t_mod = linear(SiLU(emb)) (6C, shared by all blocks)."""

    def __init__(self, c: int):
        super().__init__()
        self.emb = _TimestepEmb(c)
        self.linear = nn.Linear(c, 6 * c)

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.emb.timestep_embedder(timestep_features(t).to(dtype))
        return self.linear(F.silu(emb)), emb


class _CaptionProjection(nn.Module):
    def __init__(self, cin: int, c: int):
        super().__init__()
        self.linear_1 = nn.Linear(cin, c)
        self.linear_2 = nn.Linear(c, c)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(text), approximate="tanh"))


class Attention(nn.Module):
    """q from x, k/v from `ctx` (x itself for self-attention); biases on every projection;
    `to_out` is a list so that the output projection is named `to_out.0` as in diffusers."""

    def __init__(self, c: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(c, c)
        self.to_k = nn.Linear(c, c)
        self.to_v = nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c)])

    def split(self, y: torch.Tensor) -> torch.Tensor:
        b, n, c = y.shape
        return y.view(b, n, self.heads, c // self.heads).transpose(1, 2)  # (B, H, N, D)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """softmax(q kᵀ/√D + bias) v over split heads, merged back to (B, N, C) (before to_out)."""
        o = F.scaled_dot_product_attention(self.split(q), self.split(k), self.split(v), attn_mask=bias)
        b, h, n, d = o.shape
        return o.transpose(1, 2).reshape(b, n, h * d)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor | None = None, bias: torch.Tensor | None = None):
        ctx = x if ctx is None else ctx
        return self.to_out[0](self.attend(self.to_q(x), self.to_k(ctx), self.to_v(ctx), bias))


class _GeluProj(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.proj = nn.Linear(cin, cout)


class FeedForward(nn.Module):
    """net.2(gelu_tanh(net.0.proj(x))); net.1 (dropout) holds no parameters."""

    def __init__(self, c: int):
        super().__init__()
        self.net = nn.ModuleList([_GeluProj(c, 4 * c), nn.Identity(), nn.Linear(4 * c, c)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](F.gelu(self.net[0].proj(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: PixArtConfig):
        super().__init__()
        c = cfg.inner_dim
        self.eps = cfg.norm_eps
        self.scale_shift_table = nn.Parameter(torch.zeros(6, c))
        self.attn1 = Attention(c, cfg.num_attention_heads)
        self.attn2 = Attention(c, cfg.num_attention_heads)
        self.ff = FeedForward(c)

    def modulation(self, t_mod: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, each (B, 1, C)."""
        b, c = t_mod.shape[0], self.scale_shift_table.shape[1]
        return (self.scale_shift_table[None] + t_mod.view(b, 6, c)).chunk(6, dim=1)

    def forward(self, x, t_mod, ctx, bias, kv=None):
        """kv: this block's cross-attention (K, V) when computed once per request, else None."""
        sh1, sc1, g1, sh2, sc2, g2 = self.modulation(t_mod)
        x = x + g1 * self.attn1(layer_norm(x, self.eps) * (1 + sc1) + sh1)
        a2 = self.attn2  # no norm, no gate
        x = x + (a2(x, ctx, bias) if kv is None else a2.to_out[0](a2.attend(a2.to_q(x), kv[0], kv[1], bias)))
        return x + g2 * self.ff(layer_norm(x, self.eps) * (1 + sc2) + sh2)


class PixArt(nn.Module):
    def __init__(self, cfg: PixArtConfig):
        super().__init__()
        self.cfg = cfg
        c = cfg.inner_dim
        self.grid = cfg.sample_size // cfg.patch_size
        self.pos_embed = _PatchEmbed(cfg)
        interp = cfg.interpolation_scale if cfg.interpolation_scale is not None else max(cfg.sample_size // 64, 1)
        table = position_table(c, self.grid, cfg.sample_size // cfg.patch_size, interp)
        # Computed, not a weight: a non-persistent buffer stays out of the state dict.
        self.register_buffer("pos_table", table[None], persistent=False)
        self.transformer_blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.scale_shift_table = nn.Parameter(torch.zeros(2, c))
        self.proj_out = nn.Linear(c, cfg.patch_size**2 * cfg.out_channels)
        self.adaln_single = _AdaLnSingle(c)
        self.caption_projection = _CaptionProjection(cfg.caption_channels, c)

    @staticmethod
    def mask_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(B, L) 0/1 caption mask -> the additive (1 - mask) * -10000 bias, (B, 1, 1, L)."""
        return ((1 - mask.to(dtype)) * -10000.0)[:, None, None, :]

    def encode_caption(self, text: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What depends on the caption only: its projection (every token, padded ones too) and the
        cross-attention bias. Constant over a request's steps."""
        dtype = self.proj_out.weight.dtype
        return self.caption_projection(text.to(dtype)), self.mask_bias(mask, dtype)

    def cross_kv(self, ctx: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every block's cross-attention K and V: they depend on the caption only."""
        return [(b.attn2.to_k(ctx), b.attn2.to_v(ctx)) for b in self.transformer_blocks]

    def embed(self, x: torch.Tensor, t: torch.Tensor):
        """Tokens, t_mod and the un-SiLU'd timestep embedding."""
        dtype = self.proj_out.weight.dtype
        tok = (self.pos_embed(x.to(dtype)) + self.pos_table).to(dtype)
        t_mod, emb = self.adaln_single(t, dtype)
        return tok, t_mod, emb

    def head(self, tok: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Final layer and unpatchify: (B, N, C) -> (B, out_channels, H, W)."""
        shift, scale = (self.scale_shift_table[None] + emb[:, None]).chunk(2, dim=1)
        y = self.proj_out(layer_norm(tok, self.cfg.norm_eps) * (1 + scale) + shift)
        b, g, p, co = y.shape[0], self.grid, self.cfg.patch_size, self.cfg.out_channels
        y = y.reshape(b, g, g, p, p, co).permute(0, 5, 1, 3, 2, 4)  # (B, c, h, p, w, q)
        return y.reshape(b, co, g * p, g * p)

    def denoise(self, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor, bias: torch.Tensor,
                kv: list | None = None) -> torch.Tensor:
        """The model call after `encode_caption`; `kv` from `cross_kv` (else computed here)."""
        tok, t_mod, emb = self.embed(x, t)
        for i, blk in enumerate(self.transformer_blocks):
            tok = blk(tok, t_mod, ctx, bias, None if kv is None else kv[i])
        return self.head(tok, emb)

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, Cin, H, W), t (B,) int, text (B, L, caption_channels), mask (B, L) 0/1."""
        ctx, bias = self.encode_caption(text, mask)
        return self.denoise(x, t, ctx, bias)


# ----------------------------------------------------------------------------------------------
# Schedulers (train schedule: float32 linspace(1e-4, 0.02, 1000) betas, float32 cumprod)
# ----------------------------------------------------------------------------------------------

def alphas_cumprod(train_steps: int = 1000) -> torch.Tensor:
    betas = torch.linspace(1e-4, 0.02, train_steps, dtype=torch.float32)
    return torch.cumprod(1.0 - betas, dim=0)


class DpmSolverPP:
    """DPM-Solver++ 2M (data prediction, midpoint rule), diffusers' numerics with PixArt's config:
    timesteps round(linspace(0, 999, n+1)) reversed without the last; sigma = sqrt((1-ab)/ab) at
    them, then 0; first order at the first and the last step, second order between.
    Python floats for the per-step coefficients (computed once from float32 tensors)."""

    def __init__(self, steps: int = 20, train_steps: int = 1000):
        ab = alphas_cumprod(train_steps)
        ts = np.linspace(0, train_steps - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
        sig_all = (((1 - ab) / ab) ** 0.5).numpy()
        sig = np.interp(ts, np.arange(len(sig_all)), sig_all)
        sig = torch.from_numpy(np.concatenate([sig, [0.0]]).astype(np.float32))
        alpha = 1.0 / torch.sqrt(sig**2 + 1)
        sigma_t = sig * alpha
        lam = torch.log(alpha) - torch.log(sigma_t)  # +inf at the final sigma 0
        self.timesteps = [int(t) for t in ts]
        self.alpha, self.sigma, self.lam = alpha.tolist(), sigma_t.tolist(), lam.tolist()
        self.steps = steps
        self.reset()

    def reset(self):
        self.prev_x0 = None

    def x0(self, i: int, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return (x - self.sigma[i] * eps) / self.alpha[i]

    def step(self, i: int, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x at step i (of timesteps[i]) -> x at step i+1, from the model's epsilon."""
        m0 = self.x0(i, x, eps)
        a_t, s_t, s_s = self.alpha[i + 1], self.sigma[i + 1], self.sigma[i]
        h = self.lam[i + 1] - self.lam[i]
        phi = math.expm1(-h) if math.isfinite(h) else -1.0  # exp(-h) - 1
        if self.prev_x0 is None or i == self.steps - 1:
            out = (s_t / s_s) * x - (a_t * phi) * m0
        else:
            r = (self.lam[i] - self.lam[i - 1]) / h
            d1 = (m0 - self.prev_x0) / r
            out = (s_t / s_s) * x - (a_t * phi) * m0 - (0.5 * a_t * phi) * d1
        self.prev_x0 = m0
        return out


class Ddim:
    """DDIM, eta 0: timesteps round(linspace(0, 999, n)) reversed; step t goes to t - 1000 // n
    (alpha-bar[0] below 0)."""

    def __init__(self, steps: int = 20, train_steps: int = 1000):
        ab = alphas_cumprod(train_steps)
        ts = np.linspace(0, train_steps - 1, steps).round()[::-1].astype(np.int64)
        self.timesteps = [int(t) for t in ts]
        jump = train_steps // steps
        self.ab = [float(ab[t]) for t in ts]
        self.ab_prev = [float(ab[t - jump]) if t - jump >= 0 else float(ab[0]) for t in ts]
        self.steps = steps

    def reset(self):
        pass

    def x0(self, i: int, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return (x - math.sqrt(1 - self.ab[i]) * eps) / math.sqrt(self.ab[i])

    def step(self, i: int, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return math.sqrt(self.ab_prev[i]) * self.x0(i, x, eps) + math.sqrt(1 - self.ab_prev[i]) * eps


def guided_eps(out: torch.Tensor, scale: float, in_channels: int) -> torch.Tensor:
    """Model output over [negative; positive] -> u + s(c - u) on all channels, variance half dropped.
    With scale <= 1 (no guidance) `out` is the positive batch only."""
    if scale > 1.0:
        u, c = out.float().chunk(2)
        out = u + scale * (c - u)
    return out.float()[:, :in_channels]


@torch.no_grad()
def sample(model: PixArt, scheduler, z, text, mask, neg_text=None, neg_mask=None, scale: float = 4.5,
           step_fn=None, trajectory: list | None = None) -> torch.Tensor:
    """PixArtAlphaPipeline's loop from noise z (B, C, H, W) float32: guidance when scale > 1 with
    the batch [negative, positive]; the caption projection and every block's cross-attention K/V
    are computed once. `step_fn(x, t, ctx, bias, i)` replaces the model call (caching);
    `trajectory` collects x after every step."""
    guided = scale > 1.0
    if guided:
        text, mask = torch.cat([neg_text, text]), torch.cat([neg_mask, mask])
    ctx, bias = model.encode_caption(text, mask)
    kv = model.cross_kv(ctx)
    call = step_fn or (lambda xx, tt, c_, b_, i: model.denoise(xx, tt, c_, b_, kv))
    dtype = model.proj_out.weight.dtype
    scheduler.reset()
    x = z.float()
    rows = ctx.shape[0]
    for i, t in enumerate(scheduler.timesteps):
        xx = torch.cat([x, x]) if guided else x
        tt = torch.full((rows,), t, dtype=torch.long, device=x.device)
        eps = guided_eps(call(xx.to(dtype), tt, ctx, bias, i), scale, z.shape[1])
        x = scheduler.step(i, x, eps)
        if trajectory is not None:
            trajectory.append(x.clone())
    return x
