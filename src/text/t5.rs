//! The T5 v1.1 encoder in f32 on the CPU (../shared/docs/pixart-reference.md, "Text"):
//! token embedding (no scaling) → per block `x += o(Attn(RMS(x)))`, `x += wo(gelu_tanh(wi_0·h)
//! ⊙ wi_1·h)` with `h = RMS(x)` → final RMS. RMS is `w · x / sqrt(mean(x²) + eps)` (no mean,
//! no bias); attention scores are `q·kᵀ` without 1/√d, plus block 0's relative-position bias
//! (every block reuses it), and padded keys get no weight.
//!
//! Products run on the CPU backend's GEMM and thread pool. Weights stay in the mapped files:
//! each matrix is viewed in place (aligned f32) or converted to f32 into one buffer the size
//! of the largest matrix just before its product, so an f16/bf16 model costs one matrix of
//! f32, not the whole model.

use crate::cpu::gemm::{self, BMat, Gemm, Gemmer};
use crate::cpu::math;
use crate::cpu::pool::{split, SendPtr, ThreadPool};
use crate::error::{Error, Result};

use super::weights::{T5Config, T5Weights, POSITION_BIAS};

/// The bucket of relative position `rel` = key − query, bidirectional, as T5 computes it:
/// half the buckets per sign (the upper half when the key is after the query), of which
/// distances below a quarter of all buckets are exact and the rest logarithmic up to
/// `max_distance`, then capped. The logarithm is taken in f32 in T5's order of operations
/// (`ln(n / exact) / ln(max / exact) · (half − exact)`, truncated), so the boundaries fall
/// where PyTorch puts them.
pub fn relative_bucket(rel: i64, num_buckets: usize, max_distance: usize) -> usize {
    let half = num_buckets / 2;
    let exact = half / 2;
    let offset = if rel > 0 { half } else { 0 };
    let n = rel.unsigned_abs() as usize;
    if n < exact {
        return offset + n;
    }
    let scale = ((max_distance as f64 / exact as f64).ln()) as f32;
    let large = exact + ((n as f32 / exact as f32).ln() / scale * (half - exact) as f32) as usize;
    offset + large.min(half - 1)
}

/// The encoder: config, mapped weights, and the CPU machinery it runs on.
pub struct T5Encoder {
    cfg: T5Config,
    weights: T5Weights,
    pool: ThreadPool,
    gemm: Gemmer,
}

impl std::fmt::Debug for T5Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("T5Encoder").field("cfg", &self.cfg).field("weights", &self.weights).finish()
    }
}

/// Per-encode buffers, sized from (rows, sequence length) once per call.
struct Buffers {
    /// The residual stream and its next value (swapped after each residual GEMM): (rows, D).
    x: Vec<f32>,
    x_next: Vec<f32>,
    /// RMS-normed input of the current sub-layer (rows, D).
    h: Vec<f32>,
    /// q, k, v and the heads' outputs (rows, heads·d_kv).
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    /// gelu(wi_0·h) and wi_1·h (rows, d_ff).
    gate: Vec<f32>,
    lin: Vec<f32>,
    /// Position bias per head, (heads, len, len).
    bias: Vec<f32>,
    /// Per thread: one head's scores (len, len).
    scores: Vec<f32>,
    work: Work,
}

/// One linear layer's operands: input a (rows, k), weight `weight` (n, k), an optional
/// residual (rows, n) added to the product, and whether GELU-tanh follows.
struct Lin<'a> {
    a: &'a [f32],
    k: usize,
    weight: &'a str,
    n: usize,
    add: Option<&'a [f32]>,
    gelu: bool,
}

/// What every product needs beside its operands.
struct Work {
    /// One matrix converted to f32 (empty while every matrix is viewed in place).
    matrix: Vec<f32>,
    gemm_scratch: Vec<f32>,
    packed_a: Vec<f32>,
}

impl T5Encoder {
    /// Wraps validated weights with a pool of `threads` (the caller included; 0: all cores).
    pub fn new(cfg: T5Config, weights: T5Weights, threads: usize, isa: Option<crate::isa::Isa>) -> Result<Self> {
        let threads = if threads > 0 { threads } else { std::thread::available_parallelism().map_or(1, |n| n.get()) };
        if threads > 1024 {
            return Err(Error::invalid("threads", format!("{threads} is more than 1024")));
        }
        let isa = crate::isa::Isa::resolve(isa)?;
        let pool = ThreadPool::new(threads)
            .map_err(|e| Error::invalid("threads", format!("cannot start {threads} threads: {e}")))?;
        Ok(T5Encoder { cfg, weights, pool, gemm: Gemmer::new(isa) })
    }

    pub fn config(&self) -> &T5Config {
        &self.cfg
    }
    pub fn weights(&self) -> &T5Weights {
        &self.weights
    }

    /// f32 bytes one encode of `rows` tokens, `len` per sequence, allocates: activations and output,
    /// the position bias, one converted matrix (for f16/bf16 weights) and GEMM scratch.
    pub fn working_bytes(&self, rows: usize, len: usize) -> u64 {
        let (d, i, f, heads) = (self.cfg.d_model, self.cfg.inner(), self.cfg.d_ff, self.cfg.num_heads);
        let threads = self.pool.threads();
        let matrix = if self.weights.view("encoder.block.0.layer.1.DenseReluDense.wi_0.weight").is_some() {
            0
        } else {
            (f * d).max(i * d)
        };
        let elems = 4 * rows * d
            + 4 * rows * i
            + 2 * rows * f
            + heads * len * len
            + matrix
            + threads * gemm::SCRATCH_PER_THREAD
            + gemm::packed_a_len(rows, d.max(i).max(f))
            + threads * len * len;
        4 * elems as u64
    }

    /// Encodes `batch` sequences of `len` token ids with their masks (1 on a prefix of each
    /// sequence, 0 after it, as the tokenizer makes them): (batch, len, D) embeddings. Padded
    /// query rows are computed like the others (the transformer sees them); padded keys get
    /// no attention weight.
    pub fn encode(&self, ids: &[i64], mask: &[i64], batch: usize, len: usize) -> Result<Vec<f32>> {
        let cfg = self.cfg;
        let rows = batch * len;
        if ids.len() != rows || mask.len() != rows || len == 0 {
            return Err(Error::invalid(
                "token ids",
                format!("{} ids and {} mask values for {batch} sequences of {len}", ids.len(), mask.len()),
            ));
        }
        let valid = valid_lengths(mask, batch, len)?;
        let mut need = crate::limits::MemoryNeed::default();
        need.held("T5 encoder weights, memory-mapped file(s)", self.weights.file_bytes());
        need.alloc(
            format!("T5 encoder work for {batch} × {len} tokens (activations, one f32 matrix, GEMM scratch)"),
            self.working_bytes(rows, len),
        );
        need.check("the T5 encoder", None)?;
        let mut b = self.buffers(rows, len);
        self.embed(ids, &mut b.x)?;
        self.position_bias(len, &mut b.bias)?;
        let (d, i, f) = (cfg.d_model, cfg.inner(), cfg.d_ff);
        for layer in 0..cfg.num_layers {
            // x += o(Attn(RMS(x)))
            let at = format!("encoder.block.{layer}.layer.0.");
            let w = |name: &str| format!("{at}SelfAttention.{name}.weight");
            self.rms_norm(&b.x, &format!("{at}layer_norm.weight"), &mut b.h, &mut b.work.matrix)?;
            self.linear(Lin { a: &b.h, k: d, weight: &w("q"), n: i, add: None, gelu: false }, &mut b.q, &mut b.work)?;
            self.linear(Lin { a: &b.h, k: d, weight: &w("k"), n: i, add: None, gelu: false }, &mut b.k, &mut b.work)?;
            self.linear(Lin { a: &b.h, k: d, weight: &w("v"), n: i, add: None, gelu: false }, &mut b.v, &mut b.work)?;
            self.attention(&mut b, batch, len, &valid);
            let o = Lin { a: &b.attn, k: i, weight: &w("o"), n: d, add: Some(&b.x), gelu: false };
            self.linear(o, &mut b.x_next, &mut b.work)?;
            std::mem::swap(&mut b.x, &mut b.x_next);

            // x += wo(gelu_tanh(wi_0·h) ⊙ wi_1·h), h = RMS(x)
            let ff = format!("encoder.block.{layer}.layer.1.");
            let w = |name: &str| format!("{ff}DenseReluDense.{name}.weight");
            self.rms_norm(&b.x, &format!("{ff}layer_norm.weight"), &mut b.h, &mut b.work.matrix)?;
            let wi0 = Lin { a: &b.h, k: d, weight: &w("wi_0"), n: f, add: None, gelu: true };
            self.linear(wi0, &mut b.gate, &mut b.work)?;
            let wi1 = Lin { a: &b.h, k: d, weight: &w("wi_1"), n: f, add: None, gelu: false };
            self.linear(wi1, &mut b.lin, &mut b.work)?;
            let (g, l) = (SendPtr(b.gate.as_mut_ptr()), &b.lin);
            self.pool.par(rows, |range| {
                // SAFETY: each thread scales its own rows of `gate`.
                let gate = unsafe { std::slice::from_raw_parts_mut(g.get().add(range.start * f), range.len() * f) };
                for (gv, lv) in gate.iter_mut().zip(&l[range.start * f..range.end * f]) {
                    *gv *= lv;
                }
            });
            let wo = Lin { a: &b.gate, k: f, weight: &w("wo"), n: d, add: Some(&b.x), gelu: false };
            self.linear(wo, &mut b.x_next, &mut b.work)?;
            std::mem::swap(&mut b.x, &mut b.x_next);
        }
        let mut out = vec![0.0f32; rows * cfg.d_model];
        self.rms_norm(&b.x, "encoder.final_layer_norm.weight", &mut out, &mut b.work.matrix)?;
        Ok(out)
    }

    fn buffers(&self, rows: usize, len: usize) -> Buffers {
        let (d, i, f, heads) = (self.cfg.d_model, self.cfg.inner(), self.cfg.d_ff, self.cfg.num_heads);
        let threads = self.pool.threads();
        let z = |n: usize| vec![0.0f32; n];
        Buffers {
            x: z(rows * d),
            x_next: z(rows * d),
            h: z(rows * d),
            q: z(rows * i),
            k: z(rows * i),
            v: z(rows * i),
            attn: z(rows * i),
            gate: z(rows * f),
            lin: z(rows * f),
            bias: z(heads * len * len),
            scores: z(threads * len * len),
            work: Work {
                matrix: Vec::new(),
                gemm_scratch: z(threads * gemm::SCRATCH_PER_THREAD),
                packed_a: z(gemm::packed_a_len(rows, d.max(i).max(f))),
            },
        }
    }

    /// Row `ids[r]` of the embedding table into row r of `x`.
    fn embed(&self, ids: &[i64], x: &mut [f32]) -> Result<()> {
        let d = self.cfg.d_model;
        let name = self.weights.embedding_name().to_string();
        for (r, &id) in ids.iter().enumerate() {
            if id < 0 || id as usize >= self.cfg.vocab_size {
                return Err(Error::Config {
                    origin: name,
                    reason: format!(
                        "token id {id} is outside the embedding's {} rows (does the tokenizer belong to this encoder?)",
                        self.cfg.vocab_size
                    ),
                });
            }
            let id = id as usize;
            self.weights.read_range(&name, id * d..(id + 1) * d, &mut x[r * d..(r + 1) * d])?;
        }
        Ok(())
    }

    /// bias[h, i, j] = table[bucket(j − i), h] for query i and key j.
    fn position_bias(&self, len: usize, bias: &mut [f32]) -> Result<()> {
        let (nb, heads) = (self.cfg.num_buckets, self.cfg.num_heads);
        let mut table = vec![0.0f32; nb * heads];
        self.weights.read_range(POSITION_BIAS, 0..nb * heads, &mut table)?;
        for i in 0..len {
            for j in 0..len {
                let bucket = relative_bucket(j as i64 - i as i64, nb, self.cfg.max_distance);
                for h in 0..heads {
                    bias[(h * len + i) * len + j] = table[bucket * heads + h];
                }
            }
        }
        Ok(())
    }

    /// out[r] = w ⊙ x[r] / sqrt(mean(x[r]²) + eps), T5's RMS norm.
    fn rms_norm(&self, x: &[f32], weight: &str, out: &mut [f32], tmp: &mut Vec<f32>) -> Result<()> {
        let d = self.cfg.d_model;
        let w = self.matrix(weight, tmp)?;
        let eps = self.cfg.eps;
        let o = SendPtr(out.as_mut_ptr());
        self.pool.par(x.len() / d, |range| {
            for r in range {
                let row = &x[r * d..(r + 1) * d];
                // SAFETY: each thread writes its own rows of `out`.
                let dst = unsafe { std::slice::from_raw_parts_mut(o.get().add(r * d), d) };
                let mean = sum_squares(row) / d as f32;
                let inv = 1.0 / (mean + eps).sqrt();
                for ((o, &v), &wv) in dst.iter_mut().zip(row).zip(w) {
                    *o = wv * (v * inv);
                }
            }
        });
        Ok(())
    }

    /// out (rows, n) = a (rows, k) · Wᵀ (+ add) (then GELU-tanh), W the (n, k) weight viewed
    /// in place or converted into `work.matrix`.
    fn linear(&self, l: Lin, out: &mut [f32], work: &mut Work) -> Result<()> {
        let w = self.matrix(l.weight, &mut work.matrix)?;
        let Lin { a, k, n, add, gelu, .. } = l;
        let rows = a.len() / k;
        let g = Gemm {
            m: rows,
            n,
            k,
            a,
            a_minus: None,
            lda: k,
            conv: None,
            b: BMat::weight(w, k),
            bias: None,
            add: add.map(|x| (x, n)),
            act: if gelu { gemm::Act::GeluTanh } else { gemm::Act::None },
            c: SendPtr(out.as_mut_ptr()),
            ldc: n,
        };
        self.gemm.run(&self.pool, &mut work.gemm_scratch, &mut work.packed_a, &g);
        Ok(())
    }

    /// The weight as f32: in place when the file stores aligned f32, else converted into
    /// `buf` (grown to the largest matrix once), split across the pool.
    fn matrix<'a>(&'a self, name: &str, buf: &'a mut Vec<f32>) -> Result<&'a [f32]> {
        if let Some(w) = self.weights.view(name) {
            return Ok(w);
        }
        let len = self.weights.elems(name)?;
        if buf.len() < len {
            buf.resize(len, 0.0);
        }
        let out = &mut buf[..len];
        if len < 1 << 16 {
            self.weights.read_range(name, 0..len, out)?;
        } else {
            let dst = SendPtr(out.as_mut_ptr());
            self.pool.par(len, |range| {
                // SAFETY: each thread converts its own range of `out`.
                let part = unsafe { std::slice::from_raw_parts_mut(dst.get().add(range.start), range.len()) };
                // The name is known and the range inside the tensor: this cannot fail.
                let _ = self.weights.read_range(name, range, part);
            });
        }
        Ok(&buf[..len])
    }

    /// Self-attention of every (sequence, head): softmax(q·kᵀ + bias) over the sequence's
    /// `valid` keys, times v, into the head's columns of `b.attn`.
    fn attention(&self, b: &mut Buffers, batch: usize, len: usize, valid: &[usize]) {
        let (heads, dk, inner) = (self.cfg.num_heads, self.cfg.d_kv, self.cfg.inner());
        let (isa, gemmer, threads) = (self.gemm.isa(), self.gemm, self.pool.threads());
        let (q, k, v, bias) = (&b.q, &b.k, &b.v, &b.bias);
        let (out, scores, scratch) =
            (SendPtr(b.attn.as_mut_ptr()), SendPtr(b.scores.as_mut_ptr()), SendPtr(b.work.gemm_scratch.as_mut_ptr()));
        let job = |tid: usize| {
            // SAFETY: each thread uses its own score and GEMM scratch slices.
            let s_all = unsafe { std::slice::from_raw_parts_mut(scores.get().add(tid * len * len), len * len) };
            let scratch = unsafe {
                std::slice::from_raw_parts_mut(
                    scratch.get().add(tid * gemm::SCRATCH_PER_THREAD),
                    gemm::SCRATCH_PER_THREAD,
                )
            };
            for job in split(batch * heads, threads, tid, 1) {
                let (seq, h) = (job / heads, job % heads);
                let nv = valid[seq];
                let base = seq * len * inner + h * dk;
                let s = &mut s_all[..len * nv];
                // S = q·kᵀ over the valid keys (no 1/√d in T5).
                gemmer.run_single(
                    scratch,
                    &Gemm {
                        m: len,
                        n: nv,
                        k: dk,
                        a: &q[base..],
                        a_minus: None,
                        lda: inner,
                        conv: None,
                        b: BMat { data: &k[base..], rs: inner, cs: 1 },
                        bias: None,
                        add: Some((&bias[h * len * len..], len)),
                        act: gemm::Act::None,
                        c: SendPtr(s.as_mut_ptr()),
                        ldc: nv,
                    },
                );
                for row in s.chunks_exact_mut(nv) {
                    math::softmax_scaled(isa, row, 1.0);
                }
                // O = P·v: B is v read column-wise (element (d, token) at token·inner + d).
                gemmer.run_single(
                    scratch,
                    &Gemm {
                        m: len,
                        n: dk,
                        k: nv,
                        a: s,
                        a_minus: None,
                        lda: nv,
                        conv: None,
                        b: BMat { data: &v[base..], rs: 1, cs: inner },
                        bias: None,
                        add: None,
                        act: gemm::Act::None,
                        // SAFETY: sequence `seq`, head `h`: this job's own columns of attn.
                        c: SendPtr(unsafe { out.get().add(base) }),
                        ldc: inner,
                    },
                );
            }
        };
        self.pool.run(&job);
    }
}

/// Σ x² with 16 independent partial sums (vectorises; as accurate as PyTorch's reduction).
fn sum_squares(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let chunks = x.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
    for ch in chunks {
        for (a, v) in acc.iter_mut().zip(ch) {
            *a += v * v;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Each sequence's count of valid tokens: its mask must be ones then zeros, with at least
/// one one (the `</s>` token is always there).
fn valid_lengths(mask: &[i64], batch: usize, len: usize) -> Result<Vec<usize>> {
    (0..batch)
        .map(|s| {
            let m = &mask[s * len..(s + 1) * len];
            let n = m.iter().take_while(|&&v| v == 1).count();
            if n == 0 || m[n..].iter().any(|&v| v != 0) {
                return Err(Error::invalid(
                    "attention mask",
                    format!("sequence {s} is not ones then zeros with at least one one: {m:?}"),
                ));
            }
            Ok(n)
        })
        .collect()
}
