//! One forward pass of the GPU pipeline: [`Pass`] carries out the [`DitOps`] of
//! [`crate::forward::forward`] as kernel launches on the pipeline's device and buffers, fusing a GELU
//! into the GEMM before it and a gated residual update into the LayerNorm after it.

use super::plan::mod_width;
use super::GpuBackend;
use crate::error::{Error, Result};
use crate::forward::{Act, Activation, DitOps, Linear, Modulation, Slot};
use crate::gpu::launch::{self, GemmAct, GemmOut, GemmSpec};
use crate::gpu::{f16, DevSlice, Device};
use crate::plan::BufId;

/// One forward pass in flight: the [`DitOps`] of the GPU pipeline. Launch errors are kept
/// (the first one) and returned when the pass ends.
pub(super) struct Pass<'a, D: Device> {
    /// The pipeline whose buffers and device the pass runs on.
    pipeline: &'a GpuBackend<D>,
    /// Images in the latents: model row r embeds image r mod `images`.
    images: usize,
    /// Offset of the current block's (or the final layer's) modulation within a row.
    mod_off: usize,
    /// A GELU already applied by the GEMM before it (src, dst of the `gelu` call it replaces).
    fused_gelu: Option<(Act, Act)>,
    /// A gated residual update not launched yet (y, gate, rows): the LayerNorm that follows
    /// applies it in the same kernel; any other operation launches it first.
    pending_residual: Option<(DevSlice<f16>, DevSlice<f16>, usize)>,
    err: Option<Error>,
}

impl<'a, D: Device> Pass<'a, D> {
    /// A pass on `pipeline` whose rows are the images `row mod images` of the latents.
    pub(super) fn new(pipeline: &'a GpuBackend<D>, images: usize) -> Self {
        Pass { pipeline, images, mod_off: 0, fused_gelu: None, pending_residual: None, err: None }
    }
}

impl<D: Device> Pass<'_, D> {
    fn run(&mut self, f: impl FnOnce(&Self) -> Result<()>) {
        self.flush_residual();
        self.run_now(f);
    }

    fn run_now(&mut self, f: impl FnOnce(&Self) -> Result<()>) {
        if self.err.is_none() {
            if let Err(e) = f(self) {
                self.err = Some(e);
            }
        }
    }

    /// Launches the pending gated residual update on its own, if there is one.
    fn flush_residual(&mut self) {
        if let Some((y, gate, rows)) = self.pending_residual.take() {
            self.run_now(|p| {
                let cfg = &p.pipeline.model.config;
                launch::gated_residual_add_f32x(
                    &p.pipeline.dev,
                    p.pipeline.slice(p.pipeline.buffers.x)?,
                    y,
                    gate,
                    (rows * cfg.tokens()) as i32,
                    cfg.tokens() as i32,
                    cfg.hidden_size as i32,
                    mod_width(cfg) as i32,
                )
            });
        }
    }

    /// Ends the pass: launches what is still pending and returns the first error.
    pub(super) fn finish(mut self) -> Option<Error> {
        self.flush_residual();
        self.err
    }

    /// The buffer an activation lives in.
    fn act_id(&self, a: Act) -> BufId {
        let b = &self.pipeline.buffers;
        match a {
            Act::X => b.x,
            Act::H => b.h,
            Act::Qkv => b.qkv,
            Act::Attn => b.attn,
            Act::Y => b.y,
            Act::Mlp => b.mlp,
            Act::Out => b.out,
            Act::Cache(i, slot) => b.cache[i][slot as usize],
        }
    }

    /// An activation's buffer, as f16 elements.
    fn act_slice(&self, a: Act) -> Result<DevSlice<f16>> {
        self.pipeline.slice(self.act_id(a))
    }

    /// (weight, bias, out, in) of a linear layer.
    fn layer(&self, layer: Linear) -> (BufId, BufId, usize, usize) {
        let cfg = &self.pipeline.model.config;
        let (c, m) = (cfg.hidden_size, cfg.mlp_hidden());
        let b = &self.pipeline.buffers;
        match layer {
            Linear::Qkv(i) => (b.blocks[i].qkv_w, b.blocks[i].qkv_b, 3 * c, c),
            Linear::Proj(i) => (b.blocks[i].proj_w, b.blocks[i].proj_b, c, c),
            Linear::Fc1(i) => (b.blocks[i].fc1_w, b.blocks[i].fc1_b, m, c),
            Linear::Fc2(i) => (b.blocks[i].fc2_w, b.blocks[i].fc2_b, c, m),
            Linear::Final => (b.final_w, b.final_b, cfg.patch_size * cfg.patch_size * cfg.out_channels(), c),
        }
    }

    /// Chunk `k` of the current modulation, from its start to the end of the buffer.
    fn chunk(&self, k: usize) -> Result<DevSlice<f16>> {
        let all = self.pipeline.slice::<f16>(self.pipeline.buffers.mod_cur)?;
        let start = self.mod_off + k * self.pipeline.model.config.hidden_size;
        all.sub(start, all.len() - start)
    }

    fn tokens(&self) -> usize {
        self.pipeline.model.config.tokens()
    }
}

fn gemm_act(a: Activation) -> GemmAct {
    match a {
        Activation::None => GemmAct::None,
        Activation::GeluTanh => GemmAct::GeluTanh,
    }
}

impl<D: Device> DitOps for Pass<'_, D> {
    fn embed_patches(&mut self, rows: usize) {
        self.run(|p| {
            let (pipeline, cfg) = (p.pipeline, &p.pipeline.model.config);
            let b = &pipeline.buffers;
            launch::patchify_f16(
                &pipeline.dev,
                pipeline.slice(b.patches)?,
                pipeline.slice(b.latents)?,
                rows as i32,
                p.images as i32,
                cfg.in_channels as i32,
                cfg.input_size as i32,
                cfg.patch_size as i32,
            )?;
            let (c, n) = (cfg.hidden_size as i32, cfg.tokens() as i32);
            let mut g = GemmSpec::new(
                GemmOut::F32(pipeline.slice(b.x)?),
                pipeline.slice(b.patches)?,
                pipeline.slice(b.patch_w)?,
                rows as i32 * n,
                c,
                cfg.patch_dim() as i32,
            );
            g.bias = Some(pipeline.slice(b.patch_b)?);
            g.add = Some((pipeline.slice(b.pos)?, c, n));
            pipeline.gemm(&g)
        });
    }

    fn embed_conditioning(&mut self, _rows: usize) {
        // Done for the whole request by the conditioning pass.
    }

    fn modulation(&mut self, which: Modulation, _rows: usize) {
        let c = self.pipeline.model.config.hidden_size;
        self.mod_off = match which {
            Modulation::Block(i) => i * 6 * c,
            Modulation::Final => self.pipeline.model.config.depth * 6 * c,
        };
    }

    fn norm_modulate(&mut self, dst: Act, shift: usize, scale: usize, eps: f32, rows: usize) {
        let pending = self.pending_residual.take();
        self.run_now(|p| {
            let cfg = &p.pipeline.model.config;
            let (r, tokens, c, stride) =
                ((rows * cfg.tokens()) as i32, cfg.tokens() as i32, cfg.hidden_size as i32, mod_width(cfg) as i32);
            let (out, x) = (p.act_slice(dst)?, p.pipeline.slice(p.pipeline.buffers.x)?);
            let (shift, scale) = (p.chunk(shift)?, p.chunk(scale)?);
            match pending {
                Some((y, gate, res_rows)) if res_rows == rows => launch::residual_layernorm_modulate_f32x(
                    &p.pipeline.dev,
                    out,
                    x,
                    y,
                    gate,
                    stride,
                    shift,
                    scale,
                    r,
                    tokens,
                    c,
                    stride,
                    eps,
                ),
                Some(_) => {
                    Err(Error::invalid("GPU pipeline", "a residual update and the LayerNorm after it differ in rows"))
                }
                None => {
                    launch::layernorm_modulate_f32x(&p.pipeline.dev, out, x, shift, scale, r, tokens, c, stride, eps)
                }
            }
        });
    }

    fn linear(&mut self, layer: Linear, src: Act, dst: Act, act: Activation, rows: usize) {
        // A full step keeps fc1's output before and after GELU (two cache slots): one GEMM
        // writes both, and the `gelu` call that follows is skipped.
        let fuse = match (layer, dst, act) {
            (Linear::Fc1(i), Act::Cache(j, Slot::Fc1Y), Activation::None) if i == j => {
                Some((dst, Act::Cache(i, Slot::Fc2X)))
            }
            _ => None,
        };
        self.run(|p| {
            let (w, bias, out, k) = p.layer(layer);
            let m = (rows * p.tokens()) as i32;
            let o = match (dst, fuse) {
                (Act::Out, _) => GemmOut::F32(p.pipeline.slice(p.pipeline.buffers.out)?),
                (_, Some((_, post))) => GemmOut::F16(p.act_slice(post)?),
                _ => GemmOut::F16(p.act_slice(dst)?),
            };
            let mut g = GemmSpec::new(o, p.act_slice(src)?, p.pipeline.slice(w)?, m, out as i32, k as i32);
            g.bias = Some(p.pipeline.slice(bias)?);
            g.act = gemm_act(act);
            if fuse.is_some() {
                g.pre = Some(p.act_slice(dst)?);
                g.act = GemmAct::GeluTanh;
            }
            p.pipeline.gemm(&g)
        });
        self.fused_gelu = fuse;
    }

    fn linear_calibrated(&mut self, layer: Linear, src: Act, dst: Act, act: Activation, rows: usize) {
        self.run(|p| {
            let (i, xs, ys) =
                layer.slots().ok_or_else(|| Error::invalid("GPU pipeline", "only block linears are calibrated"))?;
            let bf = p
                .pipeline
                .buffers
                .factors
                .get(i)
                .ok_or_else(|| Error::invalid("GPU pipeline", "no factors planned"))?;
            let low_id = p
                .pipeline
                .buffers
                .lowrank
                .ok_or_else(|| Error::invalid("GPU pipeline", "no low-rank buffer planned"))?;
            let (_, _, out, inp) = p.layer(layer);
            let m = (rows * p.tokens()) as i32;
            // (down buffer, parts as (layer-type index, output group))
            let (down, parts): (BufId, &[(usize, usize)]) = match layer {
                Linear::Qkv(_) => (bf.down[0], &[(0, 0), (1, 1), (2, 2)]),
                Linear::Proj(_) => (bf.down[1], &[(3, 0)]),
                Linear::Fc1(_) => (bf.down[2], &[(4, 0)]),
                Linear::Fc2(_) => (bf.down[3], &[(5, 0)]),
                Linear::Final => unreachable!("slots() is None for the final layer"),
            };
            let r_total: usize = parts.iter().map(|&(t, _)| bf.ranks[t]).sum();
            let low = p.pipeline.slice::<f16>(low_id)?;
            // T = (x − x_s)·downᵀ, the increment formed while staging, never stored.
            let mut g = GemmSpec::new(
                GemmOut::F16(low),
                p.act_slice(src)?,
                p.pipeline.slice(down)?,
                m,
                r_total as i32,
                inp as i32,
            );
            g.a_minus = Some(p.act_slice(Act::Cache(i, xs))?);
            p.pipeline.gemm(&g)?;
            // dst = act(y_s + T·upᵀ) per output group, or for q, k and v at once.
            let group = out / parts.len();
            let (dst_s, ycache) = (p.act_slice(dst)?, p.act_slice(Act::Cache(i, ys))?);
            if let (Linear::Qkv(_), Some(merged)) = (layer, bf.qkv_up) {
                let mut g =
                    GemmSpec::new(GemmOut::F16(dst_s), low, p.pipeline.slice(merged)?, m, out as i32, r_total as i32);
                g.add = Some((ycache, out as i32, m));
                g.act = gemm_act(act);
                return p.pipeline.gemm(&g);
            }
            let mut r0 = 0;
            for &(t, grp) in parts {
                let rank = bf.ranks[t];
                let off = grp * group;
                let mut g = GemmSpec::new(
                    GemmOut::F16(dst_s.sub(off, dst_s.len() - off)?),
                    low.sub(r0, low.len() - r0)?,
                    p.pipeline.slice(bf.up[t])?,
                    m,
                    group as i32,
                    rank as i32,
                );
                g.lda = r_total as i32;
                g.ldc = out as i32;
                g.add = Some((ycache.sub(off, ycache.len() - off)?, out as i32, m));
                g.act = gemm_act(act);
                p.pipeline.gemm(&g)?;
                r0 += rank;
            }
            Ok(())
        });
    }

    fn gelu(&mut self, src: Act, dst: Act, rows: usize) {
        if self.fused_gelu.take() == Some((src, dst)) {
            return;
        }
        self.run(|p| {
            let n = rows * p.tokens() * p.pipeline.model.config.mlp_hidden();
            launch::gelu_f16(&p.pipeline.dev, p.act_slice(dst)?, p.act_slice(src)?, n as i32)
        });
    }

    fn attention(&mut self, src: Act, dst: Act, rows: usize) {
        self.run(|p| {
            let cfg = &p.pipeline.model.config;
            launch::attention_f16(
                &p.pipeline.dev,
                p.act_slice(dst)?,
                p.act_slice(src)?,
                rows as i32,
                cfg.tokens() as i32,
                cfg.num_heads as i32,
                cfg.head_dim() as i32,
            )
        });
    }

    fn gated_residual(&mut self, src: Act, gate: usize, rows: usize) {
        // Deferred to the LayerNorm that follows (the block's next one, or the next block's
        // first, or the final layer's); resolved now, while `mod_off` names this block.
        self.flush_residual();
        match self.act_slice(src).and_then(|y| Ok((y, self.chunk(gate)?))) {
            Ok((y, g)) => self.pending_residual = Some((y, g, rows)),
            Err(e) => {
                if self.err.is_none() {
                    self.err = Some(e);
                }
            }
        }
    }

    fn unpatchify(&mut self, rows: usize) {
        self.run(|p| {
            let (pipeline, cfg) = (p.pipeline, &p.pipeline.model.config);
            launch::unpatchify_f32(
                &pipeline.dev,
                pipeline.slice(pipeline.buffers.model_out)?,
                pipeline.slice(pipeline.buffers.out)?,
                rows as i32,
                cfg.out_channels() as i32,
                cfg.input_size as i32,
                cfg.patch_size as i32,
            )
        });
    }
}
