//! The PixArt-α side of `icdit inspect`, `forward` and `sample`: taken when the weights are
//! a PixArt-α pipeline folder (`icdit::pixart::is_pipeline`), on `--backend cpu|cuda|emu`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use icdit::backend::Backend;
use icdit::pixart::backend::{forward_on, AnyPixArtEngine};
use icdit::pixart::size::resize_and_crop;
use icdit::pixart::ImageSize;
use icdit::pixart::{Embeddings, PixArtCache, PixArtFactors, PixArtModel, PixArtOptions, PixArtRequest, PixArtSampler};
use icdit::tensorfile::{write_safetensors, TensorFile};
use icdit::vae::{VaeDecoder, VaeModel};
use icdit::{CachePolicy, Error, FullSteps};

use crate::output::ImageOut;

/// `icdit inspect` on a pipeline folder: the transformer's config and weights.
pub fn inspect(path: &Path, json: bool) -> Result<(), Error> {
    let model = PixArtModel::load(path)?;
    let c = model.config;
    let mut dtypes: Vec<String> = model.dtypes.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    dtypes.sort();
    if json {
        let v = serde_json::json!({
            "family": "PixArt-α",
            "path": path.display().to_string(),
            "sample_size": c.sample_size,
            "patch_size": c.patch_size,
            "in_channels": c.in_channels,
            "out_channels": c.out_channels,
            "depth": c.depth,
            "num_heads": c.num_heads,
            "head_dim": c.head_dim,
            "hidden_size": c.hidden_size(),
            "caption_channels": c.caption_channels,
            "interpolation_scale": c.interpolation_scale,
            "use_additional_conditions": c.use_additional_conditions,
            "tokens": c.tokens(),
            "dtypes": model.dtypes,
            "file_bytes": model.file_bytes(),
        });
        outln!("{}", serde_json::to_string_pretty(&v).expect("report serialises"));
    } else {
        outln!("PixArt-α transformer: {}", path.display());
        outln!(
            "  latent {}×{}×{}, patch {} ({} tokens), hidden {} ({} heads of {}), {} blocks, out channels {}",
            c.in_channels,
            c.sample_size,
            c.sample_size,
            c.patch_size,
            c.tokens(),
            c.hidden_size(),
            c.num_heads,
            c.head_dim,
            c.depth,
            c.out_channels
        );
        outln!(
            "  caption channels {}, interpolation scale {}, {}",
            c.caption_channels,
            c.interpolation_scale,
            if c.use_additional_conditions {
                "resolution and aspect-ratio conditions (use_additional_conditions)"
            } else {
                "no additional conditions"
            }
        );
        outln!("  weights: {} ({})", icdit::units::human(model.file_bytes() as u64), dtypes.join(", "));
    }
    Ok(())
}

/// `icdit forward` on a pipeline folder: inputs `x` (at any latent size that is a multiple of
/// the patch size), `t`, `encoder_hidden_states`, `encoder_attention_mask`, and for models
/// with micro-conditions `resolution` and `aspect_ratio`; output `out`.
pub fn forward(weights: &Path, input: &Path, out_path: &Path, threads: usize, backend: Backend) -> Result<(), Error> {
    let f = TensorFile::open(input)?;
    let bad = |reason: String| Error::Layout { path: input.to_path_buf(), reason };
    let (xs, x) = f.read_f32("x")?;
    let (ts, t) = f.read_i64("t")?;
    let b = ts.first().copied().unwrap_or(0);
    if ts.len() != 1 || b == 0 {
        return Err(bad(format!("`t` has shape {ts:?}; expected [B] with B ≥ 1")));
    }
    let [xb, xc, h, w] = xs[..] else {
        return Err(bad(format!("`x` has shape {xs:?}; expected [{b}, C, H, W]")));
    };
    let model = Arc::new(PixArtModel::load_at(weights, Some((h, w)))?);
    let cfg = model.config;
    let cin = cfg.in_channels;
    if [xb, xc] != [b, cin] {
        return Err(bad(format!("`x` has shape {xs:?}; expected [{b}, {cin}, H, W]")));
    }
    let (es, text) = f.read_f32("encoder_hidden_states")?;
    let (ms, mask) = f.read_i64("encoder_attention_mask")?;
    let [eb, len, d] = es[..] else {
        return Err(bad(format!(
            "`encoder_hidden_states` has shape {es:?}; expected [{b}, L, {}]",
            cfg.caption_channels
        )));
    };
    if eb != b || d != cfg.caption_channels || len == 0 {
        return Err(bad(format!(
            "`encoder_hidden_states` has shape {es:?}; expected [{b}, L, {}]",
            cfg.caption_channels
        )));
    }
    if ms != [b, len] {
        return Err(bad(format!("`encoder_attention_mask` has shape {ms:?}; expected [{b}, {len}]")));
    }
    if let Some(i) = t.iter().position(|&v| !(0..1000).contains(&v)) {
        return Err(bad(format!("`t` element {i} is {}; timesteps are 0 to 999", t[i])));
    }
    let tf: Vec<f32> = t.iter().map(|&v| v as f32).collect();
    let mut size = None;
    if cfg.use_additional_conditions {
        // diffusers' added_cond_kwargs: required by a model with use_additional_conditions.
        let missing = |name: &str| {
            bad(format!(
                "this model uses the resolution and aspect-ratio conditions (use_additional_conditions): \
                 the input needs `{name}` ({})",
                if name == "resolution" {
                    "f32 [B, 2], height and width in pixels"
                } else {
                    "f32 [B, 1], height / width"
                }
            ))
        };
        for name in ["resolution", "aspect_ratio"] {
            if f.get(name).is_none() {
                return Err(missing(name));
            }
        }
        let (rs, res) = f.read_f32("resolution")?;
        let (ars, ar) = f.read_f32("aspect_ratio")?;
        if rs != [b, 2] || ars != [b, 1] {
            return Err(bad(format!(
                "`resolution` has shape {rs:?} and `aspect_ratio` {ars:?}; expected [{b}, 2] and [{b}, 1]"
            )));
        }
        size = Some((res, ar));
    }
    let mut out = vec![0.0f32; b * cfg.out_elems()];
    let start = Instant::now();
    let size = size.as_ref().map(|(res, ar)| (&res[..], &ar[..]));
    let on = forward_on(backend, Arc::clone(&model), &x, &tf, &text, &mask, len, threads, size, &mut out)?;
    let secs = start.elapsed().as_secs_f64();
    write_safetensors(out_path, &[("out", &[b, cfg.out_channels, h, w], &out)], &[], None)?;
    eprintln!(
        "forward (PixArt-α): batch {b}, {len} text tokens, in {:.1} ms on {on}; wrote {}",
        secs * 1e3,
        out_path.display()
    );
    Ok(())
}

/// The `icdit sample` flags a PixArt-α run reads.
pub struct SampleFlags<'a> {
    pub weights: &'a Path,
    pub prompt_embeds: Option<&'a Path>,
    pub negative_embeds: Option<&'a Path>,
    /// `--prompt`s, encoded with the folder's text encoder (instead of `prompt_embeds`).
    pub prompts: &'a [String],
    /// `--negative-prompt` (default "").
    pub negative_prompt: Option<&'a str>,
    /// `--max-sequence-length` (default 120).
    pub max_sequence_length: Option<usize>,
    pub steps: Option<usize>,
    pub sampler: Option<&'a str>,
    pub cfg: Option<f32>,
    pub seed: u64,
    pub noise: Option<&'a Path>,
    pub cache: CachePolicy,
    /// `--compare`: sample the request under each policy, one grid row per policy.
    pub compare: &'a [CachePolicy],
    pub period: usize,
    pub full_steps: &'a [usize],
    pub factors: Option<&'a Path>,
    pub out_latents: Option<&'a Path>,
    pub images: &'a mut ImageOut,
    pub vae: Option<&'a Path>,
    pub threads: usize,
    pub backend: &'a str,
    /// `--height`/`--width` in pixels (default: the model's square size).
    pub height: Option<usize>,
    pub width: Option<usize>,
    /// Map a requested size to the nearest aspect-ratio bin (not `--no-resolution-binning`).
    pub resolution_binning: bool,
}

pub fn sample(f: SampleFlags) -> Result<(), Error> {
    let backend: Backend = f.backend.parse()?;
    // The size sampled: the request, or (binning) its nearest aspect-ratio bin; without
    // --height/--width the trained square size, which is its own bin for every published model.
    let trained = icdit::pixart::PixArtConfig::load(f.weights)?;
    let size = if f.height.is_none() && f.width.is_none() {
        ImageSize::plan(&trained, None, None, false)?
    } else {
        ImageSize::plan(&trained, f.height, f.width, f.resolution_binning)?
    };
    let model = Arc::new(PixArtModel::load_at(f.weights, Some(size.latent()))?);
    let cfg = model.config;
    if size.sampled != size.requested {
        eprintln!(
            "resolution binning: {}×{} is sampled at the nearest aspect-ratio bin, {}×{}, and resized back",
            size.requested.0, size.requested.1, size.sampled.0, size.sampled.1
        );
    }
    // The text encoder is opened only when a prompt must be encoded (its weights stay unmapped
    // otherwise); a request's embeddings are computed once, before sampling.
    let mut encoder: Option<icdit::text::TextEncoder> = None;
    let mut encode = |prompts: &[&str], len: usize| -> Result<Embeddings, Error> {
        let enc = match &mut encoder {
            Some(enc) => enc,
            None => encoder.insert(icdit::text::TextEncoder::open(
                f.weights,
                &icdit::text::TextOptions { threads: f.threads, isa: None },
            )?),
        };
        let e = enc.encode(prompts, len)?;
        Embeddings::new(e.embeds, e.mask, e.batch, e.len, e.dim)
    };
    let prompt =
        match (f.prompt_embeds, f.prompts) {
            (Some(p), _) => Embeddings::load(p)?,
            (None, prompts) if !prompts.is_empty() => {
                let texts: Vec<&str> = prompts.iter().map(String::as_str).collect();
                encode(&texts, f.max_sequence_length.unwrap_or(icdit::text::DEFAULT_MAX_LEN))?
            }
            (None, _) => return Err(Error::invalid(
                "--prompt",
                "a PixArt-α pipeline samples from prompts: pass --prompt TEXT (one image each), or --prompt-embeds \
                 FILE (`prompt_embeds` f32 [B, L, D] and `attention_mask` i64 [B, L], as `icdit encode` writes them)",
            )),
        };
    let sampler = match f.sampler {
        None | Some("dpm-solver") => PixArtSampler::DpmSolver,
        Some("ddim") => PixArtSampler::Ddim,
        Some(other) => {
            return Err(Error::invalid("--sampler", format!("`{other}`: PixArt-α samples with dpm-solver or ddim")))
        }
    };
    let cfg_scale = f.cfg.unwrap_or(4.5);
    let has_encoder = f.weights.join("text_encoder").join("config.json").is_file();
    let negative = match f.negative_embeds {
        Some(p) => Some(Embeddings::load(p)?),
        // The negative prompt, encoded to the prompts' length (the pipeline's default: "").
        None if cfg_scale > 1.0 && (has_encoder || f.negative_prompt.is_some()) => {
            Some(encode(&[f.negative_prompt.unwrap_or("")], prompt.len)?)
        }
        None if cfg_scale > 1.0 => {
            return Err(Error::invalid(
                "--negative-embeds",
                format!(
                    "guidance (--cfg > 1, default 4.5) needs the negative prompt's embeddings, and {} has no \
                     text_encoder/ to compute them: pass --negative-embeds FILE (e.g. the embeddings of \"\"), or --cfg 1",
                    f.weights.display()
                ),
            ))
        }
        None => None,
    };
    // Embeddings are all computed: the encoder (its mapping and arena) is not kept while sampling.
    drop(encoder);
    let cache = match (f.cache, f.factors) {
        (_, Some(_)) if !f.compare.is_empty() => PixArtCache::None,
        (CachePolicy::Icc, _) | (_, None) => cache_mode(f.cache, f.factors, &model)?,
        (_, Some(_)) => return Err(Error::invalid("--factors", "only used with --cache icc")),
    };
    let vae = match f.vae {
        Some(p) => Some(p.to_path_buf()),
        None if f.weights.join("vae").join("config.json").is_file() => Some(f.weights.join("vae")),
        None => None,
    };
    if f.images.any() && vae.is_none() {
        return Err(Error::invalid(
            "--grid/--out/--npz",
            format!(
                "decoding needs a VAE: {} has no vae/ folder (pass --vae DIR, or write --out-latents)",
                f.weights.display()
            ),
        ));
    }
    if f.images.out.is_some() {
        return Err(Error::invalid("--out", "PixArt-α writes a --grid or --npz for now, not one PNG per image"));
    }
    if !f.compare.is_empty() {
        if f.out_latents.is_some() || vae.is_none() {
            return Err(Error::invalid(
                "--compare",
                "writes a grid of decoded images: it needs a VAE (the folder's vae/ or --vae DIR) and cannot be \
                 combined with --out-latents",
            ));
        }
        if f.images.grid.is_none() {
            f.images.grid = Some(PathBuf::from("samples/compare.png"));
        }
    }
    if f.images.any() {
        f.images.prepare()?;
    } else if f.out_latents.is_none() {
        return Err(Error::invalid("output", "name --out-latents FILE and/or --grid PNG"));
    }
    let n = prompt.rows;
    let opts = PixArtOptions {
        max_batch: n,
        max_text_len: prompt.len,
        sampler,
        steps: f.steps.unwrap_or(20),
        cfg_scale,
        threads: f.threads,
        isa: None,
        cache,
        full_steps: if f.full_steps.is_empty() {
            FullSteps::Period(f.period)
        } else {
            FullSteps::List(f.full_steps.to_vec())
        },
    };
    let noise = match f.noise {
        Some(p) => {
            let file = TensorFile::open(p)?;
            let (shape, z) = file.read_f32("z")?;
            let want = [n, cfg.in_channels, cfg.height, cfg.width];
            if shape != want {
                return Err(Error::Layout {
                    path: p.to_path_buf(),
                    reason: format!("`z` has shape {shape:?}; expected {want:?}"),
                });
            }
            Some(z)
        }
        None => None,
    };
    let req = PixArtRequest {
        prompt: &prompt,
        negative: negative.as_ref(),
        noise: noise.as_deref(),
        seed: f.seed,
        first_index: 0,
    };
    let start = Instant::now();
    let sample_with = |opts: &PixArtOptions| -> Result<(Vec<f32>, String), Error> {
        let mut engine = AnyPixArtEngine::new(Arc::clone(&model), opts, backend)?;
        engine.set_interrupt(Some(crate::interrupt::flag()));
        let mut latents = vec![0.0f32; n * cfg.image_elems()];
        engine.sample(&req, &mut latents, &mut |_| {})?;
        Ok((latents, engine.describe()))
    };
    if !f.compare.is_empty() {
        // One row of images per policy, in the order given; distances to `none` if it is one.
        let mut rows: Vec<(CachePolicy, Vec<f32>)> = Vec::new();
        for &policy in f.compare {
            let o = PixArtOptions { cache: cache_mode(policy, f.factors, &model)?, ..opts.clone() };
            rows.push((policy, sample_with(&o)?.0));
        }
        let reference = rows.iter().find(|r| r.0 == CachePolicy::None).map(|r| r.1.clone());
        for (policy, latents) in &rows {
            match &reference {
                Some(r) if *policy != CachePolicy::None => eprintln!(
                    "{:>6}: relative L2 of the latents to `none` {:.4}, PSNR {:.2} dB",
                    policy.name(),
                    icdit::quality::rel_l2(latents, r),
                    icdit::quality::psnr(latents, r)
                ),
                _ => eprintln!("{:>6}", policy.name()),
            }
        }
        let all: Vec<f32> = rows.iter().flat_map(|r| r.1.iter().copied()).collect();
        let dir = vae.as_deref().unwrap_or(f.weights);
        let written = decode_write(dir, &all, rows.len() * n, &size, cfg.in_channels, f.threads, f.images, f.seed, n)?;
        eprintln!(
            "sample --compare (PixArt-α): {n} image(s) × {} policies in {:.2} s; wrote {}",
            rows.len(),
            start.elapsed().as_secs_f64(),
            written.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        );
        return Ok(());
    }
    let (latents, on) = sample_with(&opts)?;
    let secs = start.elapsed().as_secs_f64();
    let shape = [n, cfg.in_channels, cfg.height, cfg.width];
    let mut written: Vec<PathBuf> = Vec::new();
    if let Some(p) = f.out_latents {
        write_safetensors(p, &[("latents", &shape, &latents)], &[], None)?;
        written.push(p.to_path_buf());
    }
    if let Some(dir) = vae.as_deref().filter(|_| f.images.any()) {
        let cols = n.min(8);
        written.extend(decode_write(dir, &latents, n, &size, cfg.in_channels, f.threads, f.images, f.seed, cols)?);
    }
    let names: Vec<String> = written.iter().map(|p| p.display().to_string()).collect();
    eprintln!(
        "sample (PixArt-α): {n} image(s), {} {} steps at guidance {cfg_scale}, cache {}, in {:.2} s on {on}; wrote {}",
        opts.steps,
        sampler.name(),
        opts.cache.policy(),
        secs,
        names.join(", ")
    );
    Ok(())
}

/// The engine's cache for a policy; icc reads `--factors`.
fn cache_mode(policy: CachePolicy, factors: Option<&Path>, model: &PixArtModel) -> Result<PixArtCache, Error> {
    Ok(match (policy, factors) {
        (CachePolicy::None, _) => PixArtCache::None,
        (CachePolicy::Reuse, _) => PixArtCache::Reuse,
        (CachePolicy::Icc, Some(p)) => PixArtCache::Icc(Arc::new(PixArtFactors::load(p, model)?)),
        (CachePolicy::Icc, None) => {
            return Err(Error::invalid("--cache icc", "needs --factors FILE (factors named after the layers)"))
        }
        (CachePolicy::Fora | CachePolicy::Taylor, _) => {
            return Err(Error::invalid(
                "--cache",
                format!("`{policy}` runs on DiT models only for now; PixArt-α takes none, reuse or icc"),
            ))
        }
    })
}

/// Decodes `count` latents with the VAE in `dir` (latents / its scaling factor), resizes them
/// to the requested size when binning sampled another (diffusers' `resize_and_crop_tensor`)
/// and writes them where `images` says, `cols` per grid row.
#[allow(clippy::too_many_arguments)]
fn decode_write(
    dir: &Path,
    latents: &[f32],
    count: usize,
    size: &ImageSize,
    channels: usize,
    threads: usize,
    images: &ImageOut,
    seed: u64,
    cols: usize,
) -> Result<Vec<PathBuf>, Error> {
    let vae = Arc::new(VaeModel::load(dir)?);
    if vae.config.latent_channels != channels {
        return Err(Error::Config {
            origin: dir.display().to_string(),
            reason: format!(
                "the VAE decodes {} latent channels; the transformer samples {channels}",
                vae.config.latent_channels
            ),
        });
    }
    let mut dec = VaeDecoder::new_hw(Arc::clone(&vae), size.latent(), threads)?;
    let (ll, il, oc, got) = (dec.latent_len(), dec.image_len(), vae.config.out_channels, dec.out_hw());
    if size.resized() && got != size.sampled {
        return Err(Error::Config {
            origin: dir.display().to_string(),
            reason: format!(
                "the VAE decodes the {}×{} latent to {}×{} pixels, not {}×{}: resizing back to the requested size \
                 assumes PixArt-α's 8× VAE (pass --no-resolution-binning)",
                size.latent().0,
                size.latent().1,
                got.0,
                got.1,
                size.sampled.0,
                size.sampled.1
            ),
        });
    }
    let mut pixels = vec![0.0f32; count * il];
    for i in 0..count {
        dec.decode(&latents[i * ll..(i + 1) * ll], &mut pixels[i * il..(i + 1) * il])?;
    }
    let want = if size.resized() { size.requested } else { got };
    if got != want {
        let ol = oc * want.0 * want.1;
        let mut resized = vec![0.0f32; count * ol];
        for i in 0..count {
            resize_and_crop(&pixels[i * il..(i + 1) * il], oc, got, want, &mut resized[i * ol..(i + 1) * ol]);
        }
        pixels = resized;
    }
    images.write_hw(&pixels, &vec![0; count], Some(seed), oc, want, cols)
}
