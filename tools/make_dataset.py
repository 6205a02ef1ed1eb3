"""icdit "shapes-32": a deterministic, class-conditional 32x32 RGB image set drawn by code.

Ten classes that differ by shape, never by colour: each image is one shape (or stripe pattern) in a
random colour on a flat background of another random colour, with random position, scale and
rotation. Shapes are rasterised antialiased (4x4 supersampling) and quantised to 8 bits, then
mapped to [-1, 1] like the image pipelines DiT trains on.

Version 4 (this one): version 3 with the star class (label 7) replaced by two dots side by side.
Every other image is identical to version 3's (each image draws its parameters from its own seeded
stream, whatever its class). A DiT of the bundled model's size trained on version 3 for 14,500 steps
(about 100 CPU minutes) still drew stars as spiky blobs while the other classes came out as themselves
(rings about half the time; weights/README.md): the star was not a class a person could name in
the model's samples.
Version 3: radius 9.5-13 px, centre within 2.5 px of the middle, and every class within +-15
degrees of one canonical pose (triangle apex up, one star point up, X = the plus turned 45
degrees), to make each class's geometry easier to learn in a CPU budget (it took patch 2 as well).
Version 2 (radius 7-12.5 px, centre within 5 px, free rotation for triangle and star) left a
patch-4 model drawing blobs for four classes; version 1 had two-colour gradient backgrounds and a
model trained on it drew only colour fields. Rotations are never free where they would blur two
classes: plus vs X are the same shape 45 degrees apart, horizontal vs vertical stripes 90 degrees
apart, and a square turned 45 degrees would read as a diamond.

Usage:
  python tools/make_dataset.py --preview docs/training/shapes32-dataset.png   # one row per class
  python tools/make_dataset.py --count 60000 --cache ~/.cache/icdit/shapes32.npz

Library use (the trainer): `load_or_make(count, seed, cache, version)` -> (uint8 images (N,32,32,3),
int64 labels); `version` is 4 (VERSION) or 3, which the earlier training runs of the bundled model used.
"""

from __future__ import annotations

import argparse
import os
import pathlib

import numpy as np

CLASS_NAMES = [
    "circle", "square", "triangle", "plus", "ring",
    "horizontal_stripes", "vertical_stripes", "two_dots", "diamond", "x_cross",
]
# The versions this file still draws, and what differs: class 7.
VERSIONS = (3, 4)
CLASS_NAMES_V3 = CLASS_NAMES[:7] + ["star"] + CLASS_NAMES[8:]
SIZE = 32
SUPER = 4  # supersampling factor per axis for antialiasing
VERSION = 4
# Canonical rotation per class in degrees: the triangle's apex faces up (unrotated, the apex (+v)
# would point down), the two dots sit side by side, X is the plus turned 45 degrees. Version 3's
# star turns one point up (270).
CANONICAL_DEG = [0, 0, 180, 0, 0, 0, 0, 0, 0, 45]
STAR_CANONICAL_DEG = 270
# Two dots: discs of this radius centred this far either side of the middle along u (units of the
# shape radius): dots of 4.0-5.5 px radius with a 3.8-5.2 px gap.
DOT_RADIUS, DOT_OFFSET = 0.42, 0.62


def class_names(version: int = VERSION) -> list[str]:
    return CLASS_NAMES_V3 if version == 3 else CLASS_NAMES


def _star_inside(u: np.ndarray, v: np.ndarray, inner: float) -> np.ndarray:
    """Version 3's class 7: a filled 5-point star, outer radius 1, one point along +u."""
    rho = np.hypot(u, v)
    sector = 2 * np.pi / 5
    a = np.mod(np.arctan2(v, u), sector)
    a = np.where(a > sector / 2, sector - a, a)        # fold into [0, pi/5]
    px, py = rho * np.cos(a), rho * np.sin(a)
    # Edge from the outer point P=(1,0) to the inner point Q; the origin side is inside.
    qx, qy = inner * np.cos(sector / 2), inner * np.sin(sector / 2)
    cross = (qx - 1.0) * py - qy * (px - 1.0)
    origin_cross = (qx - 1.0) * 0.0 - qy * (0.0 - 1.0)
    return (cross * origin_cross) >= 0


def _triangle_inside(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Filled equilateral triangle, circumradius 1, apex along +v (apothem 0.5)."""
    d = np.full(u.shape, -np.inf)
    for ang in (np.pi * 1.5, np.pi / 6, np.pi * 5 / 6):  # outward edge normals
        d = np.maximum(d, u * np.cos(ang) + v * np.sin(ang))
    return d <= 0.5


def _mask(cls: int, u: np.ndarray, v: np.ndarray, x: np.ndarray, y: np.ndarray, p: dict,
          version: int) -> np.ndarray:
    """Boolean coverage for one image. (u, v): shape-local coords (unit = shape radius);
    (x, y): image coords in pixels, rotated by the (small) stripe angle for stripe classes."""
    r = np.hypot(u, v)
    if cls == 0:
        return r <= 1.0
    if cls == 1:
        return np.maximum(np.abs(u), np.abs(v)) <= 0.78
    if cls == 8:                 # rhombus, taller than wide, corners up/down/left/right
        return np.abs(u) / 0.68 + np.abs(v) / 1.0 <= 1.0
    if cls == 2:
        return _triangle_inside(u, v * 1.0 + 0.15)
    if cls in (3, 9):            # plus / X (X = plus turned 45 deg)
        w = p["bar"]
        return ((np.abs(u) <= w) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= w) & (np.abs(u) <= 1.0))
    if cls == 4:
        return (r <= 1.0) & (r >= p["ring_in"])
    if cls in (5, 6):            # stripes over the whole image; 5 varies along y, 6 along x
        coord = y if cls == 5 else x
        return np.mod(coord / p["period"] + p["phase"], 1.0) < 0.5
    if cls == 7 and version == 3:
        return _star_inside(u, v, inner=0.5)
    if cls == 7:                 # two dots side by side
        return np.hypot(np.abs(u) - DOT_OFFSET, v) <= DOT_RADIUS
    raise ValueError(cls)


def _rand_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0.0, 1.0, size=3)


def _luma(c: np.ndarray) -> float:
    return float(0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2])


def render(cls: int, rng: np.random.Generator, version: int = VERSION) -> np.ndarray:
    """One image of class `cls` as uint8 (32, 32, 3)."""
    n = SIZE * SUPER
    g = (np.arange(n) + 0.5) / SUPER                      # sample positions in pixel units
    x, y = np.meshgrid(g, g)                              # x: column, y: row (pixels)
    # Background: one flat colour.
    bg = np.broadcast_to(_rand_colour(rng), x.shape + (3,))
    # Foreground colour with a clear luminance contrast against the background.
    for _ in range(100):
        fg = _rand_colour(rng)
        if abs(_luma(fg) - _luma(bg[0, 0])) >= 0.35:
            break
    # Geometry.
    radius = rng.uniform(9.5, 13.0)
    cx, cy = rng.uniform(13.5, 18.5, size=2)
    # Every class keeps its canonical pose within +-15 degrees (circle and ring do not care).
    canonical = STAR_CANONICAL_DEG if (cls == 7 and version == 3) else CANONICAL_DEG[cls]
    theta = np.deg2rad(canonical + rng.uniform(-15, 15))
    params = {
        "bar": rng.uniform(0.24, 0.34),
        "ring_in": rng.uniform(0.5, 0.65),
        "period": rng.uniform(6.0, 9.0),
        "phase": rng.uniform(0, 1),
    }
    ct, st = np.cos(theta), np.sin(theta)
    dx, dy = x - cx, y - cy
    u = (ct * dx + st * dy) / radius
    v = (-st * dx + ct * dy) / radius
    # Stripes rotate about the image centre.
    xr = ct * (x - SIZE / 2) + st * (y - SIZE / 2)
    yr = -st * (x - SIZE / 2) + ct * (y - SIZE / 2)
    m = _mask(cls, u, v, xr, yr, params, version).astype(np.float64)[..., None]
    img = bg * (1 - m) + fg * m
    img = img.reshape(SIZE, SUPER, SIZE, SUPER, 3).mean(axis=(1, 3))
    return np.clip(np.floor(img * 255 + 0.5), 0, 255).astype(np.uint8)


def make(count: int, seed: int = 0, version: int = VERSION) -> tuple[np.ndarray, np.ndarray]:
    """`count` images with labels cycling 0..9 (balanced), each image from its own seeded stream."""
    imgs = np.empty((count, SIZE, SIZE, 3), dtype=np.uint8)
    labels = np.arange(count, dtype=np.int64) % len(CLASS_NAMES)
    for i in range(count):
        rng = np.random.default_rng([seed, i])
        imgs[i] = render(int(labels[i]), rng, version)
    return imgs, labels


def cache_name(count: int = 40000, seed: int = 0, version: int = VERSION) -> str:
    """File name of the npz cache of `count` images from `seed` at `version`: the trainer's
    default cache, and the file scripts/prepare-device.sh packs for scripts/gpu-train.sh."""
    return f"shapes32v{version}_seed{seed}_n{count}.npz"


def load_or_make(count: int, seed: int, cache: str | None,
                 version: int = VERSION) -> tuple[np.ndarray, np.ndarray]:
    if version not in VERSIONS:
        raise ValueError(f"shapes-32 version {version}: this file draws versions {VERSIONS}")
    if cache:
        path = pathlib.Path(os.path.expanduser(cache))
        if path.exists():
            d = np.load(path)
            # A cache without a version (written before version 4) is drawn again.
            stored = int(d["version"]) if "version" in d.files else None
            if stored == version and int(d["seed"]) == seed and len(d["labels"]) == count:
                return d["images"], d["labels"]
        imgs, labels = make(count, seed, version)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, images=imgs, labels=labels, seed=np.int64(seed), version=np.int64(version))
        os.replace(tmp, path)
        return imgs, labels
    return make(count, seed, version)


def save_grid(images: np.ndarray, rows: int, path: str, scale: int = 3, pad: int = 2) -> None:
    """Save uint8 (rows*cols, H, W, 3) images as a grid PNG, upscaled by `scale` (nearest)."""
    from PIL import Image

    cols = len(images) // rows
    h, w = images.shape[1] * scale, images.shape[2] * scale
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for idx, im in enumerate(images[: rows * cols]):
        r, c = divmod(idx, cols)
        big = im.repeat(scale, 0).repeat(scale, 1)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = big
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--version", type=int, default=VERSION, choices=VERSIONS,
                    help="dataset version (3: class 7 is a star, as the first three training runs saw)")
    ap.add_argument("--count", type=int, default=0, help="images to generate (0: only the preview)")
    ap.add_argument("--cache", default=None, help="npz cache path for --count")
    ap.add_argument("--print-cache-name", action="store_true",
                    help="print the default cache file name (40,000 images, seed 0) and exit")
    ap.add_argument("--preview", default=None, help="write a PNG grid, one row per class")
    ap.add_argument("--per-class", type=int, default=12)
    args = ap.parse_args()
    if args.print_cache_name:
        print(cache_name(version=args.version))
        return
    if args.preview:
        k = len(CLASS_NAMES)
        imgs, _ = make(k * args.per_class, args.seed, args.version)
        order = np.argsort(np.arange(len(imgs)) % k, kind="stable")   # group by class
        save_grid(imgs[order], k, args.preview)
        print(f"wrote {args.preview} ({k} rows: {', '.join(class_names(args.version))})")
    if args.count:
        imgs, labels = load_or_make(args.count, args.seed, args.cache, args.version)
        print(f"{len(imgs)} images, class counts {np.bincount(labels).tolist()}")


if __name__ == "__main__":
    main()
