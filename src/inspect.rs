//! `icdit inspect`: what a checkpoint is — layout, config, dtypes, sizes, and the memory a
//! CPU engine would plan for it.

use serde::Serialize;

use crate::config::{Numerics, SampleSpace};
use crate::cpu::{self, CpuOptions};
use crate::weights::DitModel;

/// The facts `inspect` prints, as text or as one JSON object.
#[derive(Debug, Serialize)]
pub struct Report {
    pub source: String,
    pub layout: &'static str,
    pub numerics: Numerics,
    pub depth: usize,
    pub hidden_size: usize,
    pub num_heads: usize,
    pub head_dim: usize,
    pub patch_size: usize,
    pub input_size: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub learn_sigma: bool,
    pub num_classes: usize,
    pub mlp_ratio: f64,
    pub tokens: usize,
    pub space: SampleSpace,
    pub class_names: Option<Vec<String>>,
    /// Stored tensors per dtype.
    pub dtypes: std::collections::BTreeMap<String, usize>,
    pub parameters: usize,
    /// Bytes the parameters take in each precision.
    pub bytes_f32: usize,
    pub bytes_f16: usize,
    pub bytes_bf16: usize,
    pub file_bytes: usize,
    /// Multiply-accumulates of one single-image forward.
    pub forward_gmacs: f64,
    /// The CPU plan for the requested batch.
    pub batch: usize,
    pub guidance: bool,
    pub cpu_arena_bytes: usize,
    /// The CPU instruction-set path a CPU engine would run here (`ICDIT_CPU_ISA` or the best),
    /// or the error that setting gives.
    pub cpu_isa: String,
    /// Every path this CPU runs, portable first.
    pub cpu_isas_available: Vec<&'static str>,
}

impl Report {
    pub fn new(model: &DitModel, opts: &CpuOptions) -> Self {
        let c = &model.config;
        let params = c.param_count();
        let plan = cpu::plan_for(model, opts);
        Report {
            source: model.source.display().to_string(),
            layout: model.layout.name(),
            numerics: model.numerics,
            depth: c.depth,
            hidden_size: c.hidden_size,
            num_heads: c.num_heads,
            head_dim: c.head_dim(),
            patch_size: c.patch_size,
            input_size: c.input_size,
            in_channels: c.in_channels,
            out_channels: c.out_channels(),
            learn_sigma: c.learn_sigma,
            num_classes: c.num_classes,
            mlp_ratio: c.mlp_ratio,
            tokens: c.tokens(),
            space: model.space,
            class_names: model.class_names.clone(),
            dtypes: model.dtypes.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            parameters: params,
            bytes_f32: params * 4,
            bytes_f16: params * 2,
            bytes_bf16: params * 2,
            file_bytes: model.file_bytes(),
            forward_gmacs: c.forward_macs() as f64 / 1e9,
            batch: opts.max_batch,
            guidance: opts.guidance,
            cpu_arena_bytes: plan.total_bytes(),
            cpu_isa: cpu::Isa::resolve(opts.isa).map_or_else(|e| format!("error: {e}"), |i| i.name().to_string()),
            cpu_isas_available: cpu::Isa::available().map(|i| i.name()).collect(),
        }
    }
}

fn mib(b: usize) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dtypes: Vec<String> = self.dtypes.iter().map(|(k, v)| format!("{k} ×{v}")).collect();
        writeln!(f, "source        {}", self.source)?;
        writeln!(f, "layout        {} (numerics: {:?})", self.layout, self.numerics)?;
        writeln!(
            f,
            "architecture  depth {}, hidden {}, {} heads × {}, patch {}, mlp ratio {}",
            self.depth, self.hidden_size, self.num_heads, self.head_dim, self.patch_size, self.mlp_ratio
        )?;
        writeln!(
            f,
            "input         {} × {}×{} ({:?} space), {} tokens",
            self.in_channels, self.input_size, self.input_size, self.space, self.tokens
        )?;
        writeln!(f, "output        {} channels (learn_sigma {})", self.out_channels, self.learn_sigma)?;
        writeln!(f, "classes       {} (+ null class {})", self.num_classes, self.num_classes)?;
        if let Some(names) = &self.class_names {
            writeln!(f, "class names   {}", names.join(", "))?;
        }
        writeln!(f, "tensors       {}", dtypes.join(", "))?;
        writeln!(
            f,
            "parameters    {} ({} f32, {} f16/bf16); files {}",
            self.parameters,
            mib(self.bytes_f32),
            mib(self.bytes_f16),
            mib(self.file_bytes)
        )?;
        writeln!(f, "compute       {:.2} GMACs per image per forward", self.forward_gmacs)?;
        writeln!(f, "CPU path      {} (this CPU runs: {})", self.cpu_isa, self.cpu_isas_available.join(", "))?;
        write!(
            f,
            "CPU arena     {} for batch {}{}",
            mib(self.cpu_arena_bytes),
            self.batch,
            if self.guidance { " with guidance (2× rows)" } else { "" }
        )
    }
}
