"""Decode any image file we accept into an 8-bit RGB PIL image, the way every backend should see it.

Real folders hold CMYK and grayscale JPEGs, PNG data behind a .JPEG name, EXIF-rotated photos, RGBA and palette
images, 16-bit PNGs, 1-pixel images. All of them are converted; files that cannot be decoded raise
`CorruptImageError` naming the file and the reason, and callers skip and count them.
"""

from __future__ import annotations

import warnings

import numpy as np
from PIL import Image, ImageOps

# Decompression-bomb guard: PIL warns above ~89 Mpx and errors above 2x that. Real photo collections (and
# ImageNet) contain panoramas of ~30 Mpx; we allow up to 250 Mpx and reject larger files as corrupt.
MAX_PIXELS = 250_000_000


class CorruptImageError(ValueError):
    pass


# What "this file does not decode" looks like to the backends: a bad or truncated file, or one that vanished
# after the folder was indexed. Every backend replaces such an image (pipeline.base.substitutes).
DECODE_ERRORS = (CorruptImageError, FileNotFoundError)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit / 32-bit single channel: scale the actual range to 8 bits rather than clipping at 255.
        a = np.asarray(img, dtype=np.float64)
        hi = a.max() if a.size else 0.0
        scale = 255.0 / 65535.0 if hi > 255 else 1.0
        img = Image.fromarray(np.clip(a * scale, 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite transparency on white (what a viewer shows), not on black garbage under alpha = 0.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img if img.mode == "RGB" else img.convert("RGB")  # (convert copies even when there is nothing to do)


def decode_rgb(path: str, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Open, apply EXIF orientation, convert to RGB. `draft_size` lets JPEG decode at a reduced DCT scale."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS = MAX_PIXELS
            with Image.open(path) as img:
                if draft_size is not None and img.format == "JPEG":
                    img.draft("RGB", draft_size)
                img.load()
                ImageOps.exif_transpose(img, in_place=True)  # (not in place it copies every image, rotated or not)
                return _to_rgb(img)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise CorruptImageError(f"{path}: {type(e).__name__}: {e}") from e


def read_rgb(index, i: int) -> Image.Image:
    """Instance i of `index` as 8-bit RGB: decoded from its file, or read from the .beton that holds it
    (`index.images`: an evaluation of an FFCV run needs no source folder)."""
    if index.images is not None:
        return index.images.read(i)
    return decode_rgb(index.abspath(i))


def require_decodable(index, key: str = "data.path") -> None:
    """A DataError naming `key` when no file of `index` decodes; each is tried in id order until one does. For a
    set smaller than the batch, whose refusal would otherwise blame the batch size while no image could be used."""
    from pipeline.dataset import DataError

    first = ""
    for i in range(len(index)):
        try:
            read_rgb(index, i)
            return
        except DECODE_ERRORS as e:
            first = first or str(e)
    raise DataError(f"no decodable image in {key}={index.root}: none of its {len(index)} image file(s) decodes "
                    f"(e.g. {first})")


class DecodedImages:
    """Instance id i -> (transform(decoded image), i, "") or (None, i, reason) when the file does not decode.

    The one decode-or-mark-bad dataset of the project: the torch backend's workers (which walk the substitution
    rule over it), the torch-gpu backend's PIL fallback, the memory backend's one-off decode, feature extraction,
    retrieval, the linear probe. The caller decides what an undecodable image means there (replaced, recorded,
    left out, named). `transform=None` returns the PIL image; `seed`: the transform's randomness is a pure function
    of (seed, i). A map-style data set for torch's DataLoader (the protocol: __len__ and __getitem__; this module
    does not import torch, so that the FFCV converter, which decodes with it, never loads torch for it).
    """

    def __init__(self, index, transform, seed: int | None = None):
        self.index, self.transform, self.seed = index, transform, seed

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        try:
            img = read_rgb(self.index, i)
        except DECODE_ERRORS as e:
            return None, i, str(e)
        if self.transform is None:  # the decoded PIL image itself (the torch backend's workers transform it)
            return img, i, ""
        if self.seed is None:
            return self.transform(img), i, ""
        import torch

        from pipeline.seeding import seed_for

        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed_for(self.seed, 0x5E7, i))  # CPU only: see torch_backend
            return self.transform(img), i, ""


def collate_decoded(items) -> tuple[torch.Tensor | None, torch.Tensor, list[tuple[int, str]]]:  # noqa: F821
    """-> (stacked images of the decodable items, or None if none; their ids int64 [M]; [(id, reason)] of the rest)."""
    import torch

    good = [it for it in items if it[0] is not None]
    bad = [(it[1], it[2]) for it in items if it[0] is None]
    ids = torch.tensor([g[1] for g in good], dtype=torch.int64)
    return (torch.stack([g[0] for g in good]) if good else None), ids, bad
