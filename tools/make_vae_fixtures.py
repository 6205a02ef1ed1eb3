#!/usr/bin/env python3
"""Regenerate tests/fixtures/vae/: tiny random SD-VAE models (diffusers AutoencoderKL) and decodes.

    pip install torch numpy safetensors diffusers
    python3 tools/make_vae_fixtures.py --out tests/fixtures/vae

Each model is diffusers' `AutoencoderKL` with the SD-VAE architecture (doc F.1) at toy widths,
every parameter re-drawn from seeded normals (the default init leaves GroupNorm at 1/0, which
would let a loader that skips those tensors pass). The reference decode is exactly what DiT's
scripts run, `vae.decode(latents / scaling_factor).sample`, on the CPU in float32 with one
thread and deterministic algorithms, plus a float64 decode of the same weights for context and
a float64 re-implementation of doc F.2 from plain torch ops as a cross-check of the doc.

Three model folders, each loadable with `AutoencoderKL.from_pretrained(folder)`:
  new/          save_pretrained layout, current attention names (to_q/to_k/to_v/to_out.0),
                no scaling_factor in config.json (class default 0.18215 applies);
  old/          pre-0.14 attention names (query/key/value/proj_attn), a 2022-style config.json
                with only the keys Hub files of that time carry plus scaling_factor 0.5;
  unknown_attn/ the `new` weights with the attention linears renamed to q_proj/k_proj/v_proj/
                out_proj, a naming no loader should guess at (negative test).
Both real files and these hold the encoder and quant_conv too; a decoder loader ignores them.
Two runs on one machine give byte-identical files (README.md lists the sha256 of each).
"""

import argparse
import copy
import hashlib
import json
import math
import os
import shutil
import struct
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dit_layouts  # noqa: E402  (save_safetensors: canonical header for byte-stable files)

DEFAULT_SCALING_FACTOR = 0.18215  # AutoencoderKL's class default (doc F.1)
LABELS = [3, 7]

# Widths are far below the brief's first sketch ([32, 64, 64] / [32, 48]): those models are
# 3.8 MB and 2.1 MB of float32 with their encoders, and the fixture set must stay under ~2 MB.
# What the tests need is kept: 3 levels with two upsamplers and a conv_shortcut (new), 2 levels
# with layers_per_block 2 (3 resnets per up block) and odd channels per group (old), several
# channels per GroupNorm group, and widths that are not multiples of 8 (12, 20, 24).
MODELS = {
    "new": dict(seed=1001, block_out_channels=[16, 24, 24], layers_per_block=1, norm_num_groups=8,
                scaling_factor=None, names="new"),
    "old": dict(seed=2002, block_out_channels=[12, 20], layers_per_block=2, norm_num_groups=4,
                scaling_factor=0.5, names="old"),
}

# The keys an early (diffusers 0.4-0.12) AutoencoderKL config.json carries, e.g. sd-vae-ft-ema's.
# Later keys (use_quant_conv, use_post_quant_conv, force_upcast, latents_mean/std, shift_factor,
# mid_block_add_attention, scaling_factor) are absent there and take their class defaults.
OLD_CONFIG_KEYS = ("_class_name", "_diffusers_version", "act_fn", "block_out_channels",
                   "down_block_types", "in_channels", "latent_channels", "layers_per_block",
                   "norm_num_groups", "out_channels", "sample_size", "up_block_types")

# Attention linear names: current diffusers, pre-0.14 AttentionBlock, and an invented naming.
ATTN_NAMES = {
    "new": ("to_q", "to_k", "to_v", "to_out.0"),
    "old": ("query", "key", "value", "proj_attn"),
    "unknown": ("q_proj", "k_proj", "v_proj", "out_proj"),
}
ATTN_BLOCKS = ("encoder.mid_block.attentions.0", "decoder.mid_block.attentions.0")

# Init scales. Conv/Linear weights ~ N(0, gain^2 / fan_in): every conv follows GroupNorm + SiLU,
# so each residual branch adds O(0.6) to a stream of O(1) and nothing grows or vanishes over
# these few blocks. Biases and GroupNorm affines are non-trivial so that dropping any of them
# changes the output.
WEIGHT_GAIN = 1.0
BIAS_STD = 0.05
NORM_WEIGHT_STD = 0.1   # weight = 1 + std * N(0, 1)
NORM_BIAS_STD = 0.1
LATENT_STD = DEFAULT_SCALING_FACTOR * 4  # ~0.73: the scale of DiT's sampled latents

# A u8 value is "near a rounding step" if the decoder output is within eps of one (in
# decoder-output units: eps = 1e-4 is 0.01275 grey levels); counted for each eps.
BOUNDARY_EPS = (1e-4, 1e-5, 1e-6)
PROBE_ULPS = 2  # conversion probe: each rounding step's nearest f32 and this many ulps either side


def ae_config(spec):
    n = len(spec["block_out_channels"])
    cfg = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * n,
               up_block_types=["UpDecoderBlock2D"] * n, block_out_channels=list(spec["block_out_channels"]),
               layers_per_block=spec["layers_per_block"], act_fn="silu", latent_channels=4,
               norm_num_groups=spec["norm_num_groups"], sample_size=32, use_post_quant_conv=True)
    if spec["scaling_factor"] is not None:
        cfg["scaling_factor"] = spec["scaling_factor"]
    return cfg


def reinit_(model, seed):
    """Overwrite every parameter with seeded normals (scales above). Shared with bench_vae_pytorch.py."""
    g = torch.Generator().manual_seed(seed)
    done = set()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.copy_(1.0 + NORM_WEIGHT_STD * torch.randn(module.weight.shape, generator=g))
                module.bias.copy_(NORM_BIAS_STD * torch.randn(module.bias.shape, generator=g))
            elif isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                w = module.weight
                w.copy_(torch.randn(w.shape, generator=g) * (WEIGHT_GAIN / math.sqrt(w[0].numel())))
                if module.bias is not None:
                    module.bias.copy_(BIAS_STD * torch.randn(module.bias.shape, generator=g))
            else:
                continue
            done.update(f"{name}.{p}" for p, _ in module.named_parameters(recurse=False))
    missed = [n for n, _ in model.named_parameters() if n not in done]
    if missed or list(model.buffers()):
        raise RuntimeError(f"parameters not re-drawn: {missed}; buffers: {len(list(model.buffers()))}")


def build_vae(config, seed):
    from diffusers import AutoencoderKL
    torch.manual_seed(0)  # the default init draws from the global RNG; it is overwritten anyway
    model = AutoencoderKL(**config)
    reinit_(model, seed)
    return model.eval()


def rename_attention(sd, names):
    """Copy of a new-name state dict with the mid-block attention linears renamed (group_norm stays)."""
    out = {}
    for k, v in sd.items():
        for block in ATTN_BLOCKS:
            for new, other in zip(ATTN_NAMES["new"], ATTN_NAMES[names]):
                if k.startswith(f"{block}.{new}."):
                    k = f"{block}.{other}." + k[len(f"{block}.{new}."):]
        out[k] = v.detach().clone().contiguous()
    return out


def write_config(path, cfg):
    # diffusers' own format (ConfigMixin.to_json_string): indent 2, sorted keys, trailing newline.
    with open(path, "w") as f:
        f.write(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def read_header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def load_with_diffusers(folder):
    from diffusers import AutoencoderKL
    model, info = AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32, output_loading_info=True,
                                                low_cpu_mem_usage=False)
    bad = {k: v for k, v in info.items() if v}
    return model.eval(), bad


def decode(model, latents, scaling_factor):
    with torch.no_grad():
        return model.decode(latents / scaling_factor).sample


# ---- independent float64 reference of doc F.2, from the state dict and plain torch ops ----

def _gn(sd, p, x, groups):
    return F.group_norm(x, groups, sd[p + ".weight"], sd[p + ".bias"], eps=1e-6)


def _conv(sd, p, x):
    w = sd[p + ".weight"]
    return F.conv2d(x, w, sd[p + ".bias"], padding=w.shape[-1] // 2)


def _resnet(sd, p, x, groups):
    h = _conv(sd, p + ".conv1", F.silu(_gn(sd, p + ".norm1", x, groups)))
    h = _conv(sd, p + ".conv2", F.silu(_gn(sd, p + ".norm2", h, groups)))
    skip = _conv(sd, p + ".conv_shortcut", x) if p + ".conv_shortcut.weight" in sd else x
    return skip + h


def _attention(sd, p, x, groups):
    b, c, hh, ww = x.shape
    h = _gn(sd, p + ".group_norm", x, groups).reshape(b, c, hh * ww).transpose(1, 2)  # (B, HW, C)
    q, k, v = (F.linear(h, sd[f"{p}.{n}.weight"], sd[f"{p}.{n}.bias"]) for n in ("to_q", "to_k", "to_v"))
    a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(c), dim=-1) @ v  # one head of width C
    o = F.linear(a, sd[p + ".to_out.0.weight"], sd[p + ".to_out.0.bias"])
    return o.transpose(1, 2).reshape(b, c, hh, ww) + x


def reference_decode_f64(sd, cfg, z):
    sd = {k: v.double() for k, v in sd.items()}
    g, n_up = cfg["norm_num_groups"], len(cfg["block_out_channels"])
    x = _conv(sd, "post_quant_conv", z.double())
    x = _conv(sd, "decoder.conv_in", x)
    x = _resnet(sd, "decoder.mid_block.resnets.0", x, g)
    x = _attention(sd, "decoder.mid_block.attentions.0", x, g)
    x = _resnet(sd, "decoder.mid_block.resnets.1", x, g)
    for i in range(n_up):
        for j in range(cfg["layers_per_block"] + 1):
            x = _resnet(sd, f"decoder.up_blocks.{i}.resnets.{j}", x, g)
        if i < n_up - 1:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            x = _conv(sd, f"decoder.up_blocks.{i}.upsamplers.0.conv", x)
    x = F.silu(_gn(sd, "decoder.conv_norm_out", x, g))
    return _conv(sd, "decoder.conv_out", x)


# ---- uint8 conversions ----

def u8_dit(x):
    """DiT sample_ddp.py: clamp(127.5 x + 128, 0, 255) then a truncating cast, NHWC."""
    return torch.clamp(127.5 * x + 128.0, 0, 255).permute(0, 2, 3, 1).to(torch.uint8).contiguous()


def u8_diffusers(x):
    """DiTPipeline / VaeImageProcessor: (x/2 + 0.5).clamp(0, 1) in torch, NHWC float32 numpy,
    then numpy_to_pil's (images * 255).round().astype("uint8") (round half to even)."""
    s = (x / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
    return torch.from_numpy((s * 255).round().astype("uint8"))


def check_u8_diffusers(x, mine):
    """Compare with diffusers' own functions, so a change in diffusers is noticed."""
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.utils.pil_utils import numpy_to_pil
    s = (x / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
    via_pipeline = np.stack([np.asarray(im) for im in numpy_to_pil(s)])
    via_processor = np.stack([np.asarray(im) for im in VaeImageProcessor().postprocess(x, output_type="pil")])
    for what, arr in (("DiTPipeline path", via_pipeline), ("VaeImageProcessor.postprocess", via_processor)):
        if not np.array_equal(arr, mine.numpy()):
            raise RuntimeError(f"u8_diffusers differs from {what}")


def near_steps(x, eps):
    """Elements whose decoder output lies within eps (decoder units) of a u8 rounding step.

    Both conversions step where 127.5x + 127.5 = k + 0.5 (DiT: 127.5x + 128 = k + 1 truncated;
    diffusers: 255(x/2 + 0.5) = k + 0.5 rounded), k = 0..254, so one count serves both.
    """
    w = 127.5 * x.double() + 127.5 - 0.5
    k = w.round()
    return int((((w - k).abs() < 127.5 * eps) & (k >= 0) & (k <= 254)).sum())


def conversion_probe():
    """f32 values at and around every rounding step of both u8 conversions, plus edge values.

    On decoder outputs the two conversions nearly always agree (both are 127.5x + 127.5 rounded;
    they differ in tie-breaking and in float32 rounding of the intermediate products), so only
    values placed on the steps tell them apart.
    """
    steps = [(k - 128) / 127.5 for k in range(1, 256)] + [2 * (k + 0.5) / 255 - 1 for k in range(255)]
    xs = [-2.0, -1.0, -0.5, 0.0, 0.25, 0.5, 1.0, 2.0, 1e30, -1e30, float("inf"), float("-inf")]
    for b in steps:
        c = np.float32(b)
        lo = hi = c
        xs.append(c)
        for _ in range(PROBE_ULPS):
            lo = np.nextafter(lo, np.float32(-np.inf))
            hi = np.nextafter(hi, np.float32(np.inf))
            xs += [lo, hi]
    x = torch.from_numpy(np.unique(np.array(xs, dtype=np.float32)))
    # The conversions take NCHW and return NHWC; run the probe as one image row of 1 channel x 3.
    img = x.repeat(3).reshape(1, 3, 1, -1)
    return x, u8_dit(img)[0, 0, :, 0].contiguous(), u8_diffusers(img)[0, 0, :, 0].contiguous()


def rel_l2(a, ref):
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


def stats(t):
    t = t.double()
    return dict(mean=t.mean().item(), std=t.std().item(), min=t.min().item(), max=t.max().item(),
                frac_abs_gt_1=(t.abs() > 1).double().mean().item())


def activation_stds(model, z):
    """std of the decoder stream after each stage: shows the init keeps activations O(1)."""
    out, hooks = {}, []
    dec = model.decoder
    named = [("conv_in", dec.conv_in), ("mid_block", dec.mid_block)]
    named += [(f"up_blocks.{i}", b) for i, b in enumerate(dec.up_blocks)]
    for name, m in named:
        hooks.append(m.register_forward_hook(lambda _m, _i, o, name=name: out.__setitem__(name, o.std().item())))
    with torch.no_grad():
        model.decode(z)
    for h in hooks:
        h.remove()
    return out


def sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def make_model(name, spec, out_dir, report):
    from diffusers import AutoencoderKL
    d = os.path.join(out_dir, name)
    cfg = ae_config(spec)
    model = build_vae(cfg, spec["seed"])
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    sf = spec["scaling_factor"] if spec["scaling_factor"] is not None else DEFAULT_SCALING_FACTOR
    rep = report.setdefault(name, {})

    if spec["names"] == "new":
        model.save_pretrained(d, safe_serialization=True)
        cpath = os.path.join(d, "config.json")
        written = json.load(open(cpath))
        written.pop("scaling_factor")  # as in the oldest Hub configs: the class default applies
        write_config(cpath, written)
    else:
        os.makedirs(d)
        from safetensors.torch import save_file
        save_file(rename_attention(sd, spec["names"]), os.path.join(d, "diffusion_pytorch_model.safetensors"),
                  metadata={"format": "pt"})
        full = json.loads(model.to_json_string())
        written = {k: full[k] for k in OLD_CONFIG_KEYS}
        written["scaling_factor"] = spec["scaling_factor"]
        write_config(os.path.join(d, "config.json"), written)

    # Latents in the layout of `icdit sample --out-latents`.
    g = torch.Generator().manual_seed(spec["seed"] + 1)
    latents = torch.randn(len(LABELS), 4, 8, 8, generator=g) * LATENT_STD
    labels = torch.tensor(LABELS, dtype=torch.int64)
    dit_layouts.save_safetensors(dict(latents=latents, labels=labels), os.path.join(d, "latents.safetensors"),
                                 {"format": "pt"})

    dec = decode(model, latents, sf)
    dec64 = decode(copy.deepcopy(model).double(), latents.double(), sf)
    ref64 = reference_decode_f64(sd, cfg, latents.double() / sf)

    # The written folder must load in diffusers (old names converted on load) and decode identically.
    loaded, bad = load_with_diffusers(d)
    if bad:
        raise RuntimeError(f"diffusers load of {d}: {bad}")
    if loaded.config.scaling_factor != sf:
        raise RuntimeError(f"{d}: scaling_factor {loaded.config.scaling_factor} != {sf}")
    lsd = loaded.state_dict()
    if set(lsd) != set(sd) or any(not torch.equal(lsd[k], sd[k]) for k in sd):
        raise RuntimeError(f"{d}: diffusers loaded different weights")
    dec_loaded = decode(loaded, latents, loaded.config.scaling_factor)
    if not torch.equal(dec_loaded, dec):
        raise RuntimeError(f"{d}: decode of the loaded folder differs from the in-memory model")

    # DiTPipeline multiplies by 1/scaling_factor instead of dividing; how much that changes here.
    dec_pipe = decode(model, latents * (1 / sf), 1.0)

    u_dit, u_dif = u8_dit(dec), u8_diffusers(dec)
    check_u8_diffusers(dec, u_dif)
    dit_layouts.save_safetensors(
        dict(decoded=dec, decoded_f64=dec64, u8_dit=u_dit, u8_diffusers=u_dif),
        os.path.join(d, "expected.safetensors"), {"format": "pt"})

    rep.update(
        config=json.dumps(written, sort_keys=True),
        scaling_factor=sf,
        latents=stats(latents),
        decoder_activation_std=activation_stds(model, latents / sf),
        decoded=stats(dec),
        rel_l2_f32_vs_f64=rel_l2(dec, dec64),
        max_abs_f32_vs_f64=(dec.double() - dec64).abs().max().item(),
        max_abs_diffusers_f64_vs_doc_reimplementation_f64=(dec64 - ref64).abs().max().item(),
        max_abs_times_reciprocal_vs_divide=(dec_pipe - dec).abs().max().item(),
        diffusers_load="from_pretrained: no missing/unexpected keys, same weights, bit-identical decode",
        u8_elements=u_dit.numel(),
        u8_within_eps_of_step={f"{eps:g}": near_steps(dec, eps) for eps in BOUNDARY_EPS},
        u8_dit_f32_vs_f64_mismatches=int((u8_dit(dec64) != u_dit).sum()),
        u8_diffusers_f32_vs_f64_mismatches=int((u8_diffusers(dec64) != u_dif).sum()),
        u8_dit_vs_u8_diffusers_mismatches=int((u_dit != u_dif).sum()),
    )
    if not 0.3 <= rep["decoded"]["std"] <= 1.0 or rep["decoded"]["frac_abs_gt_1"] > 0.5:
        raise RuntimeError(f"{name}: decoded output out of the intended range: {rep['decoded']}")
    return sd, written


def make_unknown(sd, config, out_dir, report):
    """The `new` weights with an attention naming that is neither current nor pre-0.14 diffusers."""
    from safetensors.torch import save_file
    d = os.path.join(out_dir, "unknown_attn")
    os.makedirs(d)
    save_file(rename_attention(sd, "unknown"), os.path.join(d, "diffusion_pytorch_model.safetensors"),
              metadata={"format": "pt"})
    write_config(os.path.join(d, "config.json"), config)
    # Record what diffusers does with it (it does not know these names either).
    try:
        _, bad = load_with_diffusers(d)
        report["unknown_attn"] = {"diffusers_from_pretrained": {k: sorted(v) for k, v in bad.items()}}
    except Exception as e:  # noqa: BLE001 - any failure is the expected outcome; record it
        report["unknown_attn"] = {"diffusers_from_pretrained": f"raised {type(e).__name__}: "
                                                               f"{str(e).splitlines()[0][:200]}"}


def versions():
    import diffusers
    import safetensors
    return {"python": sys.version.split()[0], "torch": torch.__version__, "diffusers": diffusers.__version__,
            "numpy": np.__version__, "safetensors": safetensors.__version__}


def describe(path):
    """'name dtype [shape]' for every tensor of a safetensors file, from its header."""
    h = read_header(path)
    return [f"`{k}` {v['dtype']} {v['shape']}" for k, v in sorted(h.items()) if k != "__metadata__"]


def _round_floats(obj):
    if isinstance(obj, float):
        return float(f"{obj:.4g}")
    if isinstance(obj, dict):
        return {k: _round_floats(v) for k, v in obj.items()}
    return obj


def write_readme(out_dir, report, vers):
    files = []
    for root, _, names in os.walk(out_dir):
        for fname in names:
            p = os.path.join(root, fname)
            if os.path.relpath(p, out_dir) != "README.md":
                files.append((os.path.relpath(p, out_dir), os.path.getsize(p), sha256(p)))
    files.sort()
    total = sum(s for _, s, _ in files)
    lines = [
        "# SD-VAE decoder fixtures for icdit",
        "",
        "Generated by `tools/make_vae_fixtures.py`; do not edit by hand (this README included).",
        "",
        "## Regenerate",
        "",
        "```sh",
        "pip install torch numpy safetensors diffusers",
        "python3 tools/make_vae_fixtures.py --out tests/fixtures/vae",
        "```",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()) + ".",
        "",
        "CPU, one thread, `torch.use_deterministic_algorithms(True)`: two runs on one machine give",
        "byte-identical files (sha256 below; checked by running twice). Another CPU or torch version",
        "may change the last bits of the decodes (not the weights or latents): compare with tolerances.",
        "",
        "## Models",
        "",
        "diffusers `AutoencoderKL` (SD-VAE architecture, doc F.1, at toy widths; encoder included as in",
        "real files), every parameter redrawn from seeded normals:",
        f"GroupNorm weight 1 + {NORM_WEIGHT_STD}·N(0,1), bias {NORM_BIAS_STD}·N(0,1); Conv2d/Linear weight",
        f"N(0, {WEIGHT_GAIN}²/fan_in), bias {BIAS_STD}·N(0,1). Widths are small so that the whole set stays",
        "under 2 MB. All GroupNorms use eps 1e-6; the mid-block attention is one head of width C.",
        "",
    ]
    for name, spec in MODELS.items():
        lines.append(f"* `{name}` (seed {spec['seed']}): block_out_channels {spec['block_out_channels']},"
                     f" layers_per_block {spec['layers_per_block']}, norm_num_groups {spec['norm_num_groups']},"
                     f" latent_channels 4, scaling_factor "
                     + (f"{spec['scaling_factor']!r} (in config.json)." if spec["scaling_factor"] is not None
                        else f"absent from config.json (class default {DEFAULT_SCALING_FACTOR!r})."))
    lines += [
        "",
        "Latent 8×8 → output 32×32 for `new` (two upsamplers), 16×16 for `old` (one).",
        "",
        "## Folders and files",
        "",
        "* `new/config.json`, `new/diffusion_pytorch_model.safetensors`: written by",
        "  `save_pretrained(safe_serialization=True)`, current attention names",
        "  `{encoder,decoder}.mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}.{weight,bias}`.",
        "  `scaling_factor` deleted from config.json (as in sd-vae-ft-ema's original config): a loader",
        "  must fall back to the class default 0.18215. All other current keys are present",
        "  (`use_post_quant_conv: true`, `use_quant_conv: true`, `mid_block_add_attention: true`, ...).",
        "* `old/config.json`: only the keys a 2022 Hub config has (`_class_name`, `_diffusers_version`,",
        "  `act_fn`, `block_out_channels`, `down_block_types`, `in_channels`, `latent_channels`,",
        "  `layers_per_block`, `norm_num_groups`, `out_channels`, `sample_size`, `up_block_types`) plus",
        "  `scaling_factor: 0.5`; `use_post_quant_conv`, `use_quant_conv`, `mid_block_add_attention`",
        "  etc. are absent and default to true.",
        "* `old/diffusion_pytorch_model.safetensors`: the full state dict with the pre-0.14 attention names",
        "  `{encoder,decoder}.mid_block.attentions.0.{group_norm,query,key,value,proj_attn}.{weight,bias}`",
        "  (Linear weights, 2-D (C, C)), written with `safetensors.torch.save_file`. diffusers'",
        "  `from_pretrained` renames them on load (`ModelMixin._fix_state_dict_keys_on_load`).",
        "* `unknown_attn/`: `new`'s config.json and weights with the attention linears renamed to",
        "  `q_proj/k_proj/v_proj/out_proj` (`group_norm` kept). Negative case: a loader must reject it,",
        "  naming the missing `to_q`/`query` tensors. diffusers 0.42 does not reject it: `from_pretrained`",
        "  only warns (missing/unexpected keys, recorded below) and leaves those attention weights at",
        "  their random init.",
        "* `<model>/latents.safetensors`: the layout `icdit sample --out-latents` writes: `latents`",
        f"  f32 [2, 4, 8, 8] = {LATENT_STD:.4f}·N(0,1) (seed + 1), `labels` i64 [2] = {LABELS}.",
        "* `<model>/expected.safetensors`:",
        "  * `decoded` f32 [2, 3, H, W] = `vae.decode(latents / scaling_factor).sample` (DiT's",
        "    sample.py order: divide, not multiply by the reciprocal), float32, not clamped;",
        "  * `decoded_f64` f64, the same with `vae.double()` and `latents.double() / scaling_factor`;",
        "  * `u8_dit` u8 [2, H, W, 3] (NHWC) from `decoded`: DiT sample_ddp.py,",
        "    `torch.clamp(127.5 * x + 128.0, 0, 255).to(torch.uint8)`: the cast truncates, i.e.",
        "    floor(clamp(127.5x + 128)) = round-half-up of 127.5x + 127.5;",
        "  * `u8_diffusers` u8 [2, H, W, 3] (NHWC) from `decoded`: diffusers 0.42 `DiTPipeline`",
        "    (`(x / 2 + 0.5).clamp(0, 1)` in torch f32, `.permute(0, 2, 3, 1).float().numpy()`) then",
        "    `numpy_to_pil`: `(images * 255).round().astype(\"uint8\")`, the product in float32 and",
        "    `np.round` rounding half to even. `VaeImageProcessor.postprocess(x, output_type=\"pil\")`",
        "    computes `x * 0.5 + 0.5` instead of `x / 2 + 0.5` (bit-identical) and gives the same bytes;",
        "    the script checks both against `u8_diffusers`.",
        "",
        "  Both conversions are 127.5x + 127.5 rounded to an integer and clamped; they differ only in",
        "  tie-breaking and in the float32 rounding of their intermediate products, so on the decoded",
        "  images they agree on (nearly) every element (counts below). Hence:",
        f"* `u8_conversion.safetensors`: `x` f32 [N], the float32 values nearest every rounding step of",
        f"  both conversions and {PROBE_ULPS} ulps either side, plus ±0.5, ±1, ±2, ±1e30, ±inf, 0, 0.25 (sorted,",
        "  unique); `u8_dit` u8 [N] and `u8_diffusers` u8 [N]: the two conversions of each value (the same",
        "  functions as above, via a 1×3×1×N image). Tests the Rust conversions bit-exactly.",
        "",
        "Checks made by the script on every run: `AutoencoderKL.from_pretrained(<folder>)` of `new` and",
        "`old` reports no missing/unexpected keys, yields exactly the generated weights, and decodes",
        "bit-identically; the float64 diffusers decode agrees with a float64 re-implementation of",
        "doc F.2 written from plain torch ops (max difference below); the decoded std is in 0.3-1.",
        "",
        "## Measured (this generation)",
        "",
        "`rel_l2_f32_vs_f64` is the float32 reference's own error. `u8_within_eps_of_step`:",
        "{eps: number of u8 elements whose f32 decoder output lies within eps (decoder units; 1e-4",
        "is 0.01275 grey levels) of a rounding step}; both conversions step at the same x",
        "(127.5x + 127.5 = k + 0.5), and a correct decoder may legitimately flip those elements. `*_f32_vs_f64_mismatches`: u8 elements that differ when converting",
        "`decoded_f64` instead. `max_abs_times_reciprocal_vs_divide`: decode of `latents * (1 / sf)`",
        "(DiTPipeline's order) minus decode of `latents / sf`. `u8_conversion.safetensors` entry:",
        "how many probe values the two conversions map differently.",
        "",
        "```json",
        json.dumps(report, indent=1, sort_keys=True),
        "```",
        "",
        f"## Files ({total:,} bytes in all, README excluded)",
        "",
    ]
    for p, s, h in files:
        lines.append(f"* `{p}`: {s:,} B, sha256 `{h}`")
        if not p.endswith("diffusion_pytorch_model.safetensors") and p.endswith(".safetensors"):
            lines += [f"  * {t}" for t in describe(os.path.join(out_dir, p))]
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="tests/fixtures/vae", help="output folder (its entries are rewritten)")
    args = ap.parse_args()

    torch.set_num_threads(1)  # BLAS/conv blocking can depend on the thread count
    torch.use_deterministic_algorithms(True)

    for entry in list(MODELS) + ["unknown_attn", "u8_conversion.safetensors", "README.md"]:
        p = os.path.join(args.out, entry)
        if os.path.isdir(p):
            shutil.rmtree(p)
        elif os.path.exists(p):
            os.remove(p)
    os.makedirs(args.out, exist_ok=True)

    report = {}
    built = {name: make_model(name, spec, args.out, report) for name, spec in MODELS.items()}
    make_unknown(*built["new"], args.out, report)
    x, pd, pf = conversion_probe()
    dit_layouts.save_safetensors(dict(x=x, u8_dit=pd, u8_diffusers=pf),
                                 os.path.join(args.out, "u8_conversion.safetensors"), {"format": "pt"})
    report["u8_conversion"] = dict(n=x.numel(), u8_dit_vs_u8_diffusers_mismatches=int((pd != pf).sum()))
    report = _round_floats(report)
    write_readme(args.out, report, versions())
    print(json.dumps(report, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
