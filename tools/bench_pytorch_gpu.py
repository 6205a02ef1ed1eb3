#!/usr/bin/env python3
"""PyTorch GPU baselines for icdit's CUDA engine: DiT (default XL/2, 256 px, latent 32x32x4) with
seeded random weights (never downloaded), through tools/dit_torch.py's model.

Variants (each timed with CUDA events after warm-up; medians reported):
  fp32-tf32     fp32 eager with TF32 matmuls and convolutions allowed, as DiT's sample_ddp.py runs
  fp16          fp16 eager (model.half())
  fp16-compile  fp16 under torch.compile (--compile-mode, default max-autotune), in a child process
                so that --compile-timeout can stop a compile that runs too long (reported as such)

Measurements per variant:
  forward   one model forward at model batch 2 (one image with guidance)
  sample    --steps DDIM steps (eta 0, DiT's "50" respacing) with CFG --cfg, end to end (model plus
            sampler arithmetic; no VAE), at each image batch of --batches (model batch 2n)
and, in fp16 eager, the increment-calibrated caching (ICC) method of docs/dit-reference.md E:
  icc-full        a full forward that keeps the caches (inputs and outputs of q/k/v, proj, fc1, fc2)
  icc-calibrated  every cached linear as y_s + F.linear(F.linear(x - x_s, down), up) with random
                  rank --rank factors; attention recomputed in full (E.4)
  icc-reuse       naive reuse: attention and MLP sublayer outputs taken from the cache (E.5)
  icc-sample / reuse-sample  the DDIM loop with period 2 (full, inc, full, ...) (E.2)
so that the method's FLOP savings are measured in PyTorch too. MACs follow docs/dit-reference.md G.

Peak memory is torch.cuda.max_memory_allocated during each measurement. --json writes everything;
a table is printed last. --budget bounds the whole run: a measurement that would not fit is
skipped and reported as such.

    python3 tools/bench_pytorch_gpu.py --batches 1,4,16 --json out/pytorch.json
    python3 tools/bench_pytorch_gpu.py --device cpu --family S/2 --quick      # smoke test, no GPU
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_pytorch_common import (Budget, Clock, add_output_args, add_timing_args, apply_quick,  # noqa: E402
                                  compiled_caller, finish, first_call, progress_writer, record, rel_err,
                                  run_compile_child, run_info, set_tf32)
from dit_torch import DiT, DiTConfig, Diffusion, modulate  # noqa: E402

# (depth, hidden, heads) per DiT family (docs/dit-reference.md B); the patch is the /p suffix.
FAMILIES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}
NULL_CLASS = 1000
TABLE_MARK = "== bench_pytorch_gpu results =="


# ---- model, inputs, costs -----------------------------------------------------------------------

def make_config(family: str, image_size: int) -> DiTConfig:
    name, _, patch = family.upper().removeprefix("DIT-").partition("/")
    if name not in FAMILIES or patch not in ("2", "4", "8"):
        raise SystemExit(f"--family {family!r}: expected one of XL, L, B, S with /2, /4 or /8")
    depth, hidden, heads = FAMILIES[name]
    return DiTConfig(input_size=image_size // 8, patch_size=int(patch), in_channels=4, hidden_size=hidden,
                     depth=depth, num_heads=heads, mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000,
                     learn_sigma=True)


def build_model(cfg: DiTConfig, device: torch.device, seed: int) -> DiT:
    """The DiT built on `device`, every trainable weight drawn from N(0, 0.02) by a generator on that
    device (the official init zeroes adaLN and the output layer: zeros would let kernels take shortcuts).
    The same seed gives the same weights in every process on the same device."""
    with torch.device(device):
        model = DiT(cfg)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.02, generator=gen)
    model.eval().requires_grad_(False)
    # The timestep features are computed in float32; feed the t-MLP in the model's dtype so that
    # model.half() runs (the official code has the same float32 features and was never run in fp16).
    model.t_embedder.mlp.register_forward_pre_hook(lambda mod, args: (args[0].to(mod[0].weight.dtype),))
    return model


def macs(cfg: DiTConfig, kind: str = "full", rank: int = 128) -> int:
    """MACs of one model row (docs/dit-reference.md G.1, G.2, E.7): full, calibrated or reuse step."""
    c, g, p = cfg.hidden_size, cfg.input_size // cfg.patch_size, cfg.patch_size
    n, cin, cout = g * g, cfg.in_channels, 2 * cfg.in_channels
    attn, adaln = 2 * n * n * c, 6 * c * c
    block = {"full": 12 * n * c * c + attn + adaln, "calibrated": 18 * n * c * rank + attn + adaln,
             "reuse": adaln}[kind]
    pre_post = n * cin * c * p * p + 256 * c + c * c + c * 2 * c + n * c * p * p * cout
    return cfg.depth * block + pre_post


def inputs(cfg: DiTConfig, images: int, device: torch.device, seed: int):
    """z (n, 4, I, I), labels (n,), CFG labels (2n,) = [labels; null], drawn on the CPU for reproducibility."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(images, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    labels = torch.randint(0, cfg.num_classes, (images,), generator=g)
    y = torch.cat([labels, torch.full_like(labels, NULL_CLASS)])
    return z.to(device), y.to(device)


# ---- the DDIM sampler with CFG ------------------------------------------------------------------

class Sampler:
    """DDIM (eta 0) over DiT's respacing `steps` with classifier-free guidance as the official
    forward_with_cfg (docs/dit-reference.md A.10, D.6): the model sees [x; x] with [labels; null],
    only channels 0..2 are guided, channel 3 keeps the conditional value. The schedule is read once into
    float32 Python numbers and device tensors, so the loop does no host-device traffic. The per-step
    noise the official loop draws and discards (eta 0) is not drawn."""

    def __init__(self, steps: int, cfg_scale: float, rows: int, device: torch.device):
        d = Diffusion(str(steps))
        f32 = lambda a: [float(np.float32(v)) for v in a]
        self.sr, self.srm1 = f32(d.sqrt_recip_abar), f32(d.sqrt_recipm1_abar)
        self.sqrt_ap = [float(np.float32(math.sqrt(float(np.float32(v))))) for v in d.alphas_cumprod_prev]
        self.sqrt_1map = [float(np.float32(math.sqrt(1.0 - float(np.float32(v))))) for v in d.alphas_cumprod_prev]
        self.ts = [torch.full((rows,), int(t), dtype=torch.long, device=device) for t in d.timestep_map]
        self.steps, self.scale = len(self.ts), cfg_scale

    def run(self, step_fn, z: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """step_fn(xx, t, y, s) -> model output (2n, 8, I, I); s counts forward calls from 0."""
        x, n = z, z.shape[0]
        for s, k in enumerate(reversed(range(self.steps))):
            xx = torch.cat([x, x]).to(dtype)
            out = step_fn(xx, self.ts[k], y, s).float()
            e_c, e_u = out[:n, :4], out[n:, :4]
            eps = torch.cat([e_u[:, :3] + self.scale * (e_c[:, :3] - e_u[:, :3]), e_c[:, 3:]], 1)
            x0 = self.sr[k] * x - self.srm1[k] * eps
            eps = (self.sr[k] * x - x0) / self.srm1[k]
            x = x0 * self.sqrt_ap[k] + self.sqrt_1map[k] * eps
        return x


# ---- increment-calibrated caching on top of the same model ----------------------------------------

def _ln(z):
    return F.layer_norm(z, z.shape[-1:], eps=1e-6)


def _attention(qkv, heads):
    b, n, c3 = qkv.shape
    c = c3 // 3
    q, k, v = qkv.reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)


class Icc:
    """ICC steps (docs/dit-reference.md E.3-E.5) written with the model's own modules: `full` is the
    normal forward keeping the caches, `calibrated` replaces q, k, v, proj, fc1, fc2 each by
    y_s + F.linear(F.linear(x - x_s, down), up) (random rank-r factors, no bias: it is in y_s) and
    recomputes attention; `reuse` adds the cached sublayer outputs under the current gates (the
    LayerNorm/modulate results ICC computes and discards are skipped here)."""

    def __init__(self, model: DiT, rank: int, seed: int):
        self.m, self.heads = model, model.cfg.num_heads
        c = model.cfg.hidden_size
        w = next(model.parameters())
        gen = torch.Generator(device=w.device).manual_seed(seed + 1)
        shapes = {"q": (c, c), "k": (c, c), "v": (c, c), "proj": (c, c), "fc1": (4 * c, c), "fc2": (c, 4 * c)}

        def pair(out_f, in_f):
            down = torch.randn(rank, in_f, generator=gen, device=w.device) / math.sqrt(in_f)
            up = torch.randn(out_f, rank, generator=gen, device=w.device) * (0.1 / math.sqrt(rank))
            return down.to(w.dtype), up.to(w.dtype)

        self.factors = [{k: pair(*s) for k, s in shapes.items()} for _ in model.blocks]
        self.caches = [None] * len(model.blocks)

    def _embed(self, x, t, y):
        m = self.m
        return m.x_embedder(x) + m.pos_embed, m.t_embedder(t) + m.y_embedder(y, False)

    def full(self, x, t, y):
        tok, c = self._embed(x, t, y)
        for i, blk in enumerate(self.m.blocks):
            sh1, sc1, g1, sh2, sc2, g2 = blk.adaLN_modulation(c).chunk(6, dim=1)
            u = modulate(_ln(tok), sh1, sc1)
            qkv = blk.attn.qkv(u)
            o = _attention(qkv, self.heads)
            a = blk.attn.proj(o)
            tok = tok + g1.unsqueeze(1) * a
            u2 = modulate(_ln(tok), sh2, sc2)
            h = blk.mlp.fc1(u2)
            gl = F.gelu(h, approximate="tanh")
            mo = blk.mlp.fc2(gl)
            tok = tok + g2.unsqueeze(1) * mo
            self.caches[i] = (u, qkv, o, a, u2, h, gl, mo)
        return self.m.unpatchify(self.m.final_layer(tok, c))

    def calibrated(self, x, t, y):
        lr = lambda dx, f: F.linear(F.linear(dx, f[0]), f[1])
        tok, c = self._embed(x, t, y)
        for blk, f, cache in zip(self.m.blocks, self.factors, self.caches):
            qkv_x, qkv_y, proj_x, proj_y, fc1_x, fc1_y, fc2_x, fc2_y = cache
            sh1, sc1, g1, sh2, sc2, g2 = blk.adaLN_modulation(c).chunk(6, dim=1)
            du = modulate(_ln(tok), sh1, sc1) - qkv_x
            qkv = qkv_y + torch.cat([lr(du, f["q"]), lr(du, f["k"]), lr(du, f["v"])], -1)
            o = _attention(qkv, self.heads)
            tok = tok + g1.unsqueeze(1) * (proj_y + lr(o - proj_x, f["proj"]))
            h = fc1_y + lr(modulate(_ln(tok), sh2, sc2) - fc1_x, f["fc1"])
            gl = F.gelu(h, approximate="tanh")
            tok = tok + g2.unsqueeze(1) * (fc2_y + lr(gl - fc2_x, f["fc2"]))
        return self.m.unpatchify(self.m.final_layer(tok, c))

    def reuse(self, x, t, y):
        tok, c = self._embed(x, t, y)
        for blk, cache in zip(self.m.blocks, self.caches):
            _, _, _, proj_y, _, _, _, fc2_y = cache
            _, _, g1, _, _, g2 = blk.adaLN_modulation(c).chunk(6, dim=1)
            tok = tok + g1.unsqueeze(1) * proj_y
            tok = tok + g2.unsqueeze(1) * fc2_y
        return self.m.unpatchify(self.m.final_layer(tok, c))

    def step_fn(self, inc):
        """A sampler step function with ICC's period-2 schedule: full on even calls, `inc` on odd."""
        return lambda xx, t, y, s: self.full(xx, t, y) if s % 2 == 0 else inc(xx, t, y)


# ---- the run --------------------------------------------------------------------------------------

def sanity_input(cfg, device, seed):
    z, y = inputs(cfg, 1, device, seed + 7)
    t = torch.full((2,), 500, dtype=torch.long, device=device)
    return torch.cat([z, z]), t, y


def measure_variant(args, variant, model, dtype, cfg, device, clock, budget, emit, fwd_call=None):
    """forward at model batch 2, then DDIM sampling at each batch; emit(record) for each."""
    call = fwd_call or (lambda xx, t, y: model(xx, t, y))
    z1, y1 = inputs(cfg, 1, device, args.seed)
    x2, t2 = torch.cat([z1, z1]).to(dtype), torch.full((2,), 500, dtype=torch.long, device=device)
    clock.reset_peak()
    runs = clock.run(lambda: call(x2, t2, y1), args.warmup, args.runs)
    fwd_ms = statistics.median(runs)
    emit(record(variant, "forward", 1, 2, runs, 2 * macs(cfg), clock))
    for n in args.batch_list:
        sampler = Sampler(args.steps, args.cfg, 2 * n, device)
        z, y = inputs(cfg, n, device, args.seed)
        est = fwd_ms * max(1.0, n) * sampler.steps * (args.sample_warmup + args.sample_runs) / 1e3
        if not budget.fits(est * 1.2):
            emit({"variant": variant, "what": "sample", "images": n, "rows": 2 * n,
                  "status": f"skipped: budget (needs ~{est:.0f} s, {budget.left():.0f} s left)"})
            continue
        clock.reset_peak()
        out = {}
        runs = clock.run(lambda: out.__setitem__("x", sampler.run(lambda xx, t, yy, s: call(xx, t, yy), z, y, dtype)),
                         args.sample_warmup, args.sample_runs)
        emit(record(variant, "sample", n, 2 * n, runs, sampler.steps * 2 * n * macs(cfg), clock,
                    steps=sampler.steps, finite=bool(torch.isfinite(out["x"]).all())))
    return fwd_ms


def measure_icc(args, model, cfg, device, clock, budget, emit, fwd_ms):
    icc = Icc(model, args.rank, args.seed)
    z1, y1 = inputs(cfg, 1, device, args.seed)
    x2, t2 = torch.cat([z1, z1]).half(), torch.full((2,), 500, dtype=torch.long, device=device)
    # Wiring check: right after a full step, an inc step on the same inputs has zero increments,
    # so it must reproduce the full step's output (calibrated: y_s + 0; reuse: the cached outputs).
    full_out = icc.full(x2, t2, y1)
    scale = float(full_out.float().abs().max())
    checks = {k: float((getattr(icc, k)(x2, t2, y1).float() - full_out.float()).abs().max())
              for k in ("calibrated", "reuse")}
    # Zero in exact arithmetic and expected to be zero here; the margin only absorbs a kernel
    # that is not run-to-run deterministic.
    ok = all(d <= 1e-3 * scale for d in checks.values()) and scale > 0
    emit({"variant": "fp16", "what": "icc-check", "status": "ok" if ok else "MISMATCH",
          "max_abs_diff_vs_full": checks, "max_abs_full": scale})
    k = args.rank
    for what, fn, kind in (("icc-full", icc.full, "full"), ("icc-calibrated", icc.calibrated, "calibrated"),
                           ("icc-reuse", icc.reuse, "reuse")):
        clock.reset_peak()
        runs = clock.run(lambda: fn(x2, t2, y1), args.warmup, args.runs)
        emit(record("fp16", what, 1, 2, runs, 2 * macs(cfg, kind, k), clock, rank=k,
                    mac_ratio_vs_full=macs(cfg, kind, k) / macs(cfg)))
    for n in args.batch_list:
        sampler = Sampler(args.steps, args.cfg, 2 * n, device)
        z, y = inputs(cfg, n, device, args.seed)
        full_steps = (sampler.steps + 1) // 2
        for what, inc, kind in (("icc-sample", icc.calibrated, "calibrated"), ("reuse-sample", icc.reuse, "reuse")):
            est = fwd_ms * max(1.0, n) * sampler.steps * (args.sample_warmup + args.sample_runs) / 1e3
            if not budget.fits(est * 1.2):
                emit({"variant": "fp16", "what": what, "images": n, "rows": 2 * n,
                      "status": f"skipped: budget (needs ~{est:.0f} s, {budget.left():.0f} s left)"})
                continue
            total = 2 * n * (full_steps * macs(cfg) + (sampler.steps - full_steps) * macs(cfg, kind, k))
            clock.reset_peak()
            out = {}
            runs = clock.run(lambda: out.__setitem__("x", sampler.run(icc.step_fn(inc), z, y, torch.float16)),
                             args.sample_warmup, args.sample_runs)
            emit(record("fp16", what, n, 2 * n, runs, total, clock, steps=sampler.steps, period=2, rank=k,
                        finite=bool(torch.isfinite(out["x"]).all())))
    icc.caches = [None] * len(icc.caches)


def child_compile(args):
    """The fp16-compile variant, in its own process: events go to --progress as JSON lines."""
    device = torch.device(args.device)
    emit_raw = progress_writer(args.progress)
    budget = Budget(args.budget)
    cfg = make_config(args.family, args.image_size)
    clock = Clock(device)
    model = build_model(cfg, device, args.seed)
    xs, ts, ys = sanity_input(cfg, device, args.seed)
    set_tf32(False)
    with torch.no_grad():
        ref = model(xs, ts, ys).float()
    model.half()
    compiled = torch.compile(model, mode=None if args.compile_mode == "default" else args.compile_mode,
                             dynamic=False)
    # no_grad rather than inference_mode: parameters stay ordinary tensors for the compiler.
    with torch.no_grad():
        call = compiled_caller(compiled, clock)
        compile_s = first_call(emit_raw, clock, lambda: call(xs.half(), ts, ys), ref)
        print(f"  fp16-compile: first call (compile) {compile_s:.1f} s", flush=True)

        def emit(rec):  # the parent prints the records when the child ends (or is stopped)
            emit_raw({"event": "record", "record": rec})

        # Each new model batch compiles again (dynamic=False); the parent stops us at the budget.
        measure_variant(args, "fp16-compile", model, torch.float16, cfg, device, clock, budget, emit, call)
    emit_raw({"event": "done", "t": time.time()})


def run_compile(args, budget, emit):
    """Runs child_compile with a deadline for the first compile and one for the whole variant."""
    if not budget.fits(30):
        emit({"variant": "fp16-compile", "what": "forward", "status": "skipped: budget"})
        return
    child_args = ["--device", args.device, "--family", args.family, "--image-size", str(args.image_size),
                  "--batches", args.batches, "--steps", str(args.steps), "--cfg", str(args.cfg),
                  "--seed", str(args.seed), "--warmup", str(args.warmup), "--runs", str(args.runs),
                  "--sample-warmup", str(args.sample_warmup), "--sample-runs", str(args.sample_runs),
                  "--compile-mode", args.compile_mode]
    head = {"variant": "fp16-compile", "what": "compile", "compile_mode": args.compile_mode}
    run_compile_child(__file__, child_args, head, {"variant": "fp16-compile", "what": "(rest)"}, budget,
                      args.compile_timeout, emit, "bench-compile-")


def print_table(result):
    print(TABLE_MARK)
    d, c = result["device"], result["config"]
    print(f"{d['name']} | torch {result['torch']} | DiT-{c['family']} {c['image_size']} px | "
          f"DDIM {c['steps']} steps, CFG {c['cfg']} | ICC rank {c['rank']}")
    print("| variant | what | images | rows | median ms | ms/image | TFLOP/s | peak MiB | status |")
    print("|---|---|---|---|---|---|---|---|---|")
    f = lambda v, fmt: "" if v is None else format(v, fmt)
    for r in result["results"]:
        if r["what"] == "icc-check":
            status = f"{r['status']} {r['max_abs_diff_vs_full']}"
        elif r["what"] == "compile" and "compile_s" in r:
            status = f"compiled in {r['compile_s']:.1f} s ({r['compile_mode']}), rel err {r['rel_err_vs_fp32']:.1e}"
        else:
            status = r["status"]
        print(f"| {r['variant']} | {r['what']} | {f(r.get('images'), 'd')} | {f(r.get('rows'), 'd')} | "
              f"{f(r.get('median_ms'), '.2f')} | {f(r.get('ms_per_image'), '.2f')} | {f(r.get('tflops'), '.3g')} | "
              f"{f(r.get('peak_mib'), '.0f')} | {status} |")
    s = result.get("sanity", {})
    if s:
        print("forward rel. L2 error vs strict fp32: " + ", ".join(f"{k} {v:.1e}" for k, v in s.items()))
    by = {(r["variant"], r["what"]): r for r in result["results"] if r.get("median_ms") and r.get("images") == 1}
    full = by.get(("fp16", "forward"))
    for what in ("icc-calibrated", "icc-reuse"):
        r = by.get(("fp16", what))
        if full and r:
            print(f"{what}: {r['median_ms'] / full['median_ms']:.3f} of an fp16 forward's time "
                  f"({r['mac_ratio_vs_full']:.3f} of its MACs)")
    print(f"elapsed {result['elapsed_s']:.1f} s")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke tests)")
    ap.add_argument("--family", default="XL/2", help="DiT family: XL/2 (default), L/2, B/2, S/2, .../4, .../8")
    ap.add_argument("--image-size", type=int, help="pixels, latent side = size / 8 (default 256; 64 with --quick)")
    ap.add_argument("--batches", default="1", help="image batches for sampling, e.g. 1,4,16 (model batch 2n)")
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps (DiT respacing \"N\")")
    ap.add_argument("--cfg", type=float, default=4.0, help="guidance scale")
    ap.add_argument("--rank", type=int, default=128, help="ICC factor rank")
    ap.add_argument("--variants", default="fp32-tf32,fp16,icc,fp16-compile",
                    help="comma list of fp32-tf32, fp16, icc (fp16 eager), fp16-compile")
    ap.add_argument("--compile-mode", default=None,
                    help="torch.compile mode: max-autotune (default on cuda), default (default on cpu), "
                         "reduce-overhead, max-autotune-no-cudagraphs")
    ap.add_argument("--compile-timeout", type=float, default=180.0, help="seconds allowed for the first compile")
    add_timing_args(ap)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 64 px unless --image-size, 4 steps, 2 timed forwards, 1 timed sampling run")
    add_output_args(ap)
    args = ap.parse_args()
    if args.quick:
        apply_quick(args)
        args.image_size = args.image_size or 64
    args.image_size = args.image_size or 256
    if args.compile_mode is None:
        args.compile_mode = "max-autotune" if args.device.startswith("cuda") else "default"
    args.batch_list = [int(b) for b in args.batches.split(",") if b]
    if args.child_compile:
        return child_compile(args)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_pytorch_gpu: torch.cuda is not available (use --device cpu for a smoke test)")
    budget = Budget(args.budget)
    variants = [v for v in args.variants.split(",") if v]
    cfg = make_config(args.family, args.image_size)
    clock = Clock(device)
    results, sanity = [], {}

    def emit(rec):
        results.append(rec)
        ms = f"{rec['median_ms']:.2f} ms" if rec.get("median_ms") is not None else ""
        print(f"[{time.monotonic() - budget.start:6.1f} s] {rec['variant']} {rec['what']} "
              f"images={rec.get('images', '')} {ms} {rec['status']}", flush=True)

    t0 = time.perf_counter()
    model = build_model(cfg, device, args.seed)
    clock.sync()
    print(f"model DiT-{args.family} built on {device} in {time.perf_counter() - t0:.1f} s: "
          f"{sum(p.numel() for p in model.parameters()):,} parameters, {macs(cfg) / 1e9:.2f} GMACs per row",
          flush=True)
    xs, ts, ys = sanity_input(cfg, device, args.seed)
    fwd_ms = None
    with torch.inference_mode():
        set_tf32(False)
        ref = model(xs, ts, ys).float()
        if "fp32-tf32" in variants:
            set_tf32(True)  # DiT's sample.py / sample_ddp.py (--tf32, default on)
            sanity["fp32-tf32"] = rel_err(model(xs, ts, ys), ref)
            measure_variant(args, "fp32-tf32", model, torch.float32, cfg, device, clock, budget, emit)
            set_tf32(False)
        if "fp16" in variants or "icc" in variants:
            model.half()  # in place: the fp32 weights are freed
            sanity["fp16"] = rel_err(model(xs.half(), ts, ys), ref)
            if "fp16" in variants:
                fwd_ms = measure_variant(args, "fp16", model, torch.float16, cfg, device, clock, budget, emit)
            if "icc" in variants:
                if fwd_ms is None:
                    fwd_ms = statistics.median(Clock(device).run(lambda: model(xs.half(), ts, ys), 1, 3))
                measure_icc(args, model, cfg, device, clock, budget, emit, fwd_ms)
    del model, ref
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if "fp16-compile" in variants:
        run_compile(args, budget, emit)
        comp = next((r for r in results if r["what"] == "compile" and "rel_err_vs_fp32" in r), None)
        if comp:
            sanity["fp16-compile"] = comp["rel_err_vs_fp32"]

    result = {
        **run_info("tools/bench_pytorch_gpu.py", device),
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "config": {"family": args.family, "image_size": args.image_size, "latent": cfg.input_size,
                   "tokens": (cfg.input_size // cfg.patch_size) ** 2, "hidden": cfg.hidden_size, "depth": cfg.depth,
                   "heads": cfg.num_heads, "macs_per_row": macs(cfg), "steps": args.steps, "cfg": args.cfg,
                   "rank": args.rank, "batches": args.batch_list, "variants": variants,
                   "compile_mode": args.compile_mode, "compile_timeout_s": args.compile_timeout,
                   "budget_s": args.budget, "warmup": args.warmup, "runs": args.runs,
                   "sample_warmup": args.sample_warmup, "sample_runs": args.sample_runs, "quick": args.quick,
                   "weights": "random N(0, 0.02), seeded; never downloaded"},
        "sanity": sanity, "results": results, "elapsed_s": time.monotonic() - budget.start,
    }
    return finish(result, args.json, print_table)

if __name__ == "__main__":
    sys.exit(main())
