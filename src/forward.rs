//! The DiT forward pass (reference doc part A), written once against [`DitOps`], the small
//! set of fused operations every backend implements, for every kind of step the cache
//! policies need (reference doc part E): plain, full (refreshing the caches), calibrated
//! (increment-calibrated linears) and reuse; and for the policies of docs/caching-policies.md,
//! branch-full (FORA-style block reuse), Taylor-full and forecast (TaylorSeer-style). The CPU reference backend and the GPU
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
    /// The block the layer belongs to (`None`: the final layer).
    pub fn block_index(self) -> Option<usize> {
        self.slots().map(|(i, _, _)| i)
    }

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

/// Which adaLN modulation vector: a block's or the final layer's.
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

/// One C-wide chunk of a modulation vector (a shift, a scale or a gate).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModChunk {
    pub of: Modulation,
    /// Index within the vector ([`chunk`]).
    pub index: usize,
}

impl ModChunk {
    pub fn block(i: usize, index: usize) -> Self {
        ModChunk { of: Modulation::Block(i), index }
    }

    pub fn final_layer(index: usize) -> Self {
        ModChunk { of: Modulation::Final, index }
    }

    /// The block the chunk belongs to (`None`: the final layer).
    pub fn block_index(self) -> Option<usize> {
        match self.of {
            Modulation::Block(i) => Some(i),
            Modulation::Final => None,
        }
    }

    /// Offset of the chunk within one row of all modulation vectors, the layout every backend
    /// keeps them in: block 0's 6C values, block 1's, …, then the final layer's 2C.
    pub fn offset(self, cfg: &DitConfig) -> usize {
        let c = cfg.hidden_size;
        match self.of {
            Modulation::Block(i) => (6 * i + self.index) * c,
            Modulation::Final => (6 * cfg.depth + self.index) * c,
        }
    }
}

/// Values per row of all modulation vectors of a pass: 6C per block, then 2C.
pub fn modulation_width(cfg: &DitConfig) -> usize {
    (6 * cfg.depth + 2) * cfg.hidden_size
}

/// A LayerNorm (no affine parameters) followed by adaLN modulation: which shift and scale,
/// and the norm's ε.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Norm {
    pub shift: ModChunk,
    pub scale: ModChunk,
    pub eps: f32,
}

impl Norm {
    /// The block the norm belongs to (`None`: the final layer).
    pub fn block_index(self) -> Option<usize> {
        self.shift.block_index()
    }
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
    /// Full compute keeping only each block's two branch outputs (the `proj_y` and `fc2_y`
    /// slots): the full step of FORA-style block reuse, whose cached steps are `Reuse`.
    BranchFull,
    /// Full compute that also updates each block's Taylor factors from its two branch outputs
    /// ([`DitOps::forecast_update`]): the full step of Taylor forecasting.
    TaylorFull,
    /// Each branch output predicted from its Taylor factors ([`DitOps::forecast`]), gated by
    /// the current modulation; attention and every block linear skipped.
    Forecast,
}

/// A transformer block's two branches, whose outputs Taylor forecasting predicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Branch {
    /// proj's output (attention branch).
    Attn,
    /// fc2's output (MLP branch).
    Mlp,
}

/// The conditioning of a forward pass: everything that depends only on the timesteps and
/// labels. `rows` (timestep, label) pairs were staged by the backend.
pub trait ConditioningOps {
    /// c = MLP(freq(t)) + label_table[y], and keeps SiLU(c) for the modulation layers.
    fn embed_conditioning(&mut self, rows: usize);
    /// Every modulation vector, W·SiLU(c) + b for each block and the final layer, laid out
    /// per row as [`ModChunk::offset`] says.
    fn modulations(&mut self, rows: usize);
}

/// The operations of the DiT forward pass. `rows` is the number of batch rows in use
/// (≤ the planned maximum); inputs were staged by the backend before the call, and the
/// modulation vectors of these rows computed by [`conditioning`].
///
/// Two operations exist because a backend may do them in one pass over memory:
/// [`residual_norm_modulate`](DitOps::residual_norm_modulate) (a residual update and the
/// LayerNorm after it) and [`linear_gelu_keep_pre`](DitOps::linear_gelu_keep_pre) (fc1 on a
/// full step, whose output is cached both before and after GELU). The CPU backend composes
/// them from their parts; nothing else is fused behind the forward pass's back.
pub trait DitOps {
    /// X = patchify(input)·W_patchᵀ + b + pos_embed.
    fn embed_patches(&mut self, rows: usize);
    /// dst = LayerNorm(X)·(1 + scale) + shift.
    fn norm_modulate(&mut self, dst: Act, norm: Norm, rows: usize);
    /// X += gate ⊙ src, then dst = LayerNorm(X)·(1 + scale) + shift: a sublayer's gated
    /// residual update and the LayerNorm that follows it (the block's next one, the next
    /// block's first, or the final layer's).
    fn residual_norm_modulate(&mut self, src: Act, gate: ModChunk, dst: Act, norm: Norm, rows: usize);
    /// dst = act(src·Wᵀ + b).
    fn linear(&mut self, layer: Linear, src: Act, dst: Act, act: Activation, rows: usize);
    /// pre = src·Wᵀ + b and post = GELU_tanh(pre).
    fn linear_gelu_keep_pre(&mut self, layer: Linear, src: Act, pre: Act, post: Act, rows: usize);
    /// dst = act(y_s + up·(down·(src − x_s))) with the layer's cached x_s, y_s and its
    /// rank-r factors (q, k and v factorised separately for the qkv layer); in the folded
    /// form dst = act(b_s + up·(down·src)) with the b_s of [`DitOps::refresh_base`].
    fn linear_calibrated(&mut self, layer: Linear, src: Act, dst: Act, act: Activation, rows: usize);
    /// After a full step's linear has written its cache slots x_s and y_s: a backend that
    /// computes icc's folded form keeps b_s = y_s − up·(down·x_s) for the calibrated steps;
    /// one that computes the direct form (or keeps no factors) does nothing.
    fn refresh_base(&mut self, layer: Linear, rows: usize);
    /// dst = softmax(q·kᵀ/√D)·v per head, q | k | v read from src (merged heads).
    fn attention(&mut self, src: Act, dst: Act, rows: usize);
    /// X += gate ⊙ src, the gate broadcast over tokens.
    fn gated_residual(&mut self, src: Act, gate: ModChunk, rows: usize);
    /// Taylor-full step: updates block `block`'s Taylor factors of `branch` from its new output
    /// `src` with the current step's [`crate::policy::ForecastStep`] (`orders`, Δ):
    /// D₀ ← y, D_{i+1} ← (D_i(new) − D_i(old))/Δ for i < orders, higher factors zeroed.
    fn forecast_update(&mut self, block: usize, branch: Branch, src: Act, rows: usize);
    /// Forecast step: dst = Σ_i w_i·D_i over block `block`'s Taylor factors of `branch`, with
    /// the current step's weights w_i = k^i/i!.
    fn forecast(&mut self, block: usize, branch: Branch, dst: Act, rows: usize);
    /// Writes Out back to image layout (rows, Cout, I, I) as the output.
    fn unpatchify(&mut self, rows: usize);
}

/// The conditioning of `rows` staged (timestep, label) pairs (reference doc A.3–A.6): the
/// CPU backend runs it before every pass; the GPU pipeline once per request, for every step's
/// timestep at once, selecting each step's rows before its pass.
pub fn conditioning<O: ConditioningOps>(ops: &mut O, rows: usize) {
    ops.embed_conditioning(rows);
    ops.modulations(rows);
}

/// One model evaluation on staged inputs and their [`conditioning`] (reference doc A:
/// `DiT.forward`; E.3–E.5 for the cached kinds of step).
pub fn forward<O: DitOps>(ops: &mut O, cfg: &DitConfig, mlp_norm_eps: f32, rows: usize, kind: StepKind) {
    use chunk::*;
    let attn_norm = |i| Norm { shift: ModChunk::block(i, SHIFT_MSA), scale: ModChunk::block(i, SCALE_MSA), eps: 1e-6 };
    let mlp_norm =
        |i| Norm { shift: ModChunk::block(i, SHIFT_MLP), scale: ModChunk::block(i, SCALE_MLP), eps: mlp_norm_eps };
    let final_norm =
        Norm { shift: ModChunk::final_layer(SHIFT_FINAL), scale: ModChunk::final_layer(SCALE_FINAL), eps: 1e-6 };
    // A full step computes every tracked tensor straight into its cache slot (fc1's output is
    // kept before GELU, fc2's input after it); the other kinds use the scratch activations.
    let full = kind == StepKind::Full;
    let attn_in = |i| if full { Act::Cache(i, Slot::QkvX) } else { Act::H };

    ops.embed_patches(rows);
    if !matches!(kind, StepKind::Reuse | StepKind::Forecast) {
        ops.norm_modulate(attn_in(0), attn_norm(0), rows);
    }
    for i in 0..cfg.depth {
        let last = i + 1 == cfg.depth;
        // The LayerNorm after this block: the next block's first, or the final layer's.
        let (next_in, next_norm) = if last { (Act::H, final_norm) } else { (attn_in(i + 1), attn_norm(i + 1)) };
        let (gate_msa, gate_mlp) = (ModChunk::block(i, GATE_MSA), ModChunk::block(i, GATE_MLP));
        let s = |slot| Act::Cache(i, slot);
        match kind {
            StepKind::Plain | StepKind::BranchFull | StepKind::TaylorFull => {
                // The plain block; a branch-full step writes the two branch outputs straight
                // into their cache slots, a Taylor-full step updates the factors from them.
                let (attn_y, mlp_y) = match kind {
                    StepKind::BranchFull => (s(Slot::ProjY), s(Slot::Fc2Y)),
                    _ => (Act::Y, Act::Y),
                };
                let taylor = kind == StepKind::TaylorFull;
                ops.linear(Linear::Qkv(i), Act::H, Act::Qkv, Activation::None, rows);
                ops.attention(Act::Qkv, Act::Attn, rows);
                ops.linear(Linear::Proj(i), Act::Attn, attn_y, Activation::None, rows);
                if taylor {
                    ops.forecast_update(i, Branch::Attn, attn_y, rows);
                }
                ops.residual_norm_modulate(attn_y, gate_msa, Act::H, mlp_norm(i), rows);
                ops.linear(Linear::Fc1(i), Act::H, Act::Mlp, Activation::GeluTanh, rows);
                ops.linear(Linear::Fc2(i), Act::Mlp, mlp_y, Activation::None, rows);
                if taylor {
                    ops.forecast_update(i, Branch::Mlp, mlp_y, rows);
                }
                ops.residual_norm_modulate(mlp_y, gate_mlp, next_in, next_norm, rows);
            }
            StepKind::Full => {
                ops.linear(Linear::Qkv(i), s(Slot::QkvX), s(Slot::QkvY), Activation::None, rows);
                ops.refresh_base(Linear::Qkv(i), rows);
                ops.attention(s(Slot::QkvY), s(Slot::ProjX), rows);
                ops.linear(Linear::Proj(i), s(Slot::ProjX), s(Slot::ProjY), Activation::None, rows);
                ops.refresh_base(Linear::Proj(i), rows);
                ops.residual_norm_modulate(s(Slot::ProjY), gate_msa, s(Slot::Fc1X), mlp_norm(i), rows);
                ops.linear_gelu_keep_pre(Linear::Fc1(i), s(Slot::Fc1X), s(Slot::Fc1Y), s(Slot::Fc2X), rows);
                ops.refresh_base(Linear::Fc1(i), rows);
                ops.linear(Linear::Fc2(i), s(Slot::Fc2X), s(Slot::Fc2Y), Activation::None, rows);
                ops.refresh_base(Linear::Fc2(i), rows);
                ops.residual_norm_modulate(s(Slot::Fc2Y), gate_mlp, next_in, next_norm, rows);
            }
            StepKind::Calibrated => {
                ops.linear_calibrated(Linear::Qkv(i), Act::H, Act::Qkv, Activation::None, rows);
                ops.attention(Act::Qkv, Act::Attn, rows);
                ops.linear_calibrated(Linear::Proj(i), Act::Attn, Act::Y, Activation::None, rows);
                ops.residual_norm_modulate(Act::Y, gate_msa, Act::H, mlp_norm(i), rows);
                ops.linear_calibrated(Linear::Fc1(i), Act::H, Act::Mlp, Activation::GeluTanh, rows);
                ops.linear_calibrated(Linear::Fc2(i), Act::Mlp, Act::Y, Activation::None, rows);
                ops.residual_norm_modulate(Act::Y, gate_mlp, next_in, next_norm, rows);
            }
            StepKind::Reuse => {
                // Each sublayer's output is the cached one under this step's gates. icc
                // computes the normalisations too and throws them away; skipping them gives
                // the same result. Only the final layer's LayerNorm follows the last update.
                ops.gated_residual(s(Slot::ProjY), gate_msa, rows);
                if last {
                    ops.residual_norm_modulate(s(Slot::Fc2Y), gate_mlp, Act::H, final_norm, rows);
                } else {
                    ops.gated_residual(s(Slot::Fc2Y), gate_mlp, rows);
                }
            }
            StepKind::Forecast => {
                // As a reuse step, on the predicted branch outputs.
                ops.forecast(i, Branch::Attn, Act::Y, rows);
                ops.gated_residual(Act::Y, gate_msa, rows);
                ops.forecast(i, Branch::Mlp, Act::Y, rows);
                if last {
                    ops.residual_norm_modulate(Act::Y, gate_mlp, Act::H, final_norm, rows);
                } else {
                    ops.gated_residual(Act::Y, gate_mlp, rows);
                }
            }
        }
    }
    ops.linear(Linear::Final, Act::H, Act::Out, Activation::None, rows);
    ops.unpatchify(rows);
}
