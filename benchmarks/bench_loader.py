"""Data-loader throughput per backend, no model: images/s of finished batches.

    python -m benchmarks.bench_loader [--data DIR] [--backends torch,ffcv,dali,torch-gpu] [--modes crop,full]
                                      [--size 224] [--batch 32] [--workers 2] [--json OUT]

Modes:
  crop  decode + random-resized-crop + flip to normalised tensors: the CPU-side work when the colour augmentation
        runs on the GPU;
  full  the whole SimCLR augmentation (spec §7) in the backend (on the CPU here).
Plus `raw_decode`: a full PIL decode of the same files, one process per worker: the physical reference.
With no --data an ImageNet-like folder is built from real photos (pipeline.sample_data, ~500x375, q90); for ffcv
that folder is converted to .beton first (conversion time reported apart).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import print_table, write_record
from config import Config, apply_overrides
from pipeline import BackendUnavailable, make_loader
from pipeline.dataset import load_index
from pipeline.decode import decode_rgb
from pipeline.schedule import make_schedule

SCRATCH = Path(__file__).resolve().parent / "scratch"


def _decode_one(path: str) -> int:
    return decode_rgb(path).size[0]


def raw_decode_rate(paths: list[str], workers: int, repeats: int) -> float:
    """Full PIL decode (no resize) of every file, `workers` processes; median images/s over repeats."""
    rates = []
    with mp.get_context("fork").Pool(max(1, workers)) as pool:
        pool.map(_decode_one, paths[: 4 * workers])  # warm the page cache and the workers
        for _ in range(repeats):
            t = time.perf_counter()
            pool.map(_decode_one, paths, chunksize=8)
            rates.append(len(paths) / (time.perf_counter() - t))
    return sorted(rates)[len(rates) // 2]


def mode_overrides(mode: str, backend: str) -> dict:
    if mode == "crop":
        return {"aug": {"jitter_p": 0.0, "gray_p": 0.0, "blur_p": 0.0}, "data": {"color_aug_on": "device"}}
    return {"data": {"color_aug_on": "worker" if backend == "torch" else "device"}}


def loader_rate(cfg: Config, index, batches: int, repeats: int, device: torch.device) -> tuple[float, float]:
    """(median images/s over `repeats` timed runs of `batches` batches, seconds of the untimed warm-up epoch)."""
    n = len(index)
    schedule = make_schedule("epoch", n, None, None, cfg.run.seed)
    loader = make_loader(cfg, index, schedule, device, cfg.data.batch_size)
    t = time.perf_counter()
    for _ in loader.iter_epoch(0):  # warm-up: workers start, numba compiles (FFCV), caches fill
        pass
    warm = time.perf_counter() - t
    rates, epoch = [], 1
    for _ in range(repeats):
        done, t = 0, time.perf_counter()
        while done < batches:
            for b in loader.iter_epoch(epoch):
                done += 1
                if device.type == "cuda":
                    torch.cuda.synchronize()  # the batch is finished, not just queued
                _ = b.images.shape
                if done >= batches:
                    break
            epoch += 1
        rates.append(done * cfg.data.batch_size / (time.perf_counter() - t))
    return sorted(rates)[len(rates) // 2], warm


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="", help="image folder (default: build an ImageNet-like one)")
    ap.add_argument("--backends", default="torch,ffcv,dali")
    ap.add_argument("--modes", default="crop,full")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--images", type=int, default=256, help="size of the built-in folder")
    ap.add_argument("--batches", type=int, default=16, help="timed batches per repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ffcv-max-res", type=int, default=256,
                    help="longest side stored in the .beton (FFCV's speed recipe: pre-resized JPEG q90)")
    ap.add_argument("--ffcv-write-mode", default="jpg", choices=("jpg", "raw", "proportion", "smart"))
    ap.add_argument("--device", default="cpu", help="where batches are delivered (cuda: GPU decode/augment)")
    ap.add_argument("--json", default="", help="output JSON path (default benchmarks/results/...)")
    args = ap.parse_args(argv)

    if args.data:
        data = Path(args.data)
    else:
        from pipeline.sample_data import make_photos

        data = make_photos(SCRATCH, count=args.images)
    index = load_index(data)
    rows: list[dict] = []
    raw = raw_decode_rate([index.abspath(i) for i in range(len(index))], args.workers, args.repeats)
    rows.append({"backend": "raw_decode", "mode": "decode", "images_per_second": raw, "resolution": "full",
                 "batch": 1, "workers": args.workers, "vs_torch": None})
    extra: dict = {"num_images": len(index), "data": str(data)}
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        path = str(data)
        if backend == "ffcv":
            try:
                from pipeline.convert_ffcv import ConvertSettings, convert
            except ImportError as e:
                rows.append({"backend": backend, "mode": "-", "skipped": f"not installed ({e})"})
                continue
            beton = SCRATCH / f"{data.name}-{len(index)}-{args.ffcv_max_res}px-{args.ffcv_write_mode}.beton"
            if not beton.exists():
                t = time.perf_counter()
                convert(str(data), str(beton), ConvertSettings(max_resolution=args.ffcv_max_res,
                                                               write_mode=args.ffcv_write_mode, jpeg_quality=90,
                                                               workers=args.workers))
                extra["ffcv_conversion_seconds"] = time.perf_counter() - t
                extra["ffcv_conversion_images_per_second"] = len(index) / extra["ffcv_conversion_seconds"]
            path = str(beton)
        for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
            cfg = Config()
            apply_overrides(cfg, {"data": {"path": path, "backend": backend, "batch_size": args.batch,
                                           "workers": args.workers, "image_size": args.size, "pin_memory": False}})
            apply_overrides(cfg, mode_overrides(mode, backend))
            row = {"backend": backend, "mode": mode, "resolution": args.size, "batch": args.batch,
                   "workers": args.workers}
            try:
                idx = index
                if backend == "ffcv":
                    from pipeline.ffcv_backend import ffcv_index

                    idx = ffcv_index(path)
                rate, warm = loader_rate(cfg, idx, args.batches, args.repeats, torch.device(args.device))
                row.update(images_per_second=rate, warmup_seconds=warm)
            except BackendUnavailable as e:
                row["skipped"] = str(e)
            rows.append(row)
    for r in rows:
        ref = next((x for x in rows if x["backend"] == "torch" and x.get("mode") == r.get("mode")
                    and "images_per_second" in x), None)
        if ref and "images_per_second" in r and r["backend"] != "raw_decode":
            r["vs_torch"] = r["images_per_second"] / ref["images_per_second"]
        if "images_per_second" in r and r["backend"] != "raw_decode":
            r["vs_raw_decode"] = r["images_per_second"] / raw
    print_table(f"loader throughput ({len(index)} images, {args.size}px, batch {args.batch}, {args.workers} workers)",
                ["backend", "mode", "images_per_second", "vs_torch", "vs_raw_decode", "skipped"], rows)
    out = write_record("bench_loader", vars(args), rows, extra, path=args.json or None)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
