"""The instance bank's storage: ms per classifier step and resident memory by N x storage x dtype.

    python -m benchmarks.bench_bank                                   # small defaults (N 1e5, 1e6), ~2 min on 2 cores
    python -m benchmarks.bench_bank --ns 1e6,1e7,1e8 --configs device:fp32,device:bf16,host:bf16,mmap:bf16 \
        --mmap-dir /var/tmp/pic-bench --shared-n 1e7                 # the issue's table (minutes; 52 GB of disk at 1e8)

One classifier step = InstanceBank.forward (candidates, gather of w/u, widening to fp32, lazy correction, cosine
logits) + cross-entropy + backward + bank.update (row-sparse momentum SGD, rounding to the storage dtype, scatter; an
mmap bank also journals first-touched rows), for features z [B, D] (no encoder), B = 256, D = 128, recent K = 65,536,
1 thread, the id stream of the sliding window (docs/method.md §3); state made realistic as in bench_classifier
(bookkeeping fast-forward: the FIFO is full and rows come back after realistic gaps), then a few real steps, then
timed steps.
A config larger than --mem-budget-gb of RAM (device, host) or of free disk (mmap) is skipped with the reason.
Memory: RSS and PSS of this process (/proc/self/smaps_rollup) after the timed steps, the anonymous part (RssAnon:
device banks) and the file-backed part (RssFile + RssShmem: host and mmap banks, only the pages touched).
--shared-n: 2 gloo processes on this host with one host bank (one copy, local rank 0 writes) vs a replicated
device bank, each running steps; their PSS sum is the memory the node pays.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import resource
import shutil
import socket
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_classifier import IdStream, Runner, add_rn50, bench_rn50, recent_step_bytes  # noqa: E402
from benchmarks.common import Recorder, add_bank_shape, bench_parser, print_table, set_threads  # noqa: E402
from benchmarks.process_tree import ProcessTree  # noqa: E402
from model.bank import BankOptions, InstanceBank, make_bank  # noqa: E402
from model.bank.files import FileRows  # noqa: E402
from model.bank.ring_cache import RingCache  # noqa: E402
from model.bank.rows import DTYPES  # noqa: E402
from model.optim import lr_table  # noqa: E402
from provenance import mem_info_gb  # noqa: E402

GB = 1e9
MOMENTUM, WD, BASE_LR = 0.9, 1e-4, 0.03


def _int_list(s: str) -> list[int]:
    return [int(float(x)) for x in s.split(",") if x.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = bench_parser(__doc__, "python -m benchmarks.bench_bank")
    p.add_argument("--ns", type=_int_list, default=_int_list("1e5,1e6"), help="instance counts N, comma-separated")
    p.add_argument("--configs", default="device:fp32,device:bf16,host:bf16,host:bf16:cache,mmap:bf16,mmap:bf16:cache",
                   help="storage:dtype[:cache] (storage device|host|mmap, dtype fp32|bf16|fp16; cache: the ring's "
                        "rows kept apart, pic.bank_cache=on, model/bank/ring_cache.py)")
    p.add_argument("--k", type=int, default=65536, help="recent negatives K")
    add_bank_shape(p)
    p.add_argument("--repeats", type=int, default=5, help="timed samples per config")
    p.add_argument("--steps-per-sample", type=int, default=1, help="steps per timed sample")
    p.add_argument("--tile-init-from", type=lambda s: int(float(s)), default=int(1e8),
                   help="mmap banks of this N or more are initialised with one random block of rows repeated (disk "
                        "speed; the step's cost does not depend on the values), not randn (minutes at 1e8)")
    p.add_argument("--threads", type=int, default=1, help="torch and numba threads")
    p.add_argument("--mmap-dir", default="/var/tmp/pic-bench-bank", help="folder for mmap banks (deleted after)")
    p.add_argument("--shm-dir", default="/dev/shm", help="parent of host banks (deleted after)")
    p.add_argument("--mem-budget-gb", type=float, default=None,
                   help="memory for the banks alive at once, GB (None: 0.7 x MemAvailable)")
    p.add_argument("--shared-n", type=lambda s: int(float(s)), default=0,
                   help="N of the 2-process shared-bank memory check (0 = off)")
    p.add_argument("--shared-dtype", default="bf16", help="bank dtype of the shared-bank memory check")
    p.add_argument("--shared-steps", type=int, default=3, help="steps of each process of the shared-bank check")
    add_rn50(p, batch=8, repeats=3)
    args = p.parse_args(argv)
    configs = []
    for c in (c for c in args.configs.split(",") if c):
        parts = c.split(":")
        if len(parts) not in (2, 3) or parts[0] not in ("device", "host", "mmap") or parts[1] not in DTYPES or \
                parts[2:] not in ([], ["cache"]):
            p.error(f"bad config {c!r}: storage:dtype[:cache]")
        configs.append((parts[0], parts[1], len(parts) == 3))
    args.configs = configs
    return args


def bank_bytes(n: int, d: int, dtype: str) -> int:
    return 2 * n * d * torch.empty((), dtype=DTYPES[dtype]).element_size() + 8 * n


def smaps() -> dict[str, float]:
    """RSS, PSS and their parts of this process, GB (/proc/self/smaps_rollup)."""
    out = {}
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
            key, val = line.split(":", 1)
            if key in ("Rss", "Pss", "Pss_Anon", "Pss_File", "Pss_Shmem", "Anonymous"):
                out[key] = int(val.split()[0]) * 1024 / GB
    except OSError:
        pass
    status = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("RssAnon", "RssFile", "RssShmem")):
            key, val = line.split(":", 1)
            status[key] = int(val.split()[0]) * 1024 / GB
    return {**out, **status}


def label(storage: str, dtype: str, cache: bool) -> str:
    return f"{storage}:{dtype}" + (":cache" if cache else "")


def folder_for(storage: str, n: int, dtype: str, args, tag: str = "") -> str:
    base = args.mmap_dir if storage == "mmap" else os.path.join(args.shm_dir, f"pic-bench-{os.getuid()}")
    return os.path.join(base, f"{storage}-{dtype}-{n}{tag}")


def new_bank(n: int, storage: str, dtype: str, args, lrs: np.ndarray, folder: str = "",
             cache: bool = False) -> InstanceBank:
    options = BankOptions(dim=args.dim, momentum=MOMENTUM, weight_decay=WD, negatives="recent", k=args.k,
                          batch_size=args.batch, storage=storage, dtype=dtype, folder=folder,
                          cache="on" if cache else "off")
    return make_bank(options, n, lrs, generator=torch.Generator().manual_seed(args.seed + 1))


def stored_rows(bank: InstanceBank):
    """The rows under the ring cache, if any: what a step reads from and writes to."""
    return bank.rows.inner if isinstance(bank.rows, RingCache) else bank.rows


def setup_config(n: int, storage: str, dtype: str, args, cache: bool = False) -> dict:
    """A bank of N rows in `storage:dtype`, fast-forwarded and warmed up; returns its runner and set-up facts."""
    b, d = args.batch, args.dim
    w = min(args.window, n)
    ff = math.ceil(args.k / b) + 2 * (w // b)
    total = ff + args.warmup_steps + 1 + args.repeats * args.steps_per_sample + 8
    lrs = lr_table(BASE_LR, total // 20, total, 1e-6)
    folder = folder_for(storage, n, dtype, args) if storage != "device" else ""
    if folder and os.path.exists(folder):
        shutil.rmtree(folder)
    gc.collect()
    mem0 = smaps()
    t0 = time.perf_counter()
    init = "randn"
    if storage == "mmap" and n >= args.tile_init_from:  # pre-create with tiled rows, then the bank opens it
        init = "tile"
        FileRows("mmap", folder, n, d, DTYPES[dtype], 0.01, torch.Generator().manual_seed(args.seed + 1),
                    init="tile").close()
    bank = new_bank(n, storage, dtype, args, lrs, folder, cache)
    t_init = time.perf_counter() - t0
    bank.checkpoint(0)
    z = torch.randn(b, d, generator=torch.Generator().manual_seed(args.seed))
    runner = Runner(n, bank, IdStream(n, b, args.window, torch.device("cpu"), args.seed), lrs, z)
    t0 = time.perf_counter()
    runner.fast_forward(ff)
    t_ff = time.perf_counter() - t0
    for _ in range(args.warmup_steps):
        runner.step()
    return {"runner": runner, "bank": bank, "folder": folder, "mem0": mem0, "mem1": smaps(), "init_s": t_init,
            "init": init, "fast_forward_s": t_ff, "ff": ff, "wall": [], "cpu": [], "rows": count_rows(bank),
            "minflt": [], "majflt": [], "read": [], "written": []}


def count_rows(bank: InstanceBank) -> dict:
    """Count the bank rows a step reads and writes (the ring cache's write-back included), by wrapping the two
    methods of the stored rows every path goes through."""
    counts = {"read": 0, "written": 0}
    rows = stored_rows(bank)
    read, write = rows.read, rows.write

    def counted_read(ids):
        counts["read"] += rows.n if ids is None else ids.numel()
        return read(ids)

    def counted_write(ids, *rest):
        counts["written"] += rows.n if ids is None else ids.numel()
        return write(ids, *rest)

    rows.read, rows.write = counted_read, counted_write
    return counts


def sample(cfg: dict, steps: int) -> None:
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    rows0 = dict(cfg["rows"])
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        cfg["runner"].step()
    cfg["wall"].append((time.perf_counter() - w0) / steps)
    cfg["cpu"].append((time.process_time() - c0) / steps)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cfg["minflt"].append((r1.ru_minflt - r0.ru_minflt) / steps)
    cfg["majflt"].append((r1.ru_majflt - r0.ru_majflt) / steps)
    cfg["read"].append((cfg["rows"]["read"] - rows0["read"]) / steps)
    cfg["written"].append((cfg["rows"]["written"] - rows0["written"]) / steps)


def finish_config(n: int, storage: str, dtype: str, cfg: dict, args, cache: bool = False) -> dict:
    mem, mem0 = cfg["mem1"], cfg["mem0"]  # after this bank's set-up and warm-up steps
    files = {}
    if cfg["folder"]:
        for f in Path(cfg["folder"]).iterdir():
            st = f.stat()
            files[f.name] = {"bytes": st.st_size, "allocated": st.st_blocks * 512}
    wall, cpu = cfg["wall"], cfg["cpu"]
    row = {"N": n, "storage": storage, "dtype": dtype, "cache": cache, "K": args.k,
           "C": round(float(np.mean(cfg["runner"].cands))),
           "ms_median": 1e3 * statistics.median(wall), "ms_min": 1e3 * min(wall), "ms_max": 1e3 * max(wall),
           "cpu_ms_median": 1e3 * statistics.median(cpu), "cpu_ms_min": 1e3 * min(cpu),
           "samples_ms": [1e3 * x for x in wall], "samples_cpu_ms": [1e3 * x for x in cpu],
           "bank_gb": bank_bytes(n, args.dim, dtype) / GB, "init_s": cfg["init_s"], "init": cfg["init"],
           "fast_forward_s": cfg["fast_forward_s"], "fast_forward_steps": cfg["ff"],
           "rss_gb": mem.get("Rss"), "pss_gb": mem.get("Pss"), "rss_anon_gb": mem.get("RssAnon"),
           "rss_file_gb": mem.get("RssFile"), "rss_shmem_gb": mem.get("RssShmem"),
           "rss_growth_gb": mem.get("Rss", 0) - mem0.get("Rss", 0), "pss_growth_gb": mem.get("Pss", 0) -
           mem0.get("Pss", 0), "file_backed_growth_gb": sum(mem.get(k, 0) - mem0.get(k, 0) for k in
                                                          ("RssFile", "RssShmem")),
           "files": files, "folder": cfg["folder"] or None,
           "rows_read_per_step": statistics.median(cfg["read"]), "rows_written_per_step": statistics.median(
               cfg["written"]), "minor_faults_per_step": statistics.median(cfg["minflt"]),
           "major_faults_per_step": statistics.median(cfg["majflt"])}
    return row


def close_config(cfg: dict) -> None:
    if isinstance(stored_rows(cfg["bank"]), FileRows):
        stored_rows(cfg["bank"]).close(remove=True)
        try:  # the benchmark's parent folder too (/dev/shm/pic-bench-<uid>, the mmap dir) once it is empty
            Path(cfg["folder"]).parent.rmdir()
        except OSError:
            pass
    cfg.clear()
    gc.collect()


def fits(n: int, storage: str, dtype: str, args, budget: float, alive: int = 0) -> str | None:
    """alive: bytes of the banks of smaller N of the same config (kept for the round-robin)."""
    need = bank_bytes(n, args.dim, dtype) + (alive if storage in ("device", "host") else 0)
    extra = recent_step_bytes(args.k, args.batch, args.dim)
    if storage == "device" and dtype != "fp32":
        extra += 0  # the randn init makes an fp32 N x D temporary before rounding:
        need += n * args.dim * 4
    elif storage == "device":
        need += n * args.dim * 4  # torch.randn(N, D) * std: one temporary of the same size
    if storage in ("device", "host"):
        if need + extra > budget:
            return f"{need / GB:.1f} GB (+{extra / GB:.1f} GB per step) > RAM budget {budget / GB:.1f} GB"
        if storage == "host":
            free = shutil.disk_usage(args.shm_dir).free
            if bank_bytes(n, args.dim, dtype) > 0.9 * free:
                return f"{bank_bytes(n, args.dim, dtype) / GB:.1f} GB > 0.9 x free {args.shm_dir} {free / GB:.1f} GB"
        return None
    os.makedirs(args.mmap_dir, exist_ok=True)
    free = shutil.disk_usage(args.mmap_dir).free
    if bank_bytes(n, args.dim, dtype) > 0.9 * free:
        return f"{bank_bytes(n, args.dim, dtype) / GB:.1f} GB > 0.9 x free disk {free / GB:.1f} GB ({args.mmap_dir})"
    return None


# ============ 2 gloo processes: one host bank vs replicated banks ============

def _shared_worker(rank: int, port: int, storage: str, args, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    torch.set_num_threads(1)
    import torch.nn.functional as F

    from model import distributed as dist

    dist.init("cpu")
    n, b = args.shared_n, args.batch
    lrs = lr_table(BASE_LR, 1, 100, 1e-6)
    folder = folder_for("host", n, args.shared_dtype, args, "-shared") if storage == "host" else ""
    base = smaps()
    bank = new_bank(n, storage, args.shared_dtype, args, lrs, folder)
    stream = IdStream(n, b, args.window, torch.device("cpu"), args.seed)
    z = torch.randn(b // 2, args.dim, generator=torch.Generator().manual_seed(rank))
    times = []
    for t in range(args.shared_steps):
        ids = next(stream)[rank * (b // 2):(rank + 1) * (b // 2)]
        t0 = time.perf_counter()
        logits, targets, update = bank(z.requires_grad_(), ids, t)
        F.cross_entropy(logits, targets).backward()
        bank.update(update, float(lrs[t]), t)
        times.append(time.perf_counter() - t0)
    mem = smaps()
    torch.save({"rank": rank, "before": base, "after": mem, "ms": [1e3 * x for x in times]},
               os.path.join(out_dir, f"shared-{storage}-{rank}.pt"))
    dist.barrier()
    if isinstance(bank.rows, FileRows):
        bank.rows.close(remove=True)
        try:  # the benchmark's parent folder once it is empty
            Path(folder).parent.rmdir()
        except OSError:
            pass
    dist.shutdown()


def bench_shared(args) -> list[dict]:
    import tempfile

    rows = []
    for storage in ("host", "device"):
        with tempfile.TemporaryDirectory() as out:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            shm_before = mem_info_gb()
            with ProcessTree() as tree:  # stopped midway (Ctrl-C): no worker left behind
                procs = [tree.spawn(_shared_worker, (r, port, storage, args, out)) for r in range(2)]
                for p in procs:
                    p.join()
            if any(p.exitcode for p in procs):
                rows.append({"storage": storage, "error": f"exit codes {[p.exitcode for p in procs]}"})
                continue
            res = [torch.load(os.path.join(out, f"shared-{storage}-{r}.pt")) for r in range(2)]
        row = {"N": args.shared_n, "storage": storage, "dtype": args.shared_dtype, "ranks": 2,
               "bank_gb": bank_bytes(args.shared_n, args.dim, args.shared_dtype) / GB,
               "pss_sum_gb": sum(r["after"]["Pss"] for r in res), "rss_sum_gb": sum(r["after"]["Rss"] for r in res),
               "pss_before_sum_gb": sum(r["before"]["Pss"] for r in res),
               "per_rank": [{"rss_gb": r["after"]["Rss"], "pss_gb": r["after"]["Pss"],
                             "rss_anon_gb": r["after"].get("RssAnon"), "rss_shmem_gb": r["after"].get("RssShmem"),
                             "ms_per_step": r["ms"]} for r in res], "mem_before": shm_before}
        row["pss_growth_sum_gb"] = row["pss_sum_gb"] - row["pss_before_sum_gb"]
        row["copies_of_bank"] = row["pss_growth_sum_gb"] / row["bank_gb"]
        rows.append(row)
    return rows


def measure_configs(args, budget: float, record: Recorder) -> tuple[list[dict], list[dict]]:
    """Every (storage, dtype, cache) config at every N that fits: its rows, and what was skipped (with why)."""
    rows, skipped = [], []
    for storage, dtype, cache in args.configs:
        name = label(storage, dtype, cache)
        # every N of one config alive at once, sampled round-robin: load changes on a shared machine hit all N alike
        cfgs, alive = {}, 0
        for n in sorted(args.ns):
            reason = fits(n, storage, dtype, args, budget, alive)
            if reason:
                skipped.append({"N": n, "storage": storage, "dtype": dtype, "cache": cache, "reason": reason})
                print(f"skip N={n:.0e} {name}: {reason}", flush=True)
                continue
            cfgs[n] = setup_config(n, storage, dtype, args, cache)
            alive += bank_bytes(n, args.dim, dtype)
            print(f"N={n:.0e} {name}: ready (init {cfgs[n]['init_s']:.1f} s, {cfgs[n]['init']}; "
                  f"fast-forward {cfgs[n]['fast_forward_s']:.1f} s)", flush=True)
        for _ in range(args.repeats):
            for c in cfgs.values():
                sample(c, args.steps_per_sample)
        for n, c in cfgs.items():
            row = finish_config(n, storage, dtype, c, args, cache)
            rows.append(row)
            print(f"N={n:.0e} {name}: {row['ms_median']:.1f} ms/step (CPU {row['cpu_ms_median']:.1f} ms), "
                  f"RSS {row['rss_gb']:.2f} GB, PSS {row['pss_gb']:.2f} GB", flush=True)
        for c in cfgs.values():
            close_config(c)
        record.partial(rows, {"skipped": skipped})
    return rows, skipped


def add_ratios(rows: list[dict]) -> None:
    """Each row against the same config at the smallest N, and a cached bank against the same bank without it
    (both measured in this run)."""
    base = {}
    for r in rows:
        key = (r["storage"], r["dtype"], r["cache"])
        base.setdefault(key, r)
        r["ratio_vs_smallest_N"] = r["ms_median"] / base[key]["ms_median"]
        r["cpu_ratio_vs_smallest_N"] = r["cpu_ms_median"] / base[key]["cpu_ms_median"]
        r["ratio_base_N"] = base[key]["N"]
    plain = {(r["N"], r["storage"], r["dtype"]): r for r in rows if not r["cache"]}
    for r in rows:
        ref = plain.get((r["N"], r["storage"], r["dtype"])) if r["cache"] else None
        r["vs_uncached"] = r["ms_median"] / ref["ms_median"] if ref else None
        r["cpu_vs_uncached"] = r["cpu_ms_median"] / ref["cpu_ms_median"] if ref else None


def print_banks(args, rows: list[dict], with_rn50: bool) -> None:
    print_table(f"Bank storage: classifier step (K={args.k}, B={args.batch}, D={args.dim}, 1 thread)",
                ["N", "storage", "dtype", "cache", "bank GB", "ms/step", "÷ smallest N", "CPU ms", "CPU ÷",
                 "÷ uncached", "CPU ÷ uncached", "rows in/out", "PSS GB", *(["% of RN50"] if with_rn50 else [])],
                [[f"{r['N']:.0e}", r["storage"], r["dtype"], "on" if r["cache"] else "", r["bank_gb"], r["ms_median"],
                  f"{r['ratio_vs_smallest_N']:.2f}", r["cpu_ms_median"], f"{r['cpu_ratio_vs_smallest_N']:.2f}",
                  r["vs_uncached"], r["cpu_vs_uncached"],
                  f"{r['rows_read_per_step']:,.0f}/{r['rows_written_per_step']:,.0f}", r["pss_gb"],
                  *([r.get("pct_of_rn50_step")] if with_rn50 else [])] for r in rows],
                caption="cache on: the ring's rows kept apart (pic.bank_cache=on): B bank rows read and written per "
                        "step instead of K+B; ÷ uncached: this row's time divided by the same bank's without it, this "
                        "run (< 1: faster); ÷ smallest N likewise. Rows in/out: bank rows gathered / written per "
                        "step (median; page faults per step: the JSON record). "
                        "ms/step: wall clock, median of the round-robin samples; CPU ms: this process's CPU time per "
                        "step (less sensitive to other load; excludes waits for disk reads). "
                        "PSS of the benchmark process after this bank's warm-up steps (RSS, its growth, the "
                        "file-backed part, min–max and init times: the JSON record).")


def main(argv=None) -> int:
    args = parse_args(argv)
    record = Recorder("bench_bank", args)
    set_threads(args.threads)
    budget = args.mem_budget_gb * GB if args.mem_budget_gb else 0.7 * mem_info_gb().get("MemAvailable", 8) * GB
    print(f"bank benchmark: B={args.batch}, D={args.dim}, K={args.k}, threads {args.threads}, RAM budget "
          f"{budget / GB:.1f} GB", flush=True)
    rows, skipped = measure_configs(args, budget, record)
    add_ratios(rows)
    shared = bench_shared(args) if args.shared_n else []
    rn50, shares = None, []
    if not args.no_rn50:
        rn50 = bench_rn50(args, torch.device("cpu"))
        for r in rows:
            shares.append({"N": r["N"], "storage": r["storage"], "dtype": r["dtype"], "classifier_ms": r["ms_median"],
                           "rn50_ms": rn50["ms_per_step_at_batch"],
                           "pct": 100 * r["ms_median"] / rn50["ms_per_step_at_batch"]})
            r["pct_of_rn50_step"] = shares[-1]["pct"]
    print_banks(args, rows, rn50 is not None)
    if shared:
        print_table(f"2 gloo ranks, N={args.shared_n:.0e} {args.shared_dtype}",
                    ["storage", "bank GB", "PSS sum GB", "PSS growth sum GB", "copies of the bank", "RSS sum GB"],
                    [[s["storage"], s.get("bank_gb"), s.get("pss_sum_gb"), s.get("pss_growth_sum_gb"),
                      s.get("copies_of_bank"), s.get("rss_sum_gb")] for s in shared])
    if rn50:
        print(f"ResNet-50 + head fwd+bwd+SGD at batch {rn50['batch']}, {rn50['size']} px: {rn50['s_per_step']:.3f} s"
              f" -> x {args.batch} / {rn50['batch']} = {rn50['ms_per_step_at_batch']:.0f} ms per {args.batch}-image "
              f"step")
    return record.final(rows, {"skipped": skipped, "shared": shared, "rn50": rn50, "classifier_share_of_rn50": shares})


if __name__ == "__main__":
    sys.exit(main())
