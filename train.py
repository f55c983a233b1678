"""PIC pre-training.

    python train.py --preset=demo                              # built-in digits, tiny CNN, a few minutes on a CPU
    python train.py --data.path=/imagenet/train --model.arch=resnet50 --data.scheduler=window --pic.negatives=recent
    python train.py --config=my.yaml --optim.epochs=400 --run.resume=auto

Config: see config.py (`python train.py --help` lists every key). A run folder `runs/NAME/` gets config.json,
manifest.tsv (instance id <-> file), log.jsonl, last.pt (atomic), backbone.pt and, when labels are known,
results.json.
"""

from __future__ import annotations

import gc
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

from config import Config, ConfigError, check_values, parse_args, to_dict
from eval.monitor import Monitor
from model import distributed as dist
from model.bank import BankError, BankOptions, InstanceBank
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
from pipeline import BackendUnavailable, backend_unavailable, make_loader
from pipeline.base import BadFiles, Loader
from pipeline.dataset import DataError, InstanceIndex, load_index
from pipeline.decode import require_decodable
from pipeline.manifest import IndexResume, resume_index, write_run_manifest
from pipeline.schedule import RankSchedule, make_schedule
from plan import Resolved, resolve

DEFAULT_DATA_ROOT = Path(__file__).resolve().parent / "data" / "sample"


# ============ small helpers ============

class StopRequested(Exception):
    """Raised by the first SIGINT/SIGTERM while the loop waits for its loader (see StopFlag.interruptible)."""


class NonFiniteLosses(FloatingPointError):
    """The run gave no trained model: its final losses were non-finite (one `error:` line, exit 1)."""


class LeftAlone(KeyboardInterrupt):
    """A second SIGINT/SIGTERM: this process leaves at once, without a checkpoint (RunResources.abandon)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class StopFlag:
    """SIGINT/SIGTERM: all ranks stop before the same step, rank 0 saves a checkpoint, every rank exits with the
    resume hint.

    The first signal only sets a flag, which the next step's vote (TrainStep.vote) hands to every rank, so the
    weights are never left half-updated and no rank leaves the others in a collective. While the loop waits for its
    loader (which may be slow, or stuck on a dead worker) the signal also ends that wait (StopRequested) and the rank
    votes without a batch: the first signal is honoured within seconds wherever the process is. A second signal
    leaves at once, alone (LeftAlone)."""

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
        if self.signum:
            raise LeftAlone(signum)
        self.signum = signum
        # os.write: a print could re-enter the stream that the interrupted code was writing to
        who, name = f"rank {dist.rank()}: " if dist.active() else "", signal.Signals(signum).name
        os.write(2, f"\n{who}{name}: stopping before the next step and saving a checkpoint; a second {name} leaves "
                    f"at once without one\n".encode())
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


def build_index(cfg: Config, found: tuple[dict | None, Path | None] = (None, None)
                ) -> tuple[InstanceIndex, IndexResume | None]:
    """The instance index this run trains on: of the data as they are for a fresh run; of the run's own
    manifest.tsv for a resumed one (`found`: find_resume_checkpoint), with what changed since (pipeline.manifest)."""
    d = cfg.data
    if d.backend == "ffcv" and Path(d.path).is_dir():
        raise DataError(f"data.path={d.path} is a folder; the ffcv backend reads a .beton: convert it once with "
                        f"python -m pipeline.convert_ffcv {d.path} OUT.beton, then pass --data.path=OUT.beton")
    if d.backend == "ffcv":  # a .beton given to another backend: `read_file_list` says what to add
        if why := backend_unavailable("ffcv"):
            raise BackendUnavailable(why)
        from pipeline.beton import beton_index

        index = beton_index(d.path, d.ffcv_image_field, d.ffcv_label_field)
        if index.images.note and dist.rank() == 0:  # a .beton without our sidecars: what was assumed
            print(index.images.note, flush=True)
    else:
        index = load_index(d.path, key="data.path")
    if d.subset:
        index = index.subset(d.subset)
    if len(index) < d.batch_size and d.backend != "ffcv":  # refused below for its size: is anything decodable?
        require_decodable(index)
    ckpt, path = found
    if ckpt is None:
        return index, None
    old_subset = ckpt.get("config", {}).get("data", {}).get("subset", 0)
    if old_subset != d.subset:
        raise CheckpointError(f"{path} was trained with data.subset={old_subset}; this run asks {d.subset}. A resume "
                              f"trains on its run's index (manifest.tsv): keep --data.subset={old_subset}, or start a "
                              f"new run (another --run.name)")
    resumed = resume_index(Path(path).parent, index, ckpt["meta"].get("index"), data=d.path,
                           fixed_ids=d.backend == "ffcv", subset=bool(d.subset))
    return resumed.index, resumed


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
        self.profiler = None  # run.profile: a torch.profiler trace of some steps (eval.step_profile)
        if not enabled:
            return
        if cfg.run.profile:
            from eval.step_profile import StepProfiler

            self.profiler = StepProfiler(run_dir, cfg.run.profile)
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
        if self.profiler is not None:
            self.profiler.waiting()

    def data_ready(self) -> None:
        self.t1 = time.perf_counter()
        self.t_wait += self.t1 - self.t0
        if self.profiler is not None:
            self.profiler.data_ready()

    def count(self, images: int) -> None:
        self.t0 = time.perf_counter()
        self.t_compute += self.t0 - self.t1
        self.images += images
        if self.profiler is not None:
            self.profiler.step_done()
            self.profiler.waiting()

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
        if self.profiler is not None:
            self.profiler.close()
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
    plan: Resolved  # steps per unit, units, warm-up, lr, window (plan.resolve)
    loader: Loader
    bad_files: BadFiles


def prepare_data(cfg: Config, run_dir: Path, device: torch.device,
                 found: tuple[dict | None, Path | None] = (None, None)) -> Data:
    """Index, plan, schedule and loader of this rank; writes manifest.tsv and config.json (config, plan and the
    environment: rank 0). found: the checkpoint a resume starts from (its run's manifest is the index)."""
    rank, world = dist.rank(), dist.world()
    index, resumed = build_index(cfg, found)
    if index.skipped and rank == 0:
        print(f"note: {len(index.skipped)} non-image or empty file(s) ignored, e.g. {index.skipped[0]}")
    plan = resolve(cfg, len(index), world)
    if rank == 0:
        for note in plan.notes + tuple(resumed.notes if resumed else ()):
            print(note, flush=True)
        if resumed is None or not same_file(resumed.manifest, run_dir / "manifest.tsv"):
            write_run_manifest(index, run_dir)
        from provenance import env_record  # versions, git sha, CPU/GPU (eval.report shows it)

        (run_dir / "config.json").write_text(json.dumps({"config": to_dict(cfg), "resolved": plan.__dict__,
                                                         "env": env_record()}, indent=2))
    # one global order per unit (a function of the seed and the unit alone); this rank takes its slice of every
    # global batch, and the loaders draw each sample's augmentation for its place in the global batch: the same
    # global batches, augmentations included, at any world size
    schedule = RankSchedule(make_schedule(cfg.data.scheduler, len(index), plan.window, plan.stride, cfg.run.seed),
                            cfg.data.batch_size, rank, world)
    bad_files = BadFiles(run_dir / "bad_files.tsv", index, rank=rank)  # undecodable images, named once per run
    if resumed is not None:  # files gone or replaced since the run started
        bad_files.record(resumed.bad, write=rank == 0)
    loader = make_loader(cfg, index, schedule, device, plan.batch_per_rank, bad_files=bad_files)
    if len(loader) != plan.steps_per_epoch:  # the loader owns a unit's length; the plan must agree with it
        raise RuntimeError(f"the {cfg.data.backend} loader has {len(loader)} batches per unit, the plan "
                           f"{plan.steps_per_epoch}: a bug (see pipeline.base.LoaderBase)")
    return Data(index, plan, loader, bad_files)


def same_file(a: Path | None, b: Path) -> bool:
    return a is not None and a.exists() and b.exists() and os.path.samefile(a, b)


def plan_facts(plan: Resolved) -> dict[str, int | str]:
    """What fixes the lr history and the data order, besides the config keys (a resume with other values is
    refused)."""
    return {"steps_per_unit": plan.steps_per_epoch, "total_steps": plan.total_steps,
            "warmup_steps": plan.warmup_steps, "order": plan.order}


def save_checkpoint(path: Path, cfg: Config, trainer: Trainer, bank: dict, step: int, plan: Resolved, nonfinite: int,
                    index: InstanceIndex) -> None:
    """The whole training state at the start of step `step` (bank: the bank's, InstanceBank.checkpoint); the
    previous checkpoint is kept (prev.pt)."""
    m = cfg.model
    atomic_save({
        "format": FORMAT, "config": to_dict(cfg), "model": trainer.model.state_dict(),
        "optimizer": trainer.optimizer.state_dict(), "bank": bank,
        "scaler": trainer.step.scaler_state(),
        "progress": {"step": step, "unit": step // plan.steps_per_epoch, "batch": step % plan.steps_per_epoch,
                     "nonfinite": nonfinite},
        "meta": {"num_instances": len(index), "arch": m.arch, "dim": m.dim, "git_sha": git_sha(),
                 "torch": str(torch.__version__), "plan": plan_facts(plan),
                 "index": index.digest},  # a resume's manifest must be this index (pipeline.manifest)
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
        if dist.rank() == 0:  # the other ranks' bad files, into the run's one list
            self.data.bad_files.merge()
        if dist.rank() == 0 and (self.saved_at != step or not self.path.exists()):
            save_checkpoint(self.path, self.cfg, self.trainer, bank, step, self.data.plan, nonfinite, self.data.index)
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


def make_run_folder(cfg: Config, run_dir: Path) -> None:
    """out_dir/name, or one error line naming run.out_dir when it cannot be made (a file is in the way, no
    permission, a read-only disk)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"run.out_dir={cfg.run.out_dir}: the run folder {run_dir} cannot be made here "
                          f"({e.strerror or e}); pick another run.out_dir") from None


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


NO_BATCH = object()  # next_batch: a signal ended the wait; the rank votes to stop without a batch


def next_batch(batches, stop: StopFlag, cfg: Config, plan: Resolved):
    """The loader's next batch, None at the unit's end, or NO_BATCH when a signal ended the wait."""
    try:
        with stop.interruptible():
            batch = next(batches, None)
    except StopRequested:
        return NO_BATCH
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

class RunResources:
    """What a run holds that must be let go however it ends. `release` is the one teardown, on every exit (success,
    agreed stop, error), in an order that cannot deadlock: queued device work is waited for, the DDP wrapper is
    dropped while the process groups still exist (model.distributed.shutdown says why), then the shared-memory
    banks go (last.pt holds their rows), then every process group, and the run folder's lock last."""

    def __init__(self):
        self.device: torch.device | None = None
        self.trainer: Trainer | None = None
        self.bank: InstanceBank | None = None  # a host bank's shared memory: each node's writer removes its copy
        self.locks: list[int] = []  # the run folder's (rank 0); the kernel drops it too when a process is killed
        self.loaders: list = []  # their worker processes/threads end with the run, however it ends
        self.checkpoint: Path | None = None

    def release(self) -> None:
        for loader in self.loaders:  # first: a worker must not outlive an error, nor hold a bank's pages
            loader.close()
        self.loaders = []
        if self.trainer is not None:
            if self.device is not None and self.device.type == "cuda":
                try:
                    torch.cuda.synchronize(self.device)  # queued steps and their NCCL collectives
                except RuntimeError:  # a CUDA error ended the run: the context has nothing more to finish
                    pass
            self.trainer.step.release()
            self.trainer = None
            gc.collect()  # the wrapper's reference cycles too, now, while the groups exist
        if self.bank is not None:
            self.bank.close()
            self.bank = None
        dist.shutdown()
        for fd in self.locks:
            unlock(fd)
        self.locks = []

    def abandon(self, signum: int) -> None:
        """A second signal: leave now, without a checkpoint, and without any collective or barrier (a peer may
        never come to it). Under torchrun the others cannot save either: say so, remove this node's shared-memory
        bank, and end the process here. Its process groups are not destroyed: destroying one joins its worker
        threads, which may be inside a collective that waits for the ranks left behind."""
        name = signal.Signals(signum).name
        last = f"--run.resume=auto continues from the last one, {self.checkpoint}" if self.checkpoint and \
            self.checkpoint.exists() else "there is none yet"
        if not dist.active():
            print(f"\nsecond {name}: leaving without a checkpoint ({last})", file=sys.stderr, flush=True)
            return
        print(f"\nsecond {name}: rank {dist.rank()} leaves alone, without a checkpoint; the other ranks cannot save "
              f"either and stop with an error ({last})", file=sys.stderr, flush=True)
        if self.bank is not None:
            self.bank.close()
        sys.stdout.flush()
        os._exit(128 + signum)


def train(cfg: Config) -> dict:
    """Pre-train (and evaluate); returns the results dict (also written to results.json when evaluated)."""
    held = RunResources()
    try:
        return _train(cfg, held)
    except LeftAlone as e:
        held.abandon(e.signum)
        raise
    finally:
        held.release()


def _train(cfg: Config, held: RunResources) -> dict:
    t_start = time.time()
    device = held.device = dist.init(cfg.run.device)  # torchrun: process group + this rank's device
    main_rank = dist.rank() == 0
    if cfg.run.tensorboard:  # every rank: all stop alike, before any work, when the package is missing
        from eval.tensorboard_log import require

        require()
    configure_threads(cfg.run.threads)
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    check_values(cfg)  # every rank: all stop alike, before anything is indexed or written
    BankOptions.from_config(cfg)  # the bank's options: refused combinations, before any work
    check_fresh_run_folder(cfg, run_dir)
    make_run_folder(cfg, run_dir)
    default_data(cfg)
    if cfg.data.eval_path:  # a wrong path is refused now, not when the monitor or the final evaluation reads it
        load_index(cfg.data.eval_path, key="data.eval_path")
    if dist.rank() == 0:  # one process per run folder: a second one (a resume of a live run) is refused
        held.locks.append(lock_folder(run_dir, "run folder", CheckpointError))
    found = find_resume_checkpoint(cfg, run_dir)  # first: a resume trains on its run's manifest, not a new scan
    data = prepare_data(cfg, run_dir, device, found)
    held.loaders.append(data.loader)
    plan, n = data.plan, len(data.index)
    if found[0] is not None:
        check_resumable(cfg, *found, data)
        if found[0]["progress"]["step"] >= plan.total_steps and (run_dir / "results.json").is_file():
            return complete_run(run_dir, found[0]["progress"]["step"], plan)
    trainer = held.trainer = build_trainer(cfg, n, device, plan=plan, run_dir=run_dir,
                                           checkpoint=found if found[0] is not None else None,
                                           continuing=effective_resume(cfg) == "auto")
    held.bank = trainer.model.bank
    step, nonfinite = resumed_at(*found)
    resumed_from = found[1]
    ckpt = Checkpointer(cfg, run_dir, trainer, data, step)
    held.checkpoint = ckpt.path
    logger = Logger(run_dir, plan, cfg, step, resumed_from, t_start, enabled=main_rank)
    readback = LossReadback(cfg, logger, nonfinite)
    monitor = Monitor.build(cfg, data.index, plan, device) if main_rank else None  # rank 0 evaluates, alone
    stop_at = min(plan.total_steps, step + cfg.run.max_steps) if cfg.run.max_steps else plan.total_steps
    trainer.model.train()
    first_step, t_loop = step, time.time()
    with StopFlag() as stop, logger:
        stop_asked = lambda: bool(stop.signum)  # noqa: E731 - the monitor asks between its batches
        if monitor is not None and step == 0 and (point := monitor.measure(trainer.model, 0, 0.0, stop_asked)):
            logger.monitor(point)  # the starting point of the curve
        while step < stop_at and not trainer.step.stop_requested:
            unit, start_batch = divmod(step, plan.steps_per_epoch)  # progress is (unit, batch)
            with closing(data.loader.iter_epoch(unit, start_batch)) as batches:
                logger.unit_start()
                yielded = 0
                while (batch := next_batch(batches, stop, cfg, plan)) is not None:
                    # the step's first collective: did any rank get a signal (NO_BATCH: during its wait for
                    # data), is any rank's checkpoint timer due? All ranks stop before the same step.
                    if trainer.step.vote(stop.signum, ckpt.due()):
                        break
                    logger.data_ready()
                    lr = float(trainer.lrs[step])
                    loss = trainer.step(batch.images, batch.ids, batch.crops, step, lr, ids_host=batch.ids_host)
                    step, yielded = step + 1, yielded + 1
                    log_now = step % cfg.run.log_every == 0 or step == stop_at
                    readback.add(step - 1, lr, loss, log_now or not trainer.step.sync_free, trainer.step.sync_free)
                    if readback.too_many_nonfinite():
                        ckpt.save(step, readback.nonfinite)
                        raise NonFiniteLosses(
                            f"loss was non-finite {readback.nonfinite} times in a row (last at step {step - 1});"
                            f" stopped. Checkpoint: {ckpt.path}. Lower optim.lr or check the data.")
                    if log_now:
                        logger.log(step, readback.last, lr, len(batch.ids))
                    else:
                        logger.count(len(batch.ids))
                    ckpt.maybe_save(step, readback.nonfinite)
                    if monitor is not None and monitor.due(step) and (
                            point := monitor.measure(trainer.model, step, logger.epochs_at(step), stop_asked)):
                        logger.monitor(point)  # (None: a signal came during the point, which was abandoned)
                    if step >= stop_at:
                        break
                else:  # the unit ran out: it must have yielded what the loader promised
                    check_unit_length(cfg, plan, unit, start_batch, yielded)
        train_seconds = time.time() - t_loop
        ckpt.save(step, readback.nonfinite)  # still under StopFlag: a second signal here leaves alone, and says so
    stopped_by = trainer.step.stop_signal
    if monitor is not None and monitor.points:
        print(monitor.cost_line(train_seconds), flush=True)
    if main_rank and data.bad_files.summary():
        print(data.bad_files.summary(), flush=True)
    if stopped_by:
        if main_rank:
            print(f"\n{signal.Signals(stopped_by).name}: checkpoint saved at step {step} to {ckpt.path}; continue "
                  f"with --run.resume=auto")
        sys.exit(128 + stopped_by)
    if readback.nonfinite:  # a non-finite step leaves the model as it was: the final model gave only those
        since = "its start" if readback.nonfinite >= step else f"step {step - readback.nonfinite}"
        raise NonFiniteLosses(f"the run ended with {readback.nonfinite} non-finite loss(es) in a row: the final model "
                             f"(unchanged since {since}) gave no finite loss, so it is neither exported nor evaluated. "
                             f"Lower optim.lr or check pic.temperature and the data. Checkpoint: {ckpt.path}")
    if step < plan.total_steps or not main_rank:
        if main_rank:
            print(f"stopped after run.max_steps at step {step}/{plan.total_steps}; checkpoint {ckpt.path}")
        return {"step": step, "losses": readback.losses}
    results = finish(cfg, run_dir, trainer, data, device, step, readback.losses, train_seconds,
                     (step - first_step) * cfg.data.batch_size / max(train_seconds, 1e-9))
    if monitor is not None:
        results.update(monitor.summary(train_seconds))
    results["seconds"] = time.time() - t_start
    (run_dir / "results.json").write_text(json.dumps({k: v for k, v in results.items() if k != "losses"}, indent=2))
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


USAGE = ("usage: python train.py --data.path=FOLDER [--section.key=value ...] pre-trains on your images; "
         "python train.py --preset=demo trains the built-in digits demo (make demo); --help lists every key")


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 trained (or stopped at run.max_steps), 2 refused input (one `error:` line), 1 the training
    failed (non-finite losses), 128 + signal number: stopped by SIGINT/SIGTERM with a checkpoint saved."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:  # the defaults are the ImageNet recipe (ResNet-50, 200 epochs): never run them by accident
        print(USAGE, file=sys.stderr)
        return 2
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
    except NonFiniteLosses as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except LeftAlone as e:  # a second signal: RunResources.abandon said what it means
        return 128 + e.signum
    except KeyboardInterrupt:  # before the loop took over the signals (start-up)
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
