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


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


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
