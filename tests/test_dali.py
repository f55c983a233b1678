"""DALI backend on the CPU (`device_id=None`): ids <-> pixels, our order, augmentation statistics, epochs, shards,
multi-crop, start_batch and exact resume. Small JPEGs made here; the whole file runs in well under a minute on 2 cores.

Tests taking a `device` also run on CUDA (nvJPEG "mixed" decoder, GPU operators) where a GPU is present.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from config import Config
from pipeline import backend_unavailable
from pipeline.augment import sample_rrc_boxes  # noqa: F401  (the crop rule the backend shares)
from pipeline.base import IMAGENET_MEAN, IMAGENET_STD
from pipeline.dataset import DataError, scan_folder

# Collected and skipped one by one where DALI is absent (the GPU machine), not skipped as a module: `pytest
# tests/test_dali.py` must then exit 0 with its tests listed as skipped, not 5 ("no tests ran").
DALI_MISSING = backend_unavailable("dali")
if not DALI_MISSING:
    from pipeline.dali_backend import DALILoader, draw_view_params, make_plans

pytestmark = [pytest.mark.dali, pytest.mark.skipif(bool(DALI_MISSING), reason=DALI_MISSING or "-")]

N = 48  # instances in the colour-coded set (divisible by the batch and by 2 shards)
B = 8
SIZE = 32
CPU = torch.device("cpu")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


# ---------------------------------------------------------------------------------------------------------------
# data: JPEGs whose colour encodes their id
# ---------------------------------------------------------------------------------------------------------------


def id_colour(i: int) -> tuple[int, int, int]:
    """R and G encode the id (steps of 20 and 40 survive JPEG); B = 200 keeps every image far from grey."""
    return 8 + 20 * (i % 12), 8 + 40 * (i // 12), 200


def colour_id(rgb: np.ndarray) -> int:
    return int(round((rgb[0] - 8) / 20)) + 12 * int(round((rgb[1] - 8) / 40))


@pytest.fixture(scope="module")
def coded(tmp_path_factory):
    """N flat-colour 32x32 JPEGs, file i has id i (ids are positions in the sorted paths)."""
    root = tmp_path_factory.mktemp("coded")
    for i in range(N):
        Image.fromarray(np.full((SIZE, SIZE, 3), id_colour(i), np.uint8)).save(root / f"{i:03d}.jpg", quality=95)
    index = scan_folder(root)
    assert index.paths == tuple(f"{i:03d}.jpg" for i in range(N))
    return index


@pytest.fixture(scope="module")
def halves(tmp_path_factory):
    """16 JPEGs, dark left half and bright right half, so a horizontal flip is visible."""
    root = tmp_path_factory.mktemp("halves")
    a = np.full((SIZE, SIZE, 3), 30, np.uint8)
    a[:, SIZE // 2:] = 220
    for i in range(16):
        Image.fromarray(a).save(root / f"{i:03d}.jpg", quality=95)
    return scan_folder(root)


class FixedSchedule:
    """Stands in for pipeline.schedule: order(unit) -> this rank's ids of epoch/window `unit`."""

    def __init__(self, ids, per_epoch: bool = False):
        self.ids = np.asarray(ids, np.int64)
        self.per_epoch = per_epoch

    def order(self, unit: int) -> np.ndarray:
        if self.per_epoch:  # a different permutation every epoch
            return np.random.default_rng(unit).permutation(self.ids)
        return self.ids.copy()


def config(**aug) -> Config:
    cfg = Config()
    cfg.data.image_size = SIZE
    cfg.data.workers = 2
    for k, v in aug.items():
        setattr(cfg.aug, k, v)
    return cfg


NO_AUG = dict(crop_scale=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, gray_p=0.0, blur_p=0.0)


def loader(index, order, batch_size=B, device="cpu", **aug) -> DALILoader:
    return DALILoader(config(**aug), index, FixedSchedule(order), torch.device(device), batch_size)


def pixels(images: torch.Tensor) -> np.ndarray:
    """Normalised float [B,3,H,W] -> 0..255 float [B,3,H,W]."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((images.cpu() * std + mean) * 255).numpy()


def decoded_ids(images: torch.Tensor) -> list[int]:
    return [colour_id(m) for m in pixels(images).mean((2, 3))]


# ---------------------------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_ids_match_pixels_and_order_is_ours(coded, device):
    order = np.random.default_rng(0).permutation(N)
    dl = loader(coded, order, device=device, **NO_AUG)
    batches = list(dl.iter_epoch(0))
    assert len(batches) == len(dl) == N // B
    for k, b in enumerate(batches):
        assert b.images.shape == (B, 3, SIZE, SIZE) and b.images.dtype == torch.float32
        assert b.images.device.type == b.ids.device.type == device
        assert b.ids.dtype == torch.int64 and b.ids.shape == (B,)
        assert b.ids.cpu().tolist() == order[k * B:(k + 1) * B].tolist()  # the scheduler's order, batch by batch
        assert b.ids_host.device.type == "cpu" and b.ids_host.tolist() == b.ids.cpu().tolist()  # kept batches
        assert decoded_ids(b.images) == b.ids.cpu().tolist()  # every id belongs to its pixels
        assert b.crops == ()


def test_drop_last_never_pads(coded):
    order = np.random.default_rng(1).permutation(N)[:45]  # 5 full batches of 8, 5 left over
    dl = loader(coded, order, **NO_AUG)
    batches = list(dl.iter_epoch(0))
    assert len(batches) == len(dl) == 5
    assert all(len(b.ids) == B for b in batches)
    assert torch.cat([b.ids for b in batches]).tolist() == order[:40].tolist()


def test_epochs_end_cleanly_and_abandoned_epochs_do_not_leak(coded):
    dl = DALILoader(config(**NO_AUG), coded, FixedSchedule(np.arange(N), per_epoch=True), CPU, B)
    for epoch in (0, 1):
        batches = list(dl.iter_epoch(epoch))
        assert len(batches) == len(dl)
        assert torch.cat([b.ids for b in batches]).tolist() == dl.schedule.order(epoch).tolist()
    for _b in dl.iter_epoch(2):  # consumer stops after one batch: prefetched batches must not leak into epoch 3
        break
    it = dl.iter_epoch(3)
    first = next(it)
    assert first.ids.tolist() == dl.schedule.order(3)[:B].tolist()
    rest = list(it)
    assert len(rest) == len(dl) - 1 and all(decoded_ids(b.images) == b.ids.tolist() for b in rest)
    # an unfinished generator that is resumed after another epoch started fails loudly instead of mixing epochs
    old = dl.iter_epoch(4)
    next(old)
    new = dl.iter_epoch(5)
    assert next(new).ids.tolist() == dl.schedule.order(5)[:B].tolist()
    with pytest.raises(RuntimeError, match="another epoch"):
        next(old)
    assert len(list(new)) == len(dl) - 1


def test_two_shards_cover_the_data_once(coded):
    ids = np.random.default_rng(2).permutation(N)
    seen = []
    for shard in (ids[0::2], ids[1::2]):
        dl = loader(coded, shard, **NO_AUG)
        for b in dl.iter_epoch(0):
            assert decoded_ids(b.images) == b.ids.tolist()
            seen += b.ids.tolist()
    assert sorted(seen) == list(range(N))


@pytest.mark.parametrize("device", DEVICES)
def test_start_batch_skips_without_reading_and_resumes_exactly(coded, device):
    order = np.random.default_rng(3).permutation(N)
    dl = loader(coded, order, device=device)  # full SimCLR augmentation
    full = [b.images.clone() for b in dl.iter_epoch(1)]
    resumed = list(dl.iter_epoch(1, start_batch=2))
    assert min(dl.source.batches_read) == 2  # batches 0 and 1 were never read nor decoded
    assert len(resumed) == len(full) - 2
    for a, b in zip(full[2:], resumed, strict=True):
        assert torch.equal(a, b.images)  # same crops, flips, colours: the randomness is keyed by (seed, epoch, k)
    assert not torch.equal(full[2], next(dl.iter_epoch(2, start_batch=2)).images)  # another epoch differs
    assert list(dl.iter_epoch(1, start_batch=len(dl))) == []


def test_kept_batches_stay_valid(coded):
    """Zero-copy outputs (dynamic executor) must not be overwritten by later batches."""
    dl = loader(coded, np.arange(N))
    kept = list(dl.iter_epoch(0))
    again = [b.images.clone() for b in dl.iter_epoch(0)]
    assert all(torch.equal(a.images, b) for a, b in zip(kept, again, strict=True))


def test_grayscale_fraction(coded):
    dl = loader(coded, np.arange(N), crop_scale=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, gray_p=0.2, blur_p=0.0)
    spreads = []
    for epoch in range(6):  # 288 samples
        for b in dl.iter_epoch(epoch):
            px = pixels(b.images)
            spreads += list(np.abs(px - px.mean(1, keepdims=True)).max((1, 2, 3)))
    gray = np.mean(np.asarray(spreads) < 4)
    assert len(spreads) >= 200 and 0.1 < gray < 0.3, gray


def test_flip_fraction(halves):
    dl = loader(halves, np.arange(16), crop_scale=(1.0, 1.0), flip_p=0.5, jitter_p=0.0, gray_p=0.0, blur_p=0.0)
    flipped = []
    for epoch in range(16):  # 256 samples
        for b in dl.iter_epoch(epoch):
            px = pixels(b.images)
            left, right = px[..., : SIZE // 2].mean((1, 2, 3)), px[..., SIZE // 2:].mean((1, 2, 3))
            assert np.all(np.abs(left - right) > 100)  # every image is clearly one way round or the other
            flipped += list(left > right)
    assert 0.38 < np.mean(flipped) < 0.62, np.mean(flipped)


@pytest.mark.parametrize("device", DEVICES)
def test_multicrop_shapes_and_alignment(coded, device):
    # crops, flips and the blur conditional (which splits and merges the batch) on; colours stay flat
    dl = loader(coded, np.random.default_rng(4).permutation(N), device=device, small_crops=2, small_size=16,
                jitter_p=0.0, gray_p=0.0, blur_p=0.5)
    for b in dl.iter_epoch(0):
        assert b.images.shape == (B, 3, SIZE, SIZE)
        assert len(b.crops) == 2 and all(c.shape == (B, 3, 16, 16) and c.dtype == torch.float32 for c in b.crops)
        for c in (b.images, *b.crops):
            assert decoded_ids(c) == b.ids.cpu().tolist()  # every crop group in the same instance order


def test_full_augmentation_is_in_range(coded):
    dl = loader(coded, np.arange(N), small_crops=1, small_size=16)
    b = next(iter(dl.iter_epoch(0)))
    for c in (b.images, *b.crops):
        px = pixels(c)
        assert np.isfinite(px).all() and px.min() > -1 and px.max() < 256


@pytest.mark.parametrize("device", DEVICES)
def test_channels_last(coded, device):
    cfg = config(**NO_AUG)
    dl = DALILoader(cfg, coded, FixedSchedule(np.arange(N)), torch.device(device), B, channels_last=True)
    ref = loader(coded, np.arange(N), device=device, **NO_AUG)
    a, r = next(iter(dl.iter_epoch(0))), next(iter(ref.iter_epoch(0)))
    assert a.images.shape == r.images.shape and a.images.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(a.images, r.images)


def test_crop_mode_skips_colour(coded):
    dl = DALILoader(config(jitter_p=1.0, gray_p=1.0, blur_p=1.0, flip_p=0.0, crop_scale=(1.0, 1.0)), coded,
                    FixedSchedule(np.arange(N)), CPU, B, color=False)
    b = next(iter(dl.iter_epoch(0)))
    assert decoded_ids(b.images) == b.ids.tolist()  # colours untouched


def test_neutral_parameters_when_not_applied():
    cfg = config(jitter_p=0.0, gray_p=0.0)
    plan = make_plans(cfg.aug, SIZE, color=True)[0]
    g = torch.Generator().manual_seed(0)
    p = draw_view_params(plan, cfg.aug, torch.full((64,), 40), torch.full((64,), 60), g)
    assert (p["brightness"] == 1).all() and (p["contrast"] == 1).all() and (p["saturation"] == 1).all()
    assert (p["hue"] == 0).all()
    assert ((p["start"] >= 0) & (p["start"] + p["shape"] <= [40, 60])).all()  # (y, x), (h, w) inside the image
    cfg = config(gray_p=1.0)
    p = draw_view_params(plan, cfg.aug, torch.full((64,), 40), torch.full((64,), 60), g)
    assert (p["saturation"] == 0).all()


def test_missing_file_is_replaced_and_bad_ids_are_errors(coded, tmp_path):
    for i in range(B):
        Image.fromarray(np.full((SIZE, SIZE, 3), id_colour(i), np.uint8)).save(tmp_path / f"{i:03d}.jpg")
    index = scan_folder(tmp_path)
    (tmp_path / "003.jpg").unlink()  # vanished after indexing: replaced like an undecodable file, and named
    dl = loader(index, np.arange(B), **NO_AUG)
    with pytest.warns(UserWarning, match="003.jpg"):
        (batch,) = list(dl.iter_epoch(0))
    assert batch.ids.tolist() == [0, 1, 2, 4, 4, 5, 6, 7] and "003.jpg" in dl.corrupt[3]
    with pytest.raises(DataError, match="outside"):
        list(loader(coded, np.array([0, 1, N] + list(range(3, B))), **NO_AUG).iter_epoch(0))


def test_undecodable_files_are_replaced_not_faked(tmp_path):
    """Policy of every backend: the next decodable image of the unit stands in, id and pixels together."""
    for i in range(2 * B):
        Image.fromarray(np.full((SIZE, SIZE, 3), id_colour(i), np.uint8)).save(tmp_path / f"{i:03d}.jpg")
    (tmp_path / "002.jpg").write_bytes(b"not an image" * 10)
    good = (tmp_path / "009.jpg").read_bytes()
    (tmp_path / "009.jpg").write_bytes(good[:len(good) // 2])  # truncated: its header still parses
    dl = loader(scan_folder(tmp_path), np.arange(2 * B), **NO_AUG)
    with pytest.warns(UserWarning, match="instance 2"):
        batches = list(dl.iter_epoch(0))
    assert [len(b.ids) for b in batches] == [B, B]
    assert batches[0].ids.tolist()[2] == 3 and batches[1].ids.tolist()[1] == 10
    assert set(dl.corrupt) == {2, 9}
    assert all(decoded_ids(b.images) == b.ids.tolist() for b in batches)


def gradient(w: int, h: int) -> np.ndarray:
    """A smooth, asymmetric image: R grows with x, G with y, B with x*y (so any misplaced crop shows)."""
    x = np.linspace(0, 1, w)[None, :]
    y = np.linspace(0, 1, h)[:, None]
    return (np.stack([x + 0 * y, y + 0 * x, x * y], -1) * 255).round().astype(np.uint8)


RESIZERS = [("cpu", "numba"), ("cpu", "dali"),
            pytest.param("cuda", "dali", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.mark.parametrize(("device", "resize"), RESIZERS)
@pytest.mark.parametrize("small_crops", [0, 2])
def test_crops_match_a_reference_crop(tmp_path, small_crops, device, resize):
    """DALI's crop + resize + flip equals torchvision's resized_crop of the same box from the same draw, for the
    window decode (one view) and the decode-once ROI resize (multi-crop), with our numba resize and with DALI's;
    also for an EXIF-rotated JPEG, whose decoded size is the header's size transposed. For the lossless PNG our
    resize must agree to rounding (<= 1 of 255 everywhere): the same filter, the same window."""
    from torchvision.transforms.v2 import functional as TF

    from pipeline.augment import generator
    from pipeline.decode import decode_rgb

    Image.fromarray(gradient(48, 32)).save(tmp_path / "0.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° when displayed
    Image.fromarray(gradient(48, 32)).save(tmp_path / "1.jpg", quality=98, exif=exif)
    index = scan_folder(tmp_path)
    cfg = config(crop_scale=(0.3, 1.0), flip_p=0.5, jitter_p=0.0, gray_p=0.0, blur_p=0.0, small_crops=small_crops,
                 small_size=16, small_scale=(0.1, 0.3))
    dl = DALILoader(cfg, index, FixedSchedule([0, 1]), torch.device(device), 2, cpu_resize=resize)
    plans = dl.source.plans  # (with colour: its draws come after the crop's, so they shift the next view's)
    refs = [torch.from_numpy(np.array(decode_rgb(index.abspath(i)))).permute(2, 0, 1).float() for i in (0, 1)]
    assert refs[1].shape[1:] == (48, 32)
    h = torch.tensor([r.shape[1] for r in refs])
    w = torch.tensor([r.shape[2] for r in refs])
    for epoch in range(4):
        b = next(iter(dl.iter_epoch(epoch)))
        gen = generator(cfg.run.seed, epoch, 0)
        for plan, out in zip(plans, (b.images, *b.crops), strict=True):
            p = draw_view_params(plan, cfg.aug, h, w, gen)  # the same draws, in the same order, as the loader's
            got = pixels(out)
            for i, ref in enumerate(refs):
                (y, x), (ch, cw) = p["start"][i].astype(int), p["shape"][i].astype(int)
                want = TF.resized_crop(ref, y, x, ch, cw, [plan.size, plan.size], antialias=True)
                if p["mirror"][i]:
                    want = want.flip(-1)
                diff = np.abs(got[i] - want.numpy())
                assert diff.mean() < 4, (epoch, plan.size, i, p["start"][i], p["shape"][i], diff.mean())
                if resize == "numba" and i == 0:  # the PNG: no decoder differences, only rounding
                    assert diff.max() < 1.01, (epoch, plan.size, p["start"][i], p["shape"][i], diff.max())


def test_a_file_dali_fails_on_is_found_named_and_replaced(tmp_path, monkeypatch):
    """What gets past the pre-check (here: the pre-check switched off) fails DALI's pipeline without a file name;
    the loader finds the culprit with PIL, records it, rebuilds the pipeline and replays the unit from that batch."""
    from pipeline.dali_backend import EpochSource

    for i in range(3 * B):
        Image.fromarray(np.full((SIZE, SIZE, 3), id_colour(i), np.uint8)).save(tmp_path / f"{i:03d}.jpg")
    good = (tmp_path / "013.jpg").read_bytes()
    (tmp_path / "013.jpg").write_bytes(good[:len(good) // 2])

    def unchecked(self, iid):
        with open(self.index.abspath(iid), "rb") as f:
            data = f.read()
        if self.sizes[iid, 0] < 0:
            from pipeline.dali_backend import image_header

            self.sizes[iid] = image_header(data)[:2]
        return data

    monkeypatch.setattr(EpochSource, "_checked_bytes", unchecked)
    dl = loader(scan_folder(tmp_path), np.arange(3 * B), **NO_AUG)
    with pytest.warns(UserWarning, match="instance 13"):
        batches = list(dl.iter_epoch(0))
    assert [len(b.ids) for b in batches] == [B, B, B] and batches[1].ids.tolist()[5] == 14
    assert list(dl.corrupt) == [13] and "DALI" in dl.corrupt[13]
    assert all(decoded_ids(b.images) == b.ids.tolist() for b in batches)


def test_formats_dali_would_refuse_or_convert_differently_are_handed_over_as_pil_decodes(tmp_path):
    """GIF, CMYK JPEG, RGBA PNG behind .jpg names: trained on, with the pixels every other backend sees."""
    for i in range(B):
        Image.fromarray(np.full((SIZE, SIZE, 3), id_colour(i), np.uint8)).save(tmp_path / f"{i:03d}.jpg")
    Image.open(tmp_path / "001.jpg").convert("RGB").save(tmp_path / "001.jpg", "GIF")
    Image.open(tmp_path / "002.jpg").convert("CMYK").save(tmp_path / "002.jpg", "JPEG", quality=95)
    rgba = Image.open(tmp_path / "003.jpg").convert("RGBA")
    rgba.putalpha(255)
    rgba.save(tmp_path / "003.jpg", "PNG")
    dl = loader(scan_folder(tmp_path), np.arange(B), **NO_AUG)
    (batch,) = list(dl.iter_epoch(0))
    assert batch.ids.tolist() == list(range(B)) and not dl.corrupt
    assert decoded_ids(batch.images) == list(range(B))
    assert dl.source.reencode == {1, 2, 3}
