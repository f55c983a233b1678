"""Antialiased bilinear resize of uint8 HWC images (numba): the resize step of the DALI backend's CPU graph.

Why our own kernel: on the CPU, DALI's `fn.resize` (linear, antialiased) is the slowest step of a crop pipeline,
slower than the JPEG crop-decode before it and than PIL or torch doing the same filter (per-image timings in the
README's loader section). DALI's resampler is built for its GPU operator; on the GPU we keep it.
`resize_aa` runs inside the DALI graph through `numba_function` (compiled, no GIL, one call per
sample on DALI's thread pool), so the graph stays one DALI pipeline.

Filter: the triangle filter widened by the downscale factor, i.e. "bilinear with antialias", the filter of PIL's
BILINEAR, torchvision's RandomResizedCrop and torch's `interpolate(..., mode="bilinear", antialias=True)`:
output pixel o of n_out over the input interval [x0, x0 + len) has centre c = x0 + (o + 0.5) * len / n_out and
weights max(0, 1 - |i + 0.5 - c| / s) over input pixels i, s = max(len / n_out, 1), renormalised to sum 1 (so the
image border is handled as PIL does). Results match torch's float implementation to within 1 (tested), i.e. they
differ only by rounding.

Order of passes: vertical first. It reads whole input rows and writes whole rows, so it vectorises; the horizontal
pass, a short gather per output pixel, then runs on the already reduced number of rows.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def triangle_taps(n_in: int, n_out: int, start: float, length: float):
    """Taps of the antialiased triangle filter mapping input interval [start, start+length) onto n_out samples.

    Returns first [n_out] int64 (first input index of each output), count [n_out] int64, weights [n_out, T] float32
    (the first count[o] of row o are used; they sum to 1). The filter reads only pixels inside the window (and
    inside [0, n_in)): resizing a window is the same as cropping it first and resizing the crop, as torchvision does.
    """
    scale = length / n_out
    support = max(scale, 1.0)
    width = int(np.ceil(support)) * 2 + 1
    first = np.empty(n_out, np.int64)
    count = np.empty(n_out, np.int64)
    weights = np.zeros((n_out, width), np.float32)
    win_lo = max(int(np.floor(start)), 0)
    win_hi = min(int(np.ceil(start + length)), n_in)
    for o in range(n_out):
        center = start + (o + 0.5) * scale
        lo = max(int(center - support + 0.5), win_lo)
        hi = min(int(center + support + 0.5), win_hi)
        total = 0.0
        k = 0
        for i in range(lo, hi):
            w = 1.0 - abs((i - center + 0.5) / support)
            if w > 0.0:
                if k == 0:
                    lo = i
                weights[o, k] = w
                total += w
                k += 1
        if total > 0.0:
            for j in range(k):
                weights[o, j] /= total
        first[o] = lo
        count[o] = k
    return first, count, weights


@njit(cache=True, inline="always")
def _to_u8(v: float) -> int:
    return min(max(int(v + 0.5), 0), 255)


@njit(cache=True)
def resize_aa_roi(out: np.ndarray, img: np.ndarray, y0: float, x0: float, h: float, w: float) -> None:
    """Resize the window (y0, x0, h, w) (pixels, may be fractional) of uint8 img [H,W,C] into uint8 out [h',w',C]."""
    rows, cols, channels = img.shape
    out_h, out_w = out.shape[0], out.shape[1]
    fy, cy, wy = triangle_taps(rows, out_h, y0, h)
    fx, cx, wx = triangle_taps(cols, out_w, x0, w)
    line = cols * channels
    src = img.reshape(rows, line)
    tmp = np.zeros((out_h, line), np.float32)
    for o in range(out_h):  # vertical: whole rows
        acc = tmp[o]
        for k in range(cy[o]):
            wk = wy[o, k]
            s = src[fy[o] + k]
            for j in range(line):
                acc[j] += wk * s[j]
    if channels == 3:  # horizontal: a few taps per output pixel (RGB unrolled: 2x faster than the generic loop)
        for o in range(out_h):
            acc = tmp[o]
            for x in range(out_w):
                r = 0.0
                g = 0.0
                b = 0.0
                i = fx[x] * 3
                for k in range(cx[x]):
                    wk = wx[x, k]
                    r += wk * acc[i]
                    g += wk * acc[i + 1]
                    b += wk * acc[i + 2]
                    i += 3
                out[o, x, 0] = _to_u8(r)
                out[o, x, 1] = _to_u8(g)
                out[o, x, 2] = _to_u8(b)
    else:
        for o in range(out_h):
            acc = tmp[o]
            for x in range(out_w):
                for c in range(channels):
                    v = 0.0
                    i = fx[x] * channels + c
                    for k in range(cx[x]):
                        v += wx[x, k] * acc[i]
                        i += channels
                    out[o, x, c] = _to_u8(v)


@njit(cache=True)
def resize_aa(out: np.ndarray, img: np.ndarray) -> None:
    """Resize the whole of uint8 img [H,W,C] into uint8 out [h,w,C]."""
    resize_aa_roi(out, img, 0.0, 0.0, float(img.shape[0]), float(img.shape[1]))
