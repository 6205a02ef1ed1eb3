#!/usr/bin/env python3
"""Convert an ICC low-rank factor checkpoint into icdit's factor file.

    python3 tools/convert_icc_factors.py results_decomp/000-DiT-XL-2/checkpoints/0000000.pt out.safetensors

Input: the checkpoint the ICC calibration driver (`gen_decomp.py`) saves, a torch pickle
`{"decomp_weight": {key: [one tensor per block]}}` with keys
`q_wa q_wb k_wa k_wb v_wa v_wb proj_wa proj_wb fc1_wa fc1_wb fc2_wa fc2_wb` (a bare
`{key: [...]}` dict is accepted too). The merged-qkv variant (`qkv_wb` of shape
[r_q + r_k + r_v, C] instead of separate q/k/v `_wb`) is split by the ranks of q/k/v `_wa`.

Output: safetensors, float32, one tensor per factor:
`blocks.{i}.attn.{q,k,v,proj}.{up,down}` and `blocks.{i}.mlp.{fc1,fc2}.{up,down}`, where `up` is
ICC's `*_wa` ([out, r]) and `down` its `*_wb` ([r, in]), so W ~= up @ down. Metadata:
`format` = "pt" and `icdit_factors` = JSON `{"method": "icc-import", "rank": r, "source": path, ...}`;
`rank` is an int when every factor has the same rank, otherwise "mixed" (see `ranks`).
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dit_layouts  # noqa: E402

LAYERS = [("q", "attn"), ("k", "attn"), ("v", "attn"), ("proj", "attn"), ("fc1", "mlp"), ("fc2", "mlp")]


def _split_merged_qkv(dw):
    """Return a dict with separate q/k/v `_wb` lists (splits `qkv_wb` if that is what we got)."""
    if "qkv_wb" not in dw:
        return dw
    dw = dict(dw)
    q_wb, k_wb, v_wb = [], [], []
    for i, merged in enumerate(dw.pop("qkv_wb")):
        ranks = [dw[f"{n}_wa"][i].shape[1] for n in ("q", "k", "v")]
        if merged.shape[0] != sum(ranks):
            raise ValueError(f"block {i}: qkv_wb has {merged.shape[0]} rows, ranks are {ranks}")
        a, b, c = torch.split(merged, ranks, dim=0)
        q_wb.append(a)
        k_wb.append(b)
        v_wb.append(c)
    dw["q_wb"], dw["k_wb"], dw["v_wb"] = q_wb, k_wb, v_wb
    return dw


def convert(ckpt, source):
    """ICC checkpoint object -> (tensors, metadata) in icdit's factor format."""
    dw = ckpt["decomp_weight"] if isinstance(ckpt, dict) and "decomp_weight" in ckpt else ckpt
    if not isinstance(dw, dict):
        raise ValueError("expected {'decomp_weight': {key: [tensors]}} or {key: [tensors]}")
    dw = _split_merged_qkv(dw)
    need = [f"{n}_{ab}" for n, _ in LAYERS for ab in ("wa", "wb")]
    missing = [k for k in need if k not in dw]
    if missing:
        raise ValueError(f"missing keys {missing}; have {sorted(dw)}")
    extra = sorted(set(dw) - set(need))
    if extra:
        raise ValueError(f"unexpected keys {extra}")
    depth = len(dw["q_wa"])
    if depth == 0 or any(len(dw[k]) != depth for k in need):
        raise ValueError("every key must hold one tensor per block, the same number for all keys")

    tensors, ranks = {}, {}
    for i in range(depth):
        for name, sub in LAYERS:
            wa, wb = dw[f"{name}_wa"][i], dw[f"{name}_wb"][i]
            if not (torch.is_tensor(wa) and torch.is_tensor(wb)) or wa.dim() != 2 or wb.dim() != 2:
                raise ValueError(f"block {i} {name}: factors must be 2-D tensors")
            if wa.shape[1] != wb.shape[0]:
                raise ValueError(f"block {i} {name}: {name}_wa {tuple(wa.shape)} and "
                                 f"{name}_wb {tuple(wb.shape)} disagree on the rank")
            base = f"blocks.{i}.{sub}.{name}"
            tensors[f"{base}.up"] = wa.detach().to("cpu", torch.float32).contiguous()
            tensors[f"{base}.down"] = wb.detach().to("cpu", torch.float32).contiguous()
            ranks[base] = int(wa.shape[1])
    distinct = sorted(set(ranks.values()))
    info = {
        "method": "icc-import",
        "rank": distinct[0] if len(distinct) == 1 else "mixed",
        "source": source,
        "depth": depth,
        "hidden_size": int(dw["q_wa"][0].shape[0]),
        "mlp_hidden": int(dw["fc1_wa"][0].shape[0]),
    }
    if len(distinct) != 1:
        info["ranks"] = ranks
    meta = {"format": "pt", "icdit_factors": json.dumps(info, sort_keys=True)}
    return tensors, meta


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", help="ICC factor checkpoint (.pt)")
    ap.add_argument("output", help="icdit factor file to write (.safetensors)")
    args = ap.parse_args()
    ckpt = torch.load(args.input, map_location="cpu", weights_only=True)
    tensors, meta = convert(ckpt, args.input)
    dit_layouts.save_safetensors(tensors, args.output, meta)
    info = json.loads(meta["icdit_factors"])
    print(f"wrote {args.output}: {len(tensors)} tensors, depth {info['depth']}, rank {info['rank']}")


if __name__ == "__main__":
    main()
