"""Shared helpers for the benchmarks: the command line, the machine record, a timer, a rich table and the JSON
record.

Every benchmark prints a table and writes one JSON file holding the environment (versions, git sha, CPU/GPU), the
arguments and the rows, so that numbers can be compared across machines and commits. A user's run writes it under
the folder named by `--out` (default `runs/benchmarks/`); `benchmarks/results/` keeps the project's reference
records (`make bench` and the GPU suite write there on purpose).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import socket
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from provenance import env_record

RESULTS_DIR = Path(__file__).resolve().parent / "results"  # the project's reference records
CHECKOUT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = "runs/benchmarks"  # a user's records: relative to where the benchmark runs
SCRATCH = Path(__file__).resolve().parent / "scratch"  # built-in folders and betons, reused across runs (ignored)


# ============ command line ============

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every flag's help ends with its default; the description keeps its line breaks (usage examples)."""


def bench_parser(doc: str | None, prog: str | None = None) -> argparse.ArgumentParser:
    """The parser every benchmark starts from: `--help` shows the module's docstring and every default, and
    `--out` / `--json` say where the record goes (`record_path`)."""
    ap = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=HelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT,
                    help="folder for the JSON record (<benchmark>-<host>-<UTC time>.json); the project's reference "
                         f"records are written with --out {RESULTS_DIR.relative_to(RESULTS_DIR.parents[1])}")
    ap.add_argument("--json", default="", help="exact path of the JSON record (overrides --out)")
    return ap


def add_image_folder(ap: argparse.ArgumentParser, images: int = 1024, images_help: str = "") -> None:
    """--data (a user's folder) or --images (the size of the built-in one, `image_folder`)."""
    ap.add_argument("--data", default="", help="image folder, ImageNet layout (default: build an ImageNet-like one of "
                                               "--images photos)")
    ap.add_argument("--images", type=int, default=images,
                    help="size of the built-in folder, shared by the benchmarks" + (f" ({images_help})" if images_help
                                                                                    else ""))


def image_folder(args: argparse.Namespace) -> Path:
    """--data, or the built-in folder of --images photos (built once under benchmarks/scratch/)."""
    if args.data:
        return Path(args.data)
    from pipeline.sample_data import make_photos

    return make_photos(SCRATCH, count=args.images)


def add_loader_args(ap: argparse.ArgumentParser, size: int, batch: int, images_help: str = "") -> None:
    """The data (`add_image_folder`) and the shape of a loader's batches: crop side, batch size, decode workers."""
    add_image_folder(ap, images_help=images_help)
    ap.add_argument("--size", type=int, default=size, help="output crop side, px (data.image_size)")
    ap.add_argument("--batch", type=int, default=batch, help="images per batch (data.batch_size)")
    ap.add_argument("--workers", type=int, default=2, help="decode workers, processes or threads (data.workers)")


def add_bank_shape(ap: argparse.ArgumentParser) -> None:
    """The shape of a classifier step over a bank: batch, feature dimension, the id stream's window, the seed."""
    ap.add_argument("--batch", type=int, default=256, help="batch B")
    ap.add_argument("--dim", type=int, default=128, help="feature dimension D")
    ap.add_argument("--window", type=int, default=131072, help="sliding window W of the id stream (clamped to N)")
    ap.add_argument("--warmup-steps", type=int, default=2, help="real steps after the bookkeeping fast-forward")
    ap.add_argument("--seed", type=int, default=0, help="seed of the bank rows and the id stream")


def set_threads(threads: int | None) -> None:
    """torch's and numba's thread counts (None: leave both)."""
    if not threads:
        return
    import torch

    torch.set_num_threads(threads)
    try:
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    except ImportError:
        pass


def record_path(args: argparse.Namespace, name: str) -> Path:
    """Where benchmark `name` writes its record: --json, else a new file under --out. Fixed once per run, so the
    partial records a benchmark writes as it goes (a run stopped by a time budget keeps them) are one file."""
    if args.json:
        return Path(args.json)
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return Path(args.out) / f"{name}-{_host_tag()}-{stamp}.json"


# ============ timing ============

def _auto_sync() -> Callable[[], None] | None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.synchronize
    return None


def time_fn(fn: Callable[[], Any], warmup: int = 1, repeats: int = 5,
            sync: Callable[[], None] | None | bool = None) -> dict[str, Any]:
    """Seconds per call of fn: dict(median, min, max, all).

    sync: called before starting and after each call so that asynchronous (CUDA) work is inside the measurement;
    None = torch.cuda.synchronize when CUDA is in use, False = never.
    """
    if sync is None:
        sync = _auto_sync()
    elif sync is False:
        sync = None
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times = []
    for _ in range(max(repeats, 1)):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "all": times}


# ============ output ============

def _cell(v: Any) -> str:
    """Table text of a value: floats to 3 significant digits (thousands as whole numbers); the JSON keeps them all."""
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"
    return str(v)


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any] | dict[str, Any]],
                caption: str | None = None) -> None:
    """A rich table; rows are sequences in column order or dicts keyed by column (missing keys print empty).
    The caption (units, definitions) is printed under the table, unwrapped by the table's width."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for i, c in enumerate(columns):
        table.add_column(str(c), justify="left" if i == 0 else "right")
    for r in rows:
        vals = [r.get(c, "") for c in columns] if isinstance(r, dict) else list(r)
        table.add_row(*(_cell(v) for v in vals))
    console = Console(width=max(120, Console().width), highlight=False)
    console.print(table)
    if caption:
        console.print(caption, soft_wrap=True)


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", socket.gethostname().split(".")[0])[:32] or "host"


def _in_checkout(text: str) -> str:
    """A path inside the checkout, relative to it: a committed record names no machine's folders."""
    try:
        return str(Path(text).resolve().relative_to(CHECKOUT)) if os.path.isabs(text) else text
    except ValueError:
        return text


def _jsonable(x: Any) -> Any:
    if isinstance(x, str):
        return _in_checkout(x)
    if isinstance(x, argparse.Namespace):
        x = vars(x)
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    torch = sys.modules.get("torch")  # not imported for this: light benchmarks (bench_index's children) skip it
    if isinstance(x, Path):
        return _in_checkout(str(x))
    if torch is not None and isinstance(x, torch.device | torch.dtype):
        return str(x)
    if hasattr(x, "item") and getattr(x, "ndim", 1) == 0:  # numpy / torch scalars
        return x.item()
    if isinstance(x, float) and (x != x or x in (float("inf"), float("-inf"))):
        return None
    return x


def write_record(name: str, args: Any, rows: Sequence[Any], extra: dict[str, Any] | None = None,
                 path: str | os.PathLike | None = None) -> Path:
    """Write {benchmark, env, args, rows, **extra} as JSON to `path` (`record_path(args, name)` when None).
    Returns the path."""
    if path is None:
        path = record_path(args, name)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": name, "env": env_record(), "args": _jsonable(args), "rows": _jsonable(list(rows)),
              **_jsonable(extra or {})}
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


class Recorder:
    """One benchmark run's JSON record, at one path fixed when the run starts (`record_path`): `partial` after every
    measurement, so that a run stopped by a time budget keeps what it measured; `final` when it is done."""

    def __init__(self, name: str, args: argparse.Namespace):
        self.name, self.args, self.path = name, args, record_path(args, name)

    def partial(self, rows: Sequence[Any], extra: dict[str, Any] | None = None) -> None:
        write_record(self.name, vars(self.args), rows, {**(extra or {}), "partial": True}, path=self.path)

    def final(self, rows: Sequence[Any], extra: dict[str, Any] | None = None) -> int:
        """The finished record; says where it is. Returns 0, the benchmark's exit status."""
        print(f"wrote {write_record(self.name, vars(self.args), rows, extra, path=self.path)}", flush=True)
        return 0
