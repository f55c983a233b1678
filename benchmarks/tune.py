"""Which data pipeline feeds your model on your data and this machine: times each installed backend at a few
worker counts and the training step of your model, then prints the train.py flags to use.

    python -m benchmarks.tune DATA [--budget 120] [--backends auto] [--workers auto] [train.py flags ...]
    python -m benchmarks.tune /data/imagenet/train --model.arch=resnet50 --data.batch_size=256
    python -m benchmarks.tune in1k-train.beton --data.image_size=160            # a .beton: the ffcv backend
    make tune DATA=/data/imagenet/train

DATA is what `--data.path` will be: an image folder, a file list, or a .beton. Every other `--section.key=value` is a
train.py flag: the run the tuner plans is train.py's with those flags (its defaults otherwise: ResNet-50, 224 px,
batch 256, the full SimCLR augmentation), and the flags it recommends are those plus the backend and workers it
picked.

What it does, within --budget seconds of wall time (start-up included), each measurement in a process of its own
(killed, with everything it started, when its time is up):
1. the training step of that model on synthetic batches already on the device (the GPU when there is one), as
   train.py builds it: its images/s at the run's batch; on a CPU a ResNet-50 step takes about a minute, so the step
   is timed at a smaller batch and scaled by the batch (the table says so);
2. each installed backend at a few worker counts: images/s of the loader alone, in the steady state (the first
   batches of a measurement, while workers start and numba compiles, are not counted), delivering batches where
   train.py would (the GPU when there is one; without one at a batch of at most 32: a loader's images/s hardly
   depends on the batch, and a CPU's first batch of 256 full-augmentation images can take a measurement's time);
3. the prediction per row. With a GPU the loader's workers and the step overlap: the run goes at
   min(loader, step) and waits for data max(0, 1 - loader / step) of the time. On a CPU they share the cores: the
   workers' decode time (w of C cores while they run) is taken from the step, so the run goes at
   1 / (1 / step + w / (C x loader)) at most, and at the loader's rate at most, and waits for data where the loader
   is the slower one.
The recommendation is the row of the highest predicted images/s; within 3 % of it, the one with fewer workers. The
ffcv backend reads a .beton: for a folder the tuner says how to convert it (pipeline.convert_ffcv) and times the
others. The JSON record (arguments, rows, step, recommendation, machine) goes under --out.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import Recorder, bench_parser, print_table
from provenance import cpu_model

NEAR_BEST = 0.97  # rows within 3 % of the best predicted rate count as equal: fewer workers wins
MIN_SLICE = 8.0  # seconds: a measurement given less (start-up, warm-up and a few batches) is not started
STEP_SHARE = 0.25  # of the budget, for the step measurement (at most STEP_MAX seconds)
STEP_MAX = 40.0
SETTLE_BATCHES = 2  # batches a loader delivers before its clock starts
CPU_LOADER_BATCH = 32  # without a GPU the loaders are timed at this batch at most (per-image work, same rate)
REPORT_EVERY = 1.0  # seconds between a measurement's interim results (the last one counts if it is killed)
MEMORY_SHARE_OF_RAM = 0.25  # the memory backend holds the decoded set: only offered when it fits this share


# ============ the measurements (each runs in a child process: `--child SPEC`) ============

def _base_config(data: str, flags: list[str]):
    from config import apply_overrides, parse_args

    cfg = parse_args(flags)
    apply_overrides(cfg, {"data.path": data})
    return cfg


def _index(cfg):
    """The instance index train.py builds for this config (a .beton's sidecars, or the folder / file list)."""
    from pipeline.dataset import load_index

    if cfg.data.backend == "ffcv":
        from pipeline.ffcv_backend import ffcv_index

        index = ffcv_index(cfg.data.path)
    else:
        index = load_index(cfg.data.path)
    return index.subset(cfg.data.subset) if cfg.data.subset else index


def measure_step(spec: dict, report) -> dict:
    """Images/s of train.py's step at the run's batch on synthetic data. On a GPU timed at that batch; on a CPU at
    the largest batch (doubling from 2) whose steps still fit before `spec["until"]`, and scaled by the batch.
    `report(result)` after every timed step: the last one stands if the measurement is stopped."""
    import torch

    from model.distributed import pick_device
    from model.trainer import build_trainer
    from plan import resolve

    t_end = spec["until"]
    cfg = _base_config(spec["data"], spec["flags"])
    device = pick_device(cfg.run.device)
    torch.set_num_threads(cfg.run.threads or len(os.sched_getaffinity(0)))  # as train.py (run.threads)
    n = spec["num_instances"]
    plan = resolve(cfg, n, 1)
    trainer = build_trainer(cfg, n, device, plan=plan)
    trainer.model.train()
    size, batch = cfg.data.image_size, plan.batch_per_rank
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    step = 0

    def one(b: int) -> float:
        """Seconds of one step at batch b."""
        nonlocal step
        x = torch.randn(b, 3, size, size, device=device)
        crops = tuple(torch.randn(b, 3, cfg.aug.small_size, cfg.aug.small_size, device=device)
                      for _ in range(cfg.aug.small_crops))
        ids = (torch.arange(b) + step * b) % n
        s = step % plan.total_steps
        sync()
        t = time.perf_counter()
        trainer.train_step(x, ids.to(device), crops, s, float(trainer.lrs[s]), ids_host=ids)
        sync()
        step += 1
        return time.perf_counter() - t

    def result(probe: int, times: list[float]) -> dict:
        seconds = sorted(times)[len(times) // 2] * batch / probe
        return {"images_per_second": batch / seconds, "device": str(device), "batch": batch, "timed_batch": probe,
                "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
                "timed_steps": len(times), "scaled": probe != batch, "seconds_per_step": seconds}

    probe = batch if device.type == "cuda" else min(batch, 2)
    one(probe)  # warm-up (cuDNN, allocator, first-touch of the bank)
    times = [one(probe)]
    best = result(probe, times)
    report(best)
    while time.time() + times[-1] < t_end:  # more steps at this batch, or the next batch when they fit
        nxt = min(batch, 2 * probe)
        if nxt > probe and len(times) >= 2 and time.time() + 3 * times[-1] * nxt / probe < t_end:
            probe, times = nxt, []
            one(probe)
        times.append(one(probe))
        if len(times) >= 2 or probe == best["timed_batch"]:  # one step at a new batch is not yet a median
            best = result(probe, times)
            report(best)
    return best


def measure_loader(spec: dict, report) -> dict:
    """Images/s of one backend at one worker count, steady state, until `spec["until"]`; `report(result)` about every
    REPORT_EVERY seconds (the last one stands if the measurement is stopped)."""
    from contextlib import closing

    import torch

    from config import apply_overrides
    from model.distributed import pick_device
    from pipeline import make_loader
    from pipeline.schedule import make_schedule
    from plan import resolve

    t_end = spec["until"]
    cfg = _base_config(spec["data"], spec["flags"])
    apply_overrides(cfg, {"data.backend": spec["backend"], "data.workers": spec["workers"]})
    device = pick_device(cfg.run.device)
    torch.set_num_threads(cfg.run.threads or len(os.sched_getaffinity(0)))  # as train.py (run.threads)
    if device.type == "cpu":  # images/s hardly depends on the batch; a CPU's first batch of 256 can take the slice
        apply_overrides(cfg, {"data.batch_size": min(cfg.data.batch_size, CPU_LOADER_BATCH)})
    index = _index(cfg)
    plan = resolve(cfg, len(index), 1)
    schedule = make_schedule(cfg.data.scheduler, len(index), plan.window, plan.stride, cfg.run.seed)
    t_build = time.perf_counter()
    loader = make_loader(cfg, index, schedule, device, plan.batch_per_rank)
    settle = min(SETTLE_BATCHES, max(len(loader) - 1, 0))
    done, t0, t_first, reported = -settle, None, None, 0.0
    result = {"error": "no batch was timed in the time given (start-up and the first batches took it)"}
    unit = 0
    while time.time() < t_end:
        with closing(loader.iter_epoch(unit)) as batches:
            for b in batches:
                _ = b.images.shape
                if device.type == "cuda":
                    torch.cuda.synchronize()
                done += 1
                now = time.perf_counter()
                if t_first is None:
                    t_first = now - t_build
                if done == 0:
                    t0 = now
                elif done > 0:
                    result = {"images_per_second": done * plan.batch_per_rank / (now - t0), "timed_batches": done,
                              "first_batch_seconds": t_first}
                    if now - reported >= REPORT_EVERY:
                        report(result)
                        reported = now
                if time.time() >= t_end:
                    break
        unit += 1
    return result


def _child(spec: dict, out_fd: int) -> None:
    """A forked measurement: its own session (killed as a group), results as lines on `out_fd`; never returns."""
    try:
        os.setsid()
        with open(os.devnull, "wb") as null, tempfile.TemporaryFile() as err:  # stderr kept for the error row
            os.dup2(null.fileno(), 1)
            os.dup2(err.fileno(), 2)
            out = os.fdopen(out_fd, "w", buffering=1)

            def report(result: dict) -> None:
                out.write("RESULT " + json.dumps(result) + "\n")

            try:
                report((measure_step if spec["kind"] == "step" else measure_loader)(spec, report))
            except Exception as e:  # noqa: BLE001 - reported in the row; the tuner goes on with the other rows
                report({"error": f"{type(e).__name__}: {e}".splitlines()[0][:300]})
            out.write("DONE\n")
            out.flush()
    finally:
        os._exit(0)  # never back into the parent's code (or pytest's)


# ============ the orchestration ============

def run_child(spec: dict, hard_deadline: float, progress, task, t_start: float) -> dict:
    """Run one measurement in a forked process (torch and our modules are imported once, in the parent, which has
    started no threads) until `hard_deadline` (time.time()), then kill it with everything it started; its last
    result stands. The child is asked to finish half a second before."""
    spec = {**spec, "until": hard_deadline - 0.5}
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        _child(spec, w)
    os.close(w)
    result = None
    with os.fdopen(r) as lines, selectors.DefaultSelector() as sel:
        sel.register(lines, selectors.EVENT_READ)
        try:
            while time.time() < hard_deadline:
                if sel.select(timeout=0.2):
                    line = lines.readline()
                    if not line or line.startswith("DONE"):
                        break
                    if line.startswith("RESULT "):
                        result = json.loads(line[len("RESULT "):])
                progress.update(task, completed=time.time() - t_start)
                progress.refresh()
        finally:
            _kill_group(pid)
    return result if result is not None else {"error": "its time was up before a first result"}


def _kill_group(pid: int) -> None:
    """The child and everything it started (DataLoader workers, pools) end here."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os.waitpid(pid, 0)


NEEDS = {"ffcv": "ffcv", "dali": "nvidia.dali"}  # backend -> the package it imports (found, not imported: seconds)


def backend_missing(name: str) -> str:
    """"" when backend `name`'s package is installed (a look-up, not an import: importing FFCV and DALI costs seconds
    of the budget; a measurement that then fails to import says so in its row)."""
    import importlib.util

    pkg = NEEDS.get(name)
    try:
        found = pkg is None or importlib.util.find_spec(pkg) is not None
    except (ImportError, ValueError):
        found = False
    return "" if found else f"the {pkg} package is not installed"


def candidates(data: Path, cfg, backends: str, workers: str, cores: int, n: int, cuda: bool) -> tuple[list, list]:
    """([(backend, workers)], [notes]) to time, in order."""
    from pipeline import BACKENDS

    notes = []
    beton = data.suffix == ".beton"
    if backends == "auto":
        names = ["ffcv"] if beton else [b for b in ("torch", "torch-gpu", "dali", "memory") if cuda or
                                        b != "torch-gpu"]
        if not beton and not backend_missing("ffcv"):
            notes.append(f"ffcv reads a .beton: python -m pipeline.convert_ffcv {data} OUT.beton, then tune OUT.beton")
    else:
        names = [b.strip() for b in backends.split(",") if b.strip()]
        unknown = [b for b in names if b not in BACKENDS]
        if unknown:
            raise ValueError(f"--backends: unknown {', '.join(unknown)} (choose from {', '.join(BACKENDS)})")
    if workers == "auto":
        counts = sorted({max(1, cores // 4), max(1, cores // 2), cores})
    else:
        counts = sorted({int(w) for w in workers.split(",") if w.strip()})
    out = []
    for b in names:
        missing = backend_missing(b)
        if missing:
            notes.append(f"{b}: not installed ({missing})")
            continue
        if (b == "ffcv") != beton:
            notes.append(f"{b}: {'needs a .beton' if b == 'ffcv' else 'reads image folders, not a .beton'}")
            continue
        if b == "memory":
            from provenance import mem_info_gb

            need = n * 3 * cfg.data.image_size ** 2 / 1e9
            avail = mem_info_gb().get("MemAvailable", 0.0)
            if need > MEMORY_SHARE_OF_RAM * avail:
                notes.append(f"memory: the decoded set would take {need:.1f} GB of {avail:.1f} GB available")
                continue
            out.append((b, cores))  # its workers only decode the set once, at the start
            continue
        out += [(b, w) for w in counts]
    return out, notes


def preload(backends: list[str]) -> None:
    """Import what the measurements import, once, before they are forked from this process (seconds each)."""
    import importlib

    import model.trainer  # noqa: F401 - the step's
    from pipeline import BACKENDS

    for b in set(backends):
        try:
            importlib.import_module(BACKENDS[b].split(":")[0])
        except ImportError:
            pass  # the measurement says why, in its row


def fit_budget(todo: list[tuple[str, int]], seconds: float) -> tuple[list, list]:
    """(kept, dropped): at most seconds / MIN_SLICE measurements; the middle worker counts go first, then each
    backend's fewest workers, then the backends listed last."""
    keep = list(todo)
    while len(keep) > max(0, int(seconds // MIN_SLICE)):
        per_backend: dict[str, list[int]] = {}
        for b, w in keep:
            per_backend.setdefault(b, []).append(w)
        counts = [(b, ws) for b, ws in per_backend.items() if len(ws) > 1]
        if counts:
            b, ws = max(counts, key=lambda x: len(x[1]))
            drop = (b, ws[len(ws) // 2] if len(ws) > 2 else ws[0])
        else:
            drop = keep[-1]
        keep.remove(drop)
    return keep, [c for c in todo if c not in keep]


def predict(loader: float, step: float, workers: int, cores: int, cuda: bool) -> tuple[float, float]:
    """(images/s, data-wait %) of the run, from the loader's and the step's rates measured apart (module doc).

    Per image the step needs 1 / step seconds; on a CPU the workers' decoding also takes w / (C x loader) seconds of
    the step's cores. The run goes at the slower of that and the loader, and the loop waits for data for the part
    of each image's time the step does not fill (only where the loader is the slower one)."""
    step_time = 1.0 / step if cuda else 1.0 / step + min(workers, cores) / (cores * loader)
    rate = min(loader, 1.0 / step_time)
    wait = 1.0 - rate * step_time if loader < 1.0 / step_time else 0.0
    return rate, 100.0 * max(0.0, wait)


def recommend(rows: list[dict]) -> dict | None:
    timed = [r for r in rows if "predicted_img_s" in r]
    if not timed:
        return None
    best = max(r["predicted_img_s"] for r in timed)
    near = [r for r in timed if r["predicted_img_s"] >= NEAR_BEST * best]
    return min(near, key=lambda r: (r["workers"], -r["predicted_img_s"]))


def flags_for(data: str, user_flags: list[str], row: dict) -> list[str]:
    """The exact train.py flags: the data, the user's own flags, the chosen backend and workers."""
    keep = [f for f in user_flags if not f.startswith(("--data.backend", "--data.workers", "--data.path"))]
    return [f"--data.path={data}", *keep, f"--data.backend={row['backend']}", f"--data.workers={row['workers']}"]


def build_parser():
    ap = bench_parser(__doc__, "python -m benchmarks.tune")
    ap.add_argument("data", nargs="?", help="what --data.path will be: an image folder, a file list or a .beton")
    ap.add_argument("--budget", type=float, default=120.0, help="seconds of wall time for everything")
    ap.add_argument("--backends", default="auto",
                    help="backends to time, comma-separated; auto: every installed one that reads DATA")
    ap.add_argument("--workers", default="auto", help="worker counts, comma-separated; auto: C/4, C/2 and C (C = "
                                                      "the cores this process may use)")
    ap.allow_abbrev = False  # train.py's flags pass through: none of them may be taken for an abbreviation of ours
    return ap


def resolve(args, flags: list[str]):
    """train.py's config from the flags, with DATA as its data.path, and DATA's image count; ConfigError or
    DataError (one line) for bad input."""
    from config import ConfigError, apply_overrides, parse_args
    from pipeline.dataset import DataError

    data = Path(args.data)
    bad = [f for f in flags if not f.startswith("--")]
    if bad:
        raise ConfigError(f"unexpected argument {bad[0]!r}: train.py flags are --section.key=value")
    cfg = parse_args(flags)
    if not data.exists():
        raise DataError(f"DATA does not exist: {data}")
    apply_overrides(cfg, {"data.path": str(data), "data.backend": "ffcv" if data.suffix == ".beton" else "torch"})
    return cfg, data, len(_index(cfg))


def measure(spec0: dict, todo: list, args, console, t_start: float) -> tuple[dict, list[dict]]:
    """The step first, then each loader that fits the budget's rest in an equal share of it: (step, rows)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    deadline = t_start + args.budget - 1.0  # the last second: the table and the record
    rows: list[dict] = []
    with Progress(TextColumn("{task.description:<28}"), BarColumn(), TimeElapsedColumn(), console=console,
                  auto_refresh=False, transient=False) as progress:
        task = progress.add_task("training step", total=args.budget)
        step_until = time.time() + min(STEP_MAX, STEP_SHARE * (deadline - time.time()))
        step = run_child({**spec0, "kind": "step"}, step_until, progress, task, t_start)
        todo, dropped = fit_budget(todo, deadline - time.time())
        rows += [{"backend": b, "workers": w, "skipped": "no time left in --budget for it"} for b, w in dropped]
        for i, (backend, workers) in enumerate(todo):
            share = (deadline - time.time()) / (len(todo) - i)
            progress.update(task, description=f"{backend}, {workers} worker(s)")
            res = run_child({**spec0, "kind": "loader", "backend": backend, "workers": workers},
                            time.time() + share, progress, task, t_start)
            row = {"backend": backend, "workers": workers}
            if "error" in res:
                row["skipped"] = res["error"]
            else:
                row.update(loader_img_s=res["images_per_second"], timed_batches=res["timed_batches"],
                           first_batch_s=res["first_batch_seconds"])
            rows.append(row)
        progress.update(task, completed=min(args.budget, time.time() - t_start), description="done")
        progress.refresh()
    return step, rows


def report(cfg, data: Path, flags: list[str], step: dict, rows: list[dict], notes: list[str], best: dict | None,
           cmd: list[str] | None) -> None:
    """What the step and the loaders gave, and the recommended train.py command."""
    step_ips = step.get("images_per_second")
    if step_ips:
        scaled = f", timed at batch {step['timed_batch']} and scaled" if step.get("scaled") else ""
        print(f"training step: {step_ips:,.1f} img/s ({cfg.model.arch}, {cfg.data.image_size} px, batch "
              f"{step['batch']} on {step['device']}{scaled})")
    else:
        print(f"training step: not measured ({step.get('error')}); loaders ranked by their own rate")
    for note in notes:
        print(f"note: {note}")
    if cmd:
        print(f"recommended (predicted {best['predicted_img_s']:,.1f} img/s, data wait "
              f"{best['predicted_data_wait_pct']:.0f} %):\n  python train.py {' '.join(cmd)}")
    elif rows and not step_ips:
        fastest = max((r for r in rows if "loader_img_s" in r), key=lambda r: r["loader_img_s"], default=None)
        if fastest:
            print(f"fastest loader: python train.py {' '.join(flags_for(str(data), flags, fastest))}")


def main(argv: list[str] | None = None) -> int:
    t_start = time.time()
    ap = build_parser()
    args, flags = ap.parse_known_args(sys.argv[1:] if argv is None else argv)
    if not args.data:
        ap.error("DATA is required (an image folder, a file list or a .beton)")
    from rich.console import Console

    from config import ConfigError
    from pipeline.dataset import DataError

    try:
        cfg, data, n = resolve(args, flags)
        if args.budget < 3 * MIN_SLICE:
            raise ConfigError(f"--budget {args.budget:g} s is too short (at least {3 * MIN_SLICE:g} s)")
        # NVML's count, not CUDA's: a parent that initialised CUDA could not fork the measurements
        os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
        import torch

        cuda = torch.cuda.is_available() and cfg.run.device != "cpu"
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        todo, notes = candidates(data, cfg, args.backends, args.workers, cores, n, cuda)
        if not todo:
            raise DataError(f"no backend here reads {data} ({'; '.join(notes)})")
    except (ConfigError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    record = Recorder("tune", args)
    console = Console(stderr=True)
    where = f"a GPU and {cores} cores" if cuda else f"CPU only ({cores} cores, {cpu_model()})"
    console.print(f"tuning {n:,} images of {data} on {where}: {cfg.model.arch}, {cfg.data.image_size} px, batch "
                  f"{cfg.data.batch_size}; {len(todo)} loader measurement(s) and the step, within {args.budget:g} s")
    if not cuda:
        console.print("no GPU: the step is timed on the CPU, where the loader's workers and the step share the "
                      "cores; the loaders are still ranked")
    preload([b for b, _ in todo])
    step, rows = measure({"data": str(data), "flags": flags, "num_instances": n}, todo, args, console, t_start)
    step_ips = step.get("images_per_second")
    for r in rows:
        if "loader_img_s" in r and step_ips:
            r["predicted_img_s"], r["predicted_data_wait_pct"] = predict(r["loader_img_s"], step_ips, r["workers"],
                                                                         cores, cuda)
    best = recommend(rows)
    cmd = flags_for(str(data), flags, best) if best else None
    print_table(f"loaders on {n:,} images of {data} ({where})",
                ["backend", "workers", "loader_img_s", "predicted_img_s", "predicted_data_wait_pct", "skipped"], rows,
                caption="loader_img_s: the loader alone, steady state; predicted_*: the run with this loader and "
                        "the step below (python -m benchmarks.tune --help: the model)")
    report(cfg, data, flags, step, rows, notes, best, cmd)
    record.final(rows, {"data": str(data), "num_images": n, "device": "cuda" if cuda else "cpu", "cores": cores,
                        "step": step, "notes": notes, "budget_seconds": args.budget, "seconds": time.time() - t_start,
                        "recommended_flags": cmd, "recommended": best, "train_flags": flags})
    return 0 if cmd or any("loader_img_s" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
