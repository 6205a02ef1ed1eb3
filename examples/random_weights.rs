//! Writes seeded random weights of a DiT family member as an official-layout safetensors
//! file, for benchmarks and calibration timings without a download.
//!
//!     cargo run --release --example random_weights -- XL/2 256 out.safetensors [f32|f16|bf16]

use icdit::tensorfile::FloatType;
use icdit::weights::write_random_official;
use icdit::DitConfig;

fn main() -> Result<(), icdit::Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = || {
        icdit::Error::invalid(
            "arguments",
            "expected FAMILY IMAGE_SIZE OUT [f32|f16|bf16], e.g. XL/2 256 xl.safetensors",
        )
    };
    let (family, size, out) = match &args[..] {
        [f, s, o, ..] => (f.as_str(), s.parse::<usize>().map_err(|_| usage())?, o),
        _ => return Err(usage()),
    };
    let dtype = match args.get(3).map(String::as_str) {
        None | Some("f32") => FloatType::F32,
        Some("f16") => FloatType::F16,
        Some("bf16") => FloatType::BF16,
        Some(_) => return Err(usage()),
    };
    let cfg = DitConfig::family(family, size / 8).ok_or_else(usage)?;
    write_random_official(out.as_ref(), &cfg, 0, dtype)?;
    println!("wrote {out}: {family} at {size} px, {} parameters", cfg.param_count());
    Ok(())
}
