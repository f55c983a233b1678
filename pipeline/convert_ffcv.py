"""Convert an image folder (ImageNet layout) or a file list into an FFCV .beton file.

    python -m pipeline.convert_ffcv SRC OUT.beton [--max-resolution 512] [--write-mode jpg] [--jpeg-quality 90]
        [--compress-probability 0.5] [--smart-threshold BYTES] [--workers N] [--subset N] [--seed 0] [--force]

Fields: `image` (RGBImageField), `instance_id` (IntField), `label` (IntField). Instance ids are the ids of
`pipeline.dataset.load_index` (sorted relative paths -> 0..N-1), the same as every other backend's.

Every readable image is converted, whatever its quirks (CMYK / grayscale / 16-bit / palette / RGBA, PNG data behind
a .JPEG name, EXIF rotation, 1-pixel or huge images, non-ASCII names): `pipeline.decode.decode_rgb` turns it into
8-bit RGB and we downscale it (longest side <= --max-resolution, cv2 INTER_AREA like ffcv-imagenet) before FFCV
stores it. Files that cannot be decoded are skipped, never fatal, and never shift ids: the .beton holds N - rejects
samples, each with its original `instance_id`, so sample index != instance id once something was rejected.

Two passes: (1) parallel check that every file decodes (JPEGs at 1/8 DCT scale, which still reads the whole
entropy-coded stream, so truncation is caught cheaply); (2) FFCV's DatasetWriter (worker processes) writes the good
ones. A file that breaks between the passes aborts the run (the output is then not created).

Outputs (written under temporary names, renamed when complete; an existing OUT is kept unless --force):
    OUT.beton                 the data
    OUT.beton.manifest.tsv    instance_id, label, path of the written images (InstanceIndex.write_manifest format)
    OUT.beton.rejects.tsv     path, reason, instance_id of the files that were not written ("" id: never had one)
    OUT.beton.json            source, counts, classes and the resolved settings (read by ffcv_backend.ffcv_index)
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import json
import math
import multiprocessing as mp
import os
import sys
import time
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

from pipeline.augment import seed_for
from pipeline.dataset import IMAGE_EXTENSIONS, DataError, InstanceIndex, beton_sidecars, load_index
from pipeline.decode import CorruptImageError, decode_rgb

WRITE_MODES = ("raw", "jpg", "proportion", "smart")
MAX_SIDE = 65535  # the .beton stores image width/height as uint16
MIN_PAGE = 8 << 20  # FFCV's default page (4 x 2 MiB)
MAX_PAGE = 1 << 31  # below FFCV's 4 GiB limit (page offsets are uint32 inside a page)
INFO_FORMAT = "pic-ffcv/1"


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


def check_image(item: tuple[int, str]) -> tuple[int, str, int]:
    """(id, path) -> (id, reason or "", full-size pixel count). Pool worker of pass 1."""
    from PIL import Image

    iid, path = item
    try:
        # 1/8 DCT scale for JPEGs: 5-10x cheaper than a full decode, and truncation still raises.
        decode_rgb(path, draft_size=(1, 1))
        with Image.open(path) as im:  # header only: the full size bounds the bytes the writer will need
            w, h = im.size
    except CorruptImageError as e:
        return iid, str(e).removeprefix(f"{path}: "), 0
    except Exception as e:  # noqa: BLE001 - vanished/unreadable file, decoder bug: reject it, never stop the run
        return iid, f"{type(e).__name__}: {e}", 0
    return iid, "", h * w


class BetonSource:
    """Indexable data set for FFCV's DatasetWriter: j -> (image uint8 [H,W,3], instance id, label).

    `ids[j]` is the instance id of sample j; only images that passed the check are listed, so sample indices are
    contiguous while instance ids keep their gaps.
    """

    def __init__(self, index: InstanceIndex, ids: np.ndarray, max_resolution: int, seed: int):
        self.index, self.ids, self.max_resolution, self.seed = index, ids, max_resolution, seed

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, j: int) -> tuple[np.ndarray, int, int]:
        iid = int(self.ids[j])
        path = self.index.abspath(iid)
        try:
            image = load_for_beton(path, self.max_resolution)
        except (CorruptImageError, OSError) as e:
            raise RuntimeError(f"{path} decoded in the check pass but not now (changed during conversion?): {e}") \
                from e
        # RGBImageField(write_mode="proportion") draws np.random.rand() right after this call, in this process:
        # seeding here makes the JPEG/raw choice a pure function of (seed, id), not of the worker it landed on.
        np.random.seed(seed_for(self.seed, iid) & 0xFFFFFFFF)
        return image, iid, int(self.index.labels[iid])


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
# pass 1: check
# ---------------------------------------------------------------------------------------------------------------


def check_all(index: InstanceIndex, workers: int, progress: Progress) -> tuple[dict[int, str], int]:
    """Decode-check every instance in parallel. Returns ({id: reason} of the rejects, largest pixel count)."""
    items = [(i, index.abspath(i)) for i in range(len(index))]
    task = progress.add_task("checking", total=len(items))
    rejects: dict[int, str] = {}
    largest = 1

    def consume(results) -> None:
        nonlocal largest
        shown = 0.0
        for iid, reason, pixels in results:
            if reason:
                rejects[iid] = reason
            largest = max(largest, pixels)
            progress.advance(task)
            if time.monotonic() - shown > 0.1:
                progress.refresh()
                shown = time.monotonic()
        progress.refresh()

    if workers <= 1:
        consume(map(check_image, items))
    else:
        with mp.get_context("fork").Pool(workers) as pool:
            consume(pool.imap_unordered(check_image, items, chunksize=max(1, min(64, len(items) // (8 * workers)))))
    return rejects, largest


def page_size_for(largest_pixels: int, settings: ConvertSettings) -> int:
    """A power-of-two FFCV page that holds the largest sample (a JPEG of noise can exceed its raw size: x2)."""
    side = math.isqrt(largest_pixels) + 1
    h, w = fit_size(side, side, settings.max_resolution)
    need = 2 * 3 * h * w
    if need > MAX_PAGE:
        raise DataError(f"images up to {largest_pixels:,} px need {need:,} B per sample; "
                        f"lower --max-resolution (FFCV pages hold at most {MAX_PAGE:,} B)")
    return max(MIN_PAGE, 1 << (need - 1).bit_length())


# ---------------------------------------------------------------------------------------------------------------
# pass 2: write
# ---------------------------------------------------------------------------------------------------------------


def _make_writer(path: str, fields: dict, page_size: int, workers: int, progress: Progress):
    """FFCV's DatasetWriter with a rich progress bar and failure detection.

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
            args = (workqueue, self.metadata_sm, self.metadata_type, self.fields, allocator, done, allocations_queue,
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


def write_beton(path: str, index: InstanceIndex, ids: np.ndarray, settings: ConvertSettings, page_size: int,
                workers: int, progress: Progress) -> None:
    from ffcv.fields import IntField, RGBImageField

    fields = {
        # max_resolution=None: we already downscaled (FFCV's own resizer can round a side down to 0 px).
        "image": RGBImageField(write_mode=settings.write_mode, max_resolution=None,
                               smart_threshold=settings.smart_threshold, jpeg_quality=settings.jpeg_quality,
                               compress_probability=settings.compress_probability),
        "instance_id": IntField(),
        "label": IntField(),
    }
    writer = _make_writer(path, fields, page_size, workers, progress)
    writer.from_indexed_dataset(BetonSource(index, ids, settings.max_resolution, settings.seed),
                                chunksize=settings.chunk_size)


# ---------------------------------------------------------------------------------------------------------------
# the conversion
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ConvertReport:
    out: str
    source: str
    num_instances: int  # ids 0..num_instances-1 (after --subset)
    written: int
    rejected: int  # could not be decoded (have an id) + empty image files (skipped while scanning, no id)
    skipped_non_images: int  # files whose name is not an image extension
    bytes: int  # file size (FFCV pads each writer process's last page)
    payload_bytes: int  # stored image/field data
    workers: int
    seconds: float
    check_seconds: float
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
    tmp = {k: Path(f"{p}{tag}") for k, p in {**sidecars, "beton": out_p}.items()}
    try:
        with make_progress(console) as progress:
            rejects, largest = check_all(index, workers, progress)
            t1 = time.perf_counter()
            ids = np.array([i for i in range(len(index)) if i not in rejects], dtype=np.int64)
            write_rejects(tmp["rejects"], index, rejects, empty)
            if len(ids) == 0:
                os.replace(tmp["rejects"], sidecars["rejects"])
                raise DataError(f"no image under {src} could be decoded; reasons in {sidecars['rejects']}")
            page_size = page_size_for(largest, settings)
            write_beton(str(tmp["beton"]), index, ids, settings, page_size, min(workers, len(ids)), progress)
        t2 = time.perf_counter()
        index.write_manifest(tmp["manifest"], ids)
        report = ConvertReport(
            out=str(out_p), source=str(Path(index.root).resolve()), num_instances=len(index), written=len(ids),
            rejected=len(rejects) + len(empty), skipped_non_images=len(index.skipped) - len(empty),
            bytes=tmp["beton"].stat().st_size, payload_bytes=_payload_bytes(tmp["beton"]), workers=workers,
            seconds=t2 - t0, check_seconds=t1 - t0, write_seconds=t2 - t1,
            page_size=page_size)
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
        "fields": {"image": "RGBImageField", "instance_id": "IntField", "label": "IntField"},
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
    t.add_row("instances", f"{report.num_instances:,}")
    t.add_row("written", f"{report.written:,}")
    rej = f"{report.rejected:,}"
    if report.rejected:
        rej += f"  (listed in {sidecar_paths(report.out)['rejects'].name})"
    t.add_row("rejected", rej)
    t.add_row("skipped non-images", f"{report.skipped_non_images:,}")
    t.add_row("output size", f"{report.bytes / 2**20:,.1f} MiB; image data {report.payload_bytes / 2**20:,.1f} MiB "
                             f"({report.payload_bytes / max(report.written, 1) / 1024:.1f} KiB/image)")
    t.add_row("time", f"{report.seconds:.1f} s (check {report.check_seconds:.1f} s, write "
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
    ap.add_argument("--workers", type=int, default=d.workers, help="processes (0 = all cores)")
    ap.add_argument("--chunk-size", type=int, default=d.chunk_size, help="samples per writer work item")
    ap.add_argument("--subset", type=int, default=d.subset, help="only the first N instances (quick trials)")
    ap.add_argument("--seed", type=int, default=d.seed, help="seed of write-mode proportion's choice")
    ap.add_argument("--force", action="store_true", help="overwrite an existing output")
    a = ap.parse_args(argv)
    settings = ConvertSettings(max_resolution=a.max_resolution, write_mode=a.write_mode, jpeg_quality=a.jpeg_quality,
                               compress_probability=a.compress_probability, smart_threshold=a.smart_threshold,
                               workers=a.workers, chunk_size=a.chunk_size, subset=a.subset, seed=a.seed)
    return a, settings


def main(argv: list[str] | None = None) -> int:
    args, settings = parse_args(argv)
    # Errors go out with plain print: rich would wrap a long path over several lines.
    try:
        import ffcv  # noqa: F401
    except ImportError as e:
        print(f"error: the ffcv package is not installed ({e}); `make setup` installs it (apt: pkg-config "
              f"libturbojpeg0-dev libopencv-dev, then pip install ffcv)", file=sys.stderr)
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
