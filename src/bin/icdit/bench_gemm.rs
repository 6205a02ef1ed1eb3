//! `icdit bench-gemm`: the fused GEMM on every DiT-XL/2 linear-layer shape (the block's four
//! linears, icc's down and up projections) at the row counts of batches 1, 4 and 16 with
//! guidance, under each launch the kernel offers (64×64 tiles, 128×128 tiles, 64×64 split
//! along k 2–16 ways) and under the launcher's own choice; then attention (16 heads of 72) at
//! the same batches and at 512 px, under each key split; all timed by device events over
//! repeated launches. For choosing and checking the launch rule on a GPU (scripts/gpu-check.sh runs it);
//! `--backend emu` checks the command on the CPU emulation (use small `--rows`).

use clap::Args;
use icdit::backend::Backend;
use icdit::gpu::launch::{self, GemmAct, GemmLaunch, GemmOut, GemmSpec, GemmTile};
use icdit::gpu::{f16, DevSlice, Device, EmuDevice};
use icdit::plan::{Dt, Plan};
use icdit::Error;

#[derive(Args, Debug)]
pub struct BenchGemmArgs {
    /// `cuda` (default) or `emu`.
    #[arg(long, default_value = "cuda")]
    backend: String,
    /// Rows (tokens × images, guidance included), comma-separated: 512, 2048, 8192 are
    /// DiT-XL/2 at batches 1, 4, 16 with guidance.
    #[arg(long, value_delimiter = ',', default_value = "512,2048,8192")]
    rows: Vec<usize>,
    /// Launches per timing (the median of 3 timings is reported).
    #[arg(long, default_value_t = 20)]
    iters: usize,
}

/// One linear layer's shape: output width n, input width k, and its fused operands.
struct Shape {
    name: &'static str,
    n: usize,
    k: usize,
    minus: bool,
    add: bool,
    gelu: bool,
}

const C: usize = 1152;
const MLP: usize = 4 * C;
const RANK: usize = 128;

const SHAPES: &[Shape] = &[
    Shape { name: "qkv", n: 3 * C, k: C, minus: false, add: false, gelu: false },
    Shape { name: "proj", n: C, k: C, minus: false, add: false, gelu: false },
    Shape { name: "fc1+gelu", n: MLP, k: C, minus: false, add: false, gelu: true },
    Shape { name: "fc2", n: C, k: MLP, minus: false, add: false, gelu: false },
    Shape { name: "icc down qkv", n: 3 * RANK, k: C, minus: true, add: false, gelu: false },
    Shape { name: "icc down proj", n: RANK, k: C, minus: true, add: false, gelu: false },
    Shape { name: "icc down fc2", n: RANK, k: MLP, minus: true, add: false, gelu: false },
    Shape { name: "icc up q", n: C, k: RANK, minus: false, add: true, gelu: false },
    Shape { name: "icc up fc1+gelu", n: MLP, k: RANK, minus: false, add: true, gelu: true },
];

/// Split workspaces beyond this many f32 are not measured.
const MAX_WS: usize = 64 << 20;

pub fn run(args: BenchGemmArgs) -> Result<(), Error> {
    let backend: Backend = args.backend.parse()?;
    if args.rows.is_empty() || args.rows.contains(&0) || args.iters == 0 {
        return Err(Error::invalid("--rows/--iters", "give one or more row counts ≥ 1 and --iters ≥ 1"));
    }
    let max_rows = *args.rows.iter().max().unwrap_or(&1);
    let mut plan = Plan::new("bench-gemm");
    let big = max_rows * MLP;
    let ids = [
        plan.add("a", &[big], Dt::F16),
        plan.add("a_minus", &[big], Dt::F16),
        plan.add("w", &[MLP * C], Dt::F16),
        plan.add("bias", &[MLP], Dt::F16),
        plan.add("add", &[big], Dt::F16),
        plan.add("out", &[big], Dt::F16),
        plan.add("pre", &[big], Dt::F16),
        plan.add("workspace", &[MAX_WS], Dt::F32),
    ];
    match backend {
        Backend::Emu => bench(&EmuDevice::new(&plan)?, &plan, ids, &args),
        Backend::Cuda => cuda(&plan, ids, &args),
        Backend::Cpu => Err(Error::invalid("--backend", "bench-gemm runs cuda or emu")),
    }
}

#[cfg(feature = "cuda")]
fn cuda(plan: &Plan, ids: [icdit::plan::BufId; 8], args: &BenchGemmArgs) -> Result<(), Error> {
    let dev = icdit::gpu::CudaDevice::open(plan)?
        .ok_or_else(|| Error::gpu("bench-gemm", "no CUDA GPU found (the driver reports no device)"))?;
    bench(&dev, plan, ids, args)
}

#[cfg(not(feature = "cuda"))]
fn cuda(_: &Plan, _: [icdit::plan::BufId; 8], _: &BenchGemmArgs) -> Result<(), Error> {
    Err(Error::gpu(
        "bench-gemm",
        "this icdit was built without CUDA support: rebuild with `--features cuda`, or pass --backend emu",
    ))
}

fn bench<D: Device>(dev: &D, plan: &Plan, ids: [icdit::plan::BufId; 8], args: &BenchGemmArgs) -> Result<(), Error> {
    let [a_id, am_id, w_id, b_id, add_id, out_id, pre_id, ws_id] = ids;
    // Random-looking f16 data (never zeros: they can run faster than real data).
    let fill = |id| -> Result<DevSlice<f16>, Error> {
        let s: DevSlice<f16> = dev.slice(plan.get(id))?;
        let v: Vec<f16> = (0..s.len())
            .map(|i| f16::from_f32(((i.wrapping_mul(2654435761) >> 7) % 2001) as f32 / 1000.0 - 1.0))
            .collect();
        dev.upload(s, &v)?;
        Ok(s)
    };
    let (x, xm, w, bias, add) = (fill(a_id)?, fill(am_id)?, fill(w_id)?, fill(b_id)?, fill(add_id)?);
    let out: DevSlice<f16> = dev.slice(plan.get(out_id))?;
    let pre: DevSlice<f16> = dev.slice(plan.get(pre_id))?;
    let ws: DevSlice<f32> = dev.slice(plan.get(ws_id))?;
    // The Hopper kernel's first-use check, as the pipeline makes it (it turns the kernel off on
    // disagreement, and says so).
    let hopper = launch::check_sm90(dev, ws)?;
    println!("bench-gemm on {}: median of 3 timings of {} launches each", dev.name(), args.iters);
    println!(
        "Hopper GEMM (wgmma + TMA): {}",
        if hopper {
            "on, first-use check passed"
        } else {
            "off (not an sm_90 device with sm_90a kernels, ICDIT_GEMM=wmma, or its check failed)"
        }
    );
    println!("| shape | m | n | k | launch | µs | TFLOP/s | auto picks |");
    println!("|---|---|---|---|---|---|---|---|");
    for &m in &args.rows {
        for s in SHAPES {
            let mut g = GemmSpec::new(GemmOut::F16(out), x, w, m as i32, s.n as i32, s.k as i32);
            g.bias = Some(bias);
            if s.minus {
                g.a_minus = Some(xm);
                g.bias = None;
            }
            if s.add {
                g.add = Some((add, s.n as i32, m as i32));
            }
            if s.gelu {
                g.act = GemmAct::GeluTanh;
                g.pre = Some(pre);
            }
            let (auto_tile, auto_splits) = launch::gemm_choice_on(dev, &g, ws.len());
            let auto = format!("{} ×{auto_splits}", auto_tile.name());
            let mut variants = vec![("auto".to_string(), None)];
            for tile in GemmTile::ALL {
                if tile == GemmTile::Sm90 && (!hopper || launch::sm90_unsupported(&g).is_some()) {
                    continue;
                }
                variants.push((tile.name().to_string(), Some(GemmLaunch { tile, splits: 1 })));
            }
            for tile in [GemmTile::Small, GemmTile::Small32] {
                for splits in [2, 4, 8, 16] {
                    if splits * m * s.n <= ws.len() && s.k / splits >= 64 {
                        variants.push((format!("{} split {splits}", tile.name()), Some(GemmLaunch { tile, splits })));
                    }
                }
            }
            for (name, how) in variants {
                let us = time_us(dev, args.iters, || match how {
                    None => launch::gemm_ws(dev, &g, Some(ws)),
                    Some(h) => launch::gemm_as(dev, &g, Some(ws), h),
                })?;
                let tflops = 2.0 * (m * s.n * s.k) as f64 / (us * 1e-6) / 1e12;
                println!("| {} | {m} | {} | {} | {name} | {us:.2} | {tflops:.1} | {auto} |", s.name, s.n, s.k);
            }
        }
    }

    // Attention: (batch · 2 with guidance) sequences of `tokens`, 16 heads of 72 (DiT-XL/2)
    // at every key split count, and the other head dims' kernels at the launcher's choice:
    // 16 heads of 64 (DiT-L/2) and 8 heads of 128 (the qkv rows fit the buffers: 3C ≤ 4608).
    println!("| attention | head dim | heads | sequences | tokens | key splits | µs | TFLOP/s | auto picks |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let max_rows = args.rows.iter().copied().max().unwrap_or(1);
    for (head_dim, heads, every_split) in [(72i32, 16i32, true), (64, 16, false), (128, 8, false)] {
        for &(seqs, tokens) in &[(2usize, 256usize), (8, 256), (32, 256), (2, 1024)] {
            if seqs * tokens > max_rows {
                continue;
            }
            let auto = launch::attention_splits(seqs as i32, tokens as i32, heads, head_dim);
            let tiles = tokens.div_ceil(64) as i32;
            let max = if every_split { launch::attention_max_splits(head_dim) } else { 0 };
            for splits in [0, 1, 2, 4] {
                if splits > tiles || splits > max {
                    continue;
                }
                let us = time_us(dev, args.iters, || {
                    let (b, n) = (seqs as i32, tokens as i32);
                    if splits == 0 {
                        launch::attention_f16(dev, out, x, b, n, heads, head_dim)
                    } else {
                        launch::attention_f16_splits(dev, out, x, b, n, heads, head_dim, splits)
                    }
                })?;
                let flops = 4.0 * (seqs * heads as usize * tokens * tokens * head_dim as usize) as f64;
                let name = if splits == 0 { "auto".to_string() } else { splits.to_string() };
                println!(
                    "| attention | {head_dim} | {heads} | {seqs} | {tokens} | {name} | {us:.2} | {:.1} | {auto} |",
                    flops / (us * 1e-6) / 1e12
                );
            }
        }
    }
    Ok(())
}

/// Median over 3 timings of `iters` calls of `f` (after one warm-up call), in µs per call.
fn time_us<D: Device>(dev: &D, iters: usize, mut f: impl FnMut() -> icdit::Result<()>) -> Result<f64, Error> {
    f()?;
    let mut times = Vec::new();
    for _ in 0..3 {
        let start = dev.record_event()?;
        for _ in 0..iters {
            f()?;
        }
        let end = dev.record_event()?;
        times.push(dev.elapsed_ms(&start, &end)? as f64 * 1e3 / iters as f64);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[1])
}
