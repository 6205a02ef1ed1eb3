//! Finding where NaN or Inf first appears in a forward pass. The sampler checks only the
//! model output of each step (cheap); when that trips, the same step is run again through
//! [`Probe`], which wraps the CPU ops and scans each op's output, so the error can name
//! the block and operation — and then the weight tensor of that block that is not finite,
//! if one is.

use super::CpuEngine;
use crate::forward::{self, Act, Activation, DitOps, Linear, Modulation, StepKind};

/// Where non-finite values first appeared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NonFiniteAt {
    /// The block, or `None` for the embeddings and the final layer.
    pub block: Option<usize>,
    /// A readable location, e.g. "block 3 (mlp.fc1 output)".
    pub location: String,
    /// A weight tensor (official name) holding NaN or Inf, when one was found.
    pub tensor: Option<String>,
}

/// The CPU ops with a finiteness check of every output.
struct Probe<'a> {
    e: &'a mut CpuEngine,
    block: Option<usize>,
    found: Option<(Option<usize>, String)>,
}

impl Probe<'_> {
    fn check(&mut self, buf: super::BufId, len: usize, what: &str) {
        if self.found.is_some() {
            return;
        }
        let s = &self.e.slice(buf)[..len];
        if s.iter().any(|v| !v.is_finite()) {
            let at = match self.block {
                Some(i) => format!("block {i} ({what})"),
                None => what.to_string(),
            };
            self.found = Some((self.block, at));
        }
    }

    fn check_act(&mut self, a: Act, rows: usize, what: &str) {
        let cfg = self.e.model.config;
        let (n, c, m) = (cfg.tokens(), cfg.hidden_size, cfg.mlp_hidden());
        let width = match a {
            Act::X | Act::H | Act::Attn | Act::Y => c,
            Act::Qkv => 3 * c,
            Act::Mlp => m,
            Act::Out => cfg.patch_size * cfg.patch_size * cfg.out_channels(),
            Act::Cache(_, slot) => slot.width(&cfg),
        };
        let id = self.e.act_buf(a);
        self.check(id, rows * n * width, what);
    }
}

fn layer_name(l: Linear) -> &'static str {
    match l {
        Linear::Qkv(_) => "attn.qkv",
        Linear::Proj(_) => "attn.proj",
        Linear::Fc1(_) => "mlp.fc1",
        Linear::Fc2(_) => "mlp.fc2",
        Linear::Final => "final_layer.linear",
    }
}

impl DitOps for Probe<'_> {
    fn embed_patches(&mut self, rows: usize) {
        self.e.embed_patches(rows);
        let n = self.e.model.config.tokens();
        let c = self.e.model.config.hidden_size;
        self.check(self.e.bufs.x, rows * n * c, "patch embedding (x_embedder + pos_embed)");
    }
    fn embed_conditioning(&mut self, rows: usize) {
        self.e.embed_conditioning(rows);
        let c = self.e.model.config.hidden_size;
        self.check(self.e.bufs.c, rows * c, "conditioning (t_embedder + y_embedder)");
    }
    fn modulation(&mut self, which: Modulation, rows: usize) {
        self.block = match which {
            Modulation::Block(i) => Some(i),
            Modulation::Final => None,
        };
        self.e.modulation(which, rows);
        let c = self.e.model.config.hidden_size;
        let what = if self.block.is_some() { "adaLN_modulation output" } else { "final_layer.adaLN_modulation output" };
        self.check(self.e.bufs.modv, rows * 6 * c, what);
    }
    fn norm_modulate(&mut self, dst: Act, shift: usize, scale: usize, eps: f32, rows: usize) {
        self.e.norm_modulate(dst, shift, scale, eps, rows);
        self.check_act(dst, rows, "LayerNorm + modulate output");
    }
    fn linear(&mut self, layer: Linear, src: Act, dst: Act, act: Activation, rows: usize) {
        self.e.linear(layer, src, dst, act, rows);
        self.check_act(dst, rows, &format!("{} output", layer_name(layer)));
    }
    fn linear_calibrated(&mut self, layer: Linear, src: Act, dst: Act, act: Activation, rows: usize) {
        self.e.linear_calibrated(layer, src, dst, act, rows);
        self.check_act(dst, rows, &format!("{} calibrated output", layer_name(layer)));
    }
    fn gelu(&mut self, src: Act, dst: Act, rows: usize) {
        self.e.gelu(src, dst, rows);
        self.check_act(dst, rows, "GELU output");
    }
    fn attention(&mut self, src: Act, dst: Act, rows: usize) {
        self.e.attention(src, dst, rows);
        self.check_act(dst, rows, "attention output");
    }
    fn gated_residual(&mut self, src: Act, gate: usize, rows: usize) {
        self.e.gated_residual(src, gate, rows);
        self.check_act(Act::X, rows, "gated residual");
    }
    fn unpatchify(&mut self, rows: usize) {
        self.e.unpatchify(rows);
        let len = rows * self.e.model.config.output_elems();
        self.check(self.e.bufs.image, len, "final layer output");
    }
}

impl CpuEngine {
    /// Runs the forward pass on the inputs staged by the last call again, checking every
    /// op's output, and says where NaN or Inf first appeared (`None` if the pass is
    /// finite this time). A full step writes the same caches again; calibrated and reuse
    /// steps only read them. Allocates (it runs only after a failure).
    pub fn locate_non_finite(&mut self, rows: usize, kind: StepKind) -> Option<NonFiniteAt> {
        let cfg = self.model.config;
        let eps = self.model.mlp_norm_eps;
        let found = {
            let mut probe = Probe { e: self, block: None, found: None };
            forward::forward(&mut probe, &cfg, eps, rows, kind);
            probe.found
        }?;
        let (block, location) = found;
        let mut tensor = self.model.non_finite_tensor(block);
        if tensor.is_none() {
            if let (Some(i), super::CacheMode::Icc(f)) = (block, &self.cache) {
                tensor = f.non_finite_tensor(i);
            }
        }
        Some(NonFiniteAt { block, location, tensor })
    }
}
