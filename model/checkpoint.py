"""Checkpoints: tensors and plain data only, written atomically, loaded with `weights_only=True`.

A checkpoint from someone else therefore cannot run code on load. Layout (all keys always present):
    format    "pic-checkpoint-v1"
    config    the resolved config as a plain dict (no pickled objects)
    model     PIC state dict (backbone, head, and the bank's weight / momentum / last)
    optimizer backbone+head SGD state
    bank      the bank's extra state (recent-negative FIFO)
    progress  {"step": next step, "unit": epoch/window, "batch": next batch in that unit, "nonfinite": count}
    meta      {"num_instances", "arch", "dim", "git_sha", "torch"}
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import torch

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
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
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


def load(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad checkpoint
        raise CheckpointError(f"{path}: not a loadable PIC checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path}: not a PIC checkpoint (format {found!r}, expected {FORMAT!r})")
    return ckpt


def check_compatible(ckpt: dict[str, Any], path: str | os.PathLike, num_instances: int, arch: str, dim: int) -> None:
    meta = ckpt["meta"]
    for key, want in (("num_instances", num_instances), ("arch", arch), ("dim", dim)):
        if meta[key] != want:
            raise CheckpointError(f"{path}: checkpoint has {key}={meta[key]!r} but this run has {key}={want!r}")


def backbone_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's weights with torchvision's names (ResNets load into torchvision.models.<arch>() with only
    `fc.*` missing)."""
    return {k: v.detach().cpu().clone() for k, v in model.backbone.state_dict().items()}
