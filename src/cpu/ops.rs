//! The CPU implementation of the DiT operations ([`DitOps`]): each op reads and writes
//! arena buffers through raw pointers, splitting rows or tokens across the thread pool.
//! Every op writes only buffers distinct from the ones it reads (the forward pass never
//! aliases them), and each thread writes a disjoint range.

use std::sync::Arc;

use super::gemm::{self, BMat, Gemm};
use super::pool::{split, SendPtr};
use super::{math, CacheMode, CpuEngine};
use crate::config::FREQ_DIM;
use crate::embed;
use crate::factors::LayerType;
use crate::forward::{self, Act, Activation, Branch, ConditioningOps, DitOps, Linear, ModChunk, Norm};

/// f32 elements of attention scratch one thread needs: the N×N scores, packed vᵀ and Oᵀ.
pub(super) fn attention_scratch(n: usize, d: usize) -> usize {
    n * n + gemm::packed_a_len(d, n) + d * n
}

fn gemm_act(a: Activation) -> gemm::Act {
    match a {
        Activation::None => gemm::Act::None,
        Activation::GeluTanh => gemm::Act::GeluTanh,
    }
}

impl CpuEngine {
    /// (weight, bias, out features, in features) of a linear layer.
    fn layer_weights(&self, layer: Linear) -> (&[f32], &[f32], usize, usize) {
        let cfg = &self.model.config;
        let (c, mh) = (cfg.hidden_size, cfg.mlp_hidden());
        let fin = cfg.patch_size * cfg.patch_size * cfg.out_channels();
        let t = &self.model.tensors;
        let (w, b, out, k) = match layer {
            Linear::Qkv(i) => (t.blocks[i].qkv_w, t.blocks[i].qkv_b, 3 * c, c),
            Linear::Proj(i) => (t.blocks[i].proj_w, t.blocks[i].proj_b, c, c),
            Linear::Fc1(i) => (t.blocks[i].fc1_w, t.blocks[i].fc1_b, mh, c),
            Linear::Fc2(i) => (t.blocks[i].fc2_w, t.blocks[i].fc2_b, c, mh),
            Linear::Final => (t.final_w, t.final_b, fin, c),
        };
        (self.model.w(w), self.model.w(b), out, k)
    }

    /// dst = GELU_tanh(src), over (rows, N, M) MLP activations.
    pub(super) fn gelu(&mut self, src: Act, dst: Act, rows: usize) {
        let isa = self.gemm.isa();
        let (n, m) = (self.model.config.tokens(), self.model.config.mlp_hidden());
        // SAFETY: src is only read; dst is a distinct buffer, split by rows across threads.
        let s = unsafe { self.view(self.act_buf(src), rows * n * m) };
        let (d, _) = self.ptr(self.act_buf(dst));
        self.par(rows * n, |range| {
            let out = unsafe { std::slice::from_raw_parts_mut(d.get().add(range.start * m), range.len() * m) };
            math::gelu_into(isa, &s[range.start * m..range.end * m], out);
        });
    }
}

impl ConditioningOps for CpuEngine {
    fn embed_conditioning(&mut self, rows: usize) {
        let isa = self.gemm.isa();
        let c = self.model.config.hidden_size;
        let freqs = self.freqs;
        for r in 0..rows {
            let t = self.t[r];
            embed::timestep_embedding(t, &freqs, &mut self.slice_mut(self.bufs.tfreq)[r * FREQ_DIM..][..FREQ_DIM]);
        }
        let model = Arc::clone(&self.model);
        let tw = &model.tensors;
        self.linear_weights(
            self.bufs.tfreq,
            model.w(tw.t_mlp0_w),
            model.w(tw.t_mlp0_b),
            self.bufs.temb,
            rows,
            c,
            FREQ_DIM,
            gemm::Act::None,
        );
        for v in &mut self.slice_mut(self.bufs.temb)[..rows * c] {
            *v = math::silu(*v);
        }
        self.linear_weights(
            self.bufs.temb,
            model.w(tw.t_mlp2_w),
            model.w(tw.t_mlp2_b),
            self.bufs.c,
            rows,
            c,
            c,
            gemm::Act::None,
        );
        let table = model.w(tw.label_table);
        for r in 0..rows {
            let y = self.y[r];
            let cr = &mut self.slice_mut(self.bufs.c)[r * c..][..c];
            math::add(isa, cr, &table[y * c..][..c]);
        }
        let (cb, sc) = (self.bufs.c, self.bufs.silu_c);
        for k in 0..rows * c {
            let v = self.slice(cb)[k];
            self.slice_mut(sc)[k] = math::silu(v);
        }
    }

    fn modulations(&mut self, rows: usize) {
        let (model, cfg) = (Arc::clone(&self.model), self.model.config);
        let (c, width) = (cfg.hidden_size, forward::modulation_width(&cfg));
        let t = &model.tensors;
        let (mp, _) = self.ptr(self.bufs.modv);
        // SAFETY: silu_c is only read, the modulation buffer only written.
        let a = unsafe { self.view(self.bufs.silu_c, rows * c) };
        // One GEMM per vector, each into its columns of the rows.
        let vectors = t.blocks.iter().map(|b| (b.ada_w, b.ada_b, 6 * c)).chain([(t.final_ada_w, t.final_ada_b, 2 * c)]);
        let mut column = 0;
        for (w, b, n) in vectors {
            self.gemm(&Gemm {
                m: rows,
                n,
                k: c,
                a,
                a_minus: None,
                lda: c,
                conv: None,
                b: BMat::weight(model.w(w), c),
                bias: Some(model.w(b)),
                add: None,
                act: gemm::Act::None,
                // SAFETY: column + n ≤ width: the GEMM writes only its own columns.
                c: SendPtr(unsafe { mp.get().add(column) }),
                ldc: width,
            });
            column += n;
        }
    }
}

impl DitOps for CpuEngine {
    fn embed_patches(&mut self, rows: usize) {
        let isa = self.gemm.isa();
        let cfg = &self.model.config;
        let (p, g, cin, isz) = (cfg.patch_size, cfg.grid(), cfg.in_channels, cfg.input_size);
        let (n, pd, c) = (cfg.tokens(), cfg.patch_dim(), cfg.hidden_size);
        let (inp, _) = self.ptr(self.bufs.input);
        let (pat, _) = self.ptr(self.bufs.patches);
        // Patch vector order is (channel, kh, kw), channel slowest (reference doc A.1).
        self.par(rows * n, |range| {
            for tok in range {
                let (r, t) = (tok / n, tok % n);
                let (gi, gj) = (t / g, t % g);
                for ch in 0..cin {
                    for a in 0..p {
                        for b in 0..p {
                            // SAFETY: indices are within the planned input/patch buffers,
                            // and each token writes only its own patch row.
                            unsafe {
                                let src = ((r * cin + ch) * isz + gi * p + a) * isz + gj * p + b;
                                *pat.get().add(tok * pd + (ch * p + a) * p + b) = *inp.get().add(src);
                            }
                        }
                    }
                }
            }
        });
        let t = &self.model.tensors;
        let (pw, pb) = (self.model.w(t.patch_w), self.model.w(t.patch_b));
        self.linear_weights(self.bufs.patches, pw, pb, self.bufs.x, rows * n, c, pd, gemm::Act::None);
        let pos = self.model.w(t.pos_embed);
        let (x, _) = self.ptr(self.bufs.x);
        self.par(rows * n, |range| {
            for tok in range {
                // SAFETY: each token updates its own row of x.
                let row = unsafe { std::slice::from_raw_parts_mut(x.get().add(tok * c), c) };
                math::add(isa, row, &pos[(tok % n) * c..][..c]);
            }
        });
    }

    fn norm_modulate(&mut self, dst: Act, norm: Norm, rows: usize) {
        let isa = self.gemm.isa();
        let cfg = &self.model.config;
        let (n, c, width) = (cfg.tokens(), cfg.hidden_size, forward::modulation_width(cfg));
        let (shift, scale) = (norm.shift.offset(cfg), norm.scale.offset(cfg));
        let eps = norm.eps;
        let (x, _) = self.ptr(self.bufs.x);
        let (h, _) = self.ptr(self.act_buf(dst));
        let m = self.modulations_ptr();
        self.par(rows * n, |range| {
            for tok in range {
                let r = tok / n;
                // SAFETY: x and modulation are only read; each token writes its own row of dst.
                let (xr, hr, sh, sc) = unsafe {
                    (
                        std::slice::from_raw_parts(x.get().add(tok * c), c),
                        std::slice::from_raw_parts_mut(h.get().add(tok * c), c),
                        std::slice::from_raw_parts(m.get().add(r * width + shift), c),
                        std::slice::from_raw_parts(m.get().add(r * width + scale), c),
                    )
                };
                math::layer_norm_modulate(isa, xr, sh, sc, eps, hr);
            }
        });
    }

    fn residual_norm_modulate(&mut self, src: Act, gate: ModChunk, dst: Act, norm: Norm, rows: usize) {
        self.gated_residual(src, gate, rows);
        self.norm_modulate(dst, norm, rows);
    }

    fn linear(&mut self, layer: Linear, src: Act, dst: Act, act: Activation, rows: usize) {
        let n = self.model.config.tokens();
        let (w, b, out, k) = self.layer_weights(layer);
        self.linear_weights(self.act_buf(src), w, b, self.act_buf(dst), rows * n, out, k, gemm_act(act));
    }

    fn linear_gelu_keep_pre(&mut self, layer: Linear, src: Act, pre: Act, post: Act, rows: usize) {
        self.linear(layer, src, pre, Activation::None, rows);
        self.gelu(pre, post, rows);
    }

    fn linear_calibrated(&mut self, layer: Linear, src: Act, dst: Act, act: Activation, rows: usize) {
        let CacheMode::Icc(factors) = &self.cache else {
            unreachable!("forward_step checks calibrated steps have factors")
        };
        let factors = Arc::clone(factors);
        let cfg = &self.model.config;
        let n = cfg.tokens();
        let (i, xs, ys) = layer.slots().expect("only block linears are calibrated");
        let (_, _, out, inp) = self.layer_weights(layer);
        let m = rows * n;
        let low = self.bufs.lowrank.expect("planned");
        let block = &factors.blocks[i];
        // The low-rank parts: (down of each output group, up, output column offset).
        let (down, rank_total, parts): (&[f32], usize, &[(LayerType, usize)]) = match layer {
            Linear::Qkv(_) => (
                factors.w(block.qkv_down),
                block.qkv_rank(),
                &[(LayerType::Q, 0), (LayerType::K, 1), (LayerType::V, 2)],
            ),
            Linear::Proj(_) => {
                (factors.w(block.get(LayerType::Proj).down), block.get(LayerType::Proj).rank, &[(LayerType::Proj, 0)])
            }
            Linear::Fc1(_) => {
                (factors.w(block.get(LayerType::Fc1).down), block.get(LayerType::Fc1).rank, &[(LayerType::Fc1, 0)])
            }
            Linear::Fc2(_) => {
                (factors.w(block.get(LayerType::Fc2).down), block.get(LayerType::Fc2).rank, &[(LayerType::Fc2, 0)])
            }
            Linear::Final => unreachable!(),
        };
        // One pass over the pool: each thread takes its own MR-aligned rows and computes
        // T = (x − x_s)·downᵀ for them (all of q/k/v's projections in one product; the
        // increment x − x_s, reference doc E.4, is formed while packing, never stored), then
        // dst = act(y_s + T·upᵀ) for the same rows, one output group (C or M columns) per
        // factorised layer. T stays in this thread's rows of the low-rank buffer, written and
        // read by the same core while it is in cache; no thread waits for another between
        // the products, and nothing is packed for the other thread. Each element is summed
        // in the same order as by separate GEMMs, so the bits do not depend on the split.
        let (lp, _) = self.ptr(low);
        let (dp, _) = self.ptr(self.act_buf(dst));
        let (sp, _) = self.ptr(self.bufs.gemm_scratch);
        // SAFETY: src and both caches are only read; lowrank and dst only written (distinct
        // buffers), each thread touching only its own rows of them.
        let (x, xs_cache, ycache) = unsafe {
            (
                self.view(self.act_buf(src), m * inp),
                self.view(self.act_buf(Act::Cache(i, xs)), m * inp),
                self.view(self.act_buf(Act::Cache(i, ys)), m * out),
            )
        };
        let (gemmer, ld, group, act) = (self.gemm, rank_total.max(1), out / parts.len(), gemm_act(act));
        // The factors as packed B panels (planned with the factors: both exist under icc).
        let at = self.bufs.packed_at[i];
        let packed = self.bufs.factors_packed.expect("planned");
        // SAFETY: written once by `new`, only read since.
        let packed = unsafe { self.view(packed, self.plan.get(packed).elems()) };
        let down_at = match layer {
            Linear::Qkv(_) => at.qkv_down,
            _ => at.down[parts[0].0 as usize],
        };
        let run = |scratch: &mut [f32], g: &Gemm, pb: usize| gemmer.run_single_packed_b(scratch, g, &packed[pb..]);
        let job = |tid: usize, rows: std::ops::Range<usize>| {
            if rows.is_empty() {
                return;
            }
            let (r, len) = (rows.start, rows.len());
            // SAFETY: each thread has its own scratch slice and its own rows of lowrank/dst.
            let scratch = unsafe {
                std::slice::from_raw_parts_mut(sp.get().add(tid * gemm::SCRATCH_PER_THREAD), gemm::SCRATCH_PER_THREAD)
            };
            run(
                scratch,
                &Gemm {
                    m: len,
                    n: rank_total,
                    k: inp,
                    a: &x[r * inp..],
                    a_minus: Some(&xs_cache[r * inp..]),
                    lda: inp,
                    conv: None,
                    b: BMat::weight(down, inp),
                    bias: None,
                    add: None,
                    act: gemm::Act::None,
                    c: SendPtr(unsafe { lp.get().add(r * ld) }),
                    ldc: ld,
                },
                down_at,
            );
            // SAFETY: this thread's rows of T, complete now; nobody else writes them.
            let t = unsafe { std::slice::from_raw_parts(lp.get().add(r * ld), len * ld) };
            let mut r0 = 0;
            for &(lt, g) in parts {
                let f = block.get(lt);
                run(
                    scratch,
                    &Gemm {
                        m: len,
                        n: group,
                        k: f.rank,
                        a: &t[r0..],
                        a_minus: None,
                        lda: ld,
                        conv: None,
                        b: BMat::weight(factors.w(f.up), f.rank),
                        bias: None,
                        add: Some((&ycache[r * out + g * group..], out)),
                        act,
                        c: SendPtr(unsafe { dp.get().add(r * out + g * group) }),
                        ldc: out,
                    },
                    at.up[lt as usize],
                );
                r0 += f.rank;
            }
        };
        let threads = self.pool.threads();
        if threads == 1 || m * rank_total * (inp + group) < gemm::SMALL_MACS {
            job(0, 0..m);
        } else {
            // Rows in multiples of 4, not of MR: at DiT-XL/2's 512 rows each of two threads
            // gets 256 (MR-aligned halves were 264 and 248, and the first thread's extra tile
            // kept the other waiting); a last tile of ≤ 4 rows runs the AVX-512 kernel's
            // 4-row build.
            self.pool.run(&|tid| job(tid, split(m, threads, tid, 4)));
        }
    }

    /// The CPU backend computes the direct form: nothing to keep.
    fn refresh_base(&mut self, _layer: Linear, _rows: usize) {}

    fn attention(&mut self, src: Act, dst: Act, rows: usize) {
        let isa = self.gemm.isa();
        let cfg = &self.model.config;
        let (n, c, heads, d) = (cfg.tokens(), cfg.hidden_size, cfg.num_heads, cfg.head_dim());
        let scale = 1.0 / (d as f32).sqrt();
        let (qkv, qlen) = self.ptr(self.act_buf(src));
        let (attn, _) = self.ptr(self.act_buf(dst));
        let (ss, _) = self.ptr(self.bufs.attn_scratch);
        let (gs, _) = self.ptr(self.bufs.gemm_scratch);
        let gemmer = self.gemm;
        let threads = self.pool.threads();
        let per = attention_scratch(n, d);
        // SAFETY (whole closure): qkv is read-only; each (row, head) job writes its own
        // D-column slice of attn; each thread uses its own score and GEMM scratch slices.
        let job = |tid: usize| {
            let qkv = unsafe { std::slice::from_raw_parts(qkv.get(), qlen) };
            let own = unsafe { std::slice::from_raw_parts_mut(ss.get().add(tid * per), per) };
            let (scores, rest) = own.split_at_mut(n * n);
            let (vt, ot) = rest.split_at_mut(gemm::packed_a_len(d, n));
            let scratch = unsafe {
                std::slice::from_raw_parts_mut(gs.get().add(tid * gemm::SCRATCH_PER_THREAD), gemm::SCRATCH_PER_THREAD)
            };
            for job in split(rows * heads, threads, tid, 1) {
                let (r, hd) = (job / heads, job % heads);
                let base = r * n * 3 * c + hd * d;
                // S = q·kᵀ: A = q rows (stride 3C), B = k rows (stride 3C).
                let qk = Gemm {
                    m: n,
                    n,
                    k: d,
                    a: &qkv[base..],
                    a_minus: None,
                    lda: 3 * c,
                    conv: None,
                    b: BMat { data: &qkv[base + c..], rs: 3 * c, cs: 1 },
                    bias: None,
                    add: None,
                    act: gemm::Act::None,
                    c: SendPtr(scores.as_mut_ptr()),
                    ldc: n,
                };
                gemmer.run_single(scratch, &qk);
                for row in scores.chunks_exact_mut(n) {
                    math::softmax_scaled(isa, row, scale);
                }
                // O = P·v, computed as Oᵀ = vᵀ·Pᵀ: with the head dim (72) as the GEMM's rows
                // it fills whole 12-row tiles, where as columns it left a third of a 32-wide
                // panel idle (96 computed for 72). vᵀ is packed straight from v (its columns
                // are v's rows); Oᵀ goes through this thread's scratch and is transposed into
                // attn. Each element is the same sum over tokens in the same order, so the
                // bits are those of P·v.
                let pv = Gemm {
                    m: d,
                    n,
                    k: n,
                    a: &[],
                    a_minus: None,
                    lda: n,
                    conv: None,
                    b: BMat::weight(scores, n),
                    bias: None,
                    add: None,
                    act: gemm::Act::None,
                    c: SendPtr(ot.as_mut_ptr()),
                    ldc: n,
                };
                gemmer.run_single_cols(scratch, vt, &qkv[base + 2 * c..], 3 * c, &pv);
                // SAFETY: row r, every token, this head's D columns of attn: this job's own.
                unsafe { gemmer.transpose(ot, n, d, n, attn.get().add(r * n * c + hd * d), c) };
            }
        };
        self.pool.run(&job);
    }

    fn gated_residual(&mut self, src: Act, gate: ModChunk, rows: usize) {
        let isa = self.gemm.isa();
        let cfg = &self.model.config;
        let (n, c, width) = (cfg.tokens(), cfg.hidden_size, forward::modulation_width(cfg));
        let gate = gate.offset(cfg);
        let (x, _) = self.ptr(self.bufs.x);
        let (s, _) = self.ptr(self.act_buf(src));
        let m = self.modulations_ptr();
        self.par(rows * n, |range| {
            for tok in range {
                let r = tok / n;
                // SAFETY: each token updates its own row of x; src and gate are read-only.
                let (xr, sr, gr) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(x.get().add(tok * c), c),
                        std::slice::from_raw_parts(s.get().add(tok * c), c),
                        std::slice::from_raw_parts(m.get().add(r * width + gate), c),
                    )
                };
                math::gated_add(isa, xr, gr, sr);
            }
        });
    }

    fn forecast_update(&mut self, block: usize, branch: Branch, src: Act, rows: usize) {
        let step = self.forecast_step;
        let (d, total) = self.ptr(self.bufs.forecast[block][branch as usize]);
        let (y, _) = self.ptr(self.act_buf(src));
        let cfg = &self.model.config;
        let (stride, len) = (self.max_rows * cfg.tokens() * cfg.hidden_size, rows * cfg.tokens() * cfg.hidden_size);
        let levels = total / stride;
        self.par(len, |range| {
            for e in range {
                // SAFETY: each element index is this job's own in every factor; y is read-only.
                unsafe {
                    let mut new = *y.get().add(e);
                    for i in 0..levels {
                        let di = d.get().add(i * stride + e);
                        if i <= step.orders {
                            let old = *di;
                            *di = new;
                            new = (new - old) / step.delta;
                        } else {
                            *di = 0.0;
                        }
                    }
                }
            }
        });
    }

    fn forecast(&mut self, block: usize, branch: Branch, dst: Act, rows: usize) {
        let w = self.forecast_step.weights;
        let (d, total) = self.ptr(self.bufs.forecast[block][branch as usize]);
        let (out, _) = self.ptr(self.act_buf(dst));
        let cfg = &self.model.config;
        let (stride, len) = (self.max_rows * cfg.tokens() * cfg.hidden_size, rows * cfg.tokens() * cfg.hidden_size);
        // Only the leading terms with a weight: order 0 (or a forecast with one full step
        // behind it) is D₀ itself, bit for bit.
        let terms = (total / stride).min(w.iter().take_while(|&&x| x != 0.0).count());
        self.par(len, |range| {
            for e in range {
                // SAFETY: each element index is this job's own in dst; the factors are read-only.
                unsafe {
                    let mut acc = w[0] * *d.get().add(e);
                    for (i, &wi) in w.iter().enumerate().take(terms).skip(1) {
                        acc += wi * *d.get().add(i * stride + e);
                    }
                    *out.get().add(e) = acc;
                }
            }
        });
    }

    fn unpatchify(&mut self, rows: usize) {
        let cfg = &self.model.config;
        let (p, g, co, isz, n) = (cfg.patch_size, cfg.grid(), cfg.out_channels(), cfg.input_size, cfg.tokens());
        let (out, _) = self.ptr(self.bufs.out);
        let (img, _) = self.ptr(self.bufs.image);
        // img[r, ch, i·p + a, j·p + b] = out[r, i·G + j, (a·p + b)·Cout + ch] (reference doc A.8).
        self.par(rows * n, |range| {
            for tok in range {
                let (r, t) = (tok / n, tok % n);
                let (gi, gj) = (t / g, t % g);
                for a in 0..p {
                    for b in 0..p {
                        for ch in 0..co {
                            // SAFETY: each token writes its own p×p patch of every channel.
                            unsafe {
                                let v = *out.get().add(tok * p * p * co + (a * p + b) * co + ch);
                                *img.get().add(((r * co + ch) * isz + gi * p + a) * isz + gj * p + b) = v;
                            }
                        }
                    }
                }
            }
        });
    }
}
