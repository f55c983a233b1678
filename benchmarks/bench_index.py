"""Cost of the instance index and of the window scheduler at 10⁵–10⁷ images.

    python -m benchmarks.bench_index                                  # N = 1e5, 1e6; ~1 min on 2 cores
    python -m benchmarks.bench_index --ns 1e6,1e7 --before 9aa8af7    # with the code of a commit side by side
    python -m benchmarks.bench_index --walk-files 100000 --walk-dirs 1000

Every measurement runs in a fresh process and reports its wall time and its peak RSS above the RSS it had just
before the work (the high-water mark reset through /proc/self/clear_refs, so the interpreter, numpy and torch do
not count):

1. index from a file list: a synthetic list of N shuffled lines `cXXXXX/XXXXXXXXX.JPEG label` (1,000 classes,
   ~26 bytes a line, the order random so that the sort is real work) → `read_file_list`; then `write_manifest`
   (rank 0 writes one per run). The files do not exist: the existence check is switched off (the new code stats
   1,024 sampled paths; the code of `--before` stats every path, whose `Path.is_file` is replaced by `True` so the
   row is its parse + sort only; add N × the walk's per-entry stat cost for the real thing).
2. folder walk: `scan_folder` of `--walk-files` 1-byte files in `--walk-dirs` folders made under a temporary
   folder (deleted afterwards), page cache warm: the per-entry cost of scandir + the empty-file stat on a local
   disk. A network file system costs more per stat.
3. window scheduler: W and S from `plan.resolve` (the recipe's W = 131,072, S = 16,384, clamped to N), one
   process: construction, then ms per window (mean over 8 windows, one of them wrapping) and the peak RSS above
   the pre-construction RSS; the same with `reshuffle_at_wrap` (the wrapping windows); and the epoch order
   (one epoch's permutation, unchanged code) for reference.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _int_list(s: str) -> list[int]:
    return [int(float(x)) for x in s.split(",") if x]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from benchmarks.common import bench_parser

    p = bench_parser(__doc__, "python -m benchmarks.bench_index")
    p.add_argument("--ns", type=_int_list, default=_int_list("1e5,1e6"), help="data set sizes N")
    p.add_argument("--before", default=None, help="a git revision whose dataset.py / schedule.py run side by side")
    p.add_argument("--walk-files", type=int, default=20000, help="files of the folder walk (0: skip)")
    p.add_argument("--walk-dirs", type=int, default=200, help="folders of the folder walk")
    p.add_argument("--batch", type=int, default=256, help="global batch (for plan.resolve's window clamp)")
    p.add_argument("--tmp", default=None, help="where the synthetic lists and folders go (default: a temp dir)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one measurement, JSON on stdout
    return p.parse_args(argv)


# ============ the child: one measurement in a fresh process ============

def _reset_peak() -> float:
    """Reset the RSS high-water mark (Linux: /proc/self/clear_refs) and return the current RSS in MB: the work's
    peak is then `_rss_peak_mb() - that`."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_mb("VmRSS")
    except OSError:  # no /proc: the process's peak so far is the baseline
        return _rss_peak_mb()


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def _rss_peak_mb() -> float:
    try:
        return _status_mb("VmHWM")
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _load_module(name: str, source: str, tmp: Path):
    """A module from source text (the --before revision's file), without the package's __init__ (torch)."""
    path = tmp / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _modules(code: str, tmp: Path):
    if code == "new":
        from pipeline import dataset, schedule

        return dataset, schedule
    src = {f: subprocess.run(["git", "-C", str(ROOT), "show", f"{code}:pipeline/{f}.py"], check=True,
                             capture_output=True, text=True).stdout for f in ("dataset", "schedule")}
    return _load_module("before_dataset", src["dataset"], tmp), _load_module("before_schedule", src["schedule"], tmp)


def child(spec: dict) -> dict:
    tmp = Path(spec["tmp"])
    dataset, schedule = _modules(spec["code"], tmp)
    kind, out = spec["kind"], {}
    if kind == "list":
        if spec["code"] == "new":
            dataset._EXIST_SAMPLE = 0  # the synthetic files do not exist
        else:
            dataset.Path.is_file = lambda self: True
        r0, t = _reset_peak(), time.perf_counter()
        index = dataset.read_file_list(spec["list"])
        out["build_s"], out["build_peak_mb"] = time.perf_counter() - t, _rss_peak_mb() - r0
        out["n"] = len(index)
        if spec["code"] == "new":
            out["index_mb"] = (index.paths.nbytes + index.labels.nbytes) / 2**20
        t = time.perf_counter()
        index.write_manifest(tmp / f"manifest-{spec['code']}.tsv")
        out["manifest_s"] = time.perf_counter() - t
        (tmp / f"manifest-{spec['code']}.tsv").unlink()
    elif kind == "walk":
        r0, t = _reset_peak(), time.perf_counter()
        index = dataset.scan_folder(spec["folder"])
        out["build_s"], out["build_peak_mb"], out["n"] = time.perf_counter() - t, _rss_peak_mb() - r0, len(index)
    elif kind == "window":
        n, w, s = spec["n"], spec["window"], spec["stride"]
        if spec["code"] == "new":  # compile the numba kernel outside the timing
            schedule.FeistelPermutation(10, (0,))(np.arange(10))
        r0, t = _reset_peak(), time.perf_counter()
        sw = schedule.SlidingWindow(n, w, s, seed=0)
        out["init_s"] = time.perf_counter() - t
        first_wrap = (n - w) // s + 1
        units = [0, 1, 2, 3, 4, 5, 6, first_wrap] if first_wrap > 6 else list(range(8))
        t = time.perf_counter()
        for k in units:
            ids = sw.window_ids(k)
        out["ms_per_window"] = (time.perf_counter() - t) / len(units) * 1e3
        out["peak_mb"] = _rss_peak_mb() - r0
        assert len(ids) == w
        r0 = _reset_peak()
        resh = schedule.SlidingWindow(n, w, s, seed=0, reshuffle_at_wrap=True)
        wraps = [first_wrap, first_wrap + 1, first_wrap + 2]
        t = time.perf_counter()
        for k in wraps:
            resh.window_ids(k)
        out["ms_per_wrap_window_reshuffle"] = (time.perf_counter() - t) / len(wraps) * 1e3
        out["peak_mb_reshuffle"] = _rss_peak_mb() - r0
    elif kind == "epoch":
        r0, t = _reset_peak(), time.perf_counter()
        order = schedule.epoch_order(spec["n"], 0, seed=0)
        out["ms_per_epoch_order"] = (time.perf_counter() - t) * 1e3
        out["peak_mb"], out["order_mb"] = _rss_peak_mb() - r0, order.nbytes / 2**20
    return out


def run_child(spec: dict) -> dict:
    from benchmarks.process_tree import ProcessTree

    with ProcessTree() as tree:
        proc = tree.run([sys.executable, "-m", "benchmarks.bench_index", "--child", json.dumps(spec)], cwd=ROOT,
                        capture_output=True, text=True)
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ============ the parent: data, rows, table, record ============

def write_list(path: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    ids = rng.permutation(n)
    with open(path, "w") as f:
        for lo in range(0, n, 1_000_000):
            i = ids[lo:lo + 1_000_000].tolist()
            f.write("".join(f"c{a % 1000:05d}/{a:09d}.JPEG {a % 1000}\n" for a in i))


def make_folder(root: Path, files: int, dirs: int) -> None:
    for d in range(dirs):
        (root / f"n{d:08d}").mkdir(parents=True)
    for i in range(files):
        (root / f"n{i % dirs:08d}" / f"n{i % dirs:08d}_{i}.JPEG").write_bytes(b"x")


def window_for(n: int, batch: int) -> tuple[int, int]:
    from config import Config
    from plan import resolve

    cfg = Config()
    cfg.data.scheduler, cfg.data.batch_size = "window", batch
    plan = resolve(cfg, n, 1)
    return plan.window, plan.stride


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    from benchmarks.common import Recorder, print_table

    codes = ["new"] + ([args.before] if args.before else [])
    tmp = Path(tempfile.mkdtemp(prefix="bench_index-", dir=args.tmp))
    rows = []
    try:
        for n in args.ns:
            lst = tmp / f"list-{n}.txt"
            t = time.perf_counter()
            write_list(lst, n)
            print(f"N={n:,}: list written ({lst.stat().st_size / 2**20:.0f} MB, {time.perf_counter() - t:.1f} s)",
                  flush=True)
            w, s = window_for(n, args.batch)
            for code in codes:
                base = {"tmp": str(tmp), "code": code, "n": n}
                r = {"n": n, "code": "this" if code == "new" else code}
                r.update({f"list_{k}": v for k, v in run_child({**base, "kind": "list", "list": str(lst)}).items()
                          if k != "n"})
                r.update({"window": w, "stride": s})
                r.update({f"win_{k}": v for k, v in run_child({**base, "kind": "window", "window": w,
                                                                "stride": s}).items()})
                rows.append(r)
                print(json.dumps(r), flush=True)
            rows.append({"n": n, "code": "epoch order (both)",
                         **{f"epoch_{k}": v for k, v in run_child({"tmp": str(tmp), "code": "new", "n": n,
                                                                   "kind": "epoch"}).items()}})
            lst.unlink()
        walk = []
        if args.walk_files:
            folder = tmp / "walk"
            t = time.perf_counter()
            make_folder(folder, args.walk_files, args.walk_dirs)
            print(f"folder of {args.walk_files:,} files in {args.walk_dirs} folders made in "
                  f"{time.perf_counter() - t:.1f} s", flush=True)
            for code in codes:
                r = run_child({"tmp": str(tmp), "code": code, "kind": "walk", "folder": str(folder)})
                r.update({"code": "this" if code == "new" else code, "files": args.walk_files, "dirs": args.walk_dirs})
                if "build_s" in r:
                    r["us_per_entry"] = r["build_s"] / args.walk_files * 1e6
                walk.append(r)
                print(json.dumps(r), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    table = []
    for r in rows:
        if "epoch_ms_per_epoch_order" in r:
            table.append([f"{r['n']:,}", r["code"], "", "", "", "",
                          f"epoch order {r['epoch_ms_per_epoch_order']:.0f} ms", f"{r['epoch_peak_mb']:.0f}", ""])
            continue
        table.append([f"{r['n']:,}", r["code"], r.get("list_build_s"), r.get("list_build_peak_mb"),
                      r.get("list_index_mb", ""), r.get("list_manifest_s"), r.get("win_ms_per_window"),
                      r.get("win_peak_mb"), r.get("win_ms_per_wrap_window_reshuffle")])
    print_table("Instance index from a file list, and the window scheduler",
                ["N", "code", "build s", "build peak MB", "index MB", "manifest s", "ms / window", "window MB",
                 "ms / wrap window (reshuffle)"], table,
                caption="peak MB: RSS peak above the RSS before the work, in a fresh process; window: W, S from "
                        "plan.resolve (131,072 / 16,384 clamped to N)")
    if walk:
        print_table("Folder walk (scan_folder, warm page cache)", ["code", "files", "dirs", "build_s", "us_per_entry",
                                                                   "build_peak_mb"], walk)
    return Recorder("bench_index", args).final(rows, {"walk": walk})


if __name__ == "__main__":
    sys.exit(main())
