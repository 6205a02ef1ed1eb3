//! With the feature `cuda`: the ptxas resource usage of every kernel the library embeds
//! (registers, shared memory, stack frame, spills), printed as a table, and a failure on any
//! register spill or local memory (a stack frame), which would mean a kernel silently runs
//! from memory instead of registers. Run with `-- --nocapture` to see the table
//! (scripts/ci-cuda.sh does).
#![cfg(feature = "cuda")]

use icdit::gpu::{kernels, PTXAS_REPORT};

#[derive(Debug, Default)]
struct Usage {
    registers: u32,
    smem: u32,
    stack: u32,
    spill_stores: u32,
    spill_loads: u32,
}

/// The number before `unit` in `line` ("80 registers" → 80).
fn number_before(line: &str, unit: &str) -> Option<u32> {
    let head = &line[..line.find(unit)?];
    head.split(|c: char| !c.is_ascii_digit()).rfind(|s| !s.is_empty())?.parse().ok()
}

fn parse(report: &str) -> Vec<(String, String, Usage)> {
    let mut out: Vec<(String, String, Usage)> = Vec::new();
    for line in report.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or_default().to_string();
            let arch = rest.split("for '").nth(1).unwrap_or_default().trim_end_matches('\'').to_string();
            out.push((name, arch, Usage::default()));
        } else if let Some((_, _, u)) = out.last_mut() {
            if line.contains("stack frame") {
                u.stack = number_before(line, "bytes stack frame").unwrap_or(0);
                u.spill_stores = number_before(line, "bytes spill stores").unwrap_or(0);
                u.spill_loads = number_before(line, "bytes spill loads").unwrap_or(0);
            } else if line.contains("Used") && line.contains("registers") {
                u.registers = number_before(line, "registers").unwrap_or(0);
                u.smem = number_before(line, "bytes smem").unwrap_or(0);
                // Local memory, if ptxas reports it separately.
                u.stack = u.stack.max(number_before(line, "bytes lmem").unwrap_or(0));
            }
        }
    }
    out
}

#[test]
fn every_kernel_fits_in_registers() {
    let usage = parse(PTXAS_REPORT);
    // One print, so the table stays whole when other tests print at the same time.
    let mut table = format!(
        "ptxas resource usage per kernel:\n  {:<26} {:<7} {:>9} {:>10} {:>11} {:>14}\n",
        "kernel", "arch", "registers", "smem (B)", "stack (B)", "spills st/ld"
    );
    for (name, arch, u) in &usage {
        table += &format!(
            "  {name:<26} {arch:<7} {:>9} {:>10} {:>11} {:>8}/{}\n",
            u.registers, u.smem, u.stack, u.spill_stores, u.spill_loads
        );
    }
    print!("{table}");
    for k in kernels::ALL {
        assert!(
            usage.iter().any(|(n, _, _)| n == k.name),
            "{} is missing from the ptxas report:\n{PTXAS_REPORT}",
            k.name
        );
    }
    let bad: Vec<_> =
        usage.iter().filter(|(_, _, u)| u.stack + u.spill_stores + u.spill_loads > 0).map(|(n, _, _)| n).collect();
    assert!(bad.is_empty(), "kernels with spills or local memory: {bad:?}\n{PTXAS_REPORT}");
}

/// The parser must see a spill when there is one (a report of the shape ptxas prints).
#[test]
fn parser_sees_spills_and_local_memory() {
    let report = "ptxas info    : Compiling entry function 'k' for 'sm_90'\n\
                  ptxas info    : Function properties for k\n    \
                  24 bytes stack frame, 12 bytes spill stores, 8 bytes spill loads\n\
                  ptxas info    : Used 255 registers, used 1 barriers, 4096 bytes smem\n";
    let u = parse(report);
    assert_eq!(u.len(), 1);
    let (name, arch, u) = &u[0];
    assert_eq!((name.as_str(), arch.as_str()), ("k", "sm_90"));
    assert_eq!((u.registers, u.smem, u.stack, u.spill_stores, u.spill_loads), (255, 4096, 24, 12, 8));
}
