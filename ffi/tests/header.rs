//! `include/icdit.h` is generated from `ffi/src/lib.rs`: this test generates it again with
//! cbindgen and fails if the committed header differs. After changing the ABI, rewrite it with
//! `ICDIT_BLESS=1 cargo test --release -p icdit-c --test header`.

use std::path::Path;

#[test]
fn committed_header_matches_the_source() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).expect("ffi/cbindgen.toml");
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_crate(crate_dir)
        .with_config(config)
        .generate()
        .expect("cbindgen parses ffi/src/lib.rs")
        .write(&mut generated);
    let generated = String::from_utf8(generated).expect("UTF-8 header");
    for name in ["icdit_open", "icdit_sample_pixels", "icdit_cancel", "icdit_close", "ICDIT_STATUS_PANIC"] {
        assert!(generated.contains(name), "the generated header lacks {name}");
    }
    let path = crate_dir.join("../include/icdit.h");
    if std::env::var_os("ICDIT_BLESS").is_some() {
        std::fs::write(&path, &generated).expect("write include/icdit.h");
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "include/icdit.h is stale: rerun with ICDIT_BLESS=1 cargo test --release -p icdit-c --test header"
    );
}
