//! One PixArt pass in flight: [`Pass`] carries out the [`PixArtOps`] of
//! [`crate::pixart::forward::forward`] (and the per-request caption and per-pass conditioning
//! ops) as kernel launches on the device's arena. Launch errors are kept (the first one) and
//! returned by [`Pass::finish`].

use super::{DevFactors, PixArtGpu};
use crate::error::{Error, Result};
use crate::forward::{Activation, ModChunk, Norm};
use crate::gpu::launch::{self, AttentionRows, GemmAct, GemmOut, GemmSpec, LowRankSpec};
use crate::gpu::{f16, DevSlice, Device};
use crate::pixart::forward::{modulation_offset, modulation_width, slots, Act, PixArtOps, Slot};
use crate::pixart::Layer;
use crate::plan::BufId;

/// Where an f16 activation lives: a buffer, a column offset and a row stride (q, k and v are
/// column blocks of one (rows, N, 3C) buffer, so the flash self-attention reads them as DiT's
/// fused qkv).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Loc {
    buf: BufId,
    off: usize,
    ld: usize,
}

pub(super) struct Pass<'a, D: Device> {
    g: &'a PixArtGpu<D>,
    /// `Some(images)`: the rows embed the sampler's latents, row r image r mod images;
    /// `None`: the staged model input, one image per row.
    images: Option<usize>,
    err: Option<Error>,
}

fn gemm_act(a: Activation) -> GemmAct {
    match a {
        Activation::None => GemmAct::None,
        Activation::GeluTanh => GemmAct::GeluTanh,
    }
}

impl<'a, D: Device> Pass<'a, D> {
    pub(super) fn new(g: &'a PixArtGpu<D>, images: Option<usize>) -> Self {
        Pass { g, images, err: None }
    }

    /// Ends the pass: the first launch error, if any.
    pub(super) fn finish(self) -> Result<()> {
        self.err.map_or(Ok(()), Err)
    }

    fn run(&mut self, f: impl FnOnce(&Self) -> Result<()>) {
        if self.err.is_none() {
            if let Err(e) = f(self) {
                self.err = Some(e);
            }
        }
    }

    fn cfg(&self) -> crate::pixart::PixArtConfig {
        self.g.model.config
    }

    fn s16(&self, id: BufId) -> Result<DevSlice<f16>> {
        self.g.slice::<f16>(id)
    }

    fn s32(&self, id: BufId) -> Result<DevSlice<f32>> {
        self.g.slice::<f32>(id)
    }

    fn loc(&self, a: Act) -> Result<Loc> {
        let cfg = self.cfg();
        let (c, m) = (cfg.hidden_size(), cfg.mlp_hidden());
        let b = &self.g.bufs;
        let at = |buf, off, ld| Ok(Loc { buf, off, ld });
        match a {
            Act::H => at(b.h, 0, c),
            Act::Q => at(b.qkv, 0, 3 * c),
            Act::K => at(b.qkv, c, 3 * c),
            Act::V => at(b.qkv, 2 * c, 3 * c),
            Act::Attn => at(b.attn, 0, c),
            Act::Y => at(b.y, 0, c),
            Act::Mlp => at(b.mlp, 0, m),
            Act::Cache(i, slot) => {
                let buf = *b
                    .cache
                    .get(i)
                    .ok_or_else(|| Error::invalid("GPU pipeline", format!("no cache slots planned for block {i}")))?
                    .get(slot.index())
                    .ok_or_else(|| Error::invalid("GPU pipeline", "cache slot"))?;
                match slot {
                    Slot::Q1Y => at(buf, 0, 3 * c),
                    Slot::K1Y => at(buf, c, 3 * c),
                    Slot::V1Y => at(buf, 2 * c, 3 * c),
                    s => at(buf, 0, s.width(&cfg)),
                }
            }
            Act::X | Act::Out => Err(Error::invalid("GPU pipeline", format!("{a:?} is f32, not an f16 activation"))),
        }
    }

    /// An f16 activation from its column offset to the end of its buffer.
    fn act(&self, l: Loc) -> Result<DevSlice<f16>> {
        let s = self.s16(l.buf)?;
        s.sub(l.off, s.len() - l.off)
    }

    /// A linear's f16 input: the residual stream is first rounded into its f16 copy.
    fn input(&self, src: Act, rows: usize) -> Result<Loc> {
        if src != Act::X {
            return self.loc(src);
        }
        let cfg = self.cfg();
        let b = &self.g.bufs;
        let len = (rows * cfg.tokens() * cfg.hidden_size()) as i32;
        launch::convert_f32_to_f16(&self.g.dev, self.s16(b.xh)?, self.s32(b.x)?, len)?;
        Ok(Loc { buf: b.xh, off: 0, ld: cfg.hidden_size() })
    }

    fn gemm(&self, g: &GemmSpec) -> Result<()> {
        launch::gemm_ws(&self.g.dev, g, Some(self.s32(self.g.bufs.split_ws)?))
    }

    /// out = act(a·Wᵀ + b) of a layer over m rows of contiguous f16 buffers.
    fn linear_raw(&self, layer: Layer, a: BufId, out: GemmOut, m: usize, act: GemmAct) -> Result<()> {
        let cfg = self.cfg();
        let (w, bias) = self.g.bufs.linears[layer.index(cfg.depth)];
        let (n, k) = layer.shape(&cfg);
        let mut g = GemmSpec::new(out, self.s16(a)?, self.s16(w)?, m as i32, n as i32, k as i32);
        g.bias = Some(self.s16(bias)?);
        g.act = act;
        self.gemm(&g)
    }

    /// A chunk of the modulation, from its start to the end of the buffer.
    fn chunk(&self, chunk: ModChunk) -> Result<DevSlice<f16>> {
        let all = self.s16(self.g.bufs.modv)?;
        let start = modulation_offset(chunk, &self.cfg());
        all.sub(start, all.len() - start)
    }

    fn factors(&self, layer: Layer) -> Result<DevFactors> {
        self.g.bufs.factors[layer.index(self.cfg().depth)]
            .ok_or_else(|| Error::invalid("GPU pipeline", format!("no icc factors planned for {}", layer.name())))
    }

    /// x += gate ⊙ y over the image tokens of `rows` rows; `gate` rows `stride` apart.
    fn residual_add(&self, src: Act, gate: DevSlice<f16>, stride: usize, rows: usize) -> Result<()> {
        let cfg = self.cfg();
        let l = self.loc(src)?;
        if l.ld != cfg.hidden_size() {
            return Err(Error::invalid("GPU pipeline", format!("a residual from {src:?}, which is not C wide")));
        }
        launch::gated_residual_add_f32_stream(
            &self.g.dev,
            self.s32(self.g.bufs.x)?,
            self.act(l)?,
            gate,
            (rows * cfg.tokens()) as i32,
            cfg.tokens() as i32,
            cfg.hidden_size() as i32,
            stride as i32,
        )
    }
}

impl<D: Device> PixArtOps for Pass<'_, D> {
    fn encode_caption(&mut self, rows: usize) {
        self.run(|p| {
            let m = rows * p.g.text_len;
            let b = &p.g.bufs;
            p.linear_raw(Layer::Caption1, b.text, GemmOut::F16(p.s16(b.cap_h)?), m, GemmAct::GeluTanh)?;
            p.linear_raw(Layer::Caption2, b.cap_h, GemmOut::F16(p.s16(b.cap)?), m, GemmAct::None)?;
            for (i, &[k, v]) in b.cross.iter().enumerate() {
                p.linear_raw(Layer::K2(i), b.cap, GemmOut::F16(p.s16(k)?), m, GemmAct::None)?;
                p.linear_raw(Layer::V2(i), b.cap, GemmOut::F16(p.s16(v)?), m, GemmAct::None)?;
            }
            Ok(())
        });
    }

    fn conditioning(&mut self, rows: usize) {
        self.run(|p| {
            let cfg = p.cfg();
            let (b, dev, c) = (&p.g.bufs, &p.g.dev, cfg.hidden_size());
            let t = p.s32(b.step_in)?;
            let t = t.sub(super::STEP_IN, t.len() - super::STEP_IN)?;
            launch::timestep_freq_f16(dev, p.s16(b.tfreq)?, t, p.s32(b.freqs)?, rows as i32)?;
            p.linear_raw(Layer::Time1, b.tfreq, GemmOut::F16(p.s16(b.temb_h)?), rows, GemmAct::Silu)?;
            match b.size_emb {
                // emb = linear_2(…) + the micro-condition embedding, added in the GEMM's epilogue.
                Some(size) => {
                    let (w, bias) = b.linears[Layer::Time2.index(cfg.depth)];
                    let mut g = GemmSpec::new(
                        GemmOut::F32(p.s32(b.emb)?),
                        p.s16(b.temb_h)?,
                        p.s16(w)?,
                        rows as i32,
                        c as i32,
                        c as i32,
                    );
                    g.bias = Some(p.s16(bias)?);
                    g.add = Some((p.s16(size)?, c as i32, rows as i32));
                    p.gemm(&g)?;
                }
                None => p.linear_raw(Layer::Time2, b.temb_h, GemmOut::F32(p.s32(b.emb)?), rows, GemmAct::None)?,
            }
            launch::silu_f32_to_f16(dev, p.s16(b.silu_emb)?, p.s32(b.emb)?, (rows * c) as i32)?;
            p.linear_raw(Layer::AdaLn, b.silu_emb, GemmOut::F32(p.s32(b.tmod)?), rows, GemmAct::None)?;
            launch::pixart_modulation_f16(
                dev,
                p.s16(b.modv)?,
                p.s32(b.tmod)?,
                p.s32(b.emb)?,
                p.s32(b.tables)?,
                rows as i32,
                c as i32,
                cfg.depth as i32,
            )
        });
    }

    fn embed_patches(&mut self, rows: usize) {
        self.run(|p| {
            let cfg = p.cfg();
            let b = &p.g.bufs;
            let (input, images) = match p.images {
                Some(n) => (b.latents, n),
                None => (b.input, rows),
            };
            launch::patchify_f16(
                &p.g.dev,
                p.s16(b.patches)?,
                p.s32(input)?,
                rows as i32,
                images as i32,
                cfg.in_channels as i32,
                cfg.sample_size as i32,
                cfg.patch_size as i32,
            )?;
            let (c, n) = (cfg.hidden_size() as i32, cfg.tokens() as i32);
            let pd = (cfg.in_channels * cfg.patch_size * cfg.patch_size) as i32;
            let mut g =
                GemmSpec::new(GemmOut::F32(p.s32(b.x)?), p.s16(b.patches)?, p.s16(b.patch_w)?, rows as i32 * n, c, pd);
            g.bias = Some(p.s16(b.patch_b)?);
            g.add = Some((p.s16(b.pos)?, c, n));
            p.gemm(&g)
        });
    }

    fn norm_modulate(&mut self, dst: Act, norm: Norm, rows: usize) {
        self.run(|p| {
            let cfg = p.cfg();
            let l = p.loc(dst)?;
            let (tokens, c) = (cfg.tokens() as i32, cfg.hidden_size() as i32);
            launch::layernorm_modulate_f32_stream(
                &p.g.dev,
                p.act(l)?,
                p.s32(p.g.bufs.x)?,
                p.chunk(norm.shift)?,
                p.chunk(norm.scale)?,
                rows as i32 * tokens,
                tokens,
                c,
                modulation_width(&cfg) as i32,
                norm.eps,
            )
        });
    }

    fn linear(&mut self, layer: Layer, src: Act, dst: Act, act: Activation, rows: usize) {
        self.run(|p| {
            let cfg = p.cfg();
            let (w, bias) = p.g.bufs.linears[layer.index(cfg.depth)];
            let (n, k) = layer.shape(&cfg);
            let m = (rows * cfg.tokens()) as i32;
            let a = p.input(src, rows)?;
            let (out, ldc) = match dst {
                Act::Out => (GemmOut::F32(p.s32(p.g.bufs.out)?), n),
                _ => {
                    let l = p.loc(dst)?;
                    (GemmOut::F16(p.act(l)?), l.ld)
                }
            };
            let mut g = GemmSpec::new(out, p.act(a)?, p.s16(w)?, m, n as i32, k as i32);
            g.bias = Some(p.s16(bias)?);
            g.act = gemm_act(act);
            g.lda = a.ld as i32;
            g.ldc = ldc as i32;
            p.gemm(&g)
        });
    }

    fn linear_gelu_keep_pre(&mut self, layer: Layer, src: Act, pre: Act, post: Act, rows: usize) {
        // One GEMM writes both: `pre` before its GELU epilogue, `post` after.
        self.run(|p| {
            let cfg = p.cfg();
            let (w, bias) = p.g.bufs.linears[layer.index(cfg.depth)];
            let (n, k) = layer.shape(&cfg);
            let m = (rows * cfg.tokens()) as i32;
            let (a, pre, post) = (p.input(src, rows)?, p.loc(pre)?, p.loc(post)?);
            if pre.ld != post.ld {
                return Err(Error::invalid("GPU pipeline", "GELU's input and output rows differ in stride"));
            }
            let mut g = GemmSpec::new(GemmOut::F16(p.act(post)?), p.act(a)?, p.s16(w)?, m, n as i32, k as i32);
            g.bias = Some(p.s16(bias)?);
            g.pre = Some(p.act(pre)?);
            g.act = GemmAct::GeluTanh;
            g.lda = a.ld as i32;
            g.ldc = post.ld as i32;
            p.gemm(&g)
        });
    }

    fn linear_calibrated(&mut self, layer: Layer, src: Act, dst: Act, act: Activation, rows: usize) {
        // icc's direct form: dst = act(y_s + up·(down·(x − x_s))).
        self.run(|p| {
            let cfg = p.cfg();
            let (i, xs, ys) = slots(layer)
                .ok_or_else(|| Error::invalid("GPU pipeline", format!("{} is not cached", layer.name())))?;
            let f = p.factors(layer)?;
            let (n, k) = layer.shape(&cfg);
            let m = (rows * cfg.tokens()) as i32;
            let (a, x_s, y_s, out) =
                (p.input(src, rows)?, p.loc(Act::Cache(i, xs))?, p.loc(Act::Cache(i, ys))?, p.loc(dst)?);
            if a.ld != x_s.ld {
                return Err(Error::invalid("GPU pipeline", "a calibrated linear's input and x_s differ in stride"));
            }
            let (down, up) = (p.s16(f.down)?, p.s16(f.up)?);
            if launch::lowrank_fits(k, a.ld, &[f.rank]) {
                return launch::lowrank_fused(
                    &p.g.dev,
                    &LowRankSpec {
                        out: p.act(out)?,
                        a: p.act(a)?,
                        a_minus: Some(p.act(x_s)?),
                        down,
                        up: [up; 3],
                        ranks: [f.rank as i32, 0, 0],
                        groups: 1,
                        add: Some(p.act(y_s)?),
                        t_minus: None,
                        scale: 1.0,
                        m,
                        n: n as i32,
                        k: k as i32,
                        lda: a.ld as i32,
                        ldc: out.ld as i32,
                        ld_add: y_s.ld as i32,
                        act: gemm_act(act),
                    },
                );
            }
            // Ranks the fused kernel does not take: T = (x − x_s)·downᵀ, then y_s + T·upᵀ.
            let low =
                p.s16(p.g.bufs.lowrank.ok_or_else(|| Error::invalid("GPU pipeline", "no low-rank buffer planned"))?)?;
            let mut g = GemmSpec::new(GemmOut::F16(low), p.act(a)?, down, m, f.rank as i32, k as i32);
            g.a_minus = Some(p.act(x_s)?);
            g.lda = a.ld as i32;
            p.gemm(&g)?;
            let mut g = GemmSpec::new(GemmOut::F16(p.act(out)?), low, up, m, n as i32, f.rank as i32);
            g.ldc = out.ld as i32;
            g.add = Some((p.act(y_s)?, y_s.ld as i32, m));
            g.act = gemm_act(act);
            p.gemm(&g)
        });
    }

    /// The direct form keeps nothing beyond the slots.
    fn refresh_base(&mut self, _layer: Layer, _rows: usize) {}

    fn copy(&mut self, src: Act, dst: Act, rows: usize) {
        self.run(|p| {
            let cfg = p.cfg();
            if src != Act::X {
                return Err(Error::invalid(
                    "GPU pipeline",
                    format!("copy from {src:?}: only the residual stream is copied"),
                ));
            }
            let l = p.loc(dst)?;
            let len = (rows * cfg.tokens() * cfg.hidden_size()) as i32;
            launch::convert_f32_to_f16(&p.g.dev, p.act(l)?, p.s32(p.g.bufs.x)?, len)
        });
    }

    fn self_attention(&mut self, q: Act, k: Act, v: Act, dst: Act, rows: usize) {
        self.run(|p| {
            let cfg = p.cfg();
            let c = cfg.hidden_size();
            let (q, k, v, o) = (p.loc(q)?, p.loc(k)?, p.loc(v)?, p.loc(dst)?);
            let fused = q.off == 0 && k == Loc { off: c, ..q } && v == Loc { off: 2 * c, ..q } && o.ld == c;
            if fused && launch::ATTENTION_HEAD_DIMS.contains(&(cfg.head_dim as i32)) {
                // DiT's flash attention (head dims 64, 72, 128) reads q | k | v as one (rows, N, 3C) matrix.
                return launch::attention_f16(
                    &p.g.dev,
                    p.act(o)?,
                    p.act(q)?,
                    rows as i32,
                    cfg.tokens() as i32,
                    cfg.num_heads as i32,
                    cfg.head_dim as i32,
                );
            }
            if k.ld != v.ld {
                return Err(Error::invalid("GPU pipeline", "self-attention's k and v differ in stride"));
            }
            let n = cfg.tokens() as i32;
            launch::attention_rows_f16(
                &p.g.dev,
                &AttentionRows {
                    out: p.act(o)?,
                    q: p.act(q)?,
                    k: p.act(k)?,
                    v: p.act(v)?,
                    bias: None,
                    rows: rows as i32,
                    nq: n,
                    nk: n,
                    heads: cfg.num_heads as i32,
                    head_dim: cfg.head_dim as i32,
                    ldq: q.ld as i32,
                    ldkv: k.ld as i32,
                    ldo: o.ld as i32,
                },
            )
        });
    }

    fn cross_attention(&mut self, block: usize, q: Act, dst: Act, rows: usize) {
        self.run(|p| {
            let cfg = p.cfg();
            let c = cfg.hidden_size();
            let [k, v] = p.g.bufs.cross[block];
            let (q, o) = (p.loc(q)?, p.loc(dst)?);
            launch::attention_rows_f16(
                &p.g.dev,
                &AttentionRows {
                    out: p.act(o)?,
                    q: p.act(q)?,
                    k: p.s16(k)?,
                    v: p.s16(v)?,
                    bias: Some(p.s32(p.g.bufs.mask_bias)?),
                    rows: rows as i32,
                    nq: cfg.tokens() as i32,
                    nk: p.g.text_len as i32,
                    heads: cfg.num_heads as i32,
                    head_dim: cfg.head_dim as i32,
                    ldq: q.ld as i32,
                    ldkv: c as i32,
                    ldo: o.ld as i32,
                },
            )
        });
    }

    fn gated_residual(&mut self, src: Act, gate: ModChunk, rows: usize) {
        self.run(|p| p.residual_add(src, p.chunk(gate)?, modulation_width(&p.cfg()), rows));
    }

    fn residual(&mut self, src: Act, rows: usize) {
        // The gated add with a gate of ones (exact: 1·y).
        self.run(|p| p.residual_add(src, p.s16(p.g.bufs.ones)?, p.cfg().hidden_size(), rows));
    }

    fn unpatchify(&mut self, rows: usize) {
        self.run(|p| {
            let cfg = p.cfg();
            launch::unpatchify_f32(
                &p.g.dev,
                p.s32(p.g.bufs.image)?,
                p.s32(p.g.bufs.out)?,
                rows as i32,
                cfg.out_channels as i32,
                cfg.sample_size as i32,
                cfg.patch_size as i32,
            )
        });
    }
}
