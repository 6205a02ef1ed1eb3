"""Checkpoint layouts of class-conditional DiT: the official state dict and the diffusers port.

Shared by make_fixtures.py and convert_dit_checkpoint.py. Depends only on numpy/torch so the
converter works without the official repository or diffusers installed.

Facts used here come from /work/shared/docs/dit-reference.md (parts A.2, B and C); the key
mapping mirrors diffusers' scripts/convert_dit_to_diffusers.py.
"""

import json
import struct

import numpy as np
import torch
from safetensors.torch import save_file

# Constructor argument names of the official `DiT(...)`, in its signature order. The Rust
# loader parses exactly these from the "dit_config" metadata entry, so the order and names are
# part of the file format.
CONFIG_KEYS = (
    "input_size",
    "patch_size",
    "in_channels",
    "hidden_size",
    "depth",
    "num_heads",
    "mlp_ratio",
    "class_dropout_prob",
    "num_classes",
    "learn_sigma",
)

# The head count is in no tensor shape; the official families fix it per hidden size (doc C, trap 1).
HEADS_BY_HIDDEN = {1152: 16, 1024: 16, 768: 12, 384: 6}

# Width of the sinusoidal timestep features fed to t_embedder.mlp.0 (official default).
FREQ_DIM = 256


def out_channels(cfg):
    return 2 * cfg["in_channels"] if cfg["learn_sigma"] else cfg["in_channels"]


def config_json(cfg):
    """The "dit_config" metadata string: official argument names, fixed order, typed values."""
    typed = {
        "input_size": int(cfg["input_size"]),
        "patch_size": int(cfg["patch_size"]),
        "in_channels": int(cfg["in_channels"]),
        "hidden_size": int(cfg["hidden_size"]),
        "depth": int(cfg["depth"]),
        "num_heads": int(cfg["num_heads"]),
        # float() so it serialises as 4.0, never 4: the loader reads a JSON number either way,
        # but byte-stable output matters for the determinism check.
        "mlp_ratio": float(cfg["mlp_ratio"]),
        "class_dropout_prob": float(cfg["class_dropout_prob"]),
        "num_classes": int(cfg["num_classes"]),
        "learn_sigma": bool(cfg["learn_sigma"]),
    }
    return json.dumps({k: typed[k] for k in CONFIG_KEYS})


def official_metadata(cfg):
    return {"format": "pt", "dit_config": config_json(cfg)}


def official_shapes(cfg):
    """Every official state-dict key with its shape, in nn.Module.state_dict() order (doc C.1)."""
    C = cfg["hidden_size"]
    p = cfg["patch_size"]
    cin = cfg["in_channels"]
    n_tok = (cfg["input_size"] // p) ** 2
    hid = int(C * cfg["mlp_ratio"])
    # The label table has a spare "null" row only when label dropout was used in training.
    rows = cfg["num_classes"] + (1 if cfg["class_dropout_prob"] > 0 else 0)
    shapes = {
        "pos_embed": (1, n_tok, C),
        "x_embedder.proj.weight": (C, cin, p, p),
        "x_embedder.proj.bias": (C,),
        "t_embedder.mlp.0.weight": (C, FREQ_DIM),
        "t_embedder.mlp.0.bias": (C,),
        "t_embedder.mlp.2.weight": (C, C),
        "t_embedder.mlp.2.bias": (C,),
        "y_embedder.embedding_table.weight": (rows, C),
    }
    for i in range(cfg["depth"]):
        b = f"blocks.{i}."
        shapes.update({
            b + "attn.qkv.weight": (3 * C, C),
            b + "attn.qkv.bias": (3 * C,),
            b + "attn.proj.weight": (C, C),
            b + "attn.proj.bias": (C,),
            b + "mlp.fc1.weight": (hid, C),
            b + "mlp.fc1.bias": (hid,),
            b + "mlp.fc2.weight": (C, hid),
            b + "mlp.fc2.bias": (C,),
            b + "adaLN_modulation.1.weight": (6 * C, C),
            b + "adaLN_modulation.1.bias": (6 * C,),
        })
    shapes.update({
        "final_layer.linear.weight": (p * p * out_channels(cfg), C),
        "final_layer.linear.bias": (p * p * out_channels(cfg),),
        "final_layer.adaLN_modulation.1.weight": (2 * C, C),
        "final_layer.adaLN_modulation.1.bias": (2 * C,),
    })
    return shapes


def sincos_pos_embed(hidden_size, grid):
    """Fixed 2-D sin-cos table, (grid*grid, hidden_size) float64, written from the closed form
    of doc A.2: token n = i*grid + j gets [sin(j w), cos(j w), sin(i w), cos(i w)] with
    w_k = 10000^(-k/(C/4)). The first half encodes the column j, as the official meshgrid does.
    """
    q = hidden_size // 4
    omega = 1.0 / 10000 ** (np.arange(q, dtype=np.float64) / q)
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    a_col = cols.reshape(-1, 1).astype(np.float64) * omega
    a_row = rows.reshape(-1, 1).astype(np.float64) * omega
    return np.concatenate([np.sin(a_col), np.cos(a_col), np.sin(a_row), np.cos(a_row)], axis=1)


def official_to_diffusers(sd, depth):
    """Official state dict -> diffusers DiTTransformer2DModel state dict (doc C.2).

    pos_embed is dropped (diffusers recomputes it as a non-persistent buffer); the timestep and
    label embedders are copied into every block; qkv is split with torch.chunk along dim 0.
    Every output tensor is a fresh contiguous copy, because safetensors refuses shared storage.
    """
    def own(t):
        return t.detach().clone().contiguous()

    out = {
        "pos_embed.proj.weight": own(sd["x_embedder.proj.weight"]),
        "pos_embed.proj.bias": own(sd["x_embedder.proj.bias"]),
    }
    for i in range(depth):
        d = f"transformer_blocks.{i}."
        o = f"blocks.{i}."
        emb = d + "norm1.emb."
        out[emb + "timestep_embedder.linear_1.weight"] = own(sd["t_embedder.mlp.0.weight"])
        out[emb + "timestep_embedder.linear_1.bias"] = own(sd["t_embedder.mlp.0.bias"])
        out[emb + "timestep_embedder.linear_2.weight"] = own(sd["t_embedder.mlp.2.weight"])
        out[emb + "timestep_embedder.linear_2.bias"] = own(sd["t_embedder.mlp.2.bias"])
        out[emb + "class_embedder.embedding_table.weight"] = own(sd["y_embedder.embedding_table.weight"])
        out[d + "norm1.linear.weight"] = own(sd[o + "adaLN_modulation.1.weight"])
        out[d + "norm1.linear.bias"] = own(sd[o + "adaLN_modulation.1.bias"])
        for part in ("weight", "bias"):
            q, k, v = torch.chunk(sd[o + "attn.qkv." + part], 3, dim=0)
            out[d + "attn1.to_q." + part] = own(q)
            out[d + "attn1.to_k." + part] = own(k)
            out[d + "attn1.to_v." + part] = own(v)
            out[d + "attn1.to_out.0." + part] = own(sd[o + "attn.proj." + part])
            out[d + "ff.net.0.proj." + part] = own(sd[o + "mlp.fc1." + part])
            out[d + "ff.net.2." + part] = own(sd[o + "mlp.fc2." + part])
    for part in ("weight", "bias"):
        out["proj_out_1." + part] = own(sd["final_layer.adaLN_modulation.1." + part])
        out["proj_out_2." + part] = own(sd["final_layer.linear." + part])
    return out


def diffusers_config(cfg):
    """transformer/config.json as diffusers' DiT conversion script leaves it (Transformer2DModel
    saved with the script's arguments, the rest at their defaults). norm_eps is written out
    explicitly because it is the pre-MLP LayerNorm eps (1e-5, official uses 1e-6)."""
    # diffusers hard-codes a 4x feed-forward and a label table with a null row.
    if cfg["mlp_ratio"] != 4.0 or cfg["class_dropout_prob"] <= 0:
        raise ValueError("diffusers' DiT needs mlp_ratio 4 and class_dropout_prob > 0")
    return {
        "_class_name": "Transformer2DModel",
        "activation_fn": "gelu-approximate",
        "attention_bias": True,
        "attention_head_dim": cfg["hidden_size"] // cfg["num_heads"],
        "attention_type": "default",
        "caption_channels": None,
        "cross_attention_dim": None,
        "double_self_attention": False,
        "dropout": 0.0,
        "in_channels": cfg["in_channels"],
        "interpolation_scale": None,
        "norm_elementwise_affine": False,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "norm_type": "ada_norm_zero",
        "num_attention_heads": cfg["num_heads"],
        "num_embeds_ada_norm": cfg["num_classes"],
        "num_layers": cfg["depth"],
        "num_vector_embeds": None,
        "only_cross_attention": False,
        "out_channels": out_channels(cfg),
        "patch_size": cfg["patch_size"],
        "sample_size": cfg["input_size"],
        "upcast_attention": False,
        "use_additional_conditions": None,
        "use_linear_projection": False,
    }


def diffusers_config_text(cfg):
    return json.dumps(diffusers_config(cfg), indent=2, sort_keys=True) + "\n"


def save_safetensors(tensors, path, metadata):
    """safetensors.torch.save_file, then put __metadata__ in sorted key order.

    The Rust writer behind save_file keeps metadata in a HashMap, so with two or more entries
    their order (and the file's bytes) changes from run to run. Rewriting the header with the
    same compact JSON but sorted metadata keeps its length, so tensor offsets are untouched.
    """
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=metadata)
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        raw = f.read(n)
        header = json.loads(raw)
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        # save_file pads the header with spaces to an 8-byte boundary; keep that padding.
        text += b" " * (n - len(text))
        if len(text) != n or json.loads(text) != header:
            raise RuntimeError(f"{path}: could not canonicalise the safetensors header")
        f.seek(8)
        f.write(text)
