"""Folder -> .beton conversion speed: our converter against FFCV's own DatasetWriter, side by side.

    python -m benchmarks.bench_convert [--data DIR] [--images 1024] [--max-res 256,512] [--workers 2]
                                       [--repeats 3] [--out DIR]

The reference is what ffcv-imagenet's `write_imagenet.py` does (`benchmarks.ffcv_writer`): torchvision
`ImageFolder` (PIL decode) into `DatasetWriter` with `RGBImageField(write_mode="proportion", compress_probability=0.5,
max_resolution=R, jpeg_quality=90)` and an `IntField` label, chunk size 100. Ours (`python -m pipeline.convert_ffcv`)
runs with the same settings, once as it ships (`passthrough`) and once with `--no-passthrough` (every JPEG-stored
sample re-encoded, as FFCV does). Each conversion is timed as a whole process, as a user runs it (interpreter start,
imports, scan, write); its CPU seconds (user + system, all its processes) are recorded too. Same files, same worker
count, repeats interleaved round-robin over the rows; `vs_ffcv_writer` is the median of the per-repeat ratios of
images/s. The page cache is warm for every row (the folder is read once before timing).
With no --data an ImageNet-like folder is built from real photos (pipeline.sample_data: ~500x375, q90).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.bench_loader import add_idle_wait, paired_ratio, undecodable, wait_until_idle
from benchmarks.common import SCRATCH, Recorder, add_image_folder, bench_parser, image_folder, print_table
from pipeline import backend_unavailable


def ffcv_writer(src: Path, out: Path, max_res: int, workers: int) -> list[str]:
    """The command of ffcv-imagenet's writer recipe (benchmarks.ffcv_writer)."""
    return [sys.executable, "-m", "benchmarks.ffcv_writer", str(src), str(out), "--max-resolution", str(max_res),
            "--workers", str(workers)]


def ours(src: Path, out: Path, max_res: int, workers: int, passthrough: bool) -> list[str]:
    """The command of our converter with the same settings."""
    return [sys.executable, "-m", "pipeline.convert_ffcv", str(src), str(out), "--max-resolution", str(max_res),
            "--write-mode", "proportion", "--compress-probability", "0.5", "--jpeg-quality", "90", "--workers",
            str(workers), "--force", "--passthrough" if passthrough else "--no-passthrough"]


class ConvertRun:
    """One converter at one resolution; `rate()` runs its command once, as a whole process (interpreter start,
    imports, the folder scan and the write: what a user waits for), and returns images/s of wall time."""

    def __init__(self, name: str, fn, src: Path, max_res: int, workers: int, scratch: Path, num_files: int, **kw):
        self.name, self.num_files = name, num_files
        self.out = scratch / f"{name}-{max_res}.beton"
        self.cmd = fn(src, self.out, max_res, workers, **kw)
        self.size = 0
        self.cpu_seconds: list[float] = []

    def rate(self) -> float:
        self.out.unlink(missing_ok=True)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        run = subprocess.run(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             cwd=Path(__file__).resolve().parents[1])
        dt = time.perf_counter() - t
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if run.returncode != 0:
            raise RuntimeError(f"{self.name} failed (exit {run.returncode}): {run.stderr.strip()[-300:]}")
        self.cpu_seconds.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
        self.size = self.out.stat().st_size
        return self.num_files / dt


def build_parser() -> argparse.ArgumentParser:
    ap = bench_parser(__doc__, "python -m benchmarks.bench_convert")
    add_image_folder(ap)
    ap.add_argument("--max-res", default="256,512", help="max resolutions, comma-separated (ffcv-imagenet: 256-512)")
    ap.add_argument("--workers", type=int, default=2, help="writer processes of both converters")
    ap.add_argument("--repeats", type=int, default=3, help="conversions per row, interleaved round-robin")
    add_idle_wait(ap)
    return ap


def decodable_files(src: Path, workers: int) -> list[str]:
    """The folder's image files, read once (every row then reads them from the page cache); refused in one line
    when one does not decode: FFCV's own writer waits forever for a worker that died on it."""
    from pipeline.dataset import IMAGE_EXTENSIONS

    files = sorted(str(p) for p in src.rglob("*") if p.is_file() and p.name.lower().endswith(IMAGE_EXTENSIONS))
    bad = undecodable(files, workers)
    if bad:
        raise ValueError(f"{len(bad)} file(s) of {src} do not decode (e.g. {bad[0]}); FFCV's own writer hangs on "
                         "them: benchmark a folder where every image decodes")
    for f in files:
        Path(f).read_bytes()
    return files


def fill_rates(rows: list[dict], runs: list[ConvertRun], rates: list[list[float]]) -> None:
    """Each row's median rate, output size and paired ratio to FFCV's writer at the same resolution."""
    for row, run, rr in zip(rows, runs, rates, strict=True):
        row.update(images_per_second=statistics.median(rr), rates=list(rr), beton_mb=run.size / 2**20,
                   cpu_seconds=list(run.cpu_seconds))
        ref = next(i for i, x in enumerate(rows) if x["converter"] == "ffcv_writer" and x["max_res"] == row["max_res"])
        row["vs_ffcv_writer"] = paired_ratio(rr, rates[ref])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    record = Recorder("bench_convert", args)
    missing = backend_unavailable("ffcv")
    if missing:
        print(f"bench_convert: skipped, {missing}", file=sys.stderr)
        return record.final([{"skipped": missing}])
    src = image_folder(args)
    try:
        num_files = len(decodable_files(src, args.workers))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows: list[dict] = []
    runs: list[ConvertRun] = []
    with tempfile.TemporaryDirectory(dir=SCRATCH.parent if SCRATCH.parent.exists() else None) as tmp:
        scratch = Path(tmp)
        for r in [int(x) for x in args.max_res.split(",") if x.strip()]:
            group = [ConvertRun("ffcv_writer", ffcv_writer, src, r, args.workers, scratch, num_files),
                     ConvertRun("ours", ours, src, r, args.workers, scratch, num_files, passthrough=True),
                     ConvertRun("ours_no_passthrough", ours, src, r, args.workers, scratch, num_files,
                                passthrough=False)]
            runs += group
            rows += [{"converter": g.name, "max_res": r, "workers": args.workers} for g in group]
        rates: list[list[float]] = [[] for _ in runs]
        for _ in range(args.repeats):
            for i, run in enumerate(runs):
                if args.idle_wait > 0:
                    wait_until_idle(timeout=args.idle_wait)
                rates[i].append(run.rate())
            fill_rates(rows, runs, rates)
            record.partial(rows, {"num_files": num_files})
    print_table(f"folder -> .beton ({num_files} files, {args.workers} workers, proportion 0.5, q90)",
                ["converter", "max_res", "images_per_second", "vs_ffcv_writer", "beton_mb"], rows,
                caption="vs_ffcv_writer: median over repeats of the per-repeat ratio of images/s (same folder, same "
                        "workers); beton_mb: output file size")
    return record.final(rows, {"num_files": num_files, "data": str(src)})


if __name__ == "__main__":
    sys.exit(main())
