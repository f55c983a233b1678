"""Data-loader throughput per backend, no model: images/s of finished batches.

    python -m benchmarks.bench_loader [--data DIR] [--backends torch,ffcv,dali,torch-gpu] [--modes crop,full]
                                      [--size 224] [--batch 32] [--workers 2] [--out DIR]

Modes:
  crop  decode + random-resized-crop + flip to normalised tensors: the CPU-side work when the colour augmentation
        runs on the GPU;
  full  the whole SimCLR augmentation (docs/method.md §7) in the backend (on the CPU here).
Plus `raw_decode`: a full PIL decode of the same files, one process per worker: the physical reference.
Every row is built and warmed up first; then the timed repeats go round-robin over the rows, and each ratio
(vs_torch, vs_raw_decode) is the median of the per-repeat ratios: on a shared machine whose speed drifts, this
keeps a slow minute from landing on one backend only.
With no --data an ImageNet-like folder is built from real photos (pipeline.sample_data, ~500x375, q90); for ffcv
that folder is converted to .beton first (conversion time reported apart).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import SCRATCH, Recorder, add_loader_args, bench_parser, image_folder, print_table
from benchmarks.steady_run import SteadyRun
from config import Config, apply_overrides
from pipeline import BACKENDS, BackendUnavailable, backend_unavailable, make_loader
from pipeline.dataset import load_index
from pipeline.decode import decode_rgb
from pipeline.schedule import make_schedule


def _decode_one(path: str) -> int:
    return decode_rgb(path).size[0]


def _reason(path: str) -> str:
    try:
        decode_rgb(path)
    except Exception as e:  # noqa: BLE001 - any failure makes the folder unusable for the reference rows
        return f"{path}: {e}"
    return ""


def undecodable(paths: list[str], workers: int) -> list[str]:
    """Why each file that does not decode fails. The reference pipelines (stock torchvision, FFCV's writer) stop or
    hang on such a file; ours replace it, so a comparison needs a folder where every image decodes."""
    with mp.get_context("fork").Pool(max(1, workers)) as pool:
        return [r for r in pool.map(_reason, paths, chunksize=16) if r]


class RawDecode:
    """Full PIL decode (no resize) of every file by `workers` processes: the physical reference."""

    def __init__(self, paths: list[str], workers: int):
        self.paths = paths
        self.pool = mp.get_context("fork").Pool(max(1, workers))
        self.pool.map(_decode_one, paths[: 4 * max(1, workers)])  # warm the page cache and the workers

    def rate(self) -> float:
        """Images/s of one pass over the files."""
        t = time.perf_counter()
        self.pool.map(_decode_one, self.paths, chunksize=8)
        return len(self.paths) / (time.perf_counter() - t)

    def close(self) -> None:
        self.pool.terminate()
        self.pool.join()


def mode_overrides(mode: str, backend: str, device: torch.device) -> dict:
    """Crop mode: no colour ops. The torch backend normalises in its workers when batches stay on the CPU (like
    torchvision's ToTensor + Normalize, and the config's default), on the GPU otherwise."""
    on = "worker" if backend == "torch" and (mode == "full" or device.type == "cpu") else "device"
    if mode == "crop":
        return {"aug": {"jitter_p": 0.0, "gray_p": 0.0, "blur_p": 0.0}, "data": {"color_aug_on": on}}
    return {"data": {"color_aug_on": on}}


class LoaderRun(SteadyRun):
    """One of our backends in one mode."""

    def __init__(self, cfg: Config, index, batches: int, settle: int, device: torch.device, **options):
        self.cfg, self.device, self.batch_size = cfg, device, cfg.data.batch_size
        schedule = make_schedule("epoch", len(index), None, None, cfg.run.seed)
        self.loader = make_loader(cfg, index, schedule, device, cfg.data.batch_size, **options)
        self._warm_up(batches, settle)

    def __len__(self) -> int:
        return len(self.loader)

    def iter_epoch(self, epoch: int):
        return self.loader.iter_epoch(epoch)


def own_cpu_seconds() -> float | None:
    """CPU seconds used so far by this process and every process it started (DataLoader workers, pools), from
    /proc; None where there is no /proc."""
    try:
        stats = {}
        for d in os.scandir("/proc"):
            if d.name.isdigit():
                try:
                    with open(f"/proc/{d.name}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                except OSError:  # ended meanwhile
                    continue
                stats[int(d.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))  # ppid, utime + stime
    except OSError:
        return None
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0, [os.getpid()]
    while todo:
        pid = todo.pop()
        total += stats.get(pid, (0, 0))[1]
        todo += children.get(pid, [])
    return total / os.sysconf("SC_CLK_TCK")


def wait_until_idle(threshold: float = 0.1, window: float = 0.25, timeout: float = 60.0) -> None:
    """Block until this benchmark's own processes and threads used less than `threshold` of one core over `window`
    seconds (or `timeout` passed).

    An abandoned epoch can leave work running: the torch loader's persistent workers finish the up to 8 batches
    they had in flight (seconds of CPU with the full augmentation), FFCV's and DALI's threads fill their queues.
    Timing the next row then would charge it for the previous one's leftovers. Only our own work counts: on a
    machine shared with other users, waiting for all CPUs to go idle can wait for ever.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        a = own_cpu_seconds()
        time.sleep(window)
        b = own_cpu_seconds()
        if a is None or b is None or b - a < threshold * window:
            return


def interleaved_rates(runs: list, repeats: int, after_round=None, idle_wait: float = 60.0) -> list[list[float]]:
    """rates[i][r]: images/s of runs[i] in repeat r. Repeats go round-robin over the runs (run 0, 1, ..., then
    again), so a slow spell of a shared machine hits every backend rather than the one that happened to be timed
    during it, and the ratio of two backends can be taken repeat by repeat (`paired_ratio`). Before each timed
    repeat the previous row's leftover work is let end (`wait_until_idle`)."""
    rates: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for i, run in enumerate(runs):
            if idle_wait > 0:
                wait_until_idle(timeout=idle_wait)
            rates[i].append(run.rate())
        if after_round is not None:  # e.g. write the record so far: a run stopped by its time budget keeps it
            after_round(rates)
    return rates


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over repeats of a[r] / b[r] (both timed in the same round)."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


PLAIN_NAMES = {"torch": "torchvision", "ffcv": "ffcv-plain", "dali": "dali-plain"}  # our backend -> plain pipeline


def convert_once(data: Path, count: int, args, extra: dict) -> Path:
    """The .beton of `data` for the ffcv rows (ours and ffcv-plain read the same file); cached in SCRATCH."""
    from pipeline.convert_ffcv import ConvertSettings, convert

    beton = SCRATCH / f"{data.name}-{count}-{args.ffcv_max_res}px-{args.ffcv_write_mode}.beton"
    if not beton.exists():
        t = time.perf_counter()
        convert(str(data), str(beton), ConvertSettings(max_resolution=args.ffcv_max_res,
                                                       write_mode=args.ffcv_write_mode, jpeg_quality=90,
                                                       workers=args.workers))
        extra["ffcv_conversion_seconds"] = time.perf_counter() - t
        extra["ffcv_conversion_images_per_second"] = count / extra["ffcv_conversion_seconds"]
    return beton


def make_run(name: str, mode: str, path: str, index, args, device: torch.device, options: dict) -> SteadyRun:
    """Row `name` (one of our backends or a plain pipeline) in `mode`, built and warmed up."""
    from benchmarks import plain_loaders as plain

    if name == "torchvision":
        return plain.TorchvisionRun(Path(path), args.size, args.batch, args.workers, mode, args.batches,
                                    args.settle, device)
    if name == "ffcv-plain":
        if mode != "crop":
            raise BackendUnavailable("FFCV has no colour jitter / grayscale / blur operators (crop mode only)")
        return plain.FFCVPlainRun(Path(path), args.size, args.batch, args.workers, args.batches, args.settle,
                                  device)
    if name == "dali-plain":
        if mode != "crop":
            raise BackendUnavailable("DALI's example training pipeline has no SimCLR colour augmentation")
        from pipeline.dali_backend import dali_threads

        return plain.DALIPlainRun(Path(path), args.size, args.batch, dali_threads(args.workers, device.type == "cuda"),
                                  args.batches, args.settle, device)
    cfg = Config()
    apply_overrides(cfg, {"data": {"path": path, "backend": name, "batch_size": args.batch, "workers": args.workers,
                                   "image_size": args.size, "pin_memory": False}})
    apply_overrides(cfg, mode_overrides(mode, name, device))
    idx = index
    if name == "ffcv":
        from pipeline.beton import beton_index

        idx = beton_index(path)
    return LoaderRun(cfg, idx, args.batches, args.settle, device, **options)


def build_parser() -> argparse.ArgumentParser:
    ap = bench_parser(__doc__, "python -m benchmarks.bench_loader")
    ap.add_argument("--backends", default="torch,ffcv,dali",
                    help=f"our backends to time, comma-separated (of {', '.join(BACKENDS)}); missing ones are "
                         "reported as skipped")
    ap.add_argument("--plain", default=",".join(PLAIN_NAMES.values()),
                    help="reference pipelines a user would write instead (benchmarks.plain_loaders), or none")
    ap.add_argument("--plain-modes", default="", help="modes of the plain rows (empty: --modes)")
    ap.add_argument("--modes", default="crop,full", help="crop (decode + crop + flip + normalise), full (+ colour)")
    add_loader_args(ap, size=224, batch=32, images_help="epochs of >= settle + batches batches: steady state")
    ap.add_argument("--batches", type=int, default=16, help="timed batches per repeat")
    ap.add_argument("--settle", type=int, default=4,
                    help="untimed batches at the start of each repeat's epoch (0 when an epoch is shorter than "
                         "settle + batches: the repeat then spans epochs)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per row, interleaved round-robin")
    ap.add_argument("--ffcv-max-res", type=int, default=256,
                    help="longest side stored in the .beton (FFCV's speed recipe: pre-resized JPEG q90)")
    ap.add_argument("--ffcv-write-mode", default="jpg", choices=("jpg", "raw", "proportion", "smart"),
                    help="how the .beton stores images (proportion: ffcv-imagenet's half JPEG, half raw)")
    ap.add_argument("--dali-cpu-resize", default="numba",
                    help="DALI CPU graph resize: numba, dali (fn.resize) or both comma-separated (one row each)")
    ap.add_argument("--device", default="cpu", help="where batches are delivered (cuda: GPU decode/augment)")
    add_idle_wait(ap)
    return ap


def add_idle_wait(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--idle-wait", type=float, default=60.0,
                    help="at most this many seconds of waiting, before each timed repeat, for the previous row's "
                         "leftover work (this benchmark's own processes) to end (0: none)")


def row_names(args, ap: argparse.ArgumentParser) -> list[str]:
    """The rows to time, each plain pipeline next to our backend that it stands in for."""
    plain = {x.strip() for x in args.plain.split(",") if x.strip() and x.strip() != "none"}
    unknown = plain - set(PLAIN_NAMES.values())
    if unknown:
        ap.error(f"--plain: unknown {', '.join(sorted(unknown))} (choose from {', '.join(PLAIN_NAMES.values())}, "
                 "or none)")
    names: list[str] = []
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        ref = PLAIN_NAMES.get(backend)
        names += ([ref] if ref in plain else []) + [backend]
    return names + [p for p in PLAIN_NAMES.values() if p in plain and p not in names]


def make_rows(names: list[str], data: Path, beton: Path | None, index, args, device) -> tuple[list[dict], list]:
    """The table's rows (a skipped one says why) and the runs of the timed ones, aligned with them; the raw decode
    rate first."""
    rows: list[dict] = [{"backend": "raw_decode", "mode": "decode", "resolution": "full", "batch": 1,
                         "workers": args.workers}]
    runs: list = [RawDecode([index.abspath(i) for i in range(len(index))], args.workers)]
    for name in names:
        backend = next((b for b, p in PLAIN_NAMES.items() if p == name), name)  # the library a row needs
        missing = backend_unavailable(backend)  # up front: before a conversion or any other backend's timing
        if missing:
            rows.append({"backend": name, "mode": "-", "skipped": missing})
            continue
        path = str(beton) if backend == "ffcv" else str(data)
        variants = [{}]
        if name == "dali" and device.type == "cpu":
            variants = [{"cpu_resize": v.strip()} for v in args.dali_cpu_resize.split(",") if v.strip()]
        modes = args.plain_modes if name in PLAIN_NAMES.values() and args.plain_modes else args.modes
        for mode in [m.strip() for m in modes.split(",") if m.strip()]:
            for options in variants:
                row = {"backend": name, "mode": mode, "variant": " ".join(f"{k}={v}" for k, v in options.items()),
                       "resolution": args.size, "batch": args.batch, "workers": args.workers}
                try:
                    run = make_run(name, mode, path, index, args, device, options)
                    row.update(warmup_seconds=run.warmup_seconds, spans_epochs=run.spans_epochs)
                    runs.append(run)
                except BackendUnavailable as e:
                    row["skipped"] = str(e)
                rows.append(row)
    return rows, runs


def fill_rates(timed: list[dict], rates: list[list[float]]) -> None:
    """Each timed row's median rate, and its paired ratios to the rows it is compared with."""
    for row, r in zip(timed, rates, strict=True):
        row.update(images_per_second=statistics.median(r), rates=r)
    raw_rates = timed[0]["rates"]
    for row in timed[1:]:
        refs = {"vs_torchvision": "torchvision", "vs_torch": "torch", "vs_plain": PLAIN_NAMES.get(row["backend"])}
        for key, name in refs.items():
            ref = next((x for x in timed if x["backend"] == name and x["mode"] == row["mode"]), None)
            if ref is not None and ref is not row:
                row[key] = paired_ratio(row["rates"], ref["rates"])
        row["vs_raw_decode"] = paired_ratio(row["rates"], raw_rates)


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    record = Recorder("bench_loader", args)
    data = image_folder(args)
    index = load_index(data)
    bad = undecodable([index.abspath(i) for i in range(len(index))], args.workers)
    if bad:
        print(f"error: {len(bad)} image(s) of {data} do not decode (e.g. {bad[0]}); the reference rows (stock "
              "torchvision) stop on them: benchmark a folder where every image decodes", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    names = row_names(args, ap)
    extra: dict = {"num_images": len(index), "data": str(data),
                   "method": "repeats interleaved round-robin over the rows; images_per_second = median over "
                             "repeats; vs_* = median over repeats of the per-repeat ratio"}
    # The conversion forks its workers: before any row starts threads or worker pools (a fork of a process with
    # running threads can deadlock the child).
    beton = None
    if {"ffcv", "ffcv-plain"} & set(names) and not backend_unavailable("ffcv"):
        beton = convert_once(data, len(index), args, extra)
    rows, runs = make_rows(names, data, beton, index, args, device)
    timed = [r for r in rows if "skipped" not in r]

    def after_round(rates: list[list[float]]) -> None:
        fill_rates(timed, rates)
        record.partial(rows, extra)

    try:
        fill_rates(timed, interleaved_rates(runs, args.repeats, after_round=after_round, idle_wait=args.idle_wait))
    finally:  # whatever happened: every row's workers and threads end here, the process can exit
        for run in runs:
            run.close()
    print_table(f"loader throughput ({len(index)} images, {args.size}px, batch {args.batch}, {args.workers} workers)",
                ["backend", "mode", "variant", "images_per_second", "vs_torchvision", "vs_raw_decode", "vs_plain",
                 "skipped"], rows,
                caption="vs_torchvision: x stock torchvision ImageFolder + DataLoader; vs_raw_decode: x a full PIL "
                        "decode of the same files; vs_plain: x the library's own plain pipeline (torch: torchvision, "
                        "ffcv: ffcv-plain, dali: dali-plain), i.e. our wrapper's tax; all medians of per-repeat "
                        "ratios")
    return record.final(rows, extra)


if __name__ == "__main__":
    sys.exit(main())
