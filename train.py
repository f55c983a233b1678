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
from pathlib import Path

import numpy as np
import torch

from config import Config, ConfigError, parse_args, replace, resolve, to_dict
from model import distributed as dist
from model.checkpoint import FORMAT, CheckpointError, atomic_save, backbone_state, check_compatible, git_sha, load
from model.pic import build_pic
from model.step import TrainStep, make_optimizer
from pipeline import BackendUnavailable, make_loader
from pipeline.augment import seed_for
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

class StopFlag:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the end of the current step and exits."""

    def __init__(self):
        self.signum = 0
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum:  # second signal: give up at once
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


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
    if cfg.data.backend == "ffcv" or cfg.data.path.endswith(".beton"):
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
        if self.bar is not None:
            info = (f"ep {record['epoch']:.2f} loss {record['loss']:.3f} lr {record['lr']:.4g} "
                    f"{record['img_s']:.0f} img/s wait {record['data_wait_pct']:.0f}%")
            self.bar.update(self.task, completed=record["step"] + 1, info=info)
        elif show:
            print(f"step {record['step'] + 1:>7} | epoch {record['epoch']:7.2f} | loss {record['loss']:.4f} | "
                  f"lr {record['lr']:.4g} | {record['img_s']:7.1f} img/s | data wait {record['data_wait_pct']:4.1f}%",
                  flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        if self.file is not None:
            self.file.close()


# ============ the run ============

def train(cfg: Config) -> dict:
    """Pre-train (and evaluate); returns the results dict (also written to results.json when evaluated)."""
    t_start = time.time()
    device = dist.init(cfg.run.device)  # torchrun: process group + this rank's device
    rank, world = dist.rank(), dist.world()
    main_rank = rank == 0
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
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
        index.write_manifest(run_dir / "manifest.tsv")
        (run_dir / "config.json").write_text(json.dumps({"config": to_dict(cfg), "resolved": res.__dict__},
                                                        indent=2))
    # spec §3 (DDP): rank r keeps the fixed shard {i = r mod world} and slides W/world, S/world over it
    schedule = make_schedule(cfg.data.scheduler, n, res.window * world, res.stride * world, cfg.run.seed,
                             rank=rank, world_size=world)
    # same order seed on every rank (the schedule shards it); different augmentation randomness per rank
    loader_cfg = cfg if world == 1 else replace(cfg, run={"seed": seed_for(cfg.run.seed, rank)})
    loader = make_loader(loader_cfg, index, schedule, device, res.batch_per_rank)

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
    resume = "auto" if (dist.restarted() and not cfg.run.resume) else cfg.run.resume  # torchrun --max-restarts
    resume_from = ckpt_path if resume == "auto" else (Path(resume) if resume else None)
    if resume_from is not None and (resume != "auto" or ckpt_path.exists()):
        ckpt = load(resume_from)
        check_compatible(ckpt, resume_from, n, m.arch, m.dim)
        model.load_state_dict(ckpt["model"])
        model.bank.load_extra_state(ckpt["bank"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, nonfinite = ckpt["progress"]["step"], ckpt["progress"]["nonfinite"]
        print(f"resumed from {resume_from} at step {step}")

    def save(path: Path = ckpt_path) -> None:
        if not main_rank:  # written once, by rank 0; loadable at any world size (the step is global)
            return
        atomic_save({
            "format": FORMAT, "config": to_dict(cfg), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "bank": model.bank.extra_state(),
            "progress": {"step": step, "unit": step // res.steps_per_epoch, "batch": step % res.steps_per_epoch,
                         "nonfinite": nonfinite},
            "meta": {"num_instances": n, "arch": m.arch, "dim": m.dim, "git_sha": git_sha(),
                     "torch": str(torch.__version__)},
        }, path)

    # ============ training loop ============
    print(f"PIC: {n} instances, {m.arch}, {cfg.data.backend} backend on {device}, batch {cfg.data.batch_size}, "
          f"{res.num_units} {'windows' if cfg.data.scheduler == 'window' else 'epochs'} x {res.steps_per_epoch} "
          f"steps = {res.total_steps} steps, lr {res.lr:.4g}, negatives {p.negatives}", flush=True)
    logger = Logger(run_dir, res.total_steps, step, use_bar=sys.stdout.isatty(), enabled=main_rank)
    stop_at = min(res.total_steps, step + cfg.run.max_steps) if cfg.run.max_steps else res.total_steps
    model.train()
    losses: list[float] = []
    pending: list[tuple[int, float, torch.Tensor]] = []  # (step, lr, loss) not yet read back
    loss_value = float("nan")
    images_seen, t_compute, t_wait, t_window = 0, 0.0, 0.0, time.time()
    stopped_by = 0
    first_step, t_loop = step, time.time()
    try:
        with StopFlag() as stop:
            while step < stop_at and not train_step.stop_requested:
                unit, start_batch = divmod(step, res.steps_per_epoch)
                batches = loader.iter_epoch(unit, start_batch)
                t0 = time.perf_counter()
                for batch in batches:
                    t1 = time.perf_counter()
                    t_wait += t1 - t0
                    lr = float(lrs[step])
                    pending.append((step, lr, train_step(batch.images, batch.ids, batch.crops, step, lr,
                                                         stop=bool(stop.signum))))
                    step += 1
                    images_seen += len(batch.ids)
                    t0 = time.perf_counter()
                    t_compute += t0 - t1
                    log_now = step % cfg.run.log_every == 0 or step == stop_at
                    if log_now or not train_step.sync_free:  # sync-free (CUDA): read losses on log steps only
                        values = torch.stack([x[2] for x in pending]).tolist()  # the one host sync
                        for (s_i, lr_i, _), v in zip(pending, values, strict=True):
                            loss_value = v
                            if math.isfinite(v):
                                nonfinite = 0
                                losses.append(v)
                                continue
                            nonfinite += 1
                            logger.step({"step": s_i, "event": "nonfinite_loss", "loss": v, "lr": lr_i,
                                         "epoch": (s_i + 1) / res.steps_per_epoch, "img_s": 0.0,
                                         "data_wait_pct": 0.0}, show=True)
                        pending.clear()
                        if nonfinite >= o.max_nonfinite:
                            save()
                            raise FloatingPointError(
                                f"loss was non-finite {nonfinite} times in a row (last at step {step - 1}); "
                                f"stopped. Checkpoint: {ckpt_path}. Lower optim.lr or check the data.")
                    if log_now:
                        train_step.poll(bool(stop.signum))
                        dt = time.time() - t_window
                        logger.step({"step": step - 1, "epoch": step / res.steps_per_epoch, "loss": loss_value,
                                     "lr": lr, "img_s": images_seen / max(dt, 1e-9),
                                     "data_wait_pct": 100 * t_wait / max(t_wait + t_compute, 1e-9),
                                     "time": time.time() - t_start}, show=True)
                        images_seen, t_compute, t_wait, t_window = 0, 0.0, 0.0, time.time()
                    if step % cfg.run.ckpt_every == 0:
                        save()
                    if step >= stop_at or train_step.stop_requested:  # all ranks agree (TrainStep)
                        break
            stopped_by = (stop.signum or signal.SIGTERM) if train_step.stop_requested else 0
    finally:
        logger.close()
    train_seconds = time.time() - t_loop
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
    torch.save(backbone_state(model), run_dir / "backbone.pt")
    final_loss = float(np.mean(losses[-max(1, res.steps_per_epoch):])) if losses else float("nan")
    results = {"final_loss": final_loss, "ln_num_instances": math.log(n), "num_instances": n,
               "epochs": cfg.optim.epochs, "steps": step, "device": str(device), "arch": m.arch,
               "backend": cfg.data.backend, "git_sha": git_sha(), "train_seconds": train_seconds,
               "images_per_second": (step - first_step) * cfg.data.batch_size / max(train_seconds, 1e-9),
               "losses": losses}
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
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
