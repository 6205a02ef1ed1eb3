//! The CPU implementation of [`PixArtOps`]: each op reads and writes arena buffers through
//! raw pointers, splitting tokens (or attention's rows × heads) across the thread pool. No op
//! writes a buffer it reads.

use std::sync::Arc;

use super::{gemm_act, PixArtCache, PixArtCpu};
use crate::config::FREQ_DIM;
use crate::cpu::gemm;
use crate::cpu::math;
use crate::cpu::pool::SendPtr;
use crate::embed;
use crate::forward::{Activation, ModChunk, Norm};
use crate::pixart::forward::{modulation_offset, modulation_width, slots, Act, PixArtOps};
use crate::pixart::weights::Layer;

impl PixArtOps for PixArtCpu {
    fn encode_caption(&mut self, rows: usize) {
        let m = rows * self.text_len;
        let (text, cap_h, cap) = (self.bufs.text, self.bufs.cap_h, self.bufs.cap);
        self.linear_raw(Layer::Caption1, text, cap_h, m, gemm::Act::GeluTanh);
        self.linear_raw(Layer::Caption2, cap_h, cap, m, gemm::Act::None);
        for i in 0..self.model.config.depth {
            let [k, v] = self.bufs.cross[i];
            self.linear_raw(Layer::K2(i), cap, k, m, gemm::Act::None);
            self.linear_raw(Layer::V2(i), cap, v, m, gemm::Act::None);
        }
    }

    fn conditioning(&mut self, rows: usize) {
        let cfg = self.model.config;
        let c = cfg.hidden_size();
        let (tf, temb, emb, silu_emb, tmod, modv) =
            (self.bufs.tfreq, self.bufs.temb, self.bufs.emb, self.bufs.silu_emb, self.bufs.tmod, self.bufs.modv);
        let freqs = self.freqs;
        for r in 0..rows {
            let t = self.t[r];
            embed::timestep_embedding(t, &freqs, &mut self.buf_mut(tf)[r * FREQ_DIM..(r + 1) * FREQ_DIM]);
        }
        self.linear_raw(Layer::Time1, tf, temb, rows, gemm::Act::None);
        for v in &mut self.buf_mut(temb)[..rows * c] {
            *v = math::silu(*v);
        }
        self.linear_raw(Layer::Time2, temb, emb, rows, gemm::Act::None);
        if let Some((size, _)) = self.bufs.size {
            // emb += the staged micro-conditions' embedding (micro.rs).
            // SAFETY: size is read while emb (distinct) is written.
            let add = unsafe { self.view(size) };
            for (e, &a) in unsafe { self.view_mut(emb) }[..rows * c].iter_mut().zip(add) {
                *e += a;
            }
        }
        // SAFETY: emb is read while silu_emb (distinct) is written.
        let e = unsafe { self.view(emb) };
        for (s, &v) in unsafe { self.view_mut(silu_emb) }[..rows * c].iter_mut().zip(e) {
            *s = math::silu(v);
        }
        self.linear_raw(Layer::AdaLn, silu_emb, tmod, rows, gemm::Act::None);
        let width = modulation_width(&cfg);
        let (tm, e) = unsafe { (self.view(tmod), self.view(emb)) };
        let model = Arc::clone(&self.model);
        // SAFETY: the modulation buffer is distinct from t_mod and emb.
        let out = unsafe { self.view_mut(modv) };
        for r in 0..rows {
            let row = &mut out[r * width..(r + 1) * width];
            for (i, &table) in model.tensors.block_tables.iter().enumerate() {
                let table = model.w(table);
                for ((o, &a), &b) in row[6 * i * c..6 * (i + 1) * c].iter_mut().zip(table).zip(&tm[r * 6 * c..]) {
                    *o = a + b;
                }
            }
            let table = model.w(model.tensors.final_table);
            for (j, o) in row[6 * cfg.depth * c..].iter_mut().enumerate() {
                *o = table[j] + e[r * c + j % c];
            }
        }
    }

    fn embed_patches(&mut self, rows: usize) {
        let cfg = self.model.config;
        let (p, gw, cin, (h, w), c, n) =
            (cfg.patch_size, cfg.grid_w(), cfg.in_channels, (cfg.height, cfg.width), cfg.hidden_size(), cfg.tokens());
        let pd = cin * p * p;
        let (input, patches) = (self.bufs.input, self.bufs.patches);
        // SAFETY: input is read, patches written.
        let x = unsafe { self.view(input) };
        let pt = unsafe { self.view_mut(patches) };
        for r in 0..rows {
            for t in 0..n {
                let (gi, gj) = (t / gw, t % gw);
                let row = &mut pt[(r * n + t) * pd..][..pd];
                for ch in 0..cin {
                    for a in 0..p {
                        for b in 0..p {
                            row[(ch * p + a) * p + b] = x[((r * cin + ch) * h + gi * p + a) * w + gj * p + b];
                        }
                    }
                }
            }
        }
        let t = &self.model.tensors;
        let (w, b, pos) = (self.model.w(t.patch_w), self.model.w(t.patch_b), self.model.w(t.pos_embed));
        let pt = unsafe { self.view(patches) };
        let (xp, _) = self.ptr(self.bufs.x);
        for r in 0..rows {
            let c_ptr = SendPtr(unsafe { xp.get().add(r * n * c) });
            self.gemm(&pt[r * n * pd..(r + 1) * n * pd], None, n, pd, w, Some(b), c, Some(pos), gemm::Act::None, c_ptr);
        }
    }

    fn norm_modulate(&mut self, dst: Act, norm: Norm, rows: usize) {
        let cfg = self.model.config;
        let (n, c, width) = (cfg.tokens(), cfg.hidden_size(), modulation_width(&cfg));
        let (shift, scale) = (modulation_offset(norm.shift, &cfg), modulation_offset(norm.scale, &cfg));
        let isa = self.gemm.isa();
        // SAFETY: x and the modulation are read; dst (distinct) written, a token per job.
        let (x, m) = unsafe { (self.view(self.bufs.x), self.view(self.bufs.modv)) };
        let (d, _) = self.ptr(self.act_buf(dst));
        self.par(rows * n, |range| {
            for tok in range {
                let r = tok / n;
                let out = unsafe { std::slice::from_raw_parts_mut(d.get().add(tok * c), c) };
                let mv = &m[r * width..];
                math::layer_norm_modulate(
                    isa,
                    &x[tok * c..(tok + 1) * c],
                    &mv[shift..shift + c],
                    &mv[scale..scale + c],
                    norm.eps,
                    out,
                );
            }
        });
    }

    fn linear(&mut self, layer: Layer, src: Act, dst: Act, act: Activation, rows: usize) {
        let m = rows * self.model.config.tokens();
        self.linear_raw(layer, self.act_buf(src), self.act_buf(dst), m, gemm_act(act));
    }

    fn linear_gelu_keep_pre(&mut self, layer: Layer, src: Act, pre: Act, post: Act, rows: usize) {
        self.linear(layer, src, pre, Activation::None, rows);
        let isa = self.gemm.isa();
        let len = rows * self.model.config.tokens() * layer.shape(&self.model.config).0;
        // SAFETY: pre is read, post (distinct) written.
        let s = unsafe { self.view(self.act_buf(pre)) };
        let (d, _) = self.ptr(self.act_buf(post));
        let out = unsafe { std::slice::from_raw_parts_mut(d.get(), len) };
        math::gelu_into(isa, &s[..len], out);
    }

    fn linear_calibrated(&mut self, layer: Layer, src: Act, dst: Act, act: Activation, rows: usize) {
        let PixArtCache::Icc(factors) = &self.cache else { unreachable!("run() checks calibrated steps have factors") };
        let factors = Arc::clone(factors);
        let (i, xs, ys) = slots(layer).expect("only cached linears are calibrated");
        let (out, inp) = layer.shape(&self.model.config);
        let m = rows * self.model.config.tokens();
        let f = factors.get(layer).expect("factors load every cached layer");
        let low = self.bufs.lowrank.expect("planned with icc");
        // SAFETY: src and the caches are read; lowrank and dst (distinct) written.
        let (x, x_s, y_s) = unsafe {
            (
                self.view(self.act_buf(src)),
                self.view(self.act_buf(Act::Cache(i, xs))),
                self.view(self.act_buf(Act::Cache(i, ys))),
            )
        };
        let (lp, _) = self.ptr(low);
        self.gemm(
            &x[..m * inp],
            Some(&x_s[..m * inp]),
            m,
            inp,
            factors.w(f.down),
            None,
            f.rank,
            None,
            gemm::Act::None,
            lp,
        );
        let t = unsafe { self.view(low) };
        let (dp, _) = self.ptr(self.act_buf(dst));
        self.gemm(
            &t[..m * f.rank],
            None,
            m,
            f.rank,
            factors.w(f.up),
            None,
            out,
            Some(&y_s[..m * out]),
            gemm_act(act),
            dp,
        );
    }

    /// The CPU computes icc's direct form: nothing to keep.
    fn refresh_base(&mut self, _layer: Layer, _rows: usize) {}

    fn copy(&mut self, src: Act, dst: Act, rows: usize) {
        let len = rows * self.model.config.tokens() * self.model.config.hidden_size();
        // SAFETY: distinct buffers.
        let s = unsafe { self.view(self.act_buf(src)) };
        let (d, _) = self.ptr(self.act_buf(dst));
        unsafe { std::slice::from_raw_parts_mut(d.get(), len) }.copy_from_slice(&s[..len]);
    }

    fn self_attention(&mut self, q: Act, k: Act, v: Act, dst: Act, rows: usize) {
        let n = self.model.config.tokens();
        self.attention_rows(self.act_buf(q), self.act_buf(k), self.act_buf(v), self.act_buf(dst), rows, n, None);
    }

    fn cross_attention(&mut self, block: usize, q: Act, dst: Act, rows: usize) {
        let [k, v] = self.bufs.cross[block];
        let len = self.text_len;
        self.attention_rows(self.act_buf(q), k, v, self.act_buf(dst), rows, len, Some(self.bufs.mask_bias));
    }

    fn gated_residual(&mut self, src: Act, gate: ModChunk, rows: usize) {
        let cfg = self.model.config;
        let (n, c, width) = (cfg.tokens(), cfg.hidden_size(), modulation_width(&cfg));
        let gate = modulation_offset(gate, &cfg);
        let isa = self.gemm.isa();
        // SAFETY: src and the modulation are read; x (distinct) written, a token per job.
        let (s, m) = unsafe { (self.view(self.act_buf(src)), self.view(self.bufs.modv)) };
        let (x, _) = self.ptr(self.bufs.x);
        self.par(rows * n, |range| {
            for tok in range {
                let r = tok / n;
                let xr = unsafe { std::slice::from_raw_parts_mut(x.get().add(tok * c), c) };
                math::gated_add(isa, xr, &m[r * width + gate..][..c], &s[tok * c..(tok + 1) * c]);
            }
        });
    }

    fn residual(&mut self, src: Act, rows: usize) {
        let len = rows * self.model.config.tokens() * self.model.config.hidden_size();
        let isa = self.gemm.isa();
        // SAFETY: distinct buffers.
        let s = unsafe { self.view(self.act_buf(src)) };
        let (x, _) = self.ptr(self.bufs.x);
        math::add(isa, unsafe { std::slice::from_raw_parts_mut(x.get(), len) }, &s[..len]);
    }

    fn unpatchify(&mut self, rows: usize) {
        let cfg = self.model.config;
        let (p, gw, co, (h, w), n) =
            (cfg.patch_size, cfg.grid_w(), cfg.out_channels, (cfg.height, cfg.width), cfg.tokens());
        // SAFETY: out is read, image written.
        let out = unsafe { self.view(self.bufs.out) };
        let image = self.bufs.image;
        let img = unsafe { self.view_mut(image) };
        for r in 0..rows {
            for t in 0..n {
                let (gi, gj) = (t / gw, t % gw);
                let tok = r * n + t;
                for a in 0..p {
                    for b in 0..p {
                        for ch in 0..co {
                            img[((r * co + ch) * h + gi * p + a) * w + gj * p + b] =
                                out[(tok * p * p + a * p + b) * co + ch];
                        }
                    }
                }
            }
        }
    }
}
