#!/usr/bin/env python3
"""Regenerate tests/fixtures/: tiny DiT models built with the official code, and their outputs.

    python3 tools/make_fixtures.py --dit-repo /path/to/facebookresearch/DiT --out tests/fixtures

Each model is the official `DiT(...)` from the checkout's models.py, with every parameter except
the fixed sin-cos `pos_embed` re-drawn from seeded normals: the official init zeroes adaLN and
the final layer, which would make every output exactly zero and every test vacuous. Forwards run
on the CPU in float32 (the reference) and float64 (the exact answer), single-threaded, with
deterministic algorithms, so two runs on the same machine write byte-identical files.

The diffusers references come from DiTTransformer2DModel loaded from the written diffusers
folder when diffusers is importable; otherwise from the official model patched to diffusers'
numerics (divisor 127 in the timestep frequencies, pre-MLP LayerNorm eps 1e-5). README.md
records which path was taken.
"""

import argparse
import hashlib
import importlib.util
import json
import math
import os
import shutil
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dit_layouts  # noqa: E402

# t uses original diffusion indices (0..999), including both ends; y always has a null label
# (= num_classes) so the Rust side exercises the extra embedding row.
T_STEPS = [0, 1, 500, 999]

FIXTURES = {
    # head_dim 72 like DiT-XL; both layouts and a CFG reference.
    "hd72": dict(
        config=dict(input_size=8, patch_size=2, in_channels=4, hidden_size=144, depth=2,
                    num_heads=2, mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=10,
                    learn_sigma=True),
        seed=72, y=[3, 10, 0, 9], diffusers=True, low_precision=False, cfg=True),
    # patch 4 (16 tokens), odd depth, eps-only output: catches hard-coded p = 2 / Cout = 2*Cin.
    "p4_nosigma": dict(
        config=dict(input_size=16, patch_size=4, in_channels=4, hidden_size=64, depth=3,
                    num_heads=2, mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=7,
                    learn_sigma=False),
        seed=4, y=[6, 7, 2, 0], diffusers=True, low_precision=False, cfg=False),
    # 3 input channels (Cout 6, so the CFG "3 channels" are no longer "all but one"), 6 heads of 16,
    # and f16/bf16 copies of the weights.
    "rgb_h6": dict(
        config=dict(input_size=8, patch_size=2, in_channels=3, hidden_size=96, depth=2,
                    num_heads=6, mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=5,
                    learn_sigma=True),
        seed=6, y=[5, 1, 4, 0], diffusers=False, low_precision=True, cfg=False),
}

CFG_SCALE = 4.0
LOW_PRECISION = {"f16": torch.float16, "bf16": torch.bfloat16}

# Init scales. Weights ~ N(0, gain^2 / fan_in) keep every layer's output at the scale of its
# input whatever the width. adaLN layers get a smaller gain so (1 + scale) stays positive-ish
# and gates stay O(0.3), i.e. the residual stream neither vanishes nor explodes over the blocks.
# Biases are nonzero so a Rust side that drops a bias fails. Label rows ~ N(0, 1) make the
# conditioning c = t_emb + y_emb O(1) and clearly class-dependent.
WEIGHT_GAIN = 1.0
ADALN_GAIN = 0.5
BIAS_STD = 0.1
LABEL_STD = 1.0


def import_official_models(dit_repo):
    path = os.path.join(dit_repo, "models.py")
    if not os.path.exists(path):
        sys.exit(f"error: {path} not found (--dit-repo must point at a facebookresearch/DiT checkout)")
    spec = importlib.util.spec_from_file_location("dit_official_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, hashlib.sha256(open(path, "rb").read()).hexdigest()


def reinit_(model, seed):
    """Overwrite every parameter except pos_embed with seeded normals (see the scales above)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name == "pos_embed":
                continue  # fixed official sin-cos table; the Rust side may recompute it
            if name.endswith(".bias"):
                std = BIAS_STD
            elif name == "y_embedder.embedding_table.weight":
                std = LABEL_STD
            else:
                gain = ADALN_GAIN if "adaLN_modulation" in name else WEIGHT_GAIN
                std = gain / math.sqrt(param[0].numel())  # fan_in, for Linear and Conv2d alike
            param.copy_(torch.randn(param.shape, generator=g) * std)
    # DiT registers no buffers; if a future models.py did, it would escape re-initialisation.
    assert not list(model.buffers()), "unexpected buffers in DiT"


def build_model(models, cfg, state_dict, dtype=torch.float32):
    torch.manual_seed(0)  # the official init draws from the global RNG; keep it reproducible
    model = models.DiT(**cfg)
    model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)
    return model.to(dtype).eval()


def _timestep_features_f64(t, dim, max_period=10000):
    """[cos | sin] timestep features computed entirely in float64 (official formula, doc A.3).

    The official timestep_embedding builds its frequencies and arguments in float32 no matter
    the model dtype, so model.double() would feed float32 into float64 Linears and fail. For the
    exact answer the features are float64 too.
    """
    half = dim // 2
    k = torch.arange(half, dtype=torch.float64)
    freqs = torch.exp(-math.log(max_period) * k / half)
    args = t[:, None].double() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _diffusers_timestep_features(t, dim, max_period=10000):
    """diffusers' float32 features (get_timestep_embedding with flip_sin_to_cos=True and
    downscale_freq_shift=1): the official operations in the same order, but the exponent is
    divided by half - 1 (127), not half (128)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32) / (half - 1)
    args = t[:, None].float() * torch.exp(exponent)[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def run_official(models, cfg, sd, x, t, y, dtype, cfg_scale=None):
    model = build_model(models, cfg, sd, dtype)
    if dtype == torch.float64:
        model.t_embedder.timestep_embedding = _timestep_features_f64
    with torch.no_grad():
        if cfg_scale is None:
            return model(x.to(dtype), t, y)
        return model.forward_with_cfg(x.to(dtype), t, y, cfg_scale)


def run_patched_diffusers_numerics(models, cfg, sd, x, t, y):
    """The fallback diffusers reference: official model with diffusers' two numeric changes."""
    model = build_model(models, cfg, sd)
    model.t_embedder.timestep_embedding = _diffusers_timestep_features
    for block in model.blocks:
        block.norm2.eps = 1e-5  # diffusers norm3 uses config.norm_eps; norm1 keeps 1e-6
    with torch.no_grad():
        return model(x, t, y)


def run_diffusers(folder, sd, x, t, y):
    """Load our diffusers folder with diffusers itself; fail on any key mismatch."""
    from diffusers import DiTTransformer2DModel, Transformer2DModel

    # low_cpu_mem_usage=False: the default wants `accelerate` and only warns without it.
    model, info = DiTTransformer2DModel.from_pretrained(
        os.path.join(folder, "transformer"), torch_dtype=torch.float32, output_loading_info=True,
        low_cpu_mem_usage=False)
    for what in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        if info.get(what):
            raise RuntimeError(f"diffusers load of {folder}: {what} = {info[what]}")
    # The legacy class name in config.json must still resolve to the DiT class, as the Hub's does.
    legacy = Transformer2DModel.from_pretrained(os.path.join(folder, "transformer"), low_cpu_mem_usage=False)
    if type(legacy).__name__ != "DiTTransformer2DModel":
        raise RuntimeError(f"Transformer2DModel remapped to {type(legacy).__name__}")
    model.eval()
    # diffusers recomputes pos_embed; it must agree with the stored official table.
    pe_diff = (model.pos_embed.pos_embed.float() - sd["pos_embed"]).abs().max().item()
    with torch.no_grad():
        out = model(x, timestep=t, class_labels=y).sample
    return out, pe_diff


def rel_l2(a, ref):
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


def stats(t):
    t = t.double()
    return dict(rms=t.pow(2).mean().sqrt().item(), max_abs=t.abs().max().item(), std=t.std().item())


def save(tensors, path, note):
    dit_layouts.save_safetensors(tensors, path, {"format": "pt", "note": note})


def make_fixture(name, spec, models, out_dir, have_diffusers, report):
    cfg = spec["config"]
    seed = spec["seed"]
    d = os.path.join(out_dir, name)
    os.makedirs(d)
    rep = report.setdefault(name, {"config": dit_layouts.config_json(cfg)})

    torch.manual_seed(0)
    model = models.DiT(**cfg)
    reinit_(model, seed)
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in sd.items()} == dit_layouts.official_shapes(cfg)
    dit_layouts.save_safetensors(sd, os.path.join(d, "official.safetensors"), dit_layouts.official_metadata(cfg))

    g = torch.Generator().manual_seed(seed + 1000)
    I, cin = cfg["input_size"], cfg["in_channels"]
    x = torch.randn(4, cin, I, I, generator=g)
    t = torch.tensor(T_STEPS, dtype=torch.int64)
    y = torch.tensor(spec["y"], dtype=torch.int64)
    assert cfg["num_classes"] in spec["y"], "every fixture needs a null-label row"

    out = run_official(models, cfg, sd, x, t, y, torch.float32)
    out64 = run_official(models, cfg, sd, x, t, y, torch.float64)
    save(dict(x=x, t=t, y=y, out=out, out_f64=out64), os.path.join(d, "forward.safetensors"),
         "official DiT.forward(x, t, y); out float32, out_f64 the same model in float64")
    rep["forward"] = dict(out=stats(out), rel_l2_f32_vs_f64=rel_l2(out, out64),
                          max_abs_f32_vs_f64=(out.double() - out64).abs().max().item())

    if spec["low_precision"]:
        for tag, dt in LOW_PRECISION.items():
            sd_lp = {k: v.to(dt).contiguous() for k, v in sd.items()}
            dit_layouts.save_safetensors(sd_lp, os.path.join(d, f"official_{tag}.safetensors"),
                                         dit_layouts.official_metadata(cfg))
            # The reference for a low-precision file is the exact f32 model of its rounded weights.
            lp32 = run_official(models, cfg, sd_lp, x, t, y, torch.float32)
            lp64 = run_official(models, cfg, sd_lp, x, t, y, torch.float64)
            save(dict(x=x, t=t, y=y, out=lp32, out_f64=lp64), os.path.join(d, f"forward_{tag}.safetensors"),
                 f"official forward of official_{tag}.safetensors upcast to float32 (out) / float64 (out_f64)")
            rep[f"forward_{tag}"] = dict(rel_l2_vs_f32_weights=rel_l2(lp32, out),
                                         rel_l2_f32_vs_f64=rel_l2(lp32, lp64))

    if spec["cfg"]:
        # sample.py's batch layout: x = [z; z], y = [labels; null]; t equal within each pair.
        n = 2
        z = torch.randn(n, cin, I, I, generator=g)
        xc = torch.cat([z, z])
        tc = torch.tensor([250, 999, 250, 999], dtype=torch.int64)
        yc = torch.tensor([spec["y"][0], spec["y"][2]] + [cfg["num_classes"]] * n, dtype=torch.int64)
        outc = run_official(models, cfg, sd, xc, tc, yc, torch.float32, cfg_scale=CFG_SCALE)
        outc64 = run_official(models, cfg, sd, xc, tc, yc, torch.float64, cfg_scale=CFG_SCALE)
        save(dict(x=xc, t=tc, y=yc, cfg_scale=torch.tensor([CFG_SCALE]), out=outc, out_f64=outc64),
             os.path.join(d, "forward_cfg.safetensors"),
             "official DiT.forward_with_cfg(x, t, y, cfg_scale): guides channels 0..2 only")
        rep["forward_cfg"] = dict(out=stats(outc), rel_l2_f32_vs_f64=rel_l2(outc, outc64))

    if spec["diffusers"]:
        tdir = os.path.join(d, "diffusers", "transformer")
        os.makedirs(tdir)
        with open(os.path.join(tdir, "config.json"), "w") as f:
            f.write(dit_layouts.diffusers_config_text(cfg))
        dit_layouts.save_safetensors(dit_layouts.official_to_diffusers(sd, cfg["depth"]),
                                     os.path.join(tdir, "diffusion_pytorch_model.safetensors"), {"format": "pt"})
        patched = run_patched_diffusers_numerics(models, cfg, sd, x, t, y)
        entry = {}
        if have_diffusers:
            outd, pe_diff = run_diffusers(os.path.join(d, "diffusers"), sd, x, t, y)
            entry.update(source="diffusers DiTTransformer2DModel", pos_embed_max_diff=pe_diff,
                         max_abs_vs_patched_official=(outd - patched).abs().max().item())
        else:
            outd = patched
            entry.update(source="official model patched to diffusers numerics (diffusers not installed)")
        save(dict(x=x, t=t, y=y, out=outd), os.path.join(d, "forward_diffusers.safetensors"),
             "diffusers numerics (t divisor 127, pre-MLP LayerNorm eps 1e-5), same weights and x/t/y "
             "as forward.safetensors; source: " + entry["source"])
        entry.update(out=stats(outd), max_abs_vs_official=(outd - out).abs().max().item(),
                     rel_l2_vs_official=rel_l2(outd, out))
        rep["forward_diffusers"] = entry


def versions(have_diffusers):
    import safetensors
    import timm
    v = {"python": sys.version.split()[0], "torch": torch.__version__, "timm": timm.__version__,
         "numpy": np.__version__, "safetensors": safetensors.__version__}
    if have_diffusers:
        import diffusers
        v["diffusers"] = diffusers.__version__
    return v


def write_readme(out_dir, report, vers, models_sha, have_diffusers):
    files = []
    for root, _, names in os.walk(out_dir):
        for fname in names:
            p = os.path.join(root, fname)
            files.append((os.path.relpath(p, out_dir), os.path.getsize(p)))
    files.sort()
    total = sum(s for _, s in files)
    lines = [
        "# Reference fixtures for icdit",
        "",
        "Generated by `tools/make_fixtures.py`; do not edit by hand (this README included).",
        "",
        "## Regenerate",
        "",
        "```sh",
        "git clone https://github.com/facebookresearch/DiT /tmp/DiT && git -C /tmp/DiT checkout ed81ce2",
        "pip install torch numpy safetensors timm==0.9.16 diffusers",
        "python3 tools/make_fixtures.py --dit-repo /tmp/DiT --out tests/fixtures",
        "```",
        "",
        f"Official `models.py` sha256: `{models_sha}`.",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()) + ".",
        "",
        "Runs on the CPU with one thread and `torch.use_deterministic_algorithms(True)`: two runs",
        "on one machine give byte-identical files. Another CPU or torch version may change the last",
        "bits of the outputs (not the weights or inputs); compare with tolerances, not bytes.",
        "",
        "## Models",
        "",
        "Each is the official `DiT(**dit_config)` with every parameter except `pos_embed` redrawn",
        f"from seeded normals (weights std {WEIGHT_GAIN}/sqrt(fan_in), adaLN weights std"
        f" {ADALN_GAIN}/sqrt(fan_in), biases std {BIAS_STD}, label rows std {LABEL_STD});",
        "`pos_embed` keeps the official sin-cos value. The official init would zero adaLN and the",
        "final layer and hence every output.",
        "",
    ]
    for name, spec in FIXTURES.items():
        lines.append(f"* `{name}`: `{dit_layouts.config_json(spec['config'])}`")
    lines += [
        "",
        "## Files (per model folder)",
        "",
        "* `official.safetensors`: official state-dict names and shapes, float32; `__metadata__`",
        "  = `{\"format\": \"pt\", \"dit_config\": <JSON of the DiT(...) arguments>}`.",
        "* `official_f16.safetensors`, `official_bf16.safetensors` (rgb_h6): the same weights rounded",
        "  to f16 / bf16 (every tensor, `pos_embed` included), same metadata.",
        "* `forward.safetensors`: `x` f32 [4, Cin, I, I] (standard normal), `t` i64 [4] =",
        f"  {T_STEPS} (original diffusion steps), `y` i64 [4] with one null label (= num_classes),",
        "  `out` f32 [4, Cout, I, I] = official `model(x, t, y)`, and `out_f64` = the same in",
        "  float64 (`model.double()`, the [cos | sin] timestep features also computed in float64;",
        "  the official function builds them in float32 whatever the model dtype). Most of the",
        "  official f32-vs-f64 error comes from those float32 timestep features (arguments up to",
        "  999 rad carry ~6e-5 rad of rounding), not from the network.",
        "* `forward_f16.safetensors`, `forward_bf16.safetensors` (rgb_h6): the same x/t/y; `out` /",
        "  `out_f64` = official forward of the rounded weights upcast to f32 / f64.",
        "* `forward_cfg.safetensors` (hd72): official `forward_with_cfg`, `x` = [z; z] (z batch 2),",
        "  `t` = [250, 999, 250, 999], `y` = [two labels; null, null], `cfg_scale` f32 [1] = 4.0,",
        "  `out`, `out_f64`. Only channels 0..2 are guided (official quirk).",
        "* `diffusers/transformer/{config.json, diffusion_pytorch_model.safetensors}` (hd72,",
        "  p4_nosigma): the same weights in the diffusers layout (no pos_embed, embedders copied",
        "  into every block, qkv split into to_q/to_k/to_v), config as diffusers' conversion script",
        "  writes it (legacy `_class_name` Transformer2DModel, `norm_eps` 1e-5 explicit).",
        "* `forward_diffusers.safetensors` (hd72, p4_nosigma): the same x/t/y as `forward`, `out` =",
        "  diffusers numerics for the same weights (timestep divisor 127, pre-MLP LayerNorm eps 1e-5).",
        "  Source: " + ("`DiTTransformer2DModel.from_pretrained(<model>/diffusers/transformer)` in"
                       " float32, loaded with no missing/unexpected keys." if have_diffusers else
                       "diffusers was NOT installed; the official model patched to diffusers"
                       " numerics (divisor 127, norm2.eps 1e-5)."),
        "",
        "## Measured (this generation)",
        "",
        "```json",
        json.dumps(report, indent=1, sort_keys=True),
        "```",
        "",
        f"## File sizes ({total:,} bytes in all)",
        "",
    ]
    lines += [f"* `{p}`: {s:,} B" for p, s in files if p != "README.md"]
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def _round_floats(obj):
    """Fix printed precision so the README is byte-stable (json's repr of floats is exact)."""
    if isinstance(obj, float):
        return float(f"{obj:.4g}")
    if isinstance(obj, dict):
        return {k: _round_floats(v) for k, v in obj.items()}
    return obj


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dit-repo", required=True, help="facebookresearch/DiT checkout (its models.py is imported)")
    ap.add_argument("--out", required=True, help="output folder, e.g. tests/fixtures (rewritten)")
    args = ap.parse_args()

    torch.set_num_threads(1)  # BLAS blocking can depend on the thread count
    torch.use_deterministic_algorithms(True)

    try:
        import diffusers  # noqa: F401
        have_diffusers = True
    except ImportError:
        have_diffusers = False
        print("diffusers not importable: diffusers references come from the patched official model",
              file=sys.stderr)

    models, models_sha = import_official_models(args.dit_repo)
    # Rebuild our own entries from scratch so no stale file survives; touch nothing else.
    for entry in list(FIXTURES) + ["README.md"]:
        p = os.path.join(args.out, entry)
        if os.path.isdir(p):
            shutil.rmtree(p)
        elif os.path.exists(p):
            os.remove(p)
    os.makedirs(args.out, exist_ok=True)

    report = {}
    for name, spec in FIXTURES.items():
        make_fixture(name, spec, models, args.out, have_diffusers, report)
    report = _round_floats(report)
    write_readme(args.out, report, versions(have_diffusers), models_sha, have_diffusers)
    print(json.dumps(report, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
