//! Scale-out sampling: an N-image run (FID-style) as S deterministic shards, resumable
//! part files, several devices per process, and the merge into one `.npz`.
//!
//! Image k of a run always gets class `noise::class_labels(seed, k)` and the noise stream
//! (seed, k), so any sharding, batch size or device gives the same pixels for it. Shard i of
//! S takes the contiguous range ⌊iN/S⌋..⌊(i+1)N/S⌋ ([`launcher`]: from flags or the
//! launcher's environment). Each shard writes, into the run folder, uint8 NHWC `.npz` part
//! files named by their global image range (one per batch), optional PNGs named by global
//! index, and a manifest `shard-IIIII-of-SSSSS.json` ([`manifest`]) holding the settings that
//! determine the pixels, the range and the finished parts. Every file goes through a
//! temporary name and a rename, and the manifest is rewritten after each part, so a killed
//! shard resumes where it stopped ([`run()`]); [`merge()`] joins the parts.
//!
//! Progress goes to stderr, one line per write (so shards sharing a log do not interleave).

pub mod launcher;
mod log;
pub mod manifest;
mod merge;
mod parts;
mod run;
mod workers;

pub use launcher::{
    check_num_images, one_device, parse_devices, resolve_shard, shard_of_run, shard_range, ShardChoice,
};
pub use manifest::{Manifest, Part};
pub use merge::{merge, MergeReport};
pub use run::{run, RunReport, RunSettings};
