"""Per-request overhead of the C ABI and the Python package over the Rust API, in one process.

    python scripts/embed-overhead.py [--rounds 15] [--steps N] [--classes 1] [--lib PATH/libicdit_c.so]

Each round makes one request through each interface, interleaved so that drift on a shared
machine hits all three alike: the Rust API (icdit::Engine::sample into f32 latents, timed in
Rust), the C ABI (icdit_sample_pixels through ctypes, so the figure includes ctypes' own cost)
and icdit.Engine.sample (a new numpy uint8 array per call). Prints each interface's median and
the medians of the per-round differences. Needs the wheel installed (scripts/ci-embed.sh) and
libicdit_c.so (cargo build --release -p icdit-c).
"""

import argparse
import ctypes
import statistics
import time
from pathlib import Path

import icdit


class Request(ctypes.Structure):
    _fields_ = [
        ("classes", ctypes.POINTER(ctypes.c_int64)),
        ("count", ctypes.c_size_t),
        ("seed", ctypes.c_uint64),
        ("first_index", ctypes.c_uint64),
        ("cfg", ctypes.c_float),
        ("progress", ctypes.c_void_p),
        ("preview", ctypes.c_void_p),
        ("user", ctypes.c_void_p),
    ]


class Options(ctypes.Structure):
    _fields_ = [(n, ctypes.c_char_p) for n in ("weights", "factors", "vae", "backend", "sampler", "respacing", "cache", "rounding")] + [
        ("max_batch", ctypes.c_uint32),
        ("steps", ctypes.c_uint32),
        ("period", ctypes.c_uint32),
        ("full_steps", ctypes.c_void_p),
        ("full_steps_len", ctypes.c_size_t),
        ("threads", ctypes.c_uint32),
        ("device", ctypes.c_uint32),
        ("eta", ctypes.c_float),
        ("cfg", ctypes.c_float),
        ("check_finite", ctypes.c_bool),
    ]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=0, help="0: the bundled model's recommendation (25)")
    ap.add_argument("--classes", default="1")
    ap.add_argument("--lib", default=str(Path(__file__).resolve().parents[1] / "target/release/libicdit_c.so"))
    a = ap.parse_args()
    classes = [int(c) for c in a.classes.split(",")]
    n = len(classes)

    py = icdit.Engine(steps=a.steps or None, max_batch=n)
    lib = ctypes.CDLL(a.lib)
    lib.icdit_options_default.argtypes = [ctypes.POINTER(Options)]
    lib.icdit_open.argtypes = [ctypes.POINTER(Options), ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p, ctypes.c_size_t]
    lib.icdit_sample_pixels.argtypes = [ctypes.c_void_p, ctypes.POINTER(Request), ctypes.c_void_p, ctypes.c_size_t]
    lib.icdit_close.argtypes = [ctypes.c_void_p]
    o = Options()
    lib.icdit_options_default(ctypes.byref(o))
    o.steps, o.max_batch = a.steps, n
    weights = str(Path(icdit.__file__).parent / "icdit-shapes-32.safetensors").encode()
    o.weights = weights
    handle, err = ctypes.c_void_p(), ctypes.create_string_buffer(512)
    assert lib.icdit_open(ctypes.byref(o), ctypes.byref(handle), err, 512) == 0, err.value
    cls = (ctypes.c_int64 * n)(*classes)
    req = Request(cls, n, 0, 0, 0.0, None, None, None)
    out = ctypes.create_string_buffer(n * 32 * 32 * 3)

    def c_call():
        t = time.perf_counter()
        assert lib.icdit_sample_pixels(handle, ctypes.byref(req), out, len(out)) == 0
        return time.perf_counter() - t

    def py_call():
        t = time.perf_counter()
        py.sample(classes, seed=0)
        return time.perf_counter() - t

    for f in (c_call, py_call):
        f()  # warm
    rust, c, p = [], [], []
    for _ in range(a.rounds):
        rust.append(py._time_rust_api(classes, 0, 1)[0])
        c.append(c_call())
        p.append(py_call())
    assert bytes(out) == py.sample(classes, seed=0).tobytes(), "the C ABI and Python gave different bytes"
    lib.icdit_close(handle)
    ms = lambda v: statistics.median(v) * 1e3
    print(f"bundled model, {py.steps} steps, cfg {py.cfg}, {n} image(s), {a.rounds} rounds, {py.device}")
    print(f"  Rust API  (Engine::sample)            median {ms(rust):8.3f} ms")
    print(f"  C ABI     (icdit_sample_pixels)       median {ms(c):8.3f} ms   overhead (median of per-round differences) {ms([x - y for x, y in zip(c, rust)]):+.3f} ms")
    print(f"  Python    (icdit.Engine.sample)       median {ms(p):8.3f} ms   overhead (median of per-round differences) {ms([x - y for x, y in zip(p, rust)]):+.3f} ms")


if __name__ == "__main__":
    main()
