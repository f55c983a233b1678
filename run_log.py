"""What a run writes as it trains: log.jsonl (the record, flushed at every line), the console (a progress bar on a
terminal, plain lines otherwise), TensorBoard scalars, and the losses read back from the device.

Step numbers. Every "step" counts the steps done: a checkpoint's progress.step, log.jsonl's training lines (after the
step they end with), its non-finite-loss events (after the step whose loss it was) and monitor points (0: before
training), the console's "step" column, TensorBoard's and eval.plot's x axis, train()'s returned "step". The first
training step is step 1.

log.jsonl is strict JSON, one object a line: a non-finite loss is written as null (the event's "value" says which:
"nan", "inf" or "-inf"), never as the NaN that Python's json would write and other readers refuse.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

from config import Config
from model import distributed as dist
from plan import Resolved


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
              f"{plan.num_units} {'windows' if d.scheduler == 'window' else 'epochs'} x {plan.steps_per_unit} "
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
            return step / self.plan.steps_per_unit
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
        """After `step` steps: one line for the window since the last log step."""
        self.count(images)
        dt = time.time() - self.t_window
        self.record({"step": step, "epoch": self.epochs_at(step), "loss": loss, "lr": lr,
                   "img_s": self.images / max(dt, 1e-9),
                   "data_wait_pct": 100 * self.t_wait / max(self.t_wait + self.t_compute, 1e-9),
                   "time": time.time() - self.t_start})
        self.images, self.t_compute, self.t_wait, self.t_window = 0, 0.0, 0.0, time.time()

    def record(self, record: dict) -> None:
        """A training line or a non-finite-loss event: log.jsonl, the console, TensorBoard."""
        if not self.enabled:
            return
        self.event(record)
        self.nonfinite += record.get("event") == "nonfinite_loss"
        if self.tb is not None and "event" not in record:
            from eval.tensorboard_log import TRAIN_TAGS

            self.tb.write({**record, "nonfinite": self.nonfinite}, TRAIN_TAGS, record["step"])
        if self.bar is not None:
            info = (f"ep {record['epoch']:.2f} loss {record['loss']:.3f} lr {record['lr']:.4g} "
                    f"{record['img_s']:.0f} img/s wait {record['data_wait_pct']:.0f}%")
            self.bar.update(self.task, completed=record["step"], info=info)
        else:
            print(f"step {record['step']:>7} | epoch {record['epoch']:7.2f} | loss {record['loss']:.4f} | "
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
            self.file.write(json.dumps(strict_json(record), allow_nan=False) + "\n")
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


def strict_json(record: dict) -> dict:
    """`record` with its non-finite floats as null (strict JSON: log.jsonl, results.json); a non-finite-loss event
    keeps the kind of its loss in "value"."""
    out = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
    if record.get("event") == "nonfinite_loss":
        out["value"] = str(record["loss"]).lower()  # "nan", "inf", "-inf"
    return out


def write_results(run_dir: Path, results: dict) -> None:
    """results.json: the run's figures, strict JSON (the per-step losses are in log.jsonl, not here)."""
    kept = strict_json({k: v for k, v in results.items() if k != "losses"})
    (run_dir / "results.json").write_text(json.dumps(kept, indent=2, allow_nan=False))


class LossReadback:
    """Losses stay on the device until a log step (sync-free CUDA: the loop's one host sync), then are read
    back, averaged over ranks (so every rank logs and stops alike), and non-finite ones counted."""

    def __init__(self, cfg: Config, logger: Logger, nonfinite: int = 0):
        self.cfg, self.logger = cfg, logger
        self.pending: list[tuple[int, float, torch.Tensor]] = []  # (steps done, lr, loss) not yet read back
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
            self.logger.record({"step": s, "event": "nonfinite_loss", "loss": v, "lr": lr_s,
                                "epoch": self.logger.epochs_at(s), "img_s": 0.0, "data_wait_pct": 0.0})
        self.pending.clear()

    def too_many_nonfinite(self) -> bool:
        return self.nonfinite >= self.cfg.optim.max_nonfinite
