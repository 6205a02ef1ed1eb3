//! The table of exported kernels: for each, its C signature written once in Rust, from which
//! come the emulation's declaration and entry, the [`Kernel`] every device resolves at
//! initialisation, and a raw `launch` whose parameter types are that signature (C `int` is
//! `i32`, `T*` is [`DevPtr<T>`]). The typed launchers of [`super::launch`] are its only users.
//!
//! Adding a kernel: export it from a kernels/*.cu file as `extern "C" __global__`, add its
//! signature here under that file's stem, and write its launcher in `launch.rs`.

use std::ffi::c_void;

use super::{f16, DevPtr, Device, Kernel, LaunchCfg, TensorMap};
use crate::error::Result;

/// One kernel's module: its emulation declaration and entry, its [`Kernel`], its raw launch.
macro_rules! kernel_mod {
    ($module:literal, $id:expr, $name:ident ( $($arg:ident : $ty:ty),* )) => {
        #[doc = concat!("`", stringify!($name), "` of kernels/", $module, ".cu.")]
        pub mod $name {
            use super::*;

            extern "C" {
                // The C++ build of the kernel (the emulation).
                fn $name($($arg: $ty),*);
            }

            unsafe extern "C" fn entry(args: *const *mut c_void) {
                let mut _p = args;
                $(
                    // SAFETY: `launch` below built `args` from exactly these parameters.
                    let $arg: $ty = unsafe {
                        // Unaligned: a recorded graph keeps arguments in 8-byte slots, and a
                    // tensor map is 64-byte aligned.
                    let v = std::ptr::read_unaligned(*_p as *const $ty);
                        _p = _p.add(1);
                        v
                    };
                )*
                // SAFETY: the launcher checked that the pointers cover what the kernel reads
                // and writes.
                unsafe { $name($($arg),*) }
            }

            pub static KERNEL: Kernel = Kernel {
                name: stringify!($name),
                module: $module,
                id: $id,
                emu: entry,
                arg_sizes: &[$(size_of::<$ty>()),*],
            };

            /// Launches the kernel with exactly its C parameters.
            ///
            /// # Safety
            /// As [`Device::launch`]: the pointers must cover what the kernel accesses.
            #[allow(clippy::too_many_arguments)]
            pub(crate) unsafe fn launch<D: Device + ?Sized>(
                dev: &D, cfg: &LaunchCfg, $($arg: $ty),*
            ) -> Result<()> {
                $( let mut $arg = $arg; )*
                let args = [$( &mut $arg as *mut $ty as *mut c_void ),*];
                // SAFETY: forwarded to the caller.
                unsafe { dev.launch(&KERNEL, cfg, &args) }
            }
        }
    };
}
#[cfg(test)]
pub(crate) use kernel_mod;

/// The table: an index per kernel, [`ALL`], and a [`kernel_mod!`] each.
macro_rules! kernels {
    ($( $module:literal => { $( $name:ident ( $($arg:ident : $ty:ty),* $(,)? ); )* } )*) => {
        #[allow(non_camel_case_types, clippy::enum_variant_names)]
        enum Id { $($($name,)*)* }

        /// Every kernel, in table order (`Kernel::id` indexes this).
        pub static ALL: &[&Kernel] = &[$($(&$name::KERNEL,)*)*];

        $($( kernel_mod!($module, Id::$name as usize, $name($($arg: $ty),*)); )*)*
    };
}

kernels! {
    "convert" => {
        convert_f32_to_f16(out: DevPtr<f16>, input: DevPtr<f32>, n: i32);
        convert_f16_to_f32(out: DevPtr<f32>, input: DevPtr<f16>, n: i32);
    }
    "layernorm" => {
        layernorm_modulate_f16(out: DevPtr<f16>, x: DevPtr<f16>, shift: DevPtr<f16>,
            scale: DevPtr<f16>, tokens: i32, channels: i32, mod_stride: i32, eps: f32);
        layernorm_modulate_f32_stream(out: DevPtr<f16>, x: DevPtr<f32>, shift: DevPtr<f16>,
            scale: DevPtr<f16>, tokens: i32, channels: i32, mod_stride: i32, eps: f32);
        residual_layernorm_modulate_f32_stream(out: DevPtr<f16>, x: DevPtr<f32>, y: DevPtr<f16>,
            gate: DevPtr<f16>, gate_stride: i32, shift: DevPtr<f16>, scale: DevPtr<f16>,
            tokens: i32, channels: i32, mod_stride: i32, eps: f32);
    }
    "residual" => {
        gated_residual_add_f16(x: DevPtr<f16>, y: DevPtr<f16>, gate: DevPtr<f16>, rows: i32,
            tokens: i32, channels: i32, gate_stride: i32);
        gated_residual_add_f32_stream(x: DevPtr<f32>, y: DevPtr<f16>, gate: DevPtr<f16>, rows: i32,
            tokens: i32, channels: i32, gate_stride: i32);
    }
    "forecast" => {
        forecast_update_f32(factors: DevPtr<f32>, y: DevPtr<f16>, table: DevPtr<f32>,
            state: DevPtr<i32>, n: i32, stride: i32, levels: i32, steps: i32);
        forecast_f16(y: DevPtr<f16>, factors: DevPtr<f32>, table: DevPtr<f32>,
            state: DevPtr<i32>, n: i32, stride: i32, levels: i32, steps: i32);
    }
    "attention" => {
        attention_f16(out: DevPtr<f16>, qkv: DevPtr<f16>, tokens: i32, heads: i32);
        attention_d64_f16(out: DevPtr<f16>, qkv: DevPtr<f16>, tokens: i32, heads: i32);
        attention_d128_f16(out: DevPtr<f16>, qkv: DevPtr<f16>, tokens: i32, heads: i32);
    }
    "embed" => {
        patchify_f16(patches: DevPtr<f16>, x: DevPtr<f32>, rows: i32, images: i32, channels: i32,
            size: i32, patch: i32);
        timestep_freq_f16(out: DevPtr<f16>, t: DevPtr<f32>, freqs: DevPtr<f32>, count: i32);
        condition_silu_f16(silu_c: DevPtr<f16>, temb: DevPtr<f32>, table: DevPtr<f16>,
            labels: DevPtr<i32>, count: i32, rows: i32, channels: i32, table_rows: i32);
        unpatchify_f32(image: DevPtr<f32>, out: DevPtr<f32>, rows: i32, channels_out: i32,
            size: i32, patch: i32);
        select_step_f16(dst: DevPtr<f16>, src: DevPtr<f16>, state: DevPtr<i32>, per_step: i32,
            steps: i32);
        step_advance(state: DevPtr<i32>);
    }
    "pixart" => {
        attention_rows_f16(out: DevPtr<f16>, q: DevPtr<f16>, k: DevPtr<f16>, v: DevPtr<f16>,
            bias: DevPtr<f32>, nq: i32, nk: i32, head_dim: i32, ldq: i32, ldkv: i32, ldo: i32,
            scale: f32, has_bias: i32);
        silu_f32_to_f16(out: DevPtr<f16>, x: DevPtr<f32>, n: i32);
        pixart_modulation_f16(out: DevPtr<f16>, tmod: DevPtr<f32>, emb: DevPtr<f32>,
            table: DevPtr<f32>, rows: i32, channels: i32, depth: i32);
        pixart_sampler_step_f32(x: DevPtr<f32>, x0: DevPtr<f32>, out: DevPtr<f32>,
            coeffs: DevPtr<f32>, images: i32, img: i32, out_img: i32, guided: i32, cfg_scale: f32);
    }
    "activation" => {
        gelu_f16(out: DevPtr<f16>, x: DevPtr<f16>, n: i32);
    }
    "sampler" => {
        normal_f32(out: DevPtr<f32>, state: DevPtr<i32>, images: i32, elems: i32, stream_step: i32);
        sampler_step_f32(x: DevPtr<f32>, model_out: DevPtr<f32>, coeffs: DevPtr<f32>,
            state: DevPtr<i32>, images: i32, cin: i32, cout: i32, hw: i32, guided_channels: i32,
            cfg_scale: f32, mode: i32, steps: i32, x0_out: DevPtr<f32>);
        check_finite_f32(v: DevPtr<f32>, n: i32, state: DevPtr<i32>, slot: i32);
    }
    "gemm_sm90" => {
        gemm_sm90_f16_128x128_k64(map_a: TensorMap, map_w: TensorMap, map_w2: TensorMap,
            map_am: TensorMap, minus: i32, out: DevPtr<f16>, out_f32: DevPtr<f32>, pre: DevPtr<f16>, bias: DevPtr<f16>,
            add: DevPtr<f16>, m: i32, n: i32, k: i32, ldc: i32, ld_add: i32, add_rows: i32,
            out2: DevPtr<f32>, n2: i32, ld2: i32, ws: DevPtr<f32>, k_split: i32, act: i32);
    }
    "conv_sm90" => {
        conv3x3_sm90_f16(map_w: TensorMap, out: DevPtr<f16>, out_f32: DevPtr<f32>, input: DevPtr<f16>,
            bias: DevPtr<f16>, add: DevPtr<f16>, images: i32, h: i32, w: i32, cin: i32, cout: i32, up2: i32);
    }
    "gemm" => {
        gemm_fused_f16_64x64_k64(out: DevPtr<f16>, out_f32: DevPtr<f32>, pre: DevPtr<f16>, a: DevPtr<f16>,
            a_minus: DevPtr<f16>, w: DevPtr<f16>, bias: DevPtr<f16>, add: DevPtr<f16>,
            ws: DevPtr<f32>, m: i32, n: i32, k: i32, lda: i32, ldc: i32, ld_add: i32,
            add_rows: i32, k_split: i32, w2: DevPtr<f16>, out2: DevPtr<f32>, n2: i32, ld2: i32,
            act: i32);
        gemm_fused_f16_128x128_k32(out: DevPtr<f16>, out_f32: DevPtr<f32>, pre: DevPtr<f16>, a: DevPtr<f16>,
            a_minus: DevPtr<f16>, w: DevPtr<f16>, bias: DevPtr<f16>, add: DevPtr<f16>,
            ws: DevPtr<f32>, m: i32, n: i32, k: i32, lda: i32, ldc: i32, ld_add: i32,
            add_rows: i32, k_split: i32, w2: DevPtr<f16>, out2: DevPtr<f32>, n2: i32, ld2: i32,
            act: i32);
        gemm_fused_f16_128x64_k32(out: DevPtr<f16>, out_f32: DevPtr<f32>, pre: DevPtr<f16>, a: DevPtr<f16>,
            a_minus: DevPtr<f16>, w: DevPtr<f16>, bias: DevPtr<f16>, add: DevPtr<f16>,
            ws: DevPtr<f32>, m: i32, n: i32, k: i32, lda: i32, ldc: i32, ld_add: i32,
            add_rows: i32, k_split: i32, w2: DevPtr<f16>, out2: DevPtr<f32>, n2: i32, ld2: i32,
            act: i32);
        gemm_fused_f16_64x64_k32(out: DevPtr<f16>, out_f32: DevPtr<f32>, pre: DevPtr<f16>, a: DevPtr<f16>,
            a_minus: DevPtr<f16>, w: DevPtr<f16>, bias: DevPtr<f16>, add: DevPtr<f16>,
            ws: DevPtr<f32>, m: i32, n: i32, k: i32, lda: i32, ldc: i32, ld_add: i32,
            add_rows: i32, k_split: i32, w2: DevPtr<f16>, out2: DevPtr<f32>, n2: i32, ld2: i32,
            act: i32);
        gemm_fused_f16_64x64_k32_s2(out: DevPtr<f16>, out_f32: DevPtr<f32>, pre: DevPtr<f16>, a: DevPtr<f16>,
            a_minus: DevPtr<f16>, w: DevPtr<f16>, bias: DevPtr<f16>, add: DevPtr<f16>,
            ws: DevPtr<f32>, m: i32, n: i32, k: i32, lda: i32, ldc: i32, ld_add: i32,
            add_rows: i32, k_split: i32, w2: DevPtr<f16>, out2: DevPtr<f32>, n2: i32, ld2: i32,
            act: i32);
        gemm_splitk_reduce_f16(out: DevPtr<f16>, out_f32: DevPtr<f32>, pre: DevPtr<f16>,
            ws: DevPtr<f32>, bias: DevPtr<f16>, add: DevPtr<f16>, m: i32, n: i32, ldc: i32,
            ld_add: i32, add_rows: i32, splits: i32, out2: DevPtr<f32>, n2: i32, ld2: i32, act: i32);
    }
    "lowrank" => {
        lowrank_fused_f16_bm16(out: DevPtr<f16>, a: DevPtr<f16>, a_minus: DevPtr<f16>, down: DevPtr<f16>,
            up0: DevPtr<f16>, up1: DevPtr<f16>, up2: DevPtr<f16>, add: DevPtr<f16>, t_minus: DevPtr<f32>,
            scale: f32, m: i32, n: i32, k: i32, lda: i32, ldc: i32, ld_add: i32, ld_t: i32, groups: i32,
            r0: i32, r1: i32, r2: i32, col_splits: i32, act: i32);
        lowrank_fused_f16_bm32(out: DevPtr<f16>, a: DevPtr<f16>, a_minus: DevPtr<f16>, down: DevPtr<f16>,
            up0: DevPtr<f16>, up1: DevPtr<f16>, up2: DevPtr<f16>, add: DevPtr<f16>, t_minus: DevPtr<f32>,
            scale: f32, m: i32, n: i32, k: i32, lda: i32, ldc: i32, ld_add: i32, ld_t: i32, groups: i32,
            r0: i32, r1: i32, r2: i32, col_splits: i32, act: i32);
    }
    "vae_conv" => {
        conv3x3_f16(out: DevPtr<f16>, out_f32: DevPtr<f32>, input: DevPtr<f16>, w: DevPtr<f16>,
            bias: DevPtr<f16>, add: DevPtr<f16>, images: i32, h: i32, width: i32, cin: i32,
            cout: i32, up2: i32, w_tap_major: i32);
    }
    "vae" => {
        group_norm_silu_f16(out: DevPtr<f16>, x: DevPtr<f16>, gamma: DevPtr<f16>,
            beta: DevPtr<f16>, pixels: i32, channels: i32, groups: i32, eps: f32, silu: i32);
        group_norm_stats_f16(stats: DevPtr<f32>, x: DevPtr<f16>, pixels: i32, channels: i32, groups: i32,
            chunk_px: i32);
        group_norm_apply_f16(out: DevPtr<f16>, x: DevPtr<f16>, stats: DevPtr<f32>, gamma: DevPtr<f16>,
            beta: DevPtr<f16>, pixels: i32, channels: i32, groups: i32, chunk_px: i32, eps: f32, silu: i32);
        softmax_rows_f16(out: DevPtr<f16>, x: DevPtr<f16>, cols: i32, scale: f32);
        transpose_f16(out: DevPtr<f16>, input: DevPtr<f16>, rows: i32, cols: i32);
    }
}
