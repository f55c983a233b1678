"""Checkpoints: tensors and plain data only, written atomically, loaded with `weights_only=True`.

A checkpoint from someone else therefore cannot run code on load. Layout (all keys present, except where said):
    format    "pic-checkpoint-v1"
    config    the run's config as a plain dict (no pickled objects)
    model     PIC state dict (backbone, head)
    optimizer backbone+head SGD state
    bank      the bank's own state (InstanceBank.checkpoint: its rows, or for an mmap bank a reference to its
              folder; the recent-negative FIFO; the ring cache's rows)
    scaler    the fp16 loss scaler's state (scale, growth count; {} without fp16; absent before it was saved)
    progress  {"step": next step, "unit": epoch/window, "batch": next batch in that unit, "nonfinite": count}
    meta      {"num_instances", "arch", "dim", "git_sha", "torch", "plan": steps per unit, total and warm-up steps,
               "index": the digest of the instance index (pipeline.digest.index_digest)}

The run folder's checkpointing is here too: when to save (Checkpointer), what (save_checkpoint), which checkpoint a
run resumes (find_resume_checkpoint), what refuses it before the model and its bank are built, and the resume of a
complete run (complete_run).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from config import Config, ConfigError, to_dict
from model import distributed as dist

if TYPE_CHECKING:
    from model.trainer import Trainer
    from pipeline.dataset import InstanceIndex
    from plan import Resolved
    from train import Data

FORMAT = "pic-checkpoint-v1"


class CheckpointError(ValueError):
    pass


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        sha = out.stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=Path(__file__).resolve().parent).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def previous_path(path: str | os.PathLike) -> Path:
    """Where the checkpoint before `path` is kept: runs/NAME/prev.pt beside last.pt."""
    path = Path(path)
    return path.with_name("prev.pt") if path.name == "last.pt" else path.with_name(path.name + ".prev")


def atomic_save(obj: Any, path: str | os.PathLike, keep_previous: bool = False) -> None:
    """Write to a temporary file, flush it to disk, then rename over `path`: a kill at any moment leaves the old
    file or the new one, never half of one. keep_previous: the old file becomes `previous_path(path)` first (a
    kill between the two renames leaves it there and no `path`: `load_latest` then takes it)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:  # a second signal, a full disk: no half-written file left beside the checkpoint
        tmp.unlink(missing_ok=True)
        raise
    if keep_previous and path.exists():
        os.replace(path, previous_path(path))
    os.replace(tmp, path)
    try:  # the renames themselves, durable across a power cut
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def load_latest(path: str | os.PathLike) -> tuple[dict[str, Any] | None, Path | None, list[str]]:
    """The newest loadable of `path` and `previous_path(path)`: (checkpoint, its path, notes for the user);
    (None, None, notes) when neither exists. A file that exists but does not load is skipped with a note; if
    none loads, CheckpointError names both."""
    notes, errors = [], []
    for p in (Path(path), previous_path(path)):
        if not p.exists():
            continue
        try:
            return load(p), p, notes
        except CheckpointError as e:
            errors.append(str(e))
            notes.append(f"warning: {e}; trying the previous checkpoint")
    if errors:
        raise CheckpointError("no loadable checkpoint: " + " | ".join(errors))
    return None, None, notes


def _safe_load(path: Path, what: str) -> Any:
    """torch.load with the safe unpickler; any failure is one CheckpointError naming the file."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a pickle of arbitrary objects, a text file, a truncated file, ...
        # torch's own message advises weights_only=False, i.e. running the file's code: not ours to suggest
        first = str(e).strip().splitlines()[0][:120] if str(e).strip() else ""
        if "weights_only" in first:
            first = "it holds objects other than tensors and plain data"
        raise CheckpointError(f"{path}: not a loadable {what} ({type(e).__name__}: {first})") from None


def load(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    ckpt = _safe_load(path, "PIC checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path}: not a PIC checkpoint (format {found!r}, expected {FORMAT!r})")
    return ckpt


def check_compatible(ckpt: dict[str, Any], path: str | os.PathLike, num_instances: int, arch: str, dim: int) -> None:
    meta = ckpt["meta"]
    for key, want in (("num_instances", num_instances), ("arch", arch), ("dim", dim)):
        if meta[key] != want:
            raise CheckpointError(f"{path}: checkpoint has {key}={meta[key]!r} but this run has {key}={want!r}")


# Keys that fix the lr history or the data order of past steps. The lazy correction replays the lr of every step
# a row skipped, so resuming with another schedule would silently rewrite the past: refused.
SCHEDULE_KEYS = (("optim", "epochs"), ("optim", "lr"), ("optim", "min_lr"), ("optim", "warmup_epochs"),
                 ("optim", "momentum"), ("optim", "weight_decay"), ("data", "batch_size"), ("data", "scheduler"),
                 ("data", "window"), ("data", "stride"), ("run", "seed"))


def check_schedule_unchanged(ckpt: dict[str, Any], path: str | os.PathLike, config: dict[str, Any],
                             plan: dict[str, Any]) -> None:
    """Refuse a resume whose lr history or data order would differ from the checkpoint's: a changed key of
    SCHEDULE_KEYS (compared by effect: a warm-up of -1 means epochs/40), a changed plan (steps per unit, total,
    warm-up steps: a changed data set can do that), or another order generator. The world size is none of these:
    the global batches are the same at any world size (pipeline.schedule), so a run resumes on another one."""
    saved = ckpt.get("config", {})

    def effective(cfg: dict, section: str, key: str):
        value = cfg.get(section, {}).get(key)
        if (section, key) == ("optim", "warmup_epochs") and value is not None and value < 0:
            return cfg["optim"]["epochs"] / 40
        return value

    for section, key in SCHEDULE_KEYS:
        old, new = effective(saved, section, key), effective(config, section, key)
        if old is not None and old != new:
            raise CheckpointError(
                f"{path} was trained with {section}.{key}={old!r}; this run asks {new!r}. The weight correction "
                f"replays the learning rate of every past step, so a changed schedule would rewrite them: keep "
                f"--{section}.{key}={old!r}, or start a new run (another --run.name)")
    old_plan = ckpt.get("meta", {}).get("plan", {})
    for key in ("steps_per_unit", "total_steps", "warmup_steps"):
        if key in old_plan and old_plan[key] != plan[key]:
            raise CheckpointError(
                f"{path} was trained with {old_plan[key]} {key.replace('_', ' ')}; this run has {plan[key]} (another "
                f"data set or subset?). The weight correction replays the lr of every past step: resume with the "
                f"checkpoint's setting, or start a new run")
    from pipeline.schedule import LEGACY_ORDER, ORDERS

    old_order = old_plan.get("order", LEGACY_ORDER)  # checkpoints from before the order generator was recorded
    if "order" in plan and old_order != plan["order"]:
        sha = ckpt.get("meta", {}).get("git_sha", "?")
        raise CheckpointError(
            f"{path} drew its {saved.get('data', {}).get('scheduler', '?')} order with the {old_order!r} generator "
            f"({ORDERS.get(old_order, 'unknown')}); this version uses {plan['order']!r} ({ORDERS[plan['order']]}), "
            f"so the rest of the run would visit other ids than it was planned with. Finish it with the version "
            f"that wrote it (git {sha}), or start a new run (another --run.name)")


def backbone_state(model: torch.nn.Module, arch: str) -> dict[str, torch.Tensor]:
    """The backbone's weights with torchvision's names: `torchvision.models.<arch>().load_state_dict(state)` works
    with strict=True. Our backbone has no classifier, so `fc.*` is torchvision's own initialisation (seed 0): replace
    it (a linear probe) or drop it (`m.fc = torch.nn.Identity()`)."""
    state = {k: v.detach().cpu().clone() for k, v in model.backbone.state_dict().items()}
    if arch.startswith("resnet"):
        import torchvision

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            fc = getattr(torchvision.models, arch)().fc
        state.update({f"fc.{k}": v.detach().clone() for k, v in fc.state_dict().items()})
    return state


def infer_arch(state: dict[str, torch.Tensor]) -> str:
    """Which of our backbones a bare state dict (backbone.pt) belongs to, from its keys; anything else (a deeper
    or wider ResNet, another model) is a CheckpointError."""
    if any(k.startswith("features.") for k in state):
        return "tiny"
    blocks = len({k.split(".")[1] for k in state if k.startswith("layer3.")})
    bottleneck = any(k.endswith("conv3.weight") for k in state)
    arch = {(2, False): "resnet18", (6, False): "resnet34", (6, True): "resnet50"}.get((blocks, bottleneck))
    if arch is None:
        prefix = next(iter(state), "")
        hint = " (keys start with 'module.': a DDP-wrapped model?)" if prefix.startswith("module.") else ""
        raise CheckpointError(f"not a backbone of ours (tiny, resnet18/34/50){hint}")
    return arch


def load_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str, dict[str, Any] | None]:
    """A PIC checkpoint (last.pt) or an exported backbone (backbone.pt) -> (backbone state without `fc.*`, arch,
    the run's config or None). Errors are one-line CheckpointErrors that name the file."""
    path = Path(path)
    obj = _safe_load(path, "PIC checkpoint or backbone.pt")
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        state = {k[len("backbone."):]: v for k, v in obj["model"].items() if k.startswith("backbone.")}
        return state, obj["meta"]["arch"], obj["config"]
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state = {k: v for k, v in obj.items() if not k.startswith("fc.")}
        try:
            return state, infer_arch(state), None
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
    raise CheckpointError(f"{path}: not a PIC checkpoint or backbone.pt")


# ============ the run folder's checkpoints ============

def plan_facts(plan: Resolved) -> dict[str, int | str]:
    """What fixes the lr history and the data order, besides the config keys (a resume with other values is
    refused)."""
    return {"steps_per_unit": plan.steps_per_unit, "total_steps": plan.total_steps,
            "warmup_steps": plan.warmup_steps, "order": plan.order}


def save_checkpoint(path: Path, cfg: Config, trainer: Trainer, bank: dict, step: int, plan: Resolved, nonfinite: int,
                    index: InstanceIndex, keep_previous: bool = True) -> None:
    """The whole training state at the start of step `step` (bank: the bank's, InstanceBank.checkpoint); the
    previous checkpoint is kept (prev.pt) unless keep_previous is False (`path` is then replaced in place)."""
    m = cfg.model
    atomic_save({
        "format": FORMAT, "config": to_dict(cfg), "model": trainer.model.state_dict(),
        "optimizer": trainer.optimizer.state_dict(), "bank": bank,
        "scaler": trainer.train_step.scaler_state(),
        "progress": {"step": step, "unit": step // plan.steps_per_unit, "batch": step % plan.steps_per_unit,
                     "nonfinite": nonfinite},
        "meta": {"num_instances": len(index), "arch": m.arch, "dim": m.dim, "git_sha": git_sha(),
                 "torch": str(torch.__version__), "plan": plan_facts(plan),
                 "index": index.digest},  # a resume's manifest must be this index (pipeline.manifest)
    }, path, keep_previous=keep_previous)


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
        if step % self.data.plan.steps_per_unit == 0 or self.trainer.train_step.save_requested or \
                (every and step % every == 0):
            self.save(step, nonfinite)

    def save(self, step: int, nonfinite: int, replace: bool = False) -> None:
        """Every rank. replace: last.pt of this same step is rewritten in place (prev.pt stays the checkpoint
        before it)."""
        self.t_saved = time.time()
        self.trainer.train_step.save_requested = False
        bank = self.trainer.model.bank
        state = bank.checkpoint(step)  # every rank: an mmap bank flushes, starts a journal
        if dist.rank() == 0:  # the other ranks' bad files, into the run's one list
            self.data.bad_files.merge()
        if dist.rank() == 0 and (replace or self.saved_at != step or not self.path.exists()):
            save_checkpoint(self.path, self.cfg, self.trainer, state, step, self.data.plan, nonfinite,
                            self.data.index, keep_previous=not replace)
            self.saved_at = step
        bank.committed(step)  # after the rename: an mmap bank's journals of older checkpoints may go now

    def save_up_to_date(self, step: int, nonfinite: int) -> None:
        """Every rank after the loop; only at the end of a complete run (step = the plan's total, its checkpoint
        saved already): every stale bank row corrected to its state before step `step` (each node's writer corrects
        its rows; an mmap bank undoably, in its files), and last.pt rewritten in place with those rows. So last.pt's
        classifier rows are up to date whatever the storage; prev.pt stays the checkpoint before, which a resume
        trains from and corrects again, or, for an mmap bank whose files were corrected, refuses in one line."""
        if step < self.data.plan.total_steps:
            return
        self.trainer.model.bank.bring_up_to_date(step)
        self.save(step, nonfinite, replace=True)


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


def check_resumable(cfg: Config, ckpt: dict, path: Path, index: InstanceIndex, plan: Resolved) -> None:
    """Everything that refuses a checkpoint, before the model and its bank are built (an mmap bank of 10⁸ rows is
    52 GB and minutes to initialise: a refused resume must not make one)."""
    check_compatible(ckpt, path, len(index), cfg.model.arch, cfg.model.dim)
    check_schedule_unchanged(ckpt, path, to_dict(cfg), plan_facts(plan))


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


def resumed_at(ckpt: dict | None, path: Path | None) -> tuple[int, int]:
    """(step, non-finite count) of the checkpoint the trainer was built from (0, 0: a fresh start)."""
    if ckpt is None:
        return 0, 0
    if dist.rank() == 0:
        print(f"resumed from {path} at step {ckpt['progress']['step']}", flush=True)
    return ckpt["progress"]["step"], ckpt["progress"]["nonfinite"]
