"""FFCV converter + backend, on the CPU with real FFCV (small images; one loader compile for the whole module).

Test images encode their identity in their colour: every file gets its own colour from a fixed palette, so a
decoded batch can be checked against the ids it claims (per-image mean colour == colour of that id's file).
The "good" images are a fine luminance checkerboard around their colour: the mean of any crop is still the colour,
but different crops give different pixels, which the determinism tests need.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from config import Config
from pipeline import backend_unavailable
from pipeline.base import IMAGENET_MEAN, IMAGENET_STD
from pipeline.convert_ffcv import ConvertSettings, convert, main, print_summary, sidecar_paths
from pipeline.dataset import beton_sidecars, load_index

# Collected and skipped one by one where FFCV is absent (the GPU machine): `pytest tests/test_ffcv.py` exits 0.
FFCV_MISSING = backend_unavailable("ffcv")
if not FFCV_MISSING:
    from pipeline.beton import beton_index as ffcv_index
    from pipeline.beton import sample_instance_ids
    from pipeline.ffcv_backend import FFCVLoader, _rrc_box


def beton_instance_ids(beton) -> np.ndarray:
    """The instance id of every sample of a .beton (from its manifest sidecar)."""
    return sample_instance_ids(ffcv_index(beton))

pytestmark = [pytest.mark.ffcv, pytest.mark.skipif(bool(FFCV_MISSING), reason=FFCV_MISSING or "-")]

MAX_RES = 40
SIZE, SMALL = 16, 8
PALETTE = [tuple(int(v) for v in c) for c in itertools.product((40, 96, 152, 208), repeat=3)]
UNICODE_NAME = "q/ünïcødé_日本.jpg"


def _checker(color, h=40, w=48, d=20) -> Image.Image:
    yy, xx = np.mgrid[0:h, 0:w]
    sign = np.where(((yy // 2) + (xx // 2)) % 2 == 0, 1, -1)[..., None]
    return Image.fromarray(np.clip(np.array(color)[None, None] + d * sign, 0, 255).astype(np.uint8))


def _flat(color, size=(24, 24), mode="RGB") -> Image.Image:
    return Image.new("RGB", size, color).convert(mode) if mode != "RGB" else Image.new("RGB", size, color)


def _orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


def _make_tree(root) -> dict[str, tuple[int, int, int] | None]:
    """Write the test folder; returns relative path -> expected RGB colour (None: must be rejected/skipped)."""
    colors = iter(PALETTE[::3] + PALETTE[1::3])
    expected: dict[str, tuple[int, int, int] | None] = {}

    def save(rel, img, color, **kw):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        img.save(p, **kw)
        expected[rel] = color

    for cls, n in (("a", 14), ("b", 10)):
        for i in range(n):
            c = next(colors)
            save(f"{cls}/img_{i:02d}.jpg", _checker(c), c, quality=95)
    # quirky but valid
    c = next(colors)
    save("q/cmyk.jpg", _flat(c, mode="CMYK"), c, quality=95)
    c = next(colors)
    save("q/png_inside.JPEG", _flat(c), c, format="PNG")
    save("q/gray.jpg", _flat((96, 96, 96), mode="L"), (96, 96, 96), quality=95)
    c = next(colors)
    rgba = _flat(c).convert("RGBA")
    save("q/rgba.png", rgba, c)
    c = next(colors)
    save("q/palette.png", _flat(c).quantize(4), c)
    save("q/gray16.png", Image.fromarray(np.full((20, 20), 144 * 257, np.uint16)), (144, 144, 144))
    c = next(colors)
    save("q/one_px.png", _flat(c, size=(1, 1)), c)
    c = next(colors)
    save(UNICODE_NAME, _flat(c), c, quality=95)
    c = next(colors)
    # stored landscape 36 x 20; orientation 6 = "rotate 90° clockwise to view": upright it is portrait (h 36, w 20)
    save("q/exif_rot.jpg", _flat(c, size=(36, 20)), c, quality=95, exif=_orientation(6))
    c = next(colors)
    save("q/large.jpg", _flat(c, size=(1600, 1200)), c, quality=90)
    # broken
    (root / "z").mkdir()
    (root / "z/empty.jpg").write_bytes(b"")
    expected["z/empty.jpg"] = None
    buf = io.BytesIO()
    _checker((120, 60, 200), 64, 64).save(buf, format="JPEG", quality=95)
    (root / "z/truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    expected["z/truncated.jpg"] = None
    (root / "z/text.jpg").write_text("this is not an image\n")
    expected["z/text.jpg"] = None
    (root / "z/notes.txt").write_text("not an image name: skipped, not rejected\n")
    return expected


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(source folder, .beton path, expected colours, conversion report): converted once for the module."""
    root = tmp_path_factory.mktemp("src")
    expected = _make_tree(root)
    out = tmp_path_factory.mktemp("out") / "data.beton"
    report = convert(str(root), str(out), ConvertSettings(max_resolution=MAX_RES, workers=2, chunk_size=8))
    return root, out, expected, report


class FakeSchedule:
    """A fixed permutation per unit (ids 0..N-1, rejected ones included, as the real schedules produce)."""

    def __init__(self, n: int, seed: int = 1):
        self.n, self.seed = n, seed

    def order(self, unit: int) -> np.ndarray:
        return np.random.default_rng([self.seed, unit]).permutation(self.n).astype(np.int64)


def _cfg(beton, small_crops=1) -> Config:
    cfg = Config()
    cfg.data.path = str(beton)
    cfg.data.image_size = SIZE
    cfg.data.workers = 2
    cfg.aug = dataclasses.replace(cfg.aug, crop_scale=(0.3, 1.0), flip_p=0.5, jitter_p=0.0, gray_p=0.0, blur_p=0.0,
                                  small_crops=small_crops, small_size=SMALL, small_scale=(0.3, 0.6))
    return cfg


@pytest.fixture(scope="module")
def loader(converted):
    _, out, _, _ = converted
    index = ffcv_index(out)
    return FFCVLoader(_cfg(out), index, FakeSchedule(len(index)), torch.device("cpu"), batch_size=4)


def _mean_rgb(images: torch.Tensor) -> np.ndarray:
    """Normalised float [B,3,H,W] -> per-image mean colour in 0..255, [B,3]."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((images * std + mean) * 255).mean((2, 3)).numpy()


# ---------------------------------------------------------------------------------------------------------------
# converter
# ---------------------------------------------------------------------------------------------------------------


def test_converter_keeps_ids_and_lists_rejects(converted):
    root, out, expected, report = converted
    index = load_index(root)
    good = {p for p, c in expected.items() if c is not None}
    assert report.written == len(good)
    # the empty file never had an id: an empty file, not a rejected instance; instances = written + rejected
    assert report.rejected == 2 and report.empty_files == 1 and report.skipped_non_images == 1
    assert report.num_instances == len(index) == report.written + report.rejected
    ids = beton_instance_ids(out)
    # the truncated JPEG has a valid header: it fails in the write pass, and its sample is removed from the .beton
    assert report.write_rejects == 1 and (ids >= 0).all() and len(ids) == report.written
    # every written sample carries its index id; rejected ids are absent, none shifted
    assert sorted(index.paths[i] for i in ids) == sorted(good)
    assert len(set(ids.tolist())) == len(ids)
    rejects = sidecar_paths(out)["rejects"].read_text(encoding="utf-8").splitlines()
    assert rejects[0] == "path\treason\tinstance_id"
    rows = {r.split("\t")[0]: r.split("\t") for r in rejects[1:]}
    assert set(rows) == {"z/empty.jpg", "z/truncated.jpg", "z/text.jpg"}
    assert rows["z/empty.jpg"][2] == ""  # never had an id
    for p in ("z/truncated.jpg", "z/text.jpg"):
        assert index.paths[int(rows[p][2])] == p and rows[p][1]
    # the manifest lists the written images with the same ids
    lines = sidecar_paths(out)["manifest"].read_text(encoding="utf-8").splitlines()
    assert lines[0] == "instance_id\tlabel\tpath"
    manifest = {int(ln.split("\t")[0]): ln.split("\t")[2] for ln in lines[1:]}
    assert manifest == {int(i): index.paths[i] for i in ids}
    assert UNICODE_NAME in manifest.values()


def test_summary_counts_agree_with_the_loader_and_say_why(converted, loader):
    from rich.console import Console

    _, _, _, report = converted
    # the loader's N and its bad files (rejected at conversion, in either pass) are the summary's counts
    assert loader.num_instances == report.num_instances and loader.bad_files.total() == report.rejected
    console = Console(record=True, width=400)
    print_summary(report, ConvertSettings(), console)
    text = console.export_text()
    assert f"{report.num_instances} = {report.written} written + 2 rejected" in text
    assert "2 could not be decoded (1 at the header scan, 1 while writing: their samples removed in" in text
    assert "empty files" in text and "1 (0 bytes: no instance id, not counted in instances" in text


def test_quirky_images_converted_with_the_right_shape(converted):
    from ffcv.reader import Reader

    root, out, expected, _ = converted
    index = load_index(root)
    reader = Reader(str(out))
    meta = reader.metadata["f0"]  # image field: mode, width, height, data_ptr
    by_path = {index.paths[i]: (int(meta["height"][s]), int(meta["width"][s]))
               for s, i in enumerate(beton_instance_ids(out)) if i >= 0}
    assert by_path["q/exif_rot.jpg"] == (36, 20)  # EXIF orientation applied: portrait
    assert by_path["q/large.jpg"] == (30, 40)  # longest side = max resolution, aspect kept
    assert by_path["q/one_px.png"] == (1, 1)
    assert all(max(hw) <= MAX_RES for hw in by_path.values())


def test_existing_output_needs_force(converted, tmp_path, capsys):
    root, _, _, _ = converted
    out = tmp_path / "x.beton"
    out.write_bytes(b"precious")
    assert main([str(root), str(out), "--subset", "3", "--workers", "1"]) == 2
    assert "use --force" in capsys.readouterr().err
    assert out.read_bytes() == b"precious"
    assert main([str(root), str(out), "--subset", "3", "--workers", "1", "--force", "--max-resolution", "16"]) == 0
    assert len(beton_instance_ids(out)) == 3 and out.stat().st_size > 100
    assert not list(tmp_path.glob("*.tmp-*"))  # temporaries renamed or removed


def test_missing_source_is_a_one_line_error(tmp_path, capsys):
    assert main([str(tmp_path / "nope"), str(tmp_path / "o.beton")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: source does not exist") and "\n" not in err
    assert not (tmp_path / "o.beton").exists()


def test_file_that_fails_in_the_write_pass_is_listed_and_removed(converted, tmp_path, monkeypatch):
    """Pass 1 reads headers only: a file whose header passes but whose data does not decode (here: every broken
    file, let through) is rejected by the write pass, not fatal; its placeholder sample is removed afterwards, so
    the .beton holds the written images only."""
    import pipeline.convert_ffcv as cf

    root, _, expected, _ = converted
    fake = cf.SourceInfo(16, 16, 100, False)  # not passthrough-able: the write pass decodes every file
    monkeypatch.setattr(cf, "scan_image", lambda item: (item[0], "", fake))  # let the broken files through
    out = tmp_path / "f.beton"
    report = convert(str(root), str(out), ConvertSettings(max_resolution=16, workers=1))
    broken = {p for p, c in expected.items() if c is None and p != "z/empty.jpg"}  # empty: never had an id
    assert report.write_rejects == len(broken) and report.written == len(expected) - len(broken) - 1
    rejects = sidecar_paths(out)["rejects"].read_text(encoding="utf-8").splitlines()[1:]
    assert {r.split("\t")[0] for r in rejects} == broken | {"z/empty.jpg"}
    index = ffcv_index(out)
    ids = beton_instance_ids(out)
    assert (ids >= 0).all() and len(ids) == report.written
    assert sorted(index.paths[i] for i in ids) == sorted(p for p, c in expected.items() if c is not None)
    loader = FFCVLoader(_cfg(out), index, FakeSchedule(len(index)), torch.device("cpu"), batch_size=4)
    assert loader.live_samples.size == report.written


def test_writer_failure_stops_instead_of_hanging(converted, tmp_path, monkeypatch):
    """A writer worker that dies (a bug, not a bad file) aborts the run instead of hanging; no output."""
    import pipeline.convert_ffcv as cf

    root, _, _, _ = converted

    def crash(self, iid):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(cf.BetonSource, "sample", crash)
    out = tmp_path / "f.beton"
    with pytest.raises(RuntimeError, match="worker failed"):
        convert(str(root), str(out), ConvertSettings(max_resolution=16, workers=1))
    assert not list(tmp_path.iterdir())


def test_fitting_plain_jpegs_are_stored_as_their_own_bytes(tmp_path):
    """--passthrough: a plain JPEG (baseline, progressive, gray) that fits is stored byte for byte and decodes in
    the FFCV loader to what PIL decodes; CMYK and EXIF-rotated JPEGs and a JPEG too large are re-encoded."""
    from ffcv.reader import Reader

    root = tmp_path / "src"
    (root / "c").mkdir(parents=True)
    _checker((200, 40, 90), 24, 32).save(root / "c/base.jpg", quality=80)
    _checker((30, 160, 90), 24, 32).save(root / "c/prog.jpg", quality=85, progressive=True)
    _flat((90, 90, 90), (20, 20), mode="L").save(root / "c/gray.jpg", quality=90)
    _flat((10, 100, 200), (20, 20), mode="CMYK").save(root / "c/cmyk.jpg", quality=90)
    _flat((10, 200, 100), (20, 30)).save(root / "c/rot.jpg", quality=90, exif=_orientation(6))
    _checker((120, 120, 20), 48, 64).save(root / "c/big.jpg", quality=90)
    buf = io.BytesIO()
    _flat((60, 60, 200), (32, 24)).save(buf, format="JPEG", quality=90)  # (checked: TurboJPEG warns on it)
    (root / "c/junk.jpg").write_bytes(buf.getvalue()[:-2] + b"\x00\x00\x00" + buf.getvalue()[-2:])
    out = tmp_path / "p.beton"
    convert(str(root), str(out), ConvertSettings(max_resolution=40, write_mode="jpg", workers=1))
    index, reader = load_index(root), Reader(str(out))
    ids = beton_instance_ids(out)
    size_at = dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist(), strict=True))
    stored = {}
    with open(out, "rb") as f:
        for s, i in enumerate(ids):
            ptr = int(reader.metadata["f0"]["data_ptr"][s])
            f.seek(ptr)
            stored[index.paths[i]] = f.read(size_at[ptr])
    for name in ("c/base.jpg", "c/prog.jpg", "c/gray.jpg"):
        assert stored[name] == (root / name).read_bytes(), name
    # libjpeg only warns about junk before a marker: TurboJPEG refuses it, PIL decodes it -> kept, re-encoded
    assert "c/junk.jpg" in stored and stored["c/junk.jpg"] != (root / "c/junk.jpg").read_bytes()
    for name in ("c/cmyk.jpg", "c/rot.jpg", "c/big.jpg"):
        assert stored[name] != (root / name).read_bytes(), name
    # the loader decodes the passed-through files like PIL does (libjpeg-turbo both; FFCV uses the fast IDCT)
    cfg = _cfg(out)
    cfg.aug = dataclasses.replace(cfg.aug, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, small_crops=0)
    cfg.data.image_size = 20
    loader = FFCVLoader(cfg, ffcv_index(out), FakeSchedule(len(ids)), torch.device("cpu"), batch_size=1)
    means = {}
    for b in loader.iter_epoch(0):
        means[index.paths[int(b.ids[0])]] = _mean_rgb(b.images)[0]
    for name in ("c/base.jpg", "c/prog.jpg", "c/gray.jpg"):
        want = np.asarray(Image.open(root / name).convert("RGB"), np.float64).mean((0, 1))
        assert np.abs(means[name] - want).max() < 6, (name, means[name], want)


def test_ffcv_index_covers_all_ids(converted):
    root, out, _, _ = converted
    src = load_index(root)
    idx = ffcv_index(out)
    assert idx.paths == src.paths  # rejected ids included, same ids as the source folder
    assert idx.classes == src.classes
    written = beton_instance_ids(out)
    assert np.array_equal(idx.labels[written], src.labels[written])


# ---------------------------------------------------------------------------------------------------------------
# backend
# ---------------------------------------------------------------------------------------------------------------


def test_batches_obey_the_contract_and_colours_match_ids(converted, loader):
    root, out, expected, _ = converted
    index = load_index(root)
    seen = []
    for batch in loader.iter_epoch(0):
        assert batch.images.dtype == torch.float32 and batch.images.shape == (4, 3, SIZE, SIZE)
        assert batch.ids.dtype == torch.int64 and batch.ids.shape == (4,)
        assert batch.ids_host.device.type == "cpu" and torch.equal(batch.ids_host, batch.ids.cpu())
        assert len(batch.crops) == 1 and batch.crops[0].shape == (4, 3, SMALL, SMALL)
        assert batch.images.min() < -1.0 and batch.images.max() > 1.0  # normalised, not [0, 1]
        for view in (batch.images, batch.crops[0]):
            for iid, rgb in zip(batch.ids.tolist(), _mean_rgb(view), strict=True):
                want = np.array(expected[index.paths[iid]], dtype=np.float64)
                assert np.abs(rgb - want).max() < 8, (index.paths[iid], rgb, want)
        seen += batch.ids.tolist()
        written = set(beton_instance_ids(out).tolist())
    # the unit keeps its planned length: every id of the order, a rejected one replaced by the next written one
    assert len(seen) == len(index) // 4 * 4 == len(loader) * 4
    assert set(seen) <= written and len(set(seen)) >= len(seen) - (len(index) - len(written))


def _with_stand_ins(order: list[int], written: set[int]) -> list[int]:
    """The policy of every backend: a missing id is replaced by the next present one of the order, cyclically."""
    return [next(order[(p + j) % len(order)] for j in range(len(order)) if order[(p + j) % len(order)] in written)
            for p in range(len(order))]


def test_schedule_order_is_honoured_and_rejects_replaced(converted, loader):
    _, out, _, _ = converted
    written = set(beton_instance_ids(out).tolist())
    for unit in (0, 3):
        order = _with_stand_ins(loader.schedule.order(unit).tolist(), written)
        got = [b.ids.tolist() for b in loader.iter_epoch(unit)]
        assert got == [order[k * 4:(k + 1) * 4] for k in range(len(order) // 4)]
    # start_batch: the same batches, minus the first ones
    tail = [b.ids.tolist() for b in loader.iter_epoch(3, start_batch=2)]
    assert tail == got[2:]


def test_augmentation_is_a_pure_function_of_the_order(loader):
    def first(epoch, start=0):
        it = loader.iter_epoch(epoch, start)
        b = next(it)
        out = (b.images.clone(), b.crops[0].clone(), b.ids.clone())
        it.close()  # abandon the epoch mid-way
        return out

    a, b = first(1), first(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    # resuming at batch 1 gives the uninterrupted run's batch 1
    it = loader.iter_epoch(1)
    next(it)
    second = next(it)
    full = (second.images.clone(), second.ids.clone())
    it.close()
    resumed = first(1, start=1)
    assert torch.equal(full[1], resumed[2]) and torch.equal(full[0], resumed[0])
    # another epoch: other crops
    c = first(2)
    assert not torch.equal(a[0], c[0])


def test_seeded_crop_box_matches_the_rrc_rule():
    rng = np.random.default_rng(0)
    for _ in range(200):
        h, w = (int(v) for v in rng.integers(1, 300, 2))
        key = np.uint64(rng.integers(0, 2**62))
        i, j, ch, cw = _rrc_box(h, w, 0.08, 1.0, np.log(3 / 4), np.log(4 / 3), key)
        assert 0 <= i and 0 <= j and 1 <= ch and 1 <= cw and i + ch <= h and j + cw <= w
        assert _rrc_box(h, w, 0.08, 1.0, np.log(3 / 4), np.log(4 / 3), key) == (i, j, ch, cw)


def test_full_crop_and_flip_geometry(tmp_path):
    """scale (1,1), ratio (1,1) on square images = the whole image; flip_p=1 mirrors it (a left-to-right ramp)."""
    src = tmp_path / "src"
    src.mkdir()
    ramp = np.repeat(np.repeat(np.linspace(0, 255, 32).astype(np.uint8)[None, :, None], 32, 0), 3, 2)
    for i in range(2):
        Image.fromarray(ramp).save(src / f"{i}.png")
    out = tmp_path / "r.beton"
    convert(str(src), str(out), ConvertSettings(max_resolution=32, write_mode="raw", workers=1))
    cfg = _cfg(out, small_crops=0)
    cfg.aug = dataclasses.replace(cfg.aug, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=1.0)
    cfg.data.image_size = 32
    index = ffcv_index(out)
    (batch,) = list(FFCVLoader(cfg, index, FakeSchedule(2), torch.device("cpu"), batch_size=2).iter_epoch(0))
    std, mean = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    columns = ((batch.images * std + mean) * 255).mean((1, 2)).numpy()  # [B, W]
    assert np.allclose(columns[:, ::-1], np.linspace(0, 255, 32)[None], atol=2)


def test_dead_loader_thread_raises_instead_of_hanging():
    import queue
    import threading

    from pipeline.ffcv_backend import _next_or_raise

    class DeadIterator(threading.Thread):  # an EpochIterator whose pipeline thread raised before queuing a batch
        output_queue: queue.Queue = queue.Queue()

    it = DeadIterator(target=lambda: None)
    it.start()
    it.join()
    with pytest.raises(RuntimeError, match="thread died"):
        _next_or_raise(it)


def test_train_runs_on_a_beton(tmp_path):
    """FFCV feeds PIC: train.py on a .beton (ids from the manifest beside it), a few steps, loss finite."""
    import math

    from conftest import tiny_config, write_id_folder

    import train

    src = write_id_folder(tmp_path / "src", n=40)
    beton = tmp_path / "ids.beton"
    convert(str(src), str(beton), ConvertSettings(max_resolution=32, workers=1))
    cfg = tiny_config(str(beton), str(tmp_path / "runs"), data={"backend": "ffcv", "workers": 1},
                      run={"max_steps": 3})
    out = train.train(cfg)
    assert out["step"] == 3 and all(math.isfinite(x) for x in out["losses"])
    manifest = (tmp_path / "runs" / "t" / "manifest.tsv").read_text().splitlines()
    assert len(manifest) == 41 and manifest[1].endswith("class_0/img_000.jpg")


def test_normalising_in_ffcvs_threads_changes_no_number(converted, monkeypatch):
    """On a CPU a view without colour augmentation is normalised by FFCV's numba threads (a lookup table) instead of
    BatchColorAugment in the consumer's thread: the same float32 values, bit for bit, every view of every batch."""
    _, out, _, _ = converted
    index = ffcv_index(out)

    def epoch(in_ffcv: bool) -> list[tuple[torch.Tensor, ...]]:
        monkeypatch.setattr(FFCVLoader, "normalise_in_ffcv", lambda self: in_ffcv)
        ld = FFCVLoader(_cfg(out), index, FakeSchedule(len(index)), torch.device("cpu"), batch_size=4)
        assert ld.normalised_in_ffcv == in_ffcv
        return [(b.ids.clone(), b.images.clone(), b.crops[0].clone()) for b in ld.iter_epoch(2)]

    default = FFCVLoader(_cfg(out), index, FakeSchedule(len(index)), torch.device("cpu"), batch_size=4)
    assert default.normalised_in_ffcv  # the default on a CPU in crop mode
    ours, theirs = epoch(True), epoch(False)
    assert len(ours) == len(theirs) == len(index) // 4
    for a, b in zip(ours, theirs, strict=True):
        for x, y in zip(a, b, strict=True):
            assert x.dtype == y.dtype and torch.equal(x, y)


def _samples(beton: Path) -> list[tuple[int, int, int, np.ndarray]]:
    """(instance id, label, mode, pixels uint8 [H,W,3]) of every sample of a .beton, decoded as the loader does
    (TurboJPEG for JPEG samples)."""
    from ffcv.fields.rgb_image import IMAGE_MODES
    from ffcv.libffcv import imdecode
    from ffcv.reader import Reader

    from pipeline.beton import beton_index, sample_instance_ids

    ids = sample_instance_ids(beton_index(beton))  # the manifest's: row j = sample j
    reader = Reader(str(beton))
    meta, size_at = reader.metadata, dict(zip(reader.alloc_table["ptr"].tolist(),
                                              reader.alloc_table["size"].tolist(), strict=True))
    raw = np.fromfile(beton, dtype=np.uint8)
    out = []
    for s in range(reader.num_samples):
        m = meta["f0"][s]
        h, w, ptr = int(m["height"]), int(m["width"]), int(m["data_ptr"])
        data = raw[ptr:ptr + size_at[ptr]]
        if m["mode"] == IMAGE_MODES["jpg"]:
            px = np.empty((h, w, 3), np.uint8)
            assert imdecode(data, px, h, w, h, w, 0, 0, 1, 1, False, False) == 0
        else:
            px = data[:h * w * 3].reshape(h, w, 3)
        out.append((int(ids[s]), int(meta["f1"][s]), int(m["mode"]), px))
    return out


@pytest.mark.parametrize("max_res", [128, 256])
def test_turbojpeg_scaled_decode_leaves_the_content_unchanged(max_res, tmp_path, monkeypatch):
    """The speed path (TurboJPEG, at a reduced DCT scale down to 2x the target, then INTER_AREA) against the path it
    replaced (PIL, then INTER_AREA), on real photos (~500x375: 4x the target at 128, no DCT scale at 256): the same ids,
    labels, sidecars, storage modes and sizes; the pixels differ by what two JPEG decoders and two resampling
    paths of the same photo differ by."""
    from pipeline import convert_ffcv as cf
    from pipeline.sample_data import make_photos

    src = make_photos(tmp_path / "src", count=16)
    settings = ConvertSettings(max_resolution=max_res, write_mode="proportion", workers=2, chunk_size=4)
    fast, old = tmp_path / "fast.beton", tmp_path / "old.beton"
    convert(str(src), str(fast), settings)

    def refused(*a, **k):
        raise cf.CorruptImageError("the old path: PIL decides")

    monkeypatch.setattr(cf, "decode_plain_jpeg", refused)
    convert(str(src), str(old), settings)
    for key in ("manifest", "rejects"):
        assert beton_sidecars(fast)[key].read_text() == beton_sidecars(old)[key].read_text()
    a, b = _samples(fast), _samples(old)
    assert [x[:3] for x in a] == [x[:3] for x in b] and len(a) == 16
    assert any(x[2] == 0 for x in a) and any(x[2] != 0 for x in a)  # both storage modes are compared
    index = load_index(src)
    for (iid, _, _, pa), (_, _, _, pb) in zip(a, b, strict=True):
        assert pa.shape == pb.shape and max(pa.shape[:2]) == max_res, iid
        diff = np.abs(pa.astype(np.int16) - pb.astype(np.int16))
        # JPEG tolerance: what the two decoders make of the source file (TurboJPEG, FFCV's fast IDCT, against PIL:
        # the FFCV loader sees the former anyway) plus one q90 round trip of the image the old path encoded
        budget = _decoders_differ(index.abspath(iid)) + _round_trip_error(cf.load_for_beton(index.abspath(iid),
                                                                                            max_res))
        assert diff.mean() <= budget.mean() and np.percentile(diff, 99) <= np.percentile(budget, 99), iid


def _decoders_differ(path: str) -> np.ndarray:
    from ffcv.libffcv import imdecode

    with Image.open(path) as im:
        pil = np.asarray(im.convert("RGB"), np.int16)
    h, w = pil.shape[:2]
    turbo = np.empty((h, w, 3), np.uint8)
    assert imdecode(np.fromfile(path, np.uint8), turbo, h, w, h, w, 0, 0, 1, 1, False, False) == 0
    return _quantiles(np.abs(turbo.astype(np.int16) - pil))


def _round_trip_error(pixels: np.ndarray) -> np.ndarray:
    from pipeline.convert_ffcv import encode_jpeg

    trip = np.asarray(Image.open(io.BytesIO(encode_jpeg(pixels, 90).tobytes())).convert("RGB"), np.int16)
    return _quantiles(np.abs(trip - pixels.astype(np.int16)))


def _quantiles(diff: np.ndarray) -> np.ndarray:
    """2^16 quantiles of |differences|: two error budgets add quantile by quantile (a bound on the sum's)."""
    d = np.sort(diff.reshape(-1))
    return d[np.linspace(0, len(d) - 1, 1 << 16).astype(int)]
