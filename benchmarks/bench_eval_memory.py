"""Peak memory of the end-of-run evaluation (eval.final) as N grows: does it hold anything of size N?

    python -m benchmarks.bench_eval_memory --ns 1e4,1e6 [--classes 10] [--val 1000] [--workers 2]

For each N: a folder of N tiny images (hard links to a handful of 8-px JPEGs, one per class: real files, no data
blocks of their own), `--classes` class folders and a labelled val folder; the "trained" model is the tiny CNN with
its N-row bank (what a finished run holds); the process's peak resident size (VmHWM, reset just before) is read after
`evaluate_run` (retrieval over a gallery of min(N, 100,000), the kNN over all N labelled training images, both for
the model and its random-init baseline), and the DataLoader workers' peak (RUSAGE_CHILDREN). Columns: the growth
of the peak during the evaluation against two sizes it must not contain: one N x 128 fp32 table, and the bank the
random-init baseline used to build (~1 KB a row). Linux only (/proc/self/clear_refs).
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import Recorder, bench_parser, print_table

LINKS_PER_FILE = 50_000  # ext4 allows 65,000 links to one file
OLD_BANK_BYTES_PER_ROW = 1032  # W and momentum fp32 [N,128] + last int64 [N]: a bank of N rows


def _status(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def make_folder(root: Path, n: int, classes: int) -> None:
    """n hard links under root/class_k/ (classes = 0: under root, unlabelled), to one 8-px JPEG per class (its own
    colour)."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    sources = []
    for k in range(max(classes, 1)):
        src = root.parent / f"{root.name}-src-{k}.jpg"
        m = max(classes, 1)
        Image.new("RGB", (8, 8), (40 + 200 * k // m, 200 - 150 * k // m, 90)).save(src, quality=90)
        sources.append(src)
        if classes:
            (root / f"class_{k}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        k = i % max(classes, 1)
        src = sources[k]
        if i // max(classes, 1) % LINKS_PER_FILE == LINKS_PER_FILE - 1:  # a file system's limit of links per file
            sources[k] = src.with_name(f"{src.stem}-{i}.jpg")
            shutil.copyfile(src, sources[k])
        os.link(src, (root / f"class_{k}" if classes else root) / f"{i:09d}.jpg")


def config_for(train: str, val: str, workers: int):
    """The tiny CNN at 8 px, the run's evaluation settings (k = 20)."""
    from config import Config, apply_overrides

    return apply_overrides(Config(), {
        "data": {"path": train, "eval_path": val, "workers": workers, "image_size": 8, "eval_size": 8},
        "model": {"arch": "tiny", "head_hidden": 32, "dim": 128}, "run": {"eval": "auto", "device": "cpu"}})


def measure(n: int, args, work: Path) -> dict:
    from eval.final import evaluate_run
    from model.bank import BankOptions, make_bank
    from model.pic import build_pic
    from pipeline.dataset import load_index

    train, val = work / f"train{n}", work / f"val{n}"
    t0 = time.perf_counter()
    make_folder(train, n, args.classes)
    if args.val:
        make_folder(val, args.val, args.classes)
    index = load_index(train)
    cfg = config_for(str(train), str(val) if args.val else "", args.workers)
    model = build_pic("tiny", make_bank(BankOptions(), n), head_hidden=32, dim=128)
    t_setup = time.perf_counter() - t0
    Path("/proc/self/clear_refs").write_text("5")
    before = _status("VmRSS")
    t0 = time.perf_counter()
    results = evaluate_run(cfg, model, index, torch.device("cpu"))
    seconds = time.perf_counter() - t0
    grew = _status("VmHWM") - before
    workers_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    shutil.rmtree(train)
    shutil.rmtree(val, ignore_errors=True)
    return {"N": n, "eval MB (peak growth)": grew / 1e6, "N x 128 fp32 MB": n * 128 * 4 / 1e6,
            "old baseline bank MB": n * OLD_BANK_BYTES_PER_ROW / 1e6, "workers peak RSS MB": workers_peak / 1e6,
            "RSS before MB": before / 1e6, "eval s": seconds, "setup s": t_setup,
            "retrieval gallery": results.get("retrieval_gallery"), "knn neighbours": results.get("knn_neighbours"),
            "knn queries": results.get("knn_queries")}


def main(argv: list[str] | None = None) -> int:
    ap = bench_parser(__doc__, "python -m benchmarks.bench_eval_memory")
    ap.add_argument("--ns", default="1e4,1e6", help="training set sizes, comma-separated")
    ap.add_argument("--classes", type=int, default=10, help="class folders (0: unlabelled, no kNN)")
    ap.add_argument("--val", type=int, default=1000, help="val images (0: no data.eval_path, no kNN)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of the evaluation")
    ap.add_argument("--dir", default="", help="scratch folder (default: a temporary one)")
    args = ap.parse_args(argv)
    record = Recorder("bench_eval_memory", args)
    if not Path("/proc/self/clear_refs").exists():
        print("error: needs Linux's /proc/self/clear_refs (peak RSS reset)", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, (os.cpu_count() or 1)))
    work = Path(args.dir or tempfile.mkdtemp(prefix="pic-evalmem-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for n in (int(float(x)) for x in args.ns.split(",")):
            rows.append(measure(n, args, work))
            record.partial(rows)  # a large N takes long: the smaller ones' figures are kept
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    cols = list(rows[0])
    print_table("end-of-run evaluation: peak memory growth (main process)", cols, rows,
                caption="eval MB = VmHWM after evaluate_run - VmRSS before it (the trained model's bank exists "
                        "before); workers: the DataLoader processes' largest peak")
    return record.final(rows)


if __name__ == "__main__":
    sys.exit(main())
