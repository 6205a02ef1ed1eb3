//! The GPU pipeline on a CUDA GPU (feature `cuda`): DiT-XL/2 step kinds (plain, full,
//! calibrated at rank 128, reuse) at batch 1 and 16 with guidance, timed by CUDA events over
//! replays of each step's recorded graph (`iter_custom`), and 50-step DDIM sampling of one
//! image under no cache, reuse and period-2 icc. Throughput: the step's FLOPs (icc's MAC
//! accounting, 2 FLOPs per MAC, two rows per image). Without the `cuda` feature or without a
//! device it prints why and measures nothing (the emulation proves logic, not speed; see
//! `icdit bench-gpu --backend emu`).
//! Run: `cargo bench --features cuda --bench gpu_pipeline`.

use criterion::{criterion_group, criterion_main, Criterion};

#[cfg(feature = "cuda")]
mod on_gpu {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use criterion::{Criterion, Throughput};
    use icdit::forward::StepKind;
    use icdit::gpu::{CudaDevice, GpuEngine};
    use icdit::plan::Plan;
    use icdit::{CacheMode, DitConfig, DitModel, EngineOptions, Factors, FullSteps, Request, Sampler};

    fn open(plan: &Plan) -> icdit::Result<CudaDevice> {
        CudaDevice::open(plan)?.ok_or_else(|| icdit::Error::gpu("bench", "no CUDA device"))
    }

    fn opts(batch: usize, cache: CacheMode) -> EngineOptions {
        EngineOptions {
            max_batch: batch,
            respacing: "ddim50".into(),
            sampler: Sampler::Ddim { eta: 0.0 },
            cfg_scale: 4.0,
            cache,
            full_steps: FullSteps::Period(2),
            ..Default::default()
        }
    }

    pub fn run(c: &mut Criterion) {
        match CudaDevice::open(&Plan::new("probe")) {
            Ok(Some(_)) => {}
            Ok(None) => return println!("gpu_pipeline: skipped: no CUDA device"),
            Err(e) => return println!("gpu_pipeline: skipped: CUDA unusable: {e}"),
        }
        let cfg = DitConfig::xl2_256();
        let model = Arc::new(DitModel::random(&cfg, 0).expect("model"));
        let factors = Arc::new(Factors::random(&model, 128, 1).expect("factors"));
        let ranks = factors.ranks();
        for batch in [1usize, 16] {
            let mut group = c.benchmark_group(format!("gpu/xl2_256_step_batch{batch}_cfg"));
            group.sample_size(20).measurement_time(Duration::from_secs(5));
            for (policy, cache, kinds) in [
                ("none", CacheMode::None, &[StepKind::Plain][..]),
                ("reuse", CacheMode::Reuse, &[StepKind::Reuse][..]),
                ("icc", CacheMode::Icc(factors.clone()), &[StepKind::Full, StepKind::Calibrated][..]),
            ] {
                let mut engine = GpuEngine::new(Arc::clone(&model), &opts(batch, cache), open).expect("engine");
                for &kind in kinds {
                    let (macs, _) = icdit::cost::schedule_macs(&cfg, std::iter::once(kind), &ranks);
                    group.throughput(Throughput::Elements((2.0 * macs * 2.0 * batch as f64) as u64));
                    group.bench_function(format!("{kind:?}").to_lowercase(), |b| {
                        b.iter_custom(|iters| {
                            let per = iters.clamp(1, 49) as usize;
                            let mut total = 0.0f64;
                            let mut done = 0u64;
                            while done < iters {
                                let ms = engine.time_step(kind, per).expect("step");
                                total += ms as f64 * per as f64;
                                done += per as u64;
                            }
                            Duration::from_secs_f64(total / 1e3 * iters as f64 / done as f64)
                        })
                    });
                }
                if batch == 1 {
                    let mut out = vec![0.0f32; cfg.image_elems()];
                    group.bench_function(format!("sample_ddim50_{policy}"), |b| {
                        b.iter_custom(|iters| {
                            let t = Instant::now();
                            for i in 0..iters {
                                engine.sample(&Request::new(&[207], i), &mut out, &mut |_| {}).expect("sample");
                            }
                            t.elapsed()
                        })
                    });
                }
            }
            group.finish();
        }
    }
}

fn gpu(c: &mut Criterion) {
    #[cfg(feature = "cuda")]
    on_gpu::run(c);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = c;
        println!("gpu_pipeline: skipped: built without the `cuda` feature (cargo bench --features cuda --bench gpu_pipeline)");
    }
}

criterion_group!(benches, gpu);
criterion_main!(benches);
