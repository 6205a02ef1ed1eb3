"""The Python package on the bundled model: the same pixels as the command line and the C
example, arrays in and out, errors that name the argument, cancellation (Engine.cancel from
another thread, and Ctrl-C), the GIL released while sampling, previews and calibration.

Run by scripts/ci-embed.sh against the installed wheel; ICDIT_CLI names the `icdit` binary
(default: the checkout's target/release/icdit) and ICDIT_C_PIXELS the raw output of
examples/c/sample.c for classes ICDIT_C_CLASSES, seed 0.
"""

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import icdit

REPO = Path(__file__).resolve().parents[2]


def cli():
    path = Path(os.environ.get("ICDIT_CLI", REPO / "target" / "release" / "icdit"))
    if not path.is_file():
        pytest.skip(f"no icdit binary at {path} (cargo build --release, or set ICDIT_CLI)")
    return path


@pytest.fixture(scope="module")
def engine():
    return icdit.Engine()


@pytest.fixture(scope="module")
def short():
    """The bundled model over 4 steps, for the tests that need many requests."""
    return icdit.Engine(steps=4, max_batch=4)


def cli_pixels(tmp_path, *flags):
    npz = tmp_path / "cli.npz"
    subprocess.run([str(cli()), "sample", *flags, "--npz", str(npz)], check=True, cwd=REPO, capture_output=True)
    return np.load(npz)["arr_0"]


def test_defaults_give_the_command_lines_pixels(engine, tmp_path):
    assert (engine.steps, engine.cfg, engine.image_shape, engine.num_classes) == (25, 4.0, (32, 32, 3), 10)
    assert engine.class_names[:2] == ["circle", "square"]
    images = engine.sample([1, 2], seed=0)
    assert images.dtype == np.uint8 and images.shape == (2, 32, 32, 3)
    want = cli_pixels(tmp_path, "--class", "1,2", "--seed", "0")
    assert len(np.unique(want)) > 50, "the reference is a real image"
    np.testing.assert_array_equal(images, want)


def test_c_example_gives_the_same_pixels(engine):
    raw = os.environ.get("ICDIT_C_PIXELS")
    if raw is None:
        pytest.skip("ICDIT_C_PIXELS not set (scripts/ci-embed.sh sets it)")
    classes = [int(c) for c in os.environ.get("ICDIT_C_CLASSES", "1,2,3").split(",")]
    c_pixels = np.fromfile(raw, dtype=np.uint8).reshape(len(classes), 32, 32, 3)
    np.testing.assert_array_equal(engine.sample(classes, seed=0), c_pixels)


def test_icc_with_calibrated_factors_matches_the_command_line(tmp_path):
    factors = tmp_path / "f.safetensors"
    assert Path(icdit.calibrate(factors, method="svd", rank=16)) == factors
    e = icdit.Engine(cache="icc", factors=str(factors), steps=10)
    got = e.sample([4, 5], seed=3)
    want = cli_pixels(tmp_path, "--class", "4,5", "--seed", "3", "--steps", "10", "--cache", "icc", "--factors", str(factors))
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="calib_self"):
        icdit.calibrate(tmp_path / "g.safetensors")


def test_latents_out_buffers_and_batches(short):
    lat = short.sample([1, 2], seed=5, output="latents")
    assert lat.dtype == np.float32 and lat.shape == (2, 3, 32, 32)
    np.testing.assert_array_equal(short.sample_latents([1, 2], seed=5), lat)
    px = short.sample([1, 2], seed=5)
    # Pixels are the latents (a pixel-space model) through DiT's truncating uint8 cast.
    want = np.clip(np.float32(127.5) * lat + np.float32(128.0), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(px, want)
    out = np.zeros((2, 32, 32, 3), np.uint8)
    assert short.sample([1, 2], seed=5, out=out) is out
    np.testing.assert_array_equal(out, px)
    # Image k is the same alone or in a batch.
    np.testing.assert_array_equal(short.sample([2], seed=5, first_index=1)[0], px[1])
    assert short.sample(np.array([1, 2]), seed=5).tobytes() == px.tobytes()


def test_guidance_per_request(short):
    guided = short.sample([3], seed=1)
    unguided = short.sample([3], seed=1, cfg=1.0)
    assert not np.array_equal(guided, unguided)
    np.testing.assert_array_equal(short.sample([3], seed=1), guided)
    np.testing.assert_array_equal(icdit.Engine(steps=4, cfg=1.0).sample([3], seed=1), unguided)


def test_bad_input_raises_naming_the_argument(short, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        icdit.Engine(weights=tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match="invalid class: class 10"):
        short.sample([1, 10])
    with pytest.raises(ValueError, match="invalid classes"):
        short.sample([])
    with pytest.raises(ValueError, match="invalid classes: 5 images"):
        short.sample([1, 2, 3, 4, 5])
    with pytest.raises(TypeError, match="classes"):
        short.sample([1.5])
    with pytest.raises(TypeError, match="out: expected a C-ordered, writeable uint8 .* got dtype float32"):
        short.sample([1], out=np.zeros((1, 32, 32, 3), np.float32))
    with pytest.raises(TypeError, match="out: expected a C-ordered, writeable float32 .* got dtype float64"):
        short.sample([1], output="latents", out=np.zeros((1, 3, 32, 32), np.float64))
    with pytest.raises(TypeError, match="out: .* got a list"):
        short.sample([1], out=[0] * 3072)
    with pytest.raises(ValueError, match=r"out: .*shape \[1, 32, 32, 3\], got shape \[2, 32, 32, 3\]"):
        short.sample([1], out=np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="not C-ordered"):
        short.sample([1], out=np.zeros((1, 3, 32, 32), np.uint8).transpose(0, 2, 3, 1))
    frozen = np.zeros((1, 32, 32, 3), np.uint8)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        short.sample([1], out=frozen)
    with pytest.raises(ValueError, match="invalid output"):
        short.sample([1], output="png")
    with pytest.raises(ValueError, match="invalid cfg scale"):
        short.sample([1], cfg=0.5)
    with pytest.raises(ValueError, match="invalid sampler"):
        icdit.Engine(sampler="euler")
    with pytest.raises(ValueError, match="invalid factors"):
        icdit.Engine(cache="icc")
    with pytest.raises(ValueError, match="invalid backend"):
        icdit.Engine(backend="tpu")
    with pytest.raises(ValueError, match="invalid max batch"):
        icdit.Engine(max_batch=0)
    with pytest.raises(OverflowError, match="max_batch"):
        icdit.Engine(max_batch=-1)
    assert short.sample([1]).shape == (1, 32, 32, 3), "the engine still works"


def test_cancel_from_another_thread():
    e = icdit.Engine(steps=100, max_batch=1)
    started = threading.Event()
    steps = []

    def progress(i, total):
        steps.append(i)
        started.set()

    def canceller():
        started.wait(30)
        e.cancel()

    t = threading.Thread(target=canceller)
    t.start()
    with pytest.raises(icdit.Cancelled, match="interrupted"):
        e.sample([1], progress=progress)
    t.join()
    assert 1 <= len(steps) < 100
    steps.clear()
    assert e.sample([1], progress=progress).shape == (1, 32, 32, 3)
    assert steps == list(range(100))


def test_ctrl_c_stops_a_request():
    e = icdit.Engine(steps=200, max_batch=1)
    e.sample([1])  # warm
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    begin = time.perf_counter()
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        e.sample([1])
    stopped = time.perf_counter() - begin
    timer.join()
    full = time.perf_counter()
    e.sample([1])
    full = time.perf_counter() - full
    assert stopped < 0.7 * full, f"Ctrl-C after {stopped:.2f} s of a {full:.2f} s request"


def test_gil_is_released_while_sampling():
    e = icdit.Engine(steps=60, max_batch=1)
    ticks = 0
    t = threading.Thread(target=e.sample, args=([2],))
    t.start()
    while t.is_alive():
        ticks += 1
        time.sleep(0.002)
    t.join()
    assert ticks > 20, f"the main thread ran only {ticks} times while another thread sampled"


def test_previews_are_x0_each_step(short):
    seen = []

    def preview(i, total, x0, pixels):
        seen.append((i, total, x0.copy(), pixels.copy()))

    lat = short.sample([6, 7], seed=2, output="latents", preview=preview)
    assert [s[0] for s in seen] == [0, 1, 2, 3] and all(s[1] == 4 for s in seen)
    assert seen[0][2].shape == (2, 3, 32, 32) and seen[0][3].shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(seen[-1][2], lat)  # DDIM's last x̂₀ is the result
    assert not np.array_equal(seen[0][2], lat)
    np.testing.assert_array_equal(seen[-1][3], short.sample([6, 7], seed=2))


def test_a_failing_callback_stops_the_request(short):
    def progress(i, total):
        if i == 1:
            raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        short.sample([1], progress=progress)
    assert short.sample([1]).shape == (1, 32, 32, 3)


def test_package_ships_stubs_and_the_model():
    pkg = Path(icdit.__file__).parent
    assert (pkg / "__init__.pyi").is_file() and (pkg / "py.typed").is_file()
    assert (pkg / "icdit-shapes-32.safetensors").stat().st_size > 1_000_000
    assert icdit.__version__ == "0.1.0"
