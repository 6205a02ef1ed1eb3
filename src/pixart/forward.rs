//! The PixArt-α transformer forward (reference doc, "Transformer"), written once against
//! [`PixArtOps`] for every kind of step the cache policies need: plain, full (refreshing the
//! caches), calibrated (increment-calibrated linears) and reuse. It speaks the vocabulary of
//! DiT's [`DitOps`](crate::forward::DitOps) (norm-modulate, linear, calibrated linear, base
//! refresh, attention, gated residual, unpatchify) and the modulation types of
//! [`crate::forward`]; what PixArt adds is the caption (projection and cross-attention K/V,
//! once per request), cross-attention with the caption mask, and adaLN-single.

use super::config::PixArtConfig;
use super::weights::Layer;
use crate::forward::{chunk, Activation, ModChunk, Modulation, Norm, StepKind};

/// The tensors a full step caches per block: the input and output of every cached linear
/// (reference doc: attn1 q, k, v, out; attn2 q, out; ff.net.0.proj (before GELU); ff.net.2).
/// q, k and v share their input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    /// The normalised, modulated input of self-attention's q, k and v.
    AttnIn,
    Q1Y,
    K1Y,
    V1Y,
    Out1X,
    Out1Y,
    /// The residual stream after self-attention: cross-attention's q input.
    Q2X,
    Q2Y,
    Out2X,
    Out2Y,
    Ff1X,
    /// ff.net.0.proj's output before GELU.
    Ff1Y,
    /// GELU of it: ff.net.2's input.
    Ff2X,
    Ff2Y,
}

impl Slot {
    pub const ALL: [Slot; 14] = [
        Slot::AttnIn,
        Slot::Q1Y,
        Slot::K1Y,
        Slot::V1Y,
        Slot::Out1X,
        Slot::Out1Y,
        Slot::Q2X,
        Slot::Q2Y,
        Slot::Out2X,
        Slot::Out2Y,
        Slot::Ff1X,
        Slot::Ff1Y,
        Slot::Ff2X,
        Slot::Ff2Y,
    ];

    /// Features per token.
    pub fn width(self, cfg: &PixArtConfig) -> usize {
        match self {
            Slot::Ff1Y | Slot::Ff2X => cfg.mlp_hidden(),
            _ => cfg.hidden_size(),
        }
    }

    pub fn index(self) -> usize {
        Slot::ALL.iter().position(|&s| s == self).unwrap_or(0)
    }
}

/// The cache slots (block, input, output) of a cached linear; `None` for the others.
pub fn slots(layer: Layer) -> Option<(usize, Slot, Slot)> {
    match layer {
        Layer::Q1(i) => Some((i, Slot::AttnIn, Slot::Q1Y)),
        Layer::K1(i) => Some((i, Slot::AttnIn, Slot::K1Y)),
        Layer::V1(i) => Some((i, Slot::AttnIn, Slot::V1Y)),
        Layer::Out1(i) => Some((i, Slot::Out1X, Slot::Out1Y)),
        Layer::Q2(i) => Some((i, Slot::Q2X, Slot::Q2Y)),
        Layer::Out2(i) => Some((i, Slot::Out2X, Slot::Out2Y)),
        Layer::Ff1(i) => Some((i, Slot::Ff1X, Slot::Ff1Y)),
        Layer::Ff2(i) => Some((i, Slot::Ff2X, Slot::Ff2Y)),
        _ => None,
    }
}

/// Activation buffers of the image tokens, (rows, N, width).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    /// The residual stream.
    X,
    /// A normalised, modulated input.
    H,
    Q,
    K,
    V,
    /// Attention output, heads merged.
    Attn,
    /// A sublayer's output before its residual update.
    Y,
    /// Feed-forward hidden activations after GELU.
    Mlp,
    /// The final projection, (rows, N, p²·Cout).
    Out,
    /// A cache slot of block i.
    Cache(usize, Slot),
}

/// Offset of a modulation chunk within one row of all modulation vectors: block 0's 6C
/// values (`scale_shift_table + t_mod`), block 1's, …, then the final layer's 2C
/// (`scale_shift_table + emb`).
pub fn modulation_offset(m: ModChunk, cfg: &PixArtConfig) -> usize {
    let c = cfg.hidden_size();
    match m.of {
        Modulation::Block(i) => (6 * i + m.index) * c,
        Modulation::Final => (6 * cfg.depth + m.index) * c,
    }
}

/// Values per row of all modulation vectors.
pub fn modulation_width(cfg: &PixArtConfig) -> usize {
    (6 * cfg.depth + 2) * cfg.hidden_size()
}

/// The operations of the PixArt-α forward. `rows` is the number of batch rows in use; the
/// inputs (latents, timesteps, caption) were staged by the backend.
pub trait PixArtOps {
    /// Caption projection `linear_2(gelu_tanh(linear_1(text)))` on every token, then every
    /// block's cross-attention K and V of it: once per request (they do not change over steps).
    fn encode_caption(&mut self, rows: usize);
    /// emb = linear_2(SiLU(linear_1([cos, sin](t)))) (+ the staged micro-conditions'
    /// embedding, [`super::micro`]), t_mod = adaln_single.linear(SiLU(emb)), then every
    /// modulation vector ([`modulation_offset`]'s layout).
    fn conditioning(&mut self, rows: usize);
    /// X = patchify(input)·W_patchᵀ + b + pos_embed.
    fn embed_patches(&mut self, rows: usize);
    /// dst = LayerNorm(X)·(1 + scale) + shift.
    fn norm_modulate(&mut self, dst: Act, norm: Norm, rows: usize);
    /// dst = act(src·Wᵀ + b).
    fn linear(&mut self, layer: Layer, src: Act, dst: Act, act: Activation, rows: usize);
    /// pre = src·Wᵀ + b and post = GELU_tanh(pre).
    fn linear_gelu_keep_pre(&mut self, layer: Layer, src: Act, pre: Act, post: Act, rows: usize);
    /// dst = act(y_s + up·(down·(src − x_s))) with the layer's cached x_s, y_s and factors.
    fn linear_calibrated(&mut self, layer: Layer, src: Act, dst: Act, act: Activation, rows: usize);
    /// After a full step's linear wrote its cache slots (see [`crate::forward::DitOps::refresh_base`]).
    fn refresh_base(&mut self, layer: Layer, rows: usize);
    /// dst = src (a full step keeps cross-attention's q input, the residual stream).
    fn copy(&mut self, src: Act, dst: Act, rows: usize);
    /// dst = softmax(q·kᵀ/√D)·v per head over the image tokens.
    fn self_attention(&mut self, q: Act, k: Act, v: Act, dst: Act, rows: usize);
    /// dst = softmax(q·kᵀ/√D + (1 − mask)·(−10000))·v per head, k and v block `block`'s
    /// caption keys and values from [`encode_caption`](PixArtOps::encode_caption).
    fn cross_attention(&mut self, block: usize, q: Act, dst: Act, rows: usize);
    /// X += gate ⊙ src, the gate broadcast over tokens.
    fn gated_residual(&mut self, src: Act, gate: ModChunk, rows: usize);
    /// X += src.
    fn residual(&mut self, src: Act, rows: usize);
    /// Writes Out back to image layout (rows, Cout, S, S) as the output.
    fn unpatchify(&mut self, rows: usize);
}

/// One model evaluation on staged inputs, after [`PixArtOps::encode_caption`] (once per
/// request) and [`PixArtOps::conditioning`] (once per step).
pub fn forward<O: PixArtOps>(ops: &mut O, cfg: &PixArtConfig, rows: usize, kind: StepKind) {
    use chunk::*;
    let eps = cfg.norm_eps;
    let norm = |i, shift, scale| Norm { shift: ModChunk::block(i, shift), scale: ModChunk::block(i, scale), eps };
    let final_norm = Norm { shift: ModChunk::final_layer(SHIFT_FINAL), scale: ModChunk::final_layer(SCALE_FINAL), eps };
    ops.embed_patches(rows);
    for i in 0..cfg.depth {
        let (norm1, norm2) = (norm(i, SHIFT_MSA, SCALE_MSA), norm(i, SHIFT_MLP, SCALE_MLP));
        let (gate_msa, gate_mlp) = (ModChunk::block(i, GATE_MSA), ModChunk::block(i, GATE_MLP));
        let s = |slot| Act::Cache(i, slot);
        match kind {
            StepKind::Plain => {
                ops.norm_modulate(Act::H, norm1, rows);
                for (layer, dst) in [(Layer::Q1(i), Act::Q), (Layer::K1(i), Act::K), (Layer::V1(i), Act::V)] {
                    ops.linear(layer, Act::H, dst, Activation::None, rows);
                }
                ops.self_attention(Act::Q, Act::K, Act::V, Act::Attn, rows);
                ops.linear(Layer::Out1(i), Act::Attn, Act::Y, Activation::None, rows);
                ops.gated_residual(Act::Y, gate_msa, rows);
                ops.linear(Layer::Q2(i), Act::X, Act::Q, Activation::None, rows);
                ops.cross_attention(i, Act::Q, Act::Attn, rows);
                ops.linear(Layer::Out2(i), Act::Attn, Act::Y, Activation::None, rows);
                ops.residual(Act::Y, rows);
                ops.norm_modulate(Act::H, norm2, rows);
                ops.linear(Layer::Ff1(i), Act::H, Act::Mlp, Activation::GeluTanh, rows);
                ops.linear(Layer::Ff2(i), Act::Mlp, Act::Y, Activation::None, rows);
                ops.gated_residual(Act::Y, gate_mlp, rows);
            }
            StepKind::Full => {
                ops.norm_modulate(s(Slot::AttnIn), norm1, rows);
                for (layer, dst) in [(Layer::Q1(i), Slot::Q1Y), (Layer::K1(i), Slot::K1Y), (Layer::V1(i), Slot::V1Y)] {
                    ops.linear(layer, s(Slot::AttnIn), s(dst), Activation::None, rows);
                    ops.refresh_base(layer, rows);
                }
                ops.self_attention(s(Slot::Q1Y), s(Slot::K1Y), s(Slot::V1Y), s(Slot::Out1X), rows);
                ops.linear(Layer::Out1(i), s(Slot::Out1X), s(Slot::Out1Y), Activation::None, rows);
                ops.refresh_base(Layer::Out1(i), rows);
                ops.gated_residual(s(Slot::Out1Y), gate_msa, rows);
                ops.copy(Act::X, s(Slot::Q2X), rows);
                ops.linear(Layer::Q2(i), s(Slot::Q2X), s(Slot::Q2Y), Activation::None, rows);
                ops.refresh_base(Layer::Q2(i), rows);
                ops.cross_attention(i, s(Slot::Q2Y), s(Slot::Out2X), rows);
                ops.linear(Layer::Out2(i), s(Slot::Out2X), s(Slot::Out2Y), Activation::None, rows);
                ops.refresh_base(Layer::Out2(i), rows);
                ops.residual(s(Slot::Out2Y), rows);
                ops.norm_modulate(s(Slot::Ff1X), norm2, rows);
                ops.linear_gelu_keep_pre(Layer::Ff1(i), s(Slot::Ff1X), s(Slot::Ff1Y), s(Slot::Ff2X), rows);
                ops.refresh_base(Layer::Ff1(i), rows);
                ops.linear(Layer::Ff2(i), s(Slot::Ff2X), s(Slot::Ff2Y), Activation::None, rows);
                ops.refresh_base(Layer::Ff2(i), rows);
                ops.gated_residual(s(Slot::Ff2Y), gate_mlp, rows);
            }
            StepKind::Calibrated => {
                ops.norm_modulate(Act::H, norm1, rows);
                for (layer, dst) in [(Layer::Q1(i), Act::Q), (Layer::K1(i), Act::K), (Layer::V1(i), Act::V)] {
                    ops.linear_calibrated(layer, Act::H, dst, Activation::None, rows);
                }
                ops.self_attention(Act::Q, Act::K, Act::V, Act::Attn, rows);
                ops.linear_calibrated(Layer::Out1(i), Act::Attn, Act::Y, Activation::None, rows);
                ops.gated_residual(Act::Y, gate_msa, rows);
                ops.linear_calibrated(Layer::Q2(i), Act::X, Act::Q, Activation::None, rows);
                ops.cross_attention(i, Act::Q, Act::Attn, rows);
                ops.linear_calibrated(Layer::Out2(i), Act::Attn, Act::Y, Activation::None, rows);
                ops.residual(Act::Y, rows);
                ops.norm_modulate(Act::H, norm2, rows);
                ops.linear_calibrated(Layer::Ff1(i), Act::H, Act::Mlp, Activation::GeluTanh, rows);
                ops.linear_calibrated(Layer::Ff2(i), Act::Mlp, Act::Y, Activation::None, rows);
                ops.gated_residual(Act::Y, gate_mlp, rows);
            }
            StepKind::Reuse => {
                // Each sublayer's output is the cached one, under this step's gates.
                ops.gated_residual(s(Slot::Out1Y), gate_msa, rows);
                ops.residual(s(Slot::Out2Y), rows);
                ops.gated_residual(s(Slot::Ff2Y), gate_mlp, rows);
            }
            // PixArt's policies (PixArtCache: none, reuse, icc) never schedule these.
            StepKind::BranchFull | StepKind::TaylorFull | StepKind::Forecast => {
                unreachable!("PixArt-α has no {kind:?} steps (fora and taylor are DiT-only for now)")
            }
        }
    }
    ops.norm_modulate(Act::H, final_norm, rows);
    ops.linear(Layer::ProjOut, Act::H, Act::Out, Activation::None, rows);
    ops.unpatchify(rows);
}
