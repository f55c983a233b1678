"""SimCLR-strength augmentation (spec §7), in two forms that share one `AugConfig`:

* `view_transform(...)`: per-image PIL/torchvision transforms, run in DataLoader workers (the readable reference).
* `BatchColorAugment` + `batch_random_resized_crop`: the same operations batched as torch ops on any device, so
  backends that decode on the GPU (or crop while decoding, like FFCV) do the colour work on the GPU.

Randomness is always drawn from an explicit `torch.Generator` (per image: seeded by (seed, epoch, position in the
global order); per batch: by (seed, epoch, batch)), never from global state, so a resumed run sees the same
augmentations. Under torchrun a rank holds some rows of every global batch (`pipeline.schedule.BatchRows`): the
batched draws are made for the whole global batch and the rank keeps its rows (`rand_rows`), so every sample gets the
numbers of its place in the global batch, whatever the world size.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align
from torchvision.transforms import v2 as T

from config import AugConfig
from pipeline.base import IMAGENET_MEAN, IMAGENET_STD, device_constant, to_device_async
from pipeline.schedule import BatchRows
from pipeline.seeding import seed_for

# ---------------------------------------------------------------------------------------------------------------
# seeding
# ---------------------------------------------------------------------------------------------------------------

def generator(*parts: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed_for(*parts))
    return g


def rand_rows(gen: torch.Generator, rows: BatchRows, *shape: int, dtype: torch.dtype = torch.float32
              ) -> torch.Tensor:
    """torch.rand(rows.count, *shape) for this process's rows of the global batch: the global batch's draw, of which
    it keeps rows [start, start + count). Sample i of a global batch thus gets the same numbers at any world size.
    The cost: every rank draws B rows instead of b (host work that grows with the world size; counter-based
    per-sample draws would make it O(b), and change one process's numbers). One process draws as before."""
    return torch.rand(rows.total, *shape, generator=gen, dtype=dtype)[rows.start:rows.start + rows.count]


def blur_kernel_size(size: int) -> int:
    """SimCLR: kernel = 10 % of the image side, odd."""
    k = max(3, int(0.1 * size))
    return k if k % 2 else k + 1


def blur_sigma_px(aug: AugConfig) -> tuple[float, float]:
    """The Gaussian blur's sigma range in pixels of the crop, the same for every crop size (the paper's multi-crop:
    the 96-px crops are blurred with the same sigma as the large one; scaling it by size/224 made their blur
    2.3x weaker). The kernel is 10 % of the side (`blur_kernel_size`)."""
    return aug.blur_sigma


# ---------------------------------------------------------------------------------------------------------------
# per-image (PIL) reference transforms
# ---------------------------------------------------------------------------------------------------------------


def view_transform(aug: AugConfig, size: int, scale: tuple[float, float], color: bool) -> T.Compose:
    """PIL image -> tensor [3,size,size].

    color=True:  the whole view (crop, flip, jitter, grayscale, blur, normalise) -> float, normalised.
    color=False: crop + flip only -> uint8; `BatchColorAugment` finishes the view on the device.
    """
    ops: list = [T.RandomResizedCrop(size, scale=scale, ratio=aug.crop_ratio, antialias=True),
                 T.RandomHorizontalFlip(aug.flip_p)]
    if color:
        b, c, s, h = aug.jitter
        if aug.jitter_p > 0:
            ops.append(T.RandomApply([T.ColorJitter(b, c, s, h)], p=aug.jitter_p))
        if aug.gray_p > 0:
            ops.append(T.RandomGrayscale(aug.gray_p))
        if aug.blur_p > 0:
            ops.append(T.RandomApply([T.GaussianBlur(blur_kernel_size(size), blur_sigma_px(aug))], p=aug.blur_p))
        ops += [T.PILToTensor(), NormalizeUint8()]
    else:
        ops.append(T.PILToTensor())
    return T.Compose(ops)


class NormalizeUint8(torch.nn.Module):
    """uint8 [3,H,W] -> normalised float32 in 2 passes (ToDtype + Normalize make 3 tensors and 4 passes; per image
    in the torch workers this was a tenth of the time a stock torchvision pipeline needs for the whole view).
    Multiply then add, not addcmul: see BatchColorAugment."""

    def __init__(self):
        super().__init__()
        # made once, not per image (this runs in the workers' per-image hot path)
        self.register_buffer("scale", torch.tensor(_NORM_SCALE_U8).view(3, 1, 1), persistent=False)
        self.register_buffer("bias", torch.tensor(_NORM_BIAS).view(3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # PILToTensor hands over a [3,H,W] view of HWC memory: cast it into contiguous float32 first (one pass);
        # arithmetic on the strided uint8 view itself took 4x as long. The same numbers as x * scale + bias.
        return x.to(torch.float32, memory_format=torch.contiguous_format).mul_(self.scale).add_(self.bias)


def view_specs(aug: AugConfig, image_size: int) -> list[tuple[int, tuple[float, float]]]:
    """(size, scale) of every crop group: the large crop first, then the small crops of multi-crop."""
    return [(image_size, aug.crop_scale)] + [(aug.small_size, aug.small_scale)] * aug.small_crops


# ---------------------------------------------------------------------------------------------------------------
# batched torch ops
# ---------------------------------------------------------------------------------------------------------------


def sample_rrc_boxes(heights: torch.Tensor, widths: torch.Tensor, scale: tuple[float, float],
                     ratio: tuple[float, float], gen: torch.Generator, attempts: int = 10,
                     rows: BatchRows | None = None) -> torch.Tensor:
    """torchvision's RandomResizedCrop parameter rule, vectorised over a batch.

    heights, widths: [B] source sizes. Returns float boxes [B,4] as (x1, y1, x2, y2) in pixels. Like torchvision:
    up to `attempts` draws of (area, log-uniform aspect); the first that fits wins; else a centre crop with the
    aspect clamped to `ratio`. rows: which rows of the global batch these are (`rand_rows`; default all).
    """
    b = heights.shape[0]
    rows = rows or BatchRows.whole(b)
    h = heights.double()[:, None]
    w = widths.double()[:, None]
    area = h * w
    target = area * (scale[0] + (scale[1] - scale[0]) * rand_rows(gen, rows, attempts, dtype=torch.float64))
    logr = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * rand_rows(
        gen, rows, attempts, dtype=torch.float64)
    ar = torch.exp(logr)
    cw = torch.sqrt(target * ar).round()
    ch = torch.sqrt(target / ar).round()
    ok = (cw > 0) & (ch > 0) & (cw <= w) & (ch <= h)
    first = torch.where(ok.any(1), ok.double().argmax(1), torch.full((b,), -1, dtype=torch.long))
    u = rand_rows(gen, rows, 2, dtype=torch.float64)
    idx = first.clamp(min=0)[:, None]
    cw_sel = cw.gather(1, idx)[:, 0]
    ch_sel = ch.gather(1, idx)[:, 0]
    # fallback: centre crop, aspect clamped into ratio
    hh, ww = h[:, 0], w[:, 0]
    in_ratio = ww / hh
    fw = torch.where(in_ratio < ratio[0], ww, torch.where(in_ratio > ratio[1], (hh * ratio[1]).round(), ww))
    fh = torch.where(in_ratio < ratio[0], (ww / ratio[0]).round(), hh)
    fallback = first < 0
    cw_sel = torch.where(fallback, fw, cw_sel)
    ch_sel = torch.where(fallback, fh, ch_sel)
    x1 = torch.where(fallback, ((ww - cw_sel) / 2).floor(), (u[:, 0] * (ww - cw_sel + 1)).floor())
    y1 = torch.where(fallback, ((hh - ch_sel) / 2).floor(), (u[:, 1] * (hh - ch_sel + 1)).floor())
    return torch.stack([x1, y1, x1 + cw_sel, y1 + ch_sel], 1).float()


def batch_random_resized_crop(x: torch.Tensor, size: int, scale: tuple[float, float], ratio: tuple[float, float],
                              flip_p: float, gen: torch.Generator, rows: BatchRows | None = None) -> torch.Tensor:
    """x: float [B,3,H,W] (one size for the batch) -> float [B,3,size,size], cropped, resized and flipped.

    roi_align samples each output pixel as the mean of a 2x2 grid of bilinear taps, which also antialiases
    moderate downscaling. Boxes and flips are drawn on the host and reach the device in one asynchronous copy.
    rows: which rows of the global batch x holds (`rand_rows`; default all).
    """
    b, _, h, w = x.shape
    rows = rows or BatchRows.whole(b)
    boxes = sample_rrc_boxes(torch.full((b,), h), torch.full((b,), w), scale, ratio, gen, rows=rows)
    flip = rand_rows(gen, rows) < flip_p
    table = torch.cat([torch.arange(b, dtype=torch.float32)[:, None], boxes, flip.float()[:, None]], 1)  # [B,6]
    table = to_device_async(table, x.device)
    rois, flip = table[:, :5].contiguous(), table[:, 5].bool()
    out = roi_align(x, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=2, aligned=True)
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


_GRAY = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL and torchvision
_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_FROM_YIQ = torch.linalg.inv(_TO_YIQ)  # once, on the host: on CUDA linalg.inv syncs and starts cuSOLVER


def _gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (_GRAY[0] * r + _GRAY[1] * g + _GRAY[2] * b).unsqueeze(1)


def hue_matrices(shift: torch.Tensor) -> torch.Tensor:
    """[B] hue shifts (torchvision's units, in [-0.5, 0.5]) -> [B,3,3] RGB->RGB matrices: a rotation of the chroma
    plane of YIQ by 2π·shift."""
    th = 2 * math.pi * shift
    c, s = torch.cos(th), torch.sin(th)
    rot = torch.zeros(shift.shape[0], 3, 3, dtype=shift.dtype)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = c, -s, s, c
    return _FROM_YIQ.to(shift.dtype) @ rot @ _TO_YIQ.to(shift.dtype)


_NORM_BIAS = tuple(-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True))
_NORM_SCALE = tuple(1.0 / s for s in IMAGENET_STD)
_NORM_SCALE_U8 = tuple(1.0 / (255.0 * s) for s in IMAGENET_STD)


def normalisation_table() -> np.ndarray:
    """float32 [256, 3]: the normalised value of every uint8 level per channel, computed as `BatchColorAugment`
    normalises a uint8 batch (float32 multiply, rounded, then float32 add, rounded): a table lookup gives the same
    numbers bit for bit (FFCV's CPU pipeline normalises by lookup)."""
    levels = np.arange(256, dtype=np.float32)[:, None]
    return (levels * np.asarray(_NORM_SCALE_U8, np.float32)) + np.asarray(_NORM_BIAS, np.float32)


class BatchColorAugment:
    """Colour jitter (p), grayscale (p), Gaussian blur (p) and normalisation for a batch, as torch ops.

    Input: uint8 or float-in-[0,1] [B,3,H,W] on any device. Output: float32 normalised, same device.
    Per-sample factors as torchvision's ColorJitter draws them; the order of the four jitter ops is drawn once per
    batch (torchvision draws it per image), hue is a rotation in YIQ space (equal to an HSV hue shift up to the
    colour-space approximation).

    Every random number and per-sample factor (hue matrices included) is made on the host and reaches the device
    in one asynchronous copy per batch: on CUDA nothing here waits for the GPU.
    """

    def __init__(self, aug: AugConfig, size: int):
        self.aug = aug
        self.size = size
        self.kernel = blur_kernel_size(size)
        self.sigma = blur_sigma_px(aug)

    @property
    def normalise_only(self) -> bool:
        """No colour operation is ever applied: the output is the normalised input."""
        return self.aug.jitter_p == 0 and self.aug.gray_p == 0 and self.aug.blur_p == 0

    def draw(self, b: int, gen: torch.Generator, rows: BatchRows | None = None) -> tuple[list[int], torch.Tensor]:
        """The batch's randomness, on the host: (jitter op order, float32 [B,16] table with columns brightness,
        contrast, saturation factor, grayscale flag, blur flag, sigma, hue matrix (9)). rows: which rows of the
        global batch the b samples are (`rand_rows`; default all); the op order is one per global batch."""
        aug = self.aug
        rows = rows or BatchRows.whole(b)
        bj, cj, sj, hj = aug.jitter
        apply = (rand_rows(gen, rows, 1) < aug.jitter_p).float()
        f = rand_rows(gen, rows, 4)
        order = torch.randperm(4, generator=gen).tolist() if aug.jitter_p > 0 else []
        gray = (rand_rows(gen, rows, 1) < aug.gray_p).float()
        blur = torch.zeros(b, 1)
        sigma = torch.ones(b, 1)
        if aug.blur_p > 0:
            blur = (rand_rows(gen, rows, 1) < aug.blur_p).float()
            sigma = self.sigma[0] + rand_rows(gen, rows, 1) * (self.sigma[1] - self.sigma[0])
        bright = 1 + apply * (f[:, 0:1] * 2 - 1) * bj
        contrast = 1 + apply * (f[:, 1:2] * 2 - 1) * cj
        sat = 1 + apply * (f[:, 2:3] * 2 - 1) * sj
        hue = hue_matrices((apply * (f[:, 3:4] * 2 - 1) * hj)[:, 0]).reshape(b, 9)
        return order, torch.cat([bright, contrast, sat, gray, blur, sigma, hue], 1)

    def __call__(self, x: torch.Tensor, gen: torch.Generator, rows: BatchRows | None = None) -> torch.Tensor:
        aug = self.aug
        dtype = x.dtype if x.is_floating_point() else torch.float32
        bias = device_constant(_NORM_BIAS, x, dtype)  # (x - mean) / std = x * (1 / std) + (-mean / std)
        if self.normalise_only:
            # normalise only (crop mode): 2 passes from uint8 instead of 4, and on the CPU the loader's main thread
            # is where they run (the README's loader table). Not addcmul: its vectorised loop fuses (FMA) and its
            # tail does not, so a pixel's value would depend on its position in the batch, and a run's numbers on
            # the per-rank batch size (test_distributed).
            scale = _NORM_SCALE_U8 if x.dtype == torch.uint8 else _NORM_SCALE
            return (x * device_constant(scale, x, dtype)).add_(bias)
        x = x * (1.0 / 255.0) if x.dtype == torch.uint8 else x  # uint8 -> float in one pass
        b = x.shape[0]
        bj, cj, sj, hj = aug.jitter
        order, table = self.draw(b, gen, rows)
        t = to_device_async(table, x.device).to(x.dtype)
        per_sample = t[:, :6, None, None]  # [B,6,1,1]: broadcast over [B,·,H,W]
        for op in order:
            if op == 0 and bj > 0:
                x = (x * per_sample[:, 0:1]).clamp_(0, 1)
            elif op == 1 and cj > 0:
                fac = per_sample[:, 1:2]
                mean = _gray(x).mean((1, 2, 3), keepdim=True)
                x = (fac * x + (1 - fac) * mean).clamp_(0, 1)
            elif op == 2 and sj > 0:
                fac = per_sample[:, 2:3]
                x = (fac * x + (1 - fac) * _gray(x)).clamp_(0, 1)
            elif op == 3 and hj > 0:
                x = torch.einsum("bij,bjhw->bihw", t[:, 6:].reshape(b, 3, 3), x).clamp_(0, 1)
        if aug.gray_p > 0:
            x = torch.where(per_sample[:, 3:4] > 0, _gray(x).expand_as(x), x)
        if aug.blur_p > 0:
            x = torch.where(per_sample[:, 4:5] > 0, self._blur(x, t[:, 5]), x)
        return (x * device_constant(_NORM_SCALE, x, dtype)).add_(bias)  # (x - mean) / std, see above

    def _blur(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Separable Gaussian blur with one sigma per sample: a grouped conv over B*3 channels, reflect padding."""
        b, c, h, w = x.shape
        k = self.kernel
        r = torch.arange(k, device=x.device, dtype=x.dtype) - (k - 1) / 2
        g = torch.exp(-(r[None, :] ** 2) / (2 * sigma.to(x.dtype)[:, None] ** 2))
        g = (g / g.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [B*3, k]
        y = x.reshape(1, b * c, h, w)
        pad = k // 2
        y = F.conv2d(F.pad(y, (pad, pad, 0, 0), mode="reflect"), g[:, None, None, :], groups=b * c)
        y = F.conv2d(F.pad(y, (0, 0, pad, pad), mode="reflect"), g[:, None, :, None], groups=b * c)
        return y.reshape(b, c, h, w)


class DeviceViews:
    """All crop groups of a batch made with tensor ops: crop + resize + flip (`crop_fn`), then `BatchColorAugment`.

    crop_fn(size, scale, ratio, flip_p, gen, rows) -> float [B,3,size,size] in [0,1]: how the backend crops its
    images (one batch tensor, or a list of differently sized images). Randomness of view v of (global) batch k of
    epoch e comes from generator(seed, e, k, v), drawn for the global batch (`rand_rows`), so it depends neither on
    where a run (re)started nor on the world size.
    """

    def __init__(self, aug: AugConfig, image_size: int, seed: int):
        self.aug = aug
        self.seed = seed
        self.specs = view_specs(aug, image_size)
        self.color = [BatchColorAugment(aug, size) for size, _ in self.specs]

    def __call__(self, crop_fn, epoch: int, batch: int, rows: BatchRows | None = None) -> list[torch.Tensor]:
        views = []
        for v, ((size, scale), color) in enumerate(zip(self.specs, self.color, strict=True)):
            g = generator(self.seed, epoch, batch, v)
            views.append(color(crop_fn(size, scale, self.aug.crop_ratio, self.aug.flip_p, g, rows), g, rows))
        return views
