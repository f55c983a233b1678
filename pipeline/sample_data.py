"""Built-in real-image data sets, made from images that installed packages ship (no downloads).

    python -m pipeline.sample_data OUT_DIR [--what digits,photos] [--photos 256] [--digit-size 32]

* digits: scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels) rendered as RGB JPEGs of `digit-size` px,
  split 80/20 by a fixed rule (every 5th image of a class goes to val):
  OUT_DIR/digits/train/<0..9>/<nnnn>.jpg and OUT_DIR/digits/val/<0..9>/<nnnn>.jpg.
  This is the demo's default data: PIC pre-trains on train/, kNN is measured on val/ against train/.
* photos: real photographs shipped by scikit-image and scikit-learn, cut into ImageNet-like JPEGs (about 500x375,
  quality 90, varied crops, scales and aspect ratios), one class folder per source photo:
  OUT_DIR/photos/<source>/<nnnn>.jpg. Used by the loader tests and benchmarks.

Output is deterministic (fixed seeds) and written atomically per data set (temporary folder, then rename), so an
interrupted run never leaves a half-written data set behind; an existing complete data set is reused.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

DONE_MARKER = ".complete"


def _digits_images(size: int) -> tuple[list[Image.Image], np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    # 0..16 grey levels -> 0..255; bicubic upsampling gives smooth strokes instead of 8x8 blocks.
    imgs = []
    for a in d.images:
        g = Image.fromarray(np.clip(a * (255.0 / 16.0), 0, 255).astype(np.uint8), mode="L")
        imgs.append(g.resize((size, size), Image.BICUBIC).convert("RGB"))
    return imgs, d.target.astype(np.int64)


def _photo_sources() -> dict[str, np.ndarray]:
    """Colour photographs that need no download (scikit-image ships these in the wheel)."""
    import skimage.data as skd
    from sklearn.datasets import load_sample_images

    out: dict[str, np.ndarray] = {}
    for name in ("astronaut", "coffee", "chelsea", "rocket", "motorcycle_left", "hubble_deep_field",
                 "immunohistochemistry", "colorwheel"):
        fn = getattr(skd, name, None)
        if fn is None:
            continue
        try:
            a = fn()
        except Exception:  # noqa: BLE001 - some versions fetch a few images from the network: skip those
            continue
        if a.ndim == 3 and a.shape[2] >= 3:
            out[name] = np.ascontiguousarray(a[..., :3]).astype(np.uint8)
    for name, a in zip(("china", "flower"), load_sample_images().images, strict=True):
        out[name] = a
    if not out:
        raise RuntimeError("no photos found in scikit-image / scikit-learn")
    return out


def _cut_photo(src: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """A random crop (10-100 % of the area, aspect 3:4..4:3 or its transpose) resized to ImageNet-like size."""
    h, w = src.shape[:2]
    area = h * w * rng.uniform(0.1, 1.0)
    aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
    ch = int(min(h, round(np.sqrt(area / aspect))))
    cw = int(min(w, round(np.sqrt(area * aspect))))
    y = int(rng.integers(0, h - ch + 1))
    x = int(rng.integers(0, w - cw + 1))
    crop = Image.fromarray(src[y:y + ch, x:x + cw])
    if rng.random() < 0.5:
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
    landscape = rng.random() < 0.75
    long_side = int(rng.integers(400, 501))
    short_side = int(round(long_side * rng.uniform(0.66, 0.8)))
    size = (long_side, short_side) if landscape else (short_side, long_side)
    return crop.resize(size, Image.BICUBIC)


def _finish(tmp: Path, final: Path) -> Path:
    (tmp / DONE_MARKER).write_text("ok\n")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def make_digits(out_dir: str | Path, size: int = 32, quality: int = 95) -> Path:
    final = Path(out_dir) / "digits"
    if (final / DONE_MARKER).exists():
        return final
    tmp = Path(out_dir) / ".digits.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    imgs, labels = _digits_images(size)
    seen = np.zeros(10, np.int64)
    for i, (img, y) in enumerate(zip(imgs, labels.tolist(), strict=True)):
        split = "val" if seen[y] % 5 == 4 else "train"
        seen[y] += 1
        d = tmp / split / str(y)
        d.mkdir(parents=True, exist_ok=True)
        img.save(d / f"{i:04d}.jpg", quality=quality)
    return _finish(tmp, final)


def make_photos(out_dir: str | Path, count: int = 256, quality: int = 90, seed: int = 0) -> Path:
    final = Path(out_dir) / "photos"
    if (final / DONE_MARKER).exists() and len(list(final.rglob("*.jpg"))) == count:
        return final
    tmp = Path(out_dir) / ".photos.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if not _SOURCES:  # loaded once, before the fork: the workers share them
        _SOURCES.update(_photo_sources())
    names = sorted(_SOURCES)
    for name in names:
        (tmp / name).mkdir(parents=True, exist_ok=True)
    jobs = [(tmp, names, i, quality, seed) for i in range(count)]
    # photo i depends on (seed, i) only, so the folder is the same whatever the number of processes
    procs = min(os.cpu_count() or 1, max(1, count // 512))
    if procs > 1:
        with mp.get_context("fork").Pool(procs) as pool:
            pool.map(_write_photo, jobs, chunksize=64)
    else:
        for job in jobs:
            _write_photo(job)
    return _finish(tmp, final)


_SOURCES: dict[str, np.ndarray] = {}


def _write_photo(job: tuple[Path, list[str], int, int, int]) -> None:
    tmp, names, i, quality, seed = job  # _SOURCES: loaded by make_photos before the (fork) workers start
    name = names[i % len(names)]
    _cut_photo(_SOURCES[name], np.random.default_rng([seed, i])).save(tmp / name / f"{i:05d}.jpg", quality=quality)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--what", default="digits,photos", help="comma-separated: digits, photos")
    ap.add_argument("--photos", type=int, default=256, help="number of photo JPEGs")
    ap.add_argument("--digit-size", type=int, default=32)
    args = ap.parse_args(argv)
    what = {w.strip() for w in args.what.split(",") if w.strip()}
    unknown = what - {"digits", "photos"}
    if unknown:
        ap.error(f"unknown data set(s): {', '.join(sorted(unknown))}")
    if "digits" in what:
        p = make_digits(args.out_dir, args.digit_size)
        print(f"digits: {sum(1 for _ in p.rglob('*.jpg'))} JPEGs in {p}")
    if "photos" in what:
        p = make_photos(args.out_dir, args.photos)
        print(f"photos: {sum(1 for _ in p.rglob('*.jpg'))} JPEGs in {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
