//! cargo-fuzz target `config_json`: see fuzz/entry.rs and docs/reliability.md.
#![no_main]

#[path = "../entry.rs"]
mod entry;

libfuzzer_sys::fuzz_target!(|data: &[u8]| entry::config_json(data));
