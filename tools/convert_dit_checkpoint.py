#!/usr/bin/env python3
"""Convert an official DiT PyTorch checkpoint to one safetensors file in the official layout.

    python3 tools/convert_dit_checkpoint.py DiT-XL-2-256x256.pt dit-xl-2-256.safetensors [--dtype f16]
    python3 tools/convert_dit_checkpoint.py --self-test [--dit-repo /path/to/DiT]

Input: the released DiT-XL-2-{256x256,512x512}.pt (a plain state dict) or a train.py checkpoint
(a dict whose "ema" entry is the state dict sample.py uses). Output: the same tensor names and
shapes, plus `__metadata__` {"format": "pt", "dit_config": <JSON of the DiT(...) arguments>},
which is what icdit's loader reads. The config is inferred from the tensor shapes
(dit-reference.md part B) except the head count, which no shape carries: it comes from the
official family table or --num-heads.
"""

import argparse
import json
import math
import os
import re
import sys
import tempfile

import torch
from safetensors import safe_open

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dit_layouts  # noqa: E402

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}

# The official pos_embed is a float64 table rounded once to float32; anything further off than
# a few float32 ulps means the file was not made by the official code.
POS_EMBED_TOL = 1e-6


class ConvertError(Exception):
    pass


def load_state_dict(path):
    """Read a .pt checkpoint without executing arbitrary pickles.

    train.py checkpoints also hold the argparse Namespace it ran with, so that one class is
    allowed in addition to what weights_only accepts.
    """
    torch.serialization.add_safe_globals([argparse.Namespace])
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "ema" in obj and isinstance(obj["ema"], dict):
        obj = obj["ema"]  # the EMA weights are the ones sample.py and the release use
    if not isinstance(obj, dict):
        raise ConvertError(f"{path}: expected a state dict, found {type(obj).__name__}")
    # A state dict saved from a DDP-wrapped model carries a "module." prefix on every key.
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    bad = [k for k, v in obj.items() if not torch.is_tensor(v)]
    if bad:
        raise ConvertError(f"{path}: non-tensor entries {bad[:5]}")
    return obj


def _shape(sd, key):
    if key not in sd:
        raise ConvertError(f"missing tensor {key!r}, needed to infer the config")
    return tuple(sd[key].shape)


def infer_config(sd, num_heads=None):
    """Recover the DiT(...) arguments from tensor shapes (dit-reference.md part B)."""
    C, cin, p, p2 = _shape(sd, "x_embedder.proj.weight")
    if p != p2:
        raise ConvertError(f"x_embedder.proj.weight: non-square patch {p}x{p2}")
    n_tok = _shape(sd, "pos_embed")[1]
    grid = math.isqrt(n_tok)
    if grid * grid != n_tok:
        raise ConvertError(f"pos_embed: {n_tok} tokens is not a square grid")

    block_ids = sorted({int(m.group(1)) for k in sd for m in [re.match(r"blocks\.(\d+)\.", k)] if m})
    depth = len(block_ids)
    if block_ids != list(range(depth)):
        raise ConvertError(f"block indices are not 0..{depth - 1}: {block_ids}")
    if depth == 0:
        raise ConvertError("no blocks.{i}.* tensors")

    mlp_hidden = _shape(sd, "blocks.0.mlp.fc1.weight")[0]
    lin_out = _shape(sd, "final_layer.linear.weight")[0]
    if lin_out % (p * p):
        raise ConvertError(f"final_layer.linear.weight rows {lin_out} not a multiple of p^2 = {p * p}")
    cout = lin_out // (p * p)
    if cout not in (cin, 2 * cin):
        raise ConvertError(f"output channels {cout} is neither Cin = {cin} nor 2*Cin")

    if num_heads is None:
        if C not in dit_layouts.HEADS_BY_HIDDEN:
            raise ConvertError(
                f"hidden size {C} is not an official family ({sorted(dit_layouts.HEADS_BY_HIDDEN)}); "
                "the head count is not stored in the checkpoint, pass --num-heads")
        num_heads = dit_layouts.HEADS_BY_HIDDEN[C]
    if C % num_heads:
        raise ConvertError(f"hidden size {C} is not divisible by {num_heads} heads")

    return {
        "input_size": grid * p,
        "patch_size": p,
        "in_channels": cin,
        "hidden_size": C,
        "depth": depth,
        "num_heads": num_heads,
        "mlp_ratio": mlp_hidden / C,
        # Not recoverable from shapes beyond "a null row exists"; every released model used 0.1
        # and only its sign matters at inference (it sizes the label table).
        "class_dropout_prob": 0.1,
        "num_classes": _shape(sd, "y_embedder.embedding_table.weight")[0] - 1,
        "learn_sigma": cout == 2 * cin,
    }


def validate(sd, cfg):
    """Check every name and shape against the config; report all problems in one error."""
    want = dit_layouts.official_shapes(cfg)
    problems = [f"missing {k} {s}" for k, s in want.items() if k not in sd]
    problems += [f"unexpected {k} {tuple(sd[k].shape)}" for k in sd if k not in want]
    problems += [f"shape of {k}: expected {s}, found {tuple(sd[k].shape)}"
                 for k, s in want.items() if k in sd and tuple(sd[k].shape) != s]
    problems += [f"dtype of {k}: {v.dtype} is not floating point"
                 for k, v in sd.items() if not v.is_floating_point()]
    if problems:
        raise ConvertError("state dict does not match the inferred config:\n  " + "\n  ".join(problems))


def check_pos_embed(sd, cfg):
    """Warn (not fail) when pos_embed is not the official fixed sin-cos table."""
    grid = cfg["input_size"] // cfg["patch_size"]
    ref = torch.from_numpy(dit_layouts.sincos_pos_embed(cfg["hidden_size"], grid))
    err = (sd["pos_embed"][0].double() - ref).abs().max().item()
    if err > POS_EMBED_TOL:
        print(f"warning: pos_embed differs from the sin-cos table by up to {err:.3g}", file=sys.stderr)
    return err


def convert(sd, cfg, dtype):
    sd_out = {k: v.detach().to(dtype).contiguous() for k, v in sd.items()}
    return sd_out, dit_layouts.official_metadata(cfg)


def write_atomic(tensors, metadata, path):
    """Write next to the target, then rename, so a crash never leaves a truncated file."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=directory)
    os.close(fd)
    try:
        dit_layouts.save_safetensors(tensors, tmp, metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def convert_file(src, dst, dtype="f32", num_heads=None, quiet=False):
    sd = load_state_dict(src)
    cfg = infer_config(sd, num_heads)
    validate(sd, cfg)
    check_pos_embed(sd, cfg)
    tensors, meta = convert(sd, cfg, DTYPES[dtype])
    write_atomic(tensors, meta, dst)
    if not quiet:
        n = sum(t.numel() for t in tensors.values())
        print(f"{dst}: {len(tensors)} tensors, {n:,} parameters, {dtype}")
        print(f"dit_config = {meta['dit_config']}")
    return cfg


# ----------------------------------------------------------------------------------------------
# Self-test: fake checkpoints made in memory, converted, read back and compared.
# ----------------------------------------------------------------------------------------------

def _fake_state_dict(cfg, seed):
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(s, generator=g) for k, s in dit_layouts.official_shapes(cfg).items()}
    grid = cfg["input_size"] // cfg["patch_size"]
    sd["pos_embed"] = torch.from_numpy(dit_layouts.sincos_pos_embed(cfg["hidden_size"], grid)).float()[None]
    return sd


def _read_back(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _expect_error(fn, needle):
    try:
        fn()
    except ConvertError as e:
        assert needle in str(e), f"error {e!s} does not mention {needle!r}"
        return
    raise AssertionError(f"expected a ConvertError mentioning {needle!r}")


def _check_roundtrip(sd_in, cfg, path, dtype):
    sd_out, meta = _read_back(path)
    assert meta == dit_layouts.official_metadata(cfg), meta
    assert json.loads(meta["dit_config"]) == cfg
    assert list(json.loads(meta["dit_config"])) == list(dit_layouts.CONFIG_KEYS)
    assert set(sd_out) == set(sd_in)
    for k, v in sd_in.items():
        assert sd_out[k].dtype == DTYPES[dtype], (k, sd_out[k].dtype)
        assert torch.equal(sd_out[k], v.to(DTYPES[dtype])), k


def self_test(dit_repo=None):
    s_cfg = {"input_size": 8, "patch_size": 2, "in_channels": 4, "hidden_size": 384, "depth": 2,
             "num_heads": 6, "mlp_ratio": 4.0, "class_dropout_prob": 0.1, "num_classes": 10,
             "learn_sigma": True}
    odd_cfg = dict(s_cfg, input_size=16, patch_size=4, hidden_size=144, depth=3, num_heads=2,
                   num_classes=7, learn_sigma=False)
    with tempfile.TemporaryDirectory() as tmp:
        # 1. Plain state dict, heads from the family table (384 -> 6), all three dtypes.
        sd = _fake_state_dict(s_cfg, seed=1)
        plain = os.path.join(tmp, "plain.pt")
        torch.save(sd, plain)
        for dt in DTYPES:
            out = os.path.join(tmp, f"plain_{dt}.safetensors")
            assert convert_file(plain, out, dt, quiet=True) == s_cfg
            _check_roundtrip(sd, s_cfg, out, dt)

        # 2. train.py layout: {"model", "ema", "opt", "args"}; the EMA entry must win.
        ema = _fake_state_dict(s_cfg, seed=2)
        wrapped = os.path.join(tmp, "train.pt")
        torch.save({"model": sd, "ema": ema, "opt": {"state": {}, "param_groups": []},
                    "args": argparse.Namespace(model="DiT-S/2", image_size=64)}, wrapped)
        out = os.path.join(tmp, "train.safetensors")
        convert_file(wrapped, out, "f32", quiet=True)
        _check_roundtrip(ema, s_cfg, out, "f32")

        # 3. Non-family width: needs --num-heads; patch 4, no learned sigma, 3 blocks.
        sd_odd = _fake_state_dict(odd_cfg, seed=3)
        odd = os.path.join(tmp, "odd.pt")
        torch.save(sd_odd, odd)
        _expect_error(lambda: convert_file(odd, os.path.join(tmp, "x.safetensors"), quiet=True),
                      "--num-heads")
        out = os.path.join(tmp, "odd.safetensors")
        assert convert_file(odd, out, "f32", num_heads=2, quiet=True) == odd_cfg
        _check_roundtrip(sd_odd, odd_cfg, out, "f32")

        # 4. Broken inputs: every problem is listed, and no output file is left behind.
        broken = dict(sd)
        del broken["blocks.1.mlp.fc2.bias"]
        broken["blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)
        broken["extra.weight"] = torch.zeros(1)
        bad = os.path.join(tmp, "bad.pt")
        torch.save(broken, bad)
        bad_out = os.path.join(tmp, "bad.safetensors")
        for needle in ("missing blocks.1.mlp.fc2.bias", "unexpected extra.weight",
                       "shape of blocks.0.attn.qkv.weight"):
            _expect_error(lambda: convert_file(bad, bad_out, quiet=True), needle)
        assert not os.path.exists(bad_out)
        assert not [f for f in os.listdir(tmp) if f.startswith(".tmp-")]

        # 5. Against the official code: our expected key list is exactly DiT.state_dict(), our
        #    sin-cos table is its pos_embed, and a converted file loads back strictly.
        if dit_repo:
            models = import_official_models(dit_repo)
            for cfg in (s_cfg, odd_cfg):
                torch.manual_seed(0)
                model = models.DiT(**cfg).eval()
                ref = model.state_dict()
                want = dit_layouts.official_shapes(cfg)
                assert list(ref) == list(want), "key order differs from the official state_dict"
                assert {k: tuple(v.shape) for k, v in ref.items()} == want
                assert check_pos_embed(ref, cfg) <= POS_EMBED_TOL
                src = os.path.join(tmp, "official.pt")
                out = os.path.join(tmp, "official.safetensors")
                torch.save(ref, src)
                convert_file(src, out, "f32", num_heads=cfg["num_heads"], quiet=True)
                loaded, meta = _read_back(out)
                again = models.DiT(**json.loads(meta["dit_config"]))
                again.load_state_dict(loaded, strict=True)
                for k, v in ref.items():
                    assert torch.equal(again.state_dict()[k], v), k
    print("self-test passed" + (" (including official models.py checks)" if dit_repo else
                                 " (pass --dit-repo to also check against the official models.py)"))


def import_official_models(dit_repo):
    """Import models.py from a checkout of facebookresearch/DiT without copying it."""
    import importlib.util
    path = os.path.join(dit_repo, "models.py")
    spec = importlib.util.spec_from_file_location("dit_official_models", path)
    if spec is None or not os.path.exists(path):
        raise ConvertError(f"{path} not found (--dit-repo must point at a DiT checkout)")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", nargs="?", help="DiT .pt checkpoint (plain state dict or train.py dict with 'ema')")
    ap.add_argument("output", nargs="?", help="output .safetensors path")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="f32", help="stored dtype (default f32)")
    ap.add_argument("--num-heads", type=int, help="head count, required when hidden size is not an official family")
    ap.add_argument("--self-test", action="store_true", help="convert fake checkpoints and check the results")
    ap.add_argument("--dit-repo", help="with --self-test: DiT checkout whose models.py is checked against")
    args = ap.parse_args()

    try:
        if args.self_test:
            self_test(args.dit_repo)
        elif args.input and args.output:
            convert_file(args.input, args.output, args.dtype, args.num_heads)
        else:
            ap.error("give INPUT and OUTPUT, or --self-test")
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
