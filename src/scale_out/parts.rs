//! A shard's part files: `part-FIRST-END.npz` (uint8 NHWC `arr_0`, one per batch) named by
//! their global image range, with optional PNGs named by global index; which parts a
//! resumed shard keeps, what is left to sample, and the temporary files a killed run left.

use std::path::Path;

use super::log::progress;
use super::manifest::Part;
use crate::error::Error;
use crate::image::{self, Rounding};

/// `part-000010-000020.npz`: images 10..20.
pub(super) fn part_name(first: u64, end: u64) -> String {
    format!("part-{first:06}-{end:06}.npz")
}

/// The parts of a previous run of this shard worth keeping: those whose file is still there
/// with the recorded size and that lie in the shard's range [first, end).
pub(super) fn still_there(dir: &Path, recorded: Vec<Part>, (first, end): (u64, u64)) -> Vec<Part> {
    let mut kept = Vec::new();
    for p in recorded {
        let ok = std::fs::metadata(dir.join(&p.file)).is_ok_and(|m| m.len() == p.bytes);
        if ok && p.first >= first && p.first + p.count <= end {
            kept.push(p);
        } else {
            progress(format!("note: {} is missing or incomplete; its images will be sampled again", p.file));
        }
    }
    kept
}

/// What is left of [first, end) besides the finished `parts` (sorted by first image): the
/// gaps between them, cut into (first image, count) batches of at most `batch` images.
pub(super) fn gaps(parts: &[Part], (first, end): (u64, u64), batch: u64) -> Vec<(u64, u64)> {
    let mut todo = Vec::new();
    let mut at = first;
    for p in parts.iter().map(|p| (p.first, p.first + p.count)).chain([(end, end)]) {
        while at < p.0 {
            let n = batch.min(p.0 - at);
            todo.push((at, n));
            at += n;
        }
        at = at.max(p.1);
    }
    todo
}

/// Removes temporary files a killed run of this shard left: its manifest's, its parts' and
/// its PNGs' (recognised by the image index at the start of their names).
pub(super) fn remove_leftovers(dir: &Path, manifest: &str, range: (u64, u64)) {
    let ours_part = |name: &str| {
        let Some(r) = name.strip_prefix("part-").and_then(|r| r.strip_suffix(".npz")) else { return false };
        let Some((a, b)) = r.split_once('-') else { return false };
        matches!((a.parse::<u64>(), b.parse::<u64>()), (Ok(a), Ok(b)) if a >= range.0 && b <= range.1)
    };
    let ours_png = |name: &str| {
        name.ends_with(".png")
            && name.split('-').next().and_then(|i| i.parse::<u64>().ok()).is_some_and(|i| i >= range.0 && i < range.1)
    };
    for (folder, png) in [(dir.to_path_buf(), false), (dir.join("images"), true)] {
        let Ok(entries) = std::fs::read_dir(&folder) else { continue };
        for e in entries.flatten() {
            let file_name = e.file_name();
            let Some(name) = file_name.to_str().and_then(crate::fsio::temp_target) else { continue };
            let ours = if png { ours_png(name) } else { name == manifest || ours_part(name) };
            if ours {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// How a shard's images are written: the run folder, the image shape and options.
pub(super) struct PartWriter<'a> {
    pub dir: &'a Path,
    pub channels: usize,
    pub side: usize,
    pub rounding: Rounding,
    /// Also one PNG per image into `dir/images`.
    pub png: bool,
    pub seed: u64,
}

impl PartWriter<'_> {
    /// Bytes of one image as uint8 HWC.
    pub fn image_bytes(&self) -> usize {
        self.side * self.side * self.channels
    }

    /// Writes images `first..first + labels.len()` (floats in [−1, 1], (C, H, W) each) as
    /// one part file (and PNGs when asked), using `pixels` as the uint8 buffer.
    pub fn write(&self, first: u64, labels: &[i64], images: &[f32], pixels: &mut [u8]) -> Result<Part, Error> {
        let (count, per_image) = (labels.len(), self.image_bytes());
        let px = &mut pixels[..count * per_image];
        image::to_nhwc_u8(images, count, self.channels, self.side, self.rounding, px);
        if self.png {
            for (i, &c) in labels.iter().enumerate() {
                let png = self.dir.join("images").join(image::png_name(first + i as u64, c, Some(self.seed)));
                image::write_png(&png, &px[i * per_image..(i + 1) * per_image], self.side, self.side, self.channels)?;
            }
        }
        let file = part_name(first, first + count as u64);
        let path = self.dir.join(&file);
        image::write_npz(&path, px, count, self.side, self.channels)?;
        let bytes = std::fs::metadata(&path).map_err(|e| Error::io(&path, e))?.len();
        Ok(Part { file, first, count: count as u64, bytes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(first: u64, count: u64) -> Part {
        Part { file: part_name(first, first + count), first, count, bytes: 0 }
    }

    #[test]
    fn gaps_between_finished_parts_are_cut_into_batches() {
        assert_eq!(gaps(&[], (10, 20), 4), [(10, 4), (14, 4), (18, 2)]);
        assert_eq!(gaps(&[part(12, 3), part(17, 3)], (10, 20), 4), [(10, 2), (15, 2)]);
        assert!(gaps(&[part(10, 10)], (10, 20), 4).is_empty());
        assert_eq!(part_name(10, 20), "part-000010-000020.npz");
    }
}
