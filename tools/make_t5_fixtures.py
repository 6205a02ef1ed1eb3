#!/usr/bin/env python3
"""Fixtures for icdit's text side (issue 23): a tiny T5 tokenizer and T5 v1.1 encoder, and
what transformers computes with them.

Made with transformers 5.25.0, tokenizers 0.23.3, sentencepiece 0.2.3, protobuf 7.36.2,
torch 2.15.0 (`pip install "transformers==5.*" sentencepiece tokenizers protobuf`).
Rerun from the repository root:  python tools/make_t5_fixtures.py

Writes tests/fixtures/t5/, a diffusers-style pipeline folder holding only the text side:
  tokenizer/      spiece.model trained here (SentencePiece unigram, ~200 pieces, T5's ids:
                  <pad> 0, </s> 1, <unk> 2, no BOS) and the tokenizer.json transformers'
                  T5Tokenizer makes from it (with its 100 <extra_id_*> sentinels). The
                  normaliser is a small custom rule table instead of nmt_nfkc, so that the
                  precompiled-charsmap normaliser is exercised while the file stays small.
  text_encoder/   config.json + model.safetensors of a random T5EncoderModel (d_model 64,
                  2 layers, 4 heads of 16, d_ff 96, 32 buckets, max distance 64, gated-gelu;
                  RMS-norm weights and the position bias drawn away from their init so that
                  a wrong norm or bias shows).
  prompts.json    the prompts (raw, before `lower().strip()`).
  reference.safetensors
    input_ids, attention_mask (i64 [P, 32]) and prompt_embeds (f32 [P, 32, 64]): every prompt
      at max_sequence_length 32, as PixArt-α's pipeline tokenises and encodes them;
    input_ids_120, attention_mask_120 (i64 [P, 120]): the tokenizer at PixArt's length;
    prompt_embeds_120 (f32 [2, 120, 64]): the first two prompts at length 120 (relative
      distances past max_distance);
    prompt_embeds_bf16, prompt_embeds_f16 (f32 [P, 32, 64]): the encoder with its weights
      rounded to bf16 / f16 (round to nearest even, as torch's .to() does), computed in f32;
    buckets_32_128, buckets_32_64 (i64 [261]): T5Attention._relative_position_bucket for
      relative positions −130..130 (bidirectional, 32 buckets, max distance 128 — T5 v1.1
      XXL's — and 64 — this model's).
"""
import json
import os
import shutil
import tempfile

import sentencepiece as spm
import torch
from safetensors.torch import save_file
from transformers import T5Config, T5EncoderModel, T5Tokenizer

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "t5")
SEED = 2310
LEN = 32

# Our own training text: short captions of the kind PixArt-α is prompted with.
CAPTIONS = """a photo of a red fox sitting in the snow at sunrise
an oil painting of a lighthouse on a rocky coast during a storm
a small wooden boat floating on a calm blue lake surrounded by mountains
a cat wearing a tiny hat, digital art, highly detailed
two dogs playing with a ball in a green park on a sunny afternoon
a bowl of fresh fruit on a kitchen table, soft morning light
a futuristic city skyline at night with neon lights and flying cars
a watercolor sketch of an old bridge over a quiet river
an astronaut riding a horse on the surface of the moon
a close-up portrait of an elderly woman smiling, black and white photograph
a naïve drawing of a café terrace in paris, 1/2 scale model
fish and chips on a plate next to a cup of tea""".splitlines()

PROMPTS = [
    "A photo of a red fox sitting in the snow at sunrise",
    "",
    "   An OIL Painting of a Lighthouse on a Rocky Coast   ",
    # Longer than 32 pieces: truncated to 31 pieces + </s> at length 32.
    "a futuristic city skyline at night with neon lights and flying cars, a watercolor sketch of an "
    "old bridge over a quiet river, an astronaut riding a horse on the surface of the moon",
    # Full-width letters, ½ and ﬁ (custom normaliser rules), decomposed é, a no-break space,
    # characters outside the vocabulary (<unk>), punctuation.
    "Ｆｕｌｌ-width café — naïve ½ ﬁsh\u00a0boat cafe\u0301 東京!? (v2.0) #art",
    "two  dogs\tplaying\nwith a ball",
    # Special tokens written as text: matched whole, as transformers does.
    "a fox </s> and <extra_id_0> <pad>",
]

# Normalisation rules (code points → code points) compiled into the model's charsmap.
RULES = {(c,): (c - 0xFEE0,) for c in range(0xFF01, 0xFF5F)}  # full-width ASCII
RULES.update({(0xBD,): (0x31, 0x2F, 0x32), (0xFB01,): (0x66, 0x69), (0xA0,): (0x20,), (0x65, 0x301): (0xE9,)})


def make_tokenizer(folder):
    # A fixed scratch folder: SentencePiece records the paths it was given in the model, so
    # a random one would change spiece.model's bytes on every run.
    tmp = os.path.join(tempfile.gettempdir(), "icdit-t5-fixtures")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    rules = os.path.join(tmp, "rules.tsv")
    with open(rules, "w") as f:
        for src, dst in RULES.items():
            f.write(" ".join(f"{c:X}" for c in src) + "\t" + " ".join(f"{c:X}" for c in dst) + "\n")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CAPTIONS * 3),
        model_prefix=os.path.join(tmp, "spiece"),
        vocab_size=200,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        hard_vocab_limit=False,
        num_threads=1,
        normalization_rule_tsv=rules,
        minloglevel=2,
    )
    os.makedirs(folder, exist_ok=True)
    shutil.copy(os.path.join(tmp, "spiece.model"), os.path.join(folder, "spiece.model"))
    shutil.rmtree(tmp)
    tok = T5Tokenizer.from_pretrained(folder)
    tok.save_pretrained(folder)
    return tok


def tokenize(tok, prompts, length):
    # diffusers' PixArtAlphaPipeline without bs4/ftfy: lower().strip(), then max_length padding.
    enc = tok(
        [p.lower().strip() for p in prompts],
        padding="max_length",
        max_length=length,
        truncation=True,
        add_special_tokens=True,
        return_tensors="pt",
    )
    return enc.input_ids, enc.attention_mask


def make_encoder(vocab):
    torch.manual_seed(SEED)
    cfg = T5Config(
        vocab_size=vocab,
        d_model=64,
        d_kv=16,
        d_ff=96,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=64,
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6,
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
    )
    model = T5EncoderModel(cfg).eval()
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif "relative_attention_bias" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    return model


def encode(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state.float().contiguous()


def rounded(model, dtype):
    """A copy whose weights went through `dtype` and back to f32 (computed in f32)."""
    m = T5EncoderModel(model.config).eval()
    m.load_state_dict({k: v.to(dtype).to(torch.float32) for k, v in model.state_dict().items()})
    return m


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    tok = make_tokenizer(os.path.join(OUT, "tokenizer"))
    vocab = (len(tok) + 7) // 8 * 8  # padded past the tokenizer, as T5's 32128 > 32100
    model = make_encoder(vocab)
    model.config._attn_implementation = "eager"
    model.save_pretrained(os.path.join(OUT, "text_encoder"), safe_serialization=True)
    with open(os.path.join(OUT, "prompts.json"), "w") as f:
        json.dump(PROMPTS, f, ensure_ascii=False, indent=1)

    ids, mask = tokenize(tok, PROMPTS, LEN)
    ids120, mask120 = tokenize(tok, PROMPTS, 120)
    assert ids[3, -1] == 1 and mask[3].all(), "the long prompt must be truncated at 32"
    assert ids[1, 0] == 1 and ids[1, 1:].eq(0).all(), "the empty prompt is [</s>, <pad>, …]"
    assert ids[4].eq(2).any(), "the unicode prompt must contain <unk>"
    rel = torch.arange(-130, 131)
    from transformers.models.t5.modeling_t5 import T5Attention

    tensors = {
        "input_ids": ids,
        "attention_mask": mask,
        "prompt_embeds": encode(model, ids, mask),
        "input_ids_120": ids120,
        "attention_mask_120": mask120,
        "prompt_embeds_120": encode(model, ids120[:2], mask120[:2]),
        "prompt_embeds_bf16": encode(rounded(model, torch.bfloat16), ids, mask),
        "prompt_embeds_f16": encode(rounded(model, torch.float16), ids, mask),
        "buckets_32_128": T5Attention._relative_position_bucket(rel, True, 32, 128),
        "buckets_32_64": T5Attention._relative_position_bucket(rel, True, 32, 64),
    }
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, os.path.join(OUT, "reference.safetensors"))
    for name in ("prompt_embeds", "prompt_embeds_bf16", "prompt_embeds_f16"):
        d = (tensors[name] - tensors["prompt_embeds"]).norm() / tensors["prompt_embeds"].norm()
        print(f"{name}: max |x| {tensors[name].abs().max():.3f}, relative L2 to f32 {d:.2e}")
    print("ids", ids.tolist())
    with open(os.path.join(OUT, "README.md"), "w") as f:
        f.write("# T5 fixtures (issue 23)\n\nGenerated by `tools/make_t5_fixtures.py`; do not edit by hand.\n\n```\n")
        f.write(__doc__.strip() + "\n```\n")
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(OUT) for f in fs)
    print(f"wrote {OUT} ({total} bytes)")


if __name__ == "__main__":
    main()
