"""Convert an image folder (ImageNet layout) or a file list into an FFCV .beton file.

    python -m pipeline.convert_ffcv SRC OUT.beton [--max-resolution 512] [--write-mode jpg] [--jpeg-quality 90]
        [--compress-probability 0.5] [--smart-threshold BYTES] [--no-passthrough] [--workers N] [--subset N]
        [--seed 0] [--force]

Fields: `image` (RGBImageField) and `label` (IntField): FFCV's standard pair, what ffcv-imagenet's write_imagenet.py
writes, so ffcv-imagenet's (or any FFCV) training loop reads the file unchanged: two outputs per batch, every sample
a written image. Instance ids are the ids of `pipeline.dataset.load_index` (sorted relative paths -> 0..N-1), the
same as every other backend's; they live in the manifest beside the .beton (row j = sample j), which is all that
tells our trainer's .beton from a foreign one (`pipeline.beton`: without it, id = sample index).

Every readable image is converted, whatever its quirks (CMYK / grayscale / 16-bit / palette / RGBA, PNG data behind
a .JPEG name, EXIF rotation, 1-pixel or huge images, non-ASCII names): `pipeline.decode.decode_rgb` turns it into
8-bit RGB and we downscale it (longest side <= --max-resolution, cv2 INTER_AREA like ffcv-imagenet) before FFCV
stores it. Files that cannot be decoded are skipped, never fatal, and never shift ids: the manifest gives each sample
its original instance id, so sample index != instance id once something was rejected.

Each image is decoded once (FFCV's own writer decodes every image once too; we used to check every file in a pass
of its own first). Pass 1 reads headers only (size, format, EXIF orientation), in parallel: it rejects files that
do not even open and sizes the .beton's pages. Pass 2 is FFCV's DatasetWriter machinery with our samples:
  * a sample to be stored as JPEG whose source is already a plain JPEG (baseline or progressive, RGB or gray, no
    EXIF rotation) that fits --max-resolution is stored **as the source bytes** (`--passthrough`, default on): no
    decode + re-encode, so no generation loss, and the write costs a 1/8-scale decode by the very decoder the FFCV
    loader uses (libjpeg-turbo through ffcv.libffcv), which proves the loader can decode it;
  * otherwise the image is decoded, resized (cv2 INTER_AREA), and stored as raw pixels or re-encoded (quality
    --jpeg-quality), as FFCV's RGBImageField would. A plain JPEG is decoded by TurboJPEG (the loader's decoder,
    without PIL's overhead: about half the time of PIL's decode of the same file) at the smallest of libjpeg-turbo's
    SIMD scales 1/8, 2/8, 4/8, 8/8 whose output is still twice the target: a source at least 4x the target is
    downscaled in the DCT domain first (`decode_plain_jpeg`); any other file goes through
    `pipeline.decode.decode_rgb` (PIL) with a reduced DCT scale where PIL has one;
  * a file that fails here (its header read, its data did not decode) first holds its slot with a 1x1 placeholder
    (sample count and slots are fixed before the writer starts); once the writer is done, those samples are removed
    from the file (`drop_samples`: the header's count, the metadata rows, the allocation table; no image is
    rewritten), so no reader ever sees one, and the file is listed in the rejects file.
The JPEG-or-raw choice of write-mode proportion is a pure function of (--seed, instance id).

Outputs (written under temporary names, renamed when complete; an existing OUT is kept unless --force):
    OUT.beton                 the data
    OUT.beton.manifest.tsv    instance_id, label, path of the written images in sample order (row j = sample j;
                              InstanceIndex.write_manifest format)
    OUT.beton.rejects.tsv     path, reason, instance_id of the files that were not written ("" id: never had one)
    OUT.beton.json            source, counts, classes and the resolved settings (read by pipeline.beton)

Counts: instances = written + rejected (every id 0..N-1, N as the loader counts it); no rejected instance has a
sample (rejected in pass 1, or in pass 2 and removed: counted in write_rejects). An empty (0-byte) file never gets
an id: it is counted as an empty file, not as an instance, and listed in the rejects file with an empty instance_id.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import json
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from time import sleep

import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from pipeline.dataset import IMAGE_EXTENSIONS, DataError, InstanceIndex, beton_sidecars, load_index
from pipeline.decode import CorruptImageError, decode_rgb
from pipeline.seeding import seed_for

WRITE_MODES = ("raw", "jpg", "proportion", "smart")
MAX_SIDE = 65535  # the .beton stores image width/height as uint16
MIN_PAGE = 8 << 20  # FFCV's default page (4 x 2 MiB)
MAX_PAGE = 1 << 31  # below FFCV's 4 GiB limit (page offsets are uint32 inside a page)
INFO_FORMAT = "pic-ffcv/2"  # 2: fields image + label, ids in the manifest (1: an instance_id field, tombstones)
FIELDS = {"image": "RGBImageField", "label": "IntField"}


@dataclass(frozen=True)
class ConvertSettings:
    max_resolution: int = 512  # longest side in px after downscaling; 0 = keep (up to 65535)
    write_mode: str = "jpg"  # raw | jpg | proportion | smart
    jpeg_quality: int = 90
    compress_probability: float = 0.5  # write_mode=proportion: share of images stored as JPEG
    smart_threshold: int = 3 * 256 * 256  # write_mode=smart: JPEG when the raw pixels exceed this many bytes
    workers: int = 0  # processes for both passes; 0 = all available cores
    chunk_size: int = 100  # samples per FFCV writer work item
    subset: int = 0  # only the first n instances (0 = all)
    seed: int = 0  # makes write_mode=proportion's choice a pure function of (seed, instance id)
    passthrough: bool = True  # store fitting plain JPEGs as their source bytes when a sample is stored as JPEG


sidecar_paths = beton_sidecars  # the names are defined once, in pipeline.dataset


# ---------------------------------------------------------------------------------------------------------------
# image loading (runs in worker processes)
# ---------------------------------------------------------------------------------------------------------------


def fit_size(height: int, width: int, max_resolution: int) -> tuple[int, int]:
    """(h, w) with the longest side <= max_resolution (0 = no limit but the .beton's 65535), aspect kept, >= 1."""
    limit = min(max_resolution or MAX_SIDE, MAX_SIDE)
    longest = max(height, width)
    if longest <= limit:
        return height, width
    r = limit / longest
    return max(1, round(height * r)), max(1, round(width * r))


def scaled_decode_factor(height: int, width: int, target_h: int, target_w: int) -> int:
    """M of the smallest TurboJPEG scale M/8, M in 1, 2, 4, 8 (the scaled IDCTs libjpeg-turbo has SIMD code for;
    3/8, 5/8, ... are plain C, slower than a full decode here), whose output is still at least twice the target:
    INTER_AREA then averages 2x2 or more decoded pixels per output pixel, as the full decode's path did. (Scaled
    all the way down to the target, the DCT-domain downscale differed from area averaging by 3-8 levels on average
    on the sample photos: beyond a JPEG round trip's error.)"""
    for m in (1, 2, 4):
        if (height * m + 7) // 8 >= 2 * target_h and (width * m + 7) // 8 >= 2 * target_w:
            return m
    return 8


def decode_plain_jpeg(data: np.ndarray, height: int, width: int, max_resolution: int) -> np.ndarray:
    """A plain JPEG's bytes (see SourceInfo.plain_jpeg) -> uint8 [H,W,3] RGB, longest side <= max_resolution:
    TurboJPEG decodes at the scale `scaled_decode_factor` picks, cv2 INTER_AREA does the rest. Raises
    CorruptImageError where TurboJPEG refuses the file (it also refuses files libjpeg only warns about: the caller
    lets PIL decide)."""
    import cv2
    from ffcv.libffcv import imdecode

    th, tw = fit_size(height, width, max_resolution)
    m = scaled_decode_factor(height, width, th, tw)
    dst = np.empty(((height * m + 7) // 8, (width * m + 7) // 8, 3), np.uint8)
    if imdecode(data, dst, height, width, height, width, 0, 0, m, 8, False, False) != 0:
        raise CorruptImageError("TurboJPEG (FFCV's decoder) cannot decode it")
    if dst.shape[:2] != (th, tw):
        dst = cv2.resize(dst, (tw, th), interpolation=cv2.INTER_AREA)
    return dst


def load_for_beton(path: str, max_resolution: int) -> np.ndarray:
    """Decode any accepted file -> uint8 [H,W,3] (RGB, EXIF-upright), longest side <= max_resolution.

    JPEGs much larger than the target decode at a reduced DCT scale first (`draft`, kept >= 2x the target so the
    final INTER_AREA step still averages several pixels: the same trick as PIL's `thumbnail`).
    """
    import cv2

    draft = (2 * max_resolution, 2 * max_resolution) if max_resolution else None
    img = decode_rgb(path, draft_size=draft)
    a = np.asarray(img, dtype=np.uint8)
    h, w = a.shape[:2]
    th, tw = fit_size(h, w, max_resolution)
    if (th, tw) != (h, w):
        a = cv2.resize(a, (tw, th), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(a.reshape(th, tw, 3))


@dataclass(frozen=True)
class SourceInfo:
    """What pass 1 learns from a file's header."""

    height: int
    width: int
    nbytes: int  # file size
    plain_jpeg: bool  # a JPEG that libjpeg-turbo decodes to the same upright RGB as decode_rgb (passthrough-able)


def scan_image(item: tuple[int, str]) -> tuple[int, str, SourceInfo | None]:
    """(id, path) -> (id, reason or "", header facts). Pool worker of pass 1: header only, no pixel decode."""
    from PIL import Image

    iid, path = item
    try:
        nbytes = os.stat(path).st_size
        with Image.open(path) as im:
            w, h = im.size
            # CMYK/YCCK (TurboJPEG cannot decode them to RGB), EXIF-rotated, MPO and 12-bit JPEGs take the decode path
            plain = (im.format == "JPEG" and im.mode in ("RGB", "L")
                     and im.getexif().get(_ORIENTATION, 1) == 1)
    except Exception as e:  # noqa: BLE001 - not an image, vanished, unreadable header: reject it, never stop the run
        return iid, f"{type(e).__name__}: {e}", None
    if h < 1 or w < 1:
        return iid, f"empty image ({w}x{h})", None
    return iid, "", SourceInfo(h, w, nbytes, plain)


_ORIENTATION = 0x0112


@dataclass(frozen=True)
class EncodedJPEG:
    """A sample to store as JPEG: its bytes and the size they decode to."""

    data: np.ndarray  # uint8 [nbytes]
    height: int
    width: int


PLACEHOLDER = np.zeros((1, 1, 3), np.uint8)  # holds the slot of a file that failed in pass 2, until drop_samples


def verify_jpeg(data: np.ndarray, height: int, width: int) -> None:
    """Raise CorruptImageError unless FFCV's decoder (TurboJPEG, what the loader will run) decodes `data` cleanly
    (a file that fails here is not rejected for it: the caller decodes it with PIL and re-encodes it).

    At 1/8 scale: the whole entropy-coded stream is still read, so truncation or corruption fails (TurboJPEG returns
    an error on libjpeg warnings too), at about half the cost of a full decode.
    """
    from ffcv.libffcv import imdecode

    dst = np.empty(((height + 7) // 8, (width + 7) // 8, 3), np.uint8)
    if imdecode(data, dst, height, width, height, width, 0, 0, 1, 8, False, False) != 0:
        raise CorruptImageError("TurboJPEG (FFCV's decoder) cannot decode it")


def encode_jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """RGB uint8 [H,W,3] -> JPEG bytes, as FFCV's RGBImageField encodes (OpenCV, libjpeg-turbo)."""
    import cv2

    ok, out = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [int(cv2.IMWRITE_JPEG_QUALITY), quality])
    if not ok:
        raise ValueError("OpenCV could not encode the image as JPEG")
    return out.reshape(-1)


class BetonSource:
    """Indexable data set for FFCV's DatasetWriter: j -> (sample image, label).

    `ids[j]` is the instance id of sample j (only images whose header was read are listed, so sample indices are
    contiguous while instance ids keep their gaps). The sample image is raw pixels (uint8 [H,W,3]) or an
    `EncodedJPEG`, as `BetonImageEncoder` stores it. A file that fails to decode here becomes a placeholder
    (PLACEHOLDER, -1), removed after the write, and a line `id<TAB>reason` appended to `late_rejects` (one O_APPEND
    write: atomic between the writer's processes).
    """

    def __init__(self, index: InstanceIndex, ids: np.ndarray, infos: dict[int, SourceInfo],
                 settings: ConvertSettings, late_rejects: Path):
        self.index, self.ids, self.infos, self.settings = index, ids, infos, settings
        self.late_rejects = late_rejects

    def __len__(self) -> int:
        return len(self.ids)

    def _as_jpeg(self, iid: int, info: SourceInfo) -> bool:
        """Whether sample `iid` is stored as JPEG (FFCV's rule for the write mode; proportion: seeded per id)."""
        mode = self.settings.write_mode
        if mode == "proportion":
            return bool(np.random.default_rng(seed_for(self.settings.seed, iid)).random()
                        < self.settings.compress_probability)
        if mode == "smart":
            h, w = fit_size(info.height, info.width, self.settings.max_resolution)
            return 3 * h * w > self.settings.smart_threshold
        return mode == "jpg"

    def sample(self, iid: int) -> np.ndarray | EncodedJPEG:
        info, st = self.infos[iid], self.settings
        path = self.index.abspath(iid)
        as_jpeg = self._as_jpeg(iid, info)
        fits = fit_size(info.height, info.width, st.max_resolution) == (info.height, info.width)
        image = None
        if info.plain_jpeg:
            data = np.fromfile(path, dtype=np.uint8)
            try:
                if as_jpeg and st.passthrough and fits:
                    verify_jpeg(data, info.height, info.width)
                    return EncodedJPEG(data, info.height, info.width)
                image = decode_plain_jpeg(data, info.height, info.width, st.max_resolution)
            except CorruptImageError:
                pass  # TurboJPEG also fails on mere libjpeg warnings (e.g. extraneous bytes): let PIL decide below
        if image is None:
            image = load_for_beton(path, st.max_resolution)
        if as_jpeg:
            return EncodedJPEG(encode_jpeg(image, st.jpeg_quality), *image.shape[:2])
        return image

    def __getitem__(self, j: int) -> tuple[np.ndarray | EncodedJPEG, int]:
        iid = int(self.ids[j])
        try:
            return self.sample(iid), int(self.index.labels[iid])
        except (CorruptImageError, OSError, ValueError) as e:  # ValueError: cv2 / PIL on absurd data
            reason = str(e).removeprefix(f"{self.index.abspath(iid)}: ").replace("\t", " ").replace("\n", " ")
            fd = os.open(self.late_rejects, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, f"{iid}\t{reason}\n".encode())
            finally:
                os.close(fd)
            return PLACEHOLDER, -1


def read_late_rejects(path: Path) -> dict[int, str]:
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        iid, _, reason = line.partition("\t")
        out[int(iid)] = reason
    return out


# ---------------------------------------------------------------------------------------------------------------
# progress display
# ---------------------------------------------------------------------------------------------------------------


class _RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} img/s" if speed else "", style="progress.data.speed")


def make_progress(console: Console) -> Progress:
    """A progress display without a refresh thread (we fork worker processes while it is shown, and forking a
    process that has other threads running can deadlock the child): the polling loops call `refresh()`."""
    return Progress(TextColumn("{task.description:<9}"), BarColumn(), MofNCompleteColumn(), _RateColumn(),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
                    auto_refresh=False)


# ---------------------------------------------------------------------------------------------------------------
# pass 1: scan headers
# ---------------------------------------------------------------------------------------------------------------


def scan_all(index: InstanceIndex, workers: int, progress: Progress, meanwhile=None
             ) -> tuple[dict[int, str], dict[int, SourceInfo]]:
    """Read every instance's header in parallel. Returns ({id: reason} of the rejects, {id: SourceInfo}).
    `meanwhile()` runs in this process while the pool's workers scan (the writer's imports: seconds of one core)."""
    items = [(i, index.abspath(i)) for i in range(len(index))]
    task = progress.add_task("scanning", total=len(items))
    rejects: dict[int, str] = {}
    infos: dict[int, SourceInfo] = {}

    def consume(results) -> None:
        shown = 0.0
        for iid, reason, info in results:
            if reason:
                rejects[iid] = reason
            else:
                infos[iid] = info
            progress.advance(task)
            if time.monotonic() - shown > 0.1:
                progress.refresh()
                shown = time.monotonic()
        progress.refresh()

    if workers <= 1:
        if meanwhile is not None:
            meanwhile()
        consume(map(scan_image, items))
    else:
        with mp.get_context("fork").Pool(workers) as pool:
            results = pool.imap_unordered(scan_image, items, chunksize=max(1, min(256, len(items) // (8 * workers))))
            if meanwhile is not None:
                meanwhile()
            consume(results)
    return rejects, infos


def import_writer() -> None:
    """What pass 2 needs: FFCV's writer (which imports torch and numba: seconds), its decoder, OpenCV."""
    import cv2  # noqa: F401
    import ffcv.fields  # noqa: F401
    import ffcv.libffcv  # noqa: F401
    import ffcv.writer  # noqa: F401


def page_size_for(infos: Iterable[SourceInfo], settings: ConvertSettings) -> int:
    """A power-of-two FFCV page that holds the largest sample: raw pixels, a re-encoded JPEG (noise can exceed its
    raw size: x2) or a passed-through source file."""
    need = 1
    for info in infos:
        h, w = fit_size(info.height, info.width, settings.max_resolution)
        need = max(need, 2 * 3 * h * w, info.nbytes if info.plain_jpeg and settings.passthrough else 0)
    if need > MAX_PAGE:
        raise DataError(f"a sample needs {need:,} B; lower --max-resolution (FFCV pages hold at most {MAX_PAGE:,} B)")
    return max(MIN_PAGE, 1 << (need - 1).bit_length())


# ---------------------------------------------------------------------------------------------------------------
# pass 2: write
# ---------------------------------------------------------------------------------------------------------------


def _image_encoder():
    """An RGBImageField whose `encode` stores our prepared samples (raw pixels or `EncodedJPEG`) as they are.

    Only the writer's workers use it; the .beton's header names the plain RGBImageField (FFCV records a field by its
    exact class, and the loader needs nothing else: the metadata and data layout are RGBImageField's own).
    """
    from ffcv.fields import RGBImageField
    from ffcv.fields.rgb_image import IMAGE_MODES

    class BetonImageEncoder(RGBImageField):
        def encode(self, destination, image, malloc):
            if isinstance(image, EncodedJPEG):
                destination["mode"] = IMAGE_MODES["jpg"]
                destination["height"], destination["width"] = image.height, image.width
                destination["data_ptr"], storage = malloc(image.data.nbytes)
                storage[:] = image.data
                return
            destination["mode"] = IMAGE_MODES["raw"]
            destination["height"], destination["width"] = image.shape[:2]
            destination["data_ptr"], storage = malloc(image.nbytes)
            storage[:] = np.ascontiguousarray(image).reshape(-1)

    return BetonImageEncoder()


def _make_writer(path: str, fields: dict, page_size: int, workers: int, progress: Progress):
    """FFCV's DatasetWriter with a rich progress bar, failure detection, and our image encoder in the workers.

    Upstream `_write_common` polls a shared counter until every sample is done: if a worker dies (an exception in
    `__getitem__`, a sample larger than a page) it waits forever, and its peers spin on the page lock. This copy of
    that loop stops, kills the workers and raises instead.
    """
    from ffcv.memory_allocator import MemoryAllocator
    from ffcv.writer import DatasetWriter

    class ProgressDatasetWriter(DatasetWriter):
        def _write_common(self, num_samples, queue_content, work_fn, extra_worker_args):
            self.num_samples = num_samples
            self.prepare()
            try:
                allocations = self._run_workers(queue_content, work_fn, extra_worker_args)
                self.finalize(allocations)
            finally:
                self.metadata_sm.close()
                self.metadata_sm.unlink()

        def _run_workers(self, queue_content, work_fn, extra_worker_args) -> list:
            ctx = mp.get_context("fork")  # the writer's workers inherit the data set object, as upstream
            workqueue, allocations_queue = ctx.Queue(), ctx.Queue()
            for todo in queue_content:
                workqueue.put(todo)
            for _ in range(self.num_workers):
                workqueue.put(None)
            done = ctx.Value(ctypes.c_uint64, 0)
            allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
            encoders = {k: (_image_encoder() if k == "image" else f) for k, f in self.fields.items()}
            args = (workqueue, self.metadata_sm, self.metadata_type, encoders, allocator, done, allocations_queue,
                    *extra_worker_args)
            procs = [ctx.Process(target=work_fn, args=args, daemon=True) for _ in range(self.num_workers)]
            for p in procs:
                p.start()
            task = progress.add_task("writing", total=self.num_samples)
            try:
                while done.value < self.num_samples:
                    failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                    # (re-read the counter: workers bump it before they exit)
                    if failed or (all(p.exitcode == 0 for p in procs) and done.value < self.num_samples):
                        raise RuntimeError(f"an FFCV writer worker failed (exit codes {failed or [0]}); "
                                           "its traceback is printed above")
                    progress.update(task, completed=done.value)
                    progress.refresh()
                    sleep(0.05)
                progress.update(task, completed=self.num_samples)
                progress.refresh()
                # one allocation list per worker, sent when it has flushed its last page
                allocations = [a for _ in procs for a in allocations_queue.get(timeout=600)]
                for p in procs:
                    p.join()
                return allocations
            finally:
                for p in procs:
                    if p.is_alive():
                        p.terminate()

    return ProgressDatasetWriter(path, fields, page_size=page_size, num_workers=workers)


def write_beton(path: str, source: BetonSource, settings: ConvertSettings, page_size: int, workers: int,
                progress: Progress) -> None:
    import cv2
    from ffcv.fields import IntField, RGBImageField

    # one thread per writer process for OpenCV's resize and encode: the processes already fill the cores, and
    # OpenCV's own pool per process (one thread per core each) made them wait on each other
    cv2.setNumThreads(1)

    # the header's fields (what the loader reads back); the workers store BetonSource's prepared samples
    fields = {"image": RGBImageField(write_mode=settings.write_mode, max_resolution=None,
                                     jpeg_quality=settings.jpeg_quality), "label": IntField()}
    writer = _make_writer(path, fields, page_size, workers, progress)
    writer.from_indexed_dataset(source, chunksize=settings.chunk_size)


def drop_samples(path: str | os.PathLike, drop: np.ndarray) -> None:
    """Remove samples from a .beton in place (FFCV 1.0.2's format): the header's sample count, their metadata rows
    (the rest move up) and their allocation-table entries (the rest renumbered). Image data is addressed by absolute
    file offsets, so nothing else moves; the removed samples' bytes stay unreferenced in their pages (a 1x1
    placeholder: 3 bytes each). O(samples) in the metadata, no image decoded or copied."""
    from ffcv.types import ALLOC_TABLE_TYPE, FieldDescType, HeaderType, get_handlers, get_metadata_type

    header = np.fromfile(path, dtype=HeaderType, count=1)[0].copy()
    n = int(header["num_samples"])
    desc = np.fromfile(path, dtype=FieldDescType, count=int(header["num_fields"]), offset=HeaderType.itemsize)
    meta_at = HeaderType.itemsize + desc.nbytes
    meta = np.fromfile(path, dtype=get_metadata_type(get_handlers(desc)), count=n, offset=meta_at)
    alloc = np.fromfile(path, dtype=ALLOC_TABLE_TYPE, offset=int(header["alloc_table_ptr"]))
    keep = np.ones(n, bool)
    keep[np.asarray(drop, np.int64)] = False
    new_index = np.cumsum(keep) - 1
    alloc = alloc[keep[alloc["sample_id"].astype(np.int64)]]
    alloc["sample_id"] = new_index[alloc["sample_id"].astype(np.int64)]
    header["num_samples"] = int(keep.sum())
    with open(path, "r+b") as f:
        f.seek(meta_at)
        f.write(meta[keep].tobytes())
        f.seek(int(header["alloc_table_ptr"]))
        f.write(alloc.tobytes())
        f.truncate()
        f.seek(0)
        f.write(header.tobytes())


# ---------------------------------------------------------------------------------------------------------------
# the conversion
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ConvertReport:
    out: str
    source: str
    num_instances: int  # ids 0..num_instances-1 (after --subset); the N of a training run on the .beton
    written: int
    # instances (they have an id) that could not be decoded: num_instances = written + rejected. Training on the
    # .beton replaces each of them (the FFCV loader's bad files); none has a sample (pass 2's removed)
    rejected: int
    write_rejects: int  # rejected in pass 2 (header read, data not decodable): their samples removed after the write
    drop_seconds: float  # removing those samples (0 when there were none)
    empty_files: int  # 0-byte files with an image name: no instance id (load_index skips them), not in num_instances
    skipped_non_images: int  # files whose name is not an image extension
    bytes: int  # file size (FFCV pads each writer process's last page)
    payload_bytes: int  # stored image/field data
    workers: int
    seconds: float
    scan_seconds: float  # pass 1 (headers)
    write_seconds: float
    page_size: int


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def write_rejects(path: Path, index: InstanceIndex, rejects: dict[int, str], empty: list[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(("path", "reason", "instance_id"))
        for iid in sorted(rejects):
            w.writerow((index.paths[iid], rejects[iid], iid))
        for p in empty:
            w.writerow((p, "empty file (skipped while scanning: no instance id)", ""))


def _commit(tmp_to_final: list[tuple[Path, Path]]) -> None:
    """Rename the sidecars first and the .beton last: a .beton that exists is always complete and described."""
    for tmp, final in tmp_to_final:
        os.replace(tmp, final)


def convert(src: str, out: str, settings: ConvertSettings, force: bool = False, root: str | None = None,
            console: Console | None = None) -> ConvertReport:
    """Convert SRC into OUT (see the module docstring). Raises DataError for bad input (one-line messages)."""
    console = console or Console(stderr=True)
    out_p = Path(out)
    if settings.write_mode not in WRITE_MODES:
        raise DataError(f"--write-mode must be one of {', '.join(WRITE_MODES)}, got {settings.write_mode!r}")
    if not 0 <= settings.max_resolution <= MAX_SIDE:
        raise DataError(f"--max-resolution must be in [0, {MAX_SIDE}], got {settings.max_resolution}")
    if not 1 <= settings.jpeg_quality <= 100:
        raise DataError(f"--jpeg-quality must be in [1, 100], got {settings.jpeg_quality}")
    if not 0.0 <= settings.compress_probability <= 1.0:
        raise DataError(f"--compress-probability must be in [0, 1], got {settings.compress_probability}")
    if not Path(src).exists():
        raise DataError(f"source does not exist: {src}")
    if out_p.exists() and not force:
        raise DataError(f"output exists: {out_p} (use --force to overwrite)")
    if out_p.is_dir():
        raise DataError(f"output is a folder: {out_p}")
    out_p.parent.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    index = load_index(src, root)
    if settings.subset:
        index = index.subset(settings.subset)
    empty = [p for p in index.skipped if p.lower().endswith(IMAGE_EXTENSIONS)]  # image names, 0 bytes
    workers = settings.workers or default_workers()
    sidecars = sidecar_paths(out_p)
    tag = f".tmp-{os.getpid()}"
    tmp = {k: Path(f"{p}{tag}") for k, p in {**sidecars, "beton": out_p, "late": Path(f"{out_p}.late")}.items()}
    try:
        with make_progress(console) as progress:
            rejects, infos = scan_all(index, workers, progress, meanwhile=import_writer)
            t1 = time.perf_counter()
            ids = np.array(sorted(infos), dtype=np.int64)
            if len(ids) == 0:
                write_rejects(tmp["rejects"], index, rejects, empty)
                os.replace(tmp["rejects"], sidecars["rejects"])
                raise DataError(f"no image under {src} could be decoded; reasons in {sidecars['rejects']}")
            page_size = page_size_for(infos.values(), settings)
            source = BetonSource(index, ids, infos, settings, tmp["late"])
            write_beton(str(tmp["beton"]), source, settings, page_size, min(workers, len(ids)), progress)
        t2 = time.perf_counter()
        late = read_late_rejects(tmp["late"])  # header read, data not decodable: placeholders in the .beton
        rejects.update(late)
        write_rejects(tmp["rejects"], index, rejects, empty)
        placeholders = np.isin(ids, np.fromiter(late, np.int64, len(late)))
        t_drop = time.perf_counter()
        if placeholders.any():
            drop_samples(tmp["beton"], np.flatnonzero(placeholders))
        t_drop = time.perf_counter() - t_drop if placeholders.any() else 0.0
        written = ids[~placeholders]
        index.write_manifest(tmp["manifest"], written)  # row j = sample j
        report = ConvertReport(
            out=str(out_p), source=str(Path(index.root).resolve()), num_instances=len(index), written=len(written),
            rejected=len(rejects), write_rejects=len(late), drop_seconds=t_drop, empty_files=len(empty),
            skipped_non_images=len(index.skipped) - len(empty), bytes=tmp["beton"].stat().st_size,
            payload_bytes=_payload_bytes(tmp["beton"]),
            workers=workers, seconds=t2 - t0, scan_seconds=t1 - t0, write_seconds=t2 - t1, page_size=page_size)
        _write_info(tmp["info"], report, index, {**asdict(settings), "workers": workers})
        _commit([(tmp["manifest"], sidecars["manifest"]), (tmp["rejects"], sidecars["rejects"]),
                 (tmp["info"], sidecars["info"]), (tmp["beton"], out_p)])
        return report
    finally:
        for p in tmp.values():
            p.unlink(missing_ok=True)


def _payload_bytes(beton: Path) -> int:
    from ffcv.reader import Reader

    return int(Reader(str(beton)).alloc_table["size"].sum())


def _write_info(path: Path, report: ConvertReport, index: InstanceIndex, settings: dict) -> None:
    import importlib.metadata

    info = {
        "format": INFO_FORMAT,
        "ffcv_version": importlib.metadata.version("ffcv"),
        "fields": FIELDS,
        "samples": "row j of the manifest is sample j",
        **{k: v for k, v in asdict(report).items() if k != "out"},
        "classes": list(index.classes),
        "settings": settings,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path.write_text(json.dumps(info, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def print_summary(report: ConvertReport, settings: ConvertSettings, console: Console) -> None:
    t = Table(title=f"FFCV conversion: {report.out}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    for k, v in {**asdict(settings), "workers": report.workers}.items():
        t.add_row(k.replace("_", "-"), str(v))
    t.add_row("page size", f"{report.page_size >> 20} MiB")
    t.add_section()
    t.add_row("source", report.source)
    listed = f"listed in {sidecar_paths(report.out)['rejects'].name}"
    t.add_row("instances", f"{report.num_instances:,} = {report.written:,} written + {report.rejected:,} rejected "
                           f"(ids 0..N-1: the N a training run on this .beton counts)")
    t.add_row("written", f"{report.written:,}")
    rej = f"{report.rejected:,}"
    if report.rejected:
        # none has a sample; each is a bad file of a run on the .beton
        rej += (f" could not be decoded ({report.rejected - report.write_rejects:,} at the header scan, "
                f"{report.write_rejects:,} while writing: their samples removed in {report.drop_seconds:.3f} s); "
                f"no sample holds them; training replaces each; {listed}")
    t.add_row("rejected", rej)
    if report.empty_files:
        t.add_row("empty files", f"{report.empty_files:,} (0 bytes: no instance id, not counted in instances; "
                                 f"{listed})")
    t.add_row("skipped non-images", f"{report.skipped_non_images:,}")
    t.add_row("output size", f"{report.bytes / 2**20:,.1f} MiB; image data {report.payload_bytes / 2**20:,.1f} MiB "
                             f"({report.payload_bytes / max(report.written, 1) / 1024:.1f} KiB/image)")
    t.add_row("time", f"{report.seconds:.1f} s (scan {report.scan_seconds:.1f} s, write "
                      f"{report.write_seconds:.1f} s)")
    t.add_row("speed", f"{report.written / max(report.seconds, 1e-9):,.0f} images/s")
    console.print(t)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, ConvertSettings]:
    d = ConvertSettings()
    ap = argparse.ArgumentParser(prog="python -m pipeline.convert_ffcv",
                                 description="Convert an image folder or file list into an FFCV .beton.")
    ap.add_argument("src", help="ImageNet-layout folder (root/<class>/<image>) or a file list / manifest TSV")
    ap.add_argument("out", help="output .beton path")
    ap.add_argument("--root", default=None, help="folder the file list's paths are relative to (default: its folder)")
    ap.add_argument("--max-resolution", type=int, default=d.max_resolution,
                    help="downscale so that the longest side is at most this (px); 0 = keep")
    ap.add_argument("--write-mode", choices=WRITE_MODES, default=d.write_mode,
                    help="raw pixels, JPEG, a random proportion as JPEG, or smart (JPEG above --smart-threshold)")
    ap.add_argument("--jpeg-quality", type=int, default=d.jpeg_quality)
    ap.add_argument("--compress-probability", type=float, default=d.compress_probability,
                    help="write-mode proportion: fraction stored as JPEG")
    ap.add_argument("--smart-threshold", type=int, default=d.smart_threshold,
                    help="write-mode smart: store as JPEG when the raw pixels take more bytes than this")
    ap.add_argument("--passthrough", action=argparse.BooleanOptionalAction, default=d.passthrough,
                    help="store a fitting plain JPEG's own bytes when the sample is stored as JPEG (no re-encode)")
    ap.add_argument("--workers", type=int, default=d.workers, help="processes (0 = all cores)")
    ap.add_argument("--chunk-size", type=int, default=d.chunk_size, help="samples per writer work item")
    ap.add_argument("--subset", type=int, default=d.subset, help="only the first N instances (quick trials)")
    ap.add_argument("--seed", type=int, default=d.seed, help="seed of write-mode proportion's choice")
    ap.add_argument("--force", action="store_true", help="overwrite an existing output")
    a = ap.parse_args(argv)
    settings = ConvertSettings(max_resolution=a.max_resolution, write_mode=a.write_mode, jpeg_quality=a.jpeg_quality,
                               compress_probability=a.compress_probability, smart_threshold=a.smart_threshold,
                               workers=a.workers, chunk_size=a.chunk_size, subset=a.subset, seed=a.seed,
                               passthrough=a.passthrough)
    return a, settings


def main(argv: list[str] | None = None) -> int:
    args, settings = parse_args(argv)
    # Errors go out with plain print: rich would wrap a long path over several lines.
    import importlib.util

    if importlib.util.find_spec("ffcv") is None:  # found, not imported: the scan starts before FFCV (and torch) load
        print("error: the ffcv package is not installed; `make setup` installs it (apt: pkg-config "
              "libturbojpeg0-dev libopencv-dev, then pip install ffcv)", file=sys.stderr)
        return 2
    try:
        report = convert(args.src, args.out, settings, force=args.force, root=args.root,
                         console=Console(stderr=True))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # a writer worker died (its traceback is above); nothing was written
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    print_summary(report, settings, Console())
    return 0


if __name__ == "__main__":
    sys.exit(main())
