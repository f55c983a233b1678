"""PIC pre-training.

    python train.py --preset=demo                              # built-in digits, tiny CNN, a few minutes on a CPU
    python train.py --data.path=/imagenet/train --model.arch=resnet50 --data.scheduler=window --pic.negatives=recent
    python train.py --config=my.yaml --optim.epochs=400 --run.resume=auto

Config: see config.py (`python train.py --help` lists every key). A run folder `runs/NAME/` gets config.json,
manifest.tsv (instance id <-> file), log.jsonl, last.pt (atomic), backbone.pt and, when labels are known,
results.json.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import torch

from config import Config, ConfigError, parse_args, replace, resolve, to_dict
from model import distributed as dist
from model.checkpoint import (
    FORMAT,
    CheckpointError,
    atomic_save,
    backbone_state,
    check_compatible,
    check_schedule_unchanged,
    git_sha,
    load,
    load_latest,
)
from model.pic import build_pic
from model.step import TrainStep, make_optimizer
from pipeline import BackendUnavailable, make_loader
from pipeline.augment import seed_for
from pipeline.base import BadFiles
from pipeline.dataset import DataError, InstanceIndex, load_index
from pipeline.schedule import make_schedule

DEFAULT_DATA_ROOT = Path(__file__).resolve().parent / "data" / "sample"


# ============ learning-rate schedule (spec §6) ============

def lr_at(step: int, base: float, warmup_steps: int, total_steps: int, min_lr: float = 1e-6) -> float:
    """Linear warm-up from base/100 to base over `warmup_steps`, then cosine from base to `min_lr` at `total_steps`."""
    if warmup_steps > 0 and step <= warmup_steps:
        return base / 100 * (99 * step / warmup_steps + 1)
    t = max(total_steps - warmup_steps, 1)
    return min_lr + (base - min_lr) * (1 + math.cos(math.pi * min(step - warmup_steps, t) / t)) / 2


def lr_table(base: float, warmup_steps: int, total_steps: int, min_lr: float) -> np.ndarray:
    """lr of every step 0..total_steps (float64): the bank's weight correction needs the whole history."""
    return np.array([lr_at(i, base, warmup_steps, total_steps, min_lr) for i in range(total_steps + 1)])


# ============ small helpers ============

class StopRequested(Exception):
    """Raised by the first SIGINT/SIGTERM while the loop waits for its loader (see StopFlag.interruptible)."""


class StopFlag:
    """SIGINT/SIGTERM: the loop saves a checkpoint and exits with the resume hint.

    During a step the signal only sets a flag, read after the step (the weights are never left half-updated);
    while the loop waits for its loader (which may be slow, or stuck on a dead worker) it raises StopRequested at
    once, so the first signal is honoured within seconds wherever the process is. A second signal gives up."""

    def __init__(self):
        self.signum = 0
        self._old = {}
        self._waiting = False
        self._pid = os.getpid()

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if os.getpid() != self._pid:  # a forked DataLoader worker inherited this handler: the main process decides
            return
        if self.signum:  # second signal: give up at once
            raise KeyboardInterrupt
        self.signum = signum
        if self._waiting:
            raise StopRequested

    @contextmanager
    def interruptible(self):
        if self.signum:
            raise StopRequested
        self._waiting = True
        try:
            yield
        finally:
            self._waiting = False

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def configure_threads(threads: int) -> int:
    """torch's intra-op pool and numba's (the lazy correction kernel) from one number: both pools spinning on the
    same cores made recent-negative steps ~15x slower on 2 cores. 0 = the cores / processes on this node."""
    n = threads or max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    torch.set_num_threads(n)
    try:
        import numba

        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    except ImportError:
        pass
    return n


def default_data(cfg: Config) -> None:
    """`data.path` empty: build (once) and use the built-in digits data set."""
    if cfg.data.path:
        return
    from pipeline.sample_data import make_digits

    root = make_digits(DEFAULT_DATA_ROOT)
    cfg.data.path = str(root / "train")
    if not cfg.data.eval_path:
        cfg.data.eval_path = str(root / "val")


def build_index(cfg: Config) -> InstanceIndex:
    if cfg.data.path.endswith(".beton") and cfg.data.backend != "ffcv":
        raise ConfigError(f"data.path is an FFCV .beton ({cfg.data.path}): add --data.backend=ffcv (data.backend is "
                          f"{cfg.data.backend!r})")
    if cfg.data.backend == "ffcv":
        from pipeline.ffcv_backend import ffcv_index

        index = ffcv_index(cfg.data.path)
    else:
        index = load_index(cfg.data.path)
    if cfg.data.subset:
        index = index.subset(cfg.data.subset)
    return index


class Logger:
    """log.jsonl is the record; the console shows a rich progress bar on a terminal, plain lines otherwise."""

    def __init__(self, run_dir: Path, total_steps: int, first_step: int, use_bar: bool, enabled: bool = True):
        self.enabled = enabled  # rank 0 only
        self.file = open(run_dir / "log.jsonl", "a", encoding="utf-8") if enabled else None
        self.bar = None
        if use_bar and enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("[bold]PIC"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                TextColumn("{task.fields[info]}"), refresh_per_second=4)
            self.task = self.bar.add_task("train", total=total_steps, completed=first_step, info="")
            self.bar.start()

    def step(self, record: dict, show: bool) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()  # a killed run keeps its log up to the last line
        if self.bar is not None:
            info = (f"ep {record['epoch']:.2f} loss {record['loss']:.3f} lr {record['lr']:.4g} "
                    f"{record['img_s']:.0f} img/s wait {record['data_wait_pct']:.0f}%")
            self.bar.update(self.task, completed=record["step"] + 1, info=info)
        elif show:
            print(f"step {record['step'] + 1:>7} | epoch {record['epoch']:7.2f} | loss {record['loss']:.4f} | "
                  f"lr {record['lr']:.4g} | {record['img_s']:7.1f} img/s | data wait {record['data_wait_pct']:4.1f}%",
                  flush=True)

    def event(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        if self.file is not None:
            self.file.close()


# ============ checkpoints ============

def save_checkpoint(path: Path, cfg: Config, model, optimizer, step: int, steps_per_unit: int, nonfinite: int,
                    num_instances: int) -> None:
    """The whole training state at the start of step `step`; the previous checkpoint is kept (prev.pt)."""
    m = cfg.model
    atomic_save({
        "format": FORMAT, "config": to_dict(cfg), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "bank": model.bank.extra_state(),
        "progress": {"step": step, "unit": step // steps_per_unit, "batch": step % steps_per_unit,
                     "nonfinite": nonfinite},
        "meta": {"num_instances": num_instances, "arch": m.arch, "dim": m.dim, "git_sha": git_sha(),
                 "torch": str(torch.__version__)},
    }, path, keep_previous=True)


def find_resume_checkpoint(cfg: Config, run_dir: Path) -> tuple[dict | None, Path | None]:
    """run.resume: "" = none, "auto" = the run folder's last.pt (prev.pt if last.pt is missing or unreadable),
    else a path. Says what it does."""
    resume = "auto" if (dist.restarted() and not cfg.run.resume) else cfg.run.resume  # torchrun --max-restarts
    if not resume:
        return None, None
    if resume == "auto":
        ckpt, path, notes = load_latest(run_dir / "last.pt")
        for note in notes:
            print(note, flush=True)
        if path is not None and path.name != "last.pt" and (run_dir / "last.pt").exists() and dist.rank() == 0:
            # kept for inspection, and out of the way: the next save would otherwise rotate it over prev.pt
            os.replace(run_dir / "last.pt", run_dir / "last.pt.corrupt")
        if ckpt is None:
            print(f"run.resume=auto: no checkpoint in {run_dir}; starting fresh", flush=True)
        return ckpt, path
    return load(resume), Path(resume)


# ============ the run ============

def train(cfg: Config) -> dict:
    """Pre-train (and evaluate); returns the results dict (also written to results.json when evaluated)."""
    t_start = time.time()
    device = dist.init(cfg.run.device)  # torchrun: process group + this rank's device
    rank, world = dist.rank(), dist.world()
    main_rank = rank == 0
    configure_threads(cfg.run.threads)
    default_data(cfg)
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    run_dir.mkdir(parents=True, exist_ok=True)

    # ============ data ============
    index = build_index(cfg)
    n = len(index)
    if index.skipped:
        print(f"note: {len(index.skipped)} non-image or empty file(s) ignored, e.g. {index.skipped[0]}")
    res = resolve(cfg, n, world)
    if main_rank:
        for note in res.notes:
            print(note, flush=True)
        index.write_manifest(run_dir / "manifest.tsv")
        (run_dir / "config.json").write_text(json.dumps({"config": to_dict(cfg), "resolved": res.__dict__},
                                                        indent=2))
    # spec §3 (DDP): rank r keeps the fixed shard {i = r mod world} and slides W/world, S/world over it
    schedule = make_schedule(cfg.data.scheduler, n, res.window * world, res.stride * world, cfg.run.seed,
                             rank=rank, world_size=world)
    # same order seed on every rank (the schedule shards it); different augmentation randomness per rank
    loader_cfg = cfg if world == 1 else replace(cfg, run={"seed": seed_for(cfg.run.seed, rank)})
    bad_files = BadFiles(run_dir / "bad_files.tsv", index, rank=rank)  # undecodable images, named once per run
    loader = make_loader(loader_cfg, index, schedule, device, res.batch_per_rank, bad_files=bad_files)
    if len(loader) != res.steps_per_epoch:  # the loader owns a unit's length; the plan must agree with it
        raise RuntimeError(f"the {cfg.data.backend} loader has {len(loader)} batches per unit, the plan "
                           f"{res.steps_per_epoch}: a bug (see pipeline.base.LoaderBase)")

    # ============ model, optimizer, schedules ============
    lrs = lr_table(res.lr, res.warmup_steps, res.total_steps, cfg.optim.min_lr)
    m, p, o = cfg.model, cfg.pic, cfg.optim
    model = build_pic(m.arch, n, head_hidden=m.head_hidden, dim=m.dim, temperature=p.temperature,
                      init_std=p.init_std, momentum=o.momentum, weight_decay=o.weight_decay, negatives=p.negatives,
                      k=p.k, batch_size=cfg.data.batch_size, correction=p.correction, lr_history=lrs,
                      seed=cfg.run.seed, bn_groups=m.bn_groups)
    model.to(device)
    if p.bank_device == "cpu" and device.type == "cuda":
        model.bank.to("cpu")
    if m.channels_last:  # also on CPU: ~+8..30 % for convs there (INSTALL_NOTES)
        model.backbone.to(memory_format=torch.channels_last)
    params = list(model.backbone.parameters()) + list(model.head.parameters())
    optimizer = make_optimizer(params, res.lr, o.momentum, o.weight_decay, device)
    train_step = TrainStep(model, optimizer, device, m.amp, m.channels_last, m.compile, m.sync_bn)

    # ============ resume ============
    step, nonfinite = 0, 0
    ckpt_path = run_dir / "last.pt"
    ckpt, resumed_from = find_resume_checkpoint(cfg, run_dir)
    if ckpt is not None:
        check_compatible(ckpt, resumed_from, n, m.arch, m.dim)
        check_schedule_unchanged(ckpt, resumed_from, to_dict(cfg))
        model.load_state_dict(ckpt["model"])
        model.bank.load_extra_state(ckpt["bank"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, nonfinite = ckpt["progress"]["step"], ckpt["progress"]["nonfinite"]
        print(f"resumed from {resumed_from} at step {step}", flush=True)
        del ckpt
    t_saved, saved_at = time.time(), step

    def save() -> None:
        nonlocal t_saved, saved_at
        t_saved = time.time()
        train_step.save_requested = False
        # written once, by rank 0; loadable at any world size (the step is global); not twice for one step
        if main_rank and (saved_at != step or not ckpt_path.exists()):
            save_checkpoint(ckpt_path, cfg, model, optimizer, step, res.steps_per_epoch, nonfinite, n)
            saved_at = step

    def save_due() -> bool:
        return cfg.run.ckpt_minutes > 0 and time.time() - t_saved >= 60 * cfg.run.ckpt_minutes

    # ============ training loop ============
    if main_rank:
        print(f"PIC: {n} instances, {m.arch}, {cfg.data.backend} backend on {device}, batch {cfg.data.batch_size}, "
              f"{res.num_units} {'windows' if cfg.data.scheduler == 'window' else 'epochs'} x {res.steps_per_epoch} "
              f"steps = {res.total_steps} steps, lr {res.lr:.4g}, negatives {p.negatives}", flush=True)
    logger = Logger(run_dir, res.total_steps, step, use_bar=sys.stdout.isatty(), enabled=main_rank)
    if resumed_from is not None:  # steps after this checkpoint may be in the log already (a killed run): redone
        logger.event({"event": "resumed", "step": step, "from": str(resumed_from)})

    def epochs_at(s: int) -> float:  # epochs of data seen (with the window scheduler a unit is not an epoch)
        return s / res.steps_per_epoch if cfg.data.scheduler == "epoch" else s * cfg.data.batch_size / n
    stop_at = min(res.total_steps, step + cfg.run.max_steps) if cfg.run.max_steps else res.total_steps
    model.train()
    losses: list[float] = []
    pending: list[tuple[int, float, torch.Tensor]] = []  # (step, lr, loss) not yet read back
    loss_value = float("nan")
    images_seen, t_compute, t_wait, t_window = 0, 0.0, 0.0, time.time()
    stopped_by = 0
    first_step, t_loop = step, time.time()
    try:
        with StopFlag() as stop, ExitStack() as stack:
            try:
                while step < stop_at and not train_step.stop_requested:
                    # progress is (unit, batch): the unit's batches come from the loader, which owns their number
                    unit, start_batch = divmod(step, res.steps_per_epoch)
                    batches = loader.iter_epoch(unit, start_batch)
                    yielded, finished_unit = 0, True
                    t0 = time.perf_counter()
                    stack.callback(batches.close)  # on every way out: a stop signal, an error, the unit's end
                    while True:
                        with stop.interruptible():
                            batch = next(batches, None)
                        if batch is None:
                            break
                        yielded += 1
                        if batch.ids.shape[0] != res.batch_per_rank:
                            raise RuntimeError(f"the {cfg.data.backend} loader yielded a batch of "
                                               f"{batch.ids.shape[0]} images, not {res.batch_per_rank}: a bug")
                        t1 = time.perf_counter()
                        t_wait += t1 - t0
                        lr = float(lrs[step])
                        pending.append((step, lr, train_step(batch.images, batch.ids, batch.crops, step, lr,
                                                             stop=bool(stop.signum), save=save_due())))
                        step += 1
                        images_seen += len(batch.ids)
                        t0 = time.perf_counter()
                        t_compute += t0 - t1
                        log_now = step % cfg.run.log_every == 0 or step == stop_at
                        if log_now or not train_step.sync_free:  # sync-free (CUDA): read losses on log steps only
                            values = torch.stack([x[2] for x in pending])
                            if train_step.sync_free:  # under DDP: the mean over ranks (sync mode has it already),
                                values = dist.all_reduce_mean_(values)  # so every rank logs and stops alike
                            values = values.tolist()  # the one host sync
                            for (s_i, lr_i, _), v in zip(pending, values, strict=True):
                                loss_value = v
                                if math.isfinite(v):
                                    nonfinite = 0
                                    losses.append(v)
                                    continue
                                nonfinite += 1
                                logger.step({"step": s_i, "event": "nonfinite_loss", "loss": v, "lr": lr_i,
                                             "epoch": epochs_at(s_i + 1), "img_s": 0.0,
                                             "data_wait_pct": 0.0}, show=True)
                            pending.clear()
                            if nonfinite >= o.max_nonfinite:
                                save()
                                raise FloatingPointError(
                                    f"loss was non-finite {nonfinite} times in a row (last at step {step - 1}); "
                                    f"stopped. Checkpoint: {ckpt_path}. Lower optim.lr or check the data.")
                        if log_now:
                            train_step.poll(bool(stop.signum), save_due())
                            dt = time.time() - t_window
                            logger.step({"step": step - 1, "epoch": epochs_at(step), "loss": loss_value,
                                         "lr": lr, "img_s": images_seen / max(dt, 1e-9),
                                         "data_wait_pct": 100 * t_wait / max(t_wait + t_compute, 1e-9),
                                         "time": time.time() - t_start}, show=True)
                            images_seen, t_compute, t_wait, t_window = 0, 0.0, 0.0, time.time()
                        at_unit_end = step % res.steps_per_epoch == 0
                        if at_unit_end or train_step.save_requested or \
                                (cfg.run.ckpt_every and step % cfg.run.ckpt_every == 0):
                            save()
                        if step >= stop_at or train_step.stop_requested:  # all ranks agree (TrainStep)
                            finished_unit = at_unit_end
                            break
                    batches.close()
                    stack.pop_all()
                    if finished_unit and yielded != res.steps_per_epoch - start_batch:
                        raise RuntimeError(
                            f"the {cfg.data.backend} loader yielded {yielded} batches of unit {unit} from batch "
                            f"{start_batch}; {res.steps_per_epoch - start_batch} were planned: a bug in the backend "
                            f"(its contract: pipeline.base.LoaderBase)")
            except StopRequested:  # a signal while waiting for the loader: no step was half done
                train_step.stop_requested = True
            stopped_by = (stop.signum or signal.SIGTERM) if train_step.stop_requested else 0
    finally:
        logger.close()
    train_seconds = time.time() - t_loop
    if main_rank and bad_files.summary():
        print(bad_files.summary(), flush=True)
    if stopped_by:
        save()
        name = signal.Signals(stopped_by).name
        if main_rank:
            print(f"\n{name}: checkpoint saved at step {step} to {ckpt_path}; continue with --run.resume=auto")
        dist.shutdown()
        sys.exit(128 + stopped_by)
    save()
    if step < res.total_steps or not main_rank:
        dist.shutdown()
        if not main_rank:
            return {"step": step, "losses": losses}
        print(f"stopped after run.max_steps at step {step}/{res.total_steps}; checkpoint {ckpt_path}")
        return {"step": step, "losses": losses}

    # ============ export and evaluation ============
    model.bank.bring_up_to_date(step)
    torch.save(backbone_state(model, m.arch), run_dir / "backbone.pt")
    final_loss = float(np.mean(losses[-max(1, res.steps_per_epoch):])) if losses else float("nan")
    results = {"final_loss": final_loss, "ln_num_instances": math.log(n), "num_instances": n,
               "epochs": cfg.optim.epochs, "steps": step, "device": str(device), "arch": m.arch,
               "backend": cfg.data.backend, "git_sha": git_sha(), "train_seconds": train_seconds,
               "images_per_second": (step - first_step) * cfg.data.batch_size / max(train_seconds, 1e-9),
               "bad_files": bad_files.total(), "losses": losses}
    if cfg.run.eval != "none":
        from eval.report import evaluate_run

        results.update(evaluate_run(cfg, model, index, device))
    results["seconds"] = time.time() - t_start
    (run_dir / "results.json").write_text(json.dumps({k: v for k, v in results.items() if k != "losses"}, indent=2))
    dist.shutdown()
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        from config import help_text

        print(__doc__ + "\n" + help_text())
        return 0
    try:
        cfg = parse_args(argv)
        train(cfg)
    except (ConfigError, DataError, CheckpointError, BackendUnavailable, dist.DeviceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before the loop took over the signals (start-up), or a second Ctrl-C
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
