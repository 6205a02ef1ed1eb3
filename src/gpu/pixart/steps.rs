//! Sampling on the device: [`PixArtGpu`] as the runner of [`PixArtEngine`]'s loop
//! ([`PixArtRunner`]) that keeps the latents on the device and runs guidance and the sampler
//! update there ([`PixArtDeviceSteps`]), replaying one recorded graph per step kind.

use std::sync::Arc;

use super::{PixArtGpu, PixArtGpuOptions, STEP_IN};
use crate::error::{Error, Result};
use crate::forward::StepKind;
use crate::gpu::Device;
use crate::pixart::engine::{PixArtDeviceSteps, PixArtRunner};
use crate::pixart::sampler::TRAIN_STEPS;
use crate::pixart::{PixArtEngine, PixArtModel, PixArtOptions};
use crate::plan::Plan;

impl<D: Device> PixArtRunner for PixArtGpu<D> {
    fn model(&self) -> &Arc<PixArtModel> {
        &self.model
    }
    fn max_rows(&self) -> usize {
        self.max_rows
    }
    fn max_text_len(&self) -> usize {
        self.max_text_len
    }
    fn stage_text(&mut self, text: &[f32], mask: &[i64], rows: usize, len: usize) -> Result<()> {
        PixArtGpu::stage_text(self, text, mask, rows, len)
    }
    fn stage_size(&mut self, resolution: &[f32], aspect: &[f32], rows: usize) -> Result<()> {
        PixArtGpu::stage_size(self, resolution, aspect, rows)
    }
    fn stage_inputs(&mut self, x: &[f32], t: &[f32], rows: usize) -> Result<()> {
        PixArtGpu::stage_inputs(self, x, t, rows)
    }
    fn run(&mut self, rows: usize, kind: StepKind) -> Result<()> {
        PixArtGpu::run(self, rows, kind)
    }
    fn output(&self, rows: usize) -> &[f32] {
        PixArtGpu::output(self, rows)
    }
    fn cached_rows(&self) -> Option<usize> {
        self.cached_rows
    }
    fn device_steps(&mut self) -> Option<&mut dyn PixArtDeviceSteps> {
        Some(self)
    }
}

impl<D: Device> PixArtDeviceSteps for PixArtGpu<D> {
    fn set_schedule(&mut self, coeffs: &[f32]) -> Result<()> {
        let steps = coeffs.len() / 6;
        if steps == 0 || steps > TRAIN_STEPS || coeffs.len() != steps * 6 {
            return Err(Error::invalid(
                "sampler coefficients",
                format!("{} values: 6 per step, 1 to {TRAIN_STEPS} steps", coeffs.len()),
            ));
        }
        self.coeffs_host = coeffs.to_vec();
        Ok(())
    }

    fn begin(&mut self, latents: &[f32], images: usize, guided: bool, cfg_scale: f32) -> Result<()> {
        let img = self.model.config.image_elems();
        let rows = if guided { 2 * images } else { images };
        if images == 0 || rows > self.max_rows || latents.len() != images * img {
            return Err(Error::invalid(
                "latents",
                format!(
                    "{} values for {images} images ({rows} rows; this engine takes {})",
                    latents.len(),
                    self.max_rows
                ),
            ));
        }
        self.dev.upload(self.slice::<f32>(self.bufs.latents)?.sub(0, latents.len())?, latents)?;
        self.dev.upload(self.slice::<i32>(self.bufs.state)?, &[0, -1, -1])?;
        (self.images, self.guided, self.cfg_scale) = (images, guided, cfg_scale);
        // Full-size requests replay one recorded step per kind; recorded again only when the
        // caption length (or the request's shape) changes.
        let key = (self.text_len, images, guided);
        if rows == self.max_rows && self.graph_key != Some(key) {
            self.graphs.clear();
            self.graph_key = None;
            for &kind in self.cache.policy().step_kinds() {
                self.dev.begin_capture()?;
                let recorded = self.step_launches(kind);
                let graph = self.dev.end_capture();
                recorded?;
                self.graphs.push((kind, graph?));
            }
            self.graph_key = Some(key);
        }
        Ok(())
    }

    fn step(&mut self, index: usize, timestep: f32, kind: StepKind) -> Result<()> {
        let steps = self.coeffs_host.len() / STEP_IN;
        if index >= steps || self.images == 0 {
            return Err(Error::invalid("sampling step", format!("step {index} of {steps} (no request begun?)")));
        }
        let n = self.images;
        let rows = if self.guided { 2 * n } else { n };
        self.check(rows, kind)?;
        // This step's numbers and timesteps: one small upload, read by the step's launches.
        self.step_host[..STEP_IN].copy_from_slice(&self.coeffs_host[index * STEP_IN..][..STEP_IN]);
        self.step_host[STEP_IN..STEP_IN + rows].fill(timestep);
        let len = STEP_IN + rows;
        self.dev.upload(self.slice::<f32>(self.bufs.step_in)?.sub(0, len)?, &self.step_host[..len])?;
        let graph = match self.graph_key {
            Some((len, images, guided)) if (len, images, guided) == (self.text_len, n, self.guided) => {
                self.graphs.iter().find(|g| g.0 == kind)
            }
            _ => None,
        };
        match graph {
            Some((_, g)) => self.dev.launch_graph(g)?,
            None => self.step_launches(kind)?,
        }
        if kind == StepKind::Full {
            self.cached_rows = Some(rows);
        }
        Ok(())
    }

    fn latents(&mut self, out: &mut [f32]) -> Result<()> {
        self.dev.download(self.slice::<f32>(self.bufs.latents)?.sub(0, out.len())?, out)
    }

    fn first_non_finite(&mut self) -> Result<Option<(usize, &'static str)>> {
        let mut state = [0i32; 3];
        self.dev.download(self.slice::<i32>(self.bufs.state)?, &mut state)?;
        Ok(match state {
            [_, s, _] if s >= 0 => Some((s as usize, "the model output")),
            [_, _, s] if s >= 0 => Some((s as usize, "the latents after the sampler update")),
            _ => None,
        })
    }

    fn denoised(&mut self, out: &mut [f32]) -> Result<()> {
        self.dev.download(self.slice::<f32>(self.bufs.x0)?.sub(0, out.len())?, out)
    }
}

/// A PixArt-α sampler whose passes run on a device.
pub type PixArtGpuEngine<D> = PixArtEngine<PixArtGpu<D>>;

impl<D: Device> PixArtEngine<PixArtGpu<D>> {
    /// A PixArt engine on the device `open` gives (e.g. `EmuDevice::new`), planned for the
    /// options' batch (rows under guidance), caption length and cache policy.
    pub fn new_gpu(
        model: Arc<PixArtModel>,
        opts: &PixArtOptions,
        open: impl FnOnce(&Plan) -> Result<D>,
    ) -> Result<Self> {
        opts.validate()?;
        let gpu_opts = PixArtGpuOptions {
            max_rows: opts.model_rows(opts.max_batch),
            max_text_len: opts.max_text_len,
            cache: opts.cache.clone(),
        };
        PixArtEngine::with_runner(PixArtGpu::new(model, &gpu_opts, open)?, opts)
    }
}
