//! The C ABI called as a C program calls it: same bytes as the Rust API, errors as codes and
//! messages that name the argument, a panic inside the engine reaching the caller as
//! `ICDIT_STATUS_PANIC`, cancellation from another thread, previews, re-entry refused.

use std::ffi::{c_char, c_void, CStr, CString};
use std::ptr::{null, null_mut};
use std::sync::atomic::{AtomicU32, Ordering};

use icdit::session::{Session, SessionOptions, SessionRequest};
use icdit_c::*;

/// The bundled model over 4 steps (its own sampler and guidance), up to 3 images.
unsafe fn open(customise: impl FnOnce(&mut IcditOptions)) -> Result<*mut IcditEngine, (IcditStatus, String)> {
    let mut o = std::mem::MaybeUninit::<IcditOptions>::uninit();
    icdit_options_default(o.as_mut_ptr());
    let mut o = o.assume_init();
    o.steps = 4;
    o.max_batch = 3;
    customise(&mut o);
    let mut h = null_mut();
    let mut err = [0 as c_char; 512];
    match icdit_open(&o, &mut h, err.as_mut_ptr(), err.len()) {
        IcditStatus::Ok => Ok(h),
        s => {
            assert!(h.is_null());
            Err((s, CStr::from_ptr(err.as_ptr()).to_string_lossy().into_owned()))
        }
    }
}

fn request(classes: &[i64], seed: u64) -> IcditRequest {
    IcditRequest {
        classes: classes.as_ptr(),
        count: classes.len(),
        seed,
        first_index: 0,
        cfg: 0.0,
        progress: None,
        preview: None,
        user: null_mut(),
    }
}

unsafe fn last_error(h: *mut IcditEngine) -> String {
    CStr::from_ptr(icdit_last_error(h)).to_string_lossy().into_owned()
}

unsafe fn info(h: *mut IcditEngine) -> IcditInfo {
    let mut i = IcditInfo::default();
    assert_eq!(icdit_info(h, &mut i), IcditStatus::Ok);
    i
}

#[test]
fn pixels_and_latents_are_the_rust_apis_bytes() {
    unsafe {
        let h = open(|_| {}).unwrap();
        let i = info(h);
        assert_eq!((i.num_classes, i.steps, i.image_side, i.pixel_len, i.cfg), (10, 4, 32, 3072, 4.0));
        let classes = [1i64, 2];
        let mut px = vec![0u8; 2 * i.pixel_len];
        assert_eq!(icdit_sample_pixels(h, &request(&classes, 0), px.as_mut_ptr(), px.len()), IcditStatus::Ok);
        assert_eq!(last_error(h), "");
        let mut lat = vec![0f32; 2 * i.latent_len];
        assert_eq!(icdit_sample_latents(h, &request(&classes, 0), lat.as_mut_ptr(), lat.len()), IcditStatus::Ok);
        icdit_close(h);

        let mut s = Session::open(&SessionOptions { steps: Some(4), ..Default::default() }).unwrap();
        let mut want = vec![0u8; px.len()];
        s.sample_pixels(&SessionRequest::new(&classes, 0), &mut want, &mut |_, _| {}).unwrap();
        assert_eq!(px, want);
        assert!(want.iter().collect::<std::collections::BTreeSet<_>>().len() > 50, "a real image");
        let mut want = vec![0f32; lat.len()];
        s.sample_latents(&SessionRequest::new(&classes, 0), &mut want, &mut |_, _| {}).unwrap();
        assert_eq!(lat, want);
        assert_eq!(icdit_abi_version(), ICDIT_ABI_VERSION);
        assert_eq!(CStr::from_ptr(icdit_version()).to_str().unwrap(), env!("CARGO_PKG_VERSION"));
    }
}

#[test]
fn a_panic_inside_the_engine_reaches_c_as_a_status() {
    unsafe {
        let h = open(|_| {}).unwrap();
        let mut px = vec![0u8; info(h).pixel_len];
        icdit_c::testing::panic_in_next_request(h);
        let s = icdit_sample_pixels(h, &request(&[1], 0), px.as_mut_ptr(), px.len());
        assert_eq!(s, IcditStatus::Panic);
        let msg = last_error(h);
        assert!(msg.contains("panic") && msg.contains("injected"), "{msg}");
        // The handle refuses further requests but still answers and closes.
        assert_eq!(icdit_sample_pixels(h, &request(&[1], 0), px.as_mut_ptr(), px.len()), IcditStatus::Panic);
        assert!(last_error(h).contains("close it"));
        icdit_close(h);
        assert_eq!(CStr::from_ptr(icdit_status_name(IcditStatus::Panic as i32)).to_str().unwrap(), "internal error");
        assert_eq!(CStr::from_ptr(icdit_status_name(-3)).to_str().unwrap(), "unknown status");
    }
}

#[test]
fn bad_input_is_a_code_and_a_message_naming_the_argument() {
    unsafe {
        let path = CString::new("/nonexistent/model.safetensors").unwrap();
        let (s, m) = open(|o| o.weights = path.as_ptr()).unwrap_err();
        assert!(s == IcditStatus::Io && m.contains("/nonexistent/model.safetensors"), "{s:?} {m}");
        for (field, value, named) in [
            ("backend", "tpu", "backend"),
            ("sampler", "euler", "sampler"),
            ("cache", "always", "cache"),
            ("rounding", "up", "rounding"),
            ("cache", "icc", "factors"),
        ] {
            let v = CString::new(value).unwrap();
            let (s, m) = open(|o| match field {
                "backend" => o.backend = v.as_ptr(),
                "sampler" => o.sampler = v.as_ptr(),
                "cache" => o.cache = v.as_ptr(),
                _ => o.rounding = v.as_ptr(),
            })
            .unwrap_err();
            assert!(s == IcditStatus::InvalidArgument && m.starts_with(&format!("invalid {named}")), "{field}: {m}");
        }
        let (s, m) = open(|o| o.cfg = -2.0).unwrap_err();
        assert!(s == IcditStatus::InvalidArgument && m.contains("cfg"), "{m}");
        assert_eq!(icdit_open(null(), null_mut(), null_mut(), 0), IcditStatus::InvalidArgument);

        let h = open(|_| {}).unwrap();
        let mut px = vec![0u8; info(h).pixel_len];
        let cases: [(&[i64], bool, &str); 4] = [
            (&[10], false, "invalid class"),
            (&[-1], false, "invalid class"),
            (&[], false, "invalid classes"),
            (&[1, 2], false, "invalid output buffer"),
        ];
        for (classes, _, want) in cases {
            let s = icdit_sample_pixels(h, &request(classes, 0), px.as_mut_ptr(), px.len());
            let m = last_error(h);
            assert!(s == IcditStatus::InvalidArgument && m.starts_with(want), "{classes:?}: {s:?} {m}");
        }
        let s = icdit_sample_pixels(h, &request(&[1], 0), null_mut(), 3072);
        assert!(s == IcditStatus::InvalidArgument && last_error(h).contains("NULL"));
        assert_eq!(icdit_sample_pixels(h, null(), px.as_mut_ptr(), px.len()), IcditStatus::InvalidArgument);
        assert!(last_error(h).starts_with("invalid request"));
        let mut r = request(&[1], 0);
        r.classes = null();
        assert_eq!(icdit_sample_pixels(h, &r, px.as_mut_ptr(), px.len()), IcditStatus::InvalidArgument);
        let mut lat = vec![0f32; 3072 + 1];
        let misaligned = (lat.as_mut_ptr() as *mut u8).add(1) as *mut f32;
        assert_eq!(icdit_sample_latents(h, &request(&[1], 0), misaligned, 3072), IcditStatus::InvalidArgument);
        assert!(last_error(h).contains("aligned"));
        assert_eq!(
            icdit_sample_pixels(null_mut(), &request(&[1], 0), px.as_mut_ptr(), px.len()),
            IcditStatus::InvalidArgument
        );
        // Still usable after every refusal.
        assert_eq!(icdit_sample_pixels(h, &request(&[1], 0), px.as_mut_ptr(), px.len()), IcditStatus::Ok);
        assert_eq!(last_error(h), "");
        icdit_close(h);
        icdit_close(null_mut());
    }
}

struct Shared {
    handle: *mut IcditEngine,
    steps: AtomicU32,
}

unsafe extern "C" fn count_step(user: *mut c_void, _step: u32, _total: u32, _t: u32) {
    let s = &*(user as *const Shared);
    s.steps.fetch_add(1, Ordering::SeqCst);
}

#[test]
fn cancel_from_another_thread_stops_the_request() {
    unsafe {
        let h = open(|o| o.steps = 50).unwrap();
        let shared = Shared { handle: h, steps: AtomicU32::new(0) };
        let mut px = vec![0u8; info(h).pixel_len];
        let mut r = request(&[3], 0);
        r.progress = Some(count_step);
        r.user = &shared as *const Shared as *mut c_void;
        let status = std::thread::scope(|scope| {
            let (steps, addr) = (&shared.steps, shared.handle as usize);
            scope.spawn(move || {
                while steps.load(Ordering::SeqCst) < 2 {
                    std::thread::yield_now();
                }
                assert_eq!(icdit_cancel(addr as *const IcditEngine), IcditStatus::Ok);
            });
            icdit_sample_pixels(h, &r, px.as_mut_ptr(), px.len())
        });
        let done = shared.steps.load(Ordering::SeqCst);
        assert_eq!(status, IcditStatus::Cancelled, "{}", last_error(h));
        assert!((2..50).contains(&done), "{done} steps ran");
        assert!(last_error(h).contains("interrupted"));
        // The next request runs in full.
        shared.steps.store(0, Ordering::SeqCst);
        r.progress = Some(count_step);
        assert_eq!(icdit_sample_pixels(h, &r, px.as_mut_ptr(), px.len()), IcditStatus::Ok);
        assert_eq!(shared.steps.load(Ordering::SeqCst), 50);
        icdit_close(h);
    }
}

struct Previews {
    handle: *mut IcditEngine,
    calls: u32,
    last: Vec<f32>,
    pixels: usize,
    reentry: Option<IcditStatus>,
}

unsafe extern "C" fn keep_preview(
    user: *mut c_void,
    step: u32,
    total: u32,
    latents: *const f32,
    len: usize,
    pixels: *const u8,
    pixels_len: usize,
) {
    let p = &mut *(user as *mut Previews);
    assert!(step < total && step == p.calls);
    p.calls += 1;
    p.last = std::slice::from_raw_parts(latents, len).to_vec();
    p.pixels = if pixels.is_null() { 0 } else { pixels_len };
    let mut i = IcditInfo::default();
    p.reentry = Some(icdit_info(p.handle, &mut i));
}

#[test]
fn previews_reach_c_and_end_at_the_result() {
    unsafe {
        let h = open(|_| {}).unwrap();
        let mut p = Previews { handle: h, calls: 0, last: Vec::new(), pixels: 0, reentry: None };
        let mut out = vec![0f32; 2 * info(h).latent_len];
        let mut r = request(&[7, 8], 4);
        r.preview = Some(keep_preview);
        r.user = &mut p as *mut Previews as *mut c_void;
        assert_eq!(icdit_sample_latents(h, &r, out.as_mut_ptr(), out.len()), IcditStatus::Ok);
        assert_eq!((p.calls, p.pixels), (4, out.len()));
        assert_eq!(p.last, out, "DDIM's last x̂₀ is the result");
        assert_eq!(p.reentry, Some(IcditStatus::Busy), "a callback may not call back into its handle");
        icdit_close(h);
    }
}

#[test]
fn a_gpu_handle_belongs_to_the_thread_that_opened_it() {
    unsafe {
        let emu = CString::new("emu").unwrap();
        let h = open(|o| o.backend = emu.as_ptr()).unwrap();
        let addr = h as usize;
        let (status, msg) = std::thread::spawn(move || {
            let h = addr as *mut IcditEngine;
            let mut px = vec![0u8; 3072];
            let s = icdit_sample_pixels(h, &request(&[1], 0), px.as_mut_ptr(), px.len());
            (s, last_error(h))
        })
        .join()
        .unwrap();
        assert!(status == IcditStatus::InvalidArgument && msg.starts_with("invalid thread"), "{status:?} {msg}");
        icdit_close(h);
    }
}
