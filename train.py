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
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from config import Config, ConfigError, check_values, parse_args, to_dict
from eval.monitor import Monitor
from lifecycle import LeftAlone, RunResources, StopFlag, StopRequested, left_alone
from model import distributed as dist
from model.bank import BankError, BankOptions
from model.checkpoint import (
    Checkpointer,
    CheckpointError,
    backbone_state,
    check_fresh_run_folder,
    check_resumable,
    complete_run,
    effective_resume,
    find_resume_checkpoint,
    git_sha,
    make_run_folder,
    resumed_at,
)
from model.folder_lock import lock_folder
from model.trainer import Trainer, build_trainer
from pipeline import BackendUnavailable, backend_unavailable, make_loader
from pipeline.base import BadFiles, Loader
from pipeline.beton import beton_index, open_index
from pipeline.dataset import DataError, InstanceIndex, load_index
from pipeline.decode import require_decodable
from pipeline.manifest import IndexResume, resume_index, write_run_manifest
from pipeline.schedule import RankSchedule, make_schedule
from plan import Resolved, resolve
from run_log import Logger, LossReadback, write_results

DEFAULT_DATA_ROOT = Path(__file__).resolve().parent / "data" / "sample"


# ============ small helpers ============


class NonFiniteLosses(FloatingPointError):
    """The run gave no trained model: its final losses were non-finite (one `error:` line, exit 1)."""


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
        index = beton_index(d.path, d.ffcv_image_field, d.ffcv_label_field)
        if index.images.note and dist.rank() == 0:  # a .beton without our sidecars: what was assumed
            print(index.images.note, flush=True)
    else:
        index = load_index(d.path, key="data.path")
    scanned = index  # a resume compares the manifest with everything there now, not with a new subset of it
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
    fixed_ids = d.backend == "ffcv"  # a .beton's samples carry their ids: its subset is its first samples
    resumed = resume_index(Path(path).parent, index if fixed_ids else scanned, ckpt["meta"].get("index"),
                           data=d.path, fixed_ids=fixed_ids, subset=bool(d.subset))
    return resumed.index, resumed


# ============ data, checkpoints, loss read-back ============

@dataclass
class Data:
    index: InstanceIndex
    plan: Resolved  # steps per unit, units, warm-up, lr, window (plan.resolve)
    loader: Loader
    bad_files: BadFiles


def plan_data(cfg: Config, found: tuple[dict | None, Path | None] = (None, None)
              ) -> tuple[InstanceIndex, Resolved, IndexResume | None]:
    """Index and plan (rank 0 says their notes). found: the checkpoint a resume starts from (its run's manifest is
    the index). Writes nothing: the resume may still be refused, and a refused one leaves the run folder as it was."""
    index, resumed = build_index(cfg, found)
    if index.skipped and dist.rank() == 0:
        print(f"note: {len(index.skipped)} non-image or empty file(s) ignored, e.g. {index.skipped[0]}")
    plan = resolve(cfg, len(index), dist.world())
    if dist.rank() == 0:
        for note in plan.notes + tuple(resumed.notes if resumed else ()):
            print(note, flush=True)
    return index, plan, resumed


def open_data(cfg: Config, run_dir: Path, device: torch.device, index: InstanceIndex, plan: Resolved,
              resumed: IndexResume | None, held: RunResources) -> Data:
    """This rank's schedule and loader (released with `held`); then, the run accepted (nothing after this refuses
    it), rank 0 writes manifest.tsv and config.json (config, plan and the environment)."""
    rank, world = dist.rank(), dist.world()
    # one global order per unit (a function of the seed and the unit alone); this rank takes its slice of every
    # global batch, and the loaders draw each sample's augmentation for its place in the global batch: the same
    # global batches, augmentations included, at any world size
    schedule = RankSchedule(make_schedule(cfg.data.scheduler, len(index), plan.window, plan.stride, cfg.run.seed),
                            cfg.data.batch_size, rank, world)
    bad_files = BadFiles(run_dir / "bad_files.tsv", index, rank=rank)  # undecodable images, named once per run
    if resumed is not None:  # files gone or replaced since the run started
        bad_files.record(resumed.bad, write=rank == 0)
    loader = make_loader(cfg, index, schedule, device, plan.batch_per_rank, bad_files=bad_files)
    held.loaders.append(loader)
    if len(loader) != plan.steps_per_unit:  # the loader owns a unit's length; the plan must agree with it
        raise RuntimeError(f"the {cfg.data.backend} loader has {len(loader)} batches per unit, the plan "
                           f"{plan.steps_per_unit}: a bug (see pipeline.base.LoaderBase)")
    if rank == 0:
        if resumed is None or not same_file(resumed.manifest, run_dir / "manifest.tsv"):
            write_run_manifest(index, run_dir)
        from provenance import env_record  # versions, git sha, CPU/GPU (eval.report shows it)

        (run_dir / "config.json").write_text(json.dumps({"config": to_dict(cfg), "resolved": plan.__dict__,
                                                         "env": env_record()}, indent=2))
    return Data(index, plan, loader, bad_files)


def same_file(a: Path | None, b: Path) -> bool:
    return a is not None and a.exists() and b.exists() and os.path.samefile(a, b)


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
    if yielded != plan.steps_per_unit - start_batch:
        raise RuntimeError(f"the {cfg.data.backend} loader yielded {yielded} batches of unit {unit} from batch "
                           f"{start_batch}; {plan.steps_per_unit - start_batch} were planned: a bug in the "
                           f"backend (its contract: pipeline.base.LoaderBase)")


# ============ the run ============


def train(cfg: Config) -> dict:
    """Pre-train (and evaluate); returns the results dict (also written to results.json when evaluated)."""
    held = RunResources()
    try:
        return _train(cfg, held)
    except BaseException as e:  # a second signal inside torch.save comes back as torch's error, chained to it
        if (left := left_alone(e)) is None:
            raise
        held.abandon(left.signum)
        raise left from None
    finally:
        held.release()


def open_run(cfg: Config, held: RunResources) -> Path:
    """Every check that refuses a run before any work (on every rank: all stop alike), then its folder, made and
    locked."""
    if cfg.run.tensorboard:  # when the package is missing
        from eval.tensorboard_log import require

        require()
    configure_threads(cfg.run.threads)
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    check_values(cfg)  # before anything is indexed or written
    BankOptions.from_config(cfg)  # the bank's options: refused combinations
    check_fresh_run_folder(cfg, run_dir)
    make_run_folder(cfg, run_dir)
    default_data(cfg)
    if cfg.data.eval_path:  # a wrong path is refused now, not when the monitor or the final evaluation reads it
        open_index(cfg.data.eval_path, cfg.data.ffcv_image_field, cfg.data.ffcv_label_field, key="data.eval_path")
    if dist.rank() == 0:  # one process per run folder: a second one (a resume of a live run) is refused
        held.locks.append(lock_folder(run_dir, "run folder", CheckpointError))
    return run_dir


def _train(cfg: Config, held: RunResources) -> dict:
    t_start = time.time()
    device = held.device = dist.init(cfg.run.device)  # torchrun: process group + this rank's device
    main_rank = dist.rank() == 0
    run_dir = open_run(cfg, held)
    found = find_resume_checkpoint(cfg, run_dir)  # first: a resume trains on its run's manifest, not a new scan
    index, plan, resumed = plan_data(cfg, found)
    if found[0] is not None:
        check_resumable(cfg, *found, index, plan)
        if found[0]["progress"]["step"] >= plan.total_steps and (run_dir / "results.json").is_file():
            return complete_run(run_dir, found[0]["progress"]["step"], plan)
    trainer = held.trainer = build_trainer(cfg, len(index), device, plan=plan, run_dir=run_dir,
                                           checkpoint=found if found[0] is not None else None,
                                           continuing=effective_resume(cfg) == "auto")
    held.bank = trainer.model.bank
    data = open_data(cfg, run_dir, device, index, plan, resumed, held)  # after everything that refuses a resume
    step, nonfinite = resumed_at(*found)
    ckpt = Checkpointer(cfg, run_dir, trainer, data, step)
    held.checkpoint = ckpt.path
    logger = Logger(run_dir, plan, cfg, step, found[1], t_start, enabled=main_rank)  # found[1]: resumed from
    readback = LossReadback(cfg, logger, nonfinite)
    monitor = Monitor.build(cfg, data.index, plan, device) if main_rank else None  # rank 0 evaluates, alone
    stop_at = min(plan.total_steps, step + cfg.run.max_steps) if cfg.run.max_steps else plan.total_steps
    trainer.model.train()
    first_step, t_loop = step, time.time()
    with StopFlag() as stop, logger:
        stop_asked = lambda: bool(stop.signum)  # noqa: E731 - the monitor asks between its batches
        if monitor is not None and step == 0 and (point := monitor.measure(trainer.model, 0, 0.0, stop_asked)):
            logger.monitor(point)  # the starting point of the curve
        while step < stop_at and not trainer.train_step.stop_requested:
            unit, start_batch = divmod(step, plan.steps_per_unit)  # progress is (unit, batch)
            with closing(data.loader.iter_epoch(unit, start_batch)) as batches:
                logger.unit_start()
                yielded = 0
                while (batch := next_batch(batches, stop, cfg, plan)) is not None:
                    # the step's first collective: did any rank get a signal (NO_BATCH: during its wait for
                    # data), is any rank's checkpoint timer due? All ranks stop before the same step.
                    if trainer.train_step.vote(stop.signum, ckpt.due()):
                        break
                    logger.data_ready()
                    lr = float(trainer.lrs[step])
                    loss = trainer.train_step(batch.images, batch.ids, batch.crops, step, lr, ids_host=batch.ids_host)
                    step, yielded = step + 1, yielded + 1
                    log_now = step % cfg.run.log_every == 0 or step == stop_at
                    sync_free = trainer.train_step.sync_free
                    readback.add(step, lr, loss, log_now or not sync_free, sync_free)
                    if readback.too_many_nonfinite():
                        ckpt.save(step, readback.nonfinite)
                        raise NonFiniteLosses(
                            f"loss was non-finite {readback.nonfinite} times in a row (last at step {step});"
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
    if monitor is not None and monitor.points:
        print(monitor.cost_line(train_seconds), flush=True)
    if main_rank and data.bad_files.summary():
        print(data.bad_files.summary(), flush=True)
    leave_if_stopped(trainer.train_step.stop_signal, readback.nonfinite, step, ckpt.path)
    ckpt.save_up_to_date(step, readback.nonfinite)  # a complete run: its bank rows corrected, into last.pt
    if step < plan.total_steps or not main_rank:
        if main_rank:
            print(f"stopped after run.max_steps at step {step}/{plan.total_steps}; checkpoint {ckpt.path}")
        return {"step": step, "losses": readback.losses}
    results = finish(cfg, run_dir, trainer, data, device, step, readback.losses, train_seconds,
                     (step - first_step) * cfg.data.batch_size / max(train_seconds, 1e-9))
    results.update(monitor.summary(train_seconds) if monitor is not None else {}, seconds=time.time() - t_start)
    write_results(run_dir, results)
    return results


def leave_if_stopped(stopped_by: int, nonfinite: int, step: int, checkpoint: Path) -> None:
    """After the loop: a signal stopped it (exit 128 + its number, with the resume hint), or it ended on
    non-finite losses (no trained model: NonFiniteLosses)."""
    if stopped_by:
        if dist.rank() == 0:
            print(f"\n{signal.Signals(stopped_by).name}: checkpoint saved at step {step} to {checkpoint}; continue "
                  f"with --run.resume=auto")
        sys.exit(128 + stopped_by)
    if nonfinite:  # a non-finite step leaves the model as it was: the final model gave only those
        since = "its start" if nonfinite >= step else f"step {step - nonfinite}"
        raise NonFiniteLosses(f"the run ended with {nonfinite} non-finite loss(es) in a row: the final model "
                             f"(unchanged since {since}) gave no finite loss, so it is neither exported nor evaluated. "
                             f"Lower optim.lr or check pic.temperature and the data. Checkpoint: {checkpoint}")


def finish(cfg: Config, run_dir: Path, trainer: Trainer, data: Data, device: torch.device, step: int,
           losses: list[float], train_seconds: float, images_per_second: float) -> dict:
    """The end of a complete run (its bank rows brought up to date and saved): export backbone.pt, evaluate."""
    model, n = trainer.model, len(data.index)
    torch.save(backbone_state(model, cfg.model.arch), run_dir / "backbone.pt")
    final_loss = float(np.mean(losses[-max(1, data.plan.steps_per_unit):])) if losses else float("nan")
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
