#!/usr/bin/env python3
"""Roofline model of the GPU pipeline's DiT-XL/2 steps (docs/performance.md, "Roofline").

For each step kind (plain, full with cache writes, calibrated in the direct form
y = y_s + up·(down·(x − x_s)), calibrated in the folded form y = b_s + up·(down·x) with
b_s = y_s − W_r·x_s stored at the full step, calibrated in the projected form
y = y_s + up·(down·x − t_s) with t_s = down·x_s stored at the full step, the full steps that
store b_s or t_s, reuse) and batch (images; guidance doubles the
model rows), counts the tensor-core FLOPs and the bytes a step must move, as the pipeline
computes it (f16 storage, adaLN modulation precomputed per request so its weights are not read
per step), and the time floor on an H100 SXM and an H200 at their spec rates.

Bytes are split into DRAM traffic a step cannot avoid (weights or factors, read once per step
whatever the batch; the block caches, written by full steps and read by cached ones) and
transient activations (every other tensor a kernel reads or writes; at batch 1 a block's are a
few MB and stay mostly in the 50 MB L2). The floor is max(FLOPs / peak, DRAM bytes / bandwidth).

Usage: python3 tools/roofline.py [--rank 128] [--markdown]
"""

import argparse

# DiT-XL/2 at 256 px
C, M, N, DEPTH, HEADS, HD = 1152, 4608, 256, 28, 16, 72
P2_COUT = 2 * 2 * 8
F16 = 2

CARDS = {
    # name: (dense f16 tensor-core FLOP/s, HBM bytes/s) -- NVIDIA spec sheets (SXM)
    "H100 SXM": (989.4e12, 3.35e12),
    "H200": (989.4e12, 4.8e12),
}


def step(kind, images, rank):
    """(FLOPs, DRAM bytes, transient bytes) of one step of `kind` for `images` images."""
    rows = 2 * images  # classifier-free guidance
    t = rows * N  # tokens in the model batch
    linear_macs_tok = 12 * C * C  # qkv 3C², proj C², fc1 CM, fc2 MC (M = 4C)
    # q, k, v: down r×C and up C×r each; proj: 2rC; fc1: r(C + M); fc2: r(M + C)
    lowrank_macs_tok = 6 * rank * C + 2 * rank * C + 2 * rank * (C + M)
    attn_macs = rows * HEADS * 2 * N * N * HD  # QKᵀ and P·V, per block
    final_macs = t * C * P2_COUT
    weights = DEPTH * 12 * C * C * F16
    factors = DEPTH * lowrank_macs_tok * F16  # every factor element is read once per step
    # Elements per token per block. Cache slots (8C + 2M: x_s and y_s of qkv, proj, fc1, fc2)
    # are written by full steps and read by calibrated / reuse steps: DRAM traffic (528 MB at
    # batch 1, far above the 50 MB L2). Everything else a kernel reads or writes is transient:
    # 1–5 MB per block at batch 1, mostly L2-resident between consecutive kernels.
    transient_plain = (2 * C) + (C + 3 * C) + (3 * C + C) + (C + C) + (3 * C) + (2 * C) + (C + M) + (M + C) + (3 * C)
    if kind == "plain":
        flops = 2 * (t * linear_macs_tok + attn_macs) * DEPTH + 2 * final_macs
        dram, transient = weights, transient_plain
    elif kind == "full":
        flops = 2 * (t * linear_macs_tok + attn_macs) * DEPTH + 2 * final_macs
        dram, transient = weights + t * DEPTH * (8 * C + 2 * M) * F16, transient_plain + M
    elif kind == "full-folded":
        # The full step of the folded form: a plain full step, then per linear b_s = y_s −
        # up·(down·x_s) from the x_s and y_s it has just written (still in L2 at batch 1), the
        # b_s slots (5C + M per token and block) written to DRAM.
        flops = 2 * (t * (linear_macs_tok + lowrank_macs_tok) + attn_macs) * DEPTH + 2 * final_macs
        dram = weights + factors + t * DEPTH * (8 * C + 2 * M + 5 * C + M) * F16
        transient = transient_plain + M + sum(i + o for i, o in [(C, 3 * C), (C, C), (C, M), (M, C)])
    elif kind == "full-projected":
        # The full step of the projected form: a plain full step, then per linear
        # t_s = down·x_s (f32, 6r per token and block: q, k, v, proj, fc1, fc2) from the x_s it
        # has just written (L2 at batch 1): the down factors and t_s go to DRAM.
        down_macs_tok = rank * (3 * C + C + C + M)
        flops = 2 * (t * (linear_macs_tok + down_macs_tok) + attn_macs) * DEPTH + 2 * final_macs
        dram = weights + DEPTH * down_macs_tok * F16 + t * DEPTH * ((8 * C + 2 * M) * F16 + 6 * rank * 4)
        transient = transient_plain + M + (C + C + C + M)
    elif kind in ("calibrated", "folded", "projected"):
        flops = 2 * (t * lowrank_macs_tok + attn_macs) * DEPTH + 2 * final_macs
        # direct: read x_s and y_s of every linear (8C + 2M); folded: b_s only (3C + C + M + C);
        # projected: y_s (5C + M) and t_s (6r, f32)
        cache = {"calibrated": (8 * C + 2 * M) * F16, "folded": (5 * C + M) * F16,
                 "projected": (5 * C + M) * F16 + 6 * rank * 4}[kind]
        dram = factors + t * DEPTH * cache
        # LN ×2, attention, residuals ×2, and per linear: x in, t out and in, y out
        transient = 14 * C + sum(i + 2 * r + o for i, o, r in
                                 [(C, 3 * C, 3 * rank), (C, C, rank), (C, M, rank), (M, C, rank)])
    elif kind == "reuse":
        flops = 2 * final_macs
        dram, transient = t * DEPTH * 2 * C * F16, 4 * C  # cached proj_y, fc2_y; x read + written twice
    else:
        raise ValueError(kind)
    return flops, dram, t * DEPTH * transient * F16


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args()
    kinds = ["plain", "full", "full-folded", "full-projected", "calibrated", "folded", "projected", "reuse"]
    hdr = ["batch", "step", "GFLOP", "DRAM MB", "transient MB"]
    for card in CARDS:
        hdr += [f"{card} compute ms", f"{card} DRAM ms", f"{card} floor ms"]
    rows = []
    for images in (1, 4, 16):
        for kind in kinds:
            flops, w, act = step(kind, images, a.rank)
            r = [str(images), kind if kind not in ("calibrated", "folded", "projected") else f"{kind} r{a.rank}",
                 f"{flops / 1e9:.1f}", f"{w / 1e6:.0f}", f"{act / 1e6:.0f}"]
            for peak, bw in CARDS.values():
                tc, tm = flops / peak * 1e3, w / bw * 1e3
                r += [f"{tc:.3f}", f"{tm:.3f}", f"{max(tc, tm):.3f}"]
            rows.append(r)
    if a.markdown:
        print("| " + " | ".join(hdr) + " |")
        print("|" + "---|" * len(hdr))
        for r in rows:
            print("| " + " | ".join(r) + " |")
    else:
        w = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(hdr)]
        print("  ".join(h.rjust(w[i]) for i, h in enumerate(hdr)))
        for r in rows:
            print("  ".join(c.rjust(w[i]) for i, c in enumerate(r)))
    # 50-step DDIM, icc period 2: 25 full + 25 calibrated, batch 1
    for card, (peak, bw) in CARDS.items():
        tot = {}
        full_of = {"calibrated": "full", "folded": "full-folded", "projected": "full-projected"}
        for period in (2, 3):
            for images in (1, 16):
                for form in ("calibrated", "folded", "projected"):
                    f_full, w_full, _ = step(full_of[form], images, a.rank)
                    f_cal, w_cal, _ = step(form, images, a.rank)
                    full = -(-50 // period)
                    lo = full * max(f_full / peak, w_full / bw) + (50 - full) * max(f_cal / peak, w_cal / bw)
                    tot[form] = lo * 1e3
                print(f"{card}: 50-step DDIM, icc period {period} r{a.rank}, batch {images}: floor "
                      f"{tot['calibrated']:.1f} ms direct, {tot['folded']:.1f} ms folded, {tot['projected']:.1f} ms projected")


if __name__ == "__main__":
    main()
