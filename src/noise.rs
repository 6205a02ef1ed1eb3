//! Reproducible Gaussian noise of our own: Philox4x32-10 (Salmon et al., SC'11), a
//! counter-based generator, so the value for (seed, image, step, element) is a pure
//! function of those numbers. An image therefore gets the same noise whatever batch it is
//! in, whatever the thread count, and a GPU kernel can produce the same stream.
//!
//! Stream layout: key = the 64-bit seed; counter = (element / 4, image low 32 bits,
//! image high 32 bits, step). Step 0 is the initial latent z; step s + 1 is the noise a
//! stochastic sampler adds at sampling step s (in sampling order). Each Philox call yields
//! four uniforms → two Box–Muller pairs → four normals, for elements 4q..4q+3.

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

/// Philox4x32 with 10 rounds.
#[inline]
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let (mut c, mut k) = (counter, key);
    for round in 0..10 {
        if round > 0 {
            k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
        }
        let p0 = (M0 as u64) * (c[0] as u64);
        let p1 = (M1 as u64) * (c[2] as u64);
        c = [((p1 >> 32) as u32) ^ c[1] ^ k[0], p1 as u32, ((p0 >> 32) as u32) ^ c[3] ^ k[1], p0 as u32];
    }
    c
}

/// A uniform in (0, 1) from the top 24 bits (never 0, so the log below is finite).
#[inline]
fn uniform(x: u32) -> f32 {
    ((x >> 8) as f32 + 0.5) * (1.0 / 16_777_216.0)
}

/// Fills `out` with standard normals for (seed, image, step), element i of `out` being
/// element `first + i` of that image's stream (`first` must be a multiple of 4).
pub fn fill_normal(seed: u64, image: u64, step: u32, out: &mut [f32]) {
    let key = [seed as u32, (seed >> 32) as u32];
    for (q, chunk) in out.chunks_mut(4).enumerate() {
        let r = philox4x32_10([q as u32, image as u32, (image >> 32) as u32, step], key);
        let z = box_muller(r);
        chunk.copy_from_slice(&z[..chunk.len()]);
    }
}

/// Two Box–Muller pairs from four uniforms, computed in f64 and rounded once, so the
/// values do not depend on a platform's f32 `ln`/`sin`/`cos` rounding.
#[inline]
fn box_muller(r: [u32; 4]) -> [f32; 4] {
    let pair = |a: u32, b: u32| {
        let radius = (-2.0 * (uniform(a) as f64).ln()).sqrt();
        let theta = std::f64::consts::TAU * uniform(b) as f64;
        [(radius * theta.cos()) as f32, (radius * theta.sin()) as f32]
    };
    let (p, q) = (pair(r[0], r[1]), pair(r[2], r[3]));
    [p[0], p[1], q[0], q[1]]
}

/// Stream step reserved for class-label draws (never a noise step).
const LABEL_STEP: u32 = u32::MAX;

/// Class labels for images `first..first + count` drawn from the seed, uniformly in
/// `0..num_classes` (multiply-shift of a 32-bit Philox output: bias < num_classes / 2³²).
/// Like the noise, image k's label does not depend on the batch around it.
pub fn class_labels(seed: u64, first: u64, count: usize, num_classes: usize) -> Vec<i64> {
    let key = [seed as u32, (seed >> 32) as u32];
    (0..count as u64)
        .map(|i| {
            let image = first + i;
            let r = philox4x32_10([0, image as u32, (image >> 32) as u32, LABEL_STEP], key);
            ((r[0] as u64 * num_classes as u64) >> 32) as i64
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Known-answer vectors of Philox4x32-10 from the Random123 distribution (kat_vectors).
    #[test]
    fn philox_known_answers() {
        assert_eq!(philox4x32_10([0, 0, 0, 0], [0, 0]), [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]);
        assert_eq!(philox4x32_10([0xffffffff; 4], [0xffffffff; 2]), [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]);
        assert_eq!(
            philox4x32_10([0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344], [0xa4093822, 0x299f31d0]),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    #[test]
    fn labels_are_uniform_and_batch_independent() {
        let all = class_labels(3, 0, 10_000, 10);
        let mut counts = [0usize; 10];
        for &l in &all {
            counts[l as usize] += 1;
        }
        assert!(counts.iter().all(|&c| (900..1100).contains(&c)), "{counts:?}");
        assert_eq!(class_labels(3, 500, 20, 10), all[500..520]);
    }

    #[test]
    fn normals_have_unit_moments_and_depend_on_every_key_part() {
        let mut v = vec![0.0f32; 1 << 16];
        fill_normal(7, 3, 0, &mut v);
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!(mean.abs() < 0.02 && (var - 1.0).abs() < 0.02, "mean {mean} var {var}");
        let mut other = vec![0.0f32; 16];
        for (seed, image, step) in [(8, 3, 0), (7, 4, 0), (7, 3, 1), (7, 3 + (1 << 32), 0)] {
            fill_normal(seed, image, step, &mut other);
            assert_ne!(&other[..], &v[..16], "({seed}, {image}, {step})");
        }
    }
}
