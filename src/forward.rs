//! The DiT forward pass (reference doc part A), written once against [`DitOps`], the small
//! set of fused operations every backend implements, for every kind of step the cache
//! policies need (reference doc part E): plain, full (refreshing the caches), calibrated
//! (increment-calibrated linears) and reuse. The CPU reference backend and the GPU
//! pipeline differ only in how they carry out these calls.

use crate::config::DitConfig;

/// The eight per-block tensors a full step caches (reference doc E.3): the input and the
/// output (bias included; fc1's before GELU) of qkv, proj, fc1 and fc2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    QkvX,
    QkvY,
    ProjX,
    ProjY,
    Fc1X,
    Fc1Y,
    Fc2X,
    Fc2Y,
}

impl Slot {
    pub const ALL: [Slot; 8] =
        [Slot::QkvX, Slot::QkvY, Slot::ProjX, Slot::ProjY, Slot::Fc1X, Slot::Fc1Y, Slot::Fc2X, Slot::Fc2Y];

    /// Width (features per token) of the slot for `cfg`.
    pub fn width(self, cfg: &DitConfig) -> usize {
        let (c, m) = (cfg.hidden_size, cfg.mlp_hidden());
        match self {
            Slot::QkvX | Slot::ProjX | Slot::ProjY | Slot::Fc1X | Slot::Fc2Y => c,
            Slot::QkvY => 3 * c,
            Slot::Fc1Y | Slot::Fc2X => m,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Slot::QkvX => "qkv_x",
            Slot::QkvY => "qkv_y",
            Slot::ProjX => "proj_x",
            Slot::ProjY => "proj_y",
            Slot::Fc1X => "fc1_x",
            Slot::Fc1Y => "fc1_y",
            Slot::Fc2X => "fc2_x",
            Slot::Fc2Y => "fc2_y",
        }
    }
}

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
    /// A cache slot of block i; full steps write their activations straight into these,
    /// so the caches are refreshed without any extra pass or copy.
    Cache(usize, Slot),
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

impl Linear {
    /// The cache slots (input, output) of a block's linear layer.
    pub fn slots(self) -> Option<(usize, Slot, Slot)> {
        match self {
            Linear::Qkv(i) => Some((i, Slot::QkvX, Slot::QkvY)),
            Linear::Proj(i) => Some((i, Slot::ProjX, Slot::ProjY)),
            Linear::Fc1(i) => Some((i, Slot::Fc1X, Slot::Fc1Y)),
            Linear::Fc2(i) => Some((i, Slot::Fc2X, Slot::Fc2Y)),
            Linear::Final => None,
        }
    }
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

/// What a forward pass does with the block caches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepKind {
    /// No caching: the plain DiT forward.
    Plain,
    /// Full compute that also refreshes every cache (icc's `forward_upd`).
    Full,
    /// Every block linear is y_s + up·(down·(x − x_s)); attention is recomputed (`forward_inc`).
    Calibrated,
    /// Each sublayer's output is the cached one, gated by the current modulation (`forward_reuse`).
    Reuse,
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
    /// dst = LayerNorm(X)·(1 + scale) + shift, shift and scale being modulation chunks.
    fn norm_modulate(&mut self, dst: Act, shift: usize, scale: usize, eps: f32, rows: usize);
    /// dst = act(src·Wᵀ + b).
    fn linear(&mut self, layer: Linear, src: Act, dst: Act, act: Activation, rows: usize);
    /// dst = act(y_s + up·(down·(src − x_s))) with the layer's cached x_s, y_s and its
    /// rank-r factors (q, k and v factorised separately for the qkv layer).
    fn linear_calibrated(&mut self, layer: Linear, src: Act, dst: Act, act: Activation, rows: usize);
    /// dst = GELU_tanh(src).
    fn gelu(&mut self, src: Act, dst: Act, rows: usize);
    /// dst = softmax(q·kᵀ/√D)·v per head, q | k | v read from src (merged heads).
    fn attention(&mut self, src: Act, dst: Act, rows: usize);
    /// X += gate ⊙ src, gate being a modulation chunk broadcast over tokens.
    fn gated_residual(&mut self, src: Act, gate: usize, rows: usize);
    /// Writes Out back to image layout (rows, Cout, I, I) as the output.
    fn unpatchify(&mut self, rows: usize);
}

/// One model evaluation on staged inputs (reference doc A: `DiT.forward`; E.3–E.5 for the
/// cached kinds of step).
pub fn forward<O: DitOps>(ops: &mut O, cfg: &DitConfig, mlp_norm_eps: f32, rows: usize, kind: StepKind) {
    use chunk::*;
    ops.embed_patches(rows);
    ops.embed_conditioning(rows);
    for i in 0..cfg.depth {
        ops.modulation(Modulation::Block(i), rows);
        match kind {
            StepKind::Plain => {
                ops.norm_modulate(Act::H, SHIFT_MSA, SCALE_MSA, 1e-6, rows);
                ops.linear(Linear::Qkv(i), Act::H, Act::Qkv, Activation::None, rows);
                ops.attention(Act::Qkv, Act::Attn, rows);
                ops.linear(Linear::Proj(i), Act::Attn, Act::Y, Activation::None, rows);
                ops.gated_residual(Act::Y, GATE_MSA, rows);
                ops.norm_modulate(Act::H, SHIFT_MLP, SCALE_MLP, mlp_norm_eps, rows);
                ops.linear(Linear::Fc1(i), Act::H, Act::Mlp, Activation::GeluTanh, rows);
                ops.linear(Linear::Fc2(i), Act::Mlp, Act::Y, Activation::None, rows);
                ops.gated_residual(Act::Y, GATE_MLP, rows);
            }
            StepKind::Full => {
                // The same arithmetic as Plain, with every tracked tensor living in its
                // cache slot (fc1's output is kept before GELU, fc2's input after it).
                let s = |slot| Act::Cache(i, slot);
                ops.norm_modulate(s(Slot::QkvX), SHIFT_MSA, SCALE_MSA, 1e-6, rows);
                ops.linear(Linear::Qkv(i), s(Slot::QkvX), s(Slot::QkvY), Activation::None, rows);
                ops.attention(s(Slot::QkvY), s(Slot::ProjX), rows);
                ops.linear(Linear::Proj(i), s(Slot::ProjX), s(Slot::ProjY), Activation::None, rows);
                ops.gated_residual(s(Slot::ProjY), GATE_MSA, rows);
                ops.norm_modulate(s(Slot::Fc1X), SHIFT_MLP, SCALE_MLP, mlp_norm_eps, rows);
                ops.linear(Linear::Fc1(i), s(Slot::Fc1X), s(Slot::Fc1Y), Activation::None, rows);
                ops.gelu(s(Slot::Fc1Y), s(Slot::Fc2X), rows);
                ops.linear(Linear::Fc2(i), s(Slot::Fc2X), s(Slot::Fc2Y), Activation::None, rows);
                ops.gated_residual(s(Slot::Fc2Y), GATE_MLP, rows);
            }
            StepKind::Calibrated => {
                ops.norm_modulate(Act::H, SHIFT_MSA, SCALE_MSA, 1e-6, rows);
                ops.linear_calibrated(Linear::Qkv(i), Act::H, Act::Qkv, Activation::None, rows);
                ops.attention(Act::Qkv, Act::Attn, rows);
                ops.linear_calibrated(Linear::Proj(i), Act::Attn, Act::Y, Activation::None, rows);
                ops.gated_residual(Act::Y, GATE_MSA, rows);
                ops.norm_modulate(Act::H, SHIFT_MLP, SCALE_MLP, mlp_norm_eps, rows);
                ops.linear_calibrated(Linear::Fc1(i), Act::H, Act::Mlp, Activation::GeluTanh, rows);
                ops.linear_calibrated(Linear::Fc2(i), Act::Mlp, Act::Y, Activation::None, rows);
                ops.gated_residual(Act::Y, GATE_MLP, rows);
            }
            StepKind::Reuse => {
                // icc computes the normalisations too and throws them away; skipping them
                // gives the same result.
                ops.gated_residual(Act::Cache(i, Slot::ProjY), GATE_MSA, rows);
                ops.gated_residual(Act::Cache(i, Slot::Fc2Y), GATE_MLP, rows);
            }
        }
    }
    ops.modulation(Modulation::Final, rows);
    ops.norm_modulate(Act::H, SHIFT_FINAL, SCALE_FINAL, 1e-6, rows);
    ops.linear(Linear::Final, Act::H, Act::Out, Activation::None, rows);
    ops.unpatchify(rows);
}
