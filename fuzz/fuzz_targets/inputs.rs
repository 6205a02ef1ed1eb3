//! cargo-fuzz target `inputs`: see fuzz/entry.rs and docs/reliability.md.
#![no_main]

#[path = "../entry.rs"]
mod entry;

libfuzzer_sys::fuzz_target!(|data: &[u8]| entry::inputs(data));
