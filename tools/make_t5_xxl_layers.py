#!/usr/bin/env python3
"""A pipeline folder with T5 v1.1 XXL's widths and N random layers, for timing `icdit encode`
at the real shapes without the 9.5 GB download (docs/text-encoder.md).

    python tools/make_t5_xxl_layers.py --layers 1 --out /tmp/t5-xxl-1
    /usr/bin/time -v target/release/icdit encode --weights /tmp/t5-xxl-1 \
        --prompt "" --prompt "a red fox in the snow" --out /tmp/e.safetensors

d_model 4096, 64 heads of 64, d_ff 10240, 32 buckets, max distance 128 (google/t5-v1_1-xxl),
bf16 weights (std 1/sqrt(fan_in)); the tokenizer is the test fixture's (its ids fit the
32128-row embedding). The time per layer is the difference between two layer counts.
"""
import argparse
import json
import os
import shutil

import torch
from safetensors.torch import save_file

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "t5")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    d, heads, dk, ff, vocab = 4096, 64, 64, 10240, 32128
    g = torch.Generator().manual_seed(0)

    def w(*shape):
        return (torch.randn(shape, generator=g) * shape[-1] ** -0.5).to(torch.bfloat16)

    t = {"shared.weight": w(vocab, d), "encoder.final_layer_norm.weight": torch.ones(d, dtype=torch.bfloat16)}
    t["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = w(32, heads)
    for b in range(args.layers):
        a, f = f"encoder.block.{b}.layer.0.", f"encoder.block.{b}.layer.1."
        for n in "qkv":
            t[f"{a}SelfAttention.{n}.weight"] = w(heads * dk, d)
        t[f"{a}SelfAttention.o.weight"] = w(d, heads * dk)
        t[f"{a}layer_norm.weight"] = torch.ones(d, dtype=torch.bfloat16)
        t[f"{f}DenseReluDense.wi_0.weight"] = w(ff, d)
        t[f"{f}DenseReluDense.wi_1.weight"] = w(ff, d)
        t[f"{f}DenseReluDense.wo.weight"] = w(d, ff)
        t[f"{f}layer_norm.weight"] = torch.ones(d, dtype=torch.bfloat16)
    te = os.path.join(args.out, "text_encoder")
    os.makedirs(te, exist_ok=True)
    save_file(t, os.path.join(te, "model.safetensors"))
    cfg = {
        "d_model": d, "d_kv": dk, "d_ff": ff, "num_layers": args.layers, "num_heads": heads,
        "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
        "feed_forward_proj": "gated-gelu", "layer_norm_epsilon": 1e-6, "vocab_size": vocab,
    }
    with open(os.path.join(te, "config.json"), "w") as fh:
        json.dump(cfg, fh, indent=1)
    shutil.copytree(os.path.join(FIXTURE, "tokenizer"), os.path.join(args.out, "tokenizer"), dirs_exist_ok=True)
    print(f"wrote {args.out}: {args.layers} XXL-width layer(s), bf16")


if __name__ == "__main__":
    main()
