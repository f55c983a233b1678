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
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from config import Config, ConfigError, Resolved, check_values, parse_args, replace, resolve, to_dict
from eval.monitor import Monitor
from model import distributed as dist
from model.bank import BankError, BankOptions
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
from model.folder_lock import lock_folder, unlock
from model.trainer import Trainer, build_trainer
from pipeline import BackendUnavailable, make_loader
from pipeline.augment import seed_for
from pipeline.base import BadFiles, Loader
from pipeline.dataset import DataError, InstanceIndex, load_index
from pipeline.schedule import make_schedule

DEFAULT_DATA_ROOT = Path(__file__).resolve().parent / "data" / "sample"


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
    """torch's intra-op pool and numba's (the lazy correction kernel) from one number, so that the two pools do not
    oversubscribe the same cores. 0 = the cores / processes on this node."""
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
    if cfg.data.backend == "ffcv":  # a .beton given to another backend: `read_file_list` says what to add
        from pipeline.ffcv_backend import ffcv_index

        index = ffcv_index(cfg.data.path)
    else:
        index = load_index(cfg.data.path)
    if cfg.data.subset:
        index = index.subset(cfg.data.subset)
    return index


class Logger:
    """log.jsonl is the record (flushed at every line); the console shows a rich progress bar on a terminal, plain
    lines otherwise. Also times the loop: the wait for data against the step."""

    def __init__(self, run_dir: Path, plan: Resolved, cfg: Config, first_step: int, resumed_from: Path | None,
                 t_start: float, enabled: bool = True):
        self.enabled, self.plan, self.cfg = enabled, plan, cfg  # enabled: rank 0 only
        self.file = open(run_dir / "log.jsonl", "a", encoding="utf-8") if enabled else None
        self.bar = None
        self.tb = None  # TensorBoard scalars (run.tensorboard)
        self.nonfinite = 0  # non-finite losses seen by this invocation (a TensorBoard curve)
        self.t_start = t_start  # the log's "time": seconds since train() started
        self.images, self.t_compute, self.t_wait, self.t_window = 0, 0.0, 0.0, time.time()
        self.t0 = self.t1 = time.perf_counter()
        if not enabled:
            return
        d, p = cfg.data, cfg.pic
        print(f"PIC: {plan.num_instances} instances, {cfg.model.arch}, {d.backend} backend, batch {d.batch_size}, "
              f"{plan.num_units} {'windows' if d.scheduler == 'window' else 'epochs'} x {plan.steps_per_epoch} "
              f"steps = {plan.total_steps} steps, lr {plan.lr:.4g}, negatives {p.negatives}", flush=True)
        if resumed_from is not None:  # steps after this checkpoint may be in the log already (a killed run): redone
            self.event({"event": "resumed", "step": first_step, "from": str(resumed_from)})
        if cfg.run.tensorboard:
            from eval.tensorboard_log import Scalars

            self.tb = Scalars(run_dir)
        if sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("[bold]PIC"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                TextColumn("{task.fields[info]}"), refresh_per_second=4)
            self.task = self.bar.add_task("train", total=plan.total_steps, completed=first_step, info="")
            self.bar.start()

    def epochs_at(self, step: int) -> float:
        """Epochs of data seen after `step` steps (with the window scheduler a unit is not an epoch)."""
        if self.cfg.data.scheduler == "epoch":
            return step / self.plan.steps_per_epoch
        return step * self.cfg.data.batch_size / self.plan.num_instances

    def unit_start(self) -> None:
        """The wait for a unit's first batch starts here (not at the last step: a unit-end checkpoint and closing
        the previous unit's loader are not waiting for data)."""
        self.t0 = time.perf_counter()

    def data_ready(self) -> None:
        self.t1 = time.perf_counter()
        self.t_wait += self.t1 - self.t0

    def count(self, images: int) -> None:
        self.t0 = time.perf_counter()
        self.t_compute += self.t0 - self.t1
        self.images += images

    def log(self, step: int, loss: float, lr: float, images: int) -> None:
        """After step `step - 1`: one line for the window since the last log step."""
        self.count(images)
        dt = time.time() - self.t_window
        self.step({"step": step - 1, "epoch": self.epochs_at(step), "loss": loss, "lr": lr,
                   "img_s": self.images / max(dt, 1e-9),
                   "data_wait_pct": 100 * self.t_wait / max(self.t_wait + self.t_compute, 1e-9),
                   "time": time.time() - self.t_start})
        self.images, self.t_compute, self.t_wait, self.t_window = 0, 0.0, 0.0, time.time()

    def step(self, record: dict) -> None:
        if not self.enabled:
            return
        self.event(record)
        self.nonfinite += record.get("event") == "nonfinite_loss"
        if self.tb is not None and "event" not in record:
            from eval.tensorboard_log import TRAIN_TAGS

            self.tb.write({**record, "nonfinite": self.nonfinite}, TRAIN_TAGS, record["step"] + 1)
        if self.bar is not None:
            info = (f"ep {record['epoch']:.2f} loss {record['loss']:.3f} lr {record['lr']:.4g} "
                    f"{record['img_s']:.0f} img/s wait {record['data_wait_pct']:.0f}%")
            self.bar.update(self.task, completed=record["step"] + 1, info=info)
        else:
            print(f"step {record['step'] + 1:>7} | epoch {record['epoch']:7.2f} | loss {record['loss']:.4f} | "
                  f"lr {record['lr']:.4g} | {record['img_s']:7.1f} img/s | data wait {record['data_wait_pct']:4.1f}%",
                  flush=True)

    def monitor(self, record: dict) -> None:
        """A monitor point (eval.monitor): log.jsonl, one console line, TensorBoard. Its time is not the
        training's: the img/s window and the data-wait clock skip it."""
        self.t_window += record["seconds"]
        self.t0 += record["seconds"]
        if not self.enabled:
            return
        from eval.monitor import monitor_line

        self.event({**record, "time": time.time() - self.t_start})
        print(monitor_line(record), flush=True)
        if self.tb is not None:
            from eval.tensorboard_log import MONITOR_TAGS

            self.tb.write(record, MONITOR_TAGS, record["step"])

    def event(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()  # a killed run keeps its log up to the last line

    def __enter__(self) -> Logger:
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


# ============ data, checkpoints, loss read-back ============

@dataclass
class Data:
    index: InstanceIndex
    plan: Resolved  # steps per unit, units, warm-up, lr, window (config.resolve)
    loader: Loader
    bad_files: BadFiles


def prepare_data(cfg: Config, run_dir: Path, device: torch.device) -> Data:
    """Index, plan, schedule and loader of this rank; writes manifest.tsv and config.json (config, plan and the
    environment: rank 0)."""
    rank, world = dist.rank(), dist.world()
    index = build_index(cfg)
    if index.skipped and rank == 0:
        print(f"note: {len(index.skipped)} non-image or empty file(s) ignored, e.g. {index.skipped[0]}")
    plan = resolve(cfg, len(index), world)
    if rank == 0:
        for note in plan.notes:
            print(note, flush=True)
        index.write_manifest(run_dir / "manifest.tsv")
        from benchmarks.common import env_record  # provenance: versions, git sha, CPU/GPU (eval.report shows it)

        (run_dir / "config.json").write_text(json.dumps({"config": to_dict(cfg), "resolved": plan.__dict__,
                                                         "env": env_record()}, indent=2))
    # spec §3 (DDP): rank r keeps the fixed shard {i = r mod world} and slides W/world, S/world over it
    schedule = make_schedule(cfg.data.scheduler, len(index), plan.window * world, plan.stride * world,
                             cfg.run.seed, rank=rank, world_size=world)
    # same order seed on every rank (the schedule shards it); different augmentation randomness per rank
    loader_cfg = cfg if world == 1 else replace(cfg, run={"seed": seed_for(cfg.run.seed, rank)})
    bad_files = BadFiles(run_dir / "bad_files.tsv", index, rank=rank)  # undecodable images, named once per run
    loader = make_loader(loader_cfg, index, schedule, device, plan.batch_per_rank, bad_files=bad_files)
    if len(loader) != plan.steps_per_epoch:  # the loader owns a unit's length; the plan must agree with it
        raise RuntimeError(f"the {cfg.data.backend} loader has {len(loader)} batches per unit, the plan "
                           f"{plan.steps_per_epoch}: a bug (see pipeline.base.LoaderBase)")
    return Data(index, plan, loader, bad_files)


def plan_facts(plan: Resolved) -> dict[str, int | str]:
    """What fixes the lr history and the data order, besides the config keys (a resume with other values is
    refused)."""
    return {"steps_per_unit": plan.steps_per_epoch, "total_steps": plan.total_steps,
            "warmup_steps": plan.warmup_steps, "order": plan.order}


def save_checkpoint(path: Path, cfg: Config, trainer: Trainer, bank: dict, step: int, plan: Resolved, nonfinite: int,
                    num_instances: int) -> None:
    """The whole training state at the start of step `step` (bank: the bank's, InstanceBank.checkpoint); the
    previous checkpoint is kept (prev.pt)."""
    m = cfg.model
    atomic_save({
        "format": FORMAT, "config": to_dict(cfg), "model": trainer.model.state_dict(),
        "optimizer": trainer.optimizer.state_dict(), "bank": bank,
        "progress": {"step": step, "unit": step // plan.steps_per_epoch, "batch": step % plan.steps_per_epoch,
                     "nonfinite": nonfinite},
        "meta": {"num_instances": num_instances, "arch": m.arch, "dim": m.dim, "git_sha": git_sha(),
                 "torch": str(torch.__version__), "plan": plan_facts(plan)},
    }, path, keep_previous=True)


class Checkpointer:
    """When and what to save: every unit's end, every run.ckpt_every steps, every run.ckpt_minutes minutes (all
    ranks agree through TrainStep.save_requested), and on exit; written by rank 0 only, never twice per step."""

    def __init__(self, cfg: Config, run_dir: Path, trainer: Trainer, data: Data, step: int):
        self.cfg, self.trainer, self.data = cfg, trainer, data
        self.path = run_dir / "last.pt"
        self.saved_at, self.t_saved = step, time.time()

    def due(self) -> bool:  # this rank's clock; TrainStep makes it a decision of all ranks
        minutes = self.cfg.run.ckpt_minutes
        return minutes > 0 and time.time() - self.t_saved >= 60 * minutes

    def maybe_save(self, step: int, nonfinite: int) -> None:
        every = self.cfg.run.ckpt_every
        if step % self.data.plan.steps_per_epoch == 0 or self.trainer.step.save_requested or \
                (every and step % every == 0):
            self.save(step, nonfinite)

    def save(self, step: int, nonfinite: int) -> None:
        self.t_saved = time.time()
        self.trainer.step.save_requested = False
        bank = self.trainer.model.bank.checkpoint(step)  # every rank: an mmap bank flushes, starts a journal
        if dist.rank() == 0 and (self.saved_at != step or not self.path.exists()):
            save_checkpoint(self.path, self.cfg, self.trainer, bank, step, self.data.plan, nonfinite,
                            len(self.data.index))
            self.saved_at = step


class LossReadback:
    """Losses stay on the device until a log step (sync-free CUDA: the loop's one host sync), then are read
    back, averaged over ranks (so every rank logs and stops alike), and non-finite ones counted."""

    def __init__(self, cfg: Config, logger: Logger, nonfinite: int = 0):
        self.cfg, self.logger = cfg, logger
        self.pending: list[tuple[int, float, torch.Tensor]] = []  # (step, lr, loss) not yet read back
        self.losses: list[float] = []
        self.last = float("nan")
        self.nonfinite = nonfinite  # consecutive non-finite losses

    def add(self, step: int, lr: float, loss: torch.Tensor, read_now: bool, sync_free: bool) -> None:
        self.pending.append((step, lr, loss))
        if not read_now:
            return
        values = torch.stack([x[2] for x in self.pending])
        if sync_free:  # under DDP the mean over ranks (sync mode has it already)
            values = dist.all_reduce_mean_(values)
        for (s, lr_s, _), v in zip(self.pending, values.tolist(), strict=True):
            self.last = v
            if math.isfinite(v):
                self.nonfinite = 0
                self.losses.append(v)
                continue
            self.nonfinite += 1
            self.logger.step({"step": s, "event": "nonfinite_loss", "loss": v, "lr": lr_s,
                              "epoch": self.logger.epochs_at(s + 1), "img_s": 0.0, "data_wait_pct": 0.0})
        self.pending.clear()

    def too_many_nonfinite(self) -> bool:
        return self.nonfinite >= self.cfg.optim.max_nonfinite


def effective_resume(cfg: Config) -> str:
    """run.resume, except that a worker torchrun restarted (--max-restarts) continues its run: "auto"."""
    return "auto" if (dist.restarted() and not cfg.run.resume) else cfg.run.resume


RUN_FILES = ("last.pt", "prev.pt", "log.jsonl")  # what makes a folder hold a run (an empty log.jsonl does not)


def check_fresh_run_folder(cfg: Config, run_dir: Path) -> None:
    """A fresh run must not start in a folder that holds a run: it would replace last.pt, append to log.jsonl and
    read bad_files.tsv of the other run, so that the two mix. A resume (or a torchrun restart) continues it."""
    if effective_resume(cfg):
        return
    held = [n for n in RUN_FILES if (run_dir / n).is_file() and (n != "log.jsonl" or (run_dir / n).stat().st_size)]
    if held:
        raise ConfigError(f"run folder {run_dir} already holds a run ({', '.join(held)}): continue it with "
                          f"--run.resume=auto, pick another --run.name, or delete the folder to start over")


def find_resume_checkpoint(cfg: Config, run_dir: Path) -> tuple[dict | None, Path | None]:
    """run.resume: "" = none, "auto" = the run folder's last.pt (prev.pt if last.pt is missing or unreadable),
    else a path. Says what it does."""
    resume = effective_resume(cfg)
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


def check_resumable(cfg: Config, ckpt: dict, path: Path, data: Data) -> None:
    """Everything that refuses a checkpoint, before the model and its bank are built (an mmap bank of 10⁸ rows is
    52 GB and minutes to initialise: a refused resume must not make one)."""
    check_compatible(ckpt, path, len(data.index), cfg.model.arch, cfg.model.dim)
    check_schedule_unchanged(ckpt, path, to_dict(cfg), plan_facts(data.plan))


def resumed_at(ckpt: dict | None, path: Path | None) -> tuple[int, int]:
    """(step, non-finite count) of the checkpoint the trainer was built from (0, 0: a fresh start)."""
    if ckpt is None:
        return 0, 0
    if dist.rank() == 0:
        print(f"resumed from {path} at step {ckpt['progress']['step']}", flush=True)
    return ckpt["progress"]["step"], ckpt["progress"]["nonfinite"]


def next_batch(batches, stop: StopFlag, cfg: Config, plan: Resolved):
    """The loader's next batch, or None at the unit's end; a signal while waiting raises StopRequested."""
    with stop.interruptible():
        batch = next(batches, None)
    if batch is not None and batch.ids.shape[0] != plan.batch_per_rank:
        raise RuntimeError(f"the {cfg.data.backend} loader yielded a batch of {batch.ids.shape[0]} images, not "
                           f"{plan.batch_per_rank}: a bug in the backend (its contract: pipeline.base.LoaderBase)")
    return batch


def check_unit_length(cfg: Config, plan: Resolved, unit: int, start_batch: int, yielded: int) -> None:
    """A unit that ends early is a bug of the loader: an error naming it, never a loop asking again forever."""
    if yielded != plan.steps_per_epoch - start_batch:
        raise RuntimeError(f"the {cfg.data.backend} loader yielded {yielded} batches of unit {unit} from batch "
                           f"{start_batch}; {plan.steps_per_epoch - start_batch} were planned: a bug in the "
                           f"backend (its contract: pipeline.base.LoaderBase)")


# ============ the run ============

def train(cfg: Config) -> dict:
    """Pre-train (and evaluate); returns the results dict (also written to results.json when evaluated)."""
    trainers: list = []  # closed however the run ends: a host bank's shared memory is removed (last.pt holds it)
    locks: list = []  # the run folder's lock (rank 0), released when the run ends (and by the kernel on a kill)
    try:
        return _train(cfg, trainers, locks)
    finally:
        for trainer in trainers:
            trainer.close()  # each node's writer removes its node's copy
        for fd in locks:
            unlock(fd)


def _train(cfg: Config, trainers: list, locks: list) -> dict:
    t_start = time.time()
    device = dist.init(cfg.run.device)  # torchrun: process group + this rank's device
    main_rank = dist.rank() == 0
    if cfg.run.tensorboard:  # every rank: all stop alike, before any work, when the package is missing
        from eval.tensorboard_log import require

        require()
    configure_threads(cfg.run.threads)
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    check_values(cfg)  # every rank: all stop alike, before anything is indexed or written
    BankOptions.from_config(cfg)  # the bank's options: refused combinations, before any work
    check_fresh_run_folder(cfg, run_dir)
    default_data(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    if dist.rank() == 0:  # one process per run folder: a second one (a resume of a live run) is refused
        locks.append(lock_folder(run_dir, "run folder", CheckpointError))
    data = prepare_data(cfg, run_dir, device)
    plan, n = data.plan, len(data.index)
    found = find_resume_checkpoint(cfg, run_dir)
    if found[0] is not None:
        check_resumable(cfg, *found, data)
        if found[0]["progress"]["step"] >= plan.total_steps and (run_dir / "results.json").is_file():
            return complete_run(run_dir, found[0]["progress"]["step"], plan)
    trainer = build_trainer(cfg, n, device, plan=plan, run_dir=run_dir,
                            checkpoint=found if found[0] is not None else None,
                            continuing=effective_resume(cfg) == "auto")
    trainers.append(trainer)
    step, nonfinite = resumed_at(*found)
    resumed_from = found[1]
    ckpt = Checkpointer(cfg, run_dir, trainer, data, step)
    logger = Logger(run_dir, plan, cfg, step, resumed_from, t_start, enabled=main_rank)
    readback = LossReadback(cfg, logger, nonfinite)
    monitor = Monitor.build(cfg, data.index, plan, device) if main_rank else None  # rank 0 evaluates, alone
    stop_at = min(plan.total_steps, step + cfg.run.max_steps) if cfg.run.max_steps else plan.total_steps
    trainer.model.train()
    first_step, t_loop = step, time.time()
    with StopFlag() as stop, logger:
        try:
            if monitor is not None and step == 0:  # the starting point of the curve
                logger.monitor(monitor.measure(trainer.model, 0, 0.0))
            while step < stop_at and not trainer.step.stop_requested:
                unit, start_batch = divmod(step, plan.steps_per_epoch)  # progress is (unit, batch)
                with closing(data.loader.iter_epoch(unit, start_batch)) as batches:
                    logger.unit_start()
                    yielded = 0
                    while batch := next_batch(batches, stop, cfg, plan):
                        logger.data_ready()
                        lr = float(trainer.lrs[step])
                        loss = trainer.step(batch.images, batch.ids, batch.crops, step, lr, stop=bool(stop.signum),
                                            save=ckpt.due(), ids_host=batch.ids_host)
                        step, yielded = step + 1, yielded + 1
                        log_now = step % cfg.run.log_every == 0 or step == stop_at
                        readback.add(step - 1, lr, loss, log_now or not trainer.step.sync_free,
                                     trainer.step.sync_free)
                        if readback.too_many_nonfinite():
                            ckpt.save(step, readback.nonfinite)
                            raise FloatingPointError(
                                f"loss was non-finite {readback.nonfinite} times in a row (last at step {step - 1});"
                                f" stopped. Checkpoint: {ckpt.path}. Lower optim.lr or check the data.")
                        if log_now:
                            trainer.step.poll(bool(stop.signum), ckpt.due())
                            logger.log(step, readback.last, lr, len(batch.ids))
                        else:
                            logger.count(len(batch.ids))
                        ckpt.maybe_save(step, readback.nonfinite)
                        if monitor is not None and monitor.due(step):
                            logger.monitor(monitor.measure(trainer.model, step, logger.epochs_at(step)))
                        if step >= stop_at or trainer.step.stop_requested:  # all ranks agree (TrainStep)
                            break
                    else:  # the unit ran out: it must have yielded what the loader promised
                        check_unit_length(cfg, plan, unit, start_batch, yielded)
        except StopRequested:  # a signal while waiting for the loader: no step was half done
            trainer.step.stop_requested = True
        stopped_by = (stop.signum or signal.SIGTERM) if trainer.step.stop_requested else 0
    train_seconds = time.time() - t_loop
    ckpt.save(step, readback.nonfinite)
    if monitor is not None and monitor.points:
        print(monitor.cost_line(train_seconds), flush=True)
    if main_rank and data.bad_files.summary():
        print(data.bad_files.summary(), flush=True)
    if stopped_by:
        if main_rank:
            print(f"\n{signal.Signals(stopped_by).name}: checkpoint saved at step {step} to {ckpt.path}; continue "
                  f"with --run.resume=auto")
        dist.shutdown()
        sys.exit(128 + stopped_by)
    if step < plan.total_steps or not main_rank:
        dist.shutdown()
        if main_rank:
            print(f"stopped after run.max_steps at step {step}/{plan.total_steps}; checkpoint {ckpt.path}")
        return {"step": step, "losses": readback.losses}
    results = finish(cfg, run_dir, trainer, data, device, step, readback.losses, train_seconds,
                     (step - first_step) * cfg.data.batch_size / max(train_seconds, 1e-9))
    if monitor is not None:
        results.update(monitor.summary(train_seconds))
    results["seconds"] = time.time() - t_start
    (run_dir / "results.json").write_text(json.dumps({k: v for k, v in results.items() if k != "losses"}, indent=2))
    dist.shutdown()
    return results


def complete_run(run_dir: Path, step: int, plan: Resolved) -> dict:
    """A resume of a run that has trained and been evaluated (`make demo` a second time): nothing to do. Its
    results.json stays as it was (redoing the evaluation would rewrite it without the training's losses and
    times); the saved results are returned and shown."""
    results = json.loads((run_dir / "results.json").read_text())
    if dist.rank() == 0:
        shown = ", ".join(f"{k} {results[k]:.2f}" for k in ("retrieval_top1", "knn_top1", "final_loss")
                          if isinstance(results.get(k), int | float))
        print(f"{run_dir} is a complete run (step {step}/{plan.total_steps}): nothing to train. Its results "
              f"({run_dir / 'results.json'}): {shown or 'no metrics'}. To train it again, delete {run_dir} or pick "
              f"another --run.name", flush=True)
    dist.shutdown()
    return results


def finish(cfg: Config, run_dir: Path, trainer: Trainer, data: Data, device: torch.device, step: int,
           losses: list[float], train_seconds: float, images_per_second: float) -> dict:
    """The end of a complete run: bring every bank row up to date, export backbone.pt, evaluate."""
    model, n = trainer.model, len(data.index)
    model.bank.bring_up_to_date(step)
    torch.save(backbone_state(model, cfg.model.arch), run_dir / "backbone.pt")
    final_loss = float(np.mean(losses[-max(1, data.plan.steps_per_epoch):])) if losses else float("nan")
    results = {"final_loss": final_loss, "ln_num_instances": math.log(n), "num_instances": n,
               "epochs": cfg.optim.epochs, "steps": step, "device": str(device), "arch": cfg.model.arch,
               "backend": cfg.data.backend, "git_sha": git_sha(), "train_seconds": train_seconds,
               "images_per_second": images_per_second, "bad_files": data.bad_files.total(), "losses": losses}
    if cfg.run.eval != "none":
        from eval.final import evaluate_run

        results.update(evaluate_run(cfg, model, data.index, device))
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
    except (ConfigError, DataError, CheckpointError, BankError, BackendUnavailable, dist.DeviceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before the loop took over the signals (start-up), or a second Ctrl-C
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
