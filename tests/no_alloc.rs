//! Proves the CPU forward pass allocates nothing after set-up: a counting global allocator
//! sees every heap allocation on every thread (the worker pool included).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use icdit::{CpuEngine, CpuOptions, DitConfig, DitModel};

struct Counting;

static ALLOCS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::SeqCst);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::SeqCst);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn cpu_forward_allocates_nothing() {
    // Shapes large enough that every op runs multi-threaded (N = 64 tokens, rows 4).
    let cfg = DitConfig {
        input_size: 16,
        patch_size: 2,
        in_channels: 4,
        hidden_size: 144,
        depth: 2,
        num_heads: 2,
        mlp_ratio: 4.0,
        class_dropout_prob: 0.1,
        num_classes: 10,
        learn_sigma: true,
    };
    let model = Arc::new(DitModel::random(&cfg, 7).unwrap());
    let opts = CpuOptions {
        max_batch: 2,
        guidance: true,
        threads: 2,
    };
    let mut engine = CpuEngine::new(model, &opts).unwrap();
    let rows = 4;
    let x: Vec<f32> = (0..rows * cfg.image_elems()).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
    let t = [999i64, 500, 999, 500];
    let y = [3i64, 7, 10, 10];
    let mut out = vec![0.0f32; rows * cfg.output_elems()];
    engine.forward(&x, &t, &y, &mut out).unwrap(); // warm-up (thread start-up, lazy statics)

    let before = ALLOCS.load(Ordering::SeqCst);
    for _ in 0..3 {
        engine.forward(&x, &t, &y, &mut out).unwrap();
    }
    let during = ALLOCS.load(Ordering::SeqCst) - before;
    println!("heap allocations during 3 forward passes: {during}");
    assert_eq!(during, 0, "the forward pass allocated {during} times");
    // The counter does see allocations: an error (a formatted message) allocates.
    let before = ALLOCS.load(Ordering::SeqCst);
    assert!(engine.forward(&x, &t, &[3, 7, 10, 99], &mut out).is_err());
    assert!(ALLOCS.load(Ordering::SeqCst) > before, "counting allocator is not counting");
    // And the pass did real work.
    assert!(out.iter().any(|v| v.abs() > 1e-3) && out.iter().all(|v| v.is_finite()));
}
