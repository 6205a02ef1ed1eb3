//! Proves the CPU forward pass, the sampling engine, the VAE decoder, the GPU pipeline
//! (on the emulated device) and PixArt-α's sampling (CPU and emulated device) allocate nothing
//! after set-up: a
//! counting global allocator sees every heap allocation on every thread (the worker pools
//! included).

mod common;
mod counting_alloc;

use std::sync::Arc;

use icdit::factors::{FactorInfo, LayerType};
use icdit::gpu::{EmuDevice, GpuEngine};
use icdit::{
    CacheMode, CpuEngine, CpuOptions, DitConfig, DitModel, Engine, EngineOptions, Factors, FullSteps, LoadOptions,
    Request, Sampler,
};

use counting_alloc::allocations_during;

/// One test function only: libtest's own reporting of a concurrently finishing test
/// would allocate on the main thread while this test counts.
#[test]
fn nothing_allocates_after_set_up() {
    cpu_forward_allocates_nothing();
    sample_allocates_nothing_after_the_first_call();
    vae_decode_allocates_nothing();
    gpu_pipeline_allocates_nothing();
    session_allocates_nothing();
    pixart_sampling_allocates_nothing();
}

/// PixArt-α's sampling (tests/fixtures/pixart/tiny): DPM-Solver++ and DDIM under guidance,
/// without caching, with reuse and with icc (rank-1 factors), after the first request, on the
/// CPU backend and on the emulated device (`--backend emu`); and the micro-conditioned model
/// (tests/fixtures/pixart_ms/tiny_ms) on a non-square latent (CPU).
fn pixart_sampling_allocates_nothing() {
    use icdit::backend::Backend;
    use icdit::pixart::backend::AnyPixArtEngine;
    use icdit::pixart::{
        Embeddings, PixArtCache, PixArtEngine, PixArtFactors, PixArtModel, PixArtOptions, PixArtRequest, PixArtSampler,
    };
    let model = Arc::new(PixArtModel::load(&common::fixture("pixart/tiny")).unwrap());
    let dir = common::TempDir::new("pixart-no-alloc");
    let path = dir.join("rank1.safetensors");
    let mut tensors = Vec::new();
    for i in 0..model.config.depth {
        for layer in icdit::pixart::Layer::cached(i) {
            let (out, inp) = layer.shape(&model.config);
            tensors.push((format!("{}.up", layer.name()), vec![out, 1], vec![0.01f32; out]));
            tensors.push((format!("{}.down", layer.name()), vec![1, inp], vec![0.02f32; inp]));
        }
    }
    let views: Vec<(&str, &[usize], &[f32])> =
        tensors.iter().map(|(n, s, d)| (n.as_str(), s.as_slice(), d.as_slice())).collect();
    icdit::tensorfile::write_safetensors(&path, &views, &[], None).unwrap();
    let factors = Arc::new(PixArtFactors::load(&path, &model).unwrap());
    let load = |name: &str| Embeddings::load(&common::fixture(&format!("pixart/{name}.safetensors"))).unwrap();
    let (pos, neg) = (load("prompt_embeds"), load("negative_embeds"));
    for (backend, sampler, cache) in [Backend::Cpu, Backend::Emu].into_iter().flat_map(|b| {
        [
            (b, PixArtSampler::DpmSolver, PixArtCache::None),
            (b, PixArtSampler::Ddim, PixArtCache::Reuse),
            (b, PixArtSampler::DpmSolver, PixArtCache::Icc(Arc::clone(&factors))),
        ]
    }) {
        let policy = cache.policy();
        let opts =
            PixArtOptions { max_batch: 2, max_text_len: 6, sampler, steps: 5, threads: 2, cache, ..Default::default() };
        let mut e = AnyPixArtEngine::new(Arc::clone(&model), &opts, backend).unwrap();
        let mut out = vec![0.0f32; 2 * model.config.image_elems()];
        let req = PixArtRequest { prompt: &pos, negative: Some(&neg), noise: None, seed: 3, first_index: 0 };
        e.sample(&req, &mut out, &mut |_| {}).unwrap();
        let during = allocations_during(|| {
            e.sample(&req, &mut out, &mut |_| {}).unwrap();
            e.sample(&PixArtRequest { seed: 4, ..req }, &mut out, &mut |_| {}).unwrap();
        });
        let (on, name) = (backend.name(), sampler.name());
        println!("PixArt on {on}, {name} / {policy}: {during} allocations in 2 requests");
        assert_eq!(during, 0, "PixArt sampling on {on} ({name}, {policy}) allocated {during} times");
        assert!(out.iter().all(|v| v.is_finite()) && out.iter().any(|v| v.abs() > 1e-3));
    }
    // The 1024-MS path: micro-conditions staged per request, a non-square (12×8) latent.
    let ms = Arc::new(PixArtModel::load_at(&common::fixture("pixart_ms/tiny_ms"), Some((12, 8))).unwrap());
    let opts = PixArtOptions { max_batch: 2, max_text_len: 6, steps: 4, threads: 2, ..Default::default() };
    let mut e = PixArtEngine::new(Arc::clone(&ms), &opts).unwrap();
    let mut out = vec![0.0f32; 2 * ms.config.image_elems()];
    let req = PixArtRequest { prompt: &pos, negative: Some(&neg), noise: None, seed: 3, first_index: 0 };
    e.sample(&req, &mut out, &mut |_| {}).unwrap();
    let during = allocations_during(|| {
        e.sample(&PixArtRequest { seed: 4, ..req }, &mut out, &mut |_| {}).unwrap();
    });
    println!("PixArt 1024-MS path (micro-conditions, 12×8): {during} allocations in 1 request");
    assert_eq!(during, 0, "PixArt sampling with micro-conditions allocated {during} times");
    assert!(out.iter().all(|v| v.is_finite()) && out.iter().any(|v| v.abs() > 1e-3));
}

/// The embedding layer the C ABI and Python wrap: pixels, latents and per-step previews
/// into the caller's buffers, after the first request.
fn session_allocates_nothing() {
    use icdit::session::{Session, SessionOptions, SessionRequest};
    let mut s = Session::open(&SessionOptions { steps: Some(3), max_batch: 2, ..Default::default() }).unwrap();
    let info = s.info();
    let (mut px, mut lat) = (vec![0u8; 2 * info.pixel_len()], vec![0.0f32; 2 * info.latent_len()]);
    let preview = SessionRequest { preview: true, ..SessionRequest::new(&[1, 2], 5) };
    s.sample_pixels(&preview, &mut px, &mut |_, _| {}).unwrap();
    let mut previews = 0;
    let during = allocations_during(|| {
        s.sample_pixels(&preview, &mut px, &mut |_, p| previews += p.is_some() as usize).unwrap();
        s.sample_latents(&SessionRequest::new(&[3, 4], 6), &mut lat, &mut |_, _| {}).unwrap();
        s.sample_pixels(&SessionRequest::new(&[5], 7), &mut px[..info.pixel_len()], &mut |_, _| {}).unwrap();
    });
    println!("session: {during} allocations in 3 requests ({previews} previews)");
    assert_eq!(during, 0, "the session allocated {during} times");
    assert_eq!(previews, 3);
    assert!(px.iter().any(|&v| v != px[0]) && lat.iter().any(|v| v.abs() > 1e-3));
}

/// The GPU pipeline on the emulated device: a request (full-size, replaying the recorded
/// step graphs; and smaller, launching directly) allocates nothing on the host, with icc's
/// calibrated linears fused in the projected and folded forms (rank 8) and as two GEMMs in the
/// direct form (rank 4, which the fused kernel does not take).
fn gpu_pipeline_allocates_nothing() {
    use icdit::IccForm;
    let m = Arc::new(DitModel::load(&common::fixture("hd72/official.safetensors"), &LoadOptions::default()).unwrap());
    for (rank, want, form) in [
        (8, IccForm::Auto, (IccForm::Projected, true)),
        (8, IccForm::Folded, (IccForm::Folded, true)),
        (4, IccForm::Auto, (IccForm::Direct, false)),
    ] {
        let factors = Arc::new(Factors::random(&m, rank, 3).unwrap());
        let opts = EngineOptions {
            max_batch: 2,
            respacing: "ddim4".into(),
            sampler: Sampler::Ddim { eta: 0.0 },
            cfg_scale: 3.0,
            cache: CacheMode::Icc(factors),
            icc_form: want,
            ..Default::default()
        };
        let engine = gpu_requests_allocate_nothing(&m, &opts, &format!("icc rank {rank} {form:?}"));
        assert_eq!(engine.icc_form(), form, "rank {rank}");
    }
    // FORA-style block reuse and Taylor forecasting (its per-step numbers read on the device).
    for cache in [CacheMode::Fora, CacheMode::Taylor(icdit::Forecast { order: 2, warmup: 1 })] {
        let opts = EngineOptions {
            max_batch: 2,
            respacing: "ddim6".into(),
            sampler: Sampler::Ddim { eta: 0.0 },
            cfg_scale: 3.0,
            cache: cache.clone(),
            full_steps: FullSteps::Period(3),
            ..Default::default()
        };
        gpu_requests_allocate_nothing(&m, &opts, &format!("{cache:?}"));
    }
}

/// An emulated-GPU engine for `opts`: after two warm-up requests (full-size and smaller), two
/// more allocate nothing on the host; one graph recorded per step kind (full and cached); the
/// output finite and not all zero.
fn gpu_requests_allocate_nothing(m: &Arc<DitModel>, opts: &EngineOptions, label: &str) -> GpuEngine<EmuDevice> {
    let mut engine = GpuEngine::new(Arc::clone(m), opts, EmuDevice::new).unwrap();
    let img = m.config.image_elems();
    let mut out = vec![0.0; 2 * img];
    engine.sample(&Request::new(&[1, 2], 1), &mut out, &mut |_| {}).unwrap();
    engine.sample(&Request::new(&[3], 1), &mut out[..img], &mut |_| {}).unwrap();
    let during = allocations_during(|| {
        engine.sample(&Request::new(&[4, 5], 2), &mut out, &mut |_| {}).unwrap();
        engine.sample(&Request::new(&[6], 2), &mut out[..img], &mut |_| {}).unwrap();
    });
    let graphs = engine.graph_count();
    println!("GPU pipeline (emulated), {label}: {during} host allocations in 2 requests ({graphs} graphs)");
    assert_eq!(during, 0, "the GPU pipeline allocated {during} times under {label}");
    assert_eq!(graphs, 2, "{label}: one graph per step kind: full and cached");
    assert!(out.iter().all(|v| v.is_finite()) && out.iter().any(|v| v.abs() > 1e-3));
    engine
}

fn vae_decode_allocates_nothing() {
    let vae = Arc::new(icdit::vae::VaeModel::load(&common::fixture("vae/new")).unwrap());
    for isa in common::isas("no-alloc VAE") {
        println!("{isa}:");
        vae_decode_on_allocates_nothing(icdit::vae::VaeDecoder::new(Arc::clone(&vae), 8, 2).unwrap().with_isa(isa));
    }
}

fn vae_decode_on_allocates_nothing(mut dec: icdit::vae::VaeDecoder) {
    let lat: Vec<f32> = (0..dec.latent_len()).map(|i| ((i * 13 % 29) as f32 / 29.0) - 0.5).collect();
    let mut img = vec![0.0f32; dec.image_len()];
    dec.decode(&lat, &mut img).unwrap(); // warm-up
    let during = allocations_during(|| {
        for _ in 0..3 {
            dec.decode(&lat, &mut img).unwrap();
        }
    });
    println!("heap allocations during 3 VAE decodes: {during}");
    assert_eq!(during, 0, "the VAE decode allocated {during} times");
    assert!(img.iter().any(|v| v.abs() > 1e-2) && img.iter().all(|v| v.is_finite()));
}

fn cpu_forward_allocates_nothing() {
    // Shapes large enough that every op runs multi-threaded (N = 64 tokens, rows 4).
    let cfg = DitConfig {
        input_size: 16,
        patch_size: 2,
        in_channels: 4,
        hidden_size: 144,
        depth: 2,
        num_heads: 2,
        mlp_ratio: 4.0,
        class_dropout_prob: 0.1,
        num_classes: 10,
        learn_sigma: true,
    };
    let model = Arc::new(DitModel::random(&cfg, 7).unwrap());
    for isa in common::isas("no-alloc forward") {
        let opts = CpuOptions { max_batch: 2, guidance: true, threads: 2, isa: Some(isa), ..Default::default() };
        println!("{isa}:");
        cpu_forward_on_allocates_nothing(CpuEngine::new(Arc::clone(&model), &opts).unwrap(), &cfg);
    }
}

fn cpu_forward_on_allocates_nothing(mut engine: CpuEngine, cfg: &DitConfig) {
    let rows = 4;
    let x: Vec<f32> = (0..rows * cfg.image_elems()).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
    let t = [999i64, 500, 999, 500];
    let y = [3i64, 7, 10, 10];
    let mut out = vec![0.0f32; rows * cfg.output_elems()];
    engine.forward(&x, &t, &y, &mut out).unwrap(); // warm-up (thread start-up, lazy statics)

    let during = allocations_during(|| {
        for _ in 0..3 {
            engine.forward(&x, &t, &y, &mut out).unwrap();
        }
    });
    println!("heap allocations during 3 forward passes: {during}");
    assert_eq!(during, 0, "the forward pass allocated {during} times");
    // The counter does see allocations: an error (a formatted message) allocates.
    let on_error = allocations_during(|| assert!(engine.forward(&x, &t, &[3, 7, 10, 99], &mut out).is_err()));
    assert!(on_error > 0, "counting allocator is not counting");
    // And the pass did real work.
    assert!(out.iter().any(|v| v.abs() > 1e-3) && out.iter().all(|v| v.is_finite()));
}

fn sample_allocates_nothing_after_the_first_call() {
    let m = Arc::new(DitModel::load(&common::fixture("hd72/official.safetensors"), &LoadOptions::default()).unwrap());
    // Rank-4 factors from the model's own weights (values do not matter here, shapes do).
    let (c, mh) = (m.config.hidden_size, m.config.mlp_hidden());
    let layers = (0..m.config.depth)
        .map(|_| {
            LayerType::ALL.map(|t| {
                let (o, i) = t.shape(c, mh);
                (vec![0.01f32; o * 4], vec![0.02f32; 4 * i], 4)
            })
        })
        .collect();
    let factors = Arc::new(Factors::from_parts(&m, FactorInfo::default(), layers).unwrap());
    let policies = [
        (Sampler::Ddpm, CacheMode::None),
        (Sampler::Ddim { eta: 0.0 }, CacheMode::None),
        (Sampler::Ddpm, CacheMode::Reuse),
        (Sampler::Ddim { eta: 0.0 }, CacheMode::Icc(factors)),
        (Sampler::Ddpm, CacheMode::Fora),
        (Sampler::Ddim { eta: 0.0 }, CacheMode::Taylor(icdit::Forecast { order: 2, warmup: 1 })),
    ];
    for (sampler, cache) in policies {
        let label = format!("{sampler:?} / {cache:?}");
        let opts = EngineOptions {
            max_batch: 3,
            respacing: "25".into(),
            sampler,
            cfg_scale: 3.0,
            threads: 2,
            cache,
            full_steps: FullSteps::Period(3),
            ..Default::default()
        };
        let mut engine = Engine::new(Arc::clone(&m), &opts).unwrap();
        let classes = [1i64, 5, 9];
        let mut out = vec![0.0; 3 * m.config.image_elems()];
        let mut steps = 0usize;
        engine.sample(&Request::new(&classes, 1), &mut out, &mut |_| {}).unwrap();
        let during = allocations_during(|| {
            for seed in 0..3 {
                engine.sample(&Request::new(&classes, seed), &mut out, &mut |_| steps += 1).unwrap();
            }
        });
        let kinds: Vec<_> = (0..engine.steps()).map(|i| engine.step_kind(i)).collect();
        println!("{label}: {during} allocations in 3 requests of {} steps ({kinds:?})", engine.steps());
        assert_eq!(during, 0);
        assert_eq!(steps, 3 * engine.steps());
        assert!(out.iter().all(|v| v.is_finite()) && out.iter().any(|v| v.abs() > 1e-3));
    }
}
