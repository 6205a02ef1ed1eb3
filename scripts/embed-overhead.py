"""Per-request overhead of the Python package over the Rust API, in one process.

    python scripts/embed-overhead.py [--rounds 21] [--steps 25] [--classes 1]

Each round makes one request through the Rust API (icdit::Engine::sample into f32 latents,
timed in Rust on an engine of its own with the same model and options) and one through
icdit.Engine.sample (a new numpy uint8 array per call). Prints both medians, and, measured
within each Python call so that the load of a shared machine cancels out, the median time
the call spent outside the engine's sampling loop plus the module's per-step callbacks (GIL
re-acquisition and the Ctrl-C check). The C ABI's counterpart is
`cargo run --release -p icdit-c --example overhead`. Needs the wheel installed
(scripts/ci-embed.sh installs it into ~/.cache/icdit/py-venv).
"""

import argparse
import statistics
import time

import icdit


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--classes", default="1")
    a = ap.parse_args()
    classes = [int(c) for c in a.classes.split(",")]

    engine = icdit.Engine(steps=a.steps, max_batch=len(classes))
    engine.sample(classes, seed=0)  # warm
    rust, py, outside = [], [], []
    for _ in range(a.rounds):
        rust.append(engine._time_rust_api(classes, 0, 1)[0])
        t = time.perf_counter()
        engine.sample(classes, seed=0)
        total = time.perf_counter() - t
        inside, callbacks = engine._last_timing()
        py.append(total)
        outside.append(total - inside + callbacks)
    ms = lambda v: statistics.median(v) * 1e3
    print(f"bundled model, {engine.steps} steps, cfg {engine.cfg}, {len(classes)} image(s), {a.rounds} rounds, {engine.device}")
    print(f"  Rust API  Engine::sample        median {ms(rust):9.3f} ms")
    print(f"  Python    icdit.Engine.sample   median {ms(py):9.3f} ms")
    print(f"  Python time outside the engine's loop, plus its per-step callbacks: median {ms(outside) * 1e3:.1f} µs")


if __name__ == "__main__":
    main()
