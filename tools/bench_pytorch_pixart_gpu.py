#!/usr/bin/env python3
"""PyTorch GPU baseline for icdit's PixArt-α: PixArt-XL/2 (28 blocks, hidden 1152, 16 heads of 72,
caption 120 tokens of width 4096) with seeded random weights (never downloaded), through our port
tools/pixart_torch.py (checked against diffusers by tools/check_pixart_torch.py: the GPU machine has
PyTorch but not diffusers). The T5 encoder is not timed: the caption embeddings are random.

Sizes (--sizes): 256 px (sample_size 32, 256 tokens) and 512 px (sample_size 64, 1024 tokens).

Variants (CUDA events after warm-up; medians):
  fp16          fp16 eager (model.half()), as PixArtAlphaPipeline runs with torch_dtype=float16
  fp16-compile  fp16 with the transformer's denoising part under torch.compile (--compile-mode,
                inductor), in a child process per size so that --compile-timeout can stop a long
                compile (the CPU smoke test uses the aot_eager backend: no C++ compile)

Measurements per variant and size:
  forward   one model call at model batch 2 (one image with guidance): caption projection,
            cross-attention K/V and the transformer, what diffusers' forward computes (torch.compile
            compiles the part after the K/V)
  sample    --steps DPM-Solver++ 2M steps (PixArt's scheduler) with guidance --cfg, end to end
            (model and sampler arithmetic; no text encoder, no VAE) at each image batch of
            --batches (model batch 2n). The caption projection and the cross-attention K/V are
            computed once per request, as icdit does (diffusers' pipeline computes them at every
            step: 6.5 % of a 256-px step's MACs, 1.6 % at 512 px)
and, in fp16 eager, increment-calibrated caching on PixArt's cached layer set
(../shared/docs/pixart-reference.md: attn1 q, k, v, out; attn2 q, out; ff.net.0.proj, ff.net.2):
  icc-full        a full forward that keeps every cached linear's input and output
  icc-calibrated  each cached linear as y_s + up·(down·(x − x_s)) with random rank --rank factors;
                  attention (self and cross) recomputed; attn2 K/V computed once per request
  icc-reuse       naive reuse: the three sublayer outputs taken from the cache under this step's gates
  icc-sample / reuse-sample  the DPM-Solver++ loop with period --period (full, inc, full, ...)
MACs per row are counted from the shapes (`macs`), so the method's savings show against its time.

Peak memory is torch.cuda.max_memory_allocated during each measurement. --json writes everything;
a table is printed last, after the line "== bench_pytorch_pixart_gpu results ==". --budget bounds
the whole run: a measurement that would not fit is skipped and reported as such.

    python3 tools/bench_pytorch_pixart_gpu.py --sizes 256,512 --json out/pixart.json
    python3 tools/bench_pytorch_pixart_gpu.py --device cpu --quick     # smoke test, no GPU (< 60 s)
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# The baselines' timing, budget, compile-child and result machinery (same JSON fields as DiT's).
from bench_pytorch_common import (Budget, Clock, add_output_args, add_timing_args, apply_quick,  # noqa: E402
                                  compiled_caller, finish, first_call, progress_writer, record, rel_err,
                                  run_compile_child, run_info, set_tf32)
from pixart_torch import DpmSolverPP, PixArt, PixArtConfig, guided_eps, layer_norm  # noqa: E402

TABLE_MARK = "== bench_pytorch_pixart_gpu results =="
CACHED = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_out.0",
          "ff.net.0.proj", "ff.net.2")


# ---- model, inputs, costs -----------------------------------------------------------------------

def make_config(args, size: int) -> PixArtConfig:
    if size % 16:
        raise SystemExit(f"--sizes: {size} px is not a multiple of 16 (latent / patch 2)")
    return PixArtConfig(sample_size=size // 8, num_layers=args.depth, num_attention_heads=args.heads,
                        attention_head_dim=72, caption_channels=args.caption_channels,
                        cross_attention_dim=72 * args.heads)


def build_model(cfg: PixArtConfig, device: torch.device, seed: int) -> PixArt:
    """Every weight from N(0, 0.02) by a generator on `device` (no zeros for kernels to skip)."""
    with torch.device(device):
        model = PixArt(cfg)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen)
    return model.eval().requires_grad_(False)


def macs(cfg: PixArtConfig, tokens: int, kind: str = "full", rank: int = 128) -> int:
    """MACs of one model row and step, the caption projection excluded (`caption_macs`). full: with
    the cross-attention K/V; full-kv-once, calibrated, reuse: without them (once per request)."""
    c, n, l = cfg.inner_dim, (cfg.sample_size // cfg.patch_size) ** 2, tokens
    attn = 2 * n * n * c + 2 * n * l * c
    block = {"full": 14 * n * c * c + 2 * l * c * c + attn,
             "full-kv-once": 14 * n * c * c + attn,
             "calibrated": 22 * n * rank * c + attn,
             "reuse": 0}[kind]
    p = cfg.patch_size
    pre_post = n * cfg.in_channels * p * p * c + 256 * c + c * c + 6 * c * c + n * c * p * p * cfg.out_channels
    return cfg.num_layers * block + pre_post


def caption_macs(cfg: PixArtConfig, tokens: int) -> int:
    """Per request and row: the caption projection and every block's cross-attention K/V."""
    c = cfg.inner_dim
    return tokens * (cfg.caption_channels * c + c * c) + cfg.num_layers * 2 * tokens * c * c


def inputs(cfg: PixArtConfig, images: int, tokens: int, device, seed: int):
    """Noise z (n, 4, S, S); caption embeddings [negative; positive] (2n, L, D) and masks (2n, L):
    the negative prompt "" is one token ([1, 0, ...]), the positive ones 20 tokens. Drawn on the CPU."""
    g = torch.Generator().manual_seed(seed)
    s = cfg.sample_size
    z = torch.randn(images, cfg.in_channels, s, s, generator=g)
    text = torch.randn(2 * images, tokens, cfg.caption_channels, generator=g) * 0.2
    mask = torch.zeros(2 * images, tokens, dtype=torch.long)
    mask[:images, :1] = 1
    mask[images:, : min(20, tokens)] = 1
    return z.to(device), text.to(device), mask.to(device)


class Sampler:
    """PixArtAlphaPipeline's guided DPM-Solver++ loop (tools/pixart_torch.sample) with the timestep
    tensors made once, so that the loop does no host-device traffic."""

    def __init__(self, steps: int, cfg_scale: float, rows: int, device):
        self.sched = DpmSolverPP(steps)
        self.ts = [torch.full((rows,), t, dtype=torch.long, device=device) for t in self.sched.timesteps]
        self.scale = cfg_scale

    @property
    def steps(self):
        return self.sched.steps

    def run(self, step_fn, z, ctx, bias, dtype):
        """step_fn(xx, t, ctx, bias, i) -> model output (2n, 8, S, S)."""
        self.sched.reset()
        x = z
        for i, t in enumerate(self.ts):
            xx = torch.cat([x, x]).to(dtype)
            x = self.sched.step(i, x, guided_eps(step_fn(xx, t, ctx, bias, i), self.scale, z.shape[1]))
        return x


# ---- increment-calibrated caching on top of the same model ----------------------------------------

class Icc:
    """icc's step kinds on PixArt written with the model's own modules. `prepare(ctx)` computes every
    block's attn2 K/V once per request; `full` keeps each cached linear's input and output (q, k, v
    share their input); `calibrated` replaces each cached linear by y_s + up·(down·(x − x_s)) (random
    factors, no bias: it is in y_s) and recomputes both attentions; `reuse` adds the cached
    sublayer outputs (attn1 and ff under this step's gates, attn2 ungated)."""

    def __init__(self, model: PixArt, rank: int, seed: int):
        self.m = model
        c = model.cfg.inner_dim
        w = model.proj_out.weight
        gen = torch.Generator(device=w.device).manual_seed(seed + 1)
        shapes = {"attn1.to_q": (c, c), "attn1.to_k": (c, c), "attn1.to_v": (c, c), "attn1.to_out.0": (c, c),
                  "attn2.to_q": (c, c), "attn2.to_out.0": (c, c), "ff.net.0.proj": (4 * c, c), "ff.net.2": (c, 4 * c)}

        def pair(out_f, in_f):
            down = torch.randn(rank, in_f, generator=gen, device=w.device) / math.sqrt(in_f)
            up = torch.randn(out_f, rank, generator=gen, device=w.device) * (0.1 / math.sqrt(rank))
            return down.to(w.dtype), up.to(w.dtype)

        self.factors = [{k: pair(*shapes[k]) for k in CACHED} for _ in model.transformer_blocks]
        self.caches = [None] * len(model.transformer_blocks)
        self.kv = None

    def prepare(self, ctx):
        self.kv = self.m.cross_kv(ctx)

    def full(self, x, t, ctx, bias):
        tok, t_mod, emb = self.m.embed(x, t)
        eps = self.m.cfg.norm_eps
        for i, (blk, (k2, v2)) in enumerate(zip(self.m.transformer_blocks, self.kv)):
            sh1, sc1, g1, sh2, sc2, g2 = blk.modulation(t_mod)
            a1 = blk.attn1
            u = layer_norm(tok, eps) * (1 + sc1) + sh1
            q, k, v = a1.to_q(u), a1.to_k(u), a1.to_v(u)
            o1 = a1.attend(q, k, v, None)
            y1 = a1.to_out[0](o1)
            tok = tok + g1 * y1
            q2 = blk.attn2.to_q(tok)
            o2 = blk.attn2.attend(q2, k2, v2, bias)
            y2 = blk.attn2.to_out[0](o2)
            x2 = tok
            tok = tok + y2
            u3 = layer_norm(tok, eps) * (1 + sc2) + sh2
            h = blk.ff.net[0].proj(u3)
            gl = F.gelu(h, approximate="tanh")
            y3 = blk.ff.net[2](gl)
            tok = tok + g2 * y3
            self.caches[i] = (u, q, k, v, o1, y1, x2, q2, o2, y2, u3, h, gl, y3)
        return self.m.head(tok, emb)

    def calibrated(self, x, t, ctx, bias):
        lr = lambda dx, f: F.linear(F.linear(dx, f[0]), f[1])
        tok, t_mod, emb = self.m.embed(x, t)
        eps = self.m.cfg.norm_eps
        for blk, f, cache, (k2, v2) in zip(self.m.transformer_blocks, self.factors, self.caches, self.kv):
            u_s, q_s, k_s, v_s, o1_s, y1_s, x2_s, q2_s, o2_s, y2_s, u3_s, h_s, gl_s, y3_s = cache
            sh1, sc1, g1, sh2, sc2, g2 = blk.modulation(t_mod)
            du = layer_norm(tok, eps) * (1 + sc1) + sh1 - u_s
            q = q_s + lr(du, f["attn1.to_q"])
            k = k_s + lr(du, f["attn1.to_k"])
            v = v_s + lr(du, f["attn1.to_v"])
            o1 = blk.attn1.attend(q, k, v, None)
            tok = tok + g1 * (y1_s + lr(o1 - o1_s, f["attn1.to_out.0"]))
            q2 = q2_s + lr(tok - x2_s, f["attn2.to_q"])
            o2 = blk.attn2.attend(q2, k2, v2, bias)
            tok = tok + (y2_s + lr(o2 - o2_s, f["attn2.to_out.0"]))
            h = h_s + lr(layer_norm(tok, eps) * (1 + sc2) + sh2 - u3_s, f["ff.net.0.proj"])
            gl = F.gelu(h, approximate="tanh")
            tok = tok + g2 * (y3_s + lr(gl - gl_s, f["ff.net.2"]))
        return self.m.head(tok, emb)

    def reuse(self, x, t, ctx, bias):
        tok, t_mod, emb = self.m.embed(x, t)
        for blk, cache in zip(self.m.transformer_blocks, self.caches):
            _, _, g1, _, _, g2 = blk.modulation(t_mod)
            tok = tok + g1 * cache[5] + cache[9] + g2 * cache[13]
        return self.m.head(tok, emb)

    def step_fn(self, inc, period: int):
        """A sampler step function: full on steps 0, period, 2·period, ..., `inc` between."""
        return lambda xx, t, ctx, bias, i: self.full(xx, t, ctx, bias) if i % period == 0 else inc(xx, t, ctx, bias)


# ---- measurements ---------------------------------------------------------------------------------

def measure_variant(args, variant, model, cfg, device, clock, budget, emit, denoise=None):
    """forward at model batch 2, then DPM-Solver++ sampling at each batch; returns the forward's ms."""
    denoise = denoise or model.denoise
    size = cfg.sample_size * 8
    z1, text1, mask1 = inputs(cfg, 1, args.tokens, device, args.seed)
    x2, t2 = torch.cat([z1, z1]).half(), torch.full((2,), 500, dtype=torch.long, device=device)

    def forward():  # what diffusers' forward computes, split as the sampler calls it
        ctx, bias = model.encode_caption(text1, mask1)
        return denoise(x2, t2, ctx, bias, model.cross_kv(ctx))

    clock.reset_peak()
    runs = clock.run(forward, args.warmup, args.runs)
    fwd_ms = statistics.median(runs)
    per_row = macs(cfg, args.tokens, "full-kv-once") + caption_macs(cfg, args.tokens)
    emit(record(variant, "forward", 1, 2, runs, 2 * per_row, clock, size=size))
    for n in args.batch_list:
        sampler = Sampler(args.steps, args.cfg, 2 * n, device)
        z, text, mask = inputs(cfg, n, args.tokens, device, args.seed)
        est = fwd_ms * max(1.0, n) * sampler.steps * (args.sample_warmup + args.sample_runs) / 1e3
        if not budget.fits(est * 1.2):
            emit({"variant": variant, "what": "sample", "size": size, "images": n, "rows": 2 * n,
                  "status": f"skipped: budget (needs ~{est:.0f} s, {budget.left():.0f} s left)"})
            continue
        clock.reset_peak()
        out = {}

        def run():
            ctx, bias = model.encode_caption(text, mask)
            kv = model.cross_kv(ctx)
            out["x"] = sampler.run(lambda xx, t, c_, b_, i: denoise(xx, t, c_, b_, kv), z, ctx, bias, torch.float16)

        runs = clock.run(run, args.sample_warmup, args.sample_runs)
        total = 2 * n * (sampler.steps * macs(cfg, args.tokens, "full-kv-once") + caption_macs(cfg, args.tokens))
        emit(record(variant, "sample", n, 2 * n, runs, total, clock, size=size, steps=sampler.steps,
                    finite=bool(torch.isfinite(out["x"]).all())))
    return fwd_ms


def measure_icc(args, model, cfg, device, clock, budget, emit, fwd_ms):
    size, k, tok = cfg.sample_size * 8, args.rank, args.tokens
    icc = Icc(model, k, args.seed)
    z1, text1, mask1 = inputs(cfg, 1, tok, device, args.seed)
    x2, t2 = torch.cat([z1, z1]).half(), torch.full((2,), 500, dtype=torch.long, device=device)
    ctx1, bias1 = model.encode_caption(text1, mask1)
    icc.prepare(ctx1)
    # Wiring check: right after a full step, an inc step on the same inputs has zero increments, so
    # it must give the full step's output; and the full step must be the model's own forward.
    full_out = icc.full(x2, t2, ctx1, bias1).float()
    scale = float(full_out.abs().max())
    checks = {kind: float((getattr(icc, kind)(x2, t2, ctx1, bias1).float() - full_out).abs().max())
              for kind in ("calibrated", "reuse")}
    checks["model"] = float((model.denoise(x2, t2, ctx1, bias1).float() - full_out).abs().max())
    ok = all(d <= 1e-3 * scale for d in checks.values()) and scale > 0
    emit({"variant": "fp16", "what": "icc-check", "size": size, "status": "ok" if ok else "MISMATCH",
          "max_abs_diff_vs_full": checks, "max_abs_full": scale})
    full_macs = macs(cfg, tok, "full-kv-once")
    for what, fn, kind in (("icc-full", icc.full, "full-kv-once"), ("icc-calibrated", icc.calibrated, "calibrated"),
                           ("icc-reuse", icc.reuse, "reuse")):
        clock.reset_peak()
        runs = clock.run(lambda: fn(x2, t2, ctx1, bias1), args.warmup, args.runs)
        emit(record("fp16", what, 1, 2, runs, 2 * macs(cfg, tok, kind, k), clock, size=size, rank=k,
                    mac_ratio_vs_full=macs(cfg, tok, kind, k) / full_macs))
    for n in args.batch_list:
        sampler = Sampler(args.steps, args.cfg, 2 * n, device)
        z, text, mask = inputs(cfg, n, tok, device, args.seed)
        full_steps = len(range(0, sampler.steps, args.period))
        for what, inc, kind in (("icc-sample", icc.calibrated, "calibrated"), ("reuse-sample", icc.reuse, "reuse")):
            est = fwd_ms * max(1.0, n) * sampler.steps * (args.sample_warmup + args.sample_runs) / 1e3
            if not budget.fits(est * 1.2):
                emit({"variant": "fp16", "what": what, "size": size, "images": n, "rows": 2 * n,
                      "status": f"skipped: budget (needs ~{est:.0f} s, {budget.left():.0f} s left)"})
                continue
            total = 2 * n * (full_steps * full_macs + (sampler.steps - full_steps) * macs(cfg, tok, kind, k)
                             + caption_macs(cfg, tok))
            clock.reset_peak()
            out = {}

            def run():
                ctx, bias = model.encode_caption(text, mask)
                icc.prepare(ctx)
                out["x"] = sampler.run(icc.step_fn(inc, args.period), z, ctx, bias, torch.float16)

            runs = clock.run(run, args.sample_warmup, args.sample_runs)
            emit(record("fp16", what, n, 2 * n, runs, total, clock, size=size, steps=sampler.steps,
                        period=args.period, rank=k, finite=bool(torch.isfinite(out["x"]).all())))
    icc.caches, icc.kv = [None] * len(icc.caches), None


def sanity_reference(model, cfg, args, device):
    """The fp32 forward (TF32 off) on the sanity input, before the model is cast to fp16."""
    z1, text1, mask1 = inputs(cfg, 1, args.tokens, device, args.seed + 7)
    xs, ts = torch.cat([z1, z1]), torch.full((2,), 500, dtype=torch.long, device=device)
    set_tf32(False)
    with torch.no_grad():
        ref = model(xs, ts, text1, mask1).float()
    return (xs, ts, text1, mask1), ref


# ---- the compile variant, in a child process per size ---------------------------------------------

def child_compile(args):
    device = torch.device(args.device)
    emit_raw = progress_writer(args.progress)
    budget = Budget(args.budget)
    cfg = make_config(args, args.sizes_list[0])
    clock = Clock(device)
    model = build_model(cfg, device, args.seed)
    (xs, ts, text, mask), ref = sanity_reference(model, cfg, args, device)
    model.half()
    mode = None if args.compile_mode == "default" or args.compile_backend != "inductor" else args.compile_mode
    compiled = torch.compile(model.denoise, backend=args.compile_backend, mode=mode, dynamic=False)
    with torch.no_grad():
        denoise = compiled_caller(compiled, clock)

        def call():
            ctx, bias = model.encode_caption(text, mask)
            return denoise(xs.half(), ts, ctx, bias, model.cross_kv(ctx))

        compile_s = first_call(emit_raw, clock, call, ref)
        print(f"  fp16-compile {args.sizes_list[0]} px: first call (compile) {compile_s:.1f} s", flush=True)
        emit = lambda rec: emit_raw({"event": "record", "record": rec})
        measure_variant(args, "fp16-compile", model, cfg, device, clock, budget, emit, denoise)
    emit_raw({"event": "done", "t": time.time()})


def run_compile(args, size, budget, emit):
    """child_compile for one size, with a deadline for the first compile and one for the rest."""
    head = {"variant": "fp16-compile", "what": "compile", "size": size, "compile_mode": args.compile_mode,
            "compile_backend": args.compile_backend}
    if not budget.fits(30):
        emit({**head, "status": "skipped: budget"})
        return None
    child_args = ["--device", args.device, "--sizes", str(size), "--batches", args.batches,
                  "--steps", str(args.steps), "--cfg", str(args.cfg), "--seed", str(args.seed),
                  "--warmup", str(args.warmup), "--runs", str(args.runs),
                  "--sample-warmup", str(args.sample_warmup), "--sample-runs", str(args.sample_runs),
                  "--depth", str(args.depth), "--heads", str(args.heads), "--tokens", str(args.tokens),
                  "--caption-channels", str(args.caption_channels), "--compile-mode", args.compile_mode,
                  "--compile-backend", args.compile_backend]
    rest = {"variant": "fp16-compile", "what": "(rest)", "size": size}
    compiled = run_compile_child(__file__, child_args, head, rest, budget, args.compile_timeout, emit,
                                 "bench-pixart-compile-")
    return compiled["rel_err"] if compiled else None


# ---- report -----------------------------------------------------------------------------------------

def print_table(result):
    print(TABLE_MARK)
    d, c = result["device"], result["config"]
    print(f"{d['name']} | torch {result['torch']} | PixArt-XL/2 ({c['depth']} blocks) at {c['sizes']} px | "
          f"DPM-Solver++ {c['steps']} steps, guidance {c['cfg']} | icc rank {c['rank']}, period {c['period']}")
    print("| size | variant | what | images | rows | median ms | ms/image | TFLOP/s | peak MiB | status |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    f = lambda v, fmt: "" if v is None else format(v, fmt)
    for r in result["results"]:
        if r["what"] == "icc-check":
            status = f"{r['status']} " + ", ".join(f"{k} {v:.1e}" for k, v in r["max_abs_diff_vs_full"].items())
        elif r["what"] == "compile" and "compile_s" in r:
            how = r["compile_mode"] if r.get("compile_backend", "inductor") == "inductor" else r["compile_backend"]
            status = f"compiled in {r['compile_s']:.1f} s ({how}), rel err {r['rel_err_vs_fp32']:.1e}"
        else:
            status = r["status"]
        print(f"| {r.get('size', '')} | {r['variant']} | {r['what']} | {f(r.get('images'), 'd')} | "
              f"{f(r.get('rows'), 'd')} | {f(r.get('median_ms'), '.2f')} | {f(r.get('ms_per_image'), '.2f')} | "
              f"{f(r.get('tflops'), '.3g')} | {f(r.get('peak_mib'), '.0f')} | {status} |")
    for key, v in result.get("sanity", {}).items():
        print(f"forward rel. L2 error vs strict fp32, {key}: {v:.1e}")
    by = {(r.get("size"), r["variant"], r["what"]): r for r in result["results"]
          if r.get("median_ms") and r.get("images") == 1}
    for size in c["sizes"]:
        full = by.get((size, "fp16", "icc-full"))
        for what in ("icc-calibrated", "icc-reuse"):
            r = by.get((size, "fp16", what))
            if full and r:
                print(f"{size} px {what}: {r['median_ms'] / full['median_ms']:.3f} of a full step's time "
                      f"({r['mac_ratio_vs_full']:.3f} of its MACs)")
        plain, icc = by.get((size, "fp16", "sample")), by.get((size, "fp16", "icc-sample"))
        if plain and icc:
            print(f"{size} px {c['steps']}-step sampling: icc / none {icc['median_ms'] / plain['median_ms']:.3f}")
    print(f"elapsed {result['elapsed_s']:.1f} s")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke tests)")
    ap.add_argument("--sizes", default=None, help="image sizes in px, comma list (default 256,512; 64 with --quick)")
    ap.add_argument("--batches", default="1", help="image batches for sampling, e.g. 1,4 (model batch 2n)")
    ap.add_argument("--steps", type=int, default=20, help="DPM-Solver++ steps")
    ap.add_argument("--cfg", type=float, default=4.5, help="guidance scale")
    ap.add_argument("--rank", type=int, default=128, help="icc factor rank")
    ap.add_argument("--period", type=int, default=2, help="icc / reuse: a full step every PERIOD steps")
    ap.add_argument("--variants", default="fp16,icc,fp16-compile", help="comma list of fp16, icc, fp16-compile")
    ap.add_argument("--compile-mode", default=None,
                    help="torch.compile mode: max-autotune (default on cuda), default (default on cpu), ...")
    ap.add_argument("--compile-backend", default=None,
                    help="torch.compile backend: inductor (default), or aot_eager (default with --quick on the "
                         "CPU: the child-process plumbing without a C++ compile of a minute or more)")
    ap.add_argument("--compile-timeout", type=float, default=120.0, help="seconds allowed for each first compile")
    add_timing_args(ap)
    ap.add_argument("--depth", type=int, default=28, help="blocks (PixArt-XL/2: 28)")
    ap.add_argument("--heads", type=int, default=16, help="heads of 72 (PixArt-XL/2: 16)")
    ap.add_argument("--tokens", type=int, default=120, help="caption tokens")
    ap.add_argument("--caption-channels", type=int, default=4096, help="caption width (T5-XXL: 4096)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 64 px, 2 blocks of 4 heads, 4 steps, 2 timed forwards, 1 timed sampling run")
    add_output_args(ap)
    args = ap.parse_args()
    if args.quick:
        apply_quick(args)
        args.depth, args.heads = min(args.depth, 2), min(args.heads, 4)
        args.sizes = args.sizes or "64"
    args.sizes_list = [int(s) for s in (args.sizes or "256,512").split(",") if s]
    if args.compile_backend is None:
        args.compile_backend = "aot_eager" if args.quick and not args.device.startswith("cuda") else "inductor"
    if args.compile_mode is None:
        args.compile_mode = "max-autotune" if args.device.startswith("cuda") else "default"
    args.batch_list = [int(b) for b in args.batches.split(",") if b]
    if args.period < 1 or args.rank < 1 or args.steps < 2:
        raise SystemExit("--period and --rank must be >= 1, --steps >= 2")
    if args.child_compile:
        return child_compile(args)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_pytorch_pixart_gpu: torch.cuda is not available (use --device cpu for a smoke test)")
    budget = Budget(args.budget)
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - {"fp16", "icc", "fp16-compile"}
    if unknown:
        raise SystemExit(f"--variants: unknown {sorted(unknown)}; expected fp16, icc, fp16-compile")
    clock = Clock(device)
    results, sanity = [], {}

    def emit(rec):
        results.append(rec)
        ms = f"{rec['median_ms']:.2f} ms" if rec.get("median_ms") is not None else ""
        print(f"[{time.monotonic() - budget.start:6.1f} s] {rec.get('size', '')} px {rec['variant']} {rec['what']} "
              f"images={rec.get('images', '')} {ms} {rec['status']}", flush=True)

    for size in args.sizes_list:
        if not ("fp16" in variants or "icc" in variants):
            break
        if not budget.fits(20):
            emit({"variant": "fp16", "what": "forward", "size": size, "status": "skipped: budget"})
            continue
        cfg = make_config(args, size)
        t0 = time.perf_counter()
        model = build_model(cfg, device, args.seed)
        clock.sync()
        print(f"PixArt ({cfg.num_layers} blocks) {size} px built on {device} in {time.perf_counter() - t0:.1f} s: "
              f"{sum(p.numel() for p in model.parameters()):,} parameters, "
              f"{macs(cfg, args.tokens) / 1e9:.2f} GMACs per row", flush=True)
        (xs, ts, text, mask), ref = sanity_reference(model, cfg, args, device)
        with torch.inference_mode():
            model.half()
            sanity[f"fp16 {size} px"] = rel_err(model(xs.half(), ts, text, mask), ref)
            fwd_ms = None
            if "fp16" in variants:
                fwd_ms = measure_variant(args, "fp16", model, cfg, device, clock, budget, emit)
            if "icc" in variants:
                if fwd_ms is None:
                    ctx, bias = model.encode_caption(text, mask)
                    fwd_ms = statistics.median(clock.run(lambda: model.denoise(xs.half(), ts, ctx, bias), 1, 3))
                measure_icc(args, model, cfg, device, clock, budget, emit, fwd_ms)
        del model, ref
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "fp16-compile" in variants:
        for size in args.sizes_list:
            err = run_compile(args, size, budget, emit)
            if err is not None:
                sanity[f"fp16-compile {size} px"] = err

    result = {
        **run_info("tools/bench_pytorch_pixart_gpu.py", device),
        "config": {"model": "PixArt-XL/2" if (args.depth, args.heads) == (28, 16) else "PixArt (reduced)",
                   "sizes": args.sizes_list, "depth": args.depth, "heads": args.heads, "hidden": 72 * args.heads,
                   "tokens": args.tokens, "caption_channels": args.caption_channels, "steps": args.steps,
                   "sampler": "dpm-solver++ 2M", "cfg": args.cfg, "rank": args.rank, "period": args.period,
                   "batches": args.batch_list, "variants": variants, "compile_mode": args.compile_mode,
                   "compile_backend": args.compile_backend, "compile_timeout_s": args.compile_timeout,
                   "budget_s": args.budget, "warmup": args.warmup,
                   "runs": args.runs, "sample_warmup": args.sample_warmup, "sample_runs": args.sample_runs,
                   "quick": args.quick, "weights": "random N(0, 0.02), seeded; never downloaded",
                   "caption": "random embeddings; positive 20 tokens, negative 1 token, of --tokens"},
        "sanity": sanity, "results": results, "elapsed_s": time.monotonic() - budget.start,
    }
    return finish(result, args.json, print_table)

if __name__ == "__main__":
    sys.exit(main())
