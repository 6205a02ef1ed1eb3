//! Config arithmetic against the reference doc's computed numbers (part B, G.1).

use icdit::DitConfig;

#[test]
fn xl2_parameter_and_mac_counts_match_reference() {
    let xl = DitConfig::xl2_256();
    assert_eq!(xl.param_count(), 675_129_632);
    assert_eq!(xl.forward_macs(), 118_621_421_568);
    assert_eq!((xl.tokens(), xl.head_dim(), xl.out_channels()), (256, 72, 8));
    let xl512 = DitConfig::family("XL/2", 64).unwrap();
    assert_eq!(xl512.tokens(), 1024);
}

#[test]
fn family_table_matches_reference() {
    for (name, params) in [
        ("XL/4", 675_074_432usize),
        ("XL/8", 675_683_072),
        ("L/2", 458_102_816),
        ("B/2", 130_512_416),
        ("S/2", 32_963_360),
        ("S/8", 33_148_160),
    ] {
        assert_eq!(DitConfig::family(name, 32).unwrap().param_count(), params, "{name}");
    }
    assert_eq!(DitConfig::family_heads(384, 12), Some(6));
    assert_eq!(DitConfig::family_heads(144, 2), None);
}

#[test]
fn impossible_configs_are_refused() {
    let mut c = DitConfig::xl2_256();
    c.num_heads = 7;
    assert!(c.validate("test").unwrap_err().to_string().contains("not divisible by num_heads 7"));
    let mut c = DitConfig::xl2_256();
    c.input_size = 33;
    assert!(c.validate("test").unwrap_err().to_string().contains("not a multiple of patch_size"));
}

#[test]
fn icc_mac_accounting_matches_reference() {
    use icdit::cost::{schedule_macs, step_macs};
    use icdit::forward::StepKind;
    let xl = DitConfig::xl2_256();
    let ranks = vec![[128usize; 6]; 28];
    assert_eq!(step_macs(&xl, StepKind::Full, &ranks), 118_621_421_568);
    assert_eq!(step_macs(&xl, StepKind::Calibrated, &ranks), 23_494_606_848);
    assert_eq!(step_macs(&xl, StepKind::Reuse, &ranks), 241_385_472);
    // icc's default: 100 steps, period 2 → ratio 0.5990.
    let kinds = (0..100).map(|s| if s % 2 == 0 { StepKind::Full } else { StepKind::Calibrated });
    let (mean, ratio) = schedule_macs(&xl, kinds, &ranks);
    assert!((mean / 1e9 - 71.06).abs() < 0.01 && (ratio - 0.5990).abs() < 1e-4, "{mean} {ratio}");
    for (r, want) in [(32usize, 9.23), (64, 13.98), (256, 42.52)] {
        let g = step_macs(&xl, StepKind::Calibrated, &vec![[r; 6]; 28]) as f64 / 1e9;
        assert!((g - want).abs() < 0.01, "rank {r}: {g}");
    }
}
