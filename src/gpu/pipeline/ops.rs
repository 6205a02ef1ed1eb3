//! One forward pass of the GPU pipeline and its conditioning: [`Pass`] carries out the
//! [`DitOps`] of [`crate::forward::forward`] as kernel launches on the pipeline's device and
//! buffers (fc1's GELU in its GEMM's epilogue, a gated residual update in the LayerNorm after
//! it, as the ops say), and [`RequestConditioning`] the [`ConditioningOps`] of a whole request.

use super::plan::mod_width;
use super::GpuBackend;
use crate::config::FREQ_DIM;
use crate::error::{Error, Result};
use crate::forward::{Act, Activation, Branch, ConditioningOps, DitOps, Linear, ModChunk, Norm, Slot};
use crate::gpu::launch::{self, GemmAct, GemmAlso, GemmOut, GemmSpec, LowRankSpec, TaylorBranch};
use crate::gpu::{f16, DevSlice, Device};
use crate::plan::BufId;
use crate::policy::IccForm;

/// The conditioning of a whole request on the device ([`ConditioningOps`]): every step's
/// (timestep, label) pairs at once, `rows` = steps × rows of the request. Launch errors are
/// kept (the first one) and returned when the pass ends.
pub(super) struct RequestConditioning<'a, D: Device> {
    pipeline: &'a GpuBackend<D>,
    /// Rows of one step: pair i uses label i mod label_rows.
    label_rows: usize,
    err: Option<Error>,
}

impl<'a, D: Device> RequestConditioning<'a, D> {
    /// The conditioning of `steps × label_rows` (timestep, label) pairs on `pipeline`.
    pub(super) fn new(pipeline: &'a GpuBackend<D>, label_rows: usize) -> Self {
        RequestConditioning { pipeline, label_rows, err: None }
    }

    /// Ends the pass: the first launch error, if any.
    pub(super) fn finish(self) -> Option<Error> {
        self.err
    }

    fn run(&mut self, f: impl FnOnce(&Self) -> Result<()>) {
        if self.err.is_none() {
            if let Err(e) = f(self) {
                self.err = Some(e);
            }
        }
    }
}

impl<D: Device> ConditioningOps for RequestConditioning<'_, D> {
    fn embed_conditioning(&mut self, count: usize) {
        self.run(|p| {
            let pipeline = p.pipeline;
            let cfg = &pipeline.model.config;
            let (c, b) = (cfg.hidden_size, &pipeline.buffers);
            let cnt = count as i32;
            launch::timestep_freq_f16(
                &pipeline.dev,
                pipeline.slice(b.tfreq)?,
                pipeline.slice(b.t_all)?,
                pipeline.slice(b.freqs)?,
                cnt,
            )?;
            let mut g = GemmSpec::new(
                GemmOut::F16(pipeline.slice(b.temb_h)?),
                pipeline.slice(b.tfreq)?,
                pipeline.slice(b.t_mlp_in_w)?,
                cnt,
                c as i32,
                FREQ_DIM as i32,
            );
            g.bias = Some(pipeline.slice(b.t_mlp_in_b)?);
            g.act = GemmAct::Silu;
            pipeline.gemm(&g)?;
            let mut g = GemmSpec::new(
                GemmOut::F32(pipeline.slice(b.temb)?),
                pipeline.slice(b.temb_h)?,
                pipeline.slice(b.t_mlp_out_w)?,
                cnt,
                c as i32,
                c as i32,
            );
            g.bias = Some(pipeline.slice(b.t_mlp_out_b)?);
            pipeline.gemm(&g)?;
            launch::condition_silu_f16(
                &pipeline.dev,
                pipeline.slice(b.silu_c)?,
                pipeline.slice(b.temb)?,
                pipeline.slice(b.table)?,
                pipeline.slice(b.labels)?,
                cnt,
                p.label_rows as i32,
                c as i32,
                cfg.label_rows() as i32,
            )?;
            Ok(())
        });
    }

    fn modulations(&mut self, count: usize) {
        self.run(|p| {
            let pipeline = p.pipeline;
            let cfg = &pipeline.model.config;
            let (c, b) = (cfg.hidden_size, &pipeline.buffers);
            let cnt = count as i32;
            let mw = mod_width(cfg) as i32;
            let mut g = GemmSpec::new(
                GemmOut::F16(pipeline.slice(b.mod_all)?),
                pipeline.slice(b.silu_c)?,
                pipeline.slice(b.ada_w)?,
                cnt,
                mw,
                c as i32,
            );
            g.bias = Some(pipeline.slice(b.ada_b)?);
            pipeline.gemm(&g)
        });
    }
}

/// A calibrated linear's factors on the device: (down, up per group, rank per group, groups).
type LayerFactors = (DevSlice<f16>, [DevSlice<f16>; 3], [i32; 3], i32);

/// A profiled op: its kind and the device events before and after its launches.
pub(super) type OpEvents<D> = (&'static str, <D as Device>::Event, <D as Device>::Event);

/// One forward pass in flight: the [`DitOps`] of the GPU pipeline. Launch errors are kept
/// (the first one) and returned when the pass ends, with the launches one block made.
pub(super) struct Pass<'a, D: Device> {
    /// The pipeline whose buffers and device the pass runs on.
    pipeline: &'a GpuBackend<D>,
    /// Images in the latents: model row r embeds image r mod `images`.
    images: usize,
    err: Option<Error>,
    /// The block whose launches are counted, the block the current op belongs to (attention
    /// belongs to the block of the op before it), and the count.
    count: Option<usize>,
    block: Option<usize>,
    counted: u64,
    /// When profiling: each op's kind with device events around its launches.
    profile: Option<Vec<OpEvents<D>>>,
}

impl<'a, D: Device> Pass<'a, D> {
    /// A pass on `pipeline` whose rows are the images `row mod images` of the latents,
    /// counting the launches of block `count`.
    pub(super) fn new(pipeline: &'a GpuBackend<D>, images: usize, count: Option<usize>) -> Self {
        Pass { pipeline, images, err: None, count, block: None, counted: 0, profile: None }
    }

    /// A pass that also records device events around every op ([`Pass::finish_profile`]).
    pub(super) fn profiled(pipeline: &'a GpuBackend<D>, images: usize) -> Self {
        Pass { profile: Some(Vec::new()), ..Pass::new(pipeline, images, None) }
    }

    /// Ends a profiled pass: the first error, or each op's kind and the events around it.
    pub(super) fn finish_profile(self) -> Result<Vec<OpEvents<D>>> {
        match self.err {
            Some(e) => Err(e),
            None => Ok(self.profile.unwrap_or_default()),
        }
    }

    /// Ends the pass: the first launch error, if any, and the counted block's launches.
    pub(super) fn finish(self) -> (Option<Error>, u64) {
        (self.err, self.counted)
    }
}

impl<D: Device> Pass<'_, D> {
    /// Runs one op's launches, unless an earlier one failed; `block`: the block the op belongs
    /// to, `None` outside the blocks, `Some(None)` the block of the op before.
    /// `what`: the op's kind, for profiles.
    fn run_in(&mut self, what: &'static str, block: Option<Option<usize>>, f: impl FnOnce(&Self) -> Result<()>) {
        if let Some(b) = block {
            self.block = b;
        }
        if self.err.is_none() {
            let before = self.pipeline.dev.launches();
            let start = match self.profile.as_ref().map(|_| self.pipeline.dev.record_event()).transpose() {
                Ok(e) => e,
                Err(e) => {
                    self.err = Some(e);
                    return;
                }
            };
            if let Err(e) = f(self) {
                self.err = Some(e);
            }
            if self.count.is_some() && self.block == self.count {
                self.counted += self.pipeline.dev.launches() - before;
            }
            if let Some(start) = start {
                match self.pipeline.dev.record_event() {
                    Ok(end) => self.profile.as_mut().expect("profiling").push((what, start, end)),
                    Err(e) => self.err = Some(e),
                }
            }
        }
    }

    /// [`Pass::run_in`] for an op of block `block` (`None`: outside the blocks).
    fn run(&mut self, what: &'static str, block: Option<usize>, f: impl FnOnce(&Self) -> Result<()>) {
        self.run_in(what, Some(block), f);
    }

    /// (block, cached input slot, cached output slot) of a calibrated linear.
    fn calibrated_slots(&self, layer: Linear) -> Result<(usize, Slot, Slot)> {
        layer.slots().ok_or_else(|| Error::invalid("GPU pipeline", "only block linears are calibrated"))
    }

    /// A calibrated linear's b_s slot (the folded form, f16) or t_s slot (the projected form, f32).
    fn base<T: crate::gpu::DevType>(&self, layer: Linear) -> Result<DevSlice<T>> {
        let (i, j) = match layer {
            Linear::Qkv(i) => (i, 0),
            Linear::Proj(i) => (i, 1),
            Linear::Fc1(i) => (i, 2),
            Linear::Fc2(i) => (i, 3),
            Linear::Final => return Err(Error::invalid("GPU pipeline", "the final layer has no cached base")),
        };
        let id = self
            .pipeline
            .buffers
            .bases
            .get(i)
            .ok_or_else(|| Error::invalid("GPU pipeline", "no b_s or t_s slots planned (the direct form)"))?[j];
        self.pipeline.slice(id)
    }

    /// In the projected form, a full step's block linear (its input is the cache slot x_s) also
    /// computes t_s = down·x_s into its slot, as more columns of the same GEMM.
    fn keep_projection(&self, layer: Linear, src: Act) -> Result<Option<GemmAlso>> {
        if self.pipeline.icc.form != IccForm::Projected || !matches!(src, Act::Cache(..)) || layer == Linear::Final {
            return Ok(None);
        }
        let (down, _, ranks, groups) = self.factors_of(layer)?;
        let r: i32 = ranks[..groups as usize].iter().sum();
        Ok((r > 0).then_some(GemmAlso { w: down, n: r, out: self.base::<f32>(layer)?, ld: r }))
    }

    /// A calibrated linear's factors on the device: (down, up per group, rank per group, groups);
    /// q, k and v are the three groups of the qkv layer.
    fn factors_of(&self, layer: Linear) -> Result<LayerFactors> {
        let (i, _, _) = self.calibrated_slots(layer)?;
        let bf =
            self.pipeline.buffers.factors.get(i).ok_or_else(|| Error::invalid("GPU pipeline", "no factors planned"))?;
        let s = |id| self.pipeline.slice::<f16>(id);
        let r = |t: usize| bf.ranks[t] as i32;
        Ok(match layer {
            Linear::Qkv(_) => (s(bf.down[0])?, [s(bf.up[0])?, s(bf.up[1])?, s(bf.up[2])?], [r(0), r(1), r(2)], 3),
            Linear::Proj(_) => (s(bf.down[1])?, [s(bf.up[3])?; 3], [r(3), 0, 0], 1),
            Linear::Fc1(_) => (s(bf.down[2])?, [s(bf.up[4])?; 3], [r(4), 0, 0], 1),
            Linear::Fc2(_) => (s(bf.down[3])?, [s(bf.up[5])?; 3], [r(5), 0, 0], 1),
            Linear::Final => unreachable!("calibrated_slots() refuses the final layer"),
        })
    }

    /// One fused low-rank launch of `layer`'s factors: out = act(add + scale·up·(down·a' − t_s)),
    /// a' = a − a_minus or a, t_s subtracted when given.
    #[allow(clippy::too_many_arguments)]
    fn lowrank(
        &self,
        layer: Linear,
        out: DevSlice<f16>,
        a: DevSlice<f16>,
        a_minus: Option<DevSlice<f16>>,
        t_minus: Option<DevSlice<f32>>,
        add: DevSlice<f16>,
        scale: f32,
        act: Activation,
        rows: usize,
    ) -> Result<()> {
        let (_, _, n, k) = self.layer(layer);
        let (down, up, ranks, groups) = self.factors_of(layer)?;
        launch::lowrank_fused(
            &self.pipeline.dev,
            &LowRankSpec {
                out,
                a,
                a_minus,
                down,
                up,
                ranks,
                groups,
                add: Some(add),
                t_minus,
                scale,
                m: (rows * self.tokens()) as i32,
                n: n as i32,
                k: k as i32,
                lda: k as i32,
                ldc: n as i32,
                ld_add: n as i32,
                act: gemm_act(act),
            },
        )
    }

    /// A calibrated linear in the direct form as two fused GEMMs, the rank-r intermediate in
    /// the arena: for ranks the fused kernel does not take, and for comparison.
    fn calibrated_two_gemms(&self, layer: Linear, src: Act, dst: Act, act: Activation, rows: usize) -> Result<()> {
        let p = self;
        let (i, xs, ys) = p.calibrated_slots(layer)?;
        let low_id =
            p.pipeline.buffers.lowrank.ok_or_else(|| Error::invalid("GPU pipeline", "no low-rank buffer planned"))?;
        let (_, _, out, inp) = p.layer(layer);
        let m = (rows * p.tokens()) as i32;
        let (down, up, ranks, groups) = p.factors_of(layer)?;
        let ranks = &ranks[..groups as usize];
        let r_total: i32 = ranks.iter().sum();
        let low = p.pipeline.slice::<f16>(low_id)?;
        // T = (x − x_s)·downᵀ, the increment formed while staging, never stored.
        let mut g = GemmSpec::new(GemmOut::F16(low), p.act_slice(src)?, down, m, r_total, inp as i32);
        g.a_minus = Some(p.act_slice(Act::Cache(i, xs))?);
        p.pipeline.gemm(&g)?;
        // dst = act(y_s + T·upᵀ) per output group, or for q, k and v at once.
        let group = out / ranks.len();
        let (dst_s, ycache) = (p.act_slice(dst)?, p.act_slice(Act::Cache(i, ys))?);
        let merged = p.pipeline.buffers.factors[i].qkv_up.filter(|_| matches!(layer, Linear::Qkv(_)));
        if let Some(merged) = merged {
            let mut g = GemmSpec::new(GemmOut::F16(dst_s), low, p.pipeline.slice(merged)?, m, out as i32, r_total);
            g.add = Some((ycache, out as i32, m));
            g.act = gemm_act(act);
            return p.pipeline.gemm(&g);
        }
        let mut r0 = 0;
        for (grp, &rank) in ranks.iter().enumerate() {
            let off = grp * group;
            let mut g = GemmSpec::new(
                GemmOut::F16(dst_s.sub(off, dst_s.len() - off)?),
                low.sub(r0, low.len() - r0)?,
                up[grp],
                m,
                group as i32,
                rank,
            );
            g.lda = r_total;
            g.ldc = out as i32;
            g.add = Some((ycache.sub(off, ycache.len() - off)?, out as i32, m));
            g.act = gemm_act(act);
            p.pipeline.gemm(&g)?;
            r0 += rank as usize;
        }
        Ok(())
    }

    /// The buffer an activation lives in.
    fn act_id(&self, a: Act) -> Result<BufId> {
        let b = &self.pipeline.buffers;
        Ok(match a {
            Act::X => b.x,
            Act::H => b.h,
            Act::Qkv => b.qkv,
            Act::Attn => b.attn,
            Act::Y => b.y,
            Act::Mlp => b.mlp,
            Act::Out => b.out,
            Act::Cache(i, slot) => b.cache.get(i).and_then(|s| s[slot as usize]).ok_or_else(|| {
                Error::invalid("GPU pipeline", format!("cache slot {} of block {i} is not planned", slot.name()))
            })?,
        })
    }

    /// An activation's buffer, as f16 elements.
    fn act_slice(&self, a: Act) -> Result<DevSlice<f16>> {
        self.pipeline.slice(self.act_id(a)?)
    }

    /// The Taylor kernels' operands on one branch of `block` for `rows` rows: its factors, the
    /// activation `y` (read or written), the forecast table and the request state.
    fn taylor_branch(&self, block: usize, branch: Branch, y: Act, rows: usize) -> Result<TaylorBranch> {
        let cfg = &self.pipeline.model.config;
        let b = &self.pipeline.buffers;
        let id =
            b.forecast.get(block).map(|f| f[branch as usize]).ok_or_else(|| {
                Error::invalid("GPU pipeline", "no Taylor factors planned (cache policy taylor only)")
            })?;
        let table =
            b.forecast_table.ok_or_else(|| Error::invalid("GPU pipeline", "no Taylor forecast table planned"))?;
        let stride = self.pipeline.max_rows * cfg.tokens() * cfg.hidden_size;
        let factors = self.pipeline.slice::<f32>(id)?;
        Ok(TaylorBranch {
            factors,
            y: self.act_slice(y)?,
            table: self.pipeline.slice(table)?,
            state: self.pipeline.slice(b.state)?,
            n: (rows * cfg.tokens() * cfg.hidden_size) as i32,
            stride: stride as i32,
            levels: (factors.len() / stride) as i32,
            steps: self.pipeline.schedule.len() as i32,
        })
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

    /// A chunk of this step's modulation, from its start to the end of the buffer.
    fn chunk(&self, chunk: ModChunk) -> Result<DevSlice<f16>> {
        let all = self.pipeline.slice::<f16>(self.pipeline.buffers.mod_cur)?;
        let start = chunk.offset(&self.pipeline.model.config);
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
        self.run("patch embedding", None, |p| {
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

    fn norm_modulate(&mut self, dst: Act, norm: Norm, rows: usize) {
        self.run("LayerNorm-modulate", norm.block_index(), |p| {
            let cfg = &p.pipeline.model.config;
            let (r, tokens, c, stride) =
                ((rows * cfg.tokens()) as i32, cfg.tokens() as i32, cfg.hidden_size as i32, mod_width(cfg) as i32);
            let (out, x) = (p.act_slice(dst)?, p.pipeline.slice(p.pipeline.buffers.x)?);
            let (shift, scale) = (p.chunk(norm.shift)?, p.chunk(norm.scale)?);
            launch::layernorm_modulate_f32_stream(&p.pipeline.dev, out, x, shift, scale, r, tokens, c, stride, norm.eps)
        });
    }

    fn residual_norm_modulate(&mut self, src: Act, gate: ModChunk, dst: Act, norm: Norm, rows: usize) {
        // One kernel: the residual update of each row, then its LayerNorm.
        self.run("residual + LayerNorm-modulate", gate.block_index(), |p| {
            let cfg = &p.pipeline.model.config;
            let (r, tokens, c, stride) =
                ((rows * cfg.tokens()) as i32, cfg.tokens() as i32, cfg.hidden_size as i32, mod_width(cfg) as i32);
            let (out, x, y) = (p.act_slice(dst)?, p.pipeline.slice(p.pipeline.buffers.x)?, p.act_slice(src)?);
            let (gate, shift, scale) = (p.chunk(gate)?, p.chunk(norm.shift)?, p.chunk(norm.scale)?);
            launch::residual_layernorm_modulate_f32_stream(
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
                norm.eps,
            )
        });
    }

    fn linear(&mut self, layer: Linear, src: Act, dst: Act, act: Activation, rows: usize) {
        let what = if layer == Linear::Final { "final linear" } else { "block linear" };
        self.run(what, layer.block_index(), |p| {
            let (w, bias, out, k) = p.layer(layer);
            let m = (rows * p.tokens()) as i32;
            let o = match dst {
                Act::Out => GemmOut::F32(p.pipeline.slice(p.pipeline.buffers.out)?),
                _ => GemmOut::F16(p.act_slice(dst)?),
            };
            let mut g = GemmSpec::new(o, p.act_slice(src)?, p.pipeline.slice(w)?, m, out as i32, k as i32);
            g.bias = Some(p.pipeline.slice(bias)?);
            g.act = gemm_act(act);
            g.also = p.keep_projection(layer, src)?;
            p.pipeline.gemm(&g)
        });
    }

    fn linear_gelu_keep_pre(&mut self, layer: Linear, src: Act, pre: Act, post: Act, rows: usize) {
        // One GEMM writes both: `pre` before its GELU epilogue, `post` after.
        self.run("block linear", layer.block_index(), |p| {
            let (w, bias, out, k) = p.layer(layer);
            let m = (rows * p.tokens()) as i32;
            let mut g = GemmSpec::new(
                GemmOut::F16(p.act_slice(post)?),
                p.act_slice(src)?,
                p.pipeline.slice(w)?,
                m,
                out as i32,
                k as i32,
            );
            g.bias = Some(p.pipeline.slice(bias)?);
            g.pre = Some(p.act_slice(pre)?);
            g.act = GemmAct::GeluTanh;
            g.also = p.keep_projection(layer, src)?;
            p.pipeline.gemm(&g)
        });
    }

    fn linear_calibrated(&mut self, layer: Linear, src: Act, dst: Act, act: Activation, rows: usize) {
        self.run("calibrated linear", layer.block_index(), |p| {
            if !p.pipeline.icc.fused {
                return p.calibrated_two_gemms(layer, src, dst, act, rows);
            }
            let (i, xs, ys) = p.calibrated_slots(layer)?;
            let (out, x) = (p.act_slice(dst)?, p.act_slice(src)?);
            let y_s = || p.act_slice(Act::Cache(i, ys));
            match p.pipeline.icc.form {
                // y_s + up·(down·(x − x_s))
                IccForm::Direct => {
                    p.lowrank(layer, out, x, Some(p.act_slice(Act::Cache(i, xs))?), None, y_s()?, 1.0, act, rows)
                }
                // b_s + up·(down·x)
                IccForm::Folded => p.lowrank(layer, out, x, None, None, p.base::<f16>(layer)?, 1.0, act, rows),
                // y_s + up·(down·x − t_s)
                _ => p.lowrank(layer, out, x, None, Some(p.base::<f32>(layer)?), y_s()?, 1.0, act, rows),
            }
        });
    }

    fn refresh_base(&mut self, layer: Linear, rows: usize) {
        // The projected form's t_s came with the linear itself (`keep_projection`).
        if self.pipeline.icc.form != IccForm::Folded {
            return;
        }
        self.run("b_s refresh", layer.block_index(), |p| {
            // b_s = y_s − up·(down·x_s), from the slots the full step has just written.
            let (i, xs, ys) = p.calibrated_slots(layer)?;
            let (x_s, y_s) = (p.act_slice(Act::Cache(i, xs))?, p.act_slice(Act::Cache(i, ys))?);
            p.lowrank(layer, p.base::<f16>(layer)?, x_s, None, None, y_s, -1.0, Activation::None, rows)
        });
    }

    fn attention(&mut self, src: Act, dst: Act, rows: usize) {
        self.run_in("attention", None, |p| {
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

    fn gated_residual(&mut self, src: Act, gate: ModChunk, rows: usize) {
        self.run("gated residual", gate.block_index(), |p| {
            let cfg = &p.pipeline.model.config;
            launch::gated_residual_add_f32_stream(
                &p.pipeline.dev,
                p.pipeline.slice(p.pipeline.buffers.x)?,
                p.act_slice(src)?,
                p.chunk(gate)?,
                (rows * cfg.tokens()) as i32,
                cfg.tokens() as i32,
                cfg.hidden_size as i32,
                mod_width(cfg) as i32,
            )
        });
    }

    fn forecast_update(&mut self, block: usize, branch: Branch, src: Act, rows: usize) {
        self.run("Taylor factor update", Some(block), |p| {
            launch::forecast_update_f32(&p.pipeline.dev, &p.taylor_branch(block, branch, src, rows)?)
        });
    }

    fn forecast(&mut self, block: usize, branch: Branch, dst: Act, rows: usize) {
        self.run("Taylor forecast", Some(block), |p| {
            launch::forecast_f16(&p.pipeline.dev, &p.taylor_branch(block, branch, dst, rows)?)
        });
    }

    fn unpatchify(&mut self, rows: usize) {
        self.run("unpatchify", None, |p| {
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
