//! Finding where NaN or Inf first appears in a forward pass. The sampler checks only the
//! model output of each step (cheap); when that trips, the same step is run again through
//! [`Probe`], which wraps the CPU ops and scans each op's output, so the error can name
//! the block and operation — and then the weight tensor of that block that is not finite,
//! if one is.

use super::CpuEngine;
use crate::forward::{self, Act, Activation, Branch, ConditioningOps, DitOps, Linear, ModChunk, Norm, StepKind};

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

/// The CPU ops with a finiteness check of every output, in the order the forward pass runs
/// them: the conditioning is computed first but checked where the reference forward computes
/// it (c after the patch embedding, each modulation vector as its block begins), so the first
/// non-finite tensor named is the first the official code would meet.
struct Probe<'a> {
    engine: &'a mut CpuEngine,
    /// The block the ops run in (`None`: the embeddings or the final layer).
    block: Option<usize>,
    /// Whether the current block's (or the final layer's) modulation vector was checked.
    modulation_checked: bool,
    /// Rows of the pass.
    rows: usize,
    found: Option<(Option<usize>, String)>,
}

impl Probe<'_> {
    /// Moves into the block of the next op (`None`: the final layer), checking its
    /// modulation vector first, as the reference computes it as the block begins.
    fn enter(&mut self, block: Option<usize>) {
        if block == self.block && self.modulation_checked {
            return;
        }
        self.block = block;
        self.modulation_checked = true;
        let cfg = self.engine.model.config;
        let (c, width) = (cfg.hidden_size, forward::modulation_width(&cfg));
        let (of, len, what) = match block {
            Some(i) => (ModChunk::block(i, 0), 6 * c, "adaLN_modulation output"),
            None => (ModChunk::final_layer(0), 2 * c, "final_layer.adaLN_modulation output"),
        };
        let start = of.offset(&cfg);
        let bad = (0..self.rows).any(|r| {
            self.engine.slice(self.engine.bufs.modv)[r * width + start..][..len].iter().any(|v| !v.is_finite())
        });
        if bad && self.found.is_none() {
            let at = match block {
                Some(i) => format!("block {i} ({what})"),
                None => what.to_string(),
            };
            self.found = Some((block, at));
        }
    }

    fn check(&mut self, buf: super::BufId, len: usize, what: &str) {
        if self.found.is_some() {
            return;
        }
        let s = &self.engine.slice(buf)[..len];
        if s.iter().any(|v| !v.is_finite()) {
            let at = match self.block {
                Some(i) => format!("block {i} ({what})"),
                None => what.to_string(),
            };
            self.found = Some((self.block, at));
        }
    }

    fn check_act(&mut self, a: Act, rows: usize, what: &str) {
        let cfg = self.engine.model.config;
        let (n, c, m) = (cfg.tokens(), cfg.hidden_size, cfg.mlp_hidden());
        let width = match a {
            Act::X | Act::H | Act::Attn | Act::Y => c,
            Act::Qkv => 3 * c,
            Act::Mlp => m,
            Act::Out => cfg.patch_size * cfg.patch_size * cfg.out_channels(),
            Act::Cache(_, slot) => slot.width(&cfg),
        };
        let id = self.engine.act_buf(a);
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

impl ConditioningOps for Probe<'_> {
    // Checked later, where the reference computes them (see `Probe`).
    fn embed_conditioning(&mut self, rows: usize) {
        self.engine.embed_conditioning(rows);
    }
    fn modulations(&mut self, rows: usize) {
        self.engine.modulations(rows);
    }
}

impl DitOps for Probe<'_> {
    fn embed_patches(&mut self, rows: usize) {
        self.engine.embed_patches(rows);
        let n = self.engine.model.config.tokens();
        let c = self.engine.model.config.hidden_size;
        self.check(self.engine.bufs.x, rows * n * c, "patch embedding (x_embedder + pos_embed)");
        self.check(self.engine.bufs.c, rows * c, "conditioning (t_embedder + y_embedder)");
    }
    fn norm_modulate(&mut self, dst: Act, norm: Norm, rows: usize) {
        self.enter(norm.block_index());
        self.engine.norm_modulate(dst, norm, rows);
        self.check_act(dst, rows, "LayerNorm + modulate output");
    }
    fn residual_norm_modulate(&mut self, src: Act, gate: ModChunk, dst: Act, norm: Norm, rows: usize) {
        self.gated_residual(src, gate, rows);
        self.norm_modulate(dst, norm, rows);
    }
    fn linear(&mut self, layer: Linear, src: Act, dst: Act, act: Activation, rows: usize) {
        self.enter(layer.block_index());
        self.engine.linear(layer, src, dst, act, rows);
        self.check_act(dst, rows, &format!("{} output", layer_name(layer)));
    }
    fn linear_gelu_keep_pre(&mut self, layer: Linear, src: Act, pre: Act, post: Act, rows: usize) {
        self.linear(layer, src, pre, Activation::None, rows);
        self.engine.gelu(pre, post, rows);
        self.check_act(post, rows, "GELU output");
    }
    fn linear_calibrated(&mut self, layer: Linear, src: Act, dst: Act, act: Activation, rows: usize) {
        self.enter(layer.block_index());
        self.engine.linear_calibrated(layer, src, dst, act, rows);
        self.check_act(dst, rows, &format!("{} calibrated output", layer_name(layer)));
    }
    fn refresh_base(&mut self, layer: Linear, rows: usize) {
        self.engine.refresh_base(layer, rows);
    }
    fn attention(&mut self, src: Act, dst: Act, rows: usize) {
        self.engine.attention(src, dst, rows);
        self.check_act(dst, rows, "attention output");
    }
    fn gated_residual(&mut self, src: Act, gate: ModChunk, rows: usize) {
        self.enter(gate.block_index());
        self.engine.gated_residual(src, gate, rows);
        self.check_act(Act::X, rows, "gated residual");
    }
    fn forecast_update(&mut self, block: usize, branch: Branch, src: Act, rows: usize) {
        self.enter(Some(block));
        self.engine.forecast_update(block, branch, src, rows);
    }
    fn forecast(&mut self, block: usize, branch: Branch, dst: Act, rows: usize) {
        self.enter(Some(block));
        self.engine.forecast(block, branch, dst, rows);
        self.check_act(dst, rows, "Taylor forecast of a branch output");
    }
    fn unpatchify(&mut self, rows: usize) {
        self.engine.unpatchify(rows);
        let len = rows * self.engine.model.config.output_elems();
        self.check(self.engine.bufs.image, len, "final layer output");
    }
}

impl CpuEngine {
    /// Runs the forward pass on the inputs staged by the last call again, checking every
    /// op's output, and says where NaN or Inf first appeared (`None` if the pass is
    /// finite this time). A full step writes the same caches again (a Taylor-full step updates
    /// its factors again: the request fails anyway); calibrated and reuse
    /// steps only read them. Allocates (it runs only after a failure).
    pub fn locate_non_finite(&mut self, rows: usize, kind: StepKind) -> Option<NonFiniteAt> {
        let cfg = self.model.config;
        let eps = self.model.mlp_norm_eps;
        // After a pass on steps conditioned ahead, that step's timesteps and labels become rows
        // 0..rows again, and the probe computes their conditioning afresh.
        if self.mod_base != 0 {
            let base = self.mod_base;
            self.t.copy_within(base..base + rows, 0);
            self.y.copy_within(base..base + rows, 0);
        }
        self.ahead = None;
        self.mod_base = 0;
        let found = {
            let mut probe = Probe { engine: self, block: None, modulation_checked: false, rows, found: None };
            forward::conditioning(&mut probe, rows);
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
