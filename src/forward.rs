//! The DiT forward pass (reference doc part A), written once against [`DitOps`], the small
//! set of fused operations every backend implements. The CPU reference backend and the
//! GPU pipeline differ only in how they carry out these calls.

use crate::config::DitConfig;

/// Activation buffers the forward pass names. Each backend maps them to its arena.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    /// Token activations x, (rows, N, C): the residual stream.
    X,
    /// Normalised and modulated input of attention or MLP, (rows, N, C).
    H,
    /// q | k | v, (rows, N, 3C).
    Qkv,
    /// Attention output with heads merged, (rows, N, C).
    Attn,
    /// Output of proj or fc2 before the gated residual, (rows, N, C).
    Y,
    /// MLP hidden activations after GELU, (rows, N, M).
    Mlp,
    /// Final-layer output per token, (rows, N, p²·Cout).
    Out,
}

/// The linear layers of a DiT, addressed by block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Linear {
    Qkv(usize),
    Proj(usize),
    Fc1(usize),
    Fc2(usize),
    Final,
}

/// Which adaLN modulation to compute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Modulation {
    /// Block i: 6C values per row (shift/scale/gate for attention, then for the MLP).
    Block(usize),
    /// Final layer: 2C values per row (shift, scale).
    Final,
}

/// Slices of the modulation vector, in the official chunk order (reference doc A.6).
pub mod chunk {
    pub const SHIFT_MSA: usize = 0;
    pub const SCALE_MSA: usize = 1;
    pub const GATE_MSA: usize = 2;
    pub const SHIFT_MLP: usize = 3;
    pub const SCALE_MLP: usize = 4;
    pub const GATE_MLP: usize = 5;
    /// The final layer's modulation is (shift, scale).
    pub const SHIFT_FINAL: usize = 0;
    pub const SCALE_FINAL: usize = 1;
}

/// Post-GEMM activation of a linear layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    None,
    GeluTanh,
}

/// The operations of the DiT forward pass. `rows` is the number of batch rows in use
/// (≤ the planned maximum); inputs were staged by the backend before the call.
pub trait DitOps {
    /// X = patchify(input)·W_patchᵀ + b + pos_embed.
    fn embed_patches(&mut self, rows: usize);
    /// c = MLP(freq(t)) + label_table[y], and keeps SiLU(c) for the modulation layers.
    fn embed_conditioning(&mut self, rows: usize);
    /// The modulation vector of a block or of the final layer: W·SiLU(c) + b.
    fn modulation(&mut self, which: Modulation, rows: usize);
    /// H = LayerNorm(X)·(1 + scale) + shift, shift and scale being modulation chunks.
    fn norm_modulate(&mut self, shift: usize, scale: usize, eps: f32, rows: usize);
    /// dst = act(src·Wᵀ + b).
    fn linear(&mut self, layer: Linear, src: Act, dst: Act, act: Activation, rows: usize);
    /// Attn = softmax(q·kᵀ/√D)·v per head, from Qkv.
    fn attention(&mut self, rows: usize);
    /// X += gate ⊙ src, gate being a modulation chunk broadcast over tokens.
    fn gated_residual(&mut self, src: Act, gate: usize, rows: usize);
    /// Writes Out back to image layout (rows, Cout, I, I) as the output.
    fn unpatchify(&mut self, rows: usize);
}

/// One model evaluation on staged inputs (reference doc A: `DiT.forward`).
pub fn forward<O: DitOps>(ops: &mut O, cfg: &DitConfig, mlp_norm_eps: f32, rows: usize) {
    use chunk::*;
    ops.embed_patches(rows);
    ops.embed_conditioning(rows);
    for i in 0..cfg.depth {
        ops.modulation(Modulation::Block(i), rows);
        // x ← x + gate_msa · Attn(modulate(LN(x), shift_msa, scale_msa))
        ops.norm_modulate(SHIFT_MSA, SCALE_MSA, 1e-6, rows);
        ops.linear(Linear::Qkv(i), Act::H, Act::Qkv, Activation::None, rows);
        ops.attention(rows);
        ops.linear(Linear::Proj(i), Act::Attn, Act::Y, Activation::None, rows);
        ops.gated_residual(Act::Y, GATE_MSA, rows);
        // x ← x + gate_mlp · MLP(modulate(LN(x), shift_mlp, scale_mlp))
        ops.norm_modulate(SHIFT_MLP, SCALE_MLP, mlp_norm_eps, rows);
        ops.linear(Linear::Fc1(i), Act::H, Act::Mlp, Activation::GeluTanh, rows);
        ops.linear(Linear::Fc2(i), Act::Mlp, Act::Y, Activation::None, rows);
        ops.gated_residual(Act::Y, GATE_MLP, rows);
    }
    ops.modulation(Modulation::Final, rows);
    ops.norm_modulate(SHIFT_FINAL, SCALE_FINAL, 1e-6, rows);
    ops.linear(Linear::Final, Act::H, Act::Out, Activation::None, rows);
    ops.unpatchify(rows);
}
