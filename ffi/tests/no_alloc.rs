//! A request through the C ABI allocates nothing after the first (a counting global
//! allocator sees every thread's allocations).

#[path = "../../tests/counting_alloc/mod.rs"]
mod counting_alloc;

use std::ptr::null_mut;

use counting_alloc::allocations_during;
use icdit_c::*;

unsafe extern "C" fn on_step(
    _: *mut std::ffi::c_void,
    _: u32,
    _: u32,
    _: *const f32,
    _: usize,
    _: *const u8,
    _: usize,
) {
}

#[test]
fn requests_allocate_nothing_after_open() {
    unsafe {
        let mut o = std::mem::MaybeUninit::<IcditOptions>::uninit();
        icdit_options_default(o.as_mut_ptr());
        let mut o = o.assume_init();
        o.steps = 3;
        o.max_batch = 2;
        let mut h = null_mut();
        assert_eq!(icdit_open(&o, &mut h, null_mut(), 0), IcditStatus::Ok);
        let classes = [4i64, 9];
        let mut r = IcditRequest {
            classes: classes.as_ptr(),
            count: 2,
            seed: 1,
            first_index: 0,
            cfg: 0.0,
            progress: None,
            preview: Some(on_step),
            user: null_mut(),
        };
        let mut px = vec![0u8; 2 * 3072];
        let mut lat = vec![0f32; 2 * 3072];
        assert_eq!(icdit_sample_pixels(h, &r, px.as_mut_ptr(), px.len()), IcditStatus::Ok);
        let during = allocations_during(|| {
            assert_eq!(icdit_sample_pixels(h, &r, px.as_mut_ptr(), px.len()), IcditStatus::Ok);
            r.preview = None;
            assert_eq!(icdit_sample_latents(h, &r, lat.as_mut_ptr(), lat.len()), IcditStatus::Ok);
        });
        icdit_close(h);
        assert_eq!(during, 0, "{during} allocations in two requests through the C ABI");
        assert!(px.iter().any(|&v| v != px[0]) && lat.iter().any(|v| v.abs() > 1e-3));
    }
}
