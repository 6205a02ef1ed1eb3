//! cargo-fuzz target `dit_diffusers`: see fuzz/entry.rs and docs/reliability.md.
#![no_main]

#[path = "../entry.rs"]
mod entry;

libfuzzer_sys::fuzz_target!(|data: &[u8]| entry::dit_diffusers(data));
