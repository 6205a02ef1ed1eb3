//! kernels/attention.cu (attention_f16) against an f64 reference of softmax(q·kᵀ/√D)·v on the
//! same f16 inputs, at one full tile, ragged token counts (77: the second query tile holds 13
//! queries, the second key tile 13 keys; 200: a last key tile of 8), DiT-XL/2 at 256 px
//! (B = 2, N = 256, 16 heads) and at 512 px (N = 1024: 16 key tiles; one head, and B = 2 with
//! 2 heads), plus bad launches that must be refused. Every shape runs with every key split
//! count the kernel is built for (1, 2, 4; at most the key tiles) through
//! `launch::attention_f16_splits`, and once through `launch::attention_f16` (the launcher's
//! choice): one round (N ≤ 64·splits: the whole K and V resident), several rounds (K and V
//! refilled), and a last round where some splits have no tile (320 tokens = 5 tiles at 2 and
//! 4 splits), each followed by the merge of the splits' partial results.
//!
//! Error bound of one output element (row i, column d), with w_j = exp(s_j − max s) the exact
//! weights, W = Σ_j w_j·|v_jd| / Σ_j w_j, A = Σ_j |v_jd| / Σ_j w_j, G = max_j Σ_d |q_d·k_jd|,
//! T = ⌈N/64⌉ key tiles:
//!   - P rounded to f16 for the P·V product: relative ≤ 2^-11 per weight (2^-25 absolute below
//!     the normal range): U16·W + F16_TINY·A. The largest term (≈ 1e-3·W in the worst case;
//!     the random roundings mostly cancel);
//!   - the weights before rounding: scores accumulated in f32 on tensor cores over 80 terms
//!     (2·(80 + 2)·U32·G, doubled for truncating tensor cores), scaled by the f32 constant
//!     1/√D·log2 e, less the running max, exp2f (2 ulp): relative η = 2·scale·G·(2·80 + 8)·U32
//!     + 4·U32 per weight, 2η·W after normalisation. The rescale factors exp(m_old − m_new)
//!     multiply O and l alike and cancel, but for their roundings;
//!   - f32 sums of P·V and of l over N keys, the per-tile rescaling, the merge of up to 4
//!     split partials (as 4 more rescalings) and 1/l: 3·(N + 2T + 12)·U32·W;
//!   - the output rounded once to f16: U16·|exact| + F16_TINY.
//! Measured: see the printed max |error| / bound (the output rounding and the P rounding
//! dominate) and relative L2 error (about 2e-4).
#![allow(clippy::needless_range_loop, clippy::type_complexity, clippy::doc_lazy_continuation)]

mod gpu_common;

use std::time::Instant;

use gpu_common::*;
use icdit::gpu::{f16, launch, DevSlice, Device};
use icdit::plan::{Dt, Plan};

struct Shape {
    /// Head dim: 72 (DiT-XL/2; padded to 80 in the kernel), 64 (DiT-S/B/L) or 128.
    d: usize,
    batch: usize,
    tokens: usize,
    heads: usize,
    /// q and k entries uniform in [-amp, amp] (v in [-1, 1]): scores q·k/√D have standard
    /// deviation amp²/3, so 2 gives a moderately peaked softmax, 4 a sharp one whose running
    /// max jumps by large amounts between key tiles.
    amp: f64,
}

const fn s(batch: usize, tokens: usize, heads: usize, amp: f64) -> Shape {
    Shape { d: 72, batch, tokens, heads, amp }
}

const fn sd(d: usize, batch: usize, tokens: usize, heads: usize, amp: f64) -> Shape {
    Shape { d, batch, tokens, heads, amp }
}

impl Shape {
    /// The head dim padded to the WMMA k step 16, as the kernel computes q·k.
    fn padded(&self) -> f64 {
        self.d.div_ceil(16) as f64 * 16.0
    }
}

const SHAPES: &[Shape] = &[
    s(1, 64, 2, 2.0),   // one query tile, one key tile
    s(2, 77, 2, 2.0),   // ragged in queries and keys
    s(2, 77, 2, 4.0),   // ragged, sharp softmax
    s(1, 320, 1, 4.0),  // 5 key tiles: a last round with idle splits, sharp softmax
    s(3, 200, 3, 2.0),  // ragged (last key tile of 8), B > 1, heads > 1
    s(2, 256, 16, 2.0), // DiT-XL/2 at 256 px (C = 1152)
    s(1, 1024, 1, 2.0), // one head of DiT-XL/2 at 512 px: 16 key tiles
    s(2, 1024, 2, 2.0), // 512 px with B > 1 and heads > 1
    // Head dim 64 (DiT-S/B/L) and 128: ragged in queries and keys, several rounds at every
    // split count (5 tiles: a last round with idle splits), a sharp softmax.
    sd(64, 2, 77, 2, 2.0),
    sd(64, 1, 320, 3, 4.0),
    sd(128, 2, 77, 2, 2.0),
    sd(128, 1, 200, 2, 4.0),
];

/// qkv (batch, tokens, 3C): q and k columns in [-amp, amp], v columns in [-1, 1].
fn data(sh: &Shape, rng: &mut Rng) -> Vec<f16> {
    let c = sh.heads * sh.d;
    (0..sh.batch * sh.tokens * 3 * c)
        .map(|i| {
            let amp = if i % (3 * c) < 2 * c { sh.amp } else { 1.0 };
            f16_rne(rng.uniform() * amp)
        })
        .collect()
}

/// Exact attention and the per-element error bound of the header, in f64.
fn reference(sh: &Shape, qkv: &[f16]) -> (Vec<f64>, Vec<f64>) {
    let (n, c, dd) = (sh.tokens, sh.heads * sh.d, sh.d);
    let x = f64s(qkv);
    let scale = 1.0 / (dd as f64).sqrt();
    let tiles = n.div_ceil(64) as f64;
    let mut exact = vec![0.0; sh.batch * n * c];
    let mut bound = vec![0.0; sh.batch * n * c];
    let (mut sc, mut mag, mut w) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
    for b in 0..sh.batch {
        let row = |t: usize| &x[(b * n + t) * 3 * c..(b * n + t + 1) * 3 * c];
        for h in 0..sh.heads {
            for i in 0..n {
                let q = &row(i)[h * dd..h * dd + dd];
                for j in 0..n {
                    let k = &row(j)[c + h * dd..c + h * dd + dd];
                    sc[j] = q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>() * scale;
                    mag[j] = q.iter().zip(k).map(|(a, b)| (a * b).abs()).sum::<f64>();
                }
                let max = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let g = mag.iter().cloned().fold(0.0, f64::max);
                for j in 0..n {
                    w[j] = (sc[j] - max).exp();
                }
                let l: f64 = w.iter().sum();
                let eta = 2.0 * scale * g * (2.0 * sh.padded() + 8.0) * U32 + 4.0 * U32;
                let acc = 3.0 * (n as f64 + 2.0 * tiles + 12.0) * U32;
                for d in 0..dd {
                    let (mut o, mut wv, mut av) = (0.0, 0.0, 0.0);
                    for j in 0..n {
                        let v = row(j)[2 * c + h * dd + d];
                        o += w[j] * v;
                        wv += w[j] * v.abs();
                        av += v.abs();
                    }
                    let (o, wv, av) = (o / l, wv / l, av / l);
                    let idx = (b * n + i) * c + h * dd + d;
                    exact[idx] = o;
                    bound[idx] =
                        U16 * o.abs() + F16_TINY + (1.0 + U16) * ((U16 + 2.0 * eta + acc) * wv + F16_TINY * av);
                }
            }
        }
    }
    (exact, bound)
}

fn check_shapes<D: Device>(open: impl Fn(&Plan) -> Option<D>) {
    for sh in SHAPES {
        let c = sh.heads * sh.d;
        let rows = sh.batch * sh.tokens;
        let mut plan = Plan::new("attention test");
        let qkv_buf = add(&mut plan, "qkv", rows * 3 * c, Dt::F16);
        let out_buf = add(&mut plan, "out", rows * c, Dt::F16);
        let Some(dev) = open(&plan) else { return };
        let tag = format!(
            "attention D={} B={} N={} heads={} amp={} ({})",
            sh.d,
            sh.batch,
            sh.tokens,
            sh.heads,
            sh.amp,
            dev.name()
        );
        let mut rng = Rng::new((sh.batch * 1_000_003 + sh.tokens * 1009 + sh.heads) as u64 ^ sh.amp.to_bits());
        let qkv_data = data(sh, &mut rng);

        let (exact, bound) = reference(sh, &qkv_data);
        let (b, n, h, d) = (sh.batch as i32, sh.tokens as i32, sh.heads as i32, sh.d as i32);
        let tiles = sh.tokens.div_ceil(64) as i32;
        let chosen = launch::attention_splits(b, n, h, d);
        let max = launch::attention_max_splits(d);
        // None: the launcher's own choice; Some(s): s key splits.
        let runs = std::iter::once(None)
            .chain(launch::ATTENTION_SPLITS.iter().filter(|&&s| s <= tiles && s <= max).map(|&s| Some(s)));
        for splits in runs {
            let tag = match splits {
                None => format!("{tag} launcher's splits {chosen}"),
                Some(s) => format!("{tag} splits {s}"),
            };
            let start = Instant::now();
            let qkv = put(&dev, &plan, qkv_buf, &qkv_data);
            // Fresh NaN-filled output each run: a row the kernel misses shows as NaN.
            let out: DevSlice<f16> = out(&dev, &plan, out_buf);
            match splits {
                None => launch::attention_f16(&dev, out, qkv, b, n, h, d),
                Some(s) => launch::attention_f16_splits(&dev, out, qkv, b, n, h, d, s),
            }
            .unwrap_or_else(|e| panic!("{tag}: {e}"));
            dev.synchronize().unwrap();
            let got: Vec<f32> = get::<f16, _>(&dev, &plan, out_buf).iter().map(|h| h.to_f32()).collect();
            let secs = start.elapsed().as_secs_f64();
            let max_abs = got.iter().zip(&exact).map(|(&g, &e)| (g as f64 - e).abs()).fold(0.0, f64::max);
            println!("{tag}: kernel {secs:.2} s with copies, max |error| {max_abs:.2e}");
            assert_within(&tag, &got, &exact, |i| bound[i]);
        }
    }
}

#[test]
fn attention_emulated() {
    check_shapes(emu);
}

#[cfg(feature = "cuda")]
#[test]
fn attention_cuda() {
    check_shapes(cuda("attention_cuda"));
}

/// Launches the launcher must refuse, before anything runs: a head dim the kernel is not built
/// for, buffers too short or misaligned for the shape, an empty shape.
fn check_bad_launches<D: Device>(open: impl Fn(&Plan) -> Option<D>) {
    let (batch, tokens, heads) = (1usize, 70usize, 2usize);
    let c = heads * 72;
    let mut plan = Plan::new("attention bad launches");
    // Room for one head of 128 over 256 tokens too (the split cap of head dim 128, below).
    let qkv_buf = add(&mut plan, "qkv", 256 * 3 * 128 + 8, Dt::F16);
    let out_buf = add(&mut plan, "out", 256 * 128 + 8, Dt::F16);
    let Some(dev) = open(&plan) else { return };
    let qkv_all = put(&dev, &plan, qkv_buf, &vec![f16::ZERO; qkv_buf.len]);
    let out_all: DevSlice<f16> = out(&dev, &plan, out_buf);
    let qkv = qkv_all.sub(0, batch * tokens * 3 * c).unwrap();
    let out = out_all.sub(0, batch * tokens * c).unwrap();
    let (b, n, h) = (batch as i32, tokens as i32, heads as i32);
    let cases: [(&str, DevSlice<f16>, DevSlice<f16>, i32, i32, i32, i32, &str); 7] = [
        // 144 channels as 2 heads of 72 are also 4 heads of 36 or 3 of 48: the same buffers,
        // refused.
        ("head_dim 36", out, qkv, b, n, 2 * h, 36, "head_dim 36 is not supported"),
        ("head_dim 48", out, qkv, b, n, 3, 48, "head_dim 48 is not supported"),
        ("short out", out_all.sub(0, batch * tokens * c - 1).unwrap(), qkv, b, n, h, 72, "out has"),
        ("short qkv", out, qkv_all.sub(0, batch * tokens * 3 * c - 1).unwrap(), b, n, h, 72, "qkv has"),
        ("misaligned qkv", out, qkv_all.sub(1, batch * tokens * 3 * c).unwrap(), b, n, h, 72, "aligned"),
        ("more tokens than the buffers hold", out, qkv, b, n + 1, h, 72, "needs"),
        ("no tokens", out, qkv, b, 0, h, 72, "tokens = 0"),
    ];
    for (what, o, q, b, n, h, d, expect) in cases {
        let err = launch::attention_f16(&dev, o, q, b, n, h, d)
            .err()
            .unwrap_or_else(|| panic!("{what}: launch accepted ({})", dev.name()));
        let msg = err.to_string();
        assert!(msg.contains(expect), "{what}: error {msg:?} does not mention {expect:?}");
        println!("{what}: refused: {msg}");
    }
    // Split counts the kernel is not built for, or more splits than key tiles (70 tokens: 2).
    for (splits, expect) in [(0, "splits 0"), (3, "splits 3"), (8, "splits 8"), (4, "splits 4")] {
        let err = launch::attention_f16_splits(&dev, out, qkv, b, n, h, 72, splits)
            .err()
            .unwrap_or_else(|| panic!("splits {splits}: launch accepted ({})", dev.name()));
        let msg = err.to_string();
        assert!(msg.contains(expect), "splits {splits}: error {msg:?} does not mention {expect:?}");
        println!("splits {splits}: refused: {msg}");
    }
    // Head dim 128 is built for 1 or 2 splits: 4 are refused even where the keys have 4 tiles.
    let (q128, o128) = (qkv_all.sub(0, 256 * 3 * 128).unwrap(), out_all.sub(0, 256 * 128).unwrap());
    let err = launch::attention_f16_splits(&dev, o128, q128, 1, 256, 1, 128, 4).err().expect("4 splits at 128");
    assert!(err.to_string().contains("≤ 2 (head dim 128)"), "{err}");
    launch::attention_f16_splits(&dev, o128, q128, 1, 256, 1, 128, 2).unwrap();
    // The device is still usable: the well-formed launch on the same buffers runs.
    launch::attention_f16(&dev, out, qkv, b, n, h, 72).unwrap();
    let got = get::<f16, _>(&dev, &plan, out_buf);
    assert!(got[..batch * tokens * c].iter().all(|v| *v == f16::ZERO), "zero inputs give zero outputs");
}

#[test]
fn attention_refuses_bad_launches_emulated() {
    check_bad_launches(emu);
}

#[cfg(feature = "cuda")]
#[test]
fn attention_refuses_bad_launches_cuda() {
    check_bad_launches(cuda("attention_refuses_bad_launches_cuda"));
}
