"""Shared command-line plumbing for the eval scripts: load a checkpoint's backbone (or a random init of it)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from config import from_dict
from model.backbone import make_backbone
from model.checkpoint import load
from model.distributed import pick_device


def add_model_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--ckpt", required=True, help="a PIC checkpoint (runs/NAME/last.pt)")
    ap.add_argument("--random-init", action="store_true", help="same architecture, random weights (baseline)")
    ap.add_argument("--size", type=int, default=0, help="eval image size (default: the run's data.image_size)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=2)


def load_backbone_fn(args) -> tuple[Callable[[torch.Tensor], torch.Tensor], int, torch.device]:
    ckpt = load(args.ckpt)
    cfg = from_dict(ckpt["config"])
    device = pick_device(args.device)
    torch.manual_seed(cfg.run.seed)
    backbone, _ = make_backbone(cfg.model.arch)
    if not args.random_init:
        state = {k[len("backbone."):]: v for k, v in ckpt["model"].items() if k.startswith("backbone.")}
        backbone.load_state_dict(state)
    backbone.to(device).eval()
    return backbone, args.size or cfg.data.image_size, device
