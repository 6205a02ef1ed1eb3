"""PyTorch port of the class-conditional DiT model and of the Gaussian diffusion it trains with.

Written from the numerics in docs/dit-reference.md (parts A, B and D), not copied from the official
code; tools/check_dit_torch.py verifies it against an official checkout. Module and parameter names
match the official state dict (`pos_embed`, `x_embedder.proj.weight`, `blocks.{i}.attn.qkv.weight`,
`final_layer.adaLN_modulation.1.weight`, ...), so a state dict moves between the two unchanged.

Contents:
  * `DiT` and `DiTConfig`: the model (reference A.1-A.9), float32.
  * `Diffusion`: linear betas in float64 (D.1-D.2), optional respacing (D.3), `q_sample`,
    `training_losses` (MSE on epsilon + variational-bound term for the learned-range variance with the
    mean frozen; discretized Gaussian NLL at t = 0) and DDPM / DDIM samplers with classifier-free
    guidance over all channels (pixel-space RGB: every channel is an image channel).
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class DiTConfig:
    """Constructor arguments of the official `DiT` class, with the same names."""

    input_size: int = 32
    patch_size: int = 4
    in_channels: int = 3
    hidden_size: int = 144
    depth: int = 8
    num_heads: int = 2
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 10
    learn_sigma: bool = True

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "DiTConfig":
        return cls(**json.loads(text))


def sincos_pos_embed_2d(dim: int, grid: int) -> np.ndarray:
    """Fixed 2-D sin-cos position table, shape (grid*grid, dim), float64 (reference A.2).

    Token n = i*grid + j (i = patch row, j = patch column). The first dim/2 channels encode the
    column j, the second dim/2 the row i; each half is [sin(pos*w), cos(pos*w)] with
    w_k = 10000^(-k/(dim/4)).
    """
    assert dim % 4 == 0, "pos-embed width must be a multiple of 4"
    quarter = dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    idx = np.arange(grid, dtype=np.float32).astype(np.float64)
    col = np.tile(idx, grid)            # j for token n
    row = np.repeat(idx, grid)          # i for token n

    def half(pos: np.ndarray) -> np.ndarray:
        ang = pos[:, None] * omega[None, :]
        return np.concatenate([np.sin(ang), np.cos(ang)], axis=1)

    return np.concatenate([half(col), half(row)], axis=1)


def timestep_frequencies(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal timestep features (reference A.3): [cos(t*f), sin(t*f)], f_k = exp(-ln(P)*k/half)."""
    half = dim // 2
    # Same float32 evaluation order as the official code: product, divide by half, then exp.
    k = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(-math.log(max_period) * k / half)
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation, broadcast over tokens: x*(1+scale) + shift."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens via a strided conv (reference A.1)."""

    def __init__(self, patch: int, cin: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(cin, dim, kernel_size=patch, stride=patch, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, C), token n = row*G + col


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_frequencies(t, self.freq_dim))


class LabelEmbedder(nn.Module):
    """Class table with one extra row (index num_classes) for the null label used by CFG."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + (1 if dropout_prob > 0 else 0), dim)

    def forward(self, y: torch.Tensor, train: bool) -> torch.Tensor:
        if train and self.dropout_prob > 0:
            drop = torch.rand(y.shape[0], device=y.device) < self.dropout_prob
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return self.embedding_table(y)


class Attention(nn.Module):
    """Multi-head self-attention; qkv output columns are [q | k | v], each head-contiguous."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        assert dim % heads == 0
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                  # each (B, H, N, D)
        o = F.scaled_dot_product_attention(q, k, v)              # softmax(q k^T / sqrt(D)) v
        return self.proj(o.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block (reference A.6)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.attn = Attention(dim, heads)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        # Index 0 is the SiLU, so the linear is `adaLN_modulation.1` as in the official layout.
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
        ln = lambda z: F.layer_norm(z, z.shape[-1:], eps=1e-6)   # no affine parameters
        x = x + g1.unsqueeze(1) * self.attn(modulate(ln(x), sh1, sc1))
        x = x + g2.unsqueeze(1) * self.mlp(modulate(ln(x), sh2, sc2))
        return x


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch: int, cout: int):
        super().__init__()
        self.linear = nn.Linear(dim, patch * patch * cout)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(F.layer_norm(x, x.shape[-1:], eps=1e-6), shift, scale))


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        self.in_channels = cfg.in_channels
        self.out_channels = cfg.in_channels * (2 if cfg.learn_sigma else 1)
        self.patch = cfg.patch_size
        self.grid = cfg.input_size // cfg.patch_size
        c = cfg.hidden_size
        # Registered first so that `pos_embed` is the first state-dict key, as in the official file.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid * self.grid, c), requires_grad=False)
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, c)
        self.t_embedder = TimestepEmbedder(c)
        self.y_embedder = LabelEmbedder(cfg.num_classes, c, cfg.class_dropout_prob)
        self.blocks = nn.ModuleList(DiTBlock(c, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(c, cfg.patch_size, self.out_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official initialisation: xavier linears with zero bias, adaLN-Zero, zero output layer."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        pe = sincos_pos_embed_2d(self.cfg.hidden_size, self.grid)
        self.pos_embed.data.copy_(torch.from_numpy(pe).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a (C, Cin*p*p) linear map
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for blk in self.blocks:
            nn.init.zeros_(blk.adaLN_modulation[1].weight)
            nn.init.zeros_(blk.adaLN_modulation[1].bias)
        for p in (self.final_layer.adaLN_modulation[1].weight, self.final_layer.adaLN_modulation[1].bias,
                  self.final_layer.linear.weight, self.final_layer.linear.bias):
            nn.init.zeros_(p)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*Cout) -> (B, Cout, G*p, G*p); token features are ordered (a, b, channel)."""
        b, g, p, co = x.shape[0], self.grid, self.patch, self.out_channels
        x = x.reshape(b, g, g, p, p, co).permute(0, 5, 1, 3, 2, 4)  # (B, Cout, i, a, j, b)
        return x.reshape(b, co, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        tok = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        for blk in self.blocks:
            tok = blk(tok, c)
        return self.unpatchify(self.final_layer(tok, c))

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
        """Classifier-free guidance over a [cond; uncond] batch; all `in_channels` channels are guided.

        The official code guides only channels 0..2 (of 4 latent channels). With 3-channel pixel input
        that is every channel, so guiding all `in_channels` is the same rule. Like the official code,
        the first half of x is fed to both halves; the variance channels come from each row unguided.
        """
        half = x[: x.shape[0] // 2]
        out = self(torch.cat([half, half], 0), t, y)
        ci = self.in_channels
        eps, rest = out[:, :ci], out[:, ci:]
        e_c, e_u = eps.chunk(2, 0)
        g = e_u + scale * (e_c - e_u)
        return torch.cat([torch.cat([g, g], 0), rest], 1)


# ----------------------------------------------------------------------------------------------
# Diffusion
# ----------------------------------------------------------------------------------------------

def linear_betas(steps: int = 1000) -> np.ndarray:
    """Linear schedule 1e-4 .. 0.02 (scaled by 1000/steps), float64 (reference D.1)."""
    s = 1000.0 / steps
    return np.linspace(s * 1e-4, s * 0.02, steps, dtype=np.float64)


def space_timesteps(total: int, spec: str) -> list[int]:
    """Kept original timesteps, ascending (reference D.3). spec: "N" or "ddimN"."""
    if spec.startswith("ddim"):
        n = int(spec[4:])
        for stride in range(1, total):
            if len(range(0, total, stride)) == n:
                return list(range(0, total, stride))
        raise ValueError(f"no integer stride gives {n} steps")
    n = int(spec)
    if n == 1:
        return [0]
    frac = (total - 1) / (n - 1)
    cur, kept = 0.0, []
    for _ in range(n):
        kept.append(round(cur))  # Python round: half to even, as the reference
        cur += frac
    return sorted(set(kept))


def _gather(arr: np.ndarray, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """Pick float64 table entries for each batch row and cast to float32, shaped to broadcast."""
    v = torch.from_numpy(arr).to(t.device)[t].float()
    return v.reshape(-1, *([1] * (ndim - 1)))


def normal_kl(m1, lv1, m2, lv2):
    """KL(N(m1, e^lv1) || N(m2, e^lv2)) elementwise, nats."""
    return 0.5 * (-1.0 + lv2 - lv1 + torch.exp(lv1 - lv2) + (m1 - m2) ** 2 * torch.exp(-lv2))


def _approx_std_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_loglik(x, mean, log_scale):
    """log P(x) of 8-bit data in [-1, 1] under N(mean, e^(2 log_scale)), bins of width 2/255, nats.

    The outermost bins extend to -inf / +inf.
    """
    d = x - mean
    inv = torch.exp(-log_scale)
    cdf_hi = _approx_std_normal_cdf(inv * (d + 1.0 / 255.0))
    cdf_lo = _approx_std_normal_cdf(inv * (d - 1.0 / 255.0))
    log_hi = torch.log(cdf_hi.clamp(min=1e-12))
    log_1m_lo = torch.log((1.0 - cdf_lo).clamp(min=1e-12))
    log_mid = torch.log((cdf_hi - cdf_lo).clamp(min=1e-12))
    return torch.where(x < -0.999, log_hi, torch.where(x > 0.999, log_1m_lo, log_mid))


def _mean_flat(x):
    return x.mean(dim=tuple(range(1, x.ndim)))


class Diffusion:
    """Gaussian diffusion, epsilon prediction, learned-range variance (reference D).

    With `respacing` (e.g. "250", "ddim50") the betas are rebuilt for the kept timesteps and the
    model receives the original timestep index; indices `k` of every method here are spaced indices.
    """

    def __init__(self, respacing: str | None = None, steps: int = 1000):
        base = linear_betas(steps)
        if respacing:
            keep = space_timesteps(steps, respacing)
            abar = np.cumprod(1.0 - base)
            prev, betas = 1.0, []
            for t in keep:
                betas.append(1.0 - abar[t] / prev)
                prev = abar[t]
            self.timestep_map = np.array(keep, dtype=np.int64)
            base = np.array(betas, dtype=np.float64)
        else:
            self.timestep_map = np.arange(steps, dtype=np.int64)
        b = base
        self.betas = b
        self.num_timesteps = len(b)
        a = 1.0 - b
        abar = np.cumprod(a)
        abar_prev = np.append(1.0, abar[:-1])
        self.alphas_cumprod, self.alphas_cumprod_prev = abar, abar_prev
        self.sqrt_abar = np.sqrt(abar)
        self.sqrt_1m_abar = np.sqrt(1.0 - abar)
        self.sqrt_recip_abar = np.sqrt(1.0 / abar)
        self.sqrt_recipm1_abar = np.sqrt(1.0 / abar - 1.0)
        post_var = b * (1.0 - abar_prev) / (1.0 - abar)
        self.post_var = post_var
        # post_var[0] is 0; its log borrows index 1.
        self.post_logvar_clipped = np.log(np.append(post_var[1], post_var[1:]))
        self.post_coef1 = b * np.sqrt(abar_prev) / (1.0 - abar)
        self.post_coef2 = (1.0 - abar_prev) * np.sqrt(a) / (1.0 - abar)
        self.log_betas = np.log(b)

    # -- forward process ------------------------------------------------------------------------

    def q_sample(self, x0, k, noise):
        n = x0.ndim
        return _gather(self.sqrt_abar, k, n) * x0 + _gather(self.sqrt_1m_abar, k, n) * noise

    def q_posterior(self, x0, xt, k):
        n = xt.ndim
        mean = _gather(self.post_coef1, k, n) * x0 + _gather(self.post_coef2, k, n) * xt
        return mean, _gather(self.post_logvar_clipped, k, n)

    # -- reverse process from a model output ---------------------------------------------------

    def p_mean_logvar(self, out, xt, k):
        """Split the model output into eps and v; learned-range log-variance; x0 and posterior mean."""
        n, ci = xt.ndim, xt.shape[1]
        eps, v = out[:, :ci], out[:, ci:]
        lo = _gather(self.post_logvar_clipped, k, n)
        hi = _gather(self.log_betas, k, n)
        frac = (v + 1) / 2
        logvar = frac * hi + (1 - frac) * lo
        x0 = _gather(self.sqrt_recip_abar, k, n) * xt - _gather(self.sqrt_recipm1_abar, k, n) * eps
        mean, _ = self.q_posterior(x0, xt, k)
        return mean, logvar, x0

    def training_losses(self, model, x0, k, y, noise):
        """Hybrid loss per sample: {"mse", "vb", "loss"}; vb in bits/dim, mean frozen for vb.

        `model(x, t, y)` receives the original timestep (self.timestep_map[k]).
        """
        xt = self.q_sample(x0, k, noise)
        t = torch.from_numpy(self.timestep_map).to(k.device)[k]
        out = model(xt, t, y)
        ci = x0.shape[1]
        eps = out[:, :ci]
        frozen = torch.cat([eps.detach(), out[:, ci:]], 1)
        true_mean, true_logvar = self.q_posterior(x0, xt, k)
        mean, logvar, _ = self.p_mean_logvar(frozen, xt, k)
        kl = _mean_flat(normal_kl(true_mean, true_logvar, mean, logvar)) / math.log(2.0)
        nll = -_mean_flat(discretized_gaussian_loglik(x0, mean, 0.5 * logvar)) / math.log(2.0)
        vb = torch.where(k == 0, nll, kl)
        mse = _mean_flat((noise - eps) ** 2)
        return {"mse": mse, "vb": vb, "loss": mse + vb}

    # -- samplers --------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, model, z, labels, cfg_scale=4.0, method="ddpm", generator=None, null_class=None):
        """Class-conditional samples from noise z (n, C, H, W); returns x0 in roughly [-1, 1].

        With cfg_scale > 1 the batch is doubled as [cond; uncond] with the null label
        (`null_class`, default model.cfg.num_classes) and guided via `forward_with_cfg`.
        method: "ddpm" (learned-range variance) or "ddim" (eta = 0).
        """
        n = z.shape[0]
        use_cfg = cfg_scale > 1.0
        if use_cfg:
            null = model.cfg.num_classes if null_class is None else null_class
            x = torch.cat([z, z], 0)
            y = torch.cat([labels, torch.full_like(labels, null)], 0)
            fn = lambda xx, tt: model.forward_with_cfg(xx, tt, y, cfg_scale)
        else:
            x, y = z, labels
            fn = lambda xx, tt: model(xx, tt, y)
        tmap = torch.from_numpy(self.timestep_map)
        for ki in reversed(range(self.num_timesteps)):
            k = torch.full((x.shape[0],), ki, dtype=torch.long)
            out = fn(x, tmap[k])
            mean, logvar, x0 = self.p_mean_logvar(out, x, k)
            noise = torch.randn(x.shape, generator=generator)
            if method == "ddpm":
                x = mean + (torch.exp(0.5 * logvar) * noise if ki > 0 else 0.0)
            elif method == "ddim":
                nd = x.ndim
                eps = (_gather(self.sqrt_recip_abar, k, nd) * x - x0) / _gather(self.sqrt_recipm1_abar, k, nd)
                ap = _gather(self.alphas_cumprod_prev, k, nd)
                x = x0 * torch.sqrt(ap) + torch.sqrt(1 - ap) * eps
            else:
                raise ValueError(method)
        return x[:n]


# ----------------------------------------------------------------------------------------------
# Weights I/O and a sampling CLI
# ----------------------------------------------------------------------------------------------

def load_safetensors(path: str) -> tuple[DiT, dict]:
    """Build a DiT from an icdit/official-layout safetensors file (config from `dit_config` metadata).

    Tensors stored as f16/bf16 are upcast to float32. Returns (model in eval mode, metadata).
    """
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
        sd = {k: f.get_tensor(k).float() for k in f.keys()}
    if "dit_config" not in meta:
        raise ValueError(f"{path}: no 'dit_config' metadata")
    model = DiT(DiTConfig.from_json(meta["dit_config"]))
    model.load_state_dict(sd, strict=True)
    return model.eval(), meta


def _main() -> None:
    import argparse
    import pathlib
    import sys

    ap = argparse.ArgumentParser(description="Sample a class-conditional grid (one row per class) from a "
                                             "pixel-space DiT safetensors file and save it as a PNG.")
    ap.add_argument("--weights", default="weights/icdit-shapes-32.safetensors")
    ap.add_argument("--out", required=True)
    ap.add_argument("--per-class", type=int, default=8)
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--steps", default="250", help='respacing: "250", "100", "ddim50", ...')
    ap.add_argument("--method", default="ddpm", choices=["ddpm", "ddim"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, meta = load_safetensors(args.weights)
    if meta.get("icdit_space", "pixel") != "pixel":
        raise SystemExit("this CLI only writes pixel-space models' samples")
    g = torch.Generator().manual_seed(args.seed)
    k = model.cfg.num_classes
    labels = torch.arange(k).repeat_interleave(args.per_class)
    s = model.cfg.input_size
    z = torch.randn(len(labels), model.cfg.in_channels, s, s, generator=g)
    x = Diffusion(args.steps).sample(model, z, labels, cfg_scale=args.cfg, method=args.method, generator=g)
    img = ((x.clamp(-1, 1) + 1) * 127.5 + 0.5).floor().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    import make_dataset

    make_dataset.save_grid(img, k, args.out)
    names = json.loads(meta.get("icdit_class_names", "[]"))
    print(f"wrote {args.out}: rows = {', '.join(names) if names else k}")


if __name__ == "__main__":
    _main()
