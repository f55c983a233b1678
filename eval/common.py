"""Shared command-line plumbing for the eval scripts: load a checkpoint's backbone (or a random init of it)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from config import ConfigError, from_dict
from model.backbone import make_backbone
from model.checkpoint import CheckpointError, load_weights
from model.distributed import DeviceError, pick_device
from pipeline.dataset import DataError


def eval_parser(description: str, train_help: str, val_help: str) -> argparse.ArgumentParser:
    """The eval CLIs' shared arguments (model, data folders); --help shows every default."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--train", required=True, help=train_help)
    ap.add_argument("--val", required=True, help=val_help)
    return ap


def add_model_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--ckpt", required=True, help="a PIC checkpoint (runs/NAME/last.pt) or an exported backbone.pt")
    ap.add_argument("--random-init", action="store_true", help="same architecture, random weights (baseline)")
    ap.add_argument("--size", type=int, default=0,
                    help="eval image size, px; 0 = the run's data.eval_size (224 for a backbone.pt without its run)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--workers", type=int, default=2, help="decode processes")


def load_backbone_fn(args) -> tuple[Callable[[torch.Tensor], torch.Tensor], int, torch.device]:
    state, arch, run_config = load_weights(args.ckpt)
    beside = Path(args.ckpt).parent / "config.json"  # a backbone.pt in its run folder: that run's settings
    if run_config is None and beside.is_file():
        run_config = json.loads(beside.read_text()).get("config")
    cfg = from_dict(run_config) if run_config is not None else None
    device = pick_device(args.device)
    torch.manual_seed(cfg.run.seed if cfg is not None else 0)
    backbone, _ = make_backbone(arch)
    if not args.random_init:
        try:
            backbone.load_state_dict(state)
        except RuntimeError as e:
            raise CheckpointError(f"{args.ckpt}: does not fit {arch} ({str(e).splitlines()[0]})") from None
    backbone.to(device).eval()
    size = args.size or (cfg.data.eval_size if cfg is not None else 224)
    source = "--size" if args.size else ("the run's data.eval_size" if cfg is not None else "the default")
    print(f"{arch} from {args.ckpt}{' (random init)' if args.random_init else ''}: evaluated at {size} px "
          f"({source})", flush=True)
    return backbone, size, device


def run_cli(main_fn, argv) -> int:
    """Run an eval CLI: bad input (a missing or foreign file, a bad folder) is one `error:` line and exit 2."""
    try:
        return main_fn(argv)
    except (CheckpointError, DataError, DeviceError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
