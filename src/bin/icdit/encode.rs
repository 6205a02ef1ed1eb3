//! `icdit encode`: prompts → PixArt-α's T5 tokens and embeddings (`input_ids`,
//! `attention_mask` i64 [B, L], `prompt_embeds` f32 [B, L, D]), written atomically.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use icdit::text::{TextEncoder, TextOptions, DEFAULT_MAX_LEN};
use icdit::Error;

#[derive(Args)]
pub struct EncodeArgs {
    /// A diffusers pipeline folder with `tokenizer/tokenizer.json` and `text_encoder/`.
    #[arg(long)]
    weights: PathBuf,
    /// A prompt (repeat for a batch; "" is the unconditional prompt).
    #[arg(long, required = true)]
    prompt: Vec<String>,
    /// Tokens per prompt: truncated or padded to this (PixArt-α: 120).
    #[arg(long, default_value_t = DEFAULT_MAX_LEN)]
    max_sequence_length: usize,
    /// Safetensors file to write.
    #[arg(long)]
    out: PathBuf,
    /// CPU threads (0: all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

pub fn run(args: EncodeArgs) -> Result<(), Error> {
    let t = Instant::now();
    let enc = TextEncoder::open(&args.weights, &TextOptions { threads: args.threads, isa: None })?;
    let prompts: Vec<&str> = args.prompt.iter().map(String::as_str).collect();
    let e = enc.encode(&prompts, args.max_sequence_length)?;
    e.save(&args.out)?;
    let tokens: Vec<String> = e.mask.chunks(e.len).map(|m| m.iter().sum::<i64>().to_string()).collect();
    eprintln!(
        "encoded {} prompt(s) to [{}, {}, {}] ({} tokens each with </s>) in {:.2} s → {}",
        e.batch,
        e.batch,
        e.len,
        e.dim,
        tokens.join(", "),
        t.elapsed().as_secs_f64(),
        args.out.display()
    );
    Ok(())
}
