//! CPU SD-VAE decoder benchmarks: the whole decode of a 32×32 latent to 256×256 (the
//! sd-vae-ft-ema architecture with seeded random weights, so nothing is downloaded) and its
//! two dominant conv shapes, with throughput in FLOPs (2 per multiply-accumulate; reference
//! doc G.3: 311.09 GMACs per decode). Run: `cargo bench --bench cpu_vae`.

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use icdit::cpu::gemm::{self, BMat, Conv3, Gemm, Gemmer};
use icdit::cpu::pool::{SendPtr, ThreadPool};
use icdit::isa::{Isa, ISA_ENV};
use icdit::vae::{VaeConfig, VaeDecoder, VaeModel};

fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// 3×3 convs as the decoder runs them: implicit im2col, NHWC.
fn conv3x3(c: &mut Criterion) {
    let pool = ThreadPool::new(threads()).expect("threads");
    let gm = Gemmer::new(Isa::from_env().expect(ISA_ENV));
    let mut group = c.benchmark_group(format!("cpu-{}/vae_conv3x3", gm.name()));
    group.sample_size(10).measurement_time(Duration::from_secs(5));
    for (side, cin, cout) in [(64, 512, 512), (256, 128, 128)] {
        let px = side * side;
        let x: Vec<f32> = (0..px * cin).map(|i| (i % 89) as f32 * 0.01 - 0.4).collect();
        let w: Vec<f32> = (0..cout * cin * 9).map(|i| (i % 83) as f32 * 0.001 - 0.04).collect();
        let bias = vec![0.1f32; cout];
        let mut out = vec![0.0f32; px * cout];
        let mut scratch = vec![0.0f32; pool.threads() * gemm::SCRATCH_PER_THREAD];
        group.throughput(Throughput::Elements((2 * px * cin * cout * 9) as u64));
        group.bench_function(BenchmarkId::new("conv", format!("{side}x{side}_{cin}to{cout}")), |b| {
            b.iter(|| {
                let g = Gemm {
                    m: px,
                    n: cout,
                    k: 9 * cin,
                    a: &x,
                    a_minus: None,
                    lda: cin,
                    conv: Some(Conv3 { h: side, w: side, up2: false }),
                    b: BMat::weight(&w, 9 * cin),
                    bias: Some(&bias),
                    add: None,
                    act: gemm::Act::None,
                    c: SendPtr(out.as_mut_ptr()),
                    ldc: cout,
                };
                gm.run(&pool, &mut scratch, &mut [], &g);
            })
        });
    }
    group.finish();
}

/// One whole decode, 32×32×4 latent → 256×256×3 image.
fn decode(c: &mut Criterion) {
    let cfg = VaeConfig::sd();
    let model = Arc::new(VaeModel::random(&cfg, 1).expect("random VAE"));
    let mut dec = VaeDecoder::new(model, 32, 0).expect("decoder");
    let lat: Vec<f32> = (0..dec.latent_len()).map(|i| ((i * 7919 % 1000) as f32 / 1000.0 - 0.5) * 0.8).collect();
    let mut img = vec![0.0f32; dec.image_len()];
    let mut group = c.benchmark_group(format!("cpu-{}/vae_decode", dec.isa()));
    group.sample_size(10).measurement_time(Duration::from_secs(30));
    group.throughput(Throughput::Elements(2 * cfg.macs(32)));
    group.bench_function("sd_vae_32_to_256", |b| b.iter(|| dec.decode(&lat, &mut img).expect("decode")));
    group.finish();
}

criterion_group!(benches, conv3x3, decode);
criterion_main!(benches);
