//! The CPU calibrated/full step-time ratio at DiT-XL/2 size (issue 22's CPU target), timed as
//! the sampling loop runs the steps (conditioning computed ahead) and measured in process CPU
//! time, which a shared machine's load does not inflate the way it inflates wall time.
//!
//!     cargo run --release --example step_ratio -- [ROUNDS] [STEPS] [KINDS]
//!
//! Random DiT-XL/2 weights and rank-128 factors (seeded, nothing downloaded), batch 1 with
//! guidance (2 model rows), 2 threads. Each round times STEPS (default 8) steps of each kind
//! in KINDS (default `full,calibrated`; also `reuse`), the kinds alternating within the round;
//! ROUNDS defaults to 3. Prints one line per round and kind (CPU ms per step of both threads,
//! of which the conditioning computed ahead, wall ms per step, a hash of the output's bits to
//! compare binaries) and the median ratio of each kind to the full step over the rounds.
//! `ICDIT_CPU_ISA` picks the instruction-set path as for the engine. Run it while nothing else
//! runs; on a shared machine the CPU time still holds where the wall time does not.

use std::sync::Arc;

use icdit::forward::StepKind;
use icdit::{cost, CacheMode, CpuEngine, CpuOptions, DitConfig, DitModel, Factors};

/// CPU time of the whole process (every thread), in seconds.
fn cpu_seconds() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec, which `ts` is.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let h = v.len() / 2;
    if v.len().is_multiple_of(2) {
        (v[h - 1] + v[h]) / 2.0
    } else {
        v[h]
    }
}

fn main() -> Result<(), icdit::Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage =
        || icdit::Error::invalid("arguments", "expected [ROUNDS ≥ 1] [STEPS ≥ 1] [KINDS: full,calibrated,reuse]");
    let positive = |s: &String| s.parse::<usize>().ok().filter(|&v| v > 0).ok_or_else(usage);
    let rounds = args.first().map_or(Ok(3), positive)?;
    let steps = args.get(1).map_or(Ok(8), positive)?;
    let kinds = args
        .get(2)
        .map_or("full,calibrated", String::as_str)
        .split(',')
        .map(|k| match k {
            "full" => Ok(StepKind::Full),
            "calibrated" => Ok(StepKind::Calibrated),
            "reuse" => Ok(StepKind::Reuse),
            _ => Err(usage()),
        })
        .collect::<Result<Vec<_>, _>>()?;

    let cfg = DitConfig::xl2_256();
    let model = Arc::new(DitModel::random(&cfg, 0)?);
    let factors = Arc::new(Factors::random(&model, 128, 1)?);
    let ranks = factors.ranks();
    let opts = CpuOptions { max_batch: 1, guidance: true, threads: 2, cache: CacheMode::Icc(factors), isa: None };
    let mut engine = CpuEngine::new(Arc::clone(&model), &opts)?;
    let rows = 2;
    let x: Vec<f32> = (0..rows * cfg.image_elems()).map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0).collect();
    // Cached kinds see a slightly different latent than the full steps wrote the caches
    // with, as in sampling (with the same one, x − x_s would be exactly zero).
    let x_next: Vec<f32> = x.iter().map(|v| v * 0.98 + 0.01).collect();
    let (t, y) = ([500i64, 500], [207i64, 1000]);
    let mut out = vec![0.0f32; rows * cfg.output_elems()];
    engine.forward_step(&x, &t, &y, &mut out, StepKind::Full)?;
    let ahead = engine.ahead_steps(rows);
    let ts = vec![500i64; ahead];
    println!(
        "DiT-XL/2, r128, {rows} rows, {} threads, {}, {steps} steps per kind per round, conditioning {ahead} steps ahead",
        engine.threads(),
        engine.gemm_kernel()
    );
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    let named = |n: &str| engine.plan().buffers().iter().filter(|b| b.name == n).map(|b| b.bytes()).sum::<usize>();
    println!(
        "arena {:.0} MiB, of which packed factors {:.0} MiB and modulation vectors {:.1} MiB",
        mib(engine.plan().total_bytes()),
        mib(named("icc_factors_packed")),
        mib(named("modulation"))
    );
    let full_macs = cost::step_macs(&cfg, StepKind::Full, &ranks) as f64;
    // CPU ms per step of each kind without the conditioning, per round; the conditioning
    // (computed every `ahead` steps, whatever kind comes next) is shared out evenly over all
    // steps, as in a sampling loop.
    let mut per_kind: Vec<Vec<f64>> = vec![Vec::new(); kinds.len()];
    let (mut conditioning, mut j) = (0.0, 0);
    for round in 0..rounds {
        for (k, &kind) in kinds.iter().enumerate() {
            let (mut cond, mut cond_wall, w0) = (0.0, 0.0, std::time::Instant::now());
            let c0 = cpu_seconds();
            for _ in 0..steps {
                if j % ahead == 0 {
                    let (c, w) = (cpu_seconds(), std::time::Instant::now());
                    engine.condition_ahead(&ts, &y)?;
                    cond += cpu_seconds() - c;
                    cond_wall += w.elapsed().as_secs_f64();
                }
                let input = if kind == StepKind::Full { &x } else { &x_next };
                engine.forward_step_ahead(input, j % ahead, &mut out, kind)?;
                j += 1;
            }
            let cpu = (cpu_seconds() - c0 - cond) * 1e3 / steps as f64;
            let wall = (w0.elapsed().as_secs_f64() - cond_wall) * 1e3 / steps as f64;
            conditioning += cond;
            let mac_ratio = cost::step_macs(&cfg, kind, &ranks) as f64 / full_macs;
            // A hash of the output's bits, to compare binaries (every step of a kind has the
            // same inputs, so the same output).
            let bits = out.iter().fold(0u64, |h, v| h.wrapping_mul(0x100_0000_01b3).wrapping_add(v.to_bits() as u64));
            println!(
                "round {round} {kind:?}: {cpu:.0} ms CPU, {wall:.0} ms wall per step without conditioning \
                 (MAC ratio {mac_ratio:.3}), output bits {bits:016x}"
            );
            per_kind[k].push(cpu);
        }
    }
    let cond = conditioning * 1e3 / j as f64;
    println!("conditioning ({ahead} steps at a time): {cond:.1} ms CPU per step, added to every kind below");
    let full = kinds.iter().position(|&k| k == StepKind::Full);
    for (k, &kind) in kinds.iter().enumerate() {
        let med = median(&mut per_kind[k].clone()) + cond;
        match full {
            Some(f) if f != k => {
                let mut ratios: Vec<f64> =
                    per_kind[k].iter().zip(&per_kind[f]).map(|(a, b)| (a + cond) / (b + cond)).collect();
                let shown: Vec<String> = ratios.iter().map(|v| format!("{v:.3}")).collect();
                println!(
                    "{kind:?}: median {med:.0} ms CPU; {kind:?}/Full per round {shown:?}, median {:.3}",
                    median(&mut ratios)
                );
            }
            _ => println!("{kind:?}: median {med:.0} ms CPU"),
        }
    }
    Ok(())
}
