"""The numba resize of the DALI CPU graph (`pipeline.resample`) against torch's antialiased bilinear interpolation.

Oracle: `torch.nn.functional.interpolate(float image, mode="bilinear", antialias=True)` (PIL's BILINEAR filter, the
one torchvision's RandomResizedCrop uses), rounded. Our uint8 result must be within 1 of it at every pixel: the same
filter and pixel-centre convention, differing only by float rounding. Noise images make any filter difference show
(a plain, non-antialiased bilinear downscale by 3 misses by tens of levels).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.resample import resize_aa, resize_aa_roi, triangle_taps


def textured(h: int, w: int, c: int = 3, seed: int = 0) -> np.ndarray:
    """Noise on a gradient: detail at every scale, and no symmetry that could hide a flipped or shifted filter."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = (x * 200 / w + y * 55 / h)[..., None]
    return np.clip(base + rng.normal(0, 40, (h, w, c)), 0, 255).astype(np.uint8)


def reference(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    x = torch.from_numpy(img.copy()).permute(2, 0, 1)[None].double()
    y = F.interpolate(x, size=(out_h, out_w), mode="bilinear", antialias=True, align_corners=False)
    return y[0].permute(1, 2, 0).round().clamp(0, 255).numpy().astype(np.int64)


@pytest.mark.parametrize(("src", "dst"), [
    ((300, 300), (224, 224)),  # mild downscale
    ((375, 500), (224, 224)),  # a full ImageNet-like frame, different factor per axis
    ((671, 97), (96, 96)),  # strong downscale in y, upscale in x
    ((60, 40), (224, 224)),  # upscale (a small crop)
    ((224, 224), (224, 224)),  # identity
    ((31, 17), (5, 3)),  # tiny, odd factors
])
def test_matches_torch_antialiased_bilinear(src, dst):
    img = textured(*src)
    out = np.zeros((*dst, 3), np.uint8)
    resize_aa(out, img)
    diff = np.abs(out.astype(np.int64) - reference(img, *dst))
    assert diff.max() <= 1, (src, dst, diff.max(), diff.mean())


def test_plain_bilinear_would_fail():
    """The oracle separates antialiased from plain bilinear, so the test above can fail."""
    img = textured(300, 300)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].double()
    plain = F.interpolate(x, size=(100, 100), mode="bilinear", antialias=False)[0].permute(1, 2, 0).round().numpy()
    assert np.abs(plain - reference(img, 100, 100)).max() > 20


@pytest.mark.parametrize("channels", [1, 4])
def test_other_channel_counts(channels):
    img = textured(90, 70, channels)
    out = np.zeros((40, 50, channels), np.uint8)
    resize_aa(out, img)
    assert np.abs(out.astype(np.int64) - reference(img, 40, 50)).max() <= 1


@pytest.mark.parametrize("box", [(0, 0, 120, 160), (13, 27, 80, 51), (100, 140, 20, 20), (0, 159, 120, 1)])
def test_window_equals_crop_then_resize(box):
    """Resizing a window of the whole image reads only the window: the same as torchvision's crop-then-resize."""
    img = textured(120, 160)
    y, x, h, w = box
    out = np.zeros((32, 32, 3), np.uint8)
    resize_aa_roi(out, img, float(y), float(x), float(h), float(w))
    crop = np.ascontiguousarray(img[y:y + h, x:x + w])
    want = np.zeros_like(out)
    resize_aa(want, crop)
    assert np.array_equal(out, want)
    assert np.abs(out.astype(np.int64) - reference(crop, 32, 32)).max() <= 1


def test_taps_are_normalised_and_inside_the_window():
    for n_in, n_out, start, length in [(500, 224, 0.0, 500.0), (500, 224, 37.0, 300.0), (50, 224, 10.0, 20.0)]:
        first, count, weights = triangle_taps(n_in, n_out, start, length)
        assert np.allclose([weights[o, :count[o]].sum() for o in range(n_out)], 1.0, atol=1e-6)
        assert (weights[np.arange(n_out), 0] > 0).all()  # no leading zero taps
        assert first.min() >= start and (first + count).max() <= start + length
        assert (np.diff(first) >= 0).all()  # output order follows input order (no flip, no shuffle)
