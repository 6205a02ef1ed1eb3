//! What the GPU pipeline uploads once, when it is built: the model's weights and icc's
//! factors converted to f16 through a fixed staging buffer, the timestep frequencies and the
//! sampler's per-step coefficients.

use std::sync::Arc;

use super::plan::COEFFS;
use super::GpuBackend;
use crate::diffusion::Sampler;
use crate::embed;
use crate::error::{Error, Result};
use crate::factors::{Factors, LayerType};
use crate::gpu::launch;
use crate::gpu::{f16, DevSlice, Device};
use crate::plan::BufId;
use crate::policy;
use crate::weights::TRef;

/// Elements converted to f16 per upload while the weights are staged (2 MiB).
const STAGING: usize = 1 << 20;

/// Uploads f32 host values into f16 device buffers through one fixed staging buffer, so that
/// converting a model's weights never holds an f16 copy of them on the host (the DiT and
/// PixArt-α pipelines' uploads).
pub(crate) struct F16Staging(Vec<f16>);

impl F16Staging {
    pub(crate) fn new() -> Self {
        F16Staging(vec![f16::ZERO; STAGING])
    }

    /// Converts `src` to f16 chunk by chunk and uploads it at `dst` (of the same length).
    pub(crate) fn put<D: Device + ?Sized>(&mut self, dev: &D, dst: DevSlice<f16>, src: &[f32]) -> Result<()> {
        if src.len() != dst.len() {
            return Err(Error::invalid("GPU upload", format!("{} values for {dst:?}", src.len())));
        }
        let per = self.0.len();
        for (i, chunk) in src.chunks(per).enumerate() {
            let st = &mut self.0[..chunk.len()];
            for (h, &v) in st.iter_mut().zip(chunk) {
                *h = f16::from_f32(v);
            }
            dev.upload(dst.sub(i * per, chunk.len())?, st)?;
        }
        Ok(())
    }
}

impl<D: Device> GpuBackend<D> {
    /// Every weight in its f16 buffer; all blocks' adaLN weights and the final layer's as
    /// one stacked matrix (see `conditioning`).
    pub(super) fn upload_weights(&mut self) -> Result<()> {
        let model = Arc::clone(&self.model);
        let t = &model.tensors;
        let (c, d) = (model.config.hidden_size, model.config.depth);
        let mut staging = F16Staging::new();
        let b = &self.buffers;
        let mut pairs: Vec<(BufId, TRef)> = vec![
            (b.patch_w, t.patch_w),
            (b.patch_b, t.patch_b),
            (b.pos, t.pos_embed),
            (b.t_mlp_in_w, t.t_mlp0_w),
            (b.t_mlp_in_b, t.t_mlp0_b),
            (b.t_mlp_out_w, t.t_mlp2_w),
            (b.t_mlp_out_b, t.t_mlp2_b),
            (b.table, t.label_table),
            (b.final_w, t.final_w),
            (b.final_b, t.final_b),
        ];
        for (bw, bt) in b.blocks.iter().zip(&t.blocks) {
            pairs.extend([
                (bw.qkv_w, bt.qkv_w),
                (bw.qkv_b, bt.qkv_b),
                (bw.proj_w, bt.proj_w),
                (bw.proj_b, bt.proj_b),
                (bw.fc1_w, bt.fc1_w),
                (bw.fc1_b, bt.fc1_b),
                (bw.fc2_w, bt.fc2_w),
                (bw.fc2_b, bt.fc2_b),
            ]);
        }
        for (id, r) in pairs {
            staging.put(&self.dev, self.slice(id)?, model.w(r))?;
        }
        // adaLN: every block's (6C, C) then the final (2C, C), one matrix.
        let (aw, ab) = (self.slice::<f16>(b.ada_w)?, self.slice::<f16>(b.ada_b)?);
        for (i, bt) in t.blocks.iter().enumerate() {
            staging.put(&self.dev, aw.sub(i * 6 * c * c, 6 * c * c)?, model.w(bt.ada_w))?;
            staging.put(&self.dev, ab.sub(i * 6 * c, 6 * c)?, model.w(bt.ada_b))?;
        }
        staging.put(&self.dev, aw.sub(d * 6 * c * c, 2 * c * c)?, model.w(t.final_ada_w))?;
        staging.put(&self.dev, ab.sub(d * 6 * c, 2 * c)?, model.w(t.final_ada_b))?;
        Ok(())
    }

    /// icc's rank-r factors in f16, and q, k and v's merged up factor where one is planned.
    pub(super) fn upload_factors(&mut self, f: &Factors) -> Result<()> {
        let mut staging = F16Staging::new();
        for (bf, blk) in self.buffers.factors.iter().zip(&f.blocks) {
            staging.put(&self.dev, self.slice(bf.down[0])?, f.w(blk.qkv_down))?;
            for (j, t) in [LayerType::Proj, LayerType::Fc1, LayerType::Fc2].into_iter().enumerate() {
                staging.put(&self.dev, self.slice(bf.down[j + 1])?, f.w(blk.get(t).down))?;
            }
            for (j, t) in LayerType::ALL.into_iter().enumerate() {
                staging.put(&self.dev, self.slice(bf.up[j])?, f.w(blk.get(t).up))?;
            }
            if let Some(id) = bf.qkv_up {
                // Rows g·C .. (g+1)·C hold group g's up factor at its columns of the shared
                // low-rank product; zeros elsewhere (exact zeros in every product).
                let c = self.model.config.hidden_size;
                let r_total = blk.qkv_rank();
                let mut merged = vec![0.0f32; 3 * c * r_total];
                let mut r0 = 0;
                for (g, t) in [LayerType::Q, LayerType::K, LayerType::V].into_iter().enumerate() {
                    let (up, r) = (f.w(blk.get(t).up), blk.get(t).rank);
                    for row in 0..c {
                        merged[(g * c + row) * r_total + r0..][..r].copy_from_slice(&up[row * r..(row + 1) * r]);
                    }
                    r0 += r;
                }
                staging.put(&self.dev, self.slice(id)?, &merged)?;
            }
        }
        Ok(())
    }

    /// The timestep frequencies and the sampler's per-step coefficients.
    pub(super) fn upload_constants(&mut self) -> Result<()> {
        let freqs = embed::timestep_freqs(self.model.numerics);
        self.dev.upload(self.slice::<f32>(self.buffers.freqs)?, &freqs)?;
        let eta = match self.opts.sampler {
            Sampler::Ddim { eta } => eta,
            Sampler::Ddpm => 0.0,
        };
        let steps = self.schedule.len();
        let mut table = vec![0.0f32; steps * COEFFS];
        for s in 0..steps {
            let row = launch::sampler_coeffs(&self.schedule.coeffs(steps - 1 - s), eta);
            table[s * COEFFS..][..COEFFS].copy_from_slice(&row);
        }
        self.dev.upload(self.slice::<f32>(self.buffers.coeffs)?, &table)?;
        if let (Some(f), Some(id)) = (self.opts.cache.forecast(), self.buffers.forecast_table) {
            // Taylor forecasting's numbers of every step (kernels/forecast.cu's table layout).
            let w = launch::FORECAST_TABLE;
            let mut rows = vec![0.0f32; steps * w];
            for s in 0..steps {
                let st = policy::forecast_step(&self.opts.full_steps, f, s);
                let row = &mut rows[s * w..][..w];
                row[0] = st.orders as f32;
                row[1] = st.delta;
                row[2..2 + st.weights.len()].copy_from_slice(&st.weights);
            }
            self.dev.upload(self.slice::<f32>(id)?, &rows)?;
        }
        Ok(())
    }
}
